//! The kinds of audit entries, as a type: the one place that spells their stored strings.
//!
//! The strings are part of the operator interface (docs/operations.md, "Audit log"). This module
//! imports nothing of the crate, so that every writer of audit entries can name its kind: the
//! engine, which imports the token check, and the token check (`auth`) itself, without an import
//! cycle.
//!
//! # Usage
//! ```
//! use quva_ca::audit_kind::AuditKind;
//! assert_eq!(AuditKind::AuthDenied.as_str(), "auth.denied");
//! assert_eq!(AuditKind::parse("group.join"), Some(AuditKind::GroupJoin));
//! ```

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
        assert_eq!(AuditKind::AuthDenied.as_str(), "auth.denied");
    }
}
