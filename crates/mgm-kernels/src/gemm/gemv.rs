//! `C = epilogue(X W^T)` for a few rows of `X` against a weight in PyTorch's `[out, in]` layout,
//! read in place: the decode step of a language model, which is bound by reading `W` once.
//!
//! Each task takes a band of `W`'s rows and computes their dot products with every row of `X`
//! (four weight rows at a time, so each load of `X` feeds four accumulator chains), so `W` is
//! streamed exactly once whatever the number of rows of `X`.

use rayon::prelude::*;

use super::{Epilogue, MatMut, MatRef, SharedPtr, check, finish_tile, param};
use crate::error::Result;
use crate::simd::{simd_call, simd_level, simd_variants};

/// Most rows of `X` per call.
pub const GEMV_ROWS: usize = 8;
/// Weight rows per rayon task (16 KB-256 KB of weights for `in` 64-1024).
const BAND: usize = 64;

/// `C = epilogue(X W^T)`: `x` `[m, k]` with unit column stride, `w` `[n, k]` with unit column
/// stride (each output's weights contiguous), `m <= GEMV_ROWS`; in parallel over bands of `w`.
pub fn gemv(x: MatRef<'_>, w: MatRef<'_>, c: MatMut<'_>, epi: &Epilogue<'_>) -> Result<()> {
    let (m, k, n) = (x.rows, x.cols, w.rows);
    check(m, k, w.cols, n, &c, epi)?;
    if m > GEMV_ROWS {
        return Err(param(format!(
            "gemv takes at most {GEMV_ROWS} rows of X, got {m} (use the packed GEMM)"
        )));
    }
    if k > 1 && (x.cs != 1 || w.cs != 1) {
        return Err(param(
            "gemv needs rows of X and of W with unit column stride".into(),
        ));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let ldc = c.rs;
    let out = SharedPtr(c.ptr);
    let simd = simd_level();
    let band = |j0: usize| {
        let j1 = (j0 + BAND).min(n);
        let nb = j1 - j0;
        let mut dots = [0f32; GEMV_ROWS * BAND];
        #[cfg(target_arch = "x86_64")]
        if simd == crate::simd::Simd::Avx512 {
            // SAFETY: AVX-512F is available (simd_level); rows of x and w have unit column
            // stride (checked above) or a single element.
            unsafe { tiles::gemv_band(x, w, j0, j1, &mut dots[..m * nb]) };
        } else {
            simd_call!(
                simd,
                band_generic,
                band_avx2,
                band_avx512(x, w, j0, j1, &mut dots[..m * nb])
            );
        }
        #[cfg(not(target_arch = "x86_64"))]
        band_generic(x, w, j0, j1, &mut dots[..m * nb]);
        // SAFETY: the output block rows 0..m, columns j0..j1 is this task's alone (bands are
        // disjoint) and inside the output (`check` matched it with the MatMut).
        unsafe { store_band(out.get(), ldc, j0, nb, &dots[..m * nb], epi) };
    };
    if n * k * m >= 1 << 16 {
        (0..n)
            .step_by(BAND)
            .collect::<Vec<_>>()
            .into_par_iter()
            .for_each(band);
    } else {
        (0..n).step_by(BAND).for_each(band);
    }
    Ok(())
}

/// Writes (or with `epi.accumulate` adds) `dots` (`m x nb`, row-major) to output columns
/// `j0..j0 + nb` of every row and applies the rest of the epilogue there.
///
/// # Safety
/// `out` with row stride `ldc` has those `m = dots.len() / nb` rows and columns, and no other
/// thread touches them.
pub(super) unsafe fn store_band(
    out: *mut f32,
    ldc: usize,
    j0: usize,
    nb: usize,
    dots: &[f32],
    epi: &Epilogue<'_>,
) {
    let m = dots.len() / nb.max(1);
    // SAFETY: the function's contract.
    unsafe {
        for (i, d) in dots.chunks_exact(nb.max(1)).enumerate() {
            let row = std::slice::from_raw_parts_mut(out.add(i * ldc + j0), nb);
            if epi.accumulate {
                row.iter_mut().zip(d).for_each(|(o, &v)| *o += v);
            } else {
                row.copy_from_slice(d);
            }
        }
        finish_tile(out.add(j0), ldc, 0, j0, m, nb, epi);
    }
}

/// Dot products of every row of `x` with rows `j0..j1` of `w`, into `dots[i * (j1 - j0) + j]`.
#[inline(always)]
fn band_generic(x: MatRef<'_>, w: MatRef<'_>, j0: usize, j1: usize, dots: &mut [f32]) {
    let nb = j1 - j0;
    const L: usize = 16;
    let (m, k) = (x.rows, x.cols);
    let xrow = |i: usize| &x.data[i * x.rs..i * x.rs + k];
    let wrow = |j: usize| &w.data[j * w.rs..j * w.rs + k];
    let mut j = j0;
    while j < j1 {
        let r = (j1 - j).min(4);
        for i in 0..m {
            let xi = xrow(i);
            let mut acc = [[0f32; L]; 4];
            let rows: [&[f32]; 4] = std::array::from_fn(|q| wrow(j + q.min(r - 1)));
            let full = k / L * L;
            for c0 in (0..full).step_by(L) {
                let xv: &[f32; L] = xi[c0..c0 + L].try_into().expect("L wide");
                for (q, a) in acc.iter_mut().enumerate().take(r) {
                    let wv: &[f32; L] = rows[q][c0..c0 + L].try_into().expect("L wide");
                    for l in 0..L {
                        a[l] += xv[l] * wv[l];
                    }
                }
            }
            for (q, a) in acc.iter().enumerate().take(r) {
                let mut s: f32 = a.iter().sum();
                for c in full..k {
                    s += xi[c] * rows[q][c];
                }
                dots[i * nb + j - j0 + q] = s;
            }
        }
        j += r;
    }
}

simd_variants!(band_generic => band_avx2, band_avx512(
    x: MatRef<'_>, w: MatRef<'_>, j0: usize, j1: usize, dots: &mut [f32]
));

/// Weight rows per rayon task of [`gemm_nt`] (kept in L2 while every row of `X` passes).
const NT_BAND: usize = 32;

/// `C = epilogue(X W^T)` for any number of rows of `X`, `w` `[n, k]` as stored (e.g.
/// memory-mapped, never copied whole): [`gemv`] up to [`GEMV_ROWS`] rows; on AVX-512, up to
/// [`super::PACK_ROWS`] rows, tiles of 4 rows of `X` by 4 of `W` accumulate 16 dot products in
/// registers over `k`, both operands read in place; from there on (a prefill, compute-bound)
/// each task packs 64 rows of `W` at a time for the 12 x 32 FMA microkernel (2x the tiles'
/// speed at 128 rows); elsewhere the packed GEMM.
pub fn gemm_nt(x: MatRef<'_>, w: MatRef<'_>, c: MatMut<'_>, epi: &Epilogue<'_>) -> Result<()> {
    let (m, k, n) = (x.rows, x.cols, w.rows);
    check(m, k, w.cols, n, &c, epi)?;
    if m <= GEMV_ROWS {
        return gemv(x, w, c, epi);
    }
    #[cfg(target_arch = "x86_64")]
    if simd_level() == crate::simd::Simd::Avx512
        && x.cs == 1
        && w.cs == 1
        && k > 0
        && m >= super::PACK_ROWS
    {
        super::nt_packed(x, w, c, epi);
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if simd_level() == crate::simd::Simd::Avx512 && x.cs == 1 && w.cs == 1 && k > 0 {
        let ldc = c.rs;
        let out = SharedPtr(c.ptr);
        let band = |j0: usize| {
            let j1 = (j0 + NT_BAND).min(n);
            let nb = j1 - j0;
            let mut dots = vec![0f32; m * nb];
            // SAFETY: AVX-512F is available (simd_level); rows of x and w have unit stride
            // and k elements.
            unsafe { tiles::band(x, w, j0, j1, &mut dots) };
            // SAFETY: as in gemv: the block rows 0..m, columns j0..j1 is this task's alone.
            unsafe { store_band(out.get(), ldc, j0, nb, &dots, epi) };
        };
        (0..n)
            .step_by(NT_BAND)
            .collect::<Vec<_>>()
            .into_par_iter()
            .for_each(band);
        return Ok(());
    }
    super::cpu(x, w.t(), c, epi)
}

#[cfg(target_arch = "x86_64")]
mod tiles {
    use std::arch::x86_64::*;

    use super::MatRef;

    const RM: usize = 4;
    const RN: usize = 4;
    /// Elements of `k` per pass.
    const KC: usize = 512;

    /// Dot products of every row of `x` with rows `j0..j1` of `w`, into
    /// `dots[i * (j1 - j0) + j - j0]`.
    ///
    /// # Safety
    /// AVX-512F is available; `x` and `w` have unit column stride.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn band(
        x: MatRef<'_>,
        w: MatRef<'_>,
        j0: usize,
        j1: usize,
        dots: &mut [f32],
    ) {
        let (m, k, nb) = (x.rows, x.cols, j1 - j0);
        // k in chunks, so that a tile's 6 rows of X stay in L1 while the band's rows of W
        // pass (L2); partial sums add up in `dots`
        let mut k0 = 0;
        while k0 < k {
            let kc = (k - k0).min(KC);
            let mut i = 0;
            while i < m {
                let rm = (m - i).min(RM);
                // missing rows repeat the last real one; their sums are dropped
                let xp: [*const f32; RM] =
                    std::array::from_fn(|q| x.data[(i + q.min(rm - 1)) * x.rs + k0..].as_ptr());
                let mut j = j0;
                while j < j1 {
                    let rn = (j1 - j).min(RN);
                    let wp: [*const f32; RN] =
                        std::array::from_fn(|q| w.data[(j + q.min(rn - 1)) * w.rs + k0..].as_ptr());
                    // SAFETY: every pointer starts kc readable elements of its row.
                    let s = unsafe { micro(&xp, &wp, kc) };
                    for (a, row) in s.iter().enumerate().take(rm) {
                        for (b, &v) in row.iter().enumerate().take(rn) {
                            dots[(i + a) * nb + j - j0 + b] += v;
                        }
                    }
                    j += rn;
                }
                i += rm;
            }
            k0 += kc;
        }
    }

    /// [`super::gemv`]'s band on AVX-512, `dots[i * (j1 - j0) + j - j0]`: one row of `x`
    /// against each row of `w` in turn; several rows of `x` each against four rows of `w` at
    /// a time. Explicit FMA chains read the weights at the
    /// memory's pace (67 GB/s on a 2-core Zen 5, against 34 GB/s for the autovectorized
    /// generic band, whose accumulators did not stay in registers).
    ///
    /// # Safety
    /// AVX-512F is available; `x` and `w` have unit column stride (or `k <= 1`).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gemv_band(
        x: MatRef<'_>,
        w: MatRef<'_>,
        j0: usize,
        j1: usize,
        dots: &mut [f32],
    ) {
        let (m, k, nb) = (x.rows, x.cols, j1 - j0);
        if m == 1 {
            // one weight row at a time, one sequential stream per core: four rows at once read
            // DRAM slower here (f32 decode 7.5 against 8.9 tok/s, mean of 5 A/B pairs at
            // TinyLlama shapes; q4's kernel showed the same), while for several rows of `x` the
            // four rows' loads feed them all
            for j in j0..j1 {
                // SAFETY: row j of w and row 0 of x hold k readable elements.
                dots[j - j0] = unsafe { dot1(x.data.as_ptr(), w.data[j * w.rs..].as_ptr(), k) };
            }
            return;
        }
        let mut j = j0;
        while j < j1 {
            let rn = (j1 - j).min(RN);
            // missing rows repeat the last real one; their sums are dropped
            let wp: [*const f32; RN] =
                std::array::from_fn(|q| w.data[(j + q.min(rn - 1)) * w.rs..].as_ptr());
            for i in 0..m {
                // SAFETY: every pointer starts k readable elements of its row.
                let s = unsafe { micro1(x.data[i * x.rs..].as_ptr(), &wp, k) };
                dots[i * nb + j - j0..][..rn].copy_from_slice(&s[..rn]);
            }
            j += rn;
        }
    }

    /// The dot product of `xp` and `wp` (`k` elements each), four accumulator chains.
    #[target_feature(enable = "avx512f")]
    unsafe fn dot1(xp: *const f32, wp: *const f32, k: usize) -> f32 {
        // SAFETY: loads at offsets < k (the tail masked).
        unsafe {
            let mut c = [_mm512_setzero_ps(); 4];
            let full = k / 64 * 64;
            let mut t = 0;
            while t < full {
                for (u, cu) in c.iter_mut().enumerate() {
                    let o = t + 16 * u;
                    *cu = _mm512_fmadd_ps(
                        _mm512_loadu_ps(xp.add(o)),
                        _mm512_loadu_ps(wp.add(o)),
                        *cu,
                    );
                }
                t += 64;
            }
            while t < k {
                let left = (k - t).min(16);
                let mk: __mmask16 = if left == 16 {
                    0xFFFF
                } else {
                    (1u16 << left) - 1
                };
                c[0] = _mm512_fmadd_ps(
                    _mm512_maskz_loadu_ps(mk, xp.add(t)),
                    _mm512_maskz_loadu_ps(mk, wp.add(t)),
                    c[0],
                );
                t += 16;
            }
            _mm512_reduce_add_ps(_mm512_add_ps(
                _mm512_add_ps(c[0], c[1]),
                _mm512_add_ps(c[2], c[3]),
            ))
        }
    }

    /// The dot products of row `xp` with the four rows `wp` (`k` elements each).
    #[target_feature(enable = "avx512f")]
    unsafe fn micro1(xp: *const f32, wp: &[*const f32; RN], k: usize) -> [f32; RN] {
        // SAFETY: loads at offsets < k (the tail masked) of rows with k elements.
        unsafe {
            let mut c0 = _mm512_setzero_ps();
            let mut c1 = _mm512_setzero_ps();
            let mut c2 = _mm512_setzero_ps();
            let mut c3 = _mm512_setzero_ps();
            let full = k / 16 * 16;
            let mut t = 0;
            while t < full {
                let xv = _mm512_loadu_ps(xp.add(t));
                c0 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(wp[0].add(t)), c0);
                c1 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(wp[1].add(t)), c1);
                c2 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(wp[2].add(t)), c2);
                c3 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(wp[3].add(t)), c3);
                t += 16;
            }
            if full < k {
                let mk: __mmask16 = (1u16 << (k - full)) - 1;
                let xv = _mm512_maskz_loadu_ps(mk, xp.add(full));
                c0 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(mk, wp[0].add(full)), c0);
                c1 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(mk, wp[1].add(full)), c1);
                c2 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(mk, wp[2].add(full)), c2);
                c3 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(mk, wp[3].add(full)), c3);
            }
            let r = |v: __m512| _mm512_reduce_add_ps(v);
            [r(c0), r(c1), r(c2), r(c3)]
        }
    }

    /// The 4 x 4 dot products of rows `xp` with rows `wp` (`k` elements each). The
    /// accumulators are named variables: as arrays LLVM spilled them to the stack.
    #[target_feature(enable = "avx512f")]
    unsafe fn micro(xp: &[*const f32; RM], wp: &[*const f32; RN], k: usize) -> [[f32; RN]; RM] {
        // SAFETY: loads at offsets < k (the tail masked) of rows with k elements.
        unsafe {
            let mut c00 = _mm512_setzero_ps();
            let mut c01 = _mm512_setzero_ps();
            let mut c02 = _mm512_setzero_ps();
            let mut c03 = _mm512_setzero_ps();
            let mut c10 = _mm512_setzero_ps();
            let mut c11 = _mm512_setzero_ps();
            let mut c12 = _mm512_setzero_ps();
            let mut c13 = _mm512_setzero_ps();
            let mut c20 = _mm512_setzero_ps();
            let mut c21 = _mm512_setzero_ps();
            let mut c22 = _mm512_setzero_ps();
            let mut c23 = _mm512_setzero_ps();
            let mut c30 = _mm512_setzero_ps();
            let mut c31 = _mm512_setzero_ps();
            let mut c32 = _mm512_setzero_ps();
            let mut c33 = _mm512_setzero_ps();
            let full = k / 16 * 16;
            let mut t = 0;
            while t < full {
                let w0 = _mm512_loadu_ps(wp[0].add(t));
                let w1 = _mm512_loadu_ps(wp[1].add(t));
                let w2 = _mm512_loadu_ps(wp[2].add(t));
                let w3 = _mm512_loadu_ps(wp[3].add(t));
                let x0 = _mm512_loadu_ps(xp[0].add(t));
                c00 = _mm512_fmadd_ps(x0, w0, c00);
                c01 = _mm512_fmadd_ps(x0, w1, c01);
                c02 = _mm512_fmadd_ps(x0, w2, c02);
                c03 = _mm512_fmadd_ps(x0, w3, c03);
                let x1 = _mm512_loadu_ps(xp[1].add(t));
                c10 = _mm512_fmadd_ps(x1, w0, c10);
                c11 = _mm512_fmadd_ps(x1, w1, c11);
                c12 = _mm512_fmadd_ps(x1, w2, c12);
                c13 = _mm512_fmadd_ps(x1, w3, c13);
                let x2 = _mm512_loadu_ps(xp[2].add(t));
                c20 = _mm512_fmadd_ps(x2, w0, c20);
                c21 = _mm512_fmadd_ps(x2, w1, c21);
                c22 = _mm512_fmadd_ps(x2, w2, c22);
                c23 = _mm512_fmadd_ps(x2, w3, c23);
                let x3 = _mm512_loadu_ps(xp[3].add(t));
                c30 = _mm512_fmadd_ps(x3, w0, c30);
                c31 = _mm512_fmadd_ps(x3, w1, c31);
                c32 = _mm512_fmadd_ps(x3, w2, c32);
                c33 = _mm512_fmadd_ps(x3, w3, c33);
                t += 16;
            }
            if full < k {
                let mk: __mmask16 = (1u16 << (k - full)) - 1;
                let t = full;
                let w0 = _mm512_maskz_loadu_ps(mk, wp[0].add(t));
                let w1 = _mm512_maskz_loadu_ps(mk, wp[1].add(t));
                let w2 = _mm512_maskz_loadu_ps(mk, wp[2].add(t));
                let w3 = _mm512_maskz_loadu_ps(mk, wp[3].add(t));
                let x0 = _mm512_maskz_loadu_ps(mk, xp[0].add(t));
                c00 = _mm512_fmadd_ps(x0, w0, c00);
                c01 = _mm512_fmadd_ps(x0, w1, c01);
                c02 = _mm512_fmadd_ps(x0, w2, c02);
                c03 = _mm512_fmadd_ps(x0, w3, c03);
                let x1 = _mm512_maskz_loadu_ps(mk, xp[1].add(t));
                c10 = _mm512_fmadd_ps(x1, w0, c10);
                c11 = _mm512_fmadd_ps(x1, w1, c11);
                c12 = _mm512_fmadd_ps(x1, w2, c12);
                c13 = _mm512_fmadd_ps(x1, w3, c13);
                let x2 = _mm512_maskz_loadu_ps(mk, xp[2].add(t));
                c20 = _mm512_fmadd_ps(x2, w0, c20);
                c21 = _mm512_fmadd_ps(x2, w1, c21);
                c22 = _mm512_fmadd_ps(x2, w2, c22);
                c23 = _mm512_fmadd_ps(x2, w3, c23);
                let x3 = _mm512_maskz_loadu_ps(mk, xp[3].add(t));
                c30 = _mm512_fmadd_ps(x3, w0, c30);
                c31 = _mm512_fmadd_ps(x3, w1, c31);
                c32 = _mm512_fmadd_ps(x3, w2, c32);
                c33 = _mm512_fmadd_ps(x3, w3, c33);
            }
            let r = |v: __m512| _mm512_reduce_add_ps(v);
            [
                [r(c00), r(c01), r(c02), r(c03)],
                [r(c10), r(c11), r(c12), r(c13)],
                [r(c20), r(c21), r(c22), r(c23)],
                [r(c30), r(c31), r(c32), r(c33)],
            ]
        }
    }
}
