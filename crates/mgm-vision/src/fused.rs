//! Fused elementwise epilogues for the frozen f32 inference path of the towers: the MLP's
//! `quick_gelu(h + b)` and `r + (y + b)` each read and write the activations once instead of
//! twice, and quick_gelu's exponential is a vectorisable polynomial instead of a libm call per
//! element (which made mgm-tensor's `quick_gelu` about 7% of a CLIP-L forward).
//!
//! Inputs that are not contiguous f32, or that autograd tracks, go through the tensor ops.

use mgm_tensor::{DType, Tensor, needs_grad};
use rayon::prelude::*;

use crate::Result;

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

/// e^x for f32 by Cephes' reduction x = n ln2 + r and a degree-6 polynomial (relative error
/// about 2e-7 for |x| <= 87, the range callers clamp to), written without branches so loops
/// over it vectorise.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits
    const MAGIC: f32 = 12_582_912.0;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let k = x * LOG2E + MAGIC;
    let n = k - MAGIC;
    let r = x - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.0e-1;
    let y = p * r * r + r + 1.0;
    // 2^n through the exponent bits (n + 127 stays in 1..=254 for |x| <= 87)
    let scale = f32::from_bits(k.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23);
    y * scale
}

/// `v * sigmoid(1.702 v)` with `v = h + b`.
#[inline(always)]
fn quick_gelu_rows(h: &[f32], b: &[f32], out: &mut [f32]) {
    for (o, hr) in out.chunks_exact_mut(b.len()).zip(h.chunks_exact(b.len())) {
        for ((o, &x), &bb) in o.iter_mut().zip(hr).zip(b) {
            let v = x + bb;
            let t = (-1.702 * v).clamp(-87.0, 87.0);
            *o = v / (1.0 + exp_f32(t));
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quick_gelu_rows_avx2(h: &[f32], b: &[f32], out: &mut [f32]) {
    quick_gelu_rows(h, b, out)
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The contiguous f32 data of untracked tensors, or None when the fused path does not apply.
fn plain<'a>(ts: &[&'a Tensor]) -> Option<Vec<&'a [f32]>> {
    if needs_grad(ts) || ts.iter().any(|t| t.dtype() != DType::F32) {
        return None;
    }
    ts.iter()
        .map(|t| t.as_contiguous_slice::<f32>().ok().flatten())
        .collect()
}

/// `quick_gelu(h + bias)` with `bias` `[n]` broadcast over the rows of `h` `[.., n]`.
pub(crate) fn bias_quick_gelu(h: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let n = bias.numel();
    let fits = bias.rank() == 1 && h.shape().last() == Some(&n) && n > 0;
    let Some(d) = plain(&[h, bias]).filter(|_| fits) else {
        return Ok(h.add(bias)?.quick_gelu()?);
    };
    let (hs, bs) = (d[0], d[1]);
    let mut out = vec![0f32; hs.len()];
    let simd = has_avx2();
    let rows_per_task = (CHUNK / n).max(1);
    out.par_chunks_mut(rows_per_task * n)
        .zip(hs.par_chunks(rows_per_task * n))
        .for_each(|(o, x)| {
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: simd is true only when the CPU reports AVX2 and FMA, the
                // variant's only requirement.
                unsafe { quick_gelu_rows_avx2(x, bs, o) };
                return;
            }
            let _ = simd;
            quick_gelu_rows(x, bs, o)
        });
    Ok(Tensor::from_vec(out, h.shape())?)
}

/// `residual + (y + bias)` with `bias` `[n]` broadcast over the rows of `y` `[.., n]`.
pub(crate) fn bias_residual(y: &Tensor, bias: &Tensor, residual: &Tensor) -> Result<Tensor> {
    let n = bias.numel();
    let fits =
        bias.rank() == 1 && y.shape().last() == Some(&n) && n > 0 && y.shape() == residual.shape();
    let Some(d) = plain(&[y, bias, residual]).filter(|_| fits) else {
        return Ok(residual.add(&y.add(bias)?)?);
    };
    let (ys, bs, rs) = (d[0], d[1], d[2]);
    let mut out = vec![0f32; ys.len()];
    let rows_per_task = (CHUNK / n).max(1);
    out.par_chunks_mut(rows_per_task * n)
        .zip(
            ys.par_chunks(rows_per_task * n)
                .zip(rs.par_chunks(rows_per_task * n)),
        )
        .for_each(|(o, (y, r))| {
            for ((o, y), r) in o
                .chunks_exact_mut(n)
                .zip(y.chunks_exact(n))
                .zip(r.chunks_exact(n))
            {
                for (((o, &y), &r), &b) in o.iter_mut().zip(y).zip(r).zip(bs) {
                    *o = r + (y + b);
                }
            }
        });
    Ok(Tensor::from_vec(out, y.shape())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mgm_tensor::Device;

    #[test]
    fn exp_f32_matches_f64_exp() {
        let mut worst = 0f64;
        for i in -8700..=8700 {
            let x = i as f32 * 0.01;
            let r = (x as f64).exp();
            worst = worst.max(((exp_f32(x) as f64) - r).abs() / r);
        }
        assert!(worst < 5e-7, "relative error {worst:e}");
    }

    #[test]
    fn bias_quick_gelu_matches_f64_reference() {
        let h = Tensor::randn(1, &[3, 70, 33], 0.0, 4.0, DType::F32, Device::Cpu).unwrap();
        let b = Tensor::randn(2, &[33], 0.0, 1.0, DType::F32, Device::Cpu).unwrap();
        let got = bias_quick_gelu(&h, &b).unwrap().to_vec::<f32>().unwrap();
        let (hv, bv) = (h.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
        for (i, (&g, &x)) in got.iter().zip(&hv).enumerate() {
            let v = x as f64 + bv[i % 33] as f64;
            let r = v / (1.0 + (-1.702 * v).exp());
            assert!(
                (g as f64 - r).abs() <= 1e-5 * (1.0 + r.abs()),
                "element {i}: {g} vs {r}"
            );
        }
        // extremes saturate instead of overflowing
        let h = Tensor::from_vec(vec![-200f32, 200.0, 0.0], &[1, 3]).unwrap();
        let z = Tensor::zeros(&[3], DType::F32, Device::Cpu).unwrap();
        let got = bias_quick_gelu(&h, &z).unwrap().to_vec::<f32>().unwrap();
        assert_eq!(got[1], 200.0);
        assert!(got[0].abs() < 1e-30 && got[2] == 0.0, "{got:?}");
    }

    #[test]
    fn bias_residual_matches_tensor_ops() {
        let y = Tensor::randn(3, &[2, 5, 8], 0.0, 1.0, DType::F32, Device::Cpu).unwrap();
        let r = Tensor::randn(4, &[2, 5, 8], 0.0, 1.0, DType::F32, Device::Cpu).unwrap();
        let b = Tensor::randn(5, &[8], 0.0, 1.0, DType::F32, Device::Cpu).unwrap();
        let got = bias_residual(&y, &b, &r).unwrap().to_vec::<f32>().unwrap();
        let want = r.add(&y.add(&b).unwrap()).unwrap().to_vec::<f32>().unwrap();
        assert_eq!(got, want);
    }
}
