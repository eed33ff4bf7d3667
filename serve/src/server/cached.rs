//! The response cache on the generation routes: which requests it may answer, the answer
//! replayed byte for byte (a stream as the same events), and a fresh answer stored once it
//! is whole.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::http::{header, HeaderValue};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::openai::Sampling;
use super::AppState;
use crate::response_cache::{Cached, Key, KeyParts, ResponseCache};

/// The header that says whether the cache answered.
pub(super) const CACHE_HEADER: &str = "x-ft-cache";

/// A request the cache may answer: its key, and the adapter version the key was made with.
pub(super) struct Lookup {
    cache: Arc<ResponseCache>,
    key: Key,
    adapter: Option<(String, [u8; 32])>,
    state: Arc<AppState>,
}

/// Whether `sampling` fixes the answer: greedy (temperature 0), beam search, or a seed the
/// request gives.
fn deterministic(sampling: &Sampling) -> bool {
    sampling.temperature == Some(0.0) || sampling.seed.is_some() || sampling.use_beam_search
}

impl Lookup {
    /// The lookup for a request to `route` for `model`, or `None` when there is no cache, the
    /// answer is drawn at random, or the model is not known (the engine says so).
    pub(super) fn new(
        state: &Arc<AppState>,
        route: &str,
        model: &str,
        sampling: &Sampling,
        body: &[u8],
    ) -> Option<Self> {
        let cache = state.cache.clone()?;
        if !deterministic(sampling) {
            return None;
        }
        let adapter = if model == state.config.model_id {
            None
        } else {
            let print = *state.prints.lock().ok()?.get(model)?;
            Some((model.to_string(), print))
        };
        let body: Value = serde_json::from_slice(body).ok()?;
        let key = KeyParts {
            route,
            model: cache.model(),
            adapter: adapter.as_ref().map(|(_, p)| p),
            body: &body,
        }
        .key();
        Some(Self {
            cache,
            key,
            adapter,
            state: state.clone(),
        })
    }

    /// The stored answer, replayed, counting the hit's time in the metrics.
    pub(super) async fn hit(&self, arrival: Instant) -> Option<Response> {
        let cached = self.cache.get(&self.key).await?;
        if let Ok(mut m) = self.state.metrics.lock() {
            *m.requests.entry(200).or_default() += 1;
            m.cache_hit.observe(arrival.elapsed().as_secs_f64());
        }
        Some(replay(&cached))
    }

    /// Stores `answer` unless the adapter the key names was replaced meanwhile (the answer
    /// may then be the new version's). Awaited before the answer's last bytes go out, so that
    /// a client that repeats the request at once finds it.
    pub(super) async fn store(self, answer: Cached) {
        if let Some((name, print)) = &self.adapter {
            let same = self
                .state
                .prints
                .lock()
                .is_ok_and(|p| p.get(name) == Some(print));
            if !same {
                return;
            }
        }
        self.cache.put(&self.key, answer).await;
    }
}

/// A cached answer as a response: the same body, or the same events.
fn replay(cached: &Cached) -> Response {
    let mut response = match cached {
        Cached::Whole(body) => {
            ([(header::CONTENT_TYPE, "application/json")], body.clone()).into_response()
        }
        Cached::Events(events) => {
            let events = events
                .clone()
                .into_iter()
                .map(|data| Ok::<_, Infallible>(SseEvent::default().data(data)));
            Sse::new(futures_util::stream::iter(events))
                .keep_alive(KeepAlive::default())
                .into_response()
        }
    };
    mark(&mut response, "hit");
    response
}

/// Sets the cache header to `value`.
pub(super) fn mark(response: &mut Response, value: &'static str) {
    response
        .headers_mut()
        .insert(CACHE_HEADER, HeaderValue::from_static(value));
}
