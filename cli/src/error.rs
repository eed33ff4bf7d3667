//! Errors that the binary reports with exit code 2: the command line itself is wrong.

/// A usage error: a flag value that parsed but is out of range or inconsistent.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Returns a usage error naming the flag, what it accepts and what it got.
pub fn usage(flag: &str, expected: &str, got: impl std::fmt::Display) -> anyhow::Error {
    UsageError(format!("{flag}: expected {expected}, got {got}")).into()
}

/// The text of a failure as `ft` prints it: the error, then each cause the text so far does
/// not already hold (many errors print their source in their own message, and the chain would
/// repeat it), with any password in a URL (`https://user:password@host`) hidden.
pub fn report(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !out.contains(&cause) {
            out.push_str(": ");
            out.push_str(&cause);
        }
    }
    hide_credentials(&out)
}

/// `text` with the user information of every URL in it (`user:password@`) replaced by `***@`.
pub fn hide_credentials(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let authority_end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#' | '"' | '\'' | '`') || c.is_whitespace())
            .unwrap_or(tail.len());
        match tail[..authority_end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                rest = &tail[at..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{path}: {source}")]
    struct Io {
        path: String,
        source: std::io::Error,
    }

    #[test]
    fn a_cause_the_message_already_holds_is_not_repeated() {
        let io = std::io::Error::from_raw_os_error(2);
        let e = anyhow::Error::new(Io {
            path: "data.jsonl".into(),
            source: io,
        })
        .context("data.train");
        let text = report(&e);
        assert_eq!(text.matches("os error 2").count(), 1, "{text}");
        assert!(text.starts_with("data.train: data.jsonl: "), "{text}");
    }

    #[test]
    fn passwords_in_urls_are_hidden() {
        assert_eq!(
            hide_credentials("GET https://me:s3cret@hub.example/api failed; http://h:1/x ok"),
            "GET https://***@hub.example/api failed; http://h:1/x ok"
        );
        assert_eq!(
            hide_credentials("--url http://a@b@host:8000: refused"),
            "--url http://***@host:8000: refused"
        );
        assert_eq!(hide_credentials("no url here"), "no url here");
    }
}
