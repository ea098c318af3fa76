//! mgm-vision: the vision towers of Mini-Gemini / LLaVA, matching Hugging Face transformers.
//!
//! [`preprocess`] reproduces `CLIPImageProcessor` (decode, RGB, shortest-edge bicubic resize,
//! center crop, rescale, normalize) and LLaVA's pad-to-square; [`clip`] is the CLIP ViT tower
//! (`CLIPVisionModel`, HF weights with or without the `vision_model.` prefix, `select_layer`
//! features, position-embedding interpolation, f32 or bf16); [`convnext`] the ConvNeXt tower.
//!
//! ```
//! use mgm_vision::preprocess::{ImageProcessor, RgbImage};
//! let processor = ImageProcessor::clip(28);
//! let image = RgbImage::filled(40, 30, [200, 120, 30]);
//! let pixel_values = processor.preprocess(&[image])?;
//! assert_eq!(pixel_values.shape(), &[1, 3, 28, 28]);
//! # Ok::<(), mgm_vision::Error>(())
//! ```

pub mod clip;
pub mod config;
pub mod convnext;
mod error;
pub mod preprocess;

pub use clip::{
    Activation, ClipForwardOptions, ClipVisionConfig, ClipVisionModel, ClipVisionOutput,
};
pub use error::{Error, Result};
pub use preprocess::{ImageProcessor, ResizeBackend, RgbImage};
