//! The conformance runner: a transformers-layout model directory in, named outputs out.

use std::collections::HashMap;
use std::path::Path;

use mgm_llm::{CausalLm, Positions};
use mgm_tensor::nn::VarStore;
use mgm_tensor::{DType, Tensor};
use mgm_vision::clip::{ClipVisionConfig, ClipVisionModel};
use mgm_vision::convnext::{ConvNextConfig, ConvNextModel};

use crate::{Error, Result};

/// Architectures `mgm forward` runs, as spelled in config.json's `architectures`.
pub const SUPPORTED: &[&str] = &[
    "CLIPVisionModel",
    "ConvNextModel",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "GemmaForCausalLM",
    "MixtralForCausalLM",
    "LlavaForConditionalGeneration",
    "MGMLlamaForCausalLM",
    "MGMGemmaForCausalLM",
    "MGMMixtralForCausalLM",
    "MGMMistralForCausalLM",
];

/// How to load a model.
#[derive(Clone, Debug)]
pub struct Options {
    /// Weight and matmul dtype: F32 or BF16 (norms and softmax run in f32).
    pub dtype: DType,
    /// Quantize a causal LM's projections at load (weight-only; None: as stored).
    pub quant: Option<mgm_llm::QuantFormat>,
    /// An MGM model's tower directories, instead of the config's.
    pub towers: crate::minigemini::TowerDirs,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            dtype: DType::F32,
            quant: None,
            towers: Default::default(),
        }
    }
}

enum Arch {
    Clip(Box<ClipVisionModel>),
    ConvNext(Box<ConvNextModel>),
    CausalLm(Box<CausalLm>),
    Llava(Box<crate::llava::Llava>),
    Mgm(Box<crate::minigemini::Mgm>),
}

/// A loaded model of one of the [`SUPPORTED`] architectures.
pub struct Model {
    arch: Arch,
}

/// `architectures[0]` of a config.json, else the class transformers maps `model_type` to.
pub fn architecture(config_path: &Path) -> Result<String> {
    let (v, path) = read_config(config_path)?;
    if let Some(a) = v["architectures"].get(0).and_then(|a| a.as_str()) {
        return Ok(a.to_string());
    }
    match v["model_type"].as_str() {
        Some("clip_vision_model") => Ok("CLIPVisionModel".into()),
        Some("convnext") => Ok("ConvNextModel".into()),
        Some("llama") => Ok("LlamaForCausalLM".into()),
        Some("mistral") => Ok("MistralForCausalLM".into()),
        Some("gemma") => Ok("GemmaForCausalLM".into()),
        Some("mixtral") => Ok("MixtralForCausalLM".into()),
        Some("llava") => Ok("LlavaForConditionalGeneration".into()),
        Some("mgm") => Ok("MGMLlamaForCausalLM".into()),
        Some("mgm_gemma") => Ok("MGMGemmaForCausalLM".into()),
        Some("mgm_mixtral") => Ok("MGMMixtralForCausalLM".into()),
        Some("mgm_mistral") => Ok("MGMMistralForCausalLM".into()),
        Some(other) => Ok(other.to_string()),
        None => Err(Error::Config {
            path,
            msg: "neither `architectures` nor `model_type` is set".into(),
        }),
    }
}

/// A config.json as JSON, and its path for error messages.
pub(crate) fn read_config(config_path: &Path) -> Result<(serde_json::Value, String)> {
    let path = config_path.display().to_string();
    let text = std::fs::read_to_string(config_path).map_err(|e| Error::Config {
        path: path.clone(),
        msg: format!("cannot read: {e}"),
    })?;
    let v = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.clone(),
        msg: format!("not valid JSON: {e}"),
    })?;
    Ok((v, path))
}

/// The weights of a model directory: model.safetensors or a sharded index.
pub(crate) fn weights(dir: &Path) -> Result<VarStore> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        return Ok(VarStore::from_safetensors_index(&index)?);
    }
    Ok(VarStore::from_safetensors(
        &[dir.join("model.safetensors")],
    )?)
}

/// `pixel_values`: present, f32, rank 4 with 3 channels.
fn pixel_values(inputs: &HashMap<String, Tensor>) -> Result<&Tensor> {
    let err = |msg: String| Error::Input {
        name: "pixel_values".into(),
        msg,
    };
    let t = inputs
        .get("pixel_values")
        .ok_or_else(|| err("missing from the inputs file".into()))?;
    if t.dtype() != DType::F32 {
        return Err(err(format!("dtype {:?}, expected f32", t.dtype())));
    }
    if t.rank() != 4 || t.shape()[1] != 3 {
        return Err(err(format!(
            "shape {:?}, expected [batch, 3, height, width]",
            t.shape()
        )));
    }
    Ok(t)
}

impl Model {
    /// Loads `dir/config.json` and the weights; an unknown architecture lists the supported ones.
    pub fn load(dir: &Path, options: Options) -> Result<Model> {
        let config_path = dir.join("config.json");
        let arch = architecture(&config_path)?;
        let is_lm = arch.ends_with("ForCausalLM") || arch == "LlavaForConditionalGeneration";
        if let (Some(f), false) = (options.quant, is_lm) {
            return Err(Error::Config {
                path: config_path.display().to_string(),
                msg: format!(
                    "--quant {} applies to causal LMs; {arch} runs in f32 or bf16",
                    f.name()
                ),
            });
        }
        let arch = match arch.as_str() {
            "CLIPVisionModel" => {
                let cfg = ClipVisionConfig::from_file(&config_path)?;
                let vs = weights(dir)?.with_dtype(options.dtype);
                Arch::Clip(Box::new(ClipVisionModel::load(&vs, &cfg)?))
            }
            "ConvNextModel" => {
                let cfg = ConvNextConfig::from_file(&config_path)?;
                Arch::ConvNext(Box::new(ConvNextModel::load(
                    &weights(dir)?,
                    &cfg,
                    options.dtype,
                )?))
            }
            "LlamaForCausalLM" | "MistralForCausalLM" | "GemmaForCausalLM"
            | "MixtralForCausalLM" => {
                if options.dtype != DType::F32 {
                    return Err(Error::Config {
                        path: config_path.display().to_string(),
                        msg: format!(
                            "causal LMs run in f32 (weights may be quantized with --quant), not \
                             {:?}",
                            options.dtype
                        ),
                    });
                }
                let m = CausalLm::from_dir(dir)?;
                Arch::CausalLm(Box::new(match options.quant {
                    Some(f) => m.quantize(f)?,
                    None => m,
                }))
            }
            "LlavaForConditionalGeneration" => {
                if options.dtype != DType::F32 {
                    return Err(Error::Config {
                        path: config_path.display().to_string(),
                        msg: format!(
                            "LLaVA runs in f32 (with --quant for its LM), not {:?}",
                            options.dtype
                        ),
                    });
                }
                Arch::Llava(Box::new(crate::llava::Llava::from_dir(dir, options.quant)?))
            }
            a if a.starts_with("MGM") && a.ends_with("ForCausalLM") => {
                if options.dtype != DType::F32 {
                    return Err(Error::Config {
                        path: config_path.display().to_string(),
                        msg: format!(
                            "MGM runs in f32 (with --quant for its LM), not {:?}",
                            options.dtype
                        ),
                    });
                }
                Arch::Mgm(Box::new(crate::minigemini::Mgm::from_dir(
                    dir,
                    &options.towers,
                    options.quant,
                )?))
            }
            _ => {
                return Err(Error::UnsupportedArchitecture {
                    path: config_path.display().to_string(),
                    arch,
                    supported: SUPPORTED.join(", "),
                });
            }
        };
        Ok(Model { arch })
    }

    /// The architecture's transformers class name.
    pub fn architecture(&self) -> &'static str {
        match &self.arch {
            Arch::Clip(_) => "CLIPVisionModel",
            Arch::ConvNext(_) => "ConvNextModel",
            Arch::CausalLm(m) => match m.config().arch {
                mgm_llm::Arch::Llama => "LlamaForCausalLM",
                mgm_llm::Arch::Mistral => "MistralForCausalLM",
                mgm_llm::Arch::Gemma => "GemmaForCausalLM",
                mgm_llm::Arch::Mixtral => "MixtralForCausalLM",
            },
            Arch::Llava(_) => "LlavaForConditionalGeneration",
            Arch::Mgm(m) => match m.config().backbone {
                mgm_llm::Arch::Llama => "MGMLlamaForCausalLM",
                mgm_llm::Arch::Mistral => "MGMMistralForCausalLM",
                mgm_llm::Arch::Gemma => "MGMGemmaForCausalLM",
                mgm_llm::Arch::Mixtral => "MGMMixtralForCausalLM",
            },
        }
    }

    /// Runs the model; outputs in transformers' order and names (`last_hidden_state`,
    /// `pooler_output`, `hidden_states.0` ..), all f32.
    pub fn forward(&self, inputs: &HashMap<String, Tensor>) -> Result<Vec<(String, Tensor)>> {
        if let Arch::CausalLm(m) = &self.arch {
            return causal_lm_forward(m, inputs);
        }
        if let Arch::Llava(m) = &self.arch {
            let ids = ids_input(inputs, "input_ids", None)?.ok_or_else(|| Error::Input {
                name: "input_ids".into(),
                msg: "missing from the inputs file".into(),
            })?;
            let pixels = match inputs.get("pixel_values") {
                Some(_) => Some(pixel_values(inputs)?),
                None => None,
            };
            let mask = ids_input(inputs, "attention_mask", Some(ids.shape()))?;
            // as transformers without position_ids: positions 0..T, padded keys masked
            let pos = mask
                .map(|mk| -> Result<Positions> {
                    let (b, t) = (ids.shape()[0], ids.shape()[1]);
                    Ok(Positions {
                        ids: (0..b).flat_map(|_| 0..t).collect(),
                        valid: mk.to_vec::<i64>()?.iter().map(|&v| v != 0).collect(),
                    })
                })
                .transpose()?;
            let logits = m.forward(ids, pixels, pos.as_ref())?;
            return Ok(vec![("logits".to_string(), logits)]);
        }
        if let Arch::Mgm(m) = &self.arch {
            // -200 placeholders are no token ids, so the ids are read without ids_input's checks
            let ids = inputs.get("input_ids").ok_or_else(|| Error::Input {
                name: "input_ids".into(),
                msg: "missing from the inputs file".into(),
            })?;
            let aux = inputs.get("pixel_values_aux");
            let ids_have_images = ids.dtype() == DType::I64
                && ids
                    .to_vec::<i64>()?
                    .contains(&crate::minigemini::IMAGE_TOKEN_INDEX);
            if aux.is_none() && ids_have_images {
                return Err(Error::Input {
                    name: "pixel_values_aux".into(),
                    msg: "missing from the inputs file (MGM needs the normalized high-res images)"
                        .into(),
                });
            }
            let logits = m.forward(ids, aux, inputs.get("pixel_values"))?;
            return Ok(vec![("logits".to_string(), logits)]);
        }
        let x = pixel_values(inputs)?;
        let (last, pooled, hidden) = match &self.arch {
            Arch::Clip(m) => {
                let o = m.forward(x)?;
                (o.last_hidden_state, Some(o.pooler_output), o.hidden_states)
            }
            Arch::ConvNext(m) => {
                let o = m.forward(x)?;
                (o.last_hidden_state, o.pooler_output, o.hidden_states)
            }
            Arch::CausalLm(_) | Arch::Llava(_) | Arch::Mgm(_) => unreachable!("returned above"),
        };
        let f32 = |t: Tensor| t.to_dtype(DType::F32);
        let mut out = vec![("last_hidden_state".to_string(), f32(last)?)];
        if let Some(p) = pooled {
            out.push(("pooler_output".to_string(), f32(p)?));
        }
        for (i, h) in hidden.into_iter().enumerate() {
            out.push((format!("hidden_states.{i}"), f32(h)?));
        }
        Ok(out)
    }
}

/// An i64 `[B, T]` input, or `None` when absent and optional.
fn ids_input<'a>(
    inputs: &'a HashMap<String, Tensor>,
    name: &str,
    shape: Option<&[usize]>,
) -> Result<Option<&'a Tensor>> {
    let Some(t) = inputs.get(name) else {
        return Ok(None);
    };
    let err = |msg: String| Error::Input {
        name: name.into(),
        msg,
    };
    if t.dtype() != DType::I64 {
        return Err(err(format!("dtype {:?}, expected i64", t.dtype())));
    }
    if t.rank() != 2 {
        return Err(err(format!("shape {:?}, expected [batch, seq]", t.shape())));
    }
    if let Some(s) = shape
        && t.shape() != s
    {
        return Err(err(format!(
            "shape {:?}, expected {s:?} like input_ids",
            t.shape()
        )));
    }
    Ok(Some(t))
}

/// `logits` of `input_ids` (optional `attention_mask`, `position_ids`), like
/// `model(input_ids, attention_mask=..., position_ids=...)`.
fn causal_lm_forward(
    m: &CausalLm,
    inputs: &HashMap<String, Tensor>,
) -> Result<Vec<(String, Tensor)>> {
    let ids = ids_input(inputs, "input_ids", None)?.ok_or_else(|| Error::Input {
        name: "input_ids".into(),
        msg: "missing from the inputs file".into(),
    })?;
    let shape = ids.shape().to_vec();
    let (b, t) = (shape[0], shape[1]);
    let mask = ids_input(inputs, "attention_mask", Some(&shape))?;
    let positions = ids_input(inputs, "position_ids", Some(&shape))?;
    let valid: Vec<bool> = match mask {
        Some(mk) => mk.to_vec::<i64>()?.iter().map(|&v| v != 0).collect(),
        None => vec![true; b * t],
    };
    let pos_ids: Vec<usize> = match positions {
        Some(p) => p
            .to_vec::<i64>()?
            .into_iter()
            .map(|v| {
                usize::try_from(v).map_err(|_| Error::Input {
                    name: "position_ids".into(),
                    msg: format!("negative position {v}"),
                })
            })
            .collect::<Result<_>>()?,
        None => (0..b).flat_map(|_| 0..t).collect(),
    };
    let pos = Positions {
        ids: pos_ids,
        valid,
    };
    let logits = m.forward(ids, Some(&pos))?;
    Ok(vec![("logits".to_string(), logits)])
}
