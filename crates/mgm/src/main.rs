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
        /// An MGM model's CLIP tower directory (default: the config's mm_vision_tower, relative
        /// to --model).
        #[arg(long)]
        vision_tower: Option<PathBuf>,
        /// An MGM model's ConvNeXt tower directory (default: mm_vision_tower_aux).
        #[arg(long)]
        vision_tower_aux: Option<PathBuf>,
    },
    /// Generate text with a causal LM, streaming it to stdout as it is produced.
    Generate(GenerateArgs),
    /// Convert a PyTorch checkpoint (torch.save of a state dict, e.g. OpenCLIP's
    /// open_clip_pytorch_model.bin) to safetensors, with a restricted unpickler that only
    /// rebuilds tensors.
    Convert {
        /// The .bin / .pt file to read.
        #[arg(long)]
        input: PathBuf,
        /// The .safetensors file to write.
        #[arg(long)]
        output: PathBuf,
    },
    /// Train an MGM from scratch through the stages of a TOML config (configs/shapes.toml:
    /// the default model), then report its exact-match accuracy on held-out questions.
    Train {
        /// The training config.
        #[arg(long)]
        config: PathBuf,
        /// Output directory: checkpoints/, metrics.jsonl, model/.
        #[arg(long, default_value = "target/shapes-train")]
        out: PathBuf,
        /// Continue from the latest checkpoint in --out.
        #[arg(long)]
        resume: bool,
        /// Stop (with a checkpoint) after this many steps of this run.
        #[arg(long)]
        stop_after: Option<u64>,
        /// Held-out questions to score (default: the config's eval_questions; 0 skips).
        #[arg(long)]
        eval: Option<u64>,
    },
    /// Score a shapes model (default: the embedded one) by exact match on held-out questions.
    EvalShapes {
        /// The model directory.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Questions to ask.
        #[arg(long, default_value_t = 1000)]
        questions: u64,
        /// The training config's seed (the held-out split is derived from it).
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Draw a training run's loss curve (metrics.jsonl) as an SVG.
    Plot {
        /// The metrics file `mgm train` wrote.
        #[arg(long)]
        metrics: PathBuf,
        /// The SVG to write.
        #[arg(long)]
        output: PathBuf,
    },
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
    /// Model directory (config.json, safetensors, tokenizer.json); default: the embedded
    /// shapes model (an MGM trained by `cargo xtask train-demo`).
    #[arg(long = "model")]
    model_dir: Option<PathBuf>,
    /// The directory in use: --model, or where the embedded model was written.
    #[arg(skip)]
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
    /// An image for a vision-language model (repeat for several; each `<image>` in the prompt
    /// takes the next one, and a prompt without any gets them in front).
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// Images larger than this many pixels are refused before decoding.
    #[arg(long, default_value_t = 64_000_000)]
    max_image_pixels: usize,
    /// Wrap --prompt in one of MGM's conversation templates: vicuna_v1, gemma or llama_3.
    #[arg(long, conflicts_with = "chat")]
    template: Option<String>,
    /// An MGM model's CLIP tower directory (default: the config's mm_vision_tower).
    #[arg(long)]
    vision_tower: Option<PathBuf>,
    /// An MGM model's ConvNeXt tower directory (default: mm_vision_tower_aux).
    #[arg(long)]
    vision_tower_aux: Option<PathBuf>,
}

/// The prompt text with markers and the template or chat template applied; whether the
/// tokenizer should still add its special tokens (BOS) to the first chunk.
fn vision_prompt(
    a: &GenerateArgs,
    tok: &mgm_llm::Tokenizer,
    n_images: usize,
    front: impl Fn(&str, usize) -> String,
) -> Result<(String, bool)> {
    let prompt = a
        .prompt
        .as_deref()
        .context("a vision-language model needs --prompt TEXT")?;
    let q = front(prompt, n_images);
    Ok(match (&a.template, a.chat) {
        (Some(t), _) => (mgm::llava::conversation(t, &q)?, true),
        (None, true) => (
            tok.apply_chat_template(&[mgm_llm::Message::new("user", q.as_str())], true)?,
            false, // a rendered chat template holds its own BOS
        ),
        (None, false) => (q, true),
    })
}

/// Loads the images, each refused over the pixel limit before decoding.
fn load_images(
    a: &GenerateArgs,
    alpha: mgm_vision::preprocess::AlphaMode,
) -> Result<Vec<mgm_vision::RgbImage>> {
    a.images
        .iter()
        .map(|p| {
            Ok(mgm_vision::preprocess::load_image_limited(
                p,
                alpha,
                a.max_image_pixels,
            )?)
        })
        .collect()
}

/// `mgm generate` on an MGM checkpoint: each image padded to a square with the CLIP mean
/// colour and preprocessed at `image_size_aux` (the low-res view derived from it as MGM does),
/// one -200 per `<image>` marker.
fn generate_mgm(a: &GenerateArgs) -> Result<()> {
    use mgm::minigemini::{IMAGE_TOKEN_INDEX, Mgm, TowerDirs};
    use mgm_vision::ImageProcessor;
    let towers = TowerDirs {
        vision_tower: a.vision_tower.clone(),
        vision_tower_aux: a.vision_tower_aux.clone(),
    };
    let model = Mgm::from_dir(&a.model, &towers, a.quant)?;
    let tok = mgm_llm::Tokenizer::from_dir(&a.model)?;
    let processor = ImageProcessor::clip(model.config().image_size_aux);
    let images = load_images(a, processor.alpha)?;
    let (text, special) = vision_prompt(a, &tok, images.len(), mgm::llava::with_markers)?;
    let (ids, history) =
        mgm::llava::prompt_ids(&tok, &text, images.len(), 1, IMAGE_TOKEN_INDEX, special)?;
    let t = ids.len();
    let tokens = if images.is_empty() {
        None
    } else {
        Some(model.image_tokens(&processor.preprocess_padded(&images)?, None)?)
    };
    let embeds = model.embed(
        &mgm_tensor::Tensor::from_vec(ids, &[1, t])?,
        tokens.as_ref(),
    )?;
    let lm = model.language_model();
    let opts = generate_options(a, lm, Some(&tok));
    stream(
        mgm_llm::Generation::from_embeds(lm, &embeds, vec![history], opts)?,
        Some(&tok),
        a.print_ids,
    )
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

fn convert(input: &Path, output: &Path) -> Result<()> {
    let tensors = mgm_tensor::torch_pickle::load(input)?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    mgm_tensor::safetensors::save(output, names.iter().map(|n| (n.as_str(), &tensors[*n])))
        .with_context(|| format!("writing {}", output.display()))?;
    println!(
        "{} -> {}: {} tensors",
        input.display(),
        output.display(),
        tensors.len()
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
    vision_tower: Option<PathBuf>,
    vision_tower_aux: Option<PathBuf>,
) -> Result<()> {
    let dtype = parse_dtype(dtype)?;
    let inputs = inputs.unwrap_or_else(|| model.join("inputs.safetensors"));
    let m = Model::load(
        model,
        Options {
            dtype,
            quant,
            towers: mgm::minigemini::TowerDirs {
                vision_tower,
                vision_tower_aux,
            },
        },
    )?;
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

/// The sampling options of the command line, stopping at the model's and tokenizer's EOS.
fn generate_options(
    a: &GenerateArgs,
    model: &mgm_llm::CausalLm,
    tok: Option<&mgm_llm::Tokenizer>,
) -> mgm_llm::GenerateOptions {
    let mut stop = model.config().eos_token_ids.clone();
    if let Some(e) = tok.and_then(mgm_llm::Tokenizer::eos_token_id)
        && !stop.contains(&e)
    {
        stop.push(e);
    }
    mgm_llm::GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        min_new_tokens: 0,
        sampling: mgm_llm::SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            repetition_penalty: a.repetition_penalty,
            seed: a.seed,
        },
        stop_tokens: stop,
        pad_token: None,
    }
}

/// Streams a generation's tokens (text deltas, or ids with `print_ids`) to stdout.
fn stream(
    generation: mgm_llm::Generation<'_>,
    tok: Option<&mgm_llm::Tokenizer>,
    print_ids: bool,
) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let mut deltas = mgm_llm::TextDeltas::new();
    for step in generation {
        let id = step?[0];
        match (tok, print_ids) {
            (Some(t), false) => write!(out, "{}", deltas.push(t, id)?)?,
            _ => write!(out, "{id} ")?,
        }
        out.flush()?;
    }
    if let (Some(t), false) = (tok, print_ids) {
        write!(out, "{}", deltas.finish(t)?)?;
    }
    writeln!(out)?;
    Ok(())
}

/// `mgm generate` on a LLaVA checkpoint: images preprocessed as its preprocessor_config.json
/// says (CLIP's processor at the tower's size when there is none), `<image>` markers expanded.
fn generate_llava(a: &GenerateArgs) -> Result<()> {
    use mgm_llm::{Generation, Tokenizer};
    use mgm_vision::preprocess::ImageProcessor;
    let llava = mgm::llava::Llava::from_dir(&a.model, a.quant)?;
    let tok = Tokenizer::from_dir(&a.model)?;
    let pre = a.model.join("preprocessor_config.json");
    let processor = if pre.exists() {
        ImageProcessor::from_preprocessor_config(&pre)?
    } else {
        ImageProcessor::clip(llava.vision_tower().config().image_size)
    };
    let images = load_images(a, processor.alpha)?;
    // LLaVA's convention for images without markers: `<image>\n` per image in front
    let front = |p: &str, n: usize| {
        if p.contains(mgm::llava::IMAGE_MARKER) {
            p.to_string()
        } else {
            format!("{}{p}", format!("{}\n", mgm::llava::IMAGE_MARKER).repeat(n))
        }
    };
    let (text, special) = vision_prompt(a, &tok, images.len(), front)?;
    let (ids, history) = mgm::llava::prompt_ids(
        &tok,
        &text,
        images.len(),
        llava.tokens_per_image(),
        i64::from(llava.config().image_token_id),
        special,
    )?;
    let t = ids.len();
    let pixels = (!images.is_empty())
        .then(|| processor.preprocess(&images))
        .transpose()?;
    let embeds = llava.embed(
        &mgm_tensor::Tensor::from_vec(ids, &[1, t])?,
        pixels.as_ref(),
    )?;
    let lm = llava.language_model();
    let opts = generate_options(a, lm, Some(&tok));
    stream(
        Generation::from_embeds(lm, &embeds, vec![history], opts)?,
        Some(&tok),
        a.print_ids,
    )
}

fn generate(a: &GenerateArgs) -> Result<()> {
    use mgm_llm::{CausalLm, Generation, Message, Tokenizer};
    let arch = mgm::forward::architecture(&a.model.join("config.json"))?;
    if arch == "LlavaForConditionalGeneration" {
        return generate_llava(a);
    }
    if arch.starts_with("MGM") {
        return generate_mgm(a);
    }
    anyhow::ensure!(
        a.images.is_empty(),
        "--image needs a vision-language model; {} is a {arch}",
        a.model.display()
    );
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
    let opts = generate_options(a, &model, tok.as_ref());
    stream(
        Generation::new(&model, &[prompt], opts)?,
        tok.as_ref(),
        a.print_ids,
    )
}

/// `mgm train`: the stages with a progress bar on stderr, then the held-out accuracy.
fn train(
    config: &Path,
    out: &Path,
    resume: bool,
    stop_after: Option<u64>,
    eval: Option<u64>,
) -> Result<()> {
    use mgm::train::{RunDirs, TrainConfig};
    let cfg = TrainConfig::from_file(config)?;
    let bar = indicatif::ProgressBar::new(cfg.total_steps());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .expect("a valid template"),
    );
    let dirs = RunDirs {
        out: out.to_path_buf(),
    };
    let model = mgm::train::train(&cfg, &dirs, resume, stop_after, |s| {
        bar.set_position(s.step);
        bar.set_message(format!(
            "{} loss {:.4} lr {:.2e} {:.0} tok/s",
            s.stage, s.loss, s.lr, s.tokens_per_s
        ));
    })?;
    bar.finish();
    let Some(model) = model else {
        println!(
            "stopped; resume with --resume (checkpoints in {})",
            out.display()
        );
        return Ok(());
    };
    println!("model written to {}", model.display());
    let n = eval.unwrap_or(cfg.eval_questions);
    if n > 0 {
        eval_shapes(&model, n, cfg.seed)?;
    }
    Ok(())
}

/// Prints the exact-match accuracy of a shapes model on `n` held-out questions.
fn eval_shapes(model: &Path, n: u64, seed: u64) -> Result<()> {
    let t = std::time::Instant::now();
    let acc = mgm::train::evaluate(model, mgm::train::held_out_seed(seed), n)?;
    for (kind, (right, asked)) in &acc.by_kind {
        println!("  {kind:<14} {right}/{asked}");
    }
    println!(
        "held-out exact match: {}/{} = {:.1}% ({:.1} s)",
        acc.correct,
        acc.total,
        100.0 * acc.ratio(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Keeps freed memory in the process instead of returning it to the OS: training and decoding
/// free and allocate the same large activation buffers every step, and glibc's default (large
/// blocks mapped fresh and unmapped on free) made the kernel zero those pages again each time
/// (a fifth of a training step in a profile). The caching pool of mgm-umm is the library-level
/// answer; this is the binary's own setting.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_MMAP_THRESHOLD: i32 = -3;
    unsafe extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    // SAFETY: mallopt only changes allocator tunables; it is called before any thread starts
    // and takes plain integers.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 1 << 30);
        mallopt(M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Forward {
            model,
            inputs,
            output,
            dtype,
            quant,
            vision_tower,
            vision_tower_aux,
        } => forward(
            &model,
            inputs,
            output,
            &dtype,
            quant,
            vision_tower,
            vision_tower_aux,
        ),
        Cmd::Generate(mut args) => match args.model_dir.clone() {
            Some(d) => {
                args.model = d;
                generate(&args)
            }
            None => mgm::default_model::dir()
                .map_err(anyhow::Error::from)
                .and_then(|d| {
                    args.model = d;
                    generate(&args)
                }),
        },
        Cmd::EvalShapes {
            model,
            questions,
            seed,
        } => model
            .map_or_else(mgm::default_model::dir, Ok)
            .map_err(anyhow::Error::from)
            .and_then(|m| eval_shapes(&m, questions, seed)),
        Cmd::Plot { metrics, output } => mgm::plot::loss_curve(&metrics, &output)
            .map_err(anyhow::Error::from)
            .map(|()| println!("wrote {}", output.display())),
        Cmd::Train {
            config,
            out,
            resume,
            stop_after,
            eval,
        } => train(&config, &out, resume, stop_after, eval),
        Cmd::Convert { input, output } => convert(&input, &output),
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
