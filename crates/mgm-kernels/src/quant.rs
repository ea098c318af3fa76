//! Weight-only quantization of `[out, in]` weights and the products with them.
//!
//! Both formats scale groups of 32 consecutive inputs of a row (the last group of a row may be
//! shorter), one f16 scale per group:
//! - [`QuantFormat::Q8`]: int8, `s = max|w| / 127`, `q = round(w / s)` (llama.cpp's q8_0;
//!   8.5 bits per weight). One scale per whole row (per output channel) was measured first: on
//!   a LLaMA-shaped model with N(0, 0.02) weights it moved the logits by 1.7e-2 (relative
//!   Frobenius), above the 1e-2 we hold q8 to; a row's maximum grows with its length, a group's
//!   does not.
//! - [`QuantFormat::Q4`]: 4-bit, llama.cpp's q4_0 scheme: `d = w_max / -8` with `w_max` the
//!   value of largest magnitude, `q = clamp(round(w / d) + 8, 0, 15)`, `w = (q - 8) d`; two
//!   values per byte (value `j` in the low nibble of byte `j`, value `j + 16` in the high
//!   nibble), 16 bytes per group (4.5 bits per weight).
//!
//! Few rows of activations (decode) multiply on integers like llama.cpp: each row is quantized
//! to int8 in blocks of 32 (`s_x = max|x| / 127`), every block's integer dot product runs on
//! AVX-512 VNNI (`vpdpbusd`, 64 multiply-adds per instruction; a portable loop elsewhere) and
//! is scaled by `s_x s_w` in f32. Many rows (prefill) dequantize the weight once into the
//! packed GEMM instead (f32-accurate given the quantized weights).
//!
//! [`reference`] computes the same math in f64 (weights and activations dequantized exactly as
//! the kernel quantizes them), so the tests can hold the fast paths to f32 accuracy; the error
//! against the unquantized product is what quantization costs.
//!
//! ```
//! use mgm_kernels::gemm::{Epilogue, MatMut, MatRef};
//! use mgm_kernels::quant::{self, QuantFormat, QuantMatrix};
//! let w: Vec<f32> = (0..64 * 32).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect(); // [64, 32]
//! let q = QuantMatrix::quantize(MatRef::row_major(&w, 64, 32)?, QuantFormat::Q8)?;
//! let x = vec![0.5f32; 32];
//! let mut y = vec![0f32; 64];
//! quant::cpu(MatRef::row_major(&x, 1, 32)?, &q, MatMut::row_major(&mut y, 1, 64)?, &Epilogue::default())?;
//! let exact: f32 = (0..32).map(|k| 0.5 * w[k]).sum();
//! assert!((y[0] - exact).abs() < 0.02);
//! # Ok::<(), mgm_kernels::Error>(())
//! ```

use half::f16;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::gemm::{self, Epilogue, GEMV_ROWS, MatMut, MatRef, PackedLhs, PackedRhs, Parallelism};

const KERNEL: &str = "quant";
/// Values per Q4 group and per activation block.
pub const GROUP: usize = 32;
/// Output rows per rayon task of the integer path.
const BAND: usize = 32;

fn param(msg: String) -> Error {
    Error::Param {
        kernel: KERNEL,
        msg,
    }
}

/// A weight-only quantization scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// int8 groups of 32 (q8_0), one f16 scale per group.
    Q8,
    /// 4-bit groups of 32 (q4_0), one f16 scale per group.
    Q4,
}

impl QuantFormat {
    /// `q8` / `q4`.
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Q8 => "q8",
            QuantFormat::Q4 => "q4",
        }
    }

    /// Parses `q8` / `q4`.
    pub fn parse(s: &str) -> Option<QuantFormat> {
        match s {
            "q8" => Some(QuantFormat::Q8),
            "q4" => Some(QuantFormat::Q4),
            _ => None,
        }
    }
}

/// Bytes a quantized matrix reads from: owned after quantizing, or a view of a memory-mapped
/// file (so a saved quantized model loads without a copy).
pub type Bytes = std::sync::Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A quantized `[n, k]` weight (`n` outputs of `k` inputs).
#[derive(Clone)]
pub struct QuantMatrix {
    format: QuantFormat,
    n: usize,
    k: usize,
    /// Q8: `[n, k]` int8 (two's complement bytes); Q4: `[n, groups * 16]` nibble pairs.
    data: Bytes,
    /// `[n, groups]` little-endian f16 scales, `groups = ceil(k / 32)`.
    scales: Bytes,
}

impl std::fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantMatrix")
            .field("format", &self.format)
            .field("n", &self.n)
            .field("k", &self.k)
            .finish()
    }
}

/// `round(x)` half away from zero, as `roundf`.
fn round(x: f32) -> f32 {
    x.round()
}

impl QuantMatrix {
    /// Quantizes a weight (`w` `[n, k]`, rows are outputs; any strides). Non-finite weights
    /// are an error.
    pub fn quantize(w: MatRef<'_>, format: QuantFormat) -> Result<QuantMatrix> {
        let (n, k) = (w.rows(), w.cols());
        let rows: Vec<Vec<f32>> = (0..n)
            .into_par_iter()
            .map(|i| (0..k).map(|j| w.get(i, j)).collect())
            .collect();
        if let Some((i, j)) = rows
            .iter()
            .enumerate()
            .find_map(|(i, r)| r.iter().position(|v| !v.is_finite()).map(|j| (i, j)))
        {
            return Err(param(format!(
                "weight ({i}, {j}) is {} (cannot be quantized)",
                rows[i][j]
            )));
        }
        let (data, scales): (Vec<Vec<u8>>, Vec<Vec<u8>>) = rows
            .par_iter()
            .map(|r| {
                let mut bytes = Vec::new();
                let mut ds = Vec::new();
                for g in r.chunks(GROUP) {
                    let d = match format {
                        QuantFormat::Q8 => {
                            let amax = g.iter().fold(0f32, |a, &v| a.max(v.abs()));
                            let d = f16::from_f32(amax / 127.0);
                            let df = d.to_f32();
                            let inv = if df != 0.0 { 1.0 / df } else { 0.0 };
                            bytes.extend(
                                g.iter()
                                    .map(|&v| (round(v * inv).clamp(-127.0, 127.0) as i8) as u8),
                            );
                            d
                        }
                        QuantFormat::Q4 => {
                            let wmax = g
                                .iter()
                                .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
                            let d = f16::from_f32(wmax / -8.0);
                            let df = d.to_f32();
                            let inv = if df != 0.0 { 1.0 / df } else { 0.0 };
                            let mut qv = [8u8; GROUP];
                            for (o, &v) in qv.iter_mut().zip(g) {
                                *o = (round(v * inv) + 8.0).clamp(0.0, 15.0) as u8;
                            }
                            for j in 0..GROUP / 2 {
                                bytes.push(qv[j] | (qv[j + GROUP / 2] << 4));
                            }
                            d
                        }
                    };
                    ds.extend(d.to_le_bytes());
                }
                (bytes, ds)
            })
            .unzip();
        Self::from_bytes(
            format,
            n,
            k,
            std::sync::Arc::new(data.concat()),
            std::sync::Arc::new(scales.concat()),
        )
    }

    /// A matrix over stored bytes (as [`QuantMatrix::data`] and [`QuantMatrix::scales`]
    /// return them): Q8 `[n, k]` data, Q4 `[n, groups * 16]` data, and `[n, groups]`
    /// little-endian f16 scales (`groups = ceil(k / 32)`).
    pub fn from_bytes(
        format: QuantFormat,
        n: usize,
        k: usize,
        data: Bytes,
        scales: Bytes,
    ) -> Result<QuantMatrix> {
        let groups = k.div_ceil(GROUP);
        let want_scales = n * groups * 2;
        let want_data = match format {
            QuantFormat::Q8 => n * k,
            QuantFormat::Q4 => n * groups * GROUP / 2,
        };
        let (got_data, got_scales) = ((*data).as_ref().len(), (*scales).as_ref().len());
        if got_data != want_data || got_scales != want_scales {
            return Err(param(format!(
                "{} [{n}, {k}] needs {want_data} data bytes and {want_scales} scale bytes, got \
                 {got_data} and {got_scales}",
                format.name()
            )));
        }
        Ok(QuantMatrix {
            format,
            n,
            k,
            data,
            scales,
        })
    }

    /// The quantized values (see [`QuantMatrix::from_bytes`] for the layout).
    pub fn data(&self) -> &[u8] {
        (*self.data).as_ref()
    }

    /// The `[n, groups]` scales as little-endian f16 bytes.
    pub fn scales(&self) -> &[u8] {
        (*self.scales).as_ref()
    }

    /// Groups per row.
    pub fn groups(&self) -> usize {
        self.k.div_ceil(GROUP)
    }

    /// Group `g`'s scale (groups numbered over the whole matrix, row-major).
    #[inline]
    fn group_scale(&self, g: usize) -> f32 {
        let b = &self.scales()[g * 2..g * 2 + 2];
        f16::from_le_bytes([b[0], b[1]]).to_f32()
    }

    /// The format.
    pub fn format(&self) -> QuantFormat {
        self.format
    }

    /// Output rows.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Inputs per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes of the quantized weight and its scales.
    pub fn bytes(&self) -> usize {
        self.data().len() + self.scales().len()
    }

    /// Weight `(i, j)` as the kernels see it.
    pub fn value(&self, i: usize, j: usize) -> f32 {
        match self.format {
            QuantFormat::Q8 => {
                f32::from(self.data()[i * self.k + j] as i8)
                    * self.group_scale(i * self.groups() + j / GROUP)
            }
            QuantFormat::Q4 => {
                let (g, p) = (j / GROUP, j % GROUP);
                let b = self.data()[(i * self.groups() + g) * GROUP / 2 + p % (GROUP / 2)];
                let q = if p < GROUP / 2 { b & 0x0F } else { b >> 4 };
                f32::from(q as i8 - 8) * self.group_scale(i * self.groups() + g)
            }
        }
    }

    /// The dequantized `[n, k]` weight, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        out.par_chunks_mut(self.k.max(1))
            .enumerate()
            .for_each(|(i, row)| {
                for (j, o) in row.iter_mut().enumerate() {
                    *o = self.value(i, j);
                }
            });
        out
    }
}

/// One activation row quantized in blocks of 32: int8 values (`k` padded with zeros to whole
/// blocks) and one scale per block.
struct QuantRow {
    q: Vec<i8>,
    s: Vec<f32>,
}

fn quantize_row(x: &[f32]) -> QuantRow {
    let blocks = x.len().div_ceil(GROUP);
    let mut q = vec![0i8; blocks * GROUP];
    let mut s = vec![0f32; blocks];
    for (b, chunk) in x.chunks(GROUP).enumerate() {
        let amax = chunk.iter().fold(0f32, |a, &v| a.max(v.abs()));
        let sc = amax / 127.0;
        let inv = if sc > 0.0 { 1.0 / sc } else { 0.0 };
        for (j, &v) in chunk.iter().enumerate() {
            q[b * GROUP + j] = round(v * inv).clamp(-127.0, 127.0) as i8;
        }
        s[b] = sc;
    }
    QuantRow { q, s }
}

/// Checks shapes; returns `(m, k, n)`.
fn check(
    x: &MatRef<'_>,
    w: &QuantMatrix,
    c: &MatMut<'_>,
    epi: &Epilogue<'_>,
) -> Result<(usize, usize, usize)> {
    let (m, k) = (x.rows(), x.cols());
    if k != w.k {
        return Err(param(format!(
            "inner dims differ: X is {m} x {k}, the weight {} x {}",
            w.n, w.k
        )));
    }
    if c.rows() != m || c.cols() != w.n {
        return Err(param(format!(
            "the output is {} x {}, the product {m} x {}",
            c.rows(),
            c.cols(),
            w.n
        )));
    }
    if epi.bias.is_some_and(|b| b.len() != w.n) {
        return Err(param(format!(
            "bias length differs from the {} outputs",
            w.n
        )));
    }
    Ok((m, k, w.n))
}

/// The f64 reference: `X W^T` with `W` dequantized and, for up to [`GEMV_ROWS`] rows, `X`
/// quantized in blocks of 32 exactly as [`cpu`] does; epilogue in f64.
pub fn reference(
    x: MatRef<'_>,
    w: &QuantMatrix,
    mut c: MatMut<'_>,
    epi: &Epilogue<'_>,
) -> Result<()> {
    let (m, k, n) = check(&x, w, &c, epi)?;
    let xs: Vec<Vec<f64>> = (0..m)
        .map(|i| {
            let row: Vec<f32> = (0..k).map(|j| x.get(i, j)).collect();
            if m <= GEMV_ROWS {
                let qr = quantize_row(&row);
                (0..k)
                    .map(|j| f64::from(qr.q[j]) * f64::from(qr.s[j / GROUP]))
                    .collect()
            } else {
                row.iter().map(|&v| f64::from(v)).collect()
            }
        })
        .collect();
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for jn in 0..n {
            let mut s: f64 = (0..k).map(|j| xs[i][j] * f64::from(w.value(jn, j))).sum();
            if epi.accumulate {
                s += f64::from(c.get(i, jn));
            }
            if let Some(b) = epi.bias {
                s += f64::from(b[jn]);
            }
            let mut y = epi.activation.reference_f64(s);
            if let Some(r) = &epi.residual {
                y += f64::from(r.get(i, jn));
            }
            out[i * n + jn] = y as f32;
        }
    }
    for i in 0..m {
        for jn in 0..n {
            c.set(i, jn, out[i * n + jn]);
        }
    }
    Ok(())
}

/// `C = epilogue(X W^T)` with a quantized weight: the integer path for up to [`GEMV_ROWS`]
/// rows of `X`, the dequantized packed GEMM above.
pub fn cpu(x: MatRef<'_>, w: &QuantMatrix, mut c: MatMut<'_>, epi: &Epilogue<'_>) -> Result<()> {
    let (m, k, n) = check(&x, w, &c, epi)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if m > GEMV_ROWS {
        let deq = w.dequantize();
        let wt = PackedRhs::new(MatRef::row_major(&deq, n, k)?.t());
        return gemm::cpu_packed(&PackedLhs::new(x), &wt, c, epi, Parallelism::Rayon);
    }
    let rows: Vec<QuantRow> = (0..m)
        .map(|i| quantize_row(&(0..k).map(|j| x.get(i, j)).collect::<Vec<_>>()))
        .collect();
    let vnni = vnni_available();
    let bands: Vec<usize> = (0..n).step_by(BAND).collect();
    let dots: Vec<Vec<f32>> = bands
        .par_iter()
        .map(|&j0| {
            let j1 = (j0 + BAND).min(n);
            let mut d = vec![0f32; m * (j1 - j0)];
            for jn in j0..j1 {
                for (i, r) in rows.iter().enumerate() {
                    d[i * (j1 - j0) + jn - j0] = row_dot(w, jn, r, vnni);
                }
            }
            d
        })
        .collect();
    for (bi, &j0) in bands.iter().enumerate() {
        let nb = (j0 + BAND).min(n) - j0;
        for i in 0..m {
            for q in 0..nb {
                let jn = j0 + q;
                let mut v = dots[bi][i * nb + q];
                if epi.accumulate {
                    v += c.get(i, jn);
                }
                if let Some(b) = epi.bias {
                    v += b[jn];
                }
                let mut y = epi.activation.apply(v);
                if let Some(r) = &epi.residual {
                    y += r.get(i, jn);
                }
                c.set(i, jn, y);
            }
        }
    }
    Ok(())
}

/// Whether the CPU has AVX-512 VNNI and BW (checked once).
fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The dot product of weight row `jn` with a quantized activation row.
fn row_dot(w: &QuantMatrix, jn: usize, x: &QuantRow, vnni: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if vnni {
        // SAFETY: vnni_available() detected AVX-512F, BW and VNNI; the row slices below have
        // the lengths the kernels read (k padded to whole blocks on the activation side, the
        // weight side read only within k, which for q4 is whole groups).
        return unsafe { avx512::row_dot(w, jn, x) };
    }
    row_dot_portable(w, jn, x)
}

fn row_dot_portable(w: &QuantMatrix, jn: usize, x: &QuantRow) -> f32 {
    let (k, groups) = (w.k, w.groups());
    let mut total = 0f32;
    for g in 0..groups {
        let len = GROUP.min(k - g * GROUP);
        let xb = &x.q[g * GROUP..g * GROUP + len];
        let d: i32 = match w.format {
            QuantFormat::Q8 => {
                let row = &w.data()[jn * k + g * GROUP..jn * k + g * GROUP + len];
                row.iter()
                    .zip(xb)
                    .map(|(&a, &q)| i32::from(a as i8) * i32::from(q))
                    .sum()
            }
            QuantFormat::Q4 => {
                let bytes = &w.data()[(jn * groups + g) * GROUP / 2..][..GROUP / 2];
                // values past the row's end pair with activation zeros (the row is padded)
                let xs = &x.q[g * GROUP..(g + 1) * GROUP];
                let mut d = 0i32;
                for (j, &byte) in bytes.iter().enumerate() {
                    d += (i32::from(byte & 0x0F) - 8) * i32::from(xs[j]);
                    d += (i32::from(byte >> 4) - 8) * i32::from(xs[j + GROUP / 2]);
                }
                d
            }
        };
        total += d as f32 * x.s[g] * w.group_scale(jn * groups + g);
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{GROUP, QuantFormat, QuantMatrix, QuantRow};

    /// `sum_l a_l b_l` over 64 signed bytes, in 16 int32 lanes (4 products each):
    /// `vpdpbusd(|a|, sign(a) b)` (`b` in [-127, 127], so the negation cannot overflow).
    #[inline(always)]
    unsafe fn dot64(a: __m512i, b: __m512i) -> __m512i {
        // SAFETY: register-only AVX-512 BW/VNNI arithmetic.
        unsafe {
            let neg = _mm512_movepi8_mask(a);
            let sb = _mm512_mask_sub_epi8(b, neg, _mm512_setzero_si512(), b);
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(a), sb)
        }
    }

    /// Per-lane scales for two blocks: lanes 0-7 `s0`, lanes 8-15 `s1`.
    #[inline(always)]
    unsafe fn two(s0: f32, s1: f32) -> __m512 {
        // SAFETY: register-only AVX-512F.
        unsafe { _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(s0), _mm512_set1_ps(s1)) }
    }

    /// # Safety
    /// The CPU has AVX-512F, BW, VL and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn row_dot(w: &QuantMatrix, jn: usize, x: &QuantRow) -> f32 {
        let (k, groups) = (w.k, w.groups());
        let base = jn * groups;
        // SAFETY: every load below stays inside the weight row (k bytes for q8, masked at the
        // tail; groups * 16 for q4) and the padded activation row (groups * 32 bytes).
        unsafe {
            let mut acc = _mm512_setzero_ps();
            let xq = x.q.as_ptr();
            let low = _mm256_set1_epi8(0x0F);
            let eight = _mm512_set1_epi8(8);
            let mut g = 0;
            while g < groups {
                let both = g + 1 < groups;
                let (a, mk) = match w.format {
                    QuantFormat::Q8 => {
                        let left = k - g * GROUP;
                        let mk: __mmask64 = if left >= 64 { !0 } else { (1u64 << left) - 1 };
                        let row = w.data().as_ptr().add(jn * k + g * GROUP);
                        (_mm512_maskz_loadu_epi8(mk, row.cast()), mk)
                    }
                    QuantFormat::Q4 => {
                        let row = w.data().as_ptr().add((base + g) * GROUP / 2);
                        let lanes: __mmask32 = if both { !0 } else { 0xFFFF };
                        let bytes = _mm256_maskz_loadu_epi8(lanes, row.cast());
                        let lo = _mm256_and_si256(bytes, low);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(bytes), low);
                        // [g0 lo, g1 lo | g0 hi, g1 hi] -> [g0 lo, g0 hi, g1 lo, g1 hi]
                        let z = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                        let z = _mm512_shuffle_i64x2::<0b11_01_10_00>(z, z);
                        let mk: __mmask64 = if both { !0 } else { (1u64 << 32) - 1 };
                        (_mm512_sub_epi8(z, eight), mk)
                    }
                };
                let xv = _mm512_maskz_loadu_epi8(mk, xq.add(g * GROUP).cast());
                let d = _mm512_cvtepi32_ps(dot64(a, xv));
                let s0 = x.s[g] * w.group_scale(base + g);
                let s1 = if both {
                    x.s[g + 1] * w.group_scale(base + g + 1)
                } else {
                    0.0
                };
                acc = _mm512_fmadd_ps(d, two(s0, s1), acc);
                g += 2;
            }
            _mm512_reduce_add_ps(acc)
        }
    }
}
