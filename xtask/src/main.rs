//! `cargo xtask`: developer tasks for the mgm-rs workspace.
#![allow(clippy::print_stdout)] // a command-line tool reports on stdout

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod kernels;
mod verify_kernels;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Developer tasks for mgm-rs")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check mgm-tensor against the committed PyTorch fixtures, run the kernel property tests
    /// (PTX on the mgm-ptx executor, fast CPU, GPU when present) and the PTX mutation sweep.
    Verify {
        /// Skip the mutation sweep (one test run per deleted bar.sync / changed constant).
        #[arg(long)]
        no_mutants: bool,
    },
    /// Assemble kernels/*.ptx with ptxas (installed from PyPI into target/ when missing) for
    /// sm_80 and sm_90 and print registers, shared memory and spills.
    Kernels,
    /// Regenerate tests/fixtures with the pinned Python generators (creates target/reference-venv).
    Reference {
        /// Python interpreter used to create the venv.
        #[arg(long, default_value = "python3")]
        python: String,
    },
    /// Train the default model from scratch (`mgm train --config configs/shapes.toml`, about
    /// 12 minutes on 2 cores) into target/shapes-train and print the held-out accuracy; with
    /// --install, copy the trained model over the embedded default (crates/mgm/assets).
    TrainDemo {
        /// Replace crates/mgm/assets/default-model with the result.
        #[arg(long)]
        install: bool,
        /// Skip training: install the model an earlier run left in target/shapes-train.
        #[arg(long, requires = "install")]
        no_train: bool,
    },
    /// Run the criterion benches (extra arguments go to `cargo bench`).
    Bench {
        /// Arguments passed through, e.g. `--bench matmul`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the root")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} exited with {status}");
    }
    Ok(())
}

fn train_demo(install: bool, no_train: bool) -> Result<()> {
    let root = workspace_root();
    let out = root.join("target/shapes-train");
    if !no_train {
        if out.exists() {
            std::fs::remove_dir_all(&out).with_context(|| format!("removing {}", out.display()))?;
        }
        let t = std::time::Instant::now();
        run(Command::new(env!("CARGO"))
            .current_dir(&root)
            .args(["run", "--release", "-p", "mgm", "--", "train", "--config"])
            .arg(root.join("configs/shapes.toml"))
            .arg("--out")
            .arg(&out))?;
        println!(
            "train-demo: {:.1} min in all",
            t.elapsed().as_secs_f64() / 60.0
        );
    }
    if install {
        let dst = root.join("crates/mgm/assets/default-model");
        let src = out.join("model");
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "clip/config.json",
        ] {
            let to = dst.join(f);
            std::fs::create_dir_all(to.parent().expect("a file in a directory"))?;
            std::fs::copy(src.join(f), &to)
                .with_context(|| format!("copying {f} to {}", to.display()))?;
        }
        println!("installed {} as the default model", dst.display());
        let png = root.join("examples/shapes/shapes.png");
        std::fs::create_dir_all(png.parent().expect("in examples/"))?;
        let (i, s) = mgm::shapes::example(64, Some(&png))?;
        println!(
            "wrote {} (example split, sample {i}: {:?})",
            png.display(),
            s.objects
        );
    }
    Ok(())
}

fn verify() -> Result<()> {
    let dir = mgm_tests::fixtures_dir().join("tensor_composite");
    println!("mgm-tensor vs PyTorch 2.15 on {}", dir.display());
    println!(
        "(conv2d, bilinear interpolate, layer_norm, matmul, gelu, softmax, rms_norm, cross entropy)\n"
    );
    let report =
        mgm_tests::tensor_composite::check(&dir).context("evaluating the composite fixture")?;
    print!("{}", report.table());
    let failures = report.failures();
    if !failures.is_empty() {
        bail!(
            "{} of {} quantities exceed their tolerance",
            failures.len(),
            report.rows.len()
        );
    }
    println!(
        "\nall {} quantities within tolerance (worst {:.2e})",
        report.rows.len(),
        report.worst_error()
    );
    Ok(())
}

fn verify_vision() -> Result<()> {
    let cases = mgm_tests::vision::cases(&mgm_tests::fixtures_dir());
    println!(
        "\nvision towers vs transformers/timm ({} fixtures; f32 max abs diff <= {:.0e}, bf16 relative <= {:.0e}):\n",
        cases.len(),
        mgm_tests::vision::F32_TOL,
        mgm_tests::vision::BF16_TOL
    );
    let mut report = mgm_tests::Report::default();
    for dir in &cases {
        let r =
            mgm_tests::vision::check(dir).with_context(|| format!("running {}", dir.display()))?;
        report.rows.extend(r.rows);
    }
    print!("{}", report.table());
    let failures = report.failures();
    if !failures.is_empty() {
        bail!(
            "{} of {} vision outputs exceed their tolerance",
            failures.len(),
            report.rows.len()
        );
    }
    Ok(())
}

fn reference(python: &str) -> Result<()> {
    let root = workspace_root();
    let venv = root.join("target/reference-venv");
    let py = venv.join("bin/python");
    if !py.exists() {
        run(Command::new(python).args(["-m", "venv"]).arg(&venv))?;
    }
    run(Command::new(&py)
        .args(["-m", "pip", "install", "--quiet", "-r"])
        .arg(root.join("tests/reference/requirements.txt")))?;
    let mut gens: Vec<PathBuf> = std::fs::read_dir(root.join("tests/reference"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("gen_") && n.ends_with(".py"))
        })
        .collect();
    gens.sort();
    for g in gens {
        println!("running {}", g.display());
        run(Command::new(&py).arg(&g))?;
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Verify { no_mutants } => {
            verify()?;
            verify_vision()?;
            verify_kernels::property_tests()?;
            if !no_mutants {
                verify_kernels::mutation_sweep()?;
            }
            verify_kernels::gpu_tests()
        }
        Cmd::Kernels => kernels::run(),
        Cmd::Reference { python } => reference(&python),
        Cmd::TrainDemo { install, no_train } => train_demo(install, no_train),
        Cmd::Bench { args } => run(Command::new(env!("CARGO"))
            .current_dir(workspace_root())
            .args(["bench", "-p", "mgm-benches"])
            .args(args)),
    }
}
