//! The bridge's view of the CA: a small trait over the device-path RPCs.
//!
//! The bridge relays the exact wire bytes of PROTOCOL.md §3–5 and never interprets secrets: the CA
//! answers enrollment (`quva-enroll-v1`), renewal (`quva-renew-v1`) and group-key requests
//! (`quva-gk`), serves group data and rekey notices. The gRPC client (package `quva.ca.v1`) is one
//! implementation; tests use an in-memory one. Every call is bounded by a timeout at the call site,
//! so an unreachable CA yields [`CaError::Unavailable`], never a hang.
//!
//! # Usage
//! ```
//! use quva_bridge::ca::CaError;
//! // An unreachable CA is its own error: the device hears "server unavailable", not a refusal.
//! assert_eq!(CaError::Unavailable.to_string(), "CA unavailable");
//! assert_ne!(CaError::Unavailable, CaError::Refused);
//! ```

use std::future::Future;
use std::pin::Pin;

use quva_client::ids::{Epoch, GroupId};

use crate::reasons::{ConnectRefusal, SubscribeRefusal};

/// A boxed future, so that the trait is object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why the CA did not answer a request with a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// The CA could not be reached in time (connection refused, timeout, unavailable).
    #[error("CA unavailable")]
    Unavailable,
    /// The CA refused: unknown, revoked or unauthorized device, bad proof. Nothing else leaks.
    #[error("refused by the CA")]
    Refused,
    /// The request bytes are malformed.
    #[error("malformed request")]
    Malformed,
    /// The requested object (group, certificate) does not exist.
    #[error("not found")]
    NotFound,
    /// The CA answered something the bridge cannot use.
    #[error("invalid CA response")]
    InvalidResponse,
}

/// The CONNACK refusal for a failed enrollment or renewal (PROTOCOL.md §3): not authorized,
/// payload format invalid for malformed data, server unavailable.
pub(crate) fn connack_reason(e: &CaError) -> ConnectRefusal {
    match e {
        CaError::Refused | CaError::NotFound => ConnectRefusal::NotAuthorized,
        CaError::Malformed => ConnectRefusal::PayloadFormatInvalid,
        CaError::Unavailable | CaError::InvalidResponse => ConnectRefusal::ServerUnavailable,
    }
}

/// The SUBACK refusal for a refused group-key request.
pub(crate) fn suback_reason(e: &CaError) -> SubscribeRefusal {
    match e {
        CaError::Refused | CaError::NotFound | CaError::Malformed => {
            SubscribeRefusal::NotAuthorized
        }
        CaError::Unavailable | CaError::InvalidResponse => SubscribeRefusal::Unspecified,
    }
}

/// A member certificate of a group, as the CA serves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberCertificate {
    /// The role byte: 1 publisher, 2 subscriber.
    pub role: u8,
    /// The encoded certificate (PROTOCOL.md §3).
    pub cert: Vec<u8>,
    /// pt(G_i).
    pub share_point: Vec<u8>,
}

/// A group's current public data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupSnapshot {
    /// The group.
    pub group: GroupId,
    /// The current epoch.
    pub epoch: Epoch,
    /// `ginfo || sig` (PROTOCOL.md §4).
    pub signed_ginfo: Vec<u8>,
    /// The joined members.
    pub members: Vec<MemberCertificate>,
}

/// What a notice asks the bridge to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoticeAction {
    /// Publish `payload` retained, QoS 1, on `topic` (a rekey notice, PROTOCOL.md §5).
    Rekey {
        /// The key topic.
        topic: String,
        /// The notice bytes.
        payload: Vec<u8>,
    },
    /// The group moved to a new epoch: refresh its data and republish `quva/c/<group>`.
    GroupUpdated,
    /// A certificate was revoked: drop the device's sessions.
    Revoked {
        /// The certificate serial.
        serial: u64,
        /// The device.
        device: String,
    },
    /// A certificate was superseded by a newer one of the same device (PROTOCOL.md §3): refuse
    /// it from now on. The device stays enrolled and keeps its sessions.
    Superseded {
        /// The superseded certificate's serial.
        serial: u64,
        /// The device.
        device: String,
        /// The newer certificate's serial.
        successor: u64,
    },
    /// A kind this bridge does not know; skipped.
    Unknown,
}

/// One entry of the CA's notice log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// Strictly increasing sequence number.
    pub seq: u64,
    /// The group it concerns (empty for revocations that concern no group).
    pub group: String,
    /// The epoch it concerns.
    pub epoch: u32,
    /// What to do.
    pub action: NoticeAction,
}

/// A stream of notices: each call yields the next one, `None` when the stream ended.
pub trait NoticeStream: Send {
    /// The next notice.
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Notice, CaError>>>;
}

/// The device-path RPCs of the CA the bridge needs.
pub trait CaClient: Send + Sync + 'static {
    /// `Enroll`: CONNECT Authentication Data in, CONNACK Authentication Data out.
    fn enroll(&self, auth_data: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, CaError>>;
    /// `Renew`: as [`CaClient::enroll`] for `quva-renew-v1`.
    fn renew(&self, auth_data: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, CaError>>;
    /// `JoinGroup`: the decoded `quva-gk` request in, the SUBACK `quva-gk` bytes and epoch out.
    fn join_group(&self, request: Vec<u8>) -> BoxFuture<'_, Result<(Vec<u8>, Epoch), CaError>>;
    /// `GetGroup`: the group's signed info and members.
    fn get_group(&self, group: GroupId) -> BoxFuture<'_, Result<GroupSnapshot, CaError>>;
    /// `GetCaInfo`: pt(Q_CA).
    fn ca_public_key(&self) -> BoxFuture<'_, Result<Vec<u8>, CaError>>;
    /// `GetRevocationStatus` for one serial: whether it is revoked.
    fn is_revoked(&self, serial: u64) -> BoxFuture<'_, Result<bool, CaError>>;
    /// `ConfirmCertificateUse`: reports a `quva-cert-v1` proof the bridge accepted (its CONNECT
    /// Authentication Data) for certificate `serial`, so that the CA records the certificate's
    /// first use (PROTOCOL.md §3). [`CaError::Refused`] for a superseded, revoked or unknown
    /// certificate. The default asks only for the revocation status, for CAs without it.
    fn confirm_use(&self, serial: u64, auth_data: Vec<u8>) -> BoxFuture<'_, Result<(), CaError>> {
        drop(auth_data);
        Box::pin(async move {
            if self.is_revoked(serial).await? {
                Err(CaError::Refused)
            } else {
                Ok(())
            }
        })
    }
    /// `WatchNotices` from `from_seq` on.
    fn watch_notices(&self, from_seq: u64)
    -> BoxFuture<'_, Result<Box<dyn NoticeStream>, CaError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_codes_follow_protocol_section_3() {
        assert_eq!(connack_reason(&CaError::Refused).code(), 0x87);
        assert_eq!(connack_reason(&CaError::NotFound).code(), 0x87);
        assert_eq!(connack_reason(&CaError::Malformed).code(), 0x99);
        assert_eq!(connack_reason(&CaError::Unavailable).code(), 0x88);
        assert_eq!(suback_reason(&CaError::Refused).code(), 0x87);
        assert_eq!(suback_reason(&CaError::Unavailable).code(), 0x80);
    }
}
