//! The decoded form of a kernel: a flat instruction array whose operands are resolved register
//! slots, so the executor never looks at names or strings while it runs.

/// A PTX scalar type as written in a directive or an instruction suffix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Ty {
    Pred,
    B8,
    B16,
    B32,
    B64,
    U8,
    U16,
    U32,
    U64,
    S8,
    S16,
    S32,
    S64,
    Bf16,
    F32,
}

impl Ty {
    pub(crate) fn from_suffix(s: &str) -> Option<Ty> {
        Some(match s {
            "pred" => Ty::Pred,
            "b8" => Ty::B8,
            "b16" => Ty::B16,
            "b32" => Ty::B32,
            "b64" => Ty::B64,
            "u8" => Ty::U8,
            "u16" => Ty::U16,
            "u32" => Ty::U32,
            "u64" => Ty::U64,
            "s8" => Ty::S8,
            "s16" => Ty::S16,
            "s32" => Ty::S32,
            "s64" => Ty::S64,
            "bf16" => Ty::Bf16,
            "f32" => Ty::F32,
            _ => return None,
        })
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Ty::Pred => ".pred",
            Ty::B8 => ".b8",
            Ty::B16 => ".b16",
            Ty::B32 => ".b32",
            Ty::B64 => ".b64",
            Ty::U8 => ".u8",
            Ty::U16 => ".u16",
            Ty::U32 => ".u32",
            Ty::U64 => ".u64",
            Ty::S8 => ".s8",
            Ty::S16 => ".s16",
            Ty::S32 => ".s32",
            Ty::S64 => ".s64",
            Ty::Bf16 => ".bf16",
            Ty::F32 => ".f32",
        }
    }

    /// Width in bits (a predicate counts as 1).
    pub(crate) fn bits(self) -> u32 {
        match self {
            Ty::Pred => 1,
            Ty::B8 | Ty::U8 | Ty::S8 => 8,
            Ty::B16 | Ty::U16 | Ty::S16 | Ty::Bf16 => 16,
            Ty::B32 | Ty::U32 | Ty::S32 | Ty::F32 => 32,
            Ty::B64 | Ty::U64 | Ty::S64 => 64,
        }
    }

    pub(crate) fn bytes(self) -> u32 {
        self.bits().div_ceil(8)
    }

    pub(crate) fn is_signed(self) -> bool {
        matches!(self, Ty::S8 | Ty::S16 | Ty::S32 | Ty::S64)
    }

    pub(crate) fn is_int(self) -> bool {
        matches!(
            self,
            Ty::U8 | Ty::U16 | Ty::U32 | Ty::U64 | Ty::S8 | Ty::S16 | Ty::S32 | Ty::S64
        )
    }

    pub(crate) fn is_bits(self) -> bool {
        matches!(self, Ty::B8 | Ty::B16 | Ty::B32 | Ty::B64)
    }

    /// Mask of the low `bits()` bits: registers hold values zero-extended to 64 bits.
    pub(crate) fn mask(self) -> u64 {
        mask_of(self.bits())
    }
}

pub(crate) fn mask_of(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Sign-extends the low `bits` of `v` to 64 bits.
#[inline(always)]
pub(crate) fn sext(v: u64, bits: u8) -> i64 {
    let sh = 64 - bits as u32;
    ((v << sh) as i64) >> sh
}

/// Rounding of float results (`.rn .rz .rm .rp`) or of float-to-integral conversions
/// (`.rni .rzi .rmi .rpi`, stored with the same four values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rnd {
    Nearest,
    Zero,
    Down,
    Up,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Space {
    Global,
    Shared,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    // Unsigned integer compares.
    Lo,
    Ls,
    Hi,
    Hs,
    // Unordered float compares (true when either input is NaN).
    Equ,
    Neu,
    Ltu,
    Leu,
    Gtu,
    Geu,
    Num,
    Nan,
}

/// What `setp` compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CmpTy {
    Int { bits: u8, signed: bool },
    F32,
}

/// Optional combination of a `setp` result with a predicate (`setp.lt.and.f32 p, a, b, q`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BoolOp {
    None,
    And,
    Or,
    Xor,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ShflMode {
    Up,
    Down,
    Bfly,
    Idx,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AtomOp {
    Add,
    Min,
    Max,
    Exch,
    Cas,
    And,
    Or,
    Xor,
}

/// Operand type of an atomic: how the memory word is interpreted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AtomTy {
    U32,
    S32,
    F32,
    U64,
    S64,
}

impl AtomTy {
    pub(crate) fn bytes(self) -> u32 {
        match self {
            AtomTy::U32 | AtomTy::S32 | AtomTy::F32 => 4,
            AtomTy::U64 | AtomTy::S64 => 8,
        }
    }
}

/// Single-input f32 functions (`ex2.approx`, `sqrt.rn`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FFn {
    Ex2Approx,
    Lg2Approx,
    RcpRn,
    RcpApprox,
    RsqrtApprox,
    SqrtRn,
    SqrtApprox,
    TanhApprox,
}

/// Slot index into a thread's register file (registers, special registers and constants).
pub(crate) type Slot = u32;

/// No slot (absent optional operand).
pub(crate) const NO_SLOT: Slot = u32::MAX;

/// One decoded operation. Integer ops carry the mask of their width so that results stay
/// zero-extended in the 64-bit slots; signed ops carry the width to sign-extend their inputs.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    Nop,
    Mov {
        d: Slot,
        a: Slot,
    },
    Add {
        d: Slot,
        a: Slot,
        b: Slot,
        mask: u64,
    },
    Sub {
        d: Slot,
        a: Slot,
        b: Slot,
        mask: u64,
    },
    MulLo {
        d: Slot,
        a: Slot,
        b: Slot,
        mask: u64,
    },
    MulHi {
        d: Slot,
        a: Slot,
        b: Slot,
        bits: u8,
        signed: bool,
    },
    MulWide {
        d: Slot,
        a: Slot,
        b: Slot,
        bits: u8,
        signed: bool,
    },
    MadLo {
        d: Slot,
        a: Slot,
        b: Slot,
        c: Slot,
        mask: u64,
    },
    MadWide {
        d: Slot,
        a: Slot,
        b: Slot,
        c: Slot,
        bits: u8,
        signed: bool,
    },
    Div {
        d: Slot,
        a: Slot,
        b: Slot,
        bits: u8,
        signed: bool,
    },
    Rem {
        d: Slot,
        a: Slot,
        b: Slot,
        bits: u8,
        signed: bool,
    },
    And {
        d: Slot,
        a: Slot,
        b: Slot,
    },
    Or {
        d: Slot,
        a: Slot,
        b: Slot,
    },
    Xor {
        d: Slot,
        a: Slot,
        b: Slot,
    },
    Not {
        d: Slot,
        a: Slot,
        mask: u64,
    },
    Neg {
        d: Slot,
        a: Slot,
        mask: u64,
    },
    Shl {
        d: Slot,
        a: Slot,
        b: Slot,
        bits: u8,
    },
    Shr {
        d: Slot,
        a: Slot,
        b: Slot,
        bits: u8,
        signed: bool,
    },
    Min {
        d: Slot,
        a: Slot,
        b: Slot,
        bits: u8,
        signed: bool,
    },
    Max {
        d: Slot,
        a: Slot,
        b: Slot,
        bits: u8,
        signed: bool,
    },
    Abs {
        d: Slot,
        a: Slot,
        bits: u8,
    },
    FAdd {
        d: Slot,
        a: Slot,
        b: Slot,
        ftz: bool,
    },
    FSub {
        d: Slot,
        a: Slot,
        b: Slot,
        ftz: bool,
    },
    FMul {
        d: Slot,
        a: Slot,
        b: Slot,
        ftz: bool,
    },
    FFma {
        d: Slot,
        a: Slot,
        b: Slot,
        c: Slot,
        ftz: bool,
    },
    FNeg {
        d: Slot,
        a: Slot,
        ftz: bool,
    },
    FAbs {
        d: Slot,
        a: Slot,
        ftz: bool,
    },
    FMin {
        d: Slot,
        a: Slot,
        b: Slot,
        ftz: bool,
    },
    FMax {
        d: Slot,
        a: Slot,
        b: Slot,
        ftz: bool,
    },
    FDiv {
        d: Slot,
        a: Slot,
        b: Slot,
        ftz: bool,
    },
    FDivApprox {
        d: Slot,
        a: Slot,
        b: Slot,
        ftz: bool,
        full: bool,
    },
    FUnary {
        d: Slot,
        a: Slot,
        f: FFn,
        ftz: bool,
    },
    /// Integer to integer: sign- or zero-extend from the source width, truncate to the destination.
    CvtInt {
        d: Slot,
        a: Slot,
        from_bits: u8,
        from_signed: bool,
        to_bits: u8,
        to_signed: bool,
        dmask: u64,
    },
    CvtIntF32 {
        d: Slot,
        a: Slot,
        bits: u8,
        signed: bool,
        rnd: Rnd,
    },
    CvtF32Int {
        d: Slot,
        a: Slot,
        bits: u8,
        signed: bool,
        rnd: Rnd,
        ftz: bool,
        dmask: u64,
    },
    CvtF32F32 {
        d: Slot,
        a: Slot,
        rnd: Option<Rnd>,
        ftz: bool,
    },
    CvtF32Bf16 {
        d: Slot,
        a: Slot,
        rnd: Rnd,
    },
    CvtBf16F32 {
        d: Slot,
        a: Slot,
    },
    Setp {
        d: Slot,
        d2: Slot,
        a: Slot,
        b: Slot,
        c: Slot,
        cmp: Cmp,
        ty: CmpTy,
        bop: BoolOp,
        c_neg: bool,
    },
    Selp {
        d: Slot,
        a: Slot,
        b: Slot,
        c: Slot,
    },
    Bra {
        target: u32,
    },
    Exit,
    Bar,
    Shfl {
        d: Slot,
        p: Slot,
        a: Slot,
        b: Slot,
        c: Slot,
        mask: Slot,
        mode: ShflMode,
    },
    LdParam {
        d: Slot,
        idx: u32,
    },
    Ld {
        space: Space,
        dst: [Slot; 4],
        n: u8,
        size: u8,
        signed: bool,
        dmask: u64,
        addr: Slot,
        off: i64,
    },
    St {
        space: Space,
        src: [Slot; 4],
        n: u8,
        size: u8,
        addr: Slot,
        off: i64,
    },
    Atom {
        space: Space,
        op: AtomOp,
        ty: AtomTy,
        d: Slot,
        addr: Slot,
        off: i64,
        b: Slot,
        c: Slot,
    },
}

/// An instruction with its guard predicate and source line.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Inst {
    pub op: Op,
    /// Guard predicate slot or [`NO_SLOT`].
    pub guard: Slot,
    /// `@!%p`: execute when the predicate is false.
    pub guard_neg: bool,
    /// 1-based source line.
    pub line: u32,
}

/// A `.param` of an entry.
#[derive(Clone, Debug)]
pub(crate) struct Param {
    pub name: String,
    pub ty: Ty,
}

/// Layout of the special registers at the start of every register file.
pub(crate) mod special {
    pub const TID: u32 = 0; // x, y, z
    pub const NTID: u32 = 3;
    pub const CTAID: u32 = 6;
    pub const NCTAID: u32 = 9;
    pub const LANEID: u32 = 12;
    pub const WARPID: u32 = 13;
    pub const COUNT: u32 = 14;

    /// Slot of a special register name (`%tid.x`, `%laneid`, ...).
    pub fn lookup(name: &str) -> Option<u32> {
        let (base, comp) = match name.rsplit_once('.') {
            Some((b, c)) => (b, c),
            None => (name, ""),
        };
        let c = match comp {
            "x" => 0,
            "y" => 1,
            "z" => 2,
            "" => 0,
            _ => return None,
        };
        Some(match (base, comp.is_empty()) {
            ("%tid", false) => TID + c,
            ("%ntid", false) => NTID + c,
            ("%ctaid", false) => CTAID + c,
            ("%nctaid", false) => NCTAID + c,
            ("%laneid", true) => LANEID,
            ("%warpid", true) => WARPID,
            _ => return None,
        })
    }
}

/// A parsed, validated and decoded `.entry`.
#[derive(Clone, Debug)]
pub(crate) struct Kernel {
    pub name: String,
    pub params: Vec<Param>,
    pub insts: Vec<Inst>,
    /// Initial register file: constants and shared-symbol addresses filled in, the rest zero.
    pub template: Vec<u64>,
    /// Bytes of static shared memory; dynamic shared memory starts at `extern_offset`.
    pub static_shared: u32,
    /// Offset of `.extern .shared` arrays (aligned end of the statics), if the kernel has any.
    pub extern_offset: Option<u32>,
    pub reqntid: Option<[u32; 3]>,
    pub maxntid: Option<[u32; 3]>,
}
