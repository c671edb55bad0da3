//! Group-key delivery in SUBACK, PROTOCOL.md §4.

use rand_core::CryptoRngCore;

use super::{
    GroupError, GroupInfo, GroupKeys, Member, SignedGroupInfo, key_context, property_bytes,
    property_text,
};
use crate::codec::{Decode, DecodeError, Encode, Reader};
use crate::curve::KeyPair;
use crate::ecies;
use crate::ids::{Epoch, GroupId, Role};
use crate::schnorr::VerifyingKey;
use crate::symmetric::VerifyError;

/// Length of `ecies(Q_i, ctx, sc(d))`: the ephemeral point, 32 bytes and the tag.
pub const SEALED_KEY_LEN: usize = ecies::OVERHEAD + 32;

/// `ginfo || sig || ecies(Q_i, ctx, sc(d))`, the `quva-gk` user property of the SUBACK; d = d_P
/// for a subscriber, d_S for a publisher, ctx = [`key_context`]`(group, E, role)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupKeyDelivery {
    signed: SignedGroupInfo,
    sealed: [u8; SEALED_KEY_LEN],
}

impl GroupKeyDelivery {
    /// The CA seals the key that `recipient`'s role holds, with a fresh ephemeral key.
    ///
    /// # Errors
    /// [`GroupError::InfoMismatch`] if `signed` is not the info of `keys`.
    pub fn seal(
        signed: &SignedGroupInfo,
        keys: &GroupKeys,
        recipient: &Member,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Self, GroupError> {
        Self::seal_with_ephemeral(signed, keys, recipient, &KeyPair::random(rng))
    }

    /// As [`GroupKeyDelivery::seal`] with the given ephemeral key pair, which must be fresh.
    pub(crate) fn seal_with_ephemeral(
        signed: &SignedGroupInfo,
        keys: &GroupKeys,
        recipient: &Member,
        ephemeral: &KeyPair,
    ) -> Result<Self, GroupError> {
        let info = signed.info_unverified();
        if info != keys.group_info() {
            return Err(GroupError::InfoMismatch);
        }
        let ctx = key_context(&info.group, info.epoch, recipient.role);
        let d = keys.held_by(recipient.role).secret().to_bytes();
        let out = ecies::seal_with_ephemeral(ephemeral, &recipient.q, &ctx, &d[..]);
        let sealed = out
            .as_slice()
            .try_into()
            .map_err(|_| GroupError::InfoMismatch)?;
        Ok(GroupKeyDelivery {
            signed: signed.clone(),
            sealed,
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
    /// opens with d_i under the context of `role`, and d·G equals the info's key for the role.
    ///
    /// # Errors
    /// [`GroupError::WrongGroup`], or the opaque [`GroupError::Verify`] for a bad signature, a
    /// failed decryption (also for the wrong role) or a key that does not match.
    pub fn accept(
        &self,
        q_ca: &VerifyingKey,
        device: &KeyPair,
        group: &GroupId,
        role: Role,
    ) -> Result<AcceptedGroupKey, GroupError> {
        let info = self.signed.verify(q_ca)?;
        if &info.group != group {
            return Err(GroupError::WrongGroup("group-key delivery"));
        }
        let ctx = key_context(group, info.epoch, role);
        let d = ecies::open_scalar(device, &ctx, &self.sealed)?;
        let key = KeyPair::from_secret(d);
        if key.public() != info.held_public_key(role) {
            return Err(GroupError::Verify(VerifyError));
        }
        Ok(AcceptedGroupKey {
            signed: self.signed.clone(),
            role,
            key,
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
        Ok(GroupKeyDelivery {
            signed: SignedGroupInfo::read(r)?,
            sealed: r.take_array("group-key delivery ecies")?,
        })
    }
}

/// A group key the device accepted: the verified info and the held key (d_P or d_S).
#[derive(Clone, Debug)]
pub struct AcceptedGroupKey {
    signed: SignedGroupInfo,
    role: Role,
    key: KeyPair,
}

impl AcceptedGroupKey {
    /// The verified group info.
    pub fn info(&self) -> &GroupInfo {
        self.signed.info_unverified()
    }

    /// The signed info, as received (verified).
    pub fn signed_info(&self) -> &SignedGroupInfo {
        &self.signed
    }

    /// The epoch of the key.
    pub fn epoch(&self) -> Epoch {
        self.info().epoch
    }

    /// The role the key was delivered for.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The held key: d_P for a subscriber, d_S for a publisher.
    pub fn key(&self) -> &KeyPair {
        &self.key
    }

    /// Only the crate builds accepted keys (after verification).
    pub(crate) fn new_verified(signed: SignedGroupInfo, role: Role, key: KeyPair) -> Self {
        AcceptedGroupKey { signed, role, key }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::TestDevice;
    use super::super::{Privacy, SignedGroupInfo};
    use super::*;
    use crate::ids::GroupKeyKind;
    use proptest::prelude::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        #[test]
        fn delivery_round_trips(seed in any::<u64>(), which in 0usize..3) {
            let s = setup(seed);
            let mut rng = ChaCha20Rng::seed_from_u64(seed ^ 1);
            let dev = &s.devs[which];
            let d = GroupKeyDelivery::seal(&s.signed, &s.keys, dev.member(), &mut rng).unwrap();
            let back = GroupKeyDelivery::from_property(&d.to_property()).unwrap();
            prop_assert_eq!(&back, &d);
            prop_assert_eq!(GroupKeyDelivery::from_bytes(&d.to_bytes()).unwrap(), d);
            let role = dev.member().role;
            let held = back.accept(&s.ca.verifying_key(), &dev.key, &s.group, role).unwrap();
            prop_assert_eq!(held.key(), s.keys.held_by(role));
            prop_assert_eq!(held.epoch(), Epoch(4));
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
            let d = GroupKeyDelivery::seal(&s.signed, &s.keys, dev.member(), &mut rng).unwrap();
            let held = d.accept(&q_ca, &dev.key, &s.group, role).unwrap();
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
        let bytes = GroupKeyDelivery::seal(&s.signed, &s.keys, dev.member(), &mut rng)
            .unwrap()
            .to_bytes();
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
        assert!(GroupKeyDelivery::from_bytes(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn delivery_rejections() {
        let s = setup(5);
        let mut rng = ChaCha20Rng::seed_from_u64(6);
        let sub = &s.devs[1];
        let d = GroupKeyDelivery::seal(&s.signed, &s.keys, sub.member(), &mut rng).unwrap();
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
        let wrong = ecies::seal(
            &sub.member().q,
            &ctx,
            &s.keys.key(GroupKeyKind::S).secret().to_bytes()[..],
            &mut rng,
        );
        let mut bytes = s.signed.to_bytes();
        bytes.extend_from_slice(&wrong);
        let forged = GroupKeyDelivery::from_bytes(&bytes).unwrap();
        assert_eq!(
            forged
                .accept(&q_ca, &sub.key, &s.group, Role::Subscriber)
                .err(),
            Some(GroupError::Verify(VerifyError))
        );
        // The CA refuses to pair keys with another epoch's info.
        let other_keys = GroupKeys::derive(
            &s.ca,
            &s.group,
            Epoch(5),
            Privacy::Standard,
            s.devs.iter().map(|d| &d.joined),
        )
        .unwrap();
        assert_eq!(
            GroupKeyDelivery::seal(&s.signed, &other_keys, sub.member(), &mut rng).err(),
            Some(GroupError::InfoMismatch)
        );
    }
}
