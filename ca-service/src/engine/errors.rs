//! quva-client's errors as the CA's: what a bridge or the owner is told.

use quva_client::codec::DecodeError;
use quva_client::enrollment::{
    EnrollError, REASON_PACKET_TOO_LARGE, REASON_PAYLOAD_FORMAT_INVALID,
};
use quva_client::group::GroupError;
use quva_client::rekey::RekeyError;

use crate::error::CaError;

/// An undecodable request.
pub(crate) fn decode_err(e: DecodeError) -> CaError {
    match e {
        DecodeError::TooLarge(what) => CaError::TooLarge(what),
        _ => CaError::Malformed("request"),
    }
}

/// A refused enrollment, renewal or certificate proof.
pub(crate) fn enroll_err(e: EnrollError) -> CaError {
    match e.connack_reason() {
        REASON_PACKET_TOO_LARGE => CaError::TooLarge("request"),
        REASON_PAYLOAD_FORMAT_INVALID => CaError::Malformed("request"),
        _ => CaError::NotAuthorized(match e {
            EnrollError::BadProof => "bad proof of identity",
            EnrollError::OutsideWindow => "timestamp outside window",
            EnrollError::Expired => "certificate expired",
            EnrollError::NotYetValid => "certificate not yet valid",
            EnrollError::WrongCa => "certificate from another CA",
            EnrollError::IdentityMismatch => "identity mismatch",
            _ => "refused",
        }),
    }
}

/// A refused group-key request.
pub(crate) fn group_err(e: GroupError) -> CaError {
    match e {
        GroupError::Decode(d) => decode_err(d),
        GroupError::StaleTimestamp => CaError::NotAuthorized("timestamp outside window"),
        GroupError::Verify(_) => CaError::NotAuthorized("bad proof of possession"),
        _ => CaError::NotAuthorized("refused"),
    }
}

/// A failed group-state operation: the counter ran out, or the state is broken (logged).
pub(crate) fn rekey_err(e: RekeyError) -> CaError {
    match e {
        RekeyError::EpochExhausted => CaError::FailedPrecondition("epoch counter exhausted"),
        _ => {
            tracing::error!(error = %e, "group state error");
            CaError::Crypto("group state")
        }
    }
}

/// Whether an error is the CA's own (storage, crypto) rather than a refusal of the request:
/// those are answered but not audited as refusals.
pub(crate) fn is_internal(e: &CaError) -> bool {
    matches!(e, CaError::Store(_) | CaError::Crypto(_))
}
