//! The device's epoch keyring, PROTOCOL.md §5: the current group key, previous ones for a grace
//! period, and the application of rekey notices.

use super::tree::{TreeError, TreeHolder, TreeKeySet, TreeNotice};
use super::{NoticeBody, RekeyError, RekeyNotice};
use crate::curve::KeyPair;
use crate::group::{AcceptedGroupKey, GroupError, GroupInfo, GroupKeyDelivery, SignedGroupInfo};
use crate::ids::{Epoch, GroupId, Role};
use crate::schnorr::VerifyingKey;
use crate::symmetric::VerifyError;

/// How long receivers keep epoch E's key after adopting a later one (PROTOCOL.md §5).
pub const DEFAULT_GRACE_MS: u64 = 30_000;
/// Superseded keys kept at most, however short the interval between rekeys.
pub const MAX_PREVIOUS_KEYS: usize = 4;

/// One device's keys for one (group, role): d_P for a subscriber, d_S for a publisher.
#[derive(Clone, Debug)]
pub struct Keyring {
    q_ca: VerifyingKey,
    role: Role,
    grace_ms: u64,
    current: AcceptedGroupKey,
    /// (epoch, key, usable while now_ms < this), oldest first.
    /// Earlier epochs' keys with the time their grace period ends, oldest first.
    previous: Vec<(AcceptedGroupKey, u64)>,
}

impl Keyring {
    /// Starts from a key accepted from a SUBACK delivery.
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
        let current = delivery.accept(&q_ca, device, group, role)?;
        Ok(Keyring {
            q_ca,
            role,
            grace_ms,
            current,
            previous: Vec::new(),
        })
    }

    /// Starts from an individual rekey notice (a new holder whose SUBACK was lost, or a device
    /// reading its retained notice).
    ///
    /// # Errors
    /// As [`Keyring::apply_notice`]; a broadcast is [`RekeyError::EpochGap`] (no previous key).
    pub fn from_notice(
        q_ca: VerifyingKey,
        group: &GroupId,
        role: Role,
        device: &KeyPair,
        notice: &RekeyNotice,
        grace_ms: u64,
    ) -> Result<Self, RekeyError> {
        check_notice(&q_ca, group, role, notice)?;
        if !matches!(notice.body(), NoticeBody::Individual { .. }) {
            return Err(RekeyError::EpochGap);
        }
        let current = open_notice(notice, role, device, None)?;
        Ok(Keyring {
            q_ca,
            role,
            grace_ms,
            current,
            previous: Vec::new(),
        })
    }

    /// Starts from a v1.1 key set (PROTOCOL.md §5.1, the ECIES plaintext of a key delivery, with
    /// the signed info it came with): returns the ring and the holder's tree state.
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
    ) -> Result<(Self, TreeHolder), RekeyError> {
        let (tree, current) = TreeHolder::from_key_set(&q_ca, signed, group, role, set)?;
        let ring = Keyring {
            q_ca,
            role,
            grace_ms,
            current,
            previous: Vec::new(),
        };
        Ok((ring, tree))
    }

    /// Applies a v1.1 tree notice (kind 3) with the holder's tree state `tree`, which must be of
    /// this ring's group, role and epoch: on success both move to the new epoch (the old key
    /// stays for the grace period); on any error neither changes.
    ///
    /// # Errors
    /// [`RekeyError::Tree`]: [`TreeError::StaleEpoch`] for a notice already applied or older
    /// (ignore it), [`TreeError::MissedEpoch`] when an epoch was missed (join again), and the
    /// others of [`TreeHolder::apply`]; [`TreeError::Inconsistent`] if `tree` does not belong to
    /// this ring.
    pub fn apply_tree_notice(
        &mut self,
        tree: &mut TreeHolder,
        notice: &TreeNotice,
        now_ms: u64,
    ) -> Result<Epoch, RekeyError> {
        if tree.group() != self.group() || tree.role() != self.role || tree.epoch() != self.epoch()
        {
            return Err(TreeError::Inconsistent("tree state does not match the keyring").into());
        }
        let adopted = tree.apply(&self.q_ca, notice)?;
        Ok(self.adopt(adopted.into_key(), now_ms))
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

    /// Applies a rekey notice for a later epoch: the CA signed its info, it is for this group
    /// and role, a broadcast follows the current epoch and opens under the current key, an
    /// individual notice (any later epoch: catching up from a retained notice) opens with d_i,
    /// and the new key matches the info. Returns the adopted epoch.
    ///
    /// # Errors
    /// [`RekeyError::WrongRole`], [`RekeyError::WrongGroup`], [`RekeyError::StaleEpoch`] for an
    /// epoch not after the current one, [`RekeyError::EpochGap`] for a broadcast that does not
    /// follow the current epoch (ask the CA again), or the opaque [`RekeyError::Verify`].
    pub fn apply_notice(
        &mut self,
        device: &KeyPair,
        notice: &RekeyNotice,
        now_ms: u64,
    ) -> Result<Epoch, RekeyError> {
        let info = check_notice(&self.q_ca, self.group(), self.role, notice)?;
        if info.epoch <= self.epoch() {
            return Err(RekeyError::StaleEpoch);
        }
        if let NoticeBody::Broadcast { previous_epoch, .. } = notice.body() {
            if *previous_epoch != self.epoch() {
                return Err(RekeyError::EpochGap);
            }
        }
        let accepted = open_notice(notice, self.role, device, Some(self.current.key()))?;
        Ok(self.adopt(accepted, now_ms))
    }

    /// Applies a later SUBACK delivery (after asking the CA again). Returns the adopted epoch.
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
        let accepted = delivery.accept(&self.q_ca, device, &group, self.role)?;
        if accepted.epoch() <= self.epoch() {
            return Err(RekeyError::StaleEpoch);
        }
        Ok(self.adopt(accepted, now_ms))
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

/// Role, signature and group checks shared by every notice path.
fn check_notice<'a>(
    q_ca: &VerifyingKey,
    group: &GroupId,
    role: Role,
    notice: &'a RekeyNotice,
) -> Result<&'a GroupInfo, RekeyError> {
    if notice.role() != role {
        return Err(RekeyError::WrongRole("rekey notice"));
    }
    let info = notice.signed_info().verify(q_ca)?;
    if &info.group != group {
        return Err(RekeyError::WrongGroup("rekey notice"));
    }
    Ok(info)
}

/// Opens a verified notice: a broadcast with `previous`, an individual one with d_i; then
/// checks d·G against the info.
fn open_notice(
    notice: &RekeyNotice,
    role: Role,
    device: &KeyPair,
    previous: Option<&KeyPair>,
) -> Result<AcceptedGroupKey, RekeyError> {
    let secret = match (notice.body(), previous) {
        (NoticeBody::Broadcast { .. }, Some(prev)) => notice.open_broadcast(prev.secret())?,
        (NoticeBody::Broadcast { .. }, None) => return Err(RekeyError::EpochGap),
        (NoticeBody::Individual { .. }, _) => notice.open_individual(device)?,
    };
    let key = KeyPair::from_secret(secret);
    let signed = notice.signed_info();
    if key.public() != signed.info_unverified().held_public_key(role) {
        return Err(RekeyError::Verify(VerifyError));
    }
    Ok(AcceptedGroupKey::new_verified(signed.clone(), role, key))
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
    use crate::curve::SecretScalar;
    use crate::group::testing::TestDevice;
    use crate::group::{GroupKeyDelivery, Privacy};
    use crate::rekey::{Change, GroupState, OutgoingNotice, Plan};

    struct Setup {
        ca: KeyPair,
        rng: ChaCha20Rng,
        state: GroupState,
        devs: Vec<TestDevice>,
    }

    const SUB: usize = 0;

    impl Setup {
        /// Subscribers s0, s1 and publisher p0 joined at epoch 1.
        fn new(seed: u64) -> Self {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let ca = KeyPair::random(&mut rng);
            let group = GroupId::new("plant/line-3/temp").unwrap();
            let devs = vec![
                TestDevice::new("s0", Role::Subscriber, &mut rng),
                TestDevice::new("s1", Role::Subscriber, &mut rng),
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

        fn notice_for(notices: &[OutgoingNotice], role: Role, id: &str) -> RekeyNotice {
            notices
                .iter()
                .find(|n| n.role == role && n.recipient.as_ref().is_none_or(|r| r.as_str() == id))
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
        let n = Setup::notice_for(&notices, Role::Subscriber, "s0");
        assert_eq!(n.kind(), super::super::NoticeKind::Broadcast);
        let e2 = ring.apply_notice(&s.devs[SUB].key, &n, 10_000).unwrap();
        assert_eq!(e2, Epoch(e1.0 + 1));
        assert_eq!(ring.current_key(), s.state.keys().held_by(Role::Subscriber));
        assert_eq!(ring.group_info(), s.state.signed_info().info_unverified());
        assert_eq!(ring.signed_group_info(), s.state.signed_info());
        assert_eq!(ring.key_for(e2, u64::MAX), Some(ring.current_key()));
        assert_eq!(ring.key_for(e1, 10_000 + DEFAULT_GRACE_MS - 1), Some(&k1));
        assert_eq!(ring.key_for(e1, 10_000 + DEFAULT_GRACE_MS), None);
        assert_eq!(ring.key_for(Epoch(0), 10_000), None);
        ring.prune(10_000 + DEFAULT_GRACE_MS);
        assert_eq!(ring.key_for(e1, 10_001), None);

        // A configured grace period.
        let mut short = s.ring(SUB, 5);
        let notices = s.step(vec![Change::Periodic], 20_000);
        let n = Setup::notice_for(&notices, Role::Subscriber, "s0");
        let before = short.epoch();
        short.apply_notice(&s.devs[SUB].key, &n, 20_000).unwrap();
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
            let n = Setup::notice_for(&notices, Role::Subscriber, "s0");
            ring.apply_notice(&s.devs[SUB].key, &n, 100 + i).unwrap();
        }
        assert_eq!(ring.previous.len(), MAX_PREVIOUS_KEYS);
        assert!(ring.key_for(first, 200).is_none());
        assert!(ring.key_for(Epoch(ring.epoch().0 - 1), 200).is_some());
    }

    #[test]
    fn catches_up_from_an_individual_notice_but_not_a_broadcast() {
        let mut s = Setup::new(3);
        let mut ring = s.ring(SUB, DEFAULT_GRACE_MS);
        let start = ring.epoch();
        // Offline for two epochs: a broadcast (periodic) then individual notices (s1 left).
        let missed = s.step(vec![Change::Periodic], 1);
        let leave = Change::Leave {
            id: s.devs[1].member().id.clone(),
            role: Role::Subscriber,
        };
        let latest = s.step(vec![leave], 2);
        let periodic = s.step(vec![Change::Periodic], 3);
        // The retained broadcast of epoch +3 does not follow epoch +0.
        let n3 = Setup::notice_for(&periodic, Role::Subscriber, "s0");
        assert_eq!(
            ring.apply_notice(&s.devs[SUB].key, &n3, 10),
            Err(RekeyError::EpochGap)
        );
        // The retained individual notice of epoch +2 does, then +3 follows.
        let n2 = Setup::notice_for(&latest, Role::Subscriber, "s0");
        assert_eq!(n2.kind(), super::super::NoticeKind::Individual);
        assert_eq!(
            ring.apply_notice(&s.devs[SUB].key, &n2, 10),
            Ok(Epoch(start.0 + 2))
        );
        assert_eq!(
            ring.apply_notice(&s.devs[SUB].key, &n3, 10),
            Ok(Epoch(start.0 + 3))
        );
        assert_eq!(ring.current_key(), s.state.keys().held_by(Role::Subscriber));
        // Older notices are stale now, and so is a replay.
        let n1 = Setup::notice_for(&missed, Role::Subscriber, "s0");
        for n in [&n1, &n2, &n3] {
            assert_eq!(
                ring.apply_notice(&s.devs[SUB].key, n, 10),
                Err(RekeyError::StaleEpoch)
            );
        }
        // A later SUBACK delivery also moves the ring on; an equal one is stale.
        let delivery = s.delivery(SUB);
        assert_eq!(
            ring.apply_delivery(&s.devs[SUB].key, &delivery, 10),
            Err(RekeyError::StaleEpoch)
        );
        s.step(vec![Change::Periodic], 4);
        let delivery = s.delivery(SUB);
        assert_eq!(
            ring.apply_delivery(&s.devs[SUB].key, &delivery, 10),
            Ok(s.state.epoch())
        );
    }

    #[test]
    fn notice_rejections() {
        let mut s = Setup::new(4);
        let ring = s.ring(SUB, DEFAULT_GRACE_MS);
        let dev = s.devs[SUB].key.clone();
        let old_p = s.state.keys().key(crate::ids::GroupKeyKind::P).clone();
        let notices = s.step(vec![Change::Periodic], 1);
        let good = Setup::notice_for(&notices, Role::Subscriber, "s0");
        assert!(ring.clone().apply_notice(&dev, &good, 1).is_ok());
        // Wrong role: the publishers' notice.
        let for_pubs = Setup::notice_for(&notices, Role::Publisher, "p0");
        assert_eq!(
            ring.clone().apply_notice(&dev, &for_pubs, 1),
            Err(RekeyError::WrongRole("rekey notice"))
        );
        // Signed by another CA (otherwise perfect).
        let new_p = s.state.keys().key(crate::ids::GroupKeyKind::P).clone();
        let other_ca = KeyPair::random(&mut s.rng);
        let resigned = crate::group::SignedGroupInfo::sign(
            &other_ca,
            s.state.signed_info().info_unverified().clone(),
            &mut s.rng,
        )
        .unwrap();
        let forged =
            RekeyNotice::broadcast(&resigned, Role::Subscriber, old_p.secret(), new_p.secret())
                .unwrap();
        assert_eq!(
            ring.clone().apply_notice(&dev, &forged, 1),
            Err(RekeyError::Verify(VerifyError))
        );
        // A key that does not match the signed info.
        let wrong = SecretScalar::random(&mut s.rng);
        let forged = RekeyNotice::broadcast(
            s.state.signed_info(),
            Role::Subscriber,
            old_p.secret(),
            &wrong,
        )
        .unwrap();
        assert_eq!(
            ring.clone().apply_notice(&dev, &forged, 1),
            Err(RekeyError::Verify(VerifyError))
        );
        let forged = RekeyNotice::individual(
            s.state.signed_info(),
            Role::Subscriber,
            dev.public(),
            &wrong,
            &mut s.rng,
        );
        assert_eq!(
            ring.clone().apply_notice(&dev, &forged, 1),
            Err(RekeyError::Verify(VerifyError))
        );
        // Another group of the same CA.
        let other = GroupState::create(
            &s.ca,
            GroupId::new("other").unwrap(),
            Privacy::Standard,
            Epoch(7),
            0,
            &mut s.rng,
        )
        .unwrap();
        let forged = RekeyNotice::individual(
            other.signed_info(),
            Role::Subscriber,
            dev.public(),
            other.keys().key(crate::ids::GroupKeyKind::P).secret(),
            &mut s.rng,
        );
        assert_eq!(
            ring.clone().apply_notice(&dev, &forged, 1),
            Err(RekeyError::WrongGroup("rekey notice"))
        );
        // A broadcast cannot start a ring.
        assert_eq!(
            Keyring::from_notice(
                s.ca.verifying_key(),
                s.state.group(),
                Role::Subscriber,
                &dev,
                &good,
                1
            )
            .err(),
            Some(RekeyError::EpochGap)
        );
    }

    #[test]
    fn notice_tamper_fails() {
        let mut s = Setup::new(5);
        let ring = s.ring(SUB, DEFAULT_GRACE_MS);
        let dev = s.devs[SUB].key.clone();
        // A broadcast (periodic) and an individual notice (s1 leaves), each to s0.
        let broadcast =
            Setup::notice_for(&s.step(vec![Change::Periodic], 1), Role::Subscriber, "s0");
        let leave = Change::Leave {
            id: s.devs[1].member().id.clone(),
            role: Role::Subscriber,
        };
        let individual = Setup::notice_for(&s.step(vec![leave], 2), Role::Subscriber, "s0");
        let mut after_broadcast = ring.clone();
        after_broadcast.apply_notice(&dev, &broadcast, 1).unwrap();
        for (base, notice) in [(&ring, &broadcast), (&after_broadcast, &individual)] {
            let bytes = notice.to_bytes();
            assert!(base.clone().apply_notice(&dev, notice, 3).is_ok());
            for i in 0..bytes.len() {
                for mask in [0x01u8, 0x80] {
                    let mut bad = bytes.clone();
                    bad[i] ^= mask;
                    let ok = RekeyNotice::from_bytes(&bad)
                        .is_ok_and(|n| base.clone().apply_notice(&dev, &n, 3).is_ok());
                    assert!(
                        !ok,
                        "flipped byte {i} of a {:?} notice applied",
                        notice.kind()
                    );
                }
            }
            assert!(RekeyNotice::from_bytes(&bytes[..bytes.len() - 1]).is_err());
            let mut long = bytes.clone();
            long.push(0);
            assert!(RekeyNotice::from_bytes(&long).is_err());
        }
    }

    #[test]
    fn tree_notices_move_the_ring_and_the_tree_together() {
        use crate::rekey::tree::TreeChanges;
        use crate::rekey::tree::testkit::{Sim, id};
        let mut sim = Sim::new(40, Role::Subscriber);
        let epoch = Epoch(1);
        let x = KeyPair::random(&mut sim.rng);
        let signed = sim.signed(epoch, &x);
        let changes = TreeChanges::joining(vec![id("a"), id("b")]);
        let staged = sim
            .tree
            .plan(&changes, x.secret(), &signed, &mut sim.rng)
            .unwrap();
        let set = staged.key_set(&id("a")).unwrap().clone();
        sim.tree.commit(staged).unwrap();
        let q_ca = sim.ca.verifying_key();
        let group = sim.tree.group().clone();
        let (mut ring, mut tree) =
            Keyring::from_tree_key_set(q_ca, &signed, &group, Role::Subscriber, &set, 100).unwrap();
        assert_eq!(ring.current_key(), &x);
        // Epoch 2: b leaves.
        let x2 = KeyPair::random(&mut sim.rng);
        let signed2 = sim.signed(Epoch(2), &x2);
        let staged = sim
            .tree
            .plan(
                &TreeChanges::leaving(vec![id("b")]),
                x2.secret(),
                &signed2,
                &mut sim.rng,
            )
            .unwrap();
        let notice = staged.notice().unwrap().clone();
        sim.tree.commit(staged).unwrap();
        assert_eq!(ring.apply_tree_notice(&mut tree, &notice, 10), Ok(Epoch(2)));
        assert_eq!(ring.current_key(), &x2);
        assert_eq!(tree.epoch(), Epoch(2));
        assert_eq!(ring.key_for(Epoch(1), 50), Some(&x));
        assert_eq!(
            ring.apply_tree_notice(&mut tree, &notice, 10),
            Err(RekeyError::Tree(TreeError::StaleEpoch))
        );
        // A tree state of another epoch is refused before anything is opened.
        let mut stale = TreeHolder::from_parts(
            group,
            Role::Subscriber,
            Epoch(1),
            tree.width(),
            tree.leaf(),
            tree.path().to_vec(),
        )
        .unwrap();
        assert!(matches!(
            ring.apply_tree_notice(&mut stale, &notice, 10),
            Err(RekeyError::Tree(TreeError::Inconsistent(_)))
        ));
    }
}
