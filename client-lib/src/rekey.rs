//! Rekeying: the CA's group state and rekey planner, rekey notices, and the device's keyring.
//!
//! Implements PROTOCOL.md §5 (the paper's §4.4 with the fixes of §9.4, §9.5, §9.7 and §9.8).
//!
//! CA side, sans-IO and staged ([`GroupState`]): the daemon's single writer task gathers the
//! changes of a batching window (joins, leaves — a leave, denial, revocation or expiry are all
//! leaves —, new certificates, the periodic timer) and calls [`GroupState::stage`], which
//! coalesces them into one epoch E → E+1 and returns a [`StagedRekey`]: the next state (with
//! [`StagedRekey::state_record`] to persist) and the notices to publish. After the write is
//! durable, [`GroupState::commit`] makes it current. A join with the share already joined changes
//! nothing ([`Plan::Unchanged`]); the caller answers it with [`GroupState::delivery`].
//!
//! Delivery rule for each key X ∈ {d_P, d_S}: if a departing member held X, the new X goes to every
//! remaining holder individually (ECIES); otherwise one broadcast under the previous X plus ECIES
//! to each new holder. Holders of d_P are the subscribers, holders of d_S the publishers. An
//! individual notice names its recipient by topic only: `quva/k/<group>/<pub|sub>/<device>`
//! ([`device_key_topic`]); broadcasts go to `quva/k/<group>/<pub|sub>` ([`key_topic`]).
//!
//! Device side ([`Keyring`]): applies notices (signature, group, role, epoch order, decryption and
//! d·G against the signed info), catches up from a retained individual notice of a later epoch,
//! and keeps superseded keys for a grace period (default [`DEFAULT_GRACE_MS`]).
//!
//! v1.1 key trees ([`tree`], PROTOCOL.md §5.1): one kind-3 notice of O(log n) symmetric wraps per
//! epoch and role replaces the broadcast and the individual notices.
//!
//! # Usage
//! ```
//! use quva_client::curve::{KeyPair, SecretScalar};
//! use quva_client::group::{JoinedMember, Privacy};
//! use quva_client::ids::{DeviceId, Epoch, GroupId, Role};
//! use quva_client::rekey::{Change, GroupState, Keyring, Plan, DEFAULT_GRACE_MS};
//! use quva_client::rng::SystemRng;
//!
//! let mut rng = SystemRng::new();
//! let ca = KeyPair::random(&mut rng);
//! let group = GroupId::new("plant/line-3/temp").unwrap();
//! let mut state = GroupState::create(&ca, group.clone(), Privacy::Standard, Epoch(0), 0,
//!     &mut rng).unwrap();
//!
//! // Two subscribers join in one batching window: one epoch.
//! let mut devices = Vec::new();
//! let mut changes = Vec::new();
//! for name in ["sub-1", "sub-2"] {
//!     let d = KeyPair::random(&mut rng);
//!     let g = SecretScalar::random(&mut rng);
//!     let id = DeviceId::new(name).unwrap();
//!     changes.push(Change::Join(
//!         JoinedMember::from_keys(id, Role::Subscriber, d.secret(), &g).unwrap(),
//!     ));
//!     devices.push(d);
//! }
//! let Plan::Rekey(staged) = state.stage(&ca, changes, 1_000, &mut rng).unwrap() else {
//!     unreachable!()
//! };
//! // ... persist staged.state_record() and the notices atomically, then:
//! let notices = staged.notices().to_vec();
//! state.commit(*staged).unwrap();
//! assert_eq!(state.epoch(), Epoch(1));
//!
//! // sub-1 adopts d_P from its individual notice.
//! let mine = notices
//!     .iter()
//!     .find(|n| n.recipient.as_ref().map(|r| r.as_str()) == Some("sub-1"))
//!     .unwrap();
//! assert_eq!(mine.topic, "quva/k/plant/line-3/temp/sub/sub-1");
//! let ring = Keyring::from_notice(ca.verifying_key(), &group, Role::Subscriber, &devices[0],
//!     &mine.notice, DEFAULT_GRACE_MS).unwrap();
//! assert_eq!(ring.current_key().public(), &state.signed_info().info_unverified().q_p);
//! ```

use rand_core::CryptoRngCore;

use crate::codec::{Decode, DecodeError, Encode, Reader, put_u8, put_u64};
use crate::curve::{CurveError, KeyPair};
use crate::group::{
    GroupError, GroupKeyDelivery, GroupKeys, JoinedMember, Member, Privacy, Roster, RosterDiff,
    SignedGroupInfo,
};
use crate::ids::{DeviceId, Epoch, GroupId, GroupKeyKind, Role};
use crate::symmetric::VerifyError;

mod keyring;
mod notice;
pub mod tree;

pub use keyring::{DEFAULT_GRACE_MS, Keyring, MAX_PREVIOUS_KEYS};
pub use notice::{BROADCAST_CIPHERTEXT_LEN, NoticeBody, NoticeKind, RekeyNotice};

/// Changes that arrive within this window coalesce into one epoch (PROTOCOL.md §5).
pub const DEFAULT_BATCH_WINDOW_MS: u64 = 200;

/// Why a rekey step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RekeyError {
    /// A group-key step failed.
    #[error(transparent)]
    Group(GroupError),
    /// Malformed bytes.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A signature, AEAD or key check failed; deliberately says nothing more.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// A curve operation produced a forbidden value (probability 2⁻²⁵⁶).
    #[error(transparent)]
    Curve(#[from] CurveError),
    /// The notice is for the other role.
    #[error("wrong role in {0}")]
    WrongRole(&'static str),
    /// The notice is for another group.
    #[error("wrong group in {0}")]
    WrongGroup(&'static str),
    /// The notice's epoch is not after the current one (a replay or a retained old notice).
    #[error("epoch not after the current one")]
    StaleEpoch,
    /// A broadcast that does not follow the current epoch: keys were missed, ask the CA again.
    #[error("missed epochs: request the group key again")]
    EpochGap,
    /// The epoch counter is at `u32::MAX`.
    #[error("epoch counter exhausted")]
    EpochExhausted,
    /// The staged rekey was planned from another state than the current one.
    #[error("staged rekey does not follow the current state")]
    Conflict,
    /// The device is not a joined member of this role.
    #[error("not a member")]
    NotAMember,
    /// A stored record does not re-derive to its signed group info.
    #[error("group record does not match its group info")]
    RecordMismatch,
    /// A key-tree step failed (PROTOCOL.md §5.1).
    #[error(transparent)]
    Tree(tree::TreeError),
}

/// The key topic of `role` in `group`: `quva/k/<group>/<pub|sub>` (broadcast notices, requests).
pub fn key_topic(group: &GroupId, role: Role) -> String {
    crate::topics::key(group, role)
}

/// The individual notice topic `quva/k/<group>/<pub|sub>/<device>`.
pub fn device_key_topic(group: &GroupId, role: Role, device: &DeviceId) -> String {
    crate::topics::individual(group, role, device)
}

/// One membership change, or the periodic timer.
// A batch holds a handful of changes for a few hundred milliseconds; boxing the join would only
// make callers' code noisier.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A member joins with its verified share; the same member with a new share (a new
    /// certificate) counts as a leave plus a join, the same share as nothing.
    Join(JoinedMember),
    /// A member leaves this role: leave, denial, revocation or expiry.
    Leave {
        /// The device.
        id: DeviceId,
        /// The role it leaves.
        role: Role,
    },
    /// A device leaves every role (revocation, expiry, deregistration).
    Remove(DeviceId),
    /// The periodic interval elapsed: rekey even if nobody changed.
    Periodic,
}

/// What staging produced.
#[derive(Debug)]
pub enum Plan {
    /// Nothing changed: no new epoch; answer joiners with the current keys.
    Unchanged,
    /// A new epoch to persist and commit.
    Rekey(Box<StagedRekey>),
}

/// One notice to publish (QoS 1, retained).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutgoingNotice {
    /// The individual recipient, or `None` for a broadcast to every holder of `role`.
    pub recipient: Option<DeviceId>,
    /// The holders' role: publishers receive d_S, subscribers d_P.
    pub role: Role,
    /// [`device_key_topic`] for an individual notice, [`key_topic`] for a broadcast.
    pub topic: String,
    /// The notice.
    pub notice: RekeyNotice,
}

impl OutgoingNotice {
    /// The payload to publish.
    pub fn payload(&self) -> Vec<u8> {
        self.notice.to_bytes()
    }
}

/// A planned epoch E → E+1: the membership change, the new keys and their notices, to persist
/// and then commit.
#[derive(Debug)]
pub struct StagedRekey {
    base: crate::group::GroupInfo,
    keys: GroupKeys,
    signed: SignedGroupInfo,
    diff: RosterDiff,
    rekeyed_at_ms: u64,
    notices: Vec<OutgoingNotice>,
    joined: Vec<Member>,
    departed: Vec<Member>,
}

impl StagedRekey {
    /// The epoch this rekey leaves.
    pub fn from_epoch(&self) -> Epoch {
        self.base.epoch
    }

    /// The new epoch.
    pub fn epoch(&self) -> Epoch {
        self.keys.group_info().epoch
    }

    /// The signed group info of the new epoch (for the bridge and the certificate list).
    pub fn signed_info(&self) -> &SignedGroupInfo {
        &self.signed
    }

    /// The notices to publish, d_P's first.
    pub fn notices(&self) -> &[OutgoingNotice] {
        &self.notices
    }

    /// Members new in this epoch (first joins and new certificates).
    pub fn joined(&self) -> &[Member] {
        &self.joined
    }

    /// Members gone in this epoch (including the old certificate of a renewed member); their
    /// retained individual notices can be cleared.
    pub fn departed(&self) -> &[Member] {
        &self.departed
    }

    /// The record of the new epoch ([`GroupState::to_record`]), to write atomically with the
    /// members' shares before committing.
    pub fn state_record(&self) -> Vec<u8> {
        state_record(&self.signed, self.rekeyed_at_ms)
    }
}

/// The CA's state of one group: epoch, privacy, joined members with their shares, and the keys
/// and signed info of the current epoch.
///
/// An epoch change costs O(k log n) for k changed members plus one streaming pass over the
/// sorted member IDs and `members_digest` entries (both fixed by PROTOCOL.md §4); the membership
/// is never copied.
#[derive(Clone, Debug)]
pub struct GroupState {
    keys: GroupKeys,
    signed: SignedGroupInfo,
    roster: Roster,
    rekeyed_at_ms: u64,
}

impl GroupState {
    /// A new group without members at `epoch`. A group re-created under a former name must start
    /// after every epoch it used before, or its keys would repeat.
    ///
    /// # Errors
    /// [`RekeyError::Group`] or [`RekeyError::Curve`] with probability 2⁻²⁵⁶.
    pub fn create(
        ca: &KeyPair,
        group: GroupId,
        privacy: Privacy,
        epoch: Epoch,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Self, RekeyError> {
        let roster = Roster::default();
        let keys = roster.derive_keys(&roster.diff([]), ca, &group, epoch, privacy)?;
        let signed = SignedGroupInfo::sign(ca, keys.group_info().clone(), rng)?;
        Ok(GroupState {
            keys,
            signed,
            roster,
            rekeyed_at_ms: now_ms,
        })
    }

    /// The group.
    pub fn group(&self) -> &GroupId {
        &self.keys.group_info().group
    }

    /// The current epoch.
    pub fn epoch(&self) -> Epoch {
        self.keys.group_info().epoch
    }

    /// The privacy mode.
    pub fn privacy(&self) -> Privacy {
        self.keys.group_info().privacy
    }

    /// When the current epoch began (`now_ms` of its staging), for the periodic timer.
    pub fn rekeyed_at_ms(&self) -> u64 {
        self.rekeyed_at_ms
    }

    /// The current keys d_P, d_S and their secrets.
    pub fn keys(&self) -> &GroupKeys {
        &self.keys
    }

    /// The current signed group info.
    pub fn signed_info(&self) -> &SignedGroupInfo {
        &self.signed
    }

    /// The joined members, ordered by (role, ID).
    pub fn members(&self) -> impl Iterator<Item = &JoinedMember> {
        self.roster.members()
    }

    /// The joined member `id` in `role`.
    pub fn member(&self, id: &DeviceId, role: Role) -> Option<&JoinedMember> {
        self.roster.get(id, role)
    }

    /// The SUBACK delivery of the current key to a joined member.
    ///
    /// # Errors
    /// [`RekeyError::NotAMember`] unless `member` is joined with exactly these public points.
    pub fn delivery(
        &self,
        member: &Member,
        rng: &mut impl CryptoRngCore,
    ) -> Result<GroupKeyDelivery, RekeyError> {
        match self.member(&member.id, member.role) {
            Some(m) if m.member() == member => Ok(GroupKeyDelivery::seal(
                &self.signed,
                &self.keys,
                member,
                rng,
            )?),
            _ => Err(RekeyError::NotAMember),
        }
    }

    /// Stages a member's join.
    ///
    /// # Errors
    /// As [`GroupState::stage`].
    pub fn stage_join(
        &self,
        ca: &KeyPair,
        joined: JoinedMember,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Plan, RekeyError> {
        self.stage(ca, [Change::Join(joined)], now_ms, rng)
    }

    /// Stages a member's leave of one role.
    ///
    /// # Errors
    /// As [`GroupState::stage`].
    pub fn stage_leave(
        &self,
        ca: &KeyPair,
        id: DeviceId,
        role: Role,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Plan, RekeyError> {
        self.stage(ca, [Change::Leave { id, role }], now_ms, rng)
    }

    /// Stages the periodic rekey: every key changes.
    ///
    /// # Errors
    /// As [`GroupState::stage`].
    pub fn stage_periodic(
        &self,
        ca: &KeyPair,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Plan, RekeyError> {
        self.stage(ca, [Change::Periodic], now_ms, rng)
    }

    /// Plans one epoch for all `changes`, applied in order to the membership; what counts is the
    /// net difference (a join then a leave of a newcomer is nothing). Leaving a non-member is a
    /// no-op. Returns [`Plan::Unchanged`] if the membership is the same and no periodic rekey was
    /// asked for.
    ///
    /// # Errors
    /// [`RekeyError::EpochExhausted`] at `u32::MAX`; [`RekeyError::Group`] or
    /// [`RekeyError::Curve`] with probability 2⁻²⁵⁶.
    pub fn stage(
        &self,
        ca: &KeyPair,
        changes: impl IntoIterator<Item = Change>,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Plan, RekeyError> {
        let mut settings = Vec::new();
        let mut periodic = false;
        for change in changes {
            match change {
                Change::Join(j) => {
                    settings.push(((j.member().role, j.member().id.clone()), Some(j)));
                }
                Change::Leave { id, role } => settings.push(((role, id), None)),
                Change::Remove(id) => {
                    for role in [Role::Publisher, Role::Subscriber] {
                        settings.push(((role, id.clone()), None));
                    }
                }
                Change::Periodic => periodic = true,
            }
        }
        let diff = self.roster.diff(settings);
        if diff.is_empty() && !periodic {
            return Ok(Plan::Unchanged);
        }
        let epoch = self.epoch().next().ok_or(RekeyError::EpochExhausted)?;
        let keys = self
            .roster
            .derive_keys(&diff, ca, self.group(), epoch, self.privacy())?;
        let signed = SignedGroupInfo::sign(ca, keys.group_info().clone(), rng)?;
        let mut notices = Vec::new();
        for kind in [GroupKeyKind::P, GroupKeyKind::S] {
            self.plan_key(kind, &keys, &signed, &diff, &mut notices, rng)?;
        }
        let departed = self
            .roster
            .departing(&diff)
            .map(|m| m.member().clone())
            .collect();
        let joined = diff.joined().map(|m| m.member().clone()).collect();
        Ok(Plan::Rekey(Box::new(StagedRekey {
            base: self.keys.group_info().clone(),
            keys,
            signed,
            diff,
            rekeyed_at_ms: now_ms,
            notices,
            joined,
            departed,
        })))
    }

    /// The delivery rule for the key `kind` (PROTOCOL.md §5, §9.4).
    fn plan_key(
        &self,
        kind: GroupKeyKind,
        keys: &GroupKeys,
        signed: &SignedGroupInfo,
        diff: &RosterDiff,
        out: &mut Vec<OutgoingNotice>,
        rng: &mut impl CryptoRngCore,
    ) -> Result<(), RekeyError> {
        let role = kind.holder_role();
        let group = self.group();
        let new = keys.key(kind).secret();
        let individual = |m: &Member, rng: &mut _| OutgoingNotice {
            recipient: Some(m.id.clone()),
            role,
            topic: device_key_topic(group, role, &m.id),
            notice: RekeyNotice::individual(signed, role, &m.q, new, rng),
        };
        if self.roster.departing(diff).any(|m| m.member().role == role) {
            for m in self.roster.members_after(diff) {
                if m.member().role == role {
                    out.push(individual(m.member(), rng));
                }
            }
            return Ok(());
        }
        let fresh: Vec<&Member> = diff
            .joined()
            .map(JoinedMember::member)
            .filter(|m| m.role == role)
            .collect();
        // No holder departed, so every holder before the change is still one.
        if self.roster.count(role) > 0 {
            let old = self.keys.key(kind).secret();
            out.push(OutgoingNotice {
                recipient: None,
                role,
                topic: key_topic(group, role),
                notice: RekeyNotice::broadcast(signed, role, old, new)?,
            });
        }
        for m in fresh {
            out.push(individual(m, rng));
        }
        Ok(())
    }

    /// Makes a staged rekey current, after the caller persisted it.
    ///
    /// # Errors
    /// [`RekeyError::Conflict`] if it was staged from another state (another rekey was committed
    /// in between); the state is then unchanged.
    pub fn commit(&mut self, staged: StagedRekey) -> Result<(), RekeyError> {
        if &staged.base != self.keys.group_info() {
            return Err(RekeyError::Conflict);
        }
        self.roster.apply(staged.diff);
        self.keys = staged.keys;
        self.signed = staged.signed;
        self.rekeyed_at_ms = staged.rekeyed_at_ms;
        Ok(())
    }

    /// The storage record of the current epoch: `u8 1 || ginfo || sig || u64 rekeyed_at_ms`.
    /// It holds no secret; the members' shares are stored apart, one row per member, and come
    /// back through [`GroupState::from_record`].
    pub fn to_record(&self) -> Vec<u8> {
        state_record(&self.signed, self.rekeyed_at_ms)
    }

    /// Restores a state from [`GroupState::to_record`] and the joined members: checks the CA's
    /// signature and that the keys re-derived from the members equal the signed info.
    ///
    /// # Errors
    /// [`RekeyError::Decode`], [`RekeyError::Verify`], [`RekeyError::Group`] for a repeated
    /// member, [`RekeyError::RecordMismatch`] if the members do not give the signed keys.
    pub fn from_record(
        ca: &KeyPair,
        bytes: &[u8],
        members: impl IntoIterator<Item = JoinedMember>,
    ) -> Result<Self, RekeyError> {
        let mut r = Reader::new(bytes);
        r.version("group record")?;
        let signed = SignedGroupInfo::read(&mut r)?;
        let rekeyed_at_ms = r.u64("group record time")?;
        r.finish("group record")?;
        let info = signed.verify(&ca.verifying_key())?;
        let roster = Roster::from_members(members)?;
        let keys =
            roster.derive_keys(&roster.diff([]), ca, &info.group, info.epoch, info.privacy)?;
        if keys.group_info() != info {
            return Err(RekeyError::RecordMismatch);
        }
        Ok(GroupState {
            keys,
            signed,
            roster,
            rekeyed_at_ms,
        })
    }
}

fn state_record(signed: &SignedGroupInfo, rekeyed_at_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    put_u8(&mut out, 1);
    signed.encode(&mut out);
    put_u64(&mut out, rekeyed_at_ms);
    out
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use k256::Scalar;
    use proptest::prelude::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    use super::*;
    use crate::group::testing::TestDevice;

    const GROUP: &str = "plant/line-3/temp";

    pub(super) fn rekey(plan: Plan) -> StagedRekey {
        match plan {
            Plan::Rekey(s) => *s,
            Plan::Unchanged => panic!("expected a rekey"),
        }
    }

    struct SimDevice {
        t: TestDevice,
        ring: Option<Keyring>,
        /// Every group key this device ever held.
        held: Vec<KeyPair>,
    }

    /// A CA and devices that apply every notice meant for them after each epoch, checking that
    /// members end with the CA's key and that nobody else can open anything.
    struct Sim {
        ca: KeyPair,
        rng: ChaCha20Rng,
        state: GroupState,
        now: u64,
        devs: BTreeMap<(Role, String), SimDevice>,
        /// Devices whose certificate was replaced: the old key material.
        ghosts: Vec<SimDevice>,
    }

    impl Sim {
        fn new(seed: u64) -> Self {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let ca = KeyPair::random(&mut rng);
            let group = GroupId::new(GROUP).unwrap();
            let state =
                GroupState::create(&ca, group, Privacy::Standard, Epoch(0), 0, &mut rng).unwrap();
            Sim {
                ca,
                rng,
                state,
                now: 0,
                devs: BTreeMap::new(),
                ghosts: Vec::new(),
            }
        }

        fn device(&mut self, name: &str, role: Role) -> &SimDevice {
            let rng = &mut self.rng;
            self.devs
                .entry((role, name.to_owned()))
                .or_insert_with(|| SimDevice {
                    t: TestDevice::new(name, role, rng),
                    ring: None,
                    held: Vec::new(),
                })
        }

        fn join(&mut self, name: &str, role: Role) -> Change {
            Change::Join(self.device(name, role).t.joined.clone())
        }

        /// A new certificate for the device: new d_i and g_i.
        fn renew(&mut self, name: &str, role: Role) -> Change {
            let fresh = SimDevice {
                t: TestDevice::new(name, role, &mut self.rng),
                ring: None,
                held: Vec::new(),
            };
            let joined = fresh.t.joined.clone();
            if let Some(old) = self.devs.insert((role, name.to_owned()), fresh) {
                self.ghosts.push(old);
            }
            Change::Join(joined)
        }

        fn q_ca(&self) -> crate::schnorr::VerifyingKey {
            self.ca.verifying_key()
        }

        /// Stages, checks, commits and delivers; `None` if nothing changed.
        fn run(&mut self, changes: Vec<Change>) -> Option<(Vec<OutgoingNotice>, Vec<Member>)> {
            self.now += 1_000;
            let before = self.state.epoch();
            let plan = self
                .state
                .stage(&self.ca, changes, self.now, &mut self.rng)
                .unwrap();
            let Plan::Rekey(staged) = plan else {
                assert_eq!(self.state.epoch(), before);
                return None;
            };
            let staged = *staged;
            assert_eq!(staged.from_epoch(), before);
            assert_eq!(staged.epoch(), before.next().unwrap());
            let notices = staged.notices().to_vec();
            let departed = staged.departed().to_vec();
            let group = self.state.group().clone();
            for n in &notices {
                match &n.recipient {
                    None => {
                        // §9.4: never under a key that a departing member held.
                        assert!(departed.iter().all(|m| m.role != n.role));
                        assert_eq!(n.notice.kind(), NoticeKind::Broadcast);
                        assert_eq!(n.topic, key_topic(&group, n.role));
                    }
                    Some(id) => {
                        assert_eq!(n.notice.kind(), NoticeKind::Individual);
                        assert_eq!(n.topic, device_key_topic(&group, n.role, id));
                    }
                }
                assert_eq!(RekeyNotice::from_bytes(&n.payload()).unwrap(), n.notice);
            }
            let record = staged.state_record();
            self.state.commit(staged).unwrap();
            let restored =
                GroupState::from_record(&self.ca, &record, self.state.members().cloned()).unwrap();
            assert_eq!(restored.to_record(), record);
            assert_eq!(
                restored.keys().key(GroupKeyKind::S),
                self.state.keys().key(GroupKeyKind::S)
            );
            let epoch = self.state.epoch();
            let q_ca = self.ca.verifying_key();
            for dev in self.devs.values_mut().chain(self.ghosts.iter_mut()) {
                let m = dev.t.member().clone();
                let is_member = self.state.member(&m.id, m.role) == Some(&dev.t.joined);
                if is_member {
                    // It reads its key topic (broadcasts) and its own topic, in the worst
                    // order: broadcasts first. A new holder cannot use the broadcast.
                    let mut mine: Vec<&OutgoingNotice> = notices
                        .iter()
                        .filter(|n| {
                            n.role == m.role && n.recipient.as_ref().is_none_or(|r| *r == m.id)
                        })
                        .collect();
                    mine.sort_by_key(|n| n.recipient.is_some());
                    let mut adopted = 0;
                    for n in mine {
                        let result = match &mut dev.ring {
                            Some(ring) => ring.apply_notice(&dev.t.key, &n.notice, self.now),
                            None => Keyring::from_notice(
                                q_ca,
                                &group,
                                m.role,
                                &dev.t.key,
                                &n.notice,
                                DEFAULT_GRACE_MS,
                            )
                            .map(|ring| {
                                dev.ring = Some(ring);
                                epoch
                            }),
                        };
                        match result {
                            Ok(e) => {
                                assert_eq!(e, epoch);
                                adopted += 1;
                            }
                            Err(e) => assert_eq!(e, RekeyError::EpochGap, "{m:?}"),
                        }
                    }
                    assert_eq!(adopted, 1, "{m:?} adopts the new key once");
                    let ring = dev.ring.as_ref().unwrap();
                    assert_eq!(ring.epoch(), epoch);
                    assert_eq!(ring.current_key(), self.state.keys().held_by(m.role));
                    dev.held.push(ring.current_key().clone());
                } else {
                    // Not a member (never joined, departed, or an old certificate): nothing opens.
                    for n in &notices {
                        if let Some(ring) = &dev.ring {
                            let mut ring = ring.clone();
                            assert!(ring.apply_notice(&dev.t.key, &n.notice, self.now).is_err());
                        }
                        for role in [Role::Publisher, Role::Subscriber] {
                            assert!(
                                Keyring::from_notice(q_ca, &group, role, &dev.t.key, &n.notice, 1)
                                    .is_err()
                            );
                        }
                        assert!(n.notice.open_individual(&dev.t.key).is_err());
                        for k in &dev.held {
                            assert!(n.notice.open_broadcast(k.secret()).is_err());
                        }
                    }
                    assert!(dev.ring.as_ref().is_none_or(|r| r.epoch() < epoch));
                }
            }
            Some((notices, departed))
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Join(usize, Role),
        Leave(usize, Role),
        Renew(usize, Role),
        Remove(usize),
        Periodic,
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        let role = prop_oneof![Just(Role::Publisher), Just(Role::Subscriber)];
        prop_oneof![
            4 => (0usize..4, role.clone()).prop_map(|(i, r)| Op::Join(i, r)),
            3 => (0usize..4, role.clone()).prop_map(|(i, r)| Op::Leave(i, r)),
            1 => (0usize..4, role).prop_map(|(i, r)| Op::Renew(i, r)),
            1 => (0usize..4).prop_map(Op::Remove),
            1 => Just(Op::Periodic),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// §9.4 and key-level secrecy over random change sets: members always end with the CA's
        /// key; no broadcast is under a key a departing member held; no non-member (departed,
        /// replaced certificate, not yet joined) opens any notice.
        #[test]
        fn planner_delivers_to_members_only(
            seed in any::<u64>(),
            batches in prop::collection::vec(prop::collection::vec(arb_op(), 0..6), 1..5),
        ) {
            let mut sim = Sim::new(seed);
            for batch in batches {
                let changes: Vec<Change> = batch
                    .into_iter()
                    .map(|op| match op {
                        Op::Join(i, r) => sim.join(&format!("d{i}"), r),
                        Op::Leave(i, role) => Change::Leave {
                            id: DeviceId::new(&format!("d{i}")).unwrap(),
                            role,
                        },
                        Op::Renew(i, r) => sim.renew(&format!("d{i}"), r),
                        Op::Remove(i) => Change::Remove(DeviceId::new(&format!("d{i}")).unwrap()),
                        Op::Periodic => Change::Periodic,
                    })
                    .collect();
                sim.run(changes);
            }
        }
    }

    #[test]
    fn many_changes_coalesce_into_one_epoch() {
        let mut sim = Sim::new(1);
        let changes = vec![
            sim.join("p1", Role::Publisher),
            sim.join("p2", Role::Publisher),
            sim.join("s1", Role::Subscriber),
            sim.join("s2", Role::Subscriber),
            sim.join("s3", Role::Subscriber),
        ];
        let (notices, _) = sim.run(changes).unwrap();
        assert_eq!(sim.state.epoch(), Epoch(1));
        // Every holder is new: five individual notices, no broadcast.
        assert_eq!(notices.len(), 5);
        let changes = vec![
            Change::Leave {
                id: DeviceId::new("s3").unwrap(),
                role: Role::Subscriber,
            },
            sim.join("s4", Role::Subscriber),
            sim.join("p3", Role::Publisher),
            // Joins and leaves within the batch: no trace.
            sim.join("s5", Role::Subscriber),
            Change::Leave {
                id: DeviceId::new("s5").unwrap(),
                role: Role::Subscriber,
            },
        ];
        let (notices, departed) = sim.run(changes).unwrap();
        assert_eq!(sim.state.epoch(), Epoch(2));
        assert_eq!(departed.len(), 1);
        // d_P: a subscriber departed, so s1, s2, s4 individually. d_S: nobody departed among
        // the publishers, so a broadcast to p1, p2 and ECIES to p3.
        let count = |role: Role, broadcast: bool| {
            notices
                .iter()
                .filter(|n| n.role == role && n.recipient.is_none() == broadcast)
                .count()
        };
        assert_eq!(count(Role::Subscriber, false), 3);
        assert_eq!(count(Role::Subscriber, true), 0);
        assert_eq!(count(Role::Publisher, true), 1);
        assert_eq!(count(Role::Publisher, false), 1);
        assert_eq!(sim.state.signed_info().info_unverified().n_sub, 3);
        assert_eq!(sim.state.signed_info().info_unverified().n_pub, 3);
    }

    #[test]
    fn same_share_join_returns_current_keys_without_rekey() {
        let mut sim = Sim::new(2);
        let join = sim.join("s1", Role::Subscriber);
        let p1 = sim.join("p1", Role::Publisher);
        sim.run(vec![join.clone(), p1]);
        assert_eq!(sim.state.epoch(), Epoch(1));
        let plan = sim
            .state
            .stage(&sim.ca, vec![join.clone(), join], 5, &mut sim.rng)
            .unwrap();
        assert!(matches!(plan, Plan::Unchanged));
        // Leaving a non-member is nothing too.
        let plan = sim
            .state
            .stage_leave(
                &sim.ca,
                DeviceId::new("nobody").unwrap(),
                Role::Publisher,
                5,
                &mut sim.rng,
            )
            .unwrap();
        assert!(matches!(plan, Plan::Unchanged));
        // The joiner gets the current key by SUBACK.
        let dev = &sim.devs[&(Role::Subscriber, "s1".to_owned())];
        let delivery = sim.state.delivery(dev.t.member(), &mut sim.rng).unwrap();
        let ring = Keyring::from_delivery(
            sim.q_ca(),
            sim.state.group(),
            Role::Subscriber,
            &dev.t.key,
            &delivery,
            DEFAULT_GRACE_MS,
        )
        .unwrap();
        assert_eq!(ring.epoch(), Epoch(1));
        assert_eq!(ring.current_key(), sim.state.keys().key(GroupKeyKind::P));
        // Not for non-members or for another certificate of a member.
        let stranger = TestDevice::new("s9", Role::Subscriber, &mut sim.rng);
        assert_eq!(
            sim.state.delivery(stranger.member(), &mut sim.rng).err(),
            Some(RekeyError::NotAMember)
        );
        let mut other_cert = dev.t.member().clone();
        other_cert.g = stranger.member().g;
        assert_eq!(
            sim.state.delivery(&other_cert, &mut sim.rng).err(),
            Some(RekeyError::NotAMember)
        );
    }

    #[test]
    fn new_certificate_is_a_leave_plus_a_join() {
        let mut sim = Sim::new(3);
        let changes = vec![
            sim.join("s1", Role::Subscriber),
            sim.join("s2", Role::Subscriber),
            sim.join("p1", Role::Publisher),
        ];
        sim.run(changes);
        let renew = sim.renew("s1", Role::Subscriber);
        let (notices, departed) = sim.run(vec![renew]).unwrap();
        assert_eq!(departed.len(), 1);
        assert_eq!(departed[0].id.as_str(), "s1");
        // The old certificate held d_P: d_P goes individually (s1's new key, s2); d_S broadcast.
        let subs: Vec<_> = notices
            .iter()
            .filter(|n| n.role == Role::Subscriber)
            .collect();
        assert_eq!(subs.len(), 2);
        assert!(subs.iter().all(|n| n.recipient.is_some()));
        assert_eq!(sim.ghosts.len(), 1);
    }

    #[test]
    fn periodic_rekey_changes_every_key() {
        let mut sim = Sim::new(4);
        let changes = vec![
            sim.join("s1", Role::Subscriber),
            sim.join("p1", Role::Publisher),
        ];
        sim.run(changes);
        let old = sim.state.keys().clone();
        let (notices, departed) = sim.run(vec![Change::Periodic]).unwrap();
        assert!(departed.is_empty());
        let new = sim.state.keys();
        for kind in [GroupKeyKind::P, GroupKeyKind::S] {
            assert_ne!(old.key(kind), new.key(kind));
            assert_ne!(old.cag_secret(kind), new.cag_secret(kind));
        }
        // No departure: one broadcast per role under the previous key.
        assert_eq!(notices.len(), 2);
        assert!(notices.iter().all(|n| n.recipient.is_none()));
        assert_eq!(sim.state.rekeyed_at_ms(), sim.now);
        // The periodic timer on an empty group still works and sends nothing.
        let mut empty = Sim::new(5);
        let (notices, _) = empty.run(vec![Change::Periodic]).unwrap();
        assert!(notices.is_empty());
        assert_eq!(empty.state.epoch(), Epoch(1));
    }

    #[test]
    fn groups_with_one_side_empty_work() {
        let mut sim = Sim::new(6);
        let changes = vec![
            sim.join("p1", Role::Publisher),
            sim.join("p2", Role::Publisher),
        ];
        let (notices, _) = sim.run(changes).unwrap();
        // Nobody holds d_P yet: only the publishers' d_S.
        assert!(notices.iter().all(|n| n.role == Role::Publisher));
        assert_eq!(
            sim.state.keys().key(GroupKeyKind::S).secret(),
            sim.state.keys().cag_secret(GroupKeyKind::S)
        );
        let join = sim.join("s1", Role::Subscriber);
        sim.run(vec![join]);
        let leave = |id: &str, role| Change::Leave {
            id: DeviceId::new(id).unwrap(),
            role,
        };
        sim.run(vec![
            leave("p1", Role::Publisher),
            leave("p2", Role::Publisher),
        ]);
        assert_eq!(sim.state.signed_info().info_unverified().n_pub, 0);
        sim.run(vec![Change::Periodic]);
        let members: Vec<Member> = sim.state.members().map(|m| m.member().clone()).collect();
        assert!(
            sim.state
                .signed_info()
                .info_unverified()
                .check_members(&members)
                .is_ok()
        );
    }

    /// §9.5: a recurring membership set never brings back a group secret.
    #[test]
    fn group_secrets_never_repeat_across_epochs() {
        let mut sim = Sim::new(7);
        // Every secret value, with the epoch it belongs to. Within an epoch d_P = d_CAg,P when
        // there are no publishers, so values are compared across epochs only.
        let mut seen: HashMap<[u8; 32], Epoch> = HashMap::new();
        let mut digests = Vec::new();
        let mut record = |state: &GroupState| {
            let keys = state.keys();
            for kind in [GroupKeyKind::P, GroupKeyKind::S] {
                for secret in [keys.key(kind).secret(), keys.cag_secret(kind)] {
                    let previous = seen.insert(*secret.to_bytes(), state.epoch());
                    assert!(previous.is_none_or(|e| e == state.epoch()));
                }
            }
            digests.push(state.signed_info().info_unverified().members_digest);
        };
        record(&sim.state);
        let a = sim.join("a", Role::Publisher);
        let b = sim.join("b", Role::Subscriber);
        let leave_a = Change::Leave {
            id: DeviceId::new("a").unwrap(),
            role: Role::Publisher,
        };
        let leave_b = Change::Leave {
            id: DeviceId::new("b").unwrap(),
            role: Role::Subscriber,
        };
        let script = vec![
            vec![a.clone(), b.clone()],
            vec![leave_a.clone()],
            vec![a.clone()],
            vec![leave_a.clone(), leave_b.clone()],
            vec![a.clone(), b.clone()],
            vec![Change::Periodic],
            vec![Change::Periodic],
            vec![leave_a, leave_b],
            vec![Change::Periodic],
        ];
        for changes in script {
            sim.run(changes).unwrap();
            record(&sim.state);
        }
        // The set {a, b} recurred (epochs 1, 3, 5, 6, 7) and the empty set too (0, 4, 8, 9).
        assert_eq!(digests[1], digests[3]);
        assert_eq!(digests[1], digests[7]);
        assert_eq!(digests[0], digests[4]);
        assert_eq!(digests[0], digests[9]);
        assert!(seen.len() >= 2 * digests.len());
    }

    /// The paper's §4.2.2 derivation: ONE CA secret d_CAg (here also bound to the membership)
    /// shifts both group keys.
    fn paper_keys(ca: &KeyPair, members: &[&JoinedMember]) -> (Scalar, Scalar) {
        let mut ids = Vec::new();
        for m in members {
            ids.push(m.member().role.to_u8());
            m.member().id.encode(&mut ids);
        }
        let d_cag =
            crate::curve::hash_to_scalar("paper/d_CAg", &[&ca.secret().to_bytes()[..], &ids])
                .unwrap();
        let (mut d_p, mut d_s) = (d_cag, d_cag);
        for m in members {
            match m.member().role {
                Role::Publisher => d_p += m.share().as_scalar(),
                Role::Subscriber => d_s += m.share().as_scalar(),
            }
        }
        (d_p, d_s)
    }

    /// §9.8: a publisher (who sees d_S and d_S*) and a departed subscriber (who knows its share
    /// and the old d_P) compute the new d_P under the paper's single d_CAg, not under v1's.
    #[test]
    fn publisher_and_departed_subscriber_cannot_combine_keys() {
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        let ca = KeyPair::random(&mut rng);
        let group = GroupId::new(GROUP).unwrap();
        let p = TestDevice::new("p", Role::Publisher, &mut rng);
        let s1 = TestDevice::new("s1", Role::Subscriber, &mut rng);
        let s2 = TestDevice::new("s2", Role::Subscriber, &mut rng);
        let before = [&p.joined, &s1.joined, &s2.joined];
        let after = [&p.joined, &s2.joined];
        let v = s1.joined.share().as_scalar();

        // Paper: the attack works. Leave (before → after): the publisher's d_S* − d_S and the
        // departed subscriber's v and old d_P give the new d_P.
        let (d_p, d_s) = paper_keys(&ca, &before);
        let (d_p2, d_s2) = paper_keys(&ca, &after);
        assert_eq!(d_p + (d_s2 - d_s) + v, d_p2, "leave: new d_P recovered");
        // Join (after → before): the joiner knows v and the new d_P (`d_p`); with the
        // publisher's old and new d_S it recovers the old d_P (`d_p2`).
        assert_eq!(d_p - (d_s - d_s2) + v, d_p2, "join: old d_P recovered");

        // v1: the same computation misses, both ways.
        let mut state =
            GroupState::create(&ca, group, Privacy::Standard, Epoch(0), 0, &mut rng).unwrap();
        let staged = rekey(
            state
                .stage(
                    &ca,
                    before.iter().map(|m| Change::Join((*m).clone())),
                    1,
                    &mut rng,
                )
                .unwrap(),
        );
        state.commit(staged).unwrap();
        let k1 = state.keys().clone();
        let staged = rekey(
            state
                .stage_leave(&ca, s1.member().id.clone(), Role::Subscriber, 2, &mut rng)
                .unwrap(),
        );
        state.commit(staged).unwrap();
        let k2 = state.keys().clone();
        let scalar = |k: &GroupKeys, kind| *k.key(kind).secret().as_scalar();
        let (d_p, d_s) = (scalar(&k1, GroupKeyKind::P), scalar(&k1, GroupKeyKind::S));
        let (d_p2, d_s2) = (scalar(&k2, GroupKeyKind::P), scalar(&k2, GroupKeyKind::S));
        assert_ne!(
            d_p + (d_s2 - d_s) + v,
            d_p2,
            "leave: the attack fails on v1"
        );
        // Join direction: s1 joins back (epoch 3) knowing v and the new d_P; with the
        // publisher's d_S (epoch 2) and d_S* (epoch 3) it does not get epoch 2's d_P.
        let staged = rekey(
            state
                .stage_join(&ca, s1.joined.clone(), 3, &mut rng)
                .unwrap(),
        );
        state.commit(staged).unwrap();
        let k3 = state.keys().clone();
        let (d_p3, d_s3) = (scalar(&k3, GroupKeyKind::P), scalar(&k3, GroupKeyKind::S));
        assert_ne!(
            d_p3 - (d_s3 - d_s2) + v,
            d_p2,
            "join: the attack fails on v1"
        );
        // Nor does the naive "old key minus my share" guess give the departed subscriber d_P.
        assert_ne!(d_p - v, d_p2);
    }

    /// After a subscriber leaves it can open neither the next broadcast nor any individual
    /// notice, and the joiner of a later epoch opens nothing from before its join.
    #[test]
    fn departed_and_future_members_learn_nothing() {
        let mut sim = Sim::new(9);
        let changes = vec![
            sim.join("p1", Role::Publisher),
            sim.join("p2", Role::Publisher),
            sim.join("s1", Role::Subscriber),
            sim.join("s2", Role::Subscriber),
        ];
        sim.run(changes);
        let periodic = sim.run(vec![Change::Periodic]).unwrap().0;
        let leaver_key = sim.devs[&(Role::Subscriber, "s1".to_owned())].t.key.clone();
        let leaver_held = sim.devs[&(Role::Subscriber, "s1".to_owned())].held.clone();
        let (notices, _) = sim
            .run(vec![Change::Leave {
                id: DeviceId::new("s1").unwrap(),
                role: Role::Subscriber,
            }])
            .unwrap();
        // d_S still goes by broadcast (no publisher left), under a key s1 never held.
        let broadcast = notices.iter().find(|n| n.recipient.is_none()).unwrap();
        assert_eq!(broadcast.role, Role::Publisher);
        for n in &notices {
            for k in &leaver_held {
                assert!(n.notice.open_broadcast(k.secret()).is_err());
            }
            assert!(n.notice.open_individual(&leaver_key).is_err());
        }
        // A device joining later opens nothing from before its join.
        let join = sim.join("s3", Role::Subscriber);
        let newcomer = sim.devs[&(Role::Subscriber, "s3".to_owned())].t.key.clone();
        sim.run(vec![join]);
        for n in periodic.iter().chain(&notices) {
            assert!(n.notice.open_individual(&newcomer).is_err());
        }
        let new_d_p = sim.state.keys().key(GroupKeyKind::P).clone();
        for n in periodic.iter().chain(&notices) {
            // Its new key does not open earlier broadcasts either.
            assert!(n.notice.open_broadcast(new_d_p.secret()).is_err());
        }
    }

    #[test]
    fn commit_refuses_a_stale_plan() {
        let mut sim = Sim::new(10);
        let j1 = sim.join("s1", Role::Subscriber);
        let j2 = sim.join("s2", Role::Subscriber);
        let a = rekey(sim.state.stage(&sim.ca, [j1], 1, &mut sim.rng).unwrap());
        let b = rekey(sim.state.stage(&sim.ca, [j2], 1, &mut sim.rng).unwrap());
        sim.state.commit(a).unwrap();
        let epoch = sim.state.epoch();
        assert_eq!(sim.state.commit(b).err(), Some(RekeyError::Conflict));
        assert_eq!(sim.state.epoch(), epoch);
    }

    #[test]
    fn epoch_counter_cannot_wrap() {
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        let ca = KeyPair::random(&mut rng);
        let state = GroupState::create(
            &ca,
            GroupId::new(GROUP).unwrap(),
            Privacy::Anonymous,
            Epoch(u32::MAX),
            0,
            &mut rng,
        )
        .unwrap();
        assert_eq!(
            state.stage_periodic(&ca, 1, &mut rng).err(),
            Some(RekeyError::EpochExhausted)
        );
    }

    #[test]
    fn records_round_trip_and_reject_tampering() {
        let mut sim = Sim::new(12);
        let changes = vec![
            sim.join("s1", Role::Subscriber),
            sim.join("p1", Role::Publisher),
        ];
        sim.run(changes);
        let record = sim.state.to_record();
        let members: Vec<JoinedMember> = sim.state.members().cloned().collect();
        let restore = |ca: &KeyPair, record: &[u8], members: &[JoinedMember]| {
            GroupState::from_record(ca, record, members.iter().cloned())
        };
        let back = restore(&sim.ca, &record, &members).unwrap();
        assert_eq!(back.epoch(), sim.state.epoch());
        assert_eq!(back.privacy(), Privacy::Standard);
        assert_eq!(back.rekeyed_at_ms(), sim.now);
        assert_eq!(back.signed_info(), sim.state.signed_info());
        assert_eq!(
            back.keys().key(GroupKeyKind::P),
            sim.state.keys().key(GroupKeyKind::P)
        );
        let other_ca = KeyPair::random(&mut sim.rng);
        assert!(restore(&other_ca, &record, &members).is_err());
        let time_at = 1 + sim.state.signed_info().to_bytes().len();
        for i in 0..record.len() {
            if (time_at..time_at + 8).contains(&i) {
                continue; // the timestamp is not authenticated: it only drives the timer
            }
            let mut bad = record.clone();
            bad[i] ^= 0x01;
            assert!(
                restore(&sim.ca, &bad, &members).is_err(),
                "flipped byte {i} restored"
            );
        }
        assert!(restore(&sim.ca, &record[..record.len() - 1], &members).is_err());
        // The members must be exactly those the signed info was derived from.
        assert_eq!(
            restore(&sim.ca, &record, &members[..1]).err(),
            Some(RekeyError::RecordMismatch)
        );
        let Change::Join(stranger) = sim.join("s2", Role::Subscriber) else {
            unreachable!()
        };
        let mut extra = members.clone();
        extra.push(stranger);
        assert_eq!(
            restore(&sim.ca, &record, &extra).err(),
            Some(RekeyError::RecordMismatch)
        );
        let Change::Join(renewed) = sim.renew("s1", Role::Subscriber) else {
            unreachable!()
        };
        let swapped: Vec<JoinedMember> = members
            .iter()
            .map(|m| {
                if m.member().id == renewed.member().id {
                    renewed.clone()
                } else {
                    m.clone()
                }
            })
            .collect();
        assert_eq!(
            restore(&sim.ca, &record, &swapped).err(),
            Some(RekeyError::RecordMismatch)
        );
        let mut twice = members.clone();
        twice.push(members[0].clone());
        assert!(matches!(
            restore(&sim.ca, &record, &twice),
            Err(RekeyError::Group(GroupError::DuplicateMember(_)))
        ));
    }

    #[test]
    fn topics_follow_the_layout() {
        let g = GroupId::new("a/b").unwrap();
        let d = DeviceId::new("dev-1").unwrap();
        assert_eq!(key_topic(&g, Role::Publisher), "quva/k/a/b/pub");
        assert_eq!(key_topic(&g, Role::Subscriber), "quva/k/a/b/sub");
        assert_eq!(
            device_key_topic(&g, Role::Subscriber, &d),
            "quva/k/a/b/sub/dev-1"
        );
    }
}
