//! The checkpoint formats a model is read from and written to.
//!
//! - [`gguf`]: the GGUF v3 reader (metadata and memory-mapped tensors), as llama.cpp writes it;
//! - [`gguf_write`]: the GGUF v3 writer, and the atomic file write every format here uses;
//! - [`gguf_export`]: a whole model as a GGUF file llama.cpp loads (metadata, tokenizer,
//!   tensors in F32, F16 or Q8_0);
//! - [`gguf_lora`]: a PEFT adapter as llama.cpp's GGUF LoRA file (`--lora`, Ollama's
//!   `ADAPTER`), beside the GGUF container it is written in;
//! - [`safetensors_dir`]: the HF reader, one `model.safetensors` or its shards;
//! - [`hf_export`]: the HF writer: `config.json`, `model.safetensors` and a whole model folder;
//! - [`bnb_read`]: packed weights in the layout transformers gives bitsandbytes models (4-bit,
//!   int8), read without a quantization step;
//! - [`bnb_write`]: a quantized model saved in that layout.

pub mod bnb_read;
pub mod bnb_write;
pub mod gguf;
pub mod gguf_export;
pub mod gguf_lora;
pub mod gguf_write;
pub mod hf_export;
pub mod safetensors_dir;
