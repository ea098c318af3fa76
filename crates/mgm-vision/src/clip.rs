//! The CLIP ViT vision tower, matching transformers' `CLIPVisionModel`.
//!
//! Embeddings (patch conv without bias, class token, position table) -> `pre_layrnorm` -> pre-norm
//! encoder layers (`layer_norm1`, self-attention, residual; `layer_norm2`, `fc1`, activation,
//! `fc2`, residual). `last_hidden_state` is the encoder output (no final norm) and
//! `pooler_output = post_layernorm(last_hidden_state[:, 0])`. `hidden_states[0]` is the input of
//! the first encoder layer (after `pre_layrnorm`) and `hidden_states[i]` the output of layer
//! `i`, as transformers 5.x records them.
//!
//! The patch convolution has stride = kernel and no padding, so it runs as one matmul over the
//! patches (a reshape/permute of the pixels) and produces tokens in `[B, P, D]` order directly.

use std::path::Path;

use mgm_tensor::nn::{
    Init, LayerNorm, Linear, Module, MultiHeadAttention, Param, ProjNames, VarStore,
};
use mgm_tensor::{DType, InterpolateMode, Tensor};
use serde::Deserialize;

use crate::config::{read_json, required};
use crate::{Error, Result};

/// The activation of the MLP (`hidden_act`): mgm-tensor's fused activations.
pub use mgm_tensor::nn::Activation;

/// The vision tower's hyper-parameters (`CLIPVisionConfig`).
#[derive(Clone, Debug, PartialEq)]
pub struct ClipVisionConfig {
    /// Token width D.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads (D must split evenly).
    pub num_attention_heads: usize,
    /// Input channels (3).
    pub num_channels: usize,
    /// Training image size (the position table covers `(image_size / patch_size)^2` patches).
    pub image_size: usize,
    /// Patch side.
    pub patch_size: usize,
    /// MLP activation.
    pub hidden_act: Activation,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
}

/// The keys of a `CLIPVisionConfig`, all optional so that missing ones are reported by name.
#[derive(Deserialize, Default)]
struct RawVision {
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_channels: Option<usize>,
    image_size: Option<usize>,
    patch_size: Option<usize>,
    hidden_act: Option<String>,
    layer_norm_eps: Option<f64>,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(flatten)]
    vision: RawVision,
    vision_config: Option<RawVision>,
}

impl ClipVisionConfig {
    /// Reads `config.json` of a `CLIPVisionModel`, or of a `CLIPModel` (whose `vision_config`
    /// object holds the tower's keys). The size keys are required; `num_channels` (3),
    /// `hidden_act` (`quick_gelu`) and `layer_norm_eps` (1e-5) default as in transformers.
    pub fn from_file(path: impl AsRef<Path>) -> Result<ClipVisionConfig> {
        let path = path.as_ref();
        let raw: RawConfig = read_json(path)?;
        Self::from_raw(raw, &path.display().to_string())
    }

    /// Like [`ClipVisionConfig::from_file`] for JSON text; `source` names it in errors.
    pub fn from_json_str(text: &str, source: &str) -> Result<ClipVisionConfig> {
        let raw: RawConfig = crate::config::parse_json(text, source)?;
        Self::from_raw(raw, source)
    }

    fn from_raw(raw: RawConfig, path: &str) -> Result<ClipVisionConfig> {
        let (v, prefix) = match raw.vision_config {
            Some(v) => (v, "vision_config."),
            None => (raw.vision, ""),
        };
        let req = |x: Option<usize>, k: &str| required(x, path, &format!("{prefix}{k}"));
        let bad = |k: &str, msg: String| Error::BadConfig {
            path: path.to_string(),
            key: format!("{prefix}{k}"),
            msg,
        };
        let act_name = v.hidden_act.unwrap_or_else(|| "quick_gelu".to_string());
        let hidden_act = Activation::from_hf_name(&act_name).ok_or_else(|| {
            bad(
                "hidden_act",
                format!(
                    "unknown activation {act_name:?} (supported: quick_gelu, gelu, gelu_new, \
                     gelu_pytorch_tanh, gelu_fast, silu, relu)"
                ),
            )
        })?;
        let c = ClipVisionConfig {
            hidden_size: req(v.hidden_size, "hidden_size")?,
            intermediate_size: req(v.intermediate_size, "intermediate_size")?,
            num_hidden_layers: req(v.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads: req(v.num_attention_heads, "num_attention_heads")?,
            num_channels: v.num_channels.unwrap_or(3),
            image_size: req(v.image_size, "image_size")?,
            patch_size: req(v.patch_size, "patch_size")?,
            hidden_act,
            layer_norm_eps: v.layer_norm_eps.unwrap_or(1e-5),
        };
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(bad(
                "num_attention_heads",
                format!(
                    "hidden_size {} does not split into {} heads",
                    c.hidden_size, c.num_attention_heads
                ),
            ));
        }
        if c.patch_size == 0 || c.image_size < c.patch_size {
            return Err(bad(
                "patch_size",
                format!(
                    "patch size {} does not fit image size {}",
                    c.patch_size, c.image_size
                ),
            ));
        }
        Ok(c)
    }

    /// Patches per side at the training size.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Rows of the position table: one per patch plus the class token.
    pub fn num_positions(&self) -> usize {
        self.grid() * self.grid() + 1
    }
}

/// One pre-norm transformer block.
#[derive(Clone, Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: MultiHeadAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn load(vs: &VarStore, c: &ClipVisionConfig) -> Result<EncoderLayer> {
        let d = c.hidden_size;
        Ok(EncoderLayer {
            layer_norm1: LayerNorm::load(&vs.pp("layer_norm1"), d, c.layer_norm_eps)?,
            self_attn: MultiHeadAttention::load(
                &vs.pp("self_attn"),
                d,
                c.num_attention_heads,
                ProjNames::CLIP,
                true,
            )?,
            layer_norm2: LayerNorm::load(&vs.pp("layer_norm2"), d, c.layer_norm_eps)?,
            fc1: Linear::load(&vs.pp("mlp.fc1"), d, c.intermediate_size, true)?,
            fc2: Linear::load(&vs.pp("mlp.fc2"), c.intermediate_size, d, true)?,
            act: c.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self
            .self_attn
            .forward_residual(&self.layer_norm1.forward(x)?, None, Some(x))?;
        let h = self.layer_norm2.forward(&x)?;
        let h = self.fc1.forward_fused(&h, self.act, None)?;
        Ok(self.fc2.forward_fused(&h, Activation::Identity, Some(&x))?)
    }
}

/// What [`ClipVisionModel::forward_with`] computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClipForwardOptions {
    /// Resize the position table to the input's patch grid (transformers'
    /// `interpolate_pos_encoding=True`); without it the input must be `image_size` square.
    pub interpolate_pos_encoding: bool,
    /// Keep every hidden state (`output_hidden_states=True`).
    pub output_hidden_states: bool,
}

impl Default for ClipForwardOptions {
    fn default() -> Self {
        ClipForwardOptions {
            interpolate_pos_encoding: false,
            output_hidden_states: true,
        }
    }
}

/// The tower's outputs, named as in transformers.
#[derive(Clone, Debug)]
pub struct ClipVisionOutput {
    /// Encoder output `[B, 1 + P, D]` (no final norm).
    pub last_hidden_state: Tensor,
    /// `post_layernorm` of the class token, `[B, D]`.
    pub pooler_output: Tensor,
    /// `L + 1` states `[B, 1 + P, D]`: the first layer's input, then each layer's output
    /// (empty unless requested).
    pub hidden_states: Vec<Tensor>,
}

/// A CLIP ViT vision tower with its weights.
#[derive(Clone, Debug)]
pub struct ClipVisionModel {
    config: ClipVisionConfig,
    patch_embedding: Param,
    class_embedding: Param,
    position_embedding: Param,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    dtype: DType,
}

/// The checkpoint spellings of the tower's root, tried in order.
const PREFIXES: [&str; 2] = ["vision_model", ""];
const PROBE: &str = "embeddings.patch_embedding.weight";

impl ClipVisionModel {
    /// Loads the tower from `vs` by transformers' names, with or without the `vision_model.`
    /// prefix (CLIPModel and transformers 4.x checkpoints have it, 5.x `CLIPVisionModel` saves
    /// none). Parameters take the store's dtype (see [`VarStore::with_dtype`]); a trainable
    /// store creates missing parameters with CLIP-like random inits.
    pub fn load(vs: &VarStore, config: &ClipVisionConfig) -> Result<ClipVisionModel> {
        let root = Self::root(vs)?;
        let c = config;
        let (d, p, ch) = (c.hidden_size, c.patch_size, c.num_channels);
        let emb = root.pp("embeddings");
        let patch_embedding = emb.pp("patch_embedding").param_or_init(
            "weight",
            &[d, ch, p, p],
            Init::Normal {
                mean: 0.0,
                std: 0.02,
            },
        )?;
        let class_embedding = emb.param_or_init(
            "class_embedding",
            &[d],
            Init::Normal {
                mean: 0.0,
                std: 1.0 / (d as f64).sqrt(),
            },
        )?;
        let position_embedding = emb.pp("position_embedding").param_or_init(
            "weight",
            &[c.num_positions(), d],
            Init::Normal {
                mean: 0.0,
                std: 0.02,
            },
        )?;
        // a buffer transformers recomputes; some checkpoints store it
        emb.mark_used("position_ids");
        let pre_layrnorm = LayerNorm::load(&root.pp("pre_layrnorm"), d, c.layer_norm_eps)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::load(&root.pp(&format!("encoder.layers.{i}")), c))
            .collect::<Result<Vec<_>>>()?;
        let post_layernorm = LayerNorm::load(&root.pp("post_layernorm"), d, c.layer_norm_eps)?;
        let dtype = patch_embedding.tensor().dtype();
        Ok(ClipVisionModel {
            config: c.clone(),
            patch_embedding,
            class_embedding,
            position_embedding,
            pre_layrnorm,
            layers,
            post_layernorm,
            dtype,
        })
    }

    /// The store's handle at the tower's root (prefixed or not).
    fn root(vs: &VarStore) -> Result<VarStore> {
        for prefix in PREFIXES {
            let h = if prefix.is_empty() {
                vs.clone()
            } else {
                vs.pp(prefix)
            };
            if h.contains(PROBE) {
                return Ok(h);
            }
        }
        if vs.is_trainable() {
            return Ok(vs.pp(PREFIXES[0]));
        }
        // let the store name the file in its error
        let err = vs
            .get_any_shape(&format!("{}.{PROBE}", PREFIXES[0]))
            .expect_err("the probe name was just found missing");
        Err(Error::invalid_input(
            "ClipVisionModel::load",
            format!(
                "no CLIP vision weights: neither {}.{PROBE} nor {PROBE} under {:?} ({err})",
                PREFIXES[0],
                vs.prefix()
            ),
        ))
    }

    /// Loads a transformers model directory: `config.json` and `model.safetensors` (or a
    /// sharded `model.safetensors.index.json`), parameters converted to `dtype`. Checkpoint
    /// tensors under the tower's prefix that the model does not use are an error.
    pub fn load_dir(dir: impl AsRef<Path>, dtype: DType) -> Result<ClipVisionModel> {
        let dir = dir.as_ref();
        let config = ClipVisionConfig::from_file(dir.join("config.json"))?;
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let vs = if single.exists() {
            VarStore::from_safetensors(&[&single])?
        } else if index.exists() {
            VarStore::from_safetensors_index(&index)?
        } else {
            return Err(Error::Io {
                path: single.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors or model.safetensors.index.json in the model directory",
                ),
            });
        };
        let vs = vs.with_dtype(dtype);
        let model = Self::load(&vs, &config)?;
        let root = Self::root(&vs)?;
        let under =
            |n: &str| root.prefix().is_empty() || n.starts_with(&format!("{}.", root.prefix()));
        vs.finish_ignoring(|n| !under(n) || n.ends_with("position_ids"))?;
        Ok(model)
    }

    /// The configuration.
    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// The parameters' dtype (activations run in it; norms and softmax compute in f32).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `[B, C, H, W]` pixels to the embeddings `[B, 1 + P, D]` after `pre_layrnorm`.
    fn embed(&self, pixel_values: &Tensor, interpolate: bool) -> Result<Tensor> {
        const WHAT: &str = "ClipVisionModel";
        let c = &self.config;
        let s = pixel_values.shape();
        if s.len() != 4 || s[1] != c.num_channels {
            return Err(Error::invalid_input(
                WHAT,
                format!(
                    "pixel_values must be [B, {}, H, W], got {s:?}",
                    c.num_channels
                ),
            ));
        }
        if !pixel_values.dtype().is_float() {
            return Err(Error::invalid_input(
                WHAT,
                format!("pixel_values must be float, got {}", pixel_values.dtype()),
            ));
        }
        let (b, ch, h, w) = (s[0], s[1], s[2], s[3]);
        let p = c.patch_size;
        if !interpolate && (h != c.image_size || w != c.image_size) {
            return Err(Error::invalid_input(
                WHAT,
                format!(
                    "input image size ({h}*{w}) doesn't match model ({0}*{0}); enable \
                     interpolate_pos_encoding for other sizes",
                    c.image_size
                ),
            ));
        }
        if h < p || w < p || b == 0 {
            return Err(Error::invalid_input(
                WHAT,
                format!("input {s:?} holds no {p}x{p} patch"),
            ));
        }
        let d = c.hidden_size;
        let (gh, gw) = (h / p, w / p);
        let x = pixel_values.to_dtype(self.dtype)?;
        // the strided conv ignores the remainder rows/columns
        let x = if gh * p != h || gw * p != w {
            x.narrow(2, 0, gh * p)?.narrow(3, 0, gw * p)?
        } else {
            x
        };
        let patches = x
            .reshape(&[b, ch, gh, p, gw, p])?
            .permute(&[0, 2, 4, 1, 3, 5])?
            .contiguous()?
            .reshape(&[b, gh * gw, ch * p * p])?;
        let weight = self.patch_embedding.tensor().reshape(&[d, ch * p * p])?;
        let tokens = patches.matmul(&weight.t()?)?;
        let cls = self
            .class_embedding
            .tensor()
            .reshape(&[1, 1, d])?
            .expand(&[b, 1, d])?;
        let emb = Tensor::cat(&[cls, tokens], 1)?;
        let pos = self.position_encoding(h, w, gh, gw, interpolate)?;
        Ok(self.pre_layrnorm.forward(&emb.add(&pos)?)?)
    }

    /// The position table for a `gh x gw` grid: the stored one, or its bicubic resize
    /// (align_corners=False) as transformers' `interpolate_pos_encoding` computes it.
    fn position_encoding(
        &self,
        h: usize,
        w: usize,
        gh: usize,
        gw: usize,
        interpolate: bool,
    ) -> Result<Tensor> {
        let table = self.position_embedding.tensor();
        let n = table.shape()[0] - 1;
        if !interpolate || (gh * gw == n && h == w) {
            return Ok(table);
        }
        let d = self.config.hidden_size;
        let side = (n as f64).sqrt() as usize;
        if side * side != n {
            return Err(Error::invalid_input(
                "ClipVisionModel",
                format!("cannot interpolate a position table of {n} patches (not a square grid)"),
            ));
        }
        let grid = table
            .narrow(0, 1, n)?
            .reshape(&[1, side, side, d])?
            .permute(&[0, 3, 1, 2])?;
        let resized = grid
            .interpolate((gh, gw), InterpolateMode::Bicubic, false)?
            .permute(&[0, 2, 3, 1])?
            .reshape(&[gh * gw, d])?;
        Ok(Tensor::cat(&[table.narrow(0, 0, 1)?, resized], 0)?)
    }

    /// Runs the tower like `CLIPVisionModel(pixel_values, output_hidden_states=True)`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<ClipVisionOutput> {
        self.forward_with(pixel_values, ClipForwardOptions::default())
    }

    /// Runs the tower with explicit options.
    pub fn forward_with(
        &self,
        pixel_values: &Tensor,
        opts: ClipForwardOptions,
    ) -> Result<ClipVisionOutput> {
        let mut x = self.embed(pixel_values, opts.interpolate_pos_encoding)?;
        let mut hidden_states = Vec::new();
        for layer in &self.layers {
            if opts.output_hidden_states {
                hidden_states.push(x.clone());
            }
            x = layer.forward(&x)?;
        }
        if opts.output_hidden_states {
            hidden_states.push(x.clone());
        }
        let cls = x.narrow(1, 0, 1)?.squeeze(1)?;
        let pooler_output = self.post_layernorm.forward(&cls)?;
        Ok(ClipVisionOutput {
            last_hidden_state: x,
            pooler_output,
            hidden_states,
        })
    }

    /// LLaVA / MGM image features: `hidden_states[select_layer]` (negative counts from the end
    /// of the `L + 1` states, so -2 is the penultimate layer's output), without the class token
    /// unless `with_cls`. Only the layers that state needs are run. Inputs of another size than
    /// `image_size` use an interpolated position table.
    pub fn feature(
        &self,
        pixel_values: &Tensor,
        select_layer: isize,
        with_cls: bool,
    ) -> Result<Tensor> {
        let states = self.layers.len() as isize + 1;
        let idx = if select_layer < 0 {
            states + select_layer
        } else {
            select_layer
        };
        if !(0..states).contains(&idx) {
            return Err(Error::invalid_input(
                "ClipVisionModel::feature",
                format!("select_layer {select_layer} is out of range for {states} hidden states"),
            ));
        }
        let c = &self.config;
        let s = pixel_values.shape();
        let interpolate = s.len() == 4 && (s[2] != c.image_size || s[3] != c.image_size);
        let mut x = self.embed(pixel_values, interpolate)?;
        for layer in &self.layers[..idx as usize] {
            x = layer.forward(&x)?;
        }
        if with_cls {
            Ok(x)
        } else {
            let n = x.shape()[1];
            Ok(x.narrow(1, 1, n - 1)?)
        }
    }
}
