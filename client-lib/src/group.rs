//! Group keys d_P and d_S: derivation, signed group info, request and delivery.
//!
//! Implements PROTOCOL.md §4 (the paper's §4.2.2 with the fixes of §9.3, §9.5 and §9.8). Member i's
//! share is v_i = d_i + g_i. For epoch E and x ∈ {P, S}, the CA derives an independent secret
//! d_CAg,x = int(HMAC-SHA256(sc(d_CA), "quva/v1/group" || u8 x || str(group) || u32 E || u32 n_pub ||
//! sorted publisher IDs || u32 n_sub || sorted subscriber IDs)) mod n ([`derive_cag_secret`]), then
//! d_P = Σ v_p + d_CAg,P over the joined publishers and d_S = Σ v_s + d_CAg,S over the joined
//! subscribers ([`GroupKeys::derive`]); anyone computes Q_P and Q_S from the members' public
//! points ([`group_public_keys`]). Subscribers hold d_P, publishers hold d_S.
//!
//! - [`GroupInfo`] / [`SignedGroupInfo`]: the public `ginfo` and the CA's signature over it.
//! - [`GroupKeyRequest`]: the device's proof of possession of its share (`quva-gk` on SUBSCRIBE).
//! - The CA's answer (`quva-gk` on SUBACK) is the rekey module's `GroupKeyDelivery`: ginfo,
//!   signature and, under ECIES, the held key with the holder's key-tree path (§5.1).
//!
//! Identifier order: publisher and subscriber IDs are sorted by their UTF-8 bytes before they are
//! written as `str`; the `members_digest` entries `u8 role || str(id) || pt(Q_i) || pt(G_i)` are
//! sorted as byte strings ([`members_digest`]).
//!
//! # Usage
//! ```
//! use quva_client::curve::{KeyPair, SecretScalar};
//! use quva_client::group::{
//!     GroupKeyRequest, GroupKeys, JoinedMember, Member, Privacy, SignedGroupInfo,
//! };
//! use quva_client::ids::{DeviceId, Epoch, GroupId, Role};
//! use rand_core::OsRng;
//!
//! let mut rng = OsRng;
//! let ca = KeyPair::random(&mut rng);
//! let group = GroupId::new("plant/line-3/temp").unwrap();
//! // A device's certified key d_i (from enrollment) and its enrollment secret g_i.
//! let device = KeyPair::random(&mut rng);
//! let g = SecretScalar::random(&mut rng);
//! let id = DeviceId::new("sensor-01").unwrap();
//! let member = Member {
//!     id: id.clone(),
//!     role: Role::Subscriber,
//!     q: *device.public(),
//!     g: quva_client::curve::Point::mul_base(&g),
//! };
//!
//! // Device: proof of possession of v_i = d_i + g_i, sent as the `quva-gk` user property.
//! let now = 1_700_000_000_000;
//! let req = GroupKeyRequest::new(&id, &group, Role::Subscriber, now, &device, &g, ca.public(),
//!     &mut rng).unwrap();
//! let property = req.to_property();
//!
//! // CA: open it for the authorized member, derive the keys of the epoch, sign, deliver.
//! let req = GroupKeyRequest::from_property(&property).unwrap();
//! let joined: JoinedMember = req.open(&ca, &member, now, 60_000).unwrap();
//! let keys = GroupKeys::derive(&ca, &group, Epoch(1), Privacy::Standard, &[joined]).unwrap();
//! let signed = SignedGroupInfo::sign(&ca, keys.group_info().clone(), &mut rng).unwrap();
//! // The subscriber's d_P is d·G = Q_P of the signed info; the CA delivers it with the
//! // subscriber's key-tree path (the rekey module's `GroupState::delivery`).
//! let info = signed.verify(&ca.verifying_key()).unwrap();
//! assert_eq!(keys.held_by(Role::Subscriber).public(), &info.q_p);
//! ```

use std::collections::BTreeSet;

use k256::elliptic_curve::ops::Reduce;
use k256::{Scalar, U256};
use rand_core::CryptoRngCore;
use sha2::{Digest, Sha256};

use crate::codec::{
    Decode, DecodeError, Encode, Reader, put_point, put_str, put_u8, put_u16, put_u32,
};
use crate::curve::{CurveError, KeyPair, Point, SecretScalar};
use crate::ids::{DeviceId, Epoch, GroupId, GroupKeyKind, Role};
use crate::schnorr::{Signature, VerifyingKey};
use crate::symmetric::{HmacSha256, VerifyError};

mod accepted;
mod request;
mod roster;

pub use accepted::AcceptedGroupKey;
pub use request::{GroupKeyRequest, POP_CIPHERTEXT_LEN};
pub(crate) use roster::{Roster, RosterDiff};

/// The MQTT user property that carries the request (SUBSCRIBE) and the delivery (SUBACK).
pub const GK_PROPERTY: &str = "quva-gk";
/// Domain tag of the CA's signature over `ginfo`.
pub const GINFO_SIGNATURE_TAG: &str = "quva/v1/ginfo";
/// Length of an encoded `ginfo` without the group name's bytes.
const GINFO_FIXED_LEN: usize = 1 + 2 + 4 + 4 * 33 + 1 + 4 + 4 + 32;
/// Longest `quva-gk` property text accepted before any decoding (a delivery is ≤ 1,818 characters:
/// a 128-byte group name and a key-tree path through the widest tree).
pub const MAX_PROPERTY_LEN: usize = 2048;

/// Why a group-key step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GroupError {
    /// Malformed bytes.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A signature, AEAD or proof check failed; deliberately says nothing more.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// A curve operation produced a forbidden value (probability 2⁻²⁵⁶ for honest input).
    #[error(transparent)]
    Curve(#[from] CurveError),
    /// The request's timestamp is outside the allowed window around `now_ms`.
    #[error("timestamp outside the window")]
    StaleTimestamp,
    /// The structure names another device than the one expected.
    #[error("wrong device in {0}")]
    WrongDevice(&'static str),
    /// The structure names another role than the one expected.
    #[error("wrong role in {0}")]
    WrongRole(&'static str),
    /// The structure names another group than the one expected.
    #[error("wrong group in {0}")]
    WrongGroup(&'static str),
    /// The same (role, device) appears twice.
    #[error("duplicate member in {0}")]
    DuplicateMember(&'static str),
    /// A member list does not produce the group info's counts, digest or public keys.
    #[error("member list does not match the group info")]
    MembersMismatch,
    /// A signed group info that does not belong to the keys it is paired with.
    #[error("group info does not belong to these keys")]
    InfoMismatch,
    /// More members than a `u32` count can carry.
    #[error("too many members")]
    TooManyMembers,
}

/// A group's privacy mode (wire `u8`: 1 standard, 2 anonymous; PROTOCOL.md §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Privacy {
    /// Members are known to the bridge; options 1, 2 and 3 are allowed.
    Standard = 1,
    /// The bridge stores only ginfo; devices may connect with a group-level proof.
    Anonymous = 2,
}

impl Privacy {
    /// The wire byte.
    pub fn to_u8(self) -> u8 {
        self as u8
    }

    /// Parses the wire byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Privacy::Standard),
            2 => Some(Privacy::Anonymous),
            _ => None,
        }
    }

    /// Reads the privacy byte.
    ///
    /// # Errors
    /// [`DecodeError::InvalidValue`] for anything but 1 or 2.
    pub fn read(r: &mut Reader<'_>, what: &'static str) -> Result<Self, DecodeError> {
        Self::from_u8(r.u8(what)?).ok_or(DecodeError::InvalidValue(what))
    }
}

/// A group member's public material: its ID, role, certified public key Q_i and G_i = g_i·G.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The device ID.
    pub id: DeviceId,
    /// The role in this group.
    pub role: Role,
    /// Q_i, the public key the device's certificate opens to.
    pub q: Point,
    /// G_i = g_i·G from the certificate.
    pub g: Point,
}

impl Member {
    /// Q_i + G_i, the public image of the share v_i.
    ///
    /// # Errors
    /// [`CurveError::Identity`] if G_i = −Q_i.
    pub fn share_public(&self) -> Result<Point, CurveError> {
        Point::from_projective(&(self.q.to_projective() + self.g.to_projective()))
    }

    /// The `members_digest` entry `u8 role || str(id) || pt(Q_i) || pt(G_i)`.
    pub fn digest_entry(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 2 + self.id.as_str().len() + 66);
        put_u8(&mut out, self.role.to_u8());
        self.id.encode(&mut out);
        put_point(&mut out, &self.q);
        put_point(&mut out, &self.g);
        out
    }

    fn key(&self) -> (Role, &DeviceId) {
        (self.role, &self.id)
    }
}

/// A member the CA accepted, with its share v_i = d_i + g_i (checked: v_i·G == Q_i + G_i).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinedMember {
    member: Member,
    share: SecretScalar,
}

impl JoinedMember {
    /// Pairs a member with its share after checking v_i·G == Q_i + G_i.
    ///
    /// # Errors
    /// [`GroupError::Verify`] if the share does not match the member's public points.
    pub fn new(member: Member, share: SecretScalar) -> Result<Self, GroupError> {
        let expected = member.q.to_projective() + member.g.to_projective();
        if Point::mul_base(&share).to_projective() == expected {
            Ok(JoinedMember { member, share })
        } else {
            Err(GroupError::Verify(VerifyError))
        }
    }

    /// Builds a member from its private keys d_i and g_i (test vectors, simulations).
    ///
    /// # Errors
    /// [`GroupError::Curve`] if d_i + g_i = 0.
    pub fn from_keys(
        id: DeviceId,
        role: Role,
        d: &SecretScalar,
        g: &SecretScalar,
    ) -> Result<Self, GroupError> {
        let share = SecretScalar::new(*d.as_scalar() + g.as_scalar())?;
        let member = Member {
            id,
            role,
            q: Point::mul_base(d),
            g: Point::mul_base(g),
        };
        Ok(JoinedMember { member, share })
    }

    /// The public part.
    pub fn member(&self) -> &Member {
        &self.member
    }

    /// The share v_i.
    pub fn share(&self) -> &SecretScalar {
        &self.share
    }
}

/// `d_CAg,x` for `kind` x, epoch E and the given publisher and subscriber IDs (any order; they
/// are sorted by their bytes here).
///
/// # Errors
/// [`GroupError::DuplicateMember`] if an ID repeats within a role, [`GroupError::TooManyMembers`]
/// beyond `u32::MAX`, [`GroupError::Curve`] if the result is 0.
pub fn derive_cag_secret(
    ca: &KeyPair,
    kind: GroupKeyKind,
    group: &GroupId,
    epoch: Epoch,
    publishers: &[&DeviceId],
    subscribers: &[&DeviceId],
) -> Result<SecretScalar, GroupError> {
    let mut sorted = BTreeSet::new();
    for (role, ids) in [
        (Role::Publisher, publishers),
        (Role::Subscriber, subscribers),
    ] {
        for id in ids {
            if !sorted.insert((role, *id)) {
                return Err(GroupError::DuplicateMember("group key derivation"));
            }
        }
    }
    let [p, s] = cag_secrets(
        ca,
        group,
        epoch,
        (publishers.len(), subscribers.len()),
        sorted
            .into_iter()
            .map(|(role, id)| (role, id.as_str().as_bytes())),
    )?;
    Ok(match kind {
        GroupKeyKind::P => p,
        GroupKeyKind::S => s,
    })
}

/// `[d_CAg,P, d_CAg,S]` in one pass over the IDs, which must come sorted by (role, ID) and
/// match the counts `(n_pub, n_sub)`.
fn cag_secrets<'a>(
    ca: &KeyPair,
    group: &GroupId,
    epoch: Epoch,
    (n_pub, n_sub): (usize, usize),
    ids: impl Iterator<Item = (Role, &'a [u8])>,
) -> Result<[SecretScalar; 2], GroupError> {
    let d_ca = ca.secret().to_bytes();
    let mut macs = [GroupKeyKind::P, GroupKeyKind::S].map(|kind| {
        let mut prefix = Vec::with_capacity(64);
        prefix.extend_from_slice(b"quva/v1/group");
        put_u8(&mut prefix, kind.to_u8());
        group.encode(&mut prefix);
        put_u32(&mut prefix, epoch.0);
        let mut mac = HmacSha256::new(&d_ca[..]);
        mac.update(&prefix);
        mac
    });
    let mut buf = Vec::with_capacity(80);
    put_u32(&mut buf, count(n_pub)?);
    let mut subscribers_started = false;
    let mut seen = (0usize, 0usize);
    for (role, id) in ids {
        if role == Role::Subscriber && !subscribers_started {
            put_u32(&mut buf, count(n_sub)?);
            subscribers_started = true;
        }
        match role {
            Role::Publisher => seen.0 += 1,
            Role::Subscriber => seen.1 += 1,
        }
        // str(id): IDs are at most 64 bytes, so the length fits.
        put_u16(&mut buf, u16::try_from(id.len()).unwrap_or(u16::MAX));
        buf.extend_from_slice(id);
        for mac in &mut macs {
            mac.update(&buf);
        }
        buf.clear();
    }
    debug_assert_eq!(seen, (n_pub, n_sub), "IDs and counts disagree");
    if !subscribers_started {
        put_u32(&mut buf, count(n_sub)?);
        for mac in &mut macs {
            mac.update(&buf);
        }
    }
    let [p, s] = macs.map(|mac| {
        let tag = zeroize::Zeroizing::new(mac.finalize());
        SecretScalar::new(<Scalar as Reduce<U256>>::reduce_bytes(&(*tag).into()))
    });
    Ok([p?, s?])
}

fn count(n: usize) -> Result<u32, GroupError> {
    u32::try_from(n).map_err(|_| GroupError::TooManyMembers)
}

/// `members_digest` = H of the concatenated entries `u8 role || str(id) || pt(Q_i) || pt(G_i)`,
/// sorted as byte strings.
pub fn members_digest<'a>(members: impl IntoIterator<Item = &'a Member>) -> [u8; 32] {
    let mut entries: Vec<Vec<u8>> = members.into_iter().map(Member::digest_entry).collect();
    entries.sort();
    digest_sorted(entries.iter().map(Vec::as_slice))
}

/// `members_digest` of entries already sorted as byte strings.
fn digest_sorted<'a>(entries: impl Iterator<Item = &'a [u8]>) -> [u8; 32] {
    let mut h = Sha256::new();
    for e in entries {
        h.update(e);
    }
    h.finalize().into()
}

/// (Q_P, Q_S): Q_P = Σ (Q_p + G_p) + Q_CAg,P over publishers, Q_S = Σ (Q_s + G_s) + Q_CAg,S over
/// subscribers.
///
/// # Errors
/// [`CurveError::Identity`] if a sum is the identity.
pub fn group_public_keys<'a>(
    q_cag_p: &Point,
    q_cag_s: &Point,
    members: impl IntoIterator<Item = &'a Member>,
) -> Result<(Point, Point), CurveError> {
    let mut p = q_cag_p.to_projective();
    let mut s = q_cag_s.to_projective();
    for m in members {
        let share = m.q.to_projective() + m.g.to_projective();
        match m.role {
            Role::Publisher => p += share,
            Role::Subscriber => s += share,
        }
    }
    Ok((Point::from_projective(&p)?, Point::from_projective(&s)?))
}

fn check_unique<'a>(members: impl IntoIterator<Item = &'a Member>) -> Result<(), GroupError> {
    let mut seen = BTreeSet::new();
    for m in members {
        if !seen.insert(m.key()) {
            return Err(GroupError::DuplicateMember("member list"));
        }
    }
    Ok(())
}

/// The public group info of one epoch (`ginfo`, PROTOCOL.md §4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupInfo {
    /// The group.
    pub group: GroupId,
    /// The epoch E.
    pub epoch: Epoch,
    /// Q_CAg,P = d_CAg,P·G.
    pub q_cag_p: Point,
    /// Q_CAg,S = d_CAg,S·G.
    pub q_cag_s: Point,
    /// Q_P, the key publishers encrypt to; subscribers hold d_P.
    pub q_p: Point,
    /// Q_S, the key subscribers encrypt queries to; publishers hold d_S.
    pub q_s: Point,
    /// The privacy mode.
    pub privacy: Privacy,
    /// The number of joined publishers.
    pub n_pub: u32,
    /// The number of joined subscribers.
    pub n_sub: u32,
    /// [`members_digest`] of the joined members.
    pub members_digest: [u8; 32],
}

impl GroupInfo {
    /// The public key of `kind`: Q_P or Q_S.
    pub fn public_key(&self, kind: GroupKeyKind) -> &Point {
        match kind {
            GroupKeyKind::P => &self.q_p,
            GroupKeyKind::S => &self.q_s,
        }
    }

    /// The public key whose secret members of `role` hold (Q_P for subscribers, Q_S for
    /// publishers).
    pub fn held_public_key(&self, role: Role) -> &Point {
        self.public_key(role.held_key())
    }

    /// The bridge's check: `members` (each (role, ID) once) has the counts, digest and group
    /// public keys that this info states.
    ///
    /// # Errors
    /// [`GroupError::DuplicateMember`] or [`GroupError::MembersMismatch`].
    pub fn check_members(&self, members: &[Member]) -> Result<(), GroupError> {
        check_unique(members)?;
        let n_pub = members.iter().filter(|m| m.role == Role::Publisher).count();
        let n_sub = members.len() - n_pub;
        let (q_p, q_s) = group_public_keys(&self.q_cag_p, &self.q_cag_s, members)
            .map_err(|_| GroupError::MembersMismatch)?;
        let ok = count(n_pub)? == self.n_pub
            && count(n_sub)? == self.n_sub
            && members_digest(members) == self.members_digest
            && q_p == self.q_p
            && q_s == self.q_s;
        if ok {
            Ok(())
        } else {
            Err(GroupError::MembersMismatch)
        }
    }
}

impl Encode for GroupInfo {
    fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(GINFO_FIXED_LEN + self.group.as_str().len());
        put_u8(out, 1);
        put_str(out, self.group.as_str());
        put_u32(out, self.epoch.0);
        put_point(out, &self.q_cag_p);
        put_point(out, &self.q_cag_s);
        put_point(out, &self.q_p);
        put_point(out, &self.q_s);
        put_u8(out, self.privacy.to_u8());
        put_u32(out, self.n_pub);
        put_u32(out, self.n_sub);
        out.extend_from_slice(&self.members_digest);
    }
}

impl Decode for GroupInfo {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.version("ginfo")?;
        Ok(GroupInfo {
            group: GroupId::read(r, "ginfo group")?,
            epoch: Epoch(r.u32("ginfo epoch")?),
            q_cag_p: r.point("ginfo Q_CAg,P")?,
            q_cag_s: r.point("ginfo Q_CAg,S")?,
            q_p: r.point("ginfo Q_P")?,
            q_s: r.point("ginfo Q_S")?,
            privacy: Privacy::read(r, "ginfo privacy")?,
            n_pub: r.u32("ginfo n_pub")?,
            n_sub: r.u32("ginfo n_sub")?,
            members_digest: r.take_array("ginfo members_digest")?,
        })
    }
}

/// `ginfo || sig` with sig = sign(d_CA, "quva/v1/ginfo", ginfo). Decoded unverified: call
/// [`SignedGroupInfo::verify`] before trusting the info.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedGroupInfo {
    info: GroupInfo,
    signature: Signature,
}

impl SignedGroupInfo {
    /// Signs `info` with the CA key.
    ///
    /// # Errors
    /// [`GroupError::Curve`] with probability 2⁻²⁵⁶.
    pub fn sign(
        ca: &KeyPair,
        info: GroupInfo,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Self, GroupError> {
        let mut entropy = zeroize::Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut entropy[..]);
        Self::sign_with_entropy(ca, info, &entropy)
    }

    /// Signs with the given 32 "fresh random" bytes (`rand` of the `group_keys` vectors).
    ///
    /// # Errors
    /// [`GroupError::Curve`] with probability 2⁻²⁵⁶.
    pub fn sign_with_entropy(
        ca: &KeyPair,
        info: GroupInfo,
        entropy: &[u8; 32],
    ) -> Result<Self, GroupError> {
        let signature = ca.sign_with_entropy(GINFO_SIGNATURE_TAG, &info.to_bytes(), entropy)?;
        Ok(SignedGroupInfo { info, signature })
    }

    /// Checks the CA's signature and returns the info.
    ///
    /// # Errors
    /// [`VerifyError`] if the signature is not the CA's over this info.
    pub fn verify(&self, q_ca: &VerifyingKey) -> Result<&GroupInfo, VerifyError> {
        q_ca.verify(GINFO_SIGNATURE_TAG, &self.info.to_bytes(), &self.signature)?;
        Ok(&self.info)
    }

    /// The info, not yet verified. For routing and logging only.
    pub fn info_unverified(&self) -> &GroupInfo {
        &self.info
    }

    /// The CA's signature (`ginfo_sig` of the vectors).
    pub fn signature(&self) -> &Signature {
        &self.signature
    }
}

impl Encode for SignedGroupInfo {
    fn encode(&self, out: &mut Vec<u8>) {
        self.info.encode(out);
        self.signature.encode(out);
    }
}

impl Decode for SignedGroupInfo {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(SignedGroupInfo {
            info: GroupInfo::read(r)?,
            signature: Signature::read(r)?,
        })
    }
}

/// The CA's keys of one epoch: d_CAg,P, d_CAg,S, d_P, d_S and the (unsigned) group info.
#[derive(Clone, Debug)]
pub struct GroupKeys {
    info: GroupInfo,
    d_cag_p: SecretScalar,
    d_cag_s: SecretScalar,
    d_p: KeyPair,
    d_s: KeyPair,
}

impl GroupKeys {
    /// Derives the keys of `epoch` for the joined `members` (each (role, ID) at most once).
    ///
    /// # Errors
    /// [`GroupError::DuplicateMember`], [`GroupError::TooManyMembers`], or [`GroupError::Curve`]
    /// if a secret sums to 0 (probability 2⁻²⁵⁶).
    pub fn derive<'a>(
        ca: &KeyPair,
        group: &GroupId,
        epoch: Epoch,
        privacy: Privacy,
        members: impl IntoIterator<Item = &'a JoinedMember>,
    ) -> Result<Self, GroupError> {
        let roster = Roster::from_members(members.into_iter().cloned())?;
        roster.derive_keys(&roster.diff([]), ca, group, epoch, privacy)
    }

    /// Derives the keys from the membership in sorted form: the share sums and counts per role,
    /// the IDs in (role, ID) order and the `members_digest` entries in byte order.
    fn derive_sorted<'a>(
        ca: &KeyPair,
        group: &GroupId,
        epoch: Epoch,
        privacy: Privacy,
        sums: &roster::RoleSums,
        ids: impl Iterator<Item = (Role, &'a [u8])>,
        entries: impl Iterator<Item = &'a [u8]>,
    ) -> Result<Self, GroupError> {
        let [d_cag_p, d_cag_s] = cag_secrets(ca, group, epoch, (sums.n_pub, sums.n_sub), ids)?;
        let d_p = KeyPair::from_secret(SecretScalar::new(*sums.publishers + d_cag_p.as_scalar())?);
        let d_s = KeyPair::from_secret(SecretScalar::new(*sums.subscribers + d_cag_s.as_scalar())?);
        let info = GroupInfo {
            group: group.clone(),
            epoch,
            q_cag_p: Point::mul_base(&d_cag_p),
            q_cag_s: Point::mul_base(&d_cag_s),
            q_p: *d_p.public(),
            q_s: *d_s.public(),
            privacy,
            n_pub: count(sums.n_pub)?,
            n_sub: count(sums.n_sub)?,
            members_digest: digest_sorted(entries),
        };
        Ok(GroupKeys {
            info,
            d_cag_p,
            d_cag_s,
            d_p,
            d_s,
        })
    }

    /// The group info these keys belong to (to be signed).
    pub fn group_info(&self) -> &GroupInfo {
        &self.info
    }

    /// d_CAg,x.
    pub fn cag_secret(&self, kind: GroupKeyKind) -> &SecretScalar {
        match kind {
            GroupKeyKind::P => &self.d_cag_p,
            GroupKeyKind::S => &self.d_cag_s,
        }
    }

    /// The group key pair of `kind`: d_P or d_S.
    pub fn key(&self, kind: GroupKeyKind) -> &KeyPair {
        match kind {
            GroupKeyKind::P => &self.d_p,
            GroupKeyKind::S => &self.d_s,
        }
    }

    /// The key that members of `role` hold: d_P for subscribers, d_S for publishers (§9.3).
    pub fn held_by(&self, role: Role) -> &KeyPair {
        self.key(role.held_key())
    }
}

/// `ctx = "quva/v1/gk" || str(group) || u32 E || u8 role`, the ECIES context of key delivery and
/// of the v1 individual notices (PROTOCOL.md §5; not used in v1.1).
pub fn key_context(group: &GroupId, epoch: Epoch, role: Role) -> Vec<u8> {
    let mut ctx = Vec::with_capacity(10 + 2 + group.as_str().len() + 5);
    ctx.extend_from_slice(b"quva/v1/gk");
    group.encode(&mut ctx);
    put_u32(&mut ctx, epoch.0);
    put_u8(&mut ctx, role.to_u8());
    ctx
}

/// Decodes a `quva-gk` property: base64url without padding, bounded before decoding.
pub(crate) fn property_bytes(text: &str) -> Result<Vec<u8>, DecodeError> {
    use base64::Engine;
    if text.len() > MAX_PROPERTY_LEN {
        return Err(DecodeError::TooLarge("quva-gk property"));
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| DecodeError::InvalidValue("quva-gk base64"))
}

pub(crate) fn property_text(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Test helpers shared by the group and rekey tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use rand_chacha::ChaCha20Rng;

    /// A device with its private keys d_i and g_i.
    pub struct TestDevice {
        pub key: KeyPair,
        pub g: SecretScalar,
        pub joined: JoinedMember,
    }

    impl TestDevice {
        pub fn new(id: &str, role: Role, rng: &mut ChaCha20Rng) -> Self {
            let key = KeyPair::random(rng);
            let g = SecretScalar::random(rng);
            let joined =
                JoinedMember::from_keys(DeviceId::new(id).unwrap(), role, key.secret(), &g)
                    .unwrap();
            TestDevice { key, g, joined }
        }

        pub fn member(&self) -> &Member {
            self.joined.member()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::TestDevice;
    use super::*;
    use crate::curve::sha256;
    use crate::symmetric::hmac_sha256;
    use k256::ProjectivePoint;
    use k256::elliptic_curve::ops::MulByGenerator;
    use proptest::prelude::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn gid(s: &str) -> GroupId {
        GroupId::new(s).unwrap()
    }

    fn devices(n_pub: usize, n_sub: usize, rng: &mut ChaCha20Rng) -> Vec<TestDevice> {
        let mut out = Vec::new();
        for i in 0..n_pub {
            out.push(TestDevice::new(&format!("pub-{i}"), Role::Publisher, rng));
        }
        for i in 0..n_sub {
            out.push(TestDevice::new(&format!("sub-{i}"), Role::Subscriber, rng));
        }
        out
    }

    fn derive(ca: &KeyPair, epoch: u32, devs: &[TestDevice]) -> GroupKeys {
        GroupKeys::derive(
            ca,
            &gid("plant/line-3/temp"),
            Epoch(epoch),
            Privacy::Standard,
            devs.iter().map(|d| &d.joined),
        )
        .unwrap()
    }

    fn arb_info() -> impl Strategy<Value = GroupInfo> {
        (
            "[a-z0-9/_-]{1,40}",
            any::<u32>(),
            prop::array::uniform4(1u64..u64::MAX),
            any::<bool>(),
            any::<u32>(),
            any::<u32>(),
            any::<[u8; 32]>(),
        )
            .prop_map(|(g, epoch, ks, anon, n_pub, n_sub, digest)| {
                let pt = |k: u64| Point::mul_base(&SecretScalar::new(Scalar::from(k)).unwrap());
                GroupInfo {
                    group: gid(&g),
                    epoch: Epoch(epoch),
                    q_cag_p: pt(ks[0]),
                    q_cag_s: pt(ks[1]),
                    q_p: pt(ks[2]),
                    q_s: pt(ks[3]),
                    privacy: if anon {
                        Privacy::Anonymous
                    } else {
                        Privacy::Standard
                    },
                    n_pub,
                    n_sub,
                    members_digest: digest,
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn ginfo_round_trips(info in arb_info()) {
            let bytes = info.to_bytes();
            prop_assert_eq!(bytes.len(), GINFO_FIXED_LEN + info.group.as_str().len());
            prop_assert_eq!(GroupInfo::from_bytes(&bytes).unwrap(), info);
        }

        #[test]
        fn signed_ginfo_round_trips(info in arb_info(), seed in any::<u64>()) {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let ca = KeyPair::random(&mut rng);
            let signed = SignedGroupInfo::sign(&ca, info, &mut rng).unwrap();
            let back = SignedGroupInfo::from_bytes(&signed.to_bytes()).unwrap();
            prop_assert!(back.verify(&ca.verifying_key()).is_ok());
            prop_assert_eq!(back, signed);
        }

        #[test]
        fn group_public_keys_are_sums_of_member_keys(
            n_pub in 0usize..5, n_sub in 0usize..5, epoch in any::<u32>(), seed in any::<u64>()
        ) {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let ca = KeyPair::random(&mut rng);
            let devs = devices(n_pub, n_sub, &mut rng);
            let keys = derive(&ca, epoch, &devs);
            let info = keys.group_info();
            // The secrets match the public keys the CA states ...
            prop_assert_eq!(keys.key(GroupKeyKind::P).public(), &info.q_p);
            prop_assert_eq!(keys.key(GroupKeyKind::S).public(), &info.q_s);
            // ... which are the sums of the members' Q_i + G_i plus Q_CAg,x, computed here
            // independently from d_i and g_i.
            let mut q_p = ProjectivePoint::mul_by_generator(keys.cag_secret(GroupKeyKind::P).as_scalar());
            let mut q_s = ProjectivePoint::mul_by_generator(keys.cag_secret(GroupKeyKind::S).as_scalar());
            for d in &devs {
                let v = *d.key.secret().as_scalar() + d.g.as_scalar();
                match d.member().role {
                    Role::Publisher => q_p += ProjectivePoint::mul_by_generator(&v),
                    Role::Subscriber => q_s += ProjectivePoint::mul_by_generator(&v),
                }
            }
            prop_assert_eq!(info.q_p.to_projective(), q_p);
            prop_assert_eq!(info.q_s.to_projective(), q_s);
            let members: Vec<Member> = devs.iter().map(|d| d.member().clone()).collect();
            prop_assert!(info.check_members(&members).is_ok());
            prop_assert_eq!(info.n_pub as usize, n_pub);
            prop_assert_eq!(info.n_sub as usize, n_sub);
            // Order does not matter.
            let mut rev = members.clone();
            rev.reverse();
            prop_assert!(info.check_members(&rev).is_ok());
        }
    }

    #[test]
    fn check_members_rejects_other_lists() {
        let mut rng = ChaCha20Rng::seed_from_u64(10);
        let ca = KeyPair::random(&mut rng);
        let devs = devices(2, 2, &mut rng);
        let info = derive(&ca, 3, &devs).group_info().clone();
        let members: Vec<Member> = devs.iter().map(|d| d.member().clone()).collect();
        assert!(info.check_members(&members).is_ok());
        // A missing, an extra, a duplicated and a swapped-key member are all refused.
        assert_eq!(
            info.check_members(&members[1..]),
            Err(GroupError::MembersMismatch)
        );
        let extra = TestDevice::new("sub-9", Role::Subscriber, &mut rng);
        let mut more = members.clone();
        more.push(extra.member().clone());
        assert_eq!(info.check_members(&more), Err(GroupError::MembersMismatch));
        let mut dup = members.clone();
        dup.push(members[0].clone());
        assert!(matches!(
            info.check_members(&dup),
            Err(GroupError::DuplicateMember(_))
        ));
        let mut swapped = members.clone();
        swapped[0].g = extra.member().g;
        assert_eq!(
            info.check_members(&swapped),
            Err(GroupError::MembersMismatch)
        );
        let mut renamed = members.clone();
        renamed[3].id = DeviceId::new("sub-7").unwrap();
        assert_eq!(
            info.check_members(&renamed),
            Err(GroupError::MembersMismatch)
        );
        let mut role_changed = members;
        role_changed[0].role = Role::Subscriber;
        assert_eq!(
            info.check_members(&role_changed),
            Err(GroupError::MembersMismatch)
        );
    }

    #[test]
    fn empty_roles_still_have_keys() {
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        let ca = KeyPair::random(&mut rng);
        let keys = derive(&ca, 0, &[]);
        assert_eq!(
            keys.key(GroupKeyKind::P).secret(),
            keys.cag_secret(GroupKeyKind::P)
        );
        assert_eq!(
            keys.key(GroupKeyKind::S).secret(),
            keys.cag_secret(GroupKeyKind::S)
        );
        assert_ne!(
            keys.cag_secret(GroupKeyKind::P),
            keys.cag_secret(GroupKeyKind::S)
        );
        assert!(keys.group_info().check_members(&[]).is_ok());
        let only_pubs = devices(2, 0, &mut rng);
        let keys = derive(&ca, 0, &only_pubs);
        assert_eq!(
            keys.key(GroupKeyKind::S).secret(),
            keys.cag_secret(GroupKeyKind::S)
        );
    }

    #[test]
    fn cag_secret_is_the_specified_hmac() {
        // Recompute d_CAg,S by hand from the §4 formula, IDs given out of order.
        let ca = KeyPair::from_secret(SecretScalar::new(Scalar::from(42u64)).unwrap());
        let group = gid("a/b");
        let (p1, p2) = (
            DeviceId::new("zeta").unwrap(),
            DeviceId::new("alpha").unwrap(),
        );
        let s1 = DeviceId::new("s").unwrap();
        let got =
            derive_cag_secret(&ca, GroupKeyKind::S, &group, Epoch(7), &[&p1, &p2], &[&s1]).unwrap();
        let mut msg = b"quva/v1/group".to_vec();
        msg.push(2);
        msg.extend_from_slice(&[0, 3, b'a', b'/', b'b']);
        msg.extend_from_slice(&7u32.to_be_bytes());
        msg.extend_from_slice(&2u32.to_be_bytes());
        msg.extend_from_slice(b"\x00\x05alpha\x00\x04zeta");
        msg.extend_from_slice(&1u32.to_be_bytes());
        msg.extend_from_slice(b"\x00\x01s");
        let mac = hmac_sha256(&ca.secret().to_bytes()[..], &[&msg]);
        let want = <Scalar as Reduce<U256>>::reduce_bytes(&mac.into());
        assert_eq!(got.as_scalar(), &want);
        // The epoch, the kind and the membership all change it.
        for other in [
            derive_cag_secret(&ca, GroupKeyKind::P, &group, Epoch(7), &[&p1, &p2], &[&s1]),
            derive_cag_secret(&ca, GroupKeyKind::S, &group, Epoch(8), &[&p1, &p2], &[&s1]),
            derive_cag_secret(&ca, GroupKeyKind::S, &group, Epoch(7), &[&p1], &[&s1]),
            derive_cag_secret(
                &ca,
                GroupKeyKind::S,
                &group,
                Epoch(7),
                &[&p1, &p2, &s1],
                &[],
            ),
        ] {
            assert_ne!(other.unwrap(), got);
        }
        assert!(matches!(
            derive_cag_secret(&ca, GroupKeyKind::S, &group, Epoch(7), &[&p1, &p1], &[]),
            Err(GroupError::DuplicateMember(_))
        ));
    }

    #[test]
    fn digest_sorts_encoded_entries() {
        let mut rng = ChaCha20Rng::seed_from_u64(12);
        let a = TestDevice::new("b", Role::Subscriber, &mut rng);
        let b = TestDevice::new("aa", Role::Subscriber, &mut rng);
        let c = TestDevice::new("zz", Role::Publisher, &mut rng);
        let want = sha256(&[
            &c.member().digest_entry(),
            &a.member().digest_entry(),
            &b.member().digest_entry(),
        ]);
        assert_eq!(members_digest([b.member(), c.member(), a.member()]), want);
        assert_eq!(members_digest([]), sha256(&[]));
    }

    #[test]
    fn signed_ginfo_tamper_fails() {
        let mut rng = ChaCha20Rng::seed_from_u64(13);
        let ca = KeyPair::random(&mut rng);
        let devs = devices(1, 2, &mut rng);
        let info = derive(&ca, 5, &devs).group_info().clone();
        let signed = SignedGroupInfo::sign(&ca, info, &mut rng).unwrap();
        let bytes = signed.to_bytes();
        let q_ca = ca.verifying_key();
        assert!(
            SignedGroupInfo::from_bytes(&bytes)
                .unwrap()
                .verify(&q_ca)
                .is_ok()
        );
        for i in 0..bytes.len() {
            for mask in [0x01u8, 0x80] {
                let mut bad = bytes.clone();
                bad[i] ^= mask;
                let ok = SignedGroupInfo::from_bytes(&bad).is_ok_and(|s| s.verify(&q_ca).is_ok());
                assert!(!ok, "flipped byte {i} still verifies");
            }
        }
        assert!(SignedGroupInfo::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        let mut long = bytes.clone();
        long.push(0);
        assert!(SignedGroupInfo::from_bytes(&long).is_err());
        // Another CA's key does not verify it.
        let other = KeyPair::random(&mut rng);
        assert!(signed.verify(&other.verifying_key()).is_err());
    }

    #[test]
    fn ginfo_decoder_rejects_bad_values() {
        let mut rng = ChaCha20Rng::seed_from_u64(14);
        let ca = KeyPair::random(&mut rng);
        let bytes = derive(&ca, 1, &[]).group_info().to_bytes();
        let mut bad_version = bytes.clone();
        bad_version[0] = 2;
        assert_eq!(
            GroupInfo::from_bytes(&bad_version),
            Err(DecodeError::UnknownVersion("ginfo"))
        );
        let privacy_at = 1 + 2 + "plant/line-3/temp".len() + 4 + 4 * 33;
        for bad in [0u8, 3, 0xff] {
            let mut b = bytes.clone();
            b[privacy_at] = bad;
            assert_eq!(
                GroupInfo::from_bytes(&b),
                Err(DecodeError::InvalidValue("ginfo privacy"))
            );
        }
        let mut bad_group = bytes.clone();
        bad_group[3] = b'$';
        assert_eq!(
            GroupInfo::from_bytes(&bad_group),
            Err(DecodeError::InvalidId("ginfo group"))
        );
        let mut bad_point = bytes;
        bad_point[privacy_at - 33] = 0x04;
        assert_eq!(
            GroupInfo::from_bytes(&bad_point),
            Err(DecodeError::InvalidPoint("ginfo Q_S"))
        );
    }

    #[test]
    fn joined_member_checks_the_share() {
        let mut rng = ChaCha20Rng::seed_from_u64(15);
        let d = TestDevice::new("x", Role::Publisher, &mut rng);
        let member = d.member().clone();
        assert!(JoinedMember::new(member.clone(), d.joined.share().clone()).is_ok());
        assert_eq!(
            JoinedMember::new(member, d.key.secret().clone()),
            Err(GroupError::Verify(VerifyError))
        );
    }

    #[test]
    fn property_text_is_bounded_and_canonical() {
        assert_eq!(
            property_bytes(&"A".repeat(MAX_PROPERTY_LEN + 1)),
            Err(DecodeError::TooLarge("quva-gk property"))
        );
        assert!(property_bytes("AA==").is_err());
        assert!(property_bytes("A+").is_err());
        assert_eq!(
            property_bytes(&property_text(b"\xfb\xff")).unwrap(),
            b"\xfb\xff"
        );
    }
}
