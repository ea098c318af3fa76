//! The mutation check on small planted-bug kernels: a correct kernel passes, the same
//! source with one bar.sync deleted or one polynomial constant changed fails, and the failure
//! names the kernel (and, for faults, the line).

mod common;

use common::*;
use mgm_ptx::{Approx, Arg, Error, Fault, Launch, RunOptions};

const REDUCE: &str = include_str!("ptx/reduce.ptx");
const GELU: &str = include_str!("ptx/gelu.ptx");

fn line_of(src: &str, needle: &str) -> usize {
    src.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("`{needle}` not in source"))
        + 1
}

fn block_sum(src: &str, x: &[f32]) -> mgm_ptx::Result<Vec<f32>> {
    let m = module(src);
    let blocks = x.len().div_ceil(256);
    let mut out = vec![0f32; blocks];
    run(
        &m,
        "block_sum",
        launch(blocks as u32, 256),
        &mut [
            Arg::input(x),
            Arg::output(&mut out),
            Arg::U32(x.len() as u32),
        ],
    )?;
    Ok(out)
}

#[test]
fn deleting_a_reduction_bar_sync_is_reported_as_a_race_naming_the_kernel() {
    let x: Vec<f32> = (0..700).map(|i| (i % 13) as f32 - 6.0).collect();
    let good = block_sum(REDUCE, &x).unwrap();
    for (b, g) in good.iter().enumerate() {
        let want: f64 = x[b * 256..((b + 1) * 256).min(x.len())]
            .iter()
            .map(|&v| v as f64)
            .sum();
        assert_eq!(*g as f64, want);
    }
    // Delete each bar.sync of block_sum in turn (the kernel needs both).
    let bars: Vec<usize> = REDUCE
        .match_indices("bar.sync 0;")
        .map(|(i, _)| i)
        .filter(|&i| i < REDUCE.find(".entry warp_sum").unwrap())
        .collect();
    assert_eq!(bars.len(), 2);
    for at in bars {
        let bad = format!("{}{}", &REDUCE[..at], &REDUCE[at + "bar.sync 0;".len()..]);
        let e = block_sum(&bad, &x).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("kernel block_sum"), "{msg}");
        match &e {
            Error::Exec {
                fault: Fault::SharedRace { other_line, .. },
                line,
                ..
            } => {
                assert!(
                    msg.contains(&format!("line {line}")) && *other_line > 0,
                    "{msg}"
                );
            }
            Error::Exec {
                fault: Fault::UninitializedShared { .. },
                ..
            } => {}
            _ => panic!("expected a race or uninitialised read, got {msg}"),
        }
    }
}

/// erf in f64 from the everywhere-convergent series with positive terms:
/// erf(z) = 2/sqrt(pi) exp(-z^2) sum_n 2^n z^(2n+1) / (1 3 5 ... (2n+1)).
fn erf(z: f64) -> f64 {
    let (mut term, mut sum, mut n) = (z, z, 0.0);
    while term.abs() > 1e-17 * sum.abs() {
        n += 1.0;
        term *= 2.0 * z * z / (2.0 * n + 1.0);
        sum += term;
    }
    2.0 / std::f64::consts::PI.sqrt() * (-z * z).exp() * sum
}

fn gelu_ref(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

/// Runs the GELU kernel and compares with the f64 reference at 1e-5 (1 + |y|).
fn check_gelu(src: &str, approx: Approx) -> Result<f64, String> {
    let m = module(src);
    let x: Vec<f32> = (0..2000).map(|i| -6.0 + 12.0 * i as f32 / 1999.0).collect();
    let mut y = vec![0f32; x.len()];
    let l = Launch {
        grid: [8, 1, 1],
        block: [256, 1, 1],
        shared_bytes: 0,
        approx,
    };
    mgm_ptx::run_with(
        &m,
        "gelu_erf",
        &l,
        &mut [
            Arg::input(&x),
            Arg::output(&mut y),
            Arg::U32(x.len() as u32),
        ],
        &RunOptions::default(),
    )
    .map_err(|e| e.to_string())?;
    let mut worst = 0f64;
    for (i, (&xi, &yi)) in x.iter().zip(&y).enumerate() {
        let r = gelu_ref(xi as f64);
        let err = (yi as f64 - r).abs() / (1.0 + r.abs());
        if err.is_nan() || err > 1e-5 {
            return Err(format!(
                "kernel gelu_erf: index {i}: x = {xi}, got {yi}, reference {r}, error {err:.2e} > 1e-5"
            ));
        }
        worst = worst.max(err);
    }
    Ok(worst)
}

#[test]
fn erf_reference_matches_known_values() {
    // erf(0.5), erf(1), erf(2) to 15 digits (Abramowitz & Stegun table 7.1).
    assert!((erf(0.5) - 0.520_499_877_813_047).abs() < 1e-14);
    assert!((erf(1.0) - 0.842_700_792_949_715).abs() < 1e-14);
    assert!((erf(2.0) - 0.995_322_265_018_953).abs() < 1e-14);
}

#[test]
fn changing_one_gelu_polynomial_constant_exceeds_the_tolerance() {
    for approx in [Approx::Exact, Approx::WorstCase] {
        let worst = check_gelu(GELU, approx).unwrap();
        assert!(worst < 1e-6, "{worst}");
    }
    // a3 = 1.421413741 -> 1.431413741
    let bad = GELU.replace("0f3FB5F0E3", "0f3FB73891");
    assert_ne!(bad, GELU);
    let e = check_gelu(&bad, Approx::WorstCase).unwrap_err();
    assert!(e.contains("gelu_erf") && e.contains("> 1e-5"), "{e}");
}

#[test]
fn barrier_in_a_branch_taken_by_half_the_block_is_barrier_divergence() {
    let body = "setp.lt.u32 %p1, %r30, 32;\n@%p1 bra SKIP;\nbar.sync 0;\nSKIP:\nbar.sync 0;\nst.global.u32 [%rd29], %r1;";
    let src = kernel("half_barrier", "", body);
    let m = module(&src);
    let mut out = vec![0u32; 64];
    let e = run(
        &m,
        "half_barrier",
        launch(1, 64),
        &mut [Arg::output(&mut out)],
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(
            &e,
            Error::Exec {
                fault: Fault::BarrierDivergence { .. },
                ..
            }
        ),
        "{msg}"
    );
    let (first, second) = (
        line_of(&src, "@%p1 bra SKIP") + 1,
        line_of(&src, "SKIP:") + 1,
    );
    assert!(
        msg.contains("half_barrier")
            && msg.contains(&format!("line {first}"))
            && msg.contains(&format!("line {second}")),
        "{msg}"
    );
}

#[test]
fn early_exit_before_a_barrier_is_barrier_divergence() {
    let body = "setp.ge.u32 %p1, %r30, 40;\n@%p1 ret;\nbar.sync 0;\nst.global.u32 [%rd29], %r1;";
    let src = kernel("early_exit", "", body);
    let m = module(&src);
    let mut out = vec![0u32; 64];
    let e = run(
        &m,
        "early_exit",
        launch(1, 64),
        &mut [Arg::output(&mut out)],
    )
    .unwrap_err();
    let msg = e.to_string();
    let Error::Exec {
        fault: Fault::BarrierDivergence { detail },
        line,
        thread,
        ..
    } = &e
    else {
        panic!("{msg}")
    };
    assert_eq!((*line, *thread), (line_of(&src, "bar.sync 0;"), [0, 0, 0]));
    assert!(
        detail.contains("[40, 0, 0] has exited") && msg.contains("early_exit"),
        "{msg}"
    );
    // The whole block returning early is fine.
    let ok = kernel(
        "all_exit",
        "",
        "setp.ge.u32 %p1, %r28, 1;\n@%p1 ret;\nbar.sync 0;\nst.global.u32 [%rd29], %r1;",
    );
    run(
        &module(&ok),
        "all_exit",
        launch(1, 64),
        &mut [Arg::output(&mut out)],
    )
    .unwrap();
}

#[test]
fn shfl_in_a_divergent_branch_is_shuffle_divergence() {
    let body = "mov.u32 %r2, %laneid;\nsetp.lt.u32 %p1, %r2, 16;\n@!%p1 bra SKIP;\n\
                shfl.sync.bfly.b32 %r3, %r1, 1, 31, 0xffffffff;\nst.global.u32 [%rd29], %r3;\nSKIP:";
    let src = kernel("div_shfl", "", body);
    let m = module(&src);
    let mut out = vec![0u32; 32];
    let e = run(&m, "div_shfl", launch(1, 32), &mut [Arg::output(&mut out)]).unwrap_err();
    let msg = e.to_string();
    let Error::Exec {
        fault: Fault::ShuffleDivergence { detail },
        line,
        ..
    } = &e
    else {
        panic!("{msg}")
    };
    assert_eq!(*line, line_of(&src, "shfl.sync"));
    assert!(
        detail.contains("lane 16") && detail.contains("exited") && msg.contains("div_shfl"),
        "{msg}"
    );
    // Lanes waiting at two different shuffles.
    let body2 = "mov.u32 %r2, %laneid;\nsetp.lt.u32 %p1, %r2, 16;\n@!%p1 bra OTHER;\n\
                 shfl.sync.bfly.b32 %r3, %r1, 1, 31, 0xffffffff;\nbra END;\nOTHER:\n\
                 shfl.sync.bfly.b32 %r3, %r1, 2, 31, 0xffffffff;\nEND:\nst.global.u32 [%rd29], %r3;";
    let e = run(
        &module(&kernel("two_shfl", "", body2)),
        "two_shfl",
        launch(1, 32),
        &mut [Arg::output(&mut out)],
    )
    .unwrap_err();
    assert!(e.to_string().contains("different shfl.sync"), "{e}");
}

#[test]
fn read_one_past_the_end_of_a_buffer_is_out_of_bounds() {
    let src = kernel(
        "oob",
        ", .param .u64 x",
        "ld.param.u64 %rd2, [x];\nadd.s64 %rd3, %rd2, %rd30;\nld.global.f32 %f1, [%rd3];\nst.global.f32 [%rd29], %f1;",
    );
    let m = module(&src);
    let x = vec![1f32; 63];
    let mut out = vec![0f32; 64];
    let e = run(
        &m,
        "oob",
        launch(1, 64),
        &mut [Arg::output(&mut out), Arg::input(&x)],
    )
    .unwrap_err();
    let msg = e.to_string();
    let Error::Exec {
        fault: Fault::GlobalOutOfBounds { detail, .. },
        line,
        thread,
        ..
    } = &e
    else {
        panic!("{msg}")
    };
    assert_eq!(
        (*line, *thread),
        (line_of(&src, "ld.global.f32"), [63, 0, 0])
    );
    assert!(
        detail.contains("past the end of buffer `x` (252 bytes)") && msg.contains("kernel oob"),
        "{msg}"
    );
    // A straddling access (8 bytes at offset 248 of 252) is out of bounds too.
    let v2 = kernel(
        "straddle",
        ", .param .u64 x",
        "ld.param.u64 %rd2, [x];\nld.global.v2.f32 {%f1, %f2}, [%rd2+248];",
    );
    let e = run(
        &module(&v2),
        "straddle",
        launch(1, 1),
        &mut [Arg::output(&mut out), Arg::input(&x)],
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("straddles the end of buffer `x`"),
        "{e}"
    );
    // One element before the start.
    let before = kernel(
        "before",
        ", .param .u64 x",
        "ld.param.u64 %rd2, [x];\nld.global.f32 %f1, [%rd2+-4];",
    );
    let e = run(
        &module(&before),
        "before",
        launch(1, 1),
        &mut [Arg::output(&mut out), Arg::input(&x)],
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Exec {
                fault: Fault::GlobalOutOfBounds { .. },
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn store_into_an_input_buffer_is_a_fault() {
    let src = kernel(
        "store_in",
        ", .param .u64 x",
        "ld.param.u64 %rd2, [x];\nadd.s64 %rd3, %rd2, %rd30;\nst.global.u32 [%rd3], %r1;",
    );
    let m = module(&src);
    let x = vec![0u32; 32];
    let mut out = vec![0u32; 32];
    let e = run(
        &m,
        "store_in",
        launch(1, 32),
        &mut [Arg::output(&mut out), Arg::input(&x)],
    )
    .unwrap_err();
    let msg = e.to_string();
    let Error::Exec {
        fault: Fault::StoreToInput { param, offset },
        line,
        ..
    } = &e
    else {
        panic!("{msg}")
    };
    assert_eq!(
        (param.as_str(), *offset, *line),
        ("x", 0, line_of(&src, "st.global.u32 [%rd3]"))
    );
    assert!(
        msg.contains("store_in") && msg.contains("read-only input buffer `x`"),
        "{msg}"
    );
    // Atomics count as stores.
    let at = kernel(
        "atom_in",
        ", .param .u64 x",
        "ld.param.u64 %rd2, [x];\nred.global.add.u32 [%rd2], 1;",
    );
    let e = run(
        &module(&at),
        "atom_in",
        launch(1, 1),
        &mut [Arg::output(&mut out), Arg::input(&x)],
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Exec {
                fault: Fault::StoreToInput { .. },
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn shared_read_before_any_write_is_uninitialised() {
    let src = format!(
        "{HEADER}.visible .entry uninit(.param .u64 out)\n{{\n.reg .b32 %r<4>;\n.reg .b64 %rd<4>;\n.shared .align 4 .u32 s[32];\n\
         ld.param.u64 %rd1, [out];\nmov.u32 %r1, %tid.x;\nmov.u32 %r2, s;\nshl.b32 %r3, %r1, 2;\nadd.u32 %r2, %r2, %r3;\n\
         ld.shared.u32 %r3, [%r2];\nst.global.u32 [%rd1], %r3;\nret;\n}}\n"
    );
    let m = module(&src);
    let mut out = vec![0u32; 1];
    let e = run(&m, "uninit", launch(1, 32), &mut [Arg::output(&mut out)]).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(
            &e,
            Error::Exec {
                fault: Fault::UninitializedShared { addr: 0 },
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("uninit") && msg.contains(&format!("line {}", line_of(&src, "ld.shared"))),
        "{msg}"
    );
}

#[test]
fn integer_division_by_zero_is_a_fault() {
    let src = kernel(
        "divzero",
        ", .param .u32 d",
        "ld.param.u32 %r2, [d];\nrem.u32 %r3, %r1, %r2;\nst.global.u32 [%rd29], %r3;",
    );
    let m = module(&src);
    let mut out = vec![0u32; 4];
    run(
        &m,
        "divzero",
        launch(1, 4),
        &mut [Arg::output(&mut out), Arg::U32(3)],
    )
    .unwrap();
    assert_eq!(out, [0, 1, 2, 0]);
    let e = run(
        &m,
        "divzero",
        launch(1, 4),
        &mut [Arg::output(&mut out), Arg::U32(0)],
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(
            &e,
            Error::Exec {
                fault: Fault::DivisionByZero,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("divzero") && msg.contains(&format!("line {}", line_of(&src, "rem.u32"))),
        "{msg}"
    );
}

#[test]
fn infinite_loop_exceeds_the_instruction_budget() {
    let src = kernel("spin", "", "LOOP:\nadd.u32 %r2, %r2, 1;\nbra LOOP;");
    let m = module(&src);
    let mut out = vec![0u32; 32];
    let l = launch(1, 32);
    let e = mgm_ptx::run_with(
        &m,
        "spin",
        &l,
        &mut [Arg::output(&mut out)],
        &RunOptions {
            max_instructions: 100_000,
        },
    )
    .unwrap_err();
    let msg = e.to_string();
    let Error::Exec {
        fault: Fault::BudgetExceeded { limit: 100_000 },
        line,
        ..
    } = &e
    else {
        panic!("{msg}")
    };
    assert!(
        [line_of(&src, "LOOP:") + 1, line_of(&src, "bra LOOP")].contains(line),
        "{msg}"
    );
    assert!(
        msg.contains("spin") && msg.contains("infinite loop"),
        "{msg}"
    );
}
