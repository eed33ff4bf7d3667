//! `/v1/completions` and `/v1/chat/completions`: tokenize, submit to the engine, and answer
//! with one JSON body or a stream of server-sent events. Time to first token, time per output
//! token and latency go into the metrics.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ft_model::chat::Message;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::openai::{
    logprobs_json, ChatRequest, CompletionRequest, Endpoint, Reply, Sampling, TokenOut, Usage,
};
use super::worker::Command;
use super::{ApiError, AppState};
use crate::request::{Event, FinishReason, Request};

/// A JSON body, or a 400 saying what is wrong with it.
pub(super) fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

/// `POST /v1/completions`.
pub(super) async fn completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let arrival = Instant::now();
    let span = tracing::info_span!("request", endpoint = "/v1/completions");
    let run = async {
        let req: CompletionRequest = parse(&body)?;
        let text = req.prompt_text().map_err(ApiError::bad_request)?;
        let prompt = state
            .tokenizer
            .encode(&text)
            .map_err(|e| ApiError::bad_request(format!("prompt: {e}")))?;
        start(
            &state,
            Endpoint::Completions,
            &req.model,
            prompt,
            &req.sampling,
            req.logprobs,
            16,
            arrival,
        )
        .await
    };
    finish_response(&state, run.instrument(span).await)
}

/// `POST /v1/chat/completions`.
pub(super) async fn chat(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let arrival = Instant::now();
    let span = tracing::info_span!("request", endpoint = "/v1/chat/completions");
    let run = async {
        let req: ChatRequest = parse(&body)?;
        if req.messages.is_empty() {
            return Err(ApiError::bad_request(
                "messages: at least one message is needed",
            ));
        }
        if let Some(m) = req
            .messages
            .iter()
            .find(|m| !["system", "user", "assistant"].contains(&m.role.as_str()))
        {
            return Err(ApiError::bad_request(format!(
                "messages: unknown role {:?}",
                m.role
            )));
        }
        let template = state.chat.as_ref().ok_or_else(|| {
            ApiError::bad_request("this model has no chat template; use /v1/completions")
        })?;
        let messages: Vec<Message> = req
            .messages
            .iter()
            .map(|m| {
                Ok(Message {
                    role: m.role.clone(),
                    content: m.content.text().map_err(ApiError::bad_request)?,
                })
            })
            .collect::<Result<_, ApiError>>()?;
        let text = template
            .render(
                &messages,
                true,
                state.tokenizer.bos_token.as_deref(),
                state.tokenizer.eos_token.as_deref(),
            )
            .map_err(|e| ApiError::bad_request(format!("messages: {e}")))?;
        let prompt = state
            .tokenizer
            .encode(&text)
            .map_err(|e| ApiError::bad_request(format!("messages: {e}")))?;
        let logprobs = if req.logprobs {
            Some(req.top_logprobs.unwrap_or(0))
        } else if req.top_logprobs.is_some() {
            return Err(ApiError::bad_request("top_logprobs: needs logprobs: true"));
        } else {
            None
        };
        // Chat defaults to the rest of the context, as vLLM does.
        let default_max = state.context.saturating_sub(prompt.len()).max(1);
        start(
            &state,
            Endpoint::Chat,
            &req.model,
            prompt,
            &req.sampling,
            logprobs,
            default_max,
            arrival,
        )
        .await
    };
    finish_response(&state, run.instrument(span).await)
}

fn finish_response(state: &AppState, result: Result<Response, ApiError>) -> Response {
    match result {
        Ok(r) => r,
        Err(e) => {
            count(state, e.status.as_u16());
            e.into_response()
        }
    }
}

fn count(state: &AppState, status: u16) {
    if let Ok(mut m) = state.metrics.lock() {
        *m.requests.entry(status).or_default() += 1;
    }
}

/// Submits the request and answers it, streamed or whole.
#[allow(clippy::too_many_arguments)]
async fn start(
    state: &Arc<AppState>,
    endpoint: Endpoint,
    model: &str,
    prompt: Vec<u32>,
    sampling: &Sampling,
    logprobs: Option<usize>,
    default_max: usize,
    arrival: Instant,
) -> Result<Response, ApiError> {
    let seed = state.seeds.fetch_add(1, Ordering::Relaxed);
    let params = sampling
        .params(default_max, logprobs, &state.tokenizer.eos_ids, seed)
        .map_err(ApiError::bad_request)?;
    let adapter = (model != state.config.model_id).then(|| model.to_string());
    let (reply, answer) = oneshot::channel();
    state.send(Command::Submit {
        request: Request {
            prompt,
            adapter,
            params,
        },
        reply,
    })?;
    let events = answer
        .await
        .map_err(|_| ApiError::internal("the engine has stopped"))??;
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let prefix = match endpoint {
        Endpoint::Completions => "cmpl",
        Endpoint::Chat => "chatcmpl",
    };
    let reply = Reply {
        endpoint,
        id: format!("{prefix}-{created:x}{seed:x}"),
        model: model.to_string(),
        created,
    };
    let progress = Progress {
        state: state.clone(),
        events,
        arrival,
        first: None,
        last: None,
        tokens: 0,
        logprobs: logprobs.is_some(),
    };
    if sampling.stream {
        Ok(stream(progress, reply, sampling.include_usage()))
    } else {
        whole(progress, reply).await
    }
}

/// A request's events as they arrive, with its timings.
struct Progress {
    state: Arc<AppState>,
    events: mpsc::UnboundedReceiver<Event>,
    arrival: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    tokens: usize,
    logprobs: bool,
}

/// What one event means for the response.
enum Step {
    Text(String, Option<TokenOut>),
    End(String, FinishReason, Usage),
    Failed(ApiError),
}

impl Progress {
    async fn next(&mut self) -> Step {
        match self.events.recv().await {
            Some(Event::Token {
                token,
                text,
                logprob,
                ..
            }) => {
                let now = Instant::now();
                if self.first.is_none() {
                    self.first = Some(now);
                }
                self.last = Some(now);
                self.tokens += 1;
                let out = logprob.filter(|_| self.logprobs).map(|lp| {
                    let piece = |id: u32| self.state.tokenizer.decode(&[id]).unwrap_or_default();
                    TokenOut {
                        piece: piece(token),
                        top_pieces: lp.top.iter().map(|&(id, _)| piece(id)).collect(),
                        logprob: lp,
                    }
                });
                Step::Text(text, out)
            }
            Some(Event::Finished {
                reason,
                text,
                prompt_tokens,
                completion_tokens,
                ..
            }) => {
                self.record(200);
                Step::End(
                    text,
                    reason,
                    Usage {
                        prompt: prompt_tokens,
                        completion: completion_tokens,
                    },
                )
            }
            Some(Event::Failed { error, .. }) => Step::Failed(error.into()),
            None => Step::Failed(ApiError::internal("the engine dropped the request")),
        }
    }

    /// Timings of a finished request into the metrics.
    fn record(&self, status: u16) {
        let Ok(mut m) = self.state.metrics.lock() else {
            return;
        };
        *m.requests.entry(status).or_default() += 1;
        if status != 200 {
            return;
        }
        m.latency.observe(self.arrival.elapsed().as_secs_f64());
        if let Some(first) = self.first {
            m.ttft.observe((first - self.arrival).as_secs_f64());
            if let (Some(last), true) = (self.last, self.tokens > 1) {
                m.tpot
                    .observe((last - first).as_secs_f64() / (self.tokens - 1) as f64);
            }
        }
    }
}

async fn whole(mut progress: Progress, reply: Reply) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut tokens = Vec::new();
    loop {
        match progress.next().await {
            Step::Text(t, lp) => {
                text.push_str(&t);
                tokens.extend(lp);
            }
            Step::End(t, reason, usage) => {
                text.push_str(&t);
                let logprobs = progress
                    .logprobs
                    .then(|| logprobs_json(reply.endpoint, &tokens));
                return Ok(Json(reply.whole(&text, logprobs, reason, usage)).into_response());
            }
            Step::Failed(error) => return Err(error),
        }
    }
}

/// The response as server-sent events, ending with `data: [DONE]`. Dropping the stream (the
/// client went away) drops the event channel, and the engine cancels the request.
fn stream(progress: Progress, reply: Reply, include_usage: bool) -> Response {
    let events =
        futures_util::stream::unfold(Some((progress, reply, true)), move |state| async move {
            let (mut progress, reply, first) = state?;
            let data = |v: Value| Ok::<_, Infallible>(SseEvent::default().data(v.to_string()));
            match progress.next().await {
                Step::Text(t, lp) => {
                    let logprobs = lp.map(|t| logprobs_json(reply.endpoint, &[t]));
                    let chunk = reply.chunk(Some(&t), first, logprobs, None);
                    Some((vec![data(chunk)], Some((progress, reply, false))))
                }
                Step::End(t, reason, usage) => {
                    let mut out = Vec::new();
                    if !t.is_empty() {
                        out.push(data(reply.chunk(Some(&t), first, None, None)));
                    }
                    out.push(data(reply.chunk(None, false, None, Some(reason))));
                    if include_usage {
                        out.push(data(reply.usage_chunk(usage)));
                    }
                    out.push(Ok(SseEvent::default().data("[DONE]")));
                    Some((out, None))
                }
                Step::Failed(error) => {
                    progress.record(error.status.as_u16());
                    let err = super::openai::error_json(&error.message, error.kind, None);
                    Some((
                        vec![data(err), Ok(SseEvent::default().data("[DONE]"))],
                        None,
                    ))
                }
            }
        });
    let flat = futures_util::StreamExt::flat_map(events, futures_util::stream::iter);
    Sse::new(flat)
        .keep_alive(KeepAlive::default())
        .into_response()
}
