//! The ring-buffer feature cache: `capacity` slots of `dim` floats. Writes go to the next slot
//! and wrap around; each write stamps its slot with a new generation (one counter for the whole
//! cache, so no two writes share one) and returns a [`Handle`] with it. A read checks the
//! slot's current generation against the handle's, so a handle whose slot has been overwritten
//! gives [`Error::Overwritten`], never the newer data.

use crate::error::{Error, Result};

/// Where a write went: the slot and the generation it stamped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Handle {
    slot: usize,
    generation: u64,
}

impl Handle {
    /// The slot.
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// The generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

/// A fixed-capacity ring of `[capacity, dim]` f32 feature rows.
#[derive(Clone, Debug)]
pub struct FeatureCache {
    dim: usize,
    data: Vec<f32>,
    /// Generation stamped on each slot (0: never written).
    generations: Vec<u64>,
    next: usize,
    /// The last generation issued.
    last: u64,
}

impl FeatureCache {
    /// A cache of `capacity` slots of `dim` floats (both at least 1).
    pub fn new(capacity: usize, dim: usize) -> Result<FeatureCache> {
        if capacity == 0 || dim == 0 {
            return Err(Error::InvalidInput {
                what: "FeatureCache::new",
                msg: format!("capacity {capacity} and dim {dim} must both be at least 1"),
            });
        }
        Ok(FeatureCache {
            dim,
            data: vec![0.0; capacity * dim],
            generations: vec![0; capacity],
            next: 0,
            last: 0,
        })
    }

    /// Slots.
    pub fn capacity(&self) -> usize {
        self.generations.len()
    }

    /// Floats per slot.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Writes one row of `dim` floats into the next slot.
    pub fn write(&mut self, row: &[f32]) -> Result<Handle> {
        Ok(self.write_batch(row)?[0])
    }

    /// Writes `k` rows (`rows.len() = k * dim`, `1 <= k <= capacity`) into consecutive slots,
    /// wrapping past the end; one handle per row, in order. More rows than slots would
    /// overwrite the batch's own beginning, so that is an error.
    pub fn write_batch(&mut self, rows: &[f32]) -> Result<Vec<Handle>> {
        let d = self.dim;
        if rows.is_empty() || !rows.len().is_multiple_of(d) || rows.len() / d > self.capacity() {
            return Err(Error::InvalidInput {
                what: "FeatureCache::write_batch",
                msg: format!(
                    "{} floats are not 1..={} rows of {d}",
                    rows.len(),
                    self.capacity()
                ),
            });
        }
        let handles = rows
            .chunks_exact(d)
            .map(|row| {
                let slot = self.next;
                self.data[slot * d..(slot + 1) * d].copy_from_slice(row);
                self.last += 1;
                self.generations[slot] = self.last;
                self.next = (slot + 1) % self.capacity();
                Handle {
                    slot,
                    generation: self.last,
                }
            })
            .collect();
        Ok(handles)
    }

    /// The row a handle points at, if its slot still holds that write.
    pub fn read(&self, h: Handle) -> Result<&[f32]> {
        if h.slot >= self.capacity() || h.generation == 0 || h.generation > self.last {
            return Err(Error::ForeignHandle {
                slot: h.slot,
                generation: h.generation,
            });
        }
        let now = self.generations[h.slot];
        if now != h.generation {
            return Err(Error::Overwritten {
                slot: h.slot,
                wanted: h.generation,
                now,
            });
        }
        Ok(&self.data[h.slot * self.dim..(h.slot + 1) * self.dim])
    }
}
