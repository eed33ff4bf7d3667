//! `/v1/completions` and `/v1/chat/completions`: tokenize, submit to the engine, and answer
//! with one JSON body or a stream of server-sent events. Time to first token, time per output
//! token and latency go into the metrics. A request the response cache may answer is looked
//! up first and its fresh answer stored ([`super::cached`]).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use ft_model::chat::Message;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::cached::{mark, Lookup};
use super::openai::{
    logprobs_json, ChatRequest, Choice, CompletionRequest, Endpoint, Prompt, Reply, Sampling,
    TokenOut, Usage,
};
use super::worker::Command;
use super::{ApiError, AppState};
use crate::error::EngineError;
use crate::request::{Event, FinishReason, Priority, Request, TokenLogprob};
use crate::response_cache::Cached;

/// A JSON body, or a 400 saying what is wrong with it.
pub(super) fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

/// `POST /v1/completions`.
pub(super) async fn completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    complete(state, body, Priority::Interactive).await
}

/// `POST /v1/chat/completions`.
pub(super) async fn chat(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    chat_at(state, body, Priority::Interactive).await
}

/// A `/v1/completions` body answered at `priority` (a batch's requests at [`Priority::Batch`]).
pub(super) async fn complete(state: Arc<AppState>, body: Bytes, priority: Priority) -> Response {
    let arrival = Instant::now();
    let span = tracing::info_span!("request", endpoint = "/v1/completions");
    let run = async {
        let req: CompletionRequest = parse(&body)?;
        if let Some(cascade) = state.config.cascades.iter().find(|c| c.name == req.model) {
            return super::cascade::complete(&state, cascade, &req, &body, priority).await;
        }
        let mut lookup = Lookup::new(&state, "/v1/completions", &req.model, &req.sampling, &body);
        if let Some(hit) = hit(&mut lookup, arrival).await {
            return Ok(hit);
        }
        let sent = send_all(&state, &req, arrival, priority)?;
        // All are queued before any is waited for; a refusal drops the rest, which the
        // engine then cancels.
        let mut submitted = Vec::with_capacity(sent.len());
        for s in sent {
            submitted.push(s.accepted().await?);
        }
        answer(
            submitted,
            req.sampling.stream,
            req.sampling.include_usage(),
            lookup,
        )
        .await
    };
    finish_response(&state, run.instrument(span).await)
}

/// A `/v1/chat/completions` body answered at `priority`.
pub(super) async fn chat_at(state: Arc<AppState>, body: Bytes, priority: Priority) -> Response {
    let arrival = Instant::now();
    let span = tracing::info_span!("request", endpoint = "/v1/chat/completions");
    let run = async {
        let req: ChatRequest = parse(&body)?;
        if state.config.cascades.iter().any(|c| c.name == req.model) {
            return Err(ApiError::bad_request(format!(
                "model: {:?} is a cascade, fitted on completion prompts: use /v1/completions",
                req.model
            )));
        }
        let mut lookup = Lookup::new(
            &state,
            "/v1/chat/completions",
            &req.model,
            &req.sampling,
            &body,
        );
        if let Some(hit) = hit(&mut lookup, arrival).await {
            return Ok(hit);
        }
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
        let submit = Submit {
            endpoint: Endpoint::Chat,
            model: &req.model,
            sampling: &req.sampling,
            logprobs,
            prompt_logprobs: None,
            priority,
            // Chat defaults to the rest of the context, as vLLM does.
            default_max: state.context.saturating_sub(prompt.len()).max(1),
        };
        let submitted = submit
            .send(&state, prompt, None, arrival)?
            .accepted()
            .await?;
        answer(
            vec![submitted],
            req.sampling.stream,
            req.sampling.include_usage(),
            lookup,
        )
        .await
    };
    finish_response(&state, run.instrument(span).await)
}

/// Queues every prompt of `req` with the engine, in order, without waiting for any.
fn send_all(
    state: &Arc<AppState>,
    req: &CompletionRequest,
    arrival: Instant,
    priority: Priority,
) -> Result<Vec<Sent>, ApiError> {
    let prompts = req.prompts().map_err(ApiError::bad_request)?;
    let many = prompts.len() > 1;
    let mut sent = Vec::with_capacity(prompts.len());
    for (i, prompt) in prompts.into_iter().enumerate() {
        let field = if many {
            format!("prompt[{i}]")
        } else {
            "prompt".into()
        };
        let bad = |e: &dyn std::fmt::Display| ApiError::bad_request(format!("{field}: {e}"));
        let (tokens, text) = match prompt {
            Prompt::Text(text) => (state.tokenizer.encode(&text).map_err(|e| bad(&e))?, text),
            Prompt::Ids(ids) if req.echo => {
                let text = state.tokenizer.decode(&ids).map_err(|e| bad(&e))?;
                (ids, text)
            }
            Prompt::Ids(ids) => (ids, String::new()),
        };
        let echo = req.echo.then(|| Echo {
            text,
            tokens: tokens.clone(),
        });
        let submit = Submit {
            endpoint: Endpoint::Completions,
            model: &req.model,
            sampling: &req.sampling,
            logprobs: req.logprobs,
            prompt_logprobs: req.prompt_logprobs(),
            priority,
            default_max: 16,
        };
        sent.push(submit.send(state, tokens, echo, arrival)?);
    }
    Ok(sent)
}

/// `req`'s whole completion body, not streamed and not cached: how a served cascade asks
/// this server's base or adapters.
pub(super) async fn whole_body(
    state: &Arc<AppState>,
    req: &CompletionRequest,
    arrival: Instant,
    priority: Priority,
) -> Result<Value, ApiError> {
    let mut choices = Vec::new();
    let mut reply = None;
    for s in send_all(state, req, arrival, priority)? {
        let (progress, r) = s.accepted().await?;
        choices.push(whole(progress).await?);
        reply.get_or_insert(r);
    }
    let reply = reply.ok_or_else(|| ApiError::internal("no prompt was submitted"))?;
    Ok(reply.whole(&choices))
}

/// The cached answer, when there is a lookup and it finds one.
async fn hit(lookup: &mut Option<Lookup>, arrival: Instant) -> Option<Response> {
    lookup.as_mut()?.hit(arrival).await
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

/// An echoed prompt: its text and its tokens.
struct Echo {
    text: String,
    tokens: Vec<u32>,
}

/// What one prompt of a request asks the engine for.
struct Submit<'a> {
    endpoint: Endpoint,
    model: &'a str,
    sampling: &'a Sampling,
    logprobs: Option<usize>,
    prompt_logprobs: Option<usize>,
    priority: Priority,
    default_max: usize,
}

impl Submit<'_> {
    /// Sends `prompt` to the engine without waiting for its answer, so that every prompt of a
    /// request is queued before the engine's next step.
    fn send(
        &self,
        state: &Arc<AppState>,
        prompt: Vec<u32>,
        echo: Option<Echo>,
        arrival: Instant,
    ) -> Result<Sent, ApiError> {
        let seed = state.seeds.fetch_add(1, Ordering::Relaxed);
        let params = self
            .sampling
            .params(
                self.default_max,
                self.logprobs,
                self.prompt_logprobs,
                echo.is_some(),
                &state.tokenizer.eos_ids,
                seed,
            )
            .map_err(ApiError::bad_request)?;
        let adapter = (self.model != state.config.model_id).then(|| self.model.to_string());
        let (reply, answer) = oneshot::channel();
        state.send(Command::Submit {
            request: Request {
                prompt,
                adapter,
                params,
                priority: self.priority,
            },
            reply,
        })?;
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let prefix = match self.endpoint {
            Endpoint::Completions => "cmpl",
            Endpoint::Chat => "chatcmpl",
        };
        let reply = Reply {
            endpoint: self.endpoint,
            id: format!("{prefix}-{created:x}{seed:x}"),
            model: self.model.to_string(),
            created,
        };
        Ok(Sent {
            answer,
            reply,
            state: state.clone(),
            arrival,
            logprobs: self.logprobs.is_some(),
            scored: self.prompt_logprobs.is_some(),
            endpoint: self.endpoint,
            echo,
        })
    }
}

/// A prompt sent to the engine, waiting for it to be accepted.
struct Sent {
    answer: oneshot::Receiver<Result<mpsc::UnboundedReceiver<Event>, EngineError>>,
    reply: Reply,
    state: Arc<AppState>,
    arrival: Instant,
    logprobs: bool,
    scored: bool,
    endpoint: Endpoint,
    echo: Option<Echo>,
}

impl Sent {
    /// Its events once the engine accepted it, and what its responses share; or why not.
    async fn accepted(self) -> Result<(Progress, Reply), ApiError> {
        let events = self
            .answer
            .await
            .map_err(|_| ApiError::internal("the engine has stopped"))??;
        let progress = Progress {
            state: self.state,
            events,
            arrival: self.arrival,
            first: None,
            last: None,
            tokens: 0,
            logprobs: self.logprobs,
            endpoint: self.endpoint,
            // Unscored, the echo is sent at once; scored, with the engine's scores.
            echo_sent: self.scored,
            echo: self.echo,
        };
        Ok((progress, self.reply))
    }
}

/// Answers the submitted prompts: streamed (one prompt), or whole with a choice each, in
/// order. All of them run in the engine at once; the first failure is the answer.
async fn answer(
    submitted: Vec<(Progress, Reply)>,
    stream_it: bool,
    include_usage: bool,
    lookup: Option<Lookup>,
) -> Result<Response, ApiError> {
    let mut submitted = submitted.into_iter();
    let Some((first, reply)) = submitted.next() else {
        return Err(ApiError::internal("no prompt was submitted"));
    };
    let cached = lookup.is_some();
    let mut response = if stream_it {
        stream(first, reply, include_usage, lookup)
    } else {
        let mut choices = vec![whole(first).await?];
        for (progress, _) in submitted {
            choices.push(whole(progress).await?);
        }
        let body = reply.whole(&choices).to_string();
        if let Some(lookup) = lookup {
            lookup.store(Cached::Whole(body.clone())).await;
        }
        ([(header::CONTENT_TYPE, "application/json")], body).into_response()
    };
    if cached {
        mark(&mut response, "miss");
    }
    Ok(response)
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
    endpoint: Endpoint,
    /// The prompt, when it is sent back before the completion.
    echo: Option<Echo>,
    /// Whether the echo went out (or comes with the engine's prompt scores).
    echo_sent: bool,
}

/// What one event means for the response.
enum Step {
    /// The echoed prompt's text, and its tokens' log-probabilities when asked for.
    Prompt(String, Vec<TokenOut>),
    Text(String, Option<TokenOut>),
    /// The rest of the text, why it ended, the usage, and the stop token for the
    /// log-probabilities.
    End(String, FinishReason, Usage, Option<TokenOut>),
    Failed(ApiError),
}

impl Progress {
    async fn next(&mut self) -> Step {
        if let (Some(echo), false) = (&self.echo, self.echo_sent) {
            self.echo_sent = true;
            return Step::Prompt(echo.text.clone(), Vec::new());
        }
        match self.events.recv().await {
            Some(Event::Prompt { logprobs, .. }) => {
                let Some(echo) = &self.echo else {
                    return Step::Failed(ApiError::internal(
                        "prompt scores that were not asked for",
                    ));
                };
                let outs = if self.logprobs {
                    self.prompt_tokens(&echo.tokens, logprobs)
                } else {
                    Vec::new()
                };
                Step::Prompt(echo.text.clone(), outs)
            }
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
                let out = logprob
                    .filter(|_| self.logprobs)
                    .map(|lp| self.token_out(token, Some(lp)));
                Step::Text(text, out)
            }
            Some(Event::Finished {
                reason,
                text,
                prompt_tokens,
                completion_tokens,
                stop_token,
                ..
            }) => {
                self.record(200);
                // The legacy completions API lists the stop token among the log-probabilities
                // (not in the text), and lm-eval counts on it: its scores drop the last entry.
                let stop = stop_token
                    .filter(|_| self.logprobs && self.endpoint == Endpoint::Completions)
                    .and_then(|(token, lp)| lp.map(|lp| self.token_out(token, Some(lp))));
                Step::End(
                    text,
                    reason,
                    Usage {
                        prompt: prompt_tokens,
                        completion: completion_tokens,
                    },
                    stop,
                )
            }
            Some(Event::Failed { error, .. }) => Step::Failed(error.into()),
            None => Step::Failed(ApiError::internal("the engine dropped the request")),
        }
    }

    /// A token with its text and its alternatives' texts.
    fn token_out(&self, token: u32, logprob: Option<TokenLogprob>) -> TokenOut {
        let piece = |id: u32| self.state.tokenizer.decode(&[id]).unwrap_or_default();
        TokenOut {
            piece: piece(token),
            top_pieces: logprob
                .iter()
                .flat_map(|lp| lp.top.iter().map(|&(id, _)| piece(id)))
                .collect(),
            logprob,
        }
    }

    /// The prompt's tokens with their scores (the first has none).
    fn prompt_tokens(&self, tokens: &[u32], scores: Vec<TokenLogprob>) -> Vec<TokenOut> {
        let scores = std::iter::once(None).chain(scores.into_iter().map(Some));
        tokens
            .iter()
            .zip(scores)
            .map(|(&t, lp)| self.token_out(t, lp))
            .collect()
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

/// Waits for one prompt's whole choice.
async fn whole(mut progress: Progress) -> Result<Choice, ApiError> {
    let mut text = String::new();
    let mut tokens = Vec::new();
    loop {
        match progress.next().await {
            Step::Prompt(t, lps) => {
                text.push_str(&t);
                tokens.extend(lps);
            }
            Step::Text(t, lp) => {
                text.push_str(&t);
                tokens.extend(lp);
            }
            Step::End(t, finish, usage, stop) => {
                text.push_str(&t);
                tokens.extend(stop);
                let logprobs = progress
                    .logprobs
                    .then(|| logprobs_json(progress.endpoint, &tokens));
                return Ok(Choice {
                    text,
                    logprobs,
                    finish,
                    usage,
                });
            }
            Step::Failed(error) => return Err(error),
        }
    }
}

/// The response as server-sent events, ending with `data: [DONE]`. Dropping the stream (the
/// client went away) drops the event channel, and the engine cancels the request. With a
/// cache lookup, the events are kept and stored once the stream ends well, before its last
/// events are sent.
fn stream(
    progress: Progress,
    reply: Reply,
    include_usage: bool,
    lookup: Option<Lookup>,
) -> Response {
    let recording = lookup.map(|l| (l, Vec::new()));
    let start = Some((progress, reply, true, recording));
    let events = futures_util::stream::unfold(start, move |state| async move {
        let (mut progress, reply, first, mut recording) = state?;
        let (data, more) = match progress.next().await {
            Step::Prompt(t, lps) => {
                let logprobs = progress
                    .logprobs
                    .then(|| logprobs_json(reply.endpoint, &lps));
                (vec![reply.chunk(Some(&t), first, logprobs, None)], true)
            }
            Step::Text(t, lp) => {
                let logprobs = lp.map(|t| logprobs_json(reply.endpoint, &[t]));
                (vec![reply.chunk(Some(&t), first, logprobs, None)], true)
            }
            Step::End(t, reason, usage, stop) => {
                let mut out = Vec::new();
                if !t.is_empty() {
                    out.push(reply.chunk(Some(&t), first, None, None));
                }
                let stop = stop.map(|t| logprobs_json(reply.endpoint, &[t]));
                out.push(reply.chunk(None, false, stop, Some(reason)));
                if include_usage {
                    out.push(reply.usage_chunk(usage));
                }
                (out, false)
            }
            Step::Failed(error) => {
                progress.record(error.status.as_u16());
                // A failed stream is never stored.
                recording = None;
                let err = super::openai::error_json(&error.message, error.kind, None);
                (vec![err], false)
            }
        };
        let mut data: Vec<String> = data.iter().map(Value::to_string).collect();
        if !more {
            data.push("[DONE]".into());
        }
        if let Some((_, kept)) = &mut recording {
            kept.extend(data.iter().cloned());
        }
        let events: Vec<Result<SseEvent, Infallible>> = data
            .into_iter()
            .map(|d| Ok(SseEvent::default().data(d)))
            .collect();
        if more {
            return Some((events, Some((progress, reply, false, recording))));
        }
        if let Some((lookup, kept)) = recording {
            lookup.store(Cached::Events(kept)).await;
        }
        Some((events, None))
    });
    let flat = futures_util::StreamExt::flat_map(events, futures_util::stream::iter);
    Sse::new(flat)
        .keep_alive(KeepAlive::default())
        .into_response()
}
