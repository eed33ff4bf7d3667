//! Runs a batch ([`super::batch_api`]): checks its input file (failed, with every fault and
//! its line), then sends each request not yet answered through this server's own
//! completions handlers, at most `--batch-max-rows` at once, committing each answer as it
//! completes; then writes the output file (the 2xx answers) and the error file (the others,
//! and the requests a cancel or the window's end left unasked), in input order. Started when
//! a batch is created and, for every unfinished batch, when the server starts again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::StatusCode;
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::batch_api::{file_object, now, Batches, FINAL};
use super::completions;
use super::AppState;
use crate::batches::input::{self, Line, LineError};
use crate::batches::output::{answered, succeeded, unanswered};
use crate::batches::BatchError;
use crate::request::Priority;

/// How long a request the engine's full queue refused waits before it is sent again.
const RETRY: Duration = Duration::from_millis(100);
/// How long a batch whose state could not be written waits before it runs again.
const AGAIN: Duration = Duration::from_secs(5);

/// Runs batch `id` on the server's runtime unless its runner is already live.
pub(super) fn spawn(state: &Arc<AppState>, id: &str) {
    let Some(b) = &state.batches else { return };
    let fresh = b
        .running
        .lock()
        .is_ok_and(|mut running| running.insert(id.to_string()));
    if !fresh {
        return;
    }
    let (state, id) = (state.clone(), id.to_string());
    tokio::spawn(async move {
        if let Some(b) = &state.batches {
            // A failing store (a full disk) is tried again: what was committed stays.
            while let Err(e) = drive(&state, b, &id).await {
                tracing::error!(batch = %id, error = %e, "the batch stopped; trying again in {} s", AGAIN.as_secs());
                tokio::time::sleep(AGAIN).await;
            }
            if let Ok(mut running) = b.running.lock() {
                running.remove(&id);
            }
        }
    });
}

/// Whether batch `id` is to stop asking: cancelled, or past its window.
fn stopping(b: &Batches, id: &str, expires_at: u64) -> bool {
    now() >= expires_at
        || b.store
            .batch(id)
            .ok()
            .flatten()
            .is_some_and(|o| o["status"] == "cancelling")
}

async fn drive(state: &Arc<AppState>, b: &Batches, id: &str) -> Result<(), BatchError> {
    let Some(object) = b.store.batch(id)? else {
        return Ok(());
    };
    if FINAL.contains(&object["status"].as_str().unwrap_or_default()) {
        return Ok(());
    }
    let endpoint = object["endpoint"].as_str().unwrap_or_default().to_string();
    let expires_at = object["expires_at"].as_u64().unwrap_or(0);
    let input_id = object["input_file_id"].as_str().unwrap_or_default();
    let parsed = match b.store.content(input_id)? {
        Some(bytes) => input::parse(&bytes, Some(&endpoint)),
        None => Err(vec![LineError {
            code: "file_not_found",
            message: format!("the input file {input_id} was deleted"),
            param: Some("input_file_id".into()),
            line: None,
        }]),
    };
    let lines = match parsed {
        Ok(lines) => lines,
        Err(errors) => {
            b.update(id, |o| {
                if o["status"] == "cancelling" {
                    o["status"] = "cancelled".into();
                    o["cancelled_at"] = now().into();
                } else {
                    o["status"] = "failed".into();
                    o["failed_at"] = now().into();
                    o["errors"] = json!({"object": "list", "data": errors});
                }
            })?;
            return Ok(());
        }
    };
    let recorded = b.store.results(id)?;
    let done: HashMap<usize, bool> = recorded.iter().map(|r| (r.index, r.ok)).collect();
    let ok = done.values().filter(|&&ok| ok).count();
    b.update(id, |o| {
        if o["status"] == "validating" {
            o["status"] = "in_progress".into();
            o["in_progress_at"] = now().into();
        }
        o["request_counts"] =
            json!({"total": lines.len(), "completed": ok, "failed": done.len() - ok});
    })?;

    let todo: Vec<usize> = (0..lines.len()).filter(|i| !done.contains_key(i)).collect();
    let asked = futures_util::stream::iter(todo)
        .map(|i| {
            let (state, line) = (state.clone(), &lines[i]);
            let request_id = request_id(id, line);
            async move {
                if stopping(b, id, expires_at) {
                    return None;
                }
                Some((i, ask(&state, b, id, expires_at, line, &request_id).await))
            }
        })
        .buffer_unordered(b.max_rows);
    let mut asked = std::pin::pin!(asked);
    while let Some(answer) = asked.next().await {
        let Some((i, Some(line))) = answer else {
            continue;
        };
        let ok = succeeded(&line);
        b.store.record(id, i, ok, &line)?;
        b.update(id, |o| {
            let key = if ok { "completed" } else { "failed" };
            let n = o["request_counts"][key].as_u64().unwrap_or(0);
            o["request_counts"][key] = (n + 1).into();
        })?;
    }
    finish(b, id, &lines, expires_at)
}

/// Line `line`'s request id within batch `id`.
fn request_id(id: &str, line: &Line) -> String {
    format!("{}-{}", id.trim_start_matches("batch_"), line.line)
}

/// `line`'s output line: its request answered by this server's handler for its endpoint. A
/// refusal for a full queue is retried; `None` when the batch stops first.
async fn ask(
    state: &Arc<AppState>,
    b: &Batches,
    id: &str,
    expires_at: u64,
    line: &Line,
    request_id: &str,
) -> Option<Value> {
    let mut body = line.body.clone();
    // A batch answers each request whole.
    body.insert("stream".into(), false.into());
    body.remove("stream_options");
    let body = Bytes::from(Value::Object(body).to_string());
    loop {
        let response = match line.url.as_str() {
            "/v1/chat/completions" => {
                completions::chat_at(state.clone(), body.clone(), Priority::Batch).await
            }
            _ => completions::complete(state.clone(), body.clone(), Priority::Batch).await,
        };
        let status = response.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            tokio::time::sleep(RETRY).await;
            if stopping(b, id, expires_at) {
                return None;
            }
            continue;
        }
        let line_out = match axum::body::to_bytes(response.into_body(), usize::MAX).await {
            Ok(bytes) => {
                let value = serde_json::from_slice(&bytes)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
                answered(&line.custom_id, request_id, status.as_u16(), value)
            }
            Err(e) => unanswered(&line.custom_id, request_id, "server_error", &e.to_string()),
        };
        return Some(line_out);
    }
}

/// Writes batch `id`'s output and error files in input order and ends it: completed,
/// cancelled (when a cancel came) or expired (when its window ended first).
fn finish(b: &Batches, id: &str, lines: &[Line], expires_at: u64) -> Result<(), BatchError> {
    let Some(object) = b.update(id, |o| {
        if o["status"] == "in_progress" {
            o["status"] = "finalizing".into();
            o["finalizing_at"] = now().into();
        }
    })?
    else {
        return Ok(());
    };
    let cancelled = object["status"] == "cancelling";
    let recorded: HashMap<usize, (bool, Value)> = b
        .store
        .results(id)?
        .into_iter()
        .map(|r| (r.index, (r.ok, r.line)))
        .collect();
    let expired = !cancelled && recorded.len() < lines.len() && now() >= expires_at;
    let (mut out, mut errors) = (String::new(), String::new());
    let (mut completed, mut failed) = (0usize, 0usize);
    for (i, line) in lines.iter().enumerate() {
        match recorded.get(&i) {
            Some((true, l)) => {
                completed += 1;
                out.push_str(&format!("{l}\n"));
            }
            Some((false, l)) => {
                failed += 1;
                errors.push_str(&format!("{l}\n"));
            }
            None => {
                let (code, message) = if cancelled {
                    (
                        "batch_cancelled",
                        "The batch was cancelled before this request ran.",
                    )
                } else {
                    (
                        "batch_expired",
                        "This request could not be executed before the completion window expired.",
                    )
                };
                let l = unanswered(&line.custom_id, &request_id(id, line), code, message);
                errors.push_str(&format!("{l}\n"));
            }
        }
    }
    let stem = id.trim_start_matches("batch_");
    let keep = |suffix: &str, text: &str| -> Result<Option<String>, BatchError> {
        if text.is_empty() {
            return Ok(None);
        }
        let file_id = format!("file-{stem}-{suffix}");
        let name = format!("{id}_{suffix}.jsonl");
        b.store.add_file(
            &file_object(&file_id, &name, "batch_output", text.len()),
            text.as_bytes(),
        )?;
        Ok(Some(file_id))
    };
    let output = keep("output", &out)?;
    let error = keep("error", &errors)?;
    b.update(id, |o| {
        let (status, at) = if cancelled {
            ("cancelled", "cancelled_at")
        } else if expired {
            ("expired", "expired_at")
        } else {
            ("completed", "completed_at")
        };
        o["status"] = status.into();
        o[at] = now().into();
        o["output_file_id"] = output.clone().into();
        o["error_file_id"] = error.clone().into();
        o["request_counts"] =
            json!({"total": lines.len(), "completed": completed, "failed": failed});
    })?;
    Ok(())
}
