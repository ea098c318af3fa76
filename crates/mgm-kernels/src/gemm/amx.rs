//! The AMX backend: an f32 GEMM computed on the bf16 tile units (Sapphire Rapids and later).
//!
//! Every f32 operand is split exactly into three bf16 pieces, `x = x1 + x2 + x3` (`x1` the top
//! 8 significant bits by truncation, `x2` the next 8 of the remainder, `x3` the rest), and
//! `A B` is accumulated in f32 as the six products whose size is at least `2^-16` of the
//! leading one: `a1 b1 + a1 b2 + a2 b1 + a1 b3 + a2 b2 + a3 b1`. Each bf16 x bf16 product is
//! exact in f32; the dropped terms are below `2^-24 |a| |b|`, the size of an f32 rounding, so
//! the result is as accurate as an f32 FMA GEMM (the tests hold both to the same bound against
//! the f64 reference). `TDPBF16PS` runs 16 x 16 x 32 multiply-adds per instruction, so even six
//! of them per product beat 16-lane FMA by about 2x.
//!
//! Layouts: `A` in tiles of 16 rows x 32 `k` (one 1 KB tile per piece), rows padded to a
//! multiple of 32 and `k` to a multiple of 32 with zeros; `B` in the VNNI tiles `TDPBF16PS`
//! reads (16 rows of `k` pairs x 16 columns), columns padded to 32. The kernel keeps a 32 x 32
//! block of `C` in four tile registers and streams the six products per 32-wide `k` chunk
//! through the other four, with 14 tile loads per 24 tile multiplies.
//!
//! Differences from the FMA path, all at the edges of f32: the tile unit treats subnormal bf16
//! inputs as zero and flushes subnormal results, so values below about `2^-110` lose their low
//! pieces; and a product that meets an infinity would see `inf * 0` from a zero piece, so an
//! operand holding an infinity is multiplied on the FMA path instead (the caller checks
//! [`Lhs::has_inf`] / [`Rhs::has_inf`]).

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::{Aligned, Epilogue, MatRef, SharedPtr, ranges};

/// Rows (and columns) of one tile.
const T: usize = 16;
/// `k` per tile (32 bf16 = 64 bytes per tile row).
const TK: usize = 32;
/// bf16 elements of one tile.
const TILE: usize = T * TK;
/// `k` chunks per block (1024 of `k`): the pieces of a 32-row and a 32-column block for one
/// block of `k` (192 KB each) stay in L2, and a `C` block makes few round trips to memory
/// (smaller blocks measured slower on CLIP-L's shapes, 2 to 16 chunks).
const KB_CHUNKS: usize = 32;
/// Column pairs (32 columns each) swept together while every row pair passes over them.
const GROUP: usize = 4;
/// Below this many multiply-adds one call runs on the calling thread.
const PAR_WORK: usize = 1 << 20;

/// Whether this process may run AMX-BF16: the CPU reports AMX-TILE and AMX-BF16 (CPUID leaf 7)
/// and Linux granted the tile-data state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), checked once.
pub(super) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        if std::env::var_os("MGM_NO_AMX").is_some_and(|v| v != "0") {
            return false;
        }
        probe()
    })
}

#[cfg(target_os = "linux")]
fn probe() -> bool {
    let max_leaf = __cpuid(0).eax;
    let leaf7 = __cpuid_count(7, 0);
    if max_leaf < 7 {
        return false;
    }
    let amx_bf16 = leaf7.edx & (1 << 22) != 0;
    let amx_tile = leaf7.edx & (1 << 24) != 0;
    if !(amx_bf16 && amx_tile && std::arch::is_x86_feature_detected!("avx512f")) {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain syscall with integer arguments; it only changes this process's
    // permission to use the tile state and reports failure by its return value.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    r == 0
}

#[cfg(not(target_os = "linux"))]
fn probe() -> bool {
    false
}

/// The three bf16 pieces of `x` (bit patterns): `x == f(p0) + f(p1) + f(p2)` exactly for finite
/// `x` (down to subnormal pieces); NaN and infinities keep their value in the first piece.
#[inline(always)]
fn split(x: f32) -> [u16; 3] {
    if !x.is_finite() {
        let hi = (x.to_bits() >> 16) as u16;
        // a NaN whose payload sits in the low bits would truncate to an infinity
        let hi = if x.is_nan() { hi | 0x0040 } else { hi };
        return [hi, 0, 0];
    }
    let top = |v: f32| f32::from_bits(v.to_bits() & 0xFFFF_0000);
    let p0 = top(x);
    let r0 = x - p0;
    let p1 = top(r0);
    let r1 = r0 - p1;
    // r1 holds at most 8 significant bits, so truncation keeps it whole
    [
        (p0.to_bits() >> 16) as u16,
        (p1.to_bits() >> 16) as u16,
        (r1.to_bits() >> 16) as u16,
    ]
}

/// The f32 value of a bf16 bit pattern.
#[inline(always)]
fn widen(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// `A` split into bf16 pieces in tile order: tile `(row block, k chunk, piece)`.
#[derive(Clone, Debug)]
pub(super) struct Lhs {
    pub(super) m: usize,
    pub(super) k: usize,
    /// 16-row blocks (even: rows padded to a multiple of 32).
    rb: usize,
    /// 32-wide `k` chunks.
    kch: usize,
    data: Aligned,
    /// An infinity among the values (the caller multiplies on the FMA path).
    pub(super) has_inf: bool,
}

/// `B` split into bf16 pieces in VNNI tile order: tile `(column block, k chunk, piece)`.
#[derive(Clone, Debug)]
pub(super) struct Rhs {
    pub(super) k: usize,
    pub(super) n: usize,
    /// 16-column blocks (even: columns padded to a multiple of 32).
    cb: usize,
    kch: usize,
    data: Aligned,
    pub(super) has_inf: bool,
}

/// f32 slots holding `count` bf16 values (two per slot).
fn slots(count: usize) -> usize {
    count.div_ceil(2)
}

impl Lhs {
    /// Splits `a` (`[m, k]`), row `i` times `row_scale[i]` when given.
    pub(super) fn pack(a: MatRef<'_>, row_scale: Option<&[f32]>) -> Lhs {
        let (m, k) = (a.rows, a.cols);
        let rb = 2 * m.div_ceil(2 * T);
        let kch = k.div_ceil(TK);
        let mut data = Aligned::recycled(slots(rb * kch * 3 * TILE));
        let ptr = SharedPtr(data.as_mut_ptr());
        let inf = std::sync::atomic::AtomicBool::new(false);
        let pack_block = |b: usize| {
            // SAFETY: block b owns tiles b*kch*3 .. (b+1)*kch*3, which no other call writes.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(
                    ptr.get().cast::<u16>().add(b * kch * 3 * TILE),
                    kch * 3 * TILE,
                )
            };
            let mut saw_inf = false;
            for r in 0..T {
                let i = b * T + r;
                if i >= m {
                    // padding rows (the recycled buffer holds old values)
                    for c in 0..kch {
                        for p in 0..3 {
                            dst[(c * 3 + p) * TILE + r * TK..][..TK].fill(0);
                        }
                    }
                    continue;
                }
                let scale = row_scale.map_or(1.0, |s| s[i]);
                if a.cs == 1 {
                    // SAFETY: row i's k elements are in bounds (MatRef::new); AVX-512F is
                    // present (available() checked it); the destination rows lie in dst.
                    saw_inf |= unsafe {
                        split_row(
                            a.data.as_ptr().add(i * a.rs),
                            k,
                            scale,
                            dst.as_mut_ptr().add(r * TK),
                            kch,
                        )
                    };
                    continue;
                }
                for c in 0..kch {
                    for j in 0..TK {
                        let kk = c * TK + j;
                        let v = if kk < k { a.at(i, kk) * scale } else { 0.0 };
                        saw_inf |= v.is_infinite();
                        for (piece, &h) in split(v).iter().enumerate() {
                            dst[(c * 3 + piece) * TILE + r * TK + j] = h;
                        }
                    }
                }
            }
            if saw_inf {
                inf.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        };
        if m * k >= 1 << 15 {
            (0..rb).into_par_iter().for_each(pack_block);
        } else {
            (0..rb).for_each(pack_block);
        }
        Lhs {
            m,
            k,
            rb,
            kch,
            data,
            has_inf: inf.into_inner(),
        }
    }

    /// The values as a row-major `[m, k]` f32 matrix (exact: the pieces sum back).
    pub(super) fn unpack(&self) -> Vec<f32> {
        let d = self.pieces();
        let mut out = vec![0f32; self.m * self.k];
        for i in 0..self.m {
            let (b, r) = (i / T, i % T);
            for kk in 0..self.k {
                let (c, j) = (kk / TK, kk % TK);
                let t = (b * self.kch + c) * 3;
                out[i * self.k + kk] = (0..3).map(|p| widen(d[(t + p) * TILE + r * TK + j])).sum();
            }
        }
        out
    }

    fn pieces(&self) -> &[u16] {
        // SAFETY: the buffer holds slots(rb*kch*3*TILE) f32 slots, i.e. at least that many
        // u16 pairs, all initialised.
        unsafe {
            std::slice::from_raw_parts(
                self.data.as_ptr().cast::<u16>(),
                self.rb * self.kch * 3 * TILE,
            )
        }
    }

    /// Returns the buffer to the packing pool.
    pub(super) fn recycle(&mut self) {
        self.data.recycle();
    }
}

impl Rhs {
    /// Splits `b` (`[k, n]`).
    pub(super) fn pack(b: MatRef<'_>) -> Rhs {
        let (k, n) = (b.rows, b.cols);
        let cb = 2 * n.div_ceil(2 * T);
        let kch = k.div_ceil(TK);
        let mut data = Aligned::zeroed(slots(cb * kch * 3 * TILE));
        let ptr = SharedPtr(data.as_mut_ptr());
        let inf = std::sync::atomic::AtomicBool::new(false);
        // the vector packer reads rows of B: give it a row-major copy of a transposed view
        let rowmajor: Option<Vec<f32>> = (b.cs != 1 && k * n > 0).then(|| {
            let mut t = vec![0f32; k * n];
            t.par_chunks_mut(n).enumerate().for_each(|(kk, row)| {
                for (j, x) in row.iter_mut().enumerate() {
                    *x = b.at(kk, j);
                }
            });
            t
        });
        let src: &[f32] = rowmajor.as_deref().unwrap_or(b.data);
        let rs = if rowmajor.is_some() { n } else { b.rs };
        let pack_block = |blk: usize| {
            // SAFETY: column block blk owns its kch*3 tiles; no other call writes them.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(
                    ptr.get().cast::<u16>().add(blk * kch * 3 * TILE),
                    kch * 3 * TILE,
                )
            };
            let cols = T.min(n.saturating_sub(blk * T));
            if cols == 0 {
                return; // the zeroed buffer already pads
            }
            // SAFETY: rows 0..k of columns blk*T..blk*T+cols are in bounds of `src` (its
            // MatRef, or the row-major copy); AVX-512F is present.
            let saw_inf = unsafe {
                split_cols_vnni(
                    src.as_ptr().add(blk * T),
                    rs,
                    k,
                    cols,
                    dst.as_mut_ptr(),
                    kch,
                )
            };
            if saw_inf {
                inf.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        };
        if k * n >= 1 << 15 {
            (0..cb).into_par_iter().for_each(pack_block);
        } else {
            (0..cb).for_each(pack_block);
        }
        Rhs {
            k,
            n,
            cb,
            kch,
            data,
            has_inf: inf.into_inner(),
        }
    }

    /// The values as a row-major `[k, n]` f32 matrix (exact).
    pub(super) fn unpack(&self) -> Vec<f32> {
        // SAFETY: as Lhs::pieces.
        let d = unsafe {
            std::slice::from_raw_parts(
                self.data.as_ptr().cast::<u16>(),
                self.cb * self.kch * 3 * TILE,
            )
        };
        let mut out = vec![0f32; self.k * self.n];
        for kk in 0..self.k {
            let (c, q) = (kk / TK, kk % TK);
            for j in 0..self.n {
                let (blk, col) = (j / T, j % T);
                let t = (blk * self.kch + c) * 3;
                let off = (q / 2) * TK + col * 2 + q % 2;
                out[kk * self.n + j] = (0..3).map(|p| widen(d[(t + p) * TILE + off])).sum();
            }
        }
        out
    }

    /// Bytes held.
    pub(super) fn bytes(&self) -> usize {
        self.cb * self.kch * 3 * TILE * 2
    }
}

/// The three pieces of 16 lanes, each as the bf16 bit pattern in the high half of a 32-bit
/// lane (the low half zero); and whether a lane held an infinity. As [`split`].
#[target_feature(enable = "avx512f")]
#[inline]
fn split_zmm(x: __m512) -> ([__m512i; 3], bool) {
    let hi = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    let bits = _mm512_castps_si512(x);
    let exp = _mm512_set1_epi32(0x7F80_0000);
    let special = _mm512_cmpeq_epi32_mask(_mm512_and_si512(bits, exp), exp);
    let is_inf = _mm512_mask_cmpeq_epi32_mask(
        special,
        _mm512_and_si512(bits, _mm512_set1_epi32(0x007F_FFFF)),
        _mm512_setzero_si512(),
    );
    let p0 = _mm512_and_si512(bits, hi);
    let r0 = _mm512_sub_ps(x, _mm512_castsi512_ps(p0));
    let p1 = _mm512_and_si512(_mm512_castps_si512(r0), hi);
    let r1 = _mm512_sub_ps(r0, _mm512_castsi512_ps(p1));
    let p2 = _mm512_and_si512(_mm512_castps_si512(r1), hi);
    // NaN keeps a quiet NaN in the first piece, NaN and inf nothing in the others
    let nan = special & !is_inf;
    let p0 = _mm512_mask_or_epi32(p0, nan, p0, _mm512_set1_epi32(0x0040_0000));
    let p1 = _mm512_mask_mov_epi32(p1, special, _mm512_setzero_si512());
    let p2 = _mm512_mask_mov_epi32(p2, special, _mm512_setzero_si512());
    ([p0, p1, p2], is_inf != 0)
}

/// Splits one row of `k` floats (times `scale`) into the tile rows of its `kch` chunks: chunk
/// `c`, piece `p` goes to `dst + (c * 3 + p) * TILE` (32 bf16); `k` past the row is zero.
/// Returns whether the row held an infinity.
///
/// # Safety
/// `src` has `k` readable floats; `dst` covers `kch * 3` tiles from the row's start; AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn split_row(src: *const f32, k: usize, scale: f32, dst: *mut u16, kch: usize) -> bool {
    let mut inf = false;
    let sc = _mm512_set1_ps(scale);
    for c in 0..kch {
        for h in 0..2 {
            let k0 = c * TK + h * 16;
            let left = k.saturating_sub(k0);
            let mk: __mmask16 = if left >= 16 {
                0xFFFF
            } else {
                ((1u32 << left) - 1) as __mmask16
            };
            // SAFETY: masked lanes past k are not read; stores stay inside the tile rows.
            unsafe {
                let x = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, src.add(k0)), sc);
                let (p, i) = split_zmm(x);
                inf |= i;
                for (piece, v) in p.iter().enumerate() {
                    let half = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(*v));
                    _mm256_storeu_si256(dst.add((c * 3 + piece) * TILE + h * 16).cast(), half);
                }
            }
        }
    }
    inf
}

/// Splits `cols <= 16` columns of `k` rows (`rs` apart, unit column stride) into VNNI tiles:
/// chunk `c`, piece `p` at `dst + (c * 3 + p) * TILE`, tile row `q` holding the pairs
/// (rows `2q`, `2q + 1`) of each column. Returns whether an infinity was seen.
///
/// # Safety
/// The `k x cols` source block is readable; `dst` covers `kch * 3` tiles; AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn split_cols_vnni(
    src: *const f32,
    rs: usize,
    k: usize,
    cols: usize,
    dst: *mut u16,
    kch: usize,
) -> bool {
    let mut inf = false;
    let mk: __mmask16 = if cols >= 16 {
        0xFFFF
    } else {
        ((1u32 << cols) - 1) as __mmask16
    };
    let lo_mask = _mm512_set1_epi32(0xFFFF);
    for c in 0..kch {
        for q in 0..TK / 2 {
            let (k0, k1) = (c * TK + 2 * q, c * TK + 2 * q + 1);
            // SAFETY: rows past k read as zero (not loaded); columns past cols are masked.
            unsafe {
                let row = |kk: usize| {
                    if kk < k {
                        _mm512_maskz_loadu_ps(mk, src.add(kk * rs))
                    } else {
                        _mm512_setzero_ps()
                    }
                };
                let (p0, i0) = split_zmm(row(k0));
                let (p1, i1) = split_zmm(row(k1));
                inf |= i0 | i1;
                for piece in 0..3 {
                    // low half: row 2q's piece, high half: row 2q+1's
                    let v = _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi32::<16>(p0[piece]), lo_mask),
                        p1[piece],
                    );
                    _mm512_storeu_si512(dst.add((c * 3 + piece) * TILE + q * TK).cast(), v);
                }
            }
        }
    }
    inf
}

/// The tile configuration: palette 1, tiles 0-7 all 16 rows x 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = {
    let mut c = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
    };
    let mut i = 0;
    while i < 8 {
        c.colsb[i] = 64;
        c.rows[i] = 16;
        i += 1;
    }
    c
};

/// `C = epilogue(A B)` on the tile units; splits the columns over rayon tasks when `parallel`.
///
/// # Safety
/// [`available`] returned true; `out` covers `m` rows of `n` elements `ldc` apart, exclusively;
/// neither operand holds an infinity.
pub(super) unsafe fn run(
    a: &Lhs,
    b: &Rhs,
    out: *mut f32,
    ldc: usize,
    epi: &Epilogue<'_>,
    parallel: bool,
) {
    let (m, n, k) = (a.m, b.n, a.k);
    let pairs = b.cb / 2;
    let parallel = parallel && m.saturating_mul(n).saturating_mul(k.max(1)) >= PAR_WORK;
    let tasks = if parallel {
        (2 * rayon::current_num_threads()).clamp(1, pairs.max(1))
    } else {
        1
    };
    let out = SharedPtr(out);
    let task = |(q0, q1): (usize, usize)| {
        // SAFETY: forwarded contract; column pairs q0..q1 belong to this task alone.
        unsafe { run_columns(a, b, out.get(), ldc, q0, q1, epi) }
    };
    let rs: Vec<(usize, usize)> = ranges(pairs, tasks).collect();
    if rs.len() > 1 {
        rs.into_par_iter().for_each(task);
    } else {
        rs.into_iter().for_each(task);
    }
}

/// Column pairs `q0..q1` of the product, all rows.
///
/// # Safety
/// As [`run`], for those columns.
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn run_columns(
    a: &Lhs,
    b: &Rhs,
    out: *mut f32,
    ldc: usize,
    q0: usize,
    q1: usize,
    epi: &Epilogue<'_>,
) {
    let (m, n) = (a.m, b.n);
    let row_pairs = a.rb / 2;
    let ad = a.data.as_ptr().cast::<u16>();
    let bd = b.data.as_ptr().cast::<u16>();
    // the C block passes through here (32 x 32, rows 128 bytes apart)
    let mut scratch = Aligned::zeroed(32 * 32);
    let s = scratch.as_mut_ptr();
    // SAFETY: the tile config is a valid palette-1 configuration (available() checked that
    // the process may use the tile state).
    unsafe { asm!("ldtilecfg [{0}]", in(reg) &CONFIG, options(nostack, readonly)) };
    let blocks = a.kch.div_ceil(KB_CHUNKS).max(1);
    let mut g0 = q0;
    while g0 < q1 {
        let g1 = (g0 + GROUP).min(q1);
        for kb in 0..blocks {
            let c0 = kb * KB_CHUNKS;
            let c1 = (c0 + KB_CHUNKS).min(a.kch);
            let (first, last) = (kb == 0, kb + 1 == blocks);
            for rp in 0..row_pairs {
                let r0 = rp * 32;
                let rows = 32.min(m.saturating_sub(r0));
                for cp in g0..g1 {
                    let col0 = cp * 32;
                    let cols = 32.min(n - col0);
                    // SAFETY: the block (rows x cols at r0, col0) is inside the output; the
                    // scratch holds 32 x 32 floats; tiles indexed below exist in both packs.
                    unsafe {
                        let o = out.add(r0 * ldc + col0);
                        let load = !first || epi.accumulate;
                        if rows == 32 && cols == 32 {
                            // a whole block: the tiles load and store the output directly
                            block(ad, bd, a.kch, b.kch, 2 * rp, 2 * cp, c0, c1, o, ldc, load);
                            if last {
                                super::avx512::finish_public(o, ldc, r0, col0, 32, 32, epi);
                            }
                            continue;
                        }
                        if load {
                            for i in 0..32 {
                                for j in 0..32 {
                                    *s.add(i * 32 + j) = if i < rows && j < cols {
                                        *o.add(i * ldc + j)
                                    } else {
                                        0.0
                                    };
                                }
                            }
                        }
                        block(ad, bd, a.kch, b.kch, 2 * rp, 2 * cp, c0, c1, s, 32, load);
                        for i in 0..rows {
                            std::ptr::copy_nonoverlapping(s.add(i * 32), o.add(i * ldc), cols);
                        }
                        if last {
                            super::avx512::finish_public(o, ldc, r0, col0, rows, cols, epi);
                        }
                    }
                }
            }
        }
        g0 = g1;
    }
    // SAFETY: releases this thread's tile state (no tile is live past this point).
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// One 32 x 32 block of `C` over `k` chunks `c0..c1`, at `s` with rows `ldc` floats apart
/// (loaded from there when `load`, else from zero).
///
/// # Safety
/// The tile configuration is loaded; row blocks `rb0, rb0+1` of `ad` and column blocks
/// `cb0, cb0+1` of `bd` exist with `akch` / `bkch` chunks; `s` holds 32 rows of 32 floats,
/// `ldc` apart.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn block(
    ad: *const u16,
    bd: *const u16,
    akch: usize,
    bkch: usize,
    rb0: usize,
    cb0: usize,
    c0: usize,
    c1: usize,
    s: *mut f32,
    ldc: usize,
    load: bool,
) {
    const ROW: usize = 64; // bytes per tile row
    let crow = ldc * 4; // bytes per row of C
    // SAFETY: pointer arithmetic stays inside the packs and the C block (contract); each asm
    // block names every tile register it writes and reads only the memory it is given.
    unsafe {
        let c01 = s.add(16);
        let c10 = s.add(16 * ldc);
        let c11 = s.add(16 * ldc + 16);
        if load {
            asm!(
                "tileloadd tmm0, [{p0} + {st}]",
                "tileloadd tmm1, [{p1} + {st}]",
                "tileloadd tmm2, [{p2} + {st}]",
                "tileloadd tmm3, [{p3} + {st}]",
                p0 = in(reg) s, p1 = in(reg) c01, p2 = in(reg) c10, p3 = in(reg) c11,
                st = in(reg) crow, options(nostack, readonly)
            );
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        }
        let at = |rb: usize, c: usize, p: usize| ad.add(((rb * akch + c) * 3 + p) * TILE);
        let bt = |cb: usize, c: usize, p: usize| bd.add(((cb * bkch + c) * 3 + p) * TILE);
        for c in c0..c1 {
            // a3 b1, a2 b1, a2 b2, a1 b2, a1 b1, a1 b3: each step reloads one operand pair
            asm!(
                "tileloadd tmm4, [{a30} + {st}]",
                "tileloadd tmm5, [{a31} + {st}]",
                "tileloadd tmm6, [{b10} + {st}]",
                "tileloadd tmm7, [{b11} + {st}]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "tileloadd tmm4, [{a20} + {st}]",
                "tileloadd tmm5, [{a21} + {st}]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "tileloadd tmm6, [{b20} + {st}]",
                "tileloadd tmm7, [{b21} + {st}]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "tileloadd tmm4, [{a10} + {st}]",
                "tileloadd tmm5, [{a11} + {st}]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "tileloadd tmm6, [{b10} + {st}]",
                "tileloadd tmm7, [{b11} + {st}]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "tileloadd tmm6, [{b30} + {st}]",
                "tileloadd tmm7, [{b31} + {st}]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a10 = in(reg) at(rb0, c, 0), a11 = in(reg) at(rb0 + 1, c, 0),
                a20 = in(reg) at(rb0, c, 1), a21 = in(reg) at(rb0 + 1, c, 1),
                a30 = in(reg) at(rb0, c, 2), a31 = in(reg) at(rb0 + 1, c, 2),
                b10 = in(reg) bt(cb0, c, 0), b11 = in(reg) bt(cb0 + 1, c, 0),
                b20 = in(reg) bt(cb0, c, 1), b21 = in(reg) bt(cb0 + 1, c, 1),
                b30 = in(reg) bt(cb0, c, 2), b31 = in(reg) bt(cb0 + 1, c, 2),
                st = in(reg) ROW,
                options(nostack, readonly)
            );
        }
        asm!(
            "tilestored [{p0} + {st}], tmm0",
            "tilestored [{p1} + {st}], tmm1",
            "tilestored [{p2} + {st}], tmm2",
            "tilestored [{p3} + {st}], tmm3",
            p0 = in(reg) s, p1 = in(reg) c01, p2 = in(reg) c10, p3 = in(reg) c11,
            st = in(reg) crow, options(nostack)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_exact_and_keeps_specials() {
        for &x in &[
            1.0f32,
            -2.718_281_7e3,
            1.234_567_9e-20,
            6.02e23,
            f32::MAX,
            -f32::MIN_POSITIVE,
            0.1,
            -0.0,
        ] {
            let p = split(x);
            let back = widen(p[0]) + widen(p[1]) + widen(p[2]);
            assert_eq!(back, x, "{x}: {p:?}");
        }
        assert!(widen(split(f32::from_bits(0x7F80_0001))[0]).is_nan());
        assert_eq!(widen(split(f32::NEG_INFINITY)[0]), f32::NEG_INFINITY);
    }
}
