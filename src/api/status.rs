//! The one place where errors become gRPC statuses.

use tonic::Status;

use crate::error::Error;

/// Maps a library error to the contract's status codes, logging causes the caller cannot act on.
pub fn to_status(e: Error) -> Status {
    match &e {
        Error::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
        Error::NotFound { .. } => Status::not_found(e.to_string()),
        Error::AlreadyExists { .. } => Status::already_exists(e.to_string()),
        Error::FailedPrecondition(_) => Status::failed_precondition(e.to_string()),
        Error::PermissionDenied(_) => Status::permission_denied(e.to_string()),
        Error::DeadlineExceeded(_) => Status::deadline_exceeded(e.to_string()),
        Error::Unavailable { .. } => {
            tracing::warn!(error = %e, "containerd unavailable");
            Status::unavailable(e.to_string())
        }
        Error::Registry(_) => {
            tracing::warn!(error = %e, "registry failure");
            Status::unavailable(e.to_string())
        }
        Error::Containerd { .. } | Error::Io { .. } | Error::Internal(_) => {
            tracing::error!(error = %e, source = ?std::error::Error::source(&e), "internal error");
            Status::internal(e.to_string())
        }
        Error::CleanupFailed { error, cleanup } => {
            tracing::error!(error = %error, cleanup = %cleanup, "an operation failed and its undo failed too");
            let inner = to_status(clone_shallow(error));
            Status::new(inner.code(), e.to_string())
        }
    }
}

/// Re-creates an error's kind and message so that its code can be computed.
fn clone_shallow(e: &Error) -> Error {
    match e {
        Error::InvalidArgument { field, reason } => Error::InvalidArgument {
            field: field.clone(),
            reason: reason.clone(),
        },
        Error::NotFound { kind, id } => Error::NotFound {
            kind: *kind,
            id: id.clone(),
        },
        Error::AlreadyExists { kind, id } => Error::AlreadyExists {
            kind: *kind,
            id: id.clone(),
        },
        Error::FailedPrecondition(m) => Error::FailedPrecondition(m.clone()),
        Error::PermissionDenied(m) => Error::PermissionDenied(m.clone()),
        Error::DeadlineExceeded(m) => Error::DeadlineExceeded(m.clone()),
        Error::Unavailable { op, message } => Error::Unavailable {
            op,
            message: message.clone(),
        },
        Error::Registry(m) => Error::Registry(m.clone()),
        Error::Containerd { .. }
        | Error::Io { .. }
        | Error::Internal(_)
        | Error::CleanupFailed { .. } => Error::Internal(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;
    use tonic::Code;

    #[test]
    fn each_error_kind_has_its_contract_code() {
        assert_eq!(
            to_status(Error::invalid("image", "bad")).code(),
            Code::InvalidArgument
        );
        assert!(to_status(Error::invalid("image", "bad"))
            .message()
            .contains("image"));
        assert_eq!(
            to_status(Error::not_found(Kind::Sandbox, "x")).code(),
            Code::NotFound
        );
        assert_eq!(
            to_status(Error::AlreadyExists {
                kind: Kind::Sandbox,
                id: "x".into()
            })
            .code(),
            Code::AlreadyExists
        );
        assert_eq!(
            to_status(Error::FailedPrecondition("x".into())).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            to_status(Error::PermissionDenied("x".into())).code(),
            Code::PermissionDenied
        );
        assert_eq!(
            to_status(Error::DeadlineExceeded("x".into())).code(),
            Code::DeadlineExceeded
        );
        assert_eq!(
            to_status(Error::containerd("x", Status::unavailable("down"))).code(),
            Code::Unavailable
        );
        assert_eq!(
            to_status(Error::containerd("x", Status::unknown("boom"))).code(),
            Code::Internal
        );
        let both =
            Error::not_found(Kind::Image, "i").with_cleanup(Err(Error::Internal("undo".into())));
        let status = to_status(both);
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().contains("undo"));
    }
}
