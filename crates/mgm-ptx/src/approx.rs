//! Approximate f32 instructions, evaluated exactly (correctly rounded from f64) or at the worst
//! error the PTX ISA allows (see [`crate::Approx`] for the bounds and their source).

use crate::Approx;
use crate::ast::FFn;

/// Documented error bound of one approximate instruction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Bound {
    /// Units in the last place from the correctly rounded result.
    Ulp(u32),
    /// Relative error `|y - f| <= eps * |f|`.
    Rel(f64),
    /// `lg2`: absolute error `eps` for inputs in (0.5, 2), relative `eps` elsewhere.
    Lg2(f64),
}

/// The bound of each approximate function (PTX ISA 9.1, section 9.7.3).
pub(crate) fn bound(f: FFn) -> Option<Bound> {
    match f {
        FFn::Ex2Approx => Some(Bound::Ulp(2)),
        FFn::Lg2Approx => Some(Bound::Lg2(2f64.powi(-22))),
        FFn::RcpApprox => Some(Bound::Ulp(1)),
        FFn::RsqrtApprox => Some(Bound::Rel(2f64.powf(-22.9))),
        FFn::SqrtApprox => Some(Bound::Rel(2f64.powi(-23))),
        FFn::TanhApprox => Some(Bound::Rel(2f64.powi(-11))),
        FFn::RcpRn | FFn::SqrtRn => None,
    }
}

/// Maximum ulp error of `div.approx.f32` (for |b| in [2^-126, 2^126]) and `div.full.f32`.
pub(crate) const DIV_ULP: u32 = 2;

#[inline]
pub(crate) fn flush(x: f32) -> f32 {
    if x.is_subnormal() {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

/// One ulp step of `x` away from zero (`grow`) or towards zero, staying finite.
pub(crate) fn step(x: f32, grow: bool) -> f32 {
    let b = x.to_bits();
    let mag = b & 0x7FFF_FFFF;
    if !x.is_finite() {
        return x;
    }
    let new = if grow {
        if mag >= f32::MAX.to_bits() {
            return x;
        }
        mag + 1
    } else {
        if mag == 0 {
            return x;
        }
        mag - 1
    };
    f32::from_bits((b & 0x8000_0000) | new)
}

/// A deterministic pseudo-random sign for the `call`-th approximate evaluation of input `x`.
fn grow_sign(call: u64, x: u32) -> bool {
    let mut z =
        call.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((x as u64) << 17) ^ 0xD1B5_4A32_D192_ED03;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) & 1 == 1
}

/// Moves the exact value `exact` (with correctly rounded f32 `cr`) to the far side of the bound.
fn perturb(exact: f64, cr: f32, bound: Bound, x: f32, grow: bool) -> f32 {
    match bound {
        Bound::Ulp(n) => {
            let mut y = cr;
            for _ in 0..n {
                y = step(y, grow);
            }
            y
        }
        Bound::Rel(eps) => toward_bound(exact, cr, eps * exact.abs(), grow),
        Bound::Lg2(eps) => {
            let tol = if x > 0.5 && x < 2.0 {
                eps
            } else {
                eps * exact.abs()
            };
            toward_bound(exact, cr, tol, grow)
        }
    }
}

/// The f32 farthest from `exact` (in the chosen direction of magnitude) within `tol` of it.
fn toward_bound(exact: f64, cr: f32, tol: f64, grow: bool) -> f32 {
    let dir = if (exact >= 0.0) == grow { 1.0 } else { -1.0 };
    let mut y = (exact + dir * tol) as f32;
    // Rounding may land past the bound; walk back towards the exact value.
    while y != cr && ((y as f64) - exact).abs() > tol {
        y = if (y as f64) > exact {
            step_down(y)
        } else {
            step_up(y)
        };
    }
    y
}

fn step_up(y: f32) -> f32 {
    if y >= 0.0 {
        step(y, true)
    } else {
        step(y, false)
    }
}

fn step_down(y: f32) -> f32 {
    if y > 0.0 {
        step(y, false)
    } else {
        step(y, true)
    }
}

/// The exact value of `f` at `x` in f64.
fn exact(f: FFn, x: f32) -> f64 {
    let x = x as f64;
    match f {
        FFn::Ex2Approx => x.exp2(),
        FFn::Lg2Approx => x.log2(),
        FFn::RcpApprox | FFn::RcpRn => 1.0 / x,
        FFn::RsqrtApprox => 1.0 / x.sqrt(),
        FFn::SqrtApprox | FFn::SqrtRn => x.sqrt(),
        FFn::TanhApprox => x.tanh(),
    }
}

/// Evaluates a single-input f32 function; `call` picks the direction of the worst-case error.
pub(crate) fn eval(f: FFn, x: f32, ftz: bool, approx: Approx, call: u64) -> f32 {
    let x = if ftz { flush(x) } else { x };
    let y = match f {
        // IEEE round-to-nearest in f32 directly.
        FFn::RcpRn => 1.0 / x,
        FFn::SqrtRn => x.sqrt(),
        _ => {
            let e = exact(f, x);
            let cr = e as f32;
            let special = !x.is_finite() || x == 0.0 || !e.is_finite() || e == 0.0 || cr == 0.0;
            // tanh passes subnormal inputs through unchanged.
            let passthrough = f == FFn::TanhApprox && x.is_subnormal();
            match (approx, bound(f)) {
                (Approx::WorstCase, Some(b)) if !special && !passthrough => {
                    perturb(e, cr, b, x, grow_sign(call, x.to_bits()))
                }
                _ if passthrough => x,
                _ => cr,
            }
        }
    };
    if ftz { flush(y) } else { y }
}

/// `div.approx.f32` (`full == false`) and `div.full.f32`.
pub(crate) fn div(a: f32, b: f32, ftz: bool, full: bool, approx: Approx, call: u64) -> f32 {
    let (a, b) = if ftz { (flush(a), flush(b)) } else { (a, b) };
    let big = 2f32.powi(126);
    let y = if !full && b.is_finite() && b.abs() > big {
        // Documented: d = a * (1/b) with 1/b flushed to zero.
        if a.is_infinite() {
            f32::NAN
        } else {
            f32::from_bits((a.to_bits() ^ b.to_bits()) & 0x8000_0000)
        }
    } else {
        let cr = a / b;
        let special = !a.is_finite()
            || !b.is_finite()
            || a == 0.0
            || b == 0.0
            || !cr.is_finite()
            || cr == 0.0;
        if approx == Approx::WorstCase && !special {
            perturb(
                cr as f64,
                cr,
                Bound::Ulp(DIV_ULP),
                a,
                grow_sign(call, a.to_bits() ^ b.to_bits().rotate_left(7)),
            )
        } else {
            cr
        }
    };
    if ftz { flush(y) } else { y }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_values_follow_the_ptx_tables() {
        for approx in [Approx::Exact, Approx::WorstCase] {
            assert_eq!(
                eval(FFn::Ex2Approx, f32::NEG_INFINITY, false, approx, 1),
                0.0
            );
            assert_eq!(eval(FFn::Ex2Approx, -0.0, false, approx, 1), 1.0);
            assert_eq!(
                eval(FFn::Lg2Approx, 0.0, false, approx, 1),
                f32::NEG_INFINITY
            );
            assert!(eval(FFn::Lg2Approx, -1.0, false, approx, 1).is_nan());
            assert_eq!(eval(FFn::RcpApprox, 0.0, false, approx, 1), f32::INFINITY);
            assert_eq!(
                eval(FFn::RcpApprox, -0.0, false, approx, 1),
                f32::NEG_INFINITY
            );
            assert_eq!(eval(FFn::RsqrtApprox, f32::INFINITY, false, approx, 1), 0.0);
            assert_eq!(
                eval(FFn::RsqrtApprox, -0.0, false, approx, 1),
                f32::NEG_INFINITY
            );
            assert_eq!(
                eval(FFn::SqrtApprox, -0.0, false, approx, 1).to_bits(),
                (-0.0f32).to_bits()
            );
            assert_eq!(
                eval(FFn::TanhApprox, f32::NEG_INFINITY, false, approx, 1),
                -1.0
            );
            assert_eq!(eval(FFn::TanhApprox, 1e-40, false, approx, 1), 1e-40);
        }
    }

    #[test]
    fn worst_case_reaches_the_bound_in_both_directions() {
        let x = 0.3f32;
        let e = (x as f64).exp2();
        let ys: Vec<f32> = (0..64)
            .map(|c| eval(FFn::Ex2Approx, x, false, Approx::WorstCase, c))
            .collect();
        let cr = e as f32;
        assert!(ys.contains(&step(step(cr, true), true)));
        assert!(ys.contains(&step(step(cr, false), false)));
        let t: Vec<f64> = (0..64)
            .map(|c| eval(FFn::TanhApprox, x, false, Approx::WorstCase, c) as f64)
            .collect();
        let te = (x as f64).tanh();
        let worst = t.iter().map(|y| ((y - te) / te).abs()).fold(0.0, f64::max);
        assert!(
            worst <= 2f64.powi(-11) && worst > 0.99 * 2f64.powi(-11),
            "{worst}"
        );
    }
}
