//! The member certificate list of one group epoch, as the bridge publishes it on `quva/c/<group>`.
//!
//! PROTOCOL.md §6 (receivers check that a sender is a member of the right role) and §8 (one
//! retained list per group, republished at every epoch). Wire format, as the bridge writes it:
//! `u8 1 || blob(ginfo || sig) || u32 n || n × (u8 role || blob(cert) || pt(G_i))`.
//!
//! A device trusts nothing in the list until [`MemberList::verify`] has checked the CA's signature
//! on the group info, opened every certificate under the pre-loaded Q_CA, compared each G_i with
//! its certificate, and checked that the members add up to the info's counts, digest, Q_P and Q_S.
//!
//! # Usage
//! ```
//! use quva_client::curve::KeyPair;
//! use quva_client::group::{GroupKeys, Privacy, SignedGroupInfo};
//! use quva_client::ids::{Epoch, GroupId};
//! use quva_client::rng::SystemRng;
//! use quva_node::MemberList;
//!
//! let mut rng = SystemRng::new();
//! let ca = KeyPair::random(&mut rng);
//! let group = GroupId::new("plant/line-3/temp").unwrap();
//! let keys = GroupKeys::derive(&ca, &group, Epoch(0), Privacy::Standard, []).unwrap();
//! let signed = SignedGroupInfo::sign(&ca, keys.group_info().clone(), &mut rng).unwrap();
//! let bytes = MemberList::encode(&signed, &[]);
//! let list = MemberList::verify(&bytes, ca.public(), &group).unwrap();
//! assert_eq!(list.epoch(), Epoch(0));
//! assert!(list.members().is_empty());
//! ```

use quva_client::codec::{
    Decode, DecodeError, Encode, Reader, put_blob, put_point, put_u8, put_u32,
};
use quva_client::curve::Point;
use quva_client::enrollment::ImplicitCert;
use quva_client::group::{GroupInfo, Member, SignedGroupInfo};
use quva_client::ids::{DeviceId, Epoch, GroupId, Role};
use quva_client::schnorr::VerifyingKey;

/// Why a member certificate list was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MemberListError {
    /// The bytes are not a well-formed list.
    #[error("malformed member list: {0}")]
    Malformed(#[from] DecodeError),
    /// The group info is not signed by the CA.
    #[error("member list group info not signed by the CA")]
    BadSignature,
    /// The list is for another group than its topic names.
    #[error("member list for another group")]
    WrongGroup,
    /// A certificate does not open under Q_CA, or its G_i differs from the listed one.
    #[error("invalid member certificate")]
    BadCertificate,
    /// The members do not produce the info's counts, digest or public keys.
    #[error("members do not match the group info")]
    MembersMismatch,
}

/// One listed member with its certificate's validity period.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedMember {
    /// ID, role, Q_i and G_i.
    pub member: Member,
    /// The certificate serial.
    pub serial: u64,
    /// Start of the certificate's validity, Unix ms.
    pub not_before: u64,
    /// End of the certificate's validity, Unix ms.
    pub not_after: u64,
}

/// A verified member certificate list of one epoch.
#[derive(Clone, Debug)]
pub struct MemberList {
    info: GroupInfo,
    members: Vec<ListedMember>,
}

impl MemberList {
    /// The list's format version byte.
    pub const VERSION: u8 = 1;

    /// Encodes a list in the bridge's format (used by tests and simulations; the bridge
    /// publishes the real one).
    pub fn encode(signed: &SignedGroupInfo, certs: &[(Role, &ImplicitCert)]) -> Vec<u8> {
        let mut out = Vec::new();
        put_u8(&mut out, Self::VERSION);
        put_blob(&mut out, &signed.to_bytes());
        put_u32(&mut out, u32::try_from(certs.len()).unwrap_or(u32::MAX));
        for (role, cert) in certs {
            put_u8(&mut out, role.to_u8());
            put_blob(&mut out, &cert.to_bytes());
            put_point(&mut out, cert.group_base());
        }
        out
    }

    /// Parses and verifies a list received on `quva/c/<group>`.
    ///
    /// # Errors
    /// [`MemberListError`] for malformed bytes, a bad CA signature, another group, an invalid
    /// certificate or members that do not match the signed info.
    pub fn verify(bytes: &[u8], q_ca: &Point, group: &GroupId) -> Result<Self, MemberListError> {
        let mut r = Reader::new(bytes);
        r.version("member list")?;
        let signed = SignedGroupInfo::from_bytes(r.blob("member list ginfo")?)?;
        let info = signed
            .verify(&VerifyingKey(*q_ca))
            .map_err(|_| MemberListError::BadSignature)?
            .clone();
        if &info.group != group {
            return Err(MemberListError::WrongGroup);
        }
        let n = r.u32("member list count")?;
        let mut members = Vec::new();
        for _ in 0..n {
            let role = Role::read(&mut r, "member role")?;
            let cert = ImplicitCert::from_bytes(r.blob("member certificate")?)?;
            let g = r.point("member G_i")?;
            let q = cert
                .open(q_ca)
                .map_err(|_| MemberListError::BadCertificate)?;
            if &g != cert.group_base() {
                return Err(MemberListError::BadCertificate);
            }
            members.push(ListedMember {
                member: Member {
                    id: cert.id().clone(),
                    role,
                    q: q.0,
                    g,
                },
                serial: cert.serial(),
                not_before: cert.not_before(),
                not_after: cert.not_after(),
            });
        }
        r.finish("member list")?;
        let plain: Vec<Member> = members.iter().map(|m| m.member.clone()).collect();
        info.check_members(&plain)
            .map_err(|_| MemberListError::MembersMismatch)?;
        Ok(MemberList { info, members })
    }

    /// The verified group info of the list's epoch.
    pub fn info(&self) -> &GroupInfo {
        &self.info
    }

    /// The epoch.
    pub fn epoch(&self) -> Epoch {
        self.info.epoch
    }

    /// The members.
    pub fn members(&self) -> &[ListedMember] {
        &self.members
    }

    /// Whether `id` is a member in `role`.
    pub fn contains(&self, id: &DeviceId, role: Role) -> bool {
        self.members
            .iter()
            .any(|m| &m.member.id == id && m.member.role == role)
    }

    /// Q_i of `id` if it is listed (in any role) with a certificate valid at `now_ms`.
    pub fn key_of(&self, id: &DeviceId, now_ms: u64) -> Option<VerifyingKey> {
        self.members
            .iter()
            .find(|m| &m.member.id == id && m.not_before <= now_ms && now_ms <= m.not_after)
            .map(|m| VerifyingKey(m.member.q))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{Node, World};

    #[test]
    fn verifies_the_bridge_format_and_rejects_tampering() {
        let mut w = World::new(1);
        let g = w.group("plant/a");
        w.register("pub-1", &g, Role::Publisher);
        w.register("sub-1", &g, Role::Subscriber);
        let mut p = Node::new(w.enroll("pub-1"));
        let mut s = Node::new(w.enroll("sub-1"));
        w.join_node(&mut p, &g, Role::Publisher, false);
        w.join_node(&mut s, &g, Role::Subscriber, true);
        let bytes = w.member_list(&g);
        let list = MemberList::verify(&bytes, w.ca.public(), &g).unwrap();
        assert_eq!(list.members().len(), 2);
        assert!(list.contains(&DeviceId::new("pub-1").unwrap(), Role::Publisher));
        assert!(!list.contains(&DeviceId::new("pub-1").unwrap(), Role::Subscriber));
        let now = w.now;
        assert!(list.key_of(&DeviceId::new("sub-1").unwrap(), now).is_some());
        assert!(
            list.key_of(&DeviceId::new("sub-1").unwrap(), u64::MAX)
                .is_none()
        );

        let other = GroupId::new("plant/b").unwrap();
        assert_eq!(
            MemberList::verify(&bytes, w.ca.public(), &other).unwrap_err(),
            MemberListError::WrongGroup
        );
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(
                MemberList::verify(&bad, w.ca.public(), &g).is_err(),
                "byte {i}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(MemberList::verify(&longer, w.ca.public(), &g).is_err());
        assert!(MemberList::verify(&bytes[..bytes.len() - 1], w.ca.public(), &g).is_err());
    }

    #[test]
    fn a_list_missing_a_member_does_not_match() {
        let mut w = World::new(2);
        let g = w.group("plant/a");
        w.register("pub-1", &g, Role::Publisher);
        let mut p = Node::new(w.enroll("pub-1"));
        w.join_node(&mut p, &g, Role::Publisher, false);
        let signed = w.state(&g).signed_info().clone();
        let bytes = MemberList::encode(&signed, &[]);
        assert_eq!(
            MemberList::verify(&bytes, w.ca.public(), &g).unwrap_err(),
            MemberListError::MembersMismatch
        );
    }
}
