//! mgm's Mini-Gemini against the independent PyTorch implementation of `reference/gen_mgm.py`:
//! logits over the spliced sequence (low-res input given and derived from the high-res one),
//! the image tokens, and the gradients of the mining layers; normal and HD.

use std::path::Path;

use mgm::minigemini::{Mgm, TowerDirs};
use mgm_tensor::Var;
use mgm_tensor::safetensors::load;

use crate::{Comparison, Report};

/// Max |diff| against the reference (DESIGN.md: 1e-4 on logits of tiny models in f32).
pub const TOL: f64 = 1e-4;
/// Gradients: max |diff| / (1 + |ref|).
pub const GRAD_TOL: f64 = 1e-5;

/// Compares one fixture directory.
pub fn check(dir: &Path) -> mgm::Result<Report> {
    let case = dir.file_name().and_then(|n| n.to_str()).unwrap_or("?");
    let model = Mgm::from_dir(dir, &TowerDirs::default(), None)?;
    let mut report = Report::default();
    let get = |m: &std::collections::HashMap<String, mgm_tensor::Tensor>, k: &str, f: &str| {
        m.get(k)
            .cloned()
            .ok_or_else(|| mgm_tensor::Error::TensorNotFound {
                name: k.into(),
                source_desc: format!("{case}/{f}"),
            })
    };
    for n in [1, 2] {
        let (fi, fe) = (
            format!("inputs_{n}.safetensors"),
            format!("expected_{n}.safetensors"),
        );
        let inputs = load(dir.join(&fi))?;
        let expected = load(dir.join(&fe))?;
        let ids = get(&inputs, "input_ids", &fi)?;
        let aux = get(&inputs, "pixel_values_aux", &fi)?;
        let low = get(&inputs, "pixel_values", &fi)?;
        for (tag, given, key) in [
            ("given", Some(&low), "logits"),
            ("derived", None, "logits_derived"),
        ] {
            let logits = model.forward(&ids, Some(&aux), given)?;
            report.rows.push(Comparison::max_abs(
                format!("{case} {n} image(s) {key} (low-res {tag})"),
                &logits.to_vec_f64()?,
                &get(&expected, key, &fe)?.to_vec_f64()?,
                TOL,
            ));
        }
        let toks = model.image_tokens(&aux, Some(&low))?;
        report.rows.push(Comparison::max_abs(
            format!("{case} {n} image(s) image_tokens"),
            &toks.to_vec_f64()?,
            &get(&expected, "image_tokens", &fe)?.to_vec_f64()?,
            TOL,
        ));
    }
    // gradients of the mining layers, the towers and decoder frozen (the two-image inputs)
    let inputs = load(dir.join("inputs_2.safetensors"))?;
    let grads_ref = load(dir.join("grads.safetensors"))?;
    let train = Mgm::from_dir_train_fusion(dir, &TowerDirs::default())?;
    let cot = get(&grads_ref, "cotangent", "grads.safetensors")?;
    let toks = train.image_tokens(&inputs["pixel_values_aux"], Some(&inputs["pixel_values"]))?;
    let grads = toks.mul(&cot)?.sum_all()?.backward()?;
    let vars: Vec<(String, Var)> = train
        .fusion_vars()
        .into_iter()
        .filter(|(n, _)| n.contains("vlm_uni"))
        .collect();
    for (name, var) in &vars {
        let key = format!("grad.{name}");
        let want = get(&grads_ref, &key, "grads.safetensors")?.to_vec_f64()?;
        let got = match grads.get_var(var) {
            Some(g) => g.to_vec_f64()?,
            None => vec![f64::NAN; want.len()],
        };
        report.rows.push(Comparison::new(
            format!("{case} {key}"),
            &got,
            &want,
            GRAD_TOL,
        ));
    }
    Ok(report)
}
