//! A holder's side of the key tree, PROTOCOL.md §5.1: W, its leaf and its path keys, and the
//! bottom-up processing of a kind-3 notice.

use zeroize::Zeroizing;

use super::{NodeKey, TreeError, TreeKeySet, TreeNotice, index};
use crate::curve::{KeyPair, SecretScalar};
use crate::group::{AcceptedGroupKey, SignedGroupInfo};
use crate::ids::{Epoch, GroupId, Role};
use crate::schnorr::VerifyingKey;
use crate::symmetric::{VerifyError, aead_open};

/// A holder's tree state for one (group, role): the epoch it holds, W, its leaf and the keys of
/// its path (leaf first). Keys are zeroized when dropped; store it with the group keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeHolder {
    group: GroupId,
    role: Role,
    epoch: Epoch,
    width: u32,
    leaf: u32,
    path: Vec<(u32, NodeKey)>,
}

/// What a holder adopted from a notice: the verified new group key, and the number of AEAD
/// openings it took (at most log2(W) + 1).
#[derive(Clone, Debug)]
pub struct TreeAdopted {
    key: AcceptedGroupKey,
    openings: usize,
}

impl TreeAdopted {
    /// X_new with the verified group info of its epoch.
    pub fn key(&self) -> &AcceptedGroupKey {
        &self.key
    }

    /// Consumes the result, keeping the key.
    pub fn into_key(self) -> AcceptedGroupKey {
        self.key
    }

    /// AEAD openings spent: path wraps plus the root wrap.
    pub fn openings(&self) -> usize {
        self.openings
    }
}

impl TreeHolder {
    /// Starts from a joiner's key set (delivered with the signed info of its epoch): checks the
    /// CA's signature, the group, and X·G against the info's key for `role` (Q_P for
    /// subscribers, Q_S for publishers).
    ///
    /// # Errors
    /// [`TreeError::Verify`] for a bad signature or a key that does not match,
    /// [`TreeError::WrongGroup`].
    pub fn from_key_set(
        q_ca: &VerifyingKey,
        signed: &SignedGroupInfo,
        group: &GroupId,
        role: Role,
        set: &TreeKeySet,
    ) -> Result<(Self, AcceptedGroupKey), TreeError> {
        let info = signed.verify(q_ca)?;
        if &info.group != group {
            return Err(TreeError::WrongGroup("tree key set"));
        }
        let key = KeyPair::from_secret(set.x().clone());
        if key.public() != info.held_public_key(role) {
            return Err(TreeError::Verify(VerifyError));
        }
        let holder = TreeHolder {
            group: info.group.clone(),
            role,
            epoch: info.epoch,
            width: set.width(),
            leaf: set.leaf(),
            path: set.path().to_vec(),
        };
        Ok((
            holder,
            AcceptedGroupKey::new_verified(signed.clone(), role, key),
        ))
    }

    /// Restores a stored state (the device's key store).
    ///
    /// # Errors
    /// [`TreeError::Inconsistent`] unless `path` holds exactly the nodes of `leaf`'s path in a
    /// width-`width` tree, leaf first.
    pub fn from_parts(
        group: GroupId,
        role: Role,
        epoch: Epoch,
        width: u32,
        leaf: u32,
        path: Vec<(u32, NodeKey)>,
    ) -> Result<Self, TreeError> {
        let nodes = index::path(leaf, width);
        if nodes.is_empty() || !path.iter().map(|(n, _)| *n).eq(nodes) {
            return Err(TreeError::Inconsistent("holder path"));
        }
        Ok(TreeHolder {
            group,
            role,
            epoch,
            width,
            leaf,
            path,
        })
    }

    /// The group.
    pub fn group(&self) -> &GroupId {
        &self.group
    }

    /// The holders' role of this tree.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The epoch whose keys this state holds.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// W as last seen.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// The holder's leaf.
    pub fn leaf(&self) -> u32 {
        self.leaf
    }

    /// The path keys, leaf first (for storage).
    pub fn path(&self) -> &[(u32, NodeKey)] {
        &self.path
    }

    /// Processes the notice of the next epoch bottom-up: a path node with a wrap under its path
    /// child is opened with that child's new key; else a node on a joined leaf's path is one-way
    /// updated; else it is unchanged. Then X_new is opened with the new root key and checked
    /// against the signed info. The new path is adopted only if every step succeeded; on any
    /// error the state is unchanged.
    ///
    /// # Errors
    /// [`TreeError::WrongRole`], [`TreeError::WrongGroup`]; [`TreeError::Verify`] for a bad
    /// signature, a wrap or root wrap that does not open, or an X_new that does not match the
    /// info; [`TreeError::StaleEpoch`] for a notice of an epoch already held or older (ignore
    /// it); [`TreeError::MissedEpoch`] if the notice does not follow the held epoch or re-assigns
    /// this holder's leaf (join again).
    pub fn apply(
        &mut self,
        q_ca: &VerifyingKey,
        notice: &TreeNotice,
    ) -> Result<TreeAdopted, TreeError> {
        if notice.role() != self.role {
            return Err(TreeError::WrongRole("tree notice"));
        }
        let info = notice.signed_info().verify(q_ca)?;
        if info.group != self.group {
            return Err(TreeError::WrongGroup("tree notice"));
        }
        if info.epoch <= self.epoch {
            return Err(TreeError::StaleEpoch);
        }
        if self.epoch.next() != Some(info.epoch)
            || notice.joined_leaves().binary_search(&self.leaf).is_ok()
        {
            return Err(TreeError::MissedEpoch);
        }
        let nodes = index::path(self.leaf, notice.width());
        if notice.width() < self.width || nodes.len() < self.path.len() {
            return Err(TreeError::Verify(VerifyError));
        }
        let ctx = notice.context();
        let aad_h = notice.header();
        let old = |i: usize, x: u32| {
            self.path
                .get(i)
                .filter(|(n, _)| *n == x)
                .map(|(_, k)| k)
                .ok_or(TreeError::Verify(VerifyError))
        };
        let mut openings = 0;
        let mut path: Vec<(u32, NodeKey)> = Vec::with_capacity(nodes.len());
        for (i, &x) in nodes.iter().enumerate() {
            let key = match path.last() {
                // The leaf of a remaining holder never changes.
                None => old(i, x)?.clone(),
                Some((c, child_key)) => {
                    if let Some(wrap) = notice.wrap(x, *c) {
                        openings += 1;
                        let k = ctx.wrap_key(notice.salt(), child_key, x, *c);
                        let plain = aead_open(&k, &aad_h, &wrap.ct)?;
                        let bytes: &[u8; 32] =
                            plain.as_slice().try_into().map_err(|_| VerifyError)?;
                        NodeKey::from_bytes(bytes)
                    } else if notice.on_joined_path(x) {
                        ctx.update(old(i, x)?, x)
                    } else {
                        old(i, x)?.clone()
                    }
                }
            };
            path.push((x, key));
        }
        let (_, root_key) = path.last().ok_or(TreeError::Verify(VerifyError))?;
        openings += 1;
        let k = ctx.root_key(notice.salt(), root_key);
        let plain = aead_open(&k, &notice.root_aad(), notice.root_wrap())?;
        let bytes: Zeroizing<[u8; 32]> =
            Zeroizing::new(plain.as_slice().try_into().map_err(|_| VerifyError)?);
        let x = SecretScalar::from_bytes(&bytes).map_err(|_| VerifyError)?;
        let key = KeyPair::from_secret(x);
        if key.public() != info.held_public_key(self.role) {
            return Err(TreeError::Verify(VerifyError));
        }
        self.epoch = info.epoch;
        self.width = notice.width();
        self.path = path;
        Ok(TreeAdopted {
            key: AcceptedGroupKey::new_verified(notice.signed_info().clone(), self.role, key),
            openings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{Sim, id};
    use super::*;
    use crate::codec::{Decode, Encode};
    use crate::symmetric::aead_seal;

    fn setup() -> Sim {
        let mut sim = Sim::new(21, Role::Subscriber);
        sim.step(&[], &["a", "b", "c", "d", "e"]);
        sim
    }

    /// The next epoch's notice (b leaves), planned and committed, without delivering it.
    fn next_notice(sim: &mut Sim, departed: &[&str]) -> TreeNotice {
        let epoch = sim.tree.epoch().next().unwrap();
        let x = KeyPair::random(&mut sim.rng);
        let signed = sim.signed(epoch, &x);
        let changes = super::super::TreeChanges::leaving(departed.iter().map(|d| id(d)).collect());
        let staged = sim
            .tree
            .plan(&changes, x.secret(), &signed, &mut sim.rng)
            .unwrap();
        let n = staged.notice().unwrap().clone();
        sim.tree.commit(staged).unwrap();
        n
    }

    #[test]
    fn stale_and_missed_epochs() {
        let mut sim = setup();
        let q_ca = sim.ca.verifying_key();
        let a = sim.holders[&id("a")].clone();
        let n2 = next_notice(&mut sim, &["b"]);
        let n3 = next_notice(&mut sim, &[]);
        // Skipping epoch 2: cannot open epoch 3's notice; the state is unchanged.
        let mut h = a.clone();
        assert_eq!(h.apply(&q_ca, &n3).err(), Some(TreeError::MissedEpoch));
        assert_eq!(h, a);
        assert_eq!(h.apply(&q_ca, &n2).unwrap().openings(), 4);
        assert_eq!(h.epoch(), Epoch(2));
        assert_eq!(h.apply(&q_ca, &n2).err(), Some(TreeError::StaleEpoch));
        assert!(h.apply(&q_ca, &n3).is_ok());
        assert_eq!(h.apply(&q_ca, &n2).err(), Some(TreeError::StaleEpoch));
    }

    #[test]
    fn rejections_leave_the_state_unchanged() {
        let mut sim = setup();
        let q_ca = sim.ca.verifying_key();
        let a = sim.holders[&id("a")].clone();
        let n = next_notice(&mut sim, &["b"]);
        // The other role's notice (role byte flipped; the wraps' associated data changes too).
        let mut bytes = n.to_bytes();
        bytes[2] = Role::Publisher.to_u8();
        let other_role = TreeNotice::from_bytes(&bytes).unwrap();
        let mut h = a.clone();
        assert_eq!(
            h.apply(&q_ca, &other_role).err(),
            Some(TreeError::WrongRole("tree notice"))
        );
        // Another CA.
        let other_ca = KeyPair::random(&mut sim.rng);
        assert_eq!(
            h.apply(&other_ca.verifying_key(), &n).err(),
            Some(TreeError::Verify(VerifyError))
        );
        // Another group's holder state.
        let mut elsewhere = TreeHolder::from_parts(
            GroupId::new("other").unwrap(),
            a.role(),
            a.epoch(),
            a.width(),
            a.leaf(),
            a.path().to_vec(),
        )
        .unwrap();
        assert_eq!(
            elsewhere.apply(&q_ca, &n).err(),
            Some(TreeError::WrongGroup("tree notice"))
        );
        // A root wrap carrying a key that does not match the signed info: opened, refused.
        let mut forged = n.clone();
        let root = sim.tree.key(index::root(n.width())).unwrap().clone();
        let wrong = SecretScalar::random(&mut sim.rng);
        let k = forged.context().root_key(forged.salt(), &root);
        let ct = aead_seal(&k, &forged.root_aad(), &wrong.to_bytes()[..]);
        forged.root_wrap.copy_from_slice(&ct);
        assert_eq!(
            h.apply(&q_ca, &forged).err(),
            Some(TreeError::Verify(VerifyError))
        );
        assert_eq!(h, a);
        assert!(h.apply(&q_ca, &n).is_ok());
    }

    #[test]
    fn any_changed_byte_is_refused() {
        let mut sim = setup();
        let q_ca = sim.ca.verifying_key();
        let a = sim.holders[&id("a")].clone();
        let e = sim.holders[&id("e")].clone();
        // A leave and a join in one epoch: wraps, a joined leaf and a one-way update.
        let epoch = sim.tree.epoch().next().unwrap();
        let x = KeyPair::random(&mut sim.rng);
        let signed = sim.signed(epoch, &x);
        let changes = super::super::TreeChanges {
            departed: vec![id("b")],
            joined: vec![id("f"), id("g")],
        };
        let staged = sim
            .tree
            .plan(&changes, x.secret(), &signed, &mut sim.rng)
            .unwrap();
        let n = staged.notice().unwrap().clone();
        assert!(!n.wraps().is_empty() && !n.joined_leaves().is_empty());
        let bytes = n.to_bytes();
        for h in [&a, &e] {
            assert!(h.clone().apply(&q_ca, &n).is_ok());
            for i in 0..bytes.len() {
                for mask in [0x01u8, 0x80] {
                    let mut bad = bytes.clone();
                    bad[i] ^= mask;
                    let mut copy = h.clone();
                    let ok =
                        TreeNotice::from_bytes(&bad).is_ok_and(|n| copy.apply(&q_ca, &n).is_ok());
                    assert!(!ok, "flipped byte {i} applied");
                    assert_eq!(&copy, h);
                }
            }
        }
    }

    #[test]
    fn key_sets_are_checked_against_the_info() {
        let mut sim = setup();
        let q_ca = sim.ca.verifying_key();
        let x = KeyPair::random(&mut sim.rng);
        let epoch = sim.tree.epoch().next().unwrap();
        let signed = sim.signed(epoch, &x);
        let set = sim.tree.key_set(&id("a"), x.secret()).unwrap();
        let group = sim.tree.group().clone();
        assert!(TreeHolder::from_key_set(&q_ca, &signed, &group, Role::Subscriber, &set).is_ok());
        // X is d_P: a publisher's check (Q_S) refuses it.
        assert_eq!(
            TreeHolder::from_key_set(&q_ca, &signed, &group, Role::Publisher, &set).err(),
            Some(TreeError::Verify(VerifyError))
        );
        let other = GroupId::new("other").unwrap();
        assert_eq!(
            TreeHolder::from_key_set(&q_ca, &signed, &other, Role::Subscriber, &set).err(),
            Some(TreeError::WrongGroup("tree key set"))
        );
        let r = SecretScalar::random(&mut sim.rng);
        let wrong = sim.tree.key_set(&id("a"), &r).unwrap();
        assert!(
            TreeHolder::from_key_set(&q_ca, &signed, &group, Role::Subscriber, &wrong).is_err()
        );
        assert!(TreeHolder::from_parts(group, Role::Subscriber, epoch, 8, 0, Vec::new()).is_err());
    }
}
