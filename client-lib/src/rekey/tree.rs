//! Key trees: O(log n) rekeying of a group key, PROTOCOL.md §5.1 (v1.1).
//!
//! For each group and each role-key X the CA keeps a binary key tree ([`KeyTree`]) whose leaves
//! are the holders of X: the subscribers' tree transports d_P, the publishers' tree d_S. `role`
//! is always the *holders'* role, as in notices. The tree only transports X; the additive group
//! keys of §4 are unchanged.
//!
//! - [`index`]: the array representation (RFC 9420 §4 / Appendix C): leaf ℓ is node 2ℓ, the root
//!   of a width-W tree is W − 1, doubling keeps every index.
//! - CA side: [`KeyTree::plan`] turns an epoch's departures and joiners into a [`StagedTree`]: the
//!   kind-3 [`TreeNotice`], each joiner's [`TreeKeySet`] and the changed node keys (O(log n) rows
//!   to write); [`KeyTree::commit`] applies it once it is durable.
//! - Holder side: a [`TreeHolder`] (W, its leaf and its path keys) processes the notice of the next
//!   epoch bottom-up with [`TreeHolder::apply`] and adopts the new path and X only if every step,
//!   including X·G against the signed group info, succeeded.
//!
//! # Usage
//! ```
//! use quva_client::curve::{KeyPair, SecretScalar};
//! use quva_client::group::{GroupInfo, Privacy, SignedGroupInfo};
//! use quva_client::ids::{DeviceId, Epoch, GroupId, Role};
//! use quva_client::rekey::tree::{KeyTree, TreeChanges, TreeHolder};
//! use rand_core::OsRng;
//!
//! let mut rng = OsRng;
//! let ca = KeyPair::random(&mut rng);
//! let group = GroupId::new("plant/line-3/temp").unwrap();
//! // The signed info of an epoch whose d_P is `x` (normally GroupState's, §4).
//! let info_for = |epoch: u32, x: &KeyPair, rng: &mut OsRng| {
//!     let p = *KeyPair::random(rng).public();
//!     let info = GroupInfo { group: group.clone(), epoch: Epoch(epoch), q_cag_p: p, q_cag_s: p,
//!         q_p: *x.public(), q_s: p, privacy: Privacy::Standard, n_pub: 0, n_sub: 0,
//!         members_digest: [0; 32] };
//!     SignedGroupInfo::sign(&ca, info, rng).unwrap()
//! };
//! let ids: Vec<DeviceId> = ["s1", "s2", "s3"].iter().map(|i| DeviceId::new(i).unwrap()).collect();
//!
//! // Epoch 1: three subscribers join; each receives its key set (inside ECIES, §4).
//! let mut tree = KeyTree::new(group.clone(), Role::Subscriber, Epoch(0));
//! let x1 = KeyPair::random(&mut rng);
//! let signed1 = info_for(1, &x1, &mut rng);
//! let staged = tree.plan(&TreeChanges::joining(ids.clone()), x1.secret(), &signed1, &mut rng)
//!     .unwrap();
//! let mut holders: Vec<TreeHolder> = staged.key_sets().iter().map(|(_, set)| {
//!     TreeHolder::from_key_set(&ca.verifying_key(), &signed1, &group, Role::Subscriber, set)
//!         .unwrap().0
//! }).collect();
//! tree.commit(staged).unwrap();
//!
//! // Epoch 2: s2 leaves. One notice of O(log n) wraps reaches s1 and s3, not s2.
//! let x2 = KeyPair::random(&mut rng);
//! let signed2 = info_for(2, &x2, &mut rng);
//! let staged = tree.plan(&TreeChanges::leaving(vec![ids[1].clone()]), x2.secret(), &signed2,
//!     &mut rng).unwrap();
//! let notice = staged.notice().unwrap().clone();
//! tree.commit(staged).unwrap();
//! for i in [0, 2] {
//!     let adopted = holders[i].apply(&ca.verifying_key(), &notice).unwrap();
//!     assert_eq!(adopted.key().key(), &x2);
//! }
//! assert!(holders[1].apply(&ca.verifying_key(), &notice).is_err());
//! ```

use core::fmt;

use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::codec::{DecodeError, put_u8, put_u32};
use crate::curve::CurveError;
use crate::ids::{Epoch, GroupId, Role};
use crate::symmetric::{VerifyError, kdf};

mod holder;
pub mod index;
mod key_set;
mod key_tree;
mod notice;

pub use holder::{TreeAdopted, TreeHolder};
pub use key_set::TreeKeySet;
pub use key_tree::{KeyTree, StagedTree, TreeChanges};
pub use notice::{TREE_WRAP_LEN, TreeNotice, TreeWrap};

/// The kind byte of a tree notice.
pub const TREE_NOTICE_KIND: u8 = 3;
/// Length of the per-notice salt.
pub const SALT_LEN: usize = 16;

/// Why a key-tree step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TreeError {
    /// Malformed bytes.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A signature, AEAD or key check failed; deliberately says nothing more.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// A curve operation produced a forbidden value.
    #[error(transparent)]
    Curve(#[from] CurveError),
    /// The notice or key set is for the other role.
    #[error("wrong role in {0}")]
    WrongRole(&'static str),
    /// The notice or key set is for another group.
    #[error("wrong group in {0}")]
    WrongGroup(&'static str),
    /// The notice is of an epoch the holder already holds, or an older one: ignore it.
    #[error("epoch already held")]
    StaleEpoch,
    /// The notice does not follow the held epoch (an epoch was missed and its notice
    /// overwritten), or names the holder's own leaf as re-joined: it cannot be opened. Join
    /// again with `quva-gk` (PROTOCOL.md §4) to receive the whole path.
    #[error("cannot open: missed an epoch, join again")]
    MissedEpoch,
    /// The epoch counter is at `u32::MAX`, or the planned epoch does not follow the tree's.
    #[error("epoch does not follow the tree's")]
    EpochMismatch,
    /// A departure names no holder of this tree.
    #[error("departure of a device that holds no leaf")]
    UnknownHolder,
    /// A device appears twice among departures or joiners, or joins while it holds a leaf
    /// (a share replacement is a departure plus a join).
    #[error("device listed twice or already a holder")]
    DuplicateHolder,
    /// The tree would exceed [`index::MAX_WIDTH`] leaves.
    #[error("tree full")]
    TreeFull,
    /// Stored parts or a staged change that do not form a valid tree, or a staged change that
    /// was not planned from the current tree.
    #[error("inconsistent tree: {0}")]
    Inconsistent(&'static str),
}

/// A 32-byte node key of a key tree: zeroized on drop, redacted in `Debug`, compared in
/// constant time.
#[derive(Clone)]
pub struct NodeKey([u8; 32]);

impl NodeKey {
    /// Wraps 32 key bytes (from storage or from an opened wrap).
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        NodeKey(*bytes)
    }

    /// The key bytes, for storage and key sets only.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A fresh random key.
    pub fn random(rng: &mut impl rand_core::CryptoRngCore) -> Self {
        let mut k = [0u8; 32];
        rng.fill_bytes(&mut k);
        let key = NodeKey(k);
        k.zeroize();
        key
    }
}

impl Drop for NodeKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl ZeroizeOnDrop for NodeKey {}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodeKey(<redacted>)")
    }
}

impl ConstantTimeEq for NodeKey {
    fn ct_eq(&self, other: &Self) -> subtle::Choice {
        self.0.ct_eq(&other.0)
    }
}

impl PartialEq for NodeKey {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }
}

impl Eq for NodeKey {}

/// What every tree KDF binds: the group, the holders' role and the new epoch E+1.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TreeContext<'a> {
    pub(crate) group: &'a GroupId,
    pub(crate) role: Role,
    pub(crate) epoch: Epoch,
}

impl TreeContext<'_> {
    fn info(&self, label: &[u8], nodes: &[u32]) -> Vec<u8> {
        let mut info = Vec::with_capacity(label.len() + 2 + self.group.as_str().len() + 13);
        info.extend_from_slice(label);
        self.group.encode(&mut info);
        put_u8(&mut info, self.role.to_u8());
        put_u32(&mut info, self.epoch.0);
        for n in nodes {
            put_u32(&mut info, *n);
        }
        info
    }

    /// The one-way update k' = KDF("", k, "quva/v1/tree-up" || str(group) || u8 role ||
    /// u32 E+1 || u32 node).
    pub(crate) fn update(&self, key: &NodeKey, node: u32) -> NodeKey {
        let out = kdf(
            b"",
            key.as_bytes(),
            &[&self.info(b"quva/v1/tree-up", &[node])],
        );
        NodeKey::from_bytes(&out)
    }

    /// K = KDF(salt, k'_c, "quva/v1/tree-wrap" || str(group) || u8 role || u32 E+1 || u32 x ||
    /// u32 c).
    pub(crate) fn wrap_key(
        &self,
        salt: &[u8; SALT_LEN],
        child_key: &NodeKey,
        node: u32,
        child: u32,
    ) -> Zeroizing<[u8; 32]> {
        kdf(
            salt,
            child_key.as_bytes(),
            &[&self.info(b"quva/v1/tree-wrap", &[node, child])],
        )
    }

    /// K = KDF(salt, k'_root, "quva/v1/tree-root" || str(group) || u8 role || u32 E+1).
    pub(crate) fn root_key(&self, salt: &[u8; SALT_LEN], root: &NodeKey) -> Zeroizing<[u8; 32]> {
        kdf(
            salt,
            root.as_bytes(),
            &[&self.info(b"quva/v1/tree-root", &[])],
        )
    }
}

/// A simulated CA tree with its holders, shared by the tree tests.
#[cfg(test)]
pub(crate) mod testkit {
    use std::collections::BTreeMap;

    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    use super::*;
    use crate::curve::KeyPair;
    use crate::group::{GroupInfo, Privacy, SignedGroupInfo};
    use crate::ids::DeviceId;

    pub struct Sim {
        pub ca: KeyPair,
        pub rng: ChaCha20Rng,
        pub tree: KeyTree,
        pub holders: BTreeMap<DeviceId, TreeHolder>,
        pub notices: Vec<TreeNotice>,
        /// The CA's stored rows, kept only from each epoch's node and leaf changes.
        pub rows: BTreeMap<u32, [u8; 32]>,
        pub leaf_rows: BTreeMap<u32, DeviceId>,
    }

    pub fn id(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    impl Sim {
        pub fn new(seed: u64, role: Role) -> Self {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let ca = KeyPair::random(&mut rng);
            let group = GroupId::new("plant/line-3/temp").unwrap();
            Sim {
                ca,
                rng,
                tree: KeyTree::new(group, role, Epoch(0)),
                holders: BTreeMap::new(),
                notices: Vec::new(),
                rows: BTreeMap::new(),
                leaf_rows: BTreeMap::new(),
            }
        }

        /// A signed info of `epoch` whose key for the tree's role is `x`.
        pub fn signed(&mut self, epoch: Epoch, x: &KeyPair) -> SignedGroupInfo {
            let other = *KeyPair::random(&mut self.rng).public();
            let (q_p, q_s) = match self.tree.role() {
                Role::Subscriber => (*x.public(), other),
                Role::Publisher => (other, *x.public()),
            };
            let info = GroupInfo {
                group: self.tree.group().clone(),
                epoch,
                q_cag_p: other,
                q_cag_s: other,
                q_p,
                q_s,
                privacy: Privacy::Standard,
                n_pub: 0,
                n_sub: 0,
                members_digest: [0; 32],
            };
            SignedGroupInfo::sign(&self.ca, info, &mut self.rng).unwrap()
        }

        /// Plans, commits and delivers one epoch; checks every holder against the CA's tree.
        /// Returns the notice (if any) and the departed holders' last states.
        pub fn step(
            &mut self,
            departed: &[&str],
            joined: &[&str],
        ) -> (Option<TreeNotice>, Vec<TreeHolder>) {
            let changes = TreeChanges {
                departed: departed.iter().map(|s| id(s)).collect(),
                joined: joined.iter().map(|s| id(s)).collect(),
            };
            let epoch = self.tree.epoch().next().unwrap();
            let x = KeyPair::random(&mut self.rng);
            let signed = self.signed(epoch, &x);
            let staged = self
                .tree
                .plan(&changes, x.secret(), &signed, &mut self.rng)
                .unwrap();
            let notice = staged.notice().cloned();
            let sets: Vec<(DeviceId, TreeKeySet)> = staged.key_sets().to_vec();
            // The rows written: O(log W) per departure or join.
            let per_change = staged.width().trailing_zeros() as usize + 1;
            let changed = changes.departed.len() + changes.joined.len();
            assert!(staged.node_changes().len() <= changed * per_change);
            for (n, k) in staged.node_changes() {
                match k {
                    Some(k) => self.rows.insert(*n, *k.as_bytes()),
                    None => self.rows.remove(n),
                };
            }
            for (l, h) in staged.leaf_changes() {
                match h {
                    Some(h) => self.leaf_rows.insert(*l, h.clone()),
                    None => self.leaf_rows.remove(l),
                };
            }
            self.tree.commit(staged).unwrap();
            self.tree.check_invariants();
            // Storing only the changes keeps the stored tree equal to the CA's.
            let stored: BTreeMap<u32, [u8; 32]> = self
                .tree
                .node_keys()
                .map(|(n, k)| (n, *k.as_bytes()))
                .collect();
            assert_eq!(stored, self.rows);
            let leaves: BTreeMap<u32, DeviceId> =
                self.tree.holders().map(|(l, h)| (l, h.clone())).collect();
            assert_eq!(leaves, self.leaf_rows);
            let q_ca = self.ca.verifying_key();
            let mut gone = Vec::new();
            for d in &changes.departed {
                gone.push(self.holders.remove(d).unwrap());
            }
            let w = self.tree.width();
            for (hid, holder) in self.holders.iter_mut() {
                let notice = notice.as_ref().unwrap();
                let adopted = holder.apply(&q_ca, notice).unwrap();
                assert_eq!(adopted.key().key(), &x, "{hid} adopted X_new");
                assert!(adopted.openings() <= w.trailing_zeros() as usize + 1);
            }
            for (jid, set) in sets {
                let (holder, key) = TreeHolder::from_key_set(
                    &q_ca,
                    &signed,
                    self.tree.group(),
                    self.tree.role(),
                    &set,
                )
                .unwrap();
                assert_eq!(key.key(), &x);
                if let Some(n) = &notice {
                    // A joiner ignores the notice of the epoch it joined in.
                    assert_eq!(
                        holder.clone().apply(&q_ca, n).err(),
                        Some(TreeError::StaleEpoch)
                    );
                }
                self.holders.insert(jid, holder);
            }
            for (hid, holder) in &self.holders {
                let leaf = self.tree.leaf_of(hid).unwrap();
                assert_eq!(holder.leaf(), leaf);
                assert_eq!(holder.width(), w);
                assert_eq!(holder.epoch(), epoch);
                let want: Vec<(u32, NodeKey)> = index::path(leaf, w)
                    .into_iter()
                    .map(|n| (n, self.tree.key(n).unwrap().clone()))
                    .collect();
                assert_eq!(holder.path(), &want[..], "{hid}'s path equals the CA's");
            }
            assert_eq!(self.holders.len(), self.tree.len());
            if let Some(n) = &notice {
                self.notices.push(n.clone());
            }
            (notice, gone)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_keys_are_redacted_and_compared_by_value() {
        let a = NodeKey::from_bytes(&[7; 32]);
        assert_eq!(format!("{a:?}"), "NodeKey(<redacted>)");
        assert_eq!(a, NodeKey::from_bytes(&[7; 32]));
        assert_ne!(a, NodeKey::from_bytes(&[8; 32]));
    }

    #[test]
    fn kdf_inputs_are_the_specified_ones() {
        let group = GroupId::new("a/b").unwrap();
        let ctx = TreeContext {
            group: &group,
            role: Role::Subscriber,
            epoch: Epoch(9),
        };
        let k = NodeKey::from_bytes(&[1; 32]);
        let salt = [2u8; SALT_LEN];
        let mut info = b"quva/v1/tree-up\x00\x03a/b\x02\x00\x00\x00\x09\x00\x00\x00\x05".to_vec();
        assert_eq!(ctx.update(&k, 5).as_bytes(), &*kdf(b"", &[1; 32], &[&info]));
        info = b"quva/v1/tree-wrap\x00\x03a/b\x02\x00\x00\x00\x09\x00\x00\x00\x03\x00\x00\x00\x01"
            .to_vec();
        assert_eq!(
            *ctx.wrap_key(&salt, &k, 3, 1),
            *kdf(&salt, &[1; 32], &[&info])
        );
        info = b"quva/v1/tree-root\x00\x03a/b\x02\x00\x00\x00\x09".to_vec();
        assert_eq!(*ctx.root_key(&salt, &k), *kdf(&salt, &[1; 32], &[&info]));
    }

    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::testkit::{Sim, id};
    use crate::symmetric::aead_open;

    /// Whether any wrap or the root wrap of `notice` opens under any of `keys`, or under their
    /// one-way updates for the notice's epoch.
    fn opens_with(notice: &TreeNotice, keys: &[(u32, NodeKey)]) -> bool {
        let ctx = notice.context();
        let mut tries: Vec<NodeKey> = keys.iter().map(|(_, k)| k.clone()).collect();
        tries.extend(keys.iter().map(|(n, k)| ctx.update(k, *n)));
        let aad_h = notice.header();
        let aad_r = notice.root_aad();
        tries.iter().any(|k| {
            notice.wraps().iter().any(|w| {
                aead_open(
                    &ctx.wrap_key(notice.salt(), k, w.node, w.child),
                    &aad_h,
                    &w.ct,
                )
                .is_ok()
            }) || aead_open(&ctx.root_key(notice.salt(), k), &aad_r, notice.root_wrap()).is_ok()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Random epochs of joins and leaves: every remaining holder's path equals the CA's
        /// (checked in `Sim::step`, with ≤ log2(W) + 1 openings); a departed holder opens no
        /// wrap of the epoch it left nor of any later one; a joiner's path keys differ from
        /// every node key of every earlier epoch.
        #[test]
        fn random_epochs_keep_every_holder_in_step(
            seed in any::<u64>(),
            publisher in any::<bool>(),
            epochs in prop::collection::vec(
                (prop::collection::vec(any::<prop::sample::Index>(), 0..4), 0usize..6),
                1..10,
            ),
        ) {
            let role = if publisher { Role::Publisher } else { Role::Subscriber };
            let mut sim = Sim::new(seed, role);
            let mut next = 0u32;
            let mut history: HashSet<[u8; 32]> = HashSet::new();
            let mut departed: Vec<Vec<(u32, NodeKey)>> = Vec::new();
            for (leaves, joins) in epochs {
                let current: Vec<String> =
                    sim.holders.keys().map(|d| d.as_str().to_owned()).collect();
                let mut leaving: Vec<String> = leaves
                    .iter()
                    .filter(|_| !current.is_empty())
                    .map(|i| current[i.index(current.len())].clone())
                    .collect();
                leaving.sort();
                leaving.dedup();
                let joining: Vec<String> = (0..joins)
                    .map(|_| {
                        next += 1;
                        // IDs whose byte order differs from their creation order.
                        format!("d{}", next.wrapping_mul(2_654_435_761))
                    })
                    .collect();
                let lv: Vec<&str> = leaving.iter().map(String::as_str).collect();
                let jn: Vec<&str> = joining.iter().map(String::as_str).collect();
                let (notice, gone) = sim.step(&lv, &jn);
                for g in gone {
                    departed.push(g.path().to_vec());
                }
                if let Some(n) = &notice {
                    for keys in &departed {
                        prop_assert!(!opens_with(n, keys), "a departed holder opened a wrap");
                    }
                }
                for j in &joining {
                    for (_, k) in sim.holders[&id(j)].path() {
                        prop_assert!(!history.contains(k.as_bytes()), "joiner got an old key");
                    }
                }
                history.extend(sim.tree.node_keys().map(|(_, k)| *k.as_bytes()));
            }
        }
    }
}
