//! Instruction semantics: small kernels compared with values computed in Rust.

mod common;

use common::*;
use mgm_ptx::{Arg, Error, Fault};

const REDUCE: &str = include_str!("ptx/reduce.ptx");

#[test]
fn block_sum_matches_rust_sum_over_several_blocks() {
    let m = module(REDUCE);
    let n = 1000usize;
    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32) * 0.25 - 3.0)
        .collect();
    let blocks = n.div_ceil(256);
    let mut out = vec![0f32; blocks];
    let stats = run(
        &m,
        "block_sum",
        launch(blocks as u32, 256),
        &mut [Arg::input(&x), Arg::output(&mut out), Arg::U32(n as u32)],
    )
    .unwrap();
    for b in 0..blocks {
        let want: f64 = x[b * 256..((b + 1) * 256).min(n)]
            .iter()
            .map(|&v| v as f64)
            .sum();
        assert!(
            (out[b] as f64 - want).abs() < 1e-3,
            "block {b}: {} vs {want}",
            out[b]
        );
    }
    assert_eq!(stats.barriers, blocks as u64 * 9);
    assert_eq!(stats.shared_bytes, 1024);
}

#[test]
fn warp_sum_with_shfl_bfly_matches_rust_sum() {
    let m = module(REDUCE);
    let x: Vec<f32> = (0..128).map(|i| (i as f32).sin()).collect();
    let mut out = vec![0f32; 4];
    let stats = run(
        &m,
        "warp_sum",
        launch(2, 64),
        &mut [Arg::input(&x), Arg::output(&mut out)],
    )
    .unwrap();
    for w in 0..4 {
        let want: f64 = x[w * 32..(w + 1) * 32].iter().map(|&v| v as f64).sum();
        assert!((out[w] as f64 - want).abs() < 1e-5, "warp {w}");
    }
    assert_eq!(stats.shuffles, 4 * 5);
}

#[test]
fn out_of_bounds_read_names_kernel_line_block_and_thread() {
    let m = module(REDUCE);
    let x = vec![1f32; 255];
    let mut out = vec![0f32; 1];
    // n claims 256 elements: thread 255 reads one past the end.
    let e = run(
        &m,
        "block_sum",
        launch(1, 256),
        &mut [Arg::input(&x), Arg::output(&mut out), Arg::U32(256)],
    )
    .unwrap_err();
    let want_line = REDUCE
        .lines()
        .position(|l| l.contains("ld.global.f32 %f1, [%rd4]"))
        .unwrap()
        + 1;
    let Error::Exec {
        kernel,
        line,
        block,
        thread,
        fault,
    } = &e
    else {
        panic!("{e}")
    };
    assert_eq!(
        (kernel.as_str(), *line, *block, *thread),
        ("block_sum", want_line, [0, 0, 0], [255, 0, 0])
    );
    assert!(matches!(fault, Fault::GlobalOutOfBounds { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("block_sum")
            && msg.contains(&format!("line {want_line}"))
            && msg.contains("past the end"),
        "{msg}"
    );
}

/// Deterministic pseudo-random u32s (a plain LCG: the tests need variety, not quality).
fn lcg(seed: u64, n: usize) -> Vec<u32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 32) as u32
        })
        .collect()
}

const INT_OPS: &str = "
ld.param.u64 %rd2, [a];
ld.param.u64 %rd3, [b];
ld.param.u64 %rd4, [wide];
add.s64 %rd5, %rd2, %rd30;
add.s64 %rd6, %rd3, %rd30;
ld.global.u32 %r2, [%rd5];
ld.global.u32 %r3, [%rd6];
mul.wide.u32 %rd7, %r1, 64;
add.s64 %rd7, %rd1, %rd7;
add.u32 %r4, %r2, %r3;       st.global.u32 [%rd7], %r4;
sub.u32 %r4, %r2, %r3;       st.global.u32 [%rd7+4], %r4;
mul.lo.u32 %r4, %r2, %r3;    st.global.u32 [%rd7+8], %r4;
mul.hi.u32 %r4, %r2, %r3;    st.global.u32 [%rd7+12], %r4;
mul.hi.s32 %r4, %r2, %r3;    st.global.u32 [%rd7+16], %r4;
div.u32 %r4, %r2, %r3;       st.global.u32 [%rd7+20], %r4;
div.s32 %r4, %r2, %r3;       st.global.u32 [%rd7+24], %r4;
rem.u32 %r4, %r2, %r3;       st.global.u32 [%rd7+28], %r4;
rem.s32 %r4, %r2, %r3;       st.global.u32 [%rd7+32], %r4;
min.s32 %r4, %r2, %r3;       st.global.u32 [%rd7+36], %r4;
max.u32 %r4, %r2, %r3;       st.global.u32 [%rd7+40], %r4;
and.b32 %r5, %r3, 63;
shl.b32 %r4, %r2, %r5;       st.global.u32 [%rd7+44], %r4;
shr.u32 %r4, %r2, %r5;       st.global.u32 [%rd7+48], %r4;
shr.s32 %r4, %r2, %r5;       st.global.u32 [%rd7+52], %r4;
abs.s32 %r4, %r2;            st.global.u32 [%rd7+56], %r4;
mad.lo.s32 %r4, %r2, %r3, %r2;
xor.b32 %r4, %r4, 0x5a5a5a5a;
not.b32 %r4, %r4;            st.global.u32 [%rd7+60], %r4;
mul.wide.u32 %rd8, %r1, 32;
add.s64 %rd8, %rd4, %rd8;
mul.wide.s32 %rd9, %r2, %r3;  st.global.u64 [%rd8], %rd9;
mul.wide.u32 %rd9, %r2, %r3;  st.global.u64 [%rd8+8], %rd9;
cvt.s64.s32 %rd10, %r2;
cvt.s64.s32 %rd11, %r3;
mad.wide.s32 %rd9, %r2, %r3, %rd10; st.global.u64 [%rd8+16], %rd9;
div.s64 %rd9, %rd9, %rd11;
shr.s64 %rd9, %rd9, 3;
neg.s64 %rd9, %rd9;           st.global.u64 [%rd8+24], %rd9;
";

#[test]
fn integer_arithmetic_matches_rust_wrapping_ops() {
    let src = kernel(
        "ints",
        ", .param .u64 a, .param .u64 b, .param .u64 wide",
        INT_OPS,
    );
    let m = module(&src);
    let n = 512;
    let a = lcg(1, n);
    // Small and large divisors, never zero, never the overflowing i32::MIN / -1.
    let b: Vec<u32> = lcg(2, n)
        .iter()
        .enumerate()
        .map(|(i, &v)| if i % 3 == 0 { (v % 100) + 1 } else { v | 1 })
        .collect();
    let mut out = vec![0u32; n * 16];
    let mut wide = vec![0u64; n * 4];
    run(
        &m,
        "ints",
        launch(4, 128),
        &mut [
            Arg::output(&mut out),
            Arg::input(&a),
            Arg::input(&b),
            Arg::output(&mut wide),
        ],
    )
    .unwrap();
    for i in 0..n {
        let (x, y) = (a[i], b[i]);
        let (sx, sy) = (x as i32, y as i32);
        let sh = y & 63;
        let want = [
            x.wrapping_add(y),
            x.wrapping_sub(y),
            x.wrapping_mul(y),
            ((x as u64 * y as u64) >> 32) as u32,
            ((sx as i64 * sy as i64) >> 32) as u32,
            x / y,
            (sx / sy) as u32,
            x % y,
            (sx % sy) as u32,
            sx.min(sy) as u32,
            x.max(y),
            if sh >= 32 { 0 } else { x << sh },
            if sh >= 32 { 0 } else { x >> sh },
            (sx >> sh.min(31)) as u32,
            sx.unsigned_abs(),
            !((sx.wrapping_mul(sy).wrapping_add(sx)) as u32 ^ 0x5a5a_5a5a),
        ];
        assert_eq!(
            &out[i * 16..i * 16 + 16],
            &want,
            "thread {i}: a={x:#x} b={y:#x}"
        );
        let mw = sx as i64 * sy as i64;
        let q = (mw + sx as i64) / sy as i64;
        let want64 = [
            mw as u64,
            x as u64 * y as u64,
            (mw + sx as i64) as u64,
            (-(q >> 3)) as u64,
        ];
        assert_eq!(&wide[i * 4..i * 4 + 4], &want64, "thread {i} (64-bit)");
    }
}

const FLOAT_OPS: &str = "
ld.param.u64 %rd2, [a];
ld.param.u64 %rd3, [b];
add.s64 %rd5, %rd2, %rd30;
add.s64 %rd6, %rd3, %rd30;
ld.global.f32 %f2, [%rd5];
ld.global.f32 %f3, [%rd6];
mul.wide.u32 %rd7, %r1, 56;
add.s64 %rd7, %rd1, %rd7;
add.f32 %f4, %f2, %f3;          st.global.f32 [%rd7], %f4;
sub.rn.f32 %f4, %f2, %f3;       st.global.f32 [%rd7+4], %f4;
mul.f32 %f4, %f2, %f3;          st.global.f32 [%rd7+8], %f4;
fma.rn.f32 %f4, %f2, %f3, %f2;  st.global.f32 [%rd7+12], %f4;
div.rn.f32 %f4, %f2, %f3;       st.global.f32 [%rd7+16], %f4;
sqrt.rn.f32 %f4, %f3;           st.global.f32 [%rd7+20], %f4;
rcp.rn.f32 %f4, %f3;            st.global.f32 [%rd7+24], %f4;
neg.f32 %f4, %f2;               st.global.f32 [%rd7+28], %f4;
abs.f32 %f4, %f2;               st.global.f32 [%rd7+32], %f4;
min.f32 %f4, %f2, %f3;          st.global.f32 [%rd7+36], %f4;
max.f32 %f4, %f2, %f3;          st.global.f32 [%rd7+40], %f4;
add.ftz.f32 %f4, %f2, %f3;      st.global.f32 [%rd7+44], %f4;
mul.ftz.f32 %f4, %f2, %f3;      st.global.f32 [%rd7+48], %f4;
selp.f32 %f4, %f2, %f3, %p0;
setp.gt.f32 %p1, %f2, %f3;
selp.f32 %f4, %f2, %f3, %p1;    st.global.f32 [%rd7+52], %f4;
";

fn same_f32(got: f32, want: f32) -> bool {
    got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan())
}

fn ftz(x: f32) -> f32 {
    if x != 0.0 && x.abs() < f32::MIN_POSITIVE {
        0.0f32.copysign(x)
    } else {
        x
    }
}

#[test]
fn f32_arithmetic_is_exact_ieee_with_ptx_min_max_and_ftz() {
    let src = kernel("floats", ", .param .u64 a, .param .u64 b", FLOAT_OPS);
    let m = module(&src);
    let mut a: Vec<f32> = lcg(3, 256).iter().map(|&v| f32::from_bits(v)).collect();
    let mut b: Vec<f32> = lcg(4, 256)
        .iter()
        .map(|&v| (v as f32 / u32::MAX as f32 - 0.25) * 1e3)
        .collect();
    let specials = [
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1e-40,
        -1e-42,
        f32::MIN_POSITIVE,
        1.0,
    ];
    for (i, s) in specials.iter().enumerate() {
        a[i] = *s;
        b[i + 16] = *s;
        a[i + 32] = *s;
        b[i + 32] = specials[(i + 3) % specials.len()];
    }
    let mut out = vec![0f32; 256 * 14];
    run(
        &m,
        "floats",
        launch(2, 128),
        &mut [Arg::output(&mut out), Arg::input(&a), Arg::input(&b)],
    )
    .unwrap();
    for i in 0..256 {
        let (x, y) = (a[i], b[i]);
        // PTX min/max return the non-NaN operand and order -0 below +0.
        let pmin = if x.is_nan() {
            y
        } else if y.is_nan() {
            x
        } else if x == y {
            if x.is_sign_negative() { x } else { y }
        } else if x < y {
            x
        } else {
            y
        };
        let pmax = if x.is_nan() {
            y
        } else if y.is_nan() {
            x
        } else if x == y {
            if x.is_sign_positive() { x } else { y }
        } else if x > y {
            x
        } else {
            y
        };
        let want = [
            x + y,
            x - y,
            x * y,
            x.mul_add(y, x),
            x / y,
            y.sqrt(),
            1.0 / y,
            -x,
            x.abs(),
            pmin,
            pmax,
            ftz(ftz(x) + ftz(y)),
            ftz(ftz(x) * ftz(y)),
            if x > y { x } else { y },
        ];
        for (j, w) in want.iter().enumerate() {
            assert!(
                same_f32(out[i * 14 + j], *w),
                "thread {i} op {j}: x={x:e} y={y:e} got {:e} want {w:e}",
                out[i * 14 + j]
            );
        }
    }
}

#[test]
fn setp_covers_ordered_and_unordered_compares_with_nan() {
    let names = [
        "eq", "ne", "lt", "le", "gt", "ge", "equ", "neu", "ltu", "leu", "gtu", "geu", "num", "nan",
    ];
    let mut body = String::from(
        "ld.param.u64 %rd2, [a];\nld.param.u64 %rd3, [b];\nadd.s64 %rd5, %rd2, %rd30;\nadd.s64 %rd6, %rd3, %rd30;\n\
         ld.global.f32 %f2, [%rd5];\nld.global.f32 %f3, [%rd6];\nmul.wide.u32 %rd7, %r1, 56;\nadd.s64 %rd7, %rd1, %rd7;\n",
    );
    for (j, c) in names.iter().enumerate() {
        body += &format!(
            "setp.{c}.f32 %p1, %f2, %f3;\nselp.u32 %r4, 1, 0, %p1;\nst.global.u32 [%rd7+{}], %r4;\n",
            4 * j
        );
    }
    let m = module(&kernel("cmp", ", .param .u64 a, .param .u64 b", &body));
    let vals = [f32::NAN, -1.0, 0.0, -0.0, 1.0, f32::INFINITY];
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for &x in &vals {
        for &y in &vals {
            a.push(x);
            b.push(y);
        }
    }
    a.resize(64, 0.0);
    b.resize(64, 0.0);
    let mut out = vec![0u32; 64 * 14];
    run(
        &m,
        "cmp",
        launch(1, 64),
        &mut [Arg::output(&mut out), Arg::input(&a), Arg::input(&b)],
    )
    .unwrap();
    for i in 0..64 {
        let ord = a[i].partial_cmp(&b[i]);
        let un = ord.is_none();
        use std::cmp::Ordering::*;
        let want = [
            ord == Some(Equal),
            matches!(ord, Some(Less | Greater)),
            ord == Some(Less),
            matches!(ord, Some(Less | Equal)),
            ord == Some(Greater),
            matches!(ord, Some(Greater | Equal)),
            un || ord == Some(Equal),
            un || matches!(ord, Some(Less | Greater)),
            un || ord == Some(Less),
            un || matches!(ord, Some(Less | Equal)),
            un || ord == Some(Greater),
            un || matches!(ord, Some(Greater | Equal)),
            !un,
            un,
        ];
        for (j, w) in want.iter().enumerate() {
            assert_eq!(
                out[i * 14 + j] == 1,
                *w,
                "setp.{} {} {}",
                names[j],
                a[i],
                b[i]
            );
        }
    }
}

#[test]
fn integer_setp_distinguishes_signed_and_unsigned() {
    let body = "ld.param.u64 %rd2, [a];\nadd.s64 %rd5, %rd2, %rd30;\nld.global.u32 %r2, [%rd5];\n\
                mul.wide.u32 %rd7, %r1, 16;\nadd.s64 %rd7, %rd1, %rd7;\n\
                setp.lt.s32 %p1, %r2, 5;\nselp.u32 %r4, 1, 0, %p1;\nst.global.u32 [%rd7], %r4;\n\
                setp.lo.u32 %p1, %r2, 5;\nselp.u32 %r4, 1, 0, %p1;\nst.global.u32 [%rd7+4], %r4;\n\
                setp.hs.u32 %p1, %r2, 5;\nselp.u32 %r4, 1, 0, %p1;\nst.global.u32 [%rd7+8], %r4;\n\
                setp.ge.s32 %p1, %r2, -3;\nsetp.ne.and.s32 %p2, %r2, 0, %p1;\nselp.u32 %r4, 1, 0, %p2;\nst.global.u32 [%rd7+12], %r4;";
    let m = module(&kernel("icmp", ", .param .u64 a", body));
    let a: Vec<u32> = [0u32, 1, 4, 5, 6, u32::MAX, (-3i32) as u32, (-4i32) as u32].repeat(4);
    let mut out = vec![0u32; 32 * 4];
    run(
        &m,
        "icmp",
        launch(1, 32),
        &mut [Arg::output(&mut out), Arg::input(&a)],
    )
    .unwrap();
    for (i, &x) in a.iter().enumerate() {
        let s = x as i32;
        let want = [
            (s < 5) as u32,
            (x < 5) as u32,
            (x >= 5) as u32,
            (s >= -3 && x != 0) as u32,
        ];
        assert_eq!(&out[i * 4..i * 4 + 4], &want, "x = {s}");
    }
}

/// Rounds the exact integer `v` to f32 in `mode` by checking the f32 neighbours of `v as f32`.
fn int_to_f32_ref(v: i64, mode: char) -> f32 {
    let near = v as f32;
    let up = |x: f32| {
        f32::from_bits(if x >= 0.0 {
            x.to_bits() + 1
        } else {
            x.to_bits() - 1
        })
    };
    let down = |x: f32| {
        f32::from_bits(if x > 0.0 {
            x.to_bits() - 1
        } else {
            x.to_bits() + 1
        })
    };
    let exact = v as f64; // exact for |v| < 2^53
    let (lo, hi) = if near as f64 >= exact {
        (
            if near as f64 == exact {
                near
            } else {
                down(near)
            },
            near,
        )
    } else {
        (near, up(near))
    };
    match mode {
        'n' => near,
        'm' => lo,
        'p' => hi,
        _ => {
            if v >= 0 {
                lo
            } else {
                hi
            }
        }
    }
}

#[test]
fn cvt_rounding_modes_match_rust_references() {
    let mut body = String::from(
        "ld.param.u64 %rd2, [a];\nld.param.u64 %rd3, [b];\nadd.s64 %rd5, %rd2, %rd30;\nadd.s64 %rd6, %rd3, %rd30;\n\
         ld.global.f32 %f2, [%rd5];\nld.global.s32 %r2, [%rd6];\nmul.wide.u32 %rd7, %r1, 64;\nadd.s64 %rd7, %rd1, %rd7;\n",
    );
    let mut k = 0;
    for r in ["rni", "rzi", "rmi", "rpi"] {
        body += &format!(
            "cvt.{r}.s32.f32 %r4, %f2;\nst.global.s32 [%rd7+{}], %r4;\n",
            4 * k
        );
        k += 1;
        body += &format!(
            "cvt.{r}.u32.f32 %r4, %f2;\nst.global.u32 [%rd7+{}], %r4;\n",
            4 * k
        );
        k += 1;
        body += &format!(
            "cvt.{r}.f32.f32 %f4, %f2;\nst.global.f32 [%rd7+{}], %f4;\n",
            4 * k
        );
        k += 1;
    }
    for r in ["rn", "rz", "rm", "rp"] {
        body += &format!(
            "cvt.{r}.f32.s32 %f4, %r2;\nst.global.f32 [%rd7+{}], %f4;\n",
            4 * k
        );
        k += 1;
    }
    assert_eq!(k, 16);
    let m = module(&kernel("cvts", ", .param .u64 a, .param .u64 b", &body));
    let mut a: Vec<f32> = vec![
        0.5,
        1.5,
        2.5,
        -0.5,
        -1.5,
        -2.5,
        2.4,
        -2.6,
        1e10,
        -1e10,
        4294967295.0,
        4294967296.0,
        2147483520.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
        1e-40,
        3.999_999_8,
    ];
    a.extend(
        lcg(5, 64 - a.len())
            .iter()
            .map(|&v| (v as f32 / 1e6) - 2000.0),
    );
    let mut b: Vec<i32> = vec![
        16777217,
        -16777217,
        16777219,
        i32::MAX,
        i32::MIN,
        -1,
        0,
        33554435,
        -33554435,
    ];
    b.extend(lcg(6, 64 - b.len()).iter().map(|&v| v as i32));
    let mut out = vec![0u32; 64 * 16];
    run(
        &m,
        "cvts",
        launch(1, 64),
        &mut [Arg::output(&mut out), Arg::input(&a), Arg::input(&b)],
    )
    .unwrap();
    for i in 0..64 {
        let x = a[i] as f64;
        let rounders: [fn(f64) -> f64; 4] =
            [f64::round_ties_even, f64::trunc, f64::floor, f64::ceil];
        for (r, round) in rounders.iter().enumerate() {
            let v = round(x);
            // PTX saturates float-to-int conversions and maps NaN to 0.
            let s = if x.is_nan() {
                0
            } else {
                v.clamp(i32::MIN as f64, i32::MAX as f64) as i32
            };
            let u = if x.is_nan() {
                0
            } else {
                v.clamp(0.0, u32::MAX as f64) as u32
            };
            let fl = round(x) as f32;
            assert_eq!(out[i * 16 + 3 * r] as i32, s, "s32 mode {r} of {}", a[i]);
            assert_eq!(out[i * 16 + 3 * r + 1], u, "u32 mode {r} of {}", a[i]);
            assert!(
                same_f32(f32::from_bits(out[i * 16 + 3 * r + 2]), fl),
                "f32 mode {r} of {}",
                a[i]
            );
        }
        for (r, mode) in ['n', 'z', 'm', 'p'].iter().enumerate() {
            let got = f32::from_bits(out[i * 16 + 12 + r]);
            assert_eq!(
                got,
                int_to_f32_ref(b[i] as i64, *mode),
                "cvt.r{mode}.f32.s32 of {}",
                b[i]
            );
        }
    }
}

#[test]
fn bf16_conversions_round_to_nearest_even_like_half() {
    let body = "ld.param.u64 %rd2, [a];\nadd.s64 %rd5, %rd2, %rd30;\nld.global.f32 %f2, [%rd5];\n\
                cvt.rn.bf16.f32 %rs1, %f2;\nmul.wide.u32 %rd7, %r1, 2;\nadd.s64 %rd8, %rd1, %rd7;\nst.global.b16 [%rd8], %rs1;\n\
                ld.param.u64 %rd3, [back];\nadd.s64 %rd9, %rd3, %rd30;\n\
                cvt.u32.u16 %r2, %rs1;\nshl.b32 %r2, %r2, 16;\nmov.b32 %f3, %r2;\ncvt.f32.bf16 %f4, %rs1;\n\
                setp.eq.b32 %p1, %r2, %f4;\n@!%p1 bra BAD;\nst.global.f32 [%rd9], %f3;\nbra END;\n\
                BAD:\nst.global.f32 [%rd9], 0f7FC00001;\nEND:";
    let m = module(&kernel("bf16", ", .param .u64 a, .param .u64 back", body));
    let mut a: Vec<f32> = vec![
        1.0,
        f32::from_bits(0x3F80_8000), // tie, even below
        f32::from_bits(0x3F81_8000), // tie, odd below: rounds up
        f32::from_bits(0x3F80_8001),
        f32::from_bits(0x7F7F_FFFF), // rounds to infinity
        f32::INFINITY,
        -0.0,
        1e-40,
        -3.25159,
        f32::from_bits(0x0000_8000),
    ];
    a.extend(
        lcg(7, 256 - a.len())
            .iter()
            .map(|&v| f32::from_bits(v & 0xBFFF_FFFF)),
    );
    let mut out = vec![0u16; 256];
    let mut back = vec![0f32; 256];
    run(
        &m,
        "bf16",
        launch(2, 128),
        &mut [
            Arg::output(&mut out),
            Arg::input(&a),
            Arg::output(&mut back),
        ],
    )
    .unwrap();
    for i in 0..256 {
        let want = half::bf16::from_f32(a[i]);
        assert_eq!(out[i], want.to_bits(), "{:#010x}", a[i].to_bits());
        assert_eq!(
            back[i].to_bits(),
            want.to_f32().to_bits(),
            "{:#010x}",
            a[i].to_bits()
        );
    }
}

/// PTX ISA `shfl.sync` semantics (source lane and validity), transcribed for the reference.
fn shfl_ref(mode: &str, lane: u32, b: u32, c: u32) -> (u32, bool) {
    let bval = b & 31;
    let cval = c & 31;
    let seg = (c >> 8) & 31;
    let max_lane = ((lane & seg) | (cval & !seg)) as i64;
    let min_lane = lane & seg;
    let (j, ok) = match mode {
        "up" => (
            lane as i64 - bval as i64,
            lane as i64 - bval as i64 >= max_lane,
        ),
        "down" => (
            lane as i64 + bval as i64,
            lane as i64 + bval as i64 <= max_lane,
        ),
        "bfly" => ((lane ^ bval) as i64, ((lane ^ bval) as i64) <= max_lane),
        _ => (
            (min_lane | (bval & !seg)) as i64,
            ((min_lane | (bval & !seg)) as i64) <= max_lane,
        ),
    };
    if ok { (j as u32, true) } else { (lane, false) }
}

#[test]
fn shfl_modes_follow_ptx_clamp_and_segment_semantics() {
    for mode in ["up", "down", "bfly", "idx"] {
        let body = format!(
            "ld.param.u64 %rd2, [bs];\nadd.s64 %rd3, %rd2, %rd30;\nld.global.u32 %r4, [%rd3];\n\
             ld.param.u32 %r5, [c];\nmad.lo.u32 %r3, %r1, 10, 1;\n\
             shfl.sync.{mode}.b32 %r6|%p1, %r3, %r4, %r5, 0xffffffff;\nst.global.u32 [%rd29], %r6;\n\
             selp.u32 %r7, 1, 0, %p1;\nld.param.u64 %rd4, [pred];\nadd.s64 %rd5, %rd4, %rd30;\nst.global.u32 [%rd5], %r7;"
        );
        let m = module(&kernel(
            "shfl",
            ", .param .u64 bs, .param .u32 c, .param .u64 pred",
            &body,
        ));
        for c in [0x1f, 0x0, 0x181f, 0x1800, 0x1c07, 0x0f, 0x1e1f] {
            let bs: Vec<u32> = lcg(c as u64 + 9, 64).iter().map(|v| v % 40).collect();
            let mut out = vec![0u32; 64];
            let mut pred = vec![0u32; 64];
            run(
                &m,
                "shfl",
                launch(1, 64),
                &mut [
                    Arg::output(&mut out),
                    Arg::input(&bs),
                    Arg::U32(c),
                    Arg::output(&mut pred),
                ],
            )
            .unwrap();
            for t in 0..64u32 {
                let (w, lane) = (t / 32, t % 32);
                let (src, ok) = shfl_ref(mode, lane, bs[t as usize], c);
                assert_eq!(
                    out[t as usize],
                    (w * 32 + src) * 10 + 1,
                    "{mode} c={c:#x} lane {lane} b={}",
                    bs[t as usize]
                );
                assert_eq!(pred[t as usize] == 1, ok, "{mode} c={c:#x} lane {lane}");
            }
        }
    }
}

const ATOMICS: &str = "
.version 8.0
.target sm_80
.address_size 64

.visible .entry atomics(.param .u64 cnt, .param .u64 fsum, .param .u64 olds, .param .u64 hist)
{
    .reg .pred %p<4>;
    .reg .b32 %r<20>;
    .reg .f32 %f<4>;
    .reg .b64 %rd<12>;
    .shared .align 4 .u32 sh[16];

    ld.param.u64 %rd1, [cnt];
    ld.param.u64 %rd2, [fsum];
    ld.param.u64 %rd3, [olds];
    ld.param.u64 %rd4, [hist];
    mov.u32 %r1, %tid.x;
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mad.lo.s32 %r4, %r2, %r3, %r1;
    atom.global.add.u32 %r5, [%rd1], 1;
    rem.u32 %r6, %r4, 7;
    cvt.rn.f32.u32 %f1, %r6;
    mul.f32 %f1, %f1, 0f3F000000;
    red.global.add.f32 [%rd2], %f1;
    sub.s32 %r7, %r4, 1000;
    atom.global.max.s32 %r5, [%rd1+4], %r7;
    add.u32 %r8, %r4, 5;
    atom.global.min.u32 %r5, [%rd1+8], %r8;
    atom.global.exch.b32 %r9, [%rd1+12], %r4;
    mul.wide.u32 %rd5, %r4, 4;
    add.s64 %rd6, %rd3, %rd5;
    st.global.u32 [%rd6], %r9;
RETRY:
    ld.global.u32 %r10, [%rd1+16];
    add.u32 %r11, %r10, 3;
    atom.global.cas.b32 %r12, [%rd1+16], %r10, %r11;
    setp.ne.u32 %p1, %r12, %r10;
    @%p1 bra RETRY;
    red.global.add.u32 [%rd1+20], 2;
    setp.lt.u32 %p2, %r1, 16;
    mov.u32 %r13, sh;
    shl.b32 %r14, %r1, 2;
    add.u32 %r15, %r13, %r14;
    @%p2 st.shared.u32 [%r15], 0;
    bar.sync 0;
    and.b32 %r16, %r4, 15;
    shl.b32 %r16, %r16, 2;
    add.u32 %r16, %r13, %r16;
    atom.shared.add.u32 %r17, [%r16], 1;
    bar.sync 0;
    @!%p2 bra END;
    ld.shared.u32 %r18, [%r15];
    add.s64 %rd7, %rd4, %rd5;
    sub.s64 %rd7, %rd7, %rd5;
    mul.wide.u32 %rd8, %r1, 4;
    add.s64 %rd7, %rd4, %rd8;
    red.global.add.u32 [%rd7], %r18;
END:
    ret;
}
";

#[test]
fn atomics_from_many_threads_give_exact_totals() {
    let m = module(ATOMICS);
    let (blocks, threads) = (4u32, 256u32);
    let n = (blocks * threads) as usize;
    let init_exch = 0xDEAD_BEEFu32;
    let mut cnt = [0u32, i32::MIN as u32, u32::MAX, init_exch, 7, 0];
    let mut fsum = [0f32];
    let mut olds = vec![0u32; n];
    let mut hist = vec![0u32; 16];
    let stats = run(
        &m,
        "atomics",
        launch(blocks, threads),
        &mut [
            Arg::output(&mut cnt),
            Arg::output(&mut fsum),
            Arg::output(&mut olds),
            Arg::output(&mut hist),
        ],
    )
    .unwrap();
    assert_eq!(cnt[0], n as u32);
    assert_eq!(cnt[1] as i32, n as i32 - 1 - 1000);
    assert_eq!(cnt[2], 5);
    assert_eq!(cnt[4], 7 + 3 * n as u32);
    assert_eq!(cnt[5], 2 * n as u32);
    let want_f: f64 = (0..n).map(|i| (i % 7) as f64 * 0.5).sum();
    assert_eq!(fsum[0] as f64, want_f);
    // exch hands each thread the previous value: the olds plus the final value are the
    // initial value plus every thread id, each exactly once.
    let mut seen: Vec<u32> = olds.clone();
    seen.push(cnt[3]);
    seen.sort_unstable();
    let mut want: Vec<u32> = (0..n as u32).collect();
    want.push(init_exch);
    want.sort_unstable();
    assert_eq!(seen, want);
    assert_eq!(hist, vec![n as u32 / 16; 16]);
    assert_eq!(stats.atomics, 8 * n as u64 + 16 * blocks as u64);
}

#[test]
fn special_registers_in_a_3d_launch() {
    let src = format!(
        "{HEADER}.visible .entry ids(.param .u64 out)\n{{\n.reg .b32 %r<20>;\n.reg .b64 %rd<4>;\n\
         ld.param.u64 %rd1, [out];\n\
         mov.u32 %r1, %tid.x;\nmov.u32 %r2, %tid.y;\nmov.u32 %r3, %tid.z;\nmov.u32 %r4, %ntid.x;\nmov.u32 %r5, %ntid.y;\n\
         mov.u32 %r6, %ntid.z;\nmov.u32 %r7, %ctaid.x;\nmov.u32 %r8, %ctaid.y;\nmov.u32 %r9, %ctaid.z;\nmov.u32 %r10, %nctaid.x;\n\
         mov.u32 %r11, %nctaid.y;\nmov.u32 %r12, %nctaid.z;\nmov.u32 %r13, %laneid;\n\
         mad.lo.u32 %r14, %r9, %r11, %r8;\nmad.lo.u32 %r14, %r14, %r10, %r7;\n\
         mad.lo.u32 %r15, %r3, %r5, %r2;\nmad.lo.u32 %r15, %r15, %r4, %r1;\n\
         mul.lo.u32 %r16, %r4, %r5;\nmul.lo.u32 %r16, %r16, %r6;\nmad.lo.u32 %r17, %r14, %r16, %r15;\n\
         mul.wide.u32 %rd2, %r17, 52;\nadd.s64 %rd3, %rd1, %rd2;\n\
         st.global.v4.u32 [%rd3], {{%r1, %r2, %r3, %r4}};\nst.global.v4.u32 [%rd3+16], {{%r5, %r6, %r7, %r8}};\n\
         st.global.v4.u32 [%rd3+32], {{%r9, %r10, %r11, %r12}};\nst.global.u32 [%rd3+48], %r13;\nret;\n}}\n"
    );
    let m = module(&src);
    let (grid, block) = ([2u32, 3, 2], [4u32, 2, 3]);
    let nb = (block[0] * block[1] * block[2]) as usize;
    let total = nb * 12;
    // 52 bytes per thread; v4 stores need 16-byte alignment, so pad records to 52 -> use u32
    // records and check the v4 alignment rule separately below.
    let mut out = vec![0u32; total * 13];
    let l = mgm_ptx::Launch {
        grid,
        block,
        shared_bytes: 0,
        approx: mgm_ptx::Approx::Exact,
    };
    let e = run(&m, "ids", l, &mut [Arg::output(&mut out)]).unwrap_err();
    // Record 1 starts at byte 52: its v4 store is misaligned.
    assert!(
        matches!(
            e,
            Error::Exec {
                fault: Fault::Misaligned { align: 16, .. },
                thread: [1, 0, 0],
                ..
            }
        ),
        "{e}"
    );
    let fixed = src.replace(
        "mul.wide.u32 %rd2, %r17, 52;",
        "mul.wide.u32 %rd2, %r17, 64;",
    );
    let m = module(&fixed);
    let mut out = vec![0u32; total * 16];
    run(&m, "ids", l, &mut [Arg::output(&mut out)]).unwrap();
    for bz in 0..grid[2] {
        for by in 0..grid[1] {
            for bx in 0..grid[0] {
                for tz in 0..block[2] {
                    for ty in 0..block[1] {
                        for tx in 0..block[0] {
                            let b = (bz * grid[1] + by) * grid[0] + bx;
                            let t = (tz * block[1] + ty) * block[0] + tx;
                            let g = (b as usize * nb + t as usize) * 16;
                            let want = [
                                tx,
                                ty,
                                tz,
                                block[0],
                                block[1],
                                block[2],
                                bx,
                                by,
                                bz,
                                grid[0],
                                grid[1],
                                grid[2],
                                t % 32,
                            ];
                            assert_eq!(&out[g..g + 13], &want);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn dynamic_shared_memory_follows_the_statics() {
    let src = format!(
        "{HEADER}.extern .shared .align 16 .f32 dyn[];\n\
         .visible .entry dynsh(.param .u64 out)\n{{\n.reg .b32 %r<12>;\n.reg .f32 %f<4>;\n.reg .b64 %rd<4>;\n\
         .shared .align 4 .b8 stat[12];\n\
         ld.param.u64 %rd1, [out];\nmov.u32 %r1, %tid.x;\nmov.u32 %r2, %ntid.x;\nmov.u32 %r3, dyn;\n\
         shl.b32 %r4, %r1, 2;\nadd.u32 %r5, %r3, %r4;\ncvt.rn.f32.u32 %f1, %r1;\nst.shared.f32 [%r5], %f1;\n\
         mov.u32 %r9, stat;\nst.shared.u32 [%r9], %r1;\nbar.sync 0;\n\
         add.u32 %r6, %r1, 1;\nrem.u32 %r6, %r6, %r2;\nshl.b32 %r6, %r6, 2;\nadd.u32 %r6, %r3, %r6;\n\
         ld.shared.f32 %f2, [%r6];\nmul.wide.u32 %rd2, %r1, 8;\nadd.s64 %rd3, %rd1, %rd2;\n\
         st.global.f32 [%rd3], %f2;\nst.global.u32 [%rd3+4], %r3;\nret;\n}}\n"
    );
    let m = module(&src);
    let n = 64u32;
    let mut out = vec![0u32; 2 * n as usize];
    let l = mgm_ptx::Launch {
        grid: [1, 1, 1],
        block: [n, 1, 1],
        shared_bytes: 4 * n,
        approx: mgm_ptx::Approx::Exact,
    };
    // Every thread stores into `stat` before the barrier: a write-write race on one word.
    let e = run(&m, "dynsh", l, &mut [Arg::output(&mut out)]).unwrap_err();
    assert!(
        matches!(
            &e,
            Error::Exec {
                fault: Fault::SharedRace {
                    other_thread: [0, 0, 0],
                    ..
                },
                thread: [1, 0, 0],
                ..
            }
        ),
        "{e}"
    );
    let m = module(&src.replace("st.shared.u32 [%r9], %r1;", ""));
    let stats = run(&m, "dynsh", l, &mut [Arg::output(&mut out)]).unwrap();
    assert_eq!(stats.shared_bytes, 16 + 4 * n);
    for t in 0..n as usize {
        assert_eq!(f32::from_bits(out[2 * t]), ((t + 1) % n as usize) as f32);
        assert_eq!(
            out[2 * t + 1],
            16,
            "dyn starts after the 12 static bytes, aligned to 16"
        );
    }
}

#[test]
fn narrow_and_vector_loads_extend_and_keep_order() {
    let body = "ld.param.u64 %rd2, [h];\nmul.wide.u32 %rd3, %r1, 2;\nadd.s64 %rd4, %rd2, %rd3;\n\
                ld.global.u16 %r2, [%rd4];\nld.global.s16 %r3, [%rd4];\nld.global.u16 %rs1, [%rd4];\ncvt.s32.s16 %r4, %rs1;\n\
                ld.param.u64 %rd5, [v];\nmul.wide.u32 %rd6, %r1, 16;\nadd.s64 %rd7, %rd5, %rd6;\n\
                ld.global.v4.f32 {%f1, %f2, %f3, %f4}, [%rd7];\nld.global.v2.u32 {%r5, %r6}, [%rd7+8];\n\
                mul.wide.u32 %rd8, %r1, 32;\nadd.s64 %rd9, %rd1, %rd8;\n\
                st.global.v4.f32 [%rd9], {%f4, %f3, %f2, %f1};\nst.global.v4.u32 [%rd9+16], {%r2, %r3, %r4, %r6};";
    let m = module(&kernel("narrow", ", .param .u64 h, .param .u64 v", body));
    let h: Vec<u16> = lcg(11, 32).iter().map(|&v| v as u16).collect();
    let v: Vec<f32> = (0..128).map(|i| i as f32 * 1.25 - 7.0).collect();
    let mut out = vec![0u32; 32 * 8];
    run(
        &m,
        "narrow",
        launch(1, 32),
        &mut [Arg::output(&mut out), Arg::input(&h), Arg::input(&v)],
    )
    .unwrap();
    for i in 0..32 {
        let o = &out[i * 8..i * 8 + 8];
        let f: Vec<f32> = o[..4].iter().map(|&b| f32::from_bits(b)).collect();
        assert_eq!(f, [v[4 * i + 3], v[4 * i + 2], v[4 * i + 1], v[4 * i]]);
        assert_eq!(o[4], h[i] as u32);
        assert_eq!(o[5], h[i] as i16 as i32 as u32);
        assert_eq!(o[6], h[i] as i16 as i32 as u32);
        assert_eq!(o[7], v[4 * i + 3].to_bits());
    }
}

#[test]
fn guards_and_branches_skip_exactly_the_predicated_instructions() {
    let body = "and.b32 %r2, %r1, 3;\nsetp.eq.u32 %p1, %r2, 0;\nmov.u32 %r3, 100;\n@%p1 add.u32 %r3, %r3, 1;\n\
                @!%p1 add.u32 %r3, %r3, 2;\nsetp.gt.u32 %p2, %r2, 1;\n@%p2 bra BIG;\nadd.u32 %r3, %r3, 10;\nBIG:\n\
                st.global.u32 [%rd29], %r3;";
    let m = module(&kernel("guards", "", body));
    let mut out = vec![0u32; 32];
    run(&m, "guards", launch(1, 32), &mut [Arg::output(&mut out)]).unwrap();
    for (i, &o) in out.iter().enumerate() {
        let r = i as u32 & 3;
        let want = 100 + if r == 0 { 1 } else { 2 } + if r > 1 { 0 } else { 10 };
        assert_eq!(o, want, "thread {i}");
    }
}

#[test]
fn f32_atomic_add_flushes_subnormals_on_global_but_not_shared_memory() {
    let src = format!(
        "{HEADER}.visible .entry fadd(.param .u64 out)\n{{\n.reg .b32 %r<4>;\n.reg .f32 %f<4>;\n.reg .b64 %rd<4>;\n\
         .shared .align 4 .f32 s[1];\nld.param.u64 %rd1, [out];\nmov.f32 %f1, 0f00000100;\n\
         st.global.f32 [%rd1], %f1;\nst.shared.f32 [s], %f1;\natom.global.add.f32 %f2, [%rd1], %f1;\n\
         atom.shared.add.f32 %f3, [s], %f1;\nld.shared.f32 %f3, [s];\nst.global.f32 [%rd1+4], %f3;\nret;\n}}\n"
    );
    let m = module(&src);
    let mut out = [0f32; 2];
    run(&m, "fadd", launch(1, 1), &mut [Arg::output(&mut out)]).unwrap();
    let tiny = f32::from_bits(0x100);
    assert_eq!(out[0].to_bits(), 0);
    assert_eq!(out[1], tiny + tiny);
}
