//! ConvNeXt vision tower: transformers' `ConvNextModel` and the timm / OpenCLIP trunk that MGM
//! uses as its high-resolution encoder (`convnext_large_d_320` at 768 px), with the per-stage
//! outputs and MGM's multi-stage feature pyramid.
//!
//! Both weight namings describe one network: a patchify stem (conv k = s = patch, LayerNorm over
//! channels), then stages of an optional downsample (LayerNorm, conv 2x2 stride 2) and blocks
//! `x + gamma * fc2(act(fc1(LN(dwconv7x7(x)))))`. [`ConvNextModel::load`] detects the naming:
//!
//! | part          | transformers (`convnext.` optional)          | timm / OpenCLIP (`visual.trunk.`, `trunk.` or none) |
//! |---------------|----------------------------------------------|------------------------------------------------------|
//! | stem          | `embeddings.patch_embeddings`, `embeddings.layernorm` | `stem.0`, `stem.1`                          |
//! | downsample    | `encoder.stages.N.downsampling_layer.{0,1}`  | `stages.N.downsample.{0,1}`                          |
//! | block         | `encoder.stages.N.layers.M.{dwconv,layernorm,pwconv1,pwconv2,layer_scale_parameter}` | `stages.N.blocks.M.{conv_dw,norm,mlp.fc1,mlp.fc2,gamma}` |
//! | final norm    | `layernorm` (required)                       | `head.norm` (optional: MGM's tower drops the head)   |
//!
//! The forward pass keeps activations channels-last (`[B, H, W, C]`) from the stem to the last
//! stage, so the depthwise convolution, the LayerNorms and both Linear layers read contiguous
//! channel vectors and no permute copies are made. Each block runs as one parallel sweep over
//! bands of image rows: depthwise conv and LayerNorm into a band buffer, `fc1` (gemm) with the
//! bias and activation applied while the band's hidden activations are still in cache, `fc2`
//! (gemm) and the layer scale plus residual written straight to the output. The
//! `[P, 4C]` hidden activations of a whole image are never materialised. The outputs are
//! NCHW-shaped views of the channels-last buffers (free to permute back for consumers such as
//! patch-info mining that want channels last; `.contiguous()` makes an NCHW copy when needed).
//!
//! The network is inference-only (MGM freezes it): outputs carry no autograd history.

use std::borrow::Cow;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mgm_kernels::gemm::{self, Epilogue, MatMut, MatRef, PackedLhs, PackedRhs, Parallelism};
use mgm_tensor::nn::{self, Activation, Init, Param, VarStore};
use mgm_tensor::{DType, Tensor};
use rayon::prelude::*;
use serde::Deserialize;

use crate::config::{parse_json, read_json, required};
use crate::{Error, Result};

/// The eps of every LayerNorm inside the network (stem, downsamples, blocks) and of timm's head
/// norm: transformers and timm hard-code it whatever the config says.
const INNER_EPS: f32 = 1e-6;
/// Side of ConvNeXt's depthwise kernel (transformers hard-codes it; timm's default).
const KS: usize = 7;
/// Zero padding of the depthwise convolution.
const PAD: usize = KS / 2;
/// Pixels per band of a block: the band's `[P, 4C]` hidden activations stay in L2/L3 while the
/// second gemm reads them, and gemm's weight packing is amortised over enough rows.
const BAND_PIXELS: usize = 512;

// ---------------------------------------------------------------------------------------------
// SIMD dispatch

/// The SIMD level the kernels run at, detected once (ordered: a level implies those below).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Simd {
    Portable,
    Avx2,
    Avx512,
}

fn simd() -> Simd {
    static LEVEL: OnceLock<Simd> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma");
            if avx2 && std::arch::is_x86_feature_detected!("avx512f") {
                return Simd::Avx512;
            }
            if avx2 {
                return Simd::Avx2;
            }
        }
        Simd::Portable
    })
}

/// Declares, for each generic kernel, an AVX-512 (16 lanes), an AVX2 (8 lanes) and a portable
/// (4 lanes, unfused multiply-add) instance.
macro_rules! instances {
    ($($name:ident($($a:ident: $t:ty),*);)*) => {
        #[cfg(target_arch = "x86_64")]
        mod avx512 {
            use super::*;
            $(
                #[target_feature(enable = "avx512f,avx2,fma")]
                pub(super) unsafe fn $name($($a: $t),*) {
                    super::$name::<Fused, 16>($($a),*)
                }
            )*
        }
        #[cfg(target_arch = "x86_64")]
        mod avx2 {
            use super::*;
            $(
                #[target_feature(enable = "avx2,fma")]
                pub(super) unsafe fn $name($($a: $t),*) {
                    super::$name::<Fused, 8>($($a),*)
                }
            )*
        }
        mod portable {
            use super::*;
            $(
                pub(super) fn $name($($a: $t),*) {
                    super::$name::<Plain, 4>($($a),*)
                }
            )*
        }
    };
}

/// Calls the widest instance of a kernel that this CPU runs.
macro_rules! kernel {
    ($name:ident($($e:expr),* $(,)?)) => {
        match simd() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: simd() returns Avx512 only after detecting AVX-512F, AVX2 and FMA, the
            // target features of this instance.
            Simd::Avx512 => unsafe { avx512::$name($($e),*) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: simd() returns Avx2 only after detecting AVX2 and FMA.
            Simd::Avx2 => unsafe { avx2::$name($($e),*) },
            _ => portable::$name($($e),*),
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// ConvNeXt hyper-parameters as transformers' `ConvNextConfig` writes them to `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvNextConfig {
    /// Input channels (3 for RGB).
    pub num_channels: usize,
    /// Side and stride of the stem's patchify convolution.
    pub patch_size: usize,
    /// Channels of each stage.
    pub hidden_sizes: Vec<usize>,
    /// Blocks of each stage.
    pub depths: Vec<usize>,
    /// eps of transformers' final (pooler) LayerNorm. The norms inside the network, and timm's
    /// head norm, use 1e-6 whatever this says (both libraries hard-code it).
    pub layer_norm_eps: f64,
    /// Activation of the block MLP: `gelu` (exact), `gelu_new` / `gelu_pytorch_tanh` /
    /// `gelu_fast` (tanh approximation), `quick_gelu`, `relu` or `silu` / `swish`.
    pub hidden_act: String,
    /// transformers creates `layer_scale_parameter` only when this is positive.
    pub layer_scale_init_value: f64,
}

/// The keys of a `ConvNextConfig`, all optional so that missing ones are reported by name.
#[derive(Deserialize)]
struct RawConfig {
    num_channels: Option<usize>,
    patch_size: Option<usize>,
    hidden_sizes: Option<Vec<usize>>,
    depths: Option<Vec<usize>>,
    layer_norm_eps: Option<f64>,
    hidden_act: Option<String>,
    layer_scale_init_value: Option<f64>,
}

impl ConvNextConfig {
    /// Reads `config.json`. `hidden_sizes` and `depths` are required (an error names the key
    /// and the file); the other keys default as in transformers (3 channels, patch 4, eps
    /// 1e-12, `gelu`, layer scale 1e-6); unknown keys are ignored.
    pub fn from_file(path: impl AsRef<Path>) -> Result<ConvNextConfig> {
        let path = path.as_ref();
        let raw: RawConfig = read_json(path)?;
        Self::from_raw(raw, &path.display().to_string())
    }

    /// Like [`ConvNextConfig::from_file`] for JSON text; `source` names it in errors.
    pub fn from_json_str(text: &str, source: &str) -> Result<ConvNextConfig> {
        let raw: RawConfig = parse_json(text, source)?;
        Self::from_raw(raw, source)
    }

    fn from_raw(raw: RawConfig, path: &str) -> Result<ConvNextConfig> {
        let c = ConvNextConfig {
            num_channels: raw.num_channels.unwrap_or(3),
            patch_size: raw.patch_size.unwrap_or(4),
            hidden_sizes: required(raw.hidden_sizes, path, "hidden_sizes")?,
            depths: required(raw.depths, path, "depths")?,
            layer_norm_eps: raw.layer_norm_eps.unwrap_or(1e-12),
            hidden_act: raw.hidden_act.unwrap_or_else(|| "gelu".to_string()),
            layer_scale_init_value: raw.layer_scale_init_value.unwrap_or(1e-6),
        };
        c.validate(path)?;
        Ok(c)
    }

    /// The configuration of the network whose weights `vs` holds (either naming): stages,
    /// depths and patch size from the tensor shapes, layer scale from the presence of
    /// `gamma` / `layer_scale_parameter`, `gelu` and eps 1e-6 as timm builds it. For OpenCLIP
    /// checkpoints, which come without a transformers `config.json`.
    pub fn from_weights(vs: &VarStore) -> Result<ConvNextConfig> {
        let names = Names::detect(vs)?;
        let what = "ConvNextConfig::from_weights";
        let stem = format!("{}.weight", names.stem_conv());
        let s = vs.shape_of(&stem).unwrap_or_default();
        if s.len() != 4 || s[2] != s[3] {
            return Err(Error::invalid_input(
                what,
                format!("{stem} is {s:?}, expected [C0, channels, patch, patch]"),
            ));
        }
        let (mut hidden_sizes, mut depths) = (Vec::new(), Vec::new());
        let mut layer_scale = false;
        let [dw, _, _, _, ls] = names.block_parts();
        for st in 0.. {
            let mut depth = 0;
            while vs.contains(&format!("{}.{dw}.weight", names.block(st, depth))) {
                depth += 1;
            }
            if depth == 0 {
                break;
            }
            let first = format!("{}.{dw}.weight", names.block(st, 0));
            let ch = vs.shape_of(&first).unwrap_or_default().first().copied();
            hidden_sizes.push(ch.unwrap_or(0));
            depths.push(depth);
            layer_scale |= vs.contains(&format!("{}.{ls}", names.block(st, 0)));
        }
        let c = ConvNextConfig {
            num_channels: s[1],
            patch_size: s[2],
            hidden_sizes,
            depths,
            layer_norm_eps: f64::from(INNER_EPS),
            hidden_act: "gelu".to_string(),
            layer_scale_init_value: if layer_scale { 1e-6 } else { 0.0 },
        };
        c.validate(what)?;
        Ok(c)
    }

    fn validate(&self, path: &str) -> Result<()> {
        let bad = |key: &str, msg: String| Error::BadConfig {
            path: path.to_string(),
            key: key.to_string(),
            msg,
        };
        if self.hidden_sizes.is_empty() || self.hidden_sizes.contains(&0) {
            return Err(bad(
                "hidden_sizes",
                format!(
                    "{:?}: need at least one stage, each with channels",
                    self.hidden_sizes
                ),
            ));
        }
        if self.depths.len() != self.hidden_sizes.len() {
            return Err(bad(
                "depths",
                format!(
                    "{:?} has {} stages, hidden_sizes {:?} has {}",
                    self.depths,
                    self.depths.len(),
                    self.hidden_sizes,
                    self.hidden_sizes.len()
                ),
            ));
        }
        if self.num_channels == 0 {
            return Err(bad("num_channels", "must be positive".to_string()));
        }
        if self.patch_size == 0 {
            return Err(bad("patch_size", "must be positive".to_string()));
        }
        parse_act(&self.hidden_act).map_err(|msg| bad("hidden_act", msg))?;
        Ok(())
    }

    /// Number of stages (`hidden_states` has one more entry: the stem output).
    pub fn num_stages(&self) -> usize {
        self.hidden_sizes.len()
    }
}

/// The block MLP's activation from its transformers name.
fn parse_act(name: &str) -> std::result::Result<Activation, String> {
    Activation::from_hf_name(name).ok_or_else(|| {
        format!(
            "unknown activation {name:?} (supported: gelu, gelu_new, gelu_pytorch_tanh, \
             gelu_fast, quick_gelu, relu, silu, swish)"
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Weights

/// Which checkpoint spelling [`ConvNextModel::load`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConvNextNaming {
    /// transformers' names under `prefix` (`""` or `"convnext."`).
    HuggingFace {
        /// What precedes `embeddings.`.
        prefix: String,
    },
    /// timm / OpenCLIP names under `prefix` (`"visual.trunk."`, `"trunk."` or `""`).
    Timm {
        /// What precedes `stem.`.
        prefix: String,
    },
}

/// LayerNorm affine parameters (always f32: norms are computed and kept in f32).
struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

/// A Linear layer: the weight packed once for the GEMM kernel (values already rounded to
/// bf16 in a bf16 model), and an f32 bias.
struct Dense {
    packed: PackedRhs,
    bias: Vec<f32>,
    out_features: usize,
}

/// Packs a row-major `[out, in]` weight as the right-hand side `[in, out]`.
fn pack_weight(w: &[f32], out: usize, inp: usize) -> Result<PackedRhs> {
    Ok(PackedRhs::new(MatRef::row_major(w, out, inp)?.t()))
}

/// `dst[m, n] = lhs[m, k] W` with the epilogue, on the calling thread (callers run it inside
/// their own parallel band loop).
fn mul_packed(
    lhs: &[f32],
    m: usize,
    w: &PackedRhs,
    dst: &mut [f32],
    epi: &Epilogue<'_>,
) -> Result<()> {
    let (k, n) = (w.k(), w.n());
    let a = PackedLhs::new(MatRef::row_major(&lhs[..m * k], m, k)?);
    gemm::cpu_packed(
        &a,
        w,
        MatMut::row_major(&mut dst[..m * n], m, n)?,
        epi,
        Parallelism::Serial,
    )?;
    Ok(())
}

struct Stem {
    /// The conv weight `[C0, in * p * p]` (natural (channel, row, col) order), packed.
    packed: PackedRhs,
    bias: Vec<f32>,
    norm: Norm,
}

struct Downsample {
    norm: Norm,
    /// `[C_out, 4 C_in]` with the patch in (row, col, channel) order, matching the
    /// channels-last im2col, packed.
    packed: PackedRhs,
    bias: Vec<f32>,
}

struct Block {
    /// `[7 * 7, C]`: tap-major, so one tap's weights for consecutive channels are contiguous.
    dw_weight: Vec<f32>,
    dw_bias: Vec<f32>,
    norm: Norm,
    fc1: Dense,
    fc2: Dense,
    gamma: Option<Vec<f32>>,
}

struct Stage {
    downsample: Option<Downsample>,
    blocks: Vec<Block>,
    channels: usize,
}

/// Rounds to the nearest bf16 (ties to even) and back, so f32 buffers can hold exact bf16
/// values; NaN stays NaN.
#[inline(always)]
fn round_bf16(x: f32) -> f32 {
    let b = x.to_bits();
    if x.is_nan() {
        return x;
    }
    let r = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000;
    f32::from_bits(r)
}

/// Tensor names of one naming scheme.
struct Names {
    hf: bool,
    prefix: String,
}

/// transformers' stem weight, after `""` or `"convnext."`.
const HF_PROBE: &str = "embeddings.patch_embeddings.weight";
/// timm's stem weight, after `"visual.trunk."`, `"trunk."` or `""`.
const TIMM_PROBE: &str = "stem.0.weight";

impl Names {
    /// Finds which naming the checkpoint under `vs` uses.
    fn detect(vs: &VarStore) -> Result<Names> {
        for prefix in ["", "convnext."] {
            if vs.contains(&format!("{prefix}{HF_PROBE}")) {
                return Ok(Names {
                    hf: true,
                    prefix: prefix.to_string(),
                });
            }
        }
        for prefix in ["visual.trunk.", "trunk.", ""] {
            if vs.contains(&format!("{prefix}{TIMM_PROBE}")) {
                return Ok(Names {
                    hf: false,
                    prefix: prefix.to_string(),
                });
            }
        }
        if vs.is_trainable() {
            // a fresh random model (benchmarks): transformers' names
            return Ok(Names {
                hf: true,
                prefix: String::new(),
            });
        }
        // the store's own error names the file
        let err = vs
            .get_any_shape(HF_PROBE)
            .expect_err("the probe name was just found missing");
        Err(Error::invalid_input(
            "ConvNextModel::load",
            format!(
                "no ConvNeXt weights under {:?}: neither transformers' \
                 [convnext.]{HF_PROBE} nor timm's [visual.trunk.|trunk.]{TIMM_PROBE} ({err})",
                vs.prefix()
            ),
        ))
    }

    fn naming(&self) -> ConvNextNaming {
        let prefix = self.prefix.clone();
        if self.hf {
            ConvNextNaming::HuggingFace { prefix }
        } else {
            ConvNextNaming::Timm { prefix }
        }
    }

    fn stem_conv(&self) -> String {
        if self.hf {
            format!("{}embeddings.patch_embeddings", self.prefix)
        } else {
            format!("{}stem.0", self.prefix)
        }
    }
    fn stem_norm(&self) -> String {
        if self.hf {
            format!("{}embeddings.layernorm", self.prefix)
        } else {
            format!("{}stem.1", self.prefix)
        }
    }
    fn stage(&self, s: usize) -> String {
        if self.hf {
            format!("{}encoder.stages.{s}", self.prefix)
        } else {
            format!("{}stages.{s}", self.prefix)
        }
    }
    fn downsample(&self, s: usize, i: usize) -> String {
        let part = if self.hf {
            "downsampling_layer"
        } else {
            "downsample"
        };
        format!("{}.{part}.{i}", self.stage(s))
    }
    fn block(&self, s: usize, b: usize) -> String {
        let part = if self.hf { "layers" } else { "blocks" };
        format!("{}.{part}.{b}", self.stage(s))
    }
    /// dwconv, norm, fc1, fc2, layer scale.
    fn block_parts(&self) -> [&'static str; 5] {
        if self.hf {
            [
                "dwconv",
                "layernorm",
                "pwconv1",
                "pwconv2",
                "layer_scale_parameter",
            ]
        } else {
            ["conv_dw", "norm", "mlp.fc1", "mlp.fc2", "gamma"]
        }
    }
    fn final_norm(&self) -> String {
        if self.hf {
            format!("{}layernorm", self.prefix)
        } else {
            format!("{}head.norm", self.prefix)
        }
    }
}

/// Loads weights with the model's rounding rule.
struct Loader<'a> {
    vs: &'a VarStore,
    bf16: bool,
}

/// transformers' `_init_weights` for conv and Linear weights (a trainable store's fresh ones).
const WEIGHT_INIT: Init = Init::Normal {
    mean: 0.0,
    std: 0.02,
};

impl Loader<'_> {
    /// An f32 copy of `name` (bf16-rounded in bf16 mode unless `exact`). A trainable store
    /// creates it from `init` when the checkpoint lacks it (random models for benchmarks); the
    /// model keeps the value, not the `Var`: it is inference-only.
    fn vec(&self, name: &str, shape: &[usize], init: Init, exact: bool) -> Result<Vec<f32>> {
        let t = if self.vs.is_trainable() {
            self.vs
                .param_or_init(name, shape, init)?
                .tensor()
                .to_dtype(DType::F32)?
        } else {
            self.vs.get_with_dtype(name, shape, DType::F32)?
        };
        let mut v = t.to_vec::<f32>()?;
        if self.bf16 && !exact {
            v.iter_mut().for_each(|x| *x = round_bf16(*x));
        }
        Ok(v)
    }

    /// A conv or Linear weight.
    fn weight(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.vec(name, shape, WEIGHT_INIT, false)
    }

    /// A conv or Linear bias.
    fn bias(&self, name: &str, n: usize) -> Result<Vec<f32>> {
        self.vec(name, &[n], Init::Zeros, false)
    }

    fn norm(&self, prefix: &str, dim: usize, eps: f32) -> Result<Norm> {
        Ok(Norm {
            weight: self.vec(&format!("{prefix}.weight"), &[dim], Init::Ones, true)?,
            bias: self.vec(&format!("{prefix}.bias"), &[dim], Init::Zeros, true)?,
            eps,
        })
    }

    /// A Linear layer; its output width is read from the checkpoint (4 C for `fc1` in every
    /// released model), `default_out` for fresh random weights.
    fn dense(&self, prefix: &str, in_features: usize, default_out: usize) -> Result<Dense> {
        let wname = format!("{prefix}.weight");
        let out_features = match self.vs.shape_of(&wname) {
            Some(s) if s.len() == 2 => s[0],
            _ => default_out,
        };
        let w = self.weight(&wname, &[out_features, in_features])?;
        let bias = self.bias(&format!("{prefix}.bias"), out_features)?;
        Ok(Dense {
            packed: pack_weight(&w, out_features, in_features)?,
            bias,
            out_features,
        })
    }
}

/// Output of [`ConvNextModel::forward`], named and shaped as transformers'
/// `BaseModelOutputWithPoolingAndNoAttention` with `output_hidden_states=True`.
#[derive(Clone, Debug)]
pub struct ConvNextOutput {
    /// The last stage's output, `[B, C_last, H / 32, W / 32]` (same tensor as the last hidden
    /// state).
    pub last_hidden_state: Tensor,
    /// Final LayerNorm of the spatial mean, `[B, C_last]`; `None` when the checkpoint has no
    /// final norm (MGM's OpenCLIP tower).
    pub pooler_output: Option<Tensor>,
    /// The stem output, then each stage's output, NCHW (`1 + num_stages` entries).
    pub hidden_states: Vec<Tensor>,
}

/// A loaded ConvNeXt (see the module docs for the two namings it reads).
pub struct ConvNextModel {
    config: ConvNextConfig,
    naming: ConvNextNaming,
    dtype: DType,
    act: Activation,
    stem: Stem,
    stages: Vec<Stage>,
    final_norm: Option<Norm>,
}

impl std::fmt::Debug for ConvNextModel {
    // the weights would print hundreds of millions of numbers
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvNextModel")
            .field("config", &self.config)
            .field("naming", &self.naming)
            .field("dtype", &self.dtype)
            .field("final_norm", &self.final_norm.is_some())
            .finish_non_exhaustive()
    }
}

impl ConvNextModel {
    /// Loads the weights from `vs` (a store over the checkpoint, or a handle `pp`'d to where the
    /// tower's names start), detecting the naming. `dtype` is `F32`, or `BF16` to store the
    /// Linear weights in bf16 and round every activation to bf16 where a bf16 PyTorch model would
    /// (norm parameters stay f32 and all accumulation is f32).
    pub fn load(vs: &VarStore, config: &ConvNextConfig, dtype: DType) -> Result<ConvNextModel> {
        const WHAT: &str = "ConvNextModel::load";
        config.validate("<ConvNextConfig>")?;
        if dtype != DType::F32 && dtype != DType::BF16 {
            return Err(Error::invalid_input(
                WHAT,
                format!("ConvNeXt computes in f32 or bf16, not {dtype:?}"),
            ));
        }
        let act = parse_act(&config.hidden_act).map_err(|m| Error::invalid_input(WHAT, m))?;
        let names = Names::detect(vs)?;
        let ld = Loader {
            vs,
            bf16: dtype == DType::BF16,
        };
        let (cin, p, c0) = (
            config.num_channels,
            config.patch_size,
            config.hidden_sizes[0],
        );
        let sc = names.stem_conv();
        let stem = Stem {
            packed: pack_weight(
                &ld.weight(&format!("{sc}.weight"), &[c0, cin, p, p])?,
                c0,
                cin * p * p,
            )?,
            bias: ld.bias(&format!("{sc}.bias"), c0)?,
            norm: ld.norm(&names.stem_norm(), c0, INNER_EPS)?,
        };
        let mut stages = Vec::with_capacity(config.num_stages());
        let mut prev = c0;
        for (s, (&ch, &depth)) in config.hidden_sizes.iter().zip(&config.depths).enumerate() {
            // transformers and timm downsample every stage but the first (whose input already
            // has its width: prev == hidden_sizes[0])
            let downsample = if s > 0 {
                let conv = names.downsample(s, 1);
                let w = ld.weight(&format!("{conv}.weight"), &[ch, prev, 2, 2])?;
                Some(Downsample {
                    norm: ld.norm(&names.downsample(s, 0), prev, INNER_EPS)?,
                    packed: pack_weight(&reorder_patch_weight(&w, ch, prev), ch, 4 * prev)?,
                    bias: ld.bias(&format!("{conv}.bias"), ch)?,
                })
            } else {
                None
            };
            let mut blocks = Vec::with_capacity(depth);
            for b in 0..depth {
                blocks.push(load_block(&ld, &names, s, b, ch, config)?);
            }
            stages.push(Stage {
                downsample,
                blocks,
                channels: ch,
            });
            prev = ch;
        }
        let last = prev;
        let final_name = names.final_norm();
        let final_norm = if names.hf {
            let eps = config.layer_norm_eps as f32;
            Some(ld.norm(&final_name, last, eps)?)
        } else if vs.is_trainable() || vs.contains(&format!("{final_name}.weight")) {
            Some(ld.norm(&final_name, last, INNER_EPS)?)
        } else {
            None
        };
        Ok(ConvNextModel {
            config: config.clone(),
            naming: names.naming(),
            dtype,
            act,
            stem,
            stages,
            final_norm,
        })
    }

    /// Loads a model directory: `config.json` (without one, the configuration is read off the
    /// weights, see [`ConvNextConfig::from_weights`]) and the weights from `model.safetensors`,
    /// a sharded `model.safetensors.index.json`, OpenCLIP's `open_clip_model.safetensors`, or
    /// OpenCLIP's pickle `open_clip_pytorch_model.bin` (read by
    /// [`mgm_tensor::torch_pickle`], which rebuilds tensors and runs nothing else).
    pub fn load_dir(dir: impl AsRef<Path>, dtype: DType) -> Result<ConvNextModel> {
        let dir = dir.as_ref();
        let single = ["model.safetensors", "open_clip_model.safetensors"]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.exists());
        let index = dir.join("model.safetensors.index.json");
        let pickle = dir.join("open_clip_pytorch_model.bin");
        let vs = match single {
            Some(file) => VarStore::from_safetensors(&[file])?,
            None if index.exists() => VarStore::from_safetensors_index(&index)?,
            // OpenCLIP's own download: a torch.save pickle, read by the restricted unpickler
            None if pickle.exists() => {
                VarStore::from_tensors(mgm_tensor::torch_pickle::load(&pickle)?)?
            }
            None => {
                return Err(Error::Io {
                    path: dir.join("model.safetensors").display().to_string(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no model.safetensors, model.safetensors.index.json, \
                         open_clip_model.safetensors or open_clip_pytorch_model.bin in the model \
                         directory",
                    ),
                });
            }
        };
        let config_path = dir.join("config.json");
        let config = if config_path.exists() {
            ConvNextConfig::from_file(&config_path)?
        } else {
            ConvNextConfig::from_weights(&vs)?
        };
        Self::load(&vs, &config, dtype)
    }

    /// The configuration it was loaded with.
    pub fn config(&self) -> &ConvNextConfig {
        &self.config
    }

    /// The weight naming found in the checkpoint.
    pub fn naming(&self) -> &ConvNextNaming {
        &self.naming
    }

    /// `F32` or `BF16`: the dtype of the outputs.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// True when the checkpoint had a final norm (so `pooler_output` is computed).
    pub fn has_final_norm(&self) -> bool {
        self.final_norm.is_some()
    }

    /// Runs the network on `pixel_values` `[B, num_channels, H, W]` (any float dtype).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<ConvNextOutput> {
        self.forward_impl(pixel_values, None)
    }

    /// [`ConvNextModel::forward`] that also returns the wall time of each part: `stem`,
    /// `stage N` (downsample and blocks) and `pooler` (for profiling).
    pub fn forward_profiled(
        &self,
        pixel_values: &Tensor,
    ) -> Result<(ConvNextOutput, Vec<(String, Duration)>)> {
        let mut times = Vec::new();
        let out = self.forward_impl(pixel_values, Some(&mut times))?;
        Ok((out, times))
    }

    fn forward_impl(
        &self,
        pixel_values: &Tensor,
        mut times: Option<&mut Vec<(String, Duration)>>,
    ) -> Result<ConvNextOutput> {
        const FWD: &str = "ConvNextModel::forward";
        let mut clock = Instant::now();
        let mut lap = |name: String| {
            if let Some(t) = times.as_deref_mut() {
                let now = Instant::now();
                t.push((name, now - clock));
                clock = now;
            }
        };
        let bf16 = self.dtype == DType::BF16;
        let s = pixel_values.shape();
        if s.len() != 4 || s[1] != self.config.num_channels {
            return Err(Error::invalid_input(
                FWD,
                format!(
                    "pixel_values must be [B, {}, H, W], got {s:?}",
                    self.config.num_channels
                ),
            ));
        }
        if !pixel_values.dtype().is_float() {
            return Err(Error::invalid_input(
                FWD,
                format!("pixel_values must be float, got {:?}", pixel_values.dtype()),
            ));
        }
        let (b, hin, win) = (s[0], s[2], s[3]);
        let p = self.config.patch_size;
        if hin < p || win < p {
            return Err(Error::invalid_input(
                FWD,
                format!("image {hin}x{win} is smaller than the {p}x{p} stem patch"),
            ));
        }
        let (mut h, mut w) = (hin / p, win / p);
        for (i, st) in self.stages.iter().enumerate() {
            if st.downsample.is_some() {
                if h < 2 || w < 2 {
                    return Err(Error::invalid_input(
                        FWD,
                        format!(
                            "image {hin}x{win} is too small: stage {i} would downsample a \
                             {h}x{w} map"
                        ),
                    ));
                }
                h /= 2;
                w /= 2;
            }
        }
        let px = pixel_values.to_dtype(DType::F32)?.contiguous()?;
        let px_f32 = px
            .as_contiguous_slice::<f32>()?
            .expect("contiguous() returns a contiguous tensor");
        // a bf16 model first casts its input to bf16
        let px_data: Cow<[f32]> = if bf16 {
            Cow::Owned(px_f32.iter().map(|&x| round_bf16(x)).collect())
        } else {
            Cow::Borrowed(px_f32)
        };
        let mut geo = Geo {
            b,
            h: hin / p,
            w: win / p,
            c: self.config.hidden_sizes[0],
        };
        let stem = self.run_stem(&px_data, b, hin, win, geo, bf16);
        lap("stem".to_string());
        let mut hidden: Vec<(Vec<f32>, Geo)> = Vec::with_capacity(self.stages.len() + 1);
        hidden.push((stem, geo));
        let mut spare: Vec<f32> = Vec::new();
        for (si, st) in self.stages.iter().enumerate() {
            let input = &hidden.last().expect("the stem output is pushed first").0;
            let mut cur: Option<Vec<f32>> = None;
            if let Some(ds) = &st.downsample {
                let (out, g) = run_downsample(ds, input, geo, st.channels, bf16);
                cur = Some(out);
                geo = g;
            }
            for blk in &st.blocks {
                let mut out = std::mem::take(&mut spare);
                let src = cur.as_deref().unwrap_or(input);
                self.run_block(blk, src, &mut out, geo, bf16)?;
                if let Some(old) = cur.replace(out) {
                    spare = old;
                }
            }
            let out = match cur {
                Some(v) => v,
                None => input.clone(),
            };
            hidden.push((out, geo));
            lap(format!("stage {si}"));
        }
        let pooler = match &self.final_norm {
            Some(norm) => {
                let (last, g) = hidden.last().expect("at least the stem output");
                Some(self.pool(norm, last, *g, bf16)?)
            }
            None => None,
        };
        lap("pooler".to_string());
        let hidden_states = hidden
            .into_iter()
            .map(|(v, g)| nhwc_to_nchw_view(v, g, self.dtype))
            .collect::<Result<Vec<_>>>()?;
        Ok(ConvNextOutput {
            last_hidden_state: hidden_states
                .last()
                .expect("at least the stem output")
                .clone(),
            pooler_output: pooler,
            hidden_states,
        })
    }

    /// MGM's multi-stage feature map: each stage output resized bilinearly (align_corners
    /// false) to the first stage's grid and concatenated on channels, `[B, sum(hidden_sizes),
    /// H / 4, W / 4]` (see [`feature_pyramid_from_stages`]).
    pub fn feature_pyramid(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let out = self.forward(pixel_values)?;
        feature_pyramid_from_stages(&out.hidden_states[1..])
    }

    fn run_stem(
        &self,
        px: &[f32],
        b: usize,
        hin: usize,
        win: usize,
        g: Geo,
        bf16: bool,
    ) -> Vec<f32> {
        let st = &self.stem;
        let (p, cin, c) = (self.config.patch_size, self.config.num_channels, g.c);
        let k = cin * p * p;
        let mut out = vec![0f32; b * g.h * g.w * c];
        let band = band_rows(b * g.h, g.w, BAND_PIXELS);
        out.par_chunks_mut(band * g.w * c)
            .enumerate()
            .for_each_init(Vec::new, |col: &mut Vec<f32>, (bi, ob)| {
                let r0 = bi * band;
                let npx = ob.len() / c;
                col.resize(npx * k, 0.0);
                for (q, patch) in col.chunks_exact_mut(k).enumerate() {
                    let r = r0 + q / g.w;
                    let (bb, oh, ow) = (r / g.h, r % g.h, q % g.w);
                    for ch in 0..cin {
                        for i in 0..p {
                            let src =
                                &px[((bb * cin + ch) * hin + oh * p + i) * win + ow * p..][..p];
                            patch[(ch * p + i) * p..][..p].copy_from_slice(src);
                        }
                    }
                }
                mul_packed(col, npx, &st.packed, ob, &Epilogue::default())
                    .expect("the stem's shapes match its packed weight");
                kernel!(bias_norm_rows(ob, c, &st.bias, &st.norm, bf16));
            });
        out
    }

    fn run_block(
        &self,
        blk: &Block,
        x: &[f32],
        y: &mut Vec<f32>,
        g: Geo,
        bf16: bool,
    ) -> Result<()> {
        let c = g.c;
        let hid = blk.fc1.out_features;
        // every element is written below; zero-fill only a buffer of another size
        if y.len() != x.len() {
            y.clear();
            y.resize(x.len(), 0.0);
        }
        let row = g.w * c;
        let band = band_rows(g.b * g.h, g.w, BAND_PIXELS);
        let act = self.act;
        y.par_chunks_mut(band * row).enumerate().for_each_init(
            || (Vec::new(), Vec::new()),
            |(a, hb): &mut (Vec<f32>, Vec<f32>), (bi, yb)| {
                let r0 = bi * band;
                let npx = yb.len() / c;
                a.resize(npx * c, 0.0);
                hb.resize(npx * hid, 0.0);
                let dw = DwArgs {
                    x,
                    g,
                    r0,
                    rows: npx / g.w,
                    weight: &blk.dw_weight,
                    bias: &blk.dw_bias,
                    norm: &blk.norm,
                    bf16,
                };
                dwconv_norm_rows(&dw, a, simd());
                if bf16 {
                    // bias and activation each round to bf16, as the bf16 model does
                    mul_packed(a, npx, &blk.fc1.packed, hb, &Epilogue::default())
                        .expect("fc1's shapes match its packed weight");
                    kernel!(bias_act_rows(hb, &blk.fc1.bias, act, bf16));
                } else {
                    let epi = Epilogue {
                        bias: Some(&blk.fc1.bias),
                        activation: act,
                        ..Epilogue::default()
                    };
                    mul_packed(a, npx, &blk.fc1.packed, hb, &epi)
                        .expect("fc1's shapes match its packed weight");
                }
                mul_packed(hb, npx, &blk.fc2.packed, a, &Epilogue::default())
                    .expect("fc2's shapes match its packed weight");
                let res = ResArgs {
                    x: &x[r0 * row..][..npx * c],
                    bias: &blk.fc2.bias,
                    gamma: blk.gamma.as_deref(),
                    bf16,
                };
                kernel!(residual_rows(&res, a, yb));
            },
        );
        Ok(())
    }

    fn pool(&self, norm: &Norm, x: &[f32], g: Geo, bf16: bool) -> Result<Tensor> {
        let (c, hw) = (g.c, g.h * g.w);
        let mut out = vec![0f32; g.b * c];
        for (bb, o) in out.chunks_exact_mut(c).enumerate() {
            let mut acc = vec![0f64; c];
            for px in x[bb * hw * c..(bb + 1) * hw * c].chunks_exact(c) {
                acc.iter_mut().zip(px).for_each(|(a, &v)| *a += v as f64);
            }
            for (o, a) in o.iter_mut().zip(&acc) {
                let m = (*a / hw as f64) as f32;
                *o = if bf16 { round_bf16(m) } else { m };
            }
            norm_row_ref(o, norm);
            if bf16 {
                o.iter_mut().for_each(|v| *v = round_bf16(*v));
            }
        }
        let t = Tensor::from_vec(out, &[g.b, c])?;
        Ok(t.to_dtype(self.dtype)?)
    }
}

fn load_block(
    ld: &Loader<'_>,
    names: &Names,
    s: usize,
    b: usize,
    c: usize,
    config: &ConvNextConfig,
) -> Result<Block> {
    let base = names.block(s, b);
    let [dw, ln, fc1, fc2, ls] = names.block_parts();
    let w = ld.weight(&format!("{base}.{dw}.weight"), &[c, 1, KS, KS])?;
    let mut dw_weight = vec![0f32; KS * KS * c];
    for ch in 0..c {
        for t in 0..KS * KS {
            dw_weight[t * c + ch] = w[ch * KS * KS + t];
        }
    }
    let fc1 = ld.dense(&format!("{base}.{fc1}"), c, 4 * c)?;
    let fc2_name = fc2;
    let fc2 = ld.dense(&format!("{base}.{fc2}"), fc1.out_features, c)?;
    if fc2.out_features != c {
        return Err(Error::invalid_input(
            "ConvNextModel::load",
            format!(
                "{base}.{fc2_name}.weight maps to {} channels, the stage has {c}",
                fc2.out_features
            ),
        ));
    }
    let ls_name = format!("{base}.{ls}");
    // transformers creates the layer scale from the config; timm's checkpoints say by
    // themselves whether blocks have one.
    let has_gamma = if names.hf || ld.vs.is_trainable() {
        config.layer_scale_init_value > 0.0
    } else {
        ld.vs.contains(&ls_name)
    };
    let gamma = if has_gamma {
        let init = Init::Const(config.layer_scale_init_value);
        Some(ld.vec(&ls_name, &[c], init, false)?)
    } else {
        None
    };
    Ok(Block {
        dw_weight,
        dw_bias: ld.bias(&format!("{base}.{dw}.bias"), c)?,
        norm: ld.norm(&format!("{base}.{ln}"), c, INNER_EPS)?,
        fc1,
        fc2,
        gamma,
    })
}

/// `[C_out, C_in, 2, 2]` to `[C_out, (row, col, C_in)]`.
fn reorder_patch_weight(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for o in 0..cout {
        for ch in 0..cin {
            for t in 0..4 {
                out[(o * 4 + t) * cin + ch] = w[(o * cin + ch) * 4 + t];
            }
        }
    }
    out
}

/// `[B, H, W, C]` data as the `[B, C, H, W]` view transformers returns.
fn nhwc_to_nchw_view(v: Vec<f32>, g: Geo, dtype: DType) -> Result<Tensor> {
    let t = Tensor::from_vec(v, &[g.b, g.h, g.w, g.c])?.to_dtype(dtype)?;
    Ok(t.permute(&[0, 3, 1, 2])?)
}

/// Shapes of a channels-last activation.
#[derive(Clone, Copy, Debug)]
struct Geo {
    b: usize,
    h: usize,
    w: usize,
    c: usize,
}

/// Image rows per band so that a band holds about `target` pixels and the band count is a
/// multiple of the thread count (no thread idles through the last round).
fn band_rows(rows: usize, row_pixels: usize, target: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let per = (target / row_pixels.max(1)).max(1);
    let n = rows.div_ceil(per).div_ceil(threads) * threads;
    rows.div_ceil(n.clamp(1, rows.max(1))).max(1)
}

fn run_downsample(ds: &Downsample, x: &[f32], g: Geo, cout: usize, bf16: bool) -> (Vec<f32>, Geo) {
    let cin = g.c;
    // LayerNorm every input pixel once (each feeds exactly one output patch).
    let mut xn = x.to_vec();
    let per_task = (1 << 15) / cin.max(1) + 1;
    xn.par_chunks_mut(per_task * cin).for_each(|rows| {
        kernel!(norm_rows(rows, cin, &ds.norm, bf16));
    });
    let og = Geo {
        b: g.b,
        h: g.h / 2,
        w: g.w / 2,
        c: cout,
    };
    let k = 4 * cin;
    let mut out = vec![0f32; og.b * og.h * og.w * cout];
    let band = band_rows(og.b * og.h, og.w, BAND_PIXELS);
    out.par_chunks_mut(band * og.w * cout)
        .enumerate()
        .for_each_init(Vec::new, |col: &mut Vec<f32>, (bi, ob)| {
            let r0 = bi * band;
            let npx = ob.len() / cout;
            col.resize(npx * k, 0.0);
            for (q, patch) in col.chunks_exact_mut(k).enumerate() {
                let r = r0 + q / og.w;
                let (bb, oh, ow) = (r / og.h, r % og.h, q % og.w);
                for di in 0..2 {
                    let src = &xn[((bb * g.h + 2 * oh + di) * g.w + 2 * ow) * cin..][..2 * cin];
                    patch[di * 2 * cin..][..2 * cin].copy_from_slice(src);
                }
            }
            mul_packed(col, npx, &ds.packed, ob, &Epilogue::default())
                .expect("the downsample's shapes match its packed weight");
            kernel!(bias_rows(ob, cout, &ds.bias, bf16));
        });
    (out, og)
}

// ---------------------------------------------------------------------------------------------
// Feature pyramid

/// MGM's multi-stage feature map from stage outputs `[B, C_s, H_s, W_s]` (any layout, f32 or
/// bf16): every stage resized like `F.interpolate(mode="bilinear", align_corners=False)` (in f32,
/// as MGM upcasts) to the first stage's grid, then concatenated on channels. The result is a
/// `[B, sum C_s, H_0, W_0]` view of channels-last storage in the first stage's dtype
/// (`.permute(&[0, 2, 3, 1])` gives the contiguous `[B, H_0, W_0, sum C_s]` for free).
pub fn feature_pyramid_from_stages(stages: &[Tensor]) -> Result<Tensor> {
    const PYR: &str = "feature_pyramid_from_stages";
    let first = stages
        .first()
        .ok_or_else(|| Error::invalid_input(PYR, "no stages"))?;
    let s0 = first.shape();
    if s0.len() != 4 {
        return Err(Error::invalid_input(
            PYR,
            format!("stages must be [B, C, H, W], stage 0 is {s0:?}"),
        ));
    }
    let (b, h0, w0) = (s0[0], s0[2], s0[3]);
    let mut inputs = Vec::with_capacity(stages.len());
    for (i, t) in stages.iter().enumerate() {
        let s = t.shape();
        if s.len() != 4 || s[0] != b || s[2] == 0 || s[3] == 0 {
            return Err(Error::invalid_input(
                PYR,
                format!("stage {i} is {s:?}, expected [{b}, C, H, W] with H, W > 0"),
            ));
        }
        let nhwc = t
            .permute(&[0, 2, 3, 1])?
            .to_dtype(DType::F32)?
            .contiguous()?;
        inputs.push((
            nhwc,
            Geo {
                b,
                h: s[2],
                w: s[3],
                c: s[1],
            },
        ));
    }
    let total: usize = inputs.iter().map(|(_, g)| g.c).sum();
    let mut out = vec![0f32; b * h0 * w0 * total];
    let bf16 = first.dtype() == DType::BF16;
    let mut off = 0;
    let mut plans = Vec::with_capacity(inputs.len());
    for (t, g) in &inputs {
        let data = t
            .as_contiguous_slice::<f32>()?
            .expect("contiguous() returned a contiguous tensor");
        plans.push(ResizePlan {
            data,
            g: *g,
            off,
            ys: linear_taps(g.h, h0),
            xs: linear_taps(g.w, w0),
        });
        off += g.c;
    }
    let row = w0 * total;
    if row > 0 {
        out.par_chunks_mut(row).enumerate().for_each(|(r, orow)| {
            let (bb, y) = (r / h0.max(1), r % h0.max(1));
            for plan in &plans {
                kernel!(resize_row(plan, bb, y, total, orow, bf16));
            }
        });
    }
    let t = Tensor::from_vec(out, &[b, h0, w0, total])?.to_dtype(first.dtype())?;
    Ok(t.permute(&[0, 3, 1, 2])?)
}

/// One stage's part of the pyramid.
struct ResizePlan<'a> {
    data: &'a [f32],
    g: Geo,
    off: usize,
    ys: Vec<(usize, usize, f32, f32)>,
    xs: Vec<(usize, usize, f32, f32)>,
}

/// PyTorch's linear taps for `align_corners=False` with only the output size given:
/// `src = (dst + 0.5) * in / out - 0.5`, clamped at 0, taps `floor(src)` and the next one
/// (clamped to the last), weights `1 - l`, `l`; computed in f32 as PyTorch's CPU kernel does.
fn linear_taps(input: usize, output: usize) -> Vec<(usize, usize, f32, f32)> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|d| {
            let src = ((d as f32 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src as usize).min(input - 1);
            let i1 = (i0 + 1).min(input - 1);
            let l = (src - i0 as f32).clamp(0.0, 1.0);
            (i0, i1, 1.0 - l, l)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Kernels: portable loops over `L` channel lanes, compiled for AVX-512 / AVX2 at run time.

/// Multiply-add as the target allows: fused where FMA exists (`mul_add` would be a libm call
/// on baseline x86-64).
trait MulAdd {
    fn fma(a: f32, b: f32, c: f32) -> f32;
}

/// `a.mul_add(b, c)` (one rounding).
struct Fused;
impl MulAdd for Fused {
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// `a * b + c` (two roundings).
struct Plain;
impl MulAdd for Plain {
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// Inputs of the fused depthwise conv + LayerNorm over a band of image rows.
struct DwArgs<'a> {
    /// The block input, `[B, H, W, C]`.
    x: &'a [f32],
    g: Geo,
    /// First global image row (`b * H + h`) of the band.
    r0: usize,
    rows: usize,
    weight: &'a [f32],
    bias: &'a [f32],
    norm: &'a Norm,
    bf16: bool,
}

/// Depthwise conv of channels `from..` of one output row, one channel at a time (the portable
/// path, and the channels left over after the last full SIMD vector).
fn dw_row_scalar(a: &DwArgs<'_>, rows: &[Option<&[f32]>; KS], from: usize, out: &mut [f32]) {
    let Geo { w: width, c, .. } = a.g;
    for x in 0..width {
        let o = &mut out[x * c..][..c];
        o[from..].copy_from_slice(&a.bias[from..]);
        for (i, row) in rows.iter().enumerate() {
            let Some(row) = row else { continue };
            for j in 0..KS {
                let pos = x + j;
                if pos < PAD || pos - PAD >= width {
                    continue;
                }
                let iv = &row[(pos - PAD) * c..][..c];
                let wv = &a.weight[(i * KS + j) * c..][..c];
                for ch in from..c {
                    o[ch] += wv[ch] * iv[ch];
                }
            }
        }
    }
}

/// Declares a depthwise-row kernel on `$lanes`-wide vectors: tiles of `$cols` output columns by
/// one vector of channels; for each kernel row the `$cols + 6` input vectors are loaded once and
/// reused by the 7 taps of all `$cols` columns (accumulators, inputs and one weight vector stay
/// in registers). Returns how many leading channels it computed (whole vectors only).
macro_rules! dw_row_simd {
    ($name:ident, $feat:literal, $lanes:literal, $cols:literal, $vec:ty, $zero:ident,
     $load:ident, $store:ident, $fmadd:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        fn $name(a: &DwArgs<'_>, rows: &[Option<&[f32]>; KS], out: &mut [f32]) -> usize {
            use std::arch::x86_64::*;
            const L: usize = $lanes;
            const Q: usize = $cols;
            // input columns one tile reads
            const T: usize = Q + KS - 1;
            let Geo { w: width, c, .. } = a.g;
            let full = c - c % L;
            let load = |s: &[f32]| -> $vec {
                let s = &s[..L];
                // SAFETY: `s` holds L floats, the width of one unaligned vector load.
                unsafe { $load(s.as_ptr()) }
            };
            for c0 in (0..full).step_by(L) {
                let bias = load(&a.bias[c0..]);
                for w0 in (0..width).step_by(Q) {
                    let mut acc = [bias; Q];
                    // the tile's input columns w0 - 3 .. w0 + Q + 3 all inside the row
                    let interior = w0 >= PAD && w0 - PAD + T <= width;
                    for (i, row) in rows.iter().enumerate() {
                        let Some(row) = row else { continue };
                        let mut inv = [$zero(); T];
                        if interior {
                            // one bounds check for the whole window instead of one per load
                            let base = (w0 - PAD) * c + c0;
                            let win = &row[base..base + (T - 1) * c + L];
                            for (t, v) in inv.iter_mut().enumerate() {
                                // SAFETY: t * c + L <= (T - 1) * c + L = win.len().
                                *v = unsafe { $load(win.as_ptr().add(t * c)) };
                            }
                        } else {
                            for (t, v) in inv.iter_mut().enumerate() {
                                let pos = w0 + t;
                                if pos >= PAD && pos - PAD < width {
                                    *v = load(&row[(pos - PAD) * c + c0..]);
                                }
                            }
                        }
                        for j in 0..KS {
                            let wv = load(&a.weight[(i * KS + j) * c + c0..]);
                            for (q, acc_q) in acc.iter_mut().enumerate() {
                                *acc_q = $fmadd(wv, inv[q + j], *acc_q);
                            }
                        }
                    }
                    for (q, acc_q) in acc.iter().enumerate().take(width - w0) {
                        let dst = &mut out[(w0 + q) * c + c0..][..L];
                        // SAFETY: `dst` holds L floats, the width of one unaligned store.
                        unsafe { $store(dst.as_mut_ptr(), *acc_q) };
                    }
                }
            }
            full
        }
    };
}

dw_row_simd!(
    dw_row_avx512,
    "avx512f",
    16,
    8,
    __m512,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_fmadd_ps
);
dw_row_simd!(
    dw_row_avx2,
    "avx2,fma",
    8,
    4,
    __m256,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_fmadd_ps
);

/// Depthwise 7x7 conv (padding 3, bias) of the band's rows, then LayerNorm of every pixel, with
/// the depthwise kernel of `level` (lowered to what this CPU has).
fn dwconv_norm_rows(a: &DwArgs<'_>, out: &mut [f32], level: Simd) {
    let level = level.min(simd());
    let Geo { h, w, c, .. } = a.g;
    let row_len = w * c;
    for rr in 0..a.rows {
        let r = a.r0 + rr;
        let (bb, y) = (r / h, r % h);
        let img = &a.x[bb * h * row_len..][..h * row_len];
        let mut rows: [Option<&[f32]>; KS] = [None; KS];
        for (i, slot) in rows.iter_mut().enumerate() {
            let iy = y + i;
            if iy >= PAD && iy - PAD < h {
                *slot = Some(&img[(iy - PAD) * row_len..][..row_len]);
            }
        }
        let orow = &mut out[rr * row_len..][..row_len];
        let done = match level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `level` is at most simd(), which found AVX-512F on this CPU.
            Simd::Avx512 => unsafe { dw_row_avx512(a, &rows, orow) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `level` is at most simd(), which found AVX2 and FMA on this CPU.
            Simd::Avx2 => unsafe { dw_row_avx2(a, &rows, orow) },
            _ => 0,
        };
        if done < c {
            dw_row_scalar(a, &rows, done, orow);
        }
        if a.bf16 {
            orow.iter_mut().for_each(|v| *v = round_bf16(*v));
        }
        kernel!(norm_rows(orow, c, a.norm, a.bf16));
    }
}

/// LayerNorm of each `c`-wide row of `v` in place (two-pass variance), rounded to bf16 after
/// when asked.
#[inline(always)]
fn norm_rows<M: MulAdd, const L: usize>(v: &mut [f32], c: usize, norm: &Norm, bf16: bool) {
    let inv_c = 1.0 / c as f32;
    for px in v.chunks_exact_mut(c) {
        let mean = lane_sum::<L>(px, |x| x) * inv_c;
        let var = lane_sum::<L>(px, |x| (x - mean) * (x - mean)) * inv_c;
        let r = 1.0 / (var + norm.eps).sqrt();
        for ((x, &g), &b) in px.iter_mut().zip(&norm.weight).zip(&norm.bias) {
            let y = M::fma((*x - mean) * r, g, b);
            *x = if bf16 { round_bf16(y) } else { y };
        }
    }
}

/// The LayerNorm of one row in plain scalar code (the pooler: one row per image).
fn norm_row_ref(v: &mut [f32], norm: &Norm) {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    let r = 1.0 / (var + norm.eps as f64).sqrt();
    for ((x, &g), &b) in v.iter_mut().zip(&norm.weight).zip(&norm.bias) {
        *x = ((*x as f64 - mean) * r * g as f64 + b as f64) as f32;
    }
}

/// `sum f(x)` with `L` independent partial sums (vectorises without reassociation flags).
#[inline(always)]
fn lane_sum<const L: usize>(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; L];
    let mut it = x.chunks_exact(L);
    for ch in &mut it {
        for l in 0..L {
            acc[l] += f(ch[l]);
        }
    }
    let mut s = 0f32;
    for &v in it.remainder() {
        s += f(v);
    }
    s + acc.iter().sum::<f32>()
}

/// Adds the bias to every `c`-wide row, then LayerNorm (the stem).
#[inline(always)]
fn bias_norm_rows<M: MulAdd, const L: usize>(
    v: &mut [f32],
    c: usize,
    bias: &[f32],
    norm: &Norm,
    bf16: bool,
) {
    bias_rows::<M, L>(v, c, bias, bf16);
    norm_rows::<M, L>(v, c, norm, bf16);
}

/// Adds the bias to every `c`-wide row (rounded to bf16 after when asked).
#[inline(always)]
fn bias_rows<M: MulAdd, const L: usize>(v: &mut [f32], c: usize, bias: &[f32], bf16: bool) {
    for px in v.chunks_exact_mut(c) {
        for (x, &b) in px.iter_mut().zip(bias) {
            let y = *x + b;
            *x = if bf16 { round_bf16(y) } else { y };
        }
    }
}

/// `fc1` epilogue: bias then activation, in place over `[P, hidden]` rows.
#[inline(always)]
fn bias_act_rows<M: MulAdd, const L: usize>(
    v: &mut [f32],
    bias: &[f32],
    act: Activation,
    bf16: bool,
) {
    let n = bias.len();
    macro_rules! sweep {
        ($f:expr) => {
            for px in v.chunks_exact_mut(n) {
                for (x, &b) in px.iter_mut().zip(bias) {
                    let mut y = *x + b;
                    if bf16 {
                        y = round_bf16(y);
                    }
                    let z = $f(y);
                    *x = if bf16 { round_bf16(z) } else { z };
                }
            }
        };
    }
    // one loop per activation, so that each vectorises
    match act {
        Activation::Identity => sweep!(|x: f32| x),
        Activation::GeluErf => sweep!(|x| Activation::GeluErf.apply(x)),
        Activation::GeluTanh => sweep!(|x| Activation::GeluTanh.apply(x)),
        Activation::QuickGelu => sweep!(|x| Activation::QuickGelu.apply(x)),
        Activation::Relu => sweep!(|x| Activation::Relu.apply(x)),
        Activation::Silu => sweep!(|x| Activation::Silu.apply(x)),
    }
}

/// Inputs of the block's last epilogue.
struct ResArgs<'a> {
    /// The block input rows of the band (the residual).
    x: &'a [f32],
    bias: &'a [f32],
    gamma: Option<&'a [f32]>,
    bf16: bool,
}

/// `y = x + gamma * (fc2 + bias)` over the band.
#[inline(always)]
fn residual_rows<M: MulAdd, const L: usize>(a: &ResArgs<'_>, f: &[f32], y: &mut [f32]) {
    let c = a.bias.len();
    let r = |v: f32| if a.bf16 { round_bf16(v) } else { v };
    for ((yr, fr), xr) in y
        .chunks_exact_mut(c)
        .zip(f.chunks_exact(c))
        .zip(a.x.chunks_exact(c))
    {
        match a.gamma {
            Some(gm) => {
                for ((((yv, &fv), &xv), &b), &g) in
                    yr.iter_mut().zip(fr).zip(xr).zip(a.bias).zip(gm)
                {
                    *yv = r(xv + r(g * r(fv + b)));
                }
            }
            None => {
                for (((yv, &fv), &xv), &b) in yr.iter_mut().zip(fr).zip(xr).zip(a.bias) {
                    *yv = r(xv + r(fv + b));
                }
            }
        }
    }
}

/// One output row `(b, y)` of one stage's bilinear resize, written at the stage's channel
/// offset of the concatenated row.
#[inline(always)]
fn resize_row<M: MulAdd, const L: usize>(
    p: &ResizePlan<'_>,
    b: usize,
    y: usize,
    total: usize,
    out: &mut [f32],
    bf16: bool,
) {
    let Geo { h, w, c, .. } = p.g;
    let img = &p.data[b * h * w * c..][..h * w * c];
    let (y0, y1, wy0, wy1) = p.ys[y];
    for (xo, &(x0, x1, wx0, wx1)) in p.xs.iter().enumerate() {
        let o = &mut out[xo * total + p.off..][..c];
        let a00 = &img[(y0 * w + x0) * c..][..c];
        let a01 = &img[(y0 * w + x1) * c..][..c];
        let a10 = &img[(y1 * w + x0) * c..][..c];
        let a11 = &img[(y1 * w + x1) * c..][..c];
        for i in 0..c {
            let top = M::fma(wx1, a01[i], wx0 * a00[i]);
            let bot = M::fma(wx1, a11[i], wx0 * a10[i]);
            let v = M::fma(wy1, bot, wy0 * top);
            o[i] = if bf16 { round_bf16(v) } else { v };
        }
    }
}

instances! {
    norm_rows(v: &mut [f32], c: usize, norm: &Norm, bf16: bool);
    bias_norm_rows(v: &mut [f32], c: usize, bias: &[f32], norm: &Norm, bf16: bool);
    bias_rows(v: &mut [f32], c: usize, bias: &[f32], bf16: bool);
    bias_act_rows(v: &mut [f32], bias: &[f32], act: Activation, bf16: bool);
    residual_rows(a: &ResArgs<'_>, f: &[f32], y: &mut [f32]);
    resize_row(p: &ResizePlan<'_>, b: usize, y: usize, total: usize, out: &mut [f32], bf16: bool);
}

// ---------------------------------------------------------------------------------------------
// The autograd path

/// ConvNeXt as tensor ops over [`Param`]s: the tower to train (from a trainable store, where
/// missing weights start from PyTorch's default initialisation and the layer scale from
/// `layer_scale_init_value`), with the names, shapes and outputs of [`ConvNextModel`], which is
/// the fast inference path.
///
/// ```
/// use mgm_tensor::{DType, Device, Tensor, nn::VarStore};
/// use mgm_vision::convnext::{ConvNextConfig, TrainableConvNext};
/// let cfg = ConvNextConfig { num_channels: 3, patch_size: 4, hidden_sizes: vec![8, 16], depths: vec![1, 1],
///     layer_norm_eps: 1e-6, hidden_act: "gelu".into(), layer_scale_init_value: 1e-6 };
/// let tower = TrainableConvNext::load(&VarStore::new_trainable(0), &cfg)?;
/// let x = Tensor::randn(0, &[1, 3, 32, 32], 0.0, 1.0, DType::F32, Device::Cpu)?;
/// assert_eq!(tower.feature_pyramid(&x)?.shape(), &[1, 24, 8, 8]);
/// # Ok::<(), mgm_vision::Error>(())
/// ```
pub struct TrainableConvNext {
    config: ConvNextConfig,
    act: Activation,
    stem: nn::Conv2d,
    stem_norm: nn::LayerNorm,
    stages: Vec<TrainableStage>,
    _final_norm: Option<nn::LayerNorm>,
}

struct TrainableStage {
    downsample: Option<(nn::LayerNorm, nn::Conv2d)>,
    blocks: Vec<TrainableBlock>,
}

struct TrainableBlock {
    dw: nn::Conv2d,
    norm: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    gamma: Option<Param>,
}

/// A LayerNorm over the channels of `[B, C, H, W]`.
fn norm_channels(norm: &nn::LayerNorm, x: &Tensor) -> Result<Tensor> {
    use mgm_tensor::nn::Module;
    Ok(norm
        .forward(&x.permute(&[0, 2, 3, 1])?)?
        .permute(&[0, 3, 1, 2])?)
}

impl TrainableConvNext {
    /// Loads (or, from a trainable store, creates) the tower by the checkpoint's naming
    /// (transformers' names for a fresh store).
    pub fn load(vs: &VarStore, config: &ConvNextConfig) -> Result<TrainableConvNext> {
        use mgm_tensor::Conv2dParams;
        config.validate("<ConvNextConfig>")?;
        let act = parse_act(&config.hidden_act)
            .map_err(|m| Error::invalid_input("TrainableConvNext::load", m))?;
        let names = Names::detect(vs)?;
        let (cin, p, c0) = (
            config.num_channels,
            config.patch_size,
            config.hidden_sizes[0],
        );
        let strided = |k: usize| Conv2dParams {
            stride: (k, k),
            ..Default::default()
        };
        let stem = nn::Conv2d::load(
            &vs.pp(&names.stem_conv()),
            cin,
            c0,
            (p, p),
            strided(p),
            true,
        )?;
        let stem_norm = nn::LayerNorm::load(&vs.pp(&names.stem_norm()), c0, f64::from(INNER_EPS))?;
        let mut stages = Vec::new();
        let mut prev = c0;
        let [dw, ln, fc1, fc2, ls] = names.block_parts();
        for (s, (&ch, &depth)) in config.hidden_sizes.iter().zip(&config.depths).enumerate() {
            let downsample = if s > 0 {
                Some((
                    nn::LayerNorm::load(
                        &vs.pp(&names.downsample(s, 0)),
                        prev,
                        f64::from(INNER_EPS),
                    )?,
                    nn::Conv2d::load(
                        &vs.pp(&names.downsample(s, 1)),
                        prev,
                        ch,
                        (2, 2),
                        strided(2),
                        true,
                    )?,
                ))
            } else {
                None
            };
            let mut blocks = Vec::with_capacity(depth);
            for b in 0..depth {
                let base = vs.pp(&names.block(s, b));
                let dw_params = Conv2dParams {
                    padding: (KS / 2, KS / 2),
                    groups: ch,
                    ..Default::default()
                };
                let gamma = (config.layer_scale_init_value > 0.0 || base.contains(ls))
                    .then(|| {
                        base.param_or_init(ls, &[ch], Init::Const(config.layer_scale_init_value))
                    })
                    .transpose()?;
                blocks.push(TrainableBlock {
                    dw: nn::Conv2d::load(&base.pp(dw), ch, ch, (KS, KS), dw_params, true)?,
                    norm: nn::LayerNorm::load(&base.pp(ln), ch, f64::from(INNER_EPS))?,
                    fc1: nn::Linear::load(&base.pp(fc1), ch, 4 * ch, true)?,
                    fc2: nn::Linear::load(&base.pp(fc2), 4 * ch, ch, true)?,
                    gamma,
                });
            }
            stages.push(TrainableStage { downsample, blocks });
            prev = ch;
        }
        // the pooler's norm: unused by the stage outputs, but part of the checkpoint that
        // ConvNextModel loads (transformers' layout always has it)
        let final_name = names.final_norm();
        let final_norm = if names.hf {
            Some(nn::LayerNorm::load(
                &vs.pp(&final_name),
                prev,
                config.layer_norm_eps,
            )?)
        } else if vs.contains(&format!("{final_name}.weight")) {
            Some(nn::LayerNorm::load(
                &vs.pp(&final_name),
                prev,
                f64::from(INNER_EPS),
            )?)
        } else {
            None
        };
        Ok(TrainableConvNext {
            config: config.clone(),
            act,
            stem,
            stem_norm,
            stages,
            _final_norm: final_norm,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ConvNextConfig {
        &self.config
    }

    /// Every stage's output `[B, C_s, H_s, W_s]` for `pixel_values` `[B, C, H, W]`.
    pub fn stage_outputs(&self, pixel_values: &Tensor) -> Result<Vec<Tensor>> {
        use mgm_tensor::nn::Module;
        let s = pixel_values.shape();
        if s.len() != 4 || s[1] != self.config.num_channels {
            return Err(Error::invalid_input(
                "TrainableConvNext::forward",
                format!(
                    "pixel_values must be [B, {}, H, W], got {s:?}",
                    self.config.num_channels
                ),
            ));
        }
        let mut x = norm_channels(&self.stem_norm, &self.stem.forward(pixel_values)?)?;
        let mut outs = Vec::with_capacity(self.stages.len());
        for st in &self.stages {
            if let Some((norm, conv)) = &st.downsample {
                x = conv.forward(&norm_channels(norm, &x)?)?;
            }
            for b in &st.blocks {
                let h = b.dw.forward(&x)?.permute(&[0, 2, 3, 1])?;
                let h = b.fc1.forward(&b.norm.forward(&h)?)?.activation(self.act)?;
                let mut h = b.fc2.forward(&h)?;
                if let Some(g) = &b.gamma {
                    h = h.mul(&g.tensor())?;
                }
                x = x.add(&h.permute(&[0, 3, 1, 2])?)?;
            }
            outs.push(x.clone());
        }
        Ok(outs)
    }

    /// MGM's multi-stage feature map (as [`ConvNextModel::feature_pyramid`]): every stage
    /// resized bilinearly (align_corners false) to the first stage's grid, concatenated on
    /// channels.
    pub fn feature_pyramid(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let outs = self.stage_outputs(pixel_values)?;
        let (h, w) = (outs[0].shape()[2], outs[0].shape()[3]);
        let resized = outs
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if i == 0 {
                    Ok(t.clone())
                } else {
                    t.interpolate((h, w), mgm_tensor::InterpolateMode::Bilinear, false)
                }
            })
            .collect::<mgm_tensor::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&resized, 1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mgm_tensor::Device;

    fn randn(seed: u64, n: usize, std: f64) -> Vec<f32> {
        Tensor::randn(seed, &[n], 0.0, std, DType::F32, Device::Cpu)
            .unwrap()
            .to_vec::<f32>()
            .unwrap()
    }

    #[test]
    fn round_bf16_matches_half_round_to_nearest_even() {
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            1e-40,
        ];
        let sweep = (0..=u32::MAX / 65_521).map(|i| f32::from_bits(i.wrapping_mul(65_521)));
        // ties: exactly half-way between two bf16 values, both parities
        let ties = (0..64u32).map(|i| f32::from_bits(0x3F80_8000 + (i << 16)));
        for x in specials.into_iter().chain(sweep).chain(ties) {
            let want = half::bf16::from_f32(x).to_f32();
            let got = round_bf16(x);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{x:e} ({:#x}): {got:e} != {want:e}",
                x.to_bits()
            );
        }
    }

    #[test]
    fn patch_reorder_moves_every_element() {
        let (cout, cin) = (3, 5);
        let w: Vec<f32> = (0..cout * cin * 4).map(|i| i as f32).collect();
        let p = reorder_patch_weight(&w, cout, cin);
        for o in 0..cout {
            for ch in 0..cin {
                for (di, dj) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                    let tap = di * 2 + dj;
                    assert_eq!(
                        p[(o * 4 + tap) * cin + ch],
                        w[((o * cin + ch) * 2 + di) * 2 + dj]
                    );
                }
            }
        }
    }

    #[test]
    fn band_rows_split_evenly_over_threads() {
        let threads = rayon::current_num_threads();
        for (rows, px) in [
            (192, 192),
            (96, 96),
            (48, 48),
            (24, 24),
            (1, 5),
            (7, 1000),
            (3, 1),
        ] {
            let band = band_rows(rows, px, BAND_PIXELS);
            let bands = rows.div_ceil(band);
            assert!(band >= 1 && band <= rows.max(1), "{rows} {px}: {band}");
            if rows >= threads {
                assert!(
                    bands >= threads.min(rows),
                    "{rows} rows of {px}: {bands} bands"
                );
            }
        }
    }

    /// The depthwise conv + LayerNorm of every pixel by plain f64 loops over NHWC data.
    fn dwconv_norm_reference(x: &[f32], g: Geo, w: &[f32], b: &[f32], norm: &Norm) -> Vec<f64> {
        let Geo { b: n, h, w: wd, c } = g;
        let mut out = vec![0f64; x.len()];
        for bb in 0..n {
            for y in 0..h {
                for xx in 0..wd {
                    let o = &mut out[((bb * h + y) * wd + xx) * c..][..c];
                    for ch in 0..c {
                        let mut s = b[ch] as f64;
                        for i in 0..KS {
                            for j in 0..KS {
                                let (iy, ix) = (y + i, xx + j);
                                if iy < PAD || ix < PAD || iy - PAD >= h || ix - PAD >= wd {
                                    continue;
                                }
                                let v = x[((bb * h + iy - PAD) * wd + ix - PAD) * c + ch];
                                s += w[ch * KS * KS + i * KS + j] as f64 * v as f64;
                            }
                        }
                        o[ch] = s;
                    }
                    let mean = o.iter().sum::<f64>() / c as f64;
                    let var = o.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / c as f64;
                    let r = 1.0 / (var + norm.eps as f64).sqrt();
                    for ((v, &g), &b) in o.iter_mut().zip(&norm.weight).zip(&norm.bias) {
                        *v = (*v - mean) * r * g as f64 + b as f64;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn dwconv_norm_rows_match_plain_loops_at_every_simd_level() {
        // 37 channels: two full 16-lane chunks (four 8-lane ones) and a remainder; widths that
        // are not multiples of the register tile; a band that starts inside an image
        for (g, r0, rows) in [
            (
                Geo {
                    b: 2,
                    h: 5,
                    w: 11,
                    c: 37,
                },
                3,
                6,
            ),
            (
                Geo {
                    b: 1,
                    h: 9,
                    w: 2,
                    c: 16,
                },
                0,
                9,
            ),
            (
                Geo {
                    b: 1,
                    h: 1,
                    w: 1,
                    c: 5,
                },
                0,
                1,
            ),
        ] {
            let x = randn(3, g.b * g.h * g.w * g.c, 1.0);
            let w = randn(4, g.c * KS * KS, 0.3);
            let mut wt = vec![0f32; w.len()];
            for ch in 0..g.c {
                for t in 0..KS * KS {
                    wt[t * g.c + ch] = w[ch * KS * KS + t];
                }
            }
            let bias = randn(5, g.c, 0.5);
            let norm = Norm {
                weight: randn(6, g.c, 1.0),
                bias: randn(7, g.c, 1.0),
                eps: INNER_EPS,
            };
            let want = dwconv_norm_reference(&x, g, &w, &bias, &norm);
            let args = DwArgs {
                x: &x,
                g,
                r0,
                rows,
                weight: &wt,
                bias: &bias,
                norm: &norm,
                bf16: false,
            };
            let n = rows * g.w * g.c;
            let mut levels: Vec<(Simd, Vec<f32>)> = Vec::new();
            for level in [Simd::Portable, Simd::Avx2, Simd::Avx512] {
                if level <= simd() {
                    let mut out = vec![f32::NAN; n];
                    dwconv_norm_rows(&args, &mut out, level);
                    levels.push((level, out));
                }
            }
            let want = &want[r0 * g.w * g.c..][..n];
            for (name, got) in levels {
                for (i, (&o, &e)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (o as f64 - e).abs() <= 2e-5 * (1.0 + e.abs()),
                        "{name:?} {g:?} element {i}: {o} vs {e}"
                    );
                }
            }
        }
    }
}
