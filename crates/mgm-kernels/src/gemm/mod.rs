//! f32 matrix multiply with a fused epilogue:
//! `C = act(beta C + A B + bias) + residual`, `beta` 0 or 1, `act` an [`Activation`].
//!
//! The fast path is the classic packed GEMM: `A` is packed into panels of [`MR`] rows and `B`
//! into panels of [`NR`] columns, both split along `k` into blocks of at most [`KC`]; a
//! register-blocked microkernel (AVX-512: 24 zmm accumulators for a 12 x 32 tile, one broadcast
//! and two loads per 24 FMAs) runs over each pair of panels, and the epilogue (bias,
//! activation, residual) is applied to each tile while it is still in L1. Weights are packed
//! once ([`PackedRhs`]), so a frozen linear layer pays no packing per call, and a packed
//! left-hand side ([`PackedLhs`]) can feed several products (q, k and v of one input).
//! Work is split into column ranges that run as rayon tasks; inside one the 12-row panel of
//! `A` stays in L1 while 4 panels of `B` stream from L2 with software prefetch (and the next
//! sweep's rows of `B` are prefetched into L2, since a deep model's weights come from DRAM).
//!
//! Packed operands belong to a [`Backend`]: [`Backend::Amx`] (Sapphire Rapids and later)
//! splits each f32 into three bf16 pieces and sums six tile products (`amx` module docs: as
//! accurate as the FMA path, about 1.4x its speed on CLIP-L's shapes), [`Backend::Avx512`] runs
//! the FMA microkernel above, and [`Backend::Portable`] the same packing with plain Rust.
//! [`Backend::best`] picks the fastest the CPU allows (`MGM_NO_AMX=1` skips AMX);
//! `with_backend` constructors force one (the tests cover every available one).
//!
//! [`reference()`] is the plain triple loop in f64, the oracle of the tests.
//!
//! ```
//! use mgm_kernels::gemm::{self, Epilogue, MatMut, MatRef};
//! let a = [1f32, 2., 3., 4., 5., 6.]; // [2, 3]
//! let b = [1f32, 0., 0., 1., 1., 1.]; // [3, 2]
//! let mut c = [0f32; 4];
//! let bias = [10f32, 20.];
//! let epi = Epilogue { bias: Some(&bias), ..Epilogue::default() };
//! gemm::cpu(MatRef::row_major(&a, 2, 3)?, MatRef::row_major(&b, 3, 2)?,
//!           MatMut::row_major(&mut c, 2, 2)?, &epi)?;
//! assert_eq!(c, [14., 25., 20., 31.]);
//! # Ok::<(), mgm_kernels::Error>(())
//! ```

use rayon::prelude::*;

use crate::activation::Activation;
#[cfg(target_arch = "x86_64")]
use crate::activation::{AS_A, AS_P, SQRT_2_OVER_PI, TANH_CUBIC};
use crate::error::{Error, Result};
#[cfg(target_arch = "x86_64")]
use crate::simd::TAYLOR_EXP2;
use crate::simd::{Simd, simd_call, simd_level, simd_variants};
use crate::softmax::exp_shifted_inplace;

#[cfg(target_arch = "x86_64")]
mod amx;
mod gemv;

pub use gemv::{GEMV_ROWS, gemm_nt, gemv};

const KERNEL: &str = "gemm";

/// Rows of a packed `A` panel (and of the microkernel's tile).
pub const MR: usize = 12;
/// Columns of a packed `B` panel (two 16-lane vectors).
pub const NR: usize = 32;
/// Largest `k` block: a 12 x 512 panel of `A` (24 KB) stays in L1 while `B` streams.
pub const KC: usize = 512;
/// `B` panels swept together: 512 x 128 floats (256 KB) of `B` stay in L2 while every `A` panel
/// of the task passes over them (4 beat 8 and 16 by a few percent on CLIP-L's shapes).
const NB_PANELS: usize = 4;
/// Most `A` panels in one task (1536 rows): bounds how much of `A` streams per `B` block.
const MB_PANELS: usize = 128;
/// How many `k` steps ahead the microkernel prefetches its `B` panel.
const PREFETCH_STEPS: usize = 8;
/// Below this many multiply-adds one call runs on the calling thread.
const PAR_WORK: usize = 1 << 20;

fn param(msg: String) -> Error {
    Error::Param {
        kernel: KERNEL,
        msg,
    }
}

/// A read-only strided f32 matrix: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// A view with explicit strides; errors when an element would fall outside `data`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Result<Self> {
        if rows > 0 && cols > 0 {
            let last = (rows - 1)
                .checked_mul(rs)
                .and_then(|r| (cols - 1).checked_mul(cs).and_then(|c| r.checked_add(c)));
            if last.is_none_or(|l| l >= data.len()) {
                return Err(param(format!(
                    "a {rows} x {cols} view with strides ({rs}, {cs}) exceeds its {} elements",
                    data.len()
                )));
            }
        }
        Ok(MatRef {
            data,
            rows,
            cols,
            rs,
            cs,
        })
    }

    /// A contiguous row-major `[rows, cols]` matrix (`data.len()` must be `rows * cols`).
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(param(format!(
                "a row-major {rows} x {cols} matrix needs {} elements, got {}",
                rows.saturating_mul(cols),
                data.len()
            )));
        }
        Self::new(data, rows, cols, cols, 1)
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `i` as a slice when its elements are contiguous (unit column stride, or one
    /// column); `None` otherwise.
    pub(crate) fn row_slice(&self, i: usize) -> Option<&'a [f32]> {
        (self.cs == 1 || self.cols <= 1).then(|| &self.data[i * self.rs..i * self.rs + self.cols])
    }

    /// Element `(i, j)` (panics when out of range).
    pub fn get(&self, i: usize, j: usize) -> f32 {
        assert!(
            i < self.rows && j < self.cols,
            "({i}, {j}) outside {} x {}",
            self.rows,
            self.cols
        );
        self.at(i, j)
    }

    /// Element `(i, j)`; the caller keeps `i < rows`, `j < cols`, which `new` proved in bounds.
    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> f32 {
        debug_assert!(i < self.rows && j < self.cols);
        // SAFETY: `new` checked that (rows-1)*rs + (cols-1)*cs < data.len(), and every
        // caller passes i < rows, j < cols.
        unsafe { *self.data.get_unchecked(i * self.rs + j * self.cs) }
    }
}

/// The output: `rows` rows of `cols` contiguous elements, rows `rs` apart.
#[derive(Debug)]
pub struct MatMut<'a> {
    ptr: *mut f32,
    rows: usize,
    cols: usize,
    rs: usize,
    _out: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: a MatMut is an exclusive borrow of its elements (from a `&mut [f32]`, or by the
// contract of `from_raw_parts`), like `&mut [f32]`, which is Send and Sync.
unsafe impl Send for MatMut<'_> {}
// SAFETY: as above; shared access only reads the shape.
unsafe impl Sync for MatMut<'_> {}

impl<'a> MatMut<'a> {
    /// Rows `rs >= cols` apart (so they never overlap) within `data`.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize, rs: usize) -> Result<Self> {
        if rows > 1 && rs < cols {
            return Err(param(format!(
                "output row stride {rs} is smaller than its {cols} columns (rows would overlap)"
            )));
        }
        if rows > 0 && cols > 0 {
            let end = (rows - 1).checked_mul(rs).and_then(|r| r.checked_add(cols));
            if end.is_none_or(|e| e > data.len()) {
                return Err(param(format!(
                    "a {rows} x {cols} output with row stride {rs} exceeds its {} elements",
                    data.len()
                )));
            }
        }
        Ok(MatMut {
            ptr: data.as_mut_ptr(),
            rows,
            cols,
            rs,
            _out: std::marker::PhantomData,
        })
    }

    /// A contiguous row-major `[rows, cols]` output.
    pub fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Result<Self> {
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(param(format!(
                "a row-major {rows} x {cols} output needs {} elements, got {}",
                rows.saturating_mul(cols),
                data.len()
            )));
        }
        Self::new(data, rows, cols, cols)
    }

    /// An output through a raw pointer, for blocks of a buffer that other writers share (the
    /// heads of a merged `[T, H * d]` attention output interleave within each row).
    ///
    /// # Safety
    /// For `'a`, the `rows` runs of `cols` elements at `ptr + i * rs` are valid for writes and
    /// reads, and nothing else accesses them; `rs >= cols` when `rows > 1`.
    pub unsafe fn from_raw_parts(ptr: *mut f32, rows: usize, cols: usize, rs: usize) -> Self {
        MatMut {
            ptr,
            rows,
            cols,
            rs,
            _out: std::marker::PhantomData,
        }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Element `(i, j)` (panics when out of range).
    pub fn get(&mut self, i: usize, j: usize) -> f32 {
        *self.slot(i, j)
    }

    /// Sets element `(i, j)` (panics when out of range).
    pub fn set(&mut self, i: usize, j: usize, v: f32) {
        *self.slot(i, j) = v;
    }

    /// Stores `dots` (every row's values for columns `j0..j0 + nb`, row-major) through the
    /// epilogue, as the GEMV paths do: for kernels outside this module that compute whole
    /// column bands.
    pub(crate) fn store_band(&mut self, j0: usize, nb: usize, dots: &[f32], epi: &Epilogue<'_>) {
        assert!(
            nb > 0 && j0 + nb <= self.cols && dots.len() == self.rows * nb,
            "band inside the output"
        );
        // SAFETY: the band lies inside this exclusive output (asserted above).
        unsafe { gemv::store_band(self.ptr, self.rs, j0, nb, dots, epi) };
    }

    /// Element `(i, j)` for the reference; `i < rows`, `j < cols`.
    fn slot(&mut self, i: usize, j: usize) -> &mut f32 {
        assert!(i < self.rows && j < self.cols, "output index in range");
        // SAFETY: the constructors guarantee every in-range element is valid and exclusive.
        unsafe { &mut *self.ptr.add(i * self.rs + j) }
    }
}

/// What happens to `A B` before it is stored: `C = act(beta C + A B + bias) + residual`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Epilogue<'a> {
    /// `beta = 1`: add the product to what `C` holds (`beta = 0`, the default, overwrites).
    pub accumulate: bool,
    /// Added to every row before the activation (`[n]`).
    pub bias: Option<&'a [f32]>,
    /// Applied after the bias.
    pub activation: Activation,
    /// Added after the activation (`[m, n]`, any strides), e.g. a transformer's skip input.
    pub residual: Option<MatRef<'a>>,
}

/// Whether a call may split its work over the rayon pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parallelism {
    /// On the calling thread (for callers that already run one product per task).
    Serial,
    /// Blocks as rayon tasks when the product is large enough.
    Rayon,
}

/// The `k` blocks `(k0, kc)`: `ceil(k / KC)` blocks of nearly equal size.
fn k_splits(k: usize) -> Vec<(usize, usize)> {
    if k == 0 {
        return Vec::new();
    }
    let nb = k.div_ceil(KC);
    let (base, rem) = (k / nb, k % nb);
    let mut k0 = 0;
    (0..nb)
        .map(|b| {
            let kc = base + usize::from(b < rem);
            let r = (k0, kc);
            k0 += kc;
            r
        })
        .collect()
}

/// An f32 buffer whose first element is 64-byte aligned, so that the microkernel's vector loads
/// from a packed panel never straddle two cache lines.
#[derive(Debug)]
struct Aligned {
    buf: Vec<f32>,
    off: usize,
    len: usize,
}

/// Recently dropped packing buffers. A fresh multi-megabyte allocation costs a page fault per
/// 4 KB page on first touch (about 0.8 ms for CLIP-L's 577 x 1024 activations, a fifth of the
/// product itself), so transient packs reuse memory instead.
static SPARE: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());
/// Buffers kept in [`SPARE`].
const SPARE_BUFFERS: usize = 4;

impl Aligned {
    /// `len` zeros.
    fn zeroed(len: usize) -> Aligned {
        let buf = vec![0f32; len + 15];
        let off = (16 - (buf.as_ptr() as usize / 4) % 16) % 16;
        Aligned { buf, off, len }
    }

    /// `len` elements of unspecified (but initialised) values, from [`SPARE`] when a buffer
    /// there is large enough: the caller overwrites every element.
    fn recycled(len: usize) -> Aligned {
        let need = len + 15;
        let spare = {
            let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
            let best = (0..spare.len())
                .filter(|&i| spare[i].len() >= need)
                .min_by_key(|&i| spare[i].len());
            best.map(|i| spare.swap_remove(i))
        };
        match spare {
            Some(buf) => {
                let off = (16 - (buf.as_ptr() as usize / 4) % 16) % 16;
                Aligned { buf, off, len }
            }
            None => Aligned::zeroed(len),
        }
    }

    fn as_ptr(&self) -> *const f32 {
        self.buf[self.off..].as_ptr()
    }

    fn as_mut_ptr(&mut self) -> *mut f32 {
        self.buf[self.off..].as_mut_ptr()
    }

    /// Hands the buffer to [`SPARE`], replacing the smallest one there when it is full.
    fn recycle(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.len() < 1 << 14 {
            return; // small buffers are cheap to allocate
        }
        let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < SPARE_BUFFERS {
            spare.push(buf);
        } else if let Some(i) = (0..spare.len()).min_by_key(|&i| spare[i].len())
            && spare[i].len() < buf.len()
        {
            spare[i] = buf;
        }
    }
}

impl Clone for Aligned {
    // a cloned Vec may land at another alignment: copy into a freshly aligned buffer
    fn clone(&self) -> Aligned {
        let mut c = Aligned::zeroed(self.len);
        let off = c.off;
        c.buf[off..off + self.len].copy_from_slice(&self.buf[self.off..self.off + self.len]);
        c
    }
}

/// Which kernels a packed operand is laid out for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// The portable microkernel (any CPU).
    Portable,
    /// The 12 x 32 AVX-512 FMA microkernel.
    Avx512,
    /// The AMX-BF16 tile units, f32 as six bf16 products (see the `amx` module docs).
    Amx,
}

impl Backend {
    /// The fastest backend this CPU and OS allow: AMX, then AVX-512, then portable. Setting
    /// `MGM_NO_AMX=1` in the environment skips AMX (read once per process).
    pub fn best() -> Backend {
        if Backend::Amx.is_available() {
            Backend::Amx
        } else if Backend::Avx512.is_available() {
            Backend::Avx512
        } else {
            Backend::Portable
        }
    }

    /// Whether this backend can run here.
    pub fn is_available(self) -> bool {
        match self {
            Backend::Portable => true,
            Backend::Avx512 => simd_level() == Simd::Avx512,
            #[cfg(target_arch = "x86_64")]
            Backend::Amx => amx::available(),
            #[cfg(not(target_arch = "x86_64"))]
            Backend::Amx => false,
        }
    }

    /// An error unless the backend is available.
    fn require(self) -> Result<Backend> {
        if self.is_available() {
            Ok(self)
        } else {
            Err(param(format!(
                "the {self:?} backend is not available on this CPU"
            )))
        }
    }
}

/// `A` packed for one [`Backend`] (see [`PackedLhs::with_backend`]).
#[derive(Clone, Debug)]
pub struct PackedLhs {
    backend: Backend,
    repr: LhsRepr,
}

#[derive(Clone, Debug)]
enum LhsRepr {
    Panels(LhsPanels),
    #[cfg(target_arch = "x86_64")]
    Amx(amx::Lhs),
}

/// `A` packed for the FMA microkernels: for each `k` block, panels of [`MR`] rows stored
/// `k`-major (`MR` values per `k` step, rows past `m` zero).
#[derive(Clone, Debug)]
struct LhsPanels {
    m: usize,
    k: usize,
    splits: Vec<(usize, usize)>,
    data: Aligned,
}

/// A raw pointer that tasks share to write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SharedPtr(*mut f32);
// SAFETY: every user writes only elements no other task touches (disjoint panels of a packed
// buffer, disjoint tiles of the output), while the owning buffer outlives the parallel loop.
unsafe impl Send for SharedPtr {}
// SAFETY: as above.
unsafe impl Sync for SharedPtr {}

impl SharedPtr {
    /// The pointer (a method, so closures capture the Send + Sync wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

impl PackedLhs {
    /// Packs `a` (`[m, k]`, any strides) for [`Backend::best`], in parallel when it is large.
    pub fn new(a: MatRef<'_>) -> PackedLhs {
        Self::pack_scaled(a, None, Backend::best())
    }

    /// Packs `a` for `backend` (an error when this CPU lacks it).
    pub fn with_backend(a: MatRef<'_>, backend: Backend) -> Result<PackedLhs> {
        Ok(Self::pack_scaled(a, None, backend.require()?))
    }

    /// The backend the operand is laid out for.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Rows.
    pub fn m(&self) -> usize {
        match &self.repr {
            LhsRepr::Panels(p) => p.m,
            #[cfg(target_arch = "x86_64")]
            LhsRepr::Amx(x) => x.m,
        }
    }

    /// Columns (the contraction length).
    pub fn k(&self) -> usize {
        match &self.repr {
            LhsRepr::Panels(p) => p.k,
            #[cfg(target_arch = "x86_64")]
            LhsRepr::Amx(x) => x.k,
        }
    }

    /// Packs `a` with row `i` multiplied by `row_scale[i]` when given.
    fn pack_scaled(a: MatRef<'_>, row_scale: Option<&[f32]>, backend: Backend) -> PackedLhs {
        let repr = match backend {
            #[cfg(target_arch = "x86_64")]
            Backend::Amx => LhsRepr::Amx(amx::Lhs::pack(a, row_scale)),
            _ => LhsRepr::Panels(LhsPanels::pack(a, row_scale)),
        };
        PackedLhs { backend, repr }
    }

    /// The attention weights `P = softmax(scale * s + mask)` of a block of scores `s`
    /// (`rows x cols`, row-major, overwritten with the unnormalised exponentials), packed as
    /// the left operand of `P V`; the normalisation is folded into the packing. Rows whose
    /// every entry is `-inf` become zeros; a NaN makes its row NaN (DESIGN.md section 3).
    pub fn softmax_rows(
        s: &mut [f32],
        rows: usize,
        cols: usize,
        scale: f32,
        mask: Option<MatRef<'_>>,
    ) -> Result<PackedLhs> {
        if rows.checked_mul(cols) != Some(s.len()) {
            return Err(param(format!(
                "softmax_rows: {rows} x {cols} scores need {} elements, got {}",
                rows.saturating_mul(cols),
                s.len()
            )));
        }
        if let Some(mk) = &mask
            && (mk.rows != rows || mk.cols != cols)
        {
            return Err(param(format!(
                "softmax_rows: the mask is {} x {}, the scores {rows} x {cols}",
                mk.rows, mk.cols
            )));
        }
        let mut inv = vec![0f32; rows];
        if cols > 0 {
            let simd = simd_level();
            simd_call!(
                simd,
                softmax_block,
                softmax_block_avx2,
                softmax_block_avx512(s, cols, scale, mask.as_ref(), &mut inv)
            );
        }
        Ok(Self::pack_scaled(
            MatRef::row_major(s, rows, cols)?,
            Some(&inv),
            Backend::best(),
        ))
    }
}

impl LhsPanels {
    /// Packs `a` with row `i` multiplied by `row_scale[i]` when given.
    fn pack(a: MatRef<'_>, row_scale: Option<&[f32]>) -> LhsPanels {
        let (m, k) = (a.rows, a.cols);
        let panels = m.div_ceil(MR);
        let splits = k_splits(k);
        let mut data = Aligned::recycled(panels * MR * k);
        let ptr = SharedPtr(data.as_mut_ptr());
        let transpose = simd_level() == Simd::Avx512;
        let pack_panel = |p: usize| {
            let rows = MR.min(m - p * MR);
            let mut scale = [1f32; MR];
            if let Some(rs) = row_scale {
                scale[..rows].copy_from_slice(&rs[p * MR..p * MR + rows]);
            }
            for &(k0, kc) in &splits {
                let base = panels * MR * k0 + p * MR * kc;
                #[cfg(target_arch = "x86_64")]
                if a.cs == 1 && transpose {
                    // SAFETY: AVX-512F was detected; rows p*MR..p*MR+rows of columns
                    // k0..k0+kc are in bounds (MatRef::new); panel p is this call's alone.
                    unsafe {
                        avx512::pack_rows_kmajor::<MR>(
                            a.data.as_ptr().add(p * MR * a.rs + k0),
                            a.rs,
                            rows,
                            kc,
                            &scale,
                            ptr.get().add(base),
                        )
                    };
                    continue;
                }
                for (i, &sc) in scale.iter().enumerate().take(rows) {
                    let r = p * MR + i;
                    for kk in 0..kc {
                        // SAFETY: MatRef::new proved (r, k0+kk) in bounds; the write stays in
                        // panel p of this block (base + kk*MR + i < base + kc*MR), which this
                        // closure call alone writes.
                        unsafe { *ptr.get().add(base + kk * MR + i) = a.at(r, k0 + kk) * sc };
                    }
                }
                // the recycled buffer holds old values: zero the rows past m
                for i in rows..MR {
                    for kk in 0..kc {
                        // SAFETY: as above.
                        unsafe { *ptr.get().add(base + kk * MR + i) = 0.0 };
                    }
                }
            }
        };
        if m * k >= 1 << 16 {
            (0..panels).into_par_iter().for_each(pack_panel);
        } else {
            (0..panels).for_each(pack_panel);
        }
        LhsPanels { m, k, splits, data }
    }
}

/// `scale * s + mask` then [`exp_shifted_inplace`] for each row of `s`; `inv[r]` gets the
/// row's normaliser.
#[inline(always)]
fn softmax_block(
    s: &mut [f32],
    cols: usize,
    scale: f32,
    mask: Option<&MatRef<'_>>,
    inv: &mut [f32],
) {
    for (r, (row, iv)) in s.chunks_exact_mut(cols).zip(inv.iter_mut()).enumerate() {
        match mask {
            Some(mk) if mk.cs == 1 => {
                let mrow = &mk.data[r * mk.rs..r * mk.rs + cols];
                for (x, &a) in row.iter_mut().zip(mrow) {
                    *x = *x * scale + a;
                }
            }
            Some(mk) => {
                for (j, x) in row.iter_mut().enumerate() {
                    *x = *x * scale + mk.at(r, j);
                }
            }
            None => row.iter_mut().for_each(|x| *x *= scale),
        }
        *iv = exp_shifted_inplace(row);
    }
}

simd_variants!(softmax_block => softmax_block_avx2, softmax_block_avx512(
    s: &mut [f32], cols: usize, scale: f32, mask: Option<&MatRef<'_>>, inv: &mut [f32]
));

impl Drop for PackedLhs {
    fn drop(&mut self) {
        match &mut self.repr {
            LhsRepr::Panels(p) => p.data.recycle(),
            #[cfg(target_arch = "x86_64")]
            LhsRepr::Amx(x) => x.recycle(),
        }
    }
}

/// `B` packed for the microkernel: panels of [`NR`] columns, each `k x NR` contiguous
/// (columns past `n` zero), or split into bf16 tiles for [`Backend::Amx`]. Pack a weight once
/// and multiply by it many times.
#[derive(Clone, Debug)]
pub struct PackedRhs {
    backend: Backend,
    repr: RhsRepr,
}

#[derive(Clone, Debug)]
enum RhsRepr {
    Panels(RhsPanels),
    #[cfg(target_arch = "x86_64")]
    Amx(amx::Rhs),
}

/// `B` in panels of [`NR`] columns for the FMA microkernels.
#[derive(Clone, Debug)]
pub(crate) struct RhsPanels {
    k: usize,
    n: usize,
    data: Aligned,
}

impl PackedRhs {
    /// Packs `b` (`[k, n]`, any strides; a PyTorch `[out, in]` weight is `MatRef::t()` of its
    /// row-major view) for [`Backend::best`], in parallel when it is large.
    pub fn new(b: MatRef<'_>) -> PackedRhs {
        Self::pack(b, Backend::best())
    }

    /// Packs `b` for `backend` (an error when this CPU lacks it).
    pub fn with_backend(b: MatRef<'_>, backend: Backend) -> Result<PackedRhs> {
        Ok(Self::pack(b, backend.require()?))
    }

    fn pack(b: MatRef<'_>, backend: Backend) -> PackedRhs {
        let repr = match backend {
            #[cfg(target_arch = "x86_64")]
            Backend::Amx => RhsRepr::Amx(amx::Rhs::pack(b)),
            _ => RhsRepr::Panels(RhsPanels::pack(b)),
        };
        PackedRhs { backend, repr }
    }

    /// The backend the operand is laid out for.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Rows (the contraction length).
    pub fn k(&self) -> usize {
        match &self.repr {
            RhsRepr::Panels(p) => p.k,
            #[cfg(target_arch = "x86_64")]
            RhsRepr::Amx(x) => x.k,
        }
    }

    /// Columns.
    pub fn n(&self) -> usize {
        match &self.repr {
            RhsRepr::Panels(p) => p.n,
            #[cfg(target_arch = "x86_64")]
            RhsRepr::Amx(x) => x.n,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.repr {
            RhsRepr::Panels(p) => p.data.len * 4,
            #[cfg(target_arch = "x86_64")]
            RhsRepr::Amx(x) => x.bytes(),
        }
    }
}

impl RhsPanels {
    /// `B = w^T` for a weight `w` stored `[n, k]` (rows are outputs).
    pub(crate) fn pack_rows(w: MatRef<'_>) -> RhsPanels {
        Self::pack(w.t())
    }

    fn pack(b: MatRef<'_>) -> RhsPanels {
        let (k, n) = (b.rows, b.cols);
        let panels = n.div_ceil(NR);
        let transpose = simd_level() == Simd::Avx512;
        // the transposing path writes every element (zeros past n), so a recycled buffer will do
        let mut data = if transpose && b.rs == 1 && b.cs != 1 {
            Aligned::recycled(panels * NR * k)
        } else {
            Aligned::zeroed(panels * NR * k)
        };
        let ptr = SharedPtr(data.as_mut_ptr());
        let pack_panel = |p: usize| {
            let cols = NR.min(n - p * NR);
            let base = p * k * NR;
            // walk the source along its unit stride
            #[cfg(target_arch = "x86_64")]
            if b.rs == 1 && b.cs != 1 && transpose {
                // SAFETY: AVX-512F was detected; columns p*NR..p*NR+cols (rows of the stored
                // [n, k] weight) have k elements each (MatRef::new); panel p is this call's
                // alone and holds k * NR floats.
                unsafe {
                    avx512::pack_rows_kmajor::<NR>(
                        b.data.as_ptr().add(p * NR * b.cs),
                        b.cs,
                        cols,
                        k,
                        &[1.0; NR],
                        ptr.get().add(base),
                    )
                };
                return;
            }
            if b.rs == 1 && b.cs != 1 {
                for j in 0..cols {
                    for kk in 0..k {
                        // SAFETY: base + kk*NR + j < (p+1)*k*NR <= data.len(); panel p is this
                        // call's alone.
                        unsafe { *ptr.get().add(base + kk * NR + j) = b.at(kk, p * NR + j) };
                    }
                }
            } else {
                for kk in 0..k {
                    for j in 0..cols {
                        // SAFETY: as above.
                        unsafe { *ptr.get().add(base + kk * NR + j) = b.at(kk, p * NR + j) };
                    }
                }
            }
        };
        if k * n >= 1 << 16 {
            (0..panels).into_par_iter().for_each(pack_panel);
        } else {
            (0..panels).for_each(pack_panel);
        }
        RhsPanels { k, n, data }
    }
}

/// Checks the operands against each other and the epilogue against the output.
fn check(
    m: usize,
    k: usize,
    kb: usize,
    n: usize,
    c: &MatMut<'_>,
    epi: &Epilogue<'_>,
) -> Result<()> {
    if k != kb {
        return Err(param(format!(
            "inner dims differ: A is {m} x {k}, B is {kb} x {n}"
        )));
    }
    if c.rows != m || c.cols != n {
        return Err(param(format!(
            "the output is {} x {}, the product {m} x {n}",
            c.rows, c.cols
        )));
    }
    if let Some(b) = epi.bias
        && b.len() != n
    {
        return Err(param(format!(
            "bias has {} elements, the output {n} columns",
            b.len()
        )));
    }
    if let Some(r) = &epi.residual
        && (r.rows != m || r.cols != n)
    {
        return Err(param(format!(
            "residual is {} x {}, the output {m} x {n}",
            r.rows, r.cols
        )));
    }
    Ok(())
}

/// The f64 reference: `C = act(beta C + sum_k A[i,k] B[k,j] + bias[j]) + residual[i,j]` by
/// plain loops, accumulated and activated in f64, rounded once.
pub fn reference(
    a: MatRef<'_>,
    b: MatRef<'_>,
    mut c: MatMut<'_>,
    epi: &Epilogue<'_>,
) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    check(m, k, b.rows, n, &c, epi)?;
    for i in 0..m {
        for j in 0..n {
            let mut s = if epi.accumulate {
                f64::from(*c.slot(i, j))
            } else {
                0.0
            };
            for kk in 0..k {
                s += f64::from(a.at(i, kk)) * f64::from(b.at(kk, j));
            }
            if let Some(bias) = epi.bias {
                s += f64::from(bias[j]);
            }
            let mut y = epi.activation.reference_f64(s);
            if let Some(r) = &epi.residual {
                y += f64::from(r.at(i, j));
            }
            *c.slot(i, j) = y as f32;
        }
    }
    Ok(())
}

/// `C = epilogue(A B)` for strided operands: packs both (in parallel), then
/// [`cpu_packed`] with [`Parallelism::Rayon`].
pub fn cpu(a: MatRef<'_>, b: MatRef<'_>, c: MatMut<'_>, epi: &Epilogue<'_>) -> Result<()> {
    check(a.rows, a.cols, b.rows, b.cols, &c, epi)?;
    let backend = Backend::best();
    let (pa, pb) = rayon::join(
        || PackedLhs::pack_scaled(a, None, backend),
        || PackedRhs::pack(b, backend),
    );
    cpu_packed(&pa, &pb, c, epi, Parallelism::Rayon)
}

/// `C = epilogue(A B)` for operands packed for the same [`Backend`] (an error otherwise).
/// AMX operands holding an infinity are multiplied on the FMA path (see the `amx` module).
pub fn cpu_packed(
    a: &PackedLhs,
    b: &PackedRhs,
    c: MatMut<'_>,
    epi: &Epilogue<'_>,
    par: Parallelism,
) -> Result<()> {
    check(a.m(), a.k(), b.k(), b.n(), &c, epi)?;
    match (&a.repr, &b.repr) {
        (LhsRepr::Panels(pa), RhsRepr::Panels(pb)) => {
            let avx512 = a.backend == Backend::Avx512 || b.backend == Backend::Avx512;
            run(
                pa,
                pb,
                c,
                epi,
                par,
                avx512 && Backend::Avx512.is_available(),
            )
        }
        #[cfg(target_arch = "x86_64")]
        (LhsRepr::Amx(la), RhsRepr::Amx(rb)) => {
            if la.has_inf || rb.has_inf {
                // inf times a zero piece would give NaN: multiply the exact values with FMA
                let pa = LhsPanels::pack(MatRef::row_major(&la.unpack(), la.m, la.k)?, None);
                let pb = RhsPanels::pack(MatRef::row_major(&rb.unpack(), rb.k, rb.n)?);
                return run(&pa, &pb, c, epi, par, Backend::Avx512.is_available());
            }
            if la.m > 0 && rb.n > 0 {
                // SAFETY: AMX operands exist only after amx::available() (Backend::require or
                // Backend::best); the MatMut covers the checked m x n output exclusively; no
                // infinity in either operand (checked above).
                unsafe { amx::run(la, rb, c.ptr, c.rs, epi, par == Parallelism::Rayon) };
            }
            Ok(())
        }
        #[allow(unreachable_patterns)]
        _ => Err(param(format!(
            "operands packed for different backends ({:?} and {:?})",
            a.backend, b.backend
        ))),
    }
}

/// One task: `A` panels `p0..p1` times `B` panels `q0..q1`.
#[derive(Clone, Copy)]
struct Block {
    p0: usize,
    p1: usize,
    q0: usize,
    q1: usize,
}

/// From this many rows of `X` on, [`gemm_nt`] (on AVX-512) packs the weight a chunk at a
/// time and runs the FMA microkernel: at 48 rows and more that measured faster than reading
/// the weight in place (TinyLlama's shapes), at 32 slower (measured with the gather pack).
pub const PACK_ROWS: usize = 40;

/// Weight rows (output columns) one task of [`nt_chunked`] packs and multiplies: 64 x 2048
/// floats (512 KB) of packed `B` stay in the task's L2 while every panel of `A` passes.
pub(crate) const NT_CHUNK: usize = 2 * NR;

/// `C = epilogue(X W^T)` for a weight `w` stored `[n, k]` and read in place (memory-mapped):
/// [`nt_chunked`] with each chunk of rows packed straight from `w`.
pub(crate) fn nt_packed(x: MatRef<'_>, w: MatRef<'_>, c: MatMut<'_>, epi: &Epilogue<'_>) {
    let fast = simd_level() == Simd::Avx512;
    nt_chunked(x, w.rows, c, epi, fast, |j0, nb| {
        RhsPanels::pack_rows(MatRef {
            data: &w.data[j0 * w.rs..],
            rows: nb,
            ..w
        })
    });
}

/// `C = epilogue(X W^T)` for a `W` of `n` rows that `pack(j0, nb)` supplies [`NT_CHUNK`]
/// rows at a time (packed as `B` panels): `X` is packed once, and each rayon task packs its
/// chunk into a buffer of its own and runs the microkernel over it (AVX-512 when `avx512`),
/// so `W` is read from memory once and never held whole in packed form. Shapes are checked
/// by the caller.
pub(crate) fn nt_chunked<F>(
    x: MatRef<'_>,
    n: usize,
    c: MatMut<'_>,
    epi: &Epilogue<'_>,
    avx512: bool,
    pack: F,
) where
    F: Fn(usize, usize) -> RhsPanels + Sync,
{
    let m = x.rows;
    let mut pa = LhsPanels::pack(x, None);
    let ldc = c.rs;
    let out = SharedPtr(c.ptr);
    let task = |j0: usize| {
        let nb = NT_CHUNK.min(n - j0);
        fn sub(r: MatRef<'_>, j0: usize, nb: usize) -> MatRef<'_> {
            MatRef {
                data: &r.data[j0 * r.cs..],
                cols: nb,
                ..r
            }
        }
        let mut pb = pack(j0, nb);
        let e = Epilogue {
            bias: epi.bias.map(|b| &b[j0..j0 + nb]),
            residual: epi.residual.map(|r| sub(r, j0, nb)),
            ..*epi
        };
        // SAFETY: columns j0..j0+nb of the checked m x n output are this task's alone.
        let cc = unsafe { MatMut::from_raw_parts(out.get().add(j0), m, nb, ldc) };
        run(&pa, &pb, cc, &e, Parallelism::Serial, avx512).expect("shapes checked by the caller");
        pb.data.recycle();
    };
    (0..n)
        .step_by(NT_CHUNK)
        .collect::<Vec<_>>()
        .into_par_iter()
        .for_each(task);
    pa.data.recycle();
}

/// Splits `0..count` into `parts` nearly equal ranges.
fn ranges(count: usize, parts: usize) -> impl Iterator<Item = (usize, usize)> {
    let parts = parts.clamp(1, count.max(1));
    (0..parts).map(move |i| (count * i / parts, count * (i + 1) / parts))
}

fn run(
    a: &LhsPanels,
    b: &RhsPanels,
    c: MatMut<'_>,
    epi: &Epilogue<'_>,
    par: Parallelism,
    avx512: bool,
) -> Result<()> {
    let (m, k, n) = (a.m, a.k, b.n);
    check(m, k, b.k, n, &c, epi)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let ldc = c.rs;
    let out = SharedPtr(c.ptr);
    let avx2 = simd_level() != Simd::Baseline;
    let (mp, np) = (m.div_ceil(MR), n.div_ceil(NR));
    let parallel = par == Parallelism::Rayon
        && rayon::current_num_threads() > 1
        && m.saturating_mul(n).saturating_mul(k.max(1)) >= PAR_WORK;
    // Tasks split the rows into ranges of at most MB_PANELS panels and, when that leaves too
    // few tasks for the pool, the columns into ranges of whole NB_PANELS sweeps.
    let m_ranges = mp.div_ceil(MB_PANELS);
    let n_ranges = if parallel {
        (2 * rayon::current_num_threads())
            .div_ceil(m_ranges)
            .clamp(1, np.div_ceil(NB_PANELS))
    } else {
        1
    };
    let blocks: Vec<Block> = ranges(mp, m_ranges)
        .flat_map(|(p0, p1)| ranges(np, n_ranges).map(move |(q0, q1)| Block { p0, p1, q0, q1 }))
        .collect();
    let task = |blk: &Block| {
        // SAFETY: `check` matched the packed shapes with the output, whose MatMut proved
        // (m-1)*ldc + n <= len; each block writes only its own rows p0*MR.. and columns
        // q0*NR.. (clipped to m and n), which no other block touches.
        unsafe {
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                return avx512::run_block(a, b, out.get(), ldc, *blk, epi);
            }
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                return run_block_avx2(a, b, out.get(), ldc, *blk, epi);
            }
            run_block::<Portable>(a, b, out.get(), ldc, *blk, epi)
        }
    };
    if parallel && blocks.len() > 1 {
        blocks.par_iter().for_each(task);
    } else {
        blocks.iter().for_each(task);
    }
    Ok(())
}

/// A microkernel: `C[0..mr, 0..nr] (+)= A_panel B_panel` over `kc` steps.
trait MicroKernel {
    /// # Safety
    /// `pa` holds `kc * MR` and `pb` `kc * NR` readable floats; `c` points at `mr <= MR` rows
    /// of `nr <= NR` writable floats, `ldc` apart.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        kc: usize,
        pa: *const f32,
        pb: *const f32,
        c: *mut f32,
        ldc: usize,
        mr: usize,
        nr: usize,
        accumulate: bool,
    );

    /// Hints that the line at `p` will be read soon (into L2); may do nothing.
    fn prefetch_l2(p: *const f32);

    /// The epilogue of one finished tile (see [`finish_tile`]).
    ///
    /// # Safety
    /// As [`finish_tile`].
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn finish(
        c: *mut f32,
        ldc: usize,
        r0: usize,
        c0: usize,
        mr: usize,
        nr: usize,
        epi: &Epilogue<'_>,
    ) {
        // SAFETY: forwarded contract.
        unsafe { finish_tile(c, ldc, r0, c0, mr, nr, epi) }
    }
}

/// Plain Rust: what LLVM vectorises for the baseline target.
struct Portable;

impl MicroKernel for Portable {
    #[inline(always)]
    fn prefetch_l2(_p: *const f32) {}

    #[inline(always)]
    unsafe fn tile(
        kc: usize,
        pa: *const f32,
        pb: *const f32,
        c: *mut f32,
        ldc: usize,
        mr: usize,
        nr: usize,
        accumulate: bool,
    ) {
        // The 12 x 32 tile as 3 x 2 sub-tiles of 4 rows x 16 columns: 64 accumulators, which
        // an AVX2 build keeps in 8 ymm registers (a whole-tile array would live on the stack).
        const SR: usize = 4;
        const SC: usize = 16;
        // SAFETY: the trait contract bounds every pointer offset used below.
        unsafe {
            let a = std::slice::from_raw_parts(pa, kc * MR);
            let b = std::slice::from_raw_parts(pb, kc * NR);
            for r0 in (0..mr).step_by(SR) {
                for c0 in (0..nr).step_by(SC) {
                    let mut acc = [[0f32; SC]; SR];
                    for kk in 0..kc {
                        let bk: &[f32; SC] = b[kk * NR + c0..kk * NR + c0 + SC]
                            .try_into()
                            .expect("a sub-tile step is SC wide");
                        let ak: &[f32; SR] = a[kk * MR + r0..kk * MR + r0 + SR]
                            .try_into()
                            .expect("a sub-tile step is SR tall");
                        for (row, &av) in acc.iter_mut().zip(ak) {
                            for (x, &bv) in row.iter_mut().zip(bk) {
                                *x += av * bv;
                            }
                        }
                    }
                    let cols = SC.min(nr - c0);
                    for (i, row) in acc.iter().enumerate().take(mr - r0) {
                        let cr = std::slice::from_raw_parts_mut(c.add((r0 + i) * ldc + c0), cols);
                        if accumulate {
                            for (o, &v) in cr.iter_mut().zip(row) {
                                *o += v;
                            }
                        } else {
                            cr.copy_from_slice(&row[..cols]);
                        }
                    }
                }
            }
        }
    }
}

/// [`run_block`] with the portable microkernel compiled for AVX2 + FMA (what CPUs without
/// AVX-512 run).
///
/// # Safety
/// The CPU has AVX2 and FMA; the rest as [`run_block`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_block_avx2(
    a: &LhsPanels,
    b: &RhsPanels,
    out: *mut f32,
    ldc: usize,
    blk: Block,
    epi: &Epilogue<'_>,
) {
    // SAFETY: forwarded contract.
    unsafe { run_block::<Portable>(a, b, out, ldc, blk, epi) }
}

/// Runs one block with microkernel `K`, applying the epilogue to each tile after its last `k`
/// block.
///
/// # Safety
/// `out` covers the output described by `ldc` and the packed shapes; `blk` is within them.
#[inline(always)]
unsafe fn run_block<K: MicroKernel>(
    a: &LhsPanels,
    b: &RhsPanels,
    out: *mut f32,
    ldc: usize,
    blk: Block,
    epi: &Epilogue<'_>,
) {
    let (m, k, n) = (a.m, a.k, b.n);
    let mp = m.div_ceil(MR);
    if k == 0 {
        for p in blk.p0..blk.p1 {
            for q in blk.q0..blk.q1 {
                let (r0, c0) = (p * MR, q * NR);
                let (mr, nr) = (MR.min(m - r0), NR.min(n - c0));
                // SAFETY: the tile is inside the output (function contract).
                unsafe {
                    let c = out.add(r0 * ldc + c0);
                    if !epi.accumulate {
                        for i in 0..mr {
                            std::slice::from_raw_parts_mut(c.add(i * ldc), nr).fill(0.0);
                        }
                    }
                    K::finish(c, ldc, r0, c0, mr, nr, epi);
                }
            }
        }
        return;
    }
    let last = a.splits.len() - 1;
    // The sweeps (panel group j0.., k block bi) in order; while one runs, the B rows of the
    // next are prefetched into L2 a few lines per tile, so that only a task's first sweep
    // waits on DRAM for a weight that is not cached (the usual case in a deep model).
    let group = NB_PANELS;
    let sweeps: Vec<(usize, usize, usize)> = (blk.q0..blk.q1)
        .step_by(group)
        .flat_map(|j0| (0..a.splits.len()).map(move |bi| (j0, (j0 + group).min(blk.q1), bi)))
        .collect();
    let tiles = (blk.p1 - blk.p0) * group.min(blk.q1 - blk.q0);
    for (si, &(j0, j1, bi)) in sweeps.iter().enumerate() {
        let (k0, kc) = a.splits[bi];
        let mut ahead = sweeps.get(si + 1).map(|&(nj0, nj1, nbi)| {
            let (nk0, nkc) = a.splits[nbi];
            NextRows::new(b, nj0, nj1, nk0, nkc, tiles)
        });
        for p in blk.p0..blk.p1 {
            let r0 = p * MR;
            let mr = MR.min(m - r0);
            // SAFETY: panel p of k block bi starts at mp*MR*k0 + p*MR*kc and holds kc*MR
            // floats.
            let pa = unsafe { a.data.as_ptr().add(mp * MR * k0 + p * MR * kc) };
            for q in j0..j1 {
                let c0 = q * NR;
                let nr = NR.min(n - c0);
                // SAFETY: panel q holds k*NR floats from q*k*NR; rows k0..k0+kc of it are
                // kc*NR floats from q*k*NR + k0*NR. The tile at (r0, c0) is inside the
                // output.
                unsafe {
                    let pb = b.data.as_ptr().add(q * k * NR + k0 * NR);
                    let c = out.add(r0 * ldc + c0);
                    K::tile(kc, pa, pb, c, ldc, mr, nr, bi > 0 || epi.accumulate);
                    if bi == last {
                        K::finish(c, ldc, r0, c0, mr, nr, epi);
                    }
                }
                if let Some(ahead) = ahead.as_mut() {
                    ahead.step::<K>();
                }
            }
        }
    }
}

/// The cache lines of the `B` rows a coming sweep reads (rows `k0..k0+kc` of panels
/// `q0..q1`), handed out a share per tile of the current sweep.
struct NextRows {
    base: *const f32,
    k: usize,
    q: usize,
    q1: usize,
    k0: usize,
    /// Line within the current panel's rows.
    line: usize,
    lines_per_panel: usize,
    per_tile: usize,
}

impl NextRows {
    fn new(b: &RhsPanels, q0: usize, q1: usize, k0: usize, kc: usize, tiles: usize) -> NextRows {
        let lines_per_panel = kc * NR * 4 / 64;
        let total = (q1 - q0) * lines_per_panel;
        NextRows {
            base: b.data.as_ptr(),
            k: b.k,
            q: q0,
            q1,
            k0,
            line: 0,
            lines_per_panel,
            per_tile: total.div_ceil(tiles.max(1)),
        }
    }

    /// Prefetches the next share of lines into L2.
    #[inline(always)]
    fn step<K: MicroKernel>(&mut self) {
        for _ in 0..self.per_tile {
            if self.q >= self.q1 {
                return;
            }
            // SAFETY: panel q < q1 <= panels holds k*NR floats from q*k*NR; rows k0.. of it
            // span lines_per_panel lines inside it, and `line` stays below that.
            let p = unsafe {
                self.base
                    .add(self.q * self.k * NR + self.k0 * NR + self.line * 16)
            };
            K::prefetch_l2(p);
            self.line += 1;
            if self.line == self.lines_per_panel {
                self.line = 0;
                self.q += 1;
            }
        }
    }
}

/// Applies bias, activation and residual to the `mr x nr` tile at output `(r0, c0)`.
///
/// # Safety
/// `c` points at that tile of an output with row stride `ldc`.
#[inline(always)]
unsafe fn finish_tile(
    c: *mut f32,
    ldc: usize,
    r0: usize,
    c0: usize,
    mr: usize,
    nr: usize,
    epi: &Epilogue<'_>,
) {
    if epi.bias.is_none() && epi.residual.is_none() && epi.activation == Activation::Identity {
        return;
    }
    // one monomorphised loop per activation, so that each vectorises
    macro_rules! with_act {
        ($f:expr) => {
            for i in 0..mr {
                // SAFETY: row i of the tile, nr elements (function contract).
                let row = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), nr) };
                if let Some(bias) = epi.bias {
                    for (o, &bv) in row.iter_mut().zip(&bias[c0..c0 + nr]) {
                        *o += bv;
                    }
                }
                for o in row.iter_mut() {
                    *o = $f(*o);
                }
                if let Some(res) = &epi.residual {
                    if res.cs == 1 {
                        let start = (r0 + i) * res.rs + c0;
                        for (o, &rv) in row.iter_mut().zip(&res.data[start..start + nr]) {
                            *o += rv;
                        }
                    } else {
                        for (j, o) in row.iter_mut().enumerate() {
                            *o += res.at(r0 + i, c0 + j);
                        }
                    }
                }
            }
        };
    }
    match epi.activation {
        Activation::Identity => with_act!(|x: f32| x),
        Activation::GeluErf => with_act!(|x| Activation::GeluErf.apply_f32(x)),
        Activation::GeluTanh => with_act!(|x| Activation::GeluTanh.apply_f32(x)),
        Activation::QuickGelu => with_act!(|x| Activation::QuickGelu.apply_f32(x)),
        Activation::Silu => with_act!(|x| Activation::Silu.apply_f32(x)),
        Activation::Relu => with_act!(|x| Activation::Relu.apply_f32(x)),
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{
        AS_A, AS_P, Activation, Block, Epilogue, LhsPanels, MR, MicroKernel, NR, PREFETCH_STEPS,
        RhsPanels, SQRT_2_OVER_PI, TANH_CUBIC, TAYLOR_EXP2,
    };

    /// The 12 x 32 AVX-512 microkernel.
    pub(super) struct Avx512;

    impl MicroKernel for Avx512 {
        #[inline(always)]
        fn prefetch_l2(p: *const f32) {
            // SAFETY: a prefetch never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
        }

        #[inline(always)]
        unsafe fn finish(
            c: *mut f32,
            ldc: usize,
            r0: usize,
            c0: usize,
            mr: usize,
            nr: usize,
            epi: &Epilogue<'_>,
        ) {
            // SAFETY: compiled into run_block's AVX-512 instance only; forwarded contract.
            unsafe { finish_avx512(c, ldc, r0, c0, mr, nr, epi) }
        }

        #[inline(always)]
        unsafe fn tile(
            kc: usize,
            pa: *const f32,
            pb: *const f32,
            c: *mut f32,
            ldc: usize,
            mr: usize,
            nr: usize,
            accumulate: bool,
        ) {
            // SAFETY: only reached through run_block (below), compiled with AVX-512F, which
            // `run` selects after detecting it; pointer ranges per the trait contract
            // (prefetches may point past them, which never faults).
            unsafe { tile_avx512(kc, pa, pb, c, ldc, mr, nr, accumulate) }
        }
    }

    /// Runs a block with the AVX-512 microkernel; the epilogue is compiled for AVX-512 too.
    ///
    /// # Safety
    /// The CPU has AVX-512F; the rest as [`super::run_block`].
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn run_block(
        a: &LhsPanels,
        b: &RhsPanels,
        out: *mut f32,
        ldc: usize,
        blk: Block,
        epi: &Epilogue<'_>,
    ) {
        // SAFETY: forwarded contract.
        unsafe { super::run_block::<Avx512>(a, b, out, ldc, blk, epi) }
    }

    /// Packs `rows <= W` rows (`ld` apart, unit column stride) of `kc` columns into one
    /// `k`-major panel at `dst` (`W` values per `k` step: a [`MR`]-row panel of `A`, or an
    /// [`NR`]-column panel of `B` from a weight stored `[n, k]`), row `i` times `scale[i]`,
    /// rows past `rows` zero. Each row is read a cache line (16 floats) at a time and every
    /// 16 x 16 block transposed in registers: the 16-lane gather this replaced waited on 16
    /// lines per `k` step and packed a streamed TinyLlama weight at ~3 GB/s, 40% of a
    /// 128-row prefill GEMM's time.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `W <= 32`; `src` has `rows` rows of `kc` readable floats, `ld`
    /// apart; `dst` has `kc * W` writable floats.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack_rows_kmajor<const W: usize>(
        src: *const f32,
        ld: usize,
        rows: usize,
        kc: usize,
        scale: &[f32; W],
        dst: *mut f32,
    ) {
        let lanes = |count: usize, h: usize| -> __mmask16 {
            ((1u32 << count.saturating_sub(16 * h).min(16)) - 1) as __mmask16
        };
        let mut sc = [1f32; 32];
        sc[..W].copy_from_slice(scale);
        // SAFETY: only rows below `rows` and columns below `kc` are loaded (masked loads
        // never touch masked-off lanes); the stores write lanes below W of k steps below kc,
        // inside dst's kc * W.
        unsafe {
            for h in 0..W.div_ceil(16) {
                let live = rows.saturating_sub(16 * h).min(16);
                let store = lanes(W, h);
                let vsc = _mm512_loadu_ps(sc[16 * h..].as_ptr());
                let mut k0 = 0;
                while k0 < kc {
                    let width = (kc - k0).min(16);
                    let kmask = lanes(width, 0);
                    let mut r = [_mm512_setzero_ps(); 16];
                    for (i, ri) in r.iter_mut().enumerate().take(live) {
                        let p = src.add((16 * h + i) * ld + k0);
                        _mm_prefetch::<_MM_HINT_T0>(p.add(64).cast());
                        *ri = _mm512_maskz_loadu_ps(kmask, p);
                    }
                    let t = transpose16(r);
                    for (kk, v) in t.iter().enumerate().take(width) {
                        _mm512_mask_storeu_ps(
                            dst.add((k0 + kk) * W + 16 * h),
                            store,
                            _mm512_mul_ps(*v, vsc),
                        );
                    }
                    k0 += width;
                }
            }
        }
    }

    /// The transpose of a 16 x 16 block held as 16 rows: output `j` holds column `j`.
    #[inline(always)]
    unsafe fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        // SAFETY: register-only AVX-512F shuffles (the caller runs with AVX-512F).
        unsafe {
            // pairs of rows interleaved within each 128-bit lane
            let mut t = [_mm512_setzero_ps(); 16];
            for i in 0..8 {
                t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
                t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
            }
            // u[4g + j]: in 128-bit lane L, column 4L + j of rows 4g..4g+4
            let mut u = [_mm512_setzero_ps(); 16];
            let pd = _mm512_castps_pd;
            for g in 0..4 {
                let (a, b, c, d) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
                u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(a), pd(c)));
                u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(a), pd(c)));
                u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(b), pd(d)));
                u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(b), pd(d)));
            }
            // gather lane L of the four row groups: columns j, 4 + j, 8 + j and 12 + j
            let mut out = [_mm512_setzero_ps(); 16];
            for j in 0..4 {
                let x01 = _mm512_shuffle_f32x4::<0x88>(u[j], u[4 + j]);
                let y01 = _mm512_shuffle_f32x4::<0xDD>(u[j], u[4 + j]);
                let x23 = _mm512_shuffle_f32x4::<0x88>(u[8 + j], u[12 + j]);
                let y23 = _mm512_shuffle_f32x4::<0xDD>(u[8 + j], u[12 + j]);
                out[j] = _mm512_shuffle_f32x4::<0x88>(x01, x23);
                out[8 + j] = _mm512_shuffle_f32x4::<0xDD>(x01, x23);
                out[4 + j] = _mm512_shuffle_f32x4::<0x88>(y01, y23);
                out[12 + j] = _mm512_shuffle_f32x4::<0xDD>(y01, y23);
            }
            out
        }
    }

    /// `e^x` for 16 lanes: the polynomial of `crate::simd::exp_f32`, scaled by `2^n` with
    /// `vscalefps` (exact, and correct into the subnormal range); `t = x log2 e` is clamped
    /// to [-127, 127] (so the result stays finite) with NaN passed through.
    #[inline(always)]
    unsafe fn exp_zmm(x: __m512) -> __m512 {
        // SAFETY: register-only AVX-512F arithmetic (the caller runs with AVX-512F).
        unsafe {
            let t = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E));
            // max/min return their second operand when one is NaN: keep t second
            let t = _mm512_min_ps(
                _mm512_set1_ps(127.0),
                _mm512_max_ps(_mm512_set1_ps(-127.0), t),
            );
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
            let f = _mm512_sub_ps(t, n);
            let mut p = _mm512_set1_ps(TAYLOR_EXP2[6]);
            for &c in TAYLOR_EXP2[..6].iter().rev() {
                p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
            }
            _mm512_scalef_ps(p, n)
        }
    }

    /// `1 / d` for `d >= 1` (or NaN): `vrcp14ps` and one Newton step (relative error below
    /// 2^-27); a reciprocal that flushes to 0 stays 0.
    #[inline(always)]
    unsafe fn recip_zmm(d: __m512) -> __m512 {
        // SAFETY: register-only AVX-512F arithmetic.
        unsafe {
            let r = _mm512_rcp14_ps(d);
            _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0)))
        }
    }

    /// `x * sigmoid(s x)`.
    #[inline(always)]
    unsafe fn x_sigmoid(x: __m512, s: f32) -> __m512 {
        // SAFETY: register-only AVX-512F arithmetic.
        unsafe {
            let e = exp_zmm(_mm512_mul_ps(x, _mm512_set1_ps(-s)));
            _mm512_mul_ps(x, recip_zmm(_mm512_add_ps(e, _mm512_set1_ps(1.0))))
        }
    }

    /// Exact GELU `h Phi(h)` with Phi by A&S 7.1.26, as `crate::activation::cdf_and_gauss`.
    #[inline(always)]
    unsafe fn gelu_erf_zmm(h: __m512) -> __m512 {
        // SAFETY: register-only AVX-512F arithmetic.
        unsafe {
            let z = _mm512_mul_ps(h, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
            let a = _mm512_abs_ps(z);
            let t = recip_zmm(_mm512_fmadd_ps(
                _mm512_set1_ps(AS_P),
                a,
                _mm512_set1_ps(1.0),
            ));
            let mut poly = _mm512_set1_ps(AS_A[4]);
            for &c in AS_A[..4].iter().rev() {
                poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(c));
            }
            poly = _mm512_mul_ps(poly, t);
            let e = exp_zmm(_mm512_mul_ps(_mm512_mul_ps(a, a), _mm512_set1_ps(-1.0)));
            let half_q = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5), poly), e);
            let pos = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(z, _mm512_setzero_ps());
            let cdf = _mm512_mask_blend_ps(pos, half_q, _mm512_sub_ps(_mm512_set1_ps(1.0), half_q));
            _mm512_mul_ps(h, cdf)
        }
    }

    /// One activation on 16 lanes.
    #[inline(always)]
    unsafe fn act_zmm<const A: u8>(x: __m512) -> __m512 {
        // SAFETY: register-only AVX-512F arithmetic.
        unsafe {
            match A {
                1 => gelu_erf_zmm(x),
                2 => {
                    // 0.5 h (1 + tanh u) = h sigmoid(2u)
                    let x2 = _mm512_mul_ps(x, x);
                    let u = _mm512_mul_ps(
                        _mm512_set1_ps(SQRT_2_OVER_PI),
                        _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(TANH_CUBIC), x2), x, x),
                    );
                    let e = exp_zmm(_mm512_mul_ps(u, _mm512_set1_ps(-2.0)));
                    _mm512_mul_ps(x, recip_zmm(_mm512_add_ps(e, _mm512_set1_ps(1.0))))
                }
                3 => x_sigmoid(x, 1.702),
                4 => x_sigmoid(x, 1.0),
                // max returns its second operand (x) when x is NaN
                5 => _mm512_max_ps(_mm512_setzero_ps(), x),
                _ => x,
            }
        }
    }

    /// The AVX-512 epilogue for the AMX backend's output blocks.
    ///
    /// # Safety
    /// As `super::finish_tile`; the CPU has AVX-512F.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn finish_public(
        c: *mut f32,
        ldc: usize,
        r0: usize,
        c0: usize,
        mr: usize,
        nr: usize,
        epi: &Epilogue<'_>,
    ) {
        // SAFETY: forwarded contract.
        unsafe { finish_avx512(c, ldc, r0, c0, mr, nr, epi) }
    }

    /// The epilogue on a tile with 16-lane vectors: bias, activation and residual in one pass.
    ///
    /// # Safety
    /// As `super::finish_tile`; the CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn finish_avx512(
        c: *mut f32,
        ldc: usize,
        r0: usize,
        c0: usize,
        mr: usize,
        nr: usize,
        epi: &Epilogue<'_>,
    ) {
        match epi.activation {
            _ if epi.bias.is_none()
                && epi.residual.is_none()
                && epi.activation == Activation::Identity => {}
            // SAFETY (all arms): forwarded contract.
            Activation::Identity => unsafe { finish_with::<0>(c, ldc, r0, c0, mr, nr, epi) },
            Activation::GeluErf => unsafe { finish_with::<1>(c, ldc, r0, c0, mr, nr, epi) },
            Activation::GeluTanh => unsafe { finish_with::<2>(c, ldc, r0, c0, mr, nr, epi) },
            Activation::QuickGelu => unsafe { finish_with::<3>(c, ldc, r0, c0, mr, nr, epi) },
            Activation::Silu => unsafe { finish_with::<4>(c, ldc, r0, c0, mr, nr, epi) },
            Activation::Relu => unsafe { finish_with::<5>(c, ldc, r0, c0, mr, nr, epi) },
        }
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn finish_with<const A: u8>(
        c: *mut f32,
        ldc: usize,
        r0: usize,
        c0: usize,
        mr: usize,
        nr: usize,
        epi: &Epilogue<'_>,
    ) {
        // SAFETY: the tile's rows hold nr valid elements (contract); lanes past nr are masked
        // off in every load and store; bias has n >= c0 + nr elements and the residual view
        // covers the output's shape (checked by `run`).
        unsafe {
            for i in 0..mr {
                let row = c.add(i * ldc);
                for v in 0..nr.div_ceil(16) {
                    let j = 16 * v;
                    let left = nr - j;
                    let mk: __mmask16 = if left >= 16 {
                        0xFFFF
                    } else {
                        (1u16 << left) - 1
                    };
                    let mut x = _mm512_maskz_loadu_ps(mk, row.add(j));
                    if let Some(b) = epi.bias {
                        x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(mk, b.as_ptr().add(c0 + j)));
                    }
                    x = act_zmm::<A>(x);
                    if let Some(res) = &epi.residual {
                        let rv = if res.cs == 1 {
                            _mm512_maskz_loadu_ps(
                                mk,
                                res.data.as_ptr().add((r0 + i) * res.rs + c0 + j),
                            )
                        } else {
                            let mut tmp = [0f32; 16];
                            for (l, t) in tmp.iter_mut().enumerate().take(left.min(16)) {
                                *t = res.at(r0 + i, c0 + j + l);
                            }
                            _mm512_loadu_ps(tmp.as_ptr())
                        };
                        x = _mm512_add_ps(x, rv);
                    }
                    _mm512_mask_storeu_ps(row.add(j), mk, x);
                }
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_avx512(
        kc: usize,
        pa: *const f32,
        pb: *const f32,
        c: *mut f32,
        ldc: usize,
        mr: usize,
        nr: usize,
        accumulate: bool,
    ) {
        // SAFETY: see the trait contract; masked loads/stores touch only the nr valid columns.
        unsafe {
            for i in 0..mr {
                _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc).cast());
                _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc + 16).cast());
            }
            let mut acc = [[_mm512_setzero_ps(); 2]; MR];
            let (mut a, mut b) = (pa, pb);
            for _ in 0..kc {
                let b0 = _mm512_loadu_ps(b);
                let b1 = _mm512_loadu_ps(b.add(16));
                _mm_prefetch::<_MM_HINT_T0>(b.add(PREFETCH_STEPS * NR).cast());
                _mm_prefetch::<_MM_HINT_T0>(b.add(PREFETCH_STEPS * NR + 16).cast());
                for (i, r) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*a.add(i));
                    r[0] = _mm512_fmadd_ps(av, b0, r[0]);
                    r[1] = _mm512_fmadd_ps(av, b1, r[1]);
                }
                a = a.add(MR);
                b = b.add(NR);
            }
            let m0: __mmask16 = if nr >= 16 { 0xFFFF } else { (1u16 << nr) - 1 };
            let m1: __mmask16 = if nr >= NR {
                0xFFFF
            } else if nr > 16 {
                (1u16 << (nr - 16)) - 1
            } else {
                0
            };
            for (i, r) in acc.iter().enumerate().take(mr) {
                let p = c.add(i * ldc);
                let (mut v0, mut v1) = (r[0], r[1]);
                if accumulate {
                    v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, p), v0);
                    v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, p.add(16)), v1);
                }
                _mm512_mask_storeu_ps(p, m0, v0);
                _mm512_mask_storeu_ps(p.add(16), m1, v1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k_splits_cover_k_in_near_equal_blocks() {
        assert!(k_splits(0).is_empty());
        assert_eq!(k_splits(1), vec![(0, 1)]);
        assert_eq!(k_splits(512), vec![(0, 512)]);
        assert_eq!(k_splits(577), vec![(0, 289), (289, 288)]);
        let s = k_splits(4096);
        assert_eq!(s.len(), 8);
        assert!(s.iter().all(|&(_, kc)| kc == 512));
    }

    #[test]
    fn bad_shapes_are_errors_naming_the_sizes() {
        let a = [0f32; 6];
        let mut c = [0f32; 4];
        let e = MatRef::row_major(&a, 2, 4).unwrap_err().to_string();
        assert!(e.contains("2 x 4") && e.contains("got 6"), "{e}");
        let e = MatRef::new(&a, 2, 3, 4, 1).unwrap_err().to_string();
        assert!(e.contains("exceeds"), "{e}");
        let am = MatRef::row_major(&a, 2, 3).unwrap();
        let e = cpu(
            am,
            am,
            MatMut::row_major(&mut c, 2, 2).unwrap(),
            &Epilogue::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("inner dims differ"), "{e}");
        let bias = [0f32; 3];
        let epi = Epilogue {
            bias: Some(&bias),
            ..Epilogue::default()
        };
        let e = cpu(am, am.t(), MatMut::row_major(&mut c, 2, 2).unwrap(), &epi)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bias has 3"), "{e}");
        let e = MatMut::new(&mut c, 2, 3, 2).unwrap_err().to_string();
        assert!(e.contains("overlap"), "{e}");
    }
}
