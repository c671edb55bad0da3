//! What the core is asked to do, and what it answers.

use quva_client::group::Privacy;
use quva_client::ids::{DeviceId, GroupId, Role};
use quva_proto::v1::AuditEntry;
use zeroize::Zeroizing;

use crate::engine::issuer::Prepared;
use crate::error::CaError;
use crate::store::{DeviceRecord, GroupRecord};

/// The answer to a group-key request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinReply {
    /// `ginfo || sig || ecies(...)`, the SUBACK `quva-gk` bytes.
    pub response: Vec<u8>,
    /// The epoch of the delivered key.
    pub epoch: u32,
}

/// The answer to a reported certificate use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertificateUse {
    /// The certificate's serial.
    pub serial: u64,
    /// Whether this was its first use.
    pub first: bool,
}

/// A registered device with its one-time secret.
pub struct Registered {
    /// The device row.
    pub device: DeviceRecord,
    /// The enrollment secret, hex.
    pub secret: Zeroizing<String>,
}

impl std::fmt::Debug for Registered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registered")
            .field("device", &self.device.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// One request to the core. The variants that answer carry the caller's ticket `T`, which the
/// core hands back with the [`Outcome`] (possibly only when a batching window closes).
#[derive(Debug)]
pub enum Command<T> {
    /// Enrollment (PROTOCOL.md §3): `req || HMAC`; answers [`Outcome::Cert`].
    Enroll(Vec<u8>, T),
    /// Renewal (§3): `req || sig`; answers [`Outcome::Cert`].
    Renew(Vec<u8>, T),
    /// Enrollment or renewal whose certificate the caller prepared with an
    /// [`Issuer`](crate::engine::Issuer); answers [`Outcome::Cert`].
    Issue(Box<Prepared>, T),
    /// A `quva-cert-v1` proof a bridge accepted (§3); answers [`Outcome::Use`].
    ConfirmUse(Vec<u8>, T),
    /// A group-key request (§4); answers [`Outcome::Join`] once its epoch is staged.
    Join(Vec<u8>, T),
    /// Registers a device or re-issues its secret; answers [`Outcome::Registered`].
    Register {
        /// The device.
        id: DeviceId,
        /// The owner's note.
        note: String,
        /// A new secret for a registered device rather than a new registration.
        reissue: bool,
        /// Lifetime of the secret, ms; 0 for the configured default.
        secret_validity_ms: u64,
        /// The caller's ticket.
        ticket: T,
    },
    /// Revokes a device; answers [`Outcome::Device`].
    Revoke {
        /// The device.
        id: DeviceId,
        /// The owner's reason.
        reason: String,
        /// The caller's ticket.
        ticket: T,
    },
    /// Creates a group at epoch 0; answers [`Outcome::Group`].
    CreateGroup {
        /// The group.
        id: GroupId,
        /// Its privacy.
        privacy: Privacy,
        /// Its periodic rekey interval, seconds (0: none).
        interval_secs: u64,
        /// The caller's ticket.
        ticket: T,
    },
    /// Allows or denies a role; answers [`Outcome::Epoch`].
    SetPermission {
        /// The group.
        group: GroupId,
        /// The device.
        device: DeviceId,
        /// The role.
        role: Role,
        /// Allow (true) or deny.
        allow: bool,
        /// The caller's ticket.
        ticket: T,
    },
    /// Forces a new epoch; answers [`Outcome::Epoch`] when it is staged.
    Rekey(GroupId, T),
    /// Writes an audit entry from another layer (the token check); no answer.
    Audit(AuditEntry),
    /// Expiry, revocation and periodic checks, and replay-cache pruning; no answer.
    Sweep,
    /// Closes every window whose deadline is at or before `until_ms` (or before `now`).
    CloseWindows {
        /// The deadline the caller waited for, ms of the core's clock.
        until_ms: u64,
    },
    /// Closes every open window (before a stop).
    CloseAll,
}

/// An answer of the core, by the kind of command.
#[derive(Debug)]
pub enum Outcome {
    /// Enrollment or renewal: `cert || sc(a_i)`.
    Cert(Result<Vec<u8>, CaError>),
    /// A reported certificate use.
    Use(Result<CertificateUse, CaError>),
    /// A group-key request.
    Join(Result<JoinReply, CaError>),
    /// A registration.
    Registered(Result<Registered, CaError>),
    /// A revocation.
    Device(Result<DeviceRecord, CaError>),
    /// A new group.
    Group(Result<GroupRecord, CaError>),
    /// The group's epoch after a permission change or a forced rekey.
    Epoch(Result<u32, CaError>),
}

impl Outcome {
    /// The error, if the command failed.
    pub fn error(&self) -> Option<&CaError> {
        match self {
            Outcome::Cert(r) => r.as_ref().err(),
            Outcome::Use(r) => r.as_ref().err(),
            Outcome::Join(r) => r.as_ref().err(),
            Outcome::Registered(r) => r.as_ref().err(),
            Outcome::Device(r) => r.as_ref().err(),
            Outcome::Group(r) => r.as_ref().err(),
            Outcome::Epoch(r) => r.as_ref().err(),
        }
    }
}
