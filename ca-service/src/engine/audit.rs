//! The kinds of audit entries and the reasons of an epoch, as types.
//!
//! The stored strings are part of the operator interface (docs/operations.md, "Audit log"):
//! [`AuditKind::as_str`] and [`RekeyReason::as_str`] are the only places that spell them, and the
//! conversion happens where an [`AuditEntry`] or an epoch record is built.

use quva_proto::v1::AuditEntry;

/// What an audit entry records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuditKind {
    /// The owner registered a device.
    DeviceRegister,
    /// The owner issued a new enrollment secret.
    DeviceReissue,
    /// The owner revoked a device.
    DeviceRevoke,
    /// An enrollment (issued or refused).
    DeviceEnroll,
    /// A renewal (issued or refused).
    DeviceRenew,
    /// The first use of a certificate.
    DeviceFirstUse,
    /// A refused `quva-cert-v1` connection.
    DeviceUse,
    /// The owner created a group.
    GroupCreate,
    /// The owner granted a role.
    GroupAllow,
    /// The owner withdrew a role.
    GroupDeny,
    /// A group-key request (accepted or refused).
    GroupJoin,
    /// The owner forced a rekey.
    GroupRekeyRequest,
    /// An epoch was committed.
    GroupRekey,
    /// A call was refused by the token check.
    AuthDenied,
}

impl AuditKind {
    /// Every kind, for tests and documentation checks.
    pub const ALL: [AuditKind; 14] = [
        AuditKind::DeviceRegister,
        AuditKind::DeviceReissue,
        AuditKind::DeviceRevoke,
        AuditKind::DeviceEnroll,
        AuditKind::DeviceRenew,
        AuditKind::DeviceFirstUse,
        AuditKind::DeviceUse,
        AuditKind::GroupCreate,
        AuditKind::GroupAllow,
        AuditKind::GroupDeny,
        AuditKind::GroupJoin,
        AuditKind::GroupRekeyRequest,
        AuditKind::GroupRekey,
        AuditKind::AuthDenied,
    ];

    /// The stored string.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::DeviceRegister => "device.register",
            AuditKind::DeviceReissue => "device.reissue",
            AuditKind::DeviceRevoke => "device.revoke",
            AuditKind::DeviceEnroll => "device.enroll",
            AuditKind::DeviceRenew => "device.renew",
            AuditKind::DeviceFirstUse => "device.first-use",
            AuditKind::DeviceUse => "device.use",
            AuditKind::GroupCreate => "group.create",
            AuditKind::GroupAllow => "group.allow",
            AuditKind::GroupDeny => "group.deny",
            AuditKind::GroupJoin => "group.join",
            AuditKind::GroupRekeyRequest => "group.rekey-request",
            AuditKind::GroupRekey => "group.rekey",
            AuditKind::AuthDenied => "auth.denied",
        }
    }

    /// The kind of a stored string; `None` for a string no version wrote.
    pub fn parse(s: &str) -> Option<AuditKind> {
        AuditKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Who caused an audited change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Actor {
    /// The owner, over the admin API.
    Admin,
    /// A bridge, relaying a device.
    Bridge,
    /// The CA itself (an epoch).
    Ca,
}

impl Actor {
    fn as_str(self) -> &'static str {
        match self {
            Actor::Admin => "admin",
            Actor::Bridge => "bridge",
            Actor::Ca => "ca",
        }
    }
}

/// An audit entry without its sequence number and time (the write assigns them).
pub(crate) fn entry(
    kind: AuditKind,
    actor: Actor,
    device: &str,
    group: &str,
    outcome: &str,
    detail: String,
) -> AuditEntry {
    AuditEntry {
        kind: kind.as_str().into(),
        actor: actor.as_str().into(),
        device: device.into(),
        group: group.into(),
        outcome: outcome.into(),
        detail,
        ..Default::default()
    }
}

/// Why an epoch was started. The epoch record and the `group.rekey` audit entry list the reasons
/// of a window sorted by their strings, which is the order of the variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RekeyReason {
    /// The group was created (epoch 0).
    Create,
    /// The owner withdrew a role from a member.
    Deny,
    /// A member's certificate expired.
    Expiry,
    /// The owner forced a rekey.
    Forced,
    /// A member joined.
    Join,
    /// The group's rekey interval passed.
    Periodic,
    /// A member's device was revoked.
    Revoke,
}

impl RekeyReason {
    /// The stored string.
    pub fn as_str(self) -> &'static str {
        match self {
            RekeyReason::Create => "create",
            RekeyReason::Deny => "deny",
            RekeyReason::Expiry => "expiry",
            RekeyReason::Forced => "forced",
            RekeyReason::Join => "join",
            RekeyReason::Periodic => "periodic",
            RekeyReason::Revoke => "revoke",
        }
    }
}

/// The reasons of one epoch as stored: sorted, comma-separated.
pub(crate) fn reasons_text<'a>(reasons: impl IntoIterator<Item = &'a RekeyReason>) -> String {
    let names: Vec<&str> = reasons.into_iter().map(|r| r.as_str()).collect();
    names.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_strings_and_are_distinct() {
        let mut seen = std::collections::HashSet::new();
        for k in AuditKind::ALL {
            assert_eq!(AuditKind::parse(k.as_str()), Some(k));
            assert!(seen.insert(k.as_str()), "{} twice", k.as_str());
        }
        assert_eq!(AuditKind::parse("device.unknown"), None);
        assert_eq!(AuditKind::DeviceFirstUse.as_str(), "device.first-use");
        assert_eq!(AuditKind::GroupRekeyRequest.as_str(), "group.rekey-request");
    }

    #[test]
    fn reasons_sort_as_their_strings() {
        let all = [
            RekeyReason::Revoke,
            RekeyReason::Periodic,
            RekeyReason::Join,
            RekeyReason::Forced,
            RekeyReason::Expiry,
            RekeyReason::Deny,
            RekeyReason::Create,
        ];
        let mut by_variant = all.to_vec();
        by_variant.sort();
        let mut by_string = all.to_vec();
        by_string.sort_by_key(|r| r.as_str());
        assert_eq!(by_variant, by_string);
        let set: std::collections::BTreeSet<_> = [RekeyReason::Revoke, RekeyReason::Join].into();
        assert_eq!(reasons_text(&set), "join,revoke");
    }
}
