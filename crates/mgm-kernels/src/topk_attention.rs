//! Top-k sparse attention forward (DESIGN.md §3): S = q k^T / sqrt(d) with the [`Mask`] applied
//! as -inf; per query row, t_i = the k-th largest finite score; scores S_ij >= t_i are kept (ties
//! kept, so a row may keep more than k), the others become -inf; softmax over the kept scores;
//! times V. k >= the row's number of finite scores is dense masked attention; a row with no
//! finite score (a [`Mask::Band`] that misses every key) is zero.
//! q, k, v and out are `[batch, heads, n, d]` row-major f32 with 1 <= d <= 128.
//!
//! The mask and shape types are the ones of [`crate::windowed_attention`] (re-exported here).

use rayon::prelude::*;

use crate::simd::dot;
use crate::windowed_attention::{MAX_HEAD_DIM, check_args, check_device, exp_neg};
pub use crate::windowed_attention::{Mask, Shape};
use crate::{Error, KernelArg, KernelLaunch, LaunchDims, Result};

const KERNEL: &str = "topk_attention";

/// Most blocks [`scratch_len`] provisions for (rows in flight on a GPU at once).
pub const MAX_BLOCKS: usize = 1024;

/// The sparsity: which keys a row may see and how many of the largest scores it keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopK {
    /// Mask applied before the selection.
    pub mask: Mask,
    /// Scores kept per row (ties at the threshold kept too), k >= 1.
    pub k: usize,
}

fn check(lens: [usize; 4], shape: Shape, topk: TopK) -> Result<()> {
    check_args(KERNEL, lens, shape, topk.mask)?;
    if topk.k == 0 {
        return Err(Error::Param {
            kernel: KERNEL,
            msg: "k = 0 keeps no score (k >= 1)".into(),
        });
    }
    Ok(())
}

/// The plain-loop reference in f64 (scores, mask, sort, threshold, softmax, times V).
pub fn reference_f64(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: Shape,
    topk: TopK,
) -> Result<Vec<f64>> {
    let total = shape.batch * shape.heads * shape.n * shape.d;
    check([q.len(), k.len(), v.len(), total], shape, topk)?;
    let Shape { n, d, .. } = shape;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0f64; total];
    for slab in 0..shape.batch * shape.heads {
        let at = |x: &[f32], row: usize, c: usize| x[(slab * n + row) * d + c] as f64;
        for i in 0..n {
            let scores: Vec<f64> = (0..n)
                .map(|j| match topk.mask.allows(i, j) {
                    true => (0..d).map(|c| at(q, i, c) * at(k, j, c)).sum::<f64>() * scale,
                    false => f64::NEG_INFINITY,
                })
                .collect();
            let mut finite: Vec<f64> = scores.iter().copied().filter(|s| s.is_finite()).collect();
            if finite.is_empty() {
                continue; // no finite score: the row stays zero
            }
            finite.sort_by(|a, b| b.total_cmp(a));
            let threshold = finite[topk.k.min(finite.len()) - 1];
            let max = finite[0];
            let p: Vec<f64> = scores
                .iter()
                .map(|&s| if s >= threshold { (s - max).exp() } else { 0.0 })
                .collect();
            let sum: f64 = p.iter().sum();
            for c in 0..d {
                let o: f64 = (0..n).map(|j| p[j] * at(v, j, c)).sum();
                out[(slab * n + i) * d + c] = o / sum;
            }
        }
    }
    Ok(out)
}

/// The plain-loop reference (f64 accumulation, rounded to f32 at the end).
pub fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    shape: Shape,
    topk: TopK,
) -> Result<()> {
    check([q.len(), k.len(), v.len(), out.len()], shape, topk)?;
    let r = reference_f64(q, k, v, shape, topk)?;
    out.iter_mut().zip(r).for_each(|(o, r)| *o = r as f32);
    Ok(())
}

/// The fast path: rayon over rows; per row the window's scores, the k-th largest by
/// `select_nth_unstable_by` (O(window)), then exp and P.V over the kept keys only.
pub fn cpu(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    shape: Shape,
    topk: TopK,
) -> Result<()> {
    check([q.len(), k.len(), v.len(), out.len()], shape, topk)?;
    let Shape { n, d, .. } = shape;
    if out.is_empty() {
        return Ok(());
    }
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    out.par_chunks_mut(d).enumerate().for_each_init(
        || (Vec::new(), Vec::new()),
        |(scores, sel): &mut (Vec<f32>, Vec<f32>), (row, o)| {
            let (slab, i) = (row / n, row % n);
            let (q, k, v) = (
                &q[slab * n * d..][..n * d],
                &k[slab * n * d..][..n * d],
                &v[slab * n * d..][..n * d],
            );
            let keys = topk.mask.keys(i, n);
            if keys.is_empty() {
                o.fill(0.0);
                return;
            }
            let qi = &q[i * d..][..d];
            scores.clear();
            scores.extend(
                k[keys.start * d..keys.end * d]
                    .chunks_exact(d)
                    .map(|kj| dot(qi, kj) * scale),
            );
            let threshold = if topk.k < scores.len() {
                sel.clear();
                sel.extend_from_slice(scores);
                *sel.select_nth_unstable_by(topk.k - 1, |a, b| b.total_cmp(a))
                    .1
            } else {
                f32::NEG_INFINITY
            };
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut acc = [0f32; MAX_HEAD_DIM];
            let acc = &mut acc[..d];
            let mut sum = 0f32;
            let vw = &v[keys.start * d..keys.end * d];
            for (&s, vj) in scores.iter().zip(vw.chunks_exact(d)) {
                if s >= threshold {
                    let p = exp_neg(s - max);
                    sum += p;
                    for (a, &x) in acc.iter_mut().zip(vj) {
                        *a += p * x;
                    }
                }
            }
            let inv = 1.0 / sum; // the row maximum is always kept, so sum >= 1
            for (o, &a) in o.iter_mut().zip(acc.iter()) {
                *o = a * inv;
            }
        },
    );
    Ok(())
}

/// Scratch words one row needs on the PTX path: the widest window, at most n.
fn row_width(n: usize, mask: Mask) -> usize {
    let (lo, hi) = mask.offsets(n);
    ((hi - lo + 1).max(1) as usize).min(n.max(1))
}

/// Length (u32 words) of the scratch buffer [`launch`] should get: one row of window scores for
/// each of `min(rows, MAX_BLOCKS)` blocks, e.g. 1024 * min(n, W) words (4 MiB at W = 1024).
pub fn scratch_len(shape: Shape, topk: TopK) -> usize {
    let rows = shape.batch * shape.heads * shape.n;
    rows.min(MAX_BLOCKS) * row_width(shape.n, topk.mask)
}

/// Builds the launch of `mgm_topk_attention_fwd_f32`: 128 threads per block, one query row per
/// block at a time (grid-stride over the batch * heads * n rows). `scratch` holds each block's
/// row of order-preserving score keys; its length picks the grid: `scratch.len() / width`
/// blocks (capped at the row count), with width = min(n, window width), so it must hold at least
/// one row; [`scratch_len`] is the size for a full GPU.
pub fn launch<'a>(
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    out: &'a mut [f32],
    scratch: &'a mut [u32],
    shape: Shape,
    topk: TopK,
) -> Result<KernelLaunch<'a>> {
    check([q.len(), k.len(), v.len(), out.len()], shape, topk)?;
    check_device(KERNEL, shape)?;
    let Shape { n, d, .. } = shape;
    let rows = shape.batch * shape.heads * n;
    if rows > i32::MAX as usize {
        return Err(Error::Param {
            kernel: KERNEL,
            msg: format!("batch * heads * n = {rows} rows exceed the PTX limit 2^31 - 1"),
        });
    }
    let width = row_width(n, topk.mask);
    let blocks = if rows == 0 {
        1 // a valid launch that sees rows = 0 and does nothing
    } else if scratch.len() < width {
        return Err(Error::Param {
            kernel: KERNEL,
            msg: format!(
                "scratch has {} words, needs at least one row of {width} (n={n}, mask {:?}); \
                 scratch_len gives {}",
                scratch.len(),
                topk.mask,
                scratch_len(shape, topk)
            ),
        });
    } else {
        rows.min(scratch.len() / width)
    };
    let (lo, hi) = topk.mask.offsets(n);
    Ok(KernelLaunch {
        family: KERNEL,
        entry: "mgm_topk_attention_fwd_f32",
        dims: LaunchDims {
            grid: [blocks as u32, 1, 1],
            block: [128, 1, 1],
            shared_bytes: 0,
        },
        args: vec![
            KernelArg::input(q),
            KernelArg::input(k),
            KernelArg::input(v),
            KernelArg::output(out),
            KernelArg::output(scratch),
            KernelArg::U32(rows as u32),
            KernelArg::U32(n as u32),
            KernelArg::U32(d as u32),
            KernelArg::I32(lo as i32),
            KernelArg::I32(hi as i32),
            KernelArg::U32(topk.k.min(n.max(1)) as u32),
            KernelArg::U32(width as u32),
            KernelArg::F32((1.0 / (d as f64).sqrt()) as f32),
        ],
    })
}

/// Runs the PTX on a GPU (with a scratch buffer of [`scratch_len`] words).
#[cfg(feature = "cuda")]
pub fn cuda(
    gpu: &crate::cuda::Gpu,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    shape: Shape,
    topk: TopK,
) -> Result<()> {
    let mut scratch = vec![0u32; scratch_len(shape, topk).max(1)];
    gpu.run(launch(q, k, v, out, &mut scratch, shape, topk)?)
}
