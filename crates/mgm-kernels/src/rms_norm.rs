//! RMSNorm over each row of a row-major `[rows, cols]` f32 matrix:
//! `y[r, j] = x[r, j] / sqrt(mean_k x[r, k]^2 + eps) * s[j]` with `s = w` (LLaMA,
//! [`Variant::Llama`]) or `s = 1 + w` (Gemma, [`Variant::Gemma`]; `1 + w` rounded to f32 as
//! PyTorch's Gemma computes it). PTX: `kernels/rms_norm.ptx`, one block per row, the variant
//! passed as a flag.

use rayon::prelude::*;

use crate::error::{Error, Result, check_len};
use crate::launch::{KernelArg, KernelLaunch, LaunchDims};
use crate::simd::{LANES, simd_call, simd_level, simd_variants};

const KERNEL: &str = "rms_norm";

/// How the weight scales the normalised row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Variant {
    /// `* w` (LLaMA, Mistral, Mixtral, Yi).
    #[default]
    Llama,
    /// `* (1 + w)` (Gemma stores the weight as an offset from 1).
    Gemma,
}

/// Checks the shape against the slice lengths.
fn check(x: usize, w: usize, y: usize, rows: usize, cols: usize, eps: f32) -> Result<()> {
    let shape = || format!("rows={rows}, cols={cols}");
    let n = rows.checked_mul(cols).ok_or_else(|| Error::Param {
        kernel: KERNEL,
        msg: format!("rows * cols overflows ({})", shape()),
    })?;
    check_len(KERNEL, "x", x, n, shape)?;
    check_len(KERNEL, "w", w, cols, shape)?;
    check_len(KERNEL, "y", y, n, shape)?;
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(Error::Param {
            kernel: KERNEL,
            msg: format!("eps = {eps} must be finite and >= 0"),
        });
    }
    Ok(())
}

/// The f64 reference on f64 data: plain loops, the version to check by eye.
pub fn reference_f64(
    x: &[f64],
    w: &[f64],
    rows: usize,
    cols: usize,
    eps: f32,
    variant: Variant,
) -> Result<Vec<f64>> {
    check(x.len(), w.len(), x.len(), rows, cols, eps)?;
    let mut y = vec![0.0; rows * cols];
    for r in 0..rows {
        let mut ss = 0.0;
        for j in 0..cols {
            ss += x[r * cols + j] * x[r * cols + j];
        }
        let inv = 1.0 / (ss / cols as f64 + f64::from(eps)).sqrt();
        for j in 0..cols {
            let s = match variant {
                Variant::Llama => w[j],
                Variant::Gemma => 1.0 + w[j],
            };
            y[r * cols + j] = x[r * cols + j] * inv * s;
        }
    }
    Ok(y)
}

/// The reference with f32 in and out: [`reference_f64`] rounded once.
pub fn reference(
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    rows: usize,
    cols: usize,
    eps: f32,
    variant: Variant,
) -> Result<()> {
    check(x.len(), w.len(), y.len(), rows, cols, eps)?;
    let wide = |s: &[f32]| s.iter().map(|&v| f64::from(v)).collect::<Vec<f64>>();
    let y64 = reference_f64(&wide(x), &wide(w), rows, cols, eps, variant)?;
    for (o, v) in y.iter_mut().zip(y64) {
        *o = v as f32;
    }
    Ok(())
}

/// The fast CPU path: rows in parallel chunks, 16-lane sum of squares, one scaling pass.
pub fn cpu(
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    rows: usize,
    cols: usize,
    eps: f32,
    variant: Variant,
) -> Result<()> {
    check(x.len(), w.len(), y.len(), rows, cols, eps)?;
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    // Gemma's 1 + w once per call, not once per row.
    let scale: std::borrow::Cow<'_, [f32]> = match variant {
        Variant::Llama => w.into(),
        Variant::Gemma => w.iter().map(|&v| 1.0 + v).collect::<Vec<f32>>().into(),
    };
    let rows_per_task = (16 * 1024 / cols).max(1);
    let simd = simd_level();
    y.par_chunks_mut(rows_per_task * cols)
        .zip(x.par_chunks(rows_per_task * cols))
        .for_each(|(yc, xc)| {
            simd_call!(
                simd,
                rows_generic,
                rows_avx2,
                rows_avx512(xc, &scale, yc, eps)
            );
        });
    Ok(())
}

/// RMSNorm of every row of `x` (a whole number of `s.len()`-wide rows) into `y`.
#[inline(always)]
fn rows_generic(x: &[f32], s: &[f32], y: &mut [f32], eps: f32) {
    let cols = s.len();
    for (xr, yr) in x.chunks_exact(cols).zip(y.chunks_exact_mut(cols)) {
        let mut acc = [0f32; LANES];
        let mut it = xr.chunks_exact(LANES);
        for c in &mut it {
            for k in 0..LANES {
                acc[k] += c[k] * c[k];
            }
        }
        let mut ss: f32 = acc.iter().sum();
        for &v in it.remainder() {
            ss += v * v;
        }
        let inv = 1.0 / (ss / cols as f32 + eps).sqrt();
        for ((o, &v), &sj) in yr.iter_mut().zip(xr).zip(s) {
            *o = v * inv * sj;
        }
    }
}

simd_variants!(rows_generic => rows_avx2, rows_avx512(x: &[f32], s: &[f32], y: &mut [f32], eps: f32));

/// Threads per block for a row of `cols`: about 4 columns per thread, 32 to 256 threads.
pub(crate) fn block_threads(cols: u32) -> u32 {
    cols.div_ceil(4).next_multiple_of(32).clamp(32, 256)
}

/// Converts the shape for a one-block-per-row PTX kernel (u32 indexing, cols below
/// `u32::MAX - 1024` so the strided loop counters cannot wrap).
pub(crate) fn ptx_shape(kernel: &'static str, rows: usize, cols: usize) -> Result<(u32, u32)> {
    let too_big = |what: &str, v: usize| Error::Param {
        kernel,
        msg: format!("{what} = {v} does not fit the PTX kernel's u32 indexing"),
    };
    let rows32 = u32::try_from(rows)
        .ok()
        .filter(|&r| r <= i32::MAX as u32)
        .ok_or_else(|| too_big("rows", rows))?;
    let cols32 = u32::try_from(cols)
        .ok()
        .filter(|&c| c <= u32::MAX - 1024)
        .ok_or_else(|| too_big("cols", cols))?;
    Ok((rows32, cols32))
}

/// The PTX launch of `mgm_rms_norm_fwd_f32`: one block per row.
pub fn launch<'a>(
    x: &'a [f32],
    w: &'a [f32],
    y: &'a mut [f32],
    rows: usize,
    cols: usize,
    eps: f32,
    variant: Variant,
) -> Result<KernelLaunch<'a>> {
    check(x.len(), w.len(), y.len(), rows, cols, eps)?;
    let (rows32, cols32) = ptx_shape(KERNEL, rows, cols)?;
    Ok(KernelLaunch {
        family: KERNEL,
        entry: "mgm_rms_norm_fwd_f32",
        dims: LaunchDims {
            // At least one block, so an empty problem is still a valid launch (it exits at once).
            grid: [rows32.max(1), 1, 1],
            block: [block_threads(cols32), 1, 1],
            shared_bytes: 0,
        },
        args: vec![
            KernelArg::input(x),
            KernelArg::input(w),
            KernelArg::output(y),
            KernelArg::U32(rows32),
            KernelArg::U32(cols32),
            KernelArg::F32(eps),
            KernelArg::U32(u32::from(variant == Variant::Gemma)),
        ],
    })
}

/// Runs the PTX kernel on the GPU.
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)] // the signature of `cpu` plus the device
pub fn cuda(
    gpu: &crate::cuda::Gpu,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    rows: usize,
    cols: usize,
    eps: f32,
    variant: Variant,
) -> Result<()> {
    gpu.run(launch(x, w, y, rows, cols, eps, variant)?)
}
