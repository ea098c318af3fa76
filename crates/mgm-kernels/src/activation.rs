//! The pointwise activations that kernels fuse into their outputs (GEMM epilogues, LayerNorm +
//! GELU), each with an f64 reference and a vectorisable f32 version without libm calls.
//!
//! ```
//! use mgm_kernels::activation::Activation;
//! let y = Activation::QuickGelu.reference_f64(1.0);
//! assert!((y - 1.0 / (1.0 + (-1.702f64).exp())).abs() < 1e-15);
//! ```

use crate::simd::exp_f32;

/// A pointwise activation, with PyTorch's definitions (DESIGN.md section 3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Activation {
    /// `x`.
    #[default]
    Identity,
    /// Exact GELU `0.5 x (1 + erf(x / sqrt 2))` (`gelu`; CLIP's gelu towers, MGM's projector).
    GeluErf,
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` (`gelu_pytorch_tanh`; Gemma).
    GeluTanh,
    /// `x * sigmoid(1.702 x)` (`quick_gelu`; OpenAI CLIP).
    QuickGelu,
    /// `x * sigmoid(x)` (`silu`; LLaMA's gate).
    Silu,
    /// `max(x, 0)`.
    Relu,
}

impl Activation {
    /// Parses a transformers `hidden_act` name (`gelu`, `gelu_new`, `gelu_pytorch_tanh`,
    /// `gelu_fast`, `quick_gelu`, `silu` / `swish`, `relu`).
    pub fn from_hf_name(name: &str) -> Option<Activation> {
        Some(match name {
            "gelu" => Activation::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "quick_gelu" => Activation::QuickGelu,
            "silu" | "swish" => Activation::Silu,
            "relu" => Activation::Relu,
            _ => return None,
        })
    }

    /// The f64 reference: the formula as written, with [`erf_f64`] for the exact GELU.
    pub fn reference_f64(self, x: f64) -> f64 {
        match self {
            Activation::Identity => x,
            Activation::GeluErf => 0.5 * x * (1.0 + erf_f64(x / std::f64::consts::SQRT_2)),
            Activation::GeluTanh => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
            }
            Activation::QuickGelu => x / (1.0 + (-1.702 * x).exp()),
            Activation::Silu => x / (1.0 + (-x).exp()),
            Activation::Relu => {
                if x.is_nan() {
                    x
                } else {
                    x.max(0.0)
                }
            }
        }
    }

    /// The fast f32 version, without libm calls so that loops over it vectorise: within
    /// 4e-7 * (1 + |x|) of [`Activation::reference_f64`] (tested over [-12, 12]); NaN stays
    /// NaN. Call it with the variant fixed outside a loop (`Activation::Silu.apply`) so that
    /// each loop compiles for one function.
    #[inline(always)]
    pub fn apply(self, x: f32) -> f32 {
        self.apply_f32(x)
    }

    #[inline(always)]
    pub(crate) fn apply_f32(self, x: f32) -> f32 {
        match self {
            Activation::Identity => x,
            Activation::GeluErf => gelu_erf_f32(x),
            Activation::GeluTanh => gelu_tanh_f32(x),
            Activation::QuickGelu => x / (1.0 + exp_f32(-1.702 * x)),
            Activation::Silu => x / (1.0 + exp_f32(-x)),
            // `x.max(0.0)` would turn NaN into 0
            Activation::Relu => {
                if x < 0.0 {
                    0.0
                } else {
                    x
                }
            }
        }
    }
}

/// erf by its everywhere-convergent series of positive terms,
/// `erf z = 2/sqrt(pi) e^(-z^2) sum_n 2^n z^(2n+1) / (1 * 3 * ... * (2n+1))` (A&S 7.1.6): no
/// cancellation, so about 1e-15 relative in f64; `|z| >= 6` returns +-1 (erfc(6) < 3e-17).
pub fn erf_f64(z: f64) -> f64 {
    if z.is_nan() {
        return z;
    }
    if z.abs() >= 6.0 {
        return z.signum();
    }
    let (mut term, mut sum, mut n) = (z, z, 0.0);
    while term.abs() > 1e-17 * sum.abs() {
        n += 1.0;
        term *= 2.0 * z * z / (2.0 * n + 1.0);
        sum += term;
    }
    2.0 / std::f64::consts::PI.sqrt() * (-z * z).exp() * sum
}

/// Abramowitz & Stegun 7.1.26, with the PTX kernels' f32 constants bit for bit:
/// `erfc(a) ~= P(t) e^(-a^2)`, `t = 1 / (1 + p a)`; `|error| <= 1.5e-7` with the published
/// decimal constants (1.46e-7 once rounded to f32).
pub(crate) const AS_P: f32 = f32::from_bits(0x3EA7_BA05); // 0.3275911
pub(crate) const AS_A: [f32; 5] = [
    f32::from_bits(0x3E82_7906), // a1 = 0.254829592
    f32::from_bits(0xBE91_A98E), // a2 = -0.284496736
    f32::from_bits(0x3FB5_F0E3), // a3 = 1.421413741
    f32::from_bits(0xBFBA_00E3), // a4 = -1.453152027
    f32::from_bits(0x3F87_DC22), // a5 = 1.061405429
];
/// `sqrt(2 / pi)`.
pub(crate) const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The cubic coefficient of the tanh GELU.
pub(crate) const TANH_CUBIC: f32 = 0.044_715;

/// `(Phi(h), exp(-h^2 / 2))` in f32 without libm calls (so loops over it vectorise).
#[inline(always)]
pub(crate) fn cdf_and_gauss(h: f32) -> (f32, f32) {
    let z = h * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / (1.0 + AS_P * a);
    let poly = ((((AS_A[4] * t + AS_A[3]) * t + AS_A[2]) * t + AS_A[1]) * t + AS_A[0]) * t;
    let e = exp_f32(-(a * a));
    let half_q = 0.5 * poly * e;
    // Phi(h) = 1 - erfc(a) / 2 for h >= 0 and erfc(a) / 2 for h < 0 (no cancellation there).
    let cdf = if z >= 0.0 { 1.0 - half_q } else { half_q };
    (cdf, e)
}

/// Exact GELU in f32: `h Phi(h)` with Phi from [`cdf_and_gauss`] (absolute error of Phi
/// <= 0.75e-7 plus the exp error).
#[inline(always)]
pub(crate) fn gelu_erf_f32(h: f32) -> f32 {
    h * cdf_and_gauss(h).0
}

/// `h / (1 + exp(-2u))` = `0.5 h (1 + tanh u)`.
#[inline(always)]
pub(crate) fn gelu_tanh_f32(h: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (h + TANH_CUBIC * h * h * h);
    h / (1.0 + exp_f32(-2.0 * u))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Activation; 6] = [
        Activation::Identity,
        Activation::GeluErf,
        Activation::GeluTanh,
        Activation::QuickGelu,
        Activation::Silu,
        Activation::Relu,
    ];

    #[test]
    fn erf_f64_matches_tabulated_values() {
        // erf at 0.5, 1, 2, 3 (A&S table 7.1 / any CAS), to 16 digits.
        for (z, e) in [
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (3.0, 0.999_977_909_503_001_4),
        ] {
            assert!((erf_f64(z) - e).abs() < 1e-15, "erf({z}) = {}", erf_f64(z));
            assert!((erf_f64(-z) + e).abs() < 1e-15);
        }
        assert_eq!(erf_f64(0.0), 0.0);
        assert_eq!(erf_f64(7.0), 1.0);
    }

    #[test]
    fn as_7_1_26_error_is_within_its_bound() {
        // The stated 1.5e-7 bound of the PTX and fast-CPU erf, evaluated in f64.
        let p = f64::from(AS_P);
        let mut worst = 0f64;
        for i in 0..=80_000 {
            let a = f64::from(i) * 1e-4;
            let t = 1.0 / (1.0 + p * a);
            let mut poly = 0.0;
            for &c in AS_A.iter().rev() {
                poly = poly * t + f64::from(c);
            }
            let approx = 1.0 - poly * t * (-a * a).exp();
            worst = worst.max((approx - erf_f64(a)).abs());
        }
        assert!(worst < 1.5e-7, "A&S 7.1.26 max error {worst:e}");
    }

    #[test]
    fn fast_activations_are_within_their_bound_of_the_f64_formula() {
        for act in ALL {
            let mut worst = 0f64;
            for i in -4000..=4000 {
                let x = i as f32 * 0.003;
                let got = f64::from(act.apply_f32(x));
                let want = act.reference_f64(f64::from(x));
                worst = worst.max((got - want).abs() / (1.0 + want.abs()));
            }
            assert!(worst < 4e-7, "{act:?}: worst scaled error {worst:e}");
        }
    }

    #[test]
    fn activations_propagate_nan_and_saturate() {
        for act in ALL {
            assert!(act.apply_f32(f32::NAN).is_nan(), "{act:?}");
            assert!(act.reference_f64(f64::NAN).is_nan(), "{act:?}");
        }
        assert_eq!(Activation::GeluErf.apply_f32(-30.0), 0.0);
        assert_eq!(Activation::QuickGelu.apply_f32(50.0), 50.0);
        assert_eq!(Activation::Silu.apply_f32(-200.0), 0.0);
    }
}
