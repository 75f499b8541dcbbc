//! Safe retries: a client's `request_id`, with a digest of the request it came with, is written
//! into the record an operation makes (the sandbox's container, the snapshot's image record).
//! A later call with the same id finds it there and returns the first call's result; with the
//! same id but another request, INVALID_ARGUMENT. Calls with one id are serialised by a lock
//! on it, so a retry that arrives while the first call still runs waits for its result.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

pub use super::model::RequestKey;
use crate::error::{Error, Result};

/// How long a request id is remembered.
pub const REQUEST_ID_TTL: Duration = Duration::from_secs(24 * 3600);

/// The three labels that remember one kind of request on a record.
#[derive(Debug, Clone, Copy)]
pub(super) struct RequestLabels {
    id: &'static str,
    digest: &'static str,
    at: &'static str,
}

/// On a sandbox's container: the CreateSandbox that made it.
pub(super) const CREATE: RequestLabels = RequestLabels {
    id: "sandboxd.io/request-id",
    digest: "sandboxd.io/request-digest",
    at: "sandboxd.io/request-at",
};
/// On a sandbox's container: the last RestoreSandbox of it.
pub(super) const RESTORE: RequestLabels = RequestLabels {
    id: "sandboxd.io/restore-request-id",
    digest: "sandboxd.io/restore-request-digest",
    at: "sandboxd.io/restore-request-at",
};
/// On a snapshot's image record: the CommitSnapshot that made it.
pub(super) const COMMIT: RequestLabels = CREATE;
/// On a snapshot's image record: the last ExportSnapshot of it (and the digest it pushed).
pub(super) const EXPORT: RequestLabels = RequestLabels {
    id: "sandboxd.io/export-request-id",
    digest: "sandboxd.io/export-request-digest",
    at: "sandboxd.io/export-request-at",
};

impl RequestLabels {
    /// The labels that remember `key`, made at `now`.
    pub(super) fn of(self, key: &RequestKey, now: SystemTime) -> [(&'static str, String); 3] {
        [
            (self.id, key.id().to_string()),
            (self.digest, key.digest().to_string()),
            (self.at, crate::util::rfc3339(now)),
        ]
    }

    /// Whether `labels` remember `key` (within [`REQUEST_ID_TTL`] of `now`): the call is a
    /// retry. INVALID_ARGUMENT when they remember the same id with another request.
    pub(super) fn replays(
        self,
        labels: &HashMap<String, String>,
        key: &RequestKey,
        now: SystemTime,
    ) -> Result<bool> {
        if labels.get(self.id).map(String::as_str) != Some(key.id()) {
            return Ok(false);
        }
        let fresh = labels
            .get(self.at)
            .and_then(|t| crate::util::parse_rfc3339(t))
            .is_some_and(|t| now.duration_since(t).unwrap_or_default() < REQUEST_ID_TTL);
        if !fresh {
            return Ok(false);
        }
        if labels.get(self.digest).map(String::as_str) != Some(key.digest()) {
            return Err(Error::invalid(
                "request_id",
                format!(
                    "{:?} was used for a different request; use a new request_id",
                    key.id()
                ),
            ));
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, canonical: &str) -> RequestKey {
        RequestKey::parse("request_id", id, canonical)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn ids_are_bounded_and_plain() {
        assert_eq!(RequestKey::parse("request_id", "", "x").unwrap(), None);
        assert!(RequestKey::parse("request_id", "job-42:try.1_a", "x").is_ok());
        for bad in ["a b", "a/b", "é", &"a".repeat(129)] {
            assert!(
                RequestKey::parse("request_id", bad, "x").is_err(),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn a_retry_replays_and_another_request_is_refused() {
        let now = SystemTime::now();
        let first = key("r1", "create a");
        let labels: HashMap<String, String> = CREATE
            .of(&first, now)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert!(CREATE
            .replays(&labels, &key("r1", "create a"), now)
            .unwrap());
        assert!(!CREATE
            .replays(&labels, &key("r2", "create a"), now)
            .unwrap());
        let err = CREATE
            .replays(&labels, &key("r1", "create b"), now)
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err:?}");
        // A day later the id is forgotten.
        let later = now + REQUEST_ID_TTL + Duration::from_secs(1);
        assert!(!CREATE
            .replays(&labels, &key("r1", "create b"), later)
            .unwrap());
        // Restores are remembered apart from the create.
        assert!(!RESTORE.replays(&labels, &first, now).unwrap());
    }
}
