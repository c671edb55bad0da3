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

#[cfg(test)]
mod tests {
    use super::super::testkit::Sim;
    use super::*;
    use crate::codec::put_u32;

    /// A notice with wraps and joined leaves (W = 8 after the change), and its header length.
    fn sample() -> (TreeNotice, usize) {
        let mut sim = Sim::new(31, Role::Publisher);
        sim.step(&[], &["a", "b", "c", "d", "e"]);
        let (n, _) = sim.step(&["b"], &["f", "g", "h", "i"]);
        let n = n.unwrap();
        let head = n.header().len();
        (n, head)
    }

    /// The body bytes after the header, re-assembled with `edit` applied to the fields.
    fn body(n: &TreeNotice) -> Vec<u8> {
        n.to_bytes()[n.header().len()..].to_vec()
    }

    #[test]
    fn layout_is_the_specified_one() {
        let (n, head) = sample();
        let bytes = n.to_bytes();
        assert_eq!(&bytes[..3], &[1, 3, 1]);
        assert_eq!(&bytes[3..head], &n.signed_info().to_bytes()[..]);
        let b = &bytes[head..];
        assert_eq!(&b[..4], &n.previous_epoch().0.to_be_bytes());
        assert_eq!(n.previous_epoch(), Epoch(1));
        assert_eq!(&b[4..20], n.salt());
        assert_eq!(&b[20..24], &8u32.to_be_bytes());
        assert_eq!(n.joined_leaves(), &[1, 5, 6, 7]);
        assert_eq!(&b[24..28], &4u32.to_be_bytes());
        assert_eq!(&b[28..32], &1u32.to_be_bytes());
        let at = 28 + 16;
        assert_eq!(&b[at..at + 4], &(n.wraps().len() as u32).to_be_bytes());
        let w = &n.wraps()[0];
        assert_eq!(&b[at + 4..at + 8], &w.node.to_be_bytes());
        assert_eq!(&b[at + 8..at + 12], &w.child.to_be_bytes());
        assert_eq!(&b[at + 12..at + 16], &48u32.to_be_bytes());
        let end = at + 4 + WRAP_WIRE_LEN * n.wraps().len();
        assert_eq!(&b[end..end + 4], &48u32.to_be_bytes());
        assert_eq!(b.len(), end + 4 + 48);
        assert_eq!(n.root_aad(), bytes[..head + end].to_vec());
        assert_eq!(TreeNotice::from_bytes(&bytes).unwrap(), n);
        // Joined paths: leaves 1, 5, 6, 7 in W = 8.
        assert!(n.on_joined_path(2) && n.on_joined_path(1) && n.on_joined_path(11));
        assert!(!n.on_joined_path(0) && !n.on_joined_path(4) && !n.on_joined_path(5));
    }

    fn reassemble(n: &TreeNotice, body: &[u8]) -> Vec<u8> {
        let mut out = n.header();
        out.extend_from_slice(body);
        out
    }

    fn decode_body(n: &TreeNotice, body: &[u8]) -> Result<TreeNotice, DecodeError> {
        TreeNotice::from_bytes(&reassemble(n, body))
    }

    #[test]
    fn decoder_accepts_only_the_canonical_form() {
        let (n, head) = sample();
        let good = body(&n);
        let set = |at: usize, v: u32| {
            let mut b = good.clone();
            b[at..at + 4].copy_from_slice(&v.to_be_bytes());
            b
        };
        let invalid = DecodeError::InvalidValue;
        let w0 = 48; // first wrap's node
        for (b, err) in [
            (set(0, 5), invalid("tree notice previous epoch")),
            (set(20, 0), invalid("tree notice width")),
            (set(20, 6), invalid("tree notice width")),
            (set(20, index::MAX_WIDTH * 2), invalid("tree notice width")),
            (
                set(24, u32::MAX),
                DecodeError::TooLarge("tree notice joined leaves"),
            ),
            (
                set(24, 9),
                DecodeError::TooLarge("tree notice joined leaves"),
            ),
            (set(28, 8), invalid("tree notice joined leaf")),
            (set(32, 1), invalid("tree notice joined leaf")),
            (
                set(44, u32::MAX),
                DecodeError::TooLarge("tree notice wraps"),
            ),
            (set(w0, 2), invalid("tree wrap nodes")),
            (set(w0, 15), invalid("tree wrap nodes")),
            (set(w0 + 4, 7), invalid("tree wrap nodes")),
            (set(w0 + 8, 47), invalid("tree wrap ct length")),
        ] {
            assert_eq!(decode_body(&n, &b), Err(err));
        }
        // Wraps out of order: swap the first two.
        let mut swapped = good.clone();
        let (a, b) = (w0, w0 + WRAP_WIRE_LEN);
        let first = good[a..b].to_vec();
        swapped.copy_within(b..b + WRAP_WIRE_LEN, a);
        swapped[b..b + WRAP_WIRE_LEN].copy_from_slice(&first);
        assert_eq!(decode_body(&n, &swapped), Err(invalid("tree wrap order")));
        // A repeated wrap.
        let mut twice = good[..w0 + WRAP_WIRE_LEN].to_vec();
        twice[44..48].copy_from_slice(&(n.wraps().len() as u32 + 1).to_be_bytes());
        twice.extend_from_slice(&good[w0..]);
        assert_eq!(decode_body(&n, &twice), Err(invalid("tree wrap order")));
        // Root wrap of the wrong length, truncation, trailing bytes, kind.
        let mut short = good[..good.len() - 52].to_vec();
        put_u32(&mut short, 47);
        short.extend_from_slice(&[0; 47]);
        assert_eq!(
            decode_body(&n, &short),
            Err(invalid("tree root wrap length"))
        );
        let all = n.to_bytes();
        for cut in [1, 3, head, head + 20, all.len() - 1] {
            assert!(TreeNotice::from_bytes(&all[..cut]).is_err());
        }
        let mut long = all.clone();
        long.push(0);
        assert!(TreeNotice::from_bytes(&long).is_err());
        let mut kind = all.clone();
        kind[1] = 1;
        assert_eq!(
            TreeNotice::from_bytes(&kind),
            Err(invalid("tree notice kind"))
        );
    }
}
