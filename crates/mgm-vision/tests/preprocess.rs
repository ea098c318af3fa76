//! Image preprocessing against transformers' processors (tests/fixtures/preprocess_*, written by
//! tests/reference/gen_vision.py from real PNG/JPEG files of odd sizes): decoded RGB, the
//! torchvision-backed `CLIPImageProcessor` and `CLIPImageProcessorPil`, and LLaVA's
//! pad-to-square path, each within one 8-bit level after normalisation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mgm_tensor::{DType, Tensor};
use mgm_vision::preprocess::{
    AlphaMode, ImageProcessor, ResizeBackend, RgbImage, expand_to_square, load_image,
};

const CASES: [(&str, &str); 3] = [
    ("preprocess_png_rgba", "image.png"),
    ("preprocess_png_gray", "image.png"),
    ("preprocess_jpeg", "image.jpg"),
];

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(case)
}

fn expected(case: &str) -> HashMap<String, Tensor> {
    mgm_tensor::safetensors::load(fixture(case).join("expected.safetensors")).unwrap()
}

fn bytes(t: &Tensor) -> Vec<u8> {
    t.to_vec::<u8>().unwrap()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().to_vec::<f64>().unwrap()
}

/// One 8-bit level after normalisation, for the channel with the smallest std (plus f32
/// rounding slack, so that a difference of exactly one level passes).
fn one_level(p: &ImageProcessor) -> f64 {
    let min_std = p.std.iter().cloned().fold(f32::INFINITY, f32::min) as f64;
    1.0 / 255.0 / min_std * (1.0 + 1e-4)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape(), b.shape());
    f64s(a)
        .iter()
        .zip(f64s(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Largest per-byte difference between a decoded image and the fixture's `[H, W, 3]` bytes,
/// and the fraction of bytes that differ at all.
fn byte_diff(img: &RgbImage, want: &Tensor) -> (u8, f64) {
    assert_eq!(want.shape(), &[img.height(), img.width(), 3]);
    let d: Vec<u8> = img
        .as_bytes()
        .iter()
        .zip(bytes(want))
        .map(|(a, b)| a.abs_diff(b))
        .collect();
    let differing = d.iter().filter(|&&x| x > 0).count() as f64 / d.len() as f64;
    (d.iter().copied().max().unwrap_or(0), differing)
}

/// PNG decodes exactly; our JPEG decoder (zune-jpeg, via the image crate) rounds its IDCT and
/// colour conversion differently from PIL's libjpeg-turbo: up to 2 levels on a few percent of
/// the samples of the quality-95 4:4:4 fixture.
fn check_decode(case: &str, file: &str, img: &RgbImage, want: &Tensor) {
    let (max, frac) = byte_diff(img, want);
    if file.ends_with(".png") {
        assert_eq!(max, 0, "{case}: decoded RGB differs by {max} levels");
    } else {
        assert!(
            max <= 2 && frac < 0.05,
            "{case}: decoded RGB differs by up to {max} levels on {:.1}% of samples",
            frac * 100.0
        );
    }
}

#[test]
fn decoded_rgb_matches_transformers_convert_to_rgb() {
    for (case, file) in CASES {
        let exp = expected(case);
        let img = load_image(fixture(case).join(file), AlphaMode::CompositeWhite).unwrap();
        check_decode(case, file, &img, &exp["image_rgb"]);
    }
}

#[test]
fn pad_path_image_matches_llava_expand2square() {
    for (case, file) in CASES {
        let exp = expected(case);
        let p = ImageProcessor::from_preprocessor_config(
            fixture(case).join("preprocessor_config.json"),
        )
        .unwrap();
        let img = load_image(fixture(case).join(file), AlphaMode::Drop).unwrap();
        let square = expand_to_square(&img, p.pad_color());
        check_decode(case, file, &square, &exp["image_rgb_pad"]);
    }
}

#[test]
fn pixel_values_match_both_transformers_processors_within_one_level() {
    for (case, file) in CASES {
        let exp = expected(case);
        let cfg = fixture(case).join("preprocessor_config.json");
        for (backend, key, pad_key) in [
            (
                ResizeBackend::Torchvision,
                "pixel_values",
                "pixel_values_pad",
            ),
            (
                ResizeBackend::Pillow,
                "pixel_values_pil",
                "pixel_values_pad_pil",
            ),
        ] {
            let p = ImageProcessor::from_preprocessor_config(&cfg)
                .unwrap()
                .with_backend(backend);
            let tol = one_level(&p);
            let img = p.load(fixture(case).join(file)).unwrap();
            let pv = p.preprocess(std::slice::from_ref(&img)).unwrap();
            let d = max_abs_diff(&pv, &exp[key]);
            assert!(
                d <= tol,
                "{case} {backend:?}: {key} max abs diff {d:.4} > {tol:.4}"
            );

            let plain = load_image(fixture(case).join(file), AlphaMode::Drop).unwrap();
            let pad = p.preprocess_padded(&[plain]).unwrap();
            let d = max_abs_diff(&pad, &exp[pad_key]);
            assert!(
                d <= tol,
                "{case} {backend:?}: {pad_key} max abs diff {d:.4} > {tol:.4}"
            );
        }
    }
}

#[test]
fn both_backends_are_exact_from_pil_decoded_pixels() {
    // fed the bytes PIL decoded, both resamplers reproduce their processor's integer arithmetic
    // exactly: what is left is f32 rounding in the normalisation
    for (case, _) in CASES {
        let exp = expected(case);
        let rgb = &exp["image_rgb"];
        let (h, w) = (rgb.shape()[0], rgb.shape()[1]);
        let img = RgbImage::new(w, h, bytes(rgb)).unwrap();
        let cfg = fixture(case).join("preprocessor_config.json");
        for (backend, key) in [
            (ResizeBackend::Torchvision, "pixel_values"),
            (ResizeBackend::Pillow, "pixel_values_pil"),
        ] {
            let p = ImageProcessor::from_preprocessor_config(&cfg)
                .unwrap()
                .with_backend(backend);
            let d = max_abs_diff(
                &p.preprocess(std::slice::from_ref(&img)).unwrap(),
                &exp[key],
            );
            assert!(d <= 1e-5, "{case} {backend:?}: max abs diff {d:.3e}");
        }
    }
}

#[test]
fn torchvision_backend_is_exact_on_png_fixtures() {
    // PNG decoding is exact and our resampler reproduces ATen's integer arithmetic, so the
    // only difference left is f32 rounding in the normalisation
    for (case, file) in &CASES[..2] {
        let exp = expected(case);
        let p = ImageProcessor::from_preprocessor_config(
            fixture(case).join("preprocessor_config.json"),
        )
        .unwrap();
        let img = p.load(fixture(case).join(file)).unwrap();
        let d = max_abs_diff(&p.preprocess(&[img]).unwrap(), &exp["pixel_values"]);
        assert!(d <= 1e-5, "{case}: max abs diff {d:.3e}");
    }
}

#[test]
fn batch_of_images_stacks_and_missing_config_gives_clip_336() {
    let p = ImageProcessor::from_preprocessor_config(fixture("preprocess_jpeg").join("nope.json"))
        .unwrap();
    assert_eq!(p, ImageProcessor::default());
    let cfg = fixture("preprocess_jpeg").join("preprocessor_config.json");
    let p = ImageProcessor::from_preprocessor_config(cfg).unwrap();
    let a = RgbImage::filled(30, 50, [10, 20, 30]);
    let b = RgbImage::filled(61, 27, [200, 100, 0]);
    let batch = p.preprocess(&[a.clone(), b.clone()]).unwrap();
    assert_eq!(batch.shape(), &[2, 3, 22, 22]);
    let single = p.preprocess(&[b]).unwrap();
    let second = batch.narrow(0, 1, 1).unwrap();
    assert_eq!(f64s(&second), f64s(&single));
    let err = p.preprocess(&[]).unwrap_err().to_string();
    assert!(err.contains("no images"), "{err}");
}

#[test]
fn undecodable_image_error_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("broken.png");
    std::fs::write(&path, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let err = load_image(&path, AlphaMode::CompositeWhite)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&path.display().to_string()) && err.contains("cannot decode"),
        "{err}"
    );
}

#[test]
fn bad_preprocessor_config_values_are_reported_by_key() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("preprocessor_config.json");
    std::fs::write(&path, r#"{"image_mean": [0.5, 0.5], "size": 224}"#).unwrap();
    let err = ImageProcessor::from_preprocessor_config(&path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("image_mean") && err.contains("expected 3 values"),
        "{err}"
    );
    std::fs::write(&path, r#"{"resample": 1}"#).unwrap();
    let err = ImageProcessor::from_preprocessor_config(&path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("resample"), "{err}");
    // LLaVA's CLIP-L/336 config spells sizes as bare integers
    std::fs::write(&path, r#"{"size": 336, "crop_size": 336}"#).unwrap();
    let p = ImageProcessor::from_preprocessor_config(&path).unwrap();
    assert_eq!(p, ImageProcessor::default());
}
