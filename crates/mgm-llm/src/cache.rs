//! The key/value cache of one generation: per layer, keys and values of every position so far,
//! `[B, kv_heads, capacity, head_dim]` in preallocated buffers that each step appends to in
//! place (no per-step copy of the whole cache), which positions are padding, and the rotary
//! state (the `dynamic` rope type changes with the length).
//!
//! All rows of a batch advance together: a shorter prompt is left-padded, and its pad slots
//! stay masked for every later query.

use crate::rope::RopeState;
use crate::{Error, Result};

/// One layer's keys and values.
#[derive(Clone, Debug)]
pub(crate) struct LayerKv {
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
}

/// The cache of one batch of sequences.
#[derive(Clone, Debug)]
pub struct KvCache {
    pub(crate) batch: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) capacity: usize,
    /// Positions filled (the same for every row).
    pub(crate) len: usize,
    pub(crate) layers: Vec<LayerKv>,
    /// `[B, capacity]`: the slot holds a real token (not padding).
    pub(crate) valid: Vec<bool>,
    /// `[B, capacity]`: the position id each slot was rotated with.
    pub(crate) positions: Vec<usize>,
    pub(crate) rope: RopeState,
}

impl KvCache {
    pub(crate) fn new(
        layers: usize,
        batch: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        rope: RopeState,
    ) -> KvCache {
        let per = batch * kv_heads * capacity * head_dim;
        KvCache {
            batch,
            kv_heads,
            head_dim,
            capacity,
            len: 0,
            layers: (0..layers)
                .map(|_| LayerKv {
                    k: vec![0.0; per],
                    v: vec![0.0; per],
                })
                .collect(),
            valid: vec![false; batch * capacity],
            positions: vec![0; batch * capacity],
            rope,
        }
    }

    /// Tokens cached per row (padding included).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first step.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rows.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Slots per row.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes of the key and value buffers.
    pub fn bytes(&self) -> usize {
        self.layers.len() * 2 * self.batch * self.kv_heads * self.capacity * self.head_dim * 4
    }

    /// Checks that `t` more tokens fit.
    pub(crate) fn reserve(&self, t: usize) -> Result<()> {
        if self.len + t > self.capacity {
            return Err(Error::input(
                "KvCache",
                format!(
                    "{} cached + {t} new tokens exceed the cache capacity {} (create the cache \
                     for the whole generation: prompt plus new tokens)",
                    self.len, self.capacity
                ),
            ));
        }
        Ok(())
    }

    /// Offset of slot `j` of (row `b`, kv head `h`).
    #[inline]
    pub(crate) fn slot(&self, b: usize, h: usize, j: usize) -> usize {
        ((b * self.kv_heads + h) * self.capacity + j) * self.head_dim
    }
}
