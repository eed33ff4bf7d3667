//! A client of any OpenAI-compatible server (ours, llama.cpp's, vLLM): streamed completions
//! with the arrival time of every token, for the load generator and for evaluations. A server
//! that times out, answers an HTTP error or breaks its stream is told apart from an answer.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use ft_serve::cascade::features::{parse_logprobs, TokenScore};
use serde_json::Value;

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientError {
    /// No complete answer within the timeout.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The server answered with an error status.
    #[error("HTTP {status}: {message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The body the server sent.
        message: String,
    },
    /// The connection failed, or the stream was malformed or carried an error event.
    #[error("{0}")]
    Failed(String),
}

/// One streamed completion and its timings.
#[derive(Debug, Clone, PartialEq)]
pub struct Streamed {
    /// The whole text.
    pub text: String,
    /// Why generation stopped (`stop`, `length`), as the server said.
    pub finish_reason: Option<String>,
    /// Output tokens: the usage the server reported, else the chunks that carried text.
    pub tokens: usize,
    /// Seconds from sending to the first chunk.
    pub ttft: f64,
    /// Seconds per output token after the first, when tokens came in two or more chunks.
    pub tpot: Option<f64>,
    /// Seconds from sending to the end of the stream.
    pub latency: f64,
    /// What the server's response cache said (its `x-ft-cache` header: `hit`, `miss`,
    /// `coalesced`), if it has one.
    pub cache: Option<String>,
    /// Prompt tokens, as the server's usage counted them.
    pub prompt_tokens: Option<usize>,
    /// Each generated token's log-probabilities, when the request asked for `logprobs`.
    pub logprobs: Vec<TokenScore>,
}

/// How a client reads a stream: at full speed, slowly, or hanging up part way.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pace {
    /// Waits this long after each event before reading the next (a slow client).
    pub delay: Duration,
    /// Hangs up after this many events (a request its client cancels).
    pub hang_up_after: Option<usize>,
}

/// A server's base URL, its key and the time allowed per request.
#[derive(Debug, Clone)]
pub struct Client {
    agent: ureq::Agent,
    url: String,
    api_key: Option<String>,
    timeout: Duration,
}

impl Client {
    /// A client of the server at `url` (`http://host:port`; a trailing `/v1` is dropped).
    pub fn new(url: &str, api_key: Option<String>, timeout: Duration) -> Self {
        let url = url.trim_end_matches('/');
        Self {
            agent: ureq::AgentBuilder::new().timeout(timeout).build(),
            url: url.strip_suffix("/v1").unwrap_or(url).to_string(),
            api_key,
            timeout,
        }
    }

    /// The server's base URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn with_key(&self, req: ureq::Request) -> ureq::Request {
        match &self.api_key {
            Some(k) => req.set("Authorization", &format!("Bearer {k}")),
            None => req,
        }
    }

    /// The model ids the server lists, the base first on ours.
    pub fn models(&self) -> Result<Vec<String>, ClientError> {
        let path = format!("{}/v1/models", self.url);
        let resp = self
            .with_key(self.agent.get(&path))
            .call()
            .map_err(|e| self.error(e))?;
        let body: Value = resp
            .into_string()
            .map_err(|e| self.io_error(e))
            .and_then(|s| {
                serde_json::from_str(&s).map_err(|e| ClientError::Failed(e.to_string()))
            })?;
        let ids: Vec<String> = body["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["id"].as_str().map(String::from))
            .collect();
        if ids.is_empty() {
            return Err(ClientError::Failed(format!("GET {path}: no model listed")));
        }
        Ok(ids)
    }

    /// Sends `body` to `/v1/completions` as a stream (usage included) and reads it to the end.
    pub fn stream_completion(&self, body: &Value) -> Result<Streamed, ClientError> {
        self.stream_completion_paced(body, Pace::default())?
            .ok_or_else(|| ClientError::Failed("the client hung up".into()))
    }

    /// [`Client::stream_completion`] read at `pace`: `None` when the client hung up part way
    /// as `pace` asked.
    pub fn stream_completion_paced(
        &self,
        body: &Value,
        pace: Pace,
    ) -> Result<Option<Streamed>, ClientError> {
        let mut body = body.clone();
        body["stream"] = Value::Bool(true);
        body["stream_options"] = serde_json::json!({"include_usage": true});
        let start = Instant::now();
        let resp = self
            .with_key(self.agent.post(&format!("{}/v1/completions", self.url)))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())
            .map_err(|e| self.error(e))?;
        let cache = resp.header("x-ft-cache").map(String::from);
        let mut text = String::new();
        let mut finish_reason = None;
        let mut first = None;
        let mut first_text = None;
        let mut last = start;
        let mut chunks = 0;
        let mut usage = None;
        let mut prompt_tokens = None;
        let mut logprobs = Vec::new();
        let mut done = false;
        let mut events = 0;
        for line in BufReader::new(resp.into_reader()).lines() {
            let line = line.map_err(|e| self.io_error(e))?;
            let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                continue;
            };
            if pace.hang_up_after == Some(events) {
                // Dropping the reader closes the connection mid-stream.
                return Ok(None);
            }
            events += 1;
            std::thread::sleep(pace.delay);
            if data == "[DONE]" {
                done = true;
                break;
            }
            let v: Value = serde_json::from_str(data)
                .map_err(|e| ClientError::Failed(format!("bad event {data:?}: {e}")))?;
            if let Some(err) = v.get("error") {
                return Err(ClientError::Failed(format!("error event: {err}")));
            }
            if let Some(u) = v["usage"]["completion_tokens"].as_u64() {
                usage = Some(u as usize);
            }
            if let Some(u) = v["usage"]["prompt_tokens"].as_u64() {
                prompt_tokens = Some(u as usize);
            }
            // The first choice only (index 0), as requests ask for one.
            let Some(choice) = v["choices"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["index"].as_u64().unwrap_or(0) == 0))
            else {
                continue;
            };
            let now = Instant::now();
            first.get_or_insert(now);
            if let Some(reason) = choice["finish_reason"].as_str() {
                finish_reason = Some(reason.to_string());
            }
            logprobs.extend(parse_logprobs(&choice["logprobs"]));
            let piece = choice["text"].as_str().unwrap_or("");
            if !piece.is_empty() {
                text.push_str(piece);
                first_text.get_or_insert(now);
                last = now;
                chunks += 1;
            }
        }
        if !done && finish_reason.is_none() {
            return Err(ClientError::Failed(
                "the stream ended before its finish reason or [DONE]".into(),
            ));
        }
        let first =
            first.ok_or_else(|| ClientError::Failed("the stream carried no choice".into()))?;
        let tokens = usage.unwrap_or(chunks);
        // Text that came in one piece (beam search) has no time per token to measure.
        let tpot = first_text
            .filter(|_| tokens > 1 && chunks > 1)
            .map(|f| (last - f).as_secs_f64() / (tokens - 1) as f64);
        Ok(Some(Streamed {
            text,
            finish_reason,
            tokens,
            ttft: (first_text.unwrap_or(first) - start).as_secs_f64(),
            tpot,
            latency: start.elapsed().as_secs_f64(),
            cache,
            prompt_tokens,
            logprobs,
        }))
    }

    /// The server's Prometheus metrics without labels (`name value` lines), by name.
    pub fn metrics(&self) -> Result<std::collections::BTreeMap<String, f64>, ClientError> {
        let text = self
            .with_key(self.agent.get(&format!("{}/metrics", self.url)))
            .call()
            .map_err(|e| self.error(e))?
            .into_string()
            .map_err(|e| self.io_error(e))?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (name, value) = l.split_once(' ')?;
                Some((name.to_string(), value.trim().parse().ok()?))
            })
            .collect())
    }

    fn error(&self, e: ureq::Error) -> ClientError {
        match e {
            ureq::Error::Status(status, r) => ClientError::Status {
                status,
                message: r.into_string().unwrap_or_default(),
            },
            ureq::Error::Transport(t) => {
                let timed_out = std::error::Error::source(&t)
                    .and_then(|s| s.downcast_ref::<std::io::Error>())
                    .is_some_and(is_timeout);
                if timed_out {
                    ClientError::Timeout(self.timeout)
                } else {
                    ClientError::Failed(t.to_string())
                }
            }
        }
    }

    fn io_error(&self, e: std::io::Error) -> ClientError {
        if is_timeout(&e) {
            ClientError::Timeout(self.timeout)
        } else {
            ClientError::Failed(format!("reading the response: {e}"))
        }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    )
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;

    use super::*;

    /// A server that answers each connection with `reply` after `delay`.
    fn server(reply: &'static str, delay: Duration) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                read_request(&mut s);
                std::thread::sleep(delay);
                let _ = s.write_all(reply.as_bytes());
            }
        });
        url
    }

    /// Reads a whole request (headers and a Content-Length body): closing a socket with
    /// unread bytes resets the connection, and the client would see that, not the reply.
    fn read_request(s: &mut std::net::TcpStream) {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                let body = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if got.len() >= end + 4 + body {
                    return;
                }
            }
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    }

    #[test]
    fn a_stream_gives_its_text_tokens_and_finish_reason() {
        let url = server(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n\
             data: {\"choices\":[{\"text\":\" 19\",\"finish_reason\":null}]}\n\n\
             data: {\"choices\":[{\"text\":\"76\",\"finish_reason\":null}]}\n\n\
             data: {\"choices\":[{\"text\":\"\",\"finish_reason\":\"stop\"}]}\n\n\
             data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":3}}\n\n\
             data: [DONE]\n\n",
            Duration::ZERO,
        );
        let c = Client::new(&url, None, Duration::from_secs(5));
        let s = c.stream_completion(&serde_json::json!({})).unwrap();
        assert_eq!(s.text, " 1976");
        assert_eq!(s.finish_reason.as_deref(), Some("stop"));
        assert_eq!((s.tokens, s.prompt_tokens), (3, Some(9)));
        assert!(s.tpot.is_some() && s.ttft <= s.latency);
    }

    #[test]
    fn a_stream_cut_short_is_not_an_answer() {
        let url = server(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n\
             data: {\"choices\":[{\"text\":\" 19\",\"finish_reason\":null}]}\n\n",
            Duration::ZERO,
        );
        let c = Client::new(&format!("{url}/v1"), None, Duration::from_secs(5));
        let err = c.stream_completion(&serde_json::json!({})).unwrap_err();
        assert!(err.to_string().contains("ended before"), "{err}");
    }

    #[test]
    fn errors_and_timeouts_are_not_answers() {
        let url = server(
            "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\nConnection: close\r\n\r\noops",
            Duration::ZERO,
        );
        let c = Client::new(&url, None, Duration::from_secs(5));
        assert_eq!(
            c.stream_completion(&serde_json::json!({})),
            Err(ClientError::Status {
                status: 500,
                message: "oops".into()
            })
        );
        let slow = server("HTTP/1.1 200 OK\r\n\r\n", Duration::from_secs(3));
        let c = Client::new(&slow, None, Duration::from_millis(300));
        assert_eq!(
            c.stream_completion(&serde_json::json!({})),
            Err(ClientError::Timeout(Duration::from_millis(300)))
        );
    }
}
