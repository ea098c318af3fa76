//! The interpreter: runs a decoded kernel block by block, thread by thread, with CUDA's
//! barrier and warp-shuffle semantics, and checks every memory access.

use crate::approx::{self, flush};
use crate::ast::*;
use crate::{Approx, Arg, Error, Fault, Launch, Result, RunOptions, Stats};

/// Each buffer argument lives in its own 2^36-byte window: `(k + 1) << 36` for the k-th buffer,
/// so an access just before or past a buffer falls in unmapped space, never into a neighbour.
const WINDOW_BITS: u32 = 36;

/// Largest shared memory per block any target allows (sm_90: 227 KiB; sm_80: 163 KiB; more
/// than 48 KiB of dynamic shared memory needs an opt-in attribute at launch on a GPU).
const MAX_SHARED: usize = 227 * 1024;

enum GBuf<'a> {
    In(&'a [u8]),
    Out(&'a mut [u8]),
}

struct Global<'a> {
    bufs: Vec<(GBuf<'a>, String)>,
}

impl Global<'_> {
    fn len(&self, i: usize) -> usize {
        match &self.bufs[i].0 {
            GBuf::In(s) => s.len(),
            GBuf::Out(s) => s.len(),
        }
    }

    /// Buffer index and offset of an access of `bytes` at `addr`, or the fault.
    fn resolve(
        &self,
        addr: u64,
        bytes: u32,
        write: bool,
    ) -> std::result::Result<(usize, usize), Fault> {
        let what = if write { "store" } else { "load" };
        let win = addr >> WINDOW_BITS;
        let off = addr & ((1u64 << WINDOW_BITS) - 1);
        if win == 0 || win as usize > self.bufs.len() {
            return Err(Fault::GlobalOutOfBounds {
                addr,
                bytes,
                detail: format!("global {what} is not inside any buffer argument"),
            });
        }
        let i = win as usize - 1;
        let len = self.len(i) as u64;
        if off + bytes as u64 > len {
            let name = &self.bufs[i].1;
            let detail = if off < len {
                format!(
                    "global {what} straddles the end of buffer `{name}` ({len} bytes) at offset {off}"
                )
            } else if off >= (1u64 << (WINDOW_BITS - 1)) {
                let before = (1u64 << WINDOW_BITS) - off;
                let next = &self.bufs.get(i + 1).map_or("?", |b| b.1.as_str());
                format!("global {what} is {before} bytes before the start of buffer `{next}`")
            } else {
                format!(
                    "global {what} at offset {off} is past the end of buffer `{name}` ({len} bytes)"
                )
            };
            return Err(Fault::GlobalOutOfBounds {
                addr,
                bytes,
                detail,
            });
        }
        if write && let GBuf::In(_) = self.bufs[i].0 {
            return Err(Fault::StoreToInput {
                param: self.bufs[i].1.clone(),
                offset: off,
            });
        }
        Ok((i, off as usize))
    }

    fn bytes(&self, i: usize) -> &[u8] {
        match &self.bufs[i].0 {
            GBuf::In(s) => s,
            GBuf::Out(s) => s,
        }
    }

    fn bytes_mut(&mut self, i: usize) -> &mut [u8] {
        match &mut self.bufs[i].0 {
            GBuf::Out(s) => s,
            GBuf::In(_) => unreachable!("resolve rejects stores into inputs"),
        }
    }
}

#[inline]
fn read_le(s: &[u8], size: usize) -> u64 {
    let mut b = [0u8; 8];
    b[..size].copy_from_slice(&s[..size]);
    u64::from_le_bytes(b)
}

#[inline]
fn write_le(s: &mut [u8], size: usize, v: u64) {
    s[..size].copy_from_slice(&v.to_le_bytes()[..size]);
}

/// Who touched one shared 4-byte word since the last barrier (thread ids are stored + 1, 0 = none).
#[derive(Clone, Copy, Default)]
struct Word {
    epoch: u32,
    writer: u32,
    writer_line: u32,
    acc1: u32,
    acc1_line: u32,
    acc2: u32,
    acc2_line: u32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    Atomic,
}

impl Access {
    fn name(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::Atomic => "atomic",
        }
    }
}

struct Shared {
    data: Vec<u8>,
    written: Vec<bool>,
    words: Vec<Word>,
    epoch: u32,
    block: [u32; 3],
}

impl Shared {
    fn new(size: usize) -> Self {
        Shared {
            data: vec![0; size],
            written: vec![false; size],
            words: vec![Word::default(); size.div_ceil(4)],
            epoch: 0,
            block: [1, 1, 1],
        }
    }

    fn check(&self, addr: u64, bytes: u32) -> std::result::Result<usize, Fault> {
        if addr
            .checked_add(bytes as u64)
            .is_none_or(|end| end > self.data.len() as u64)
        {
            return Err(Fault::SharedOutOfBounds {
                addr,
                bytes,
                size: self.data.len() as u32,
            });
        }
        Ok(addr as usize)
    }

    fn xyz(&self, t: u32) -> [u32; 3] {
        let [nx, ny, _] = self.block;
        [t % nx, (t / nx) % ny, t / (nx * ny)]
    }

    /// Race bookkeeping for an access of thread `t` to the words covering `[a, a + bytes)`.
    fn track(
        &mut self,
        a: usize,
        bytes: usize,
        t: u32,
        line: u32,
        kind: Access,
    ) -> std::result::Result<(), Fault> {
        let me = t + 1;
        for w in a / 4..(a + bytes).div_ceil(4) {
            let s = &mut self.words[w];
            if s.epoch != self.epoch {
                *s = Word {
                    epoch: self.epoch,
                    ..Word::default()
                };
            }
            let other = if kind == Access::Write {
                [
                    (s.writer, s.writer_line, Access::Write),
                    (s.acc1, s.acc1_line, Access::Read),
                    (s.acc2, s.acc2_line, Access::Read),
                ]
                .into_iter()
                .find(|(o, _, _)| *o != 0 && *o != me)
            } else if s.writer != 0 && s.writer != me {
                Some((s.writer, s.writer_line, Access::Write))
            } else {
                None
            };
            if let Some((o, oline, okind)) = other {
                return Err(Fault::SharedRace {
                    addr: (w * 4) as u64,
                    access: kind.name(),
                    other_thread: self.xyz(o - 1),
                    other_line: oline as usize,
                    other_access: if okind == Access::Write {
                        "wrote"
                    } else {
                        "accessed"
                    },
                });
            }
            if kind == Access::Write {
                s.writer = me;
                s.writer_line = line;
            }
            if s.acc1 == 0 {
                s.acc1 = me;
                s.acc1_line = line;
            } else if s.acc1 != me && s.acc2 == 0 {
                s.acc2 = me;
                s.acc2_line = line;
            }
        }
        Ok(())
    }

    fn read(
        &mut self,
        addr: u64,
        bytes: u32,
        t: u32,
        line: u32,
        kind: Access,
    ) -> std::result::Result<u64, Fault> {
        let a = self.check(addr, bytes)?;
        let n = bytes as usize;
        if let Some(k) = self.written[a..a + n].iter().position(|w| !w) {
            return Err(Fault::UninitializedShared {
                addr: (a + k) as u64,
            });
        }
        self.track(a, n, t, line, kind)?;
        Ok(read_le(&self.data[a..], n))
    }

    fn write(
        &mut self,
        addr: u64,
        bytes: u32,
        v: u64,
        t: u32,
        line: u32,
        kind: Access,
    ) -> std::result::Result<(), Fault> {
        let a = self.check(addr, bytes)?;
        let n = bytes as usize;
        if kind == Access::Write {
            self.track(a, n, t, line, kind)?;
        }
        write_le(&mut self.data[a..], n, v);
        self.written[a..a + n].fill(true);
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum TState {
    Ready,
    Bar,
    Shfl,
    Exited,
}

enum Stop {
    Bar,
    Shfl,
    Exit,
}

/// A fault of one thread at one instruction.
struct Trap {
    pc: u32,
    fault: Fault,
}

/// Per-launch state shared by all threads.
struct Cx<'k> {
    k: &'k Kernel,
    params: Vec<u64>,
    approx: Approx,
    budget: u64,
    limit: u64,
    approx_calls: u64,
    stats: Stats,
}

#[inline(always)]
fn f(v: u64) -> f32 {
    f32::from_bits(v as u32)
}

#[inline(always)]
fn fb(x: f32) -> u64 {
    x.to_bits() as u64
}

fn fmin(a: f32, b: f32) -> f32 {
    if a.is_nan() {
        return b;
    }
    if b.is_nan() {
        return a;
    }
    if a == b {
        // -0.0 is smaller than +0.0.
        return f32::from_bits(a.to_bits() | b.to_bits());
    }
    if a < b { a } else { b }
}

fn fmax(a: f32, b: f32) -> f32 {
    if a.is_nan() {
        return b;
    }
    if b.is_nan() {
        return a;
    }
    if a == b {
        return f32::from_bits(a.to_bits() & b.to_bits());
    }
    if a > b { a } else { b }
}

fn fcmp(c: Cmp, x: f32, y: f32) -> bool {
    let nan = x.is_nan() || y.is_nan();
    match c {
        Cmp::Eq => x == y,
        Cmp::Ne => !nan && x != y,
        Cmp::Lt => x < y,
        Cmp::Le => x <= y,
        Cmp::Gt => x > y,
        Cmp::Ge => x >= y,
        Cmp::Equ => nan || x == y,
        Cmp::Neu => nan || x != y,
        Cmp::Ltu => nan || x < y,
        Cmp::Leu => nan || x <= y,
        Cmp::Gtu => nan || x > y,
        Cmp::Geu => nan || x >= y,
        Cmp::Num => !nan,
        Cmp::Nan => nan,
        Cmp::Lo | Cmp::Ls | Cmp::Hi | Cmp::Hs => unreachable!("rejected by the parser for f32"),
    }
}

fn icmp(c: Cmp, a: u64, b: u64, bits: u8, signed: bool) -> bool {
    let (sa, sb) = (sext(a, bits), sext(b, bits));
    match c {
        Cmp::Eq => a == b,
        Cmp::Ne => a != b,
        Cmp::Lt if signed => sa < sb,
        Cmp::Le if signed => sa <= sb,
        Cmp::Gt if signed => sa > sb,
        Cmp::Ge if signed => sa >= sb,
        Cmp::Lt | Cmp::Lo => a < b,
        Cmp::Le | Cmp::Ls => a <= b,
        Cmp::Gt | Cmp::Hi => a > b,
        Cmp::Ge | Cmp::Hs => a >= b,
        _ => unreachable!("float-only comparisons are rejected by the parser for integers"),
    }
}

fn ext(v: u64, bits: u8, signed: bool) -> u64 {
    if signed {
        sext(v, bits) as u64
    } else {
        v & mask_of(bits as u32)
    }
}

/// Integer to f32 with a rounding mode (Rust's `as` rounds to nearest even).
fn int_to_f32(v: i128, rnd: Rnd) -> f32 {
    let r = v as f32;
    if rnd == Rnd::Nearest {
        return r;
    }
    let back = r as i128;
    if back == v {
        return r;
    }
    let up = |x: f32| {
        if x >= 0.0 {
            approx::step(x, true)
        } else {
            approx::step(x, false)
        }
    };
    let down = |x: f32| {
        if x > 0.0 {
            approx::step(x, false)
        } else {
            approx::step(x, true)
        }
    };
    match rnd {
        Rnd::Down if back > v => down(r),
        Rnd::Up if back < v => up(r),
        Rnd::Zero if back.abs() > v.abs() => {
            if v > 0 {
                down(r)
            } else {
                up(r)
            }
        }
        _ => r,
    }
}

fn round_int(x: f32, rnd: Rnd) -> f32 {
    match rnd {
        Rnd::Nearest => x.round_ties_even(),
        Rnd::Zero => x.trunc(),
        Rnd::Down => x.floor(),
        Rnd::Up => x.ceil(),
    }
}

/// f32 to integer: round, saturate to the destination range, NaN to 0 (PTX semantics).
fn f32_to_int(x: f32, rnd: Rnd, bits: u8, signed: bool) -> u64 {
    if x.is_nan() {
        return 0;
    }
    let r = round_int(x, rnd) as f64;
    let (lo, hi) = if signed {
        (
            -(2f64.powi(bits as i32 - 1)),
            2f64.powi(bits as i32 - 1) - 1.0,
        )
    } else {
        (0.0, 2f64.powi(bits as i32) - 1.0)
    };
    let v: i128 = if r <= lo {
        lo as i128
    } else if r >= hi {
        if signed {
            (1i128 << (bits - 1)) - 1
        } else {
            (1i128 << bits) - 1
        }
    } else {
        r as i128
    };
    (v as u64) & mask_of(bits as u32)
}

fn f32_to_bf16(x: f32, rnd: Rnd) -> u64 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u64;
    }
    let h = match rnd {
        Rnd::Zero => b >> 16,
        _ => (b + 0x7FFF + ((b >> 16) & 1)) >> 16,
    };
    (h & 0xFFFF) as u64
}

/// Runs one thread until it exits, reaches a barrier or a shuffle, or faults.
fn run_thread(
    cx: &mut Cx,
    regs: &mut [u64],
    pc_ref: &mut u32,
    t: u32,
    sh: &mut Shared,
    g: &mut Global,
) -> std::result::Result<Stop, Trap> {
    let insts = &cx.k.insts[..];
    let mut pc = *pc_ref as usize;
    let mut budget = cx.budget;
    let start_budget = budget;
    macro_rules! trap {
        ($f:expr) => {{
            cx.budget = budget;
            cx.stats.instructions += start_budget - budget;
            *pc_ref = pc as u32;
            return Err(Trap {
                pc: pc as u32,
                fault: $f,
            });
        }};
    }
    macro_rules! stop {
        ($s:expr) => {{
            cx.budget = budget;
            cx.stats.instructions += start_budget - budget;
            *pc_ref = pc as u32;
            return Ok($s);
        }};
    }
    macro_rules! r {
        ($s:expr) => {
            regs[$s as usize]
        };
    }
    loop {
        let inst = &insts[pc];
        if budget == 0 {
            trap!(Fault::BudgetExceeded { limit: cx.limit });
        }
        budget -= 1;
        if inst.guard != NO_SLOT && (r!(inst.guard) != 0) == inst.guard_neg {
            pc += 1;
            continue;
        }
        match inst.op {
            Op::Nop => {}
            Op::Mov { d, a } => r!(d) = r!(a),
            Op::Add { d, a, b, mask } => r!(d) = r!(a).wrapping_add(r!(b)) & mask,
            Op::Sub { d, a, b, mask } => r!(d) = r!(a).wrapping_sub(r!(b)) & mask,
            Op::MulLo { d, a, b, mask } => r!(d) = r!(a).wrapping_mul(r!(b)) & mask,
            Op::MulHi {
                d,
                a,
                b,
                bits,
                signed,
            } => {
                let v = if signed {
                    ((sext(r!(a), bits) as i128 * sext(r!(b), bits) as i128) >> bits) as u64
                } else {
                    ((r!(a) as u128 * r!(b) as u128) >> bits) as u64
                };
                r!(d) = v & mask_of(bits as u32);
            }
            Op::MulWide {
                d,
                a,
                b,
                bits,
                signed,
            } => {
                let v = if signed {
                    sext(r!(a), bits).wrapping_mul(sext(r!(b), bits)) as u64
                } else {
                    r!(a).wrapping_mul(r!(b))
                };
                r!(d) = v & mask_of(2 * bits as u32);
            }
            Op::MadLo { d, a, b, c, mask } => {
                r!(d) = r!(a).wrapping_mul(r!(b)).wrapping_add(r!(c)) & mask
            }
            Op::MadWide {
                d,
                a,
                b,
                c,
                bits,
                signed,
            } => {
                let p = if signed {
                    sext(r!(a), bits).wrapping_mul(sext(r!(b), bits)) as u64
                } else {
                    r!(a).wrapping_mul(r!(b))
                };
                r!(d) = p.wrapping_add(r!(c)) & mask_of(2 * bits as u32);
            }
            Op::Div {
                d,
                a,
                b,
                bits,
                signed,
            }
            | Op::Rem {
                d,
                a,
                b,
                bits,
                signed,
            } => {
                let (x, y) = (r!(a), r!(b));
                if y == 0 {
                    trap!(Fault::DivisionByZero);
                }
                let is_div = matches!(inst.op, Op::Div { .. });
                let v = if signed {
                    let (x, y) = (sext(x, bits), sext(y, bits));
                    (if is_div {
                        x.wrapping_div(y)
                    } else {
                        x.wrapping_rem(y)
                    }) as u64
                } else if is_div {
                    x / y
                } else {
                    x % y
                };
                r!(d) = v & mask_of(bits as u32);
            }
            Op::And { d, a, b } => r!(d) = r!(a) & r!(b),
            Op::Or { d, a, b } => r!(d) = r!(a) | r!(b),
            Op::Xor { d, a, b } => r!(d) = r!(a) ^ r!(b),
            Op::Not { d, a, mask } => r!(d) = !r!(a) & mask,
            Op::Neg { d, a, mask } => r!(d) = 0u64.wrapping_sub(r!(a)) & mask,
            Op::Shl { d, a, b, bits } => {
                let s = r!(b) as u32;
                r!(d) = if s >= bits as u32 {
                    0
                } else {
                    (r!(a) << s) & mask_of(bits as u32)
                };
            }
            Op::Shr {
                d,
                a,
                b,
                bits,
                signed,
            } => {
                let s = r!(b) as u32;
                r!(d) = if signed {
                    ((sext(r!(a), bits) >> s.min(bits as u32 - 1)) as u64) & mask_of(bits as u32)
                } else if s >= bits as u32 {
                    0
                } else {
                    r!(a) >> s
                };
            }
            Op::Min {
                d,
                a,
                b,
                bits,
                signed,
            }
            | Op::Max {
                d,
                a,
                b,
                bits,
                signed,
            } => {
                let (x, y) = (r!(a), r!(b));
                let less = if signed {
                    sext(x, bits) < sext(y, bits)
                } else {
                    x < y
                };
                let is_min = matches!(inst.op, Op::Min { .. });
                r!(d) = if less == is_min { x } else { y };
            }
            Op::Abs { d, a, bits } => {
                r!(d) = (sext(r!(a), bits).wrapping_abs() as u64) & mask_of(bits as u32)
            }
            Op::FAdd { d, a, b, ftz } => {
                r!(d) = fb(if ftz {
                    flush(flush(f(r!(a))) + flush(f(r!(b))))
                } else {
                    f(r!(a)) + f(r!(b))
                })
            }
            Op::FSub { d, a, b, ftz } => {
                r!(d) = fb(if ftz {
                    flush(flush(f(r!(a))) - flush(f(r!(b))))
                } else {
                    f(r!(a)) - f(r!(b))
                })
            }
            Op::FMul { d, a, b, ftz } => {
                r!(d) = fb(if ftz {
                    flush(flush(f(r!(a))) * flush(f(r!(b))))
                } else {
                    f(r!(a)) * f(r!(b))
                })
            }
            Op::FFma { d, a, b, c, ftz } => {
                r!(d) = fb(if ftz {
                    flush(flush(f(r!(a))).mul_add(flush(f(r!(b))), flush(f(r!(c)))))
                } else {
                    f(r!(a)).mul_add(f(r!(b)), f(r!(c)))
                })
            }
            Op::FNeg { d, a, ftz } => {
                let x = if ftz { flush(f(r!(a))) } else { f(r!(a)) };
                r!(d) = fb(-x);
            }
            Op::FAbs { d, a, ftz } => {
                let x = if ftz { flush(f(r!(a))) } else { f(r!(a)) };
                r!(d) = fb(x.abs());
            }
            Op::FMin { d, a, b, ftz } | Op::FMax { d, a, b, ftz } => {
                let (x, y) = (f(r!(a)), f(r!(b)));
                let (x, y) = if ftz { (flush(x), flush(y)) } else { (x, y) };
                r!(d) = fb(if matches!(inst.op, Op::FMin { .. }) {
                    fmin(x, y)
                } else {
                    fmax(x, y)
                });
            }
            Op::FDiv { d, a, b, ftz } => {
                r!(d) = fb(if ftz {
                    flush(flush(f(r!(a))) / flush(f(r!(b))))
                } else {
                    f(r!(a)) / f(r!(b))
                })
            }
            Op::FDivApprox { d, a, b, ftz, full } => {
                cx.approx_calls += 1;
                r!(d) = fb(approx::div(
                    f(r!(a)),
                    f(r!(b)),
                    ftz,
                    full,
                    cx.approx,
                    cx.approx_calls,
                ));
            }
            Op::FUnary { d, a, f: func, ftz } => {
                cx.approx_calls += 1;
                r!(d) = fb(approx::eval(
                    func,
                    f(r!(a)),
                    ftz,
                    cx.approx,
                    cx.approx_calls,
                ));
            }
            Op::CvtInt {
                d,
                a,
                from_bits,
                from_signed,
                to_bits,
                to_signed,
                dmask,
            } => {
                let v = ext(r!(a), from_bits, from_signed);
                r!(d) = ext(v, to_bits, to_signed) & dmask;
            }
            Op::CvtIntF32 {
                d,
                a,
                bits,
                signed,
                rnd,
            } => {
                let v = if signed {
                    sext(r!(a), bits) as i128
                } else {
                    (r!(a) & mask_of(bits as u32)) as i128
                };
                r!(d) = fb(int_to_f32(v, rnd));
            }
            Op::CvtF32Int {
                d,
                a,
                bits,
                signed,
                rnd,
                ftz,
                dmask,
            } => {
                let x = if ftz { flush(f(r!(a))) } else { f(r!(a)) };
                r!(d) = ext(f32_to_int(x, rnd, bits, signed), bits, signed) & dmask;
            }
            Op::CvtF32F32 { d, a, rnd, ftz } => {
                let x = if ftz { flush(f(r!(a))) } else { f(r!(a)) };
                let y = match rnd {
                    Some(rn) => round_int(x, rn),
                    None => x,
                };
                r!(d) = fb(if ftz { flush(y) } else { y });
            }
            Op::CvtF32Bf16 { d, a, rnd } => r!(d) = f32_to_bf16(f(r!(a)), rnd),
            Op::CvtBf16F32 { d, a } => r!(d) = (r!(a) & 0xFFFF) << 16,
            Op::Setp {
                d,
                d2,
                a,
                b,
                c,
                cmp,
                ty,
                bop,
                c_neg,
            } => {
                let v = match ty {
                    CmpTy::F32 => fcmp(cmp, f(r!(a)), f(r!(b))),
                    CmpTy::Int { bits, signed } => icmp(cmp, r!(a), r!(b), bits, signed),
                };
                let cv = c != NO_SLOT && ((r!(c) != 0) != c_neg);
                let comb = |x: bool| match bop {
                    BoolOp::None => x,
                    BoolOp::And => x && cv,
                    BoolOp::Or => x || cv,
                    BoolOp::Xor => x ^ cv,
                };
                r!(d) = comb(v) as u64;
                if d2 != NO_SLOT {
                    r!(d2) = comb(!v) as u64;
                }
            }
            Op::Selp { d, a, b, c } => r!(d) = if r!(c) != 0 { r!(a) } else { r!(b) },
            Op::Bra { target } => {
                pc = target as usize;
                continue;
            }
            Op::Exit => stop!(Stop::Exit),
            Op::Bar => stop!(Stop::Bar),
            Op::Shfl { .. } => stop!(Stop::Shfl),
            Op::LdParam { d, idx } => r!(d) = cx.params[idx as usize],
            Op::Ld {
                space,
                dst,
                n,
                size,
                signed,
                dmask,
                addr,
                off,
            } => {
                let base = r!(addr).wrapping_add(off as u64);
                let total = n as u32 * size as u32;
                if !base.is_multiple_of(total as u64) {
                    let sp = if space == Space::Global {
                        "global"
                    } else {
                        "shared"
                    };
                    trap!(Fault::Misaligned {
                        space: sp,
                        addr: base,
                        align: total
                    });
                }
                match space {
                    Space::Global => {
                        let (i, o) = match g.resolve(base, total, false) {
                            Ok(x) => x,
                            Err(e) => trap!(e),
                        };
                        let bytes = g.bytes(i);
                        for k in 0..n as usize {
                            let v = read_le(&bytes[o + k * size as usize..], size as usize);
                            let v = if signed { sext(v, size * 8) as u64 } else { v };
                            r!(dst[k]) = v & dmask;
                        }
                        cx.stats.global_bytes_read += total as u64;
                    }
                    Space::Shared => {
                        for k in 0..n as usize {
                            let a = base + (k * size as usize) as u64;
                            let v = match sh.read(a, size as u32, t, inst.line, Access::Read) {
                                Ok(v) => v,
                                Err(e) => trap!(e),
                            };
                            let v = if signed { sext(v, size * 8) as u64 } else { v };
                            r!(dst[k]) = v & dmask;
                        }
                    }
                }
            }
            Op::St {
                space,
                src,
                n,
                size,
                addr,
                off,
            } => {
                let base = r!(addr).wrapping_add(off as u64);
                let total = n as u32 * size as u32;
                if !base.is_multiple_of(total as u64) {
                    let sp = if space == Space::Global {
                        "global"
                    } else {
                        "shared"
                    };
                    trap!(Fault::Misaligned {
                        space: sp,
                        addr: base,
                        align: total
                    });
                }
                match space {
                    Space::Global => {
                        let (i, o) = match g.resolve(base, total, true) {
                            Ok(x) => x,
                            Err(e) => trap!(e),
                        };
                        let bytes = g.bytes_mut(i);
                        for k in 0..n as usize {
                            write_le(
                                &mut bytes[o + k * size as usize..],
                                size as usize,
                                r!(src[k]),
                            );
                        }
                        cx.stats.global_bytes_written += total as u64;
                    }
                    Space::Shared => {
                        for k in 0..n as usize {
                            let a = base + (k * size as usize) as u64;
                            if let Err(e) =
                                sh.write(a, size as u32, r!(src[k]), t, inst.line, Access::Write)
                            {
                                trap!(e);
                            }
                        }
                    }
                }
            }
            Op::Atom {
                space,
                op,
                ty,
                d,
                addr,
                off,
                b,
                c,
            } => {
                let a = r!(addr).wrapping_add(off as u64);
                let size = ty.bytes();
                if !a.is_multiple_of(size as u64) {
                    let sp = if space == Space::Global {
                        "global"
                    } else {
                        "shared"
                    };
                    trap!(Fault::Misaligned {
                        space: sp,
                        addr: a,
                        align: size
                    });
                }
                let old = match space {
                    Space::Global => match g.resolve(a, size, true) {
                        Ok((i, o)) => read_le(&g.bytes(i)[o..], size as usize),
                        Err(e) => trap!(e),
                    },
                    Space::Shared => match sh.read(a, size, t, inst.line, Access::Atomic) {
                        Ok(v) => v,
                        Err(e) => trap!(e),
                    },
                };
                let (x, y) = (r!(b), if c != NO_SLOT { r!(c) } else { 0 });
                let bits = (size * 8) as u8;
                let m = mask_of(size * 8);
                let signed = matches!(ty, AtomTy::S32 | AtomTy::S64);
                let new = match op {
                    // Global f32 atomic adds always flush subnormals; shared ones keep them
                    // (CUDA Programming Guide, "Floating-Point Standard").
                    AtomOp::Add if ty == AtomTy::F32 && space == Space::Global => {
                        fb(flush(flush(f(old)) + flush(f(x))))
                    }
                    AtomOp::Add if ty == AtomTy::F32 => fb(f(old) + f(x)),
                    AtomOp::Add => old.wrapping_add(x) & m,
                    AtomOp::Min | AtomOp::Max => {
                        let less = if signed {
                            sext(x, bits) < sext(old, bits)
                        } else {
                            x < old
                        };
                        if less == (op == AtomOp::Min) { x } else { old }
                    }
                    AtomOp::Exch => x,
                    AtomOp::Cas => {
                        if old == x {
                            y
                        } else {
                            old
                        }
                    }
                    AtomOp::And => old & x,
                    AtomOp::Or => old | x,
                    AtomOp::Xor => old ^ x,
                };
                match space {
                    Space::Global => {
                        let (i, o) = g.resolve(a, size, true).expect("resolved above");
                        write_le(&mut g.bytes_mut(i)[o..], size as usize, new);
                    }
                    Space::Shared => {
                        if let Err(e) = sh.write(a, size, new, t, inst.line, Access::Atomic) {
                            trap!(e);
                        }
                    }
                }
                cx.stats.atomics += 1;
                if d != NO_SLOT {
                    r!(d) = old;
                }
            }
        }
        pc += 1;
    }
}

/// Source lane and validity of a `shfl.sync` for `lane` (PTX ISA semantics of b and c).
fn shfl_source(mode: ShflMode, lane: u32, b: u32, c: u32) -> (u32, bool) {
    let bval = b & 0x1f;
    let cval = c & 0x1f;
    let segmask = (c >> 8) & 0x1f;
    let max_lane = (lane & segmask) | (cval & !segmask);
    let min_lane = lane & segmask;
    let (j, ok) = match mode {
        ShflMode::Up => {
            let j = lane as i32 - bval as i32;
            (j, j >= max_lane as i32)
        }
        ShflMode::Down => {
            let j = (lane + bval) as i32;
            (j, j <= max_lane as i32)
        }
        ShflMode::Bfly => {
            let j = (lane ^ bval) as i32;
            (j, j <= max_lane as i32)
        }
        ShflMode::Idx => {
            let j = (min_lane | (bval & !segmask)) as i32;
            (j, j <= max_lane as i32)
        }
    };
    if ok { (j as u32, true) } else { (lane, false) }
}

struct Block {
    n: usize,
    nslots: usize,
    regs: Vec<u64>,
    pc: Vec<u32>,
    state: Vec<TState>,
}

fn line_of(k: &Kernel, pc: u32) -> u32 {
    k.insts[pc as usize].line
}

/// Fires the shuffle the first waiting lane of warp `w` waits at, or reports the divergence.
fn fire_shfl(
    cx: &mut Cx,
    bl: &mut Block,
    w: usize,
    xyz: &dyn Fn(u32) -> [u32; 3],
) -> std::result::Result<(), (u32, Trap)> {
    let lo = w * 32;
    let hi = (lo + 32).min(bl.n);
    let first = (lo..hi)
        .find(|&t| bl.state[t] == TState::Shfl)
        .expect("caller saw a waiting lane");
    let pc0 = bl.pc[first];
    let Op::Shfl {
        d,
        p,
        a,
        b,
        c,
        mask,
        mode,
    } = cx.k.insts[pc0 as usize].op
    else {
        unreachable!("threads wait only at shfl instructions");
    };
    let ns = bl.nslots;
    let reg = |t: usize, s: Slot| bl.regs[t * ns + s as usize];
    let m0 = reg(first, mask) as u32;
    let div = |t: usize, msg: String| {
        (
            t as u32,
            Trap {
                pc: pc0,
                fault: Fault::ShuffleDivergence { detail: msg },
            },
        )
    };
    let lane0 = (first - lo) as u32;
    if m0 & (1 << lane0) == 0 {
        return Err(div(
            first,
            format!("membermask {m0:#010x} does not include the executing lane {lane0}"),
        ));
    }
    for j in 0..32u32 {
        if m0 & (1 << j) == 0 {
            continue;
        }
        let t = lo + j as usize;
        if t >= hi {
            return Err(div(
                first,
                format!(
                    "membermask {m0:#010x} names lane {j} but this warp has only {} threads",
                    hi - lo
                ),
            ));
        }
        let tx = xyz(t as u32);
        match bl.state[t] {
            TState::Shfl if bl.pc[t] == pc0 => {
                let mj = reg(t, mask) as u32;
                if mj != m0 {
                    return Err(div(
                        first,
                        format!("lane {j} uses membermask {mj:#010x}, this lane {m0:#010x}"),
                    ));
                }
            }
            TState::Shfl => {
                return Err(div(
                    first,
                    format!(
                        "lane {j} (thread {tx:?}) waits at a different shfl.sync on line {}",
                        line_of(cx.k, bl.pc[t])
                    ),
                ));
            }
            TState::Bar => {
                return Err(div(
                    first,
                    format!(
                        "lane {j} (thread {tx:?}) waits at bar.sync on line {}",
                        line_of(cx.k, bl.pc[t])
                    ),
                ));
            }
            TState::Exited => {
                return Err(div(
                    first,
                    format!(
                        "lane {j} (thread {tx:?}) has exited (line {})",
                        line_of(cx.k, bl.pc[t])
                    ),
                ));
            }
            TState::Ready => unreachable!("all lanes ran until blocked"),
        }
    }
    let mut vals = [0u64; 32];
    let mut out = [(0u64, false); 32];
    for j in 0..32u32 {
        if m0 & (1 << j) != 0 {
            vals[j as usize] = reg(lo + j as usize, a);
        }
    }
    for j in 0..32u32 {
        if m0 & (1 << j) == 0 {
            continue;
        }
        let t = lo + j as usize;
        let (src, ok) = shfl_source(mode, j, reg(t, b) as u32, reg(t, c) as u32);
        if ok && m0 & (1 << src) == 0 {
            return Err(div(
                t,
                format!("lane {j} reads lane {src}, which is not in membermask {m0:#010x}"),
            ));
        }
        out[j as usize] = (vals[src as usize], ok);
    }
    for j in 0..32u32 {
        if m0 & (1 << j) == 0 {
            continue;
        }
        let t = lo + j as usize;
        let (v, ok) = out[j as usize];
        bl.regs[t * ns + d as usize] = v;
        if p != NO_SLOT {
            bl.regs[t * ns + p as usize] = ok as u64;
        }
        bl.pc[t] += 1;
        bl.state[t] = TState::Ready;
    }
    cx.stats.shuffles += 1;
    Ok(())
}

/// Runs one block to completion; a fault carries the linear id of the faulting thread.
fn run_block(
    cx: &mut Cx,
    bl: &mut Block,
    sh: &mut Shared,
    g: &mut Global,
) -> std::result::Result<(), (u32, Trap)> {
    let k = cx.k;
    let nwarps = bl.n.div_ceil(32);
    let ns = bl.nslots;
    let blockdim = sh.block;
    let xyz = move |t: u32| {
        [
            t % blockdim[0],
            (t / blockdim[0]) % blockdim[1],
            t / (blockdim[0] * blockdim[1]),
        ]
    };
    loop {
        for w in 0..nwarps {
            let lo = w * 32;
            let hi = (lo + 32).min(bl.n);
            loop {
                let mut waiting = false;
                for t in lo..hi {
                    if bl.state[t] != TState::Ready {
                        waiting |= bl.state[t] == TState::Shfl;
                        continue;
                    }
                    let regs = &mut bl.regs[t * ns..(t + 1) * ns];
                    match run_thread(cx, regs, &mut bl.pc[t], t as u32, sh, g) {
                        Ok(Stop::Bar) => bl.state[t] = TState::Bar,
                        Ok(Stop::Shfl) => {
                            bl.state[t] = TState::Shfl;
                            waiting = true;
                        }
                        Ok(Stop::Exit) => bl.state[t] = TState::Exited,
                        Err(trap) => return Err((t as u32, trap)),
                    }
                }
                if !waiting {
                    break;
                }
                fire_shfl(cx, bl, w, &xyz)?;
            }
        }
        let Some(first) = bl.state.iter().position(|s| *s == TState::Bar) else {
            return Ok(()); // every thread has exited
        };
        let pc0 = bl.pc[first];
        let bar_div = |detail: String| {
            (
                first as u32,
                Trap {
                    pc: pc0,
                    fault: Fault::BarrierDivergence { detail },
                },
            )
        };
        if let Some(e) = bl.state.iter().position(|s| *s == TState::Exited) {
            return Err(bar_div(format!(
                "thread {:?} waits at bar.sync but thread {:?} has exited (line {})",
                xyz(first as u32),
                xyz(e as u32),
                line_of(k, bl.pc[e])
            )));
        }
        if let Some(o) = (0..bl.n).find(|&t| bl.pc[t] != pc0) {
            return Err(bar_div(format!(
                "thread {:?} waits at bar.sync on line {} but thread {:?} waits at the one on line {}",
                xyz(first as u32),
                line_of(k, pc0),
                xyz(o as u32),
                line_of(k, bl.pc[o])
            )));
        }
        cx.stats.barriers += 1;
        sh.epoch = sh.epoch.wrapping_add(1);
        for t in 0..bl.n {
            bl.pc[t] += 1;
            bl.state[t] = TState::Ready;
        }
    }
}

/// Validates the launch and arguments, then runs every block in order.
pub(crate) fn run(
    k: &Kernel,
    launch: &Launch,
    args: &mut [Arg<'_>],
    opts: &RunOptions,
) -> Result<Stats> {
    let args_err = |msg: String| Error::Args {
        kernel: k.name.clone(),
        msg,
    };
    let [bx, by, bz] = launch.block;
    let [gx, gy, gz] = launch.grid;
    if bx == 0 || by == 0 || bz == 0 || gx == 0 || gy == 0 || gz == 0 {
        return Err(args_err(format!(
            "empty launch: grid {:?}, block {:?}",
            launch.grid, launch.block
        )));
    }
    let nthreads = bx as u64 * by as u64 * bz as u64;
    if nthreads > 1024 || bz > 64 {
        return Err(args_err(format!(
            "block {:?} exceeds 1024 threads or z > 64",
            launch.block
        )));
    }
    if gy > 65535 || gz > 65535 {
        return Err(args_err(format!(
            "grid {:?} exceeds 65535 in y or z",
            launch.grid
        )));
    }
    if let Some(r) = k.reqntid
        && r != launch.block
    {
        return Err(args_err(format!(
            "block {:?} does not match .reqntid {r:?}",
            launch.block
        )));
    }
    if let Some(m) = k.maxntid
        && nthreads > m[0] as u64 * m[1] as u64 * m[2] as u64
    {
        return Err(args_err(format!(
            "block {:?} exceeds .maxntid {m:?}",
            launch.block
        )));
    }
    if args.len() != k.params.len() {
        return Err(args_err(format!(
            "{} arguments given, the kernel has {} parameters",
            args.len(),
            k.params.len()
        )));
    }
    let mut params = Vec::with_capacity(args.len());
    let mut bufs = Vec::new();
    for (i, (p, a)) in k.params.iter().zip(args.iter_mut()).enumerate() {
        let kind = match a {
            Arg::In(_) | Arg::Out(_) => "a buffer",
            Arg::U32(_) => "U32",
            Arg::I32(_) => "I32",
            Arg::U64(_) => "U64",
            Arg::F32(_) => "F32",
        };
        let v = match (p.ty, a) {
            (Ty::U64 | Ty::B64 | Ty::S64, Arg::In(s)) => {
                bufs.push((GBuf::In(s), p.name.clone()));
                (bufs.len() as u64) << WINDOW_BITS
            }
            (Ty::U64 | Ty::B64 | Ty::S64, Arg::Out(s)) => {
                bufs.push((GBuf::Out(s), p.name.clone()));
                (bufs.len() as u64) << WINDOW_BITS
            }
            (Ty::U64 | Ty::B64 | Ty::S64, Arg::U64(v)) => *v,
            (Ty::U32 | Ty::B32, Arg::U32(v)) => *v as u64,
            (Ty::S32, Arg::I32(v)) => *v as u32 as u64,
            (Ty::F32, Arg::F32(v)) => v.to_bits() as u64,
            _ => {
                return Err(args_err(format!(
                    "parameter {i} `{}` is `{}` but the argument is {kind}",
                    p.name,
                    p.ty.name()
                )));
            }
        };
        params.push(v);
    }
    if bufs.len() as u64 >= (1 << (64 - WINDOW_BITS)) - 1 {
        return Err(args_err("too many buffers".into()));
    }
    let shared_size = match k.extern_offset {
        Some(o) => o as usize + launch.shared_bytes as usize,
        None => k.static_shared as usize,
    };
    if shared_size > MAX_SHARED {
        return Err(args_err(format!(
            "{shared_size} bytes of shared memory per block exceed the {MAX_SHARED}-byte maximum"
        )));
    }
    let mut g = Global { bufs };
    let mut cx = Cx {
        k,
        params,
        approx: launch.approx,
        budget: opts.max_instructions,
        limit: opts.max_instructions,
        approx_calls: 0,
        stats: Stats {
            shared_bytes: shared_size as u32,
            ..Stats::default()
        },
    };
    let n = nthreads as usize;
    let ns = k.template.len();
    let mut template = k.template.clone();
    for (i, v) in [bx, by, bz].into_iter().enumerate() {
        template[special::NTID as usize + i] = v as u64;
    }
    for (i, v) in [gx, gy, gz].into_iter().enumerate() {
        template[special::NCTAID as usize + i] = v as u64;
    }
    let mut bl = Block {
        n,
        nslots: ns,
        regs: vec![0; n * ns],
        pc: vec![0; n],
        state: vec![TState::Ready; n],
    };
    let mut sh = Shared::new(shared_size);
    sh.block = launch.block;
    for cz in 0..gz {
        for cy in 0..gy {
            for cxid in 0..gx {
                let ctaid = [cxid, cy, cz];
                for (i, v) in ctaid.into_iter().enumerate() {
                    template[special::CTAID as usize + i] = v as u64;
                }
                for t in 0..n {
                    let r = &mut bl.regs[t * ns..(t + 1) * ns];
                    r.copy_from_slice(&template);
                    let tx = t as u32 % bx;
                    let ty = (t as u32 / bx) % by;
                    let tz = t as u32 / (bx * by);
                    r[special::TID as usize] = tx as u64;
                    r[special::TID as usize + 1] = ty as u64;
                    r[special::TID as usize + 2] = tz as u64;
                    r[special::LANEID as usize] = (t % 32) as u64;
                    r[special::WARPID as usize] = (t / 32) as u64;
                }
                bl.pc.fill(0);
                bl.state.fill(TState::Ready);
                sh.written.fill(false);
                sh.epoch = sh.epoch.wrapping_add(1);
                if let Err((t, trap)) = run_block(&mut cx, &mut bl, &mut sh, &mut g) {
                    let [nx, ny, _] = launch.block;
                    return Err(Error::Exec {
                        kernel: k.name.clone(),
                        line: line_of(k, trap.pc) as usize,
                        block: ctaid,
                        thread: [t % nx, (t / nx) % ny, t / (nx * ny)],
                        fault: trap.fault,
                    });
                }
                cx.stats.blocks += 1;
            }
        }
    }
    cx.stats.threads = cx.stats.blocks * n as u64;
    Ok(cx.stats)
}
