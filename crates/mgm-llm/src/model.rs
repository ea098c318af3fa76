//! The decoder shared by the four families: embeddings (scaled for Gemma), pre-norm layers of
//! grouped-query attention with rotary positions and a gated MLP (a mixture of experts for
//! Mixtral), a final RMSNorm and the LM head (tied to the embeddings when the config says so).
//!
//! Two ways to run it:
//! - [`CausalLm::forward`]: a whole sequence as tensor ops (autograd flows when the weights are
//!   trainable), like `model(input_ids, attention_mask=..., position_ids=...)` in transformers;
//! - [`CausalLm::step`]: inference with a [`KvCache`], the prompt in one call (prefill) and
//!   then one token per call (decode), appending to the cache in place.
//!
//! Weights load by transformers' names (`model.embed_tokens.weight`,
//! `model.layers.N.self_attn.q_proj.weight`, ..., `lm_head.weight`); Mixtral's experts by the
//! Hub checkpoints' `block_sparse_moe.experts.E.{w1,w2,w3}` names (see [`crate::mixtral`]).

use std::path::Path;

use mgm_kernels::quant::QuantFormat;
use mgm_tensor::nn::{Activation, Embedding, Linear, Module, Param, RmsNorm, VarStore};
use mgm_tensor::safetensors::Residency;
use mgm_tensor::{DType, Tensor, needs_grad};
use rayon::prelude::*;

use crate::cache::{KvCache, PagedKvCache, SeqId};
use crate::config::{Arch, DecoderConfig};
use crate::mixtral::Moe;
use crate::rope::{Rope, RopeState, rotate_with};
use crate::{Error, Result};

/// Query rows per (row, kv head) up to which a cached step runs the decode kernel; longer
/// blocks (prefill) run the fused tensor attention.
const DECODE_ROWS: usize = 32;

/// The gated MLP `down(act(gate(x)) * up(x))`.
#[derive(Clone, Debug)]
pub(crate) struct Mlp {
    pub(crate) gate: Linear,
    pub(crate) up: Linear,
    pub(crate) down: Linear,
    pub(crate) act: Activation,
}

impl Mlp {
    /// `residual + down(act(gate(x)) * up(x))` (the residual fused into `down` when given).
    pub(crate) fn forward(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let gu = Linear::forward_many(
            x,
            &[(&self.gate, self.act), (&self.up, Activation::Identity)],
        )?;
        Ok(self
            .down
            .forward_fused(&gu[0].mul(&gu[1])?, Activation::Identity, residual)?)
    }
}

/// The feed-forward half of a layer.
#[derive(Clone, Debug)]
enum Ffn {
    Mlp(Mlp),
    Moe(Moe),
}

/// Grouped-query self-attention with rotary positions.
#[derive(Clone, Debug)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    window: Option<usize>,
}

#[derive(Clone, Debug)]
struct Layer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    ffn: Ffn,
}

/// A decoder-only causal language model.
#[derive(Clone, Debug)]
pub struct CausalLm {
    config: DecoderConfig,
    /// config.json as read (written back by [`CausalLm::save`]).
    config_json: serde_json::Value,
    embed: Embedding,
    /// Gemma multiplies the embeddings by `sqrt(hidden)` (rounded to the compute dtype).
    embed_scale: Option<f32>,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
}

/// Where the tokens of one call sit: per (row, token) its position id and whether it is a real
/// token (`attention_mask` 1) or padding.
#[derive(Clone, Debug)]
pub struct Positions {
    /// `[B * T]` position ids (rotary angle index).
    pub ids: Vec<usize>,
    /// `[B * T]` true for real tokens.
    pub valid: Vec<bool>,
}

impl Positions {
    /// Positions `offset..offset + T` for every row, no padding.
    pub fn contiguous(batch: usize, t: usize, offset: usize) -> Positions {
        Positions {
            ids: (0..batch).flat_map(|_| offset..offset + t).collect(),
            valid: vec![true; batch * t],
        }
    }

    /// From an `attention_mask` `[B, T]` (1 = token, 0 = padding), the way transformers 5.x's
    /// `generate` numbers a left-padded batch: `cumsum(mask) - 1`, padding at 0 (4.x used 1).
    pub fn from_mask(mask: &[i64], batch: usize, t: usize) -> Positions {
        let mut ids = vec![0; batch * t];
        let mut valid = vec![false; batch * t];
        for b in 0..batch {
            let mut seen = 0usize;
            for j in 0..t {
                let m = mask[b * t + j] != 0;
                valid[b * t + j] = m;
                if m {
                    ids[b * t + j] = seen;
                    seen += 1;
                }
            }
        }
        Positions { ids, valid }
    }
}

impl CausalLm {
    /// Loads `dir/config.json` and the weights (`model.safetensors` or a sharded
    /// `model.safetensors.index.json`, memory-mapped).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<CausalLm> {
        Self::from_dir_with(dir, Residency::Mapped)
    }

    /// [`CausalLm::from_dir`] with the weight files held as `residency` says
    /// ([`Residency::Resident`]: read once into huge pages, for faster decoding).
    ///
    /// ```no_run
    /// use mgm_tensor::safetensors::Residency;
    /// let model = mgm_llm::CausalLm::from_dir_with("path/to/llama", Residency::Resident)?;
    /// # Ok::<(), mgm_llm::Error>(())
    /// ```
    pub fn from_dir_with(dir: impl AsRef<Path>, residency: Residency) -> Result<CausalLm> {
        let dir = dir.as_ref();
        let config = DecoderConfig::from_file(dir.join("config.json"))?;
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let vs = if index.exists() {
            VarStore::from_safetensors_index_with(&index, residency)?
        } else if single.exists() {
            VarStore::from_safetensors_with(&[&single], residency)?
        } else {
            return Err(Error::Io {
                path: single.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors or model.safetensors.index.json in the model directory",
                ),
            });
        };
        let vs = vs.with_dtype(DType::F32);
        let mut model = Self::load(&vs, &config)?;
        let cfg_path = dir.join("config.json");
        model.config_json = std::fs::read_to_string(&cfg_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null);
        // rotary buffers some checkpoints store
        vs.finish_ignoring(|n| n.ends_with("rotary_emb.inv_freq"))?;
        Ok(model)
    }

    /// A model of `config` with random weights (PyTorch's default init, from `seed`), loaded
    /// for inference: the LLaMA-shaped stand-in that benches and tests decode with.
    ///
    /// ```
    /// let cfg = mgm_llm::DecoderConfig::from_json_str(
    ///     r#"{"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
    ///         "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}"#,
    ///     "example",
    /// )?;
    /// let model = mgm_llm::CausalLm::random(&cfg, 0)?;
    /// let logits = model.forward(&mgm_tensor::Tensor::from_vec(vec![1i64, 2], &[1, 2])?, None)?;
    /// assert_eq!(logits.shape(), &[1, 2, 64]);
    /// # Ok::<(), mgm_llm::Error>(())
    /// ```
    pub fn random(config: &DecoderConfig, seed: u64) -> Result<CausalLm> {
        let vs = VarStore::new_trainable(seed);
        CausalLm::load(&vs, config)?;
        let weights = vs
            .all_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().detach()))
            .collect();
        CausalLm::load(&VarStore::from_tensors(weights)?, config)
    }

    /// Builds the model from `vs` by transformers' names; a trainable store creates missing
    /// parameters (a model to train from scratch).
    pub fn load(vs: &VarStore, config: &DecoderConfig) -> Result<CausalLm> {
        let c = config;
        let (h, d) = (c.hidden_size, c.head_dim);
        let root = vs.pp("model");
        let embed = Embedding::load(&root.pp("embed_tokens"), c.vocab_size, h)?;
        let gemma = c.arch == Arch::Gemma;
        let norm = |v: &VarStore| {
            if gemma {
                RmsNorm::load_gemma(v, h, c.rms_norm_eps)
            } else {
                RmsNorm::load(v, h, c.rms_norm_eps)
            }
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let l = root.pp(&format!("layers.{i}"));
            let at = l.pp("self_attn");
            let proj = |name: &str, inp: usize, out: usize, bias: bool| {
                Linear::load_mapped(&at.pp(name), inp, out, bias)
            };
            let attn = Attention {
                q: proj("q_proj", h, c.num_attention_heads * d, c.attention_bias)?,
                k: proj("k_proj", h, c.num_key_value_heads * d, c.attention_bias)?,
                v: proj("v_proj", h, c.num_key_value_heads * d, c.attention_bias)?,
                o: proj("o_proj", c.num_attention_heads * d, h, c.attention_bias)?,
                heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
                head_dim: d,
                window: c.sliding_window,
            };
            let ffn = if c.arch == Arch::Mixtral {
                Ffn::Moe(Moe::load(&l.pp("block_sparse_moe"), c)?)
            } else {
                let m = l.pp("mlp");
                let lin = |name: &str, inp: usize, out: usize| {
                    Linear::load_mapped(&m.pp(name), inp, out, c.mlp_bias)
                };
                Ffn::Mlp(Mlp {
                    gate: lin("gate_proj", h, c.intermediate_size)?,
                    up: lin("up_proj", h, c.intermediate_size)?,
                    down: lin("down_proj", c.intermediate_size, h)?,
                    act: c.hidden_act,
                })
            };
            layers.push(Layer {
                input_norm: norm(&l.pp("input_layernorm"))?,
                attn,
                post_norm: norm(&l.pp("post_attention_layernorm"))?,
                ffn,
            });
        }
        let final_norm = norm(&root.pp("norm"))?;
        let lm_head = if c.tie_word_embeddings && !vs.contains("lm_head.weight.qdata") {
            // a checkpoint may still carry the tied copy
            vs.mark_used("lm_head.weight");
            match embed.weight() {
                Param::Frozen(w) => Linear::new_mapped(w.clone(), None)?,
                p => Linear::new(p.clone(), None)?,
            }
        } else {
            Linear::load_mapped(&vs.pp("lm_head"), h, c.vocab_size, false)?
        };
        let rot = ((d as f64) * c.partial_rotary_factor) as usize;
        let rope = Rope::new(rot, c.rope_theta, c.rope_scaling, c.max_position_embeddings);
        let embed_scale = gemma.then(|| (h as f64).sqrt() as f32);
        Ok(CausalLm {
            config: c.clone(),
            config_json: serde_json::Value::Null,
            embed,
            embed_scale,
            layers,
            norm: final_norm,
            lm_head,
            rope,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }

    /// Every linear layer with its checkpoint name (the MoE routers, tiny and sensitive, are
    /// left out of quantization but included here).
    fn linears(&self) -> Vec<(String, &Linear)> {
        let mut v = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &l.attn;
            for (n, lin) in [
                ("q_proj", &a.q),
                ("k_proj", &a.k),
                ("v_proj", &a.v),
                ("o_proj", &a.o),
            ] {
                v.push((format!("{p}.self_attn.{n}"), lin));
            }
            match &l.ffn {
                Ffn::Mlp(m) => {
                    for (n, lin) in [
                        ("gate_proj", &m.gate),
                        ("up_proj", &m.up),
                        ("down_proj", &m.down),
                    ] {
                        v.push((format!("{p}.mlp.{n}"), lin));
                    }
                }
                Ffn::Moe(m) => {
                    for (name, lin) in m.linears() {
                        v.push((format!("{p}.block_sparse_moe.{name}"), lin));
                    }
                }
            }
        }
        v.push(("lm_head".to_string(), &self.lm_head));
        v
    }

    /// The model with every projection quantized to `format`; the LM head to `format` for q8
    /// and to q8 for q4 (as llama.cpp keeps its output tensor at higher precision: the head's
    /// error lands on the logits undamped, and 4 bits cost about 8% there). Embeddings, norms
    /// and MoE routers stay f32.
    pub fn quantize(&self, format: QuantFormat) -> Result<CausalLm> {
        if let Some(have) = self.quantization().filter(|&f| f != format) {
            return Err(Error::input(
                "quantize",
                format!(
                    "the model is stored quantized to {}; it cannot be requantized to {} \
                     (start from the f32 checkpoint)",
                    have.name(),
                    format.name()
                ),
            ));
        }
        let q = |l: &Linear| l.quantize(format).map_err(Error::from);
        let mut m = self.clone();
        for l in &mut m.layers {
            let a = &mut l.attn;
            for lin in [&mut a.q, &mut a.k, &mut a.v, &mut a.o] {
                *lin = q(lin)?;
            }
            match &mut l.ffn {
                Ffn::Mlp(mlp) => {
                    for lin in [&mut mlp.gate, &mut mlp.up, &mut mlp.down] {
                        *lin = q(lin)?;
                    }
                }
                Ffn::Moe(moe) => moe.quantize_experts(format)?,
            }
        }
        m.lm_head = m.lm_head.quantize(QuantFormat::Q8)?;
        Ok(m)
    }

    /// The quantization of the projections, if they are all quantized to one format.
    pub fn quantization(&self) -> Option<QuantFormat> {
        let formats: Vec<Option<QuantFormat>> = self
            .linears()
            .iter()
            .filter(|(n, _)| !n.ends_with(".gate") && n != "lm_head")
            .map(|(_, l)| l.quantized().map(|q| q.format()))
            .collect();
        let first = *formats.first()?;
        formats
            .iter()
            .all(|f| *f == first)
            .then_some(first)
            .flatten()
    }

    /// Bytes of all weights as held in memory (embeddings, norms, projections, head).
    pub fn weight_bytes(&self) -> usize {
        let mut b: usize = self.linears().iter().map(|(_, l)| l.weight_bytes()).sum();
        let e = self.embed.weight().tensor();
        let tied_mapped = self.config.tie_word_embeddings && self.lm_head.quantized().is_none();
        if !tied_mapped {
            b += e.numel() * 4;
        }
        b + self.norm_bytes()
    }

    fn norm_bytes(&self) -> usize {
        let h = self.config.hidden_size * 4;
        h * (2 * self.layers.len() + 1)
    }

    /// Writes `dir/config.json` and `dir/model.safetensors` (quantized layers as
    /// `NAME.weight.qdata` + `NAME.weight.qscale`, which [`CausalLm::from_dir`] reads back in
    /// place, without a copy). The tokenizer files are not written (copy them alongside).
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let mut tensors: Vec<(String, Tensor)> = vec![(
            "model.embed_tokens.weight".into(),
            self.embed.weight().tensor(),
        )];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            tensors.push((
                format!("{p}.input_layernorm.weight"),
                l.input_norm.weight().tensor(),
            ));
            tensors.push((
                format!("{p}.post_attention_layernorm.weight"),
                l.post_norm.weight().tensor(),
            ));
        }
        tensors.push(("model.norm.weight".into(), self.norm.weight().tensor()));
        for (name, lin) in self.linears() {
            if name == "lm_head" && self.config.tie_word_embeddings && lin.quantized().is_none() {
                continue;
            }
            match lin.quantized_tensors(&name)? {
                Some(ts) => tensors.extend(ts),
                None => {
                    let w = lin.weight().expect("not quantized, so it has a weight");
                    tensors.push((format!("{name}.weight"), w.tensor()));
                    if let Some(b) = lin.bias() {
                        tensors.push((format!("{name}.bias"), b.tensor()));
                    }
                }
            }
        }
        let path = dir.join("model.safetensors");
        mgm_tensor::safetensors::save(&path, tensors.iter().map(|(n, t)| (n.as_str(), t)))?;
        let mut cfg = self.config_json.clone();
        if let Some(f) = self.quantization() {
            cfg["mgm_quantization"] = serde_json::Value::from(f.name());
        }
        let text = serde_json::to_string_pretty(&cfg).expect("a JSON value serialises");
        std::fs::write(dir.join("config.json"), text).map_err(|source| Error::Io {
            path: dir.join("config.json").display().to_string(),
            source,
        })?;
        Ok(())
    }

    /// A cache for `batch` sequences of up to `capacity` tokens each (prompt plus new tokens).
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        if self.max_context().is_some_and(|m| capacity > m) {
            return Err(Error::input(
                "CausalLm::new_cache",
                format!(
                    "{capacity} tokens exceed the model's max_position_embeddings {}",
                    self.config.max_position_embeddings
                ),
            ));
        }
        Ok(KvCache::new(
            self.layers.len(),
            batch,
            self.config.num_key_value_heads,
            self.config.head_dim,
            capacity,
            self.rope.initial_state(),
        ))
    }

    /// The longest sequence the model takes: `max_position_embeddings`, or none for the
    /// `dynamic` rope type, which rescales past it.
    pub fn max_context(&self) -> Option<usize> {
        match self.config.rope_scaling {
            crate::config::RopeScaling::Dynamic { .. } => None,
            _ => Some(self.config.max_position_embeddings),
        }
    }

    /// The input embeddings of `ids` `[B, T]` (i64) as transformers 5's
    /// `get_input_embeddings()(ids)` returns them: `[B, T, hidden]`, Gemma's `sqrt(hidden)`
    /// scale applied. A vision-language model splices image features into these and runs
    /// [`CausalLm::forward_embeds`].
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_ids(ids)
    }

    /// The factor the embeddings are multiplied by (`sqrt(hidden)` for Gemma, rounded to f32),
    /// for models that scale spliced rows too (MGM does, as transformers 4.x's Gemma did).
    pub fn embed_scale(&self) -> Option<f32> {
        self.embed_scale
    }

    /// Embeddings of `ids` `[B, T]` (Gemma's scale applied).
    fn embed_ids(&self, ids: &Tensor) -> Result<Tensor> {
        check_ids(ids, self.config.vocab_size)?;
        let x = self.embed.forward(ids)?;
        Ok(match self.embed_scale {
            Some(s) => x.mul_scalar(f64::from(s))?,
            None => x,
        })
    }

    /// The logits `[B, T, V]` of a whole sequence as tensor ops (autograd when trainable):
    /// `input_ids` `[B, T]` (i64), positions from `pos` (default `0..T`; padded keys are never
    /// attended). Outputs at padded query positions are zeros-attention results, not
    /// transformers' (they are meaningless either way).
    pub fn forward(&self, input_ids: &Tensor, pos: Option<&Positions>) -> Result<Tensor> {
        let s = input_ids.shape();
        if s.len() != 2 {
            return Err(Error::input(
                "CausalLm::forward",
                format!("input_ids must be [batch, seq], got {s:?}"),
            ));
        }
        self.forward_embeds(&self.embed_ids(input_ids)?, pos)
    }

    /// [`CausalLm::forward`] from input embeddings `[B, T, hidden]` (as [`CausalLm::embed`]
    /// makes them, no further scaling), like transformers' `inputs_embeds`.
    pub fn forward_embeds(&self, embeds: &Tensor, pos: Option<&Positions>) -> Result<Tensor> {
        // one handoff to the pool per call instead of one per kernel (mgm_kernels::parallel)
        mgm_tensor::on_pool(|| self.forward_embeds_on_pool(embeds, pos))
    }

    fn forward_embeds_on_pool(&self, embeds: &Tensor, pos: Option<&Positions>) -> Result<Tensor> {
        let (b, t) = self.check_embeds("CausalLm::forward_embeds", embeds)?;
        let own;
        let pos = match pos {
            Some(p) => p,
            None => {
                own = Positions::contiguous(b, t, 0);
                &own
            }
        };
        if pos.ids.len() != b * t || pos.valid.len() != b * t {
            return Err(Error::input(
                "CausalLm::forward",
                format!(
                    "positions cover {} tokens, input_ids {b} x {t}",
                    pos.ids.len()
                ),
            ));
        }
        let mut state = self.rope.initial_state();
        self.rope
            .update(&mut state, pos.ids.iter().copied().max().unwrap_or(0));
        let mask = self.mask(b, t, 0, t, |bb, j| pos.valid[bb * t + j])?;
        let mut x = embeds.clone();
        for layer in &self.layers {
            let h = layer.input_norm.forward(&x)?;
            x = layer
                .attn
                .forward_seq(&h, &x, &self.rope, &state, pos, &mask)?;
            let h = layer.post_norm.forward(&x)?;
            x = layer.ffn_forward(&h, &x)?;
        }
        let x = self.norm.forward(&x)?;
        Ok(self.lm_head.forward(&x)?)
    }

    /// The additive mask `[B, 1, 1, T, L]` for queries at cache indices `start..start + t` over
    /// keys `0..L`: causal by index, the sliding window, and padded keys (`valid(b, j)` false).
    fn mask(
        &self,
        b: usize,
        t: usize,
        start: usize,
        l: usize,
        valid: impl Fn(usize, usize) -> bool,
    ) -> Result<Tensor> {
        let window = self.config.sliding_window;
        let mut m = vec![0f32; b * t * l];
        for bb in 0..b {
            for i in 0..t {
                let qi = start + i;
                for j in 0..l {
                    if !attends(window, qi, j, valid(bb, j)) {
                        m[(bb * t + i) * l + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(m, &[b, 1, 1, t, l])?)
    }

    /// One inference step with the cache: `input_ids` `[B, T]` new tokens at `pos` (real tokens
    /// and padding as in a prompt's attention mask). Returns the logits `[B, T, V]`.
    pub fn step(&self, input_ids: &Tensor, pos: &Positions, cache: &mut KvCache) -> Result<Tensor> {
        self.step_keep(input_ids, pos, cache, 0)
    }

    /// [`CausalLm::step`] returning the logits of the last `logits_to_keep` positions only
    /// (`[B, keep, V]`; 0 keeps all), like transformers' `logits_to_keep`: a prefill that
    /// only samples the next token skips the LM head on the rest of the prompt.
    pub fn step_keep(
        &self,
        input_ids: &Tensor,
        pos: &Positions,
        cache: &mut KvCache,
        logits_to_keep: usize,
    ) -> Result<Tensor> {
        let s = input_ids.shape();
        if s.len() != 2 || s[0] != cache.batch {
            return Err(Error::input(
                "CausalLm::step",
                format!(
                    "input_ids must be [{}, seq] for this cache, got {s:?}",
                    cache.batch
                ),
            ));
        }
        self.step_embeds_keep(&self.embed_ids(input_ids)?, pos, cache, logits_to_keep)
    }

    /// [`CausalLm::step_keep`] from input embeddings `[B, T, hidden]` (a prompt with image
    /// features spliced in; later steps feed ids again).
    pub fn step_embeds_keep(
        &self,
        embeds: &Tensor,
        pos: &Positions,
        cache: &mut KvCache,
        logits_to_keep: usize,
    ) -> Result<Tensor> {
        mgm_tensor::on_pool(|| self.step_embeds_on_pool(embeds, pos, cache, logits_to_keep))
    }

    fn step_embeds_on_pool(
        &self,
        embeds: &Tensor,
        pos: &Positions,
        cache: &mut KvCache,
        logits_to_keep: usize,
    ) -> Result<Tensor> {
        let (b, t) = self.check_embeds("CausalLm::step", embeds)?;
        if b != cache.batch {
            return Err(Error::input(
                "CausalLm::step",
                format!("a batch of {b} for a cache of {} sequences", cache.batch),
            ));
        }
        if pos.ids.len() != b * t || pos.valid.len() != b * t {
            return Err(Error::input(
                "CausalLm::step",
                format!(
                    "positions cover {} tokens, input_ids {b} x {t}",
                    pos.ids.len()
                ),
            ));
        }
        cache.reserve(t)?;
        if needs_grad(&[&self.embed.weight().tensor()]) {
            return Err(Error::input(
                "CausalLm::step",
                "the KV cache is for inference: run `forward` on a trainable model",
            ));
        }
        let start = cache.len;
        for bb in 0..b {
            for i in 0..t {
                cache.valid[bb * cache.capacity + start + i] = pos.valid[bb * t + i];
                cache.positions[bb * cache.capacity + start + i] = pos.ids[bb * t + i];
            }
        }
        let max_pos = pos.ids.iter().copied().max().unwrap_or(0);
        let mut state = std::mem::replace(&mut cache.rope, self.rope.initial_state());
        self.rope.update(&mut state, max_pos);
        let cos_sin: Vec<(Vec<f32>, Vec<f32>)> = pos
            .ids
            .iter()
            .map(|&p| self.rope.cos_sin(&state, p))
            .collect();
        cache.rope = state;
        let mut x = embeds.clone();
        for (li, layer) in self.layers.iter().enumerate() {
            let h = layer.input_norm.forward(&x)?;
            x = layer
                .attn
                .forward_cached(&h, &x, &cos_sin, cache, li, start, t, self)?;
            let h = layer.post_norm.forward(&x)?;
            x = layer.ffn_forward(&h, &x)?;
        }
        cache.len += t;
        let x = match logits_to_keep {
            0 => x,
            keep => x
                .narrow(1, t.saturating_sub(keep), keep.min(t))?
                .contiguous()?,
        };
        let x = self.norm.forward(&x)?;
        Ok(self.lm_head.forward(&x)?)
    }
}

impl CausalLm {
    /// A paged cache of `num_blocks` blocks of `block_size` tokens for [`CausalLm::step_paged`].
    ///
    /// ```no_run
    /// # let model = mgm_llm::CausalLm::from_dir("path/to/llama")?;
    /// let mut cache = model.new_paged_cache(64, 16)?; // 1024 token slots shared by all
    /// let (a, b) = (cache.add_sequence(), cache.add_sequence());
    /// // two prompts of different lengths in one call: each sequence's next-token logits
    /// let logits = model.step_paged(&[(a, &[1, 15, 27][..]), (b, &[1, 9][..])], &mut cache)?;
    /// assert_eq!(logits.shape()[0], 2);
    /// # Ok::<(), mgm_llm::Error>(())
    /// ```
    pub fn new_paged_cache(&self, num_blocks: usize, block_size: usize) -> Result<PagedKvCache> {
        PagedKvCache::new(
            self.layers.len(),
            self.config.num_key_value_heads,
            self.config.head_dim,
            num_blocks,
            block_size,
            self.rope.initial_state(),
            self.max_context(),
        )
    }

    /// One inference step over several sequences of a paged cache at once: `inputs` pairs a
    /// sequence with its new tokens (a whole prompt, or one token when decoding; lengths may
    /// differ). The linear layers run on all new tokens together; attention runs per sequence
    /// over its own blocks at its own positions. Returns the logits `[S, V]` of each sequence's
    /// last new token, in the order of `inputs`. On error (unknown sequence, out of blocks,
    /// bad ids) the cache is left as it was.
    pub fn step_paged(
        &self,
        inputs: &[(SeqId, &[i64])],
        cache: &mut PagedKvCache,
    ) -> Result<Tensor> {
        mgm_tensor::on_pool(|| self.step_paged_on_pool(inputs, cache))
    }

    fn step_paged_on_pool(
        &self,
        inputs: &[(SeqId, &[i64])],
        cache: &mut PagedKvCache,
    ) -> Result<Tensor> {
        const WHAT: &str = "CausalLm::step_paged";
        if inputs.is_empty() || inputs.iter().any(|(_, ids)| ids.is_empty()) {
            return Err(Error::input(
                WHAT,
                "needs at least one sequence, each with a token",
            ));
        }
        if cache.layers.len() != self.layers.len()
            || cache.kv_heads != self.config.num_key_value_heads
            || cache.head_dim != self.config.head_dim
        {
            return Err(Error::input(WHAT, "the cache was made for another model"));
        }
        if needs_grad(&[&self.embed.weight().tensor()]) {
            return Err(Error::input(
                WHAT,
                "the KV cache is for inference: run `forward` on a trainable model",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (id, ids) in inputs {
            if !seen.insert(*id) {
                return Err(Error::input(WHAT, format!("sequence {id} is given twice")));
            }
            let len = cache.seq_len(*id)?;
            if let Some(m) = cache.max_len.filter(|&m| len + ids.len() > m) {
                return Err(Error::input(
                    WHAT,
                    format!(
                        "sequence {id}: {len} cached + {} new tokens exceed the model's \
                         max_position_embeddings {m}",
                        ids.len()
                    ),
                ));
            }
        }
        let all: Vec<i64> = inputs
            .iter()
            .flat_map(|(_, ids)| ids.iter().copied())
            .collect();
        let n = all.len();
        let x = self.embed_ids(&Tensor::from_vec(all, &[1, n])?)?;
        // reserve every slot first, so a failure (out of blocks) leaves the cache untouched
        let backup = cache.table.clone();
        let mut plan = Vec::with_capacity(inputs.len());
        let mut slots = Vec::with_capacity(n);
        let mut cos_sin = Vec::with_capacity(n);
        for (id, ids) in inputs {
            let start = cache
                .table
                .len(*id)
                .map_err(|e| Error::input(WHAT, e.to_string()))?;
            for _ in 0..ids.len() {
                match cache.table.append(*id) {
                    Ok(s) => slots.push(s),
                    Err(e) => {
                        cache.table = backup;
                        return Err(Error::input(WHAT, format!("sequence {id}: {e}")));
                    }
                }
            }
            let rope = cache.ropes[*id]
                .as_mut()
                .expect("a live sequence has a rope state");
            self.rope.update(rope, start + ids.len() - 1);
            cos_sin.extend((start..start + ids.len()).map(|p| self.rope.cos_sin(rope, p)));
            plan.push(PagedSeq {
                id: *id,
                start,
                t: ids.len(),
                row: slots.len() - ids.len(),
            });
        }
        for s in &slots {
            if let Some((from, to)) = s.copy {
                let filled = s.offset;
                for layer in 0..cache.layers.len() {
                    for h in 0..cache.kv_heads {
                        let (src, dst) = (cache.slot(from, h, 0), cache.slot(to, h, 0));
                        let len = filled * cache.head_dim;
                        let lk = &mut cache.layers[layer];
                        lk.k.copy_within(src..src + len, dst);
                        lk.v.copy_within(src..src + len, dst);
                    }
                }
            }
        }
        let mut x = x;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = layer.input_norm.forward(&x)?;
            x = layer
                .attn
                .forward_paged(&h, &x, &cos_sin, cache, li, &plan, &slots)?;
            let h = layer.post_norm.forward(&x)?;
            x = layer.ffn_forward(&h, &x)?;
        }
        let last: Vec<Tensor> = plan
            .iter()
            .map(|p| x.narrow(1, p.row + p.t - 1, 1))
            .collect::<std::result::Result<_, _>>()?;
        let x = Tensor::cat(&last, 1)?;
        let x = self.norm.forward(&x)?;
        Ok(self.lm_head.forward(&x)?.squeeze(0)?)
    }
}

impl CausalLm {
    /// `embeds` must be `[B, T, hidden]` in a float dtype; returns `(B, T)`.
    fn check_embeds(&self, what: &'static str, embeds: &Tensor) -> Result<(usize, usize)> {
        match embeds.shape() {
            &[b, t, h] if h == self.config.hidden_size && embeds.dtype().is_float() => Ok((b, t)),
            s => Err(Error::input(
                what,
                format!(
                    "input embeddings must be [batch, seq, {}] floats, got {s:?} {}",
                    self.config.hidden_size,
                    embeds.dtype()
                ),
            )),
        }
    }
}

impl Layer {
    fn ffn_forward(&self, h: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match &self.ffn {
            Ffn::Mlp(m) => m.forward(h, Some(residual)),
            Ffn::Moe(m) => Ok(m.forward(h)?.add(residual)?),
        }
    }
}

/// One sequence of a paged step: its id, cached length before the step, new tokens, and the
/// row of its first new token among all the step's tokens.
struct PagedSeq {
    id: SeqId,
    start: usize,
    t: usize,
    row: usize,
}

/// A query token's additive mask over `l` keys (0 where `sees`, -inf elsewhere), built once for
/// all of its heads (built per head and group member, it cost a tenth of a decode step's
/// attention); None when it sees every key, as decode steps without padding do.
fn token_mask(l: usize, sees: impl Fn(usize) -> bool) -> Option<Vec<f32>> {
    if (0..l).all(&sees) {
        return None;
    }
    Some(
        (0..l)
            .map(|key| if sees(key) { 0.0 } else { f32::NEG_INFINITY })
            .collect(),
    )
}

/// The `[t * g, l]` mask of one kv head's query rows (token `i`'s mask for each of its `g`
/// group members) from its tokens' [`token_mask`]s; None when none of them masks a key.
fn group_mask(masks: &[Option<Vec<f32>>], g: usize, l: usize) -> Option<Vec<f32>> {
    masks.iter().any(Option::is_some).then(|| {
        let mut m = vec![0f32; masks.len() * g * l];
        for (i, tm) in masks.iter().enumerate() {
            if let Some(tm) = tm {
                for r in i * g..(i + 1) * g {
                    m[r * l..(r + 1) * l].copy_from_slice(tm);
                }
            }
        }
        m
    })
}

/// The query rows of kv head `h` for tokens `row..row + t` of `q` (token-major `[.., hq, d]`):
/// token `i`'s `g` group members `h * g..(h + 1) * g` (adjacent in `q`), token by token.
fn group_queries(
    q: &[f32],
    (hq, g, d): (usize, usize, usize),
    h: usize,
    row: usize,
    t: usize,
) -> Vec<f32> {
    (row..row + t)
        .flat_map(|tok| &q[(tok * hq + h * g) * d..][..g * d])
        .copied()
        .collect()
}

/// Whether the query at cache index `qi` attends the key at index `j`: causal by index, within
/// the sliding window (`W` keys including itself), and not padding.
#[inline]
fn attends(window: Option<usize>, qi: usize, j: usize, valid: bool) -> bool {
    valid && j <= qi && window.is_none_or(|w| qi - j < w)
}

/// Token ids must be i64 and inside the vocabulary.
fn check_ids(ids: &Tensor, vocab: usize) -> Result<()> {
    if ids.dtype() != DType::I64 {
        return Err(Error::input(
            "input_ids",
            format!("dtype {}, expected i64", ids.dtype()),
        ));
    }
    if let Some(&bad) = ids
        .to_vec::<i64>()?
        .iter()
        .find(|&&i| i < 0 || i as usize >= vocab)
    {
        return Err(Error::input(
            "input_ids",
            format!("token id {bad} is outside the vocabulary of {vocab}"),
        ));
    }
    Ok(())
}

impl Attention {
    /// `residual + o(attention(x))` over a whole sequence as tensor ops.
    #[allow(clippy::too_many_arguments)]
    fn forward_seq(
        &self,
        x: &Tensor,
        residual: &Tensor,
        rope: &Rope,
        state: &RopeState,
        pos: &Positions,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let s = x.shape().to_vec();
        let (b, t) = (s[0], s[1]);
        let (hq, kv, d) = (self.heads, self.kv_heads, self.head_dim);
        let g = hq / kv;
        let [q, k, v] = self.qkv(x)?;
        let q = q.reshape(&[b, t, hq, d])?;
        let k = k.reshape(&[b, t, kv, d])?;
        let v = v.reshape(&[b, t, kv, d])?;
        let q = rope.rotate_tensor(state, &q, &pos.ids)?;
        let k = rope.rotate_tensor(state, &k, &pos.ids)?;
        // groups of query heads share a kv head: q [B, KV, G, T, d] against k [B, KV, 1, T, d]
        let q = q.reshape(&[b, t, kv, g, d])?.permute(&[0, 2, 3, 1, 4])?;
        let k = k.permute(&[0, 2, 1, 3])?.unsqueeze(2)?;
        let v = v.permute(&[0, 2, 1, 3])?.unsqueeze(2)?;
        let o = mgm_tensor::nn::scaled_dot_product_attention(&q, &k, &v, Some(mask), None)?;
        let o = o.permute(&[0, 3, 1, 2, 4])?.reshape(&[b, t, hq * d])?;
        Ok(self
            .o
            .forward_fused(&o, Activation::Identity, Some(residual))?)
    }

    /// The q, k and v projections of `x` (one pass over `x` when quantized).
    fn qkv(&self, x: &Tensor) -> Result<[Tensor; 3]> {
        let id = Activation::Identity;
        let out = Linear::forward_many(x, &[(&self.q, id), (&self.k, id), (&self.v, id)])?;
        Ok(out
            .try_into()
            .expect("forward_many returns one output per layer"))
    }

    /// q, k and v of `x` as flat rows (token-major, then head), q and k rotated by each token's
    /// `cos_sin`.
    #[allow(clippy::type_complexity)]
    fn qkv_rotated(
        &self,
        x: &Tensor,
        cos_sin: &[(Vec<f32>, Vec<f32>)],
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (hq, kv, d) = (self.heads, self.kv_heads, self.head_dim);
        let [q, k, v] = self.qkv(x)?;
        let (mut q, mut k, v) = (q.to_vec::<f32>()?, k.to_vec::<f32>()?, v.to_vec::<f32>()?);
        for (tok, (cos, sin)) in cos_sin.iter().enumerate() {
            for h in 0..hq {
                rotate_with(&mut q[(tok * hq + h) * d..][..d], cos, sin);
            }
            for h in 0..kv {
                rotate_with(&mut k[(tok * kv + h) * d..][..d], cos, sin);
            }
        }
        Ok((q, k, v))
    }

    /// `residual + o(attention(x))` for `t` new tokens at cache indices `start..start + t`:
    /// rotates q and k, appends k and v to layer `li`'s cache, attends over the cache.
    #[allow(clippy::too_many_arguments)]
    fn forward_cached(
        &self,
        x: &Tensor,
        residual: &Tensor,
        cos_sin: &[(Vec<f32>, Vec<f32>)],
        cache: &mut KvCache,
        li: usize,
        start: usize,
        t: usize,
        model: &CausalLm,
    ) -> Result<Tensor> {
        let b = cache.batch;
        let (hq, kv, d) = (self.heads, self.kv_heads, self.head_dim);
        let g = hq / kv;
        let (q, k, v) = self.qkv_rotated(x, cos_sin)?;
        {
            let cap = cache.capacity;
            let layer = &mut cache.layers[li];
            for bb in 0..b {
                for h in 0..kv {
                    for i in 0..t {
                        let dst = ((bb * kv + h) * cap + start + i) * d;
                        let src = ((bb * t + i) * kv + h) * d;
                        layer.k[dst..dst + d].copy_from_slice(&k[src..src + d]);
                        layer.v[dst..dst + d].copy_from_slice(&v[src..src + d]);
                    }
                }
            }
        }
        let l = start + t;
        let out = if g * t <= DECODE_ROWS {
            self.attend_rows(&q, cache, li, start, t, l)?
        } else {
            self.attend_tensor(&q, cache, li, start, t, l, model)?
        };
        let o = Tensor::from_vec(out, &[b, t, hq * d])?;
        Ok(self
            .o
            .forward_fused(&o, Activation::Identity, Some(residual))?)
    }

    /// [`Attention::forward_cached`] on a paged cache: writes the new keys and values to their
    /// slots, then per (sequence, kv head) its query rows against the sequence's blocks.
    #[allow(clippy::too_many_arguments)]
    fn forward_paged(
        &self,
        x: &Tensor,
        residual: &Tensor,
        cos_sin: &[(Vec<f32>, Vec<f32>)],
        cache: &mut PagedKvCache,
        li: usize,
        plan: &[PagedSeq],
        slots: &[mgm_umm::paged::Slot],
    ) -> Result<Tensor> {
        let (hq, kv, d) = (self.heads, self.kv_heads, self.head_dim);
        let g = hq / kv;
        let n = slots.len();
        let (q, k, v) = self.qkv_rotated(x, cos_sin)?;
        for (tok, s) in slots.iter().enumerate() {
            for h in 0..kv {
                let dst = cache.slot(s.block, h, s.offset);
                let src = (tok * kv + h) * d;
                let layer = &mut cache.layers[li];
                layer.k[dst..dst + d].copy_from_slice(&k[src..src + d]);
                layer.v[dst..dst + d].copy_from_slice(&v[src..src + d]);
            }
        }
        let cache = &*cache;
        let layer = &cache.layers[li];
        let bs = cache.block_size();
        let scale = 1.0 / (d as f32).sqrt();
        let window = self.window;
        // by the step's token rows: entry p's tokens at rows p.row..p.row + p.t
        let mut token_masks: Vec<Option<Vec<f32>>> = vec![None; n];
        for p in plan {
            for i in 0..p.t {
                let qi = p.start + i;
                token_masks[p.row + i] =
                    token_mask(p.start + p.t, |key| attends(window, qi, key, true));
            }
        }
        let blocks: Vec<Result<Vec<f32>>> = (0..plan.len() * kv)
            .into_par_iter()
            .map(|sh| {
                let (p, h) = (&plan[sh / kv], sh % kv);
                let table = cache
                    .table
                    .block_table(p.id)
                    .map_err(|e| Error::input("CausalLm::step_paged", e.to_string()))?;
                let l = p.start + p.t;
                // the sequence's keys and values gathered from its blocks, then the decode
                // kernel the contiguous cache uses, with the causal (and window) mask
                let (mut ks, mut vs) = (Vec::with_capacity(l * d), Vec::with_capacity(l * d));
                for (bi, &blk) in table.iter().enumerate().take(l.div_ceil(bs)) {
                    let off = cache.slot(blk, h, 0);
                    let n = (l - bi * bs).min(bs) * d;
                    ks.extend_from_slice(&layer.k[off..off + n]);
                    vs.extend_from_slice(&layer.v[off..off + n]);
                }
                let rows = p.t * g;
                let qs = group_queries(&q, (hq, g, d), h, p.row, p.t);
                let mask = group_mask(&token_masks[p.row..p.row + p.t], g, l);
                let mut out = vec![0f32; rows * d];
                mgm_kernels::attention::cpu(
                    &qs,
                    &ks,
                    &vs,
                    mask.as_deref(),
                    mgm_kernels::attention::Shape {
                        rows,
                        keys: l,
                        d,
                        dv: d,
                    },
                    scale,
                    &mut out,
                )?;
                Ok(out)
            })
            .collect();
        let mut out = vec![0f32; n * hq * d];
        for (sh, blk) in blocks.into_iter().enumerate() {
            let blk = blk?;
            let (p, h) = (&plan[sh / kv], sh % kv);
            for i in 0..p.t {
                for j in 0..g {
                    let dst = ((p.row + i) * hq + h * g + j) * d;
                    out[dst..dst + d].copy_from_slice(&blk[(i * g + j) * d..][..d]);
                }
            }
        }
        let o = Tensor::from_vec(out, &[1, n, hq * d])?;
        Ok(self
            .o
            .forward_fused(&o, Activation::Identity, Some(residual))?)
    }

    /// Decode-size blocks: the rows of one (row, kv head) against its cached keys with the
    /// decode kernel, (row, kv head) pairs in parallel.
    fn attend_rows(
        &self,
        q: &[f32],
        cache: &KvCache,
        li: usize,
        start: usize,
        t: usize,
        l: usize,
    ) -> Result<Vec<f32>> {
        let b = cache.batch;
        let (hq, kv, d) = (self.heads, self.kv_heads, self.head_dim);
        let g = hq / kv;
        let scale = 1.0 / (d as f32).sqrt();
        let layer = &cache.layers[li];
        let window = self.window;
        let token_masks: Vec<Option<Vec<f32>>> = (0..b * t)
            .map(|bt| {
                let (bb, qi) = (bt / t, start + bt % t);
                let valid = &cache.valid[bb * cache.capacity..][..l];
                token_mask(l, |key| attends(window, qi, key, valid[key]))
            })
            .collect();
        let blocks: Vec<Result<Vec<f32>>> = (0..b * kv)
            .into_par_iter()
            .map(|bh| {
                let (bb, h) = (bh / kv, bh % kv);
                let rows = t * g;
                let qs = group_queries(q, (hq, g, d), h, bb * t, t);
                let mask = group_mask(&token_masks[bb * t..(bb + 1) * t], g, l);
                let off = cache.slot(bb, h, 0);
                let mut out = vec![0f32; rows * d];
                mgm_kernels::attention::cpu(
                    &qs,
                    &layer.k[off..off + l * d],
                    &layer.v[off..off + l * d],
                    mask.as_deref(),
                    mgm_kernels::attention::Shape {
                        rows,
                        keys: l,
                        d,
                        dv: d,
                    },
                    scale,
                    &mut out,
                )?;
                Ok(out)
            })
            .collect();
        let mut out = vec![0f32; b * t * hq * d];
        for (bh, blk) in blocks.into_iter().enumerate() {
            let blk = blk?;
            let (bb, h) = (bh / kv, bh % kv);
            for i in 0..t {
                for j in 0..g {
                    let r = i * g + j;
                    let dst = ((bb * t + i) * hq + h * g + j) * d;
                    out[dst..dst + d].copy_from_slice(&blk[r * d..(r + 1) * d]);
                }
            }
        }
        Ok(out)
    }

    /// Long blocks (prefill): the cached keys as tensors and the fused attention.
    #[allow(clippy::too_many_arguments)]
    fn attend_tensor(
        &self,
        q: &[f32],
        cache: &KvCache,
        li: usize,
        start: usize,
        t: usize,
        l: usize,
        model: &CausalLm,
    ) -> Result<Vec<f32>> {
        let b = cache.batch;
        let (hq, kv, d) = (self.heads, self.kv_heads, self.head_dim);
        let g = hq / kv;
        let layer = &cache.layers[li];
        let take = |buf: &[f32]| -> Vec<f32> {
            let mut o = Vec::with_capacity(b * kv * l * d);
            for bb in 0..b {
                for h in 0..kv {
                    let off = cache.slot(bb, h, 0);
                    o.extend_from_slice(&buf[off..off + l * d]);
                }
            }
            o
        };
        let k = Tensor::from_vec(take(&layer.k), &[b, kv, 1, l, d])?;
        let v = Tensor::from_vec(take(&layer.v), &[b, kv, 1, l, d])?;
        let q = Tensor::from_vec(q.to_vec(), &[b, t, kv, g, d])?.permute(&[0, 2, 3, 1, 4])?;
        let mask = model.mask(b, t, start, l, |bb, j| cache.valid[bb * cache.capacity + j])?;
        let o = mgm_tensor::nn::scaled_dot_product_attention(&q, &k, &v, Some(&mask), None)?;
        Ok(o.permute(&[0, 3, 1, 2, 4])?.contiguous()?.to_vec::<f32>()?)
    }
}
