//! Parses and validates PTX files with mgm-ptx and lists their kernels:
//! `cargo run -p mgm-ptx --example ptx_check -- kernels/*.ptx`. Exits 1 on the first error.

use std::io::Write;

fn main() {
    let mut out = std::io::stdout().lock();
    let mut failed = false;
    for path in std::env::args().skip(1) {
        let src = match std::fs::read_to_string(&path) {
            Ok(s) => s,
            Err(e) => {
                let _ = writeln!(out, "{path}: {e}");
                failed = true;
                continue;
            }
        };
        match mgm_ptx::Module::parse(&src) {
            Ok(m) => {
                for k in m.kernels() {
                    let n = m.instruction_count(k).unwrap_or(0);
                    let _ = writeln!(out, "{path}: {k}: {n} instructions");
                }
            }
            Err(e) => {
                let _ = writeln!(out, "{path}: {e}");
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
