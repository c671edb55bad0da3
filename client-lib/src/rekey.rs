//! Rekeying: the CA's group state and rekey planner, key delivery, tree notices, and the device's
//! keyring.
//!
//! Implements PROTOCOL.md §5 with the v1.1 key trees of §5.1 (the paper's §4.4 with the fixes of
//! §9.4, §9.5, §9.7 and §9.8).
//!
//! CA side, sans-IO and staged ([`GroupState`]): the daemon's single writer task gathers the
//! changes of a batching window (joins, leaves — a leave, denial, revocation or expiry are all
//! leaves —, new certificates, the periodic timer) and calls [`GroupState::stage`], which
//! coalesces them into one epoch E → E+1 and returns a [`StagedRekey`]: the next state (with
//! [`StagedRekey::state_record`] and the key-tree rows of [`StagedRekey::tree`] to persist) and
//! the notices to publish. After the write is durable, [`GroupState::commit`] makes it current.
//! A join with the share already joined changes nothing ([`Plan::Unchanged`]); the caller answers
//! it, and every joiner once committed, with [`GroupState::delivery`].
//!
//! Delivery (§5.1): each key X ∈ {d_P, d_S} has a key tree whose leaves are its holders (the
//! subscribers hold d_P, the publishers d_S). Every epoch changes both keys, so every epoch
//! sends one kind-3 [`TreeNotice`] per tree that has holders, on [`key_topic`]: O(log n)
//! symmetric wraps that exactly the remaining holders open. Joiners receive X and their path in
//! the ECIES key set of their [`GroupKeyDelivery`].
//!
//! Device side ([`Keyring`]): starts from a delivery, applies tree notices (signature, group,
//! role, epoch order, wraps and X·G against the signed info), and keeps superseded keys for a
//! grace period (default [`DEFAULT_GRACE_MS`]). A device that missed an epoch gets
//! [`tree::TreeError::MissedEpoch`] and joins again.
//!
//! # Usage
//! ```
//! use quva_client::curve::{KeyPair, SecretScalar};
//! use quva_client::group::{JoinedMember, Privacy};
//! use quva_client::ids::{DeviceId, Epoch, GroupId, Role};
//! use quva_client::rekey::{Change, GroupState, Keyring, Plan, DEFAULT_GRACE_MS};
//! use rand_core::OsRng;
//!
//! let mut rng = OsRng;
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
//!     let joined = JoinedMember::from_keys(id, Role::Subscriber, d.secret(), &g).unwrap();
//!     changes.push(Change::Join(joined.clone()));
//!     devices.push((d, joined));
//! }
//! let Plan::Rekey(staged) = state.stage(&ca, changes, 1_000, &mut rng).unwrap() else {
//!     unreachable!()
//! };
//! // ... persist staged.state_record(), the tree rows and the shares atomically, then:
//! state.commit(*staged).unwrap();
//! assert_eq!(state.epoch(), Epoch(1));
//!
//! // Each joiner's SUBACK carries d_P and its key-tree path.
//! let mut rings: Vec<Keyring> = devices.iter().map(|(d, joined)| {
//!     let delivery = state.delivery(joined.member(), &mut rng).unwrap();
//!     Keyring::from_delivery(ca.verifying_key(), &group, Role::Subscriber, d, &delivery,
//!         DEFAULT_GRACE_MS).unwrap()
//! }).collect();
//!
//! // sub-2 leaves: one tree notice of O(log n) wraps that sub-1 opens and sub-2 cannot.
//! let leave = Change::Leave { id: DeviceId::new("sub-2").unwrap(), role: Role::Subscriber };
//! let Plan::Rekey(staged) = state.stage(&ca, [leave], 2_000, &mut rng).unwrap() else {
//!     unreachable!()
//! };
//! let notice = staged.notices()[0].notice.clone();
//! state.commit(*staged).unwrap();
//! assert_eq!(rings[0].apply_tree_notice(&notice, 2_000).unwrap(), Epoch(2));
//! assert_eq!(rings[0].current_key().public(), &state.signed_info().info_unverified().q_p);
//! assert!(rings[1].apply_tree_notice(&notice, 2_000).is_err());
//! ```

use rand_core::CryptoRngCore;

use crate::codec::{Decode, DecodeError, Encode, Reader, put_u8, put_u32, put_u64};
use crate::curve::{CurveError, KeyPair};
use crate::group::{
    GroupError, GroupKeys, JoinedMember, Member, Privacy, Roster, RosterDiff, SignedGroupInfo,
};
use crate::ids::{DeviceId, Epoch, GroupId, GroupKeyKind, Role};
use crate::symmetric::VerifyError;

mod delivery;
mod keyring;
pub mod tree;

pub use delivery::{GroupKeyDelivery, MAX_SEALED_LEN, MIN_SEALED_LEN};
pub use keyring::{DEFAULT_GRACE_MS, Keyring, MAX_PREVIOUS_KEYS};
use tree::{KeyTree, NodeKey, StagedTree, TreeChanges, TreeError, TreeNotice};

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
    /// The delivery's epoch is not after the current one (a replay or an old answer).
    #[error("epoch not after the current one")]
    StaleEpoch,
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
    Tree(TreeError),
}

/// The key topic of `role` in `group`: `quva/k/<group>/<pub|sub>` (tree notices, requests).
pub fn key_topic(group: &GroupId, role: Role) -> String {
    crate::topics::key(group, role)
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

/// One tree notice to publish (QoS 1, retained) on the holders' key topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutgoingNotice {
    /// The holders' role: publishers receive d_S, subscribers d_P.
    pub role: Role,
    /// [`key_topic`] of the role.
    pub topic: String,
    /// The notice.
    pub notice: TreeNotice,
}

impl OutgoingNotice {
    /// The payload to publish.
    pub fn payload(&self) -> Vec<u8> {
        self.notice.to_bytes()
    }
}

/// The two key trees of a group, by holders' role.
#[derive(Clone, Debug)]
struct Trees<T> {
    publishers: T,
    subscribers: T,
}

impl<T> Trees<T> {
    fn get(&self, role: Role) -> &T {
        match role {
            Role::Publisher => &self.publishers,
            Role::Subscriber => &self.subscribers,
        }
    }
}

/// A planned epoch E → E+1: the membership change, the new keys, the key-tree changes and their
/// notices, to persist and then commit.
#[derive(Debug)]
pub struct StagedRekey {
    base: crate::group::GroupInfo,
    keys: GroupKeys,
    signed: SignedGroupInfo,
    diff: RosterDiff,
    rekeyed_at_ms: u64,
    trees: Trees<StagedTree>,
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

    /// The tree notices to publish, d_P's first; none for a tree without holders.
    pub fn notices(&self) -> &[OutgoingNotice] {
        &self.notices
    }

    /// The planned change of the key tree whose leaves hold `role`'s key: the node rows and leaves
    /// to write (O(log n) per joiner or departure).
    pub fn tree(&self, role: Role) -> &StagedTree {
        self.trees.get(role)
    }

    /// The leaf a member of this epoch's joiners takes in its role's tree.
    pub fn joined_leaf(&self, role: Role, id: &DeviceId) -> Option<u32> {
        self.tree(role)
            .leaf_changes()
            .iter()
            .find(|(_, h)| h.as_ref() == Some(id))
            .map(|(l, _)| *l)
    }

    /// Members new in this epoch (first joins and new certificates).
    pub fn joined(&self) -> &[Member] {
        &self.joined
    }

    /// Members gone in this epoch (including the old certificate of a renewed member).
    pub fn departed(&self) -> &[Member] {
        &self.departed
    }

    /// The record of the new epoch ([`GroupState::to_record`]), to write atomically with the
    /// members' shares and leaves and the tree's node rows before committing.
    pub fn state_record(&self) -> Vec<u8> {
        state_record(
            &self.signed,
            self.rekeyed_at_ms,
            Trees {
                publishers: self.trees.publishers.width(),
                subscribers: self.trees.subscribers.width(),
            },
        )
    }
}

/// The CA's state of one group: epoch, privacy, joined members with their shares, the keys and
/// signed info of the current epoch, and the two key trees.
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
    trees: Trees<KeyTree>,
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
        let trees = Trees {
            publishers: KeyTree::new(group.clone(), Role::Publisher, epoch),
            subscribers: KeyTree::new(group, Role::Subscriber, epoch),
        };
        Ok(GroupState {
            keys,
            signed,
            roster,
            rekeyed_at_ms: now_ms,
            trees,
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

    /// The key tree whose leaves hold `role`'s key.
    pub fn tree(&self, role: Role) -> &KeyTree {
        self.trees.get(role)
    }

    /// The joined members, ordered by (role, ID).
    pub fn members(&self) -> impl Iterator<Item = &JoinedMember> {
        self.roster.members()
    }

    /// The joined member `id` in `role`.
    pub fn member(&self, id: &DeviceId, role: Role) -> Option<&JoinedMember> {
        self.roster.get(id, role)
    }

    /// The SUBACK delivery of the current key and key-tree path to a joined member.
    ///
    /// # Errors
    /// [`RekeyError::NotAMember`] unless `member` is joined with exactly these public points.
    pub fn delivery(
        &self,
        member: &Member,
        rng: &mut impl CryptoRngCore,
    ) -> Result<GroupKeyDelivery, RekeyError> {
        match self.member(&member.id, member.role) {
            Some(m) if m.member() == member => {
                let x = self.keys.held_by(member.role).secret();
                let set = self.tree(member.role).key_set(&member.id, x)?;
                Ok(GroupKeyDelivery::seal(
                    &self.signed,
                    &self.keys,
                    &set,
                    member,
                    rng,
                )?)
            }
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
    /// [`RekeyError::EpochExhausted`] at `u32::MAX`; [`RekeyError::Tree`] for a tree that would
    /// exceed its widest size; [`RekeyError::Group`] or [`RekeyError::Curve`] with probability
    /// 2⁻²⁵⁶.
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
        // Both keys change every epoch; d_P's tree (the subscribers') first.
        let mut plan = |kind: GroupKeyKind, rng: &mut _| -> Result<StagedTree, RekeyError> {
            let role = kind.holder_role();
            let changes = TreeChanges {
                departed: self
                    .roster
                    .departing(&diff)
                    .map(JoinedMember::member)
                    .filter(|m| m.role == role)
                    .map(|m| m.id.clone())
                    .collect(),
                joined: diff
                    .joined()
                    .map(JoinedMember::member)
                    .filter(|m| m.role == role)
                    .map(|m| m.id.clone())
                    .collect(),
            };
            let staged = self
                .tree(role)
                .plan(&changes, keys.key(kind).secret(), &signed, rng)?;
            if let Some(notice) = staged.notice() {
                notices.push(OutgoingNotice {
                    role,
                    topic: key_topic(self.group(), role),
                    notice: notice.clone(),
                });
            }
            Ok(staged)
        };
        let subscribers = plan(GroupKeyKind::P, rng)?;
        let publishers = plan(GroupKeyKind::S, rng)?;
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
            trees: Trees {
                publishers,
                subscribers,
            },
            notices,
            joined,
            departed,
        })))
    }

    /// Makes a staged rekey current, after the caller persisted it.
    ///
    /// # Errors
    /// [`RekeyError::Conflict`] if it was staged from another state (another rekey was committed
    /// in between); the state is then unchanged.
    pub fn commit(&mut self, staged: StagedRekey) -> Result<(), RekeyError> {
        if &staged.base != self.keys.group_info()
            || !self.trees.publishers.follows(&staged.trees.publishers)
            || !self.trees.subscribers.follows(&staged.trees.subscribers)
        {
            return Err(RekeyError::Conflict);
        }
        self.trees.publishers.commit(staged.trees.publishers)?;
        self.trees.subscribers.commit(staged.trees.subscribers)?;
        self.roster.apply(staged.diff);
        self.keys = staged.keys;
        self.signed = staged.signed;
        self.rekeyed_at_ms = staged.rekeyed_at_ms;
        Ok(())
    }

    /// The storage record of the current epoch: `u8 1 || ginfo || sig || u64 rekeyed_at_ms ||
    /// u32 W of the publishers' tree || u32 W of the subscribers' tree`. It holds no secret; the
    /// members' shares and leaves are stored apart, one row per member, the tree's node keys one
    /// row per node, and come back through [`GroupState::from_record`].
    pub fn to_record(&self) -> Vec<u8> {
        state_record(
            &self.signed,
            self.rekeyed_at_ms,
            Trees {
                publishers: self.trees.publishers.width(),
                subscribers: self.trees.subscribers.width(),
            },
        )
    }

    /// Restores a state from [`GroupState::to_record`], the joined members with their leaves,
    /// and the node keys of both trees as (holders' role, node, key): checks the CA's
    /// signature, that the keys re-derived from the members equal the signed info, and that each
    /// tree holds exactly the members of its role with a key on every non-blank node.
    ///
    /// # Errors
    /// [`RekeyError::Decode`], [`RekeyError::Verify`], [`RekeyError::Group`] for a repeated
    /// member, [`RekeyError::Tree`] for rows that do not form a tree,
    /// [`RekeyError::RecordMismatch`] if the members do not give the signed keys.
    pub fn from_record(
        ca: &KeyPair,
        bytes: &[u8],
        members: impl IntoIterator<Item = (JoinedMember, u32)>,
        nodes: impl IntoIterator<Item = (Role, u32, NodeKey)>,
    ) -> Result<Self, RekeyError> {
        let mut r = Reader::new(bytes);
        r.version("group record")?;
        let signed = SignedGroupInfo::read(&mut r)?;
        let rekeyed_at_ms = r.u64("group record time")?;
        let pub_width = r.u32("group record publishers' tree width")?;
        let sub_width = r.u32("group record subscribers' tree width")?;
        r.finish("group record")?;
        let info = signed.verify(&ca.verifying_key())?;
        let members: Vec<(JoinedMember, u32)> = members.into_iter().collect();
        let nodes: Vec<(Role, u32, NodeKey)> = nodes.into_iter().collect();
        let tree = |role: Role, width: u32| {
            let holders = members
                .iter()
                .filter(|(m, _)| m.member().role == role)
                .map(|(m, leaf)| (m.member().id.clone(), *leaf));
            let keys = nodes
                .iter()
                .filter(|(r, _, _)| *r == role)
                .map(|(_, n, k)| (*n, k.clone()));
            KeyTree::from_parts(info.group.clone(), role, info.epoch, width, holders, keys)
        };
        let trees = Trees {
            publishers: tree(Role::Publisher, pub_width)?,
            subscribers: tree(Role::Subscriber, sub_width)?,
        };
        let roster = Roster::from_members(members.into_iter().map(|(m, _)| m))?;
        let keys =
            roster.derive_keys(&roster.diff([]), ca, &info.group, info.epoch, info.privacy)?;
        // The trees were built from exactly the members' leaves, one leaf each.
        if keys.group_info() != info {
            return Err(RekeyError::RecordMismatch);
        }
        Ok(GroupState {
            keys,
            signed,
            roster,
            rekeyed_at_ms,
            trees,
        })
    }
}

fn state_record(signed: &SignedGroupInfo, rekeyed_at_ms: u64, widths: Trees<u32>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    put_u8(&mut out, 1);
    signed.encode(&mut out);
    put_u64(&mut out, rekeyed_at_ms);
    put_u32(&mut out, widths.publishers);
    put_u32(&mut out, widths.subscribers);
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

        /// Stages, checks, commits and delivers; `None` if nothing changed. Remaining holders
        /// apply their role's tree notice; joiners start from their delivery and ignore the
        /// notice of their own epoch; non-members open nothing and get no delivery.
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
            let joined = staged.joined().to_vec();
            let group = self.state.group().clone();
            for n in &notices {
                assert_eq!(n.topic, key_topic(&group, n.role));
                assert_eq!(n.notice.epoch(), staged.epoch());
                assert_eq!(TreeNotice::from_bytes(&n.payload()).unwrap(), n.notice);
            }
            for m in &joined {
                assert!(
                    staged.joined_leaf(m.role, &m.id).is_some(),
                    "{m:?} has a leaf"
                );
            }
            let record = staged.state_record();
            self.state.commit(staged).unwrap();
            assert_eq!(self.state.to_record(), record);
            let restored = GroupState::from_record(
                &self.ca,
                &record,
                stored_members(&self.state),
                stored_nodes(&self.state),
            )
            .unwrap();
            assert_eq!(restored.to_record(), record);
            for kind in [GroupKeyKind::P, GroupKeyKind::S] {
                assert_eq!(restored.keys().key(kind), self.state.keys().key(kind));
            }
            // One notice per tree that has holders.
            for role in [Role::Publisher, Role::Subscriber] {
                let sent = notices.iter().filter(|n| n.role == role).count();
                assert_eq!(sent, usize::from(!self.state.tree(role).is_empty()));
            }
            let epoch = self.state.epoch();
            let q_ca = self.ca.verifying_key();
            for dev in self.devs.values_mut().chain(self.ghosts.iter_mut()) {
                let m = dev.t.member().clone();
                let is_member = self.state.member(&m.id, m.role) == Some(&dev.t.joined);
                let notice = notices.iter().find(|n| n.role == m.role);
                if !is_member {
                    if let Some(ring) = &dev.ring {
                        for n in &notices {
                            assert!(ring.clone().apply_tree_notice(&n.notice, self.now).is_err());
                        }
                        assert!(ring.epoch() < epoch);
                    }
                    assert_eq!(
                        self.state.delivery(&m, &mut self.rng).err(),
                        Some(RekeyError::NotAMember)
                    );
                    continue;
                }
                let ring = match dev.ring.as_mut() {
                    Some(ring) if !joined.contains(&m) => {
                        let n = notice.expect("a holder's tree sends a notice");
                        assert_eq!(ring.apply_tree_notice(&n.notice, self.now), Ok(epoch));
                        ring
                    }
                    _ => {
                        let delivery = self.state.delivery(&m, &mut self.rng).unwrap();
                        let ring = Keyring::from_delivery(
                            q_ca,
                            &group,
                            m.role,
                            &dev.t.key,
                            &delivery,
                            DEFAULT_GRACE_MS,
                        )
                        .unwrap();
                        if let Some(n) = notice {
                            assert_eq!(
                                ring.clone().apply_tree_notice(&n.notice, self.now),
                                Err(RekeyError::Tree(TreeError::StaleEpoch))
                            );
                        }
                        dev.ring.insert(ring)
                    }
                };
                assert_eq!(ring.epoch(), epoch);
                assert_eq!(ring.current_key(), self.state.keys().held_by(m.role));
                let tree = self.state.tree(m.role);
                let leaf = tree.leaf_of(&m.id).unwrap();
                let want: Vec<(u32, NodeKey)> = tree::index::path(leaf, tree.width())
                    .into_iter()
                    .map(|n| (n, tree.key(n).unwrap().clone()))
                    .collect();
                assert_eq!(ring.tree().path(), &want[..], "{m:?}'s path is the CA's");
                dev.held.push(ring.current_key().clone());
            }
            Some((notices, departed))
        }
    }

    /// The members as the CA stores them: each with its leaf.
    fn stored_members(state: &GroupState) -> Vec<(JoinedMember, u32)> {
        state
            .members()
            .map(|j| {
                let m = j.member();
                (j.clone(), state.tree(m.role).leaf_of(&m.id).unwrap())
            })
            .collect()
    }

    /// Both trees' node keys as the CA stores them.
    fn stored_nodes(state: &GroupState) -> Vec<(Role, u32, NodeKey)> {
        [Role::Publisher, Role::Subscriber]
            .into_iter()
            .flat_map(|role| {
                state
                    .tree(role)
                    .node_keys()
                    .map(move |(n, k)| (role, n, k.clone()))
            })
            .collect()
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

        /// Key-level secrecy over random change sets: members always end with the CA's key and
        /// path; no non-member (departed, replaced certificate, not yet joined) opens any notice
        /// or gets a delivery; every state restores from its stored rows.
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
        // Every holder is new (each gets its key set in its SUBACK): one tree notice per role,
        // with no wrap, since no holder remains from before.
        assert_eq!(notices.len(), 2);
        assert!(notices.iter().all(|n| n.notice.wraps().is_empty()));
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
        // One notice per role: s4 takes s3's leaf; p3 doubles the publishers' tree.
        assert_eq!(notices.len(), 2);
        let subs = notices.iter().find(|n| n.role == Role::Subscriber).unwrap();
        assert_eq!(subs.notice.joined_leaves(), &[2]);
        let pubs = notices.iter().find(|n| n.role == Role::Publisher).unwrap();
        assert_eq!(pubs.notice.width(), 4);
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
        // The new certificate takes the leaf the old one left, under fresh path keys that only
        // s2 receives by wraps (the old certificate's ring opens nothing: checked in `run`).
        let subs: Vec<_> = notices
            .iter()
            .filter(|n| n.role == Role::Subscriber)
            .collect();
        assert_eq!(subs.len(), 1);
        assert_eq!(subs[0].notice.joined_leaves().len(), 1);
        assert!(!subs[0].notice.wraps().is_empty());
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
        // No membership change: one notice per role, only the root wrap under unchanged trees.
        assert_eq!(notices.len(), 2);
        assert!(notices.iter().all(|n| n.notice.wraps().is_empty()));
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

    /// After a subscriber leaves it opens no later notice, and a later joiner receives no node
    /// key of any earlier epoch.
    #[test]
    fn departed_and_future_members_learn_nothing() {
        let mut sim = Sim::new(9);
        let changes = vec![
            sim.join("p1", Role::Publisher),
            sim.join("p2", Role::Publisher),
            sim.join("s1", Role::Subscriber),
            sim.join("s2", Role::Subscriber),
            sim.join("s3", Role::Subscriber),
        ];
        sim.run(changes);
        sim.run(vec![Change::Periodic]).unwrap();
        let mut earlier: Vec<[u8; 32]> = Vec::new();
        let remember = |state: &GroupState, out: &mut Vec<[u8; 32]>| {
            for role in [Role::Publisher, Role::Subscriber] {
                out.extend(state.tree(role).node_keys().map(|(_, k)| *k.as_bytes()));
            }
        };
        remember(&sim.state, &mut earlier);
        let leaver = sim.devs[&(Role::Subscriber, "s1".to_owned())]
            .ring
            .clone()
            .unwrap();
        let (notices, _) = sim
            .run(vec![Change::Leave {
                id: DeviceId::new("s1").unwrap(),
                role: Role::Subscriber,
            }])
            .unwrap();
        remember(&sim.state, &mut earlier);
        let later = sim.run(vec![Change::Periodic]).unwrap().0;
        for n in notices.iter().chain(&later) {
            assert!(
                leaver
                    .clone()
                    .apply_tree_notice(&n.notice, sim.now)
                    .is_err()
            );
        }
        remember(&sim.state, &mut earlier);
        // A device joining later takes s1's blank leaf; its path holds no earlier key.
        let join = sim.join("s4", Role::Subscriber);
        sim.run(vec![join]);
        let ring = sim.devs[&(Role::Subscriber, "s4".to_owned())]
            .ring
            .as_ref()
            .unwrap();
        for (_, k) in ring.tree().path() {
            assert!(
                !earlier.contains(k.as_bytes()),
                "the joiner got an earlier node key"
            );
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
            sim.join("s2", Role::Subscriber),
            sim.join("p1", Role::Publisher),
        ];
        sim.run(changes);
        let record = sim.state.to_record();
        let members = stored_members(&sim.state);
        let nodes = stored_nodes(&sim.state);
        let restore = |ca: &KeyPair,
                       record: &[u8],
                       members: &[(JoinedMember, u32)],
                       nodes: &[(Role, u32, NodeKey)]| {
            GroupState::from_record(ca, record, members.iter().cloned(), nodes.iter().cloned())
        };
        let back = restore(&sim.ca, &record, &members, &nodes).unwrap();
        assert_eq!(back.epoch(), sim.state.epoch());
        assert_eq!(back.privacy(), Privacy::Standard);
        assert_eq!(back.rekeyed_at_ms(), sim.now);
        assert_eq!(back.signed_info(), sim.state.signed_info());
        assert_eq!(
            back.keys().key(GroupKeyKind::P),
            sim.state.keys().key(GroupKeyKind::P)
        );
        assert_eq!(back.tree(Role::Subscriber).width(), 2);
        let other_ca = KeyPair::random(&mut sim.rng);
        assert!(restore(&other_ca, &record, &members, &nodes).is_err());
        let time_at = 1 + sim.state.signed_info().to_bytes().len();
        for i in 0..record.len() {
            if (time_at..time_at + 8).contains(&i) {
                continue; // the timestamp is not authenticated: it only drives the timer
            }
            let mut bad = record.clone();
            bad[i] ^= 0x01;
            assert!(
                restore(&sim.ca, &bad, &members, &nodes).is_err(),
                "flipped byte {i} restored"
            );
        }
        assert!(restore(&sim.ca, &record[..record.len() - 1], &members, &nodes).is_err());
        // The members must be exactly those the signed info was derived from, each on a leaf
        // whose path has keys, and the node keys exactly those of the holders' paths.
        let s1_gone: Vec<_> = members
            .iter()
            .filter(|(j, _)| j.member().id.as_str() != "s1")
            .cloned()
            .collect();
        assert!(restore(&sim.ca, &record, &s1_gone, &nodes).is_err());
        let Change::Join(stranger) = sim.join("s3", Role::Subscriber) else {
            unreachable!()
        };
        let mut extra = members.clone();
        extra.push((stranger, 3));
        assert!(restore(&sim.ca, &record, &extra, &nodes).is_err());
        let mut moved = members.clone();
        for (_, leaf) in moved.iter_mut() {
            *leaf += 2;
        }
        assert!(restore(&sim.ca, &record, &moved, &nodes).is_err());
        assert!(restore(&sim.ca, &record, &members, &nodes[1..]).is_err());
        let Change::Join(renewed) = sim.renew("s1", Role::Subscriber) else {
            unreachable!()
        };
        let swapped: Vec<(JoinedMember, u32)> = members
            .iter()
            .map(|(m, l)| {
                if m.member().id == renewed.member().id {
                    (renewed.clone(), *l)
                } else {
                    (m.clone(), *l)
                }
            })
            .collect();
        assert_eq!(
            restore(&sim.ca, &record, &swapped, &nodes).err(),
            Some(RekeyError::RecordMismatch)
        );
        let mut twice = members.clone();
        twice.push(members[0].clone());
        assert!(restore(&sim.ca, &record, &twice, &nodes).is_err());
    }

    #[test]
    fn topics_follow_the_layout() {
        let g = GroupId::new("a/b").unwrap();
        assert_eq!(key_topic(&g, Role::Publisher), "quva/k/a/b/pub");
        assert_eq!(key_topic(&g, Role::Subscriber), "quva/k/a/b/sub");
    }
}
