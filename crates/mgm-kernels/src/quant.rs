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
//! Activations multiply on integers like llama.cpp, for any number of rows: each row is
//! quantized to int8 in blocks of 32 (`s_x = max|x| / 127`), every block's integer dot product
//! runs on AVX-512 VNNI (`vpdpbusd`, 64 multiply-adds per instruction; a portable loop
//! elsewhere) and is scaled by `s_x s_w` in f32. The weights are read in place (a mapped file
//! works), once per call: each weight vector is loaded and unpacked once for a tile of
//! activation rows (four for q8, six for q4), and a single row (a decode step) streams the
//! weights through a kernel of its own. (A q8 prefill once took the f32 FMA GEMM on weights
//! dequantized a chunk at a time; after the integer kernels' call overhead went, the integer
//! path measured faster: 86-89 against 55 tokens/s for a 128-token prompt at TinyLlama's
//! shapes on a 2-core Zen 5.)
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
use crate::gemm::{Epilogue, MatMut, MatRef};
use crate::simd::{simd_call, simd_level, simd_variants};

const KERNEL: &str = "quant";

/// Values per Q4 group and per activation block.
pub const GROUP: usize = 32;
/// Weight bytes per rayon task of the integer path: tasks of a few µs each would spend a
/// large share of a decode step in scheduling.
const TASK_BYTES: usize = 256 << 10;

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

/// `round(x)` half away from zero, exactly as `roundf`, in a form that compiles to vector
/// instructions (`x - trunc(x)` is exact) instead of a libm call per value.
#[inline(always)]
fn round(x: f32) -> f32 {
    let t = x.trunc();
    if (x - t).abs() >= 0.5 {
        t + 1f32.copysign(x)
    } else {
        t
    }
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
        scale_at(self.scales(), g)
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
            .for_each(|(i, row)| dequantize_rows(self, i, 1, row));
        out
    }
}

/// Scale `g` of `[n, groups]` f16 scale bytes. Hot loops take `data()` / `scales()` once and
/// index them: each of those calls goes through the owner's `AsRef` (for a mapped tensor
/// several calls deep), which cost 9% of a q4 decode step when made per weight row.
#[inline(always)]
fn scale_at(scales: &[u8], g: usize) -> f32 {
    f16::from_le_bytes([scales[g * 2], scales[g * 2 + 1]]).to_f32()
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
    #[cfg(target_arch = "x86_64")]
    if simd_level() == crate::simd::Simd::Avx512 {
        // SAFETY: simd_level() detected AVX-512F.
        unsafe { avx512::quantize_into(x, &mut q, &mut s) };
        return QuantRow { q, s };
    }
    simd_call!(
        simd_level(),
        quantize_into,
        quantize_into_avx2,
        quantize_into_avx512(x, &mut q, &mut s)
    );
    QuantRow { q, s }
}

#[inline(always)]
fn quantize_into(x: &[f32], q: &mut [i8], s: &mut [f32]) {
    for ((chunk, qb), sb) in x.chunks(GROUP).zip(q.chunks_mut(GROUP)).zip(s.iter_mut()) {
        let amax = chunk.iter().fold(0f32, |a, &v| a.max(v.abs()));
        let sc = amax / 127.0;
        let inv = if sc > 0.0 { 1.0 / sc } else { 0.0 };
        for (o, &v) in qb.iter_mut().zip(chunk) {
            *o = round(v * inv).clamp(-127.0, 127.0) as i8;
        }
        *sb = sc;
    }
}

simd_variants!(quantize_into => quantize_into_avx2, quantize_into_avx512(
    x: &[f32], q: &mut [i8], s: &mut [f32]
));

/// Row `i` of `x` (borrowed when its columns are contiguous).
fn x_row<'a>(x: &'a MatRef<'_>, i: usize) -> std::borrow::Cow<'a, [f32]> {
    match x.row_slice(i) {
        Some(r) => std::borrow::Cow::Borrowed(r),
        None => std::borrow::Cow::Owned((0..x.cols()).map(|j| x.get(i, j)).collect()),
    }
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

/// The f64 reference: `X W^T` with `W` dequantized and `X` quantized in blocks of 32 exactly
/// as [`cpu`] does; epilogue in f64.
pub fn reference(
    x: MatRef<'_>,
    w: &QuantMatrix,
    mut c: MatMut<'_>,
    epi: &Epilogue<'_>,
) -> Result<()> {
    let (m, k, n) = check(&x, w, &c, epi)?;
    let xs: Vec<Vec<f64>> = (0..m)
        .map(|i| {
            let row = x_row(&x, i).into_owned();
            let qr = quantize_row(&row);
            (0..k)
                .map(|j| f64::from(qr.q[j]) * f64::from(qr.s[j / GROUP]))
                .collect()
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

/// `C = epilogue(X W^T)` with a quantized weight, on integers for any number of rows of `X`
/// (each row quantized in blocks of 32, as llama.cpp does for prefill and decode alike).
pub fn cpu(x: MatRef<'_>, w: &QuantMatrix, c: MatMut<'_>, epi: &Epilogue<'_>) -> Result<()> {
    run(x, &mut [(w, c, epi)], vnni())
}

/// One product of [`cpu_many`]: the weight, the output and its epilogue.
pub type Product<'a> = (&'a QuantMatrix, MatMut<'a>, &'a Epilogue<'a>);

/// [`cpu`] for several weights that read the same `X` (a transformer layer's q, k and v
/// projections, or its gate and up projections): `X` is quantized and laid out once, and all
/// the products share one parallel loop, so a decode step waits on one fork-join instead of
/// one per weight.
///
/// ```
/// use mgm_kernels::gemm::{Epilogue, MatMut, MatRef};
/// use mgm_kernels::quant::{self, QuantFormat, QuantMatrix};
/// let w: Vec<f32> = (0..8 * 64).map(|i| ((i % 13) as f32 - 6.0) / 6.0).collect();
/// let a = QuantMatrix::quantize(MatRef::row_major(&w, 8, 64)?, QuantFormat::Q8)?;
/// let b = QuantMatrix::quantize(MatRef::row_major(&w[..4 * 64], 4, 64)?, QuantFormat::Q4)?;
/// let x = vec![0.25f32; 64];
/// let (mut ya, mut yb) = (vec![0f32; 8], vec![0f32; 4]);
/// let e = Epilogue::default();
/// quant::cpu_many(MatRef::row_major(&x, 1, 64)?, &mut [
///     (&a, MatMut::row_major(&mut ya, 1, 8)?, &e),
///     (&b, MatMut::row_major(&mut yb, 1, 4)?, &e),
/// ])?;
/// let mut y1 = vec![0f32; 4];
/// quant::cpu(MatRef::row_major(&x, 1, 64)?, &b, MatMut::row_major(&mut y1, 1, 4)?, &e)?;
/// assert_eq!(yb, y1);
/// # Ok::<(), mgm_kernels::Error>(())
/// ```
pub fn cpu_many(x: MatRef<'_>, products: &mut [Product<'_>]) -> Result<()> {
    run(x, products, vnni())
}

/// [`cpu`] on the path of CPUs without AVX-512 VNNI: the portable integer loop (public so that
/// tests on any machine cover it).
pub fn cpu_portable(
    x: MatRef<'_>,
    w: &QuantMatrix,
    c: MatMut<'_>,
    epi: &Epilogue<'_>,
) -> Result<()> {
    run(x, &mut [(w, c, epi)], false)
}

/// Whether the AVX-512 VNNI kernels run here.
fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    return vnni_available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A task of [`run`]: rows `j0..j1` of product `p`.
struct Band {
    p: usize,
    j0: usize,
    j1: usize,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn run(x: MatRef<'_>, products: &mut [Product<'_>], vnni: bool) -> Result<()> {
    for (w, c, epi) in products.iter() {
        check(&x, w, c, epi)?;
    }
    let (m, k) = (x.rows(), x.cols());
    if m == 0 || products.is_empty() {
        return Ok(());
    }
    let rows: Vec<QuantRow> = (0..m)
        .into_par_iter()
        .map(|i| quantize_row(&x_row(&x, i)))
        .collect();
    // the activations in the kernel's layout, once per format the weights use
    #[cfg(target_arch = "x86_64")]
    let prepared: Vec<(QuantFormat, avx512::Prepared)> = if vnni {
        let mut formats: Vec<QuantFormat> = products.iter().map(|p| p.0.format).collect();
        formats.sort_by_key(|f| f.name());
        formats.dedup();
        formats
            .into_iter()
            // SAFETY: vnni_available() detected AVX-512F, BW, VL and VNNI.
            .map(|f| (f, unsafe { avx512::Prepared::new(&rows, f) }))
            .collect()
    } else {
        Vec::new()
    };
    let threads = rayon::current_num_threads();
    let mut bands = Vec::new();
    for (p, (w, _, _)) in products.iter().enumerate() {
        let n = w.n;
        let row_bytes = w.bytes() / n.max(1);
        let per_thread = n.div_ceil(4 * threads).max(1);
        let band_rows = (TASK_BYTES / row_bytes.max(1))
            .clamp(8, 1024)
            .min(per_thread);
        bands.extend((0..n).step_by(band_rows).map(|j0| Band {
            p,
            j0,
            j1: (j0 + band_rows).min(n),
        }));
    }
    let work: usize = products.iter().map(|p| p.0.n * m * k).sum();
    let weights: Vec<&QuantMatrix> = products.iter().map(|p| p.0).collect();
    let band = |b: &Band| {
        let w = weights[b.p];
        let nb = b.j1 - b.j0;
        let mut d = vec![0f32; m * nb];
        #[cfg(target_arch = "x86_64")]
        if let Some((_, p)) = prepared.iter().find(|(f, _)| *f == w.format) {
            // SAFETY: vnni_available() detected AVX-512F, BW, VL and VNNI; `p` was laid out
            // for this weight's format, padded to whole blocks as the kernel reads them.
            unsafe { avx512::band(w, b.j0, b.j1, p, &mut d) };
            return d;
        }
        for jn in b.j0..b.j1 {
            for (i, r) in rows.iter().enumerate() {
                d[i * nb + jn - b.j0] = row_dot_portable(w, jn, r);
            }
        }
        d
    };
    let dots: Vec<Vec<f32>> = if work >= 1 << 16 {
        bands.par_iter().map(band).collect()
    } else {
        bands.iter().map(band).collect()
    };
    for (b, d) in bands.iter().zip(&dots) {
        let (_, c, epi) = &mut products[b.p];
        c.store_band(b.j0, b.j1 - b.j0, d, epi);
    }
    Ok(())
}

/// Rows `j0..j0 + nb` of `w` as f32 (exactly [`QuantMatrix::value`]), row-major into `out`.
#[inline(always)]
fn dequantize_rows(w: &QuantMatrix, j0: usize, nb: usize, out: &mut [f32]) {
    let (k, groups) = (w.k, w.groups());
    let (data, scales) = (w.data(), w.scales());
    for (r, o) in out.chunks_exact_mut(k).take(nb).enumerate() {
        let row = j0 + r;
        for (g, og) in o.chunks_mut(GROUP).enumerate() {
            let s = scale_at(scales, row * groups + g);
            match w.format {
                QuantFormat::Q8 => {
                    let q = &data[row * k + g * GROUP..][..og.len()];
                    for (v, &b) in og.iter_mut().zip(q) {
                        *v = f32::from(b as i8) * s;
                    }
                }
                QuantFormat::Q4 => {
                    let q = &data[(row * groups + g) * GROUP / 2..][..GROUP / 2];
                    let (lo, hi) = og.split_at_mut(og.len().min(GROUP / 2));
                    for (v, &b) in lo.iter_mut().zip(q) {
                        *v = f32::from((b & 0x0F) as i8 - 8) * s;
                    }
                    for (v, &b) in hi.iter_mut().zip(q) {
                        *v = f32::from((b >> 4) as i8 - 8) * s;
                    }
                }
            }
        }
    }
}

/// Whether the CPU has AVX-512 VNNI and BW (checked once).
#[cfg(target_arch = "x86_64")]
fn vnni_available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    })
}

fn row_dot_portable(w: &QuantMatrix, jn: usize, x: &QuantRow) -> f32 {
    let (k, groups) = (w.k, w.groups());
    let (data, scales) = (w.data(), w.scales());
    let mut total = 0f32;
    for g in 0..groups {
        let len = GROUP.min(k - g * GROUP);
        let xb = &x.q[g * GROUP..g * GROUP + len];
        let d: i32 = match w.format {
            QuantFormat::Q8 => {
                let row = &data[jn * k + g * GROUP..jn * k + g * GROUP + len];
                row.iter()
                    .zip(xb)
                    .map(|(&a, &q)| i32::from(a as i8) * i32::from(q))
                    .sum()
            }
            QuantFormat::Q4 => {
                let bytes = &data[(jn * groups + g) * GROUP / 2..][..GROUP / 2];
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
        total += d as f32 * x.s[g] * scale_at(scales, jn * groups + g);
    }
    total
}

/// The AVX-512 VNNI kernel. `vpdpbusd` multiplies unsigned by signed bytes, so the weights
/// are made unsigned: q8 bytes `w ^ 0x80 = w + 128`, q4 nibbles `q = w + 8` as stored, and
/// the excess `off * sum(x)` (per 4-byte lane, off = 128 or 8) is subtracted exactly by
/// starting each lane's accumulator at `-off * sum(x)` of that lane. The activation side
/// (bytes, those start values and per-lane scales) is laid out once per call in blocks that
/// match one step over the weights: for q8 four groups (128 weight bytes, shuffled so that
/// each of the two vectors holds 16 values of every group, 4 lanes a group); for q4 eight
/// groups (128 weight bytes: the low and high nibbles of two shuffled vectors make four
/// vectors of 2 lanes a group). All products of a block add into one accumulator before its
/// one conversion to f32.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{GROUP, QuantFormat, QuantMatrix, QuantRow};

    /// How far ahead of the weight loads to prefetch, in bytes.
    const PREFETCH: usize = 4096;

    /// Groups per block of the kernels: q8 four (128 weights, two 64-byte vectors a weight
    /// row), q4 eight (256 weights, the two 64-byte vectors of packed nibbles). Each lane of
    /// an integer dot stays inside one group, so a block takes one conversion to f32 and two
    /// scalings per dot: at four q4 groups those were 3 of every 5 vector ops of a prefill
    /// tile, at eight 3 of 7.
    fn per_block(format: QuantFormat) -> usize {
        match format {
            QuantFormat::Q8 => Q8_GROUPS,
            QuantFormat::Q4 => Q4_GROUPS,
        }
    }

    /// Groups per q8 block.
    const Q8_GROUPS: usize = 4;
    /// Groups per q4 block.
    const Q4_GROUPS: usize = 8;

    /// Where value `j` of group `local` of a block meets its weight, as a byte offset into the
    /// entry's activation vectors. q8: values 0..16 of every group in the first vector, 16..32
    /// in the second (a q8 block's halves after [`q8_lanes`]). q4: four vectors, lane `2l`,
    /// `2l + 1` of each in group `l`: values 0..8 (low nibbles of the group's bytes 0..8),
    /// 16..24 (their high nibbles), 8..16 and 24..32 (those of bytes 8..16; see [`q4_lanes`]).
    fn activation_slot(format: QuantFormat, local: usize, j: usize) -> usize {
        match format {
            QuantFormat::Q8 => (j / 16) * 64 + local * 16 + j % 16,
            QuantFormat::Q4 => [0, 2, 1, 3][j / 8] * 64 + local * 8 + j % 8,
        }
    }

    /// The activation rows in the kernel's layout, one buffer: entry `(block b, row r)` at
    /// `(b * m + r) * stride` bytes holds the row's int8 activations for that block
    /// ([`per_block`] groups, placed by [`activation_slot`]), then 16 i32 accumulator start
    /// values `-off * (sum of the lane's bytes)`, then 16 f32 per-lane activation scales. The
    /// rows of one block are adjacent, so a kernel reaches all of its rows from one pointer at
    /// constant offsets.
    pub(super) struct Prepared {
        buf: Vec<__m512i>,
        m: usize,
        blocks: usize,
        /// Bytes per entry.
        stride: usize,
    }

    impl Prepared {
        /// # Safety
        /// The CPU has AVX-512F, BW, VL and VNNI.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
        pub(super) unsafe fn new(rows: &[QuantRow], format: QuantFormat) -> Prepared {
            let m = rows.len();
            let groups = rows.first().map_or(0, |r| r.s.len());
            let per_block = per_block(format);
            // values of a group that stay in order in the layout (see activation_slot)
            let run = match format {
                QuantFormat::Q8 => 16,
                QuantFormat::Q4 => 8,
            };
            let blocks = groups.div_ceil(per_block);
            let xb = per_block * GROUP; // activation bytes per entry
            let stride = xb + 128;
            let lanes_per_group = 16 / per_block;
            let off = match format {
                QuantFormat::Q8 => 128,
                QuantFormat::Q4 => 8,
            };
            // 64-byte aligned storage (stride is a multiple of 64), filled as bytes
            let mut buf = vec![_mm512_setzero_si512_portable(); blocks * m * stride / 64];
            // SAFETY: the vectors are plain bytes with no invalid bit patterns; the slice
            // covers exactly the vector buffer and is the only view of it while it lives.
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), blocks * m * stride)
            };
            for (ri, r) in rows.iter().enumerate() {
                for b in 0..blocks {
                    let e = &mut bytes[(b * m + ri) * stride..(b * m + ri + 1) * stride];
                    let (x, rest) = e.split_at_mut(xb);
                    for local in 0..per_block {
                        let g = b * per_block + local;
                        if g >= groups {
                            continue;
                        }
                        let src = &r.q[g * GROUP..(g + 1) * GROUP];
                        for (c, chunk) in src.chunks_exact(run).enumerate() {
                            let at = activation_slot(format, local, c * run);
                            for (o, &v) in x[at..at + run].iter_mut().zip(chunk) {
                                *o = v as u8;
                            }
                        }
                    }
                    // each lane's sum of its (signed) bytes: a multiply-add with unsigned ones
                    // SAFETY: x holds xb bytes (a multiple of 64) and rest 128.
                    unsafe {
                        let mut sum = _mm512_setzero_si512();
                        for h in 0..xb / 64 {
                            let v = _mm512_loadu_si512(x.as_ptr().add(h * 64).cast());
                            sum = _mm512_dpbusd_epi32(sum, _mm512_set1_epi8(1), v);
                        }
                        let start = _mm512_mullo_epi32(sum, _mm512_set1_epi32(-off));
                        _mm512_storeu_si512(rest.as_mut_ptr().cast(), start);
                    }
                    for lane in 0..16 {
                        let g = b * per_block + lane / lanes_per_group;
                        let sx = if g < groups { r.s[g] } else { 0.0 };
                        rest[64 + lane * 4..64 + lane * 4 + 4].copy_from_slice(&sx.to_le_bytes());
                    }
                }
            }
            Prepared {
                buf,
                m,
                blocks,
                stride,
            }
        }

        /// Entry `(b, r)`.
        #[inline(always)]
        fn at(&self, b: usize, r: usize) -> *const u8 {
            self.buf
                .as_ptr()
                .cast::<u8>()
                .wrapping_add((b * self.m + r) * self.stride)
        }
    }

    /// [`super::quantize_into`] (blocks of 32, `s = max|x| / 127`, `q = round(x / s)` half
    /// away from zero) with explicit vectors, bit for bit on finite inputs (a NaN's block
    /// differs; its products are NaN either way): the autovectorized loop took a quarter of a
    /// small decode matmul. It supersedes the `quantize_into_avx512` variant on AVX-512.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `q` has `x.len()` rounded up to whole blocks and `s` a scale per
    /// block.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn quantize_into(x: &[f32], q: &mut [i8], s: &mut [f32]) {
        let whole = x.len() / GROUP;
        // SAFETY: block b reads x[32 b..32 b + 32] and writes q[32 b..32 b + 32], b < whole.
        unsafe {
            let half = _mm512_set1_ps(0.5);
            let one = _mm512_set1_ps(1.0);
            let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
            for (b, sb) in s.iter_mut().enumerate().take(whole) {
                let p = x.as_ptr().add(b * GROUP);
                let v = [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))];
                let amax =
                    _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
                let sc = amax / 127.0;
                let inv = _mm512_set1_ps(if sc > 0.0 { 1.0 / sc } else { 0.0 });
                for (h, &vh) in v.iter().enumerate() {
                    let y = _mm512_mul_ps(vh, inv);
                    let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
                    let away =
                        _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_abs_ps(_mm512_sub_ps(y, t)), half);
                    // t + copysign(1, y) where the fraction is at least a half, in integer
                    // ops: `_mm512_or_ps` needs AVX-512DQ and was not inlined here (a call
                    // per vector, a third of quantizing a decode step's activations)
                    let sign =
                        _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32(i32::MIN));
                    let unit = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(one), sign));
                    let r = _mm512_mask_add_ps(t, away, t, unit);
                    let r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
                    let bytes = _mm512_cvtsepi32_epi8(_mm512_cvttps_epi32(r));
                    _mm_storeu_si128(q.as_mut_ptr().add(b * GROUP + h * 16).cast(), bytes);
                }
                *sb = sc;
            }
        }
        let done = whole * GROUP;
        super::quantize_into(&x[done..], &mut q[done..], &mut s[whole..]);
    }

    /// A zero vector without target features (for the buffer's initial value).
    fn _mm512_setzero_si512_portable() -> __m512i {
        // SAFETY: an all-zero bit pattern is a valid __m512i.
        unsafe { std::mem::zeroed() }
    }

    /// Most activation rows per weight-vector load.
    const R: usize = 8;

    /// A weight's bytes, looked up once per band (see `scale_at`).
    struct Weights {
        format: QuantFormat,
        k: usize,
        groups: usize,
        data: *const u8,
        scales: *const u16,
    }

    /// Dot products of weight rows `j0..j1` with every prepared row, into
    /// `d[i * (j1 - j0) + j - j0]`.
    ///
    /// # Safety
    /// The CPU has AVX-512F, BW, VL and VNNI; `rows` was built for `w`'s format and `k`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn band(
        w: &QuantMatrix,
        j0: usize,
        j1: usize,
        rows: &Prepared,
        d: &mut [f32],
    ) {
        let w = &Weights {
            format: w.format,
            k: w.k,
            groups: w.groups(),
            data: w.data().as_ptr(),
            scales: w.scales().as_ptr().cast::<u16>(),
        };
        // one activation row (a decode step) streams the weights; from 8 rows on, tiles of
        // TW weight rows x TN activation rows, sized so that accumulators and the weight
        // vectors stay in the 32 registers (q4 holds five vectors a weight row, q8 three;
        // at 4 x 4 the q4 tile spilled its accumulators every block)
        // SAFETY: as this function's contract.
        unsafe {
            match w.format {
                QuantFormat::Q8 if rows.m == 1 => band_one_row::<false>(w, j0, j1, rows, d),
                QuantFormat::Q4 if rows.m == 1 => band_one_row::<true>(w, j0, j1, rows, d),
                QuantFormat::Q8 => band_tiles::<4, 4>(w, j0, j1, rows, d),
                QuantFormat::Q4 => band_tiles::<2, 6>(w, j0, j1, rows, d),
            }
        }
    }

    /// A decode step's band: one activation row against weight rows `j0..j1`, one weight row
    /// at a time (a single sequential stream per core: four rows at once, four streams, ran
    /// q4 decode at 22-24 against 31-38 tokens/s from DRAM on a 2-core Zen 5), two blocks
    /// per pass into two accumulators so that consecutive blocks' dot chains overlap, and the
    /// weights prefetched into L2 ([`PREFETCH`] ahead, `prefetcht1`): into L1 (`prefetcht0`)
    /// the same kernel decoded q4 at 33-35 tokens/s, into L2 at 41-44 (2-core Zen 4, A/B
    /// alternated), as each L1 prefetch holds one of the core's few L1 miss buffers until
    /// its line arrives.
    ///
    /// # Safety
    /// As [`band`]; `rows` holds one row.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn band_one_row<const Q4: bool>(
        w: &Weights,
        j0: usize,
        j1: usize,
        rows: &Prepared,
        d: &mut [f32],
    ) {
        let groups = w.groups;
        let p = if Q4 { Q4_GROUPS } else { Q8_GROUPS };
        let full = groups / p;
        let (x0, stride) = (rows.at(0, 0), rows.stride);
        // SAFETY: blocks 0..full of every weight row j0..j1 are whole (the short last one
        // goes to row_dots_from, which masks its loads); the prepared row has `blocks`
        // entries of `stride` bytes.
        unsafe {
            let block = |jn: usize, b: usize, acc: __m512| {
                let e = x0.add(b * stride);
                if Q4 {
                    q4_block(w, jn, b, e, acc)
                } else {
                    q8_block(w, jn, b, e, acc)
                }
            };
            for jn in j0..j1 {
                let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                let mut b = 0;
                while b + 2 <= full {
                    a0 = block(jn, b, a0);
                    a1 = block(jn, b + 1, a1);
                    b += 2;
                }
                if b < full {
                    a0 = block(jn, b, a0);
                }
                let mut total = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
                if !groups.is_multiple_of(p) {
                    total += row_dots_from::<1, 1>(w, jn, rows, 0, full)[0][0];
                }
                d[jn - j0] = total;
            }
        }
    }

    /// Prefetches the weight bytes [`PREFETCH`] after `at` (two lines) into L2.
    #[inline(always)]
    unsafe fn prefetch_l2(at: *const u8) {
        // SAFETY: prefetches never fault.
        unsafe {
            _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(PREFETCH).cast());
            _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(PREFETCH + 64).cast());
        }
    }

    /// `acc` plus the whole q8 block `b` (four groups) of weight row `jn` against the
    /// prepared entry at `e`, per lane.
    ///
    /// # Safety
    /// AVX-512F/BW/VNNI and F16C; block `b` of row `jn` is whole; `e` is its entry.
    #[inline(always)]
    unsafe fn q8_block(w: &Weights, jn: usize, b: usize, e: *const u8, acc: __m512) -> __m512 {
        // SAFETY: as this function's contract.
        unsafe {
            let g = b * Q8_GROUPS;
            let at = w.data.add(jn * w.k + g * GROUP);
            prefetch_l2(at);
            let [lo, hi] = q8_lanes(
                _mm512_loadu_si512(at.cast()),
                _mm512_loadu_si512(at.add(64).cast()),
            );
            let st = _mm512_load_si512(e.add(128).cast());
            let dot = _mm512_dpbusd_epi32(st, lo, _mm512_load_si512(e.cast()));
            let dot = _mm512_dpbusd_epi32(dot, hi, _mm512_load_si512(e.add(64).cast()));
            let sw = block_scales::<Q8_GROUPS>(w.scales, jn * w.groups, g, Q8_GROUPS);
            scaled(acc, dot, _mm512_load_ps(e.add(192).cast()), sw)
        }
    }

    /// `acc` plus the whole q4 block `b` (eight groups) of weight row `jn` against the
    /// prepared entry at `e`, per lane: two chains of two dots each, added.
    ///
    /// # Safety
    /// AVX-512F/BW/VNNI and F16C; block `b` of row `jn` is whole; `e` is its entry.
    #[inline(always)]
    unsafe fn q4_block(w: &Weights, jn: usize, b: usize, e: *const u8, acc: __m512) -> __m512 {
        // SAFETY: as this function's contract.
        unsafe {
            let (srow, g) = (jn * w.groups, b * Q4_GROUPS);
            let at = w.data.add((srow + g) * GROUP / 2);
            prefetch_l2(at);
            let wv = q4_lanes(
                _mm512_loadu_si512(at.cast()),
                _mm512_loadu_si512(at.add(64).cast()),
            );
            let x = |v: usize| _mm512_load_si512(e.add(64 * v).cast());
            let a = _mm512_dpbusd_epi32(_mm512_load_si512(e.add(256).cast()), wv[0], x(0));
            let a = _mm512_dpbusd_epi32(a, wv[1], x(1));
            let c = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[2], x(2));
            let c = _mm512_dpbusd_epi32(c, wv[3], x(3));
            let sw = block_scales::<Q4_GROUPS>(w.scales, srow, g, Q4_GROUPS);
            let sx = _mm512_load_ps(e.add(320).cast());
            scaled(acc, _mm512_add_epi32(a, c), sx, sw)
        }
    }

    /// [`band`] with prefill tiles of `TW` weight rows by `TN` activation rows.
    ///
    /// # Safety
    /// As [`band`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn band_tiles<const TW: usize, const TN: usize>(
        w: &Weights,
        j0: usize,
        j1: usize,
        rows: &Prepared,
        d: &mut [f32],
    ) {
        let nb = j1 - j0;
        let mut jn = j0;
        while jn < j1 {
            // TW weight rows at a time when rows enough share them (prefill); a few rows
            // (batched decode) read one weight row at a time, as band_one_row does
            let tiled = rows.m >= R && jn + TW <= j1;
            let mut i = 0;
            while i < rows.m {
                let tile = tiled && rows.m - i >= TN;
                // TW x TN tiles, single rows against TW weight rows, or on the last weight
                // rows chunks of 8, 4, 2, 1 rows
                let r = if tile {
                    TN
                } else if tiled {
                    1
                } else {
                    [8, 4, 2, 1]
                        .into_iter()
                        .find(|&c| c <= rows.m - i)
                        .unwrap_or(1)
                };
                // SAFETY: as this function's contract; rows i..i + r and weight rows
                // jn..jn + TW (jn alone when not `tiled`) exist.
                unsafe {
                    if tile {
                        let v = row_dots::<TW, TN>(w, jn, rows, i);
                        for (o, vr) in v.iter().enumerate() {
                            for q in 0..r {
                                d[(i + q) * nb + jn + o - j0] = vr[q];
                            }
                        }
                    } else if tiled {
                        let v = row_dots::<TW, 1>(w, jn, rows, i);
                        for (o, vr) in v.iter().enumerate() {
                            d[i * nb + jn + o - j0] = vr[0];
                        }
                    } else {
                        let v = match r {
                            8 => row_dots::<1, 8>(w, jn, rows, i)[0],
                            4 => pad(row_dots::<1, 4>(w, jn, rows, i)[0]),
                            2 => pad(row_dots::<1, 2>(w, jn, rows, i)[0]),
                            _ => pad(row_dots::<1, 1>(w, jn, rows, i)[0]),
                        };
                        for q in 0..r {
                            d[(i + q) * nb + jn - j0] = v[q];
                        }
                    }
                }
                i += r;
            }
            jn += if tiled { TW } else { 1 };
        }
    }

    fn pad<const N: usize>(v: [f32; N]) -> [f32; R] {
        let mut o = [0f32; R];
        o[..N].copy_from_slice(&v);
        o
    }

    /// Weight rows `jn..jn + W` against the `N` prepared rows from `i0`: each weight vector
    /// is loaded and made unsigned once for all `N` rows, and each activation entry loaded once
    /// for all `W` weight rows (decode runs W = 1, N = 1).
    ///
    /// # Safety
    /// As [`band`]; weight rows `jn..jn + W` and prepared rows `i0..i0 + N` exist.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn row_dots<const W: usize, const N: usize>(
        w: &Weights,
        jn: usize,
        rows: &Prepared,
        i0: usize,
    ) -> [[f32; N]; W] {
        // SAFETY: as this function's contract.
        unsafe { row_dots_from::<W, N>(w, jn, rows, i0, 0) }
    }

    /// [`row_dots`] over the blocks from `b0` on.
    ///
    /// # Safety
    /// As [`row_dots`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn row_dots_from<const W: usize, const N: usize>(
        w: &Weights,
        jn: usize,
        rows: &Prepared,
        i0: usize,
        b0: usize,
    ) -> [[f32; N]; W] {
        // SAFETY: as this function's contract.
        unsafe {
            match w.format {
                QuantFormat::Q8 => row_dots_q8::<W, N>(w, jn, rows, i0, b0),
                QuantFormat::Q4 => row_dots_q4::<W, N>(w, jn, rows, i0, b0),
            }
        }
    }

    /// A q8 block's two 64-byte halves (groups 0-1 and 2-3, in storage order) rearranged
    /// so that lane `4g + i` of each holds group `g` (values 0..16 of every group in the
    /// first vector, 16..32 in the second) and made unsigned (`+128`) for `vpdpbusd`.
    #[inline(always)]
    unsafe fn q8_lanes(v0: __m512i, v1: __m512i) -> [__m512i; 2] {
        // SAFETY: register-only AVX-512F shuffles (the caller runs with AVX-512F).
        unsafe {
            let flip = _mm512_set1_epi8(-128);
            [
                _mm512_xor_si512(_mm512_shuffle_i64x2::<0x88>(v0, v1), flip),
                _mm512_xor_si512(_mm512_shuffle_i64x2::<0xDD>(v0, v1), flip),
            ]
        }
    }

    /// `acc + (dot as f32) * sx * sw`, lane by lane: one block's integer dot scaled by the
    /// activation's and the weight's per-lane scales.
    #[inline(always)]
    unsafe fn scaled(acc: __m512, dot: __m512i, sx: __m512, sw: __m512) -> __m512 {
        // SAFETY: register-only AVX-512F arithmetic (the caller runs with AVX-512F).
        unsafe { _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), sx), sw, acc) }
    }

    /// The f16 scales of groups `g..g + here` of the weight row whose groups start at `srow`,
    /// as f32 spread over the lanes of their groups: `P` groups a block (4 or 8), `16 / P`
    /// lanes each.
    ///
    /// # Safety
    /// AVX-512F and F16C; `here <= P`; scales `srow + g..srow + g + here` exist.
    #[inline(always)]
    unsafe fn block_scales<const P: usize>(
        scales: *const u16,
        srow: usize,
        g: usize,
        here: usize,
    ) -> __m512 {
        // SAFETY: as this function's contract; only `here` scales are read.
        unsafe {
            let at = scales.add(srow + g);
            let h = if here == P && P == 8 {
                _mm_loadu_si128(at.cast())
            } else if here == P {
                _mm_loadl_epi64(at.cast())
            } else {
                _mm_maskz_loadu_epi16((1u8 << here) - 1, at.cast())
            };
            let f = _mm512_castps256_ps512(_mm256_cvtph_ps(h));
            let idx = if P == 8 {
                _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7)
            } else {
                _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
            };
            _mm512_permutexvar_ps(idx, f)
        }
    }

    /// Weight rows' blocks of 128 int8 (four groups): two unsigned (`+128`) vectors in
    /// [`q8_lanes`] order and two dots per entry, as the q4 kernel does; one group pair per
    /// 64-byte dot took 60% more instructions per weight and ran q8 prefill 30-40% below q4.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[allow(clippy::needless_range_loop)] // q indexes the accumulators of every weight row
    unsafe fn row_dots_q8<const W: usize, const N: usize>(
        w: &Weights,
        jn: usize,
        rows: &Prepared,
        i0: usize,
        b0: usize,
    ) -> [[f32; N]; W] {
        let (k, groups) = (w.k, w.groups);
        let blocks = rows.blocks;
        let (data, scales) = (w.data, w.scales);
        // SAFETY: loads stay inside the weight rows (k bytes each, a short last block
        // masked), inside their scales (a short last block reads only its groups') and inside
        // the prepared rows (entries of rows i0..i0 + N, 64-byte aligned).
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); N]; W];
            let load = |at: *const u8, left: usize| {
                if left >= 64 {
                    _mm512_loadu_si512(at.cast())
                } else {
                    _mm512_maskz_loadu_epi8((1u64 << left) - 1, at.cast())
                }
            };
            for b in b0..blocks {
                let g = Q8_GROUPS * b;
                let here = (groups - g).min(Q8_GROUPS);
                let left = k - g * GROUP;
                let mut lo = [_mm512_setzero_si512(); W];
                let mut hi = [_mm512_setzero_si512(); W];
                let mut sw = [_mm512_setzero_ps(); W];
                for r in 0..W {
                    let at = data.add((jn + r) * k + g * GROUP);
                    // one stream per core does not keep the memory busy on its own
                    _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(PREFETCH).cast());
                    _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(PREFETCH + 64).cast());
                    let v0 = load(at, left);
                    let v1 = if left > 64 {
                        load(at.add(64), left - 64)
                    } else {
                        _mm512_setzero_si512()
                    };
                    [lo[r], hi[r]] = q8_lanes(v0, v1);
                    sw[r] = block_scales::<Q8_GROUPS>(scales, (jn + r) * groups, g, here);
                }
                let base = rows.at(b, i0);
                for q in 0..N {
                    let e = base.add(q * rows.stride);
                    let xl = _mm512_load_si512(e.cast());
                    let xh = _mm512_load_si512(e.add(64).cast());
                    let st = _mm512_load_si512(e.add(128).cast());
                    let sx = _mm512_load_ps(e.add(192).cast());
                    for r in 0..W {
                        let dot = _mm512_dpbusd_epi32(st, lo[r], xl);
                        let dot = _mm512_dpbusd_epi32(dot, hi[r], xh);
                        acc[r][q] = scaled(acc[r][q], dot, sx, sw[r]);
                    }
                }
            }
            std::array::from_fn(|r| std::array::from_fn(|q| _mm512_reduce_add_ps(acc[r][q])))
        }
    }

    /// A q4 block's two 64-byte vectors (groups 0-3 and 4-7, 16 bytes each, in storage
    /// order) as four vectors of nibbles with every lane in one group: bytes `8g..8g + 8` of
    /// `p` hold bytes 0..8 of group `g` and those of `q` its bytes 8..16 (two shuffles), then
    /// the low and high nibbles of `p` and of `q` (values 0..8, 16..24, 8..16, 24..32).
    #[inline(always)]
    unsafe fn q4_lanes(v0: __m512i, v1: __m512i) -> [__m512i; 4] {
        // SAFETY: register-only AVX-512F/BW ops (the caller runs with them).
        unsafe {
            let even = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
            let odd = _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15);
            let p = _mm512_permutex2var_epi64(v0, even, v1);
            let q = _mm512_permutex2var_epi64(v0, odd, v1);
            let low = _mm512_set1_epi8(0x0F);
            [
                _mm512_and_si512(p, low),
                _mm512_and_si512(_mm512_srli_epi16::<4>(p), low),
                _mm512_and_si512(q, low),
                _mm512_and_si512(_mm512_srli_epi16::<4>(q), low),
            ]
        }
    }

    /// Weight rows' blocks of 256 nibbles (eight groups): [`q4_lanes`], then the low and
    /// high nibbles of both halves, four dots per entry into one set of lanes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[allow(clippy::needless_range_loop)] // q indexes the accumulators of every weight row
    unsafe fn row_dots_q4<const W: usize, const N: usize>(
        w: &Weights,
        jn: usize,
        rows: &Prepared,
        i0: usize,
        b0: usize,
    ) -> [[f32; N]; W] {
        const P: usize = Q4_GROUPS;
        let groups = w.groups;
        let blocks = rows.blocks;
        let (data, scales) = (w.data, w.scales);
        // SAFETY: loads stay inside the weight rows (groups * 16 bytes each, a short last
        // block masked), inside their scales (a short last block reads only its groups') and
        // inside the prepared rows (entries of rows i0..i0 + N, 64-byte aligned).
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); N]; W];
            let masked = |at: *const u8, bytes: usize| {
                _mm512_maskz_loadu_epi8(u64::MAX >> (64 - bytes), at.cast())
            };
            for b in b0..blocks {
                let g = P * b;
                let here = (groups - g).min(P);
                let mut wv = [[_mm512_setzero_si512(); 4]; W];
                let mut sw = [_mm512_setzero_ps(); W];
                for r in 0..W {
                    let srow = (jn + r) * groups;
                    let at = data.add((srow + g) * GROUP / 2);
                    _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(PREFETCH).cast());
                    _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(PREFETCH + 64).cast());
                    let (v0, v1) = if here == P {
                        (
                            _mm512_loadu_si512(at.cast()),
                            _mm512_loadu_si512(at.add(64).cast()),
                        )
                    } else {
                        let bytes = here * GROUP / 2;
                        let v1 = if bytes > 64 {
                            masked(at.add(64), bytes - 64)
                        } else {
                            _mm512_setzero_si512()
                        };
                        (masked(at, bytes.min(64)), v1)
                    };
                    wv[r] = q4_lanes(v0, v1);
                    sw[r] = block_scales::<P>(scales, srow, g, here);
                }
                let base = rows.at(b, i0);
                for qi in 0..N {
                    let e = base.add(qi * rows.stride);
                    // four named loads: a from_fn closure here was not inlined
                    let x = [
                        _mm512_load_si512(e.cast()),
                        _mm512_load_si512(e.add(64).cast()),
                        _mm512_load_si512(e.add(128).cast()),
                        _mm512_load_si512(e.add(192).cast()),
                    ];
                    let st = _mm512_load_si512(e.add(256).cast());
                    let sx = _mm512_load_ps(e.add(320).cast());
                    for r in 0..W {
                        let mut dot = st;
                        for v in 0..4 {
                            dot = _mm512_dpbusd_epi32(dot, wv[r][v], x[v]);
                        }
                        acc[r][qi] = scaled(acc[r][qi], dot, sx, sw[r]);
                    }
                }
            }
            std::array::from_fn(|r| std::array::from_fn(|q| _mm512_reduce_add_ps(acc[r][q])))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{GROUP, quantize_into, round};

    /// The explicit AVX-512 activation quantizer is the portable loop bit for bit (both the
    /// kernels and `reference` take whichever one the CPU runs, so only this test tells them
    /// apart): halves, values at the clamp, zero and tiny blocks, a short last block.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_activation_quantizer_is_the_portable_one() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut x: Vec<f32> = (0..GROUP * 40 + 7)
            .map(|i| ((i as f32) * 0.618).sin() * 10f32.powi((i % 7) as i32 - 3))
            .collect();
        // a block of halves of the scale (127 / 127 = 1 exactly), a zero block, a denormal one
        for (j, v) in x[..GROUP].iter_mut().enumerate() {
            *v = (j as f32 - 16.0) + 0.5;
        }
        x[GROUP - 1] = 127.0;
        x[GROUP..2 * GROUP].fill(0.0);
        x[2 * GROUP..3 * GROUP].fill(f32::MIN_POSITIVE / 8.0);
        x[3 * GROUP] = -1.0;
        let blocks = x.len().div_ceil(GROUP);
        let (mut q0, mut s0) = (vec![0i8; blocks * GROUP], vec![0f32; blocks]);
        let (mut q1, mut s1) = (vec![0i8; blocks * GROUP], vec![0f32; blocks]);
        quantize_into(&x, &mut q0, &mut s0);
        // SAFETY: AVX-512F detected above; the buffers have whole blocks.
        unsafe { super::avx512::quantize_into(&x, &mut q1, &mut s1) };
        assert_eq!(q0, q1);
        assert_eq!(
            s0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            s1.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert!(q0[..GROUP].contains(&127) && q0[..GROUP].contains(&-16));
    }

    /// The vectorizable `round` is `roundf` bit for bit: halves away from zero, the largest
    /// float below 0.5, integers, huge values, signed zeros, infinities and NaN.
    #[test]
    fn round_is_roundf_exactly() {
        let mut xs = vec![
            0.0f32,
            -0.0,
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            -2.5,
            0.499_999_97,
            -0.499_999_97,
            8_388_607.5,
            16_777_216.0,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
        ];
        // a sweep of ordinary values, including every multiple of 1/8 in [-200, 200]
        xs.extend((-1600..=1600).map(|i| i as f32 / 8.0));
        xs.extend((0..10_000).map(|i| ((i as f32) * 0.731).sin() * 300.0));
        for x in xs {
            assert_eq!(round(x).to_bits(), x.round().to_bits(), "round({x:e})");
        }
        assert!(round(f32::NAN).is_nan());
    }
}
