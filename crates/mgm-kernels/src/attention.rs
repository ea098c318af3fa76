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
    // the AVX-512 kernel indexes raw pointers: it relies on the lengths check() verified above
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

// the AVX-512 variant is the explicit-vector kernel below, not this loop recompiled
#[cfg(target_arch = "x86_64")]
use avx512::decode as decode_avx512;
simd_variants!(decode_generic => decode_avx2(
    q: &[f32], k: &[f32], v: &[f32], mask: Option<&[f32]>, s: Shape, scale: f32,
    scores: &mut [f32], out: &mut [f32]
));

/// The AVX-512 decode kernel, in explicit vectors. In the portable loops each (row, key)
/// dot ends in an in-order sum of 16 lanes, 15 dependent adds (written as a tree instead,
/// the loops compiled to 2-wide vectors); here four keys' dots are reduced together and the
/// values are weighted eight rows at a time. One TinyLlama head (8 rows, 144 keys, d 64,
/// L2-resident, 2-core Zen 4): 14.5 us portable (AVX-512 build) -> 5.3 us.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::Shape;
    use crate::softmax::exp_shifted_inplace;

    /// Query rows of a pass over the values: eight rows by two 16-wide column vectors, 16
    /// independent sums in registers.
    const ROWS: usize = 8;

    /// Lanes `n..16` masked off: the loads of a row's last, short 16-wide chunk.
    #[inline(always)]
    fn tail(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    /// [`super::cpu`]'s kernel: scores of every key against all rows (one 16-lane sum per
    /// (row, key), reduced once), softmax per row, then the values weighted `ROWS` rows at a
    /// time so that each value vector is loaded once for those rows.
    ///
    /// # Safety
    /// The CPU has AVX-512F; the slices have the lengths `s` gives them (as `check` ensures),
    /// `scores` `rows * keys`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn decode(
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
        let (dfull, drest) = (d / 16, d % 16);
        let dm = tail(drest);
        // SAFETY: every load reads inside q[r * d..(r + 1) * d] / k[j * d..(j + 1) * d]
        // (the short chunk masked) and every store inside scores, r < rows, j < keys.
        unsafe {
            // chunk c of row x at p, zeros past d
            let chunk = |x: *const f32, c: usize| {
                if c < dfull {
                    _mm512_loadu_ps(x.add(16 * c))
                } else {
                    _mm512_maskz_loadu_ps(dm, x.add(16 * c))
                }
            };
            let chunks = dfull + usize::from(drest > 0);
            let scale4 = _mm_set1_ps(scale);
            let mut j = 0;
            while j + 4 <= keys {
                let kj = k.as_ptr().add(j * d);
                for r in 0..rows {
                    let qr = q.as_ptr().add(r * d);
                    let mut acc = [_mm512_setzero_ps(); 4];
                    for c in 0..chunks {
                        let x = chunk(qr, c);
                        for (i, a) in acc.iter_mut().enumerate() {
                            *a = _mm512_fmadd_ps(x, chunk(kj.add(i * d), c), *a);
                        }
                    }
                    let add = match mask {
                        Some(m) => _mm_loadu_ps(m.as_ptr().add(r * keys + j)),
                        None => _mm_setzero_ps(),
                    };
                    let dots = _mm_fmadd_ps(sum4(acc), scale4, add);
                    _mm_storeu_ps(scores.as_mut_ptr().add(r * keys + j), dots);
                }
                j += 4;
            }
            for j in j..keys {
                let kj = k.as_ptr().add(j * d);
                for r in 0..rows {
                    let qr = q.as_ptr().add(r * d);
                    let mut acc = _mm512_setzero_ps();
                    for c in 0..chunks {
                        acc = _mm512_fmadd_ps(chunk(qr, c), chunk(kj, c), acc);
                    }
                    let add = mask.map_or(0.0, |m| m[r * keys + j]);
                    scores[r * keys + j] = _mm512_reduce_add_ps(acc) * scale + add;
                }
            }
        }
        for r in 0..rows {
            let row = &mut scores[r * keys..(r + 1) * keys];
            let inv = exp_shifted_inplace(row);
            // a NaN score makes inv NaN, and so every weight and the row's output
            for p in row.iter_mut() {
                *p *= inv;
            }
        }
        let mut r0 = 0;
        while r0 < rows {
            let n = ROWS.min(rows - r0);
            let mut c0 = 0;
            while c0 < dv {
                let w = (dv - c0).min(32);
                // SAFETY: rows r0..r0 + n < rows; columns c0..c0 + w <= dv, masked loads
                // and stores past them.
                unsafe {
                    weighted(
                        &scores[r0 * keys..],
                        keys,
                        v,
                        dv,
                        c0,
                        w,
                        n,
                        &mut out[r0 * dv..],
                    )
                };
                c0 += w;
            }
            r0 += n;
        }
    }

    /// The lane sums of four vectors, in one vector: pairs of vectors interleaved and added
    /// twice, then the four 128-bit quarters added (13 operations for four sums, against 8
    /// for each alone).
    #[inline(always)]
    unsafe fn sum4(a: [__m512; 4]) -> __m128 {
        // SAFETY: register-only AVX-512F ops (the caller runs with them).
        unsafe {
            // per 128-bit quarter: [a0 + a2, b0 + b2, a1 + a3, b1 + b3] of vectors a, b
            let x = _mm512_add_ps(
                _mm512_unpacklo_ps(a[0], a[1]),
                _mm512_unpackhi_ps(a[0], a[1]),
            );
            let y = _mm512_add_ps(
                _mm512_unpacklo_ps(a[2], a[3]),
                _mm512_unpackhi_ps(a[2], a[3]),
            );
            // per quarter: one partial sum of each of the four vectors, in order
            let z = _mm512_add_ps(
                _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(x), _mm512_castps_pd(y))),
                _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(x), _mm512_castps_pd(y))),
            );
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(z)));
            let h = _mm256_add_ps(_mm512_castps512_ps256(z), hi);
            _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h))
        }
    }

    /// `out[r][c0..c0 + w] = sum_j p[r][j] v[j][c0..c0 + w]` for rows `0..n` (`n <= ROWS`,
    /// `w <= 32`): two column vectors for every row, one broadcast weight per (row, key).
    ///
    /// # Safety
    /// AVX-512F; `p` holds `n` rows of `keys` weights, `v` `keys` rows of `dv`, `out` `n`
    /// rows of `dv`; `c0 + w <= dv`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn weighted(
        p: &[f32],
        keys: usize,
        v: &[f32],
        dv: usize,
        c0: usize,
        w: usize,
        n: usize,
        out: &mut [f32],
    ) {
        let (m0, m1) = (tail(w.min(16)), tail(w.saturating_sub(16)));
        // SAFETY: as this function's contract; the masks keep loads and stores inside the
        // rows' columns c0..c0 + w.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
            for j in 0..keys {
                let vj = v.as_ptr().add(j * dv + c0);
                let v0 = _mm512_maskz_loadu_ps(m0, vj);
                let v1 = _mm512_maskz_loadu_ps(m1, vj.add(16));
                for (r, a) in acc.iter_mut().enumerate().take(n) {
                    let pw = _mm512_set1_ps(*p.get_unchecked(r * keys + j));
                    a[0] = _mm512_fmadd_ps(pw, v0, a[0]);
                    a[1] = _mm512_fmadd_ps(pw, v1, a[1]);
                }
            }
            for (r, a) in acc.iter().enumerate().take(n) {
                let o = out.as_mut_ptr().add(r * dv + c0);
                _mm512_mask_storeu_ps(o, m0, a[0]);
                _mm512_mask_storeu_ps(o.add(16), m1, a[1]);
            }
        }
    }
}
