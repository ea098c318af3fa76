//! The conformance runner: a transformers-layout model directory in, named outputs out.

use std::collections::HashMap;
use std::path::Path;

use mgm_tensor::nn::VarStore;
use mgm_tensor::{DType, Tensor};
use mgm_vision::clip::{ClipVisionConfig, ClipVisionModel};
use mgm_vision::convnext::{ConvNextConfig, ConvNextModel};

use crate::{Error, Result};

/// Architectures `mgm forward` runs, as spelled in config.json's `architectures`.
pub const SUPPORTED: &[&str] = &["CLIPVisionModel", "ConvNextModel"];

/// How to load a model.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Weight and matmul dtype: F32 or BF16 (norms and softmax run in f32).
    pub dtype: DType,
}

impl Default for Options {
    fn default() -> Self {
        Options { dtype: DType::F32 }
    }
}

enum Arch {
    Clip(Box<ClipVisionModel>),
    ConvNext(Box<ConvNextModel>),
}

/// A loaded model of one of the [`SUPPORTED`] architectures.
pub struct Model {
    arch: Arch,
}

/// `architectures[0]`, else the class transformers maps `model_type` to.
fn architecture(config_path: &Path) -> Result<String> {
    let path = config_path.display().to_string();
    let text = std::fs::read_to_string(config_path).map_err(|e| Error::Config {
        path: path.clone(),
        msg: format!("cannot read: {e}"),
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.clone(),
        msg: format!("not valid JSON: {e}"),
    })?;
    if let Some(a) = v["architectures"].get(0).and_then(|a| a.as_str()) {
        return Ok(a.to_string());
    }
    match v["model_type"].as_str() {
        Some("clip_vision_model") => Ok("CLIPVisionModel".into()),
        Some("convnext") => Ok("ConvNextModel".into()),
        Some(other) => Ok(other.to_string()),
        None => Err(Error::Config {
            path,
            msg: "neither `architectures` nor `model_type` is set".into(),
        }),
    }
}

/// The weights of a model directory: model.safetensors or a sharded index.
fn weights(dir: &Path) -> Result<VarStore> {
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
        match self.arch {
            Arch::Clip(_) => "CLIPVisionModel",
            Arch::ConvNext(_) => "ConvNextModel",
        }
    }

    /// Runs the model; outputs in transformers' order and names (`last_hidden_state`,
    /// `pooler_output`, `hidden_states.0` ..), all f32.
    pub fn forward(&self, inputs: &HashMap<String, Tensor>) -> Result<Vec<(String, Tensor)>> {
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
