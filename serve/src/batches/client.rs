//! A small client of any server that speaks OpenAI's Files and Batch API (ours, OpenAI's,
//! vLLM's): upload a batch file, create, follow and cancel a batch, fetch its files.

use std::time::Duration;

use serde_json::{json, Value};

use super::BatchError;

/// The API at a base URL.
pub struct Client {
    agent: ureq::Agent,
    url: String,
    api_key: Option<String>,
}

impl Client {
    /// A client of `url` (`http://host:port`, a trailing `/v1` or `/` dropped).
    pub fn new(url: &str, api_key: Option<String>, timeout: Duration) -> Self {
        let url = url.trim_end_matches('/');
        let url = url.strip_suffix("/v1").unwrap_or(url).to_string();
        Self {
            agent: ureq::AgentBuilder::new().timeout(timeout).build(),
            url,
            api_key,
        }
    }

    fn fail(&self, path: &str, e: ureq::Error) -> BatchError {
        let message = match e {
            ureq::Error::Status(code, r) => {
                let text = r.into_string().unwrap_or_default();
                let said = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                    .unwrap_or(text);
                format!("HTTP {code}: {said}")
            }
            e => e.to_string(),
        };
        BatchError::Http {
            url: format!("{}{path}", self.url),
            message,
        }
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let r = self.agent.request(method, &format!("{}{path}", self.url));
        match &self.api_key {
            Some(k) => r.set("Authorization", &format!("Bearer {k}")),
            None => r,
        }
    }

    fn json(
        &self,
        path: &str,
        r: Result<ureq::Response, ureq::Error>,
    ) -> Result<Value, BatchError> {
        r.map_err(|e| self.fail(path, e))?
            .into_json()
            .map_err(|e| BatchError::Http {
                url: format!("{}{path}", self.url),
                message: format!("the answer is not JSON: {e}"),
            })
    }

    /// Uploads `bytes` as the batch file `filename`; its file object.
    pub fn upload(&self, filename: &str, bytes: &[u8]) -> Result<Value, BatchError> {
        let boundary = format!("ft-{:016x}", rand::random::<u64>());
        let name = filename.replace(['"', '\r', '\n'], "_");
        let mut body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\
             Content-Type: application/jsonl\r\n\r\n"
        )
        .into_bytes();
        body.extend_from_slice(bytes);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let path = "/v1/files";
        let r = self
            .request("POST", path)
            .set(
                "Content-Type",
                &format!("multipart/form-data; boundary={boundary}"),
            )
            .send_bytes(&body);
        self.json(path, r)
    }

    /// Creates a batch of file `file_id` on `endpoint`; its batch object.
    pub fn create(
        &self,
        file_id: &str,
        endpoint: &str,
        metadata: Option<Value>,
    ) -> Result<Value, BatchError> {
        let path = "/v1/batches";
        let r = self.request("POST", path).send_json(json!({
            "input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h",
            "metadata": metadata,
        }));
        self.json(path, r)
    }

    /// Batch `id`'s object.
    pub fn batch(&self, id: &str) -> Result<Value, BatchError> {
        let path = format!("/v1/batches/{id}");
        let r = self.request("GET", &path).call();
        self.json(&path, r)
    }

    /// Asks batch `id` to stop; its object.
    pub fn cancel(&self, id: &str) -> Result<Value, BatchError> {
        let path = format!("/v1/batches/{id}/cancel");
        let r = self.request("POST", &path).send_json(json!({}));
        self.json(&path, r)
    }

    /// File `id`'s bytes.
    pub fn content(&self, id: &str) -> Result<Vec<u8>, BatchError> {
        let path = format!("/v1/files/{id}/content");
        let r = self
            .request("GET", &path)
            .call()
            .map_err(|e| self.fail(&path, e))?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut r.into_reader(), &mut bytes).map_err(|e| {
            BatchError::Http {
                url: format!("{}{path}", self.url),
                message: e.to_string(),
            }
        })?;
        Ok(bytes)
    }
}
