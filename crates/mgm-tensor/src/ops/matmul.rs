//! Matrix multiplication with `torch.matmul` semantics (1-D promotion, broadcast batch dims)
//! through the `gemm` crate, and its backward pass.
//!
//! Operands go to gemm with their own strides, so transposed, narrowed and batch-broadcast views
//! are multiplied without being copied. f16 and bf16 are widened to f32 (every product of two
//! 16-bit floats is exact in f32), accumulated in f32 and rounded once, which is what PyTorch's
//! CPU kernels do; integer matmul is rejected.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::autograd::{Backward, attach, no_grad};
use crate::shape::{Layout, broadcast_shapes};
use crate::{DType, Error, Float, Result, Tensor};

/// Below this many multiply-adds one gemm call runs on the calling thread: spawning rayon work
/// costs more than it saves.
const PAR_GEMM_WORK: usize = 48 * 48 * 256;

/// The shapes of one matmul after `torch.matmul`'s 1-D promotion and batch broadcasting.
struct Plan {
    /// Broadcast batch dims.
    batch: Vec<usize>,
    m: usize,
    k: usize,
    n: usize,
    /// The output shape with promoted 1-D dims removed again.
    out_shape: Vec<usize>,
}

impl Plan {
    fn new(a: &[usize], b: &[usize]) -> Result<Plan> {
        if a.is_empty() || b.is_empty() {
            return Err(Error::shape_mismatch(
                "matmul",
                a,
                b,
                "both operands need at least 1 dim",
            ));
        }
        let (m, k) = if a.len() == 1 {
            (1, a[0])
        } else {
            (a[a.len() - 2], a[a.len() - 1])
        };
        let (kb, n) = if b.len() == 1 {
            (b[0], 1)
        } else {
            (b[b.len() - 2], b[b.len() - 1])
        };
        if k != kb {
            return Err(Error::shape_mismatch(
                "matmul",
                a,
                b,
                format!("inner dims {k} != {kb}"),
            ));
        }
        let ba = &a[..a.len().saturating_sub(2)];
        let bb = &b[..b.len().saturating_sub(2)];
        let batch = broadcast_shapes("matmul", ba, bb).map_err(|_| {
            Error::shape_mismatch(
                "matmul",
                a,
                b,
                format!("batch dims {ba:?} and {bb:?} cannot be broadcast"),
            )
        })?;
        let mut out_shape = batch.clone();
        if a.len() > 1 {
            out_shape.push(m);
        }
        if b.len() > 1 {
            out_shape.push(n);
        }
        Ok(Plan {
            batch,
            m,
            k,
            n,
            out_shape,
        })
    }

    /// The full `[batch.., m, n]` shape before 1-D dims are squeezed.
    fn full_out_shape(&self) -> Vec<usize> {
        let mut s = self.batch.clone();
        s.extend([self.m, self.n]);
        s
    }

    /// `layout` of an operand promoted to 2-D and broadcast to `[batch.., rows, cols]`.
    fn operand_layout(&self, layout: &Layout, lhs: bool) -> Result<Layout> {
        let (shape, strides) = (layout.shape(), layout.strides());
        let (mut s, mut st) = (shape.to_vec(), strides.to_vec());
        if shape.len() == 1 {
            // the promoted dim has size 1, so its stride is never used
            if lhs {
                s.insert(0, 1);
                st.insert(0, 0);
            } else {
                s.push(1);
                st.push(0);
            }
        }
        let (rows, cols) = if lhs {
            (self.m, self.k)
        } else {
            (self.k, self.n)
        };
        let mut target = self.batch.clone();
        target.extend([rows, cols]);
        Layout::new(s, st, layout.offset()).broadcast_as("matmul", &target)
    }
}

/// The gemm strides of one operand: batch strides plus (row, col) strides of each matrix.
struct Operand<'a, T> {
    data: &'a [T],
    offset: usize,
    batch_strides: Vec<usize>,
    rs: usize,
    cs: usize,
}

impl<'a, T> Operand<'a, T> {
    fn new(data: &'a [T], l: &Layout) -> Self {
        let r = l.strides().len();
        Operand {
            data,
            offset: l.offset(),
            batch_strides: l.strides()[..r - 2].to_vec(),
            rs: l.strides()[r - 2],
            cs: l.strides()[r - 1],
        }
    }
}

/// Storage offsets of every batch entry of `a` and `b`, in row-major batch order.
fn batch_offsets<T>(batch: &[usize], a: &Operand<T>, b: &Operand<T>) -> Vec<(usize, usize)> {
    let count: usize = batch.iter().product();
    (0..count)
        .map(|mut i| {
            let (mut oa, mut ob) = (a.offset, b.offset);
            for d in (0..batch.len()).rev() {
                let idx = i % batch[d];
                i /= batch[d];
                oa += idx * a.batch_strides[d];
                ob += idx * b.batch_strides[d];
            }
            (oa, ob)
        })
        .collect()
}

/// If dims `shape` with `strides` walk memory as one evenly strided run, that run's stride.
fn merged_stride(shape: &[usize], strides: &[usize]) -> Option<usize> {
    let mut inner: Option<(usize, usize)> = None; // (size, stride) of the merged inner run
    for (&d, &s) in shape.iter().zip(strides).rev() {
        if d == 1 {
            continue;
        }
        inner = match inner {
            None => Some((d, s)),
            Some((id, is)) if s == id * is => Some((d * id, is)),
            Some(_) => return None,
        };
    }
    Some(inner.map_or(1, |(_, s)| s))
}

/// One `c = a b` with `a` `[m, k]`, `b` `[k, n]` given by offsets and strides, `c` row-major.
#[allow(clippy::too_many_arguments)]
fn gemm_one<T: Float>(
    c: &mut [MaybeUninit<T>],
    (a, oa, ars, acs): (&[T], usize, usize, usize),
    (b, ob, brs, bcs): (&[T], usize, usize, usize),
    m: usize,
    k: usize,
    n: usize,
    parallel: bool,
) {
    debug_assert_eq!(c.len(), m * n);
    if m == 0 || n == 0 || k == 0 {
        // batched_gemm zero-fills the output itself when k == 0 (an empty sum is zero)
        return;
    }
    let last =
        |o: usize, rs: usize, cs: usize, r: usize, cl: usize| o + (r - 1) * rs + (cl - 1) * cs;
    assert!(
        last(oa, ars, acs, m, k) < a.len() && last(ob, brs, bcs, k, n) < b.len(),
        "matmul operand view exceeds its storage"
    );
    let par = if parallel && m * n * k >= PAR_GEMM_WORK {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the assert above bounds every element gemm reads within `a` and `b` (offsets plus
    // (rows-1)*row stride plus (cols-1)*col stride); `c` is an exclusive, row-major m*n buffer,
    // so the destination neither aliases the inputs nor exceeds its slice. With read_dst false
    // gemm overwrites `c` with 0*c + 1*a*b.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr().cast::<T>(),
            1,
            n as isize,
            false,
            a.as_ptr().add(oa),
            acs as isize,
            ars as isize,
            b.as_ptr().add(ob),
            bcs as isize,
            brs as isize,
            T::zero(),
            T::one(),
            false,
            false,
            false,
            par,
        );
    }
}

/// Batched gemm over broadcast operands; returns the row-major `[batch.., m, n]` product.
fn batched_gemm<T: Float>(plan: &Plan, a: Operand<T>, b: Operand<T>) -> Vec<T> {
    let (m, k, n) = (plan.m, plan.k, plan.n);
    let count: usize = plan.batch.iter().product();
    if count * m * n == 0 || k == 0 {
        return vec![T::zero(); count * m * n];
    }
    // gemm overwrites every element of the output (read_dst = false), so skip the zero fill:
    // writing 4 bytes per element twice costs several percent of a 1024^3 product.
    let mut out: Vec<MaybeUninit<T>> = Vec::with_capacity(count * m * n);
    // SAFETY: MaybeUninit<T> needs no initialisation; the capacity was just reserved.
    unsafe { out.set_len(count * m * n) };
    // A weight shared by the whole batch ([B, T, K] x [K, N]): fold the batch into the rows of
    // one large gemm when the lhs rows are evenly strided, which keeps gemm's packing and
    // threading efficient.
    if count > 1 && b.batch_strides.iter().all(|&s| s == 0) {
        let mut shape = plan.batch.clone();
        shape.push(m);
        let mut strides = a.batch_strides.clone();
        strides.push(a.rs);
        if let Some(rs) = merged_stride(&shape, &strides) {
            gemm_one(
                &mut out,
                (a.data, a.offset, rs, a.cs),
                (b.data, b.offset, b.rs, b.cs),
                count * m,
                k,
                n,
                true,
            );
            return assume_init(out);
        }
    }
    let offsets = batch_offsets(&plan.batch, &a, &b);
    let threads = rayon::current_num_threads();
    // Many small products: one per rayon task beats splitting each small product across
    // threads (gemm's own threading pays a barrier per block).
    if count >= threads && threads > 1 && m * n * k < (1 << 24) {
        out.par_chunks_mut(m * n)
            .zip(offsets.par_iter())
            .for_each(|(c, &(oa, ob))| {
                gemm_one(
                    c,
                    (a.data, oa, a.rs, a.cs),
                    (b.data, ob, b.rs, b.cs),
                    m,
                    k,
                    n,
                    false,
                )
            });
    } else {
        for (c, &(oa, ob)) in out.chunks_mut(m * n).zip(&offsets) {
            gemm_one(
                c,
                (a.data, oa, a.rs, a.cs),
                (b.data, ob, b.rs, b.cs),
                m,
                k,
                n,
                true,
            );
        }
    }
    assume_init(out)
}

/// The output buffer after every gemm call has written its part.
fn assume_init<T>(v: Vec<MaybeUninit<T>>) -> Vec<T> {
    let mut v = std::mem::ManuallyDrop::new(v);
    let (ptr, len, cap) = (v.as_mut_ptr(), v.len(), v.capacity());
    // SAFETY: every gemm_one call above covered its m x n block of the buffer with
    // read_dst = false, so all len elements are initialised; MaybeUninit<T> has T's layout,
    // and the allocation is handed over unchanged (same pointer, length and capacity).
    unsafe { Vec::from_raw_parts(ptr.cast::<T>(), len, cap) }
}

/// The product of two untracked float tensors (dtypes already checked equal).
fn matmul_forward(a: &Tensor, b: &Tensor, plan: &Plan) -> Result<Tensor> {
    let full = plan.full_out_shape();
    match a.dtype() {
        DType::F32 => {
            let (la, lb) = (
                plan.operand_layout(a.layout(), true)?,
                plan.operand_layout(b.layout(), false)?,
            );
            let out = batched_gemm(
                plan,
                Operand::new(a.storage_slice::<f32>()?, &la),
                Operand::new(b.storage_slice::<f32>()?, &lb),
            );
            Tensor::from_vec(out, &full)?.reshape(&plan.out_shape)
        }
        DType::F64 => {
            let (la, lb) = (
                plan.operand_layout(a.layout(), true)?,
                plan.operand_layout(b.layout(), false)?,
            );
            let out = batched_gemm(
                plan,
                Operand::new(a.storage_slice::<f64>()?, &la),
                Operand::new(b.storage_slice::<f64>()?, &lb),
            );
            Tensor::from_vec(out, &full)?.reshape(&plan.out_shape)
        }
        DType::F16 | DType::BF16 => {
            // Widen each operand once (O(size), small next to the O(m n k) product) in its
            // logical order, then broadcast the contiguous copy: the batch is never materialised.
            let wa = a.to_dtype(DType::F32)?;
            let wb = b.to_dtype(DType::F32)?;
            let (la, lb) = (
                plan.operand_layout(wa.layout(), true)?,
                plan.operand_layout(wb.layout(), false)?,
            );
            let out = batched_gemm(
                plan,
                Operand::new(wa.storage_slice::<f32>()?, &la),
                Operand::new(wb.storage_slice::<f32>()?, &lb),
            );
            Tensor::from_float_vec(out, &plan.out_shape, a.dtype())
        }
        d => Err(Error::unsupported_dtype(
            "matmul",
            d,
            "matmul needs a float dtype (f32, f64, f16, bf16)",
        )),
    }
}

struct MatmulBackward {
    a: Tensor,
    b: Tensor,
}

impl Backward for MatmulBackward {
    fn name(&self) -> &'static str {
        "matmul"
    }
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.a, &self.b]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let plan = Plan::new(self.a.shape(), self.b.shape())?;
        let g = g.reshape(&plan.full_out_shape())?;
        // promote 1-D operands exactly as the forward did (as views)
        let a = self.a.detach();
        let a = if a.rank() == 1 { a.unsqueeze(0)? } else { a };
        let b = self.b.detach();
        let b = if b.rank() == 1 { b.unsqueeze(-1)? } else { b };
        let ga = if self.a.is_tracked() {
            Some(batch_summed_product(&g, &b.t()?, a.shape())?.reshape(self.a.shape())?)
        } else {
            None
        };
        let gb = if self.b.is_tracked() {
            Some(batch_summed_product(&a.t()?, &g, b.shape())?.reshape(self.b.shape())?)
        } else {
            None
        };
        Ok(vec![ga, gb])
    }
}

/// `x y` summed over the batch dims that an operand of shape `target` (rank >= 2) was broadcast
/// along: dA = dC B^T and dB = A^T dC.
///
/// When the operand has no batch of its own (a weight shared by the batch), the batch folds
/// into the contraction: `sum_b x_b y_b = [p, (b c)] x [(b c), q]`, one large gemm instead of a
/// batch of products that would be materialised and then reduced.
fn batch_summed_product(x: &Tensor, y: &Tensor, target: &[usize]) -> Result<Tensor> {
    let r = target.len();
    let own_batch: usize = target[..r - 2].iter().product();
    let (xs, ys) = (x.shape(), y.shape());
    if own_batch == 1 && xs.len().max(ys.len()) > 2 {
        let (xr, yr) = (xs.len(), ys.len());
        let batch = broadcast_shapes("matmul", &xs[..xr - 2], &ys[..yr - 2])?;
        let count: usize = batch.iter().product();
        let (p, c, q) = (xs[xr - 2], xs[xr - 1], ys[yr - 1]);
        let with_batch = |tail: &[usize]| batch.iter().chain(tail).copied().collect::<Vec<_>>();
        // x^T stacks as [(b c), p]: a view for the common dB case (x = A^T with A contiguous)
        let xt = x
            .broadcast_as(&with_batch(&xs[xr - 2..]))?
            .t()?
            .reshape(&[count * c, p])?;
        let y2 = y
            .broadcast_as(&with_batch(&ys[yr - 2..]))?
            .reshape(&[count * c, q])?;
        return xt.t()?.matmul(&y2)?.reshape(target);
    }
    x.matmul(y)?.sum_to_shape(target)
}

impl Tensor {
    /// Matrix product with `torch.matmul` semantics: `[.., m, k] x [.., k, n] -> [.., m, n]`
    /// with NumPy-broadcast batch dims; a 1-D lhs is treated as `[1, k]` and a 1-D rhs as
    /// `[k, 1]`, the added dim being removed from the result (1-D x 1-D is a dot product).
    ///
    /// ```
    /// # use mgm_tensor::Tensor;
    /// let a = Tensor::from_vec(vec![1f32, 2., 3., 4., 5., 6.], &[2, 3])?;
    /// let b = Tensor::from_vec(vec![1f32, 0., 0., 1., 1., 1.], &[3, 2])?;
    /// assert_eq!(a.matmul(&b)?.to_vec::<f32>()?, vec![4., 5., 10., 11.]);
    /// # Ok::<(), mgm_tensor::Error>(())
    /// ```
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.ensure_same("matmul", rhs)?;
        self.ensure_float("matmul")?;
        let plan = Plan::new(self.shape(), rhs.shape())?;
        let out = no_grad(|| matmul_forward(&self.detach(), &rhs.detach(), &plan))?;
        Ok(attach(out, || MatmulBackward {
            a: self.clone(),
            b: rhs.clone(),
        }))
    }
}
