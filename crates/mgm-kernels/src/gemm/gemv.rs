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
        simd_call!(
            simd,
            band_generic,
            band_avx2,
            band_avx512(x, w, j0, j1, &mut dots[..m * nb])
        );
        // SAFETY: the output block rows 0..m, columns j0..j1 is this task's alone (bands are
        // disjoint) and inside the output (`check` matched it with the MatMut).
        unsafe {
            for i in 0..m {
                let row = std::slice::from_raw_parts_mut(out.get().add(i * ldc + j0), nb);
                let d = &dots[i * nb..(i + 1) * nb];
                if epi.accumulate {
                    row.iter_mut().zip(d).for_each(|(o, &v)| *o += v);
                } else {
                    row.copy_from_slice(d);
                }
            }
            finish_tile(out.get().add(j0), ldc, 0, j0, m, nb, epi);
        }
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
