//! Shared helpers of the kernel property tests: run a [`KernelLaunch`] through the mgm-ptx
//! executor, compare against the f64 reference with DESIGN.md section 3 tolerances, and record
//! the max error for `cargo xtask verify`'s table.
#![allow(dead_code)]

use std::io::Write;

use mgm_kernels::{KernelArg, KernelLaunch, ptx};
use mgm_ptx::{Approx, Arg, Launch, Module};

/// Number of proptest cases: small in CI, more under `cargo xtask verify` (MGM_KERNEL_CASES).
pub fn cases(default: u32) -> u32 {
    std::env::var("MGM_KERNEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs a launch on the mgm-ptx executor, modelling approximate instructions at their worst.
pub fn run_ptx(launch: KernelLaunch<'_>) -> mgm_ptx::Result<mgm_ptx::Stats> {
    run_ptx_with(launch, Approx::WorstCase)
}

/// Runs a launch on the mgm-ptx executor with the given model of approximate instructions.
pub fn run_ptx_with(launch: KernelLaunch<'_>, approx: Approx) -> mgm_ptx::Result<mgm_ptx::Stats> {
    // `cargo xtask verify` points MGM_KERNEL_PTX_DIR at mutated copies of the kernels (a bar.sync
    // deleted, a polynomial constant changed) and expects these tests to fail.
    let over = std::env::var_os("MGM_KERNEL_PTX_DIR")
        .map(|d| std::path::Path::new(&d).join(format!("{}.ptx", launch.family)))
        .filter(|p| p.exists());
    let src = match over {
        Some(p) => std::fs::read_to_string(&p).expect("mutated PTX is readable"),
        None => ptx::source(launch.family)
            .expect("family listed in ptx::SOURCES")
            .to_string(),
    };
    let module = Module::parse(&src)?;
    let mut args: Vec<Arg<'_>> = launch
        .args
        .into_iter()
        .map(|a| match a {
            KernelArg::In(s) => Arg::In(s),
            KernelArg::Out(s) => Arg::Out(s),
            KernelArg::U32(v) => Arg::U32(v),
            KernelArg::I32(v) => Arg::I32(v),
            KernelArg::F32(v) => Arg::F32(v),
        })
        .collect();
    let l = Launch {
        grid: launch.dims.grid,
        block: launch.dims.block,
        shared_bytes: launch.dims.shared_bytes,
        approx,
    };
    mgm_ptx::run(&module, launch.entry, &l, &mut args)
}

/// Elementwise check `|got - ref| <= tol * (1 + |ref|)`; NaN never passes. Returns the max of
/// `|got - ref| / (1 + |ref|)` or an error message naming the first bad index.
pub fn check_elementwise(
    what: &str,
    got: &[f32],
    reference: &[f64],
    tol: f64,
) -> Result<f64, String> {
    assert_eq!(got.len(), reference.len(), "{what}: length");
    let mut worst = 0f64;
    for (i, (&g, &r)) in got.iter().zip(reference).enumerate() {
        let e = (g as f64 - r).abs() / (1.0 + r.abs());
        if e.is_nan() || e > tol {
            return Err(format!(
                "{what}: index {i}: got {g}, reference {r}, error {e:.3e} > {tol:.0e}"
            ));
        }
        worst = worst.max(e);
    }
    Ok(worst)
}

/// Relative Frobenius error `||got - ref|| / ||ref||` (matmul/attention tolerance); NaN fails.
pub fn check_frobenius(
    what: &str,
    got: &[f32],
    reference: &[f64],
    tol: f64,
) -> Result<f64, String> {
    assert_eq!(got.len(), reference.len(), "{what}: length");
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &r) in got.iter().zip(reference) {
        num += (g as f64 - r).powi(2);
        den += r * r;
    }
    let e = num.sqrt() / den.sqrt().max(f64::MIN_POSITIVE);
    if e <= tol || (num == 0.0) {
        Ok(if num == 0.0 { 0.0 } else { e })
    } else {
        Err(format!(
            "{what}: relative Frobenius error {e:.3e} > {tol:.0e}"
        ))
    }
}

/// Appends `{kernel, path, max_error, cases}` as one JSON line to `$MGM_KERNEL_REPORT` (set by
/// `cargo xtask verify`); does nothing otherwise.
pub fn record(kernel: &str, path: &str, max_error: f64) {
    let Ok(file) = std::env::var("MGM_KERNEL_REPORT") else {
        return;
    };
    let line = serde_json::json!({ "kernel": kernel, "path": path, "max_error": max_error });
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file)
        .expect("MGM_KERNEL_REPORT is writable");
    // One write per line: tests run on parallel threads and O_APPEND keeps a single write whole.
    f.write_all(format!("{line}\n").as_bytes())
        .expect("write report line");
}
