//! Answers in Redis, under `ft:response:<key hex>`, with Redis's own expiry. Every call has
//! a deadline: a Redis that went away costs a request at most that long, and the connection
//! manager reconnects in the background once it is back.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{CacheError, Cached, Key};

/// How long one read or write may take before it counts as failed.
const DEADLINE: Duration = Duration::from_millis(250);

/// A connection to the Redis that holds the answers.
pub(super) struct RedisStore {
    connection: ConnectionManager,
}

impl RedisStore {
    /// Connects to `url` (`redis://HOST:PORT[/DB]`) and checks that it answers.
    pub(super) async fn connect(url: &str) -> Result<Self, CacheError> {
        let fail = |message: String| CacheError::Redis {
            url: without_password(url),
            message,
        };
        let client = redis::Client::open(url).map_err(|e| fail(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(DEADLINE))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let mut connection = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| fail(e.to_string()))?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .map_err(|e| fail(e.to_string()))?;
        Ok(Self { connection })
    }

    /// The answer under `key`, `None` if absent.
    pub(super) async fn get(&self, key: &Key) -> Result<Option<Cached>, String> {
        let mut c = self.connection.clone();
        let mut cmd = redis::cmd("GET");
        cmd.arg(name(key));
        let read = cmd.query_async::<Option<Vec<u8>>>(&mut c);
        let bytes = tokio::time::timeout(DEADLINE, read)
            .await
            .map_err(|_| format!("no answer within {DEADLINE:?}"))?
            .map_err(|e| e.to_string())?;
        bytes
            .map(|b| serde_json::from_slice(&b).map_err(|e| format!("a malformed entry: {e}")))
            .transpose()
    }

    /// Stores `value` under `key` for `ttl` (or until Redis evicts it).
    pub(super) async fn put(
        &self,
        key: &Key,
        value: &Cached,
        ttl: Option<Duration>,
    ) -> Result<(), String> {
        let bytes = serde_json::to_vec(value).map_err(|e| e.to_string())?;
        let mut cmd = redis::cmd("SET");
        cmd.arg(name(key)).arg(bytes);
        if let Some(ttl) = ttl {
            cmd.arg("PX").arg(ttl.as_millis().max(1) as u64);
        }
        let mut c = self.connection.clone();
        tokio::time::timeout(DEADLINE, cmd.query_async::<()>(&mut c))
            .await
            .map_err(|_| format!("no answer within {DEADLINE:?}"))?
            .map_err(|e| e.to_string())
    }
}

fn name(key: &Key) -> String {
    format!("ft:response:{}", key.hex())
}

/// `url` with any password replaced by `***`, for messages.
fn without_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}://{user}:***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_never_carry_the_password() {
        assert_eq!(
            without_password("redis://:hunter2@localhost:6379/0"),
            "redis://:***@localhost:6379/0"
        );
        assert_eq!(
            without_password("redis://me:hunter2@host"),
            "redis://me:***@host"
        );
        assert_eq!(
            without_password("redis://localhost:6379"),
            "redis://localhost:6379"
        );
    }
}
