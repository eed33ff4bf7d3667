//! `ft publish` and `ft pull` against a local server that implements the subset of the
//! Hugging Face Hub API they use, recording every request.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use base64::Engine;
use ft_adapters::peft::{LoraWeights, Matrix, PeftConfig};
use ft_adapters::PeftAdapter;
use ft_tests::{ft, ft_bin, Run};
use sha2::{Digest, Sha256};

const TOKEN: &str = "hf_secret_test_token";

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    auth: Option<String>,
    body: Vec<u8>,
}

#[derive(Default)]
struct State {
    seen: Vec<Seen>,
    /// Committed files of the repository.
    files: BTreeMap<String, Vec<u8>>,
    /// Uploaded LFS objects by oid.
    lfs: HashMap<String, Vec<u8>>,
    create_status: u16,
    cut_upload: bool,
}

/// A Hub on 127.0.0.1 serving one connection at a time on its own thread.
struct FakeHub {
    url: String,
    state: Arc<Mutex<State>>,
}

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl FakeHub {
    fn start(create_status: u16, cut_upload: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            create_status,
            cut_upload,
            ..Default::default()
        }));
        let (s, u) = (state.clone(), url.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                serve(stream, &s, &u);
            }
        });
        Self { url, state }
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }
}

fn serve(mut stream: TcpStream, state: &Mutex<State>, url: &str) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let (mut len, mut auth) = (0usize, None);
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap();
        match k.to_ascii_lowercase().as_str() {
            "content-length" => len = v.trim().parse().unwrap(),
            "authorization" => auth = Some(v.trim().to_string()),
            _ => {}
        }
    }
    let mut st = state.lock().unwrap();
    if method == "PUT" && st.cut_upload {
        // Read part of the upload, then drop the connection without an answer.
        let mut half = vec![0u8; len / 2];
        let _ = reader.read_exact(&mut half);
        st.seen.push(Seen {
            method,
            path,
            auth,
            body: half,
        });
        let _ = stream.shutdown(std::net::Shutdown::Both);
        return;
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).unwrap();
    st.seen.push(Seen {
        method: method.clone(),
        path: path.clone(),
        auth: auth.clone(),
        body: body.clone(),
    });
    let authorized = auth.as_deref() == Some(&format!("Bearer {TOKEN}"));
    let (status, answer): (u16, Vec<u8>) = match (method.as_str(), path.as_str()) {
        ("POST", "/api/repos/create") if !authorized => {
            (401, b"{\"error\": \"Invalid credentials\"}".to_vec())
        }
        ("POST", "/api/repos/create") => (st.create_status, b"{\"url\": \"x\"}".to_vec()),
        ("POST", p) if p.ends_with("/preupload/main") => {
            let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let files: Vec<serde_json::Value> = req["files"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| {
                    let path = f["path"].as_str().unwrap();
                    let mode = if path.ends_with(".safetensors") {
                        "lfs"
                    } else {
                        "regular"
                    };
                    serde_json::json!({"path": path, "uploadMode": mode, "shouldIgnore": false})
                })
                .collect();
            (
                200,
                serde_json::json!({ "files": files })
                    .to_string()
                    .into_bytes(),
            )
        }
        ("POST", p) if p.ends_with(".git/info/lfs/objects/batch") => {
            let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let objects: Vec<serde_json::Value> = req["objects"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| {
                    let oid = o["oid"].as_str().unwrap();
                    serde_json::json!({"oid": oid, "size": o["size"], "actions": {
                        "upload": {"href": format!("{url}/lfs-upload/{oid}"), "header": {"X-Upload": "1"}},
                        "verify": {"href": format!("{url}/lfs-verify/{oid}")}}})
                })
                .collect();
            (
                200,
                serde_json::json!({ "objects": objects })
                    .to_string()
                    .into_bytes(),
            )
        }
        ("PUT", p) if p.starts_with("/lfs-upload/") => {
            let oid = p.trim_start_matches("/lfs-upload/").to_string();
            if hex(&body) == oid {
                st.lfs.insert(oid, body);
                (200, Vec::new())
            } else {
                (400, b"hash mismatch".to_vec())
            }
        }
        ("POST", p) if p.starts_with("/lfs-verify/") => {
            let ok = st.lfs.contains_key(p.trim_start_matches("/lfs-verify/"));
            (if ok { 200 } else { 404 }, Vec::new())
        }
        ("POST", p) if p.ends_with("/commit/main") => {
            let mut pending = BTreeMap::new();
            let mut bad = false;
            for l in String::from_utf8(body).unwrap().lines() {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let f = &v["value"];
                match v["key"].as_str().unwrap() {
                    "file" => {
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(f["content"].as_str().unwrap())
                            .unwrap();
                        pending.insert(f["path"].as_str().unwrap().to_string(), bytes);
                    }
                    "lfsFile" => match st.lfs.get(f["oid"].as_str().unwrap()) {
                        Some(b) => {
                            pending.insert(f["path"].as_str().unwrap().to_string(), b.clone());
                        }
                        None => bad = true,
                    },
                    _ => {}
                }
            }
            if bad {
                (400, b"{\"error\": \"missing lfs object\"}".to_vec())
            } else {
                st.files.extend(pending);
                (
                    200,
                    b"{\"commitUrl\": \"https://hub/commit/abc\", \"commitOid\": \"abc\"}".to_vec(),
                )
            }
        }
        ("GET", p) if p.contains("/resolve/main/") => {
            let file = p.rsplit('/').next().unwrap();
            match st.files.get(file) {
                Some(b) => (200, b.clone()),
                None => (404, Vec::new()),
            }
        }
        _ => (404, Vec::new()),
    };
    drop(st);
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        answer.len()
    );
    let _ = stream.write_all(&answer);
}

/// A registry with one adapter `dates:1`.
fn registry(dir: &Path) -> std::path::PathBuf {
    let a = dir.join("a");
    let config: PeftConfig = serde_json::from_value(serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj"], "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"
    }))
    .unwrap();
    let m = |shape: [usize; 2]| Matrix {
        shape,
        data: (0..shape[0] * shape[1]).map(|i| i as f32 * 0.01).collect(),
    };
    let mut modules = BTreeMap::new();
    modules.insert(
        "model.layers.0.self_attn.q_proj".to_string(),
        LoraWeights {
            a: m([4, 32]),
            b: m([32, 4]),
        },
    );
    PeftAdapter { config, modules }.write(&a).unwrap();
    let reg = dir.join("reg");
    assert_eq!(
        ft(&[
            "adapters",
            "add",
            a.to_str().unwrap(),
            "--name",
            "dates",
            "--task",
            "dates",
            "--registry",
            reg.to_str().unwrap()
        ])
        .code,
        0
    );
    reg
}

/// Runs ft with `HF_TOKEN` set (and no token file).
fn ft_with_token(token: &str, args: &[&str]) -> Run {
    Command::new(ft_bin())
        .args(args)
        .env("HF_TOKEN", token)
        .env("HF_HOME", "/nonexistent")
        .output()
        .unwrap()
        .into()
}

/// `ft publish ADAPTER --repo REPO` against `hub` with `HF_TOKEN=token`.
fn publish(hub: &FakeHub, reg: &Path, token: &str, adapter: &str, repo: &str) -> Run {
    ft_with_token(
        token,
        &[
            "publish",
            adapter,
            "--repo",
            repo,
            "--endpoint",
            &hub.url,
            "--registry",
            reg.to_str().unwrap(),
        ],
    )
}

fn published(reg: &Path) -> serde_json::Value {
    ft(&[
        "adapters",
        "show",
        "dates:1",
        "--registry",
        reg.to_str().unwrap(),
    ])
    .json()["published"]
        .clone()
}

#[test]
fn publish_uploads_through_lfs_and_commits_then_pull_brings_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(dir.path());
    let hub = FakeHub::start(200, false);
    let run = publish(&hub, &reg, TOKEN, "dates:1", "me/dates-lora");
    assert_eq!(run.code, 0, "{}", run.stderr);
    let seen = hub.seen();
    let calls: Vec<(String, String)> = seen
        .iter()
        .map(|s| (s.method.clone(), s.path.clone()))
        .collect();
    let weights = std::fs::read(dir.path().join("a/adapter_model.safetensors")).unwrap();
    let oid = hex(&weights);
    assert_eq!(
        calls,
        vec![
            ("POST".into(), "/api/repos/create".into()),
            (
                "POST".into(),
                "/api/models/me/dates-lora/preupload/main".into()
            ),
            (
                "POST".into(),
                "/me/dates-lora.git/info/lfs/objects/batch".into()
            ),
            ("PUT".into(), format!("/lfs-upload/{oid}")),
            ("POST".into(), format!("/lfs-verify/{oid}")),
            (
                "POST".into(),
                "/api/models/me/dates-lora/commit/main".into()
            ),
        ]
    );
    let create: serde_json::Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(
        create,
        serde_json::json!({"type": "model", "name": "dates-lora", "organization": "me", "private": false})
    );
    for s in seen.iter().filter(|s| !s.path.starts_with("/lfs-upload/")) {
        assert_eq!(
            s.auth.as_deref(),
            Some(&*format!("Bearer {TOKEN}")),
            "{}",
            s.path
        );
    }
    assert_eq!(
        seen[3].body, weights,
        "the LFS upload carries the weights byte for byte"
    );
    let state = hub.state.lock().unwrap();
    assert_eq!(state.files["adapter_model.safetensors"], weights);
    assert_eq!(
        state.files["adapter_config.json"],
        std::fs::read(dir.path().join("a/adapter_config.json")).unwrap()
    );
    let card = String::from_utf8(state.files["README.md"].clone()).unwrap();
    for line in [
        "---",
        "base_model: HuggingFaceTB/SmolLM2-135M-Instruct",
        "library_name: peft",
        "license: apache-2.0",
        "- dates",
        "pipeline_tag: text-generation",
        "## Other servers",
        "- vllm: loads",
        "- lorax: loads",
        "- tgi: loads with LORA_ADAPTERS=NAME=DIR at launch",
    ] {
        assert!(
            card.lines().any(|l| l == line),
            "model card lacks {line:?}:\n{card}"
        );
    }
    drop(state);
    assert_eq!(published(&reg), serde_json::json!(["me/dates-lora"]));
    assert!(!run.stdout.contains(TOKEN) && !run.stderr.contains(TOKEN));

    let reg2 = dir.path().join("reg2");
    let pull = ft_with_token(
        TOKEN,
        &[
            "pull",
            "hf:me/dates-lora",
            "--endpoint",
            &hub.url,
            "--registry",
            reg2.to_str().unwrap(),
        ],
    );
    assert_eq!(
        pull.stdout.trim(),
        "pulled hf:me/dates-lora as dates-lora:1",
        "{}",
        pull.stderr
    );
    let out = dir.path().join("out");
    assert_eq!(
        ft(&[
            "adapters",
            "export",
            "dates-lora",
            out.to_str().unwrap(),
            "--registry",
            reg2.to_str().unwrap()
        ])
        .code,
        0
    );
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        weights
    );
}

#[test]
fn an_existing_repository_is_reused() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(dir.path());
    let hub = FakeHub::start(409, false);
    let run = publish(&hub, &reg, TOKEN, "dates", "me/dates-lora");
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        hub.seen().last().unwrap().path,
        "/api/models/me/dates-lora/commit/main"
    );
}

#[test]
fn a_refused_token_fails_without_showing_it_and_marks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(dir.path());
    let hub = FakeHub::start(200, false);
    let run = publish(&hub, &reg, "hf_wrong_token_value", "dates:1", "me/x");
    run.fails_with(
        1,
        &["create repository: the Hub refused the token (HTTP 401)"],
    );
    assert!(!run.stderr.contains("hf_wrong_token_value"));
    assert_eq!(hub.seen().len(), 1);
    assert_eq!(published(&reg), serde_json::json!([]));
    let none = Command::new(ft_bin())
        .args([
            "publish",
            "dates:1",
            "--repo",
            "me/x",
            "--endpoint",
            &hub.url,
            "--registry",
            reg.to_str().unwrap(),
        ])
        .env_remove("HF_TOKEN")
        .env("HF_HOME", "/nonexistent")
        .output()
        .unwrap();
    Run::from(none).fails_with(1, &["no Hugging Face token"]);
    ft(&[
        "publish",
        "dates:1",
        "--repo",
        "../x",
        "--registry",
        reg.to_str().unwrap(),
    ])
    .fails_with(2, &["--repo: repository \"../x\": expected OWNER/NAME"]);
}

#[test]
fn a_connection_cut_mid_upload_marks_nothing_published() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(dir.path());
    let hub = FakeHub::start(200, true);
    let run = publish(&hub, &reg, TOKEN, "dates:1", "me/x");
    run.fails_with(1, &["lfs upload of adapter_model.safetensors"]);
    assert!(
        hub.seen().iter().all(|s| !s.path.ends_with("/commit/main")),
        "no commit after a failed upload"
    );
    assert!(hub.state.lock().unwrap().files.is_empty());
    assert_eq!(published(&reg), serde_json::json!([]));
}
