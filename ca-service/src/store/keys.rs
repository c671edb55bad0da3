//! Typed storage keys: a [`KeyKind`] prefix byte, then big-endian integers and length-prefixed
//! identifiers, so that byte order is numeric order and one group's rows are contiguous.

use quva_client::ids::{DeviceId, GroupId, Role};

/// Every kind of row, with its prefix byte and its column family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum KeyKind {
    /// Counters and the schema marker (one row).
    Meta = 0x01,
    /// A registered device, by ID.
    Device = 0x02,
    /// An issued certificate, by serial.
    Cert = 0x03,
    /// A group, by ID.
    Group = 0x04,
    /// A permission and, once joined, the member's share: by group, role, device.
    Member = 0x05,
    /// The record of one epoch of a group: by group, epoch.
    Epoch = 0x06,
    /// A rekey or update notice for the bridges, by global sequence number.
    Notice = 0x07,
    /// An append-only audit entry, by sequence number.
    Audit = 0x08,
    /// A spent request nonce (replay cache), by scope and nonce.
    Nonce = 0x09,
    /// A key-tree node key (secret, PROTOCOL.md §5.1): by group, holders' role, node index.
    TreeNode = 0x0A,
}

impl KeyKind {
    /// Every kind, in prefix order.
    pub const ALL: [KeyKind; 10] = [
        KeyKind::Meta,
        KeyKind::Device,
        KeyKind::Cert,
        KeyKind::Group,
        KeyKind::Member,
        KeyKind::Epoch,
        KeyKind::Notice,
        KeyKind::Audit,
        KeyKind::Nonce,
        KeyKind::TreeNode,
    ];

    /// The prefix byte.
    pub fn prefix(self) -> u8 {
        self as u8
    }

    /// The kind of a prefix byte.
    pub fn from_prefix(b: u8) -> Option<KeyKind> {
        KeyKind::ALL.into_iter().find(|k| k.prefix() == b)
    }

    /// The column family holding this kind.
    pub fn cf(self) -> &'static str {
        match self {
            KeyKind::Meta => CF_META,
            KeyKind::Device => CF_DEVICES,
            KeyKind::Cert => CF_CERTS,
            KeyKind::Group => CF_GROUPS,
            KeyKind::Member => CF_MEMBERS,
            KeyKind::Epoch => CF_EPOCHS,
            KeyKind::Notice => CF_NOTICES,
            KeyKind::Audit => CF_AUDIT,
            KeyKind::Nonce => CF_NONCES,
            KeyKind::TreeNode => CF_TREE_NODES,
        }
    }
}

/// Column family of [`KeyKind::Meta`].
pub const CF_META: &str = "meta";
/// Column family of [`KeyKind::Device`].
pub const CF_DEVICES: &str = "devices";
/// Column family of [`KeyKind::Cert`].
pub const CF_CERTS: &str = "certificates";
/// Column family of [`KeyKind::Group`].
pub const CF_GROUPS: &str = "groups";
/// Column family of [`KeyKind::Member`].
pub const CF_MEMBERS: &str = "memberships";
/// Column family of [`KeyKind::Epoch`].
pub const CF_EPOCHS: &str = "epochs";
/// Column family of [`KeyKind::Notice`].
pub const CF_NOTICES: &str = "notices";
/// Column family of [`KeyKind::Audit`].
pub const CF_AUDIT: &str = "audit";
/// Column family of [`KeyKind::Nonce`].
pub const CF_NONCES: &str = "nonces";

/// Column family of [`KeyKind::TreeNode`].
pub const CF_TREE_NODES: &str = "tree_nodes";

/// Every column family name.
pub const ALL_CFS: [&str; 10] = [
    CF_META,
    CF_DEVICES,
    CF_CERTS,
    CF_GROUPS,
    CF_MEMBERS,
    CF_EPOCHS,
    CF_NOTICES,
    CF_AUDIT,
    CF_NONCES,
    CF_TREE_NODES,
];

/// Scope of a replay-cache nonce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum NonceScope {
    /// Enrollment and renewal requests (§3).
    Certificate = 1,
    /// Group-key requests (§4).
    GroupKey = 2,
}

/// A storage key: the column family plus the key bytes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    kind: KeyKind,
    bytes: Vec<u8>,
}

impl Key {
    fn new(kind: KeyKind, capacity: usize) -> Key {
        let mut bytes = Vec::with_capacity(1 + capacity);
        bytes.push(kind.prefix());
        Key { kind, bytes }
    }

    fn with_id(mut self, id: &str) -> Key {
        // Identifiers are at most 128 bytes (ids.rs), so the length always fits a u16.
        let len = u16::try_from(id.len()).unwrap_or(u16::MAX);
        self.bytes.extend_from_slice(&len.to_be_bytes());
        self.bytes.extend_from_slice(id.as_bytes());
        self
    }

    /// Rebuilds a key read back from storage; `None` if its prefix byte is unknown.
    pub fn from_raw(bytes: Vec<u8>) -> Option<Key> {
        let kind = KeyKind::from_prefix(*bytes.first()?)?;
        Some(Key { kind, bytes })
    }

    /// The kind of row.
    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// The column family.
    pub fn cf(&self) -> &'static str {
        self.kind.cf()
    }

    /// The key bytes, prefix byte first.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Prefix of every row of `kind` (whole-table scans, backups, tests).
    pub fn kind_prefix(kind: KeyKind) -> Key {
        Key::new(kind, 0)
    }

    /// The single meta row.
    pub fn meta() -> Key {
        Key::new(KeyKind::Meta, 0)
    }

    /// A device row.
    pub fn device(id: &DeviceId) -> Key {
        Key::new(KeyKind::Device, 66).with_id(id.as_str())
    }

    /// Prefix of all device rows.
    pub fn devices() -> Key {
        Key::new(KeyKind::Device, 0)
    }

    /// A certificate row.
    pub fn cert(serial: u64) -> Key {
        let mut k = Key::new(KeyKind::Cert, 8);
        k.bytes.extend_from_slice(&serial.to_be_bytes());
        k
    }

    /// Prefix of all certificate rows.
    pub fn certs() -> Key {
        Key::new(KeyKind::Cert, 0)
    }

    /// A group row.
    pub fn group(id: &GroupId) -> Key {
        Key::new(KeyKind::Group, 130).with_id(id.as_str())
    }

    /// Prefix of all group rows.
    pub fn groups() -> Key {
        Key::new(KeyKind::Group, 0)
    }

    /// Prefix of one group's member rows.
    pub fn members(group: &GroupId) -> Key {
        Key::new(KeyKind::Member, 130).with_id(group.as_str())
    }

    /// A member row.
    pub fn member(group: &GroupId, role: Role, device: &DeviceId) -> Key {
        let mut k = Key::members(group);
        k.bytes.push(role.to_u8());
        k.bytes.extend_from_slice(device.as_str().as_bytes());
        k
    }

    /// Prefix of all member rows.
    pub fn all_members() -> Key {
        Key::new(KeyKind::Member, 0)
    }

    /// Prefix of one group's epoch rows.
    pub fn epochs(group: &GroupId) -> Key {
        Key::new(KeyKind::Epoch, 134).with_id(group.as_str())
    }

    /// An epoch row.
    pub fn epoch(group: &GroupId, epoch: u32) -> Key {
        let mut k = Key::epochs(group);
        k.bytes.extend_from_slice(&epoch.to_be_bytes());
        k
    }

    /// Prefix of one group's key-tree node rows.
    pub fn tree_nodes(group: &GroupId) -> Key {
        Key::new(KeyKind::TreeNode, 135).with_id(group.as_str())
    }

    /// A key-tree node row: the key of `node` in the tree of `role`'s holders.
    pub fn tree_node(group: &GroupId, role: Role, node: u32) -> Key {
        let mut k = Key::tree_nodes(group);
        k.bytes.push(role.to_u8());
        k.bytes.extend_from_slice(&node.to_be_bytes());
        k
    }

    /// A notice row.
    pub fn notice(seq: u64) -> Key {
        let mut k = Key::new(KeyKind::Notice, 8);
        k.bytes.extend_from_slice(&seq.to_be_bytes());
        k
    }

    /// Prefix of all notice rows.
    pub fn notices() -> Key {
        Key::new(KeyKind::Notice, 0)
    }

    /// An audit row.
    pub fn audit(seq: u64) -> Key {
        let mut k = Key::new(KeyKind::Audit, 8);
        k.bytes.extend_from_slice(&seq.to_be_bytes());
        k
    }

    /// Prefix of all audit rows.
    pub fn audits() -> Key {
        Key::new(KeyKind::Audit, 0)
    }

    /// A replay-cache row.
    pub fn nonce(scope: NonceScope, nonce: &[u8; 16]) -> Key {
        let mut k = Key::new(KeyKind::Nonce, 17);
        k.bytes.push(scope as u8);
        k.bytes.extend_from_slice(nonce);
        k
    }

    /// Prefix of all replay-cache rows.
    pub fn nonces() -> Key {
        Key::new(KeyKind::Nonce, 0)
    }
}

/// Reads the trailing big-endian `u64` of a sequence-numbered key (certificates, notices, audit).
pub fn trailing_u64(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn each_kind_has_exactly_one_prefix_and_cf() {
        let prefixes: HashSet<u8> = KeyKind::ALL.iter().map(|k| k.prefix()).collect();
        let cfs: HashSet<&str> = KeyKind::ALL.iter().map(|k| k.cf()).collect();
        assert_eq!(prefixes.len(), KeyKind::ALL.len());
        assert_eq!(cfs.len(), KeyKind::ALL.len());
        assert_eq!(cfs, ALL_CFS.into_iter().collect());
        for k in KeyKind::ALL {
            assert_eq!(KeyKind::from_prefix(k.prefix()), Some(k));
        }
        assert_eq!(KeyKind::from_prefix(0), None);
        assert_eq!(KeyKind::from_prefix(0xff), None);
    }

    #[test]
    fn integer_keys_sort_numerically() {
        let serials = [0u64, 1, 255, 256, 65_536, u64::MAX];
        for w in serials.windows(2) {
            assert!(Key::cert(w[0]) < Key::cert(w[1]));
            assert!(Key::notice(w[0]).as_bytes() < Key::notice(w[1]).as_bytes());
        }
        let g = GroupId::new("a/b").unwrap();
        assert!(Key::epoch(&g, 255).as_bytes() < Key::epoch(&g, 256).as_bytes());
        assert_eq!(trailing_u64(Key::audit(77).as_bytes()), Some(77));
    }

    #[test]
    fn group_rows_do_not_overlap_prefixes() {
        // "a" must not be a prefix of "ab"'s rows: the length prefix separates them.
        let a = GroupId::new("a").unwrap();
        let ab = GroupId::new("ab").unwrap();
        let d = DeviceId::new("x").unwrap();
        let row = Key::member(&ab, Role::Publisher, &d);
        assert!(!row.as_bytes().starts_with(Key::members(&a).as_bytes()));
        assert!(row.as_bytes().starts_with(Key::members(&ab).as_bytes()));
    }
}
