//! Launch and argument validation.

mod common;

use common::*;
use mgm_ptx::{Approx, Arg, Error, Launch};

fn src() -> String {
    format!(
        "{HEADER}.visible .entry k(.param .u64 out, .param .u32 n, .param .s32 s, .param .f32 f, .param .u64 big)\n\
         .reqntid 64\n{{\n.reg .b32 %r<4>;\n.reg .b64 %rd<4>;\nld.param.u64 %rd1, [out];\nld.param.u32 %r1, [n];\n\
         ld.param.s32 %r2, [s];\nld.param.f32 %r3, [f];\nld.param.u64 %rd2, [big];\nst.global.v2.u32 [%rd1], {{%r1, %r2}};\n\
         st.global.u32 [%rd1+8], %r3;\nst.global.u64 [%rd1+16], %rd2;\nret;\n}}\n"
    )
}

#[test]
fn scalar_params_reach_the_kernel() {
    let m = module(&src());
    let mut out = vec![0u32; 6];
    run(
        &m,
        "k",
        launch(1, 64),
        &mut [
            Arg::output(&mut out),
            Arg::U32(7),
            Arg::I32(-5),
            Arg::F32(1.5),
            Arg::U64(1 << 40),
        ],
    )
    .unwrap();
    assert_eq!(out, [7, (-5i32) as u32, 1.5f32.to_bits(), 0, 0, 256]);
}

#[test]
fn mismatched_arguments_are_args_errors() {
    let m = module(&src());
    let mut out = vec![0u32; 6];
    let cases: Vec<(Vec<Arg<'_>>, &str)> = vec![
        (
            vec![Arg::U32(7)],
            "1 arguments given, the kernel has 5 parameters",
        ),
        (
            vec![
                Arg::U32(1),
                Arg::U32(7),
                Arg::I32(-5),
                Arg::F32(1.5),
                Arg::U64(0),
            ],
            "parameter 0 `out` is `.u64` but the argument is U32",
        ),
        (
            vec![
                Arg::U64(0),
                Arg::I32(7),
                Arg::I32(-5),
                Arg::F32(1.5),
                Arg::U64(0),
            ],
            "parameter 1 `n` is `.u32` but the argument is I32",
        ),
        (
            vec![
                Arg::U64(0),
                Arg::U32(7),
                Arg::U32(5),
                Arg::F32(1.5),
                Arg::U64(0),
            ],
            "parameter 2 `s` is `.s32` but the argument is U32",
        ),
        (
            vec![
                Arg::U64(0),
                Arg::U32(7),
                Arg::I32(5),
                Arg::U32(1),
                Arg::U64(0),
            ],
            "parameter 3 `f` is `.f32` but the argument is U32",
        ),
    ];
    for (mut args, want) in cases {
        let e = run(&m, "k", launch(1, 64), &mut args).unwrap_err();
        assert!(
            matches!(&e, Error::Args { kernel, msg } if kernel == "k" && msg.contains(want)),
            "{e}"
        );
    }
    let e = run(
        &m,
        "k",
        launch(1, 32),
        &mut [
            Arg::output(&mut out),
            Arg::U32(7),
            Arg::I32(-5),
            Arg::F32(1.5),
            Arg::U64(0),
        ],
    )
    .unwrap_err();
    assert!(e.to_string().contains(".reqntid"), "{e}");
    let e = run(&m, "nope", launch(1, 64), &mut []).unwrap_err();
    assert!(matches!(e, Error::NoKernel(ref k) if k == "nope"), "{e}");
    let l = Launch {
        grid: [1, 1, 1],
        block: [2048, 1, 1],
        shared_bytes: 0,
        approx: Approx::Exact,
    };
    let e = run(&m, "k", l, &mut []).unwrap_err();
    assert!(e.to_string().contains("exceeds 1024 threads"), "{e}");
}

#[test]
fn buffers_get_separate_address_ranges_with_gaps() {
    // Storing one element past `a` must not land in `b`.
    let body = "ld.param.u64 %rd2, [b];\nld.param.u32 %r2, [n];\nmul.wide.u32 %rd3, %r2, 4;\nadd.s64 %rd4, %rd1, %rd3;\n\
                st.global.u32 [%rd4], 1;";
    let m = module(&kernel("gap", ", .param .u64 b, .param .u32 n", body));
    let mut a = vec![0u32; 16];
    let mut b = vec![0u32; 16];
    run(
        &m,
        "gap",
        launch(1, 1),
        &mut [Arg::output(&mut a), Arg::output(&mut b), Arg::U32(15)],
    )
    .unwrap();
    assert_eq!(a[15], 1);
    let e = run(
        &m,
        "gap",
        launch(1, 1),
        &mut [Arg::output(&mut a), Arg::output(&mut b), Arg::U32(16)],
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("past the end of buffer `out` (64 bytes)"),
        "{e}"
    );
    assert!(b.iter().all(|&v| v == 0));
}

#[test]
fn shared_accesses_are_checked_for_bounds_alignment_and_races_between_atomics_and_writes() {
    // `body` runs after %r2 = dyn + off and %r5 = %tid.x.
    let src = |body: &str| {
        format!(
            "{HEADER}.extern .shared .align 4 .b8 dyn[];\n.visible .entry sh(.param .u32 off)\n{{\n\
             .reg .pred %p<2>;\n.reg .b32 %r<6>;\nld.param.u32 %r1, [off];\nmov.u32 %r2, dyn;\n\
             add.u32 %r2, %r2, %r1;\nmov.u32 %r5, %tid.x;\n{body}\nret;\n}}\n"
        )
    };
    let l = Launch {
        grid: [1, 1, 1],
        block: [32, 1, 1],
        shared_bytes: 64,
        approx: Approx::Exact,
    };
    let store = module(&src("st.shared.u32 [%r2], 1;"));
    // Every thread writes word 0: a race.
    let e = run(&store, "sh", l, &mut [Arg::U32(0)]).unwrap_err();
    assert!(e.to_string().contains("shared-memory race"), "{e}");
    let one = Launch {
        block: [1, 1, 1],
        ..l
    };
    run(&store, "sh", one, &mut [Arg::U32(60)]).unwrap();
    let e = run(&store, "sh", one, &mut [Arg::U32(64)]).unwrap_err();
    let want = "out-of-bounds shared access of 4 bytes at 0x40 (block has 64 bytes";
    assert!(e.to_string().contains(want), "{e}");
    let e = run(&store, "sh", one, &mut [Arg::U32(2)]).unwrap_err();
    assert!(
        e.to_string().contains("misaligned shared access at 0x2"),
        "{e}"
    );
    // Atomics on one word from all threads are fine; a plain write mixed in is a race.
    let init = "setp.eq.u32 %p1, %r5, 0;\n@%p1 st.shared.u32 [%r2], 0;\nbar.sync 0;\n\
                atom.shared.add.u32 %r3, [%r2], 1;\n";
    run(&module(&src(init)), "sh", l, &mut [Arg::U32(0)]).unwrap();
    let mixed = format!("{init}setp.eq.u32 %p1, %r5, 5;\n@%p1 st.shared.u32 [%r2], 9;");
    let e = run(&module(&src(&mixed)), "sh", l, &mut [Arg::U32(0)]).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("thread [5, 0, 0]")
            && msg.contains("this write conflicts with thread [0, 0, 0]"),
        "{msg}"
    );
}
