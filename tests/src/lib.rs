//! Conformance checks of mgm-rs against reference fixtures made by PyTorch.
//!
//! The checks live in this library so that both the test suite and `cargo xtask verify` run the
//! same comparison and report the same numbers.
//!
//! ```no_run
//! let dir = mgm_tests::fixtures_dir().join("tensor_composite");
//! let report = mgm_tests::tensor_composite::check(&dir).unwrap();
//! assert!(report.worst_error() <= 1e-5);
//! ```

pub mod fusion;
pub mod llava;
pub mod llm;
pub mod mgm;
pub mod tensor_composite;
pub mod vision;

use std::path::{Path, PathBuf};

/// The committed fixtures directory (`tests/fixtures`).
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The model fixture directories under `fixtures` whose name starts with one of `prefixes`
/// and that hold a config.json, sorted.
pub fn model_dirs(fixtures: &Path, prefixes: &[&str]) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.retain(|p| {
        let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        prefixes.iter().any(|pre| n.starts_with(pre)) && p.join("config.json").exists()
    });
    v.sort();
    v
}

/// One compared quantity: its name, the worst error and the tolerance it must meet.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// What was compared, e.g. `f32.grad.conv_w`.
    pub name: String,
    /// Number of elements compared.
    pub numel: usize,
    /// max |ours - ref| / (1 + |ref|) over the elements (infinite if any NaN).
    pub max_error: f64,
    /// The tolerance the comparison must meet.
    pub tolerance: f64,
}

impl Comparison {
    /// Compares `ours` with `reference` elementwise: max |ours - ref| / (1 + |ref|).
    pub fn new(
        name: impl Into<String>,
        ours: &[f64],
        reference: &[f64],
        tolerance: f64,
    ) -> Comparison {
        Self::by(name, ours, reference, tolerance, |a, r| {
            (a - r).abs() / (1.0 + r.abs())
        })
    }

    /// Compares by max |ours - ref| (the tolerance of logits against transformers).
    pub fn max_abs(
        name: impl Into<String>,
        ours: &[f64],
        reference: &[f64],
        tolerance: f64,
    ) -> Comparison {
        Self::by(name, ours, reference, tolerance, |a, r| (a - r).abs())
    }

    /// The largest `err(ours, ref)`; a length mismatch or a NaN is an infinite error.
    fn by(
        name: impl Into<String>,
        ours: &[f64],
        reference: &[f64],
        tolerance: f64,
        err: impl Fn(f64, f64) -> f64,
    ) -> Comparison {
        let max_error = if ours.len() != reference.len() {
            f64::INFINITY
        } else {
            ours.iter().zip(reference).fold(0.0f64, |m, (&a, &r)| {
                let e = err(a, r);
                if e.is_nan() { f64::INFINITY } else { m.max(e) }
            })
        };
        Comparison {
            name: name.into(),
            numel: reference.len(),
            max_error,
            tolerance,
        }
    }

    /// True when the error is within tolerance.
    pub fn passed(&self) -> bool {
        self.max_error <= self.tolerance
    }
}

/// All comparisons of one fixture.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The comparisons in order.
    pub rows: Vec<Comparison>,
}

impl Report {
    /// The largest error relative to its tolerance's scale (the worst row's error).
    pub fn worst_error(&self) -> f64 {
        self.rows.iter().map(|r| r.max_error).fold(0.0, f64::max)
    }

    /// Rows that failed their tolerance.
    pub fn failures(&self) -> Vec<&Comparison> {
        self.rows.iter().filter(|r| !r.passed()).collect()
    }

    /// A plain-text table: name | elements | max error | tolerance | ok.
    pub fn table(&self) -> String {
        let w = self
            .rows
            .iter()
            .map(|r| r.name.len())
            .max()
            .unwrap_or(0)
            .max(24);
        let mut s = format!(
            "{:<w$} {:>8} {:>12} {:>10}  ok\n",
            "quantity", "numel", "max error", "tolerance"
        );
        for r in &self.rows {
            s.push_str(&format!(
                "{:<w$} {:>8} {:>12.3e} {:>10.0e}  {}\n",
                r.name,
                r.numel,
                r.max_error,
                r.tolerance,
                if r.passed() { "yes" } else { "NO" }
            ));
        }
        s
    }
}
