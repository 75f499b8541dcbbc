//! The library's one error type. It becomes a gRPC status in exactly one place
//! ([`crate::api::status`]).

use std::fmt;

/// Every way a sandboxd operation can fail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; `field` names the offending request field.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: String, reason: String },

    /// The named object does not exist.
    #[error("{kind} {id:?} not found")]
    NotFound { kind: Kind, id: String },

    /// An object with that name exists already.
    #[error("{kind} {id:?} already exists")]
    AlreadyExists { kind: Kind, id: String },

    /// The object is in the wrong state for the operation.
    #[error("{0}")]
    FailedPrecondition(String),

    /// The caller presented no credentials, or credentials that are not valid. The message
    /// never echoes a secret.
    #[error("{0}")]
    Unauthenticated(String),

    /// The operation would reach outside what the caller may touch (a path leaving a sandbox).
    #[error("{0}")]
    PermissionDenied(String),

    /// The operation ran out of time.
    #[error("{0}")]
    DeadlineExceeded(String),

    /// A limit that protects the node was reached; the message names the setting.
    #[error("{0}")]
    ResourceExhausted(String),

    /// The operation was ended by a conflicting one (a stream whose sandbox is being deleted).
    #[error("{0}")]
    Aborted(String),

    /// A position (an event revision) outside what is kept; the message says what to do.
    #[error("{0}")]
    OutOfRange(String),

    /// containerd could not be reached.
    #[error("containerd is unavailable ({op}): {message}")]
    Unavailable { op: &'static str, message: String },

    /// containerd answered a call with an error we did not expect.
    #[error("containerd {op} failed: {status}")]
    Containerd {
        op: &'static str,
        #[source]
        status: Box<tonic::Status>,
    },

    /// Talking to an image registry failed.
    #[error("registry: {0}")]
    Registry(String),

    /// A local file-system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// A bug or an inconsistency that no caller can fix.
    #[error("{0}")]
    Internal(String),

    /// An operation failed and so did undoing it: both are reported.
    #[error("{error}; cleanup also failed: {cleanup}")]
    CleanupFailed {
        #[source]
        error: Box<Error>,
        cleanup: Box<Error>,
    },
}

/// The kinds of objects named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sandbox,
    Image,
    Snapshot,
    Task,
    /// A path inside a sandbox.
    Path,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Sandbox => "sandbox",
            Kind::Image => "image",
            Kind::Snapshot => "snapshot",
            Kind::Task => "task",
            Kind::Path => "path",
        })
    }
}

/// Shorthand for the library's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An INVALID_ARGUMENT error naming `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A NOT_FOUND error for `id` of `kind`.
    pub fn not_found(kind: Kind, id: impl Into<String>) -> Self {
        Error::NotFound {
            kind,
            id: id.into(),
        }
    }

    /// Wraps a containerd status, keeping "cannot reach containerd" apart from real failures.
    pub fn containerd(op: &'static str, status: tonic::Status) -> Self {
        if is_unreachable(&status) {
            Error::Unavailable {
                op,
                message: status.message().to_string(),
            }
        } else {
            Error::Containerd {
                op,
                status: Box::new(status),
            }
        }
    }

    /// Whether containerd could not be reached (the call may be retried once it is back).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Combines a failure with the failure of its undo step, if there was one.
    pub fn with_cleanup(self, cleanup: Result<()>) -> Self {
        match cleanup {
            Ok(()) => self,
            Err(cleanup) => Error::CleanupFailed {
                error: Box::new(self),
                cleanup: Box::new(cleanup),
            },
        }
    }

    /// The containerd status code behind this error, if it came from containerd.
    pub fn containerd_code(&self) -> Option<tonic::Code> {
        match self {
            Error::Containerd { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}

/// True when a status from containerd means the daemon could not be reached at all.
fn is_unreachable(status: &tonic::Status) -> bool {
    matches!(status.code(), tonic::Code::Unavailable)
        || (status.code() == tonic::Code::Unknown && status.message().contains("transport error"))
}
