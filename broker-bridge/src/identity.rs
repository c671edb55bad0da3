//! Who is on the other end of a device connection, and the client identifier that stands for it
//! at the broker.
//!
//! Implements the first bridge rule of PROTOCOL.md §8 (v1.1): a device's client identifier never
//! reaches the broker as it is. Upstream it becomes
//! `qd-` || base64url-nopad(H(u8 kind || identity || str(client_id)))[..22], so that no client can
//! take over another's persistent session, and none can reach the bridge's own connections (whose
//! identifiers start with [`BRIDGE_PREFIX`]). docs/protocol.md §14 fixes the identity encoding:
//! kind 1 a device (`str(id)`), kind 2 a group connection (`str(group) || u8 role`), kind 3 an
//! unauthenticated client (nothing).
//!
//! For example, an unauthenticated client `sensor-7` appears at the broker as `qd-` followed by
//! 22 base64url characters; the same client id from a device connection appears as another one.

use base64::Engine as _;
use quva_client::curve::sha256;
use quva_client::ids::{DeviceId, GroupId, Role};
use quva_client::message::ConnectionIdentity;

/// The prefix of every client identifier the bridge uses for itself at the broker.
pub const BRIDGE_PREFIX: &str = "qb-";
/// The prefix of every client identifier the bridge uses for a device connection.
pub const DEVICE_PREFIX: &str = "qd-";
/// Characters of the hash kept in an upstream client identifier (132 bits).
const HASH_CHARS: usize = 22;

/// Who is on the other end of a connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Identity {
    /// No Quva method: unprotected topics only.
    Anonymous,
    /// A device, by certificate (`quva-cert-v1`) or a fresh enrollment or renewal.
    Device(DeviceId),
    /// A group-level connection of an anonymous group (`quva-group-v1`).
    Group(GroupId, Role),
}

impl Identity {
    /// The identity the message checks of PROTOCOL.md §6 bind to; `None` when unauthenticated.
    pub(crate) fn connection(&self) -> Option<ConnectionIdentity> {
        match self {
            Identity::Anonymous => None,
            Identity::Device(id) => Some(ConnectionIdentity::Device(id.clone())),
            Identity::Group(group, role) => Some(ConnectionIdentity::Group {
                group: group.clone(),
                role: *role,
            }),
        }
    }

    /// The device, for a device connection.
    pub(crate) fn device(&self) -> Option<&DeviceId> {
        match self {
            Identity::Device(id) => Some(id),
            _ => None,
        }
    }

    /// Whether this is an authenticated connection.
    pub(crate) fn is_authenticated(&self) -> bool {
        !matches!(self, Identity::Anonymous)
    }

    /// The client identifier this connection uses at the broker (PROTOCOL.md §8).
    pub(crate) fn upstream_client_id(&self, client_id: &str) -> String {
        let mut input = Vec::with_capacity(8 + client_id.len());
        match self {
            Identity::Device(id) => {
                input.push(1);
                id.encode(&mut input);
            }
            Identity::Group(group, role) => {
                input.push(2);
                group.encode(&mut input);
                input.push(role.to_u8());
            }
            Identity::Anonymous => input.push(3),
        }
        // Client identifiers are at most 65 535 bytes (MQTT 5 §1.5.4), so str() always fits.
        let len = u16::try_from(client_id.len()).unwrap_or(u16::MAX);
        input.extend_from_slice(&len.to_be_bytes());
        input.extend_from_slice(client_id.as_bytes());
        let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha256(&[&input]));
        format!("{DEVICE_PREFIX}{}", &encoded[..HASH_CHARS])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_ids_separate_identities_and_never_look_like_the_bridge() {
        let dev = |s: &str| Identity::Device(DeviceId::new(s).unwrap());
        let a = dev("sensor-1").upstream_client_id("c1");
        assert!(
            a.starts_with(DEVICE_PREFIX) && a.len() == 3 + HASH_CHARS,
            "{a}"
        );
        // Stable for the same identity and client id (persistent sessions resume)…
        assert_eq!(a, dev("sensor-1").upstream_client_id("c1"));
        // …and different for another device, an unauthenticated client or a group connection
        // that reuse the same client identifier.
        let group = Identity::Group(GroupId::new("plant/a").unwrap(), Role::Publisher);
        let others = [
            dev("sensor-2").upstream_client_id("c1"),
            Identity::Anonymous.upstream_client_id("c1"),
            group.upstream_client_id("c1"),
            dev("sensor-1").upstream_client_id("c2"),
        ];
        for o in &others {
            assert_ne!(&a, o);
        }
        // A client that calls itself like the bridge's own connection does not become it.
        let spoof = Identity::Anonymous.upstream_client_id("qb-notices");
        assert!(!spoof.starts_with(BRIDGE_PREFIX));
        // The length prefix keeps (id, client id) splits apart.
        assert_ne!(
            dev("ab").upstream_client_id("c"),
            dev("a").upstream_client_id("bc")
        );
    }
}
