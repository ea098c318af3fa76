//! Shared helpers of the fast CPU paths: a vectorisable `exp`, and runtime dispatch to AVX2 /
//! AVX-512 compilations of the same portable loop (the crate is built for baseline x86-64).

/// `sum(a[i] * b[i])` over the shorter length, with eight independent accumulators so the loop
/// vectorises (the sum's order differs from a sequential one by rounding only).
///
/// ```
/// assert_eq!(mgm_kernels::simd::dot(&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]), 32.0);
/// ```
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Lanes of the vectorised loops (several accumulators hide the add latency).
pub(crate) const LANES: usize = 16;

/// `e^x` in f32 without a libm call, so loops over it vectorise: `2^(x log2 e)` split into an
/// integer power (built in the exponent bits) and `2^f`, `|f| <= 1/2`, by its degree-6 Taylor
/// polynomial (truncation error `(ln 2 / 2)^7 / 7! < 1.3e-7` relative). Relative error about
/// `2e-7 + |x| * 6e-8` (the rounding of `x log2 e`); 0 below `2^-126`, `inf` above `2^128`, NaN
/// for NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    let t = x * std::f32::consts::LOG2_E;
    // clamp keeps NaN, which passes through to the polynomial.
    let t = t.clamp(-127.0, 128.0);
    // Round to nearest: adding 1.5 * 2^23 pushes the fraction bits out (|t| <= 128).
    const SHIFT: f32 = 12_582_912.0;
    let shifted = t + SHIFT;
    let n = shifted - SHIFT;
    let f = t - n;
    const C: [f32; 7] = TAYLOR_EXP2;
    let mut p = C[6];
    p = p * f + C[5];
    p = p * f + C[4];
    p = p * f + C[3];
    p = p * f + C[2];
    p = p * f + C[1];
    p = p * f + C[0];
    // 2^n in the exponent field: n = -127 gives the bit pattern of 0.0, n = 128 that of +inf.
    // n is read from the low mantissa bits of `shifted` (integer ops, so the loop
    // vectorises; `n as i32` would be a scalar saturating conversion per element).
    let n_bits = shifted.to_bits().wrapping_sub(SHIFT.to_bits());
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    p * scale
}

/// Taylor coefficients of `2^f = sum (f ln 2)^k / k!`, k = 0..=6, as [`exp_f32`] uses them.
pub(crate) const TAYLOR_EXP2: [f32; 7] = taylor_exp2();

/// Computes [`TAYLOR_EXP2`].
const fn taylor_exp2() -> [f32; 7] {
    let ln2 = std::f64::consts::LN_2;
    let mut c = [0f32; 7];
    let mut term = 1.0f64;
    let mut k = 0;
    while k < 7 {
        c[k] = term as f32;
        term = term * ln2 / (k + 1) as f64;
        k += 1;
    }
    c
}

/// The widest instruction set the `*_avx2` / `*_avx512` kernel variants may use on this CPU
/// (the crate is built for baseline x86-64, where the lane loops vectorise only 4 wide).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Simd {
    /// Portable code only.
    Baseline,
    /// AVX2 and FMA.
    Avx2,
    /// AVX-512F, AVX2 and FMA.
    Avx512,
}

/// Detects the [`Simd`] level of the running CPU.
pub(crate) fn simd_level() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        if avx2 && std::arch::is_x86_feature_detected!("avx512f") {
            return Simd::Avx512;
        }
        if avx2 {
            return Simd::Avx2;
        }
    }
    Simd::Baseline
}

/// Declares `$avx2` and `$avx512`: the `#[inline(always)]` kernel `$generic` compiled with
/// those target features. Without `$avx512`, only `$avx2` (for a kernel whose AVX-512 variant
/// is written in explicit vectors, with the same signature and target features).
macro_rules! simd_variants {
    ($generic:ident => $avx2:ident ($($a:ident: $t:ty),* $(,)?)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $avx2($($a: $t),*) {
            $generic($($a),*)
        }
    };
    ($generic:ident => $avx2:ident, $avx512:ident ($($a:ident: $t:ty),* $(,)?)) => {
        $crate::simd::simd_variants!($generic => $avx2 ($($a: $t),*));
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $avx512($($a: $t),*) {
            $generic($($a),*)
        }
    };
}
pub(crate) use simd_variants;

/// Calls the variant of [`simd_variants`] that `$level` (from [`simd_level`]) allows.
macro_rules! simd_call {
    ($level:expr, $generic:ident, $avx2:ident, $avx512:ident ($($e:expr),* $(,)?)) => {
        match $level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: simd_level() returned Avx512 only after detecting AVX-512F, AVX2 and FMA
            // on this CPU, the only requirement of the target_feature variant.
            $crate::simd::Simd::Avx512 => unsafe { $avx512($($e),*) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: simd_level() returned Avx2 only after detecting AVX2 and FMA.
            $crate::simd::Simd::Avx2 => unsafe { $avx2($($e),*) },
            _ => $generic($($e),*),
        }
    };
}
pub(crate) use simd_call;
