//! The device's epoch keyring, PROTOCOL.md §5 and §5.1: the current group key with the holder's
//! key-tree path, previous keys for a grace period, and the application of tree notices.

use super::tree::{TreeError, TreeHolder, TreeKeySet, TreeNotice};
use super::{GroupKeyDelivery, RekeyError};
use crate::curve::KeyPair;
use crate::group::{AcceptedGroupKey, GroupError, GroupInfo, SignedGroupInfo};
use crate::ids::{Epoch, GroupId, Role};
use crate::schnorr::VerifyingKey;

/// How long receivers keep epoch E's key after adopting a later one (PROTOCOL.md §5).
pub const DEFAULT_GRACE_MS: u64 = 30_000;
/// Superseded keys kept at most, however short the interval between rekeys.
pub const MAX_PREVIOUS_KEYS: usize = 4;

/// One device's keys for one (group, role): d_P for a subscriber, d_S for a publisher, and its
/// path in that key's tree (which moves with the key, epoch by epoch).
#[derive(Clone, Debug)]
pub struct Keyring {
    q_ca: VerifyingKey,
    role: Role,
    grace_ms: u64,
    current: AcceptedGroupKey,
    tree: TreeHolder,
    /// Earlier epochs' keys with the time their grace period ends, oldest first.
    previous: Vec<(AcceptedGroupKey, u64)>,
}

impl Keyring {
    /// Starts from a SUBACK delivery: the key and the key-tree path.
    ///
    /// # Errors
    /// [`GroupError`] (wrapped) from [`GroupKeyDelivery::accept`].
    pub fn from_delivery(
        q_ca: VerifyingKey,
        group: &GroupId,
        role: Role,
        device: &KeyPair,
        delivery: &GroupKeyDelivery,
        grace_ms: u64,
    ) -> Result<Self, RekeyError> {
        let (tree, current) = delivery.accept(&q_ca, device, group, role)?;
        Ok(Keyring {
            q_ca,
            role,
            grace_ms,
            current,
            tree,
            previous: Vec::new(),
        })
    }

    /// Starts from a key set (PROTOCOL.md §5.1) with the signed info of its epoch, for instance
    /// one restored from the device's key store: the same checks as a delivery's.
    ///
    /// # Errors
    /// [`RekeyError::Tree`] from [`TreeHolder::from_key_set`].
    pub fn from_tree_key_set(
        q_ca: VerifyingKey,
        signed: &SignedGroupInfo,
        group: &GroupId,
        role: Role,
        set: &TreeKeySet,
        grace_ms: u64,
    ) -> Result<Self, RekeyError> {
        let (tree, current) = TreeHolder::from_key_set(&q_ca, signed, group, role, set)?;
        Ok(Keyring {
            q_ca,
            role,
            grace_ms,
            current,
            tree,
            previous: Vec::new(),
        })
    }

    /// Applies the tree notice (kind 3) of the next epoch: on success the key and the path move
    /// to it (the old key stays for the grace period); on any error nothing changes.
    ///
    /// # Errors
    /// [`RekeyError::Tree`]: [`TreeError::StaleEpoch`] for a notice already applied or older
    /// (ignore it), [`TreeError::MissedEpoch`] when an epoch was missed (join again), and the
    /// others of [`TreeHolder::apply`].
    pub fn apply_tree_notice(
        &mut self,
        notice: &TreeNotice,
        now_ms: u64,
    ) -> Result<Epoch, RekeyError> {
        // TreeHolder::apply changes nothing unless every step succeeds.
        let adopted = self.tree.apply(&self.q_ca, notice)?;
        Ok(self.adopt(adopted.into_key(), now_ms))
    }

    /// Applies a later SUBACK delivery (after joining again). Returns the adopted epoch.
    ///
    /// # Errors
    /// [`RekeyError::StaleEpoch`] for an epoch not after the current one, or what
    /// [`GroupKeyDelivery::accept`] returns.
    pub fn apply_delivery(
        &mut self,
        device: &KeyPair,
        delivery: &GroupKeyDelivery,
        now_ms: u64,
    ) -> Result<Epoch, RekeyError> {
        let group = self.group().clone();
        let (tree, accepted) = delivery.accept(&self.q_ca, device, &group, self.role)?;
        if accepted.epoch() <= self.epoch() {
            return Err(RekeyError::StaleEpoch);
        }
        self.tree = tree;
        Ok(self.adopt(accepted, now_ms))
    }

    /// The group.
    pub fn group(&self) -> &GroupId {
        &self.current.info().group
    }

    /// The role whose key this ring holds.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The current epoch.
    pub fn epoch(&self) -> Epoch {
        self.current.epoch()
    }

    /// The holder's key-tree state of the current epoch (W, leaf, path), to store with the key.
    pub fn tree(&self) -> &TreeHolder {
        &self.tree
    }

    /// The current key as a key set (X and the path), to store: [`Keyring::from_tree_key_set`]
    /// restores it with the signed info.
    pub fn key_set(&self) -> TreeKeySet {
        TreeKeySet::from_holder(self.current.key().secret().clone(), &self.tree)
    }

    /// The verified group info of the current epoch (Q_P and Q_S to encrypt to).
    pub fn group_info(&self) -> &GroupInfo {
        self.current.info()
    }

    /// The signed group info of the current epoch.
    pub fn signed_group_info(&self) -> &SignedGroupInfo {
        self.current.signed_info()
    }

    /// The current held key.
    pub fn current_key(&self) -> &KeyPair {
        self.current.key()
    }

    /// The key of `epoch` at `now_ms`: the current one, or a previous one within its grace
    /// period.
    pub fn key_for(&self, epoch: Epoch, now_ms: u64) -> Option<&KeyPair> {
        if epoch == self.epoch() {
            return Some(self.current.key());
        }
        self.accepted_for(epoch, now_ms).map(AcceptedGroupKey::key)
    }

    /// The signed group info of `epoch` (current, or previous within the grace period): the
    /// public keys Q_P and Q_S that messages of that epoch are checked against.
    pub fn group_info_for(&self, epoch: Epoch, now_ms: u64) -> Option<&GroupInfo> {
        self.accepted_for(epoch, now_ms).map(AcceptedGroupKey::info)
    }

    fn accepted_for(&self, epoch: Epoch, now_ms: u64) -> Option<&AcceptedGroupKey> {
        if epoch == self.epoch() {
            return Some(&self.current);
        }
        self.previous
            .iter()
            .find(|(k, until)| k.epoch() == epoch && now_ms < *until)
            .map(|(k, _)| k)
    }

    /// Forgets previous keys whose grace period is over at `now_ms`.
    pub fn prune(&mut self, now_ms: u64) {
        self.previous.retain(|(_, until)| now_ms < *until);
    }

    fn adopt(&mut self, accepted: AcceptedGroupKey, now_ms: u64) -> Epoch {
        self.prune(now_ms);
        let old = core::mem::replace(&mut self.current, accepted);
        let until = now_ms.saturating_add(self.grace_ms);
        self.previous.push((old, until));
        if self.previous.len() > MAX_PREVIOUS_KEYS {
            self.previous.remove(0);
        }
        self.epoch()
    }
}

impl From<GroupError> for RekeyError {
    fn from(e: GroupError) -> Self {
        match e {
            GroupError::Verify(v) => RekeyError::Verify(v),
            GroupError::WrongGroup(w) => RekeyError::WrongGroup(w),
            GroupError::WrongRole(w) => RekeyError::WrongRole(w),
            GroupError::Decode(d) => RekeyError::Decode(d),
            other => RekeyError::Group(other),
        }
    }
}

impl From<TreeError> for RekeyError {
    fn from(e: TreeError) -> Self {
        RekeyError::Tree(e)
    }
}

#[cfg(test)]
mod tests {
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    use super::*;
    use crate::codec::{Decode, Encode};
    use crate::group::Privacy;
    use crate::group::testing::TestDevice;
    use crate::rekey::{Change, GroupState, OutgoingNotice, Plan};

    struct Setup {
        ca: KeyPair,
        rng: ChaCha20Rng,
        state: GroupState,
        devs: Vec<TestDevice>,
    }

    const SUB: usize = 0;

    impl Setup {
        /// Subscribers s0, s1, s2 and publisher p0 joined at epoch 1.
        fn new(seed: u64) -> Self {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let ca = KeyPair::random(&mut rng);
            let group = GroupId::new("plant/line-3/temp").unwrap();
            let devs = vec![
                TestDevice::new("s0", Role::Subscriber, &mut rng),
                TestDevice::new("s1", Role::Subscriber, &mut rng),
                TestDevice::new("s2", Role::Subscriber, &mut rng),
                TestDevice::new("p0", Role::Publisher, &mut rng),
            ];
            let state =
                GroupState::create(&ca, group, Privacy::Standard, Epoch(0), 0, &mut rng).unwrap();
            let mut s = Setup {
                ca,
                rng,
                state,
                devs,
            };
            let joins: Vec<Change> = s
                .devs
                .iter()
                .map(|d| Change::Join(d.joined.clone()))
                .collect();
            s.step(joins, 0);
            s
        }

        fn step(&mut self, changes: Vec<Change>, now: u64) -> Vec<OutgoingNotice> {
            let Plan::Rekey(staged) = self
                .state
                .stage(&self.ca, changes, now, &mut self.rng)
                .unwrap()
            else {
                panic!("expected a rekey");
            };
            let notices = staged.notices().to_vec();
            self.state.commit(*staged).unwrap();
            notices
        }

        fn leave(&mut self, dev: usize, now: u64) -> Vec<OutgoingNotice> {
            let m = self.devs[dev].member();
            let change = Change::Leave {
                id: m.id.clone(),
                role: m.role,
            };
            self.step(vec![change], now)
        }

        fn delivery(&mut self, dev: usize) -> GroupKeyDelivery {
            self.state
                .delivery(self.devs[dev].member(), &mut self.rng)
                .unwrap()
        }

        fn ring(&mut self, dev: usize, grace_ms: u64) -> Keyring {
            let delivery = self.delivery(dev);
            let d = &self.devs[dev];
            Keyring::from_delivery(
                self.ca.verifying_key(),
                self.state.group(),
                d.member().role,
                &d.key,
                &delivery,
                grace_ms,
            )
            .unwrap()
        }

        fn notice_for(notices: &[OutgoingNotice], role: Role) -> TreeNotice {
            notices
                .iter()
                .find(|n| n.role == role)
                .unwrap()
                .notice
                .clone()
        }
    }

    #[test]
    fn previous_key_lasts_the_grace_period() {
        let mut s = Setup::new(1);
        let mut ring = s.ring(SUB, DEFAULT_GRACE_MS);
        let e1 = ring.epoch();
        let k1 = ring.current_key().clone();
        let notices = s.step(vec![Change::Periodic], 10_000);
        let n = Setup::notice_for(&notices, Role::Subscriber);
        let e2 = ring.apply_tree_notice(&n, 10_000).unwrap();
        assert_eq!(e2, Epoch(e1.0 + 1));
        assert_eq!(ring.current_key(), s.state.keys().held_by(Role::Subscriber));
        assert_eq!(ring.group_info(), s.state.signed_info().info_unverified());
        assert_eq!(ring.signed_group_info(), s.state.signed_info());
        assert_eq!(ring.tree().epoch(), e2);
        assert_eq!(ring.key_for(e2, u64::MAX), Some(ring.current_key()));
        assert_eq!(ring.key_for(e1, 10_000 + DEFAULT_GRACE_MS - 1), Some(&k1));
        assert_eq!(ring.key_for(e1, 10_000 + DEFAULT_GRACE_MS), None);
        assert_eq!(ring.key_for(Epoch(0), 10_000), None);
        ring.prune(10_000 + DEFAULT_GRACE_MS);
        assert_eq!(ring.key_for(e1, 10_001), None);

        // A configured grace period.
        let mut short = s.ring(SUB, 5);
        let notices = s.step(vec![Change::Periodic], 20_000);
        let n = Setup::notice_for(&notices, Role::Subscriber);
        let before = short.epoch();
        short.apply_tree_notice(&n, 20_000).unwrap();
        assert!(short.key_for(before, 20_004).is_some());
        assert!(short.key_for(before, 20_005).is_none());
    }

    #[test]
    fn rapid_rekeys_keep_a_bounded_number_of_keys() {
        let mut s = Setup::new(2);
        let mut ring = s.ring(SUB, DEFAULT_GRACE_MS);
        let first = ring.epoch();
        for i in 0..(MAX_PREVIOUS_KEYS as u64 + 2) {
            let notices = s.step(vec![Change::Periodic], 100 + i);
            let n = Setup::notice_for(&notices, Role::Subscriber);
            ring.apply_tree_notice(&n, 100 + i).unwrap();
        }
        assert_eq!(ring.previous.len(), MAX_PREVIOUS_KEYS);
        assert!(ring.key_for(first, 200).is_none());
        assert!(ring.key_for(Epoch(ring.epoch().0 - 1), 200).is_some());
    }

    #[test]
    fn a_missed_epoch_needs_a_new_delivery() {
        let mut s = Setup::new(3);
        let mut ring = s.ring(SUB, DEFAULT_GRACE_MS);
        let start = ring.epoch();
        // Offline for two epochs: s1 leaves, then a periodic rekey. Only the latest notice
        // is retained, and it does not follow the held epoch.
        let missed = Setup::notice_for(&s.leave(1, 1), Role::Subscriber);
        let latest = Setup::notice_for(&s.step(vec![Change::Periodic], 2), Role::Subscriber);
        let before = ring.clone();
        assert_eq!(
            ring.apply_tree_notice(&latest, 10),
            Err(RekeyError::Tree(TreeError::MissedEpoch))
        );
        assert_eq!(ring.tree(), before.tree());
        assert_eq!(ring.epoch(), start);
        // Joining again: the delivery carries the whole path; then notices follow again.
        let delivery = s.delivery(SUB);
        assert_eq!(
            ring.apply_delivery(&s.devs[SUB].key, &delivery, 10),
            Ok(Epoch(start.0 + 2))
        );
        let next = Setup::notice_for(&s.leave(2, 3), Role::Subscriber);
        assert_eq!(ring.apply_tree_notice(&next, 10), Ok(Epoch(start.0 + 3)));
        assert_eq!(ring.current_key(), s.state.keys().held_by(Role::Subscriber));
        // Older notices are stale now, and so is a replay; so is an old delivery.
        for n in [&missed, &latest, &next] {
            assert_eq!(
                ring.apply_tree_notice(n, 10),
                Err(RekeyError::Tree(TreeError::StaleEpoch))
            );
        }
        assert_eq!(
            ring.apply_delivery(&s.devs[SUB].key, &delivery, 10),
            Err(RekeyError::StaleEpoch)
        );
    }

    #[test]
    fn notice_rejections() {
        let mut s = Setup::new(4);
        let ring = s.ring(SUB, DEFAULT_GRACE_MS);
        let publisher = s.ring(3, DEFAULT_GRACE_MS);
        let notices = s.step(vec![Change::Periodic], 1);
        let good = Setup::notice_for(&notices, Role::Subscriber);
        assert!(ring.clone().apply_tree_notice(&good, 1).is_ok());
        // Wrong role: the publishers' notice, and the other way round.
        let for_pubs = Setup::notice_for(&notices, Role::Publisher);
        assert_eq!(
            ring.clone().apply_tree_notice(&for_pubs, 1),
            Err(RekeyError::Tree(TreeError::WrongRole("tree notice")))
        );
        assert!(publisher.clone().apply_tree_notice(&good, 1).is_err());
        assert_eq!(
            publisher.clone().apply_tree_notice(&for_pubs, 1),
            Ok(Epoch(2))
        );
        // A notice of another group of the same CA.
        let mut other = Setup::new(4);
        other.ca = s.ca.clone();
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        other.state = GroupState::create(
            &s.ca,
            GroupId::new("other").unwrap(),
            Privacy::Standard,
            Epoch(1),
            0,
            &mut rng,
        )
        .unwrap();
        let joins = other
            .devs
            .iter()
            .map(|d| Change::Join(d.joined.clone()))
            .collect();
        let foreign = Setup::notice_for(&other.step(joins, 1), Role::Subscriber);
        assert_eq!(
            ring.clone().apply_tree_notice(&foreign, 1),
            Err(RekeyError::Tree(TreeError::WrongGroup("tree notice")))
        );
    }

    #[test]
    fn a_departed_holder_opens_nothing() {
        let mut s = Setup::new(6);
        let mut gone = s.ring(1, DEFAULT_GRACE_MS);
        let mut stays = s.ring(SUB, DEFAULT_GRACE_MS);
        let n = Setup::notice_for(&s.leave(1, 1), Role::Subscriber);
        assert!(stays.apply_tree_notice(&n, 1).is_ok());
        assert!(gone.apply_tree_notice(&n, 1).is_err());
        let n = Setup::notice_for(&s.step(vec![Change::Periodic], 2), Role::Subscriber);
        assert!(stays.apply_tree_notice(&n, 2).is_ok());
        assert!(gone.apply_tree_notice(&n, 2).is_err());
        // Nor can it ask for a delivery.
        assert_eq!(
            s.state.delivery(s.devs[1].member(), &mut s.rng).err(),
            Some(RekeyError::NotAMember)
        );
    }

    #[test]
    fn notice_tamper_fails() {
        let mut s = Setup::new(5);
        let ring = s.ring(SUB, DEFAULT_GRACE_MS);
        let notice = Setup::notice_for(&s.leave(1, 1), Role::Subscriber);
        let bytes = notice.to_bytes();
        assert!(ring.clone().apply_tree_notice(&notice, 3).is_ok());
        for i in 0..bytes.len() {
            for mask in [0x01u8, 0x80] {
                let mut bad = bytes.clone();
                bad[i] ^= mask;
                let ok = TreeNotice::from_bytes(&bad)
                    .is_ok_and(|n| ring.clone().apply_tree_notice(&n, 3).is_ok());
                assert!(!ok, "flipped byte {i} of a tree notice applied");
            }
        }
        assert!(TreeNotice::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        let mut long = bytes.clone();
        long.push(0);
        assert!(TreeNotice::from_bytes(&long).is_err());
    }

    #[test]
    fn a_stored_key_set_restores_the_ring() {
        let mut s = Setup::new(7);
        let mut ring = s.ring(SUB, DEFAULT_GRACE_MS);
        let n = Setup::notice_for(&s.leave(1, 1), Role::Subscriber);
        ring.apply_tree_notice(&n, 1).unwrap();
        let set = TreeKeySet::from_bytes(&ring.key_set().to_bytes()).unwrap();
        let mut back = Keyring::from_tree_key_set(
            s.ca.verifying_key(),
            ring.signed_group_info(),
            s.state.group(),
            Role::Subscriber,
            &set,
            DEFAULT_GRACE_MS,
        )
        .unwrap();
        assert_eq!(back.tree(), ring.tree());
        assert_eq!(back.current_key(), ring.current_key());
        // The restored ring follows the next notice like the original.
        let n = Setup::notice_for(&s.leave(2, 2), Role::Subscriber);
        assert_eq!(back.apply_tree_notice(&n, 2), ring.apply_tree_notice(&n, 2));
        assert_eq!(back.tree(), ring.tree());
        // A key set whose X is not the signed key is refused.
        let forged = TreeKeySet::new(
            crate::curve::SecretScalar::random(&mut s.rng),
            set.width(),
            set.leaf(),
            set.path().to_vec(),
        )
        .unwrap();
        assert!(
            Keyring::from_tree_key_set(
                s.ca.verifying_key(),
                back.signed_group_info(),
                s.state.group(),
                Role::Subscriber,
                &forged,
                DEFAULT_GRACE_MS,
            )
            .is_err()
        );
    }
}
