//! Mini-Gemini (MGM): a CLIP low-resolution tower, an OpenCLIP ConvNeXt high-resolution tower,
//! patch-info mining, the `mlp2x_gelu` projector and a LLaMA / Gemma / Mixtral / Mistral
//! decoder, in the checkpoint layout of DESIGN.md section 1.
//!
//! config.json is the decoder's config with `model_type` `mgm` (LLaMA), `mgm_gemma`,
//! `mgm_mixtral` or `mgm_mistral` and MGM's `mm_*` keys; model.safetensors (or a sharded index)
//! holds the decoder (`model.*`, `lm_head.*`), `model.mm_projector.*` and
//! `model.vlm_uni_{query,aux,val}_projector.*`. The towers load from the directories
//! `mm_vision_tower` and `mm_vision_tower_aux` name, relative to the model directory (or given
//! explicitly): a transformers CLIPVisionModel directory, and a ConvNeXt directory with
//! `open_clip_model.safetensors` (OpenCLIP names; its shape is read off the weights) or a
//! transformers ConvNextModel. A checkpoint that holds a tower's weights itself, under MGM's
//! module names (`model.vision_tower.vision_tower.vision_model.*`,
//! `model.vision_tower_aux.clip_model.visual.trunk.*`), uses those instead; the CLIP shape
//! still comes from the tower directory's config.json, as MGM reads it. Each `-200` in `input_ids` is one image and becomes its mined,
//! projected tokens; Gemma scales every input row, image rows included, by `sqrt(hidden)`.
//! The HD variant (`image_grid` g > 1 with `image_global`): the low-res input is g times the
//! CLIP size and cut into g x g crops plus a global view resized to the CLIP size; the high-res
//! map is cut the same way and its global view is the map resized (bilinear) to a crop's size;
//! each view is mined on its own and the tokens are ordered [global, crop (0, 0), (0, 1), ...]
//! per image (DESIGN.md section 1).

use std::path::{Path, PathBuf};

use mgm_fusion::{PatchInfoMining, Projector, ProjectorType};
use mgm_llm::{CausalLm, DecoderConfig, QuantFormat};
use mgm_tensor::{DType, InterpolateMode, Tensor};
use mgm_vision::clip::{ClipVisionConfig, ClipVisionModel};
use mgm_vision::convnext::{ConvNextConfig, ConvNextModel, TrainableConvNext};
use serde_json::Value;

use crate::{Error, Result};

/// The image placeholder id of MGM's code in `input_ids`.
pub const IMAGE_TOKEN_INDEX: i64 = -200;

/// Where MGM's modules put the CLIP tower's transformers names when it saves the towers in
/// the checkpoint (`model.vision_tower` is a `CLIPVisionTower` holding the `CLIPVisionModel`
/// as `vision_tower`).
const CLIP_IN_CHECKPOINT: &str = "model.vision_tower.vision_tower";
const CLIP_PROBE: &str = "vision_model.embeddings.patch_embedding.weight";
/// The same for the ConvNeXt: `model.vision_tower_aux` is an `OpenCLIPVisionTower` holding the
/// OpenCLIP model as `clip_model`, whose trunk is `visual.trunk.*`.
const AUX_IN_CHECKPOINT: &str = "model.vision_tower_aux.clip_model";
/// OpenCLIP's names, or transformers' (what [`Mgm::new_trainable`] writes).
const AUX_PROBES: [&str; 2] = [
    "visual.trunk.stem.0.weight",
    "embeddings.patch_embeddings.weight",
];

/// MGM's multimodal config keys.
#[derive(Clone, Debug, PartialEq)]
pub struct MgmConfig {
    /// The decoder family from `model_type`.
    pub backbone: mgm_llm::Arch,
    /// CLIP hidden state the low-res features come from (`mm_vision_select_layer`).
    pub select_layer: isize,
    /// `cls_patch` keeps the class token; `patch` (the default) drops it.
    pub keep_cls: bool,
    /// The projector (`mm_projector_type`).
    pub projector: ProjectorType,
    /// The low-res tower's directory (`mm_vision_tower`).
    pub vision_tower: String,
    /// The high-res tower's directory (`mm_vision_tower_aux`).
    pub vision_tower_aux: String,
    /// The high-res input size (`image_size_aux`).
    pub image_size_aux: usize,
    /// Crops per side of the HD variant (`image_grid`; 1: the normal variant).
    pub image_grid: usize,
}

impl MgmConfig {
    /// Reads the MGM keys of a config.json value (`path` names it in errors).
    pub fn from_json(v: &Value, path: &str) -> Result<MgmConfig> {
        let err = |msg: String| Error::Config {
            path: path.to_string(),
            msg,
        };
        let missing = |k: &str| err(format!("missing required key {k:?}"));
        let backbone = match v["model_type"].as_str() {
            Some("mgm") | Some("mgm_llama") => mgm_llm::Arch::Llama,
            Some("mgm_gemma") => mgm_llm::Arch::Gemma,
            Some("mgm_mixtral") => mgm_llm::Arch::Mixtral,
            Some("mgm_mistral") => mgm_llm::Arch::Mistral,
            other => {
                return Err(err(format!(
                    "model_type {other:?} is not an MGM type (mgm, mgm_gemma, mgm_mixtral, \
                     mgm_mistral)"
                )));
            }
        };
        let grid = v["image_grid"].as_u64().unwrap_or(1) as usize;
        let global = v["image_global"].as_bool().unwrap_or(false);
        if grid == 0 || (grid > 1) != global {
            return Err(err(format!(
                "image_grid {grid} with image_global {global}: the normal variant is grid 1 \
                 without a global view, the HD variant a grid > 1 with one"
            )));
        }
        let keep_cls = match v["mm_vision_select_feature"].as_str().unwrap_or("patch") {
            "patch" => false,
            "cls_patch" => true,
            other => {
                return Err(err(format!(
                    "mm_vision_select_feature {other:?} (expected \"patch\" or \"cls_patch\")"
                )));
            }
        };
        let s = |k: &str| v[k].as_str().map(str::to_string).ok_or_else(|| missing(k));
        Ok(MgmConfig {
            backbone,
            select_layer: v["mm_vision_select_layer"].as_i64().unwrap_or(-2) as isize,
            keep_cls,
            projector: ProjectorType::parse(v["mm_projector_type"].as_str().unwrap_or("linear"))?,
            vision_tower: s("mm_vision_tower")?,
            vision_tower_aux: s("mm_vision_tower_aux")?,
            image_size_aux: v["image_size_aux"]
                .as_u64()
                .ok_or_else(|| missing("image_size_aux"))? as usize,
            image_grid: grid,
        })
    }
}

/// Where the towers come from: the config's paths (relative to the model directory) unless
/// given here (`--vision-tower`, `--vision-tower-aux`).
#[derive(Clone, Debug, Default)]
pub struct TowerDirs {
    /// The CLIP directory.
    pub vision_tower: Option<PathBuf>,
    /// The ConvNeXt directory.
    pub vision_tower_aux: Option<PathBuf>,
}

/// The high-res tower: the packed inference model, or the autograd one being trained.
enum HighRes {
    Packed(ConvNextModel),
    Autograd(TrainableConvNext),
}

/// Everything that defines an MGM to build from scratch ([`Mgm::new_trainable`]): the
/// decoder's config.json keys, the CLIP tower's, the ConvNeXt's and MGM's own.
#[derive(Clone, Debug)]
pub struct MgmSpec {
    /// The decoder's config (transformers keys; `architectures` names the family).
    pub text: Value,
    /// The CLIP vision config (transformers' CLIPVisionConfig keys).
    pub clip: Value,
    /// The ConvNeXt config (transformers' ConvNextConfig keys).
    pub convnext: Value,
    /// The CLIP hidden state the low-res features come from.
    pub select_layer: isize,
    /// The high-res input size.
    pub image_size_aux: usize,
}

/// A loaded MGM model.
pub struct Mgm {
    clip: ClipVisionModel,
    convnext: HighRes,
    mining: PatchInfoMining,
    projector: Projector,
    lm: CausalLm,
    config: MgmConfig,
    /// The trainable store: the mining and projector parameters of
    /// [`Mgm::from_dir_train_fusion`], or every parameter of [`Mgm::new_trainable`].
    fusion_vs: Option<mgm_tensor::nn::VarStore>,
    /// What [`Mgm::new_trainable`] was built from (for [`Mgm::save`]).
    spec: Option<MgmSpec>,
}

fn resolve(dir: &Path, given: &Option<PathBuf>, from_config: &str) -> PathBuf {
    match given {
        Some(p) => p.clone(),
        None => {
            let p = Path::new(from_config);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                dir.join(p)
            }
        }
    }
}

/// The mining layers (`model.vlm_uni_*`) and the projector (`model.mm_projector`) of `vs`.
fn load_fusion(
    vs: &mgm_tensor::nn::VarStore,
    projector: ProjectorType,
    lr_dim: usize,
    hr_dim: usize,
    hidden: usize,
) -> Result<(PatchInfoMining, Projector)> {
    let mining = PatchInfoMining::load(&vs.pp("model"), lr_dim, hr_dim)?;
    let projector = Projector::load(&vs.pp("model.mm_projector"), projector, lr_dim, hidden)?;
    Ok((mining, projector))
}

impl Mgm {
    /// Loads an MGM checkpoint directory and its towers; `quant` quantizes the decoder.
    pub fn from_dir(dir: &Path, towers: &TowerDirs, quant: Option<QuantFormat>) -> Result<Mgm> {
        Self::load(dir, towers, quant, false)
    }

    /// [`Mgm::from_dir`] with the mining and projector parameters trainable (stage 1 of MGM's
    /// training: towers and decoder frozen); [`Mgm::fusion_vars`] lists them.
    pub fn from_dir_train_fusion(dir: &Path, towers: &TowerDirs) -> Result<Mgm> {
        Self::load(dir, towers, None, true)
    }

    /// The trainable mining and projector parameters by checkpoint name (empty unless loaded
    /// with [`Mgm::from_dir_train_fusion`]).
    pub fn fusion_vars(&self) -> Vec<(String, mgm_tensor::Var)> {
        self.fusion_vs
            .as_ref()
            .map(|vs| vs.all_vars())
            .unwrap_or_default()
    }

    fn load(
        dir: &Path,
        towers: &TowerDirs,
        quant: Option<QuantFormat>,
        train_fusion: bool,
    ) -> Result<Mgm> {
        let cfg_path = dir.join("config.json");
        let (mut v, path) = crate::forward::read_config(&cfg_path)?;
        let config = MgmConfig::from_json(&v, &path)?;
        // the decoder's own config: the same keys under the backbone's model_type
        let (class, ty) = match config.backbone {
            mgm_llm::Arch::Llama => ("LlamaForCausalLM", "llama"),
            mgm_llm::Arch::Gemma => ("GemmaForCausalLM", "gemma"),
            mgm_llm::Arch::Mixtral => ("MixtralForCausalLM", "mixtral"),
            mgm_llm::Arch::Mistral => ("MistralForCausalLM", "mistral"),
        };
        v["architectures"] = Value::from(vec![class]);
        v["model_type"] = Value::from(ty);
        let text_cfg = DecoderConfig::from_json_str(&v.to_string(), &path)?;

        let clip_dir = resolve(dir, &towers.vision_tower, &config.vision_tower);
        let aux_dir = resolve(dir, &towers.vision_tower_aux, &config.vision_tower_aux);
        let tower_err = |which: &str, d: &Path, e: String| Error::Config {
            path: path.clone(),
            msg: format!("{which} tower {}: {e}", d.display()),
        };
        let vs = crate::forward::weights(dir)?.with_dtype(DType::F32);
        let in_ckpt = vs.pp(CLIP_IN_CHECKPOINT);
        let clip = if in_ckpt.contains(CLIP_PROBE) {
            // the weights are the checkpoint's; the shape is still the tower directory's config
            let cfg = ClipVisionConfig::from_file(clip_dir.join("config.json")).map_err(|e| {
                tower_err(
                    "mm_vision_tower",
                    &clip_dir,
                    format!("the checkpoint holds the CLIP weights but not its config: {e}"),
                )
            })?;
            ClipVisionModel::load(&in_ckpt, &cfg)
        } else {
            ClipVisionModel::load_dir(&clip_dir, DType::F32)
        }
        .map_err(|e| tower_err("mm_vision_tower", &clip_dir, e.to_string()))?;
        let in_ckpt = vs.pp(AUX_IN_CHECKPOINT);
        let convnext = if AUX_PROBES.iter().any(|p| in_ckpt.contains(p)) {
            ConvNextConfig::from_weights(&in_ckpt)
                .and_then(|c| ConvNextModel::load(&in_ckpt, &c, DType::F32))
        } else {
            ConvNextModel::load_dir(&aux_dir, DType::F32)
        }
        .map_err(|e| tower_err("mm_vision_tower_aux", &aux_dir, e.to_string()))?;
        let lr_dim = clip.config().hidden_size;
        let hr_dim: usize = convnext.config().hidden_sizes.iter().sum();
        for (key, want, got) in [
            ("mm_hidden_size", lr_dim, v["mm_hidden_size"].as_u64()),
            (
                "mm_hidden_size_aux",
                hr_dim,
                v["mm_hidden_size_aux"].as_u64(),
            ),
        ] {
            if got.is_some_and(|g| g as usize != want) {
                return Err(Error::Config {
                    path: path.clone(),
                    msg: format!("{key} is {} but the tower gives {want}", got.unwrap_or(0)),
                });
            }
        }
        let fusion_vs = train_fusion.then(|| vs.trainable(0));
        let fvs = fusion_vs.as_ref().unwrap_or(&vs);
        let (mining, projector) =
            load_fusion(fvs, config.projector, lr_dim, hr_dim, text_cfg.hidden_size)?;
        let lm = CausalLm::load(&vs, &text_cfg)?;
        let fusion = |n: &str| n.contains("vlm_uni_") || n.contains("mm_projector");
        vs.finish_ignoring(|n| n.ends_with("rotary_emb.inv_freq") || (train_fusion && fusion(n)))?;
        let lm = match quant {
            Some(f) => lm.quantize(f)?,
            None => lm,
        };
        Ok(Mgm {
            clip,
            convnext: HighRes::Packed(convnext),
            mining,
            projector,
            lm,
            config,
            fusion_vs,
            spec: None,
        })
    }

    /// A fresh MGM to train from scratch (the normal variant, `mlp2x_gelu`): every parameter a
    /// `Var` of one trainable store, initialised from `seed`, named as an MGM checkpoint holding
    /// its towers (see the module doc). [`Mgm::trainable_vars`] lists them; [`Mgm::save`]
    /// writes a directory that [`Mgm::from_dir`] loads.
    pub fn new_trainable(spec: &MgmSpec, seed: u64) -> Result<Mgm> {
        let what = "MgmSpec";
        let text_cfg = DecoderConfig::from_json_str(&spec.text.to_string(), what)?;
        let clip_cfg = ClipVisionConfig::from_json_str(&spec.clip.to_string(), what)?;
        let cn_cfg = ConvNextConfig::from_json_str(&spec.convnext.to_string(), what)?;
        let backbone = text_cfg.arch;
        let config = MgmConfig {
            backbone,
            select_layer: spec.select_layer,
            keep_cls: false,
            projector: ProjectorType::parse("mlp2x_gelu")?,
            vision_tower: "clip".into(),
            vision_tower_aux: "convnext".into(),
            image_size_aux: spec.image_size_aux,
            image_grid: 1,
        };
        let vs = mgm_tensor::nn::VarStore::new_trainable(seed);
        let clip = ClipVisionModel::load(&vs.pp(CLIP_IN_CHECKPOINT), &clip_cfg)?;
        let convnext = TrainableConvNext::load(&vs.pp(AUX_IN_CHECKPOINT), &cn_cfg)?;
        let lr_dim = clip_cfg.hidden_size;
        let hr_dim: usize = cn_cfg.hidden_sizes.iter().sum();
        let (mining, projector) =
            load_fusion(&vs, config.projector, lr_dim, hr_dim, text_cfg.hidden_size)?;
        let lm = CausalLm::load(&vs, &text_cfg)?;
        // transformers' _init_weights for the decoder: N(0, initializer_range) matrices (the
        // embedding included; PyTorch's N(0, 1) embedding would give tied logits of size
        // sqrt(hidden))
        let std = spec.text["initializer_range"].as_f64().unwrap_or(0.02);
        for (i, (name, var)) in vs.all_vars().into_iter().enumerate() {
            let t = var.as_tensor();
            if t.rank() == 2
                && !name.starts_with("model.vision_tower")
                && !name.contains("vlm_uni")
                && !name.contains("mm_projector")
            {
                let fresh = Tensor::randn(
                    seed.wrapping_mul(1_000_003).wrapping_add(i as u64),
                    t.shape(),
                    0.0,
                    std,
                    DType::F32,
                    mgm_tensor::Device::Cpu,
                )?;
                var.set(&fresh)?;
            }
        }
        Ok(Mgm {
            clip,
            convnext: HighRes::Autograd(convnext),
            mining,
            projector,
            lm,
            config,
            fusion_vs: Some(vs),
            spec: Some(spec.clone()),
        })
    }

    /// The parameters of a model from [`Mgm::new_trainable`] by checkpoint name (towers,
    /// fusion and decoder), or the fusion ones of [`Mgm::from_dir_train_fusion`].
    pub fn trainable_vars(&self) -> Vec<(String, mgm_tensor::Var)> {
        self.fusion_vars()
    }

    /// Writes a model from [`Mgm::new_trainable`] as an MGM checkpoint directory:
    /// config.json (the decoder's keys and MGM's), model.safetensors (every parameter, the
    /// towers under MGM's module names) and clip/config.json (the CLIP shape).
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.save_config(dir)?;
        let Some(vs) = &self.fusion_vs else {
            return Err(Error::Input {
                name: "Mgm::save".into(),
                msg: "only a model built by Mgm::new_trainable can be saved".into(),
            });
        };
        let vars = vs.all_vars();
        let tensors: Vec<(String, Tensor)> = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect();
        mgm_tensor::safetensors::save(
            dir.join("model.safetensors"),
            tensors.iter().map(|(n, t)| (n.as_str(), t)),
        )?;
        Ok(())
    }

    /// The config files of [`Mgm::save`] without the weights (config.json, clip/config.json):
    /// what turns a training checkpoint's model.safetensors into a loadable directory.
    pub fn save_config(&self, dir: &Path) -> Result<()> {
        let (Some(spec), Some(_)) = (&self.spec, &self.fusion_vs) else {
            return Err(Error::Input {
                name: "Mgm::save".into(),
                msg: "only a model built by Mgm::new_trainable can be saved".into(),
            });
        };
        let io = |p: &Path, e: std::io::Error| Error::Io {
            path: p.display().to_string(),
            source: e,
        };
        std::fs::create_dir_all(dir.join("clip")).map_err(|e| io(dir, e))?;
        let mut cfg = spec.text.clone();
        let family = match self.config.backbone {
            mgm_llm::Arch::Llama => ("MGMLlamaForCausalLM", "mgm"),
            mgm_llm::Arch::Gemma => ("MGMGemmaForCausalLM", "mgm_gemma"),
            mgm_llm::Arch::Mixtral => ("MGMMixtralForCausalLM", "mgm_mixtral"),
            mgm_llm::Arch::Mistral => ("MGMMistralForCausalLM", "mgm_mistral"),
        };
        let hr: usize = match &self.convnext {
            HighRes::Packed(m) => m.config().hidden_sizes.iter().sum(),
            HighRes::Autograd(m) => m.config().hidden_sizes.iter().sum(),
        };
        let extra = serde_json::json!({
            "architectures": [family.0], "model_type": family.1,
            "mm_vision_tower": "clip", "mm_vision_tower_aux": "convnext",
            "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": self.clip.config().hidden_size,
            "mm_hidden_size_aux": hr, "mm_vision_select_layer": self.config.select_layer,
            "mm_vision_select_feature": "patch", "image_size_aux": self.config.image_size_aux,
            "image_grid": 1, "image_global": false,
        });
        if let (Some(c), Some(e)) = (cfg.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        let write = |p: PathBuf, v: &Value| {
            std::fs::write(
                &p,
                serde_json::to_string_pretty(v).expect("plain JSON") + "\n",
            )
            .map_err(|e| io(&p, e))
        };
        write(dir.join("config.json"), &cfg)?;
        write(dir.join("clip").join("config.json"), &spec.clip)
    }

    /// The multimodal configuration.
    pub fn config(&self) -> &MgmConfig {
        &self.config
    }

    /// The language model.
    pub fn language_model(&self) -> &CausalLm {
        &self.lm
    }

    /// The low-res input MGM derives from the normalized high-res one: bilinear
    /// (align_corners false, no antialias) to the CLIP tower's size (times `image_grid`).
    pub fn derive_low_res(&self, pixel_values_aux: &Tensor) -> Result<Tensor> {
        let s = self.clip.config().image_size * self.config.image_grid;
        Ok(pixel_values_aux.interpolate((s, s), InterpolateMode::Bilinear, false)?)
    }

    /// HD views of `x` `[N, C, g*h, g*w]`: per image the global view (`x` resized to `h x w`)
    /// then the g x g crops row by row, `[N * (1 + g*g), C, h, w]`.
    fn hd_views(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.config.image_grid;
        let s = x.shape().to_vec();
        let (n, c, hh, ww) = (s[0], s[1], s[2], s[3]);
        if hh % g != 0 || ww % g != 0 {
            return Err(Error::Input {
                name: "pixel_values".into(),
                msg: format!("{hh} x {ww} does not split into {g} x {g} crops"),
            });
        }
        let (h, w) = (hh / g, ww / g);
        let global = x
            .interpolate((h, w), InterpolateMode::Bilinear, false)?
            .unsqueeze(1)?;
        let crops = x
            .reshape(&[n, c, g, h, g, w])?
            .permute(&[0, 2, 4, 1, 3, 5])?
            .reshape(&[n, g * g, c, h, w])?;
        Ok(Tensor::cat(&[global, crops], 1)?.reshape(&[n * (1 + g * g), c, h, w])?)
    }

    /// Every image's tokens `[N, tokens, hidden]` (`G*G` tokens, times `1 + g*g` views in HD):
    /// mined CLIP features, projected. `pixel_values` (the CLIP-size input, times `image_grid`)
    /// is derived from `pixel_values_aux` when absent.
    pub fn image_tokens(
        &self,
        pixel_values_aux: &Tensor,
        pixel_values: Option<&Tensor>,
    ) -> Result<Tensor> {
        let aux_err = |msg: String| Error::Input {
            name: "pixel_values_aux".into(),
            msg,
        };
        let s = pixel_values_aux.shape();
        let n = self.config.image_size_aux;
        if s.len() != 4 || s[1] != 3 || s[2] != n || s[3] != n {
            return Err(aux_err(format!(
                "shape {s:?}, expected [images, 3, {n}, {n}]"
            )));
        }
        let derived;
        let low = match pixel_values {
            Some(p) => {
                if p.rank() != 4 || p.shape()[0] != s[0] {
                    return Err(Error::Input {
                        name: "pixel_values".into(),
                        msg: format!(
                            "shape {:?}, expected [{}, 3, H, W] like pixel_values_aux",
                            p.shape(),
                            s[0]
                        ),
                    });
                }
                p
            }
            None => {
                derived = self.derive_low_res(pixel_values_aux)?;
                &derived
            }
        };
        let x_hr = match &self.convnext {
            HighRes::Packed(m) => m.feature_pyramid(pixel_values_aux)?,
            HighRes::Autograd(m) => m.feature_pyramid(pixel_values_aux)?,
        };
        let (low, x_hr) = if self.config.image_grid > 1 {
            (self.hd_views(low)?, self.hd_views(&x_hr.contiguous()?)?)
        } else {
            (low.clone(), x_hr)
        };
        let x_lr = self
            .clip
            .feature(&low, self.config.select_layer, self.config.keep_cls)?;
        let mined = self.mining.forward(&x_lr, &x_hr)?;
        let toks = self.projector.forward(&mined)?;
        let (v, p, h) = (toks.shape()[0], toks.shape()[1], toks.shape()[2]);
        let n = s[0];
        Ok(toks.reshape(&[n, v / n * p, h])?)
    }

    /// The spliced input embeddings `[1, T', hidden]` of `input_ids` `[1, T]`: each -200 is
    /// the next image's tokens (Gemma: every row scaled by `sqrt(hidden)`).
    pub fn embed(&self, input_ids: &Tensor, image_tokens: Option<&Tensor>) -> Result<Tensor> {
        let err = |msg: String| Error::Input {
            name: "input_ids".into(),
            msg,
        };
        if input_ids.dtype() != DType::I64 || input_ids.rank() != 2 || input_ids.shape()[0] != 1 {
            return Err(err(format!(
                "{:?} {:?}, expected i64 [1, seq] (one prompt)",
                input_ids.dtype(),
                input_ids.shape()
            )));
        }
        let ids = input_ids.to_vec::<i64>()?;
        let n_images = ids.iter().filter(|&&i| i == IMAGE_TOKEN_INDEX).count();
        let have = image_tokens.map_or(0, |t| t.shape()[0]);
        if n_images != have {
            return Err(err(format!(
                "{n_images} image placeholder(s) ({IMAGE_TOKEN_INDEX}) for {have} image(s)"
            )));
        }
        let text: Vec<i64> = ids
            .iter()
            .copied()
            .filter(|&i| i != IMAGE_TOKEN_INDEX)
            .collect();
        let nt = text.len();
        let emb = if nt > 0 {
            Some(
                self.lm
                    .embed(&Tensor::from_vec(text, &[1, nt])?)?
                    .squeeze(0)?,
            )
        } else {
            None
        };
        let scale = self.lm.embed_scale();
        let mut pieces = Vec::new();
        let (mut ti, mut run_start, mut img) = (0usize, 0usize, 0usize);
        for &id in &ids {
            if id == IMAGE_TOKEN_INDEX {
                if ti > run_start {
                    let e = emb.as_ref().expect("text rows exist");
                    pieces.push(e.narrow(0, run_start, ti - run_start)?);
                }
                let t = image_tokens
                    .expect("counted above")
                    .narrow(0, img, 1)?
                    .squeeze(0)?;
                pieces.push(match scale {
                    Some(s) => t.mul_scalar(f64::from(s))?,
                    None => t,
                });
                img += 1;
                run_start = ti;
            } else {
                ti += 1;
            }
        }
        if ti > run_start {
            let e = emb.as_ref().expect("text rows exist");
            pieces.push(e.narrow(0, run_start, ti - run_start)?);
        }
        Ok(Tensor::cat(&pieces, 0)?.unsqueeze(0)?)
    }

    /// The logits `[1, T', V]` over the spliced sequence.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        pixel_values_aux: Option<&Tensor>,
        pixel_values: Option<&Tensor>,
    ) -> Result<Tensor> {
        let toks = match pixel_values_aux {
            Some(a) => Some(self.image_tokens(a, pixel_values)?),
            None => None,
        };
        let x = self.embed(input_ids, toks.as_ref())?;
        Ok(self.lm.forward_embeds(&x, None)?)
    }
}
