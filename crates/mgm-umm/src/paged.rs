//! Paged KV-cache bookkeeping: the cache's memory is `num_blocks` fixed blocks of
//! `block_size` token slots; each sequence holds a block table (its blocks in order), so B
//! sequences of different lengths use blocks in proportion to their total tokens, not
//! `B x max length`. A sequence forked from another shares its blocks (reference counts); the
//! first append into a shared, partly filled last block copies it (copy-on-write) so neither
//! sequence sees the other's new tokens. The key/value tensors themselves live with the model
//! (mgm-llm's `PagedKvCache`); this type says which block and slot each token goes to.

use crate::error::{Error, Result};

/// A block of the cache.
pub type BlockId = usize;

/// Where an appended token goes, and a copy the caller must make first (copy-on-write).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// The block the token is written to.
    pub block: BlockId,
    /// Its slot inside the block.
    pub offset: usize,
    /// `Some((from, to))`: copy the filled slots of block `from` into block `to` before writing
    /// (the sequence's last block was shared).
    pub copy: Option<(BlockId, BlockId)>,
}

#[derive(Clone, Debug, Default)]
struct Seq {
    blocks: Vec<BlockId>,
    len: usize,
}

/// The block allocator and every sequence's block table.
#[derive(Clone, Debug)]
pub struct PagedKv {
    block_size: usize,
    refs: Vec<u32>,
    free: Vec<BlockId>,
    seqs: Vec<Option<Seq>>,
}

impl PagedKv {
    /// A cache of `num_blocks` blocks of `block_size` tokens.
    pub fn new(num_blocks: usize, block_size: usize) -> Result<PagedKv> {
        if num_blocks == 0 || block_size == 0 {
            return Err(Error::InvalidInput {
                what: "PagedKv::new",
                msg: format!("{num_blocks} blocks of {block_size} tokens: both must be >= 1"),
            });
        }
        Ok(PagedKv {
            block_size,
            refs: vec![0; num_blocks],
            free: (0..num_blocks).rev().collect(),
            seqs: Vec::new(),
        })
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks not held by any sequence.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks held by at least one sequence.
    pub fn used_blocks(&self) -> usize {
        self.refs.len() - self.free.len()
    }

    /// A new empty sequence; returns its id.
    pub fn add_sequence(&mut self) -> usize {
        self.seqs.push(Some(Seq::default()));
        self.seqs.len() - 1
    }

    fn seq(&self, id: usize) -> Result<&Seq> {
        self.seqs
            .get(id)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::InvalidInput {
                what: "PagedKv",
                msg: format!("sequence {id} does not exist (or was freed)"),
            })
    }

    /// A sequence's blocks in order.
    pub fn block_table(&self, id: usize) -> Result<&[BlockId]> {
        Ok(&self.seq(id)?.blocks)
    }

    /// A sequence's length in tokens.
    pub fn len(&self, id: usize) -> Result<usize> {
        Ok(self.seq(id)?.len)
    }

    fn take_block(&mut self) -> Result<BlockId> {
        let b = self.free.pop().ok_or_else(|| Error::InvalidInput {
            what: "PagedKv::append",
            msg: format!("out of blocks: all {} are in use", self.refs.len()),
        })?;
        self.refs[b] = 1;
        Ok(b)
    }

    /// Reserves the slot of the next token of sequence `id`: a new block when the last is full,
    /// a private copy of the last block when it is shared and partly filled.
    pub fn append(&mut self, id: usize) -> Result<Slot> {
        let bs = self.block_size;
        let (len, last) = {
            let s = self.seq(id)?;
            (s.len, s.blocks.last().copied())
        };
        let offset = len % bs;
        let (block, copy) = match last {
            Some(b) if offset != 0 && self.refs[b] > 1 => {
                let nb = self.take_block()?;
                self.refs[b] -= 1;
                let s = self.seqs[id].as_mut().expect("checked above");
                *s.blocks.last_mut().expect("has a last block") = nb;
                (nb, Some((b, nb)))
            }
            Some(b) if offset != 0 => (b, None),
            _ => {
                let nb = self.take_block()?;
                self.seqs[id]
                    .as_mut()
                    .expect("checked above")
                    .blocks
                    .push(nb);
                (nb, None)
            }
        };
        self.seqs[id].as_mut().expect("checked above").len += 1;
        Ok(Slot {
            block,
            offset,
            copy,
        })
    }

    /// A new sequence sharing every block of `id` (a common prompt prefix).
    pub fn fork(&mut self, id: usize) -> Result<usize> {
        let s = self.seq(id)?.clone();
        for &b in &s.blocks {
            self.refs[b] += 1;
        }
        self.seqs.push(Some(s));
        Ok(self.seqs.len() - 1)
    }

    /// Frees a sequence; its blocks return to the pool when no other sequence holds them.
    pub fn free_sequence(&mut self, id: usize) -> Result<()> {
        self.seq(id)?;
        let s = self.seqs[id].take().expect("checked above");
        for b in s.blocks {
            self.refs[b] -= 1;
            if self.refs[b] == 0 {
                self.free.push(b);
            }
        }
        Ok(())
    }
}
