//! The tree notice (kind 3), PROTOCOL.md §5.1: `u8 1 || u8 3 || u8 role || ginfo || sig || body`,
//! body = `u32 previous epoch || 16-byte salt || u32 W || u32 n_joined || n_joined × u32 joined
//! leaf || u32 n_wraps || wraps || blob(root wrap)`, each wrap `u32 x || u32 c || blob(ct)`.
//!
//! The decoder accepts only the canonical form, so every notice has one encoding: W a power of
//! two up to [`super::index::MAX_WIDTH`]; joined leaves below W in increasing order (the order in
//! which joiners take them); wraps with x a non-leaf node of the tree and c one of its children,
//! ordered by level(x), then x, then left child first, without repeats; every ciphertext
//! (wraps and root wrap) 48 bytes. Counts are checked against the bytes left before anything is
//! allocated.

use super::index;
use super::{SALT_LEN, TREE_NOTICE_KIND, TreeContext};
use crate::codec::{Decode, DecodeError, Encode, Reader, put_blob, put_u8, put_u32};
use crate::group::SignedGroupInfo;
use crate::ids::{Epoch, Role};
use crate::symmetric::TAG_LEN;

/// Length of every wrap ciphertext: a 32-byte key (or `sc(X_new)`) and the tag.
pub const TREE_WRAP_LEN: usize = 32 + TAG_LEN;
/// Encoded length of one wrap: `u32 x || u32 c || u32 len || ct`.
const WRAP_WIRE_LEN: usize = 4 + 4 + 4 + TREE_WRAP_LEN;

/// One wrap: node `node`'s new key under its child `child`'s new key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeWrap {
    /// x, the node whose fresh key is wrapped.
    pub node: u32,
    /// c, the child of x under whose new key it is wrapped.
    pub child: u32,
    /// AEAD_K(k'_x, aad_h).
    pub ct: [u8; TREE_WRAP_LEN],
}

impl TreeWrap {
    /// The notice order: level(x), then x, then left child first (the smaller index).
    fn order(&self) -> (u32, u32, u32) {
        (index::level(self.node), self.node, self.child)
    }
}

/// A kind-3 notice: the signed group info of epoch E+1 and the wraps that carry the new tree
/// keys and X_new to the remaining holders of `role`. Decoded unverified; a holder applies it
/// with [`super::TreeHolder::apply`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeNotice {
    pub(super) role: Role,
    pub(super) signed: SignedGroupInfo,
    pub(super) salt: [u8; SALT_LEN],
    pub(super) width: u32,
    pub(super) joined: Vec<u32>,
    pub(super) wraps: Vec<TreeWrap>,
    pub(super) root_wrap: [u8; TREE_WRAP_LEN],
}

impl TreeNotice {
    /// The holders' role: publishers receive d_S, subscribers d_P.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The signed info of the new epoch E+1, not yet verified.
    pub fn signed_info(&self) -> &SignedGroupInfo {
        &self.signed
    }

    /// The new epoch E+1 (from the unverified info).
    pub fn epoch(&self) -> Epoch {
        self.signed.info_unverified().epoch
    }

    /// The epoch E this notice follows.
    pub fn previous_epoch(&self) -> Epoch {
        Epoch(self.epoch().0.saturating_sub(1))
    }

    /// The notice's salt.
    pub fn salt(&self) -> &[u8; SALT_LEN] {
        &self.salt
    }

    /// W after the epoch's changes.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// The leaves taken by this epoch's joiners, increasing.
    pub fn joined_leaves(&self) -> &[u32] {
        &self.joined
    }

    /// The wraps, in notice order.
    pub fn wraps(&self) -> &[TreeWrap] {
        &self.wraps
    }

    /// The root wrap AEAD_K(sc(X_new), aad_r).
    pub fn root_wrap(&self) -> &[u8; TREE_WRAP_LEN] {
        &self.root_wrap
    }

    /// The wrap of `node` under `child`, if the notice carries one.
    pub fn wrap(&self, node: u32, child: u32) -> Option<&TreeWrap> {
        let key = (index::level(node), node, child);
        self.wraps
            .binary_search_by_key(&key, TreeWrap::order)
            .ok()
            .and_then(|i| self.wraps.get(i))
    }

    /// Whether `node` lies on the path of a leaf joined in this epoch.
    pub fn on_joined_path(&self, node: u32) -> bool {
        let (first, end) = index::leaf_span(node);
        let i = self.joined.partition_point(|&l| u64::from(l) < first);
        self.joined.get(i).is_some_and(|&l| u64::from(l) < end)
    }

    /// `u8 1 || u8 3 || u8 role || ginfo || sig`: aad_h, the wraps' associated data.
    pub(super) fn header(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(3 + 450);
        put_u8(&mut out, 1);
        put_u8(&mut out, TREE_NOTICE_KIND);
        put_u8(&mut out, self.role.to_u8());
        self.signed.encode(&mut out);
        out
    }

    /// aad_r: every notice byte before `blob(root wrap)`.
    pub(super) fn root_aad(&self) -> Vec<u8> {
        let mut out = self.header();
        out.reserve(4 + SALT_LEN + 12 + 4 * self.joined.len() + WRAP_WIRE_LEN * self.wraps.len());
        put_u32(&mut out, self.previous_epoch().0);
        out.extend_from_slice(&self.salt);
        put_u32(&mut out, self.width);
        put_u32(&mut out, count(self.joined.len()));
        for leaf in &self.joined {
            put_u32(&mut out, *leaf);
        }
        put_u32(&mut out, count(self.wraps.len()));
        for w in &self.wraps {
            put_u32(&mut out, w.node);
            put_u32(&mut out, w.child);
            put_blob(&mut out, &w.ct);
        }
        out
    }

    /// The KDF context of this notice (group, role, E+1), from the unverified info.
    pub(super) fn context(&self) -> TreeContext<'_> {
        TreeContext {
            group: &self.signed.info_unverified().group,
            role: self.role,
            epoch: self.epoch(),
        }
    }
}

/// Counts in a notice are bounded by [`index::MAX_WIDTH`]-sized trees, far below `u32::MAX`.
fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Encode for TreeNotice {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.root_aad());
        put_blob(out, &self.root_wrap);
    }
}

fn ct_array(bytes: &[u8], what: &'static str) -> Result<[u8; TREE_WRAP_LEN], DecodeError> {
    bytes
        .try_into()
        .map_err(|_| DecodeError::InvalidValue(what))
}

impl Decode for TreeNotice {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.version("tree notice")?;
        if r.u8("tree notice kind")? != TREE_NOTICE_KIND {
            return Err(DecodeError::InvalidValue("tree notice kind"));
        }
        let role = Role::read(r, "tree notice role")?;
        let signed = SignedGroupInfo::read(r)?;
        let previous = Epoch(r.u32("tree notice previous epoch")?);
        if previous.next() != Some(signed.info_unverified().epoch) {
            return Err(DecodeError::InvalidValue("tree notice previous epoch"));
        }
        let salt = r.take_array("tree notice salt")?;
        let width = r.u32("tree notice width")?;
        if !index::valid_width(width) {
            return Err(DecodeError::InvalidValue("tree notice width"));
        }
        let n_joined = r.u32("tree notice joined count")?;
        if n_joined > width || n_joined as usize > r.remaining() / 4 {
            return Err(DecodeError::TooLarge("tree notice joined leaves"));
        }
        let mut joined = Vec::with_capacity(n_joined as usize);
        for _ in 0..n_joined {
            let leaf = r.u32("tree notice joined leaf")?;
            if leaf >= width || joined.last().is_some_and(|&prev| prev >= leaf) {
                return Err(DecodeError::InvalidValue("tree notice joined leaf"));
            }
            joined.push(leaf);
        }
        let n_wraps = r.u32("tree notice wrap count")?;
        if n_wraps as usize > r.remaining() / WRAP_WIRE_LEN {
            return Err(DecodeError::TooLarge("tree notice wraps"));
        }
        let mut wraps: Vec<TreeWrap> = Vec::with_capacity(n_wraps as usize);
        for _ in 0..n_wraps {
            let node = r.u32("tree wrap node")?;
            let child = r.u32("tree wrap child")?;
            let ct = ct_array(r.blob("tree wrap ct")?, "tree wrap ct length")?;
            let is_child = index::left(node) == Some(child) || index::right(node) == Some(child);
            if !index::in_tree(node, width) || !is_child {
                return Err(DecodeError::InvalidValue("tree wrap nodes"));
            }
            let wrap = TreeWrap { node, child, ct };
            if wraps
                .last()
                .is_some_and(|prev| prev.order() >= wrap.order())
            {
                return Err(DecodeError::InvalidValue("tree wrap order"));
            }
            wraps.push(wrap);
        }
        let root_wrap = ct_array(r.blob("tree notice root wrap")?, "tree root wrap length")?;
        Ok(TreeNotice {
            role,
            signed,
            salt,
            width,
            joined,
            wraps,
            root_wrap,
        })
    }
}
