//! Shapes, strides and the layout of a tensor view over its storage.

use crate::{Error, Result};

/// Row-major (C order) strides for `shape`, in elements.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; shape.len()];
    let mut acc = 1usize;
    for (s, &d) in strides.iter_mut().zip(shape).rev() {
        *s = acc;
        acc *= d.max(1);
    }
    strides
}

/// Resolves a possibly negative dim (`-1` = last) against `rank`.
pub fn resolve_dim(op: &'static str, dim: isize, shape: &[usize]) -> Result<usize> {
    let rank = shape.len() as isize;
    let d = if dim < 0 { dim + rank } else { dim };
    if d < 0 || d >= rank {
        return Err(Error::DimOutOfRange {
            op,
            dim,
            rank: shape.len(),
            shape: shape.to_vec(),
        });
    }
    Ok(d as usize)
}

/// Resolves a list of dims, rejecting duplicates; the result is sorted ascending.
pub fn resolve_dims(op: &'static str, dims: &[isize], shape: &[usize]) -> Result<Vec<usize>> {
    let mut out = Vec::with_capacity(dims.len());
    for &d in dims {
        let r = resolve_dim(op, d, shape)?;
        if out.contains(&r) {
            return Err(Error::invalid_shape(
                op,
                shape,
                format!("dim {d} given twice in {dims:?}"),
            ));
        }
        out.push(r);
    }
    out.sort_unstable();
    Ok(out)
}

/// NumPy broadcasting of two shapes.
pub fn broadcast_shapes(op: &'static str, lhs: &[usize], rhs: &[usize]) -> Result<Vec<usize>> {
    let rank = lhs.len().max(rhs.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let l = if i + lhs.len() >= rank {
            lhs[i + lhs.len() - rank]
        } else {
            1
        };
        let r = if i + rhs.len() >= rank {
            rhs[i + rhs.len() - rank]
        } else {
            1
        };
        out[i] = if l == r {
            l
        } else if l == 1 {
            r
        } else if r == 1 {
            l
        } else {
            return Err(Error::BroadcastIncompatible {
                op,
                lhs: lhs.to_vec(),
                rhs: rhs.to_vec(),
            });
        };
    }
    Ok(out)
}

/// How a tensor's logical elements map to its storage: `storage[offset + sum(i_k * strides[k])]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
}

impl Layout {
    /// A contiguous row-major layout starting at `offset`.
    pub fn contiguous_with_offset(shape: &[usize], offset: usize) -> Self {
        Layout {
            shape: shape.to_vec(),
            strides: contiguous_strides(shape),
            offset,
        }
    }

    /// A contiguous row-major layout starting at 0.
    pub fn contiguous(shape: &[usize]) -> Self {
        Self::contiguous_with_offset(shape, 0)
    }

    /// A layout with explicit strides (in elements).
    pub fn new(shape: Vec<usize>, strides: Vec<usize>, offset: usize) -> Self {
        debug_assert_eq!(shape.len(), strides.len());
        Layout {
            shape,
            strides,
            offset,
        }
    }

    /// The dims.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Strides in elements, one per dim.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    /// Offset of element 0 in the storage, in elements.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the elements are stored row-major without gaps (dims of size 1 may have any
    /// stride). An empty view is contiguous: it has no elements to be out of place.
    pub fn is_contiguous(&self) -> bool {
        if self.numel() == 0 {
            return true;
        }
        let mut acc = 1usize;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            if d != 1 && s != acc {
                return false;
            }
            acc *= d;
        }
        true
    }

    /// If contiguous, the storage range `[offset, offset + numel)`.
    pub fn contiguous_range(&self) -> Option<std::ops::Range<usize>> {
        if self.is_contiguous() {
            Some(self.offset..self.offset + self.numel())
        } else {
            None
        }
    }

    /// One past the largest storage index this layout touches (0 for empty tensors).
    pub fn max_storage_index(&self) -> usize {
        if self.numel() == 0 {
            return self.offset;
        }
        self.offset
            + self
                .shape
                .iter()
                .zip(&self.strides)
                .map(|(&d, &s)| (d - 1) * s)
                .sum::<usize>()
            + 1
    }

    /// Storage offsets of all elements in logical row-major order.
    ///
    /// Fast for contiguous layouts; for strided ones it walks an odometer over the outer dims and
    /// a strided run over the innermost dim.
    pub fn for_each_offset(&self, mut f: impl FnMut(usize)) {
        if let Some(r) = self.contiguous_range() {
            r.for_each(f);
            return;
        }
        self.for_each_run(|start, len, stride| {
            for i in 0..len {
                f(start + i * stride)
            }
        })
    }

    /// Calls `f(start, len, stride)` for each innermost-dim run of elements, in logical order.
    pub fn for_each_run(&self, mut f: impl FnMut(usize, usize, usize)) {
        let n = self.numel();
        if n == 0 {
            return;
        }
        if self.shape.is_empty() {
            f(self.offset, 1, 1);
            return;
        }
        let rank = self.shape.len();
        let inner = self.shape[rank - 1];
        let inner_stride = self.strides[rank - 1];
        let outer = &self.shape[..rank - 1];
        let mut idx = vec![0usize; outer.len()];
        let mut pos = self.offset;
        loop {
            f(pos, inner, inner_stride);
            // odometer increment over the outer dims
            let mut k = outer.len();
            loop {
                if k == 0 {
                    return;
                }
                k -= 1;
                idx[k] += 1;
                pos += self.strides[k];
                if idx[k] < outer[k] {
                    break;
                }
                pos -= self.strides[k] * idx[k];
                idx[k] = 0;
            }
        }
    }

    /// The layout broadcast to `shape` (new leading dims and size-1 dims get stride 0).
    pub fn broadcast_as(&self, op: &'static str, shape: &[usize]) -> Result<Layout> {
        if shape.len() < self.shape.len() {
            return Err(Error::shape_mismatch(
                op,
                &self.shape,
                shape,
                "target has lower rank",
            ));
        }
        let extra = shape.len() - self.shape.len();
        let mut strides = vec![0; shape.len()];
        for (i, &d) in shape.iter().enumerate() {
            if i < extra {
                continue;
            }
            let sd = self.shape[i - extra];
            if sd == d {
                strides[i] = self.strides[i - extra];
            } else if sd == 1 {
                strides[i] = 0;
            } else {
                return Err(Error::BroadcastIncompatible {
                    op,
                    lhs: self.shape.clone(),
                    rhs: shape.to_vec(),
                });
            }
        }
        Ok(Layout {
            shape: shape.to_vec(),
            strides,
            offset: self.offset,
        })
    }
}
