//! Helpers shared by the `mgm` command tests.
#![allow(dead_code)] // each test file uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A committed fixture directory under tests/fixtures.
pub fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(case)
}

/// Runs the `mgm` binary with `args`.
pub fn mgm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mgm"))
        .args(args)
        .output()
        .expect("run the mgm binary")
}

/// Asserts failure with exactly one stderr line starting `error:` and containing every `needle`.
pub fn assert_one_error_line(out: &Output, needles: &[&str]) {
    assert!(!out.status.success(), "expected failure");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "stderr should be one line: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "`{n}` not in: {err}");
    }
}
