//! `mgm train`: a small MGM trained from scratch on the procedural shapes dataset
//! ([`crate::shapes`]) through staged training, from a TOML config (configs/shapes.toml).
//!
//! The config names the model (`[model.text]`, `[model.clip]`, `[model.convnext]`: the
//! transformers config keys of the decoder and the two towers), the parameter groups by name
//! pattern (`[groups.NAME] patterns = [...]`, the first matching group takes a parameter) and
//! the stages (`[[stage]] name, steps, lr = { group = lr, ... }`, optionally `captions` (the
//! fraction of samples that are captions) and `objective = "scene"` (tower pretraining, see
//! [`Objective`])): a group without an lr in a stage is frozen there. Every stage starts a fresh AdamW with linear warmup and cosine decay.
//! Checkpoints (every `checkpoint_every` steps and at each stage's end) go to
//! `OUT/checkpoints/step-N` (each also a model directory that `mgm generate --model` runs)
//! and a run resumes from the latest one with the same losses as an uninterrupted run; the
//! metrics go to `OUT/metrics.jsonl`, the final model to `OUT/model`, and the held-out
//! exact-match accuracy is measured by greedy generation with the saved model reloaded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use mgm_llm::{GenerateOptions, Generation, Tokenizer};
use mgm_tensor::{DType, Tensor};
use mgm_train::checkpoint::{self, TrainerState};
use mgm_train::loss::{IGNORE_INDEX, causal_lm_loss};
use mgm_train::{GroupSpec, Optimizer, Schedule, Trainer};
use mgm_vision::ImageProcessor;
use serde::Deserialize;

use crate::minigemini::{IMAGE_TOKEN_INDEX, Mgm, MgmSpec, TowerDirs};
use crate::{Error, Result};

/// One stage of the config.
#[derive(Clone, Debug, Deserialize)]
pub struct StageConfig {
    /// A name for logs.
    pub name: String,
    /// Optimizer steps.
    pub steps: u64,
    /// Learning rate per group name; groups not listed are frozen.
    pub lr: BTreeMap<String, f64>,
    /// Warmup steps (default 5% of the stage).
    pub warmup: Option<u64>,
    /// The fraction of the stage's samples that are captions (mgm::shapes::caption_sample)
    /// rather than questions; default 0.
    #[serde(default)]
    pub captions: f64,
    /// What the stage's loss is (default: the decoder's answers).
    #[serde(default)]
    pub objective: Objective,
}

/// What a stage trains on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// MGM's loss: cross-entropy of the decoder's answer tokens.
    #[default]
    Answers,
    /// Tower pretraining: every image token (one per quadrant) predicts the shape and the colour
    /// of the object in its quadrant, or that there is none, through a linear head
    /// (`scene_head.*`) that only this objective uses and the final model does not keep. MGM's
    /// towers come pretrained (CLIP, ImageNet/LAION ConvNeXt); trained from scratch, they
    /// learn shape through the decoder's loss alone only slowly: the decoder cannot read a
    /// feature the towers do not have yet, and the towers get no signal for one the decoder
    /// does not read.
    Scene,
}

/// A parameter group of the config.
#[derive(Clone, Debug, Deserialize)]
pub struct GroupConfig {
    /// Glob patterns over parameter names.
    pub patterns: Vec<String>,
}

/// The model part of the config.
#[derive(Clone, Debug, Deserialize)]
pub struct ModelConfig {
    /// The decoder's config.json keys.
    pub text: serde_json::Value,
    /// The CLIP tower's config keys.
    pub clip: serde_json::Value,
    /// The ConvNeXt tower's config keys.
    pub convnext: serde_json::Value,
    /// The CLIP hidden state the low-res features come from.
    #[serde(default = "default_select")]
    pub select_layer: isize,
}

fn default_select() -> isize {
    -2
}

/// A training config (configs/shapes.toml).
#[derive(Clone, Debug, Deserialize)]
pub struct TrainConfig {
    /// Seed of the initialisation and of the training split.
    pub seed: u64,
    /// Side of the rendered (high-res) image.
    pub image_size: usize,
    /// Samples per step.
    pub batch_size: usize,
    /// Held-out questions for the final accuracy.
    pub eval_questions: u64,
    /// AdamW betas.
    pub betas: (f64, f64),
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this.
    pub clip_norm: f64,
    /// Steps between checkpoints.
    pub checkpoint_every: u64,
    /// The model.
    pub model: ModelConfig,
    /// Parameter groups, in matching order.
    pub groups: BTreeMap<String, GroupConfig>,
    /// Order of the groups (the first matching group takes a parameter).
    pub group_order: Vec<String>,
    /// The stages, in order.
    pub stage: Vec<StageConfig>,
}

impl TrainConfig {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        let cfg: TrainConfig = toml::from_str(&text).map_err(|e| Error::Config {
            path: path.display().to_string(),
            msg: e.to_string(),
        })?;
        let err = |msg: String| Error::Config {
            path: path.display().to_string(),
            msg,
        };
        for g in &cfg.group_order {
            if !cfg.groups.contains_key(g) {
                return Err(err(format!(
                    "group_order names {g:?}, which [groups] lacks"
                )));
            }
        }
        for s in &cfg.stage {
            if let Some(g) = s.lr.keys().find(|g| !cfg.groups.contains_key(*g)) {
                return Err(err(format!(
                    "stage {:?} sets an lr for unknown group {g:?}",
                    s.name
                )));
            }
        }
        if let Some(s) = cfg
            .stage
            .iter()
            .find(|s| !(0.0..=1.0).contains(&s.captions))
        {
            return Err(err(format!(
                "stage {:?}: captions = {} is not a fraction in [0, 1]",
                s.name, s.captions
            )));
        }
        if cfg.stage.is_empty() || cfg.batch_size == 0 {
            return Err(err("need at least one [[stage]] and batch_size > 0".into()));
        }
        Ok(cfg)
    }

    /// The model the config describes.
    pub fn spec(&self) -> MgmSpec {
        MgmSpec {
            text: self.model.text.clone(),
            clip: self.model.clip.clone(),
            convnext: self.model.convnext.clone(),
            select_layer: self.model.select_layer,
            image_size_aux: self.image_size,
        }
    }

    /// Total optimizer steps over all stages.
    pub fn total_steps(&self) -> u64 {
        self.stage.iter().map(|s| s.steps).sum()
    }
}

/// What the loop reports after every step (for a progress bar and the metrics file).
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepInfo {
    /// Global step (over all stages), 1-based.
    pub step: u64,
    /// Stage name.
    pub stage: String,
    /// The batch's loss.
    pub loss: f64,
    /// The lr of the first trained group.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens per second of this step (forward + backward + update).
    pub tokens_per_s: f64,
    /// Seconds since the run started (or resumed).
    pub elapsed_s: f64,
}

/// The tokenizer (mgm::shapes::tokenizer) written beside the model.
fn write_tokenizer(dir: &Path) -> Result<()> {
    let (tok, cfg) = crate::shapes::tokenizer();
    for (name, v) in [("tokenizer.json", tok), ("tokenizer_config.json", cfg)] {
        let p = dir.join(name);
        std::fs::write(&p, serde_json::to_string(&v).expect("plain JSON")).map_err(|e| {
            Error::Io {
                path: p.display().to_string(),
                source: e,
            }
        })?;
    }
    Ok(())
}

/// One sample's spliced ids and labels: the prompt as `mgm generate` builds it (BOS, the
/// image placeholder, "\n" and the question), then the answer and EOS, which alone are
/// trained on. `tokens_per_image` placeholder positions stand for the image in the labels.
fn encode(
    tok: &Tokenizer,
    question: &str,
    answer: &str,
    eos: u32,
    tokens_per_image: usize,
) -> Result<(Vec<i64>, Vec<i64>)> {
    let text = crate::llava::with_markers(question, 1);
    let (mut ids, _) = crate::llava::prompt_ids(tok, &text, 1, 1, IMAGE_TOKEN_INDEX, true)?;
    let prompt_len = ids.len() - 1 + tokens_per_image;
    let mut labels = vec![IGNORE_INDEX; prompt_len];
    for t in tok.encode(answer, false)?.into_iter().chain([eos]) {
        ids.push(i64::from(t));
        labels.push(i64::from(t));
    }
    Ok((ids, labels))
}

/// The loss of one batch of samples `first..first + n` of the training split.
fn batch_loss(
    model: &Mgm,
    tok: &Tokenizer,
    processor: &ImageProcessor,
    cfg: &TrainConfig,
    first: u64,
    captions: f64,
) -> Result<(Tensor, usize)> {
    let eos = *model
        .language_model()
        .config()
        .eos_token_ids
        .first()
        .ok_or_else(|| Error::Input {
            name: "model.text".into(),
            msg: "the decoder config needs an eos_token_id".into(),
        })?;
    let samples: Vec<_> = (0..cfg.batch_size as u64)
        .map(|i| crate::shapes::training_sample(cfg.seed, first + i, cfg.image_size, captions))
        .collect();
    let images: Vec<_> = samples.iter().map(|s| s.image.clone()).collect();
    let toks = model.image_tokens(&processor.preprocess_padded(&images)?, None)?;
    let per_image = toks.shape()[1];
    let mut rows = Vec::new();
    let mut labels = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        let (ids, lab) = encode(tok, &s.question, &s.answer, eos, per_image)?;
        let t = ids.len();
        let x = model.embed(
            &Tensor::from_vec(ids, &[1, t])?,
            Some(&toks.narrow(0, i, 1)?),
        )?;
        rows.push(x);
        labels.push(lab);
    }
    let t_max = labels.iter().map(Vec::len).max().unwrap_or(0);
    let hidden = model.language_model().config().hidden_size;
    let mut padded = Vec::new();
    let mut flat = Vec::new();
    for (x, mut lab) in rows.into_iter().zip(labels) {
        let t = lab.len();
        // right padding: causal attention never lets a real position see it
        padded.push(if t < t_max {
            Tensor::cat(
                &[
                    x,
                    Tensor::zeros(&[1, t_max - t, hidden], DType::F32, mgm_tensor::Device::Cpu)?,
                ],
                1,
            )?
        } else {
            x
        });
        lab.resize(t_max, IGNORE_INDEX);
        flat.extend(lab);
    }
    let b = padded.len();
    let x = Tensor::cat(&padded, 0)?;
    let logits = model.language_model().forward_embeds(&x, None)?;
    let labels = Tensor::from_vec(flat, &[b, t_max])?;
    // tokens through the decoder, padding included: what the step's time was spent on
    Ok((causal_lm_loss(&logits, &labels, 0.0)?, b * t_max))
}

/// The linear head of [`Objective::Scene`]: image token -> shape (or none) and colour (or
/// none) logits.
struct SceneHead {
    vars: Vec<(String, mgm_tensor::Var)>,
}

impl SceneHead {
    fn new(hidden: usize, seed: u64) -> Result<SceneHead> {
        let mut vars = Vec::new();
        for (k, (name, n)) in [
            ("shape", crate::shapes::SHAPES.len() + 1),
            ("colour", crate::shapes::COLOURS.len() + 1),
        ]
        .into_iter()
        .enumerate()
        {
            // PyTorch's nn.Linear init: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias
            let bound = 1.0 / (hidden as f64).sqrt();
            for (part, shape) in [("weight", vec![hidden, n]), ("bias", vec![n])] {
                let t = Tensor::rand_uniform(
                    seed.wrapping_add(7919 * (2 * k as u64 + u64::from(part == "bias"))),
                    &shape,
                    -bound,
                    bound,
                    DType::F32,
                    mgm_tensor::Device::Cpu,
                )?;
                vars.push((
                    format!("scene_head.{name}.{part}"),
                    mgm_tensor::Var::from_tensor(&t)?,
                ));
            }
        }
        Ok(SceneHead { vars })
    }

    /// Logits `[N, classes]` of head `k` (0 shape, 1 colour) for tokens `[N, hidden]`.
    fn logits(&self, k: usize, x: &Tensor) -> Result<Tensor> {
        let w = self.vars[2 * k].1.as_tensor();
        let b = self.vars[2 * k + 1].1.as_tensor();
        Ok(x.matmul(&w)?.add(&b)?)
    }
}

/// The [`Objective::Scene`] loss of samples `first..first + n` of the training split: the
/// mean of the shape and the colour cross-entropies over every image token.
fn scene_loss(
    model: &Mgm,
    head: &SceneHead,
    processor: &ImageProcessor,
    cfg: &TrainConfig,
    first: u64,
) -> Result<(Tensor, usize)> {
    let samples: Vec<_> = (0..cfg.batch_size as u64)
        .map(|i| crate::shapes::sample(cfg.seed, first + i, cfg.image_size))
        .collect();
    let images: Vec<_> = samples.iter().map(|s| s.image.clone()).collect();
    let toks = model.image_tokens(&processor.preprocess_padded(&images)?, None)?;
    let (b, n, hidden) = (toks.shape()[0], toks.shape()[1], toks.shape()[2]);
    if n != crate::shapes::PLACES.len() {
        return Err(Error::Input {
            name: "objective".into(),
            msg: format!(
                "\"scene\" needs one image token per quadrant (a 2 x 2 grid), the model makes {n}"
            ),
        });
    }
    let (mut shapes, mut colours) = (Vec::with_capacity(b * n), Vec::with_capacity(b * n));
    for s in &samples {
        for q in 0..n {
            let o = s.objects.iter().find(|o| o.quadrant == q);
            shapes.push(o.map_or(0, |o| o.shape as i64 + 1));
            colours.push(o.map_or(0, |o| o.colour as i64 + 1));
        }
    }
    let x = toks.reshape(&[b * n, hidden])?;
    let ce = |k: usize, y: Vec<i64>| -> Result<Tensor> {
        let y = Tensor::from_vec(y, &[b * n])?;
        Ok(head.logits(k, &x)?.cross_entropy(&y, IGNORE_INDEX, 0.0)?)
    };
    let loss = ce(0, shapes)?.add(&ce(1, colours)?)?.mul_scalar(0.5)?;
    Ok((loss, b * n))
}

/// The optimizer of stage `s`: its groups with an lr, the other groups' parameters frozen.
fn stage_optimizer(
    vars: Vec<(String, mgm_tensor::Var)>,
    cfg: &TrainConfig,
    s: &StageConfig,
) -> Result<Optimizer> {
    let group_of = |name: &str| {
        cfg.group_order.iter().find(|g| {
            cfg.groups[*g]
                .patterns
                .iter()
                .any(|p| mgm_train::optim::glob(p, name))
        })
    };
    let mut frozen = Vec::new();
    let mut groups = Vec::new();
    for g in &cfg.group_order {
        if let Some(&lr) = s.lr.get(g) {
            groups.push(
                GroupSpec::new(g, &[], lr)
                    .betas(cfg.betas.0, cfg.betas.1)
                    .weight_decay(cfg.weight_decay),
            );
        }
    }
    // each trained parameter goes to its group by exact name
    for (name, _) in &vars {
        match group_of(name) {
            Some(g) if s.lr.contains_key(g) => {
                let spec = groups
                    .iter_mut()
                    .find(|x| &x.name == g)
                    .expect("made above");
                spec.patterns.push(name.clone());
            }
            Some(_) => frozen.push(name.clone()),
            None => {
                return Err(Error::Input {
                    name: "groups".into(),
                    msg: format!("parameter {name:?} matches no group in group_order"),
                });
            }
        }
    }
    groups.retain(|g| !g.patterns.is_empty());
    let frozen: Vec<&str> = frozen.iter().map(String::as_str).collect();
    Ok(Optimizer::adamw(vars, groups, &frozen)?)
}

/// Where a run writes.
pub struct RunDirs {
    /// The output root.
    pub out: PathBuf,
}

impl RunDirs {
    fn checkpoints(&self) -> PathBuf {
        self.out.join("checkpoints")
    }
    /// The final model directory.
    pub fn model(&self) -> PathBuf {
        self.out.join("model")
    }
    fn metrics(&self) -> PathBuf {
        self.out.join("metrics.jsonl")
    }
}

/// Trains the model of `cfg` through its stages into `dirs`, resuming from the latest
/// checkpoint when `resume` (and one exists). `stop_after` ends the run after that many steps
/// of this invocation (a checkpoint is written there), for tests of resuming. `on_step` sees
/// every step. Returns the final model directory (written only when all stages are done).
pub fn train(
    cfg: &TrainConfig,
    dirs: &RunDirs,
    resume: bool,
    stop_after: Option<u64>,
    mut on_step: impl FnMut(&StepInfo),
) -> Result<Option<PathBuf>> {
    let model = Mgm::new_trainable(&cfg.spec(), cfg.seed)?;
    let head = SceneHead::new(model.language_model().config().hidden_size, cfg.seed)?;
    // every parameter the run trains: the scene head's too when a stage uses it
    let uses_head = cfg.stage.iter().any(|s| s.objective == Objective::Scene);
    let head_vars = || {
        if uses_head {
            head.vars.clone()
        } else {
            Vec::new()
        }
    };
    let all_vars = || {
        let mut v = model.trainable_vars();
        v.extend(head_vars());
        v
    };
    std::fs::create_dir_all(&dirs.out).map_err(|e| Error::Io {
        path: dirs.out.display().to_string(),
        source: e,
    })?;
    write_tokenizer(&dirs.out)?;
    let tok = Tokenizer::from_dir(&dirs.out)?;
    let vocab = model.language_model().config().vocab_size;
    if tok.vocab_size() > vocab {
        return Err(Error::Input {
            name: "model.text.vocab_size".into(),
            msg: format!(
                "{vocab} is smaller than the tokenizer's {} ids (mgm::shapes::tokenizer)",
                tok.vocab_size()
            ),
        });
    }
    let processor = ImageProcessor::clip(cfg.image_size);
    let ckpts = dirs.checkpoints();
    // where to start: (stage, step within it, global step)
    let mut start = (0usize, 0u64);
    let mut restored: Option<PathBuf> = None;
    if resume && let Some(c) = checkpoint::latest(&ckpts)? {
        let meta = c.join("trainer_state.json");
        let text = std::fs::read_to_string(&meta).map_err(|e| Error::Io {
            path: meta.display().to_string(),
            source: e,
        })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: meta.display().to_string(),
            msg: format!("not valid JSON: {e}"),
        })?;
        start = (
            v["extra"]["stage"].as_u64().unwrap_or(0) as usize,
            v["extra"]["stage_step"].as_u64().unwrap_or(0),
        );
        restored = Some(c);
    }
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dirs.metrics())
        .map_err(|e| Error::Io {
            path: dirs.metrics().display().to_string(),
            source: e,
        })?;
    let t0 = Instant::now();
    let mut done_here = 0u64;
    let mut global: u64 = cfg.stage[..start.0].iter().map(|s| s.steps).sum::<u64>() + start.1;
    for (si, stage) in cfg.stage.iter().enumerate().skip(start.0) {
        let opt = stage_optimizer(all_vars(), cfg, stage)?;
        let warmup = stage.warmup.unwrap_or(stage.steps / 20);
        let mut trainer = Trainer::new(
            opt,
            Schedule::WarmupCosine {
                warmup,
                total: stage.steps,
                min_ratio: 0.05,
            },
        );
        trainer.clip = Some(cfg.clip_norm);
        if let Some(c) = restored.take().filter(|_| si == start.0) {
            let weights = if start.1 == 0 {
                // written at the previous stage's end: the weights, and a fresh optimizer
                checkpoint::load_weights(&c)?
            } else {
                let (st, weights) = checkpoint::load(&c, &mut trainer.opt)?;
                trainer.step = st.extra["trainer_step"].as_u64().unwrap_or(0);
                weights
            };
            for (name, var) in all_vars() {
                let w = weights.get(&name).ok_or_else(|| Error::Input {
                    name: c.display().to_string(),
                    msg: format!("the checkpoint has no {name:?}"),
                })?;
                var.set(w)?;
            }
        }
        let first_step = if si == start.0 { start.1 } else { 0 };
        for k in first_step..stage.steps {
            let ts = Instant::now();
            let sample0 = global * cfg.batch_size as u64;
            let mut tokens = 0;
            let r = trainer.step(&[1.0], |_| {
                let (l, n) = match stage.objective {
                    Objective::Answers => {
                        batch_loss(&model, &tok, &processor, cfg, sample0, stage.captions)
                    }
                    Objective::Scene => scene_loss(&model, &head, &processor, cfg, sample0),
                }
                .map_err(|e| mgm_train::Error::Input(e.to_string()))?;
                tokens = n;
                Ok(l)
            })?;
            global += 1;
            done_here += 1;
            let lr0 = trainer
                .opt
                .groups()
                .first()
                .map_or(0.0, |g| g.lr * r.lr_factor);
            let info = StepInfo {
                step: global,
                stage: stage.name.clone(),
                loss: r.loss,
                lr: lr0,
                grad_norm: r.grad_norm,
                tokens_per_s: tokens as f64 / ts.elapsed().as_secs_f64(),
                elapsed_s: t0.elapsed().as_secs_f64(),
            };
            use std::io::Write;
            writeln!(
                metrics,
                "{}",
                serde_json::to_string(&info).expect("plain values")
            )
            .map_err(|e| Error::Io {
                path: dirs.metrics().display().to_string(),
                source: e,
            })?;
            on_step(&info);
            let last = k + 1 == stage.steps;
            let stopping = stop_after.is_some_and(|n| done_here >= n);
            if last || stopping || (k + 1) % cfg.checkpoint_every.max(1) == 0 {
                let (ns, nk) = if last { (si + 1, 0) } else { (si, k + 1) };
                let detached = |vars: Vec<(String, mgm_tensor::Var)>| -> Vec<(String, Tensor)> {
                    vars.into_iter()
                        .map(|(n, v)| (n, v.as_tensor().detach()))
                        .collect()
                };
                let weights = detached(model.trainable_vars());
                // the scene head is not part of the model: model.safetensors stays loadable
                let train_only = detached(head_vars());
                // named by the global step; the stage's own step count rides along
                let state = TrainerState {
                    step: global,
                    scaler: None,
                    extra: serde_json::json!({"stage": ns, "stage_step": nk,
                                              "trainer_step": if last { 0 } else { trainer.step }}),
                };
                let c = checkpoint::save_with_train_only(
                    &ckpts,
                    &weights,
                    &train_only,
                    &trainer.opt,
                    &state,
                )?;
                // a checkpoint is also a model directory: `mgm generate --model` runs it
                model.save_config(&c)?;
                write_tokenizer(&c)?;
            }
            if stopping && !last {
                return Ok(None);
            }
        }
    }
    let out = dirs.model();
    model.save(&out)?;
    write_tokenizer(&out)?;
    Ok(Some(out))
}

/// The held-out split of a training seed (never the training split itself).
pub fn held_out_seed(seed: u64) -> u64 {
    seed.wrapping_add(1_000_003)
}

/// Exact-match accuracy of the model in `dir` on `n` questions of split `seed` (see
/// [`held_out_seed`]), rendered at the model's `image_size_aux` and answered by greedy
/// generation as `mgm generate` does; also the count per question kind. Question i + 1's
/// image is encoded while question i decodes (mgm-umm's pipeline).
pub fn evaluate(dir: &Path, seed: u64, n: u64) -> Result<Accuracy> {
    let model = Mgm::from_dir(dir, &TowerDirs::default(), None)?;
    let image_size = model.config().image_size_aux;
    let tok = Tokenizer::from_dir(dir)?;
    let processor = ImageProcessor::clip(model.config().image_size_aux);
    let lm = model.language_model();
    // encode question i + 1's image while question i decodes (mgm-umm's pipeline)
    let encode = |&i: &u64| -> Result<(crate::shapes::Sample, Tensor, Vec<u32>)> {
        let s = crate::shapes::sample(seed, i, image_size);
        let text = crate::llava::with_markers(&s.question, 1);
        let (ids, history) = crate::llava::prompt_ids(&tok, &text, 1, 1, IMAGE_TOKEN_INDEX, true)?;
        let t = ids.len();
        let toks = model.image_tokens(
            &processor.preprocess_padded(std::slice::from_ref(&s.image))?,
            None,
        )?;
        let x = model.embed(&Tensor::from_vec(ids, &[1, t])?, Some(&toks))?;
        Ok((s, x, history))
    };
    let decode = |(s, x, history): (crate::shapes::Sample, Tensor, Vec<u32>)| -> Result<_> {
        let g = Generation::from_embeds(lm, &x, vec![history], GenerateOptions::greedy(lm, 16))?;
        let mut out = Vec::new();
        for step in g {
            out.push(step?[0]);
        }
        let stop = &lm.config().eos_token_ids;
        let answer: Vec<u32> = out.into_iter().take_while(|t| !stop.contains(t)).collect();
        Ok((s, tok.decode(&answer, true)?))
    };
    let answers = mgm_umm::pipeline::run(
        (0..n).collect(),
        mgm_umm::pipeline::PipelineOptions::default(),
        encode,
        decode,
    )
    .map_err(|e| match e {
        mgm_umm::pipeline::PipelineError::Stage(e) => e,
        mgm_umm::pipeline::PipelineError::Config(e) => Error::Input {
            name: "evaluate".into(),
            msg: e.to_string(),
        },
    })?;
    let mut acc = Accuracy::default();
    for (s, text) in answers {
        let kind = s.question.split(' ').take(2).collect::<Vec<_>>().join(" ");
        let e = acc.by_kind.entry(kind).or_insert((0, 0));
        e.1 += 1;
        acc.total += 1;
        if text.trim() == s.answer {
            acc.correct += 1;
            e.0 += 1;
        }
    }
    Ok(acc)
}

/// Exact-match counts.
#[derive(Clone, Debug, Default)]
pub struct Accuracy {
    /// Right answers.
    pub correct: u64,
    /// Questions.
    pub total: u64,
    /// (right, asked) by the question's first two words.
    pub by_kind: BTreeMap<String, (u64, u64)>,
}

impl Accuracy {
    /// correct / total.
    pub fn ratio(&self) -> f64 {
        self.correct as f64 / self.total.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes_toml() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/shapes.toml")
    }

    /// configs/shapes.toml with a small batch.
    fn shapes_config(batch_size: usize) -> TrainConfig {
        let mut cfg = TrainConfig::from_file(&shapes_toml()).unwrap();
        cfg.batch_size = batch_size;
        cfg
    }

    /// The tokenizer `train` writes, loaded from a temporary directory (kept alive by the
    /// first value).
    fn shapes_tokenizer() -> (tempfile::TempDir, Tokenizer) {
        let dir = tempfile::tempdir().unwrap();
        write_tokenizer(dir.path()).unwrap();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        (dir, tok)
    }

    /// The whole shapes model's loss gradient with respect to parameters of every part (both
    /// towers, mining, projector, decoder) against central differences of the loss.
    #[test]
    fn gradients_of_every_part_match_finite_differences() {
        let cfg = shapes_config(2);
        let model = Mgm::new_trainable(&cfg.spec(), 3).unwrap();
        let (_dir, tok) = shapes_tokenizer();
        let processor = ImageProcessor::clip(cfg.image_size);
        let loss = || {
            batch_loss(&model, &tok, &processor, &cfg, 5, 0.0)
                .unwrap()
                .0
        };
        let grads = loss().backward().unwrap();
        let vars = model.trainable_vars();
        let n = cfg.model.clip["num_hidden_layers"].as_u64().unwrap();
        let last_clip_layer = format!("vision_model.encoder.layers.{}.", n - 1);
        let mut checked = 0;
        let mut worst = Vec::new();
        for (name, var) in &vars {
            let g = grads.get_var(var).map(|g| g.to_vec_f64().unwrap());
            let w = var.as_tensor().detach().to_vec_f64().unwrap();
            let Some(g) = g else {
                // what MGM never reads: CLIP's last layer and final norm (features come from
                // the second-to-last layer) and ConvNeXt's pooled-output norm
                let unused = name.contains(&last_clip_layer)
                    || name.contains("post_layernorm")
                    || name.contains("clip_model.layernorm");
                if !unused {
                    worst.push(format!("{name}: no gradient"));
                }
                continue;
            };
            // the entry with the largest gradient, where a finite difference is well above noise
            let (i, gi) = g
                .iter()
                .copied()
                .enumerate()
                .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                .unwrap();
            if gi.abs() < 1e-3 {
                continue;
            }
            let eps = 1e-2 * (1.0 + w[i].abs());
            let at = |v: f64| {
                let mut w2 = w.clone();
                w2[i] = v;
                var.set(
                    &Tensor::from_vec(
                        w2.iter().map(|&x| x as f32).collect::<Vec<_>>(),
                        var.as_tensor().shape(),
                    )
                    .unwrap(),
                )
                .unwrap();
                mgm_tensor::no_grad(|| loss().to_vec_f64().unwrap()[0])
            };
            let fd = (at(w[i] + eps) - at(w[i] - eps)) / (2.0 * eps);
            at(w[i]);
            let rel = (fd - gi).abs() / gi.abs().max(fd.abs());
            if rel > 0.1 {
                worst.push(format!(
                    "{name}[{i}]: autograd {gi:.4e}, finite difference {fd:.4e}"
                ));
            }
            checked += 1;
        }
        assert!(
            checked > 20,
            "only {checked} parameters had a measurable gradient"
        );
        assert!(worst.is_empty(), "{}", worst.join("\n"));
    }

    /// The per-entry check above skips every parameter whose largest gradient is below 1e-3,
    /// which is most of the towers': here each part's whole gradient is checked along a random
    /// direction (g . d against (L(w + e d) - L(w - e d)) / 2e), captions and scene loss included.
    #[test]
    fn each_parts_gradient_matches_a_directional_finite_difference() {
        let cfg = shapes_config(2);
        let model = Mgm::new_trainable(&cfg.spec(), 3).unwrap();
        let head = SceneHead::new(model.language_model().config().hidden_size, 3).unwrap();
        let (_dir, tok) = shapes_tokenizer();
        let processor = ImageProcessor::clip(cfg.image_size);
        let mut vars = model.trainable_vars();
        vars.extend(head.vars.iter().cloned());
        let mut bad = Vec::new();
        for objective in [Objective::Answers, Objective::Scene] {
            let loss = || {
                match objective {
                    Objective::Answers => batch_loss(&model, &tok, &processor, &cfg, 5, 1.0),
                    Objective::Scene => scene_loss(&model, &head, &processor, &cfg, 5),
                }
                .unwrap()
                .0
            };
            let grads = loss().backward().unwrap();
            let parts: &[&str] = match objective {
                Objective::Answers => &[
                    "model.vision_tower.",
                    "model.vision_tower_aux.",
                    "model.vlm_uni",
                    "model.mm_projector",
                    "model.layers",
                ],
                Objective::Scene => &["model.vision_tower_aux.", "scene_head"],
            };
            for prefix in parts {
                let sel: Vec<_> = vars.iter().filter(|(n, _)| n.starts_with(prefix)).collect();
                let mut gd = 0.0;
                let mut dirs = Vec::new();
                for (k, (_, var)) in sel.iter().enumerate() {
                    let w = var.as_tensor().detach().to_vec_f64().unwrap();
                    // each entry moved in proportion to its tensor's scale, so that a step
                    // of eps changes every part by the same relative amount
                    let rms = (w.iter().map(|x| x * x).sum::<f64>() / w.len() as f64)
                        .sqrt()
                        .max(1e-2);
                    let d = Tensor::randn(
                        77 + k as u64,
                        &[w.len()],
                        0.0,
                        rms,
                        DType::F64,
                        mgm_tensor::Device::Cpu,
                    )
                    .unwrap()
                    .to_vec_f64()
                    .unwrap();
                    if let Some(g) = grads.get_var(var) {
                        let g = g.to_vec_f64().unwrap();
                        gd += g.iter().zip(&d).map(|(a, b)| a * b).sum::<f64>();
                    }
                    dirs.push((w, d));
                }
                let at = |e: f64| {
                    for ((_, var), (w, d)) in sel.iter().zip(&dirs) {
                        let v: Vec<f32> =
                            w.iter().zip(d).map(|(a, b)| (a + e * b) as f32).collect();
                        var.set(&Tensor::from_vec(v, var.as_tensor().shape()).unwrap())
                            .unwrap();
                    }
                    mgm_tensor::no_grad(|| loss().to_vec_f64().unwrap()[0])
                };
                let eps = 1e-2;
                let (up, down) = (at(eps), at(-eps));
                let fd = (up - down) / (2.0 * eps);
                at(0.0);
                let rel = (fd - gd).abs() / gd.abs().max(fd.abs());
                // the loss must move well above its f32 rounding (5e-7 here) for the check to mean much
                if rel.is_nan() || rel >= 0.03 || (up - down).abs() < 2e-5 {
                    bad.push(format!(
                        "{objective:?} {prefix}: autograd {gd:.5e}, finite difference {fd:.5e} \
                         (loss {down:.6} .. {up:.6})"
                    ));
                }
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    #[test]
    fn the_scene_objective_needs_a_token_per_quadrant() {
        let mut cfg = shapes_config(1);
        cfg.model.clip["patch_size"] = serde_json::json!(8); // 4 x 4 tokens
        let model = Mgm::new_trainable(&cfg.spec(), 3).unwrap();
        let head = SceneHead::new(model.language_model().config().hidden_size, 3).unwrap();
        let processor = ImageProcessor::clip(cfg.image_size);
        let e = scene_loss(&model, &head, &processor, &cfg, 0)
            .expect_err("16 tokens are not 4 quadrants")
            .to_string();
        assert!(
            e.contains("one image token per quadrant") && e.contains("16"),
            "{e}"
        );
    }

    #[test]
    fn a_bad_stage_is_a_config_error_that_names_it() {
        let text = std::fs::read_to_string(shapes_toml()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.toml");
        for (from, to, want) in [
            (
                "captions = 0.5",
                "captions = 1.5",
                "\"decoder\": captions = 1.5 is not a fraction",
            ),
            ("objective = \"scene\"", "objective = \"sceen\"", "sceen"),
        ] {
            assert!(text.contains(from));
            std::fs::write(&p, text.replacen(from, to, 1)).unwrap();
            let e = TrainConfig::from_file(&p).unwrap_err().to_string();
            assert!(e.contains("bad.toml") && e.contains(want), "{e}");
        }
    }
}
