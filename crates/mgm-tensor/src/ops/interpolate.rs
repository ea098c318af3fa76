//! Spatial resizing of `[N, C, H, W]` tensors with backward, matching PyTorch's
//! `F.interpolate` for modes `bilinear`, `bicubic` (A = -0.75, taps clamped to the border) and
//! `nearest`, without antialiasing.
//!
//! All three modes are separable: each output row (column) is a fixed weighted sum of a few input
//! rows (columns). A plan per axis holds those taps; the kernel applies the vertical taps first
//! (whole-row multiply-adds, which vectorise) and then gathers along W. The backward pass is the
//! adjoint of the same two steps.

use rayon::prelude::*;

use crate::autograd::{Backward, attach};
use crate::ops::conv::{Compute, min_items, with_compute};
use crate::{Error, Float, Result, Tensor};

/// Resampling kernel of [`Tensor::interpolate`], named as in `torch.nn.functional.interpolate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InterpolateMode {
    /// Linear in each of H and W (`mode="bilinear"`).
    Bilinear,
    /// Cubic convolution with A = -0.75 (`mode="bicubic"`).
    Bicubic,
    /// Nearest neighbour, `src = floor(dst * in / out)` (`mode="nearest"`).
    Nearest,
}

impl InterpolateMode {
    fn op(self) -> &'static str {
        match self {
            InterpolateMode::Bilinear => "upsample_bilinear2d",
            InterpolateMode::Bicubic => "upsample_bicubic2d",
            InterpolateMode::Nearest => "upsample_nearest2d",
        }
    }
}

/// For one axis: each output position reads `taps` input positions with fixed weights.
struct AxisPlan<F> {
    taps: usize,
    /// `out_len * taps` input indices.
    idx: Vec<usize>,
    /// `out_len * taps` weights.
    wts: Vec<F>,
}

/// PyTorch's `area_pixel_compute_scale` when only the output size is given.
fn pixel_scale<F: Float>(input: usize, output: usize, align_corners: bool) -> F {
    if align_corners {
        if output > 1 {
            F::c((input - 1) as f64) / F::c((output - 1) as f64)
        } else {
            F::zero()
        }
    } else {
        F::c(input as f64) / F::c(output as f64)
    }
}

/// PyTorch's `area_pixel_compute_source_index`: the (fractional) input coordinate of output
/// position `dst`; linear modes clamp negative coordinates to 0, cubic does not.
fn source_coord<F: Float>(scale: F, dst: usize, align_corners: bool, cubic: bool) -> F {
    let d = F::c(dst as f64);
    if align_corners {
        scale * d
    } else {
        let s = scale * (d + F::c(0.5)) - F::c(0.5);
        if !cubic && s < F::zero() {
            F::zero()
        } else {
            s
        }
    }
}

/// Cubic convolution weights of the four taps at `floor(src) - 1 ..= floor(src) + 2` for the
/// fractional part `t` (Keys kernel with A = -0.75, as PyTorch).
fn cubic_weights<F: Float>(t: F) -> [F; 4] {
    let a = F::c(-0.75);
    let near = |x: F| ((a + F::c(2.0)) * x - (a + F::c(3.0))) * x * x + F::one();
    let far = |x: F| ((a * x - F::c(5.0) * a) * x + F::c(8.0) * a) * x - F::c(4.0) * a;
    let u = F::one() - t;
    [far(t + F::one()), near(t), near(u), far(u + F::one())]
}

impl<F: Float> AxisPlan<F> {
    fn new(mode: InterpolateMode, input: usize, output: usize, align_corners: bool) -> AxisPlan<F> {
        let last = input - 1;
        match mode {
            InterpolateMode::Bilinear => {
                let scale = pixel_scale::<F>(input, output, align_corners);
                let mut idx = Vec::with_capacity(2 * output);
                let mut wts = Vec::with_capacity(2 * output);
                for d in 0..output {
                    let src = source_coord(scale, d, align_corners, false);
                    // the index is clamped so rounding at the last position cannot step outside
                    let i0 = (src.floor().to_f64() as usize).min(last);
                    let mut l = src - F::c(i0 as f64);
                    l = if l < F::zero() {
                        F::zero()
                    } else if l > F::one() {
                        F::one()
                    } else {
                        l
                    };
                    idx.extend([i0, (i0 + 1).min(last)]);
                    wts.extend([F::one() - l, l]);
                }
                AxisPlan { taps: 2, idx, wts }
            }
            InterpolateMode::Bicubic => {
                let scale = pixel_scale::<F>(input, output, align_corners);
                let mut idx = Vec::with_capacity(4 * output);
                let mut wts = Vec::with_capacity(4 * output);
                for d in 0..output {
                    let src = source_coord(scale, d, align_corners, true);
                    let fl = src.floor();
                    let base = fl.to_f64() as i64;
                    wts.extend(cubic_weights(src - fl));
                    idx.extend((0..4).map(|k| (base - 1 + k).clamp(0, last as i64) as usize));
                }
                AxisPlan { taps: 4, idx, wts }
            }
            InterpolateMode::Nearest => {
                // PyTorch computes the nearest index in f32 whatever the dtype, with exact
                // shortcuts for equal and doubled sizes.
                let scale = input as f32 / output as f32;
                let idx = (0..output)
                    .map(|d| {
                        if output == input {
                            d
                        } else if output == 2 * input {
                            d >> 1
                        } else {
                            ((d as f32 * scale).floor() as usize).min(last)
                        }
                    })
                    .collect();
                AxisPlan {
                    taps: 1,
                    idx,
                    wts: vec![F::one(); output],
                }
            }
        }
    }

    fn taps_of(&self, o: usize) -> impl Iterator<Item = (usize, F)> + '_ {
        let r = o * self.taps..(o + 1) * self.taps;
        self.idx[r.clone()]
            .iter()
            .copied()
            .zip(self.wts[r].iter().copied())
    }
}

/// Shapes of one resize.
#[derive(Clone, Copy, Debug)]
struct Resize {
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
}

fn resize_forward<F: Compute>(x: &[F], r: &Resize, py: &AxisPlan<F>, px: &AxisPlan<F>) -> Vec<F> {
    let (hw, ohw) = (r.h * r.w, r.oh * r.ow);
    let mut out = vec![F::zero(); r.planes * ohw];
    if out.is_empty() {
        return out;
    }
    let work = r.oh * r.w * py.taps + ohw * px.taps;
    out.par_chunks_mut(ohw)
        .enumerate()
        .with_min_len(min_items(work))
        .for_each_init(Vec::new, |tmp, (p, o)| {
            let plane = &x[p * hw..(p + 1) * hw];
            tmp.clear();
            tmp.resize(r.oh * r.w, F::zero());
            for (oh, trow) in tmp.chunks_mut(r.w).enumerate() {
                for (i, wt) in py.taps_of(oh) {
                    for (t, &v) in trow.iter_mut().zip(&plane[i * r.w..(i + 1) * r.w]) {
                        *t += wt * v;
                    }
                }
            }
            for (orow, trow) in o.chunks_mut(r.ow).zip(tmp.chunks(r.w)) {
                for (ow, e) in orow.iter_mut().enumerate() {
                    let mut s = F::zero();
                    for (j, wt) in px.taps_of(ow) {
                        s += wt * trow[j];
                    }
                    *e = s;
                }
            }
        });
    out
}

fn resize_backward<F: Compute>(gy: &[F], r: &Resize, py: &AxisPlan<F>, px: &AxisPlan<F>) -> Vec<F> {
    let (hw, ohw) = (r.h * r.w, r.oh * r.ow);
    let mut dx = vec![F::zero(); r.planes * hw];
    if dx.is_empty() {
        return dx;
    }
    let work = r.oh * r.w * py.taps + ohw * px.taps;
    dx.par_chunks_mut(hw)
        .enumerate()
        .with_min_len(min_items(work))
        .for_each_init(Vec::new, |tmp, (p, d)| {
            let go = &gy[p * ohw..(p + 1) * ohw];
            tmp.clear();
            tmp.resize(r.oh * r.w, F::zero());
            for (grow, trow) in go.chunks(r.ow).zip(tmp.chunks_mut(r.w)) {
                for (ow, &g) in grow.iter().enumerate() {
                    for (j, wt) in px.taps_of(ow) {
                        trow[j] += wt * g;
                    }
                }
            }
            for (oh, trow) in tmp.chunks(r.w).enumerate() {
                for (i, wt) in py.taps_of(oh) {
                    for (e, &t) in d[i * r.w..(i + 1) * r.w].iter_mut().zip(trow) {
                        *e += wt * t;
                    }
                }
            }
        });
    dx
}

struct ResizeBackward {
    mode: InterpolateMode,
    align_corners: bool,
    input: Tensor,
    resize: Resize,
}

impl Backward for ResizeBackward {
    fn name(&self) -> &'static str {
        self.mode.op()
    }
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.input]
    }
    fn backward(&self, _out: &Tensor, gy: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let r = &self.resize;
        let dtype = self.input.dtype();
        let dx = with_compute!(dtype, F => {
            let gy = F::data(gy, self.name())?;
            let py = AxisPlan::<F>::new(self.mode, r.h, r.oh, self.align_corners);
            let px = AxisPlan::<F>::new(self.mode, r.w, r.ow, self.align_corners);
            Tensor::from_float_vec(resize_backward(&gy, r, &py, &px), self.input.shape(), dtype)?
        });
        Ok(vec![Some(dx)])
    }
}

impl Tensor {
    /// Resizes the spatial dims of `[N, C, H, W]` to `size = (out_h, out_w)` like
    /// `F.interpolate(x, size, mode, align_corners)` (no antialiasing). `align_corners` must be
    /// false for [`InterpolateMode::Nearest`], as PyTorch requires.
    pub fn interpolate(
        &self,
        size: (usize, usize),
        mode: InterpolateMode,
        align_corners: bool,
    ) -> Result<Tensor> {
        let op = mode.op();
        self.ensure_float(op)?;
        let s = self.shape();
        if s.len() != 4 {
            return Err(Error::invalid_shape(
                op,
                s,
                format!("expected a [N, C, H, W] input, output size {size:?}"),
            ));
        }
        if s[2] == 0 || s[3] == 0 || size.0 == 0 || size.1 == 0 {
            return Err(Error::invalid_shape(
                op,
                s,
                format!("input and output spatial sizes must be non-zero (output size {size:?})"),
            ));
        }
        if mode == InterpolateMode::Nearest && align_corners {
            return Err(Error::invalid_shape(
                op,
                s,
                "align_corners only applies to bilinear and bicubic modes",
            ));
        }
        let resize = Resize {
            planes: s[0] * s[1],
            h: s[2],
            w: s[3],
            oh: size.0,
            ow: size.1,
        };
        let dtype = self.dtype();
        let out = with_compute!(dtype, F => {
            let x = F::data(self, op)?;
            let py = AxisPlan::<F>::new(mode, resize.h, resize.oh, align_corners);
            let px = AxisPlan::<F>::new(mode, resize.w, resize.ow, align_corners);
            Tensor::from_float_vec(resize_forward(&x, &resize, &py, &px), &[s[0], s[1], size.0, size.1], dtype)?
        });
        Ok(attach(out, || ResizeBackward {
            mode,
            align_corners,
            input: self.clone(),
            resize,
        }))
    }

    /// Bilinear resize of `[N, C, H, W]` to `[N, C, out_h, out_w]`, exactly
    /// `F.interpolate(mode="bilinear", antialias=False)`.
    pub fn upsample_bilinear2d(
        &self,
        out_h: usize,
        out_w: usize,
        align_corners: bool,
    ) -> Result<Tensor> {
        self.interpolate((out_h, out_w), InterpolateMode::Bilinear, align_corners)
    }

    /// Bicubic resize of `[N, C, H, W]` to `[N, C, out_h, out_w]`, exactly
    /// `F.interpolate(mode="bicubic", antialias=False)` (values may overshoot the input range).
    pub fn upsample_bicubic2d(
        &self,
        out_h: usize,
        out_w: usize,
        align_corners: bool,
    ) -> Result<Tensor> {
        self.interpolate((out_h, out_w), InterpolateMode::Bicubic, align_corners)
    }

    /// Nearest-neighbour resize of `[N, C, H, W]`, exactly `F.interpolate(mode="nearest")`.
    pub fn upsample_nearest2d(&self, out_h: usize, out_w: usize) -> Result<Tensor> {
        self.interpolate((out_h, out_w), InterpolateMode::Nearest, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cubic_weights_sum_to_one() {
        for k in 0..10 {
            let w = cubic_weights(k as f64 / 10.0);
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
        assert_eq!(cubic_weights(0.0f64), [0.0, 1.0, 0.0, 0.0]);
    }
}
