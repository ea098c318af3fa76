//! Vision towers (CLIP ViT, ConvNeXt) against transformers/timm fixtures, through the same
//! library call `mgm forward` makes.

use std::path::{Path, PathBuf};

use mgm::forward::{Model, Options};
use mgm_tensor::DType;

use crate::{Comparison, Report};

/// Max abs diff allowed on every f32 output (issue: <= 1e-4 vs transformers).
pub const F32_TOL: f64 = 1e-4;
/// Relative Frobenius error allowed for the bf16 path.
pub const BF16_TOL: f64 = 1e-2;

/// The model fixture directories (`clip_*`, `convnext_*`), sorted.
pub fn cases(fixtures: &Path) -> Vec<PathBuf> {
    crate::model_dirs(fixtures, &["clip_", "convnext_"])
}

/// Runs one case in f32 (max abs diff per output) and bf16 (relative Frobenius per output).
pub fn check(dir: &Path) -> mgm::Result<Report> {
    let case = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("?")
        .to_string();
    let inputs = mgm_tensor::safetensors::load(dir.join("inputs.safetensors"))?;
    let expected = mgm_tensor::safetensors::load(dir.join("expected.safetensors"))?;
    let mut report = Report::default();
    for (dtype, tag) in [(DType::F32, "f32"), (DType::BF16, "bf16")] {
        let model = Model::load(
            dir,
            Options {
                dtype,
                ..Options::default()
            },
        )?;
        let outs = model.forward(&inputs)?;
        let mut names: Vec<&String> = expected.keys().collect();
        names.sort();
        for name in names {
            let want = f64s(&expected[name])?;
            let got = outs
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| f64s(t))
                .transpose()?
                .unwrap_or_default();
            let label = format!("{case} {tag} {name}");
            report.rows.push(if dtype == DType::F32 {
                Comparison::max_abs(label, &got, &want, F32_TOL)
            } else {
                frobenius(label, &got, &want, BF16_TOL)
            });
        }
        // An output we produce that the reference does not have is a naming bug.
        for (n, _) in &outs {
            if !expected.contains_key(n) {
                report.rows.push(Comparison {
                    name: format!("{case} {tag} unexpected output {n}"),
                    numel: 0,
                    max_error: f64::INFINITY,
                    tolerance: 0.0,
                });
            }
        }
    }
    Ok(report)
}

fn f64s(t: &mgm_tensor::Tensor) -> mgm_tensor::Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.to_vec::<f64>()
}

fn frobenius(name: String, got: &[f64], want: &[f64], tol: f64) -> Comparison {
    let max_error = if got.len() != want.len() {
        f64::INFINITY
    } else {
        let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
        let den: f64 = want.iter().map(|b| b * b).sum();
        let e = (num / den.max(f64::MIN_POSITIVE)).sqrt();
        if e.is_nan() { f64::INFINITY } else { e }
    };
    Comparison {
        name,
        numel: want.len(),
        max_error,
        tolerance: tol,
    }
}
