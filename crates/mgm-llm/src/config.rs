//! `config.json` of a causal LM, as transformers reads it: the architecture from
//! `architectures` / `model_type`, the size keys (required), and everything else defaulted the
//! way transformers 5.23's config classes do. RoPE parameters are read from both spellings:
//! transformers 5.x `rope_parameters: {rope_type, rope_theta, factor, ...}` and 4.x top-level
//! `rope_theta` plus `rope_scaling: {type | rope_type, factor, ...}`.

use std::path::Path;

use mgm_tensor::nn::Activation;
use serde::Deserialize;
use serde_json::Value;

use crate::{Error, Result};

/// The decoder families this crate runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `LlamaForCausalLM` (LLaMA 1/2/3, and the LLaMA-architecture models such as Yi, Vicuna).
    Llama,
    /// `MistralForCausalLM`: LLaMA with a sliding attention window.
    Mistral,
    /// `GemmaForCausalLM`: scaled embeddings, `(1 + w)` RMSNorm, GeGLU, tied head.
    Gemma,
    /// `MixtralForCausalLM`: a top-k mixture of experts in place of the MLP.
    Mixtral,
}

/// The `architectures` names this crate loads.
pub const SUPPORTED: &[&str] = &[
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "GemmaForCausalLM",
    "MixtralForCausalLM",
];

impl Arch {
    /// The architecture of a config: `architectures[0]`, else `model_type`.
    pub fn detect(v: &Value) -> Option<Arch> {
        let by_class = |s: &str| match s {
            "LlamaForCausalLM" => Some(Arch::Llama),
            "MistralForCausalLM" => Some(Arch::Mistral),
            "GemmaForCausalLM" => Some(Arch::Gemma),
            "MixtralForCausalLM" => Some(Arch::Mixtral),
            _ => None,
        };
        let by_type = |s: &str| match s {
            "llama" => Some(Arch::Llama),
            "mistral" => Some(Arch::Mistral),
            "gemma" => Some(Arch::Gemma),
            "mixtral" => Some(Arch::Mixtral),
            _ => None,
        };
        if let Some(a) = v["architectures"].get(0).and_then(Value::as_str) {
            return by_class(a);
        }
        v["model_type"].as_str().and_then(by_type)
    }
}

/// How the rotary frequencies are derived (`rope_type`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// `inv_freq[i] = theta^(-2i / dim)`.
    Default,
    /// Positions divided by `factor` (inverse frequencies divided by it).
    Linear {
        /// The scaling factor.
        factor: f64,
    },
    /// NTK-aware: the base grows with the sequence once it exceeds `max_position_embeddings`.
    Dynamic {
        /// The scaling factor.
        factor: f64,
    },
    /// LLaMA 3.1's wavelength-dependent scaling.
    Llama3 {
        /// Scale of the low frequencies.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are scaled fully.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The pre-training context.
        original_max_position_embeddings: f64,
    },
}

/// A causal LM's hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderConfig {
    /// The family.
    pub arch: Arch,
    /// Vocabulary size (rows of the embedding and the head).
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// MLP (or each expert's) inner width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when fewer than the query heads, MQA at 1).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// The context the rotary embedding was set up for.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE frequency scaling.
    pub rope_scaling: RopeScaling,
    /// Fraction of each head's dims that rotate (1 for every supported family).
    pub partial_rotary_factor: f64,
    /// The head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// The MLP's gate activation.
    pub hidden_act: Activation,
    /// q/k/v/o projections have biases.
    pub attention_bias: bool,
    /// gate/up/down projections have biases.
    pub mlp_bias: bool,
    /// Attention window (Mistral, Mixtral): each query sees itself and the `W - 1` keys before.
    pub sliding_window: Option<usize>,
    /// Experts (Mixtral).
    pub num_local_experts: usize,
    /// Experts per token (Mixtral).
    pub num_experts_per_tok: usize,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens (`eos_token_id` may be an id or a list).
    pub eos_token_ids: Vec<u32>,
    /// Padding token.
    pub pad_token_id: Option<u32>,
}

/// The raw keys, all optional so that missing ones are reported by name.
#[derive(Deserialize, Default)]
struct Raw {
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    partial_rotary_factor: Option<f64>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<usize>,
    num_local_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    pad_token_id: Option<Value>,
}

/// Per-family defaults of transformers' config classes.
struct Defaults {
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    rope_theta: f64,
    tie_word_embeddings: bool,
    hidden_act: &'static str,
    sliding_window: Option<usize>,
}

fn defaults(arch: Arch) -> Defaults {
    match arch {
        Arch::Llama => Defaults {
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            tie_word_embeddings: false,
            hidden_act: "silu",
            sliding_window: None,
        },
        Arch::Mistral => Defaults {
            max_position_embeddings: 4096 * 32,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            tie_word_embeddings: false,
            hidden_act: "silu",
            sliding_window: Some(4096),
        },
        Arch::Gemma => Defaults {
            max_position_embeddings: 8192,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            tie_word_embeddings: true,
            hidden_act: "gelu_pytorch_tanh",
            sliding_window: None,
        },
        Arch::Mixtral => Defaults {
            max_position_embeddings: 4096 * 32,
            rms_norm_eps: 1e-5,
            rope_theta: 1e6,
            tie_word_embeddings: false,
            hidden_act: "silu",
            sliding_window: None,
        },
    }
}

/// A token id, or a list of them (only `eos_token_id` may be a list).
fn token_ids(v: &Option<Value>, key: &str, path: &str) -> Result<Vec<u32>> {
    let bad = || Error::Config {
        path: path.to_string(),
        msg: format!("key {key:?}: expected a token id or a list of token ids, got {v:?}"),
    };
    let one = |x: &Value| {
        x.as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(bad)
    };
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().map(one).collect(),
        Some(x) => Ok(vec![one(x)?]),
    }
}

impl DecoderConfig {
    /// Reads `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<DecoderConfig> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Like [`DecoderConfig::from_file`] for JSON text; `source` names it in errors.
    pub fn from_json_str(text: &str, source: &str) -> Result<DecoderConfig> {
        let err = |msg: String| Error::Config {
            path: source.to_string(),
            msg,
        };
        let v: Value =
            serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let arch = Arch::detect(&v).ok_or_else(|| {
            err(format!(
                "unsupported architecture {} / model_type {} (supported: {})",
                v["architectures"],
                v["model_type"],
                SUPPORTED.join(", ")
            ))
        })?;
        let raw: Raw =
            serde_json::from_value(v).map_err(|e| err(format!("unexpected value: {e}")))?;
        let req = |x: Option<usize>, key: &str| {
            x.ok_or_else(|| err(format!("missing required key {key:?}")))
        };
        let d = defaults(arch);
        let heads = req(raw.num_attention_heads, "num_attention_heads")?;
        let hidden = req(raw.hidden_size, "hidden_size")?;
        if heads == 0 {
            return Err(err("key \"num_attention_heads\" is 0".into()));
        }
        let head_dim = match raw.head_dim {
            Some(h) => h,
            None if hidden.is_multiple_of(heads) => hidden / heads,
            None => {
                return Err(err(format!(
                    "hidden_size {hidden} does not split into {heads} heads and \"head_dim\" is not \
                     set"
                )));
            }
        };
        let kv = raw.num_key_value_heads.unwrap_or(heads);
        if kv == 0 || !heads.is_multiple_of(kv) {
            return Err(err(format!(
                "key \"num_key_value_heads\": {kv} does not divide the {heads} query heads"
            )));
        }
        // Gemma names its activation `hidden_activation` (legacy checkpoints carry an unused
        // `hidden_act: gelu`); the others `hidden_act`.
        let act_key = if arch == Arch::Gemma {
            "hidden_activation"
        } else {
            "hidden_act"
        };
        let act_name = match arch {
            Arch::Gemma => raw.hidden_activation.clone(),
            _ => raw.hidden_act.clone(),
        }
        .unwrap_or_else(|| d.hidden_act.to_string());
        let hidden_act = Activation::from_hf_name(&act_name).ok_or_else(|| {
            err(format!(
                "key {act_key:?}: unknown activation {act_name:?} (supported: silu, gelu, \
                 gelu_pytorch_tanh, gelu_new, quick_gelu, relu)"
            ))
        })?;
        let (rope_theta, rope_scaling, partial) = rope(&raw, d.rope_theta, source)?;
        let sliding_window = match arch {
            Arch::Mistral | Arch::Mixtral => raw.sliding_window.or(d.sliding_window),
            _ => None,
        };
        if sliding_window == Some(0) {
            return Err(err("key \"sliding_window\" is 0".into()));
        }
        let experts = raw.num_local_experts.unwrap_or(8);
        let per_tok = raw.num_experts_per_tok.unwrap_or(2);
        if arch == Arch::Mixtral && (per_tok == 0 || per_tok > experts) {
            return Err(err(format!(
                "key \"num_experts_per_tok\": {per_tok} of {experts} experts"
            )));
        }
        let first = |ids: Vec<u32>| ids.first().copied();
        Ok(DecoderConfig {
            arch,
            vocab_size: req(raw.vocab_size, "vocab_size")?,
            hidden_size: hidden,
            intermediate_size: req(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers: req(raw.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            max_position_embeddings: raw
                .max_position_embeddings
                .unwrap_or(d.max_position_embeddings),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(d.rms_norm_eps),
            rope_theta,
            rope_scaling,
            partial_rotary_factor: partial,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(d.tie_word_embeddings),
            hidden_act,
            attention_bias: raw.attention_bias.unwrap_or(false),
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            sliding_window,
            num_local_experts: if arch == Arch::Mixtral { experts } else { 0 },
            num_experts_per_tok: if arch == Arch::Mixtral { per_tok } else { 0 },
            bos_token_id: first(token_ids(&raw.bos_token_id, "bos_token_id", source)?),
            eos_token_ids: token_ids(&raw.eos_token_id, "eos_token_id", source)?,
            pad_token_id: first(token_ids(&raw.pad_token_id, "pad_token_id", source)?),
        })
    }

    /// Query heads per key/value head.
    pub fn groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

/// `(rope_theta, scaling, partial_rotary_factor)` from either spelling.
fn rope(raw: &Raw, default_theta: f64, path: &str) -> Result<(f64, RopeScaling, f64)> {
    let err = |msg: String| Error::Config {
        path: path.to_string(),
        msg,
    };
    // 5.x: everything in rope_parameters; 4.x: rope_theta on top, scaling in rope_scaling
    let (params, key) = match (&raw.rope_parameters, &raw.rope_scaling) {
        (Some(p @ Value::Object(_)), _) => (Some(p), "rope_parameters"),
        (_, Some(s @ Value::Object(_))) => (Some(s), "rope_scaling"),
        _ => (None, "rope_scaling"),
    };
    let num = |name: &str| params.and_then(|p| p.get(name)).and_then(Value::as_f64);
    let theta = num("rope_theta")
        .or(raw.rope_theta)
        .unwrap_or(default_theta);
    let partial = num("partial_rotary_factor")
        .or(raw.partial_rotary_factor)
        .unwrap_or(1.0);
    let kind = params
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let factor = |k: &str| {
        num("factor").ok_or_else(|| err(format!("{key}: rope type {k:?} needs \"factor\"")))
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: factor(kind)?,
        },
        "dynamic" => RopeScaling::Dynamic {
            factor: factor(kind)?,
        },
        "llama3" => {
            let need = |name: &str| {
                num(name).ok_or_else(|| err(format!("{key}: rope type \"llama3\" needs {name:?}")))
            };
            RopeScaling::Llama3 {
                factor: factor(kind)?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_position_embeddings: need("original_max_position_embeddings")?,
            }
        }
        other => {
            return Err(err(format!(
                "{key}: rope type {other:?} is not supported (default, linear, dynamic, llama3)"
            )));
        }
    };
    if !(partial > 0.0 && partial <= 1.0) {
        return Err(err(format!(
            "partial_rotary_factor {partial} must be in (0, 1]"
        )));
    }
    Ok((theta, scaling, partial))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> String {
        format!(
            r#"{{"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
               "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2{extra}}}"#
        )
    }

    #[test]
    fn both_rope_spellings_read_the_same() {
        let v5 = DecoderConfig::from_json_str(
            &cfg(r#", "rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}"#),
            "v5",
        )
        .unwrap();
        let v4 = DecoderConfig::from_json_str(
            &cfg(r#", "rope_theta": 500.0, "rope_scaling": {"type": "linear", "factor": 2.0}"#),
            "v4",
        )
        .unwrap();
        assert_eq!(v5, v4);
        assert_eq!(v5.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        assert_eq!(v5.rope_theta, 500.0);
        assert_eq!(v5.head_dim, 4);
        assert_eq!(v5.num_key_value_heads, 2);
    }

    #[test]
    fn missing_size_key_is_named() {
        let text = r#"{"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
                       "num_hidden_layers": 1, "num_attention_heads": 2}"#;
        let e = DecoderConfig::from_json_str(text, "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cfg.json") && e.contains("\"intermediate_size\""),
            "{e}"
        );
    }

    #[test]
    fn unknown_architecture_lists_the_supported_ones() {
        let e = DecoderConfig::from_json_str(r#"{"architectures": ["GPT2LMHeadModel"]}"#, "c")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("GPT2LMHeadModel") && e.contains("MixtralForCausalLM"),
            "{e}"
        );
    }

    #[test]
    fn eos_may_be_a_list_and_bad_heads_are_errors() {
        let c = DecoderConfig::from_json_str(&cfg(r#", "eos_token_id": [2, 7]"#), "c").unwrap();
        assert_eq!(c.eos_token_ids, vec![2, 7]);
        let e = DecoderConfig::from_json_str(&cfg(r#", "num_key_value_heads": 3"#), "c")
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
    }
}
