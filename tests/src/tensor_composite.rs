//! The composite expression of `reference/gen_tensor_composite.py`, rebuilt with mgm-tensor ops,
//! with forward values and every input's gradient compared against PyTorch.

use std::collections::HashMap;
use std::path::Path;

use mgm_tensor::safetensors::load;
use mgm_tensor::{Conv2dParams, DType, Result, Tensor, Var};

use crate::{Comparison, Report};

const PARAMS: [&str; 9] = [
    "x", "conv_w", "conv_b", "ln_w", "ln_b", "w1", "b1", "rms_w", "w2",
];

/// Evaluates the expression; returns (loss, logits, hidden).
fn composite(p: &HashMap<&str, Tensor>, targets: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let conv = Conv2dParams {
        stride: (1, 2),
        padding: (1, 1),
        ..Default::default()
    };
    let h = p["x"].conv2d(&p["conv_w"], Some(&p["conv_b"]), conv)?;
    let h = h.upsample_bilinear2d(6, 6, false)?;
    let h = h.flatten(2, 3)?.transpose(1, 2)?;
    let h = h.layer_norm(Some(&p["ln_w"]), Some(&p["ln_b"]), 1e-5)?;
    let h = h.matmul(&p["w1"])?.add(&p["b1"])?.gelu()?;
    let d = *h.shape().last().expect("hidden has a last dim") as f64;
    let scores = h.matmul(&h.t()?)?.mul_scalar(1.0 / d.sqrt())?;
    let h = scores.softmax(-1)?.matmul(&h)?;
    let h = h.rms_norm(Some(&p["rms_w"]), 1e-6)?.gelu_tanh()?;
    let logits = h.mean(1, false)?.matmul(&p["w2"])?;
    let loss = logits.cross_entropy(targets, -100, 0.0)?;
    Ok((loss, logits, h))
}

/// Runs the expression in f32 and f64 on the fixture's inputs and compares forward values and
/// gradients with PyTorch's (f32: 1e-5, f64: 1e-10, elementwise relative to 1 + |ref|).
pub fn check(dir: &Path) -> Result<Report> {
    let inputs = load(dir.join("inputs.safetensors"))?;
    let expected = load(dir.join("expected.safetensors"))?;
    let get = |m: &HashMap<String, Tensor>, k: &str, file: &str| -> Result<Tensor> {
        m.get(k)
            .cloned()
            .ok_or_else(|| mgm_tensor::Error::TensorNotFound {
                name: k.to_string(),
                source_desc: dir.join(file).display().to_string(),
            })
    };
    let targets = get(&inputs, "targets", "inputs.safetensors")?;
    let mut report = Report::default();
    for (dtype, tag, tol) in [(DType::F32, "f32", 1e-5), (DType::F64, "f64", 1e-10)] {
        let vars: Vec<Var> = PARAMS
            .iter()
            .map(|k| Var::from_tensor(&get(&inputs, k, "inputs.safetensors")?.to_dtype(dtype)?))
            .collect::<Result<_>>()?;
        let p: HashMap<&str, Tensor> = PARAMS
            .iter()
            .copied()
            .zip(vars.iter().map(Var::as_tensor))
            .collect();
        let (loss, logits, hidden) = composite(&p, &targets)?;
        let grads = loss.backward()?;
        for (name, ours) in [("loss", &loss), ("logits", &logits), ("hidden", &hidden)] {
            let key = format!("{tag}.{name}");
            let reference = get(&expected, &key, "expected.safetensors")?.to_vec_f64()?;
            report
                .rows
                .push(Comparison::new(key, &ours.to_vec_f64()?, &reference, tol));
        }
        for (k, v) in PARAMS.iter().zip(&vars) {
            let key = format!("{tag}.grad.{k}");
            let reference = get(&expected, &key, "expected.safetensors")?.to_vec_f64()?;
            let ours = match grads.get_var(v) {
                Some(g) => g.to_vec_f64()?,
                None => vec![f64::NAN; reference.len()],
            };
            report
                .rows
                .push(Comparison::new(key, &ours, &reference, tol));
        }
    }
    Ok(report)
}
