//! ft-model: the Llama-family decoder on burn and everything needed to load and feed it.
//!
//! Owns the model and its three forwards ([`forward`]: [`forward::llama`], the model as the
//! paper writes it with its padded burn forward; the ragged serving forwards through burn,
//! [`forward::ragged`], or in plain Rust on the CPU, [`forward::host`]), its configuration
//! ([`config`]), the KV cache ([`cache`]), the checkpoint formats read and written
//! ([`formats`]: GGUF, HF safetensors, bitsandbytes), the tokenizer and chat template, model
//! sources ([`source`]), bounded reads of the JSON beside the weights ([`text_file`]), other
//! crates' reader panics made errors ([`caught`]), perplexity, and post-training
//! quantization of the projections ([`ptq`]: RTN, GPTQ on calibration text). Builds on ft-quant
//! (block formats) and ft-adapters (LoRA layers); must not import ft-distill, ft-serve or
//! ft-trainer.
#![warn(missing_docs)]

pub mod adapter;
pub mod cache;
pub mod caught;
pub mod chat;
pub mod config;
pub mod error;
pub mod formats;
pub mod forward;
pub mod load;
pub mod params;
pub mod perplexity;
pub mod pretrained;
pub mod ptq;
pub mod source;
pub mod text_file;
pub mod tiny;
pub mod tokenizer;
pub mod weights;

pub use cache::KvCache;
pub use config::LlamaConfig;
pub use error::ModelError;
pub use forward::llama::LlamaForCausalLM;
/// The frozen-weight types and the backend trait every model forward needs (packed weights
/// under autodiff): the crates above the model use them through here, never ft-quant itself.
pub use ft_quant::{Linear, QuantBackend, QuantFormat, QuantSpec};
pub use pretrained::Pretrained;
pub use tokenizer::TextTokenizer;

/// Run-time controls of the CPU kernels that the crates above the model need: the thread the
/// kernels run on and how many there are, the instruction-set cap, and the packed-matmul
/// switches of training.
pub mod kernels {
    pub use ft_quant::backend::{dequant_seconds, set_bf16_compute};
    pub use ft_quant::matvec::{on_kernel_thread, Isa, MAX_ISA_VAR};
    pub use ft_quant::team::size as threads;
}
