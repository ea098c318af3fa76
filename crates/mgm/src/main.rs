//! The `mgm` command.
#![allow(clippy::print_stdout)] // a command-line tool reports on stdout

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mgm::forward::{Model, Options};
use mgm_llm::QuantFormat;
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
        /// Quantize a causal LM's weights at load: q8 or q4 (group-32, like q8_0 / q4_0).
        #[arg(long, value_parser = parse_quant)]
        quant: Option<QuantFormat>,
    },
    /// Generate text with a causal LM, streaming it to stdout as it is produced.
    Generate(GenerateArgs),
    /// Quantize a causal LM and save it (loads back without re-quantizing, memory-mapped).
    Quantize {
        /// Model directory to read.
        #[arg(long)]
        model: PathBuf,
        /// q8 or q4.
        #[arg(long, value_parser = parse_quant)]
        quant: QuantFormat,
        /// Directory to write (config.json, model.safetensors and the tokenizer files).
        #[arg(long)]
        output: PathBuf,
    },
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// The prompt text (encoded with the model's tokenizer, BOS added as the tokenizer does).
    #[arg(
        long,
        conflicts_with = "input_ids",
        required_unless_present = "input_ids"
    )]
    prompt: Option<String>,
    /// The prompt as token ids, comma-separated (no tokenizer needed with --print-ids).
    #[arg(long, value_delimiter = ',')]
    input_ids: Option<Vec<u32>>,
    /// Wrap --prompt in the tokenizer's chat template as one user message.
    #[arg(long)]
    chat: bool,
    /// New tokens at most.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling mass (1: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// transformers' repetition penalty (1: off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print token ids instead of text.
    #[arg(long)]
    print_ids: bool,
    /// Quantize the weights at load: q8 or q4 (a model saved by `mgm quantize` needs none).
    #[arg(long, value_parser = parse_quant)]
    quant: Option<QuantFormat>,
}

fn parse_quant(s: &str) -> std::result::Result<QuantFormat, String> {
    QuantFormat::parse(s).ok_or_else(|| format!("{s:?}: expected q8 or q4"))
}

/// Files beside the weights that a quantized copy keeps.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
];

fn quantize(model: &Path, format: QuantFormat, output: &Path) -> Result<()> {
    anyhow::ensure!(
        model.canonicalize().ok() != output.canonicalize().ok(),
        "--output {} is the model directory: write the quantized copy elsewhere",
        output.display()
    );
    let m = mgm_llm::CausalLm::from_dir(model)?;
    let q = m.quantize(format)?;
    q.save(output)?;
    for name in TOKENIZER_FILES {
        let src = model.join(name);
        if src.exists() {
            std::fs::copy(&src, output.join(name))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    println!(
        "{} -> {} ({}): weights {:.1} MB -> {:.1} MB",
        model.display(),
        output.display(),
        format.name(),
        m.weight_bytes() as f64 / 1e6,
        q.weight_bytes() as f64 / 1e6
    );
    Ok(())
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
    quant: Option<QuantFormat>,
) -> Result<()> {
    let dtype = parse_dtype(dtype)?;
    let inputs = inputs.unwrap_or_else(|| model.join("inputs.safetensors"));
    let m = Model::load(model, Options { dtype, quant })?;
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

fn generate(a: &GenerateArgs) -> Result<()> {
    use std::io::Write;

    use mgm_llm::{
        CausalLm, GenerateOptions, Generation, Message, SamplingParams, TextDeltas, Tokenizer,
    };
    let model = CausalLm::from_dir(&a.model)?;
    let model = match a.quant {
        Some(f) => model.quantize(f)?,
        None => model,
    };
    let tok = if a.prompt.is_some() || !a.print_ids {
        Some(Tokenizer::from_dir(&a.model)?)
    } else {
        None
    };
    let prompt: Vec<u32> = match (&a.prompt, &a.input_ids) {
        (Some(p), _) => {
            let t = tok.as_ref().expect("loaded above for --prompt");
            if a.chat {
                let text = t.apply_chat_template(&[Message::new("user", p.as_str())], true)?;
                t.encode(&text, false)?
            } else {
                t.encode(p, true)?
            }
        }
        (None, Some(ids)) => ids.clone(),
        (None, None) => anyhow::bail!("give --prompt TEXT or --input-ids 1,2,3"),
    };
    let mut stop = model.config().eos_token_ids.clone();
    if let Some(e) = tok.as_ref().and_then(Tokenizer::eos_token_id)
        && !stop.contains(&e)
    {
        stop.push(e);
    }
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        min_new_tokens: 0,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            repetition_penalty: a.repetition_penalty,
            seed: a.seed,
        },
        stop_tokens: stop,
        pad_token: None,
    };
    let mut out = std::io::stdout().lock();
    let mut deltas = TextDeltas::new();
    for step in Generation::new(&model, &[prompt], opts)? {
        let id = step?[0];
        match (&tok, a.print_ids) {
            (Some(t), false) => write!(out, "{}", deltas.push(t, id)?)?,
            _ => write!(out, "{id} ")?,
        }
        out.flush()?;
    }
    if let (Some(t), false) = (&tok, a.print_ids) {
        write!(out, "{}", deltas.finish(t)?)?;
    }
    writeln!(out)?;
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
            quant,
        } => forward(&model, inputs, output, &dtype, quant),
        Cmd::Generate(args) => generate(&args),
        Cmd::Quantize {
            model,
            quant,
            output,
        } => quantize(&model, quant, &output),
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
