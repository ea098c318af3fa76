//! Indexing: `index_select`, `embedding`, `gather`, `scatter_add`, `index_add`, `topk`, and the
//! triangular `triu`/`tril` masks, with PyTorch semantics and backward passes.
//!
//! The backward passes are the ops themselves: the gradient of a gather is a scatter-add of the
//! output gradient, the gradient of a scatter-add's source is a gather, and so on, so each pair
//! is written once. Index tensors may be i64, u32 or u8 and any layout; an index out of range is
//! an error naming the op, the index and the dim (never a panic).

use crate::autograd::{Backward, attach, no_grad};
use crate::ops::view::with_dtype;
use crate::shape::{contiguous_strides, resolve_dim};
use crate::{DType, Device, Error, Result, Tensor, WithDType};

/// The values of an index tensor as `i64`, in logical order.
fn index_values(op: &'static str, idx: &Tensor) -> Result<Vec<i64>> {
    Ok(match idx.dtype() {
        DType::I64 => idx.to_vec::<i64>()?,
        DType::U32 => idx.to_vec::<u32>()?.into_iter().map(i64::from).collect(),
        DType::U8 => idx.to_vec::<u8>()?.into_iter().map(i64::from).collect(),
        d => {
            return Err(Error::unsupported_dtype(
                op,
                d,
                "indices must be i64, u32 or u8",
            ));
        }
    })
}

/// Checks every index against `size` (the extent of `dim` in `shape`).
fn check_range(
    op: &'static str,
    idx: &[i64],
    size: usize,
    dim: usize,
    shape: &[usize],
) -> Result<()> {
    if let Some(&bad) = idx.iter().find(|&&i| i < 0 || i as usize >= size) {
        return Err(Error::out_of_bounds(
            op,
            format!("index {bad} is out of range for dim {dim} of size {size} (shape {shape:?})"),
        ));
    }
    Ok(())
}

/// `(outer, size, inner)` of `shape` split around `dim`.
fn split_at_dim(shape: &[usize], dim: usize) -> (usize, usize, usize) {
    let outer = shape[..dim].iter().product();
    let inner = shape[dim + 1..].iter().product();
    (outer, shape[dim], inner)
}

/// Element types that scatter-add can accumulate in (integers wrap, as in PyTorch).
trait AddElem: Copy {
    fn add(self, o: Self) -> Self;
}
macro_rules! add_elem {
    (float: $($t:ty),*) => { $(impl AddElem for $t { fn add(self, o: Self) -> Self { self + o } })* };
    (int: $($t:ty),*) => { $(impl AddElem for $t { fn add(self, o: Self) -> Self { self.wrapping_add(o) } })* };
}
add_elem!(float: f32, f64);
add_elem!(int: i64, u32, u8);

/// Runs `$body` with `$T` bound to the accumulation type of `$dtype` (f32 for f16/bf16).
macro_rules! with_acc_dtype {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::F32 | DType::F16 | DType::BF16 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            DType::I64 => {
                type $T = i64;
                $body
            }
            DType::U32 => {
                type $T = u32;
                $body
            }
            DType::U8 => {
                type $T = u8;
                $body
            }
        }
    };
}

/// The logical elements of `t` in its accumulation type (see [`with_acc_dtype`]).
fn acc_data<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    match t.dtype() {
        DType::F16 | DType::BF16 => {
            let v = t.to_dtype(T::DTYPE)?;
            v.to_vec::<T>()
        }
        _ => t.to_vec::<T>(),
    }
}

/// A tensor of `dtype` from accumulation-type data.
fn from_acc<T: WithDType>(v: Vec<T>, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let t = Tensor::from_vec(v, shape)?;
    if dtype == T::DTYPE {
        Ok(t)
    } else {
        t.to_dtype(dtype)
    }
}

/// Visits every position of `shape` in row-major order with its offset into a contiguous
/// tensor of `target_strides`, skipping `dim` (the caller adds the index along `dim`), and the
/// coordinate along `dim`.
fn for_each_position(
    shape: &[usize],
    target_strides: &[usize],
    dim: usize,
    mut f: impl FnMut(usize, usize),
) {
    let n: usize = shape.iter().product();
    if n == 0 {
        return;
    }
    let rank = shape.len();
    let mut coord = vec![0usize; rank];
    let mut base = 0usize;
    for _ in 0..n {
        f(base, coord[dim]);
        for d in (0..rank).rev() {
            coord[d] += 1;
            if d != dim {
                base += target_strides[d];
            }
            if coord[d] < shape[d] {
                break;
            }
            if d != dim {
                base -= target_strides[d] * shape[d];
            }
            coord[d] = 0;
        }
    }
}

/// Checks the shapes of a gather/scatter: same rank, and `index` no larger than `other` in any
/// dim and no larger than `target` in dims other than `dim`.
fn check_scatter_shapes(
    op: &'static str,
    target: &[usize],
    index: &[usize],
    other: Option<&[usize]>,
    dim: usize,
) -> Result<()> {
    if index.len() != target.len() {
        return Err(Error::shape_mismatch(
            op,
            target,
            index,
            "index must have the same rank as the tensor",
        ));
    }
    for d in 0..index.len() {
        if d != dim && index[d] > target[d] {
            return Err(Error::shape_mismatch(
                op,
                target,
                index,
                format!(
                    "index size {} exceeds the tensor's {} in dim {d}",
                    index[d], target[d]
                ),
            ));
        }
    }
    if let Some(src) = other
        && (src.len() != index.len() || index.iter().zip(src).any(|(i, s)| i > s))
    {
        return Err(Error::shape_mismatch(
            op,
            index,
            src,
            "index must be no larger than src in every dim",
        ));
    }
    Ok(())
}

struct IndexSelectBackward {
    input: Tensor,
    dim: usize,
    index: Tensor,
}

impl Backward for IndexSelectBackward {
    fn name(&self) -> &'static str {
        "index_select"
    }
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.input]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let zeros = Tensor::zeros(self.input.shape(), g.dtype(), g.device())?;
        Ok(vec![Some(zeros.index_add(
            self.dim as isize,
            &self.index,
            g,
        )?)])
    }
}

struct IndexAddBackward {
    input: Tensor,
    src: Tensor,
    dim: usize,
    index: Tensor,
}

impl Backward for IndexAddBackward {
    fn name(&self) -> &'static str {
        "index_add"
    }
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.input, &self.src]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let gs = if self.src.is_tracked() {
            Some(g.index_select(self.dim as isize, &self.index)?)
        } else {
            None
        };
        Ok(vec![Some(g.clone()), gs])
    }
}

struct GatherBackward {
    input: Tensor,
    dim: usize,
    index: Tensor,
}

impl Backward for GatherBackward {
    fn name(&self) -> &'static str {
        "gather"
    }
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.input]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let zeros = Tensor::zeros(self.input.shape(), g.dtype(), g.device())?;
        Ok(vec![Some(zeros.scatter_add(
            self.dim as isize,
            &self.index,
            g,
        )?)])
    }
}

struct ScatterAddBackward {
    input: Tensor,
    src: Tensor,
    dim: usize,
    index: Tensor,
}

impl Backward for ScatterAddBackward {
    fn name(&self) -> &'static str {
        "scatter_add"
    }
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.input, &self.src]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let gs = if self.src.is_tracked() {
            // Only the src elements covered by `index` reach the output; the rest get zero.
            let picked = g.gather(self.dim as isize, &self.index)?;
            Some(if picked.shape() == self.src.shape() {
                picked
            } else {
                pad_to(&picked, self.src.shape())?
            })
        } else {
            None
        };
        Ok(vec![Some(g.clone()), gs])
    }
}

/// `t` placed at the origin of a zero tensor of `shape` (every dim of `t` <= `shape`).
fn pad_to(t: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let mut cur = t.clone();
    for (d, &want) in shape.iter().enumerate() {
        let have = cur.shape()[d];
        if have < want {
            let mut zshape = cur.shape().to_vec();
            zshape[d] = want - have;
            let z = Tensor::zeros(&zshape, cur.dtype(), cur.device())?;
            cur = Tensor::cat(&[cur, z], d as isize)?;
        }
    }
    Ok(cur)
}

struct TopkBackward {
    input: Tensor,
    dim: usize,
    indices: Tensor,
}

impl Backward for TopkBackward {
    fn name(&self) -> &'static str {
        "topk"
    }
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.input]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let zeros = Tensor::zeros(self.input.shape(), g.dtype(), g.device())?;
        Ok(vec![Some(zeros.scatter_add(
            self.dim as isize,
            &self.indices,
            g,
        )?)])
    }
}

/// Orders `a` before `b` when `a` is larger (NaN counts as the largest value, as in PyTorch).
fn desc<T: PartialOrd>(a: &T, b: &T) -> std::cmp::Ordering {
    let a_nan = a.partial_cmp(a).is_none();
    let b_nan = b.partial_cmp(b).is_none();
    match (a_nan, b_nan) {
        (true, true) => std::cmp::Ordering::Equal,
        (true, false) => std::cmp::Ordering::Less,
        (false, true) => std::cmp::Ordering::Greater,
        (false, false) => b.partial_cmp(a).expect("neither is NaN"),
    }
}

impl Tensor {
    /// The slices at `indices` (1-D or scalar, i64/u32/u8) along `dim`, like
    /// `torch.index_select`. Any dtype.
    pub fn index_select(&self, dim: isize, indices: &Tensor) -> Result<Tensor> {
        const OP: &str = "index_select";
        self.device().ensure_available(OP)?;
        let dim = resolve_dim(OP, dim, self.shape())?;
        if indices.rank() > 1 {
            return Err(Error::invalid_shape(
                OP,
                indices.shape(),
                "indices must be 1-D or a scalar",
            ));
        }
        let idx = index_values(OP, indices)?;
        let (outer, size, inner) = split_at_dim(self.shape(), dim);
        check_range(OP, &idx, size, dim, self.shape())?;
        let mut out_shape = self.shape().to_vec();
        out_shape[dim] = idx.len();
        let out = with_dtype!(self.dtype(), T => {
            // a contiguous table is read in place: an embedding lookup touches only its rows
            let owned;
            let src: &[T] = match self.as_contiguous_slice::<T>()? {
                Some(s) => s,
                None => {
                    owned = self.to_vec::<T>()?;
                    &owned
                }
            };
            let mut out: Vec<T> = Vec::with_capacity(outer * idx.len() * inner);
            for o in 0..outer {
                for &i in &idx {
                    let start = (o * size + i as usize) * inner;
                    out.extend_from_slice(&src[start..start + inner]);
                }
            }
            Tensor::from_vec(out, &out_shape)?
        });
        if !self.dtype().is_float() {
            return Ok(out);
        }
        Ok(attach(out, || IndexSelectBackward {
            input: self.clone(),
            dim,
            index: indices.clone(),
        }))
    }

    /// Rows of this `[vocab, dim]` table at `ids` (any shape): the result has shape
    /// `ids.shape() + [dim]`, like `torch.nn.functional.embedding`.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        const OP: &str = "embedding";
        if self.rank() != 2 {
            return Err(Error::invalid_shape(
                OP,
                self.shape(),
                "the embedding table must be [vocab, dim]",
            ));
        }
        let flat = ids.reshape(&[ids.numel()])?;
        let rows = self.index_select(0, &flat)?;
        let mut shape = ids.shape().to_vec();
        shape.push(self.shape()[1]);
        rows.reshape(&shape)
    }

    /// Adds the slices of `src` into this tensor at `indices` along `dim` (repeated indices
    /// accumulate), like `Tensor.index_add`. `src` has this shape with `dim` of size
    /// `indices.len()`.
    pub fn index_add(&self, dim: isize, indices: &Tensor, src: &Tensor) -> Result<Tensor> {
        const OP: &str = "index_add";
        self.device().ensure_available(OP)?;
        self.ensure_same(OP, src)?;
        let dim = resolve_dim(OP, dim, self.shape())?;
        if indices.rank() > 1 {
            return Err(Error::invalid_shape(
                OP,
                indices.shape(),
                "indices must be 1-D or a scalar",
            ));
        }
        let idx = index_values(OP, indices)?;
        let mut want = self.shape().to_vec();
        want[dim] = idx.len();
        if src.shape() != want.as_slice() {
            return Err(Error::shape_mismatch(
                OP,
                self.shape(),
                src.shape(),
                format!("src must have shape {want:?}"),
            ));
        }
        let (outer, size, inner) = split_at_dim(self.shape(), dim);
        check_range(OP, &idx, size, dim, self.shape())?;
        let out = with_acc_dtype!(self.dtype(), T => {
            let mut dst = acc_data::<T>(self)?;
            let s = acc_data::<T>(src)?;
            for o in 0..outer {
                for (k, &i) in idx.iter().enumerate() {
                    let d0 = (o * size + i as usize) * inner;
                    let s0 = (o * idx.len() + k) * inner;
                    for (d, &v) in dst[d0..d0 + inner].iter_mut().zip(&s[s0..s0 + inner]) {
                        *d = d.add(v);
                    }
                }
            }
            from_acc(dst, self.shape(), self.dtype())?
        });
        if !self.dtype().is_float() {
            return Ok(out);
        }
        Ok(attach(out, || IndexAddBackward {
            input: self.clone(),
            src: src.clone(),
            dim,
            index: indices.clone(),
        }))
    }

    /// `out[i][j] = self[index[i][j]][j]` for `dim = 0` (and likewise for other dims), like
    /// `torch.gather`: `index` has this tensor's rank, the result has `index`'s shape.
    pub fn gather(&self, dim: isize, index: &Tensor) -> Result<Tensor> {
        const OP: &str = "gather";
        self.device().ensure_available(OP)?;
        let dim = resolve_dim(OP, dim, self.shape())?;
        check_scatter_shapes(OP, self.shape(), index.shape(), None, dim)?;
        let idx = index_values(OP, index)?;
        check_range(OP, &idx, self.shape()[dim], dim, self.shape())?;
        let strides = contiguous_strides(self.shape());
        let sd = strides[dim];
        let out = with_dtype!(self.dtype(), T => {
            let src = self.to_vec::<T>()?;
            let mut out: Vec<T> = Vec::with_capacity(idx.len());
            let mut k = 0;
            for_each_position(index.shape(), &strides, dim, |base, _| {
                out.push(src[base + idx[k] as usize * sd]);
                k += 1;
            });
            Tensor::from_vec(out, index.shape())?
        });
        if !self.dtype().is_float() {
            return Ok(out);
        }
        Ok(attach(out, || GatherBackward {
            input: self.clone(),
            dim,
            index: index.clone(),
        }))
    }

    /// Adds `src` into a copy of this tensor at positions given by `index` along `dim`
    /// (`out[index[i][j]][j] += src[i][j]` for `dim = 0`), like `torch.scatter_add`. Only the
    /// part of `src` covered by `index`'s shape is read (and gets a gradient).
    pub fn scatter_add(&self, dim: isize, index: &Tensor, src: &Tensor) -> Result<Tensor> {
        const OP: &str = "scatter_add";
        self.device().ensure_available(OP)?;
        self.ensure_same(OP, src)?;
        let dim = resolve_dim(OP, dim, self.shape())?;
        check_scatter_shapes(OP, self.shape(), index.shape(), Some(src.shape()), dim)?;
        let idx = index_values(OP, index)?;
        check_range(OP, &idx, self.shape()[dim], dim, self.shape())?;
        let strides = contiguous_strides(self.shape());
        let sd = strides[dim];
        let src_strides = contiguous_strides(src.shape());
        let out = with_acc_dtype!(self.dtype(), T => {
            let mut dst = acc_data::<T>(self)?;
            let s = acc_data::<T>(src)?;
            // Source offsets walk index's positions in src's strides.
            let mut src_offsets = Vec::with_capacity(idx.len());
            for_each_position(index.shape(), &src_strides, dim, |b, c| {
                src_offsets.push(b + c * src_strides[dim]);
            });
            let mut k = 0;
            for_each_position(index.shape(), &strides, dim, |base, _| {
                let d = base + idx[k] as usize * sd;
                dst[d] = dst[d].add(s[src_offsets[k]]);
                k += 1;
            });
            from_acc(dst, self.shape(), self.dtype())?
        });
        if !self.dtype().is_float() {
            return Ok(out);
        }
        Ok(attach(out, || ScatterAddBackward {
            input: self.clone(),
            src: src.clone(),
            dim,
            index: index.clone(),
        }))
    }

    /// The `k` largest (or smallest) entries along `dim`, sorted, with their indices (i64),
    /// like `torch.topk(sorted=True)`. NaN counts as larger than every number; equal values
    /// keep index order. `k` may be 0 up to the size of `dim`.
    pub fn topk(&self, k: usize, dim: isize, largest: bool) -> Result<(Tensor, Tensor)> {
        const OP: &str = "topk";
        self.device().ensure_available(OP)?;
        let dim = resolve_dim(OP, dim, self.shape())?;
        let size = self.shape()[dim];
        if k > size {
            return Err(Error::out_of_bounds(
                OP,
                format!(
                    "k = {k} exceeds the size {size} of dim {dim} (shape {:?})",
                    self.shape()
                ),
            ));
        }
        let rank = self.rank();
        // Move `dim` last so each row is contiguous.
        let mut order: Vec<usize> = (0..rank).filter(|&d| d != dim).collect();
        order.push(dim);
        let mut inverse = vec![0; rank];
        for (i, &d) in order.iter().enumerate() {
            inverse[d] = i;
        }
        let moved = no_grad(|| self.detach().permute(&order)?.contiguous())?;
        let mut moved_shape = moved.shape().to_vec();
        *moved_shape.last_mut().expect("rank >= 1 after resolve_dim") = k;
        let rows = moved.numel().checked_div(size).unwrap_or(0);
        let (values, indices) = with_dtype!(self.dtype(), T => {
            let v = moved.to_vec::<T>()?;
            let mut vals: Vec<T> = Vec::with_capacity(rows * k);
            let mut ids: Vec<i64> = Vec::with_capacity(rows * k);
            let mut perm: Vec<usize> = Vec::with_capacity(size);
            for r in 0..rows {
                let row = &v[r * size..(r + 1) * size];
                perm.clear();
                perm.extend(0..size);
                let cmp = |a: &usize, b: &usize| {
                    let o = if largest {
                        desc(&row[*a], &row[*b])
                    } else {
                        desc(&row[*b], &row[*a])
                    };
                    o.then(a.cmp(b))
                };
                if k > 0 && k < size {
                    perm.select_nth_unstable_by(k - 1, cmp);
                }
                perm[..k].sort_unstable_by(cmp);
                for &p in &perm[..k] {
                    vals.push(row[p]);
                    ids.push(p as i64);
                }
            }
            (
                Tensor::from_vec(vals, &moved_shape)?,
                Tensor::from_vec(ids, &moved_shape)?,
            )
        });
        let values = values.permute(&inverse)?.contiguous()?;
        let indices = indices.permute(&inverse)?.contiguous()?;
        if !self.dtype().is_float() {
            return Ok((values, indices));
        }
        let values = attach(values, || TopkBackward {
            input: self.clone(),
            dim,
            indices: indices.clone(),
        });
        Ok((values, indices))
    }

    /// A `[rows, cols]` u8 mask with 1 where `col - row >= diagonal` (the part `triu` keeps).
    pub fn triu_mask(rows: usize, cols: usize, diagonal: i64, device: Device) -> Result<Tensor> {
        Self::tri_mask(rows, cols, device, |r, c| c - r >= diagonal)
    }

    /// A `[rows, cols]` u8 mask with 1 where `col - row <= diagonal` (the part `tril` keeps);
    /// `tril_mask(n, n, 0, ..)` is the causal attention mask.
    pub fn tril_mask(rows: usize, cols: usize, diagonal: i64, device: Device) -> Result<Tensor> {
        Self::tri_mask(rows, cols, device, |r, c| c - r <= diagonal)
    }

    fn tri_mask(
        rows: usize,
        cols: usize,
        device: Device,
        keep: impl Fn(i64, i64) -> bool,
    ) -> Result<Tensor> {
        device.ensure_available("tri_mask")?;
        let mut m = Vec::with_capacity(rows * cols);
        for r in 0..rows as i64 {
            for c in 0..cols as i64 {
                m.push(u8::from(keep(r, c)));
            }
        }
        Tensor::from_vec(m, &[rows, cols])
    }

    /// The upper triangle of the last two dims (`col - row >= diagonal`), zeros elsewhere, like
    /// `torch.triu`.
    pub fn triu(&self, diagonal: i64) -> Result<Tensor> {
        let (r, c) = self.last_two("triu")?;
        let keep = Tensor::triu_mask(r, c, diagonal, self.device())?;
        self.masked_fill(&keep.eq_(&Tensor::scalar(0u8))?, 0.0)
    }

    /// The lower triangle of the last two dims (`col - row <= diagonal`), zeros elsewhere, like
    /// `torch.tril`.
    pub fn tril(&self, diagonal: i64) -> Result<Tensor> {
        let (r, c) = self.last_two("tril")?;
        let keep = Tensor::tril_mask(r, c, diagonal, self.device())?;
        self.masked_fill(&keep.eq_(&Tensor::scalar(0u8))?, 0.0)
    }

    fn last_two(&self, op: &'static str) -> Result<(usize, usize)> {
        let s = self.shape();
        if s.len() < 2 {
            return Err(Error::invalid_shape(op, s, "needs at least 2 dims"));
        }
        Ok((s[s.len() - 2], s[s.len() - 1]))
    }
}
