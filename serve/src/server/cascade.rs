//! `/v1/completions` to a served cascade: each stage in turn answers the prompt (its own
//! requests to this server's base or adapters, or to another server), and the first stage
//! whose scorer keeps its answer, or the last, gives the response. The response names that
//! stage (`ft_stage` in the body, header `x-ft-stage`); its `usage` counts every request the
//! cascade made; `/metrics` counts each stage's requests, answers and cost. The stages decode
//! as fitted: of the request, only the prompt, `max_tokens` (or `max_completion_tokens`),
//! `stop`, `logprobs` and `stream` are read. Cascade answers are not cached.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::completions::whole_body;
use super::openai::{CompletionRequest, Prompt};
use super::{ApiError, AppState};
use crate::cascade::{answer, Cascade, Reply, Stage, Target};
use crate::request::Priority;

/// How long a stage on another server may take to answer one request.
const REMOTE_TIMEOUT: Duration = Duration::from_secs(600);

/// The request fields every stage's requests keep; the rest are the stage's.
const KEPT: [&str; 3] = ["max_tokens", "max_completion_tokens", "stop"];

/// Answers `req` (whose raw body is `body`) with `cascade`.
pub(super) async fn complete(
    state: &Arc<AppState>,
    cascade: &Cascade,
    req: &CompletionRequest,
    body: &[u8],
    priority: Priority,
) -> Result<Response, ApiError> {
    let prompt = match req.prompts().map_err(ApiError::bad_request)?.as_slice() {
        [Prompt::Text(text)] => text.clone(),
        _ => {
            return Err(ApiError::bad_request(
                "prompt: a cascade answers one text prompt per request",
            ))
        }
    };
    if req.echo {
        return Err(ApiError::bad_request("echo: a cascade does not echo"));
    }
    if req.sampling.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("n: a cascade gives one choice"));
    }
    let raw: Map<String, Value> = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?;
    let base: Map<String, Value> = raw
        .into_iter()
        .filter(|(k, _)| KEPT.contains(&k.as_str()))
        .collect();

    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    for (i, stage) in cascade.stages.iter().enumerate() {
        let last = i + 1 == cascade.stages.len();
        let asked = (0..stage.samples).map(|_| {
            let seed = state.seeds.fetch_add(1, Ordering::Relaxed);
            ask(state, stage, stage.body(&base, &prompt, seed), priority)
        });
        let results = futures_util::future::join_all(asked).await;
        let mut cost = 0.0;
        let mut replies = Vec::with_capacity(results.len());
        let mut failure = None;
        for (result, seconds) in results {
            match result {
                Ok(reply) => {
                    cost += stage
                        .price
                        .cost(reply.prompt_tokens, reply.completion_tokens, seconds);
                    prompt_tokens += reply.prompt_tokens;
                    completion_tokens += reply.completion_tokens;
                    replies.push(reply);
                }
                Err(e) => {
                    cost += stage.price.cost(0, 0, seconds);
                    failure.get_or_insert(e);
                }
            }
        }
        let kept = match failure {
            None => answer(replies).filter(|a| last || stage.keeps(&a.features)),
            Some(e) if last => {
                count(state, cascade, stage, cost, false);
                return Err(e);
            }
            Some(e) => {
                tracing::warn!(cascade = %cascade.name, stage = %stage.name, error = %e.message, "a stage failed; the next answers");
                None
            }
        };
        count(state, cascade, stage, cost, kept.is_some());
        if let Some(kept) = kept {
            let usage = (prompt_tokens, completion_tokens);
            return Ok(respond(cascade, stage, kept.reply, req, usage));
        }
    }
    Err(ApiError::internal("the cascade has no stage"))
}

/// Stage `stage`'s reply to `body`, and the seconds it took.
async fn ask(
    state: &Arc<AppState>,
    stage: &Stage,
    body: Value,
    priority: Priority,
) -> (Result<Reply, ApiError>, f64) {
    let start = Instant::now();
    let answered = match &stage.target {
        Target::Local { .. } => local(state, body, start, priority).await,
        Target::Remote { url, api_key, .. } => remote(url, api_key.clone(), body).await,
    };
    let reply = answered.and_then(|b| {
        Reply::of(b).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("stage {}: its answer has no choice", stage.name),
                "server_error",
            )
        })
    });
    (
        reply.map_err(|mut e| {
            if !e.message.starts_with("stage ") {
                e.message = format!("stage {}: {}", stage.name, e.message);
            }
            e
        }),
        start.elapsed().as_secs_f64(),
    )
}

/// A request to this server's base or adapters.
async fn local(
    state: &Arc<AppState>,
    body: Value,
    arrival: Instant,
    priority: Priority,
) -> Result<Value, ApiError> {
    let req: CompletionRequest = serde_json::from_value(body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?;
    whole_body(state, &req, arrival, priority).await
}

/// A request to another OpenAI-compatible server, its errors as 502 naming it.
async fn remote(url: &str, api_key: Option<String>, body: Value) -> Result<Value, ApiError> {
    let endpoint = format!("{}/v1/completions", url.trim_end_matches('/'));
    let call = endpoint.clone();
    let answered = tokio::task::spawn_blocking(move || {
        let agent = ureq::AgentBuilder::new().timeout(REMOTE_TIMEOUT).build();
        let mut request = agent.post(&call);
        if let Some(key) = api_key {
            request = request.set("Authorization", &format!("Bearer {key}"));
        }
        match request.send_json(body) {
            Ok(r) => r.into_json::<Value>().map_err(|e| e.to_string()),
            Err(ureq::Error::Status(code, r)) => Err(format!(
                "HTTP {code}: {}",
                r.into_string().unwrap_or_default().trim()
            )),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    answered.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("{endpoint}: {e}"),
            "server_error",
        )
    })
}

/// One stage's request, answer and cost into the metrics.
fn count(state: &AppState, cascade: &Cascade, stage: &Stage, cost: f64, answered: bool) {
    if let Ok(mut m) = state.metrics.lock() {
        let c = m
            .cascades
            .entry((cascade.name.clone(), stage.name.clone()))
            .or_default();
        c.asked += 1;
        c.answered += u64::from(answered);
        c.cost_usd += cost;
    }
}

/// The response: the kept reply's body as the cascade's, naming `stage`; streamed as one text
/// event when asked.
fn respond(
    cascade: &Cascade,
    stage: &Stage,
    reply: Reply,
    req: &CompletionRequest,
    (prompt_tokens, completion_tokens): (usize, usize),
) -> Response {
    let mut body = reply.body;
    body["model"] = cascade.name.clone().into();
    body["ft_stage"] = stage.name.clone().into();
    body["usage"] = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    });
    if req.logprobs.is_none() {
        if let Some(choice) = body["choices"].get_mut(0) {
            choice["logprobs"] = Value::Null;
        }
    }
    let header = HeaderValue::from_str(&stage.name).ok();
    let mut response = if req.sampling.stream {
        stream(body, req.sampling.include_usage())
    } else {
        Json(body).into_response()
    };
    if let Some(h) = header {
        response.headers_mut().insert("x-ft-stage", h);
    }
    response
}

/// `body` as server-sent events: its text, its finish, its usage when asked, `[DONE]`.
fn stream(body: Value, include_usage: bool) -> Response {
    let choice = &body["choices"][0];
    let chunk = |choices: Value| {
        json!({
            "id": body["id"], "object": "text_completion", "created": body["created"],
            "model": body["model"], "ft_stage": body["ft_stage"], "choices": choices,
        })
    };
    let mut events = vec![
        chunk(
            json!([{"index": 0, "text": choice["text"], "logprobs": choice["logprobs"], "finish_reason": null}]),
        ),
        chunk(
            json!([{"index": 0, "text": "", "logprobs": null, "finish_reason": choice["finish_reason"]}]),
        ),
    ];
    if include_usage {
        let mut usage = chunk(json!([]));
        usage["usage"] = body["usage"].clone();
        events.push(usage);
    }
    let data: Vec<Result<SseEvent, Infallible>> = events
        .iter()
        .map(Value::to_string)
        .chain(std::iter::once("[DONE]".to_string()))
        .map(|d| Ok(SseEvent::default().data(d)))
        .collect();
    Sse::new(futures_util::stream::iter(data)).into_response()
}
