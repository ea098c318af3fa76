//! The kernel half of `cargo xtask verify`: property tests with more cases, the max-error table,
//! a mutation sweep over the PTX, and the GPU run when a driver is present.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::kernels::ptx_files;
use crate::workspace_root;

/// Proptest cases per property under verify (CI runs the tests' own, smaller defaults).
const VERIFY_CASES: &str = "64";

fn cargo() -> Command {
    let mut c = Command::new(env!("CARGO"));
    c.current_dir(workspace_root());
    c
}

fn family(file: &Path) -> String {
    file.file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string()
}

/// Runs the kernel property tests with a report file and prints max error per kernel and path.
pub fn property_tests() -> Result<()> {
    let reports = workspace_root().join("target/reports");
    std::fs::create_dir_all(&reports)?;
    let report = reports.join("kernel_verify.jsonl");
    let _ = std::fs::remove_file(&report);
    println!(
        "\nmgm-kernels property tests (PTX on the mgm-ptx executor and fast CPU, vs the f64 reference):"
    );
    let status = cargo()
        .args(["test", "-p", "mgm-kernels", "--release", "--tests"])
        .env("MGM_KERNEL_REPORT", &report)
        .env("MGM_KERNEL_CASES", VERIFY_CASES)
        .status()
        .context("running cargo test")?;
    let table = error_table(&report)?;
    print!("{table}");
    if !status.success() {
        bail!("kernel property tests failed ({status})");
    }
    Ok(())
}

fn error_table(report: &Path) -> Result<String> {
    let text = std::fs::read_to_string(report).unwrap_or_default();
    let mut worst: BTreeMap<(String, String), (f64, usize)> = BTreeMap::new();
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).context("parsing the kernel report")?;
        let key = (
            v["kernel"].as_str().unwrap_or("?").to_string(),
            v["path"].as_str().unwrap_or("?").to_string(),
        );
        let e = v["max_error"].as_f64().unwrap_or(f64::NAN);
        let w = worst.entry(key).or_insert((0.0, 0));
        w.0 = if e.is_nan() { f64::NAN } else { w.0.max(e) };
        w.1 += 1;
    }
    let mut s = String::from("| kernel | path | cases | max error |\n|---|---|---:|---:|\n");
    for ((k, p), (e, n)) in &worst {
        s += &format!("| {k} | {p} | {n} | {e:.2e} |\n");
    }
    Ok(s)
}

/// A mutated copy of one kernel file and what was changed.
struct Mutant {
    family: String,
    what: String,
    source: String,
}

fn is_code(line: &str) -> bool {
    let t = line.trim_start();
    !(t.starts_with("//") || t.starts_with('*') || t.starts_with("/*"))
}

/// One mutant per `bar.sync` (deleted) and per `// poly` constant (scaled by 1.01).
fn mutants(file: &Path) -> Result<Vec<Mutant>> {
    let src = std::fs::read_to_string(file)?;
    let fam = family(file);
    let lines: Vec<&str> = src.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let code = line.split("//").next().unwrap_or_default();
        let edit = if is_code(line) && (code.contains("bar.sync") || code.contains("barrier.sync"))
        {
            Some((
                "deleted bar.sync".to_string(),
                "// (mutant: bar.sync deleted)".to_string(),
            ))
        } else if is_code(line) && line.contains("// poly") {
            scale_constant(line).map(|l| ("poly constant x1.01".to_string(), l))
        } else {
            None
        };
        if let Some((what, new_line)) = edit {
            let mut m = lines.clone();
            m[i] = &new_line;
            out.push(Mutant {
                family: fam.clone(),
                what: format!("line {}: {what}", i + 1),
                source: m.join("\n") + "\n",
            });
        }
    }
    Ok(out)
}

/// Multiplies the first float immediate of the line (PTX `0fXXXXXXXX` or decimal) by 1.01.
fn scale_constant(line: &str) -> Option<String> {
    let code_end = line.find("//").unwrap_or(line.len());
    let code = &line[..code_end];
    if let Some(p) = code.find("0f").or_else(|| code.find("0F")) {
        let hex = code.get(p + 2..p + 10)?;
        let bits = u32::from_str_radix(hex, 16).ok()?;
        let v = f32::from_bits(bits) * 1.01;
        return Some(format!(
            "{}0f{:08X}{}",
            &line[..p],
            v.to_bits(),
            &line[p + 10..]
        ));
    }
    // A decimal literal: the first token that parses as a float and contains a '.'.
    for tok in code.split(|c: char| c == ',' || c == ';' || c.is_whitespace()) {
        if tok.contains('.')
            && !tok.starts_with('.')
            && !tok.starts_with('%')
            && let Ok(v) = tok.parse::<f64>()
        {
            let new = format!("{:e}", v * 1.01);
            return Some(line.replacen(tok, &new, 1));
        }
    }
    None
}

/// Runs the family's property tests against every mutant; each must fail and name the kernel.
pub fn mutation_sweep() -> Result<()> {
    println!("\nmutation sweep (each mutant must make the family's PTX tests fail):");
    // Build once so each mutant run is only the test itself.
    let status = cargo()
        .args([
            "test",
            "-p",
            "mgm-kernels",
            "--release",
            "--tests",
            "--no-run",
            "-q",
        ])
        .status()?;
    if !status.success() {
        bail!("building the kernel tests failed");
    }
    let dir: PathBuf = workspace_root().join("target/mutants");
    let mut survived = Vec::new();
    let mut killed = 0;
    for file in ptx_files()? {
        for m in mutants(&file)? {
            let mdir = dir.join(&m.family);
            std::fs::create_dir_all(&mdir)?;
            std::fs::write(mdir.join(format!("{}.ptx", m.family)), &m.source)?;
            let o = cargo()
                .args(["test", "-p", "mgm-kernels", "--release", "-q", "--test"])
                .arg(format!("prop_{}", m.family))
                .env("MGM_KERNEL_PTX_DIR", &mdir)
                // A mutant's failing cases are not regressions of the real kernel.
                .env("PROPTEST_DISABLE_FAILURE_PERSISTENCE", "1")
                .output()?;
            let text = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            let named = text.contains(&m.family);
            let verdict = if !o.status.success() && named {
                killed += 1;
                "caught"
            } else if !o.status.success() {
                survived.push(format!(
                    "{} {} (failed without naming the kernel)",
                    m.family, m.what
                ));
                "failed, kernel not named"
            } else {
                survived.push(format!("{} {}", m.family, m.what));
                "SURVIVED"
            };
            // Prefer the executor's fault line ("kernel mgm_..., line ...: shared-memory race"),
            // else the failed comparison naming the kernel.
            let first = text
                .lines()
                .find(|l| l.contains("kernel mgm_"))
                .or_else(|| {
                    text.lines().find(|l| {
                        l.contains(&m.family) && !l.starts_with("thread ") && !l.contains("test ")
                    })
                })
                .unwrap_or("")
                .trim();
            let first: String = first.chars().take(110).collect();
            println!("  {:<22} {:<34} {verdict:<8} {first}", m.family, m.what);
            let _ = std::fs::remove_file(mdir.join(format!("{}.ptx", m.family)));
        }
    }
    if !survived.is_empty() {
        bail!(
            "{} mutants survived: {}",
            survived.len(),
            survived.join("; ")
        );
    }
    println!("all {killed} mutants caught");
    Ok(())
}

/// True when a CUDA driver is installed (then verify also runs the PTX on the GPU).
fn driver_present() -> bool {
    Path::new("/proc/driver/nvidia/version").exists()
        || Command::new("sh")
            .args(["-c", "ldconfig -p | grep -q 'libcuda\\.so'"])
            .status()
            .is_ok_and(|s| s.success())
}

/// Runs the GPU twins of the property tests when a driver is present.
pub fn gpu_tests() -> Result<()> {
    if !driver_present() {
        println!("\nno CUDA driver on this machine: PTX checked on the mgm-ptx executor only");
        return Ok(());
    }
    println!("\nCUDA driver found: running the PTX on the GPU");
    let status = cargo()
        .args([
            "test",
            "-p",
            "mgm-kernels",
            "--release",
            "--features",
            "cuda",
            "--test",
            "gpu",
            "--",
            "--include-ignored",
        ])
        .env("MGM_KERNEL_CASES", VERIFY_CASES)
        .status()?;
    if !status.success() {
        bail!("GPU kernel tests failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_hex_and_decimal_constants() {
        let l = "    fma.rn.f32 %f1, %f2, 0f3F800000, %f3; // poly";
        assert_eq!(
            scale_constant(l).unwrap(),
            format!(
                "    fma.rn.f32 %f1, %f2, 0f{:08X}, %f3; // poly",
                (1.01f32).to_bits()
            )
        );
        let d = "    mov.f32 %f1, 0.5; // poly";
        assert!(scale_constant(d).unwrap().contains("5.05e-1"));
    }
}
