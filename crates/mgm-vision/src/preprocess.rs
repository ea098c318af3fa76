//! CLIP image preprocessing as transformers' `CLIPImageProcessor` does it: decode, convert to
//! RGB, resize the shortest edge (bicubic with antialiasing), center crop, rescale by 1/255 and
//! normalize with the CLIP mean and std, plus LLaVA's pad-to-square (`expand2square`).
//!
//! Two resamplers are provided because transformers has two processors that disagree by up to
//! a few 8-bit levels:
//! - [`ResizeBackend::Torchvision`] (default): transformers 5.x's `CLIPImageProcessor`, which
//!   resizes the uint8 image with torchvision / ATen's antialiased bicubic (`a = -0.5`, support
//!   scaled by the downscale factor as in PIL). ATen computes the weights in f64, normalises them,
//!   and rounds them to int16 fixed point with a precision chosen from the largest weight; it
//!   runs the horizontal pass then the vertical one, rounding and clamping to 0..255 after each.
//! - [`ResizeBackend::Pillow`]: `CLIPImageProcessorPil` (transformers 4.x semantics, which
//!   LLaVA/MGM were trained with): Pillow's `Image.resize(BICUBIC)` on 8-bit RGB, the same
//!   filter with 22-bit coefficients, rounding and clamping after each pass. We run the
//!   horizontal pass first, as Pillow's `Resample.c` does; Pillow 13 runs the vertical pass
//!   first for some size combinations, and where it does the result can differ by about one
//!   level at a few pixels.
//!
//! RGB conversion follows what each path feeds the processor: transformers' `convert_to_rgb`
//! composites transparent pixels onto white (Pillow's integer `alpha_composite`), while LLaVA's
//! `Image.open(f).convert("RGB")` drops alpha ([`AlphaMode`]). Grayscale is replicated.

use std::path::Path;

use mgm_tensor::Tensor;
use serde::Deserialize;

use crate::config::read_json;
use crate::{Error, Result};

/// OpenAI CLIP's normalisation mean (RGB).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP's normalisation std (RGB).
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// An 8-bit RGB image, rows top to bottom, pixels interleaved `[r, g, b]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    width: usize,
    height: usize,
    data: Vec<u8>,
}

impl RgbImage {
    /// An image from interleaved RGB bytes (`width * height * 3` of them).
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<RgbImage> {
        if data.len() != width * height * 3 {
            return Err(Error::invalid_input(
                "RgbImage::new",
                format!(
                    "{width}x{height} RGB needs {} bytes, got {}",
                    width * height * 3,
                    data.len()
                ),
            ));
        }
        Ok(RgbImage {
            width,
            height,
            data,
        })
    }

    /// A `width x height` image filled with one colour.
    pub fn filled(width: usize, height: usize, color: [u8; 3]) -> RgbImage {
        let data = color
            .iter()
            .copied()
            .cycle()
            .take(width * height * 3)
            .collect();
        RgbImage {
            width,
            height,
            data,
        }
    }

    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// The interleaved RGB bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.data
    }

    /// The pixel at column `x`, row `y`.
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let o = (y * self.width + x) * 3;
        [self.data[o], self.data[o + 1], self.data[o + 2]]
    }
}

/// What RGB conversion does with an alpha channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AlphaMode {
    /// Composite onto opaque white, as transformers' `convert_to_rgb` does (the processor path).
    #[default]
    CompositeWhite,
    /// Drop alpha, as PIL's `convert("RGB")` does (LLaVA's pad path).
    Drop,
}

/// Pillow's `alpha_composite` of one pixel over opaque white, in its 7-bit fixed point.
fn over_white(c: u8, a: u8) -> u8 {
    if a == 0 {
        return 255;
    }
    const PREC: u32 = 7;
    let (c, a) = (c as u32, a as u32);
    // background alpha is 255, so the output alpha is 255 * 255 and coef1 = a << PREC exactly
    let coef1 = a * 255 * 255 * (1 << PREC) / (255 * 255);
    let coef2 = 255 * (1 << PREC) - coef1;
    let t = c * coef1 + 255 * coef2 + (0x80 << PREC);
    (((t >> 8) + t) >> 8 >> PREC) as u8
}

/// Decodes a PNG or JPEG from memory to RGB; `name` labels errors.
pub fn decode_image(bytes: &[u8], name: &str, alpha: AlphaMode) -> Result<RgbImage> {
    use image::DynamicImage as D;
    let img = image::load_from_memory(bytes).map_err(|e| Error::ImageDecode {
        path: name.to_string(),
        msg: e.to_string(),
    })?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let with_alpha = |rgba: &[u8]| -> Vec<u8> {
        let mut out = Vec::with_capacity(w * h * 3);
        for p in rgba.chunks_exact(4) {
            match alpha {
                AlphaMode::Drop => out.extend_from_slice(&p[..3]),
                AlphaMode::CompositeWhite => {
                    out.extend(p[..3].iter().map(|&c| over_white(c, p[3])));
                }
            }
        }
        out
    };
    // 16-bit images keep their high byte (what PIL does for 16-bit RGB PNGs).
    let data = match img {
        D::ImageRgb8(b) => b.into_raw(),
        D::ImageLuma8(b) => b.into_raw().iter().flat_map(|&v| [v, v, v]).collect(),
        D::ImageRgba8(b) => with_alpha(b.as_raw()),
        D::ImageLumaA8(b) => {
            let rgba: Vec<u8> = b
                .as_raw()
                .chunks_exact(2)
                .flat_map(|p| [p[0], p[0], p[0], p[1]])
                .collect();
            with_alpha(&rgba)
        }
        D::ImageRgb16(b) => b.into_raw().iter().map(|&v| (v >> 8) as u8).collect(),
        D::ImageLuma16(b) => b
            .into_raw()
            .iter()
            .flat_map(|&v| [(v >> 8) as u8; 3])
            .collect(),
        D::ImageRgba16(b) => {
            let rgba: Vec<u8> = b.as_raw().iter().map(|&v| (v >> 8) as u8).collect();
            with_alpha(&rgba)
        }
        D::ImageLumaA16(b) => {
            let rgba: Vec<u8> = b
                .as_raw()
                .chunks_exact(2)
                .flat_map(|p| {
                    let (l, a) = ((p[0] >> 8) as u8, (p[1] >> 8) as u8);
                    [l, l, l, a]
                })
                .collect();
            with_alpha(&rgba)
        }
        other => {
            return Err(Error::ImageDecode {
                path: name.to_string(),
                msg: format!("unsupported pixel format {:?}", other.color()),
            });
        }
    };
    RgbImage::new(w, h, data)
}

/// Reads and decodes a PNG or JPEG file to RGB; errors name the file.
pub fn load_image(path: impl AsRef<Path>, alpha: AlphaMode) -> Result<RgbImage> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    decode_image(&bytes, &path.display().to_string(), alpha)
}

/// [`load_image`] that refuses an image of more than `max_pixels` pixels before decoding it
/// (the header is read first), so a huge or malicious file cannot exhaust memory.
pub fn load_image_limited(
    path: impl AsRef<Path>,
    alpha: AlphaMode,
    max_pixels: usize,
) -> Result<RgbImage> {
    let path = path.as_ref();
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: name.clone(),
        source,
    })?;
    let (w, h) = image::ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| Error::ImageDecode {
            path: name.clone(),
            msg: e.to_string(),
        })?
        .into_dimensions()
        .map_err(|e| Error::ImageDecode {
            path: name.clone(),
            msg: e.to_string(),
        })?;
    let pixels = w as usize * h as usize;
    if pixels > max_pixels {
        return Err(Error::InvalidInput {
            what: "image",
            msg: format!("{name} is {w} x {h} = {pixels} pixels, over the limit of {max_pixels}"),
        });
    }
    decode_image(&bytes, &name, alpha)
}

/// LLaVA's `expand2square`: the image pasted centred on a square canvas of `color` (offset
/// `(w - h) / 2` rows, or `(h - w) / 2` columns, rounded down as PIL's `paste` receives it).
pub fn expand_to_square(img: &RgbImage, color: [u8; 3]) -> RgbImage {
    let (w, h) = (img.width, img.height);
    if w == h {
        return img.clone();
    }
    let side = w.max(h);
    let mut out = RgbImage::filled(side, side, color);
    let (x0, y0) = if w > h {
        (0, (w - h) / 2)
    } else {
        ((h - w) / 2, 0)
    };
    for y in 0..h {
        let src = &img.data[y * w * 3..(y + 1) * w * 3];
        let o = ((y0 + y) * side + x0) * 3;
        out.data[o..o + w * 3].copy_from_slice(src);
    }
    out
}

/// Which implementation of the antialiased resize to reproduce (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResizeBackend {
    /// transformers 5.x `CLIPImageProcessor` (torchvision / ATen uint8 antialiased resize).
    #[default]
    Torchvision,
    /// transformers' `CLIPImageProcessorPil` / 4.x (Pillow `Image.resize`).
    Pillow,
}

/// The resampling filter (`resample` in preprocessor_config.json).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// PIL `BICUBIC` (3): cubic convolution with `a = -0.5`, support 2.
    Bicubic,
    /// PIL `BILINEAR` (2): triangle, support 1.
    Bilinear,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bicubic => 2.0,
            Filter::Bilinear => 1.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
        }
    }
}

/// One axis of a resize: for each output index the first input index, the tap count, and
/// `ksize` fixed-point weights scaled by `2^prec`.
struct AxisPlan {
    start: Vec<usize>,
    taps: Vec<usize>,
    ksize: usize,
    weights: Vec<i64>,
    prec: u32,
}

impl AxisPlan {
    /// PIL's `precompute_coeffs` (= ATen's `_compute_indices_min_size_weights_aa`), then the
    /// backend's fixed-point rounding.
    fn new(in_size: usize, out_size: usize, filter: Filter, backend: ResizeBackend) -> AxisPlan {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut start = Vec::with_capacity(out_size);
        let mut taps = Vec::with_capacity(out_size);
        let mut w = vec![0f64; out_size * ksize];
        let mut wmax = 0f64;
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            // C casts truncate toward zero, then clamp (negative starts become 0)
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(0) as usize;
            let n = xmax.saturating_sub(xmin).min(ksize);
            let row = &mut w[xx * ksize..xx * ksize + n];
            let mut total = 0.0;
            for (x, k) in row.iter_mut().enumerate() {
                *k = filter.eval((x as f64 + xmin as f64 - center + 0.5) / filterscale);
                total += *k;
            }
            if total != 0.0 {
                for k in row.iter_mut() {
                    *k /= total;
                    wmax = wmax.max(*k);
                }
            }
            start.push(xmin);
            taps.push(n);
        }
        let prec = match backend {
            ResizeBackend::Pillow => 22,
            ResizeBackend::Torchvision => {
                // the most bits for which the largest weight still fits int16 after doubling
                let mut p = 0u32;
                while p < 22 {
                    let next = (0.5 + wmax * (1u64 << (p + 1)) as f64) as i64;
                    if next >= 1 << 15 {
                        break;
                    }
                    p += 1;
                }
                p
            }
        };
        let one = (1u64 << prec) as f64;
        let weights = w
            .iter()
            .map(|&k| {
                let v = k * one;
                if v < 0.0 {
                    (v - 0.5) as i64
                } else {
                    (v + 0.5) as i64
                }
            })
            .collect();
        AxisPlan {
            start,
            taps,
            ksize,
            weights,
            prec,
        }
    }

    /// Fixed-point dot product of `n` samples `at(j)` with output `o`'s weights, rounded and
    /// clamped to 8 bits.
    #[inline]
    fn apply(&self, o: usize, at: impl Fn(usize) -> u8) -> u8 {
        let k = &self.weights[o * self.ksize..o * self.ksize + self.taps[o]];
        let mut acc: i64 = if self.prec > 0 {
            1 << (self.prec - 1)
        } else {
            0
        };
        for (j, &kj) in k.iter().enumerate() {
            acc += at(self.start[o] + j) as i64 * kj;
        }
        (acc >> self.prec).clamp(0, 255) as u8
    }
}

/// Resizes with the antialiased filter of `backend` (horizontal pass, then vertical), skipping a
/// pass whose size does not change, as both PIL and ATen do.
pub fn resize(
    img: &RgbImage,
    width: usize,
    height: usize,
    filter: Filter,
    backend: ResizeBackend,
) -> Result<RgbImage> {
    if width == 0 || height == 0 || img.width == 0 || img.height == 0 {
        return Err(Error::invalid_input(
            "resize",
            format!(
                "cannot resize {}x{} to {width}x{height}",
                img.width, img.height
            ),
        ));
    }
    let mut cur = img.clone();
    if width != cur.width {
        let plan = AxisPlan::new(cur.width, width, filter, backend);
        let (w, h) = (cur.width, cur.height);
        let mut data = vec![0u8; width * h * 3];
        for y in 0..h {
            let row = &cur.data[y * w * 3..(y + 1) * w * 3];
            for x in 0..width {
                for c in 0..3 {
                    data[(y * width + x) * 3 + c] = plan.apply(x, |j| row[j * 3 + c]);
                }
            }
        }
        cur = RgbImage {
            width,
            height: h,
            data,
        };
    }
    if height != cur.height {
        let plan = AxisPlan::new(cur.height, height, filter, backend);
        let w = cur.width;
        let mut data = vec![0u8; w * height * 3];
        for y in 0..height {
            for i in 0..w * 3 {
                data[y * w * 3 + i] = plan.apply(y, |j| cur.data[j * w * 3 + i]);
            }
        }
        cur = RgbImage {
            width: w,
            height,
            data,
        };
    }
    Ok(cur)
}

/// transformers' `get_resize_output_image_size(default_to_square=False)`: the short side
/// becomes `size` and the long side `int(size * long / short)`. Returns `(width, height)`.
pub fn shortest_edge_size(width: usize, height: usize, size: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    // size * long and short are exact in f64, and the division rounds once, as Python's does
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// transformers' center crop: offsets `(H - h) / 2` and `(W - w) / 2` rounded down, after
/// zero-padding (left/top getting the smaller half) when the crop is larger than the image.
pub fn center_crop(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    let mut src = img.clone();
    if width > src.width || height > src.height {
        let pw = width.saturating_sub(src.width);
        let ph = height.saturating_sub(src.height);
        let (nw, nh) = (src.width + pw, src.height + ph);
        let mut padded = RgbImage::filled(nw, nh, [0, 0, 0]);
        let (x0, y0) = (pw / 2, ph / 2);
        for y in 0..src.height {
            let o = ((y0 + y) * nw + x0) * 3;
            padded.data[o..o + src.width * 3]
                .copy_from_slice(&src.data[y * src.width * 3..(y + 1) * src.width * 3]);
        }
        src = padded;
    }
    let top = (src.height - height) / 2;
    let left = (src.width - width) / 2;
    let mut data = Vec::with_capacity(width * height * 3);
    for y in top..top + height {
        let o = (y * src.width + left) * 3;
        data.extend_from_slice(&src.data[o..o + width * 3]);
    }
    RgbImage {
        width,
        height,
        data,
    }
}

/// How the resize target is given (`size` in preprocessor_config.json).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeTarget {
    /// `{"shortest_edge": n}` (or a bare integer): keep the aspect ratio.
    ShortestEdge(usize),
    /// `{"height": h, "width": w}`: exact size.
    Exact {
        /// Output height.
        height: usize,
        /// Output width.
        width: usize,
    },
}

/// `size` / `crop_size` as the config file spells them.
#[derive(Deserialize)]
#[serde(untagged)]
enum SizeSpec {
    Int(usize),
    Dict {
        shortest_edge: Option<usize>,
        height: Option<usize>,
        width: Option<usize>,
    },
}

#[derive(Deserialize)]
struct RawProcessorConfig {
    do_resize: Option<bool>,
    size: Option<SizeSpec>,
    resample: Option<u32>,
    do_center_crop: Option<bool>,
    crop_size: Option<SizeSpec>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<Vec<f32>>,
    image_std: Option<Vec<f32>>,
    do_convert_rgb: Option<bool>,
}

/// A CLIP image processor: the settings of transformers' `CLIPImageProcessor`.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessor {
    /// Whether to resize.
    pub do_resize: bool,
    /// The resize target.
    pub size: ResizeTarget,
    /// The resampling filter.
    pub filter: Filter,
    /// Which resampler implementation to reproduce.
    pub backend: ResizeBackend,
    /// Whether to center crop.
    pub do_center_crop: bool,
    /// Crop `(height, width)`.
    pub crop_size: (usize, usize),
    /// Whether to multiply by `rescale_factor`.
    pub do_rescale: bool,
    /// The rescale factor (1/255).
    pub rescale_factor: f64,
    /// Whether to normalise with `mean` / `std`.
    pub do_normalize: bool,
    /// Per-channel mean.
    pub mean: [f32; 3],
    /// Per-channel std.
    pub std: [f32; 3],
    /// How [`ImageProcessor::load`] treats alpha.
    pub alpha: AlphaMode,
}

impl Default for ImageProcessor {
    /// CLIP ViT-L/14-336's processor: shortest edge 336, crop 336x336, CLIP mean/std, bicubic.
    fn default() -> Self {
        ImageProcessor::clip(336)
    }
}

impl ImageProcessor {
    /// The CLIP processor at `size` px (resize the shortest edge to `size`, crop `size` square).
    pub fn clip(size: usize) -> ImageProcessor {
        ImageProcessor {
            do_resize: true,
            size: ResizeTarget::ShortestEdge(size),
            filter: Filter::Bicubic,
            backend: ResizeBackend::Torchvision,
            do_center_crop: true,
            crop_size: (size, size),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            mean: CLIP_MEAN,
            std: CLIP_STD,
            alpha: AlphaMode::CompositeWhite,
        }
    }

    /// The processor a `preprocessor_config.json` describes; keys it lacks take
    /// `CLIPImageProcessor`'s defaults (shortest edge 224, crop 224) and a missing file gives
    /// [`ImageProcessor::default`] (336 px). Errors name the file and key.
    pub fn from_preprocessor_config(path: impl AsRef<Path>) -> Result<ImageProcessor> {
        let path = path.as_ref();
        if !path.exists() {
            return Ok(ImageProcessor::default());
        }
        let raw: RawProcessorConfig = read_json(path)?;
        let p = path.display().to_string();
        let bad = |key: &str, msg: String| Error::BadConfig {
            path: p.clone(),
            key: key.to_string(),
            msg,
        };
        let mut out = ImageProcessor::clip(224);
        if let Some(v) = raw.do_resize {
            out.do_resize = v;
        }
        match raw.size {
            None => {}
            Some(SizeSpec::Int(n)) => out.size = ResizeTarget::ShortestEdge(n),
            Some(SizeSpec::Dict {
                shortest_edge: Some(n),
                ..
            }) => out.size = ResizeTarget::ShortestEdge(n),
            Some(SizeSpec::Dict {
                height: Some(height),
                width: Some(width),
                ..
            }) => out.size = ResizeTarget::Exact { height, width },
            Some(_) => {
                return Err(bad(
                    "size",
                    "expected an integer, {\"shortest_edge\": n} or {\"height\": h, \"width\": w}"
                        .into(),
                ));
            }
        }
        match raw.resample {
            None | Some(3) => out.filter = Filter::Bicubic,
            Some(2) => out.filter = Filter::Bilinear,
            Some(r) => {
                return Err(bad(
                    "resample",
                    format!("resample mode {r} is not supported (3 = bicubic, 2 = bilinear)"),
                ));
            }
        }
        if let Some(v) = raw.do_center_crop {
            out.do_center_crop = v;
        }
        match raw.crop_size {
            None => {}
            Some(SizeSpec::Int(n)) => out.crop_size = (n, n),
            Some(SizeSpec::Dict {
                height: Some(h),
                width: Some(w),
                ..
            }) => out.crop_size = (h, w),
            Some(_) => {
                return Err(bad(
                    "crop_size",
                    "expected an integer or {\"height\": h, \"width\": w}".into(),
                ));
            }
        }
        if let Some(v) = raw.do_rescale {
            out.do_rescale = v;
        }
        if let Some(v) = raw.rescale_factor {
            out.rescale_factor = v;
        }
        if let Some(v) = raw.do_normalize {
            out.do_normalize = v;
        }
        let three = |key: &str, v: Vec<f32>| -> Result<[f32; 3]> {
            <[f32; 3]>::try_from(v.as_slice())
                .map_err(|_| bad(key, format!("expected 3 values (RGB), got {}", v.len())))
        };
        if let Some(v) = raw.image_mean {
            out.mean = three("image_mean", v)?;
        }
        if let Some(v) = raw.image_std {
            out.std = three("image_std", v)?;
            if out.std.contains(&0.0) {
                return Err(bad("image_std", "std must be nonzero".into()));
            }
        }
        if raw.do_convert_rgb == Some(false) {
            // we always produce RGB; PIL's RGB images pass through convert_to_rgb unchanged,
            // so only the alpha handling would differ: keep transformers' composite
        }
        Ok(out)
    }

    /// The same processor reproducing another resampler.
    pub fn with_backend(mut self, backend: ResizeBackend) -> ImageProcessor {
        self.backend = backend;
        self
    }

    /// LLaVA's pad colour: `tuple(int(x * 255) for x in image_mean)`, (122, 116, 104) for CLIP.
    pub fn pad_color(&self) -> [u8; 3] {
        self.mean
            .map(|m| (m as f64 * 255.0).clamp(0.0, 255.0) as u8)
    }

    /// Loads an image file as this processor's path would see it (alpha per `self.alpha`).
    pub fn load(&self, path: impl AsRef<Path>) -> Result<RgbImage> {
        load_image(path, self.alpha)
    }

    /// Resize and crop only: the 8-bit image the normalisation step receives.
    pub fn resize_and_crop(&self, img: &RgbImage) -> Result<RgbImage> {
        let mut cur = img.clone();
        if self.do_resize {
            let (w, h) = match self.size {
                ResizeTarget::ShortestEdge(n) => shortest_edge_size(cur.width, cur.height, n),
                ResizeTarget::Exact { height, width } => (width, height),
            };
            if (w, h) != (cur.width, cur.height) {
                cur = resize(&cur, w, h, self.filter, self.backend)?;
            }
        }
        if self.do_center_crop {
            cur = center_crop(&cur, self.crop_size.1, self.crop_size.0);
        }
        Ok(cur)
    }

    /// One image to `[3, H, W]` f32 values, channel-major.
    pub fn pixel_values(&self, img: &RgbImage) -> Result<(Vec<f32>, usize, usize)> {
        let cur = self.resize_and_crop(img)?;
        let (w, h) = (cur.width, cur.height);
        // torchvision's fused form: (x - mean / factor) / (std / factor) in f32
        let factor = self.rescale_factor as f32;
        let (sub, div): ([f32; 3], [f32; 3]) = match (self.do_rescale, self.do_normalize) {
            (true, true) => (
                self.mean.map(|m| m * (1.0 / self.rescale_factor) as f32),
                self.std.map(|s| s * (1.0 / self.rescale_factor) as f32),
            ),
            (false, true) => (self.mean, self.std),
            (true, false) => ([0.0; 3], [1.0 / factor; 3]),
            (false, false) => ([0.0; 3], [1.0; 3]),
        };
        let mut out = vec![0f32; 3 * w * h];
        for (i, px) in cur.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * w * h + i] = (px[c] as f32 - sub[c]) / div[c];
            }
        }
        Ok((out, h, w))
    }

    /// A batch of images to `pixel_values` f32 `[B, 3, H, W]` (all images must come out the
    /// same size, which center cropping guarantees).
    pub fn preprocess(&self, images: &[RgbImage]) -> Result<Tensor> {
        if images.is_empty() {
            return Err(Error::invalid_input("preprocess", "no images given"));
        }
        let mut data = Vec::new();
        let mut size = None;
        for (i, img) in images.iter().enumerate() {
            let (v, h, w) = self.pixel_values(img)?;
            match size {
                None => size = Some((h, w)),
                Some(s) if s != (h, w) => {
                    return Err(Error::invalid_input(
                        "preprocess",
                        format!(
                            "image {i} comes out {h}x{w} but image 0 came out {}x{}; enable \
                             center cropping to batch images of different sizes",
                            s.0, s.1
                        ),
                    ));
                }
                Some(_) => {}
            }
            data.extend(v);
        }
        let (h, w) = size.expect("at least one image was processed");
        Ok(Tensor::from_vec(data, &[images.len(), 3, h, w])?)
    }

    /// LLaVA's pad path for one image: `expand2square` with [`ImageProcessor::pad_color`],
    /// then the processor.
    pub fn preprocess_padded(&self, images: &[RgbImage]) -> Result<Tensor> {
        let color = self.pad_color();
        let squares: Vec<RgbImage> = images.iter().map(|i| expand_to_square(i, color)).collect();
        self.preprocess(&squares)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_size_matches_python_truncation() {
        assert_eq!(shortest_edge_size(50, 81, 26), (26, 42)); // 26 * 81 / 50 = 42.12
        assert_eq!(shortest_edge_size(37, 23, 24), (38, 24)); // 24 * 37 / 23 = 38.6
        assert_eq!(shortest_edge_size(17, 17, 24), (24, 24));
    }

    #[test]
    fn identity_resize_keeps_pixels() {
        let img = RgbImage::new(3, 2, (0..18).collect()).unwrap();
        for b in [ResizeBackend::Torchvision, ResizeBackend::Pillow] {
            // scale 1: the taps are [0, 1, 0, 0] exactly, whatever the fixed point
            let plan = AxisPlan::new(3, 3, Filter::Bicubic, b);
            let row = [10u8, 200, 30];
            let got: Vec<u8> = (0..3).map(|o| plan.apply(o, |j| row[j])).collect();
            assert_eq!(got, row);
        }
        let same = resize(&img, 3, 2, Filter::Bicubic, ResizeBackend::Pillow).unwrap();
        assert_eq!(same, img);
    }

    #[test]
    fn over_white_matches_pillow_endpoints() {
        assert_eq!(over_white(17, 255), 17);
        assert_eq!(over_white(17, 0), 255);
        // 50% alpha over white: (c + 255) / 2 rounded
        assert_eq!(over_white(0, 128), 127);
    }

    #[test]
    fn expand_to_square_pastes_with_floor_offsets() {
        let img = RgbImage::filled(2, 5, [1, 2, 3]);
        let sq = expand_to_square(&img, [9, 9, 9]);
        assert_eq!((sq.width(), sq.height()), (5, 5));
        // (5 - 2) / 2 = 1 column of padding on the left, 2 on the right
        assert_eq!(sq.pixel(0, 0), [9, 9, 9]);
        assert_eq!(sq.pixel(1, 0), [1, 2, 3]);
        assert_eq!(sq.pixel(2, 4), [1, 2, 3]);
        assert_eq!(sq.pixel(3, 4), [9, 9, 9]);
    }

    #[test]
    fn pad_color_is_truncated_mean() {
        assert_eq!(ImageProcessor::default().pad_color(), [122, 116, 104]);
    }
}
