//! The one place where errors become gRPC statuses.
//!
//! A status message travels in the `grpc-message` header, and clients cap received metadata
//! (grpcio at 8 KiB by default): a message that echoes a 10,000-byte label key whole reaches such
//! a client as RESOURCE_EXHAUSTED instead of INVALID_ARGUMENT. So every message is bounded here,
//! whoever wrote it: each echoed value (the domain quotes user input with `{:?}`) is cut to
//! [`MAX_ECHO`] bytes, and the whole message to [`MAX_STATUS_MESSAGE`], each cut marked with
//! `…(N bytes)`.

use tonic::{Code, Status};

use crate::error::Error;

/// Longest status message sent, in bytes. tonic percent-encodes non-ASCII bytes (up to 3 bytes
/// each on the wire), which keeps even the worst case near 3 KiB: well under grpcio's 8 KiB.
pub const MAX_STATUS_MESSAGE: usize = 1024;
/// Longest quoted echo of user input kept in a status message, in bytes (the longest label key
/// fits whole).
pub const MAX_ECHO: usize = 128;

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = code(&e);
        Status::new(code, bounded_message(&e.to_string()))
    }
}

/// The contract's code for each error, logging the causes the caller cannot act on.
fn code(e: &Error) -> Code {
    match e {
        Error::InvalidArgument { .. } => Code::InvalidArgument,
        Error::NotFound { .. } => Code::NotFound,
        Error::AlreadyExists { .. } => Code::AlreadyExists,
        Error::FailedPrecondition(_) => Code::FailedPrecondition,
        Error::Unauthenticated(_) => Code::Unauthenticated,
        Error::PermissionDenied(_) => Code::PermissionDenied,
        Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
        Error::ResourceExhausted(_) => Code::ResourceExhausted,
        Error::Aborted(_) => Code::Aborted,
        Error::OutOfRange(_) => Code::OutOfRange,
        Error::Unavailable { .. } => {
            tracing::warn!(error = %e, "containerd unavailable");
            Code::Unavailable
        }
        Error::Registry(_) => {
            tracing::warn!(error = %e, "registry failure");
            Code::Unavailable
        }
        Error::Containerd { .. } | Error::Io { .. } | Error::Internal(_) => {
            tracing::error!(error = %e, source = ?std::error::Error::source(e), "internal error");
            Code::Internal
        }
        Error::CleanupFailed { error, cleanup } => {
            // The failure keeps its own code (and its own log line if it has one).
            let code = code(error);
            tracing::error!(error = %error, cleanup = %cleanup, "an operation failed and its undo failed too");
            code
        }
    }
}

/// `message` with each quoted echo cut to [`MAX_ECHO`] bytes and the whole cut to
/// [`MAX_STATUS_MESSAGE`].
fn bounded_message(message: &str) -> String {
    cap(&bound_echoes(message), MAX_STATUS_MESSAGE)
}

/// The marker that replaces what a cut removed: how long the whole was.
fn marker(len: usize) -> String {
    format!("…({len} bytes)")
}

/// Cuts `s` to at most `max` bytes (marker included) at a character boundary.
fn cap(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let marker = marker(s.len());
    let mut end = max.saturating_sub(marker.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{marker}", &s[..end])
}

/// Cuts every double-quoted segment (a `{:?}` echo: `\"` and `\\` escaped inside) longer than
/// [`MAX_ECHO`] bytes, keeping its closing quote and never splitting an escape. An unclosed quote
/// is left alone (the whole-message cap still applies).
fn bound_echoes(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(2 * MAX_STATUS_MESSAGE));
    let mut rest = message;
    while let Some(open) = rest.find('"') {
        out.push_str(&rest[..=open]);
        rest = &rest[open + 1..];
        let Some((ends, close)) = quoted_tokens(rest) else {
            break;
        };
        let inner = &rest[..close];
        if inner.len() <= MAX_ECHO {
            out.push_str(inner);
        } else {
            let marker = marker(inner.len());
            let budget = MAX_ECHO.saturating_sub(marker.len());
            let end = ends.iter().take_while(|&&e| e <= budget).last();
            out.push_str(&inner[..end.copied().unwrap_or(0)]);
            out.push_str(&marker);
        }
        out.push('"');
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

/// For the quoted text that `s` starts with: where each of its characters or escapes ends, and
/// where its closing (unescaped) quote is; None if it has none.
fn quoted_tokens(s: &str) -> Option<(Vec<usize>, usize)> {
    let mut ends = Vec::new();
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((ends, i)),
            '\\' => {
                // `\n`, `\"`, `\\`, `\0` or `\u{…}`: one token through its last character.
                let (j, e) = chars.next()?;
                let mut end = j + e.len_utf8();
                if e == 'u' && chars.peek().is_some_and(|&(_, c)| c == '{') {
                    for (k, c) in chars.by_ref() {
                        end = k + c.len_utf8();
                        if c == '}' {
                            break;
                        }
                    }
                }
                ends.push(end);
            }
            _ => ends.push(i + c.len_utf8()),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    fn status(e: Error) -> Status {
        Status::from(e)
    }

    #[test]
    fn each_error_kind_has_its_contract_code() {
        assert_eq!(
            status(Error::invalid("image", "bad")).code(),
            Code::InvalidArgument
        );
        assert!(status(Error::invalid("image", "bad"))
            .message()
            .contains("image"));
        assert_eq!(
            status(Error::not_found(Kind::Sandbox, "x")).code(),
            Code::NotFound
        );
        assert_eq!(
            status(Error::AlreadyExists {
                kind: Kind::Sandbox,
                id: "x".into()
            })
            .code(),
            Code::AlreadyExists
        );
        assert_eq!(
            status(Error::FailedPrecondition("x".into())).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            status(Error::PermissionDenied("x".into())).code(),
            Code::PermissionDenied
        );
        assert_eq!(
            status(Error::DeadlineExceeded("x".into())).code(),
            Code::DeadlineExceeded
        );
        assert_eq!(
            status(Error::ResourceExhausted("x".into())).code(),
            Code::ResourceExhausted
        );
        assert_eq!(status(Error::Aborted("x".into())).code(), Code::Aborted);
        assert_eq!(
            status(Error::Unauthenticated("x".into())).code(),
            Code::Unauthenticated
        );
        assert_eq!(
            status(Error::containerd("x", Status::unavailable("down"))).code(),
            Code::Unavailable
        );
        assert_eq!(
            status(Error::containerd("x", Status::unknown("boom"))).code(),
            Code::Internal
        );
        assert_eq!(
            status(Error::Registry("401".into())).code(),
            Code::Unavailable
        );
        let both =
            Error::not_found(Kind::Image, "i").with_cleanup(Err(Error::Internal("undo".into())));
        let status = status(both);
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().contains("undo"));
    }

    #[test]
    fn a_long_echo_is_cut_with_its_length_and_the_field_still_named() {
        let key = "k".repeat(10_000);
        let s = status(Error::invalid(
            "labels",
            format!("label key {key:?} must be 1 to 128 bytes"),
        ));
        assert_eq!(s.code(), Code::InvalidArgument);
        let m = s.message();
        assert!(m.starts_with("invalid labels: label key \"kkk"), "{m}");
        assert!(
            m.ends_with("…(10000 bytes)\" must be 1 to 128 bytes"),
            "{m}"
        );
        let echoed = m.split('"').nth(1).unwrap();
        assert!(echoed.len() <= MAX_ECHO, "{} bytes: {echoed}", echoed.len());
    }

    #[test]
    fn short_echoes_and_messages_pass_unchanged() {
        for m in [
            "",
            "no quotes at all",
            r#"sandbox "sb-1" not found"#,
            r#"path "/a \"b\" \\ c" is a directory"#,
            r#"empty "" quote"#,
            r#"an unclosed "quote runs to the end"#,
        ] {
            assert_eq!(bounded_message(m), m);
        }
        let key = "k".repeat(MAX_ECHO);
        let m = format!("label key {key:?} is fine");
        assert_eq!(bounded_message(&m), m);
    }

    #[test]
    fn cuts_never_split_a_character_or_an_escape() {
        let value = "é\u{1f600}\\\"\n\u{7}".repeat(200);
        let m = format!("value {value:?} and {:?}", "x".repeat(300));
        let bounded = bounded_message(&m);
        assert!(bounded.len() < 2 * MAX_ECHO + 20, "{bounded}");
        let escaped = format!("{value:?}");
        let kept = bounded
            .strip_prefix("value \"")
            .and_then(|b| b.split_once(&format!("…({} bytes)\" and ", escaped.len() - 2)))
            .map(|(kept, _)| kept)
            .unwrap_or_else(|| panic!("{bounded}"));
        assert!(escaped[1..].starts_with(kept), "{kept}");
        let trailing_backslashes = kept.len() - kept.trim_end_matches('\\').len();
        assert_eq!(trailing_backslashes % 2, 0, "{kept}");
        assert_eq!(
            kept.matches("\\u{").count(),
            kept.matches('}').count(),
            "{kept}"
        );
        assert!(bounded.ends_with("…(300 bytes)\""), "{bounded}");
    }

    #[test]
    fn the_whole_message_is_capped_at_a_character_boundary() {
        let long = "é".repeat(5_000);
        let s = status(Error::Internal(format!("containerd said {long}")));
        assert!(
            s.message().len() <= MAX_STATUS_MESSAGE,
            "{}",
            s.message().len()
        );
        assert!(s.message().starts_with("containerd said é"));
        assert!(
            s.message().ends_with(&marker(16 + 10_000)),
            "{}",
            s.message()
        );
        // Many short echoes add up: the cap still holds.
        let many: String = (0..100)
            .map(|i| format!("{:?} ", "v".repeat(100 + i)))
            .collect();
        assert!(status(Error::invalid("env", many)).message().len() <= MAX_STATUS_MESSAGE);
    }
}
