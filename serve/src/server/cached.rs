//! The response cache on the generation routes: which requests it may answer, the answer
//! replayed byte for byte (a stream as the same events), and a fresh answer stored once it
//! is whole.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderValue};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::openai::Sampling;
use super::AppState;
use crate::response_cache::{Cached, Claim, Flight, Key, KeyParts, ResponseCache};

/// The longest a request waits for the same request in flight before answering it itself.
const WAIT_FOR_FLIGHT: Duration = Duration::from_secs(60);

/// The header that says whether the cache answered.
pub(super) const CACHE_HEADER: &str = "x-ft-cache";

/// A request the cache may answer: its key, the adapter version the key was made with, and,
/// once it missed, its claim on the key while it is answered.
pub(super) struct Lookup {
    cache: Arc<ResponseCache>,
    key: Key,
    /// The adapter's name, and its files' sha256 and registration number.
    adapter: Option<(String, ([u8; 32], u64))>,
    state: Arc<AppState>,
    flight: Option<Flight>,
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
            adapter: adapter.as_ref().map(|(_, (sha, _))| sha),
            context: state.context,
            body: &body,
        }
        .key();
        Some(Self {
            cache,
            key,
            adapter,
            state: state.clone(),
            flight: None,
        })
    }

    /// The stored answer, replayed, counting the hit's time in the metrics. A miss while the
    /// same request is in flight waits for its answer; a miss with none in flight claims the
    /// key, so that the same requests arriving meanwhile wait for this one.
    pub(super) async fn hit(&mut self, arrival: Instant) -> Option<Response> {
        if let Some(found) = self.cache.get(&self.key).await {
            return Some(self.replay(&found, arrival, false));
        }
        match self.cache.claim(&self.key) {
            Claim::Answer(flight) => {
                // The first answer may have been stored between the read and the claim.
                if let Some(found) = self.cache.get(&self.key).await {
                    return Some(self.replay(&found, arrival, false));
                }
                self.flight = Some(flight);
            }
            Claim::Wait(mut done) => {
                // Closed when the answer is stored or its request gave up.
                let _ = tokio::time::timeout(WAIT_FOR_FLIGHT, done.changed()).await;
                if let Some(found) = self.cache.get(&self.key).await {
                    return Some(self.replay(&found, arrival, true));
                }
                if let Claim::Answer(flight) = self.cache.claim(&self.key) {
                    self.flight = Some(flight);
                }
            }
        }
        self.cache.count(false, false);
        None
    }

    /// `found` as the response, marked `hit`, or `coalesced` when it `waited` for the same
    /// request in flight (whose wait is not a hit's latency).
    fn replay(&self, found: &Cached, arrival: Instant, waited: bool) -> Response {
        self.cache.count(true, waited);
        if let Ok(mut m) = self.state.metrics.lock() {
            *m.requests.entry(200).or_default() += 1;
            if !waited {
                m.cache_hit.observe(arrival.elapsed().as_secs_f64());
            }
        }
        let mut response = replay(found);
        mark(&mut response, if waited { "coalesced" } else { "hit" });
        response
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
    match cached {
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
    }
}

/// Sets the cache header to `value`.
pub(super) fn mark(response: &mut Response, value: &'static str) {
    response
        .headers_mut()
        .insert(CACHE_HEADER, HeaderValue::from_static(value));
}
