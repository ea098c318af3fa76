//! Views that share storage (reshape, permute, narrow, broadcast, squeeze) and the copies that
//! combine tensors (cat, stack), with their backward passes.

use crate::autograd::{Backward, attach};
use crate::shape::{Layout, resolve_dim};
use crate::{Error, Result, Tensor, WithDType};

/// Runs `$body` with `$T` bound to the Rust element type of `$dtype`.
macro_rules! with_dtype {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::DType::F64 => {
                type $T = f64;
                $body
            }
            $crate::DType::F16 => {
                type $T = half::f16;
                $body
            }
            $crate::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            $crate::DType::I64 => {
                type $T = i64;
                $body
            }
            $crate::DType::U32 => {
                type $T = u32;
                $body
            }
            $crate::DType::U8 => {
                type $T = u8;
                $body
            }
        }
    };
}
pub(crate) use with_dtype;

pub(crate) struct IdentityBackward {
    pub(crate) input: Tensor,
}

impl Backward for IdentityBackward {
    fn name(&self) -> &'static str {
        "contiguous"
    }
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.input]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(g.clone())])
    }
}

pub(crate) struct CastBackward {
    pub(crate) input: Tensor,
}

impl Backward for CastBackward {
    fn name(&self) -> &'static str {
        "to_dtype"
    }
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.input]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(g.to_dtype(self.input.dtype())?)])
    }
}

struct ReshapeBackward {
    input: Tensor,
}

impl Backward for ReshapeBackward {
    fn name(&self) -> &'static str {
        "reshape"
    }
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.input]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(g.reshape(self.input.shape())?)])
    }
}

struct PermuteBackward {
    input: Tensor,
    dims: Vec<usize>,
}

impl Backward for PermuteBackward {
    fn name(&self) -> &'static str {
        "permute"
    }
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.input]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let mut inv = vec![0; self.dims.len()];
        for (i, &d) in self.dims.iter().enumerate() {
            inv[d] = i;
        }
        Ok(vec![Some(g.permute(&inv)?)])
    }
}

struct NarrowBackward {
    input: Tensor,
    dim: usize,
    start: usize,
}

impl Backward for NarrowBackward {
    fn name(&self) -> &'static str {
        "narrow"
    }
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.input]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let full = self.input.shape()[self.dim];
        let len = g.shape()[self.dim];
        let mut parts = Vec::with_capacity(3);
        let zeros = |n: usize| {
            let mut s = g.shape().to_vec();
            s[self.dim] = n;
            Tensor::zeros(&s, g.dtype(), g.device())
        };
        if self.start > 0 {
            parts.push(zeros(self.start)?);
        }
        parts.push(g.clone());
        if self.start + len < full {
            parts.push(zeros(full - self.start - len)?);
        }
        Ok(vec![Some(Tensor::cat(&parts, self.dim as isize)?)])
    }
}

struct BroadcastBackward {
    input: Tensor,
}

impl Backward for BroadcastBackward {
    fn name(&self) -> &'static str {
        "broadcast_as"
    }
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.input]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(g.sum_to_shape(self.input.shape())?)])
    }
}

struct CatBackward {
    inputs: Vec<Tensor>,
    dim: usize,
}

impl Backward for CatBackward {
    fn name(&self) -> &'static str {
        "cat"
    }
    fn inputs(&self) -> Vec<&Tensor> {
        self.inputs.iter().collect()
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let mut start = 0;
        let mut out = Vec::with_capacity(self.inputs.len());
        for t in &self.inputs {
            let len = t.shape()[self.dim];
            out.push(Some(g.narrow(self.dim as isize, start, len)?));
            start += len;
        }
        Ok(out)
    }
}

impl Tensor {
    /// The same elements with another shape (a view when contiguous, else a copy).
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if numel != self.numel() {
            return Err(Error::shape_mismatch(
                "reshape",
                self.shape(),
                shape,
                format!("{} elements cannot take a shape of {numel}", self.numel()),
            ));
        }
        if shape == self.shape() {
            return Ok(self.clone());
        }
        let base = if self.is_contiguous() {
            self.clone()
        } else {
            self.copy_untracked()?
        };
        let out = base.with_layout(Layout::contiguous_with_offset(
            shape,
            base.layout().offset(),
        ));
        Ok(attach(out, || ReshapeBackward {
            input: self.clone(),
        }))
    }

    /// Reshape with one dim given as `-1` and inferred, like `tensor.view(-1, n)`.
    pub fn reshape_infer(&self, shape: &[isize]) -> Result<Tensor> {
        let known: usize = shape
            .iter()
            .filter(|&&d| d >= 0)
            .map(|&d| d as usize)
            .product();
        let infer = shape.iter().filter(|&&d| d == -1).count();
        if infer > 1 || shape.iter().any(|&d| d < -1) {
            return Err(Error::invalid_shape(
                "reshape",
                self.shape(),
                format!("bad target {shape:?}"),
            ));
        }
        let resolved: Vec<usize> = if infer == 1 {
            if known == 0 || !self.numel().is_multiple_of(known) {
                return Err(Error::invalid_shape(
                    "reshape",
                    self.shape(),
                    format!("cannot infer -1 in {shape:?} for {} elements", self.numel()),
                ));
            }
            shape
                .iter()
                .map(|&d| {
                    if d == -1 {
                        self.numel() / known
                    } else {
                        d as usize
                    }
                })
                .collect()
        } else {
            shape.iter().map(|&d| d as usize).collect()
        };
        self.reshape(&resolved)
    }

    /// Flattens dims `start..=end` into one.
    pub fn flatten(&self, start: isize, end: isize) -> Result<Tensor> {
        if self.rank() == 0 {
            return self.reshape(&[1]);
        }
        let s = resolve_dim("flatten", start, self.shape())?;
        let e = resolve_dim("flatten", end, self.shape())?;
        if s > e {
            return Err(Error::invalid_shape(
                "flatten",
                self.shape(),
                format!("start {start} after end {end}"),
            ));
        }
        let mut shape = self.shape()[..s].to_vec();
        shape.push(self.shape()[s..=e].iter().product());
        shape.extend_from_slice(&self.shape()[e + 1..]);
        self.reshape(&shape)
    }

    /// Reorders dims: output dim `i` is input dim `dims[i]` (a view).
    pub fn permute(&self, dims: &[usize]) -> Result<Tensor> {
        let rank = self.rank();
        let mut seen = vec![false; rank];
        if dims.len() != rank
            || dims
                .iter()
                .any(|&d| d >= rank || std::mem::replace(&mut seen[d], true))
        {
            return Err(Error::invalid_shape(
                "permute",
                self.shape(),
                format!("{dims:?} is not a permutation of 0..{rank}"),
            ));
        }
        let l = self.layout();
        let shape = dims.iter().map(|&d| l.shape()[d]).collect();
        let strides = dims.iter().map(|&d| l.strides()[d]).collect();
        let out = self.with_layout(Layout::new(shape, strides, l.offset()));
        Ok(attach(out, || PermuteBackward {
            input: self.clone(),
            dims: dims.to_vec(),
        }))
    }

    /// Swaps two dims (a view).
    pub fn transpose(&self, d0: isize, d1: isize) -> Result<Tensor> {
        let a = resolve_dim("transpose", d0, self.shape())?;
        let b = resolve_dim("transpose", d1, self.shape())?;
        let mut dims: Vec<usize> = (0..self.rank()).collect();
        dims.swap(a, b);
        self.permute(&dims)
    }

    /// Transpose of the last two dims.
    pub fn t(&self) -> Result<Tensor> {
        if self.rank() < 2 {
            return Err(Error::invalid_shape(
                "t",
                self.shape(),
                "needs at least 2 dims",
            ));
        }
        self.transpose(-2, -1)
    }

    /// `len` entries of `dim` starting at `start` (a view), like `tensor.narrow`.
    pub fn narrow(&self, dim: isize, start: usize, len: usize) -> Result<Tensor> {
        let d = resolve_dim("narrow", dim, self.shape())?;
        let size = self.shape()[d];
        if start.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::out_of_bounds(
                "narrow",
                format!(
                    "range {start}..{} exceeds dim {d} of size {size} (shape {:?})",
                    start + len,
                    self.shape()
                ),
            ));
        }
        let l = self.layout();
        let mut shape = l.shape().to_vec();
        shape[d] = len;
        let offset = if len == 0 {
            l.offset()
        } else {
            l.offset() + start * l.strides()[d]
        };
        let out = self.with_layout(Layout::new(shape, l.strides().to_vec(), offset));
        Ok(attach(out, || NarrowBackward {
            input: self.clone(),
            dim: d,
            start,
        }))
    }

    /// Python-style slice `start..end` on `dim` (a view).
    pub fn slice(&self, dim: isize, range: std::ops::Range<usize>) -> Result<Tensor> {
        if range.end < range.start {
            return Err(Error::out_of_bounds(
                "slice",
                format!("range {range:?} is reversed"),
            ));
        }
        self.narrow(dim, range.start, range.end - range.start)
    }

    /// Entry `index` of `dim`, with that dim removed (a view).
    pub fn get(&self, dim: isize, index: usize) -> Result<Tensor> {
        let d = resolve_dim("get", dim, self.shape())?;
        self.narrow(d as isize, index, 1)?.squeeze(d as isize)
    }

    /// Broadcasts to `shape` with NumPy rules (a view with stride 0 on broadcast dims).
    pub fn broadcast_as(&self, shape: &[usize]) -> Result<Tensor> {
        if shape == self.shape() {
            return Ok(self.clone());
        }
        let layout = self.layout().broadcast_as("broadcast_as", shape)?;
        let out = self.with_layout(layout);
        Ok(attach(out, || BroadcastBackward {
            input: self.clone(),
        }))
    }

    /// Alias of [`Tensor::broadcast_as`] as PyTorch names it.
    pub fn expand(&self, shape: &[usize]) -> Result<Tensor> {
        self.broadcast_as(shape)
    }

    /// Removes `dim`, which must have size 1.
    pub fn squeeze(&self, dim: isize) -> Result<Tensor> {
        let d = resolve_dim("squeeze", dim, self.shape())?;
        if self.shape()[d] != 1 {
            return Err(Error::invalid_shape(
                "squeeze",
                self.shape(),
                format!("dim {d} has size {}", self.shape()[d]),
            ));
        }
        let l = self.layout();
        let mut shape = l.shape().to_vec();
        let mut strides = l.strides().to_vec();
        shape.remove(d);
        strides.remove(d);
        let out = self.with_layout(Layout::new(shape, strides, l.offset()));
        Ok(attach(out, || ReshapeBackward {
            input: self.clone(),
        }))
    }

    /// Inserts a dim of size 1 at `dim` (`-1` appends).
    pub fn unsqueeze(&self, dim: isize) -> Result<Tensor> {
        let rank = self.rank() as isize;
        let d = if dim < 0 { dim + rank + 1 } else { dim };
        if d < 0 || d > rank {
            return Err(Error::DimOutOfRange {
                op: "unsqueeze",
                dim,
                rank: self.rank(),
                shape: self.shape().to_vec(),
            });
        }
        let d = d as usize;
        let l = self.layout();
        let mut shape = l.shape().to_vec();
        let mut strides = l.strides().to_vec();
        let stride = if d < shape.len() {
            shape[d] * strides[d]
        } else {
            1
        };
        shape.insert(d, 1);
        strides.insert(d, stride.max(1));
        let out = self.with_layout(Layout::new(shape, strides, l.offset()));
        Ok(attach(out, || ReshapeBackward {
            input: self.clone(),
        }))
    }

    /// Concatenates along `dim`; all other dims must agree.
    pub fn cat(tensors: &[Tensor], dim: isize) -> Result<Tensor> {
        let first = tensors
            .first()
            .ok_or_else(|| Error::invalid_shape("cat", &[], "no tensors given"))?;
        let d = resolve_dim("cat", dim, first.shape())?;
        for t in &tensors[1..] {
            first.ensure_same("cat", t)?;
            let ok = t.rank() == first.rank()
                && t.shape()
                    .iter()
                    .zip(first.shape())
                    .enumerate()
                    .all(|(i, (a, b))| i == d || a == b);
            if !ok {
                return Err(Error::shape_mismatch(
                    "cat",
                    first.shape(),
                    t.shape(),
                    format!("all dims but {d} must agree"),
                ));
            }
        }
        if tensors.len() == 1 {
            return Ok(first.clone());
        }
        let mut shape = first.shape().to_vec();
        shape[d] = tensors.iter().map(|t| t.shape()[d]).sum();
        let outer: usize = shape[..d].iter().product();
        let out = with_dtype!(first.dtype(), T => cat_copy::<T>(tensors, d, outer, &shape)?);
        Ok(attach(out, || CatBackward {
            inputs: tensors.to_vec(),
            dim: d,
        }))
    }

    /// Stacks equal-shaped tensors along a new dim.
    pub fn stack(tensors: &[Tensor], dim: isize) -> Result<Tensor> {
        let parts = tensors
            .iter()
            .map(|t| t.unsqueeze(dim))
            .collect::<Result<Vec<_>>>()?;
        if let Some(first) = tensors.first() {
            for t in tensors {
                if t.shape() != first.shape() {
                    return Err(Error::shape_mismatch(
                        "stack",
                        first.shape(),
                        t.shape(),
                        "all shapes must be equal",
                    ));
                }
            }
        }
        Tensor::cat(&parts, dim)
    }

    /// Splits into `n` views along `dim`, the last possibly smaller (like `torch.chunk`).
    pub fn chunk(&self, n: usize, dim: isize) -> Result<Vec<Tensor>> {
        if n == 0 {
            return Err(Error::invalid_shape(
                "chunk",
                self.shape(),
                "chunk count must be > 0",
            ));
        }
        let d = resolve_dim("chunk", dim, self.shape())?;
        let size = self.shape()[d];
        let step = size.div_ceil(n).max(1);
        self.split(step, d as isize)
    }

    /// Splits into views of `size` entries along `dim`, the last possibly smaller (like
    /// `torch.split`).
    pub fn split(&self, size: usize, dim: isize) -> Result<Vec<Tensor>> {
        if size == 0 {
            return Err(Error::invalid_shape(
                "split",
                self.shape(),
                "split size must be > 0",
            ));
        }
        let d = resolve_dim("split", dim, self.shape())?;
        let total = self.shape()[d];
        let mut out = Vec::new();
        let mut start = 0;
        while start < total {
            let len = size.min(total - start);
            out.push(self.narrow(d as isize, start, len)?);
            start += len;
        }
        if out.is_empty() {
            out.push(self.clone());
        }
        Ok(out)
    }

    /// Splits into views with the given sizes along `dim` (they must sum to the dim's size).
    pub fn split_sizes(&self, sizes: &[usize], dim: isize) -> Result<Vec<Tensor>> {
        let d = resolve_dim("split_sizes", dim, self.shape())?;
        if sizes.iter().sum::<usize>() != self.shape()[d] {
            return Err(Error::invalid_shape(
                "split_sizes",
                self.shape(),
                format!("sizes {sizes:?} do not sum to dim {d}"),
            ));
        }
        let mut start = 0;
        sizes
            .iter()
            .map(|&len| {
                let t = self.narrow(d as isize, start, len);
                start += len;
                t
            })
            .collect()
    }
}

fn cat_copy<T: WithDType>(
    tensors: &[Tensor],
    d: usize,
    outer: usize,
    shape: &[usize],
) -> Result<Tensor> {
    let numel: usize = shape.iter().product();
    let mut out: Vec<T> = Vec::with_capacity(numel);
    let parts: Vec<(Vec<T>, usize)> = tensors
        .iter()
        .map(|t| {
            let block: usize = t.shape()[d..].iter().product();
            Ok((t.to_vec::<T>()?, block))
        })
        .collect::<Result<_>>()?;
    for o in 0..outer {
        for (data, block) in &parts {
            out.extend_from_slice(&data[o * block..(o + 1) * block]);
        }
    }
    debug_assert_eq!(out.len(), numel);
    Tensor::from_vec(out, shape)
}
