//! Accepting connections with bounds, so that no client can hold the server: at most
//! `max_connections` at once (one more is answered 503 and closed), a deadline for each
//! request's headers (a client that sends partial headers, or nothing, or stays idle between
//! requests, is dropped when it passes) and one for its body (a declared body that does not
//! arrive gets 408). Each connection is served by hyper's HTTP/1 with the router, and watched,
//! so shutdown lets requests in flight finish (for a bounded time).

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

use super::ApiError;
use crate::batches::input::MAX_BYTES;

/// The bounds of the server's connections.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// From a connection's first byte of a request (or from when it opened, or its last
    /// response) to the end of the request's headers.
    pub header_timeout: Duration,
    /// From the headers to the end of the body.
    pub body_timeout: Duration,
    /// The largest request body.
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 512,
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(60),
            max_body_bytes: 2 << 20,
        }
    }
}

/// How long shutdown waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` within `limits` until `shutdown` completes.
pub(crate) async fn accept(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut shutdown = pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors, or a connection reset before it was accepted:
                // the listener stays; try again shortly.
                Err(e) => {
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream, limits.max_connections));
            continue;
        };
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout);
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(DRAIN) => {}
    }
}

/// Answers a connection over the limit with 503 and closes it.
async fn refuse(mut stream: tokio::net::TcpStream, limit: usize) {
    let body = serde_json::json!({"error": {
        "message": format!("the server has {limit} connections open, its limit (--max-connections); try again"),
        "type": "server_error", "param": null, "code": null,
    }})
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\nretry-after: 1\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        stream.write_all(response.as_bytes()),
    )
    .await;
}

/// Reads each request's body within the body deadline and size limit before any handler
/// sees it: 408 when it does not arrive in time, 413 when it is too large.
pub(crate) async fn read_body(
    State(limits): State<Limits>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    // A batch file may be larger than any request (with its multipart framing).
    let limit = if parts.uri.path() == "/v1/files" {
        limits.max_body_bytes.max(MAX_BYTES + (1 << 20))
    } else {
        limits.max_body_bytes
    };
    let read = axum::body::to_bytes(body, limit);
    match tokio::time::timeout(limits.body_timeout, read).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(_)) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {limit} bytes, or was cut off"),
            "invalid_request_error",
        )
        .into_response(),
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} s",
                limits.body_timeout.as_secs()
            ),
            "invalid_request_error",
        )
        .into_response(),
    }
}
