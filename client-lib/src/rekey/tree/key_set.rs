//! A joiner's key set, PROTOCOL.md §5.1: `sc(X_new) || u32 W || u32 leaf || u8 count ||
//! count × (u32 node || 32-byte key)`, its whole path after the epoch's changes, leaf first. In
//! v1.1 it is the ECIES plaintext of every key delivery (§4), sealed with [`TreeKeySet::seal`].

use rand_core::CryptoRngCore;
use zeroize::Zeroizing;

use super::{NodeKey, TreeHolder, index};
use crate::codec::{Decode, DecodeError, Reader, put_u8, put_u32};
use crate::curve::{KeyPair, Point, SecretScalar};
use crate::ecies;
use crate::group::key_context;
use crate::ids::{Epoch, GroupId, Role};
use crate::symmetric::VerifyError;

/// The key set of one holder: X, W, its leaf and its path keys (leaf first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeKeySet {
    x: SecretScalar,
    width: u32,
    leaf: u32,
    path: Vec<(u32, NodeKey)>,
}

impl TreeKeySet {
    /// Length of the encoding of a key set whose path has `path_len` nodes.
    pub const fn encoded_len(path_len: usize) -> usize {
        32 + 4 + 4 + 1 + 36 * path_len
    }

    /// A key set; `path` must be the nodes of `leaf`'s path in a width-`width` tree, leaf first.
    ///
    /// # Errors
    /// [`DecodeError::InvalidValue`] if the width, leaf or path nodes are not those.
    pub fn new(
        x: SecretScalar,
        width: u32,
        leaf: u32,
        path: Vec<(u32, NodeKey)>,
    ) -> Result<Self, DecodeError> {
        let nodes = index::path(leaf, width);
        if nodes.is_empty() || !path.iter().map(|(n, _)| *n).eq(nodes) {
            return Err(DecodeError::InvalidValue("tree key set path"));
        }
        Ok(TreeKeySet {
            x,
            width,
            leaf,
            path,
        })
    }

    /// The key set of a holder's current state with its key `x`, to store and restore.
    pub fn from_holder(x: SecretScalar, holder: &TreeHolder) -> Self {
        TreeKeySet {
            x,
            width: holder.width(),
            leaf: holder.leaf(),
            path: holder.path().to_vec(),
        }
    }

    /// X_new: d_P for subscribers, d_S for publishers.
    pub fn x(&self) -> &SecretScalar {
        &self.x
    }

    /// W.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// The holder's leaf.
    pub fn leaf(&self) -> u32 {
        self.leaf
    }

    /// The path keys, leaf first.
    pub fn path(&self) -> &[(u32, NodeKey)] {
        &self.path
    }

    /// The encoding, zeroized when dropped.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(Self::encoded_len(self.path.len())));
        out.extend_from_slice(&self.x.to_bytes()[..]);
        put_u32(&mut out, self.width);
        put_u32(&mut out, self.leaf);
        // INVARIANT: a path has at most log2(MAX_WIDTH) + 1 = 25 nodes.
        put_u8(&mut out, u8::try_from(self.path.len()).unwrap_or(u8::MAX));
        for (node, key) in &self.path {
            put_u32(&mut out, *node);
            out.extend_from_slice(key.as_bytes());
        }
        out
    }

    /// `ecies(Q_i, ctx, key set)` with ctx = [`key_context`]`(group, E, role)` (PROTOCOL.md §4).
    pub fn seal(
        &self,
        recipient: &Point,
        group: &GroupId,
        epoch: Epoch,
        role: Role,
        rng: &mut impl CryptoRngCore,
    ) -> Vec<u8> {
        ecies::seal(
            recipient,
            &key_context(group, epoch, role),
            &self.to_bytes(),
            rng,
        )
    }

    /// Opens what [`TreeKeySet::seal`] produced for `device`.
    ///
    /// # Errors
    /// [`VerifyError`] if decryption fails or the plaintext is not a key set.
    pub fn open(
        device: &KeyPair,
        group: &GroupId,
        epoch: Epoch,
        role: Role,
        sealed: &[u8],
    ) -> Result<Self, VerifyError> {
        let plain = ecies::open(device, &key_context(group, epoch, role), sealed)?;
        Self::from_bytes(&plain).map_err(|_| VerifyError)
    }
}

impl Decode for TreeKeySet {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let x = r.secret_scalar("tree key set X")?;
        let width = r.u32("tree key set width")?;
        let leaf = r.u32("tree key set leaf")?;
        let count = r.u8("tree key set count")?;
        let nodes = index::path(leaf, width);
        if nodes.is_empty() || nodes.len() != usize::from(count) {
            return Err(DecodeError::InvalidValue("tree key set path"));
        }
        let mut path = Vec::with_capacity(nodes.len());
        for want in nodes {
            if r.u32("tree key set node")? != want {
                return Err(DecodeError::InvalidValue("tree key set node"));
            }
            let key = Zeroizing::new(r.take_array::<32>("tree key set key")?);
            path.push((want, NodeKey::from_bytes(&key)));
        }
        Ok(TreeKeySet {
            x,
            width,
            leaf,
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(width: u32, leaf: u32) -> TreeKeySet {
        let x = SecretScalar::new(k256::Scalar::from(5u64)).unwrap();
        let path = index::path(leaf, width)
            .into_iter()
            .map(|n| (n, NodeKey::from_bytes(&[n as u8; 32])))
            .collect();
        TreeKeySet::new(x, width, leaf, path).unwrap()
    }

    #[test]
    fn layout_and_round_trip() {
        let s = set(4, 2);
        let bytes = s.to_bytes();
        assert_eq!(bytes.len(), 32 + 4 + 4 + 1 + 3 * 36);
        assert_eq!(&bytes[32..41], &[0, 0, 0, 4, 0, 0, 0, 2, 3]);
        assert_eq!(&bytes[41..45], &[0, 0, 0, 4]);
        assert_eq!(&bytes[45..77], &[4u8; 32]);
        assert_eq!(&bytes[77..81], &[0, 0, 0, 5]);
        assert_eq!(TreeKeySet::from_bytes(&bytes).unwrap(), s);
        let one = set(1, 0);
        assert_eq!(TreeKeySet::from_bytes(&one.to_bytes()).unwrap(), one);
    }

    #[test]
    fn decoder_rejects_bad_paths() {
        let good = set(4, 1).to_bytes().to_vec();
        for (at, value) in [(35, 3u8), (39, 4), (40, 2), (40, 4), (44, 1), (80, 7)] {
            let mut bad = good.clone();
            bad[at] = value;
            assert!(TreeKeySet::from_bytes(&bad).is_err(), "byte {at} = {value}");
        }
        assert!(TreeKeySet::from_bytes(&good[..good.len() - 1]).is_err());
        let mut long = good.clone();
        long.push(0);
        assert!(TreeKeySet::from_bytes(&long).is_err());
        let mut zero = good.clone();
        zero[..32].fill(0);
        assert!(TreeKeySet::from_bytes(&zero).is_err());
        assert!(TreeKeySet::new(set(4, 1).x().clone(), 4, 1, Vec::new()).is_err());
    }

    #[test]
    fn seals_to_the_device_under_the_delivery_context() {
        use rand_chacha::ChaCha20Rng;
        use rand_core::SeedableRng;
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let device = KeyPair::random(&mut rng);
        let group = GroupId::new("a/b").unwrap();
        let s = set(8, 5);
        let sealed = s.seal(
            device.public(),
            &group,
            Epoch(3),
            Role::Subscriber,
            &mut rng,
        );
        let open = |e, role| TreeKeySet::open(&device, &group, Epoch(e), role, &sealed);
        assert_eq!(open(3, Role::Subscriber).unwrap(), s);
        assert!(open(4, Role::Subscriber).is_err());
        assert!(open(3, Role::Publisher).is_err());
    }
}
