//! Resumable checkpoints: `DIR/step-N/` holds `model.safetensors` (the weights given, by name),
//! `train_only.safetensors` (trained tensors that are not part of the model, e.g. a head only
//! a pretraining objective reads; only when there are any, so that `model.safetensors` stays
//! a loadable model), `optimizer.safetensors` (each trained parameter's moments or momentum and, for bf16/f16
//! parameters, the f32 master copy) and `trainer_state.json` (the step, per-parameter step
//! counts, the groups, the loss scaler and whatever the caller adds: data and RNG positions).
//!
//! A checkpoint is written into `DIR/.step-N.tmp/` and renamed into place, then `DIR/latest`
//! (the name of the newest checkpoint) is replaced the same way: a crash or a full disk leaves
//! the previous checkpoint and `latest` as they were. Loading checks every file it reads and
//! names the one that is missing, truncated or inconsistent.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mgm_tensor::Tensor;
use serde_json::{Value, json};

use crate::optim::Optimizer;
use crate::scaler::LossScaler;
use crate::{Error, Result};

const FORMAT: &str = "mgm-train checkpoint 1";
const TRAIN_ONLY: &str = "train_only.safetensors";

/// The training loop's own state stored beside the optimizer's.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: u64,
    /// The loss scaler, when training in f16.
    pub scaler: Option<LossScaler>,
    /// Anything else the loop needs to continue exactly (RNG and data positions, metrics).
    pub extra: Value,
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::Checkpoint {
        path: path.display().to_string(),
        msg: e.to_string(),
    }
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

/// Writes a checkpoint of `weights` (the model's tensors to keep, by name), `opt` and `state`
/// as `dir/step-{state.step}` and points `dir/latest` at it; returns its path.
pub fn save(
    dir: &Path,
    weights: &[(String, Tensor)],
    opt: &Optimizer,
    state: &TrainerState,
) -> Result<PathBuf> {
    save_with_train_only(dir, weights, &[], opt, state)
}

/// [`save`], with `train_only` tensors (trained, but not part of the model) written to
/// `train_only.safetensors` beside the model's; [`load`] reads both.
pub fn save_with_train_only(
    dir: &Path,
    weights: &[(String, Tensor)],
    train_only: &[(String, Tensor)],
    opt: &Optimizer,
    state: &TrainerState,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let name = format!("step-{}", state.step);
    let tmp = dir.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    mgm_tensor::safetensors::save(
        tmp.join("model.safetensors"),
        weights.iter().map(|(n, t)| (n.as_str(), t)),
    )?;
    if !train_only.is_empty() {
        mgm_tensor::safetensors::save(
            tmp.join(TRAIN_ONLY),
            train_only.iter().map(|(n, t)| (n.as_str(), t)),
        )?;
    }
    let mut opt_tensors: Vec<(String, Tensor)> = Vec::new();
    let mut steps = serde_json::Map::new();
    for p in &opt.params {
        steps.insert(p.name.clone(), json!(p.step));
        let shape = p.var.shape();
        for (i, b) in p.bufs.iter().enumerate() {
            opt_tensors.push((
                format!("{}.buf{i}", p.name),
                Tensor::from_vec(b.clone(), &shape)?,
            ));
        }
        if let Some(m) = &p.master {
            opt_tensors.push((
                format!("{}.master", p.name),
                Tensor::from_vec(m.clone(), &shape)?,
            ));
        }
    }
    mgm_tensor::safetensors::save(
        tmp.join("optimizer.safetensors"),
        opt_tensors.iter().map(|(n, t)| (n.as_str(), t)),
    )?;
    let groups: Vec<Value> = opt
        .groups()
        .iter()
        .map(|g| {
            json!({"name": g.name, "patterns": g.patterns, "lr": g.lr, "betas": [g.betas.0, g.betas.1],
                   "eps": g.eps, "weight_decay": g.weight_decay})
        })
        .collect();
    let scaler = state.scaler.as_ref().map(|s| {
        json!({"scale": s.scale, "growth": s.growth, "backoff": s.backoff,
               "growth_interval": s.growth_interval, "clean_steps": s.clean_steps})
    });
    let meta = json!({
        "format": FORMAT, "step": state.step, "optimizer": format!("{:?}", opt.kind()),
        "groups": groups, "param_steps": steps, "scaler": scaler, "extra": state.extra,
    });
    let meta_path = tmp.join("trainer_state.json");
    std::fs::write(
        &meta_path,
        serde_json::to_string_pretty(&meta).expect("plain values"),
    )
    .map_err(|e| io_err(&meta_path, e))?;
    let fin = dir.join(&name);
    if fin.exists() {
        std::fs::remove_dir_all(&fin).map_err(|e| io_err(&fin, e))?;
    }
    std::fs::rename(&tmp, &fin).map_err(|e| io_err(&fin, e))?;
    let latest_tmp = dir.join(".latest.tmp");
    std::fs::write(&latest_tmp, &name).map_err(|e| io_err(&latest_tmp, e))?;
    std::fs::rename(&latest_tmp, dir.join("latest")).map_err(|e| io_err(&dir.join("latest"), e))?;
    Ok(fin)
}

/// The newest checkpoint under `dir` (what `dir/latest` names), if any.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    let p = dir.join("latest");
    if !p.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&p).map_err(|e| io_err(&p, e))?;
    let ckpt = dir.join(name.trim());
    if !ckpt.join("trainer_state.json").exists() {
        return Err(bad(
            &p,
            format!("names {:?}, which is not a checkpoint", name.trim()),
        ));
    }
    Ok(Some(ckpt))
}

/// The weights of a checkpoint directory: its model.safetensors and, when there is one, its
/// train_only.safetensors, by name.
pub fn load_weights(ckpt: &Path) -> Result<HashMap<String, Tensor>> {
    let mut weights = mgm_tensor::safetensors::load(ckpt.join("model.safetensors"))?;
    if ckpt.join(TRAIN_ONLY).exists() {
        for (name, t) in mgm_tensor::safetensors::load(ckpt.join(TRAIN_ONLY))? {
            if weights.insert(name.clone(), t).is_some() {
                return Err(bad(
                    &ckpt.join(TRAIN_ONLY),
                    format!("{name:?} is in model.safetensors too"),
                ));
            }
        }
    }
    Ok(weights)
}

/// Restores a checkpoint directory written by [`save`]: the trained parameters' values (from
/// its model.safetensors and train_only.safetensors), `opt`'s state, and returns the trainer
/// state with the full weight map of both files (for parameters the optimizer does not hold). The optimizer must hold the same
/// parameters as the one saved.
pub fn load(ckpt: &Path, opt: &mut Optimizer) -> Result<(TrainerState, HashMap<String, Tensor>)> {
    let meta_path = ckpt.join("trainer_state.json");
    let text = std::fs::read_to_string(&meta_path).map_err(|e| io_err(&meta_path, e))?;
    let meta: Value = serde_json::from_str(&text).map_err(|e| {
        bad(
            &meta_path,
            format!("not valid JSON ({e}): truncated or corrupt"),
        )
    })?;
    if meta["format"] != FORMAT {
        return Err(bad(
            &meta_path,
            format!("format {} is not {FORMAT:?}", meta["format"]),
        ));
    }
    let step = meta["step"]
        .as_u64()
        .ok_or_else(|| bad(&meta_path, "no \"step\""))?;
    let weights = load_weights(ckpt)?;
    let bufs = mgm_tensor::safetensors::load(ckpt.join("optimizer.safetensors"))?;
    let steps = &meta["param_steps"];
    let opt_kind = opt.kind();
    for p in &mut opt.params {
        let n = steps[&p.name].as_u64().ok_or_else(|| {
            bad(
                &meta_path,
                format!("has no step count for parameter {:?}", p.name),
            )
        })?;
        let shape = p.var.shape();
        let get = |m: &HashMap<String, Tensor>, k: &str, file: &str| -> Result<Vec<f32>> {
            let t = m
                .get(k)
                .ok_or_else(|| bad(&ckpt.join(file), format!("has no tensor {k:?}")))?;
            if t.shape() != shape.as_slice() {
                return Err(bad(
                    &ckpt.join(file),
                    format!("{k:?} is {:?}, the parameter {shape:?}", t.shape()),
                ));
            }
            crate::f32s(t)
        };
        let value = weights.get(&p.name).ok_or_else(|| {
            bad(
                &ckpt.join("model.safetensors"),
                format!("has no tensor {:?}", p.name),
            )
        })?;
        let cur = p.var.as_tensor();
        if value.shape() != cur.shape() {
            return Err(bad(
                &ckpt.join("model.safetensors"),
                format!(
                    "{:?} is {:?}, the parameter {:?}",
                    p.name,
                    value.shape(),
                    cur.shape()
                ),
            ));
        }
        p.var.set(&value.to_dtype(cur.dtype())?)?;
        p.step = n;
        // AdamW's two moments exist after the first update; SGD's buffer only with momentum
        let want = match opt_kind {
            crate::optim::Kind::AdamW if n > 0 => 2,
            _ => (0..)
                .take_while(|i| bufs.contains_key(&format!("{}.buf{i}", p.name)))
                .count(),
        };
        p.bufs = (0..want)
            .map(|i| {
                get(
                    &bufs,
                    &format!("{}.buf{i}", p.name),
                    "optimizer.safetensors",
                )
            })
            .collect::<Result<_>>()?;
        if p.master.is_some() {
            p.master = Some(get(
                &bufs,
                &format!("{}.master", p.name),
                "optimizer.safetensors",
            )?);
        }
    }
    let scaler = match &meta["scaler"] {
        Value::Null => None,
        s => Some(LossScaler {
            scale: s["scale"]
                .as_f64()
                .ok_or_else(|| bad(&meta_path, "scaler.scale"))?,
            growth: s["growth"].as_f64().unwrap_or(2.0),
            backoff: s["backoff"].as_f64().unwrap_or(0.5),
            growth_interval: s["growth_interval"].as_u64().unwrap_or(2000),
            clean_steps: s["clean_steps"].as_u64().unwrap_or(0),
        }),
    };
    Ok((
        TrainerState {
            step,
            scaler,
            extra: meta["extra"].clone(),
        },
        weights,
    ))
}
