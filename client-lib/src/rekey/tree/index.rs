//! Index arithmetic of the array-represented binary tree, PROTOCOL.md §5.1 (RFC 9420 §4 and
//! Appendix C).
//!
//! A tree of width W = 2^k leaves has nodes 0..=2W−2; leaf ℓ is node 2ℓ; the root is W − 1.
//! Doubling W keeps every index: the new root 2W − 1 has the old root as its left child.
//! Functions take any `u32` and compute in `u64`, so no input overflows or panics; a result that
//! does not fit a `u32` is `None`.

/// The widest tree supported: 2^24 leaves (paths of 25 keys). A notice or key set naming a wider
/// tree is refused before anything is allocated.
pub const MAX_WIDTH: u32 = 1 << 24;
/// Nodes on a path from a leaf to the root of a [`MAX_WIDTH`] tree.
pub const MAX_PATH_LEN: usize = MAX_WIDTH.trailing_zeros() as usize + 1;

/// `level(x)`: the number of trailing 1 bits of `x` (0 for leaves).
pub fn level(x: u32) -> u32 {
    x.trailing_ones()
}

/// Whether `x` is a leaf node (even).
pub fn is_leaf(x: u32) -> bool {
    x & 1 == 0
}

/// `left(x) = x XOR (1 << (L−1))` for `x` at level L ≥ 1; `None` for a leaf.
pub fn left(x: u32) -> Option<u32> {
    let l = level(x);
    if l == 0 {
        return None;
    }
    narrow(u64::from(x) ^ (1u64 << (l - 1)))
}

/// `right(x) = x XOR (3 << (L−1))` for `x` at level L ≥ 1; `None` for a leaf.
pub fn right(x: u32) -> Option<u32> {
    let l = level(x);
    if l == 0 {
        return None;
    }
    narrow(u64::from(x) ^ (3u64 << (l - 1)))
}

/// `parent(x) = (x OR (1 << L)) XOR (((x >> (L+1)) AND 1) << (L+1))` in an unbounded tree.
pub fn parent(x: u32) -> Option<u32> {
    let l = u64::from(level(x));
    let x = u64::from(x);
    narrow((x | (1 << l)) ^ (((x >> (l + 1)) & 1) << (l + 1)))
}

/// The root of a tree of width `w` (a power of two): `w − 1`.
pub fn root(w: u32) -> u32 {
    w.saturating_sub(1)
}

/// The node of leaf `leaf`: `2·leaf`.
pub fn leaf_node(leaf: u32) -> Option<u32> {
    leaf.checked_mul(2)
}

/// The leaf of node `x`, if `x` is a leaf node.
pub fn node_leaf(x: u32) -> Option<u32> {
    is_leaf(x).then_some(x / 2)
}

/// The number of nodes of a tree of width `w`: `2w − 1`.
pub fn node_count(w: u32) -> u64 {
    (2 * u64::from(w)).saturating_sub(1)
}

/// Whether `w` is an allowed width: a power of two in 1..=[`MAX_WIDTH`].
pub fn valid_width(w: u32) -> bool {
    w.is_power_of_two() && w <= MAX_WIDTH
}

/// Whether `x` is a node of a tree of width `w`.
pub fn in_tree(x: u32, w: u32) -> bool {
    u64::from(x) < node_count(w)
}

/// The leaves below `x` (itself for a leaf) as the half-open range `first..end`.
pub fn leaf_span(x: u32) -> (u64, u64) {
    let l = level(x);
    let half = (1u64 << l) - 1;
    let first = (u64::from(x) - half) / 2;
    (first, first + (1u64 << l))
}

/// Whether leaf `leaf` sits below node `x` (or is `x`).
pub fn covers(x: u32, leaf: u32) -> bool {
    let (first, end) = leaf_span(x);
    (first..end).contains(&u64::from(leaf))
}

/// The path of `leaf` in a tree of width `w`: its leaf node up to the root, leaf first
/// (log2(w) + 1 nodes). Empty if the leaf is not in the tree or `w` is not a valid width.
pub fn path(leaf: u32, w: u32) -> Vec<u32> {
    if !valid_width(w) || leaf >= w {
        return Vec::new();
    }
    let top = root(w);
    let mut out = Vec::with_capacity(w.trailing_zeros() as usize + 1);
    let mut x = 2 * leaf;
    out.push(x);
    while x != top {
        match parent(x) {
            Some(p) => x = p,
            None => return Vec::new(),
        }
        out.push(x);
    }
    out
}

fn narrow(v: u64) -> Option<u32> {
    u32::try_from(v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc9420_appendix_c_eight_leaves() {
        // RFC 9420 Appendix C, the 8-leaf tree:
        //                               X
        //               X                               X
        //       X               X               X               X
        //   X       X       X       X       X       X       X       X
        // 0 1 2 3 4 5 6 7 8 9 a b c d e
        assert_eq!(root(8), 7);
        assert_eq!(level(7), 3);
        assert_eq!((left(7), right(7)), (Some(3), Some(11)));
        assert_eq!((left(3), right(3)), (Some(1), Some(5)));
        assert_eq!((left(11), right(11)), (Some(9), Some(13)));
        assert_eq!((left(5), right(5)), (Some(4), Some(6)));
        assert_eq!((left(13), right(13)), (Some(12), Some(14)));
        assert_eq!(left(0), None);
        assert_eq!(right(14), None);
        for (x, p) in [
            (0, 1),
            (2, 1),
            (1, 3),
            (5, 3),
            (3, 7),
            (11, 7),
            (8, 9),
            (14, 13),
        ] {
            assert_eq!(parent(x), Some(p), "parent({x})");
        }
        let levels: Vec<u32> = (0..15).map(level).collect();
        assert_eq!(levels, [0, 1, 0, 2, 0, 1, 0, 3, 0, 1, 0, 2, 0, 1, 0]);
        assert_eq!(path(5, 8), [10, 9, 11, 7]);
        assert_eq!(path(0, 8), [0, 1, 3, 7]);
        assert_eq!(path(7, 8), [14, 13, 11, 7]);
        assert_eq!(node_count(8), 15);
    }

    #[test]
    fn small_widths() {
        assert_eq!(path(0, 1), [0]);
        assert_eq!(root(1), 0);
        assert_eq!(path(1, 2), [2, 1]);
        assert_eq!(path(2, 4), [4, 5, 3]);
        assert!(path(4, 4).is_empty());
        assert!(path(0, 3).is_empty());
        assert!(path(0, MAX_WIDTH * 2).is_empty());
        assert_eq!(path(MAX_WIDTH - 1, MAX_WIDTH).len(), 25);
    }

    #[test]
    fn formulas_agree_with_the_structure() {
        for x in 0u32..(1 << 12) {
            let l = level(x);
            if l >= 1 {
                let (a, b) = (left(x).unwrap(), right(x).unwrap());
                assert_eq!(parent(a), Some(x));
                assert_eq!(parent(b), Some(x));
                assert_eq!(level(a), l - 1);
                assert!(a < x && x < b);
                let ((f, e), (fa, ea), (fb, eb)) = (leaf_span(x), leaf_span(a), leaf_span(b));
                assert_eq!((f, e), (fa, eb));
                assert_eq!(ea, fb);
            }
            let p = parent(x).unwrap();
            assert_eq!(level(p), l + 1);
            assert!(left(p) == Some(x) || right(p) == Some(x));
            if is_leaf(x) {
                assert_eq!(leaf_node(node_leaf(x).unwrap()), Some(x));
                assert_eq!(leaf_span(x), (u64::from(x / 2), u64::from(x / 2) + 1));
            }
        }
    }

    #[test]
    fn doubling_keeps_indices_and_hangs_the_old_root_left() {
        let mut w = 1u32;
        while w < (1 << 16) {
            let new_root = root(2 * w);
            assert_eq!(new_root, 2 * w - 1);
            assert_eq!(left(new_root), Some(root(w)));
            assert_eq!(parent(root(w)), Some(new_root));
            // Every leaf's old path is a prefix of its new path.
            for leaf in [0, w / 2, w - 1] {
                let old = path(leaf, w);
                let new = path(leaf, 2 * w);
                assert_eq!(&new[..old.len()], &old[..]);
                assert_eq!(new.len(), old.len() + 1);
            }
            w *= 2;
        }
    }

    #[test]
    fn extreme_inputs_do_not_panic() {
        for x in [u32::MAX, u32::MAX - 1, 1 << 31, (1 << 31) - 1] {
            let _ = (left(x), right(x), parent(x), leaf_span(x), covers(x, 0));
        }
        assert_eq!(parent(u32::MAX), None);
        assert_eq!(leaf_node(u32::MAX), None);
        assert_eq!(root(0), 0);
        assert!(!valid_width(0) && !valid_width(3) && valid_width(1));
    }
}
