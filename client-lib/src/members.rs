//! The member certificate list of one group epoch, published retained on `quva/c/<group>`
//! ([`topic`]).
//!
//! PROTOCOL.md §6 (receivers check that a sender is a member of the right role) and §8 (one
//! retained list per group, republished at every epoch). Wire format (docs/protocol.md), written
//! by the bridge from the CA's group data ([`encode`]) and read by devices ([`MemberList`]):
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
//! use rand_core::OsRng;
//! use quva_client::members::MemberList;
//!
//! let mut rng = OsRng;
//! let ca = KeyPair::random(&mut rng);
//! let group = GroupId::new("plant/line-3/temp").unwrap();
//! let keys = GroupKeys::derive(&ca, &group, Epoch(0), Privacy::Standard, []).unwrap();
//! let signed = SignedGroupInfo::sign(&ca, keys.group_info().clone(), &mut rng).unwrap();
//! let bytes = MemberList::encode(&signed, &[]);
//! let list = MemberList::verify(&bytes, ca.public(), &group).unwrap();
//! assert_eq!(list.epoch(), Epoch(0));
//! assert!(list.members().is_empty());
//! ```

use crate::codec::{Decode, DecodeError, Encode, Reader, put_blob, put_point, put_u8, put_u32};
use crate::curve::Point;
use crate::enrollment::ImplicitCert;
use crate::group::{GroupInfo, Member, SignedGroupInfo};
use crate::ids::{DeviceId, Epoch, GroupId, Role};
use crate::schnorr::VerifyingKey;

/// The list's format version byte.
pub const VERSION: u8 = 1;

/// The member certificate topic of a group: `quva/c/<group>`.
pub fn topic(group: &GroupId) -> String {
    crate::topics::certificates(group)
}

/// Encodes a list from encoded parts: `ginfo || sig`, and each member's role, encoded
/// certificate and G_i.
pub fn encode<'a>(
    signed_ginfo: &[u8],
    certs: impl ExactSizeIterator<Item = (Role, &'a [u8], &'a Point)>,
) -> Vec<u8> {
    let mut out = Vec::new();
    put_u8(&mut out, VERSION);
    put_blob(&mut out, signed_ginfo);
    put_u32(&mut out, u32::try_from(certs.len()).unwrap_or(u32::MAX));
    for (role, cert, g) in certs {
        put_u8(&mut out, role.to_u8());
        put_blob(&mut out, cert);
        put_point(&mut out, g);
    }
    out
}

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
    /// Encodes a list of certificates ([`encode`] from decoded parts; for tests and simulations).
    pub fn encode(signed: &SignedGroupInfo, certs: &[(Role, &ImplicitCert)]) -> Vec<u8> {
        let encoded: Vec<(Role, Vec<u8>, &Point)> = certs
            .iter()
            .map(|(r, c)| (*r, c.to_bytes(), c.group_base()))
            .collect();
        encode(
            &signed.to_bytes(),
            encoded
                .iter()
                .map(|(r, bytes, g)| (*r, bytes.as_slice(), *g)),
        )
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

    /// The group of the list.
    pub fn group(&self) -> &GroupId {
        &self.info.group
    }

    /// The listed entries whose certificate is exactly `cert` (same ID, serial, validity and
    /// G_i) opening to `q`: one per role the certificate's device holds. A revoked device has
    /// left every list; a superseded certificate differs in serial and key.
    pub fn entries_of<'a>(
        &'a self,
        cert: &'a ImplicitCert,
        q: &'a VerifyingKey,
    ) -> impl Iterator<Item = &'a ListedMember> + 'a {
        self.members.iter().filter(move |m| {
            &m.member.id == cert.id()
                && m.serial == cert.serial()
                && m.not_before == cert.not_before()
                && m.not_after == cert.not_after()
                && &m.member.g == cert.group_base()
                && m.member.q == q.0
        })
    }

    /// Whether exactly `cert` (opening to `q`) is listed in `role`.
    pub fn lists_certificate(&self, cert: &ImplicitCert, q: &VerifyingKey, role: Role) -> bool {
        self.entries_of(cert, q).any(|m| m.member.role == role)
    }

    /// Q_i of `id` if it is listed (in any role) with a certificate valid at `now_ms`.
    pub fn key_of(&self, id: &DeviceId, now_ms: u64) -> Option<VerifyingKey> {
        self.members
            .iter()
            .find(|m| &m.member.id == id && m.not_before <= now_ms && now_ms <= m.not_after)
            .map(|m| VerifyingKey(m.member.q))
    }
}
