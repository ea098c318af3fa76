//! Measures interpreter throughput (thread-instructions per second) on two kernels: a
//! register/global-memory loop and a shared-memory + shuffle reduction.
//! `cargo run --release -p mgm-ptx --example throughput`

use std::io::Write;
use std::time::Instant;

use mgm_ptx::{Approx, Arg, Launch, Module};

const LOOP: &str = ".version 8.0\n.target sm_80\n.address_size 64\n\
.visible .entry dot(.param .u64 out, .param .u64 x, .param .u32 n)\n{\n\
.reg .pred %p<2>;\n.reg .b32 %r<8>;\n.reg .f32 %f<4>;\n.reg .b64 %rd<8>;\n\
ld.param.u64 %rd1, [out];\nld.param.u64 %rd2, [x];\nld.param.u32 %r2, [n];\n\
mov.u32 %r4, %tid.x;\nmov.u32 %r5, %ctaid.x;\nmov.u32 %r6, %ntid.x;\nmad.lo.s32 %r1, %r5, %r6, %r4;\n\
mov.f32 %f1, 0f00000000;\nmov.u32 %r3, 0;\n\
LOOP:\nmul.wide.u32 %rd3, %r3, 4;\nadd.s64 %rd4, %rd2, %rd3;\nld.global.f32 %f2, [%rd4];\n\
fma.rn.f32 %f1, %f2, %f2, %f1;\nadd.s32 %r3, %r3, 1;\nsetp.lt.u32 %p1, %r3, %r2;\n@%p1 bra LOOP;\n\
mul.wide.u32 %rd5, %r1, 4;\nadd.s64 %rd6, %rd1, %rd5;\nst.global.f32 [%rd6], %f1;\nret;\n}\n";

const REDUCE: &str = include_str!("../tests/ptx/reduce.ptx");

fn main() -> mgm_ptx::Result<()> {
    let mut out = std::io::stdout().lock();
    let launch = |blocks| Launch {
        grid: [blocks, 1, 1],
        block: [256, 1, 1],
        shared_bytes: 0,
        approx: Approx::WorstCase,
    };

    let m = Module::parse(LOOP)?;
    let n = 4000u32;
    let x: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let mut y = vec![0f32; 256 * 16];
    let t = Instant::now();
    let s = mgm_ptx::run(
        &m,
        "dot",
        &launch(16),
        &mut [Arg::output(&mut y), Arg::input(&x), Arg::U32(n)],
    )?;
    let dt = t.elapsed().as_secs_f64();
    let _ = writeln!(
        out,
        "loop kernel:      {:>11} thread-instructions in {dt:.3} s = {:.0} M/s",
        s.instructions,
        s.instructions as f64 / dt / 1e6
    );

    let m = Module::parse(REDUCE)?;
    let len = 1 << 22;
    let x: Vec<f32> = (0..len).map(|i| (i % 11) as f32 - 5.0).collect();
    let blocks = (len / 256) as u32;
    let mut sums = vec![0f32; blocks as usize];
    let t = Instant::now();
    let s = mgm_ptx::run(
        &m,
        "block_sum",
        &launch(blocks),
        &mut [Arg::input(&x), Arg::output(&mut sums), Arg::U32(len as u32)],
    )?;
    let dt = t.elapsed().as_secs_f64();
    let _ = writeln!(
        out,
        "block reduction:  {:>11} thread-instructions in {dt:.3} s = {:.0} M/s ({} barriers)",
        s.instructions,
        s.instructions as f64 / dt / 1e6,
        s.barriers
    );

    let mut wsums = vec![0f32; len / 32];
    let t = Instant::now();
    let s = mgm_ptx::run(
        &m,
        "warp_sum",
        &launch(blocks),
        &mut [Arg::input(&x), Arg::output(&mut wsums)],
    )?;
    let dt = t.elapsed().as_secs_f64();
    let _ = writeln!(
        out,
        "warp shuffles:    {:>11} thread-instructions in {dt:.3} s = {:.0} M/s ({} shuffles)",
        s.instructions,
        s.instructions as f64 / dt / 1e6,
        s.shuffles
    );
    Ok(())
}
