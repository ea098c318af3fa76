//! Windowed attention forward (DESIGN.md §3): for every (batch, head) slab and query row i,
//! `out_i = sum_j softmax_j(q_i . k_j / sqrt(d)) v_j` over the keys j that the [`Mask`] allows.
//! A causal window W keeps j in [i - W + 1, i], a bidirectional radius r keeps |i - j| <= r, a
//! band keeps i + lo <= j <= i + hi, `Full` keeps every key; a row with no allowed key is zero.
//! q, k, v and out are `[batch, heads, n, d]` row-major f32 with 1 <= d <= 128.
//!
//! The fast path and the PTX run an online (flash-style) softmax over the window's keys only: a
//! running max and sum per query, one pass over the keys, so a call costs O(n * W * d) time and
//! O(W * d) memory per task and never forms an n x n score matrix.
//!
//! [`Mask`] and [`Shape`] are shared with [`crate::topk_attention`], which applies the same masks
//! before its top-k selection.

use rayon::prelude::*;

use crate::error::check_len;
use crate::{Error, KernelArg, KernelLaunch, LaunchDims, Result};

const KERNEL: &str = "windowed_attention";

/// Largest head dim the PTX keeps in registers (4 dims per lane of a warp); the CPU paths
/// enforce the same limit so every path accepts the same inputs.
pub const MAX_HEAD_DIM: usize = 128;

/// Which keys each query row attends (DESIGN.md §3); shared by windowed and top-k attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mask {
    /// Causal sliding window of `w >= 1` keys: query i sees j in [i - w + 1, i] (w = 1: itself only).
    Causal {
        /// Keys per window, the query's own included.
        w: usize,
    },
    /// Bidirectional window: query i sees j with |i - j| <= r (r = 0: itself only).
    Bidirectional {
        /// Radius.
        r: usize,
    },
    /// Relative band `lo <= j - i <= hi` (lo <= hi): e.g. `{ lo: -4, hi: -1 }` is "the four previous
    /// tokens, not itself", which leaves row 0 with no key at all (its output is zero).
    Band {
        /// Lowest allowed offset j - i.
        lo: isize,
        /// Highest allowed offset j - i.
        hi: isize,
    },
    /// No mask: every query sees all n keys (dense attention).
    Full,
}

impl Mask {
    /// Whether query `i` may attend key `j`: the definition itself, which the references use.
    pub fn allows(self, i: usize, j: usize) -> bool {
        match self {
            Mask::Causal { w } => j <= i && i - j < w,
            Mask::Bidirectional { r } => i.abs_diff(j) <= r,
            Mask::Band { lo, hi } => {
                let rel = j as i128 - i as i128;
                lo as i128 <= rel && rel <= hi as i128
            }
            Mask::Full => true,
        }
    }

    /// Rejects masks that allow nothing anywhere (`w = 0`, `lo > hi`): always a caller bug.
    fn check(self, kernel: &'static str) -> Result<()> {
        match self {
            Mask::Causal { w: 0 } => Err(Error::Param {
                kernel,
                msg: "causal window w = 0 allows no key (w >= 1; w = 1 is the diagonal)".into(),
            }),
            Mask::Band { lo, hi } if lo > hi => Err(Error::Param {
                kernel,
                msg: format!("band lo = {lo} > hi = {hi} allows no key"),
            }),
            _ => Ok(()),
        }
    }

    /// The mask as offsets `lo <= j - i <= hi`, clamped to [-n, n] (which changes nothing, as
    /// |j - i| < n) so they fit the PTX's s32 parameters and never overflow.
    pub(crate) fn offsets(self, n: usize) -> (i64, i64) {
        let n = n as i64;
        let clamp = |x: i128| x.clamp(-(n as i128), n as i128) as i64;
        match self {
            Mask::Causal { w } => (clamp(1 - w as i128), 0),
            Mask::Bidirectional { r } => (clamp(-(r as i128)), clamp(r as i128)),
            Mask::Band { lo, hi } => (clamp(lo as i128), clamp(hi as i128)),
            Mask::Full => (-n, n),
        }
    }

    /// Keys of query `i` as a half-open range (empty when the band misses [0, n)).
    pub(crate) fn keys(self, i: usize, n: usize) -> std::ops::Range<usize> {
        let (lo, hi) = self.offsets(n);
        let start = (i as i64 + lo).max(0);
        let end = (i as i64 + hi + 1).min(n as i64);
        if start < end {
            start as usize..end as usize
        } else {
            0..0
        }
    }
}

/// Shape of q, k, v and out: `[batch, heads, n, d]`, keys as many as queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Batch size.
    pub batch: usize,
    /// Heads per batch entry.
    pub heads: usize,
    /// Sequence length (queries and keys).
    pub n: usize,
    /// Head dim, 1..=128.
    pub d: usize,
}

impl Shape {
    fn describe(self) -> String {
        format!(
            "batch={}, heads={}, n={}, d={}",
            self.batch, self.heads, self.n, self.d
        )
    }
}

/// Checks the head dim, the mask and the four slice lengths (shared by both attention families).
pub(crate) fn check_args(
    kernel: &'static str,
    lens: [usize; 4],
    shape: Shape,
    mask: Mask,
) -> Result<()> {
    if shape.d == 0 || shape.d > MAX_HEAD_DIM {
        return Err(Error::Param {
            kernel,
            msg: format!("head dim d = {} is outside 1..={MAX_HEAD_DIM}", shape.d),
        });
    }
    mask.check(kernel)?;
    let expected = [shape.batch, shape.heads, shape.n, shape.d]
        .into_iter()
        .try_fold(1usize, usize::checked_mul)
        .ok_or_else(|| Error::Param {
            kernel,
            msg: format!("{} elements overflow usize", shape.describe()),
        })?;
    for (arg, len) in ["q", "k", "v", "out"].into_iter().zip(lens) {
        check_len(kernel, arg, len, expected, || shape.describe())?;
    }
    Ok(())
}

/// The limits of the PTX launch (grid y/z, s32 offsets) on top of [`check_args`].
pub(crate) fn check_device(kernel: &'static str, shape: Shape) -> Result<()> {
    if shape.n > 1 << 30 {
        return Err(Error::Param {
            kernel,
            msg: format!(
                "n = {} exceeds the PTX limit 2^30 (s32 key indices)",
                shape.n
            ),
        });
    }
    Ok(())
}

/// The plain-loop reference in f64 (scores, mask, softmax, times V); see [`reference()`].
pub fn reference_f64(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: Shape,
    mask: Mask,
) -> Result<Vec<f64>> {
    let total = shape.batch * shape.heads * shape.n * shape.d;
    check_args(KERNEL, [q.len(), k.len(), v.len(), total], shape, mask)?;
    let Shape { n, d, .. } = shape;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0f64; total];
    for slab in 0..shape.batch * shape.heads {
        let at = |x: &[f32], row: usize, c: usize| x[(slab * n + row) * d + c] as f64;
        for i in 0..n {
            let scores: Vec<f64> = (0..n)
                .map(|j| match mask.allows(i, j) {
                    true => (0..d).map(|c| at(q, i, c) * at(k, j, c)).sum::<f64>() * scale,
                    false => f64::NEG_INFINITY,
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if max == f64::NEG_INFINITY {
                continue; // no allowed key: the row stays zero
            }
            let p: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = p.iter().sum();
            for c in 0..d {
                let o: f64 = (0..n).map(|j| p[j] * at(v, j, c)).sum();
                out[(slab * n + i) * d + c] = o / sum;
            }
        }
    }
    Ok(out)
}

/// The plain-loop reference (f64 accumulation, rounded to f32 at the end); O(n^2) per slab.
pub fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    shape: Shape,
    mask: Mask,
) -> Result<()> {
    check_args(KERNEL, [q.len(), k.len(), v.len(), out.len()], shape, mask)?;
    let r = reference_f64(q, k, v, shape, mask)?;
    out.iter_mut().zip(r).for_each(|(o, r)| *o = r as f32);
    Ok(())
}

/// Queries per rayon task: they share one transposed copy of their keys' K rows.
const QUERY_BLOCK: usize = 64;
/// Keys per online-softmax step: one fixed-size score array the compiler keeps in registers.
const KEY_TILE: usize = 32;

/// The fast path: rayon over (slab, block of 64 queries); per block the union of the queries'
/// windows is transposed once (`kt[c][j]`) so scores for 32 keys are one vectorised axpy per dim,
/// then an online softmax walks the query's window in tiles of 32 keys. O(n * W * d).
pub fn cpu(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    shape: Shape,
    mask: Mask,
) -> Result<()> {
    check_args(KERNEL, [q.len(), k.len(), v.len(), out.len()], shape, mask)?;
    let Shape { n, d, .. } = shape;
    if out.is_empty() {
        return Ok(());
    }
    let slab = n * d;
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    out.par_chunks_mut(slab).enumerate().for_each(|(s, o)| {
        let range = s * slab..(s + 1) * slab;
        let (q, k, v) = (&q[range.clone()], &k[range.clone()], &v[range]);
        o.par_chunks_mut(QUERY_BLOCK * d)
            .enumerate()
            .for_each(|(b, o)| query_block(q, k, v, o, b * QUERY_BLOCK, n, d, scale, mask));
    });
    Ok(())
}

/// One block of queries `i0..i0 + out.len() / d` of one slab (`q`, `k`, `v` are that slab).
#[allow(clippy::too_many_arguments)] // private worker: the unpacked shape keeps the hot loop plain
fn query_block(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    i0: usize,
    n: usize,
    d: usize,
    scale: f32,
    mask: Mask,
) {
    let rows = out.len() / d;
    // The union of the block's windows (a band can leave some rows with an empty window).
    let (span_lo, span_hi) = (0..rows)
        .map(|r| mask.keys(i0 + r, n))
        .filter(|w| !w.is_empty())
        .fold((usize::MAX, 0), |(lo, hi), w| {
            (lo.min(w.start), hi.max(w.end))
        });
    if span_lo >= span_hi {
        out.fill(0.0);
        return;
    }
    // Transposed keys, each row padded by a tile of zeros so the last tile reads in bounds.
    let stride = span_hi - span_lo + KEY_TILE;
    let mut kt = vec![0f32; d * stride];
    for (j, krow) in k[span_lo * d..span_hi * d].chunks_exact(d).enumerate() {
        for (c, &x) in krow.iter().enumerate() {
            kt[c * stride + j] = x;
        }
    }
    let mut qs = [0f32; MAX_HEAD_DIM];
    let mut acc = [0f32; MAX_HEAD_DIM];
    for (r, o) in out.chunks_exact_mut(d).enumerate() {
        let i = i0 + r;
        let window = mask.keys(i, n);
        let (qs, acc) = (&mut qs[..d], &mut acc[..d]);
        for (x, &y) in qs.iter_mut().zip(&q[i * d..(i + 1) * d]) {
            *x = y * scale;
        }
        acc.fill(0.0);
        let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
        let mut j0 = window.start;
        while j0 < window.end {
            let len = KEY_TILE.min(window.end - j0);
            let off = j0 - span_lo;
            let mut s = [0f32; KEY_TILE];
            for (c, &qc) in qs.iter().enumerate() {
                let kc: &[f32; KEY_TILE] = kt[c * stride + off..][..KEY_TILE]
                    .try_into()
                    .expect("slice of KEY_TILE elements");
                for (s, &kc) in s.iter_mut().zip(kc) {
                    *s += qc * kc;
                }
            }
            let tile_max = s[..len].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if tile_max > max {
                // exp_neg(-inf) is tiny, not 0, but acc and sum are still 0 then.
                let alpha = exp_neg(max - tile_max);
                sum *= alpha;
                acc.iter_mut().for_each(|a| *a *= alpha);
                max = tile_max;
            }
            let mut p = [0f32; KEY_TILE];
            for (p, &s) in p.iter_mut().zip(&s) {
                *p = exp_neg(s - max);
            }
            let p = &p[..len];
            sum += p.iter().sum::<f32>();
            accumulate_pv(acc, p, &v[j0 * d..(j0 + len) * d]);
            j0 += len;
        }
        let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        for (o, &a) in o.iter_mut().zip(acc.iter()) {
            *o = a * inv;
        }
    }
}

/// `acc += sum_j p[j] * v[j]` with `v` the rows of `p`'s keys; four rows per pass so `acc` is
/// loaded and stored once per four keys.
pub(crate) fn accumulate_pv(acc: &mut [f32], p: &[f32], v: &[f32]) {
    let d = acc.len();
    let mut rows = v.chunks_exact(4 * d);
    let mut ps = p.chunks_exact(4);
    for (v4, p4) in (&mut rows).zip(&mut ps) {
        let (v0, rest) = v4.split_at(d);
        let (v1, rest) = rest.split_at(d);
        let (v2, v3) = rest.split_at(d);
        for c in 0..d {
            acc[c] += p4[0] * v0[c] + p4[1] * v1[c] + (p4[2] * v2[c] + p4[3] * v3[c]);
        }
    }
    for (vr, &pj) in rows.remainder().chunks_exact(d).zip(ps.remainder()) {
        for (a, &x) in acc.iter_mut().zip(vr) {
            *a += pj * x;
        }
    }
}

/// e^x for x <= 0 without a libm call, so loops over it vectorise: Cody-Waite reduction
/// x = k ln2 + r with |r| <= ln2/2, a degree-6 Taylor polynomial for e^r (truncation < 2e-7
/// relative) and 2^k built from exponent bits. Inputs below -87 return e^-87 (~1.6e-38), which
/// is negligible against the row's maximum term e^0 = 1; -inf also lands there.
#[inline(always)]
pub(crate) fn exp_neg(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so k * LN2_HI is exact for |k| < 2^11: 0.693145751953125 (15 mantissa bits)
    // and the f32 nearest to ln 2 - LN2_HI (about 1.4286068e-6).
    const LN2_HI: f32 = f32::from_bits(0x3f31_7200);
    const LN2_LO: f32 = f32::from_bits(0x35bf_be8e);
    // Adding 1.5 * 2^23 rounds to an integer in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 0.0);
    let kf = (x * LOG2_E + MAGIC) - MAGIC;
    let ki = (x * LOG2_E + MAGIC).to_bits() as i32 - MAGIC.to_bits() as i32;
    let r = (x - kf * LN2_HI) - kf * LN2_LO;
    let poly = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    poly * f32::from_bits(((ki + 127) as u32) << 23)
}

/// Builds the launch of `mgm_windowed_attention_fwd_f32`: grid (ceil(n / 8), heads, batch),
/// 256 threads (one warp per query, 8 consecutive queries per block sharing K/V tiles of 32
/// keys in dynamic shared memory of `(8 d + 64 (d | 1)) * 4` bytes).
pub fn launch<'a>(
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    out: &'a mut [f32],
    shape: Shape,
    mask: Mask,
) -> Result<KernelLaunch<'a>> {
    check_args(KERNEL, [q.len(), k.len(), v.len(), out.len()], shape, mask)?;
    check_device(KERNEL, shape)?;
    let Shape { batch, heads, n, d } = shape;
    if heads > 65_535 || batch > 65_535 {
        return Err(Error::Param {
            kernel: KERNEL,
            msg: format!(
                "heads = {heads} and batch = {batch} must each be <= 65535 (CUDA grid y/z)"
            ),
        });
    }
    // An empty problem still gets a valid launch: one block that sees n = 0 and does nothing.
    let (n_arg, grid) = if out.is_empty() {
        (0, [1, 1, 1])
    } else {
        (n, [n.div_ceil(8) as u32, heads as u32, batch as u32])
    };
    let (lo, hi) = mask.offsets(n_arg);
    let stride = d | 1;
    Ok(KernelLaunch {
        family: KERNEL,
        entry: "mgm_windowed_attention_fwd_f32",
        dims: LaunchDims {
            grid,
            block: [256, 1, 1],
            shared_bytes: ((8 * d + 64 * stride) * 4) as u32,
        },
        args: vec![
            KernelArg::input(q),
            KernelArg::input(k),
            KernelArg::input(v),
            KernelArg::output(out),
            KernelArg::U32(n_arg as u32),
            KernelArg::U32(d as u32),
            KernelArg::I32(lo as i32),
            KernelArg::I32(hi as i32),
            KernelArg::F32((1.0 / (d as f64).sqrt()) as f32),
        ],
    })
}

/// Runs the PTX on a GPU.
#[cfg(feature = "cuda")]
pub fn cuda(
    gpu: &crate::cuda::Gpu,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    shape: Shape,
    mask: Mask,
) -> Result<()> {
    gpu.run(launch(q, k, v, out, shape, mask)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_neg_matches_f64_exp() {
        let mut worst = 0f64;
        for t in 0..=200_000 {
            let x = -87.0 * t as f32 / 200_000.0;
            let want = (x as f64).exp();
            let got = exp_neg(x) as f64;
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 5e-7, "relative error {worst:e}");
        assert_eq!(exp_neg(0.0), 1.0);
    }

    #[test]
    fn mask_keys_agree_with_allows() {
        let masks = [
            Mask::Causal { w: 1 },
            Mask::Causal { w: 3 },
            Mask::Causal { w: usize::MAX },
            Mask::Bidirectional { r: 0 },
            Mask::Bidirectional { r: 2 },
            Mask::Bidirectional { r: usize::MAX },
            Mask::Band { lo: -3, hi: -1 },
            Mask::Band { lo: 2, hi: 5 },
            Mask::Band {
                lo: isize::MIN,
                hi: isize::MAX,
            },
            Mask::Full,
        ];
        for mask in masks {
            for n in 0..9 {
                for i in 0..n {
                    let want: Vec<usize> = (0..n).filter(|&j| mask.allows(i, j)).collect();
                    let got: Vec<usize> = mask.keys(i, n).collect();
                    assert_eq!(got, want, "{mask:?} n={n} i={i}");
                }
            }
        }
    }
}
