//! The one place where errors become gRPC statuses.

use tonic::{Code, Status};

use crate::error::Error;

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = code(&e);
        Status::new(code, e.to_string())
    }
}

/// The contract's code for each error, logging the causes the caller cannot act on.
fn code(e: &Error) -> Code {
    match e {
        Error::InvalidArgument { .. } => Code::InvalidArgument,
        Error::NotFound { .. } => Code::NotFound,
        Error::AlreadyExists { .. } => Code::AlreadyExists,
        Error::FailedPrecondition(_) => Code::FailedPrecondition,
        Error::PermissionDenied(_) => Code::PermissionDenied,
        Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
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
}
