//! Small helpers shared across modules.

use std::time::{Duration, SystemTime};

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    // The OS random source failing is not something we can recover from or work around.
    getrandom::fill(&mut buf).expect("the OS random number generator is unavailable");
    hex::encode(buf)
}

/// The SHA-256 of `data` as lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// A protobuf timestamp from a system time.
pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

/// A system time from a protobuf timestamp (negative or invalid values clamp to the epoch).
pub fn system_time(ts: &prost_types::Timestamp) -> SystemTime {
    SystemTime::try_from(*ts).unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Parses an RFC 3339 timestamp as written by [`prost_types::Timestamp`]'s `Display`.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    s.parse::<prost_types::Timestamp>()
        .ok()
        .and_then(|ts| SystemTime::try_from(ts).ok())
}

/// Formats a system time as RFC 3339.
pub fn rfc3339(t: SystemTime) -> String {
    timestamp(t).to_string()
}

/// A protobuf duration as a std duration; negative durations are `None`.
pub fn duration(d: &prost_types::Duration) -> Option<Duration> {
    Duration::try_from(*d).ok()
}
