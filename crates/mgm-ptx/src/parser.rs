//! Parses a PTX module into decoded [`Kernel`]s, validating as it goes: undeclared registers,
//! undefined labels, unknown params or symbols, wrong operand counts and register types that do
//! not fit the instruction type are errors naming the line and quoting it.

use std::collections::HashMap;

use crate::ast::*;
use crate::lexer::{Kind, Tok, lex};
use crate::{Error, Result};

/// A `.shared` array declaration.
#[derive(Clone, Debug)]
struct SharedDecl {
    name: String,
    align: u32,
    size: u32,
    ext: bool,
}

/// An immediate as written.
#[derive(Clone, Copy, Debug)]
enum Imm {
    Int(i128),
    F32(u32),
    F64(u64),
    Dec(f64),
}

/// One operand as written.
#[derive(Clone, Debug)]
enum Operand<'a> {
    Name(&'a str),
    Imm(Imm),
    Addr { base: &'a str, off: i64 },
    Vector(Vec<&'a str>),
    Pair(&'a str, &'a str),
    Not(&'a str),
}

impl Operand<'_> {
    fn describe(&self) -> String {
        match self {
            Operand::Name(n) => format!("`{n}`"),
            Operand::Imm(_) => "an immediate".into(),
            Operand::Addr { .. } => "an address".into(),
            Operand::Vector(_) => "a vector".into(),
            Operand::Pair(..) => "a `d|p` pair".into(),
            Operand::Not(n) => format!("`!{n}`"),
        }
    }
}

/// What a register-file slot holds (used for type checks while decoding).
#[derive(Clone, Copy, Debug)]
enum SlotKind {
    Reg(Ty),
    Special,
    Const,
    Symbol,
}

pub(crate) fn parse_module(src: &str) -> Result<Vec<Kernel>> {
    let toks = lex(src)?;
    let mut p = Parser {
        toks,
        pos: 0,
        lines: src.lines().collect(),
        module_shared: Vec::new(),
        kernels: Vec::new(),
    };
    p.module()?;
    Ok(p.kernels)
}

struct Parser<'a> {
    toks: Vec<Tok<'a>>,
    pos: usize,
    lines: Vec<&'a str>,
    module_shared: Vec<SharedDecl>,
    kernels: Vec<Kernel>,
}

/// Builds an error at `line`, quoting the source line.
fn err_at(lines: &[&str], line: u32, msg: impl std::fmt::Display) -> Error {
    let text = lines
        .get(line.saturating_sub(1) as usize)
        .map(|s| s.trim())
        .unwrap_or("");
    Error::Parse {
        line: line as usize,
        msg: format!("{msg} (in `{text}`)"),
    }
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<Tok<'a>> {
        self.toks.get(self.pos).copied()
    }

    fn peek_at(&self, k: usize) -> Option<Tok<'a>> {
        self.toks.get(self.pos + k).copied()
    }

    fn last_line(&self) -> u32 {
        self.toks.last().map_or(1, |t| t.line)
    }

    fn err(&self, line: u32, msg: impl std::fmt::Display) -> Error {
        err_at(&self.lines, line, msg)
    }

    fn next(&mut self) -> Result<Tok<'a>> {
        let t = self.peek().ok_or_else(|| Error::Parse {
            line: self.last_line() as usize,
            msg: "unexpected end of input".into(),
        })?;
        self.pos += 1;
        Ok(t)
    }

    fn expect_punct(&mut self, c: char) -> Result<Tok<'a>> {
        let t = self.next()?;
        if t.kind != Kind::Punct(c) {
            return Err(self.err(t.line, format!("expected `{c}`, found `{}`", t.text)));
        }
        Ok(t)
    }

    fn expect_ident(&mut self) -> Result<Tok<'a>> {
        let t = self.next()?;
        if t.kind != Kind::Ident {
            return Err(self.err(t.line, format!("expected a name, found `{}`", t.text)));
        }
        Ok(t)
    }

    fn expect_num(&mut self) -> Result<(u64, Tok<'a>)> {
        let t = self.next()?;
        if t.kind != Kind::Num {
            return Err(self.err(t.line, format!("expected a number, found `{}`", t.text)));
        }
        match parse_number(t.text) {
            Some(Imm::Int(v)) if (0..=u64::MAX as i128).contains(&v) => Ok((v as u64, t)),
            _ => Err(self.err(t.line, format!("expected an integer, found `{}`", t.text))),
        }
    }

    fn module(&mut self) -> Result<()> {
        while let Some(t) = self.peek() {
            match (t.kind, t.text) {
                (Kind::Ident, ".version") => {
                    self.next()?;
                    let v = self.next()?;
                    if v.kind != Kind::Num {
                        return Err(self.err(v.line, "expected a version number after `.version`"));
                    }
                }
                (Kind::Ident, ".target") => {
                    self.next()?;
                    self.expect_ident()?;
                    while self.peek().is_some_and(|t| t.kind == Kind::Punct(',')) {
                        self.next()?;
                        self.expect_ident()?;
                    }
                }
                (Kind::Ident, ".address_size") => {
                    self.next()?;
                    let (v, tok) = self.expect_num()?;
                    if v != 64 {
                        return Err(self.err(tok.line, "only `.address_size 64` is supported"));
                    }
                }
                (Kind::Ident, ".visible" | ".weak") => {
                    self.next()?;
                    match self.peek() {
                        Some(n) if n.text == ".entry" => {}
                        Some(n) => {
                            return Err(
                                self.err(n.line, format!("unsupported `{} {}`", t.text, n.text))
                            );
                        }
                        None => return Err(self.err(t.line, "unexpected end of input")),
                    }
                }
                (Kind::Ident, ".entry") => self.entry()?,
                (Kind::Ident, ".extern" | ".shared") => {
                    let d = self.shared_decl()?;
                    self.module_shared.push(d);
                }
                (Kind::Ident, ".func") => {
                    return Err(self.err(
                        t.line,
                        "device functions (`.func`) are not supported; inline them",
                    ));
                }
                _ => {
                    return Err(self.err(
                        t.line,
                        format!("unsupported directive or text `{}` at module scope", t.text),
                    ));
                }
            }
        }
        Ok(())
    }

    /// `.shared .align 16 .f32 name[N];` or `.extern .shared .align 16 .b8 name[];`
    fn shared_decl(&mut self) -> Result<SharedDecl> {
        let first = self.next()?;
        let mut ext = false;
        if first.text == ".extern" {
            ext = true;
            let s = self.expect_ident()?;
            if s.text != ".shared" {
                return Err(self.err(
                    s.line,
                    format!("unsupported `.extern {}` (only `.extern .shared`)", s.text),
                ));
            }
        }
        let mut align = 0u32;
        let mut ty = None;
        let name;
        loop {
            let t = self.expect_ident()?;
            match t.text {
                ".align" => {
                    let (a, at) = self.expect_num()?;
                    if a == 0 || !a.is_power_of_two() || a > 4096 {
                        return Err(self.err(at.line, format!("bad alignment {a}")));
                    }
                    align = a as u32;
                }
                s if s.starts_with('.') => {
                    let t2 = Ty::from_suffix(&s[1..]).filter(|t| *t != Ty::Pred && *t != Ty::Bf16);
                    match t2 {
                        Some(t2) => ty = Some(t2),
                        None => {
                            return Err(self.err(
                                t.line,
                                format!("unsupported type `{s}` in .shared declaration"),
                            ));
                        }
                    }
                }
                _ => {
                    name = t;
                    break;
                }
            }
        }
        let Some(ty) = ty else {
            return Err(self.err(name.line, "missing type in .shared declaration"));
        };
        let elem = ty.bytes();
        let mut count: u64 = 1;
        let mut is_unsized = false;
        while self.peek().is_some_and(|t| t.kind == Kind::Punct('[')) {
            self.next()?;
            if self.peek().is_some_and(|t| t.kind == Kind::Punct(']')) {
                is_unsized = true;
            } else {
                let (n, _) = self.expect_num()?;
                count = count.saturating_mul(n);
            }
            self.expect_punct(']')?;
        }
        if ext != is_unsized {
            return Err(self.err(
                name.line,
                "`.extern .shared` arrays must be is_unsized (`name[]`) and only they may be is_unsized",
            ));
        }
        self.expect_punct(';')?;
        let size = count.saturating_mul(elem as u64);
        if size > (1 << 24) {
            return Err(self.err(name.line, "shared array too large"));
        }
        Ok(SharedDecl {
            name: name.text.to_string(),
            align: align.max(elem),
            size: if ext { 0 } else { size as u32 },
            ext,
        })
    }

    fn entry(&mut self) -> Result<()> {
        self.next()?; // .entry
        let name = self.expect_ident()?;
        if self.kernels.iter().any(|k| k.name == name.text) {
            return Err(self.err(name.line, format!("duplicate entry `{}`", name.text)));
        }
        let mut kb = KernelBuilder::new(name.text, self.lines.clone());
        self.expect_punct('(')?;
        if self.peek().is_some_and(|t| t.kind == Kind::Punct(')')) {
            self.next()?;
        } else {
            loop {
                let p = self.expect_ident()?;
                if p.text != ".param" {
                    return Err(self.err(p.line, format!("expected `.param`, found `{}`", p.text)));
                }
                let mut ty = None;
                let pname;
                loop {
                    let t = self.expect_ident()?;
                    match t.text {
                        ".ptr" | ".global" | ".const" | ".shared" | ".local" => {}
                        ".align" => {
                            self.expect_num()?;
                        }
                        s if s.starts_with('.') => match Ty::from_suffix(&s[1..]) {
                            Some(
                                t2 @ (Ty::U32
                                | Ty::S32
                                | Ty::B32
                                | Ty::F32
                                | Ty::U64
                                | Ty::S64
                                | Ty::B64),
                            ) => ty = Some(t2),
                            _ => {
                                return Err(
                                    self.err(t.line, format!("unsupported parameter type `{s}`"))
                                );
                            }
                        },
                        _ => {
                            pname = t;
                            break;
                        }
                    }
                }
                let Some(ty) = ty else {
                    return Err(self.err(
                        pname.line,
                        format!("parameter `{}` has no type", pname.text),
                    ));
                };
                if self.peek().is_some_and(|t| t.kind == Kind::Punct('[')) {
                    return Err(self.err(pname.line, "array (struct) parameters are not supported"));
                }
                if kb.params.iter().any(|q| q.name == pname.text) {
                    return Err(
                        self.err(pname.line, format!("duplicate parameter `{}`", pname.text))
                    );
                }
                kb.params.push(Param {
                    name: pname.text.to_string(),
                    ty,
                });
                let sep = self.next()?;
                match sep.kind {
                    Kind::Punct(',') => continue,
                    Kind::Punct(')') => break,
                    _ => {
                        return Err(self.err(
                            sep.line,
                            format!("expected `,` or `)`, found `{}`", sep.text),
                        ));
                    }
                }
            }
        }
        // Performance directives.
        while let Some(t) = self.peek() {
            if t.kind != Kind::Ident {
                break;
            }
            match t.text {
                ".maxntid" | ".reqntid" | ".minnctapersm" | ".maxnreg" => {
                    self.next()?;
                    let mut dims = [1u32; 3];
                    for (i, d) in dims.iter_mut().enumerate() {
                        if i > 0 {
                            if !self.peek().is_some_and(|t| t.kind == Kind::Punct(',')) {
                                break;
                            }
                            self.next()?;
                        }
                        let (v, vt) = self.expect_num()?;
                        *d = u32::try_from(v).map_err(|_| self.err(vt.line, "value too large"))?;
                    }
                    match t.text {
                        ".maxntid" => kb.maxntid = Some(dims),
                        ".reqntid" => kb.reqntid = Some(dims),
                        _ => {}
                    }
                }
                _ => {
                    return Err(
                        self.err(t.line, format!("unsupported entry directive `{}`", t.text))
                    );
                }
            }
        }
        self.expect_punct('{')?;
        let mut depth = 1;
        let mut close_line = name.line;
        while depth > 0 {
            let t = self.peek().ok_or_else(|| {
                self.err(name.line, format!("entry `{}` is not closed", name.text))
            })?;
            match t.kind {
                Kind::Punct('{') => {
                    self.next()?;
                    depth += 1;
                }
                Kind::Punct('}') => {
                    self.next()?;
                    depth -= 1;
                    close_line = t.line;
                }
                Kind::Ident if self.peek_at(1).is_some_and(|n| n.kind == Kind::Punct(':')) => {
                    self.next()?;
                    self.next()?;
                    if kb
                        .labels
                        .insert(t.text.to_string(), kb.insts.len() as u32)
                        .is_some()
                    {
                        return Err(self.err(t.line, format!("label `{}` defined twice", t.text)));
                    }
                }
                Kind::Ident if t.text == ".reg" => self.reg_decl(&mut kb)?,
                Kind::Ident if t.text == ".shared" || t.text == ".extern" => {
                    let d = self.shared_decl()?;
                    if kb.shared.iter().any(|s| s.name == d.name) {
                        return Err(
                            self.err(t.line, format!("shared array `{}` declared twice", d.name))
                        );
                    }
                    kb.shared.push(d);
                }
                Kind::Ident if t.text.starts_with('.') => {
                    return Err(self.err(
                        t.line,
                        format!("unsupported directive `{}` in entry body", t.text),
                    ));
                }
                _ => {
                    let start = self.pos;
                    let mut braces = 0;
                    while self.peek().is_some_and(|t| t.kind != Kind::Punct(';')) {
                        let t = self.next()?;
                        match t.kind {
                            Kind::Punct('{') => braces += 1,
                            Kind::Punct('}') if braces == 0 => {
                                return Err(self.err(
                                    self.toks[start].line,
                                    "missing `;` at the end of the statement",
                                ));
                            }
                            Kind::Punct('}') => braces -= 1,
                            _ => {}
                        }
                    }
                    self.expect_punct(';')?;
                    let stmt = &self.toks[start..self.pos - 1];
                    kb.instruction(stmt, &self.module_shared)?;
                }
            }
        }
        let k = kb.finish(close_line)?;
        self.kernels.push(k);
        Ok(())
    }

    /// `.reg .f32 %f<8>;` or `.reg .b32 %r1, %r2;`
    fn reg_decl(&mut self, kb: &mut KernelBuilder) -> Result<()> {
        let start = self.next()?; // .reg
        let t = self.expect_ident()?;
        let ty = match t.text.strip_prefix('.').and_then(Ty::from_suffix) {
            Some(ty @ (Ty::B8 | Ty::U8 | Ty::S8 | Ty::Bf16)) => {
                return Err(self.err(
                    t.line,
                    format!("registers of type `{}` are not supported", ty.name()),
                ));
            }
            Some(ty) => ty,
            None => return Err(self.err(t.line, format!("unsupported register type `{}`", t.text))),
        };
        loop {
            let n = self.expect_ident()?;
            if n.text.starts_with('.') || special::lookup(n.text).is_some() {
                return Err(self.err(n.line, format!("bad register name `{}`", n.text)));
            }
            if self.peek().is_some_and(|t| t.kind == Kind::Punct('<')) {
                self.next()?;
                let (count, ct) = self.expect_num()?;
                self.expect_punct('>')?;
                if count > 1 << 16 {
                    return Err(self.err(ct.line, "too many registers"));
                }
                for i in 0..count {
                    kb.declare(&format!("{}{}", n.text, i), ty, n.line)?;
                }
            } else {
                kb.declare(n.text, ty, n.line)?;
            }
            let sep = self.next()?;
            match sep.kind {
                Kind::Punct(',') => continue,
                Kind::Punct(';') => break,
                _ => {
                    return Err(self.err(
                        start.line,
                        format!("expected `,` or `;`, found `{}`", sep.text),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Parses a numeric literal: decimal, `0x` hex, octal (leading 0), `0b` binary (optional `U`
/// suffix), `0fXXXXXXXX` f32 bits, `0dXXXXXXXXXXXXXXXX` f64 bits, or a decimal float.
fn parse_number(s: &str) -> Option<Imm> {
    let lower = s.to_ascii_lowercase();
    if let Some(h) = lower.strip_prefix("0f") {
        return (h.len() == 8)
            .then(|| u32::from_str_radix(h, 16).ok().map(Imm::F32))
            .flatten();
    }
    if let Some(h) = lower.strip_prefix("0d") {
        return (h.len() == 16)
            .then(|| u64::from_str_radix(h, 16).ok().map(Imm::F64))
            .flatten();
    }
    if lower.contains('.') || (lower.contains('e') && !lower.starts_with("0x")) {
        return lower.parse::<f64>().ok().map(Imm::Dec);
    }
    let body = lower.strip_suffix('u').unwrap_or(&lower);
    let v = if let Some(h) = body.strip_prefix("0x") {
        u64::from_str_radix(h, 16).ok()?
    } else if let Some(b) = body.strip_prefix("0b") {
        u64::from_str_radix(b, 2).ok()?
    } else if body.len() > 1 && body.starts_with('0') {
        u64::from_str_radix(&body[1..], 8).ok()?
    } else {
        body.parse::<u64>().ok()?
    };
    Some(Imm::Int(v as i128))
}

/// PTX operand type compatibility: same size, and `.bN` accepts any same-size register.
fn compatible(instr: Ty, reg: Ty) -> bool {
    if instr == Ty::Pred || reg == Ty::Pred {
        return instr == reg;
    }
    if instr.bits() != reg.bits() {
        return false;
    }
    if instr.is_bits() || reg.is_bits() {
        return true;
    }
    match instr {
        Ty::F32 => reg == Ty::F32,
        Ty::Bf16 => false,
        _ => reg.is_int(),
    }
}

/// For `ld`, `st` and `cvt`, integer registers may be wider than the instruction type.
fn compatible_wide(instr: Ty, reg: Ty) -> bool {
    if compatible(instr, reg) {
        return true;
    }
    (instr.is_int() || instr.is_bits())
        && (reg.is_int() || reg.is_bits())
        && reg.bits() > instr.bits()
}

/// Modifier list of an opcode (`ld.global.nc.v4.f32` -> `global`, `nc`, `v4`, `f32`), consumed
/// as the decoder recognises them so that leftovers are reported.
struct Mods<'a> {
    items: Vec<&'a str>,
}

impl<'a> Mods<'a> {
    fn take(&mut self, m: &str) -> bool {
        if let Some(i) = self.items.iter().position(|x| *x == m) {
            self.items.remove(i);
            true
        } else {
            false
        }
    }

    fn take_any(&mut self, ms: &[&str]) -> Option<&'a str> {
        let i = self.items.iter().position(|x| ms.contains(x))?;
        Some(self.items.remove(i))
    }

    /// Removes and returns all type suffixes in order.
    fn take_types(&mut self) -> Vec<Ty> {
        let mut out = Vec::new();
        self.items.retain(|m| match Ty::from_suffix(m) {
            Some(t) => {
                out.push(t);
                false
            }
            None => true,
        });
        out
    }
}

struct KernelBuilder<'l> {
    name: String,
    lines: Vec<&'l str>,
    params: Vec<Param>,
    regs: HashMap<String, Slot>,
    kinds: Vec<SlotKind>,
    template: Vec<u64>,
    consts: HashMap<u64, Slot>,
    shared: Vec<SharedDecl>,
    sym_slots: HashMap<String, Slot>,
    labels: HashMap<String, u32>,
    branches: Vec<(usize, String, u32)>,
    insts: Vec<Inst>,
    reqntid: Option<[u32; 3]>,
    maxntid: Option<[u32; 3]>,
    /// Special registers are operands of `mov` and `cvt` only (as in ptxas).
    allow_special: bool,
}

impl<'l> KernelBuilder<'l> {
    fn new(name: &str, lines: Vec<&'l str>) -> Self {
        KernelBuilder {
            name: name.to_string(),
            lines,
            params: Vec::new(),
            regs: HashMap::new(),
            kinds: vec![SlotKind::Special; special::COUNT as usize],
            template: vec![0; special::COUNT as usize],
            consts: HashMap::new(),
            shared: Vec::new(),
            sym_slots: HashMap::new(),
            labels: HashMap::new(),
            branches: Vec::new(),
            insts: Vec::new(),
            reqntid: None,
            maxntid: None,
            allow_special: false,
        }
    }

    fn err(&self, line: u32, msg: impl std::fmt::Display) -> Error {
        err_at(&self.lines, line, msg)
    }

    fn new_slot(&mut self, kind: SlotKind, value: u64) -> Slot {
        self.kinds.push(kind);
        self.template.push(value);
        (self.template.len() - 1) as Slot
    }

    fn declare(&mut self, name: &str, ty: Ty, line: u32) -> Result<()> {
        if self.regs.contains_key(name) {
            return Err(self.err(line, format!("register `{name}` declared twice")));
        }
        let s = self.new_slot(SlotKind::Reg(ty), 0);
        self.regs.insert(name.to_string(), s);
        Ok(())
    }

    fn konst(&mut self, v: u64) -> Slot {
        if let Some(&s) = self.consts.get(&v) {
            return s;
        }
        let s = self.new_slot(SlotKind::Const, v);
        self.consts.insert(v, s);
        s
    }

    /// Slot of a shared symbol's address, pulling module-scope declarations into this kernel.
    fn symbol(&mut self, name: &str, module_shared: &[SharedDecl]) -> Option<Slot> {
        if let Some(&s) = self.sym_slots.get(name) {
            return Some(s);
        }
        if !self.shared.iter().any(|d| d.name == name) {
            let d = module_shared.iter().find(|d| d.name == name)?;
            self.shared.push(d.clone());
        }
        let s = self.new_slot(SlotKind::Symbol, 0);
        self.sym_slots.insert(name.to_string(), s);
        Some(s)
    }

    fn reg_ty(&self, slot: Slot) -> Option<Ty> {
        match self.kinds[slot as usize] {
            SlotKind::Reg(t) => Some(t),
            _ => None,
        }
    }

    fn imm_value(&self, imm: Imm, neg: bool, ty: Ty, line: u32) -> Result<u64> {
        let bad = || self.err(line, format!("immediate does not fit type `{}`", ty.name()));
        match (imm, ty) {
            (Imm::Int(v), t) if t.is_int() || t.is_bits() || t == Ty::Pred => {
                let v = if neg { -v } else { v };
                let bits = t.bits();
                let lo = -(1i128 << (bits.max(2) - 1));
                let hi = (1i128 << bits) - 1;
                if t == Ty::Pred && !(0..=1).contains(&v) || v < lo || v > hi {
                    return Err(bad());
                }
                Ok((v as u64) & t.mask())
            }
            (Imm::F32(b), Ty::F32 | Ty::B32) => Ok((if neg { b ^ 0x8000_0000 } else { b }) as u64),
            (Imm::F64(b), Ty::F32) => {
                let f = f64::from_bits(b) as f32;
                Ok(f32::to_bits(if neg { -f } else { f }) as u64)
            }
            (Imm::Dec(f), Ty::F32) => Ok(f32::to_bits((if neg { -f } else { f }) as f32) as u64),
            _ => Err(bad()),
        }
    }

    /// A source operand of instruction type `ty`: register, special register, immediate or
    /// shared-symbol address.
    fn src_with(
        &mut self,
        op: &Operand,
        ty: Ty,
        wide: bool,
        line: u32,
        ms: &[SharedDecl],
    ) -> Result<Slot> {
        match op {
            Operand::Name(n) => {
                if let Some(&s) = self.regs.get(*n) {
                    let rt = self
                        .reg_ty(s)
                        .expect("declared names map to register slots");
                    let ok = if wide {
                        compatible_wide(ty, rt)
                    } else {
                        compatible(ty, rt)
                    };
                    if !ok {
                        return Err(self.err(
                            line,
                            format!(
                                "register `{n}` of type `{}` does not fit instruction type `{}`",
                                rt.name(),
                                ty.name()
                            ),
                        ));
                    }
                    return Ok(s);
                }
                if let Some(s) = special::lookup(n) {
                    if !self.allow_special {
                        return Err(self.err(
                            line,
                            format!("special register `{n}` can only be read with `mov` or `cvt`"),
                        ));
                    }
                    if !compatible(ty, Ty::U32) {
                        return Err(self.err(
                            line,
                            format!("special register `{n}` is .u32, not `{}`", ty.name()),
                        ));
                    }
                    return Ok(s);
                }
                if self.params.iter().any(|p| p.name == *n) {
                    return Err(self.err(
                        line,
                        format!("parameter `{n}` can only be read with `ld.param`"),
                    ));
                }
                if let Some(s) = self.symbol(n, ms) {
                    if !((ty.is_int() || ty.is_bits()) && ty.bits() >= 32) {
                        return Err(
                            self.err(line, format!("shared symbol `{n}` used as `{}`", ty.name()))
                        );
                    }
                    return Ok(s);
                }
                if n.starts_with('%') {
                    Err(self.err(line, format!("undeclared register `{n}`")))
                } else {
                    Err(self.err(
                        line,
                        format!("unknown name `{n}` (not a register, parameter or shared symbol)"),
                    ))
                }
            }
            Operand::Imm(imm) => {
                let v = self.imm_value(*imm, false, ty, line)?;
                Ok(self.konst(v))
            }
            other => Err(self.err(
                line,
                format!(
                    "expected a register or immediate, found {}",
                    other.describe()
                ),
            )),
        }
    }

    fn src(&mut self, op: &Operand, ty: Ty, line: u32, ms: &[SharedDecl]) -> Result<Slot> {
        self.src_with(op, ty, false, line, ms)
    }

    fn dst_with(&mut self, op: &Operand, ty: Ty, wide: bool, line: u32) -> Result<Slot> {
        let Operand::Name(n) = op else {
            return Err(self.err(
                line,
                format!("destination must be a register, found {}", op.describe()),
            ));
        };
        let Some(&s) = self.regs.get(*n) else {
            if special::lookup(n).is_some() {
                return Err(self.err(line, format!("special register `{n}` is read-only")));
            }
            return Err(self.err(line, format!("undeclared register `{n}`")));
        };
        let rt = self
            .reg_ty(s)
            .expect("declared names map to register slots");
        let ok = if wide {
            compatible_wide(ty, rt)
        } else {
            compatible(ty, rt)
        };
        if !ok {
            return Err(self.err(
                line,
                format!(
                    "register `{n}` of type `{}` does not fit instruction type `{}`",
                    rt.name(),
                    ty.name()
                ),
            ));
        }
        Ok(s)
    }

    fn dst(&mut self, op: &Operand, ty: Ty, line: u32) -> Result<Slot> {
        self.dst_with(op, ty, false, line)
    }

    fn pred(&mut self, name: &str, line: u32) -> Result<Slot> {
        self.dst(&Operand::Name(name), Ty::Pred, line)
    }

    fn instruction(&mut self, stmt: &[Tok], ms: &[SharedDecl]) -> Result<()> {
        let line = stmt[0].line;
        let mut i = 0;
        let mut guard = NO_SLOT;
        let mut guard_neg = false;
        if stmt[0].kind == Kind::Punct('@') {
            i = 1;
            if stmt.get(1).is_some_and(|t| t.kind == Kind::Punct('!')) {
                guard_neg = true;
                i = 2;
            }
            let Some(p) = stmt.get(i).filter(|t| t.kind == Kind::Ident) else {
                return Err(self.err(line, "expected a predicate after `@`"));
            };
            guard = self.pred(p.text, line)?;
            i += 1;
        }
        let Some(opc) = stmt.get(i).filter(|t| t.kind == Kind::Ident) else {
            return Err(self.err(line, "expected an instruction"));
        };
        let ops = self.operands(&stmt[i + 1..], line)?;
        let op = self.decode(opc.text, &ops, line, ms)?;
        self.insts.push(Inst {
            op,
            guard,
            guard_neg,
            line,
        });
        Ok(())
    }

    fn operands<'t>(&self, toks: &[Tok<'t>], line: u32) -> Result<Vec<Operand<'t>>> {
        let mut out = Vec::new();
        if toks.is_empty() {
            return Ok(out);
        }
        let mut depth = 0i32;
        let mut start = 0;
        for (k, t) in toks.iter().enumerate() {
            match t.kind {
                Kind::Punct('[' | '{') => depth += 1,
                Kind::Punct(']' | '}') => depth -= 1,
                Kind::Punct(',') if depth == 0 => {
                    out.push(self.operand(&toks[start..k], line)?);
                    start = k + 1;
                }
                _ => {}
            }
        }
        out.push(self.operand(&toks[start..], line)?);
        Ok(out)
    }

    fn operand<'t>(&self, t: &[Tok<'t>], line: u32) -> Result<Operand<'t>> {
        let mut text = String::new();
        for (k, x) in t.iter().enumerate() {
            if k > 0
                && !matches!(x.kind, Kind::Punct(_))
                && !matches!(t[k - 1].kind, Kind::Punct(_))
            {
                text.push(' ');
            }
            text.push_str(x.text);
        }
        if let [a, b, ..] = t
            && matches!(a.kind, Kind::Ident | Kind::Num)
            && b.kind == Kind::Ident
        {
            return Err(self.err(a.line, format!("missing `;` after `{}`", a.text)));
        }
        let bad = || self.err(line, format!("cannot parse operand `{text}`"));
        let is = |k: usize, c: char| t.get(k).is_some_and(|x| x.kind == Kind::Punct(c));
        match t {
            [] => Err(self.err(line, "empty operand")),
            [x] if x.kind == Kind::Ident => Ok(Operand::Name(x.text)),
            [x] if x.kind == Kind::Num => parse_number(x.text).map(Operand::Imm).ok_or_else(bad),
            [m, x] if m.kind == Kind::Punct('-') && x.kind == Kind::Num => {
                let imm = parse_number(x.text).ok_or_else(bad)?;
                Ok(Operand::Imm(match imm {
                    Imm::Int(v) => Imm::Int(-v),
                    Imm::F32(b) => Imm::F32(b ^ 0x8000_0000),
                    Imm::F64(b) => Imm::F64(b ^ (1 << 63)),
                    Imm::Dec(f) => Imm::Dec(-f),
                }))
            }
            [m, x] if m.kind == Kind::Punct('!') && x.kind == Kind::Ident => {
                Ok(Operand::Not(x.text))
            }
            [a, p, b]
                if p.kind == Kind::Punct('|') && a.kind == Kind::Ident && b.kind == Kind::Ident =>
            {
                Ok(Operand::Pair(a.text, b.text))
            }
            _ if is(0, '[') && is(t.len() - 1, ']') => {
                let inner = &t[1..t.len() - 1];
                let Some(base) = inner.first().filter(|x| x.kind == Kind::Ident) else {
                    let msg = format!(
                        "unsupported address `{text}` (use `[reg]`, `[reg+imm]`, `[symbol]`)"
                    );
                    return Err(self.err(line, msg));
                };
                let mut off: i128 = 0;
                let rest = &inner[1..];
                if !rest.is_empty() {
                    let (sign, numtoks) = match rest {
                        [p, m, n] if p.kind == Kind::Punct('+') && m.kind == Kind::Punct('-') => {
                            (-1, n)
                        }
                        [p, n] if p.kind == Kind::Punct('+') => (1, n),
                        [m, n] if m.kind == Kind::Punct('-') => (-1, n),
                        _ => return Err(bad()),
                    };
                    match (numtoks.kind, parse_number(numtoks.text)) {
                        (Kind::Num, Some(Imm::Int(v))) => off = sign * v,
                        _ => return Err(bad()),
                    }
                }
                let off = i64::try_from(off).map_err(|_| bad())?;
                Ok(Operand::Addr {
                    base: base.text,
                    off,
                })
            }
            _ if is(0, '{') && is(t.len() - 1, '}') => {
                let mut names = Vec::new();
                for (k, x) in t[1..t.len() - 1].iter().enumerate() {
                    if k % 2 == 0 {
                        if x.kind != Kind::Ident {
                            return Err(bad());
                        }
                        names.push(x.text);
                    } else if x.kind != Kind::Punct(',') {
                        return Err(bad());
                    }
                }
                if names.is_empty() {
                    return Err(bad());
                }
                Ok(Operand::Vector(names))
            }
            _ => Err(bad()),
        }
    }

    fn decode(
        &mut self,
        opcode: &str,
        ops: &[Operand],
        line: u32,
        ms: &[SharedDecl],
    ) -> Result<Op> {
        let mut parts = opcode.split('.');
        let base = parts.next().unwrap_or("");
        let mut m = Mods {
            items: parts.collect(),
        };
        let unsupported = |s: &Self| s.err(line, format!("unsupported instruction `{opcode}`"));
        let nops = |s: &Self, n: usize| -> Result<()> {
            if ops.len() != n {
                Err(s.err(
                    line,
                    format!("`{opcode}` takes {n} operands, found {}", ops.len()),
                ))
            } else {
                Ok(())
            }
        };
        let one_ty = |s: &Self, m: &mut Mods| -> Result<Ty> {
            let t = m.take_types();
            if t.len() != 1 {
                return Err(s.err(line, format!("`{opcode}` needs exactly one type suffix")));
            }
            Ok(t[0])
        };
        if let Some(t) = m.items.iter().find(|x| {
            matches!(
                **x,
                "f64"
                    | "f16"
                    | "f16x2"
                    | "bf16x2"
                    | "e4m3"
                    | "e5m2"
                    | "tf32"
                    | "b128"
                    | "u128"
                    | "s128"
            )
        }) {
            return Err(self.err(line, format!("unsupported type `.{t}` in `{opcode}`")));
        }
        self.allow_special = matches!(base, "mov" | "cvt");
        let op = match base {
            "mov" => {
                let ty = one_ty(self, &mut m)?;
                nops(self, 2)?;
                if matches!(ops[1], Operand::Vector(_)) || matches!(ops[0], Operand::Vector(_)) {
                    return Err(self.err(line, "vector pack/unpack `mov` is not supported"));
                }
                let d = self.dst(&ops[0], ty, line)?;
                let a = self.src(&ops[1], ty, line, ms)?;
                Op::Mov { d, a }
            }
            "cvta" => {
                // Global addresses are the same in the generic space, so both directions are
                // the identity; generic shared addressing is not modelled.
                m.take("to");
                if !m.take("global") {
                    return Err(self.err(line, "only `cvta[.to].global` is supported"));
                }
                let ty = one_ty(self, &mut m)?;
                if !matches!(ty, Ty::U64 | Ty::B64 | Ty::S64) {
                    return Err(self.err(line, "cvta needs a 64-bit type"));
                }
                nops(self, 2)?;
                let d = self.dst(&ops[0], ty, line)?;
                let a = self.src(&ops[1], ty, line, ms)?;
                Op::Mov { d, a }
            }
            "add" | "sub" | "mul" | "mad" | "fma" | "div" | "rem" | "min" | "max" => {
                return self.arith(base, opcode, m, ops, line, ms);
            }
            "and" | "or" | "xor" => {
                let ty = one_ty(self, &mut m)?;
                if !(ty.is_bits() && ty.bits() >= 16 || ty == Ty::Pred) {
                    return Err(self.err(
                        line,
                        format!("`{opcode}` needs a .pred or .b16/.b32/.b64 type"),
                    ));
                }
                nops(self, 3)?;
                let d = self.dst(&ops[0], ty, line)?;
                let a = self.src(&ops[1], ty, line, ms)?;
                let b = self.src(&ops[2], ty, line, ms)?;
                match base {
                    "and" => Op::And { d, a, b },
                    "or" => Op::Or { d, a, b },
                    _ => Op::Xor { d, a, b },
                }
            }
            "not" | "neg" | "abs" => {
                let ftz = m.take("ftz");
                let ty = one_ty(self, &mut m)?;
                nops(self, 2)?;
                let d = self.dst(&ops[0], ty, line)?;
                let a = self.src(&ops[1], ty, line, ms)?;
                match (base, ty) {
                    ("not", t) if t.is_bits() && t.bits() >= 16 || t == Ty::Pred => Op::Not {
                        d,
                        a,
                        mask: t.mask(),
                    },
                    ("neg", Ty::F32) => Op::FNeg { d, a, ftz },
                    ("abs", Ty::F32) => Op::FAbs { d, a, ftz },
                    ("neg", t) if t.is_int() && t.is_signed() => Op::Neg {
                        d,
                        a,
                        mask: t.mask(),
                    },
                    ("abs", t) if t.is_int() && t.is_signed() => Op::Abs {
                        d,
                        a,
                        bits: t.bits() as u8,
                    },
                    _ => {
                        return Err(self.err(
                            line,
                            format!("unsupported type `{}` for `{base}`", ty.name()),
                        ));
                    }
                }
            }
            "shl" | "shr" => {
                let ty = one_ty(self, &mut m)?;
                if !(ty.is_bits() || ty.is_int())
                    || ty.bits() < 16
                    || (base == "shl" && !ty.is_bits())
                {
                    return Err(self.err(
                        line,
                        format!("unsupported type `{}` for `{base}`", ty.name()),
                    ));
                }
                nops(self, 3)?;
                let d = self.dst(&ops[0], ty, line)?;
                let a = self.src(&ops[1], ty, line, ms)?;
                let b = self.src(&ops[2], Ty::U32, line, ms)?;
                let bits = ty.bits() as u8;
                if base == "shl" {
                    Op::Shl { d, a, b, bits }
                } else {
                    Op::Shr {
                        d,
                        a,
                        b,
                        bits,
                        signed: ty.is_signed(),
                    }
                }
            }
            "ex2" | "lg2" | "rsqrt" | "tanh" | "rcp" | "sqrt" => {
                let approx = m.take("approx");
                let rn = m.take("rn");
                let ftz = m.take("ftz");
                let ty = one_ty(self, &mut m)?;
                if ty != Ty::F32 {
                    return Err(self.err(line, format!("`{base}` is only supported for .f32")));
                }
                let f = match (base, approx, rn) {
                    ("ex2", true, false) => FFn::Ex2Approx,
                    ("lg2", true, false) => FFn::Lg2Approx,
                    ("rsqrt", true, false) => FFn::RsqrtApprox,
                    ("tanh", true, false) if !ftz => FFn::TanhApprox,
                    ("rcp", true, false) => FFn::RcpApprox,
                    ("rcp", false, true) => FFn::RcpRn,
                    ("sqrt", true, false) => FFn::SqrtApprox,
                    ("sqrt", false, true) => FFn::SqrtRn,
                    _ => {
                        return Err(self.err(
                            line,
                            format!("`{opcode}`: supported forms are {base}.approx and (rcp/sqrt) {base}.rn"),
                        ));
                    }
                };
                nops(self, 2)?;
                let d = self.dst(&ops[0], ty, line)?;
                let a = self.src(&ops[1], ty, line, ms)?;
                Op::FUnary { d, a, f, ftz }
            }
            "cvt" => return self.cvt(opcode, m, ops, line, ms),
            "setp" => return self.setp(opcode, m, ops, line, ms),
            "selp" => {
                let ty = one_ty(self, &mut m)?;
                if ty == Ty::Pred {
                    return Err(unsupported(self));
                }
                nops(self, 4)?;
                let d = self.dst(&ops[0], ty, line)?;
                let a = self.src(&ops[1], ty, line, ms)?;
                let b = self.src(&ops[2], ty, line, ms)?;
                let c = self.src(&ops[3], Ty::Pred, line, ms)?;
                Op::Selp { d, a, b, c }
            }
            "bra" => {
                m.take("uni");
                nops(self, 1)?;
                let Operand::Name(l) = ops[0] else {
                    return Err(self.err(line, "`bra` needs a label"));
                };
                self.branches.push((self.insts.len(), l.to_string(), line));
                Op::Bra { target: 0 }
            }
            "ret" | "exit" => {
                nops(self, 0)?;
                Op::Exit
            }
            "bar" | "barrier" => {
                m.take("cta");
                m.take("aligned");
                if !m.take("sync") {
                    return Err(self.err(
                        line,
                        format!("unsupported barrier `{opcode}` (only bar.sync / barrier.sync)"),
                    ));
                }
                if ops.len() != 1 {
                    return Err(self.err(
                        line,
                        "only `bar.sync <id>;` without a thread count is supported",
                    ));
                }
                match ops[0] {
                    Operand::Imm(Imm::Int(v)) if (0..16).contains(&v) => {}
                    _ => return Err(self.err(line, "the barrier id must be an immediate 0..15")),
                }
                Op::Bar
            }
            "shfl" => {
                if !m.take("sync") {
                    return Err(self.err(
                        line,
                        "use `shfl.sync` (non-sync shfl is deprecated and unsupported)",
                    ));
                }
                let mode = match m.take_any(&["up", "down", "bfly", "idx"]) {
                    Some("up") => ShflMode::Up,
                    Some("down") => ShflMode::Down,
                    Some("bfly") => ShflMode::Bfly,
                    Some("idx") => ShflMode::Idx,
                    _ => {
                        return Err(self.err(line, "shfl.sync needs a mode: up, down, bfly or idx"));
                    }
                };
                let ty = one_ty(self, &mut m)?;
                if ty != Ty::B32 {
                    return Err(self.err(line, "shfl.sync is only .b32"));
                }
                nops(self, 5)?;
                let (d, p) = match &ops[0] {
                    Operand::Pair(d, p) => {
                        let d = self.dst(&Operand::Name(d), ty, line)?;
                        (d, self.pred(p, line)?)
                    }
                    o => (self.dst(o, ty, line)?, NO_SLOT),
                };
                let a = self.src(&ops[1], ty, line, ms)?;
                let b = self.src(&ops[2], Ty::B32, line, ms)?;
                let c = self.src(&ops[3], Ty::B32, line, ms)?;
                let mask = self.src(&ops[4], Ty::B32, line, ms)?;
                Op::Shfl {
                    d,
                    p,
                    a,
                    b,
                    c,
                    mask,
                    mode,
                }
            }
            "ld" | "st" => return self.ldst(base, opcode, m, ops, line, ms),
            "atom" | "red" => return self.atom(base, opcode, m, ops, line, ms),
            "membar" | "fence" => {
                m.items.clear();
                Op::Nop
            }
            _ => return Err(unsupported(self)),
        };
        if let Some(x) = m.items.first() {
            return Err(self.err(line, format!("unsupported modifier `.{x}` in `{opcode}`")));
        }
        Ok(op)
    }

    fn arith(
        &mut self,
        base: &str,
        opcode: &str,
        mut m: Mods,
        ops: &[Operand],
        line: u32,
        ms: &[SharedDecl],
    ) -> Result<Op> {
        let types = m.take_types();
        if types.len() != 1 {
            return Err(self.err(line, format!("`{opcode}` needs exactly one type suffix")));
        }
        let ty = types[0];
        let nops = |s: &Self, n: usize| -> Result<()> {
            if ops.len() != n {
                Err(s.err(
                    line,
                    format!("`{opcode}` takes {n} operands, found {}", ops.len()),
                ))
            } else {
                Ok(())
            }
        };
        let op = if ty == Ty::F32 {
            let ftz = m.take("ftz");
            if m.take("sat") {
                return Err(self.err(line, "`.sat` is not supported"));
            }
            let rnd = m.take_any(&["rn", "rz", "rm", "rp", "approx", "full"]);
            if matches!(rnd, Some("rz" | "rm" | "rp")) {
                return Err(self.err(
                    line,
                    format!(
                        "rounding `.{}` is not supported (only .rn)",
                        rnd.unwrap_or("")
                    ),
                ));
            }
            let n = if matches!(base, "mad" | "fma") { 4 } else { 3 };
            nops(self, n)?;
            let d = self.dst(&ops[0], ty, line)?;
            let a = self.src(&ops[1], ty, line, ms)?;
            let b = self.src(&ops[2], ty, line, ms)?;
            let no_approx = |s: &Self| -> Result<()> {
                if matches!(rnd, Some("approx" | "full")) {
                    Err(s.err(
                        line,
                        format!("`.{}` is not valid for `{base}`", rnd.unwrap_or("")),
                    ))
                } else {
                    Ok(())
                }
            };
            match base {
                "add" => {
                    no_approx(self)?;
                    Op::FAdd { d, a, b, ftz }
                }
                "sub" => {
                    no_approx(self)?;
                    Op::FSub { d, a, b, ftz }
                }
                "mul" => {
                    no_approx(self)?;
                    Op::FMul { d, a, b, ftz }
                }
                "mad" | "fma" => {
                    if rnd != Some("rn") {
                        return Err(self.err(line, format!("`{base}.f32` needs `.rn`")));
                    }
                    let c = self.src(&ops[3], ty, line, ms)?;
                    Op::FFma { d, a, b, c, ftz }
                }
                "div" => match rnd {
                    Some("rn") => Op::FDiv { d, a, b, ftz },
                    Some("approx") => Op::FDivApprox {
                        d,
                        a,
                        b,
                        ftz,
                        full: false,
                    },
                    Some("full") => Op::FDivApprox {
                        d,
                        a,
                        b,
                        ftz,
                        full: true,
                    },
                    _ => return Err(self.err(line, "`div.f32` needs `.rn`, `.approx` or `.full`")),
                },
                "min" | "max" => {
                    if rnd.is_some() {
                        return Err(self.err(line, format!("`{base}.f32` takes no rounding")));
                    }
                    if base == "min" {
                        Op::FMin { d, a, b, ftz }
                    } else {
                        Op::FMax { d, a, b, ftz }
                    }
                }
                _ => return Err(self.err(line, format!("`{base}` is not defined for .f32"))),
            }
        } else {
            if !(ty.is_int() || ty.is_bits()) || ty.bits() < 16 {
                return Err(self.err(
                    line,
                    format!("unsupported type `{}` for `{base}`", ty.name()),
                ));
            }
            if ty.is_bits() {
                return Err(self.err(
                    line,
                    format!("`{base}` needs a .u or .s type, not `{}`", ty.name()),
                ));
            }
            let mask = ty.mask();
            let bits = ty.bits() as u8;
            let signed = ty.is_signed();
            let mode = m.take_any(&["lo", "hi", "wide"]);
            match base {
                "add" | "sub" | "div" | "rem" | "min" | "max" => {
                    if mode.is_some() {
                        return Err(self.err(
                            line,
                            format!("`.{}` is not valid for `{base}`", mode.unwrap_or("")),
                        ));
                    }
                    nops(self, 3)?;
                    let d = self.dst(&ops[0], ty, line)?;
                    let a = self.src(&ops[1], ty, line, ms)?;
                    let b = self.src(&ops[2], ty, line, ms)?;
                    match base {
                        "add" => Op::Add { d, a, b, mask },
                        "sub" => Op::Sub { d, a, b, mask },
                        "div" => Op::Div {
                            d,
                            a,
                            b,
                            bits,
                            signed,
                        },
                        "rem" => Op::Rem {
                            d,
                            a,
                            b,
                            bits,
                            signed,
                        },
                        "min" => Op::Min {
                            d,
                            a,
                            b,
                            bits,
                            signed,
                        },
                        _ => Op::Max {
                            d,
                            a,
                            b,
                            bits,
                            signed,
                        },
                    }
                }
                "mul" | "mad" => {
                    let n = if base == "mad" { 4 } else { 3 };
                    nops(self, n)?;
                    let wide_ty = match (ty, mode) {
                        (Ty::U16, Some("wide")) => Ty::U32,
                        (Ty::S16, Some("wide")) => Ty::S32,
                        (Ty::U32, Some("wide")) => Ty::U64,
                        (Ty::S32, Some("wide")) => Ty::S64,
                        (_, Some("wide")) => {
                            return Err(self.err(
                                line,
                                format!("`.wide` needs a 16- or 32-bit type, not `{}`", ty.name()),
                            ));
                        }
                        _ => ty,
                    };
                    let d = self.dst(&ops[0], wide_ty, line)?;
                    let a = self.src(&ops[1], ty, line, ms)?;
                    let b = self.src(&ops[2], ty, line, ms)?;
                    match (base, mode) {
                        ("mul", Some("lo")) => Op::MulLo { d, a, b, mask },
                        ("mul", Some("hi")) => Op::MulHi {
                            d,
                            a,
                            b,
                            bits,
                            signed,
                        },
                        ("mul", Some("wide")) => Op::MulWide {
                            d,
                            a,
                            b,
                            bits,
                            signed,
                        },
                        ("mad", Some("lo")) => {
                            let c = self.src(&ops[3], ty, line, ms)?;
                            Op::MadLo { d, a, b, c, mask }
                        }
                        ("mad", Some("wide")) => {
                            let c = self.src(&ops[3], wide_ty, line, ms)?;
                            Op::MadWide {
                                d,
                                a,
                                b,
                                c,
                                bits,
                                signed,
                            }
                        }
                        _ => {
                            return Err(self.err(
                                line,
                                format!("`{opcode}`: integer {base} needs `.lo` or `.wide`"),
                            ));
                        }
                    }
                }
                _ => {
                    return Err(
                        self.err(line, format!("`{base}` is not defined for `{}`", ty.name()))
                    );
                }
            }
        };
        if let Some(x) = m.items.first() {
            return Err(self.err(line, format!("unsupported modifier `.{x}` in `{opcode}`")));
        }
        Ok(op)
    }

    fn cvt(
        &mut self,
        opcode: &str,
        mut m: Mods,
        ops: &[Operand],
        line: u32,
        ms: &[SharedDecl],
    ) -> Result<Op> {
        let rnd = m.take_any(&["rn", "rz", "rm", "rp", "rni", "rzi", "rmi", "rpi"]);
        let ftz = m.take("ftz");
        if m.take("sat") || m.take("relu") || m.take("satfinite") {
            return Err(self.err(
                line,
                "`.sat`/`.relu`/`.satfinite` conversions are not supported",
            ));
        }
        let types = m.take_types();
        if let Some(x) = m.items.first() {
            return Err(self.err(line, format!("unsupported modifier `.{x}` in `{opcode}`")));
        }
        if types.len() != 2 {
            return Err(self.err(line, "`cvt` needs a destination and a source type"));
        }
        if ops.len() != 2 {
            return Err(self.err(
                line,
                format!("`{opcode}` takes 2 operands, found {}", ops.len()),
            ));
        }
        let (dt, st) = (types[0], types[1]);
        let int_rnd = match rnd {
            Some("rni") => Some(Rnd::Nearest),
            Some("rzi") => Some(Rnd::Zero),
            Some("rmi") => Some(Rnd::Down),
            Some("rpi") => Some(Rnd::Up),
            _ => None,
        };
        let flt_rnd = match rnd {
            Some("rn") => Some(Rnd::Nearest),
            Some("rz") => Some(Rnd::Zero),
            Some("rm") => Some(Rnd::Down),
            Some("rp") => Some(Rnd::Up),
            _ => None,
        };
        let d = self.dst_with(&ops[0], dt, true, line)?;
        let a = self.src_with(&ops[1], st, true, line, ms)?;
        let op = match (dt, st) {
            (dt, st) if dt.is_int() && st.is_int() => {
                if rnd.is_some() || ftz {
                    return Err(self.err(line, "integer-to-integer cvt takes no rounding or .ftz"));
                }
                // A destination register wider than the type receives the converted value
                // extended by the destination type's signedness.
                let dmask = self.reg_ty(d).expect("destination is a register").mask();
                Op::CvtInt {
                    d,
                    a,
                    from_bits: st.bits() as u8,
                    from_signed: st.is_signed(),
                    to_bits: dt.bits() as u8,
                    to_signed: dt.is_signed(),
                    dmask,
                }
            }
            (Ty::F32, st) if st.is_int() => {
                let Some(r) = flt_rnd else {
                    return Err(self.err(line, "int-to-f32 cvt needs `.rn`, `.rz`, `.rm` or `.rp`"));
                };
                Op::CvtIntF32 {
                    d,
                    a,
                    bits: st.bits() as u8,
                    signed: st.is_signed(),
                    rnd: r,
                }
            }
            (dt, Ty::F32) if dt.is_int() => {
                let Some(r) = int_rnd else {
                    return Err(self.err(
                        line,
                        "f32-to-int cvt needs `.rni`, `.rzi`, `.rmi` or `.rpi`",
                    ));
                };
                let dmask = self.reg_ty(d).expect("destination is a register").mask();
                Op::CvtF32Int {
                    d,
                    a,
                    bits: dt.bits() as u8,
                    signed: dt.is_signed(),
                    rnd: r,
                    ftz,
                    dmask,
                }
            }
            (Ty::F32, Ty::F32) => {
                if flt_rnd.is_some() {
                    return Err(self.err(
                        line,
                        "f32-to-f32 cvt takes `.rni`/`.rzi`/`.rmi`/`.rpi` or nothing",
                    ));
                }
                Op::CvtF32F32 {
                    d,
                    a,
                    rnd: int_rnd,
                    ftz,
                }
            }
            (Ty::Bf16, Ty::F32) => {
                let r = match flt_rnd {
                    Some(r @ (Rnd::Nearest | Rnd::Zero)) => r,
                    _ => return Err(self.err(line, "f32-to-bf16 cvt needs `.rn` or `.rz`")),
                };
                if ftz {
                    return Err(self.err(line, "`.ftz` is not valid for cvt to bf16"));
                }
                Op::CvtF32Bf16 { d, a, rnd: r }
            }
            (Ty::F32, Ty::Bf16) => {
                if rnd.is_some() {
                    return Err(self.err(line, "bf16-to-f32 cvt is exact and takes no rounding"));
                }
                Op::CvtBf16F32 { d, a }
            }
            _ => {
                return Err(self.err(
                    line,
                    format!("unsupported conversion `cvt{}{}`", dt.name(), st.name()),
                ));
            }
        };
        Ok(op)
    }

    fn setp(
        &mut self,
        opcode: &str,
        mut m: Mods,
        ops: &[Operand],
        line: u32,
        ms: &[SharedDecl],
    ) -> Result<Op> {
        let ftz = m.take("ftz");
        let bop = match m.take_any(&["and", "or", "xor"]) {
            Some("and") => BoolOp::And,
            Some("or") => BoolOp::Or,
            Some("xor") => BoolOp::Xor,
            _ => BoolOp::None,
        };
        let cmp_s = m
            .take_any(&[
                "eq", "ne", "lt", "le", "gt", "ge", "lo", "ls", "hi", "hs", "equ", "neu", "ltu",
                "leu", "gtu", "geu", "num", "nan",
            ])
            .ok_or_else(|| self.err(line, format!("`{opcode}` needs a comparison")))?;
        let types = m.take_types();
        if let Some(x) = m.items.first() {
            return Err(self.err(line, format!("unsupported modifier `.{x}` in `{opcode}`")));
        }
        if types.len() != 1 {
            return Err(self.err(line, "`setp` needs exactly one type suffix"));
        }
        let ty = types[0];
        let cmp = match cmp_s {
            "eq" => Cmp::Eq,
            "ne" => Cmp::Ne,
            "lt" => Cmp::Lt,
            "le" => Cmp::Le,
            "gt" => Cmp::Gt,
            "ge" => Cmp::Ge,
            "lo" => Cmp::Lo,
            "ls" => Cmp::Ls,
            "hi" => Cmp::Hi,
            "hs" => Cmp::Hs,
            "equ" => Cmp::Equ,
            "neu" => Cmp::Neu,
            "ltu" => Cmp::Ltu,
            "leu" => Cmp::Leu,
            "gtu" => Cmp::Gtu,
            "geu" => Cmp::Geu,
            "num" => Cmp::Num,
            _ => Cmp::Nan,
        };
        let cty = match ty {
            Ty::F32 => {
                if matches!(cmp, Cmp::Lo | Cmp::Ls | Cmp::Hi | Cmp::Hs) {
                    return Err(self.err(
                        line,
                        format!("`.{cmp_s}` is an unsigned-integer comparison"),
                    ));
                }
                CmpTy::F32
            }
            t if (t.is_int() || t.is_bits()) && t.bits() >= 16 => {
                if ftz
                    || matches!(
                        cmp,
                        Cmp::Equ
                            | Cmp::Neu
                            | Cmp::Ltu
                            | Cmp::Leu
                            | Cmp::Gtu
                            | Cmp::Geu
                            | Cmp::Num
                            | Cmp::Nan
                    )
                {
                    return Err(
                        self.err(line, format!("`.{cmp_s}`/.ftz are float-only comparisons"))
                    );
                }
                if t.is_bits() && !matches!(cmp, Cmp::Eq | Cmp::Ne) {
                    return Err(self.err(line, format!("`{}` only compares with eq/ne", t.name())));
                }
                CmpTy::Int {
                    bits: t.bits() as u8,
                    signed: t.is_signed(),
                }
            }
            _ => return Err(self.err(line, format!("unsupported type `{}` for setp", ty.name()))),
        };
        let want = if bop == BoolOp::None { 3 } else { 4 };
        if ops.len() != want {
            return Err(self.err(
                line,
                format!("`{opcode}` takes {want} operands, found {}", ops.len()),
            ));
        }
        let (d, d2) = match &ops[0] {
            Operand::Pair(p, q) => (self.pred(p, line)?, self.pred(q, line)?),
            o => (self.dst(o, Ty::Pred, line)?, NO_SLOT),
        };
        let a = self.src(&ops[1], ty, line, ms)?;
        let b = self.src(&ops[2], ty, line, ms)?;
        let (c, c_neg) = if bop == BoolOp::None {
            (NO_SLOT, false)
        } else {
            match &ops[3] {
                Operand::Not(n) => (self.src(&Operand::Name(n), Ty::Pred, line, ms)?, true),
                o => (self.src(o, Ty::Pred, line, ms)?, false),
            }
        };
        Ok(Op::Setp {
            d,
            d2,
            a,
            b,
            c,
            cmp,
            ty: cty,
            bop,
            c_neg,
        })
    }

    fn address(
        &mut self,
        op: &Operand,
        space: Space,
        line: u32,
        ms: &[SharedDecl],
    ) -> Result<(Slot, i64)> {
        let Operand::Addr { base, off } = op else {
            return Err(self.err(
                line,
                format!("expected an address `[...]`, found {}", op.describe()),
            ));
        };
        if let Some(&s) = self.regs.get(*base) {
            let rt = self
                .reg_ty(s)
                .expect("declared names map to register slots");
            let ok = match space {
                Space::Global => rt.bits() == 64 && rt != Ty::F32,
                Space::Shared => (rt.bits() == 64 || rt.bits() == 32) && rt != Ty::F32,
            };
            if !ok {
                return Err(self.err(
                    line,
                    format!(
                        "register `{base}` of type `{}` cannot hold an address",
                        rt.name()
                    ),
                ));
            }
            return Ok((s, *off));
        }
        if space == Space::Shared
            && let Some(s) = self.symbol(base, ms)
        {
            return Ok((s, *off));
        }
        if self.params.iter().any(|p| p.name == *base) {
            return Err(self.err(
                line,
                format!("parameter `{base}` can only be read with `ld.param`"),
            ));
        }
        if base.starts_with('%') {
            return Err(self.err(line, format!("undeclared register `{base}`")));
        }
        Err(self.err(line, format!("unknown symbol `{base}`")))
    }

    fn ldst(
        &mut self,
        base: &str,
        opcode: &str,
        mut m: Mods,
        ops: &[Operand],
        line: u32,
        ms: &[SharedDecl],
    ) -> Result<Op> {
        let space = m.take_any(&["global", "shared", "param", "local", "const"]);
        for q in [
            "nc", "ca", "cg", "cs", "lu", "cv", "wb", "wt", "volatile", "relaxed", "weak", "cta",
            "gpu", "sys",
        ] {
            m.take(q);
        }
        m.items.retain(|x| !x.contains("::"));
        let vec_n = match m.take_any(&["v2", "v4"]) {
            Some("v2") => 2,
            Some("v4") => 4,
            _ => 1,
        };
        let types = m.take_types();
        if let Some(x) = m.items.first() {
            return Err(self.err(line, format!("unsupported modifier `.{x}` in `{opcode}`")));
        }
        if types.len() != 1 {
            return Err(self.err(line, format!("`{opcode}` needs exactly one type suffix")));
        }
        let ty = types[0];
        if ty == Ty::Pred || ty == Ty::Bf16 {
            return Err(self.err(
                line,
                format!("unsupported type `{}` for `{base}`", ty.name()),
            ));
        }
        if ops.len() != 2 {
            return Err(self.err(
                line,
                format!("`{opcode}` takes 2 operands, found {}", ops.len()),
            ));
        }
        let space = match space {
            Some("global") => Space::Global,
            Some("shared") => Space::Shared,
            Some("param") => {
                if base != "ld" || vec_n != 1 {
                    return Err(self.err(line, "only scalar `ld.param` is supported"));
                }
                let Operand::Addr { base: pname, off } = ops[1] else {
                    return Err(self.err(line, "`ld.param` needs `[param]`"));
                };
                let Some(idx) = self.params.iter().position(|p| p.name == pname) else {
                    return Err(self.err(line, format!("unknown parameter `{pname}`")));
                };
                if off != 0 {
                    return Err(self.err(line, "offsets into parameters are not supported"));
                }
                let pty = self.params[idx].ty;
                if pty.bits() != ty.bits() {
                    return Err(self.err(
                        line,
                        format!(
                            "`{opcode}` reads {} bits but parameter `{pname}` is `{}`",
                            ty.bits(),
                            pty.name()
                        ),
                    ));
                }
                let d = self.dst(&ops[0], ty, line)?;
                return Ok(Op::LdParam { d, idx: idx as u32 });
            }
            Some(s) => return Err(self.err(line, format!("state space `.{s}` is not supported"))),
            None => {
                return Err(self.err(
                    line,
                    "generic addressing is not supported: use `.global` or `.shared`",
                ));
            }
        };
        if vec_n * ty.bytes() > 16 {
            return Err(self.err(line, "vector access larger than 16 bytes"));
        }
        let regs_op: Vec<Operand> = match (&ops[if base == "ld" { 0 } else { 1 }], vec_n) {
            (Operand::Vector(v), n) if v.len() == n as usize && n > 1 => {
                v.iter().map(|x| Operand::Name(x)).collect()
            }
            (o, 1) if !matches!(o, Operand::Vector(_)) => vec![o.clone()],
            _ => {
                return Err(self.err(
                    line,
                    format!("`{opcode}` needs {vec_n} register(s) in `{{...}}` form"),
                ));
            }
        };
        let addr_op = if base == "ld" { &ops[1] } else { &ops[0] };
        let (addr, off) = self.address(addr_op, space, line, ms)?;
        let mut slots = [NO_SLOT; 4];
        let mut dmask = u64::MAX;
        for (k, r) in regs_op.iter().enumerate() {
            if base == "ld" {
                let s = self.dst_with(r, ty, true, line)?;
                dmask = self.reg_ty(s).expect("register").mask();
                slots[k] = s;
            } else {
                slots[k] = self.src_with(r, ty, true, line, ms)?;
            }
        }
        let size = ty.bytes() as u8;
        Ok(if base == "ld" {
            Op::Ld {
                space,
                dst: slots,
                n: vec_n as u8,
                size,
                signed: ty.is_signed(),
                dmask,
                addr,
                off,
            }
        } else {
            Op::St {
                space,
                src: slots,
                n: vec_n as u8,
                size,
                addr,
                off,
            }
        })
    }

    fn atom(
        &mut self,
        base: &str,
        opcode: &str,
        mut m: Mods,
        ops: &[Operand],
        line: u32,
        ms: &[SharedDecl],
    ) -> Result<Op> {
        let space = match m.take_any(&["global", "shared"]) {
            Some("global") => Space::Global,
            Some("shared") => Space::Shared,
            _ => return Err(self.err(line, format!("`{base}` needs `.global` or `.shared`"))),
        };
        for q in [
            "relaxed", "acquire", "release", "acq_rel", "sem", "cta", "gpu", "sys",
        ] {
            m.take(q);
        }
        let aop = match m.take_any(&["add", "min", "max", "exch", "cas", "and", "or", "xor"]) {
            Some("add") => AtomOp::Add,
            Some("min") => AtomOp::Min,
            Some("max") => AtomOp::Max,
            Some("exch") => AtomOp::Exch,
            Some("cas") => AtomOp::Cas,
            Some("and") => AtomOp::And,
            Some("or") => AtomOp::Or,
            Some("xor") => AtomOp::Xor,
            _ => return Err(self.err(line, format!("unsupported atomic operation in `{opcode}`"))),
        };
        let types = m.take_types();
        if let Some(x) = m.items.first() {
            return Err(self.err(line, format!("unsupported modifier `.{x}` in `{opcode}`")));
        }
        if types.len() != 1 {
            return Err(self.err(line, format!("`{opcode}` needs exactly one type suffix")));
        }
        let ty = types[0];
        let aty = match (aop, ty) {
            (AtomOp::Add, Ty::F32) => AtomTy::F32,
            (AtomOp::Exch | AtomOp::Cas, Ty::F32) => AtomTy::F32,
            (_, Ty::U32 | Ty::B32) => AtomTy::U32,
            (_, Ty::S32) => AtomTy::S32,
            (_, Ty::U64 | Ty::B64) => AtomTy::U64,
            (_, Ty::S64) => AtomTy::S64,
            _ => {
                return Err(self.err(
                    line,
                    format!("`{opcode}`: unsupported type `{}`", ty.name()),
                ));
            }
        };
        let bitwise = matches!(aop, AtomOp::And | AtomOp::Or | AtomOp::Xor);
        if bitwise != ty.is_bits() && !matches!(aop, AtomOp::Exch | AtomOp::Cas) {
            return Err(self.err(
                line,
                format!(
                    "`{opcode}`: type `{}` does not fit the operation",
                    ty.name()
                ),
            ));
        }
        if base == "red" && matches!(aop, AtomOp::Cas | AtomOp::Exch) {
            return Err(self.err(line, "`red` supports add/min/max/and/or/xor"));
        }
        let has_d = base == "atom";
        let want = usize::from(has_d) + 2 + usize::from(aop == AtomOp::Cas);
        if ops.len() != want {
            return Err(self.err(
                line,
                format!("`{opcode}` takes {want} operands, found {}", ops.len()),
            ));
        }
        let mut k = 0;
        let d = if has_d {
            k = 1;
            self.dst(&ops[0], ty, line)?
        } else {
            NO_SLOT
        };
        let (addr, off) = self.address(&ops[k], space, line, ms)?;
        let b = self.src(&ops[k + 1], ty, line, ms)?;
        let c = if aop == AtomOp::Cas {
            self.src(&ops[k + 2], ty, line, ms)?
        } else {
            NO_SLOT
        };
        Ok(Op::Atom {
            space,
            op: aop,
            ty: aty,
            d,
            addr,
            off,
            b,
            c,
        })
    }

    fn finish(mut self, close_line: u32) -> Result<Kernel> {
        for (idx, label, line) in std::mem::take(&mut self.branches) {
            let Some(&t) = self.labels.get(&label) else {
                return Err(self.err(line, format!("undefined label `{label}`")));
            };
            self.insts[idx].op = Op::Bra { target: t };
        }
        // Falling off the end of the body is a return.
        self.insts.push(Inst {
            op: Op::Exit,
            guard: NO_SLOT,
            guard_neg: false,
            line: close_line,
        });
        let mut off = 0u32;
        let mut ext_align = 0u32;
        let mut addrs = HashMap::new();
        for d in self.shared.iter().filter(|d| !d.ext) {
            off = off.next_multiple_of(d.align);
            addrs.insert(d.name.clone(), off);
            off += d.size;
        }
        for d in self.shared.iter().filter(|d| d.ext) {
            ext_align = ext_align.max(d.align);
        }
        let static_shared = off;
        let extern_offset = (ext_align > 0).then(|| off.next_multiple_of(ext_align));
        for d in self.shared.iter().filter(|d| d.ext) {
            addrs.insert(
                d.name.clone(),
                extern_offset.expect("set when an extern exists"),
            );
        }
        for (name, slot) in &self.sym_slots {
            self.template[*slot as usize] = addrs[name] as u64;
        }
        Ok(Kernel {
            name: self.name,
            params: self.params,
            insts: self.insts,
            template: self.template,
            static_shared,
            extern_offset,
            reqntid: self.reqntid,
            maxntid: self.maxntid,
        })
    }
}
