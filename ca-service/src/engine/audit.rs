//! Audit entries and the reasons of an epoch, as the engine writes them.
//!
//! The stored strings are part of the operator interface (docs/operations.md, "Audit log"):
//! [`AuditKind::as_str`] (in the leaf module `audit_kind`, which the token check also uses) and
//! [`RekeyReason::as_str`] are the only places that spell them, and the conversion happens where
//! an [`AuditEntry`] or an epoch record is built.

use quva_proto::v1::AuditEntry;

use crate::audit_kind::AuditKind;

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
