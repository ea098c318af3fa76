//! 2-D convolution and pooling on `[N, C, H, W]` tensors with backward, matching PyTorch's
//! `F.conv2d`, `F.avg_pool2d` (count_include_pad, floor mode) and `F.max_pool2d` (floor mode).
//!
//! A convolution lowers each (sample, group) to one matrix product through `gemm`: the input
//! patches are unfolded (im2col) a band of output rows at a time so that the patch buffer stays
//! cache-sized, and a 1x1 stride-1 convolution multiplies the input in place. Depthwise
//! convolutions (one input channel per group, ConvNeXt's 7x7) run a direct loop instead: a
//! per-channel gemm with a single output row is all overhead.

use std::borrow::Cow;

use gemm::Parallelism;
use rayon::prelude::*;

use crate::autograd::{Backward, attach};
use crate::tensor::FloatData;
use crate::{Error, Float, Result, Tensor};

/// Stride, padding, dilation (each `(height, width)`) and groups of a 2-D convolution, as the
/// arguments of `torch.nn.functional.conv2d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2dParams {
    /// Step between output positions.
    pub stride: (usize, usize),
    /// Implicit zeros added on both sides.
    pub padding: (usize, usize),
    /// Spacing between kernel taps.
    pub dilation: (usize, usize),
    /// Number of channel groups; `C_in` and `C_out` must both be multiples of it.
    pub groups: usize,
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Conv2dParams {
            stride: (1, 1),
            padding: (0, 0),
            dilation: (1, 1),
            groups: 1,
        }
    }
}

/// The precisions spatial kernels compute in: f32 (also for f16/bf16) and f64.
pub(crate) trait Compute: Float {
    /// Contiguous logical-order data of `t` in this precision, borrowed when no copy is needed.
    fn data<'a>(t: &'a Tensor, op: &'static str) -> Result<Cow<'a, [Self]>>;
}

impl Compute for f32 {
    fn data<'a>(t: &'a Tensor, op: &'static str) -> Result<Cow<'a, [f32]>> {
        Ok(match t.float_data(op)? {
            FloatData::F32(v) => v,
            FloatData::F64(v) => Cow::Owned(v.iter().map(|&x| x as f32).collect()),
        })
    }
}

impl Compute for f64 {
    fn data<'a>(t: &'a Tensor, op: &'static str) -> Result<Cow<'a, [f64]>> {
        Ok(match t.float_data(op)? {
            FloatData::F64(v) => v,
            FloatData::F32(v) => Cow::Owned(v.iter().map(|&x| x as f64).collect()),
        })
    }
}

/// Runs `$body` with `$F` bound to the compute type of `$dtype` (f64 for f64, else f32).
macro_rules! with_compute {
    ($dtype:expr, $F:ident => $body:expr) => {
        if $dtype == $crate::DType::F64 {
            type $F = f64;
            $body
        } else {
            type $F = f32;
            $body
        }
    };
}
pub(crate) use with_compute;

/// Approximate multiply-adds per rayon task, so that small inputs stay on one thread.
pub(crate) const PAR_WORK: usize = 1 << 15;

/// Items of `work_per_item` each that one rayon task should take (at least 1).
pub(crate) fn min_items(work_per_item: usize) -> usize {
    (PAR_WORK / work_per_item.max(1)).max(1)
}

/// Output length of a sliding window, `None` when the window does not fit (or stride is 0).
fn out_len(
    input: usize,
    pad: usize,
    dilation: usize,
    kernel: usize,
    stride: usize,
) -> Option<usize> {
    let span = dilation * (kernel.max(1) - 1) + 1;
    let padded = input + 2 * pad;
    if stride == 0 || kernel == 0 || padded < span {
        return None;
    }
    Some((padded - span) / stride + 1)
}

/// The output positions `[lo, hi)` whose tap `pos * stride + offset - pad` lands inside
/// `[0, in_len)`.
fn valid_range(
    out_len: usize,
    stride: usize,
    offset: usize,
    pad: usize,
    in_len: usize,
) -> (usize, usize) {
    let lo = if pad > offset {
        (pad - offset).div_ceil(stride)
    } else {
        0
    };
    let end = pad + in_len;
    let hi = if end > offset {
        (end - offset).div_ceil(stride)
    } else {
        0
    };
    let lo = lo.min(out_len);
    (lo, hi.min(out_len).max(lo))
}

/// Sum of products with eight independent accumulators, so the compiler can vectorise it.
fn dot<F: Float>(a: &[F], b: &[F]) -> F {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [F::zero(); 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = F::zero();
    for (&x, &y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    let h = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    s + (h[0] + h[2]) + (h[1] + h[3])
}

/// `dst[i] += a * src[i * stride]`.
#[inline]
fn axpy_strided<F: Float>(dst: &mut [F], a: F, src: &[F], stride: usize) {
    if stride == 1 {
        let src = &src[..dst.len()];
        for (d, &s) in dst.iter_mut().zip(src) {
            *d += a * s;
        }
    } else {
        for (t, d) in dst.iter_mut().enumerate() {
            *d += a * src[t * stride];
        }
    }
}

/// `dst[i * stride] += a * src[i]`.
#[inline]
fn scatter_axpy_strided<F: Float>(dst: &mut [F], a: F, src: &[F], stride: usize) {
    if stride == 1 {
        for (d, &s) in dst[..src.len()].iter_mut().zip(src) {
            *d += a * s;
        }
    } else {
        for (t, &s) in src.iter().enumerate() {
            dst[t * stride] += a * s;
        }
    }
}

/// `dst = (accumulate ? dst : 0) + lhs × rhs` for an `m × k` by `k × n` product, every operand
/// addressed by its own row and column strides (in elements) from the start of its slice.
#[allow(clippy::too_many_arguments)]
fn gemm_into<F: Compute>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [F],
    dst_rs: usize,
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): (&[F], usize, usize),
    (rhs, rhs_rs, rhs_cs): (&[F], usize, usize),
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(F::zero());
            }
        }
        return;
    }
    assert!(
        (m - 1) * dst_rs + n <= dst.len()
            && (m - 1) * lhs_rs + (k - 1) * lhs_cs < lhs.len()
            && (k - 1) * rhs_rs + (n - 1) * rhs_cs < rhs.len(),
        "gemm_into: operands smaller than their strides say (callers size them from one geometry)"
    );
    let par = if parallel {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // SAFETY: the assert above keeps every strided access of the three operands inside its slice;
    // `dst` is borrowed mutably, so nothing else reads or writes it during the call; F is f32 or
    // f64 (the only `Compute` types), which gemm supports.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            F::one(),
            F::one(),
            false,
            false,
            false,
            par,
        );
    }
}

/// Elements of the im2col buffer per band: a few MiB, so that the band stays in cache while
/// gemm reads it.
const COL_BUDGET: usize = 1 << 19;

/// Shapes and hyper-parameters of one convolution.
#[derive(Clone, Copy, Debug)]
struct Geom {
    n: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    sh: usize,
    sw: usize,
    ph: usize,
    pw: usize,
    dh: usize,
    dw: usize,
    groups: usize,
}

impl Geom {
    /// Input channels per group.
    fn cg(&self) -> usize {
        self.c_in / self.groups
    }
    /// Output channels per group.
    fn mo(&self) -> usize {
        self.c_out / self.groups
    }
    /// Inner dimension of the per-group product: one patch.
    fn k(&self) -> usize {
        self.cg() * self.kh * self.kw
    }
    fn hw(&self) -> usize {
        self.h * self.w
    }
    fn ohw(&self) -> usize {
        self.oh * self.ow
    }
    fn in_shape(&self) -> [usize; 4] {
        [self.n, self.c_in, self.h, self.w]
    }
    fn out_shape(&self) -> [usize; 4] {
        [self.n, self.c_out, self.oh, self.ow]
    }
    fn weight_shape(&self) -> [usize; 4] {
        [self.c_out, self.cg(), self.kh, self.kw]
    }
    /// A 1x1 stride-1 unpadded convolution: the input plane is already the patch matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.sh == 1 && self.sw == 1 && self.ph == 0 && self.pw == 0
    }
    /// One input channel per group (and more than one group): the direct loop beats gemm.
    fn depthwise(&self) -> bool {
        self.cg() == 1 && self.groups > 1
    }
    /// Output rows per im2col band.
    fn band_rows(&self) -> usize {
        (COL_BUDGET / (self.k() * self.ow).max(1)).clamp(1, self.oh.max(1))
    }
    fn padded(&self) -> (usize, usize) {
        (self.h + 2 * self.ph, self.w + 2 * self.pw)
    }
    /// Whether gemm itself should spread over threads: only when there are too few
    /// (sample, group) items to keep every thread busy.
    fn gemm_parallel(&self) -> bool {
        self.n * self.groups < rayon::current_num_threads()
    }
}

/// Unfolds output rows `oh0..oh1` of one (sample, group): row `(c * kh + i) * kw + j`, column
/// `(oh - oh0) * ow + ow` holds `x[c, oh*sh + i*dh - ph, ow*sw + j*dw - pw]`, zero outside.
fn im2col<F: Float>(x: &[F], g: &Geom, oh0: usize, oh1: usize, col: &mut [F]) {
    let ncols = (oh1 - oh0) * g.ow;
    let (h, w, ow) = (g.h, g.w, g.ow);
    for c in 0..g.cg() {
        let plane = &x[c * h * w..(c + 1) * h * w];
        for i in 0..g.kh {
            for j in 0..g.kw {
                let row = &mut col[((c * g.kh + i) * g.kw + j) * ncols..][..ncols];
                let (lo, hi) = valid_range(ow, g.sw, j * g.dw, g.pw, w);
                for (r, oh) in (oh0..oh1).enumerate() {
                    let dst = &mut row[r * ow..(r + 1) * ow];
                    let ih = oh * g.sh + i * g.dh;
                    if ih < g.ph || ih - g.ph >= h {
                        dst.fill(F::zero());
                        continue;
                    }
                    let src = &plane[(ih - g.ph) * w..(ih - g.ph + 1) * w];
                    dst[..lo].fill(F::zero());
                    dst[hi..].fill(F::zero());
                    if lo < hi {
                        let start = lo * g.sw + j * g.dw - g.pw;
                        if g.sw == 1 {
                            dst[lo..hi].copy_from_slice(&src[start..start + hi - lo]);
                        } else {
                            for (t, d) in dst[lo..hi].iter_mut().enumerate() {
                                *d = src[start + t * g.sw];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: adds every patch entry back onto the input position it came from.
fn col2im<F: Float>(col: &[F], g: &Geom, oh0: usize, oh1: usize, dx: &mut [F]) {
    let ncols = (oh1 - oh0) * g.ow;
    let (h, w, ow) = (g.h, g.w, g.ow);
    for c in 0..g.cg() {
        let plane = &mut dx[c * h * w..(c + 1) * h * w];
        for i in 0..g.kh {
            for j in 0..g.kw {
                let row = &col[((c * g.kh + i) * g.kw + j) * ncols..][..ncols];
                let (lo, hi) = valid_range(ow, g.sw, j * g.dw, g.pw, w);
                if lo >= hi {
                    continue;
                }
                for (r, oh) in (oh0..oh1).enumerate() {
                    let ih = oh * g.sh + i * g.dh;
                    if ih < g.ph || ih - g.ph >= h {
                        continue;
                    }
                    let start = lo * g.sw + j * g.dw - g.pw;
                    let dst = &mut plane[(ih - g.ph) * w + start..(ih - g.ph + 1) * w];
                    scatter_axpy_strided(dst, F::one(), &row[r * ow + lo..r * ow + hi], g.sw);
                }
            }
        }
    }
}

/// Copies an `h × w` plane into the zero-padded `(h + 2ph) × (w + 2pw)` buffer `dst`.
fn pad_plane<F: Float>(src: &[F], h: usize, w: usize, ph: usize, pw: usize, dst: &mut Vec<F>) {
    let wp = w + 2 * pw;
    dst.clear();
    dst.resize((h + 2 * ph) * wp, F::zero());
    for r in 0..h {
        dst[(r + ph) * wp + pw..(r + ph) * wp + pw + w].copy_from_slice(&src[r * w..(r + 1) * w]);
    }
}

fn conv_forward<F: Compute>(x: &[F], wt: &[F], bias: Option<&[F]>, g: &Geom) -> Vec<F> {
    let mut out = vec![F::zero(); g.n * g.c_out * g.ohw()];
    if out.is_empty() {
        return out;
    }
    if g.depthwise() {
        depthwise_forward(x, wt, bias, g, &mut out);
        return out;
    }
    let (mo, k, ohw, ow) = (g.mo(), g.k(), g.ohw(), g.ow);
    let gemm_par = g.gemm_parallel();
    let run = |col: &mut Vec<F>, (idx, o): (usize, &mut [F])| {
        let (ni, gi) = (idx / g.groups, idx % g.groups);
        let xs = &x[(ni * g.c_in + gi * g.cg()) * g.hw()..][..g.cg() * g.hw()];
        let ws = &wt[gi * mo * k..(gi + 1) * mo * k];
        if let Some(b) = bias {
            for (m, row) in o.chunks_mut(ohw).enumerate() {
                row.fill(b[gi * mo + m]);
            }
        }
        let acc = bias.is_some();
        if g.pointwise() {
            gemm_into(
                (mo, ohw, k),
                o,
                ohw,
                acc,
                (ws, k, 1),
                (xs, ohw, 1),
                gemm_par,
            );
            return;
        }
        let band = g.band_rows();
        col.resize(k * band * ow, F::zero());
        for oh0 in (0..g.oh).step_by(band) {
            let oh1 = (oh0 + band).min(g.oh);
            let nc = (oh1 - oh0) * ow;
            let col = &mut col[..k * nc];
            im2col(xs, g, oh0, oh1, col);
            gemm_into(
                (mo, nc, k),
                &mut o[oh0 * ow..],
                ohw,
                acc,
                (ws, k, 1),
                (col, nc, 1),
                gemm_par,
            );
        }
    };
    let slab = mo * ohw;
    if gemm_par {
        let mut col = Vec::new();
        out.chunks_mut(slab)
            .enumerate()
            .for_each(|item| run(&mut col, item));
    } else {
        out.par_chunks_mut(slab)
            .enumerate()
            .for_each_init(Vec::new, run);
    }
    out
}

/// d input: per (sample, group), patches' gradients `W_gᵀ × dY` folded back with col2im.
fn conv_backward_input<F: Compute>(gy: &[F], wt: &[F], g: &Geom) -> Vec<F> {
    let mut dx = vec![F::zero(); g.n * g.c_in * g.hw()];
    if dx.is_empty() {
        return dx;
    }
    if g.depthwise() {
        depthwise_backward_input(gy, wt, g, &mut dx);
        return dx;
    }
    let (mo, k, ohw, ow) = (g.mo(), g.k(), g.ohw(), g.ow);
    let gemm_par = g.gemm_parallel();
    let run = |col: &mut Vec<F>, (idx, dxs): (usize, &mut [F])| {
        let (ni, gi) = (idx / g.groups, idx % g.groups);
        let gs = &gy[(ni * g.c_out + gi * mo) * ohw..][..mo * ohw];
        let ws = &wt[gi * mo * k..(gi + 1) * mo * k];
        if g.pointwise() {
            gemm_into(
                (k, ohw, mo),
                dxs,
                ohw,
                false,
                (ws, 1, k),
                (gs, ohw, 1),
                gemm_par,
            );
            return;
        }
        if ohw == 0 {
            return;
        }
        let band = g.band_rows();
        col.resize(k * band * ow, F::zero());
        for oh0 in (0..g.oh).step_by(band) {
            let oh1 = (oh0 + band).min(g.oh);
            let nc = (oh1 - oh0) * ow;
            let col = &mut col[..k * nc];
            gemm_into(
                (k, nc, mo),
                col,
                nc,
                false,
                (ws, 1, k),
                (&gs[oh0 * ow..], ohw, 1),
                gemm_par,
            );
            col2im(col, g, oh0, oh1, dxs);
        }
    };
    let slab = g.cg() * g.hw();
    if gemm_par {
        let mut col = Vec::new();
        dx.chunks_mut(slab)
            .enumerate()
            .for_each(|item| run(&mut col, item));
    } else {
        dx.par_chunks_mut(slab)
            .enumerate()
            .for_each_init(Vec::new, run);
    }
    dx
}

/// d weight: per group, the sum over samples of `dY_g × patchesᵀ`.
fn conv_backward_weight<F: Compute>(x: &[F], gy: &[F], g: &Geom) -> Vec<F> {
    let len = g.c_out * g.k();
    if len == 0 || g.n * g.ohw() == 0 {
        return vec![F::zero(); len];
    }
    if g.depthwise() {
        return depthwise_backward_weight(x, gy, g);
    }
    let (mo, k, ohw, ow, hw) = (g.mo(), g.k(), g.ohw(), g.ow, g.hw());
    let gemm_par = g.gemm_parallel();
    let run = |dw: &mut [F], col: &mut Vec<F>, idx: usize| {
        let (ni, gi) = (idx / g.groups, idx % g.groups);
        let xs = &x[(ni * g.c_in + gi * g.cg()) * hw..][..g.cg() * hw];
        let gs = &gy[(ni * g.c_out + gi * mo) * ohw..][..mo * ohw];
        let dws = &mut dw[gi * mo * k..(gi + 1) * mo * k];
        if g.pointwise() {
            gemm_into(
                (mo, k, ohw),
                dws,
                k,
                true,
                (gs, ohw, 1),
                (xs, 1, hw),
                gemm_par,
            );
            return;
        }
        let band = g.band_rows();
        col.resize(k * band * ow, F::zero());
        for oh0 in (0..g.oh).step_by(band) {
            let oh1 = (oh0 + band).min(g.oh);
            let nc = (oh1 - oh0) * ow;
            let col = &mut col[..k * nc];
            im2col(xs, g, oh0, oh1, col);
            gemm_into(
                (mo, k, nc),
                dws,
                k,
                true,
                (&gs[oh0 * ow..], ohw, 1),
                (col, 1, nc),
                gemm_par,
            );
        }
    };
    let items = g.n * g.groups;
    if gemm_par {
        let mut dw = vec![F::zero(); len];
        let mut col = Vec::new();
        (0..items).for_each(|idx| run(&mut dw, &mut col, idx));
        dw
    } else {
        // Each thread accumulates its own full weight gradient; the partial sums are added
        // at the end (weights are small next to activations).
        (0..items)
            .into_par_iter()
            .fold(
                || (vec![F::zero(); len], Vec::new()),
                |(mut dw, mut col), idx| {
                    run(&mut dw, &mut col, idx);
                    (dw, col)
                },
            )
            .map(|(dw, _)| dw)
            .reduce(
                || vec![F::zero(); len],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, &b)| *a += b);
                    a
                },
            )
    }
}

/// d bias: the sum of the output gradient over samples and positions, accumulated in f64.
fn conv_backward_bias<F: Compute>(gy: &[F], g: &Geom) -> Vec<F> {
    let ohw = g.ohw();
    let mut acc = vec![0f64; g.c_out];
    if ohw > 0 {
        for (idx, plane) in gy.chunks(ohw).enumerate() {
            acc[idx % g.c_out] += plane.iter().map(|v| v.to_f64()).sum::<f64>();
        }
    }
    acc.into_iter().map(F::from_f64).collect()
}

/// Direct depthwise convolution: each output plane is a sum of `kh * kw` shifted, scaled rows
/// of its zero-padded input plane (contiguous along W when the stride is 1).
fn depthwise_forward<F: Compute>(x: &[F], wt: &[F], bias: Option<&[F]>, g: &Geom, out: &mut [F]) {
    let (mo, hw, ohw, ow, kk) = (g.mo(), g.hw(), g.ohw(), g.ow, g.kh * g.kw);
    let (_, wp) = g.padded();
    let work = ohw * kk;
    out.par_chunks_mut(ohw)
        .enumerate()
        .with_min_len(min_items(work))
        .for_each_init(Vec::new, |pad, (idx, o)| {
            let (ni, oc) = (idx / g.c_out, idx % g.c_out);
            let c = oc / mo;
            pad_plane(
                &x[(ni * g.c_in + c) * hw..][..hw],
                g.h,
                g.w,
                g.ph,
                g.pw,
                pad,
            );
            let wk = &wt[oc * kk..(oc + 1) * kk];
            let b = bias.map_or(F::zero(), |b| b[oc]);
            for (oh, row) in o.chunks_mut(ow).enumerate() {
                row.fill(b);
                for i in 0..g.kh {
                    let prow = &pad[(oh * g.sh + i * g.dh) * wp..][..wp];
                    for j in 0..g.kw {
                        axpy_strided(row, wk[i * g.kw + j], &prow[j * g.dw..], g.sw);
                    }
                }
            }
        });
}

fn depthwise_backward_input<F: Compute>(gy: &[F], wt: &[F], g: &Geom, dx: &mut [F]) {
    let (mo, hw, ohw, ow, kk) = (g.mo(), g.hw(), g.ohw(), g.ow, g.kh * g.kw);
    let (hp, wp) = g.padded();
    let work = ohw * kk * mo;
    dx.par_chunks_mut(hw)
        .enumerate()
        .with_min_len(min_items(work))
        .for_each_init(Vec::new, |dpad, (idx, dxp)| {
            let (ni, c) = (idx / g.c_in, idx % g.c_in);
            dpad.clear();
            dpad.resize(hp * wp, F::zero());
            if ow > 0 {
                for oc in c * mo..(c + 1) * mo {
                    let go = &gy[(ni * g.c_out + oc) * ohw..][..ohw];
                    let wk = &wt[oc * kk..(oc + 1) * kk];
                    for (oh, grow) in go.chunks(ow).enumerate() {
                        for i in 0..g.kh {
                            let prow = &mut dpad[(oh * g.sh + i * g.dh) * wp..][..wp];
                            for j in 0..g.kw {
                                scatter_axpy_strided(
                                    &mut prow[j * g.dw..],
                                    wk[i * g.kw + j],
                                    grow,
                                    g.sw,
                                );
                            }
                        }
                    }
                }
            }
            for r in 0..g.h {
                dxp[r * g.w..(r + 1) * g.w].copy_from_slice(&dpad[(r + g.ph) * wp + g.pw..][..g.w]);
            }
        });
}

fn depthwise_backward_weight<F: Compute>(x: &[F], gy: &[F], g: &Geom) -> Vec<F> {
    let (mo, hw, ohw, ow, kk) = (g.mo(), g.hw(), g.ohw(), g.ow, g.kh * g.kw);
    let (_, wp) = g.padded();
    let mut dw = vec![F::zero(); g.c_out * kk];
    let work = g.n * ohw * kk;
    dw.par_chunks_mut(kk)
        .enumerate()
        .with_min_len(min_items(work))
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(pad, gath), (oc, dwk)| {
                let c = oc / mo;
                for ni in 0..g.n {
                    pad_plane(
                        &x[(ni * g.c_in + c) * hw..][..hw],
                        g.h,
                        g.w,
                        g.ph,
                        g.pw,
                        pad,
                    );
                    let go = &gy[(ni * g.c_out + oc) * ohw..][..ohw];
                    for (oh, grow) in go.chunks(ow).enumerate() {
                        for i in 0..g.kh {
                            let prow = &pad[(oh * g.sh + i * g.dh) * wp..][..wp];
                            for j in 0..g.kw {
                                let src = &prow[j * g.dw..];
                                let s = if g.sw == 1 {
                                    dot(grow, &src[..ow])
                                } else {
                                    gath.clear();
                                    gath.extend((0..ow).map(|t| src[t * g.sw]));
                                    dot(grow, gath)
                                };
                                dwk[i * g.kw + j] += s;
                            }
                        }
                    }
                }
            },
        );
    dw
}

struct Conv2dBackward {
    input: Tensor,
    weight: Tensor,
    bias: Option<Tensor>,
    geom: Geom,
}

impl Backward for Conv2dBackward {
    fn name(&self) -> &'static str {
        "conv2d"
    }
    fn inputs(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.input, &self.weight];
        if let Some(b) = &self.bias {
            v.push(b);
        }
        v
    }
    fn backward(&self, _out: &Tensor, gy: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let g = &self.geom;
        let dtype = self.input.dtype();
        with_compute!(dtype, F => {
            let gy = F::data(gy, "conv2d backward")?;
            let dx = if self.input.is_tracked() {
                let w = F::data(&self.weight, "conv2d backward")?;
                Some(Tensor::from_float_vec(conv_backward_input(&gy, &w, g), &g.in_shape(), dtype)?)
            } else {
                None
            };
            let dw = if self.weight.is_tracked() {
                let x = F::data(&self.input, "conv2d backward")?;
                Some(Tensor::from_float_vec(conv_backward_weight(&x, &gy, g), &g.weight_shape(), dtype)?)
            } else {
                None
            };
            let mut grads = vec![dx, dw];
            if let Some(b) = &self.bias {
                grads.push(if b.is_tracked() {
                    Some(Tensor::from_float_vec(conv_backward_bias(&gy, g), &[g.c_out], dtype)?)
                } else {
                    None
                });
            }
            Ok(grads)
        })
    }
}

/// Which pooling reduction to apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PoolKind {
    Avg,
    Max,
}

/// Shapes and hyper-parameters of one pooling.
#[derive(Clone, Copy, Debug)]
struct PoolGeom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    ph: usize,
    pw: usize,
    oh: usize,
    ow: usize,
}

impl PoolGeom {
    fn new(
        op: &'static str,
        x: &Tensor,
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> Result<PoolGeom> {
        x.ensure_float(op)?;
        let s = x.shape();
        let params = format!("kernel {kernel:?}, stride {stride:?}, padding {padding:?}");
        if s.len() != 4 {
            return Err(Error::invalid_shape(
                op,
                s,
                format!("expected a [N, C, H, W] input ({params})"),
            ));
        }
        if s[1] == 0 || s[2] == 0 || s[3] == 0 {
            return Err(Error::invalid_shape(
                op,
                s,
                "channels, height and width must be non-zero",
            ));
        }
        if kernel.0 == 0 || kernel.1 == 0 || stride.0 == 0 || stride.1 == 0 {
            return Err(Error::invalid_shape(
                op,
                s,
                format!("kernel and stride must be positive ({params})"),
            ));
        }
        if 2 * padding.0 > kernel.0 || 2 * padding.1 > kernel.1 {
            return Err(Error::invalid_shape(
                op,
                s,
                format!("padding must be at most half the kernel ({params})"),
            ));
        }
        let (Some(oh), Some(ow)) = (
            out_len(s[2], padding.0, 1, kernel.0, stride.0),
            out_len(s[3], padding.1, 1, kernel.1, stride.1),
        ) else {
            return Err(Error::invalid_shape(
                op,
                s,
                format!("kernel larger than the padded input ({params})"),
            ));
        };
        Ok(PoolGeom {
            n: s[0],
            c: s[1],
            h: s[2],
            w: s[3],
            kh: kernel.0,
            kw: kernel.1,
            sh: stride.0,
            sw: stride.1,
            ph: padding.0,
            pw: padding.1,
            oh,
            ow,
        })
    }
    fn out_shape(&self) -> [usize; 4] {
        [self.n, self.c, self.oh, self.ow]
    }
    /// Input rows (or columns) `[lo, hi)` covered by window `o` along an axis.
    fn window(o: usize, stride: usize, pad: usize, kernel: usize, len: usize) -> (usize, usize) {
        let start = o * stride;
        (
            start.saturating_sub(pad),
            (start + kernel).saturating_sub(pad).min(len),
        )
    }
    fn rows(&self, oh: usize) -> (usize, usize) {
        Self::window(oh, self.sh, self.ph, self.kh, self.h)
    }
    fn cols(&self, ow: usize) -> (usize, usize) {
        Self::window(ow, self.sw, self.pw, self.kw, self.w)
    }
}

/// Average pooling; the divisor is always `kh * kw` (padding counts, and in floor mode no
/// window reaches past the padding).
fn avg_pool_forward<F: Compute>(x: &[F], g: &PoolGeom) -> Vec<F> {
    let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
    let mut out = vec![F::zero(); g.n * g.c * ohw];
    if out.is_empty() {
        return out;
    }
    let inv = F::one() / F::c((g.kh * g.kw) as f64);
    out.par_chunks_mut(ohw)
        .enumerate()
        .with_min_len(min_items(ohw * g.kh * g.kw))
        .for_each(|(p, o)| {
            let plane = &x[p * hw..(p + 1) * hw];
            for oh in 0..g.oh {
                let (r0, r1) = g.rows(oh);
                for ow in 0..g.ow {
                    let (c0, c1) = g.cols(ow);
                    let mut s = F::zero();
                    for r in r0..r1 {
                        for &v in &plane[r * g.w + c0..r * g.w + c1] {
                            s += v;
                        }
                    }
                    o[oh * g.ow + ow] = s * inv;
                }
            }
        });
    out
}

fn avg_pool_backward<F: Compute>(gy: &[F], g: &PoolGeom) -> Vec<F> {
    let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
    let mut dx = vec![F::zero(); g.n * g.c * hw];
    if dx.is_empty() {
        return dx;
    }
    let inv = F::one() / F::c((g.kh * g.kw) as f64);
    dx.par_chunks_mut(hw)
        .enumerate()
        .with_min_len(min_items(ohw * g.kh * g.kw))
        .for_each(|(p, d)| {
            let go = &gy[p * ohw..(p + 1) * ohw];
            for oh in 0..g.oh {
                let (r0, r1) = g.rows(oh);
                for ow in 0..g.ow {
                    let (c0, c1) = g.cols(ow);
                    let v = go[oh * g.ow + ow] * inv;
                    for r in r0..r1 {
                        for e in &mut d[r * g.w + c0..r * g.w + c1] {
                            *e += v;
                        }
                    }
                }
            }
        });
    dx
}

/// Max pooling; also returns, per output, the in-plane index of the first maximum in row-major
/// window order (a NaN wins, as in PyTorch).
fn max_pool_forward<F: Compute>(x: &[F], g: &PoolGeom) -> (Vec<F>, Vec<usize>) {
    let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
    let mut out = vec![F::zero(); g.n * g.c * ohw];
    let mut arg = vec![0usize; out.len()];
    if out.is_empty() {
        return (out, arg);
    }
    out.par_chunks_mut(ohw)
        .zip(arg.par_chunks_mut(ohw))
        .enumerate()
        .with_min_len(min_items(ohw * g.kh * g.kw))
        .for_each(|(p, (o, a))| {
            let plane = &x[p * hw..(p + 1) * hw];
            for oh in 0..g.oh {
                let (r0, r1) = g.rows(oh);
                for ow in 0..g.ow {
                    let (c0, c1) = g.cols(ow);
                    let mut best = F::neg_infinity();
                    let mut at = r0 * g.w + c0;
                    for r in r0..r1 {
                        for c in c0..c1 {
                            let v = plane[r * g.w + c];
                            if v > best || v.is_nan() {
                                best = v;
                                at = r * g.w + c;
                            }
                        }
                    }
                    o[oh * g.ow + ow] = best;
                    a[oh * g.ow + ow] = at;
                }
            }
        });
    (out, arg)
}

fn max_pool_backward<F: Compute>(gy: &[F], arg: &[usize], g: &PoolGeom) -> Vec<F> {
    let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
    let mut dx = vec![F::zero(); g.n * g.c * hw];
    if dx.is_empty() || ohw == 0 {
        return dx;
    }
    dx.par_chunks_mut(hw)
        .enumerate()
        .with_min_len(min_items(ohw))
        .for_each(|(p, d)| {
            for (&v, &at) in gy[p * ohw..(p + 1) * ohw]
                .iter()
                .zip(&arg[p * ohw..(p + 1) * ohw])
            {
                d[at] += v;
            }
        });
    dx
}

struct PoolBackward {
    kind: PoolKind,
    input: Tensor,
    geom: PoolGeom,
    /// Arg-max positions for max pooling (empty for average pooling).
    argmax: Vec<usize>,
}

impl Backward for PoolBackward {
    fn name(&self) -> &'static str {
        match self.kind {
            PoolKind::Avg => "avg_pool2d",
            PoolKind::Max => "max_pool2d",
        }
    }
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.input]
    }
    fn backward(&self, _out: &Tensor, gy: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let g = &self.geom;
        let dtype = self.input.dtype();
        let dx = with_compute!(dtype, F => {
            let gy = F::data(gy, self.name())?;
            let dx = match self.kind {
                PoolKind::Avg => avg_pool_backward(&gy, g),
                PoolKind::Max => max_pool_backward(&gy, &self.argmax, g),
            };
            Tensor::from_float_vec(dx, &[g.n, g.c, g.h, g.w], dtype)?
        });
        Ok(vec![Some(dx)])
    }
}

impl Tensor {
    /// 2-D convolution of a `[N, C_in, H, W]` input with a `[C_out, C_in / groups, kh, kw]`
    /// weight and an optional `[C_out]` bias, exactly like `torch.nn.functional.conv2d`.
    ///
    /// ```
    /// # use mgm_tensor::{Conv2dParams, Tensor};
    /// let x = Tensor::from_vec(vec![1f32; 16], &[1, 1, 4, 4])?;
    /// let w = Tensor::from_vec(vec![1f32; 9], &[1, 1, 3, 3])?;
    /// let y = x.conv2d(&w, None, Conv2dParams { padding: (1, 1), ..Default::default() })?;
    /// assert_eq!(y.shape(), &[1, 1, 4, 4]);
    /// assert_eq!(y.to_vec::<f32>()?[0], 4.0);
    /// # Ok::<(), mgm_tensor::Error>(())
    /// ```
    pub fn conv2d(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        p: Conv2dParams,
    ) -> Result<Tensor> {
        const OP: &str = "conv2d";
        self.ensure_float(OP)?;
        self.ensure_same(OP, weight)?;
        let (xs, ws) = (self.shape(), weight.shape());
        if xs.len() != 4 || ws.len() != 4 {
            return Err(Error::shape_mismatch(
                OP,
                xs,
                ws,
                "expected input [N, C_in, H, W] and weight [C_out, C_in / groups, kh, kw]",
            ));
        }
        let params = format!(
            "stride {:?}, padding {:?}, dilation {:?}, groups {}",
            p.stride, p.padding, p.dilation, p.groups
        );
        if p.groups == 0
            || p.stride.0 == 0
            || p.stride.1 == 0
            || p.dilation.0 == 0
            || p.dilation.1 == 0
        {
            return Err(Error::shape_mismatch(
                OP,
                xs,
                ws,
                format!("stride, dilation and groups must be positive ({params})"),
            ));
        }
        let (c_in, c_out) = (xs[1], ws[0]);
        if c_in % p.groups != 0 || c_out % p.groups != 0 {
            return Err(Error::shape_mismatch(
                OP,
                xs,
                ws,
                format!(
                    "groups {} must divide C_in {c_in} and C_out {c_out}",
                    p.groups
                ),
            ));
        }
        if ws[1] * p.groups != c_in {
            return Err(Error::shape_mismatch(
                OP,
                xs,
                ws,
                format!(
                    "C_in {c_in} != weight dim 1 ({}) * groups ({})",
                    ws[1], p.groups
                ),
            ));
        }
        let (kh, kw) = (ws[2], ws[3]);
        let (Some(oh), Some(ow)) = (
            out_len(xs[2], p.padding.0, p.dilation.0, kh, p.stride.0),
            out_len(xs[3], p.padding.1, p.dilation.1, kw, p.stride.1),
        ) else {
            return Err(Error::shape_mismatch(
                OP,
                xs,
                ws,
                format!("kernel (dilated) is empty or larger than the padded input ({params})"),
            ));
        };
        if let Some(b) = bias {
            self.ensure_same(OP, b)?;
            if b.shape() != [c_out] {
                return Err(Error::shape_mismatch(
                    OP,
                    ws,
                    b.shape(),
                    format!("bias must be [C_out] = [{c_out}]"),
                ));
            }
        }
        let geom = Geom {
            n: xs[0],
            c_in,
            h: xs[2],
            w: xs[3],
            c_out,
            kh,
            kw,
            oh,
            ow,
            sh: p.stride.0,
            sw: p.stride.1,
            ph: p.padding.0,
            pw: p.padding.1,
            dh: p.dilation.0,
            dw: p.dilation.1,
            groups: p.groups,
        };
        let dtype = self.dtype();
        let out = with_compute!(dtype, F => {
            let x = F::data(self, OP)?;
            let w = F::data(weight, OP)?;
            let b = bias.map(|b| F::data(b, OP)).transpose()?;
            Tensor::from_float_vec(conv_forward(&x, &w, b.as_deref(), &geom), &geom.out_shape(), dtype)?
        });
        Ok(attach(out, || Conv2dBackward {
            input: self.clone(),
            weight: weight.clone(),
            bias: bias.cloned(),
            geom,
        }))
    }

    /// Average pooling over `[N, C, H, W]`, like `F.avg_pool2d` with `count_include_pad=True`
    /// and `ceil_mode=False` (padding at most half the kernel).
    pub fn avg_pool2d(
        &self,
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> Result<Tensor> {
        let g = PoolGeom::new("avg_pool2d", self, kernel, stride, padding)?;
        let dtype = self.dtype();
        let out = with_compute!(dtype, F => {
            let x = F::data(self, "avg_pool2d")?;
            Tensor::from_float_vec(avg_pool_forward(&x, &g), &g.out_shape(), dtype)?
        });
        Ok(attach(out, || PoolBackward {
            kind: PoolKind::Avg,
            input: self.clone(),
            geom: g,
            argmax: Vec::new(),
        }))
    }

    /// Max pooling over `[N, C, H, W]`, like `F.max_pool2d` with `ceil_mode=False` (padding is
    /// -inf, at most half the kernel); the gradient goes to the first maximum of each window.
    pub fn max_pool2d(
        &self,
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> Result<Tensor> {
        let g = PoolGeom::new("max_pool2d", self, kernel, stride, padding)?;
        let dtype = self.dtype();
        let (out, argmax) = with_compute!(dtype, F => {
            let x = F::data(self, "max_pool2d")?;
            let (out, argmax) = max_pool_forward(&x, &g);
            (Tensor::from_float_vec(out, &g.out_shape(), dtype)?, argmax)
        });
        Ok(attach(out, || PoolBackward {
            kind: PoolKind::Max,
            input: self.clone(),
            geom: g,
            argmax,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_range_matches_brute_force() {
        for out in 0..6 {
            for stride in 1..4 {
                for offset in 0..5 {
                    for pad in 0..4 {
                        for len in 0..6 {
                            let ok: Vec<usize> = (0..out)
                                .filter(|&o| {
                                    let p = o * stride + offset;
                                    p >= pad && p - pad < len
                                })
                                .collect();
                            let (lo, hi) = valid_range(out, stride, offset, pad, len);
                            assert_eq!(
                                (lo..hi).collect::<Vec<_>>(),
                                ok,
                                "{out} {stride} {offset} {pad} {len}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn dot_matches_naive() {
        let a: Vec<f64> = (0..21).map(|i| i as f64 * 0.5 - 3.0).collect();
        let b: Vec<f64> = (0..21).map(|i| (i * i) as f64 * 0.1).collect();
        let naive: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-9);
    }
}
