//! Calibration windows: `n` runs of `len` tokens cut from a text at seeded random places, as
//! AutoGPTQ draws its examples from a corpus.

use crate::error::ModelError;
use crate::tokenizer::TextTokenizer;

/// The bundled calibration text, JSONL: Genesis 4 to Exodus 40 of the King James Version
/// (the evaluation text, Genesis 1-3, is not in it).
pub const BUNDLED: &str = include_str!("../../../data/text/kjv-train.jsonl");

/// Calibration windows by default: with [`LEN`], GPTQ on the default model takes about four
/// minutes on 2 CPU cores.
pub const SAMPLES: usize = 64;

/// Tokens per calibration window by default.
pub const LEN: usize = 256;

/// The text of a calibration file: a JSONL file's `"text"` fields joined by blank lines, or
/// any other file as it is.
pub fn text_of(contents: &str, jsonl: bool) -> Result<String, ModelError> {
    if !jsonl {
        return Ok(contents.to_string());
    }
    let mut parts = Vec::new();
    for (i, line) in contents.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| ModelError::Calibration(format!("line {}: {e}", i + 1)))?;
        let text = record["text"].as_str().ok_or_else(|| {
            ModelError::Calibration(format!("line {}: no \"text\" string", i + 1))
        })?;
        parts.push(text.to_string());
    }
    Ok(parts.join("\n\n"))
}

/// `n` windows of `len` tokens of `text`, starting at places drawn with `seed`; a context of
/// `context` tokens must hold one.
pub fn windows(
    tokenizer: &TextTokenizer,
    text: &str,
    n: usize,
    len: usize,
    context: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>, ModelError> {
    if n == 0 || len == 0 {
        return Err(ModelError::Calibration(
            "no calibration samples: --calib-samples and --calib-len must be at least 1".into(),
        ));
    }
    if len > context {
        return Err(ModelError::Calibration(format!(
            "--calib-len {len} is longer than the model's context of {context} tokens"
        )));
    }
    windows_of(&tokenizer.encode(text)?, n, len, seed)
}

/// `n` windows of `len` tokens of `ids` (a text already tokenized, or examples end to end),
/// starting at places drawn with `seed`.
pub fn windows_of(
    ids: &[u32],
    n: usize,
    len: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>, ModelError> {
    if ids.len() < len {
        return Err(ModelError::Calibration(format!(
            "the calibration text has {} tokens, fewer than one window of {len}",
            ids.len()
        )));
    }
    let mut state = seed;
    let starts = ids.len() - len + 1;
    Ok((0..n)
        .map(|_| {
            let at = (split_mix(&mut state) % starts as u64) as usize;
            ids[at..at + len].to_vec()
        })
        .collect())
}

/// SplitMix64's next value.
fn split_mix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_records_are_joined_and_bad_lines_named() {
        let text = text_of("{\"text\": \"a\"}\n\n{\"text\": \"b\"}\n", true).unwrap();
        assert_eq!(text, "a\n\nb");
        let err = text_of("{\"text\": \"a\"}\n{\"words\": 1}\n", true).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        assert_eq!(text_of("plain", false).unwrap(), "plain");
    }
}
