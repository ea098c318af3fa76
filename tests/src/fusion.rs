//! mgm-fusion's patch-info mining and mlp2x_gelu projector against the independent PyTorch
//! implementation of `reference/gen_fusion.py`: forward values and the gradients of every input
//! and parameter.

use std::collections::HashMap;
use std::path::Path;

use mgm_fusion::{PatchInfoMining, Projector, ProjectorType};
use mgm_tensor::nn::VarStore;
use mgm_tensor::safetensors::load;
use mgm_tensor::{DType, Tensor, Var};

use crate::{Comparison, Report};

/// Widths of the fixture: low-res, high-res, LLM.
const DIMS: (usize, usize, usize) = (16, 24, 20);

fn get(m: &HashMap<String, Tensor>, k: &str, file: &Path) -> mgm_tensor::Result<Tensor> {
    m.get(k)
        .cloned()
        .ok_or_else(|| mgm_tensor::Error::TensorNotFound {
            name: k.to_string(),
            source_desc: file.display().to_string(),
        })
}

/// Runs mining + projector in f32 (tolerance 1e-5) and f64 (1e-10) on the fixture and compares
/// `mined`, `tokens` and every gradient of `sum(tokens * cotangent)`.
pub fn check(dir: &Path) -> mgm_fusion::Result<Report> {
    let (wf, inf, exf) = (
        dir.join("weights.safetensors"),
        dir.join("inputs.safetensors"),
        dir.join("expected.safetensors"),
    );
    let inputs = load(&inf)?;
    let expected = load(&exf)?;
    let mut report = Report::default();
    for (dtype, tag, tol) in [(DType::F32, "f32", 1e-5), (DType::F64, "f64", 1e-10)] {
        let vs = VarStore::from_safetensors(&[&wf])?
            .with_dtype(dtype)
            .trainable(0);
        let (lr, hr, llm) = DIMS;
        let mining = PatchInfoMining::load(&vs.pp("model"), lr, hr)?;
        let projector = Projector::load(
            &vs.pp("model.mm_projector"),
            ProjectorType::parse("mlp2x_gelu")?,
            lr,
            llm,
        )?;
        let x_lr = Var::from_tensor(&get(&inputs, "x_lr", &inf)?.to_dtype(dtype)?)?;
        let x_hr = Var::from_tensor(&get(&inputs, "x_hr", &inf)?.to_dtype(dtype)?)?;
        let cot = get(&inputs, "cotangent", &inf)?.to_dtype(dtype)?;
        let mined = mining.forward(&x_lr.as_tensor(), &x_hr.as_tensor())?;
        let tokens = projector.forward(&mined)?;
        let grads = tokens.mul(&cot)?.sum_all()?.backward()?;
        let mut row = |name: &str, ours: Option<&Tensor>| -> mgm_fusion::Result<()> {
            let reference = get(&expected, name, &exf)?.to_vec_f64()?;
            let ours = match ours {
                Some(t) => t.to_vec_f64()?,
                None => vec![f64::NAN; reference.len()],
            };
            report.rows.push(Comparison::new(
                format!("{tag}.{name}"),
                &ours,
                &reference,
                tol,
            ));
            Ok(())
        };
        row("mined", Some(&mined))?;
        row("tokens", Some(&tokens))?;
        row("grad.x_lr", grads.get_var(&x_lr))?;
        row("grad.x_hr", grads.get_var(&x_hr))?;
        let vars = vs.all_vars();
        for (name, var) in &vars {
            row(&format!("grad.{name}"), grads.get_var(var))?;
        }
        let params = expected
            .keys()
            .filter(|k| k.starts_with("grad.model."))
            .count();
        if vars.len() != params {
            report.rows.push(Comparison::new(
                format!(
                    "{tag}.parameter count ({} loaded, {params} in the fixture)",
                    vars.len()
                ),
                &[f64::NAN],
                &[0.0],
                0.0,
            ));
        }
    }
    Ok(report)
}
