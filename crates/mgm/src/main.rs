//! The `mgm` command.
#![allow(clippy::print_stdout)] // a command-line tool reports on stdout

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mgm::forward::{Model, Options};
use mgm_tensor::DType;

#[derive(Parser)]
#[command(
    name = "mgm",
    version,
    about = "mgm-rs: Mini-Gemini / LLaVA-style models in Rust"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a transformers-layout model directory on named inputs (the conformance command).
    Forward {
        /// Directory with config.json and model.safetensors.
        #[arg(long)]
        model: PathBuf,
        /// Input tensors (e.g. `pixel_values`); default DIR/inputs.safetensors.
        #[arg(long)]
        inputs: Option<PathBuf>,
        /// Where to write the outputs; without it, print a summary (and the difference from
        /// DIR/expected.safetensors when present).
        #[arg(long)]
        output: Option<PathBuf>,
        /// Weight and matmul dtype: f32 or bf16 (norms and softmax stay f32).
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
}

fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        other => anyhow::bail!("--dtype {other}: expected f32 or bf16"),
    }
}

fn max_abs_diff(a: &mgm_tensor::Tensor, b: &mgm_tensor::Tensor) -> Result<f64> {
    anyhow::ensure!(
        a.shape() == b.shape(),
        "shape {:?} != expected {:?}",
        a.shape(),
        b.shape()
    );
    let f64s = |t: &mgm_tensor::Tensor| t.to_dtype(DType::F64).and_then(|t| t.to_vec::<f64>());
    let (a, b) = (f64s(a)?, f64s(b)?);
    Ok(a.iter()
        .zip(&b)
        .map(|(x, y)| {
            if (x - y).is_nan() {
                f64::INFINITY
            } else {
                (x - y).abs()
            }
        })
        .fold(0.0, f64::max))
}

fn forward(
    model: &Path,
    inputs: Option<PathBuf>,
    output: Option<PathBuf>,
    dtype: &str,
) -> Result<()> {
    let dtype = parse_dtype(dtype)?;
    let inputs = inputs.unwrap_or_else(|| model.join("inputs.safetensors"));
    let m = Model::load(model, Options { dtype })?;
    let named = mgm_tensor::safetensors::load(&inputs)
        .with_context(|| format!("reading inputs {}", inputs.display()))?;
    let outs = m.forward(&named)?;
    match output {
        Some(path) => {
            mgm_tensor::safetensors::save(&path, outs.iter().map(|(n, t)| (n.as_str(), t)))
                .with_context(|| format!("writing {}", path.display()))?;
            println!("{} outputs written to {}", outs.len(), path.display());
        }
        None => {
            let expected_path = model.join("expected.safetensors");
            let expected = if expected_path.exists() {
                Some(mgm_tensor::safetensors::load(&expected_path)?)
            } else {
                None
            };
            println!("{} ({}), {dtype:?}", model.display(), m.architecture());
            for (name, t) in &outs {
                let diff = match expected.as_ref().and_then(|e| e.get(name)) {
                    Some(e) => format!("max |diff| vs expected {:.3e}", max_abs_diff(t, e)?),
                    None => String::new(),
                };
                println!("  {name:<20} {:<18} {diff}", format!("{:?}", t.shape()));
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Forward {
            model,
            inputs,
            output,
            dtype,
        } => forward(&model, inputs, output, &dtype),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes joined with ": ".
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
