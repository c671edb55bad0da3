//! The CA's key tree of one (group, role) and its epoch planner, PROTOCOL.md §5.1.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rand_core::CryptoRngCore;

use super::index::{self, MAX_WIDTH};
use super::{
    NodeKey, SALT_LEN, TREE_WRAP_LEN, TreeContext, TreeError, TreeKeySet, TreeNotice, TreeWrap,
};
use crate::curve::{Point, SecretScalar};
use crate::group::SignedGroupInfo;
use crate::ids::{DeviceId, Epoch, GroupId, Role};
use crate::symmetric::{VerifyError, aead_seal};

/// One epoch's membership changes of a tree's holders. A share replacement (new certificate)
/// lists the device in both: it departs, then joins with a fresh leaf key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TreeChanges {
    /// Holders that leave (leave, removal, revocation, expiry, or a replaced share).
    pub departed: Vec<DeviceId>,
    /// New holders, in any order: they take leaves in byte order of their IDs.
    pub joined: Vec<DeviceId>,
}

impl TreeChanges {
    /// No membership change (a periodic rekey, or X changed because the other role changed).
    pub fn none() -> Self {
        Self::default()
    }

    /// Only joins.
    pub fn joining(joined: Vec<DeviceId>) -> Self {
        TreeChanges {
            departed: Vec::new(),
            joined,
        }
    }

    /// Only departures.
    pub fn leaving(departed: Vec<DeviceId>) -> Self {
        TreeChanges {
            departed,
            joined: Vec::new(),
        }
    }
}

/// The CA's key tree for one group and one role-key X: W, the node keys (secret, zeroized) and
/// which leaf each holder sits on. A node has a key exactly when a holder sits below it.
#[derive(Clone)]
pub struct KeyTree {
    group: GroupId,
    role: Role,
    epoch: Epoch,
    width: u32,
    keys: Vec<Option<NodeKey>>,
    /// Holders below each node (the leaf itself for a leaf node).
    counts: Vec<u32>,
    leaves: Vec<Option<DeviceId>>,
    by_id: HashMap<DeviceId, u32>,
    /// Blank leaves below W.
    free: BTreeSet<u32>,
}

impl core::fmt::Debug for KeyTree {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("KeyTree")
            .field("group", &self.group)
            .field("role", &self.role)
            .field("epoch", &self.epoch)
            .field("width", &self.width)
            .field("holders", &self.by_id.len())
            .finish_non_exhaustive()
    }
}

/// A planned epoch of one tree: the notice, the joiners' key sets and the rows to write. Apply
/// it with [`KeyTree::commit`] once it is durably stored, then publish the notice.
#[derive(Debug)]
pub struct StagedTree {
    from_epoch: Epoch,
    epoch: Epoch,
    width_before: u32,
    width: u32,
    nodes: Vec<(u32, Option<NodeKey>)>,
    leaves: Vec<(u32, Option<DeviceId>)>,
    notice: Option<TreeNotice>,
    key_sets: Vec<(DeviceId, TreeKeySet)>,
}

impl StagedTree {
    /// The epoch E+1 this change produces.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// W after the change.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// The node keys that change, by increasing node index: `Some` for a new or updated key,
    /// `None` for a node that became blank (delete its row). O(log n) per departure or join.
    pub fn node_changes(&self) -> &[(u32, Option<NodeKey>)] {
        &self.nodes
    }

    /// The leaves that change, by increasing leaf: `Some(holder)` for a joined leaf, `None` for a
    /// departed one that no joiner took.
    pub fn leaf_changes(&self) -> &[(u32, Option<DeviceId>)] {
        &self.leaves
    }

    /// The kind-3 notice to publish (retained) on the role's key topic, or `None` when the tree
    /// has no holder after the change.
    pub fn notice(&self) -> Option<&TreeNotice> {
        self.notice.as_ref()
    }

    /// Each joiner's key set, in join order (byte order of the IDs).
    pub fn key_sets(&self) -> &[(DeviceId, TreeKeySet)] {
        &self.key_sets
    }

    /// The key set of joiner `id`.
    pub fn key_set(&self, id: &DeviceId) -> Option<&TreeKeySet> {
        self.key_sets.iter().find(|(j, _)| j == id).map(|(_, s)| s)
    }
}

impl KeyTree {
    /// An empty tree (W = 1, no holder) holding the keys of `epoch`.
    pub fn new(group: GroupId, role: Role, epoch: Epoch) -> Self {
        KeyTree {
            group,
            role,
            epoch,
            width: 1,
            keys: vec![None],
            counts: vec![0],
            leaves: vec![None],
            by_id: HashMap::new(),
            free: BTreeSet::from([0]),
        }
    }

    /// Restores a stored tree: W, the holders with their leaves, and the key of every non-blank
    /// node.
    ///
    /// # Errors
    /// [`TreeError::Inconsistent`] unless W is a valid width, leaves are distinct and below W,
    /// IDs are distinct, and exactly the nodes with a holder below them have a key.
    pub fn from_parts(
        group: GroupId,
        role: Role,
        epoch: Epoch,
        width: u32,
        holders: impl IntoIterator<Item = (DeviceId, u32)>,
        nodes: impl IntoIterator<Item = (u32, NodeKey)>,
    ) -> Result<Self, TreeError> {
        if !index::valid_width(width) {
            return Err(TreeError::Inconsistent("width"));
        }
        let n = index::node_count(width) as usize;
        let mut tree = KeyTree {
            group,
            role,
            epoch,
            width,
            keys: vec![None; n],
            counts: vec![0; n],
            leaves: vec![None; width as usize],
            by_id: HashMap::new(),
            free: (0..width).collect(),
        };
        for (id, leaf) in holders {
            let slot = tree
                .leaves
                .get_mut(leaf as usize)
                .ok_or(TreeError::Inconsistent("leaf"))?;
            if slot.is_some() || tree.by_id.contains_key(&id) {
                return Err(TreeError::Inconsistent("holder"));
            }
            *slot = Some(id.clone());
            tree.by_id.insert(id, leaf);
            tree.free.remove(&leaf);
            tree.add_count(leaf, 1);
        }
        for (node, key) in nodes {
            let slot = tree
                .keys
                .get_mut(node as usize)
                .ok_or(TreeError::Inconsistent("node"))?;
            if slot.replace(key).is_some() {
                return Err(TreeError::Inconsistent("node"));
            }
        }
        let ok = tree
            .keys
            .iter()
            .zip(&tree.counts)
            .all(|(k, c)| k.is_some() == (*c > 0));
        if ok {
            Ok(tree)
        } else {
            Err(TreeError::Inconsistent("node keys"))
        }
    }

    /// The group.
    pub fn group(&self) -> &GroupId {
        &self.group
    }

    /// The holders' role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The epoch whose tree this is.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// W.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// The number of holders.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether the tree has no holder.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The leaf of holder `id`.
    pub fn leaf_of(&self, id: &DeviceId) -> Option<u32> {
        self.by_id.get(id).copied()
    }

    /// The holders with their leaves, by increasing leaf.
    pub fn holders(&self) -> impl Iterator<Item = (u32, &DeviceId)> {
        (0u32..)
            .zip(&self.leaves)
            .filter_map(|(l, h)| h.as_ref().map(|h| (l, h)))
    }

    /// The key of `node`, if it is not blank.
    pub fn key(&self, node: u32) -> Option<&NodeKey> {
        self.keys.get(node as usize).and_then(Option::as_ref)
    }

    /// Every non-blank node with its key, by increasing index (to store the whole tree).
    pub fn node_keys(&self) -> impl Iterator<Item = (u32, &NodeKey)> {
        (0u32..)
            .zip(&self.keys)
            .filter_map(|(n, k)| k.as_ref().map(|k| (n, k)))
    }

    /// The current key set of holder `id` with the current X: for a member that asks again with
    /// the share it already joined with (PROTOCOL.md §4, no rekey).
    ///
    /// # Errors
    /// [`TreeError::UnknownHolder`] if `id` holds no leaf.
    pub fn key_set(&self, id: &DeviceId, x: &SecretScalar) -> Result<TreeKeySet, TreeError> {
        let leaf = self.leaf_of(id).ok_or(TreeError::UnknownHolder)?;
        let path = index::path(leaf, self.width)
            .into_iter()
            .map(|n| {
                Ok((
                    n,
                    self.key(n).ok_or(TreeError::Inconsistent("path"))?.clone(),
                ))
            })
            .collect::<Result<Vec<_>, TreeError>>()?;
        Ok(TreeKeySet::new(x.clone(), self.width, leaf, path)?)
    }

    /// Plans epoch E+1 for `changes`: new W and leaves, fresh and one-way updated node keys,
    /// the kind-3 notice carrying X_new (`x_new`, whose public key must be the one `signed`
    /// states for this role) and each joiner's key set. Fresh node keys and the salt come from
    /// `rng`. Nothing changes until [`KeyTree::commit`].
    ///
    /// # Errors
    /// [`TreeError::WrongGroup`]; [`TreeError::EpochMismatch`] unless `signed` is of the epoch
    /// after the tree's; [`TreeError::Verify`] if X_new does not match it;
    /// [`TreeError::UnknownHolder`], [`TreeError::DuplicateHolder`], [`TreeError::TreeFull`].
    pub fn plan(
        &self,
        changes: &TreeChanges,
        x_new: &SecretScalar,
        signed: &SignedGroupInfo,
        rng: &mut impl CryptoRngCore,
    ) -> Result<StagedTree, TreeError> {
        let mut salt = [0u8; SALT_LEN];
        rng.fill_bytes(&mut salt);
        self.plan_with(changes, x_new, signed, salt, &mut || NodeKey::random(rng))
    }

    /// As [`KeyTree::plan`] with the given salt, and fresh node keys taken from `fresh` in
    /// increasing node index order (test vectors). Both must be fresh random values.
    ///
    /// # Errors
    /// As [`KeyTree::plan`].
    pub fn plan_with(
        &self,
        changes: &TreeChanges,
        x_new: &SecretScalar,
        signed: &SignedGroupInfo,
        salt: [u8; SALT_LEN],
        fresh: &mut dyn FnMut() -> NodeKey,
    ) -> Result<StagedTree, TreeError> {
        let info = signed.info_unverified();
        if info.group != self.group {
            return Err(TreeError::WrongGroup("tree plan"));
        }
        if self.epoch.next() != Some(info.epoch) {
            return Err(TreeError::EpochMismatch);
        }
        if &Point::mul_base(x_new) != info.held_public_key(self.role) {
            return Err(TreeError::Verify(VerifyError));
        }
        let ctx = TreeContext {
            group: &self.group,
            role: self.role,
            epoch: info.epoch,
        };

        // Departures blank their leaves; joiners, by ID bytes, take the lowest blank leaves.
        let mut departed = Vec::with_capacity(changes.departed.len());
        let mut departing = BTreeSet::new();
        for id in &changes.departed {
            let leaf = self.leaf_of(id).ok_or(TreeError::UnknownHolder)?;
            if !departing.insert(id) {
                return Err(TreeError::DuplicateHolder);
            }
            departed.push(leaf);
        }
        departed.sort_unstable();
        let mut joiners: Vec<&DeviceId> = changes.joined.iter().collect();
        joiners.sort_unstable();
        if joiners.windows(2).any(|w| w[0] == w[1])
            || joiners
                .iter()
                .any(|id| self.by_id.contains_key(*id) && !departing.contains(id))
        {
            return Err(TreeError::DuplicateHolder);
        }
        let taken = self.take_leaves(&departed, joiners.len())?;
        let mut width = self.width;
        if let Some(&last) = taken.last() {
            while last >= width {
                width = width
                    .checked_mul(2)
                    .filter(|w| *w <= MAX_WIDTH)
                    .ok_or(TreeError::TreeFull)?;
            }
        }
        let view = View {
            tree: self,
            width,
            departed: &departed,
            joined: &taken,
        };

        // R, J and what becomes blank, then the new keys.
        let mut fresh_nodes = BTreeSet::new();
        let mut on_joined = BTreeSet::new();
        let mut blanked = BTreeSet::new();
        for &leaf in &departed {
            for x in index::path(leaf, width) {
                if view.count_after(x) > 0 {
                    if !index::is_leaf(x) {
                        fresh_nodes.insert(x);
                    }
                } else if !view.blank_before(x) {
                    blanked.insert(x);
                }
            }
        }
        for &leaf in &taken {
            for x in index::path(leaf, width) {
                if index::is_leaf(x) || view.blank_before(x) {
                    fresh_nodes.insert(x);
                } else {
                    on_joined.insert(x);
                }
            }
        }
        let mut new_keys: BTreeMap<u32, NodeKey> = BTreeMap::new();
        for &x in &fresh_nodes {
            new_keys.insert(x, fresh());
        }
        for &x in on_joined.difference(&fresh_nodes) {
            let old = self.key(x).ok_or(TreeError::Inconsistent("joined path"))?;
            new_keys.insert(x, ctx.update(old, x));
        }
        let key_after = |x: u32| -> Result<&NodeKey, TreeError> {
            new_keys
                .get(&x)
                .or_else(|| self.key(x).filter(|_| !blanked.contains(&x)))
                .ok_or(TreeError::Inconsistent("node key"))
        };

        // The notice: wraps for every fresh non-leaf node to each child with a remaining holder.
        let root = index::root(width);
        let notice = if view.count_after(root) == 0 {
            None
        } else {
            let mut notice = TreeNotice {
                role: self.role,
                signed: signed.clone(),
                salt,
                width,
                joined: taken.clone(),
                wraps: Vec::new(),
                root_wrap: [0u8; TREE_WRAP_LEN],
            };
            let aad_h = notice.header();
            for &x in fresh_nodes.iter().filter(|x| !index::is_leaf(**x)) {
                for c in [index::left(x), index::right(x)].into_iter().flatten() {
                    if view.remaining_below(c) == 0 {
                        continue;
                    }
                    let k = ctx.wrap_key(&salt, key_after(c)?, x, c);
                    notice.wraps.push(TreeWrap {
                        node: x,
                        child: c,
                        ct: sealed_key(&k, &aad_h, key_after(x)?.as_bytes()),
                    });
                }
            }
            notice
                .wraps
                .sort_by_key(|w| (index::level(w.node), w.node, w.child));
            let k = ctx.root_key(&salt, key_after(root)?);
            notice.root_wrap = sealed_key(&k, &notice.root_aad(), &x_new.to_bytes());
            Some(notice)
        };

        let mut key_sets = Vec::with_capacity(taken.len());
        for (id, &leaf) in joiners.iter().zip(&taken) {
            let path = index::path(leaf, width)
                .into_iter()
                .map(|n| Ok((n, key_after(n)?.clone())))
                .collect::<Result<Vec<_>, TreeError>>()?;
            key_sets.push((
                (*id).clone(),
                TreeKeySet::new(x_new.clone(), width, leaf, path)?,
            ));
        }
        let mut leaves: BTreeMap<u32, Option<DeviceId>> =
            departed.iter().map(|&l| (l, None)).collect();
        for (id, &leaf) in joiners.iter().zip(&taken) {
            leaves.insert(leaf, Some((*id).clone()));
        }
        let mut nodes: BTreeMap<u32, Option<NodeKey>> =
            blanked.iter().map(|&n| (n, None)).collect();
        nodes.extend(new_keys.into_iter().map(|(n, k)| (n, Some(k))));
        Ok(StagedTree {
            from_epoch: self.epoch,
            epoch: info.epoch,
            width_before: self.width,
            width,
            nodes: nodes.into_iter().collect(),
            leaves: leaves.into_iter().collect(),
            notice,
            key_sets,
        })
    }

    /// The leaves `n` joiners take: the lowest blank leaves after the departures (the sorted
    /// `departed`), then new leaves from W on (the caller doubles W to fit them).
    fn take_leaves(&self, departed: &[u32], n: usize) -> Result<Vec<u32>, TreeError> {
        let mut out = Vec::with_capacity(n);
        let mut free = self.free.iter().copied().peekable();
        let mut gone = departed.iter().copied().peekable();
        let mut next_new = u64::from(self.width);
        while out.len() < n {
            let leaf = match (free.peek(), gone.peek()) {
                (Some(&a), Some(&b)) if a < b => free.next(),
                (Some(_), Some(_)) | (None, Some(_)) => gone.next(),
                (Some(_), None) => free.next(),
                (None, None) => {
                    let leaf = u32::try_from(next_new)
                        .ok()
                        .filter(|l| *l < MAX_WIDTH)
                        .ok_or(TreeError::TreeFull)?;
                    next_new += 1;
                    Some(leaf)
                }
            };
            out.extend(leaf);
        }
        Ok(out)
    }

    /// Whether `staged` was planned from this tree as it is now, so that
    /// [`KeyTree::commit`] accepts it.
    pub fn follows(&self, staged: &StagedTree) -> bool {
        staged.from_epoch == self.epoch && staged.width_before == self.width
    }

    /// Applies a planned epoch once it is durably stored.
    ///
    /// # Errors
    /// [`TreeError::Inconsistent`] if `staged` was not planned from this tree as it is now (then
    /// nothing changes).
    pub fn commit(&mut self, staged: StagedTree) -> Result<(), TreeError> {
        if !self.follows(&staged) {
            return Err(TreeError::Inconsistent(
                "staged change does not follow the tree",
            ));
        }
        let old_root = index::root(self.width);
        if staged.width > self.width {
            let n = index::node_count(staged.width) as usize;
            self.keys.resize(n, None);
            self.counts.resize(n, 0);
            self.leaves.resize(staged.width as usize, None);
            self.free.extend(self.width..staged.width);
            let below = self.counts.get(old_root as usize).copied().unwrap_or(0);
            let mut x = old_root;
            while x != index::root(staged.width) {
                match index::parent(x) {
                    Some(p) => x = p,
                    None => break,
                }
                if let Some(c) = self.counts.get_mut(x as usize) {
                    *c = below;
                }
            }
            self.width = staged.width;
        }
        for (leaf, holder) in staged.leaves {
            if let Some(old) = self.leaves.get_mut(leaf as usize).and_then(Option::take) {
                // A share replacement may already have put `old` on a lower leaf in this loop.
                if self.by_id.get(&old) == Some(&leaf) {
                    self.by_id.remove(&old);
                }
                self.free.insert(leaf);
                self.add_count(leaf, -1);
            }
            if let Some(id) = holder {
                self.by_id.insert(id.clone(), leaf);
                self.free.remove(&leaf);
                self.add_count(leaf, 1);
                if let Some(slot) = self.leaves.get_mut(leaf as usize) {
                    *slot = Some(id);
                }
            }
        }
        for (node, key) in staged.nodes {
            if let Some(slot) = self.keys.get_mut(node as usize) {
                *slot = key;
            }
        }
        self.epoch = staged.epoch;
        Ok(())
    }

    fn add_count(&mut self, leaf: u32, delta: i32) {
        for x in index::path(leaf, self.width) {
            if let Some(c) = self.counts.get_mut(x as usize) {
                *c = c.saturating_add_signed(delta);
            }
        }
    }

    /// Test helper: every node has a key exactly when a holder sits below it, and the counts,
    /// free list and ID index agree with the leaves.
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        let w = self.width;
        assert_eq!(self.keys.len() as u64, index::node_count(w));
        for x in 0..index::node_count(w) as u32 {
            let (first, end) = index::leaf_span(x);
            let below = (first..end)
                .filter(|l| self.leaves[*l as usize].is_some())
                .count() as u32;
            assert_eq!(self.counts[x as usize], below, "count of node {x}");
            assert_eq!(
                self.keys[x as usize].is_some(),
                below > 0,
                "key of node {x}"
            );
        }
        for (leaf, h) in self.leaves.iter().enumerate() {
            assert_eq!(self.free.contains(&(leaf as u32)), h.is_none());
            if let Some(id) = h {
                assert_eq!(self.by_id[id], leaf as u32);
            }
        }
        assert_eq!(self.by_id.len() + self.free.len(), w as usize);
    }
}

/// The tree after the epoch's leaf changes, computed from the tree before without copying it.
struct View<'a> {
    tree: &'a KeyTree,
    width: u32,
    departed: &'a [u32],
    joined: &'a [u32],
}

impl View<'_> {
    /// Holders below `x` after the changes.
    fn count_after(&self, x: u32) -> u64 {
        let before = self.count_before(x);
        (before + in_span(self.joined, x)).saturating_sub(in_span(self.departed, x))
    }

    /// Holders below `x` before the changes (a node added by doubling covers either the whole
    /// old tree or none of it).
    fn count_before(&self, x: u32) -> u64 {
        let old = self.tree;
        match old.counts.get(x as usize) {
            Some(c) => u64::from(*c),
            None if index::covers(x, 0) => old
                .counts
                .get(index::root(old.width) as usize)
                .map_or(0, |c| u64::from(*c)),
            None => 0,
        }
    }

    /// Remaining holders below `x`: holders after the changes that did not join now.
    fn remaining_below(&self, x: u32) -> u64 {
        self.count_after(x).saturating_sub(in_span(self.joined, x))
    }

    /// Blank, or not existing, before any of the epoch's changes.
    fn blank_before(&self, x: u32) -> bool {
        debug_assert!(index::in_tree(x, self.width));
        self.tree.key(x).is_none()
    }
}

/// How many of the sorted `leaves` sit below `x`.
fn in_span(leaves: &[u32], x: u32) -> u64 {
    let (first, end) = index::leaf_span(x);
    let a = leaves.partition_point(|&l| u64::from(l) < first);
    let b = leaves.partition_point(|&l| u64::from(l) < end);
    (b - a) as u64
}

/// AEAD_K(32-byte key, aad).
fn sealed_key(k: &[u8; 32], aad: &[u8], plain: &[u8; 32]) -> [u8; TREE_WRAP_LEN] {
    let ct = aead_seal(k, aad, plain);
    let mut out = [0u8; TREE_WRAP_LEN];
    // INVARIANT: sealing 32 bytes yields exactly 32 + TAG_LEN bytes.
    if let Some(bytes) = ct.get(..TREE_WRAP_LEN) {
        out.copy_from_slice(bytes);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{Sim, id};
    use super::*;
    use crate::codec::{Decode, Encode};
    use crate::curve::KeyPair;

    fn names(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i:03}")).collect()
    }

    fn refs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }

    #[test]
    fn joins_double_the_width_and_take_the_lowest_leaves() {
        let mut sim = Sim::new(1, Role::Subscriber);
        let (n, _) = sim.step(&[], &["b"]);
        assert_eq!(sim.tree.width(), 1);
        assert!(n.unwrap().wraps().is_empty());
        // One joiner: one doubling; the old root (leaf 0) becomes the left child.
        let (n, _) = sim.step(&[], &["c"]);
        let n = n.unwrap();
        assert_eq!((sim.tree.width(), n.joined_leaves()), (2, &[1u32][..]));
        // Node 1 was blank before: fresh, wrapped only to leaf 0 (b remains there).
        assert_eq!(
            n.wraps()
                .iter()
                .map(|w| (w.node, w.child))
                .collect::<Vec<_>>(),
            [(1, 0)]
        );
        // Two joiners at W = 2 full: W = 4, then they take leaves 2 and 3 in ID order.
        let (n, _) = sim.step(&[], &["e", "d"]);
        assert_eq!(sim.tree.width(), 4);
        assert_eq!(n.unwrap().joined_leaves(), &[2, 3]);
        assert_eq!(sim.tree.leaf_of(&id("d")), Some(2));
        assert_eq!(sim.tree.leaf_of(&id("e")), Some(3));
        // Two doublings in one epoch: 4 holders + 5 joiners → W = 16.
        let (n, _) = sim.step(&[], &["f", "g", "h", "i", "j"]);
        assert_eq!(sim.tree.width(), 16);
        assert_eq!(n.unwrap().joined_leaves(), &[4, 5, 6, 7, 8]);
    }

    #[test]
    fn a_leave_rewraps_the_path_and_excludes_the_leaver() {
        let mut sim = Sim::new(2, Role::Publisher);
        let all = names("p", 16);
        sim.step(&[], &refs(&all));
        let before: Vec<(u32, [u8; 32])> = sim
            .tree
            .node_keys()
            .map(|(n, k)| (n, *k.as_bytes()))
            .collect();
        let (n, gone) = sim.step(&["p005"], &[]);
        let n = n.unwrap();
        // Leaf 5 = node 10; its path 10, 9, 11, 7, 15 → R = {9, 11, 7, 15}: one wrap for 9
        // (to leaf 8, leaf 10 is gone), two each for 11, 7 and 15: 7 = 2·log2(16) − 1.
        let pairs: Vec<(u32, u32)> = n.wraps().iter().map(|w| (w.node, w.child)).collect();
        assert_eq!(
            pairs,
            [
                (9, 8),
                (11, 9),
                (11, 13),
                (7, 3),
                (7, 11),
                (15, 7),
                (15, 23)
            ]
        );
        assert!(n.wraps().len() <= 2 * 4);
        assert!(sim.tree.key(10).is_none());
        // Every key the leaver held is re-drawn; all others are unchanged.
        for (node, old) in before {
            let now = sim.tree.key(node).map(|k| *k.as_bytes());
            if [10, 9, 11, 7, 15].contains(&node) {
                assert_ne!(now, Some(old), "node {node}");
            } else {
                assert_eq!(now, Some(old), "node {node}");
            }
        }
        // The leaver cannot open the notice.
        let mut leaver = gone.into_iter().next().unwrap();
        assert!(leaver.apply(&sim.ca.verifying_key(), &n).is_err());
        assert_eq!(leaver.epoch(), Epoch(1));
    }

    #[test]
    fn a_joiner_reuses_a_departed_leaf_in_the_same_epoch() {
        let mut sim = Sim::new(3, Role::Subscriber);
        sim.step(&[], &["a", "b", "c", "d"]);
        let (n, _) = sim.step(&["b"], &["z"]);
        assert_eq!(n.unwrap().joined_leaves(), &[1]);
        assert_eq!(sim.tree.width(), 4);
        assert_eq!(sim.tree.leaf_of(&id("z")), Some(1));
        // A blank leaf from an earlier epoch is the lowest blank leaf next time.
        sim.step(&["a"], &[]);
        let (n, _) = sim.step(&[], &["y", "x"]);
        assert_eq!(n.unwrap().joined_leaves(), &[0, 4]);
        assert_eq!(sim.tree.leaf_of(&id("x")), Some(0));
        assert_eq!(sim.tree.width(), 8);
    }

    #[test]
    fn a_share_replacement_is_a_departure_and_a_join() {
        let mut sim = Sim::new(4, Role::Subscriber);
        sim.step(&[], &["a", "b", "c"]);
        let old_leaf_key = *sim.tree.key(2).unwrap().as_bytes();
        let (n, gone) = sim.step(&["b"], &["b"]);
        let n = n.unwrap();
        assert_eq!(n.joined_leaves(), &[1]);
        assert_ne!(sim.tree.key(2).unwrap().as_bytes(), &old_leaf_key);
        // The old share's state cannot open it: its leaf was re-assigned.
        let mut old = gone.into_iter().next().unwrap();
        assert_eq!(
            old.apply(&sim.ca.verifying_key(), &n).err(),
            Some(TreeError::MissedEpoch)
        );
    }

    /// A replaced share that moves to a lower leaf freed in the same epoch keeps its holder
    /// entry when its old leaf is blanked after it (found by the group-state property test).
    #[test]
    fn a_replaced_share_moving_to_a_lower_leaf_stays_a_holder() {
        let mut sim = Sim::new(6, Role::Publisher);
        sim.step(&[], &["a", "b"]);
        let (n, _) = sim.step(&["a", "b"], &["b"]);
        assert_eq!(n.unwrap().joined_leaves(), &[0]);
        assert_eq!(sim.tree.leaf_of(&id("b")), Some(0));
        assert_eq!(sim.tree.len(), 1);
    }

    #[test]
    fn periodic_changes_x_but_no_tree_key() {
        let mut sim = Sim::new(5, Role::Publisher);
        sim.step(&[], &refs(&names("p", 5)));
        let before: Vec<(u32, [u8; 32])> = sim
            .tree
            .node_keys()
            .map(|(n, k)| (n, *k.as_bytes()))
            .collect();
        let (n, _) = sim.step(&[], &[]);
        let n = n.unwrap();
        assert!(n.wraps().is_empty() && n.joined_leaves().is_empty());
        let after: Vec<(u32, [u8; 32])> = sim
            .tree
            .node_keys()
            .map(|(n, k)| (n, *k.as_bytes()))
            .collect();
        assert_eq!(before, after);
        // A fresh salt per notice: two periodic notices use different root wrap keys.
        let (m, _) = sim.step(&[], &[]);
        assert_ne!(n.salt(), m.unwrap().salt());
    }

    #[test]
    fn an_emptied_tree_sends_nothing_and_blanks_every_node() {
        let mut sim = Sim::new(6, Role::Subscriber);
        sim.step(&[], &["a", "b", "c"]);
        let (n, _) = sim.step(&["a", "b", "c"], &[]);
        assert!(n.is_none());
        assert_eq!(sim.tree.node_keys().count(), 0);
        assert_eq!(sim.tree.width(), 4);
        let (n, _) = sim.step(&[], &[]);
        assert!(n.is_none());
        // Joining an empty tree again: fresh keys everywhere, leaf 0.
        let (n, _) = sim.step(&[], &["d"]);
        assert_eq!(n.unwrap().joined_leaves(), &[0]);
    }

    #[test]
    fn node_changes_are_the_rows_to_write() {
        let mut sim = Sim::new(7, Role::Subscriber);
        let all = names("s", 64);
        sim.step(&[], &refs(&all));
        let epoch = sim.tree.epoch().next().unwrap();
        let x = KeyPair::random(&mut sim.rng);
        let signed = sim.signed(epoch, &x);
        let changes = TreeChanges {
            departed: vec![id("s010")],
            joined: vec![id("new")],
        };
        let staged = sim
            .tree
            .plan(&changes, x.secret(), &signed, &mut sim.rng)
            .unwrap();
        // O(log n) rows: the re-drawn path of leaf 10, which the joiner takes again.
        let rows: Vec<u32> = staged.node_changes().iter().map(|(n, _)| *n).collect();
        assert_eq!(
            rows,
            index::path(10, 64)
                .into_iter()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
        );
        assert!(staged.node_changes().iter().all(|(_, k)| k.is_some()));
        assert_eq!(staged.leaf_changes(), &[(10, Some(id("new")))]);
        let mut copy = sim.tree.clone();
        copy.commit(staged).unwrap();
        // Storage round trip: the committed tree rebuilt from its rows plans identically.
        let rebuilt = KeyTree::from_parts(
            copy.group().clone(),
            copy.role(),
            copy.epoch(),
            copy.width(),
            copy.holders().map(|(l, h)| (h.clone(), l)),
            copy.node_keys().map(|(n, k)| (n, k.clone())),
        )
        .unwrap();
        rebuilt.check_invariants();
        let x2 = KeyPair::random(&mut sim.rng);
        let signed2 = sim.signed(epoch.next().unwrap(), &x2);
        let plan = |t: &KeyTree| {
            let mut n = 0u8;
            t.plan_with(
                &TreeChanges::leaving(vec![id("s020")]),
                x2.secret(),
                &signed2,
                [9; SALT_LEN],
                &mut || {
                    n += 1;
                    NodeKey::from_bytes(&[n; 32])
                },
            )
            .unwrap()
            .notice()
            .unwrap()
            .to_bytes()
        };
        assert_eq!(plan(&copy), plan(&rebuilt));
    }

    #[test]
    fn from_parts_rejects_inconsistent_trees() {
        let g = GroupId::new("g").unwrap();
        let k = || NodeKey::from_bytes(&[1; 32]);
        let build = |w, holders: Vec<(&str, u32)>, nodes: Vec<u32>| {
            KeyTree::from_parts(
                g.clone(),
                Role::Subscriber,
                Epoch(3),
                w,
                holders.into_iter().map(|(i, l)| (id(i), l)),
                nodes.into_iter().map(|n| (n, k())),
            )
        };
        assert!(build(2, vec![("a", 0)], vec![0, 1]).is_ok());
        assert!(build(3, vec![], vec![]).is_err());
        assert!(build(2, vec![("a", 2)], vec![0, 1]).is_err());
        assert!(build(2, vec![("a", 0), ("b", 0)], vec![0, 1]).is_err());
        assert!(build(2, vec![("a", 0), ("a", 1)], vec![0, 1, 2]).is_err());
        assert!(build(2, vec![("a", 0)], vec![0]).is_err(), "missing key");
        assert!(
            build(2, vec![("a", 0)], vec![0, 1, 2]).is_err(),
            "key on a blank node"
        );
        assert!(build(2, vec![("a", 0)], vec![0, 1, 1]).is_err(), "twice");
        assert!(build(2, vec![("a", 0)], vec![0, 1, 7]).is_err(), "outside");
    }

    #[test]
    fn planning_refuses_bad_input() {
        let mut sim = Sim::new(8, Role::Subscriber);
        sim.step(&[], &["a", "b"]);
        let epoch = sim.tree.epoch().next().unwrap();
        let x = KeyPair::random(&mut sim.rng);
        let signed = sim.signed(epoch, &x);
        let plan = |sim: &mut Sim,
                    departed: &[&str],
                    joined: &[&str],
                    x: &KeyPair,
                    s: &SignedGroupInfo| {
            let changes = TreeChanges {
                departed: departed.iter().map(|s| id(s)).collect(),
                joined: joined.iter().map(|s| id(s)).collect(),
            };
            sim.tree.plan(&changes, x.secret(), s, &mut sim.rng).err()
        };
        assert_eq!(
            plan(&mut sim, &["zz"], &[], &x, &signed),
            Some(TreeError::UnknownHolder)
        );
        assert_eq!(
            plan(&mut sim, &["a", "a"], &[], &x, &signed),
            Some(TreeError::DuplicateHolder)
        );
        assert_eq!(
            plan(&mut sim, &[], &["c", "c"], &x, &signed),
            Some(TreeError::DuplicateHolder)
        );
        assert_eq!(
            plan(&mut sim, &[], &["a"], &x, &signed),
            Some(TreeError::DuplicateHolder)
        );
        assert_eq!(plan(&mut sim, &["a"], &["a"], &x, &signed), None);
        let wrong = KeyPair::random(&mut sim.rng);
        assert_eq!(
            plan(&mut sim, &[], &[], &wrong, &signed),
            Some(TreeError::Verify(VerifyError))
        );
        let later = sim.signed(epoch.next().unwrap(), &x);
        assert_eq!(
            plan(&mut sim, &[], &[], &x, &later),
            Some(TreeError::EpochMismatch)
        );
        let other = KeyTree::new(GroupId::new("other").unwrap(), Role::Subscriber, Epoch(1));
        assert_eq!(
            other
                .plan(&TreeChanges::none(), x.secret(), &signed, &mut sim.rng)
                .err(),
            Some(TreeError::WrongGroup("tree plan"))
        );
        // A stale staged change is refused and changes nothing.
        let a = sim
            .tree
            .plan(&TreeChanges::none(), x.secret(), &signed, &mut sim.rng)
            .unwrap();
        let b = sim
            .tree
            .plan(&TreeChanges::none(), x.secret(), &signed, &mut sim.rng)
            .unwrap();
        sim.tree.commit(a).unwrap();
        let snapshot = sim
            .tree
            .node_keys()
            .map(|(n, k)| (n, k.clone()))
            .collect::<Vec<_>>();
        assert!(matches!(
            sim.tree.commit(b),
            Err(TreeError::Inconsistent(_))
        ));
        assert_eq!(
            sim.tree
                .node_keys()
                .map(|(n, k)| (n, k.clone()))
                .collect::<Vec<_>>(),
            snapshot
        );
    }

    #[test]
    fn the_width_is_bounded() {
        // A tree whose next joiner would need more than MAX_WIDTH leaves.
        let g = GroupId::new("g").unwrap();
        let tree = KeyTree {
            group: g,
            role: Role::Subscriber,
            epoch: Epoch(0),
            width: MAX_WIDTH,
            keys: Vec::new(),
            counts: Vec::new(),
            leaves: Vec::new(),
            by_id: HashMap::new(),
            free: BTreeSet::new(),
        };
        assert_eq!(tree.take_leaves(&[], 1), Err(TreeError::TreeFull));
        assert_eq!(tree.take_leaves(&[3], 1), Ok(vec![3]));
    }

    #[test]
    fn key_sets_of_current_holders() {
        let mut sim = Sim::new(9, Role::Subscriber);
        sim.step(&[], &["a", "b", "c"]);
        let x = KeyPair::random(&mut sim.rng);
        let set = sim.tree.key_set(&id("c"), x.secret()).unwrap();
        assert_eq!(set.leaf(), 2);
        assert_eq!(set.path(), sim.holders[&id("c")].path());
        assert_eq!(
            sim.tree.key_set(&id("zz"), x.secret()).err(),
            Some(TreeError::UnknownHolder)
        );
        let bytes = set.to_bytes();
        assert_eq!(TreeKeySet::from_bytes(&bytes).unwrap(), set);
    }
}
