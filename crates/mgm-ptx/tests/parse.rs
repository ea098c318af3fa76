//! Parser and validator: every supported form parses; unsupported or invalid PTX is an error
//! naming the line and quoting it.

mod common;

use common::HEADER;
use mgm_ptx::{Error, Module};

const ALL_FORMS: &str = include_str!("ptx/all_forms.ptx");

#[test]
fn every_supported_instruction_form_parses() {
    let m = Module::parse(ALL_FORMS).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.kernels(), ["all_forms"]);
    let statements = ALL_FORMS
        .lines()
        .map(|l| l.split("//").next().unwrap().trim())
        .filter(|l| l.ends_with(';') && !l.starts_with('.'))
        .count();
    // One decoded instruction per statement plus the implicit final return.
    assert_eq!(m.instruction_count("all_forms"), Some(statements + 1));
}

#[test]
fn kernels_are_listed_in_source_order() {
    let src =
        format!("{HEADER}.visible .entry b()\n{{\nret;\n}}\n.visible .entry a()\n{{\nret;\n}}\n");
    assert_eq!(Module::parse(&src).unwrap().kernels(), ["b", "a"]);
}

/// Puts `stmt` on line 9 of a small kernel and returns the parse error.
fn parse_stmt(stmt: &str) -> Error {
    let src = format!(
        "{HEADER}.visible .entry k(.param .u64 out, .param .u32 n)\n{{\n.reg .pred %p<2>;\n.reg .b32 %r<4>;\n\
         .reg .f32 %f<4>;\n.reg .b64 %rd<4>;\n{stmt}\nret;\n}}\n"
    );
    match Module::parse(&src) {
        Ok(_) => panic!("`{stmt}` parsed"),
        Err(e) => e,
    }
}

#[test]
fn invalid_or_unsupported_statements_are_errors_naming_line_and_text() {
    // (statement, fragment of the message)
    let cases = [
        (
            "vote.sync.all.pred %p1, %p0, 0xffffffff;",
            "unsupported instruction `vote.sync.all.pred`",
        ),
        ("call foo;", "unsupported instruction `call`"),
        ("ld.f32 %f1, [%rd1];", "generic addressing"),
        ("ld.local.f32 %f1, [%rd1];", "state space `.local`"),
        ("ld.global.f64 %f1, [%rd1];", "unsupported type `.f64`"),
        (
            "add.f64 %f1, %f1, %f1;",
            "unsupported type `.f64` in `add.f64`",
        ),
        ("cvt.rn.f16.f32 %r1, %f1;", "unsupported type `.f16`"),
        ("add.rz.f32 %f1, %f2, %f3;", "rounding `.rz`"),
        ("add.sat.f32 %f1, %f2, %f3;", "`.sat`"),
        ("add.f32 %f1, %f2, x;", "unknown name `x`"),
        ("add.f32 %f1, %f2, %f9;", "undeclared register `%f9`"),
        (
            "add.u32 %r1, %f1, %r2;",
            "register `%f1` of type `.f32` does not fit instruction type `.u32`",
        ),
        ("add.f32 %f1, %f2;", "takes 3 operands, found 2"),
        (
            "add.u32 %r1, %tid.x, 1;",
            "special register `%tid.x` can only be read",
        ),
        ("mov.u64 %rd1, %tid.x;", "special register `%tid.x` is .u32"),
        ("mov.f32 %f1, 0;", "immediate does not fit type `.f32`"),
        ("mov.u32 %r1, 5000000000;", "immediate does not fit"),
        (
            "and.u32 %r1, %r1, %r2;",
            "needs a .pred or .b16/.b32/.b64 type",
        ),
        ("shl.u32 %r1, %r1, 2;", "unsupported type `.u32` for `shl`"),
        (
            "shl.b32 %r1, %r1, %rd1;",
            "does not fit instruction type `.u32`",
        ),
        ("neg.u32 %r1, %r1;", "unsupported type `.u32` for `neg`"),
        ("mul.u32 %r1, %r1, %r2;", "needs `.lo` or `.wide`"),
        (
            "mul.wide.u64 %rd1, %rd1, %rd2;",
            "`.wide` needs a 16- or 32-bit type",
        ),
        ("fma.f32 %f1, %f1, %f2, %f3;", "needs `.rn`"),
        (
            "div.f32 %f1, %f1, %f2;",
            "needs `.rn`, `.approx` or `.full`",
        ),
        ("ex2.f32 %f1, %f1;", "supported forms are ex2.approx"),
        ("tanh.approx.ftz.f32 %f1, %f1;", "supported forms"),
        (
            "sin.approx.f32 %f1, %f1;",
            "unsupported instruction `sin.approx.f32`",
        ),
        ("setp.lt.b32 %p1, %r1, %r2;", "only compares with eq/ne"),
        ("setp.lo.f32 %p1, %f1, %f2;", "unsigned-integer comparison"),
        (
            "setp.lt.f32 %r1, %f1, %f2;",
            "register `%r1` of type `.b32` does not fit instruction type `.pred`",
        ),
        (
            "cvt.f32.u32 %f1, %r1;",
            "needs `.rn`, `.rz`, `.rm` or `.rp`",
        ),
        (
            "cvt.s32.f32 %r1, %f1;",
            "needs `.rni`, `.rzi`, `.rmi` or `.rpi`",
        ),
        (
            "cvt.rn.bf16.f32 %r1, %f1;",
            "does not fit instruction type `.bf16`",
        ),
        ("bra NOWHERE;", "undefined label `NOWHERE`"),
        ("ld.param.u32 %r1, [m];", "unknown parameter `m`"),
        ("ld.param.u64 %rd1, [n];", "parameter `n` is `.u32`"),
        (
            "ld.global.f32 %f1, [n];",
            "parameter `n` can only be read with `ld.param`",
        ),
        ("ld.global.f32 %f1, [%r1];", "cannot hold an address"),
        ("ld.shared.f32 %f1, [nosuch];", "unknown symbol `nosuch`"),
        (
            "ld.global.v4.f32 {%f1, %f2}, [%rd1];",
            "needs 4 register(s)",
        ),
        ("ld.global.v4.f64 {%f1, %f2, %f3, %f0}, [%rd1];", "f64"),
        ("shfl.bfly.b32 %r1, %r1, 1, 31;", "use `shfl.sync`"),
        ("shfl.sync.bfly.b32 %r1, %r1, 1, 31;", "takes 5 operands"),
        ("bar.sync %r1;", "barrier id must be an immediate"),
        ("bar.sync 0, 64;", "without a thread count"),
        ("bar.arrive 0;", "only bar.sync"),
        (
            "atom.global.min.f32 %f1, [%rd1], %f2;",
            "unsupported type `.f32`",
        ),
        (
            "atom.add.u32 %r1, [%rd1], 1;",
            "needs `.global` or `.shared`",
        ),
        ("red.global.cas.b32 [%rd1], 1, 2;", "`red` supports"),
        (
            "mov.u32 %tid.x, 1;",
            "special register `%tid.x` is read-only",
        ),
        ("add.f32 %f1, %f2, %f3", "missing `;`"),
        (".local .f32 scratch[4];", "unsupported directive `.local`"),
        ("@%r1 bra L;", "does not fit instruction type `.pred`"),
    ];
    for (stmt, want) in cases {
        let e = parse_stmt(stmt);
        let Error::Parse { line, msg } = &e else {
            panic!("`{stmt}`: not a parse error: {e}")
        };
        assert_eq!(*line, 10, "`{stmt}`: {e}");
        assert!(
            msg.contains(want),
            "`{stmt}`: message `{msg}` lacks `{want}`"
        );
        let quoted = stmt.trim_end_matches(';');
        assert!(
            e.to_string().contains(quoted) && e.to_string().starts_with("ptx line 10:"),
            "`{stmt}`: {e}"
        );
    }
}

#[test]
fn module_level_errors_name_their_line() {
    let cases = [
        (
            ".version 8.0\n.target sm_80\n.address_size 32\n",
            3,
            "address_size 64",
        ),
        (
            ".version 8.0\n.target sm_80\n.address_size 64\n.global .f32 g;\n",
            4,
            "unsupported directive",
        ),
        (
            ".version 8.0\n.target sm_80\n.address_size 64\n.func f()\n{\nret;\n}\n",
            4,
            "`.func`",
        ),
        (
            ".version 8.0\n.target sm_80\n.address_size 64\n.visible .entry k(.param .f64 x)\n{\nret;\n}\n",
            4,
            "parameter type",
        ),
        (
            ".version 8.0\n.target sm_80\n.address_size 64\n.visible .entry k()\n{\n.reg .f32 %f;\n.reg .f32 %f;\nret;\n}\n",
            7,
            "declared twice",
        ),
        (
            ".version 8.0\n.target sm_80\n.address_size 64\n.visible .entry k()\n{\nL:\nL:\nret;\n}\n",
            7,
            "defined twice",
        ),
        (
            ".version 8.0\n.target sm_80\n.address_size 64\n.visible .entry k()\n{\nret;\n",
            4,
            "not closed",
        ),
        ("/* open\n.version 8.0\n", 1, "unterminated"),
    ];
    for (src, want_line, want) in cases {
        let e = Module::parse(src).expect_err(src);
        let Error::Parse { line, msg } = &e else {
            panic!("{e}")
        };
        assert_eq!((*line, msg.contains(want)), (want_line, true), "{src}: {e}");
    }
}

#[test]
fn register_types_follow_ptx_compatibility_rules() {
    // .b registers fit any same-size instruction type, signedness does not matter for integers.
    let ok = [
        "add.f32 %f1, %r1, %f2;",
        "mov.b32 %f1, %r1;",
        "mov.b32 %r1, %f1;",
        "mul.lo.u32 %r1, %r2, %r3;",
        "ld.global.u16 %r1, [%rd1];",
        "ld.global.f32 %r1, [%rd1];",
        "cvt.u32.u16 %r1, %r1;",
    ];
    for stmt in ok {
        let src = format!(
            "{HEADER}.visible .entry k(.param .u64 out)\n{{\n.reg .b32 %r<4>;\n.reg .f32 %f<4>;\n.reg .b64 %rd<4>;\n{stmt}\nret;\n}}\n"
        );
        Module::parse(&src).unwrap_or_else(|e| panic!("`{stmt}`: {e}"));
    }
}

/// ptxas from `$PTXAS` or where `cargo xtask kernels` installs it.
fn ptxas() -> std::path::PathBuf {
    std::env::var_os("PTXAS")
        .map(Into::into)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/nvcc/nvidia/cuda_nvcc/bin/ptxas")
        })
}

/// The twin that runs everywhere is `every_supported_instruction_form_parses`.
#[test]
#[ignore = "needs ptxas (installed by `cargo xtask kernels`, or set PTXAS)"]
fn test_kernels_assemble_with_ptxas() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ptx");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        for arch in ["sm_80", "sm_90"] {
            let out = std::process::Command::new(ptxas())
                .args([&format!("-arch={arch}"), "-Werror", "-o", "/dev/null"])
                .arg(&path)
                .output()
                .expect("ptxas runs");
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
