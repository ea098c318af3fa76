//! mgm's LLaVA against transformers' LlavaForConditionalGeneration (fixtures of
//! `reference/gen_llava.py`): logits through `mgm forward`'s library call and the projected
//! image features, for a prompt with one image and one with two.

use std::path::Path;

use mgm::forward::{Model, Options};
use mgm::llava::Llava;
use mgm_tensor::safetensors::load;

use crate::{Comparison, Report};

/// Max |diff| on logits and features (DESIGN.md: 1e-4 against transformers in f32).
pub const TOL: f64 = 1e-4;

/// Compares both prompts of one fixture directory.
pub fn check(dir: &Path) -> mgm::Result<Report> {
    let case = dir.file_name().and_then(|n| n.to_str()).unwrap_or("?");
    let model = Model::load(dir, Options::default())?;
    let llava = Llava::from_dir(dir, None)?;
    let mut report = Report::default();
    for n in [1, 2] {
        let inputs = load(dir.join(format!("inputs_{n}.safetensors")))?;
        let expected = load(dir.join(format!("expected_{n}.safetensors")))?;
        let out = model.forward(&inputs)?;
        let logits = &out
            .iter()
            .find(|(k, _)| k == "logits")
            .expect("forward returns logits")
            .1;
        let want = |k: &str| -> mgm::Result<Vec<f64>> {
            Ok(expected
                .get(k)
                .ok_or_else(|| mgm_tensor::Error::TensorNotFound {
                    name: k.into(),
                    source_desc: format!("{case}/expected_{n}.safetensors"),
                })?
                .to_vec_f64()?)
        };
        report.rows.push(Comparison::max_abs(
            format!("{case} {n} image(s) logits"),
            &logits.to_vec_f64()?,
            &want("logits")?,
            TOL,
        ));
        let feats = llava.image_features(&inputs["pixel_values"])?;
        report.rows.push(Comparison::max_abs(
            format!("{case} {n} image(s) image_features"),
            &feats.to_vec_f64()?,
            &want("image_features")?,
            TOL,
        ));
    }
    Ok(report)
}
