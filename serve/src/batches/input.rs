//! A batch's input file, as OpenAI's Batch API takes it: one request a line,
//! `{"custom_id": "...", "method": "POST", "url": "/v1/chat/completions", "body": {...}}`.
//! The whole file is checked before any request runs, and every fault is reported with its
//! line number (OpenAI's `errors.data`: `code`, `message`, `param`, `line`). A body is not
//! checked here: the server answers a bad one with its error, and the other lines still run.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::{Map, Value};

/// Requests a batch may hold (OpenAI's limit).
pub const MAX_REQUESTS: usize = 50_000;
/// Bytes an input file may hold (OpenAI's limit for batch files).
pub const MAX_BYTES: usize = 200 << 20;
/// The endpoints a batch line may name.
pub const ENDPOINTS: [&str; 2] = ["/v1/completions", "/v1/chat/completions"];
/// Faults reported at most; the rest are counted.
const MAX_REPORTED: usize = 100;

/// One request of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// Its line in the file, from 1.
    pub line: usize,
    /// The caller's id, unique in the file.
    pub custom_id: String,
    /// The endpoint, one of [`ENDPOINTS`].
    pub url: String,
    /// The request body.
    pub body: Map<String, Value>,
}

/// One fault of an input file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LineError {
    /// What kind of fault (`invalid_json_line`, `duplicate_custom_id`, ...).
    pub code: &'static str,
    /// What is wrong.
    pub message: String,
    /// The field at fault.
    pub param: Option<String>,
    /// The line, from 1; none for the file as a whole.
    pub line: Option<usize>,
}

impl LineError {
    fn at(line: usize, code: &'static str, param: &str, message: String) -> Self {
        Self {
            code,
            message,
            param: Some(param.to_string()),
            line: Some(line),
        }
    }

    fn file(code: &'static str, message: String) -> Self {
        Self {
            code,
            message,
            param: None,
            line: None,
        }
    }
}

/// The faults as lines of text, `line N: param: message`.
pub fn describe(errors: &[LineError]) -> String {
    errors
        .iter()
        .map(|e| match (e.line, &e.param) {
            (Some(l), Some(p)) => format!("line {l}: {p}: {}", e.message),
            (Some(l), None) => format!("line {l}: {}", e.message),
            _ => e.message.clone(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The requests of `bytes`, or every fault found (at most 100, then a count). `endpoint`,
/// when given, is the one every line must name (a batch's `endpoint`). Blank lines are
/// skipped.
pub fn parse(bytes: &[u8], endpoint: Option<&str>) -> Result<Vec<Line>, Vec<LineError>> {
    if bytes.len() > MAX_BYTES {
        return Err(vec![LineError::file(
            "file_too_large",
            format!(
                "the file holds {} bytes, more than the {} MiB a batch may",
                bytes.len(),
                MAX_BYTES >> 20
            ),
        )]);
    }
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let n = i + 1;
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match line(n, raw, endpoint, &mut seen) {
            Ok(l) => lines.push(l),
            Err(e) => errors.push(e),
        }
        if lines.len() + errors.len() > MAX_REQUESTS {
            errors.push(LineError::file(
                "too_many_requests",
                format!("the file holds more than {MAX_REQUESTS} requests"),
            ));
            break;
        }
    }
    if lines.is_empty() && errors.is_empty() {
        errors.push(LineError::file(
            "empty_file",
            "the file holds no request".into(),
        ));
    }
    if errors.is_empty() {
        return Ok(lines);
    }
    if errors.len() > MAX_REPORTED {
        let more = errors.len() - MAX_REPORTED;
        errors.truncate(MAX_REPORTED);
        errors.push(LineError::file(
            "more_errors",
            format!("and {more} more faults"),
        ));
    }
    Err(errors)
}

/// Line `n` checked.
fn line(
    n: usize,
    raw: &[u8],
    endpoint: Option<&str>,
    seen: &mut HashMap<String, usize>,
) -> Result<Line, LineError> {
    let value: Value = serde_json::from_slice(raw).map_err(|e| LineError {
        code: "invalid_json_line",
        message: format!("not a JSON object: {e}"),
        param: None,
        line: Some(n),
    })?;
    let Value::Object(mut object) = value else {
        return Err(LineError {
            code: "invalid_json_line",
            message: "not a JSON object".into(),
            param: None,
            line: Some(n),
        });
    };
    let custom_id = match object.remove("custom_id") {
        Some(Value::String(id)) if !id.is_empty() && id.len() <= 512 => id,
        _ => {
            return Err(LineError::at(
                n,
                "invalid_custom_id",
                "custom_id",
                "a string of 1 to 512 bytes is required".into(),
            ))
        }
    };
    if let Some(first) = seen.get(&custom_id) {
        return Err(LineError::at(
            n,
            "duplicate_custom_id",
            "custom_id",
            format!("{custom_id:?} is also the custom_id of line {first}"),
        ));
    }
    seen.insert(custom_id.clone(), n);
    if object.get("method").and_then(Value::as_str) != Some("POST") {
        return Err(LineError::at(
            n,
            "invalid_method",
            "method",
            "must be \"POST\"".into(),
        ));
    }
    let url = match object.get("url").and_then(Value::as_str) {
        Some(u) if ENDPOINTS.contains(&u) => u.to_string(),
        other => {
            return Err(LineError::at(
                n,
                "invalid_url",
                "url",
                format!("{other:?} is not one of {}", ENDPOINTS.join(", ")),
            ))
        }
    };
    if let Some(e) = endpoint.filter(|e| *e != url) {
        return Err(LineError::at(
            n,
            "mismatched_url",
            "url",
            format!("{url} is not the batch's endpoint {e}"),
        ));
    }
    let Some(Value::Object(body)) = object.remove("body") else {
        return Err(LineError::at(
            n,
            "invalid_body",
            "body",
            "a JSON object (the request's body) is required".into(),
        ));
    };
    Ok(Line {
        line: n,
        custom_id,
        url,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": "x"}}"#;

    #[test]
    fn good_lines_are_read_in_order_and_blank_ones_skipped() {
        let text = format!(
            "{GOOD}\n\n{}\n",
            GOOD.replace("\"a\"", "\"b\"")
                .replace("/v1/completions", "/v1/chat/completions")
        );
        let lines = parse(text.as_bytes(), None).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!((lines[1].line, lines[1].custom_id.as_str()), (3, "b"));
        assert_eq!(lines[1].url, "/v1/chat/completions");
        assert_eq!(lines[0].body["prompt"], "x");
    }

    #[test]
    fn every_fault_is_reported_with_its_line() {
        let text = [
            GOOD,
            "not json",
            "[1]",
            &GOOD.replace("\"a\"", "\"\""),
            GOOD,
            &GOOD.replace("POST", "GET").replace("\"a\"", "\"c\""),
            &GOOD
                .replace("/v1/completions", "/v1/embeddings")
                .replace("\"a\"", "\"d\""),
            &GOOD
                .replace("{\"model\": \"m\", \"prompt\": \"x\"}", "3")
                .replace("\"a\"", "\"e\""),
        ]
        .join("\n");
        let errors = parse(text.as_bytes(), None).unwrap_err();
        let got: Vec<(Option<usize>, &str)> = errors.iter().map(|e| (e.line, e.code)).collect();
        assert_eq!(
            got,
            [
                (Some(2), "invalid_json_line"),
                (Some(3), "invalid_json_line"),
                (Some(4), "invalid_custom_id"),
                (Some(5), "duplicate_custom_id"),
                (Some(6), "invalid_method"),
                (Some(7), "invalid_url"),
                (Some(8), "invalid_body"),
            ]
        );
        let text = describe(&errors);
        assert!(
            text.contains("line 5: custom_id: \"a\" is also the custom_id of line 1"),
            "{text}"
        );
    }

    #[test]
    fn the_file_as_a_whole_is_checked() {
        let errors = parse(GOOD.as_bytes(), Some("/v1/chat/completions")).unwrap_err();
        assert_eq!(errors[0].code, "mismatched_url");
        assert_eq!(parse(b"\n \n", None).unwrap_err()[0].code, "empty_file");
        let big = vec![b' '; MAX_BYTES + 1];
        assert_eq!(parse(&big, None).unwrap_err()[0].code, "file_too_large");
        let many: String = (0..=MAX_REQUESTS)
            .map(|i| format!("{}\n", GOOD.replace("\"a\"", &format!("\"{i}\""))))
            .collect();
        let errors = parse(many.as_bytes(), None).unwrap_err();
        assert_eq!(errors.last().unwrap().code, "too_many_requests");
        let bad: String = (0..150).map(|_| "x\n").collect();
        let errors = parse(bad.as_bytes(), None).unwrap_err();
        assert_eq!(errors.len(), 101);
        assert_eq!(errors[100].message, "and 50 more faults");
    }
}
