//! Approximate instructions: `Approx::WorstCase` stays within the PTX ISA's documented bound of
//! the exact (f64) value and actually reaches it; `Approx::Exact` is correctly rounded.

mod common;

use common::*;
use mgm_ptx::{Approx, Arg, Launch};

const FNS: [&str; 7] = [
    "ex2.approx.f32",
    "lg2.approx.f32",
    "rcp.approx.f32",
    "rsqrt.approx.f32",
    "sqrt.approx.f32",
    "tanh.approx.f32",
    "div.approx.f32",
];

/// Runs every approximate instruction on `x` (and `div` as x / y) and returns one output
/// vector per instruction.
fn eval(x: &[f32], y: &[f32], approx: Approx, ftz: bool) -> Vec<Vec<f32>> {
    let mut body = String::from(
        "ld.param.u64 %rd2, [x];\nld.param.u64 %rd3, [y];\nadd.s64 %rd4, %rd2, %rd30;\nadd.s64 %rd5, %rd3, %rd30;\n\
         ld.global.f32 %f1, [%rd4];\nld.global.f32 %f2, [%rd5];\nld.param.u32 %r2, [n];\n",
    );
    for (k, f) in FNS.iter().enumerate() {
        let op = if ftz && !f.starts_with("tanh") {
            f.replace(".f32", ".ftz.f32")
        } else {
            f.to_string()
        };
        let args = if f.starts_with("div") {
            "%f1, %f2"
        } else {
            "%f1"
        };
        body += &format!(
            "{op} %f3, {args};\nmad.lo.u32 %r3, %r2, {k}, %r1;\nmul.wide.u32 %rd6, %r3, 4;\nadd.s64 %rd7, %rd1, %rd6;\nst.global.f32 [%rd7], %f3;\n"
        );
    }
    let m = module(&kernel(
        "approx",
        ", .param .u64 x, .param .u64 y, .param .u32 n",
        &body,
    ));
    let n = x.len();
    assert_eq!(n % 256, 0);
    let mut out = vec![0f32; n * FNS.len()];
    let l = Launch {
        grid: [(n / 256) as u32, 1, 1],
        block: [256, 1, 1],
        shared_bytes: 0,
        approx,
    };
    run(
        &m,
        "approx",
        l,
        &mut [
            Arg::output(&mut out),
            Arg::input(x),
            Arg::input(y),
            Arg::U32(n as u32),
        ],
    )
    .unwrap();
    out.chunks(n).map(|c| c.to_vec()).collect()
}

fn exact(k: usize, x: f32, y: f32) -> f64 {
    let x = x as f64;
    match k {
        0 => x.exp2(),
        1 => x.log2(),
        2 => 1.0 / x,
        3 => 1.0 / x.sqrt(),
        4 => x.sqrt(),
        5 => x.tanh(),
        _ => x / y as f64,
    }
}

/// Distance in ulps between two finite f32 of the same sign.
fn ulps(a: f32, b: f32) -> u32 {
    assert_eq!(a.is_sign_negative(), b.is_sign_negative(), "{a} {b}");
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
}

fn next_up(x: f32) -> f32 {
    if x >= 0.0 {
        f32::from_bits(x.to_bits() + 1)
    } else {
        f32::from_bits(x.to_bits() - 1)
    }
}

fn next_down(x: f32) -> f32 {
    if x > 0.0 {
        f32::from_bits(x.to_bits() - 1)
    } else if x == 0.0 {
        -f32::from_bits(1)
    } else {
        f32::from_bits(x.to_bits() + 1)
    }
}

/// Inputs: positive normals over the whole exponent range, plus ranges where each function is
/// interesting (ex2 in [-150, 130], tanh in [-10, 10], lg2 around 1).
fn inputs() -> (Vec<f32>, Vec<f32>) {
    let mut s = 12345u64;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 32) as u32
    };
    let mut x = Vec::new();
    let mut y = Vec::new();
    for i in 0..4096 {
        let r = next();
        let v = match i % 4 {
            0 => f32::from_bits((r % 0x7F00_0000) + 0x0080_0000), // positive normal
            1 => (r as f32 / u32::MAX as f32) * 280.0 - 150.0,
            2 => (r as f32 / u32::MAX as f32) * 20.0 - 10.0,
            _ => 0.5 + (r as f32 / u32::MAX as f32) * 1.5,
        };
        x.push(v);
        let d = f32::from_bits((next() % 0x7D00_0000) + 0x0100_0000);
        y.push(if next() % 2 == 0 { d } else { -d });
    }
    (x, y)
}

/// Checks each output against its documented bound; returns the largest error seen per
/// function as a fraction of the bound.
fn check_bounds(x: &[f32], y: &[f32], out: &[Vec<f32>]) -> Vec<f64> {
    let mut worst = vec![0f64; FNS.len()];
    for (k, o) in out.iter().enumerate() {
        for i in 0..x.len() {
            let e = exact(k, x[i], y[i]);
            let got = o[i];
            let cr = e as f32;
            if !e.is_finite() || e == 0.0 || cr == 0.0 || !cr.is_finite() || cr.is_subnormal() {
                continue; // special values are checked separately
            }
            let frac = match k {
                0 | 2 | 6 => {
                    let bound = if k == 2 { 1.0 } else { 2.0 };
                    ulps(got, cr) as f64 / bound
                }
                1 => {
                    let d = (got as f64 - e).abs();
                    if x[i] > 0.5 && x[i] < 2.0 {
                        d / 2f64.powi(-22)
                    } else {
                        d / (e.abs() * 2f64.powi(-22))
                    }
                }
                3 => (got as f64 - e).abs() / (e.abs() * 2f64.powf(-22.9)),
                4 => (got as f64 - e).abs() / (e.abs() * 2f64.powi(-23)),
                _ => (got as f64 - e).abs() / (e.abs() * 2f64.powi(-11)),
            };
            assert!(
                frac <= 1.0,
                "{}({:e}{}) = {got:e}, exact {e:e}: {frac} x bound",
                FNS[k],
                x[i],
                if k == 6 {
                    format!(", {:e}", y[i])
                } else {
                    String::new()
                }
            );
            worst[k] = worst[k].max(frac);
        }
    }
    worst
}

#[test]
fn worst_case_stays_within_and_reaches_the_documented_bounds() {
    let (x, y) = inputs();
    let out = eval(&x, &y, Approx::WorstCase, false);
    let worst = check_bounds(&x, &y, &out);
    eprintln!(
        "largest error / documented bound: {:?}",
        FNS.iter().zip(&worst).collect::<Vec<_>>()
    );
    for (k, w) in worst.iter().enumerate() {
        // Rounding to f32 keeps relative bounds at 2^-23 from being hit exactly.
        assert!(*w > 0.5, "{} never goes near its bound: {w}", FNS[k]);
    }
}

#[test]
fn exact_mode_is_correctly_rounded() {
    let (x, y) = inputs();
    let out = eval(&x, &y, Approx::Exact, false);
    for (k, o) in out.iter().enumerate() {
        for i in 0..x.len() {
            let e = exact(k, x[i], y[i]);
            let got = o[i];
            if !e.is_finite() || !got.is_finite() || got == 0.0 {
                assert!(
                    got.to_bits() == (e as f32).to_bits() || got.is_nan() && e.is_nan(),
                    "{}({})",
                    FNS[k],
                    x[i]
                );
                continue;
            }
            // No f32 neighbour is closer to the exact value.
            let d = (got as f64 - e).abs();
            assert!(
                d <= (next_up(got) as f64 - e).abs() && d <= (next_down(got) as f64 - e).abs(),
                "{}({:e}) = {got:e}, exact {e:e}",
                FNS[k],
                x[i]
            );
        }
    }
}

#[test]
fn special_values_follow_the_isa_tables_in_both_modes() {
    let inf = f32::INFINITY;
    let x: Vec<f32> = [-inf, -0.0, 0.0, inf, f32::NAN, -1.0, 1e-40]
        .iter()
        .copied()
        .cycle()
        .take(256)
        .collect();
    let y = vec![1.0f32; 256];
    for approx in [Approx::Exact, Approx::WorstCase] {
        let out = eval(&x, &y, approx, false);
        let get = |k: usize, i: usize| out[k][i];
        // ex2
        assert_eq!(get(0, 0).to_bits(), 0.0f32.to_bits());
        assert_eq!((get(0, 1), get(0, 2), get(0, 3)), (1.0, 1.0, inf));
        assert!(get(0, 4).is_nan());
        // lg2
        assert!(get(1, 0).is_nan() && get(1, 5).is_nan());
        assert_eq!((get(1, 1), get(1, 2), get(1, 3)), (-inf, -inf, inf));
        // rcp
        assert_eq!(
            (get(2, 0).to_bits(), get(2, 1), get(2, 2), get(2, 3)),
            ((-0.0f32).to_bits(), -inf, inf, 0.0)
        );
        // rsqrt
        assert!(get(3, 0).is_nan() && get(3, 5).is_nan());
        assert_eq!((get(3, 1), get(3, 2), get(3, 3)), (-inf, inf, 0.0));
        // sqrt
        assert!(get(4, 0).is_nan());
        assert_eq!(
            (get(4, 1).to_bits(), get(4, 2), get(4, 3)),
            ((-0.0f32).to_bits(), 0.0, inf)
        );
        // tanh, with subnormals passed through
        assert_eq!(
            (get(5, 0), get(5, 1).to_bits(), get(5, 3), get(5, 6)),
            (-1.0, (-0.0f32).to_bits(), 1.0, 1e-40)
        );
    }
}

#[test]
fn ftz_flushes_subnormal_inputs_and_results() {
    let mut x = vec![1e-40f32; 256];
    x[1] = -1e-40;
    x[2] = -130.0; // ex2 result is subnormal
    let y = vec![1.0f32; 256];
    let out = eval(&x, &y, Approx::Exact, true);
    assert_eq!(out[0][0], 1.0); // ex2(+0)
    assert_eq!(out[0][2].to_bits(), 0); // flushed result
    assert_eq!(out[1][0], f32::NEG_INFINITY); // lg2(+0)
    assert_eq!(out[2][1], f32::NEG_INFINITY); // rcp(-0)
    assert_eq!(out[4][1].to_bits(), (-0.0f32).to_bits()); // sqrt(-0)
    let plain = eval(&x, &y, Approx::Exact, false);
    assert!(plain[0][2] > 0.0 && plain[1][0].is_finite());
}

#[test]
fn div_approx_flushes_huge_divisors_to_zero() {
    let x: Vec<f32> = [3.0f32, f32::INFINITY, -2.0]
        .iter()
        .copied()
        .cycle()
        .take(256)
        .collect();
    let y = vec![2f32.powi(127); 256];
    let out = eval(&x, &y, Approx::WorstCase, false);
    assert_eq!(out[6][0].to_bits(), 0);
    assert!(out[6][1].is_nan());
    assert_eq!(out[6][2].to_bits(), (-0.0f32).to_bits());
}
