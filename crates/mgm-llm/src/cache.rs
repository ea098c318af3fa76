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

/// A sequence of a [`PagedKvCache`].
pub type SeqId = usize;

/// A paged KV cache for batched decoding of sequences of different lengths: key/value memory
/// is `num_blocks` fixed blocks of `block_size` tokens (per layer `[blocks, kv_heads,
/// block_size, head_dim]`), each sequence holds a block table
/// ([`mgm_umm::paged::PagedKv`]), so B sequences use blocks in proportion to their total
/// tokens rather than `B x max length`; a forked sequence shares its parent's prompt blocks
/// (copy-on-write). Every sequence has its own positions (no padding) and rotary state.
/// [`crate::CausalLm::step_paged`] runs it.
#[derive(Clone, Debug)]
pub struct PagedKvCache {
    pub(crate) table: mgm_umm::paged::PagedKv,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) layers: Vec<LayerKv>,
    /// Per sequence id its rotary state (`None` once freed).
    pub(crate) ropes: Vec<Option<RopeState>>,
    pub(crate) fresh_rope: RopeState,
    pub(crate) max_len: Option<usize>,
}

impl PagedKvCache {
    pub(crate) fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        num_blocks: usize,
        block_size: usize,
        rope: RopeState,
        max_len: Option<usize>,
    ) -> Result<PagedKvCache> {
        let table = mgm_umm::paged::PagedKv::new(num_blocks, block_size)
            .map_err(|e| Error::input("PagedKvCache", e.to_string()))?;
        let per = num_blocks * kv_heads * block_size * head_dim;
        Ok(PagedKvCache {
            table,
            kv_heads,
            head_dim,
            layers: (0..layers)
                .map(|_| LayerKv {
                    k: vec![0.0; per],
                    v: vec![0.0; per],
                })
                .collect(),
            ropes: Vec::new(),
            fresh_rope: rope,
            max_len,
        })
    }

    /// A new empty sequence.
    pub fn add_sequence(&mut self) -> SeqId {
        let id = self.table.add_sequence();
        self.set_rope(id, self.fresh_rope.clone());
        id
    }

    fn set_rope(&mut self, id: SeqId, rope: RopeState) {
        if self.ropes.len() <= id {
            self.ropes.resize(id + 1, None);
        }
        self.ropes[id] = Some(rope);
    }

    /// A new sequence sharing everything `id` holds so far (a common prompt prefix): no key or
    /// value is copied until one of them appends into a shared, partly filled block.
    pub fn fork(&mut self, id: SeqId) -> Result<SeqId> {
        let child = self.table.fork(id).map_err(umm_err)?;
        let rope = self.ropes[id]
            .clone()
            .expect("a live sequence has a rope state");
        self.set_rope(child, rope);
        Ok(child)
    }

    /// Frees a sequence; blocks no other sequence holds become free.
    pub fn free_sequence(&mut self, id: SeqId) -> Result<()> {
        self.table.free_sequence(id).map_err(umm_err)?;
        self.ropes[id] = None;
        Ok(())
    }

    /// Tokens cached for sequence `id`.
    pub fn seq_len(&self, id: SeqId) -> Result<usize> {
        self.table.len(id).map_err(umm_err)
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.table.block_size()
    }

    /// Bytes of key and value storage one block takes over all layers.
    pub fn block_bytes(&self) -> usize {
        self.layers.len() * 2 * self.kv_heads * self.block_size() * self.head_dim * 4
    }

    /// Bytes of the blocks sequences hold now (what B sequences of different lengths cost).
    pub fn used_bytes(&self) -> usize {
        self.table.used_blocks() * self.block_bytes()
    }

    /// Blocks no sequence holds.
    pub fn free_blocks(&self) -> usize {
        self.table.free_blocks()
    }

    /// Offset of slot `off` of block `blk` for kv head `h` in a layer's buffers.
    #[inline]
    pub(crate) fn slot(&self, blk: usize, h: usize, off: usize) -> usize {
        ((blk * self.kv_heads + h) * self.block_size() + off) * self.head_dim
    }
}

fn umm_err(e: mgm_umm::Error) -> Error {
    Error::input("PagedKvCache", e.to_string())
}
