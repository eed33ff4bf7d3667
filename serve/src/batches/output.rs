//! A batch's output lines, as OpenAI's Batch API writes them, one per request:
//! `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}` for
//! a request the server answered (whatever its status), and `"response": null` with
//! `"error": {"code", "message"}` for one that got no answer (the server unreachable, the
//! batch expired or cancelled first).

use serde_json::{json, Value};

/// The line of a request the server answered with `status` and `body`.
pub fn answered(custom_id: &str, request_id: &str, status: u16, body: Value) -> Value {
    json!({
        "id": format!("batch_req_{request_id}"),
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": null,
    })
}

/// The line of a request that got no answer.
pub fn unanswered(custom_id: &str, request_id: &str, code: &str, message: &str) -> Value {
    json!({
        "id": format!("batch_req_{request_id}"),
        "custom_id": custom_id,
        "response": null,
        "error": {"code": code, "message": message},
    })
}

/// Whether `line` is a success: answered with a 2xx status.
pub fn succeeded(line: &Value) -> bool {
    line["response"]["status_code"]
        .as_u64()
        .is_some_and(|s| (200..300).contains(&s))
}
