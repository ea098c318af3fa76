//! mgm-llm: the language half of MGM — LLaMA, Mistral, Gemma and Mixtral decoders that match
//! Hugging Face transformers, with a KV cache, sampling, streaming, the tokenizer and chat
//! templates.
//!
//! ```no_run
//! use mgm_llm::{CausalLm, Positions};
//! use mgm_tensor::Tensor;
//! let model = CausalLm::from_dir("path/to/llama")?;
//! let ids = Tensor::from_vec(vec![1i64, 15, 27], &[1, 3])?;
//! let logits = model.forward(&ids, None)?; // [1, 3, vocab]
//! # Ok::<(), mgm_llm::Error>(())
//! ```

pub mod cache;
pub mod config;
mod error;
pub mod generate;
pub mod mixtral;
pub mod model;
pub mod rope;
pub mod sampling;
pub mod tokenizer;

pub use cache::{KvCache, PagedKvCache, SeqId};
pub use config::{Arch, DecoderConfig, RopeScaling};
pub use error::{Error, Result};
pub use generate::{GenerateOptions, Generation, generate};
/// The weight-only quantization formats ([`CausalLm::quantize`]).
pub use mgm_kernels::quant::QuantFormat;
pub use model::{CausalLm, Positions};
pub use sampling::{Sampler, SamplingParams};
pub use tokenizer::{Message, TextDeltas, Tokenizer};
