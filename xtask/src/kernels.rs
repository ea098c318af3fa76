//! `cargo xtask kernels`: assemble every hand-written PTX file with ptxas and report resources.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::workspace_root;

/// The pinned wheel ptxas comes from (CUDA 12.9; assembles PTX ISA 8.0 for sm_80 and sm_90).
const NVCC_WHEEL: &str = "nvidia-cuda-nvcc-cu12==12.9.86";
/// Architectures every kernel must assemble for.
pub const TARGETS: [&str; 2] = ["sm_80", "sm_90"];

/// Resources ptxas reports for one entry point on one target.
#[derive(Debug, Clone)]
pub struct Resources {
    /// PTX file stem (the kernel family).
    pub family: String,
    /// Entry point name.
    pub entry: String,
    /// `sm_80` or `sm_90`.
    pub target: String,
    /// Registers per thread.
    pub registers: u32,
    /// Static shared memory bytes (dynamic shared memory is set at launch).
    pub shared_bytes: u32,
    /// Spill stores plus spill loads, in bytes.
    pub spill_bytes: u32,
    /// Stack frame bytes.
    pub stack_bytes: u32,
}

/// Path of ptxas: `$PTXAS` if set, else the copy under target/nvcc, installed there from the PyPI
/// wheel with `pip --target` when missing.
pub fn ptxas() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("PTXAS") {
        return Ok(PathBuf::from(p));
    }
    let root = workspace_root();
    let dir = root.join("target/nvcc");
    let exe = dir.join("nvidia/cuda_nvcc/bin/ptxas");
    if exe.exists() {
        return Ok(exe);
    }
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| {
            Command::new(p)
                .args(["-m", "pip", "--version"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .context(
            "ptxas is not installed and no `python3 -m pip` was found to install it: install \
             Python 3 with pip, or set PTXAS=/path/to/ptxas",
        )?;
    eprintln!(
        "installing ptxas from the PyPI wheel {NVCC_WHEEL} into {}",
        dir.display()
    );
    let status = Command::new(python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--upgrade",
            "--target",
        ])
        .arg(&dir)
        .arg(NVCC_WHEEL)
        .status()
        .context("running pip")?;
    if !status.success() || !exe.exists() {
        bail!(
            "pip could not install {NVCC_WHEEL} into {} ({status})",
            dir.display()
        );
    }
    Ok(exe)
}

/// Every kernels/*.ptx file, sorted.
pub fn ptx_files() -> Result<Vec<PathBuf>> {
    let dir = workspace_root().join("kernels");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "ptx"))
        .collect();
    files.sort();
    Ok(files)
}

/// Assembles `file` for `target`; any ptxas error or warning (spills included) is an error.
pub fn assemble(ptxas: &Path, file: &Path, target: &str) -> Result<Vec<Resources>> {
    let out = workspace_root().join("target/ptxas");
    std::fs::create_dir_all(&out)?;
    let family = file
        .file_stem()
        .and_then(|s| s.to_str())
        .context("PTX file name is UTF-8")?
        .to_string();
    let cubin = out.join(format!("{family}.{target}.cubin"));
    let o = Command::new(ptxas)
        .arg(format!("-arch={target}"))
        .args(["-Werror", "--warn-on-spills", "-v"])
        .arg(file)
        .arg("-o")
        .arg(&cubin)
        .output()
        .with_context(|| format!("starting {}", ptxas.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    if !o.status.success() {
        bail!("ptxas failed on {} for {target}:\n{text}", file.display());
    }
    Ok(parse_verbose(&family, target, &text))
}

/// Parses `ptxas -v` output into one row per entry point.
fn parse_verbose(family: &str, target: &str, text: &str) -> Vec<Resources> {
    let num_before = |line: &str, unit: &str| -> u32 {
        line.split(',')
            .find_map(|part| {
                let part = part.trim();
                let n = part.strip_suffix(unit)?.trim();
                n.rsplit(' ').next()?.parse().ok()
            })
            .unwrap_or(0)
    };
    let mut rows: Vec<Resources> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let entry = rest.split('\'').next().unwrap_or_default().to_string();
            rows.push(Resources {
                family: family.to_string(),
                entry,
                target: target.to_string(),
                registers: 0,
                shared_bytes: 0,
                spill_bytes: 0,
                stack_bytes: 0,
            });
        } else if let Some(r) = rows.last_mut() {
            if line.contains("bytes stack frame") {
                r.stack_bytes = num_before(line, "bytes stack frame");
                r.spill_bytes =
                    num_before(line, "bytes spill stores") + num_before(line, "bytes spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                r.registers = line
                    .split("Used ")
                    .nth(1)
                    .and_then(|s| s.split(' ').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                r.shared_bytes = num_before(line, "bytes smem");
            }
        }
    }
    rows
}

/// Assembles every kernel for every target and returns the resource rows.
pub fn assemble_all() -> Result<Vec<Resources>> {
    let ptxas = ptxas()?;
    let mut rows = Vec::new();
    for file in ptx_files()? {
        for target in TARGETS {
            rows.extend(assemble(&ptxas, &file, target)?);
        }
    }
    Ok(rows)
}

/// The resource table as markdown (also pasted into kernels/NOTES.md).
pub fn table(rows: &[Resources]) -> String {
    let mut s = String::from(
        "| kernel | target | registers | static shared bytes | spill bytes | stack bytes |\n\
         |---|---|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.entry, r.target, r.registers, r.shared_bytes, r.spill_bytes, r.stack_bytes
        );
    }
    s
}

/// `cargo xtask kernels`.
pub fn run() -> Result<()> {
    let rows = assemble_all()?;
    if rows.is_empty() {
        bail!("no kernels/*.ptx files found");
    }
    print!("{}", table(&rows));
    let json: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"family\":\"{}\",\"entry\":\"{}\",\"target\":\"{}\",\"registers\":{},\"shared_bytes\":{},\"spill_bytes\":{},\"stack_bytes\":{}}}",
                r.family, r.entry, r.target, r.registers, r.shared_bytes, r.spill_bytes, r.stack_bytes
            )
        })
        .collect();
    let reports = workspace_root().join("target/reports");
    std::fs::create_dir_all(&reports)?;
    std::fs::write(
        reports.join("kernels.json"),
        format!("[{}]\n", json.join(",\n")),
    )?;
    let spilled: Vec<&Resources> = rows.iter().filter(|r| r.spill_bytes > 0).collect();
    if !spilled.is_empty() {
        bail!("{} entries spill registers", spilled.len());
    }
    println!(
        "\n{} entry points assembled for {} with -Werror --warn-on-spills (report: target/reports/kernels.json)",
        rows.len() / TARGETS.len(),
        TARGETS.join(" and ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_verbose_output() {
        let text = "ptxas info    : 0 bytes gmem\n\
            ptxas info    : Compiling entry function 'k' for 'sm_90'\n\
            ptxas info    : Function properties for k\n    \
            8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
            ptxas info    : Used 38 registers, used 1 barriers, 256 bytes smem, 380 bytes cmem[0]\n";
        let r = &parse_verbose("f", "sm_90", text)[0];
        assert_eq!(
            (r.entry.as_str(), r.registers, r.shared_bytes),
            ("k", 38, 256)
        );
        assert_eq!((r.spill_bytes, r.stack_bytes), (16, 8));
    }
}
