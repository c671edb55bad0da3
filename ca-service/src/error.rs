//! The CA's domain error and its one mapping to gRPC statuses.
//!
//! Device-path refusals carry an internal reason for logs and the audit log, but the status sent
//! to the bridge says only which CONNACK class applies (PROTOCOL.md §3: nothing else leaks why):
//! `PERMISSION_DENIED` → 0x87 not authorized, `INVALID_ARGUMENT` → 0x99 payload format invalid,
//! `OUT_OF_RANGE` → 0x95 packet too large.

use tonic::{Code, Status};

use crate::store::StoreError;

/// Why a CA operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A device-path request was refused: unknown, revoked or unauthorized device, bad proof,
    /// replayed nonce, stale timestamp. The reason is for logs only.
    #[error("not authorized ({0})")]
    NotAuthorized(&'static str),
    /// The wire bytes do not decode.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// The wire bytes exceed their limit.
    #[error("{0} too large")]
    TooLarge(&'static str),
    /// An admin argument is invalid.
    #[error("invalid {0}")]
    InvalidArgument(&'static str),
    /// The named device, group or certificate does not exist.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The device or group already exists.
    #[error("{0} already exists")]
    AlreadyExists(&'static str),
    /// The operation does not apply in the current state (for example a revoked device).
    #[error("{0}")]
    FailedPrecondition(&'static str),
    /// The engine is shutting down.
    #[error("CA is shutting down")]
    Unavailable,
    /// Storage failed; nothing was changed.
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    /// A cryptographic step failed on the CA's own data (never for bad input).
    #[error("internal cryptographic error: {0}")]
    Crypto(&'static str),
}

impl CaError {
    /// A short machine-readable outcome for the audit log.
    pub fn outcome(&self) -> &'static str {
        match self {
            CaError::NotAuthorized(r) => r,
            CaError::Malformed(_) => "malformed",
            CaError::TooLarge(_) => "too large",
            CaError::InvalidArgument(_) => "invalid argument",
            CaError::NotFound(_) => "not found",
            CaError::AlreadyExists(_) => "already exists",
            CaError::FailedPrecondition(_) => "failed precondition",
            CaError::Unavailable => "unavailable",
            CaError::Store(_) => "storage error",
            CaError::Crypto(_) => "crypto error",
        }
    }
}

impl From<CaError> for Status {
    fn from(e: CaError) -> Status {
        match e {
            CaError::NotAuthorized(_) => Status::new(Code::PermissionDenied, "not authorized"),
            CaError::Malformed(what) => {
                Status::new(Code::InvalidArgument, format!("malformed {what}"))
            }
            CaError::TooLarge(what) => Status::new(Code::OutOfRange, format!("{what} too large")),
            CaError::InvalidArgument(what) => {
                Status::new(Code::InvalidArgument, format!("invalid {what}"))
            }
            CaError::NotFound(what) => Status::new(Code::NotFound, format!("{what} not found")),
            CaError::AlreadyExists(what) => {
                Status::new(Code::AlreadyExists, format!("{what} already exists"))
            }
            CaError::FailedPrecondition(what) => Status::new(Code::FailedPrecondition, what),
            CaError::Unavailable => Status::new(Code::Unavailable, "CA is shutting down"),
            CaError::Store(_) | CaError::Crypto(_) => Status::new(Code::Internal, "internal error"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_leak_no_reason() {
        for reason in ["unknown device", "bad proof", "replay"] {
            let s = Status::from(CaError::NotAuthorized(reason));
            assert_eq!(s.code(), Code::PermissionDenied);
            assert_eq!(s.message(), "not authorized");
        }
        let s = Status::from(CaError::Store(StoreError::Backend("commit")));
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("commit"));
    }
}
