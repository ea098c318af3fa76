//! Helpers shared by the integration tests.
#![allow(dead_code)]

use mgm_ptx::{Approx, Arg, Launch, Module, RunOptions, Stats};

/// The module header every test kernel starts with.
pub const HEADER: &str = ".version 8.0\n.target sm_80\n.address_size 64\n";

/// Parses a module, panicking with the parse error. With `MGM_PTX_DUMP_DIR` set, also writes
/// the source there so the test kernels can be checked with ptxas.
pub fn module(src: &str) -> Module {
    if let Ok(dir) = std::env::var("MGM_PTX_DUMP_DIR") {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        src.hash(&mut h);
        std::fs::write(format!("{dir}/{:016x}.ptx", h.finish()), src)
            .expect("dump dir is writable");
    }
    Module::parse(src).unwrap_or_else(|e| panic!("parse failed: {e}"))
}

/// A 1-D launch of `blocks` x `threads`.
pub fn launch(blocks: u32, threads: u32) -> Launch {
    Launch {
        grid: [blocks, 1, 1],
        block: [threads, 1, 1],
        shared_bytes: 0,
        approx: Approx::Exact,
    }
}

/// Runs with a small instruction budget so a runaway test fails fast.
pub fn run(m: &Module, k: &str, l: Launch, args: &mut [Arg<'_>]) -> mgm_ptx::Result<Stats> {
    mgm_ptx::run_with(
        m,
        k,
        &l,
        args,
        &RunOptions {
            max_instructions: 1 << 28,
        },
    )
}

/// Wraps a kernel body: `.entry name(.param .u64 out, <extra params>)` with a standard set of
/// registers, `%rd1` = out and `%r1` = global thread index.
pub fn kernel(name: &str, params: &str, body: &str) -> String {
    format!(
        "{HEADER}.visible .entry {name}(.param .u64 out{params})\n{{\n\
         .reg .pred %p<8>;\n.reg .b16 %rs<8>;\n.reg .b32 %r<32>;\n.reg .f32 %f<32>;\n.reg .b64 %rd<32>;\n\
         ld.param.u64 %rd1, [out];\n\
         mov.u32 %r30, %tid.x;\nmov.u32 %r29, %ctaid.x;\nmov.u32 %r28, %ntid.x;\nmad.lo.s32 %r1, %r29, %r28, %r30;\n\
         mul.wide.u32 %rd30, %r1, 4;\nadd.s64 %rd29, %rd1, %rd30;\n\
         {body}\nret;\n}}\n"
    )
}
