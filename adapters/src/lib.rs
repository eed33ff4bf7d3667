//! ft-adapters: everything about LoRA adapters.
//!
//! Will hold the LoRA layer (A [r, in], B [out, r], PEFT's init and scaling, single and batched
//! multi-adapter forward) wrapping ft-quant's frozen linear layers, the PEFT format
//! (`adapter_config.json`, `adapter_model.safetensors`), merging into a base, the SQLite adapter
//! registry and Hub publishing. Empty until the LoRA training work lands.
//!
//! Depends only on ft-quant among ft crates; must not import ft-model or anything above it.
#![warn(missing_docs)]
