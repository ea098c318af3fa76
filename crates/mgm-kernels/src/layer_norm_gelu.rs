//! Fused LayerNorm + GELU over each row of a row-major `[rows, cols]` matrix, and its backward.
//!
//! Forward, per row (N = cols): `mean = sum x / N`, `var = sum (x - mean)^2 / N` (biased),
//! `rstd = 1 / sqrt(var + eps)`, `h = (x - mean) * rstd * gamma + beta`, `y = gelu(h)` with
//! [`Gelu::Erf`] `0.5 h (1 + erf(h / sqrt 2))` or [`Gelu::Tanh`]
//! `0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3)))`; `mean` and `rstd` are saved per row.
//!
//! Backward, per row, with `n = (x - mean) * rstd`: `dh = dy * gelu'(h)`, `dbeta = sum_rows dh`,
//! `dgamma = sum_rows dh * n`, `dn = dh * gamma`,
//! `dx = rstd * (dn - mean(dn) - n * mean(dn * n))`.
//!
//! f32 in and out, and a bf16-in/bf16-out forward (f32 gamma, beta, statistics and arithmetic).
//! PTX: `kernels/layer_norm_gelu.ptx`, one block per row; the backward sums `dgamma`/`dbeta`
//! with atomics, so [`launch_bwd`] zeroes them before building the launch.

use half::bf16;
use rayon::prelude::*;

use crate::activation::{
    SQRT_2_OVER_PI, TANH_CUBIC, cdf_and_gauss, erf_f64, gelu_erf_f32, gelu_tanh_f32,
};
use crate::error::{Error, Result, check_len};
use crate::launch::{KernelArg, KernelLaunch, LaunchDims};
use crate::rms_norm::{block_threads, ptx_shape};
use crate::simd::{LANES, exp_f32, simd_call, simd_level, simd_variants};

const KERNEL: &str = "layer_norm_gelu";

/// Which GELU follows the LayerNorm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Gelu {
    /// Exact GELU, `0.5 x (1 + erf(x / sqrt 2))` (PyTorch's default, CLIP's MLPs, MGM's projector).
    #[default]
    Erf,
    /// The tanh approximation (PyTorch `approximate="tanh"`, Gemma's MLP).
    Tanh,
}

/// Shape and scalars of one call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    /// Rows (tokens).
    pub rows: usize,
    /// Row width (normalised dimension).
    pub cols: usize,
    /// Added to the variance inside the square root (1e-5 in MGM).
    pub eps: f32,
    /// GELU form.
    pub gelu: Gelu,
}

/// Per-row statistics saved by the forward, read by the backward.
#[derive(Clone, Copy, Debug)]
pub struct Stats<'a> {
    /// Row means, `[rows]`.
    pub mean: &'a [f32],
    /// Row `1 / sqrt(var + eps)`, `[rows]`.
    pub rstd: &'a [f32],
}

/// Outputs of the backward; all are overwritten.
#[derive(Debug)]
pub struct Grads<'a> {
    /// Gradient of the input, `[rows, cols]`.
    pub dx: &'a mut [f32],
    /// Gradient of gamma, `[cols]`, summed over rows.
    pub dgamma: &'a mut [f32],
    /// Gradient of beta, `[cols]`, summed over rows.
    pub dbeta: &'a mut [f32],
}

/// Unrounded forward of [`reference_f64`].
#[derive(Clone, Debug)]
pub struct Forward64 {
    /// Output, `[rows, cols]`.
    pub y: Vec<f64>,
    /// Row means, `[rows]`.
    pub mean: Vec<f64>,
    /// Row `1 / sqrt(var + eps)`, `[rows]`.
    pub rstd: Vec<f64>,
}

/// Unrounded gradients of [`reference_bwd_f64`].
#[derive(Clone, Debug)]
pub struct Backward64 {
    /// `[rows, cols]`.
    pub dx: Vec<f64>,
    /// `[cols]`.
    pub dgamma: Vec<f64>,
    /// `[cols]`.
    pub dbeta: Vec<f64>,
}

fn shape(p: &Params) -> impl Fn() -> String + '_ {
    move || format!("rows={}, cols={}", p.rows, p.cols)
}

/// Checks `rows * cols`, gamma/beta lengths and eps; returns `rows * cols`.
fn check_common(x: usize, gamma: usize, beta: usize, p: &Params) -> Result<usize> {
    let n = p.rows.checked_mul(p.cols).ok_or_else(|| Error::Param {
        kernel: KERNEL,
        msg: format!("rows * cols overflows ({})", shape(p)()),
    })?;
    check_len(KERNEL, "x", x, n, shape(p))?;
    check_len(KERNEL, "gamma", gamma, p.cols, shape(p))?;
    check_len(KERNEL, "beta", beta, p.cols, shape(p))?;
    if !(p.eps >= 0.0 && p.eps.is_finite()) {
        return Err(Error::Param {
            kernel: KERNEL,
            msg: format!("eps = {} must be finite and >= 0", p.eps),
        });
    }
    Ok(n)
}

fn check_fwd(
    x: usize,
    gamma: usize,
    beta: usize,
    y: usize,
    mean: usize,
    rstd: usize,
    p: &Params,
) -> Result<()> {
    let n = check_common(x, gamma, beta, p)?;
    check_len(KERNEL, "y", y, n, shape(p))?;
    check_len(KERNEL, "mean", mean, p.rows, shape(p))?;
    check_len(KERNEL, "rstd", rstd, p.rows, shape(p))
}

#[allow(clippy::too_many_arguments)] // one length per slice of the backward
fn check_bwd(
    x: usize,
    gamma: usize,
    beta: usize,
    mean: usize,
    rstd: usize,
    dy: usize,
    grads: Option<&Grads<'_>>,
    p: &Params,
) -> Result<()> {
    let n = check_common(x, gamma, beta, p)?;
    check_len(KERNEL, "mean", mean, p.rows, shape(p))?;
    check_len(KERNEL, "rstd", rstd, p.rows, shape(p))?;
    check_len(KERNEL, "dy", dy, n, shape(p))?;
    if let Some(g) = grads {
        check_len(KERNEL, "dx", g.dx.len(), n, shape(p))?;
        check_len(KERNEL, "dgamma", g.dgamma.len(), p.cols, shape(p))?;
        check_len(KERNEL, "dbeta", g.dbeta.len(), p.cols, shape(p))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Reference: f64, plain loops.

fn gelu_f64(h: f64, g: Gelu) -> f64 {
    match g {
        Gelu::Erf => 0.5 * h * (1.0 + erf_f64(h / std::f64::consts::SQRT_2)),
        Gelu::Tanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * h * (1.0 + (c * (h + 0.044715 * h * h * h)).tanh())
        }
    }
}

fn gelu_grad_f64(h: f64, g: Gelu) -> f64 {
    match g {
        Gelu::Erf => {
            let cdf = 0.5 * (1.0 + erf_f64(h / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * h * h).exp() / (2.0 * std::f64::consts::PI).sqrt();
            cdf + h * pdf
        }
        Gelu::Tanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let t = (c * (h + 0.044715 * h * h * h)).tanh();
            0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * h * h)
        }
    }
}

/// The f64 forward on f64 data: plain loops, the version to check by eye.
pub fn reference_f64(x: &[f64], gamma: &[f64], beta: &[f64], p: Params) -> Result<Forward64> {
    check_common(x.len(), gamma.len(), beta.len(), &p)?;
    let (rows, cols) = (p.rows, p.cols);
    let mut out = Forward64 {
        y: vec![0.0; rows * cols],
        mean: vec![0.0; rows],
        rstd: vec![0.0; rows],
    };
    for r in 0..rows {
        let xr = &x[r * cols..(r + 1) * cols];
        let mean = xr.iter().sum::<f64>() / cols as f64;
        let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / cols as f64;
        let rstd = 1.0 / (var + f64::from(p.eps)).sqrt();
        for j in 0..cols {
            let h = (xr[j] - mean) * rstd * gamma[j] + beta[j];
            out.y[r * cols + j] = gelu_f64(h, p.gelu);
        }
        out.mean[r] = mean;
        out.rstd[r] = rstd;
    }
    Ok(out)
}

/// The f64 backward on f64 data (statistics as saved by the forward): plain loops.
pub fn reference_bwd_f64(
    x: &[f64],
    gamma: &[f64],
    beta: &[f64],
    mean: &[f64],
    rstd: &[f64],
    dy: &[f64],
    p: Params,
) -> Result<Backward64> {
    let (ml, rl, dl) = (mean.len(), rstd.len(), dy.len());
    check_bwd(x.len(), gamma.len(), beta.len(), ml, rl, dl, None, &p)?;
    let (rows, cols) = (p.rows, p.cols);
    let mut g = Backward64 {
        dx: vec![0.0; rows * cols],
        dgamma: vec![0.0; cols],
        dbeta: vec![0.0; cols],
    };
    for r in 0..rows {
        let mut dn = vec![0.0; cols];
        let mut n = vec![0.0; cols];
        for j in 0..cols {
            n[j] = (x[r * cols + j] - mean[r]) * rstd[r];
            let h = n[j] * gamma[j] + beta[j];
            let dh = dy[r * cols + j] * gelu_grad_f64(h, p.gelu);
            g.dbeta[j] += dh;
            g.dgamma[j] += dh * n[j];
            dn[j] = dh * gamma[j];
        }
        let mean_dn = dn.iter().sum::<f64>() / cols as f64;
        let mean_dn_n = dn.iter().zip(&n).map(|(a, b)| a * b).sum::<f64>() / cols as f64;
        for j in 0..cols {
            g.dx[r * cols + j] = rstd[r] * (dn[j] - mean_dn - n[j] * mean_dn_n);
        }
    }
    Ok(g)
}

fn wide(s: &[f32]) -> Vec<f64> {
    s.iter().map(|&v| f64::from(v)).collect()
}

fn narrow(dst: &mut [f32], src: &[f64]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = s as f32;
    }
}

/// The reference forward with f32 in and out: [`reference_f64`] rounded once. `cols = 0`
/// writes nothing.
pub fn reference(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    p: Params,
) -> Result<()> {
    check_fwd(
        x.len(),
        gamma.len(),
        beta.len(),
        y.len(),
        mean.len(),
        rstd.len(),
        &p,
    )?;
    if p.cols == 0 {
        return Ok(());
    }
    let f = reference_f64(&wide(x), &wide(gamma), &wide(beta), p)?;
    narrow(y, &f.y);
    narrow(mean, &f.mean);
    narrow(rstd, &f.rstd);
    Ok(())
}

/// The reference forward with bf16 `x` and `y` (f32 gamma, beta, statistics): the f64 result
/// rounded to nearest bf16 once.
pub fn reference_bf16(
    x: &[bf16],
    gamma: &[f32],
    beta: &[f32],
    y: &mut [bf16],
    mean: &mut [f32],
    rstd: &mut [f32],
    p: Params,
) -> Result<()> {
    check_fwd(
        x.len(),
        gamma.len(),
        beta.len(),
        y.len(),
        mean.len(),
        rstd.len(),
        &p,
    )?;
    if p.cols == 0 {
        return Ok(());
    }
    let x64: Vec<f64> = x.iter().map(|v| v.to_f64()).collect();
    let f = reference_f64(&x64, &wide(gamma), &wide(beta), p)?;
    for (d, &s) in y.iter_mut().zip(&f.y) {
        *d = bf16::from_f64(s);
    }
    narrow(mean, &f.mean);
    narrow(rstd, &f.rstd);
    Ok(())
}

/// The reference backward with f32 in and out: [`reference_bwd_f64`] rounded once.
pub fn reference_bwd(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    stats: Stats<'_>,
    dy: &[f32],
    grads: Grads<'_>,
    p: Params,
) -> Result<()> {
    let (ml, rl) = (stats.mean.len(), stats.rstd.len());
    check_bwd(
        x.len(),
        gamma.len(),
        beta.len(),
        ml,
        rl,
        dy.len(),
        Some(&grads),
        &p,
    )?;
    let (mean, rstd) = (wide(stats.mean), wide(stats.rstd));
    let g = reference_bwd_f64(
        &wide(x),
        &wide(gamma),
        &wide(beta),
        &mean,
        &rstd,
        &wide(dy),
        p,
    )?;
    narrow(grads.dx, &g.dx);
    narrow(grads.dgamma, &g.dgamma);
    narrow(grads.dbeta, &g.dbeta);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Fast CPU path.

#[inline(always)]
fn gelu_grad_f32(h: f32, g: Gelu) -> f32 {
    match g {
        Gelu::Erf => {
            let (cdf, e) = cdf_and_gauss(h);
            cdf + h * e * (0.5 * std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2)
        }
        Gelu::Tanh => {
            let u = SQRT_2_OVER_PI * (h + TANH_CUBIC * h * h * h);
            // E capped at 2^126 so that 1 - s = E s stays finite (it is 0 in f32 anyway there).
            let big = exp_f32(-2.0 * u);
            let e = if big < 8.507_059e37 {
                big
            } else {
                8.507_059e37
            };
            let s = 1.0 / (1.0 + e);
            let du = 2.0 * SQRT_2_OVER_PI * (1.0 + 3.0 * TANH_CUBIC * h * h);
            s + h * (e * s) * s * du
        }
    }
}

#[inline(always)]
fn lane_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for k in 0..LANES {
            acc[k] += c[k];
        }
    }
    acc.iter().sum::<f32>() + it.remainder().iter().sum::<f32>()
}

#[inline(always)]
fn lane_sum_sq_dev(x: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for k in 0..LANES {
            let d = c[k] - m;
            acc[k] += d * d;
        }
    }
    acc.iter().sum::<f32>()
        + it.remainder()
            .iter()
            .map(|&v| (v - m) * (v - m))
            .sum::<f32>()
}

/// Elements per statistics chunk: small enough to stay in L1 between its two passes, so the
/// row is read from memory once.
const STATS_CHUNK: usize = 256;

/// `(mean, biased variance)` of a non-empty row in one read: each L1-sized chunk gets an exact
/// two-pass mean and sum of squared deviations, merged by Chan et al.'s pairwise update (stable,
/// unlike E[x^2] - mean^2).
#[inline(always)]
fn row_stats(x: &[f32]) -> (f32, f32) {
    let (mut n, mut mean, mut m2) = (0f32, 0f32, 0f32);
    for c in x.chunks(STATS_CHUNK) {
        let k = c.len() as f32;
        let cm = lane_sum(c) / k;
        let cm2 = lane_sum_sq_dev(c, cm);
        let tot = n + k;
        let d = cm - mean;
        mean += d * (k / tot);
        m2 += cm2 + d * d * (n * k / tot);
        n = tot;
    }
    (mean, m2 / n)
}

/// One row of the forward; returns `(mean, rstd)`.
#[inline(always)]
fn row_fwd(x: &[f32], gamma: &[f32], beta: &[f32], y: &mut [f32], eps: f32, g: Gelu) -> (f32, f32) {
    let (mean, var) = row_stats(x);
    let rstd = 1.0 / (var + eps).sqrt();
    let it = y.iter_mut().zip(x).zip(gamma.iter().zip(beta));
    match g {
        Gelu::Erf => it.for_each(|((o, &v), (&gm, &bt))| {
            *o = gelu_erf_f32((v - mean) * rstd * gm + bt);
        }),
        Gelu::Tanh => it.for_each(|((o, &v), (&gm, &bt))| {
            *o = gelu_tanh_f32((v - mean) * rstd * gm + bt);
        }),
    }
    (mean, rstd)
}

/// The forward over a whole number of f32 rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)] // the forward's slices plus eps and the GELU form
fn rows_fwd(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    eps: f32,
    g: Gelu,
) {
    let cols = gamma.len();
    let rows = x.chunks_exact(cols).zip(y.chunks_exact_mut(cols));
    for ((xr, yr), (m, r)) in rows.zip(mean.iter_mut().zip(rstd.iter_mut())) {
        (*m, *r) = row_fwd(xr, gamma, beta, yr, eps, g);
    }
}

simd_variants!(rows_fwd => rows_fwd_avx2, rows_fwd_avx512(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    eps: f32,
    g: Gelu,
));

/// The forward over a whole number of bf16 rows, through f32 row buffers.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows_fwd_bf16(
    x: &[bf16],
    gamma: &[f32],
    beta: &[f32],
    y: &mut [bf16],
    mean: &mut [f32],
    rstd: &mut [f32],
    eps: f32,
    g: Gelu,
) {
    let cols = gamma.len();
    let (mut xf, mut yf) = (vec![0f32; cols], vec![0f32; cols]);
    let rows = x.chunks_exact(cols).zip(y.chunks_exact_mut(cols));
    for ((xr, yr), (m, r)) in rows.zip(mean.iter_mut().zip(rstd.iter_mut())) {
        for (d, s) in xf.iter_mut().zip(xr) {
            *d = s.to_f32();
        }
        (*m, *r) = row_fwd(&xf, gamma, beta, &mut yf, eps, g);
        for (d, &s) in yr.iter_mut().zip(&yf) {
            *d = bf16::from_f32(s);
        }
    }
}

simd_variants!(rows_fwd_bf16 => rows_fwd_bf16_avx2, rows_fwd_bf16_avx512(
    x: &[bf16],
    gamma: &[f32],
    beta: &[f32],
    y: &mut [bf16],
    mean: &mut [f32],
    rstd: &mut [f32],
    eps: f32,
    g: Gelu,
));

/// Rows per rayon task of the forward: about 16k elements.
fn rows_per_task(cols: usize) -> usize {
    (16 * 1024 / cols).max(1)
}

/// The fast CPU forward: rows in parallel; per row one read of x for the statistics (chunked
/// Welford/Chan merge of L1-resident chunks) and one pass computing y. `cols = 0` writes
/// nothing.
pub fn cpu(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    p: Params,
) -> Result<()> {
    check_fwd(
        x.len(),
        gamma.len(),
        beta.len(),
        y.len(),
        mean.len(),
        rstd.len(),
        &p,
    )?;
    if p.rows == 0 || p.cols == 0 {
        return Ok(());
    }
    let rpt = rows_per_task(p.cols);
    let simd = simd_level();
    y.par_chunks_mut(rpt * p.cols)
        .zip(x.par_chunks(rpt * p.cols))
        .zip(mean.par_chunks_mut(rpt).zip(rstd.par_chunks_mut(rpt)))
        .for_each(|((yc, xc), (mc, rc))| {
            let (eps, g) = (p.eps, p.gelu);
            simd_call!(
                simd,
                rows_fwd,
                rows_fwd_avx2,
                rows_fwd_avx512(xc, gamma, beta, yc, mc, rc, eps, g)
            );
        });
    Ok(())
}

/// The fast CPU forward with bf16 `x` and `y` (f32 arithmetic, y rounded to nearest once).
pub fn cpu_bf16(
    x: &[bf16],
    gamma: &[f32],
    beta: &[f32],
    y: &mut [bf16],
    mean: &mut [f32],
    rstd: &mut [f32],
    p: Params,
) -> Result<()> {
    check_fwd(
        x.len(),
        gamma.len(),
        beta.len(),
        y.len(),
        mean.len(),
        rstd.len(),
        &p,
    )?;
    if p.rows == 0 || p.cols == 0 {
        return Ok(());
    }
    let rpt = rows_per_task(p.cols);
    let simd = simd_level();
    y.par_chunks_mut(rpt * p.cols)
        .zip(x.par_chunks(rpt * p.cols))
        .zip(mean.par_chunks_mut(rpt).zip(rstd.par_chunks_mut(rpt)))
        .for_each(|((yc, xc), (mc, rc))| {
            let (eps, g) = (p.eps, p.gelu);
            simd_call!(
                simd,
                rows_fwd_bf16,
                rows_fwd_bf16_avx2,
                rows_fwd_bf16_avx512(xc, gamma, beta, yc, mc, rc, eps, g)
            );
        });
    Ok(())
}

/// Inputs of one row chunk of the backward.
struct BwdChunk<'a> {
    x: &'a [f32],
    dy: &'a [f32],
    mean: &'a [f32],
    rstd: &'a [f32],
}

/// Pass 1 of the backward over one row: `(x, dy, gamma, beta)` in, `(dx, dgamma, dbeta)` out
/// (dx receives dn); returns the row sums of dn and dn * n.
#[inline(always)]
fn bwd_pass1(
    (x, dy, gamma, beta): (&[f32], &[f32], &[f32], &[f32]),
    (dx, dgamma, dbeta): (&mut [f32], &mut [f32], &mut [f32]),
    mu: f32,
    rs: f32,
    grad: impl Fn(f32) -> f32,
) -> (f32, f32) {
    let (mut s1, mut s2) = ([0f32; LANES], [0f32; LANES]);
    let cols = x.len();
    let full = cols - cols % LANES;
    let lanes = |s: &[f32], j: usize| -> [f32; LANES] {
        s[j..j + LANES]
            .try_into()
            .expect("j + LANES <= full <= len")
    };
    for j0 in (0..full).step_by(LANES) {
        let (xc, dyc, gc, bc) = (
            lanes(x, j0),
            lanes(dy, j0),
            lanes(gamma, j0),
            lanes(beta, j0),
        );
        let (mut dxc, mut dgc, mut dbc) = ([0f32; LANES], lanes(dgamma, j0), lanes(dbeta, j0));
        for k in 0..LANES {
            let n = (xc[k] - mu) * rs;
            let dh = dyc[k] * grad(n * gc[k] + bc[k]);
            dbc[k] += dh;
            dgc[k] += dh * n;
            dxc[k] = dh * gc[k];
            s1[k] += dxc[k];
            s2[k] += dxc[k] * n;
        }
        dx[j0..j0 + LANES].copy_from_slice(&dxc);
        dgamma[j0..j0 + LANES].copy_from_slice(&dgc);
        dbeta[j0..j0 + LANES].copy_from_slice(&dbc);
    }
    for j in full..cols {
        let n = (x[j] - mu) * rs;
        let dh = dy[j] * grad(n * gamma[j] + beta[j]);
        dbeta[j] += dh;
        dgamma[j] += dh * n;
        dx[j] = dh * gamma[j];
        s1[0] += dx[j];
        s2[0] += dx[j] * n;
    }
    (s1.iter().sum(), s2.iter().sum())
}

/// The backward over a whole number of rows: writes `dx`, adds into `dgamma` and `dbeta`.
#[inline(always)]
fn rows_bwd(
    c: &BwdChunk<'_>,
    gamma: &[f32],
    beta: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    g: Gelu,
) {
    let cols = gamma.len();
    let inv_n = 1.0 / cols as f32;
    for (r, dxr) in dx.chunks_exact_mut(cols).enumerate() {
        let (xr, dyr) = (&c.x[r * cols..][..cols], &c.dy[r * cols..][..cols]);
        let (mu, rs) = (c.mean[r], c.rstd[r]);
        // Pass 1: dx <- dn = dy gelu'(h) gamma; dgamma, dbeta and the two row sums. The GELU
        // form is matched once per row so the lane loop has no branch.
        let ins = (xr, dyr, gamma, beta);
        let outs = (&mut *dxr, &mut *dgamma, &mut *dbeta);
        let (s1, s2) = match g {
            Gelu::Erf => bwd_pass1(ins, outs, mu, rs, |h| gelu_grad_f32(h, Gelu::Erf)),
            Gelu::Tanh => bwd_pass1(ins, outs, mu, rs, |h| gelu_grad_f32(h, Gelu::Tanh)),
        };
        let (m1, m2) = (s1 * inv_n, s2 * inv_n);
        // Pass 2: dx = rstd (dn - mean dn - n mean(dn n)).
        for (d, &v) in dxr.iter_mut().zip(xr) {
            let n = (v - mu) * rs;
            *d = rs * (*d - m1 - n * m2);
        }
    }
}

simd_variants!(rows_bwd => rows_bwd_avx2, rows_bwd_avx512(
    c: &BwdChunk<'_>,
    gamma: &[f32],
    beta: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    g: Gelu,
));

/// The fast CPU backward: row chunks in parallel, each with its own dgamma/dbeta partials,
/// summed in chunk order (deterministic). `dx`, `dgamma`, `dbeta` are overwritten.
pub fn cpu_bwd(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    stats: Stats<'_>,
    dy: &[f32],
    grads: Grads<'_>,
    p: Params,
) -> Result<()> {
    let (ml, rl) = (stats.mean.len(), stats.rstd.len());
    check_bwd(
        x.len(),
        gamma.len(),
        beta.len(),
        ml,
        rl,
        dy.len(),
        Some(&grads),
        &p,
    )?;
    let (rows, cols) = (p.rows, p.cols);
    grads.dgamma.fill(0.0);
    grads.dbeta.fill(0.0);
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    // A few tasks per thread: enough to balance, few enough that the partials stay small.
    let tasks = (4 * rayon::current_num_threads()).clamp(1, rows);
    let rpt = rows.div_ceil(tasks);
    let simd = simd_level();
    let partials: Vec<(Vec<f32>, Vec<f32>)> = grads
        .dx
        .par_chunks_mut(rpt * cols)
        .enumerate()
        .map(|(t, dxc)| {
            let r0 = t * rpt;
            let nr = dxc.len() / cols;
            let c = BwdChunk {
                x: &x[r0 * cols..(r0 + nr) * cols],
                dy: &dy[r0 * cols..(r0 + nr) * cols],
                mean: &stats.mean[r0..r0 + nr],
                rstd: &stats.rstd[r0..r0 + nr],
            };
            let (mut dg, mut db) = (vec![0f32; cols], vec![0f32; cols]);
            let (dgm, dbm) = (&mut dg, &mut db);
            simd_call!(
                simd,
                rows_bwd,
                rows_bwd_avx2,
                rows_bwd_avx512(&c, gamma, beta, dxc, dgm, dbm, p.gelu)
            );
            (dg, db)
        })
        .collect();
    let mut acc = vec![0f64; 2 * cols];
    for (dg, db) in &partials {
        for j in 0..cols {
            acc[j] += f64::from(dg[j]);
            acc[cols + j] += f64::from(db[j]);
        }
    }
    narrow(grads.dgamma, &acc[..cols]);
    narrow(grads.dbeta, &acc[cols..]);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// PTX launches.

fn gelu_flag(g: Gelu) -> u32 {
    match g {
        Gelu::Erf => 0,
        Gelu::Tanh => 1,
    }
}

fn dims(rows: u32, cols: u32) -> LaunchDims {
    LaunchDims {
        // At least one block, so an empty problem is still a valid launch (it exits at once).
        grid: [rows.max(1), 1, 1],
        block: [block_threads(cols), 1, 1],
        shared_bytes: 0,
    }
}

/// The PTX launch of `mgm_layer_norm_gelu_fwd_f32`: one block per row.
pub fn launch<'a>(
    x: &'a [f32],
    gamma: &'a [f32],
    beta: &'a [f32],
    y: &'a mut [f32],
    mean: &'a mut [f32],
    rstd: &'a mut [f32],
    p: Params,
) -> Result<KernelLaunch<'a>> {
    launch_fwd(
        "mgm_layer_norm_gelu_fwd_f32",
        x,
        gamma,
        beta,
        y,
        mean,
        rstd,
        p,
    )
}

/// The PTX launch of `mgm_layer_norm_gelu_fwd_bf16`: one block per row.
pub fn launch_bf16<'a>(
    x: &'a [bf16],
    gamma: &'a [f32],
    beta: &'a [f32],
    y: &'a mut [bf16],
    mean: &'a mut [f32],
    rstd: &'a mut [f32],
    p: Params,
) -> Result<KernelLaunch<'a>> {
    launch_fwd(
        "mgm_layer_norm_gelu_fwd_bf16",
        x,
        gamma,
        beta,
        y,
        mean,
        rstd,
        p,
    )
}

/// The two forward entries share their `.param` list; only the element type of x and y differs.
#[allow(clippy::too_many_arguments)] // the forward's slices plus the entry name
fn launch_fwd<'a, T: bytemuck::Pod>(
    entry: &'static str,
    x: &'a [T],
    gamma: &'a [f32],
    beta: &'a [f32],
    y: &'a mut [T],
    mean: &'a mut [f32],
    rstd: &'a mut [f32],
    p: Params,
) -> Result<KernelLaunch<'a>> {
    check_fwd(
        x.len(),
        gamma.len(),
        beta.len(),
        y.len(),
        mean.len(),
        rstd.len(),
        &p,
    )?;
    let (rows, cols) = ptx_shape(KERNEL, p.rows, p.cols)?;
    Ok(KernelLaunch {
        family: KERNEL,
        entry,
        dims: dims(rows, cols),
        args: vec![
            KernelArg::input(x),
            KernelArg::input(gamma),
            KernelArg::input(beta),
            KernelArg::output(y),
            KernelArg::output(mean),
            KernelArg::output(rstd),
            KernelArg::U32(rows),
            KernelArg::U32(cols),
            KernelArg::F32(p.eps),
            KernelArg::U32(gelu_flag(p.gelu)),
        ],
    })
}

/// The PTX launch of `mgm_layer_norm_gelu_bwd_f32`: one block per row. The kernel adds into
/// `dgamma` and `dbeta` with atomics, so this ZEROES THEM here, before the launch carries them
/// to the device: running the launch then overwrites them like [`cpu_bwd`].
pub fn launch_bwd<'a>(
    x: &'a [f32],
    gamma: &'a [f32],
    beta: &'a [f32],
    stats: Stats<'a>,
    dy: &'a [f32],
    grads: Grads<'a>,
    p: Params,
) -> Result<KernelLaunch<'a>> {
    let (ml, rl) = (stats.mean.len(), stats.rstd.len());
    check_bwd(
        x.len(),
        gamma.len(),
        beta.len(),
        ml,
        rl,
        dy.len(),
        Some(&grads),
        &p,
    )?;
    let (rows, cols) = ptx_shape(KERNEL, p.rows, p.cols)?;
    grads.dgamma.fill(0.0);
    grads.dbeta.fill(0.0);
    Ok(KernelLaunch {
        family: KERNEL,
        entry: "mgm_layer_norm_gelu_bwd_f32",
        dims: dims(rows, cols),
        args: vec![
            KernelArg::input(x),
            KernelArg::input(gamma),
            KernelArg::input(beta),
            KernelArg::input(stats.mean),
            KernelArg::input(stats.rstd),
            KernelArg::input(dy),
            KernelArg::output(grads.dx),
            KernelArg::output(grads.dgamma),
            KernelArg::output(grads.dbeta),
            KernelArg::U32(rows),
            KernelArg::U32(cols),
            KernelArg::U32(gelu_flag(p.gelu)),
        ],
    })
}

/// Runs the f32 forward on the GPU.
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)] // the signature of `cpu` plus the device
pub fn cuda(
    gpu: &crate::cuda::Gpu,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    p: Params,
) -> Result<()> {
    gpu.run(launch(x, gamma, beta, y, mean, rstd, p)?)
}

/// Runs the bf16 forward on the GPU.
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)] // the signature of `cpu_bf16` plus the device
pub fn cuda_bf16(
    gpu: &crate::cuda::Gpu,
    x: &[bf16],
    gamma: &[f32],
    beta: &[f32],
    y: &mut [bf16],
    mean: &mut [f32],
    rstd: &mut [f32],
    p: Params,
) -> Result<()> {
    gpu.run(launch_bf16(x, gamma, beta, y, mean, rstd, p)?)
}

/// Runs the backward on the GPU (`dgamma` and `dbeta` are overwritten).
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)] // the signature of `cpu_bwd` plus the device
pub fn cuda_bwd(
    gpu: &crate::cuda::Gpu,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    stats: Stats<'_>,
    dy: &[f32],
    grads: Grads<'_>,
    p: Params,
) -> Result<()> {
    gpu.run(launch_bwd(x, gamma, beta, stats, dy, grads, p)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SIMD variants are the same source compiled with wider vectors: with the reduction
    /// order fixed by the lane arrays (and no FMA contraction in Rust) they must agree bit for
    /// bit with the portable build, which the property tests do not reach on an AVX-512 host.
    #[test]
    fn simd_variants_match_portable_bit_for_bit() {
        use crate::simd::{Simd, simd_level};
        let (rows, cols) = (3, 301);
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        let gamma: Vec<f32> = (0..cols)
            .map(|i| ((i * 13 % 23) as f32 - 11.0) / 4.0)
            .collect();
        let beta: Vec<f32> = (0..cols)
            .map(|i| ((i * 7 % 19) as f32 - 9.0) / 3.0)
            .collect();
        let level = simd_level();
        for g in [Gelu::Erf, Gelu::Tanh] {
            let run = |which: Simd| {
                let (mut y, mut m, mut r) =
                    (vec![0f32; rows * cols], vec![0f32; rows], vec![0f32; rows]);
                let (mut dx, mut dg, mut db) =
                    (vec![0f32; rows * cols], vec![0f32; cols], vec![0f32; cols]);
                let c = BwdChunk {
                    x: &x,
                    dy: &x,
                    mean: &[0.1, -0.2, 0.3],
                    rstd: &[1.0, 0.5, 2.0],
                };
                simd_call!(
                    which,
                    rows_fwd,
                    rows_fwd_avx2,
                    rows_fwd_avx512(&x, &gamma, &beta, &mut y, &mut m, &mut r, 1e-5, g)
                );
                simd_call!(
                    which,
                    rows_bwd,
                    rows_bwd_avx2,
                    rows_bwd_avx512(&c, &gamma, &beta, &mut dx, &mut dg, &mut db, g)
                );
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
                [
                    bits(&y),
                    bits(&m),
                    bits(&r),
                    bits(&dx),
                    bits(&dg),
                    bits(&db),
                ]
            };
            let portable = run(Simd::Baseline);
            if level != Simd::Baseline {
                assert!(portable == run(Simd::Avx2), "avx2 {g:?}");
            }
            if level == Simd::Avx512 {
                assert!(portable == run(Simd::Avx512), "avx512 {g:?}");
            }
        }
    }
}
