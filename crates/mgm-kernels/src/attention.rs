//! Dense attention of a few query rows over cached keys: `out = softmax(scale q K^T + mask) V`,
//! the decode step of a causal LM (all query heads that share one key/value head are the rows).
//!
//! The keys are read once, each against every query row while it is in cache, so the kernel
//! runs at the speed of reading `K` and `V`; rows whose every key is masked give zeros, a NaN
//! makes its row NaN (DESIGN.md section 3). No PTX yet. Longer query blocks (prefill) are
//! better served by the packed GEMM (`gemm::PackedLhs::softmax_rows`).
//!
//! ```
//! use mgm_kernels::attention;
//! let q = [1f32, 0.];          // one row, d = 2
//! let k = [1f32, 0., 0., 1.];  // two keys
//! let v = [10f32, 20.];        // dv = 1
//! let mut out = [0f32];
//! let shape = attention::Shape { rows: 1, keys: 2, d: 2, dv: 1 };
//! attention::cpu(&q, &k, &v, None, shape, 1.0, &mut out)?;
//! let p0 = 1f32.exp() / (1f32.exp() + 1.0);
//! assert!((out[0] - (10.0 * p0 + 20.0 * (1.0 - p0))).abs() < 1e-4);
//! # Ok::<(), mgm_kernels::Error>(())
//! ```

use crate::error::{Result, check_len};
use crate::simd::{simd_call, simd_level, simd_variants};
use crate::softmax::exp_shifted_inplace;

const KERNEL: &str = "attention";

/// Sizes of one call: `q` `[rows, d]`, `k` `[keys, d]`, `v` `[keys, dv]`, `mask` and the scores
/// `[rows, keys]`, `out` `[rows, dv]`, all row-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Query rows.
    pub rows: usize,
    /// Keys (and values).
    pub keys: usize,
    /// Query/key width.
    pub d: usize,
    /// Value width.
    pub dv: usize,
}

fn check(q: usize, k: usize, v: usize, mask: Option<usize>, out: usize, s: Shape) -> Result<()> {
    let shape = || format!("{s:?}");
    check_len(KERNEL, "q", q, s.rows * s.d, shape)?;
    check_len(KERNEL, "k", k, s.keys * s.d, shape)?;
    check_len(KERNEL, "v", v, s.keys * s.dv, shape)?;
    if let Some(m) = mask {
        check_len(KERNEL, "mask", m, s.rows * s.keys, shape)?;
    }
    check_len(KERNEL, "out", out, s.rows * s.dv, shape)
}

/// The f64 reference: plain loops, the version to check by eye.
pub fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&[f32]>,
    s: Shape,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    check(
        q.len(),
        k.len(),
        v.len(),
        mask.map(<[f32]>::len),
        out.len(),
        s,
    )?;
    for r in 0..s.rows {
        let mut scores: Vec<f64> = (0..s.keys)
            .map(|j| {
                let dot: f64 = (0..s.d)
                    .map(|i| f64::from(q[r * s.d + i]) * f64::from(k[j * s.d + i]))
                    .sum();
                dot * f64::from(scale) + mask.map_or(0.0, |m| f64::from(m[r * s.keys + j]))
            })
            .collect();
        let o = &mut out[r * s.dv..(r + 1) * s.dv];
        if scores.iter().any(|x| x.is_nan()) {
            o.fill(f32::NAN);
            continue;
        }
        let m = scores.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        if m == f64::NEG_INFINITY {
            o.fill(0.0);
            continue;
        }
        let mut sum = 0.0;
        for x in &mut scores {
            *x = (*x - m).exp();
            sum += *x;
        }
        for (c, oc) in o.iter_mut().enumerate() {
            let acc: f64 = (0..s.keys)
                .map(|j| scores[j] * f64::from(v[j * s.dv + c]))
                .sum();
            *oc = (acc / sum) as f32;
        }
    }
    Ok(())
}

/// The fast path (single-threaded: callers run one key/value head per task), vectorised over
/// the head width with AVX2 / AVX-512 chosen at run time.
pub fn cpu(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&[f32]>,
    s: Shape,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    check(
        q.len(),
        k.len(),
        v.len(),
        mask.map(<[f32]>::len),
        out.len(),
        s,
    )?;
    if s.rows == 0 || s.dv == 0 {
        return Ok(());
    }
    let mut scores = vec![0f32; s.rows * s.keys];
    let simd = simd_level();
    simd_call!(
        simd,
        decode_generic,
        decode_avx2,
        decode_avx512(q, k, v, mask, s, scale, &mut scores, out)
    );
    Ok(())
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn decode_generic(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&[f32]>,
    s: Shape,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let Shape { rows, keys, d, dv } = s;
    // every key once, against all rows
    for j in 0..keys {
        let kj = &k[j * d..(j + 1) * d];
        for r in 0..rows {
            let qr = &q[r * d..(r + 1) * d];
            let mut acc = [0f32; 16];
            let mut it_q = qr.chunks_exact(16);
            let mut it_k = kj.chunks_exact(16);
            for (a, b) in (&mut it_q).zip(&mut it_k) {
                for l in 0..16 {
                    acc[l] += a[l] * b[l];
                }
            }
            let mut dot: f32 = acc.iter().sum();
            for (a, b) in it_q.remainder().iter().zip(it_k.remainder()) {
                dot += a * b;
            }
            let m = mask.map_or(0.0, |m| m[r * keys + j]);
            scores[r * keys + j] = dot * scale + m;
        }
    }
    for r in 0..rows {
        let row = &mut scores[r * keys..(r + 1) * keys];
        let inv = exp_shifted_inplace(row);
        let o = &mut out[r * dv..(r + 1) * dv];
        o.fill(0.0);
        for (j, &p) in row.iter().enumerate() {
            let w = p * inv;
            for (oc, &vc) in o.iter_mut().zip(&v[j * dv..(j + 1) * dv]) {
                *oc += w * vc;
            }
        }
        // a NaN score makes inv NaN; every weight, hence the row, is then NaN
        if inv.is_nan() {
            o.fill(f32::NAN);
        }
    }
}

simd_variants!(decode_generic => decode_avx2, decode_avx512(
    q: &[f32], k: &[f32], v: &[f32], mask: Option<&[f32]>, s: Shape, scale: f32,
    scores: &mut [f32], out: &mut [f32]
));
