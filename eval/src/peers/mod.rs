//! Other engines measured on the same work as ft, each in a child process so that its memory
//! and its failures are its own: llama.cpp ([`llama_cpp`]) for `ft bench generate`.

pub mod llama_cpp;
