//! The OpenAI-compatible HTTP server (as vLLM and LoRAX serve): `/v1/completions` (with the
//! legacy `echo` that scores a prompt) and `/v1/chat/completions` (streamed by server-sent
//! events on request), `/v1/models`, adapter load and unload (vLLM's `/v1/load_lora_adapter`,
//! `/v1/unload_lora_adapter`), vLLM's `/tokenize`, `/detokenize` and `/tokenizer_info`,
//! `/health` and `/metrics`; OpenAI's Files and Batch API (`/v1/files`, `/v1/batches`:
//! [`batch_api`]) when the server keeps a state folder. A request's `model` names the base or an adapter. A repeated
//! request whose answer its inputs fix is answered from the response cache when one is
//! configured ([`crate::response_cache`]; header `x-ft-cache`: `hit`, `miss`, or
//! `coalesced` when it waited for the same request in flight). A request to a served
//! cascade's name is answered by its stages in turn ([`cascade`]; header `x-ft-stage`). Errors are OpenAI error
//! objects: 400 for a malformed or out-of-range request, 401 without the API key, 404 for an
//! unknown model, 408 for a body that does not arrive in time, 413 for one too large, 429 when
//! the queue is full, 502 when a cascade's stage on another server fails, 503 past the
//! connection limit ([`connections`]).

mod admin;
mod batch_api;
mod batch_runner;
mod cached;
mod cascade;
mod completions;
mod connections;
pub mod metrics;
pub mod openai;
mod tokenize;
pub mod worker;

pub use admin::registry_adapter;
pub use connections::Limits;

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{mpsc, Arc, Mutex};

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ft_model::chat::ChatTemplate;
use ft_model::{QuantBackend, TextTokenizer};

use crate::engine::Engine;
use crate::error::EngineError;
use crate::response_cache::{CacheConfig, ResponseCache};
use metrics::Metrics;
use worker::{AdapterPrints, Command, Live};

/// How the server is reached and what it may load.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    /// The id of the base model in `/v1/models` and in requests.
    pub model_id: String,
    /// Requests to `/v1/...` must carry `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Folders that `/v1/load_lora_adapter` may load from.
    pub allowed_adapter_dirs: Vec<PathBuf>,
    /// The adapter registry: `registry:NAME[:VERSION]` paths load from it.
    pub registry: Option<PathBuf>,
    /// Connections at once, and the deadlines of a request's headers and body.
    pub limits: Limits,
    /// The response cache, if any.
    pub cache: Option<CacheConfig>,
    /// Cascades served as models, by their names ([`crate::cascade`]).
    pub cascades: Vec<crate::cascade::Cascade>,
    /// The Files and Batch API's state, if the server keeps one.
    pub batches: Option<BatchConfig>,
}

/// Where the Batch API keeps its files and batches, and how much of the engine a batch uses.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// The state folder (SQLite and file contents).
    pub state_dir: PathBuf,
    /// Requests of one batch in the engine at once.
    pub max_rows: usize,
    /// Whether a folder that cannot be opened (another server holds it) stops the server;
    /// otherwise the server runs without the Batch API, with a warning.
    pub required: bool,
}

/// What every handler shares.
pub(crate) struct AppState {
    commands: Mutex<mpsc::Sender<Command>>,
    tokenizer: TextTokenizer,
    chat: Option<ChatTemplate>,
    config: ServerConfig,
    /// Tokens one request can hold (prompt and output).
    context: usize,
    live: Arc<Mutex<Live>>,
    metrics: Mutex<Metrics>,
    seeds: AtomicU64,
    cache: Option<Arc<ResponseCache>>,
    /// The adapters' fingerprints, for cache keys.
    prints: AdapterPrints,
    /// The Batch API's state.
    batches: Option<Arc<batch_api::Batches>>,
}

impl AppState {
    /// Sends `command` to the engine thread.
    fn send(&self, command: Command) -> Result<(), ApiError> {
        self.commands
            .lock()
            .map_err(|_| ApiError::internal("the engine lock is poisoned"))?
            .send(command)
            .map_err(|_| ApiError::internal("the engine has stopped"))
    }
}

/// Serves `engine` on `listener` until the process is interrupted (Ctrl-C).
pub fn serve<B: QuantBackend>(
    engine: Engine<B>,
    tokenizer: TextTokenizer,
    chat: Option<ChatTemplate>,
    config: ServerConfig,
    listener: TcpListener,
) -> std::io::Result<()> {
    serve_until(engine, tokenizer, chat, config, listener, async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

/// A server on a thread of its own, for a client in the same process (`ft eval`); it stops
/// when dropped.
pub struct Background {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Background {
    /// Starts serving `engine` on `listener`.
    pub fn start<B: QuantBackend>(
        engine: Engine<B>,
        tokenizer: TextTokenizer,
        chat: Option<ChatTemplate>,
        config: ServerConfig,
        listener: TcpListener,
    ) -> std::io::Result<Self> {
        let url = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("ft-server".into())
            .spawn(move || {
                serve_until(engine, tokenizer, chat, config, listener, async {
                    let _ = stopped.await;
                })
            })?;
        Ok(Self {
            url,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// `http://host:port`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stops the server and waits for it.
    pub fn stop(mut self) -> std::io::Result<()> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> std::io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(std::io::Error::other("the server thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.shut_down();
    }
}

/// Serves `engine` on `listener` until `shutdown` completes.
fn serve_until<B: QuantBackend>(
    engine: Engine<B>,
    tokenizer: TextTokenizer,
    chat: Option<ChatTemplate>,
    config: ServerConfig,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // What one request can hold: the model's context, or the KV cache if smaller.
    let context = engine
        .model()
        .max_position_embeddings
        .min(engine.capacity_tokens());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let cache = match &config.cache {
        Some(c) => Some(
            runtime
                .block_on(ResponseCache::open(c))
                .map_err(std::io::Error::other)?,
        ),
        None => None,
    };
    let batches = match &config.batches {
        Some(c) => match batch_api::Batches::open(&c.state_dir, c.max_rows) {
            Ok(b) => Some(Arc::new(b)),
            Err(e) if !c.required => {
                tracing::warn!(error = %e, "no Batch API on this server");
                None
            }
            Err(e) => return Err(std::io::Error::other(e)),
        },
        None => None,
    };
    let (tx, rx) = mpsc::channel();
    let live = Arc::new(Mutex::new(Live::default()));
    let prints: AdapterPrints = Arc::new(Mutex::new(engine.adapters().fingerprints()));
    let worker_live = live.clone();
    let worker_prints = prints.clone();
    let worker = std::thread::Builder::new()
        .name("ft-engine".into())
        .spawn(move || {
            ft_model::kernels::on_kernel_thread(move || {
                worker::run(engine, rx, worker_live, worker_prints)
            })
        })?;
    // Every cascade's stages are counted from 0, asked or not.
    let mut counted = Metrics::default();
    for c in &config.cascades {
        for s in &c.stages {
            counted
                .cascades
                .insert((c.name.clone(), s.name.clone()), Default::default());
        }
    }
    let state = Arc::new(AppState {
        commands: Mutex::new(tx),
        tokenizer,
        chat,
        config,
        context,
        live,
        metrics: Mutex::new(counted),
        seeds: AtomicU64::new(0x5eed),
        cache,
        prints,
        batches,
    });
    runtime.block_on(async move {
        // Batches a stop left unfinished go on where they were.
        if let Some(b) = &state.batches {
            let unfinished = b.store.batches().map_err(std::io::Error::other)?;
            for o in unfinished {
                if !batch_api::FINAL.contains(&o["status"].as_str().unwrap_or_default()) {
                    batch_runner::spawn(&state, o["id"].as_str().unwrap_or_default());
                }
            }
        }
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let limits = state.config.limits;
        connections::accept(listener, router(state), limits, shutdown).await;
        Ok::<_, std::io::Error>(())
    })?;
    // Every connection's task goes with the runtime, and with them the last command sender:
    // the engine thread then ends, and its weights and KV cache are freed before returning.
    drop(runtime);
    let _ = worker.join();
    Ok(())
}

/// The routes; `/v1/...` behind the API key when one is set.
fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(completions::chat))
        .route("/v1/models", get(admin::models))
        .route("/v1/load_lora_adapter", post(admin::load_adapter))
        .route("/v1/unload_lora_adapter", post(admin::unload_adapter))
        .route(
            "/v1/files",
            post(batch_api::upload)
                .get(batch_api::files)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route(
            "/v1/files/{id}",
            get(batch_api::file).delete(batch_api::delete),
        )
        .route("/v1/files/{id}/content", get(batch_api::content))
        .route("/v1/batches", post(batch_api::create).get(batch_api::list))
        .route("/v1/batches/{id}", get(batch_api::batch))
        .route("/v1/batches/{id}/cancel", post(batch_api::cancel))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/tokenizer_info", get(tokenize::info))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .merge(v1)
        .route("/health", get(admin::health))
        .route("/metrics", get(admin::metrics))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "no such route", "not_found_error")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "this route does not take that method",
                "invalid_request_error",
            )
        })
        .layer(middleware::from_fn_with_state(
            state.config.limits,
            connections::read_body,
        ))
        .with_state(state)
}

/// Refuses `/v1` requests without `Authorization: Bearer <api key>` when a key is set.
async fn require_key(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key (Authorization: Bearer ...)",
                "authentication_error",
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// An error answered as an OpenAI error object.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>, kind: &'static str) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
        }
    }

    /// 400: the request is at fault.
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message, "invalid_request_error")
    }

    /// 500: the server is.
    fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message, "server_error")
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let message = e.to_string();
        match e {
            EngineError::BadRequest(_) | EngineError::Adapter(_) => Self::bad_request(message),
            EngineError::UnknownModel(_) => {
                Self::new(StatusCode::NOT_FOUND, message, "not_found_error")
            }
            EngineError::QueueFull(_) => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, message, "rate_limit_error")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = openai::error_json(&self.message, self.kind, None);
        (self.status, Json(body)).into_response()
    }
}
