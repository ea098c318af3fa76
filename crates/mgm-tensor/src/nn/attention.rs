//! Scaled dot-product attention with `torch.nn.functional.scaled_dot_product_attention`
//! semantics, and [`MultiHeadAttention`] (q/k/v/out projections) built on it.
//!
//! Inference runs a fused kernel: for each (batch, head) and block of query rows, one gemm
//! writes `scale * Q K^T` into a scratch block, the mask is added and each row is softmaxed in
//! place while it is in cache, and a second gemm multiplies by `V` straight into the output. The
//! operands are read through their own strides (a `[B, T, H, d]` projection viewed as
//! `[B, H, T, d]` is never copied), the score matrix never leaves the task's scratch, and
//! [`scaled_dot_product_attention_merged`] writes `[B, T, H * d]` directly, so merging the heads
//! costs no transpose copy either. When any input is tracked for autograd the same math runs as
//! tensor ops (matmul, softmax, matmul), which carry their backward passes.
//!
//! Masks follow PyTorch: a u8 (bool) mask marks with nonzero (True) the keys a query may attend
//! to; a float mask is added to the scores. A query row whose scores are all `-inf` (every key
//! masked) yields zeros rather than PyTorch's NaN, as softmax does everywhere in mgm-tensor
//! (DESIGN.md section 3).

use rayon::prelude::*;

use mgm_kernels::gemm::{
    self as kgemm, Epilogue, MatMut, MatRef, PackedLhs, PackedRhs, Parallelism,
};

use crate::autograd::needs_grad;
use crate::nn::{Activation, Linear, Module, VarStore};
use crate::ops::softmax::{Elem, has_avx2, row_max, simd_call, simd_variant, sum_f64};
use crate::shape::{Layout, broadcast_shapes};
use crate::{DType, Error, Result, Tensor};

const OP: &str = "scaled_dot_product_attention";

/// Query rows per task are chosen so that there are at least this many tasks per thread.
const TASKS_PER_THREAD: usize = 4;

/// Shapes of one attention call after broadcasting the batch dims.
struct Plan {
    batch: Vec<usize>,
    lq: usize,
    lk: usize,
    d: usize,
    dv: usize,
}

impl Plan {
    fn new(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Plan> {
        for (name, t) in [("query", q), ("key", k), ("value", v)] {
            if t.rank() < 2 {
                return Err(Error::invalid_shape(
                    OP,
                    t.shape(),
                    format!("{name} must be [..., L, d]"),
                ));
            }
            if !t.dtype().is_float() {
                return Err(Error::unsupported_dtype(
                    OP,
                    t.dtype(),
                    format!("{name} must be a float tensor"),
                ));
            }
        }
        q.ensure_same(OP, k)?;
        q.ensure_same(OP, v)?;
        let (qs, ks, vs) = (q.shape(), k.shape(), v.shape());
        let (rq, rk, rv) = (qs.len(), ks.len(), vs.len());
        let (lq, d) = (qs[rq - 2], qs[rq - 1]);
        let (lk, dk) = (ks[rk - 2], ks[rk - 1]);
        if dk != d {
            return Err(Error::shape_mismatch(
                OP,
                qs,
                ks,
                format!("query and key head dims differ ({d} != {dk})"),
            ));
        }
        if vs[rv - 2] != lk {
            return Err(Error::shape_mismatch(
                OP,
                ks,
                vs,
                format!("key and value lengths differ ({lk} != {})", vs[rv - 2]),
            ));
        }
        let batch = broadcast_shapes(OP, &qs[..rq - 2], &ks[..rk - 2])?;
        let batch = broadcast_shapes(OP, &batch, &vs[..rv - 2])?;
        let plan = Plan {
            batch,
            lq,
            lk,
            d,
            dv: vs[rv - 1],
        };
        if let Some(m) = mask {
            if m.dtype() != DType::U8 && !m.dtype().is_float() {
                return Err(Error::unsupported_dtype(
                    OP,
                    m.dtype(),
                    "the mask must be u8 (nonzero = attend) or float (added to the scores)",
                ));
            }
            let full = plan.scores_shape();
            if broadcast_shapes(OP, m.shape(), &full).ok().as_deref() != Some(&full[..]) {
                return Err(Error::shape_mismatch(
                    OP,
                    m.shape(),
                    &full,
                    "the mask must broadcast to the scores [..., Lq, Lk]",
                ));
            }
        }
        Ok(plan)
    }

    fn scores_shape(&self) -> Vec<usize> {
        let mut s = self.batch.clone();
        s.extend([self.lq, self.lk]);
        s
    }

    fn count(&self) -> usize {
        self.batch.iter().product()
    }
}

/// One operand as the kernel reads it: whole storage, the start of each batch entry's matrix,
/// and the matrix's row and column strides.
struct Mat<'a, F> {
    data: &'a [F],
    offsets: Vec<usize>,
    rs: usize,
    cs: usize,
}

impl<'a, F> Mat<'a, F> {
    /// `layout` broadcast to `[batch.., rows, cols]`.
    fn new(
        data: &'a [F],
        layout: &Layout,
        batch: &[usize],
        rows: usize,
        cols: usize,
    ) -> Result<Self> {
        let mut target = batch.to_vec();
        target.extend([rows, cols]);
        let l = layout.broadcast_as(OP, &target)?;
        let r = target.len();
        Ok(Mat {
            data,
            offsets: batch_offsets(batch, &l.strides()[..r - 2], l.offset()),
            rs: l.strides()[r - 2],
            cs: l.strides()[r - 1],
        })
    }

    /// Largest storage index the matrix of batch entry `i` touches (rows, cols > 0).
    fn last_index(&self, i: usize, rows: usize, cols: usize) -> usize {
        self.offsets[i] + (rows - 1) * self.rs + (cols - 1) * self.cs
    }
}

/// Storage offset of every batch entry, in row-major batch order.
fn batch_offsets(batch: &[usize], strides: &[usize], base: usize) -> Vec<usize> {
    let count: usize = batch.iter().product();
    (0..count)
        .map(|mut i| {
            let mut o = base;
            for d in (0..batch.len()).rev() {
                o += (i % batch[d]) * strides[d];
                i /= batch[d];
            }
            o
        })
        .collect()
}

/// Where the kernel writes: output entry `i` starts at `offsets[i]`, rows are `rs` apart and
/// columns are contiguous. Distinct (entry, row) pairs must cover disjoint elements.
struct OutSpec {
    offsets: Vec<usize>,
    rs: usize,
    len: usize,
    /// The output tensor's shape (`len` elements).
    shape: Vec<usize>,
}

/// The output pointer shared by the tasks, each of which writes its own disjoint block.
#[derive(Clone, Copy)]
struct OutPtr<F>(*mut F);

impl<F> OutPtr<F> {
    /// The pointer; a method, so that closures capture the Send + Sync wrapper, not the field.
    fn get(self) -> *mut F {
        self.0
    }
}
// SAFETY: the pointer is only dereferenced through gemm writes to blocks that OutSpec's
// contract makes disjoint between tasks, while the owning Vec outlives the parallel loop.
unsafe impl<F: Send> Send for OutPtr<F> {}
// SAFETY: as above; no two tasks touch the same element.
unsafe impl<F: Send> Sync for OutPtr<F> {}

/// `dst[m, n] = beta * (a[m, k] b[k, n])` with `dst` rows `dst_rs` apart (columns contiguous),
/// single-threaded (the caller parallelises over tasks).
///
/// # Safety
/// Every element gemm reads (`a`: `(m-1)*a_rs + (k-1)*a_cs`, `b` likewise) must be in bounds
/// of its allocation, and the `m x n` destination block must be valid for writes and not be
/// accessed by anyone else during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into<F: Elem>(
    dst: *mut F,
    dst_rs: usize,
    (a, a_rs, a_cs): (*const F, usize, usize),
    (b, b_rs, b_cs): (*const F, usize, usize),
    m: usize,
    n: usize,
    k: usize,
    beta: F,
) {
    // SAFETY: forwarded from this function's contract; read_dst = false makes gemm overwrite
    // the block with 0 * dst + beta * a b.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            false,
            a,
            a_cs as isize,
            a_rs as isize,
            b,
            b_cs as isize,
            b_rs as isize,
            F::zero(),
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Softmax of each `lk`-wide row of `s`, in place; all `-inf` rows become zeros, rows holding
/// NaN become NaN.
#[inline(always)]
fn softmax_rows_inplace<F: Elem>(s: &mut [F], lk: usize) {
    for row in s.chunks_exact_mut(lk) {
        let m = row_max(row);
        if m == F::neg_infinity() {
            let fill = if row.iter().any(|x| x.is_nan()) {
                F::c(f64::NAN)
            } else {
                F::zero()
            };
            row.iter_mut().for_each(|x| *x = fill);
            continue;
        }
        for x in row.iter_mut() {
            *x = (*x - m).exp_k();
        }
        let inv = F::c(1.0 / sum_f64(row));
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}
simd_variant!(softmax_rows_inplace_avx2 = softmax_rows_inplace(s: &mut [F], lk: usize));

/// The fused forward: `out = softmax(scale * q k^T + mask) v` for every batch entry.
#[allow(clippy::too_many_arguments)]
fn attention_kernel<F: Elem>(
    plan: &Plan,
    q: &Mat<F>,
    k: &Mat<F>,
    v: &Mat<F>,
    mask: Option<&Mat<F>>,
    scale: F,
    out: &mut [F],
    spec: &OutSpec,
) {
    let (lq, lk, d, dv) = (plan.lq, plan.lk, plan.d, plan.dv);
    let count = plan.count();
    assert_eq!(
        out.len(),
        spec.len,
        "attention output buffer has the planned size"
    );
    if count == 0 || lq == 0 || dv == 0 {
        return;
    }
    if lk == 0 {
        // softmax over no keys: every output row is an empty sum
        for i in 0..count {
            for r in 0..lq {
                let o = spec.offsets[i] + r * spec.rs;
                out[o..o + dv].iter_mut().for_each(|x| *x = F::zero());
            }
        }
        return;
    }
    for i in 0..count {
        assert!(
            (d == 0
                || (q.last_index(i, lq, d) < q.data.len()
                    && k.last_index(i, lk, d) < k.data.len()))
                && v.last_index(i, lk, dv) < v.data.len()
                && mask.is_none_or(|m| m.last_index(i, lq, lk) < m.data.len())
                && spec.offsets[i] + (lq - 1) * spec.rs + dv <= out.len(),
            "attention operand views exceed their storage"
        );
    }
    let threads = rayon::current_num_threads().max(1);
    let want = threads * TASKS_PER_THREAD;
    let blocks_per_entry = want.div_ceil(count).clamp(1, lq.div_ceil(16).max(1));
    let rb = lq.div_ceil(blocks_per_entry);
    let blocks = lq.div_ceil(rb);
    let simd = has_avx2();
    let ptr = OutPtr(out.as_mut_ptr());
    let task = |t: usize| {
        let (i, b) = (t / blocks, t % blocks);
        let r0 = b * rb;
        let rows = rb.min(lq - r0);
        let mut s: Vec<F> = Vec::with_capacity(rows * lk);
        if d > 0 {
            // SAFETY: the assert above bounds q's rows r0..r0+rows and all of k within their
            // storage; the destination is this task's own buffer with capacity rows * lk, and
            // gemm (read_dst = false) writes every element of that rows x lk block before
            // set_len exposes it, so no zero fill is needed.
            unsafe {
                gemm_into(
                    s.as_mut_ptr(),
                    lk,
                    (q.data.as_ptr().add(q.offsets[i] + r0 * q.rs), q.rs, q.cs),
                    (k.data.as_ptr().add(k.offsets[i]), k.cs, k.rs),
                    rows,
                    lk,
                    d,
                    scale,
                );
                s.set_len(rows * lk);
            }
        } else {
            // no head dims: every score is an empty sum
            s.resize(rows * lk, F::zero());
        }
        if let Some(m) = mask {
            for (r, row) in s.chunks_exact_mut(lk).enumerate() {
                let base = m.offsets[i] + (r0 + r) * m.rs;
                if m.cs == 1 {
                    for (x, &a) in row.iter_mut().zip(&m.data[base..base + lk]) {
                        *x += a;
                    }
                } else {
                    for (j, x) in row.iter_mut().enumerate() {
                        *x += m.data[base + j * m.cs];
                    }
                }
            }
        }
        simd_call!(
            simd,
            softmax_rows_inplace_avx2,
            softmax_rows_inplace(&mut s, lk)
        );
        let dst_off = spec.offsets[i] + r0 * spec.rs;
        // SAFETY: v's matrix is in bounds (assert above); the destination block (rows x dv at
        // dst_off, row stride spec.rs) lies inside `out` and belongs to this (entry, row block)
        // alone by OutSpec's contract, and `out` outlives the parallel loop.
        unsafe {
            gemm_into(
                ptr.get().add(dst_off),
                spec.rs,
                (s.as_ptr(), lk, 1),
                (v.data.as_ptr().add(v.offsets[i]), v.rs, v.cs),
                rows,
                dv,
                lk,
                F::one(),
            );
        }
    };
    let tasks = count * blocks;
    if tasks > 1 && threads > 1 && lq * lk * (d + dv) * count >= 1 << 15 {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// The signature of a dtype-specific fused kernel.
type KernelFn<F> =
    fn(&Plan, &Mat<F>, &Mat<F>, &Mat<F>, Option<&Mat<F>>, F, &mut [F], &OutSpec) -> Result<()>;

/// Compute dtypes of the fused kernel: f32 has the packed-GEMM kernel, f64 (gradient checks,
/// references) keeps the generic one.
trait AttnElem: Elem {
    fn packed_attention() -> Option<KernelFn<Self>>;
}

impl AttnElem for f32 {
    fn packed_attention() -> Option<KernelFn<f32>> {
        Some(attention_kernel_packed)
    }
}

impl AttnElem for f64 {
    fn packed_attention() -> Option<KernelFn<f64>> {
        None
    }
}

/// Query rows per block of the packed f32 kernel: the block's scores (96 x Lk) stay in L2.
const PACKED_ROWS: usize = 96;

/// The f32 forward through the packed GEMM of mgm-kernels: per batch entry, `K^T` and `V` are
/// packed once; per block of query rows, `S = Q K^T` goes into a scratch block, is scaled,
/// masked and softmaxed in place, and `O = P V` is written straight into the output.
#[allow(clippy::too_many_arguments)]
fn attention_kernel_packed(
    plan: &Plan,
    q: &Mat<f32>,
    k: &Mat<f32>,
    v: &Mat<f32>,
    mask: Option<&Mat<f32>>,
    scale: f32,
    out: &mut [f32],
    spec: &OutSpec,
) -> Result<()> {
    let (lq, lk, d, dv) = (plan.lq, plan.lk, plan.d, plan.dv);
    let count = plan.count();
    assert_eq!(
        out.len(),
        spec.len,
        "attention output buffer has the planned size"
    );
    if count == 0 || lq == 0 || dv == 0 {
        return Ok(());
    }
    for i in 0..count {
        assert!(
            spec.offsets[i] + (lq - 1) * spec.rs + dv <= out.len(),
            "attention output block exceeds its buffer"
        );
    }
    let ptr = OutPtr(out.as_mut_ptr());
    let blocks = lq.div_ceil(PACKED_ROWS);
    let threads = rayon::current_num_threads().max(1);
    // one entry per task when there are enough of them, else its row blocks in parallel too
    let inner_parallel = count < threads && blocks > 1;
    let entry = |i: usize| -> Result<()> {
        // MatRef::new checks each view against its storage
        let kt = PackedRhs::new(MatRef::new(&k.data[k.offsets[i]..], d, lk, k.cs, k.rs)?);
        let vp = PackedRhs::new(MatRef::new(&v.data[v.offsets[i]..], lk, dv, v.rs, v.cs)?);
        let block = |s: &mut Vec<f32>, b: usize| -> Result<()> {
            let r0 = b * PACKED_ROWS;
            let rows = PACKED_ROWS.min(lq - r0);
            let qb = MatRef::new(&q.data[q.offsets[i] + r0 * q.rs..], rows, d, q.rs, q.cs)?;
            s.resize(rows * lk, 0.0);
            let sb = &mut s[..rows * lk];
            kgemm::cpu_packed(
                &PackedLhs::new(qb),
                &kt,
                MatMut::row_major(sb, rows, lk)?,
                &Epilogue::default(),
                Parallelism::Serial,
            )?;
            let mb = match mask {
                Some(m) => Some(MatRef::new(
                    &m.data[m.offsets[i] + r0 * m.rs..],
                    rows,
                    lk,
                    m.rs,
                    m.cs,
                )?),
                None => None,
            };
            let p = PackedLhs::softmax_rows(sb, rows, lk, scale, mb)?;
            // SAFETY: the block's rows x dv elements at offsets[i] + r0*rs (row stride rs) are
            // inside `out` (asserted above) and belong to this (entry, row block) alone by
            // OutSpec's contract; `out` outlives the parallel loop.
            let dst = unsafe {
                MatMut::from_raw_parts(
                    ptr.get().add(spec.offsets[i] + r0 * spec.rs),
                    rows,
                    dv,
                    spec.rs,
                )
            };
            kgemm::cpu_packed(&p, &vp, dst, &Epilogue::default(), Parallelism::Serial)?;
            Ok(())
        };
        if inner_parallel {
            (0..blocks)
                .into_par_iter()
                .try_for_each_init(Vec::new, |s, b| block(s, b))
        } else {
            let mut s = Vec::new();
            (0..blocks).try_for_each(|b| block(&mut s, b))
        }
    };
    if count > 1 && threads > 1 && lq * lk * (d + dv) * count >= 1 << 15 {
        (0..count).into_par_iter().try_for_each(entry)
    } else {
        (0..count).try_for_each(entry)
    }
}

/// The mask as an additive tensor of the compute dtype (u8: nonzero -> 0, zero -> -inf).
fn additive_mask(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    if mask.dtype() == DType::U8 {
        let zero = Tensor::zeros(&[], dtype, mask.device())?;
        let ninf = Tensor::full(f64::NEG_INFINITY, &[], dtype, mask.device())?;
        mask.where_cond(&zero, &ninf)
    } else {
        mask.to_dtype(dtype)
    }
}

/// Runs the fused kernel in compute precision and returns the output buffer.
fn fused<F: AttnElem>(
    plan: &Plan,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    spec: &OutSpec,
) -> Result<Vec<F>> {
    let (b, lq, lk, d, dv) = (&plan.batch, plan.lq, plan.lk, plan.d, plan.dv);
    let qm = Mat::new(q.storage_slice::<F>()?, q.layout(), b, lq, d)?;
    let km = Mat::new(k.storage_slice::<F>()?, k.layout(), b, lk, d)?;
    let vm = Mat::new(v.storage_slice::<F>()?, v.layout(), b, lk, dv)?;
    let mask = mask.map(|m| additive_mask(m, F::DTYPE)).transpose()?;
    let mm = match &mask {
        Some(m) => Some(Mat::new(m.storage_slice::<F>()?, m.layout(), b, lq, lk)?),
        None => None,
    };
    // The kernel overwrites every element the spec covers; cover the rest (none for the
    // layouts used here) with zeros rather than leaving it uninitialised.
    let mut out = vec![F::zero(); spec.len];
    if let Some(packed) = F::packed_attention() {
        packed(
            plan,
            &qm,
            &km,
            &vm,
            mm.as_ref(),
            F::c(scale),
            &mut out,
            spec,
        )?;
    } else {
        attention_kernel(
            plan,
            &qm,
            &km,
            &vm,
            mm.as_ref(),
            F::c(scale),
            &mut out,
            spec,
        );
    }
    Ok(out)
}

/// Dispatches on dtype: f32/f64 compute natively, f16/bf16 in f32 with the result rounded back.
fn fused_any(
    plan: &Plan,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    spec: &OutSpec,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let out_shape = &spec.shape[..];
    match dtype {
        DType::F32 => Tensor::from_vec(fused::<f32>(plan, q, k, v, mask, scale, spec)?, out_shape),
        DType::F64 => Tensor::from_vec(fused::<f64>(plan, q, k, v, mask, scale, spec)?, out_shape),
        _ => {
            let (q, k, v) = (
                q.to_dtype(DType::F32)?,
                k.to_dtype(DType::F32)?,
                v.to_dtype(DType::F32)?,
            );
            let out = fused::<f32>(plan, &q, &k, &v, mask, scale, spec)?;
            Tensor::from_float_vec(out, out_shape, dtype)
        }
    }
}

/// The same math as tensor ops, which carry autograd.
fn composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let mut s = q.matmul(&k.transpose(-2, -1)?)?.mul_scalar(scale)?;
    if let Some(m) = mask {
        s = s.add(&additive_mask(m, s.dtype())?)?;
    }
    s.softmax(-1)?.matmul(v)
}

fn default_scale(d: usize, scale: Option<f64>) -> f64 {
    scale.unwrap_or_else(|| 1.0 / (d.max(1) as f64).sqrt())
}

fn tracked(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> bool {
    let mut ts = vec![q, k, v];
    ts.extend(mask);
    needs_grad(&ts)
}

/// `softmax(q k^T * scale + mask) v` over the last two dims, like
/// `torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)`:
/// `q` `[..., Lq, d]`, `k` `[..., Lk, d]`, `v` `[..., Lk, dv]` with broadcast batch dims,
/// result `[..., Lq, dv]`. `scale` defaults to `1 / sqrt(d)`. A u8 `mask` marks the allowed
/// (query, key) pairs with nonzero (PyTorch's bool mask, True = attend); a float mask is added
/// to the scores; either broadcasts to `[..., Lq, Lk]`. Rows with every key masked give zeros.
///
/// ```
/// use mgm_tensor::nn::scaled_dot_product_attention;
/// use mgm_tensor::{DType, Device, Tensor};
/// let q = Tensor::randn(0, &[2, 4, 5, 8], 0.0, 1.0, DType::F32, Device::Cpu)?;
/// let kv = Tensor::randn(1, &[2, 4, 7, 8], 0.0, 1.0, DType::F32, Device::Cpu)?;
/// let y = scaled_dot_product_attention(&q, &kv, &kv, None, None)?;
/// assert_eq!(y.shape(), &[2, 4, 5, 8]);
/// # Ok::<(), mgm_tensor::Error>(())
/// ```
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: Option<f64>,
) -> Result<Tensor> {
    let plan = Plan::new(q, k, v, mask)?;
    let scale = default_scale(plan.d, scale);
    if tracked(q, k, v, mask) {
        return composed(q, k, v, mask, scale);
    }
    let (lq, dv) = (plan.lq, plan.dv);
    let count = plan.count();
    let mut shape = plan.batch.clone();
    shape.extend([lq, dv]);
    let spec = OutSpec {
        offsets: (0..count).map(|i| i * lq * dv).collect(),
        rs: dv,
        len: count * lq * dv,
        shape,
    };
    fused_any(&plan, q, k, v, mask, scale, &spec)
}

/// Attention over heads with the heads merged into the output's last dim: `q` `[B, H, Lq, d]`,
/// `k` `[B, H, Lk, d]`, `v` `[B, H, Lk, dv]` (batch and head dims broadcast), result
/// `[B, Lq, H * dv]`, i.e. `sdpa(q, k, v).transpose(1, 2).reshape(B, Lq, H * dv)` as multi-head
/// attention needs it before its output projection, written in place without the transpose
/// copy. Mask and scale as in [`scaled_dot_product_attention`].
pub fn scaled_dot_product_attention_merged(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: Option<f64>,
) -> Result<Tensor> {
    let plan = Plan::new(q, k, v, mask)?;
    if plan.batch.len() != 2 {
        return Err(Error::invalid_shape(
            OP,
            q.shape(),
            "merged-head attention takes [B, H, L, d] operands",
        ));
    }
    let scale = default_scale(plan.d, scale);
    let (bsz, heads, lq, dv) = (plan.batch[0], plan.batch[1], plan.lq, plan.dv);
    let shape = [bsz, lq, heads * dv];
    if tracked(q, k, v, mask) {
        return composed(q, k, v, mask, scale)?
            .transpose(1, 2)?
            .reshape(&shape);
    }
    let row = heads * dv;
    let spec = OutSpec {
        offsets: (0..bsz * heads)
            .map(|i| (i / heads) * lq * row + (i % heads) * dv)
            .collect(),
        rs: row,
        len: bsz * lq * row,
        shape: shape.to_vec(),
    };
    fused_any(&plan, q, k, v, mask, scale, &spec)
}

/// Names of the four projections under a [`MultiHeadAttention`]'s prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProjNames<'a> {
    /// Query projection.
    pub q: &'a str,
    /// Key projection.
    pub k: &'a str,
    /// Value projection.
    pub v: &'a str,
    /// Output projection.
    pub out: &'a str,
}

impl ProjNames<'static> {
    /// CLIP / transformers' BERT-style names: `q_proj`, `k_proj`, `v_proj`, `out_proj`.
    pub const CLIP: ProjNames<'static> = ProjNames {
        q: "q_proj",
        k: "k_proj",
        v: "v_proj",
        out: "out_proj",
    };
    /// LLaMA's names: `q_proj`, `k_proj`, `v_proj`, `o_proj`.
    pub const LLAMA: ProjNames<'static> = ProjNames {
        q: "q_proj",
        k: "k_proj",
        v: "v_proj",
        out: "o_proj",
    };
}

/// Multi-head attention with query/key/value/output [`Linear`] projections, like
/// transformers' `CLIPAttention` (no dropout): inputs `[B, T, D]` (or `[T, D]`), heads of
/// `D / num_heads`, scale `1 / sqrt(head_dim)`.
///
/// When the query, key and value projections are all packed (frozen f32), self-attention runs
/// them as one GEMM over a `[3D, D]` weight: the input is packed once and the product is wider.
#[derive(Clone, Debug)]
pub struct MultiHeadAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    /// q, k and v stacked, when they are all packed and of one width.
    qkv: Option<Linear>,
    num_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl MultiHeadAttention {
    /// Attention from its four projections; the query width must split into `num_heads`.
    pub fn new(
        q_proj: Linear,
        k_proj: Linear,
        v_proj: Linear,
        out_proj: Linear,
        num_heads: usize,
    ) -> Result<MultiHeadAttention> {
        let shape = |l: &Linear| vec![l.out_features(), l.in_features()];
        let qw = shape(&q_proj);
        let (kw, vw) = (shape(&k_proj), shape(&v_proj));
        if num_heads == 0 || !qw[0].is_multiple_of(num_heads) || kw[0] != qw[0] {
            return Err(Error::invalid_shape(
                "MultiHeadAttention",
                &qw,
                format!(
                    "query width {} must equal the key width {} and split into {num_heads} heads",
                    qw[0], kw[0]
                ),
            ));
        }
        if !vw[0].is_multiple_of(num_heads) || out_proj.in_features() != vw[0] {
            return Err(Error::invalid_shape(
                "MultiHeadAttention",
                &vw,
                format!(
                    "value width {} must split into {num_heads} heads and feed the output \
                     projection {:?}",
                    vw[0],
                    shape(&out_proj)
                ),
            ));
        }
        let head_dim = qw[0] / num_heads;
        let qkv = if [&q_proj, &k_proj, &v_proj].iter().all(|l| l.is_packed())
            && vw[0] == qw[0]
            && kw[1] == qw[1]
            && vw[1] == qw[1]
        {
            Some(stack_projections(&q_proj, &k_proj, &v_proj)?)
        } else {
            None
        };
        // the stacked layer holds the packed weights; keep one resident copy
        let (q_proj, k_proj, v_proj) = if qkv.is_some() {
            (
                q_proj.without_packing(),
                k_proj.without_packing(),
                v_proj.without_packing(),
            )
        } else {
            (q_proj, k_proj, v_proj)
        };
        Ok(MultiHeadAttention {
            q_proj,
            k_proj,
            v_proj,
            out_proj,
            qkv,
            num_heads,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
        })
    }

    /// Loads `embed_dim -> embed_dim` projections named by `names` under `vs`.
    pub fn load(
        vs: &VarStore,
        embed_dim: usize,
        num_heads: usize,
        names: ProjNames<'_>,
        bias: bool,
    ) -> Result<MultiHeadAttention> {
        let lin = |n: &str| Linear::load(&vs.pp(n), embed_dim, embed_dim, bias);
        MultiHeadAttention::new(
            lin(names.q)?,
            lin(names.k)?,
            lin(names.v)?,
            lin(names.out)?,
            num_heads,
        )
    }

    /// The same attention with the scores scaled by `scale` instead of `1 / sqrt(head_dim)`
    /// (a temperature `t` is `scale = 1 / (sqrt(head_dim) t)`).
    pub fn with_scale(mut self, scale: f64) -> MultiHeadAttention {
        self.scale = scale;
        self
    }

    /// The factor the scores are multiplied by before the softmax.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Number of heads.
    pub fn num_heads(&self) -> usize {
        self.num_heads
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The four projections (query, key, value, output).
    pub fn projections(&self) -> [&Linear; 4] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.out_proj]
    }

    /// Self-attention of `x` `[B, T, D]` (or `[T, D]`) with an optional mask broadcastable to
    /// `[B, H, T, T]` (u8: nonzero = attend; float: added).
    pub fn forward_masked(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_residual(x, mask, None)
    }

    /// `residual + self_attention(x)`, the residual added in the output projection's epilogue
    /// (a pre-norm transformer block's first half: `x + attn(norm(x))`).
    pub fn forward_residual(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let Some(qkv) = &self.qkv else {
            let y = self.attend(x, x, mask)?;
            return match residual {
                Some(r) => r.add(&y),
                None => Ok(y),
            };
        };
        if !(2..=3).contains(&x.rank()) {
            return Err(Error::invalid_shape(
                "MultiHeadAttention",
                x.shape(),
                "input must be [B, T, D] or [T, D]",
            ));
        }
        if x.rank() == 2 {
            let r = residual.map(|r| r.unsqueeze(0)).transpose()?;
            return self
                .forward_residual(&x.unsqueeze(0)?, mask, r.as_ref())?
                .squeeze(0);
        }
        let (b, t) = (x.shape()[0], x.shape()[1]);
        // [B, T, 3D] viewed as [B, T, 3, H, d]: q, k and v are strided views of one product
        let y = qkv
            .forward(x)?
            .reshape(&[b, t, 3, self.num_heads, self.head_dim])?;
        let part = |i: usize| y.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2);
        let o = scaled_dot_product_attention_merged(
            &part(0)?,
            &part(1)?,
            &part(2)?,
            mask,
            Some(self.scale),
        )?;
        self.out_proj
            .forward_fused(&o, Activation::Identity, residual)
    }

    /// Attention of queries from `xq` `[B, Tq, D]` over keys and values from `xkv`
    /// `[B, Tk, D]` (cross-attention); 2-D inputs are one batch entry.
    pub fn attend(&self, xq: &Tensor, xkv: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        if xq.rank() != xkv.rank() || !(2..=3).contains(&xq.rank()) {
            return Err(Error::shape_mismatch(
                "MultiHeadAttention",
                xq.shape(),
                xkv.shape(),
                "inputs must both be [B, T, D] or both [T, D]",
            ));
        }
        if xq.rank() == 2 {
            return self
                .attend(&xq.unsqueeze(0)?, &xkv.unsqueeze(0)?, mask)?
                .squeeze(0);
        }
        let heads = |t: Tensor| -> Result<Tensor> {
            let s = t.shape().to_vec();
            t.reshape(&[s[0], s[1], self.num_heads, s[2] / self.num_heads])?
                .transpose(1, 2)
        };
        let q = heads(self.q_proj.forward(xq)?)?;
        let k = heads(self.k_proj.forward(xkv)?)?;
        let v = heads(self.v_proj.forward(xkv)?)?;
        let o = scaled_dot_product_attention_merged(&q, &k, &v, mask, Some(self.scale))?;
        self.out_proj.forward(&o)
    }
}

impl Module for MultiHeadAttention {
    /// Unmasked self-attention.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_masked(x, None)
    }
}

/// One layer computing `[q | k | v]`: the three weights stacked along the output dim (and
/// their biases, a missing one as zeros).
fn stack_projections(q: &Linear, k: &Linear, v: &Linear) -> Result<Linear> {
    let ls = [q, k, v];
    let w: Vec<Tensor> = ls
        .iter()
        .map(|l| {
            l.weight()
                .map(|p| p.tensor())
                .ok_or_else(|| Error::invalid_input("MultiHeadAttention", "quantized projection"))
        })
        .collect::<Result<_>>()?;
    let weight = Tensor::cat(&w, 0)?;
    let bias = if ls.iter().any(|l| l.bias().is_some()) {
        let b = ls
            .iter()
            .map(|l| match l.bias() {
                Some(b) => b.tensor().to_dtype(DType::F32),
                None => Tensor::zeros(&[l.out_features()], DType::F32, weight.device()),
            })
            .collect::<Result<Vec<_>>>()?;
        Some(crate::nn::Param::Frozen(Tensor::cat(&b, 0)?))
    } else {
        None
    };
    Linear::new(weight, bias)
}
