//! Row softmax over a row-major `[rows, cols]` f32 matrix:
//! `y[r, j] = exp(x[r, j] - m_r) / sum_k exp(x[r, k] - m_r)` with `m_r = max_k x[r, k]`.
//!
//! A row of all `-inf` (fully masked) gives zeros, never NaN; a NaN or `+inf` in a row makes
//! the whole row NaN, as in PyTorch. PTX: `kernels/softmax.ptx`, one warp per row.

use rayon::prelude::*;

use crate::error::{Error, Result, check_len};
use crate::launch::{KernelArg, KernelLaunch, LaunchDims};
use crate::simd::{LANES, exp_f32, simd_call, simd_level, simd_variants};

const KERNEL: &str = "softmax";
/// Warps (rows) per block of the PTX launch.
const WARPS_PER_BLOCK: u32 = 4;

/// Checks the shape against the slice lengths; returns `rows * cols`.
fn check(x: usize, y: usize, rows: usize, cols: usize) -> Result<usize> {
    let shape = || format!("rows={rows}, cols={cols}");
    let n = rows.checked_mul(cols).ok_or_else(|| Error::Param {
        kernel: KERNEL,
        msg: format!("rows * cols overflows ({})", shape()),
    })?;
    check_len(KERNEL, "x", x, n, shape)?;
    check_len(KERNEL, "y", y, n, shape)?;
    Ok(n)
}

/// The f64 reference on f64 data: plain loops, the version to check by eye.
pub fn reference_f64(x: &[f64], rows: usize, cols: usize) -> Result<Vec<f64>> {
    let n = check(x.len(), x.len(), rows, cols)?;
    let mut y = vec![0.0; n];
    for r in 0..rows {
        let xr = &x[r * cols..(r + 1) * cols];
        let yr = &mut y[r * cols..(r + 1) * cols];
        if xr.iter().any(|v| v.is_nan()) {
            yr.fill(f64::NAN);
            continue;
        }
        let m = xr.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        if m == f64::NEG_INFINITY {
            continue; // fully masked row: zeros
        }
        let mut sum = 0.0;
        for j in 0..cols {
            yr[j] = (xr[j] - m).exp(); // m = +inf gives NaN here, hence a NaN row
            sum += yr[j];
        }
        for v in yr.iter_mut() {
            *v /= sum;
        }
    }
    Ok(y)
}

/// The reference with f32 in and out: [`reference_f64`] rounded once.
pub fn reference(x: &[f32], y: &mut [f32], rows: usize, cols: usize) -> Result<()> {
    check(x.len(), y.len(), rows, cols)?;
    let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let y64 = reference_f64(&x64, rows, cols)?;
    for (o, v) in y.iter_mut().zip(y64) {
        *o = v as f32;
    }
    Ok(())
}

/// The fast CPU path: rows in parallel chunks, 16-lane loops, a polynomial `exp`.
pub fn cpu(x: &[f32], y: &mut [f32], rows: usize, cols: usize) -> Result<()> {
    check(x.len(), y.len(), rows, cols)?;
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let rows_per_task = (16 * 1024 / cols).max(1);
    let simd = simd_level();
    y.par_chunks_mut(rows_per_task * cols)
        .zip(x.par_chunks(rows_per_task * cols))
        .for_each(|(yc, xc)| {
            simd_call!(simd, rows_generic, rows_avx2, rows_avx512(xc, yc, cols));
        });
    Ok(())
}

/// Softmax of every row of `x` (a whole number of rows) into `y`.
#[inline(always)]
fn rows_generic(x: &[f32], y: &mut [f32], cols: usize) {
    for (xr, yr) in x.chunks_exact(cols).zip(y.chunks_exact_mut(cols)) {
        softmax_row(xr, yr);
    }
}

simd_variants!(rows_generic => rows_avx2, rows_avx512(x: &[f32], y: &mut [f32], cols: usize));

#[inline(always)]
fn softmax_row(x: &[f32], y: &mut [f32]) {
    y.copy_from_slice(x);
    let inv = exp_shifted_inplace(y);
    for v in y.iter_mut() {
        *v *= inv;
    }
}

/// The unnormalised half of a row softmax, in place: `row[j] = exp(row[j] - max)`; returns
/// `1 / sum` (0 for a fully masked row, whose entries all become 0; NaN when the row holds a
/// NaN or `+inf`). The caller scales by it, or folds the scaling into its next pass.
#[inline(always)]
pub(crate) fn exp_shifted_inplace(row: &mut [f32]) -> f32 {
    // Max ignoring NaN; a NaN resurfaces through the sum (exp(NaN) = NaN).
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut it = row.chunks_exact(LANES);
    for c in &mut it {
        for k in 0..LANES {
            if c[k] > acc[k] {
                acc[k] = c[k];
            }
        }
    }
    let mut m = acc
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for &v in it.remainder() {
        if v > m {
            m = v;
        }
    }
    // Fully masked row: shift by 0 so every exp(-inf) is 0 instead of exp(NaN).
    if m == f32::NEG_INFINITY {
        m = 0.0;
    }
    let mut sums = [0f32; LANES];
    let mut ri = row.chunks_exact_mut(LANES);
    for c in &mut ri {
        for k in 0..LANES {
            let e = exp_f32(c[k] - m);
            c[k] = e;
            sums[k] += e;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for v in ri.into_remainder() {
        let e = exp_f32(*v - m);
        *v = e;
        sum += e;
    }
    // The sum is 0 only when every entry is -inf: zeros. A NaN sum keeps 1 / NaN = NaN.
    if sum == 0.0 { 0.0 } else { 1.0 / sum }
}

/// The PTX launch of `mgm_softmax_fwd_f32`: one warp per row, 4 rows per block.
pub fn launch<'a>(
    x: &'a [f32],
    y: &'a mut [f32],
    rows: usize,
    cols: usize,
) -> Result<KernelLaunch<'a>> {
    check(x.len(), y.len(), rows, cols)?;
    let too_big = |what: &str, v: usize| Error::Param {
        kernel: KERNEL,
        msg: format!("{what} = {v} does not fit the PTX kernel's u32 indexing"),
    };
    let rows32 = u32::try_from(rows).map_err(|_| too_big("rows", rows))?;
    let cols32 = u32::try_from(cols)
        .ok()
        .filter(|&c| c <= u32::MAX - 32)
        .ok_or_else(|| too_big("cols", cols))?;
    // At least one block, so an empty problem is still a valid launch (its warps exit at once).
    let blocks = rows32.div_ceil(WARPS_PER_BLOCK).max(1);
    Ok(KernelLaunch {
        family: KERNEL,
        entry: "mgm_softmax_fwd_f32",
        dims: LaunchDims {
            grid: [blocks, 1, 1],
            block: [32 * WARPS_PER_BLOCK, 1, 1],
            shared_bytes: 0,
        },
        args: vec![
            KernelArg::input(x),
            KernelArg::output(y),
            KernelArg::U32(rows32),
            KernelArg::U32(cols32),
        ],
    })
}

/// Runs the PTX kernel on the GPU.
#[cfg(feature = "cuda")]
pub fn cuda(
    gpu: &crate::cuda::Gpu,
    x: &[f32],
    y: &mut [f32],
    rows: usize,
    cols: usize,
) -> Result<()> {
    gpu.run(launch(x, y, rows, cols)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_matches_std_exp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let e = f64::from(x).exp();
            let rel = ((f64::from(exp_f32(x)) - e) / e).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 8e-6, "exp_f32 relative error {worst:e}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(-200.0), 0.0);
    }
}
