//! A batch file run against an OpenAI-compatible server without the Batch API (vLLM's
//! `run-batch`): every line's request sent as it is, several at once, and the output written
//! in input order once all are answered. Each answer is first appended to a journal beside
//! the output (`OUT.partial`, headed by the input's sha256, flushed to disk per line), so a
//! run stopped part way and started again asks only what is not yet answered; the journal goes
//! once the output is written.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::output::{answered, succeeded, unanswered};
use super::{BatchError, Line};

/// Where requests go, and how many at once.
#[derive(Debug, Clone)]
pub struct Server {
    /// `http://host:port`.
    pub url: String,
    /// Its `Authorization: Bearer` key, if it wants one.
    pub api_key: Option<String>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// How long one request may take.
    pub timeout: Duration,
}

/// What a run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Requests in the file.
    pub total: usize,
    /// Answers found in the journal of an earlier run, not asked again.
    pub resumed: usize,
    /// Requests answered with a 2xx status.
    pub succeeded: usize,
    /// The others.
    pub failed: usize,
}

/// The journal of the run writing `output`.
pub fn journal_path(output: &Path) -> PathBuf {
    let mut name = output.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    output.with_file_name(name)
}

/// Runs `lines` (the requests of the input file `bytes`) against `server` and writes their
/// answers to `output` in input order; `progress` sees the answers so far and the total.
pub fn run(
    bytes: &[u8],
    lines: &[Line],
    output: &Path,
    server: &Server,
    mut progress: impl FnMut(usize, usize),
) -> Result<Summary, BatchError> {
    let sha = hex(&Sha256::digest(bytes));
    let mut journal = Journal::open(&journal_path(output), &sha)?;
    let mut results: Vec<Option<Value>> = lines
        .iter()
        .map(|l| journal.done.remove(&l.custom_id))
        .collect();
    let resumed = results.iter().filter(|r| r.is_some()).count();
    let todo: Vec<usize> = (0..lines.len()).filter(|&i| results[i].is_none()).collect();
    progress(resumed, lines.len());

    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<(usize, Value)>();
    let mut failure = None;
    std::thread::scope(|scope| {
        for _ in 0..server.concurrency.clamp(1, todo.len().max(1)) {
            let tx = tx.clone();
            let (next, stop, todo, sha) = (&next, &stop, &todo, &sha);
            scope.spawn(move || {
                let agent = ureq::AgentBuilder::new().timeout(server.timeout).build();
                while !stop.load(Ordering::Relaxed) {
                    let Some(&i) = todo.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        break;
                    };
                    let request_id = format!("{}-{}", &sha[..16], lines[i].line);
                    let line = ask(&agent, server, &lines[i], &request_id);
                    if tx.send((i, line)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut done = resumed;
        for (i, line) in rx {
            // A request that got no answer is not journaled: a resumed run asks it again.
            let kept = match line["response"].is_null() {
                true => Ok(()),
                false => journal.append(&line),
            };
            if let Err(e) = kept {
                stop.store(true, Ordering::Relaxed);
                failure.get_or_insert(e);
                continue;
            }
            results[i] = Some(line);
            done += 1;
            progress(done, lines.len());
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    let results: Vec<Value> = results.into_iter().flatten().collect();
    let mut text = String::new();
    for r in &results {
        text.push_str(&r.to_string());
        text.push('\n');
    }
    ft_adapters::atomic::write_atomic(output, text.as_bytes())
        .map_err(|e| BatchError::io(output, e))?;
    journal.remove()?;
    let succeeded = results.iter().filter(|r| succeeded(r)).count();
    Ok(Summary {
        total: lines.len(),
        resumed,
        succeeded,
        failed: results.len() - succeeded,
    })
}

/// The output line of `line`'s request to `server`.
fn ask(agent: &ureq::Agent, server: &Server, line: &Line, request_id: &str) -> Value {
    let mut body = line.body.clone();
    // A batch answers each request whole.
    body.insert("stream".into(), false.into());
    body.remove("stream_options");
    let mut request = agent.post(&format!("{}{}", server.url.trim_end_matches('/'), line.url));
    if let Some(key) = &server.api_key {
        request = request.set("Authorization", &format!("Bearer {key}"));
    }
    let body = Value::Object(body);
    let mut wait = Duration::from_millis(100);
    let response = loop {
        match request.clone().send_json(body.clone()) {
            // A full queue or too many connections: asked again, up to a minute apart.
            Err(ureq::Error::Status(429 | 503, _)) => {
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(60));
            }
            Ok(r) | Err(ureq::Error::Status(_, r)) => break r,
            Err(e) => {
                return unanswered(&line.custom_id, request_id, "server_error", &e.to_string())
            }
        }
    };
    let status = response.status();
    match response.into_string() {
        Ok(text) => {
            let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
            answered(&line.custom_id, request_id, status, body)
        }
        Err(e) => unanswered(&line.custom_id, request_id, "server_error", &e.to_string()),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The answers of a run so far, on disk.
struct Journal {
    path: PathBuf,
    file: File,
    /// Answers from an earlier run, by custom_id.
    done: HashMap<String, Value>,
}

impl Journal {
    /// Opens the journal at `path` for the input whose sha256 is `sha`: an earlier run's
    /// answers when it was of the same input (a last line cut short by a crash is dropped),
    /// else a new journal. One of another input is an error: its answers are not ours to drop.
    fn open(path: &Path, sha: &str) -> Result<Self, BatchError> {
        let header = json!({"input_sha256": sha});
        let mut done = HashMap::new();
        let mut kept = 0u64;
        if let Ok(f) = File::open(path) {
            // Whole lines only: a line without its newline was cut short by a crash.
            let mut reader = BufReader::new(f);
            let mut lines = std::iter::from_fn(move || {
                let mut line = Vec::new();
                match reader.read_until(b'\n', &mut line) {
                    Ok(_) if line.ends_with(b"\n") => {
                        line.pop();
                        Some(String::from_utf8(line).unwrap_or_default())
                    }
                    _ => None,
                }
            });
            let first = lines.next();
            let first: Option<Value> =
                first.map(|l| serde_json::from_str(&l).unwrap_or(Value::Null));
            // An empty journal (a crash before its header) is a new one.
            if first.as_ref().is_some_and(|f| f != &header) {
                return Err(BatchError::Journal {
                    path: path.to_path_buf(),
                    message: "the journal of a run of another input file: remove it to start \
                              over, or run that input again to finish it"
                        .into(),
                });
            }
            kept = if first.is_some() {
                header.to_string().len() as u64 + 1
            } else {
                0
            };
            for l in lines {
                let Ok(v) = serde_json::from_str::<Value>(&l) else {
                    break;
                };
                let Some(id) = v["custom_id"].as_str() else {
                    break;
                };
                kept += l.len() as u64 + 1;
                done.insert(id.to_string(), v);
            }
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| BatchError::io(path, e))?;
        if kept == 0 {
            file.set_len(0).map_err(|e| BatchError::io(path, e))?;
            writeln!(file, "{header}").map_err(|e| BatchError::io(path, e))?;
        } else {
            // Drop a torn last line, so appends start on a line of their own.
            file.set_len(kept).map_err(|e| BatchError::io(path, e))?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            done,
        })
    }

    /// Appends `line` in one write, on disk before it returns.
    fn append(&mut self, line: &Value) -> Result<(), BatchError> {
        let text = format!("{line}\n");
        self.file
            .write_all(text.as_bytes())
            .and_then(|()| self.file.sync_data())
            .map_err(|e| BatchError::io(&self.path, e))
    }

    fn remove(self) -> Result<(), BatchError> {
        std::fs::remove_file(&self.path).map_err(|e| BatchError::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batches::input::parse;

    #[test]
    fn a_journal_keeps_whole_answers_of_its_input_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl.partial");
        let mut j = Journal::open(&path, "abc").unwrap();
        j.append(&json!({"custom_id": "a", "response": null}))
            .unwrap();
        j.append(&json!({"custom_id": "b", "response": null}))
            .unwrap();
        drop(j);
        // A crash mid-line: the torn line is dropped and overwritten.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        write!(f, "{{\"custom_id\": \"c\", \"resp").unwrap();
        drop(f);
        let mut j = Journal::open(&path, "abc").unwrap();
        assert_eq!(j.done.len(), 2);
        j.append(&json!({"custom_id": "c"})).unwrap();
        drop(j);
        let j = Journal::open(&path, "abc").unwrap();
        assert_eq!(j.done.len(), 3);
        drop(j);
        let err = Journal::open(&path, "other").err().unwrap().to_string();
        assert!(
            err.contains("out.jsonl.partial") && err.contains("another input"),
            "{err}"
        );
    }

    #[test]
    fn an_unreachable_server_gives_every_line_its_error_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let text = (0..5)
            .map(|i| format!("{{\"custom_id\": \"r{i}\", \"method\": \"POST\", \"url\": \"/v1/completions\", \"body\": {{}}}}\n"))
            .collect::<String>();
        let lines = parse(text.as_bytes(), None).unwrap();
        let out = dir.path().join("out.jsonl");
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = Server {
            url: format!("http://127.0.0.1:{port}"),
            api_key: None,
            concurrency: 3,
            timeout: Duration::from_secs(5),
        };
        let summary = run(text.as_bytes(), &lines, &out, &server, |_, _| {}).unwrap();
        assert_eq!((summary.total, summary.failed), (5, 5));
        let written = std::fs::read_to_string(&out).unwrap();
        let ids: Vec<String> = written
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["custom_id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(ids, ["r0", "r1", "r2", "r3", "r4"]);
        assert!(
            !journal_path(&out).exists(),
            "the journal goes with the output written"
        );
    }
}
