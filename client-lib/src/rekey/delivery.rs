//! Group-key delivery in SUBACK, PROTOCOL.md §4, carrying the v1.1 key set of §5.1.

use rand_core::CryptoRngCore;

use super::tree::{TreeError, TreeHolder, TreeKeySet, index};
use crate::codec::{Decode, DecodeError, Encode, Reader};
use crate::curve::KeyPair;
use crate::ecies;
use crate::group::{
    AcceptedGroupKey, GroupError, GroupKeys, Member, SignedGroupInfo, property_bytes, property_text,
};
use crate::ids::{GroupId, Role};
use crate::schnorr::VerifyingKey;
use crate::symmetric::VerifyError;

/// Shortest `ecies(Q_i, ctx, key set)`: a key set of a one-leaf tree.
pub const MIN_SEALED_LEN: usize = ecies::OVERHEAD + TreeKeySet::encoded_len(1);
/// Longest `ecies(Q_i, ctx, key set)`: a path through the widest tree.
pub const MAX_SEALED_LEN: usize = ecies::OVERHEAD + TreeKeySet::encoded_len(index::MAX_PATH_LEN);

/// `ginfo || sig || ecies(Q_i, ctx, key set)`, the `quva-gk` user property of the SUBACK. The key
/// set (§5.1) is `sc(d) || u32 W || u32 leaf || u8 count || count × (u32 node || 32-byte key)`:
/// d = d_P for a subscriber, d_S for a publisher, and the holder's path in that key's tree;
/// ctx = [`crate::group::key_context`]`(group, E, role)`. The ECIES output is the last field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupKeyDelivery {
    signed: SignedGroupInfo,
    sealed: Vec<u8>,
}

impl GroupKeyDelivery {
    /// The CA seals `set` (the key `recipient`'s role holds and its path) with a fresh ephemeral
    /// key.
    ///
    /// # Errors
    /// [`GroupError::InfoMismatch`] if `signed` is not the info of `keys` or the key set does not
    /// carry the key that `recipient`'s role holds.
    pub fn seal(
        signed: &SignedGroupInfo,
        keys: &GroupKeys,
        set: &TreeKeySet,
        recipient: &Member,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Self, GroupError> {
        let info = signed.info_unverified();
        if info != keys.group_info() || set.x() != keys.held_by(recipient.role).secret() {
            return Err(GroupError::InfoMismatch);
        }
        Ok(GroupKeyDelivery {
            signed: signed.clone(),
            sealed: set.seal(&recipient.q, &info.group, info.epoch, recipient.role, rng),
        })
    }

    /// The signed group info, not yet verified.
    pub fn signed_info(&self) -> &SignedGroupInfo {
        &self.signed
    }

    /// `base64url-nopad` of the encoding: the `quva-gk` property value.
    pub fn to_property(&self) -> String {
        property_text(&self.to_bytes())
    }

    /// Parses a `quva-gk` property value.
    ///
    /// # Errors
    /// [`DecodeError`] for bad base64 or a malformed delivery.
    pub fn from_property(text: &str) -> Result<Self, DecodeError> {
        Self::from_bytes(&property_bytes(text)?)
    }

    /// The device's check: the CA signed the info (pre-loaded `q_ca`), it is for `group`, the key
    /// set opens with d_i under the context of `role`, and d·G equals the info's key for the
    /// role. Returns the holder's tree state and the key.
    ///
    /// # Errors
    /// [`GroupError::WrongGroup`], or the opaque [`GroupError::Verify`] for a bad signature, a
    /// failed decryption (also for the wrong role), a malformed key set or a key that does not
    /// match.
    pub fn accept(
        &self,
        q_ca: &VerifyingKey,
        device: &KeyPair,
        group: &GroupId,
        role: Role,
    ) -> Result<(TreeHolder, AcceptedGroupKey), GroupError> {
        let info = self.signed.verify(q_ca)?;
        if &info.group != group {
            return Err(GroupError::WrongGroup("group-key delivery"));
        }
        let set = TreeKeySet::open(device, group, info.epoch, role, &self.sealed)?;
        TreeHolder::from_key_set(q_ca, &self.signed, group, role, &set).map_err(|e| match e {
            TreeError::WrongGroup(w) => GroupError::WrongGroup(w),
            _ => GroupError::Verify(VerifyError),
        })
    }
}

impl Encode for GroupKeyDelivery {
    fn encode(&self, out: &mut Vec<u8>) {
        self.signed.encode(out);
        out.extend_from_slice(&self.sealed);
    }
}

impl Decode for GroupKeyDelivery {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let signed = SignedGroupInfo::read(r)?;
        let sealed = r.rest();
        if sealed.len() < MIN_SEALED_LEN {
            return Err(DecodeError::InvalidValue("group-key delivery ecies"));
        }
        if sealed.len() > MAX_SEALED_LEN {
            return Err(DecodeError::TooLarge("group-key delivery ecies"));
        }
        Ok(GroupKeyDelivery {
            signed,
            sealed: sealed.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    use super::*;
    use crate::curve::SecretScalar;
    use crate::group::testing::TestDevice;
    use crate::group::{GroupKeys, Privacy, key_context};
    use crate::ids::{Epoch, GroupKeyKind};
    use crate::rekey::tree::NodeKey;

    struct Setup {
        ca: KeyPair,
        group: GroupId,
        devs: Vec<TestDevice>,
        keys: GroupKeys,
        signed: SignedGroupInfo,
    }

    fn setup(seed: u64) -> Setup {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let ca = KeyPair::random(&mut rng);
        let group = GroupId::new("plant/line-3/temp").unwrap();
        let devs = vec![
            TestDevice::new("pub-1", Role::Publisher, &mut rng),
            TestDevice::new("sub-1", Role::Subscriber, &mut rng),
            TestDevice::new("sub-2", Role::Subscriber, &mut rng),
        ];
        let keys = GroupKeys::derive(
            &ca,
            &group,
            Epoch(4),
            Privacy::Standard,
            devs.iter().map(|d| &d.joined),
        )
        .unwrap();
        let signed = SignedGroupInfo::sign(&ca, keys.group_info().clone(), &mut rng).unwrap();
        Setup {
            ca,
            group,
            devs,
            keys,
            signed,
        }
    }

    /// A key set of leaf 1 in a two-leaf tree with `x`.
    fn key_set(x: &SecretScalar, rng: &mut ChaCha20Rng) -> TreeKeySet {
        let path = vec![(2, NodeKey::random(rng)), (1, NodeKey::random(rng))];
        TreeKeySet::new(x.clone(), 2, 1, path).unwrap()
    }

    fn seal(s: &Setup, dev: &TestDevice, rng: &mut ChaCha20Rng) -> (GroupKeyDelivery, TreeKeySet) {
        let set = key_set(s.keys.held_by(dev.member().role).secret(), rng);
        let d = GroupKeyDelivery::seal(&s.signed, &s.keys, &set, dev.member(), rng).unwrap();
        (d, set)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        #[test]
        fn delivery_round_trips(seed in any::<u64>(), which in 0usize..3) {
            let s = setup(seed);
            let mut rng = ChaCha20Rng::seed_from_u64(seed ^ 1);
            let dev = &s.devs[which];
            let (d, set) = seal(&s, dev, &mut rng);
            let back = GroupKeyDelivery::from_property(&d.to_property()).unwrap();
            prop_assert_eq!(&back, &d);
            prop_assert_eq!(GroupKeyDelivery::from_bytes(&d.to_bytes()).unwrap(), d);
            let role = dev.member().role;
            let (tree, held) =
                back.accept(&s.ca.verifying_key(), &dev.key, &s.group, role).unwrap();
            prop_assert_eq!(held.key(), s.keys.held_by(role));
            prop_assert_eq!(held.epoch(), Epoch(4));
            prop_assert_eq!((tree.width(), tree.leaf()), (2, 1));
            prop_assert_eq!(tree.path(), set.path());
            prop_assert_eq!(tree.epoch(), Epoch(4));
        }
    }

    #[test]
    fn subscribers_receive_d_p_and_publishers_d_s() {
        // §9.3: the paper's §4.2.2 says the opposite; v1 follows §4.3–4.4.
        let s = setup(1);
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let q_ca = s.ca.verifying_key();
        for dev in &s.devs {
            let role = dev.member().role;
            let (d, _) = seal(&s, dev, &mut rng);
            let (_, held) = d.accept(&q_ca, &dev.key, &s.group, role).unwrap();
            let want = match role {
                Role::Subscriber => GroupKeyKind::P,
                Role::Publisher => GroupKeyKind::S,
            };
            assert_eq!(held.key(), s.keys.key(want));
            assert_eq!(held.key().public(), held.info().public_key(want));
        }
    }

    #[test]
    fn delivery_tamper_fails() {
        let s = setup(3);
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let dev = &s.devs[1];
        let bytes = seal(&s, dev, &mut rng).0.to_bytes();
        let q_ca = s.ca.verifying_key();
        for i in 0..bytes.len() {
            for mask in [0x01u8, 0x80] {
                let mut bad = bytes.clone();
                bad[i] ^= mask;
                let ok = GroupKeyDelivery::from_bytes(&bad).is_ok_and(|d| {
                    d.accept(&q_ca, &dev.key, &s.group, Role::Subscriber)
                        .is_ok()
                });
                assert!(!ok, "flipped byte {i} still accepted");
            }
        }
        assert!(
            GroupKeyDelivery::from_bytes(&bytes[..bytes.len() - 1]).is_ok_and(|d| {
                d.accept(&q_ca, &dev.key, &s.group, Role::Subscriber)
                    .is_err()
            })
        );
        // Too short for any key set, or longer than the widest tree's.
        let info_len = s.signed.to_bytes().len();
        assert!(GroupKeyDelivery::from_bytes(&bytes[..info_len + MIN_SEALED_LEN - 1]).is_err());
        let mut long = s.signed.to_bytes();
        long.extend(std::iter::repeat_n(0u8, MAX_SEALED_LEN + 1));
        assert_eq!(
            GroupKeyDelivery::from_bytes(&long).err(),
            Some(DecodeError::TooLarge("group-key delivery ecies"))
        );
    }

    #[test]
    fn delivery_rejections() {
        let s = setup(5);
        let mut rng = ChaCha20Rng::seed_from_u64(6);
        let sub = &s.devs[1];
        let (d, set) = seal(&s, sub, &mut rng);
        let q_ca = s.ca.verifying_key();
        // Wrong role: the context differs, decryption fails.
        assert_eq!(
            d.accept(&q_ca, &sub.key, &s.group, Role::Publisher).err(),
            Some(GroupError::Verify(VerifyError))
        );
        // Another device, another group, another CA.
        assert!(
            d.accept(&q_ca, &s.devs[2].key, &s.group, Role::Subscriber)
                .is_err()
        );
        assert!(matches!(
            d.accept(
                &q_ca,
                &sub.key,
                &GroupId::new("other").unwrap(),
                Role::Subscriber
            ),
            Err(GroupError::WrongGroup(_))
        ));
        let other_ca = KeyPair::random(&mut rng);
        assert_eq!(
            d.accept(
                &other_ca.verifying_key(),
                &sub.key,
                &s.group,
                Role::Subscriber
            )
            .err(),
            Some(GroupError::Verify(VerifyError))
        );
        // A validly signed info of another CA, re-signed by it, with the right ciphertext.
        let resigned =
            SignedGroupInfo::sign(&other_ca, s.keys.group_info().clone(), &mut rng).unwrap();
        let mut bytes = resigned.to_bytes();
        bytes.extend_from_slice(&d.to_bytes()[s.signed.to_bytes().len()..]);
        let forged = GroupKeyDelivery::from_bytes(&bytes).unwrap();
        assert!(
            forged
                .accept(&q_ca, &sub.key, &s.group, Role::Subscriber)
                .is_err()
        );
        // The key must match the signed info: d_S sealed to a subscriber is refused.
        let ctx = key_context(&s.group, Epoch(4), Role::Subscriber);
        let wrong = key_set(s.keys.key(GroupKeyKind::S).secret(), &mut rng);
        let mut bytes = s.signed.to_bytes();
        bytes.extend_from_slice(&ecies::seal(
            &sub.member().q,
            &ctx,
            &wrong.to_bytes(),
            &mut rng,
        ));
        let forged = GroupKeyDelivery::from_bytes(&bytes).unwrap();
        assert_eq!(
            forged
                .accept(&q_ca, &sub.key, &s.group, Role::Subscriber)
                .err(),
            Some(GroupError::Verify(VerifyError))
        );
        // The CA refuses to pair keys with another epoch's info, or a key set with another key.
        let other_keys = GroupKeys::derive(
            &s.ca,
            &s.group,
            Epoch(5),
            Privacy::Standard,
            s.devs.iter().map(|d| &d.joined),
        )
        .unwrap();
        assert_eq!(
            GroupKeyDelivery::seal(&s.signed, &other_keys, &set, sub.member(), &mut rng).err(),
            Some(GroupError::InfoMismatch)
        );
        assert_eq!(
            GroupKeyDelivery::seal(&s.signed, &s.keys, &wrong, sub.member(), &mut rng).err(),
            Some(GroupError::InfoMismatch)
        );
    }

    #[test]
    fn the_longest_delivery_fits_the_property_limit() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let ca = KeyPair::random(&mut rng);
        let group = GroupId::new(&"g".repeat(crate::ids::MAX_GROUP_ID_LEN)).unwrap();
        let keys = GroupKeys::derive(&ca, &group, Epoch(1), Privacy::Standard, []).unwrap();
        let signed = SignedGroupInfo::sign(&ca, keys.group_info().clone(), &mut rng).unwrap();
        let mut bytes = signed.to_bytes();
        bytes.extend(std::iter::repeat_n(7u8, MAX_SEALED_LEN));
        let text = crate::group::property_text(&bytes);
        assert!(
            text.len() <= crate::group::MAX_PROPERTY_LEN,
            "{}",
            text.len()
        );
        assert!(GroupKeyDelivery::from_property(&text).is_ok());
    }
}
