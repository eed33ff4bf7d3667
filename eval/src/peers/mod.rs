//! Other engines measured on the same work as ft, each in a child process so that its memory
//! and its failures are its own: llama.cpp ([`llama_cpp`]) for `ft bench generate` and its
//! quantizer and perplexity ([`llama_cpp_quant`]) for `ft quant compare`, Hugging Face
//! transformers + PEFT ([`peft`], in the environment of [`peft_venv`], tabulated by
//! [`peft_table`]) for `ft bench train`.

pub mod llama_cpp;
pub mod llama_cpp_quant;
pub mod peft;
pub mod peft_table;
pub mod peft_venv;
