//! OpenAI's Files and Batch API, as the official clients call it: `POST /v1/files`
//! (multipart, `purpose=batch`), `GET /v1/files`, `GET /v1/files/{id}`,
//! `GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`; `POST /v1/batches`
//! (`input_file_id`, `endpoint`, `completion_window` = `24h`, `metadata`),
//! `GET /v1/batches` (`limit`, `after`), `GET /v1/batches/{id}`,
//! `POST /v1/batches/{id}/cancel`. A batch moves through validating, failed, in_progress,
//! finalizing, completed, expired, cancelling and cancelled ([`super::batch_runner`]); files
//! and batches live in the server's state folder ([`crate::batches::store`]).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{ApiError, AppState};
use crate::batches::input::{ENDPOINTS, MAX_BYTES};
use crate::batches::store::Store;
use crate::batches::BatchError;

/// How long a batch may take: OpenAI's only window.
pub(super) const WINDOW: &str = "24h";
/// The window in seconds.
pub(super) const WINDOW_S: u64 = 24 * 3600;

/// The Batch API's state: the store, how many rows a batch may fill, and the batches being
/// run and those asked to stop.
pub(crate) struct Batches {
    pub(super) store: Store,
    /// Requests of one batch in the engine at once.
    pub(super) max_rows: usize,
    /// Batches whose runner is live.
    pub(super) running: Mutex<HashSet<String>>,
    /// Held while a batch object is read, changed and written back, so that a cancel and the
    /// runner's counts never overwrite each other.
    objects: Mutex<()>,
}

impl Batches {
    /// Opens the state in `dir`.
    pub(crate) fn open(dir: &std::path::Path, max_rows: usize) -> Result<Self, BatchError> {
        Ok(Self {
            store: Store::open(dir)?,
            max_rows: max_rows.max(1),
            running: Mutex::new(HashSet::new()),
            objects: Mutex::new(()),
        })
    }

    /// Batch `id`'s object after `change`, written back; `None` when there is no such batch.
    pub(super) fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut Value),
    ) -> Result<Option<Value>, BatchError> {
        let _held = self.objects.lock().map_err(|_| BatchError::Io {
            path: "batches".into(),
            source: std::io::Error::other("the batch lock is poisoned"),
        })?;
        let Some(mut object) = self.store.batch(id)? else {
            return Ok(None);
        };
        change(&mut object);
        self.store.put_batch(&object)?;
        Ok(Some(object))
    }
}

impl From<BatchError> for ApiError {
    fn from(e: BatchError) -> Self {
        tracing::error!(error = %e, "the batch state");
        ApiError::internal(e.to_string())
    }
}

/// Seconds since the epoch.
pub(super) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A new id: `prefix` and 24 random hex digits.
pub(super) fn new_id(prefix: &str) -> String {
    format!("{prefix}{:024x}", rand::random::<u128>() >> 32)
}

fn batches(state: &AppState) -> Result<&Batches, ApiError> {
    state.batches.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "this server keeps no files or batches (it has no state folder)",
            "not_found_error",
        )
    })
}

fn not_found(what: &str, id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no {what} {id:?}"),
        "not_found_error",
    )
}

/// A file object.
pub(super) fn file_object(id: &str, filename: &str, purpose: &str, bytes: usize) -> Value {
    json!({
        "id": id, "object": "file", "bytes": bytes, "created_at": now(),
        "filename": filename, "purpose": purpose, "status": "processed",
        "expires_at": null, "status_details": null,
    })
}

/// `POST /v1/files`: a multipart form with `purpose` (`batch`) and `file`.
pub(super) async fn upload(
    State(state): State<Arc<AppState>>,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
    let b = batches(&state)?;
    let mut form = form.map_err(|e| {
        ApiError::bad_request(format!(
            "a multipart form with `purpose` and `file` is required: {}",
            e.body_text()
        ))
    })?;
    let (mut purpose, mut file) = (None, None);
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| ApiError::bad_request(format!("invalid multipart form: {e}")))?
    {
        match field.name() {
            Some("purpose") => {
                purpose = Some(
                    field
                        .text()
                        .await
                        .map_err(|e| ApiError::bad_request(format!("purpose: {e}")))?,
                )
            }
            Some("file") => {
                let name = field.file_name().unwrap_or("upload.jsonl").to_string();
                let bytes = field
                    .bytes()
                    .await
                    .map_err(|e| ApiError::bad_request(format!("file: {e}")))?;
                file = Some((name, bytes));
            }
            _ => {}
        }
    }
    match purpose.as_deref() {
        Some("batch") => {}
        Some(p) => {
            return Err(ApiError::bad_request(format!(
                "purpose: {p:?}: this server keeps \"batch\" files only"
            )))
        }
        None => return Err(ApiError::bad_request("purpose: required (\"batch\")")),
    }
    let (filename, bytes) = file.ok_or_else(|| ApiError::bad_request("file: required"))?;
    if bytes.len() > MAX_BYTES {
        return Err(ApiError::bad_request(format!(
            "file: {} bytes, more than the {} MiB a batch file may hold",
            bytes.len(),
            MAX_BYTES >> 20
        )));
    }
    let object = file_object(&new_id("file-"), &filename, "batch", bytes.len());
    b.store.add_file(&object, &bytes)?;
    Ok(Json(object))
}

/// `GET /v1/files`.
pub(super) async fn files(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let data = batches(&state)?.store.files()?;
    Ok(Json(
        json!({"object": "list", "data": data, "has_more": false}),
    ))
}

/// `GET /v1/files/{id}`.
pub(super) async fn file(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let b = batches(&state)?;
    b.store
        .file(&id)?
        .map(Json)
        .ok_or_else(|| not_found("file", &id))
}

/// `GET /v1/files/{id}/content`.
pub(super) async fn content(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let bytes = batches(&state)?
        .store
        .content(&id)?
        .ok_or_else(|| not_found("file", &id))?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Bytes::from(bytes),
    )
        .into_response())
}

/// `DELETE /v1/files/{id}`.
pub(super) async fn delete(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let b = batches(&state)?;
    if let Some(user) = b.store.batches()?.iter().find(|o| {
        o["input_file_id"] == id.as_str()
            && !FINAL.contains(&o["status"].as_str().unwrap_or_default())
    }) {
        return Err(ApiError::bad_request(format!(
            "{id} is the input of batch {}, which has not ended",
            user["id"].as_str().unwrap_or_default()
        )));
    }
    if !b.store.delete_file(&id)? {
        return Err(not_found("file", &id));
    }
    Ok(Json(json!({"id": id, "object": "file", "deleted": true})))
}

/// `POST /v1/batches`'s body; other fields (`output_expires_after`) are accepted and ignored.
#[derive(Deserialize)]
struct Create {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
}

/// `POST /v1/batches`: checks the fields and the input file, then starts validating it.
pub(super) async fn create(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let b = batches(&state)?;
    let req: Create = super::completions::parse(&body)?;
    if !ENDPOINTS.contains(&req.endpoint.as_str()) {
        return Err(ApiError::bad_request(format!(
            "endpoint: {:?} is not one of {}",
            req.endpoint,
            ENDPOINTS.join(", ")
        )));
    }
    if req.completion_window != WINDOW {
        return Err(ApiError::bad_request(format!(
            "completion_window: {:?}: only \"{WINDOW}\" is supported",
            req.completion_window
        )));
    }
    if let Some(m) = &req.metadata {
        if m.len() > 16 || m.values().any(|v| !v.is_string()) {
            return Err(ApiError::bad_request("metadata: at most 16 string values"));
        }
    }
    let file = b
        .store
        .file(&req.input_file_id)?
        .ok_or_else(|| not_found("file", &req.input_file_id))?;
    if file["purpose"] != "batch" {
        return Err(ApiError::bad_request(format!(
            "input_file_id: {} is not a \"batch\" file",
            req.input_file_id
        )));
    }
    let created = now();
    let object = json!({
        "id": new_id("batch_"), "object": "batch", "endpoint": req.endpoint, "errors": null,
        "input_file_id": req.input_file_id, "completion_window": WINDOW, "status": "validating",
        "output_file_id": null, "error_file_id": null, "created_at": created,
        "in_progress_at": null, "expires_at": created + WINDOW_S, "finalizing_at": null,
        "completed_at": null, "failed_at": null, "expired_at": null, "cancelling_at": null,
        "cancelled_at": null, "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": req.metadata,
    });
    b.store.put_batch(&object)?;
    super::batch_runner::spawn(&state, object["id"].as_str().unwrap_or_default());
    Ok(Json(object))
}

/// `GET /v1/batches/{id}`.
pub(super) async fn batch(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    batches(&state)?
        .store
        .batch(&id)?
        .map(Json)
        .ok_or_else(|| not_found("batch", &id))
}

/// `GET /v1/batches`'s query.
#[derive(Deserialize)]
pub(super) struct Page {
    limit: Option<usize>,
    after: Option<String>,
}

/// `GET /v1/batches?limit=N&after=ID`: newest first, `limit` (1 to 100, default 20) after the
/// batch `after`.
pub(super) async fn list(
    State(state): State<Arc<AppState>>,
    page: Result<Query<Page>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(page) = page.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = page.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::bad_request("limit: from 1 to 100"));
    }
    let all = batches(&state)?.store.batches()?;
    let start = match &page.after {
        Some(after) => all
            .iter()
            .position(|b| b["id"] == after.as_str())
            .map(|i| i + 1)
            .ok_or_else(|| not_found("batch", after))?,
        None => 0,
    };
    let data: Vec<Value> = all.iter().skip(start).take(limit).cloned().collect();
    Ok(Json(json!({
        "object": "list",
        "first_id": data.first().map(|b| b["id"].clone()),
        "last_id": data.last().map(|b| b["id"].clone()),
        "has_more": start + data.len() < all.len(),
        "data": data,
    })))
}

/// `POST /v1/batches/{id}/cancel`: a validating or running batch stops at its next request
/// (those in flight finish) and ends cancelled; a finished one is answered as it is.
pub(super) async fn cancel(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let object = batches(&state)?
        .update(&id, |o| {
            if matches!(o["status"].as_str(), Some("validating" | "in_progress")) {
                o["status"] = "cancelling".into();
                o["cancelling_at"] = now().into();
            }
        })?
        .ok_or_else(|| not_found("batch", &id))?;
    super::batch_runner::spawn(&state, &id);
    Ok(Json(object))
}

/// The statuses a batch ends in.
pub(super) const FINAL: [&str; 4] = ["completed", "failed", "expired", "cancelled"];
