//! MGM's patch-info mining: each low-resolution token attends to its own window of
//! high-resolution sub-patches (DESIGN.md section 1).
//!
//! `Q = LN+Linear(X_LR)`, `K = LN+Linear(X_HR)`, `V = LN+Linear(X_HR)` (LayerNorm eps 1e-5);
//! token `w = pr * G + pc` of the `G x G` low-res grid sees the `M x M` high-res pixels
//! `(pr * M + ir, pc * M + ic)`, in-window index `ir * M + ic`; `mined = softmax(q K^T /
//! sqrt(d)) V` over those `M^2` entries, with NaN scores replaced by 0 before the softmax (as
//! MGM's `nan_to_num`), and the result is `X_LR + mined` with the unprojected `X_LR`. As in
//! MGM's code the keys are divided by `sqrt(d)` before the product. Everything is tensor ops,
//! so gradients flow to the inputs and to all six layers.

use mgm_tensor::Tensor;
use mgm_tensor::nn::{LayerNorm, Linear, Module, VarStore};

use crate::error::{Result, invalid};

const WHAT: &str = "patch-info mining";
/// MGM's LayerNorm eps (PyTorch's default).
pub const LN_EPS: f64 = 1e-5;

/// One `LayerNorm` then `Linear` (MGM's `nn.Sequential(LayerNorm, Linear)`, names `0`, `1`).
#[derive(Clone, Debug)]
pub struct NormLinear {
    norm: LayerNorm,
    linear: Linear,
}

impl NormLinear {
    /// Loads `0.{weight,bias}` (LayerNorm over `in_dim`) and `1.{weight,bias}` (Linear).
    pub fn load(vs: &VarStore, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(NormLinear {
            norm: LayerNorm::load(&vs.pp("0"), in_dim, LN_EPS)?,
            linear: Linear::load(&vs.pp("1"), in_dim, out_dim, true)?,
        })
    }

    /// `Linear(LayerNorm(x))`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.linear.forward(&self.norm.forward(x)?)?)
    }
}

/// The mining module: query, key (MGM's `aux`) and value projections.
#[derive(Clone, Debug)]
pub struct PatchInfoMining {
    query: NormLinear,
    aux: NormLinear,
    val: NormLinear,
    lr_dim: usize,
    hr_dim: usize,
}

impl PatchInfoMining {
    /// Loads MGM's `vlm_uni_query_projector`, `vlm_uni_aux_projector` and
    /// `vlm_uni_val_projector` from under `vs` (e.g. `model.`): `lr_dim` is the low-res width
    /// (CLIP's 1024, also the mined width), `hr_dim` the high-res one (ConvNeXt's 2880).
    ///
    /// ```
    /// use mgm_fusion::PatchInfoMining;
    /// use mgm_tensor::{nn::VarStore, DType, Device, Tensor};
    /// let mining = PatchInfoMining::load(&VarStore::new_trainable(0), 8, 12)?;
    /// let x_lr = Tensor::randn(0, &[1, 4, 8], 0.0, 1.0, DType::F32, Device::Cpu)?; // 2 x 2 grid
    /// let x_hr = Tensor::randn(1, &[1, 12, 6, 6], 0.0, 1.0, DType::F32, Device::Cpu)?; // 3 x 3 windows
    /// assert_eq!(mining.forward(&x_lr, &x_hr)?.shape(), &[1, 4, 8]);
    /// # Ok::<(), mgm_fusion::Error>(())
    /// ```
    pub fn load(vs: &VarStore, lr_dim: usize, hr_dim: usize) -> Result<Self> {
        Ok(PatchInfoMining {
            query: NormLinear::load(&vs.pp("vlm_uni_query_projector"), lr_dim, lr_dim)?,
            aux: NormLinear::load(&vs.pp("vlm_uni_aux_projector"), hr_dim, lr_dim)?,
            val: NormLinear::load(&vs.pp("vlm_uni_val_projector"), hr_dim, lr_dim)?,
            lr_dim,
            hr_dim,
        })
    }

    /// Low-res (and output) width.
    pub fn lr_dim(&self) -> usize {
        self.lr_dim
    }

    /// High-res width.
    pub fn hr_dim(&self) -> usize {
        self.hr_dim
    }

    /// Mines `x_lr` `[B, G*G, lr_dim]` against the high-res map `x_hr` `[B, hr_dim, G*M,
    /// G*M]`: `M` is the ratio of the grids. Returns `[B, G*G, lr_dim]`.
    pub fn forward(&self, x_lr: &Tensor, x_hr: &Tensor) -> Result<Tensor> {
        let (b, n) = self.check_lr(x_lr)?;
        let grid = (n as f64).sqrt().round() as usize;
        if grid * grid != n {
            return Err(invalid(
                WHAT,
                format!("{n} low-res tokens are not a square grid"),
            ));
        }
        if x_hr.rank() != 4 || x_hr.shape()[0] != b || x_hr.shape()[1] != self.hr_dim {
            return Err(invalid(
                WHAT,
                format!(
                    "high-res map {:?} is not [{b}, {}, H, W]",
                    x_hr.shape(),
                    self.hr_dim
                ),
            ));
        }
        self.forward_windows(x_lr, &windows(x_hr, grid)?)
    }

    /// Mines `x_lr` `[B, N, lr_dim]` against windows already cut, `[B, N, M*M, hr_dim]`
    /// (window `w` for token `w`, see [`windows`]).
    pub fn forward_windows(&self, x_lr: &Tensor, win: &Tensor) -> Result<Tensor> {
        let (b, n) = self.check_lr(x_lr)?;
        if win.rank() != 4
            || win.shape()[0] != b
            || win.shape()[1] != n
            || win.shape()[3] != self.hr_dim
        {
            return Err(invalid(
                WHAT,
                format!(
                    "windows {:?} are not [{b}, {n}, M*M, {}]",
                    win.shape(),
                    self.hr_dim
                ),
            ));
        }
        let d = self.lr_dim as f64;
        let q = self.query.forward(x_lr)?.unsqueeze(2)?; // [B, N, 1, d]
        let k = self.aux.forward(win)?; // [B, N, M2, d]
        let v = self.val.forward(win)?;
        let kt = k.transpose(-1, -2)?.affine(1.0 / d.sqrt(), 0.0)?;
        let s = q.matmul(&kt)?; // [B, N, 1, M2]
        let s = s.masked_fill(&s.ne(&s)?, 0.0)?;
        let mined = s.softmax(-1)?.matmul(&v)?.squeeze(2)?;
        Ok(x_lr.add(&mined)?)
    }

    fn check_lr(&self, x_lr: &Tensor) -> Result<(usize, usize)> {
        match x_lr.shape() {
            &[b, n, c] if c == self.lr_dim && n > 0 => Ok((b, n)),
            s => Err(invalid(
                WHAT,
                format!("low-res features {s:?} are not [B, N, {}]", self.lr_dim),
            )),
        }
    }
}

/// Cuts a `[B, C, G*M, G*M]` map into the `G * G` windows of `M x M` pixels: `[B, G*G, M*M,
/// C]`, window `pr * G + pc`, in-window index `ir * M + ic`.
pub fn windows(x_hr: &Tensor, grid: usize) -> Result<Tensor> {
    let s = x_hr.shape();
    let (b, c, h, w) = match s {
        &[b, c, h, w] => (b, c, h, w),
        _ => {
            return Err(invalid(
                WHAT,
                format!("high-res map {s:?} is not [B, C, H, W]"),
            ));
        }
    };
    if grid == 0 || h != w || h % grid != 0 {
        return Err(invalid(
            WHAT,
            format!("a {h} x {w} high-res map does not split into {grid} x {grid} square windows"),
        ));
    }
    let m = h / grid;
    Ok(x_hr
        .reshape(&[b, c, grid, m, grid, m])?
        .permute(&[0, 2, 4, 3, 5, 1])?
        .reshape(&[b, grid * grid, m * m, c])?)
}
