//! Rekey notices, PROTOCOL.md §5: `u8 1 || u8 kind || u8 role || ginfo || sig || body`.

use rand_core::CryptoRngCore;

use super::RekeyError;
use crate::codec::{Decode, DecodeError, Encode, Reader, put_blob, put_u8, put_u32};
use crate::curve::{KeyPair, Point, SecretScalar};
use crate::ecies;
use crate::group::{SEALED_KEY_LEN, SignedGroupInfo, key_context};
use crate::ids::{Epoch, Role};
use crate::symmetric::{TAG_LEN, VerifyError, aead_open, aead_seal, kdf};

/// Length of a broadcast's `ct` = AEAD_K(sc(X_new), aad).
pub const BROADCAST_CIPHERTEXT_LEN: usize = 32 + TAG_LEN;

/// The notice kind byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NoticeKind {
    /// 1: the new key under the previous one, for every remaining holder.
    Broadcast = 1,
    /// 2: the new key under ECIES to one holder.
    Individual = 2,
}

/// The body of a notice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoticeBody {
    /// `u32 previous epoch || blob(ct)`, ct = AEAD_K(sc(X_new), aad = the notice bytes before the
    /// body), K = KDF("", sc(X_old), "quva/v1/rekey" || str(group) || u32 E+1 || u8 role).
    Broadcast {
        /// The epoch E of the key that encrypts the new one; always the new epoch minus one.
        previous_epoch: Epoch,
        /// The ciphertext.
        ct: [u8; BROADCAST_CIPHERTEXT_LEN],
    },
    /// `ecies(Q_i, ctx, sc(X_new))` with ctx = [`key_context`]`(group, E+1, role)`.
    Individual {
        /// The ECIES output.
        sealed: [u8; SEALED_KEY_LEN],
    },
}

/// A rekey notice: the signed group info of the new epoch and the new key of the holders of
/// `role` (publishers receive d_S, subscribers d_P). Decoded unverified; a device applies it
/// with [`super::Keyring::apply_notice`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RekeyNotice {
    role: Role,
    signed: SignedGroupInfo,
    body: NoticeBody,
}

impl RekeyNotice {
    /// The broadcast of `new` under `old` to the holders of `role`. Deterministic: the key is
    /// fresh because `old` is used once per (group, epoch, role).
    ///
    /// # Errors
    /// [`RekeyError::EpochGap`] if the info's epoch is 0 (no previous epoch).
    pub fn broadcast(
        signed: &SignedGroupInfo,
        role: Role,
        old: &SecretScalar,
        new: &SecretScalar,
    ) -> Result<Self, RekeyError> {
        let epoch = signed.info_unverified().epoch;
        let previous_epoch = epoch
            .0
            .checked_sub(1)
            .map(Epoch)
            .ok_or(RekeyError::EpochGap)?;
        let mut notice = RekeyNotice {
            role,
            signed: signed.clone(),
            body: NoticeBody::Broadcast {
                previous_epoch,
                ct: [0u8; BROADCAST_CIPHERTEXT_LEN],
            },
        };
        let key = notice.broadcast_key(old);
        let sealed = aead_seal(&key, &notice.header(), &new.to_bytes()[..]);
        if let NoticeBody::Broadcast { ct, .. } = &mut notice.body {
            // INVARIANT: sealing 32 bytes yields exactly 32 + TAG_LEN bytes.
            ct.copy_from_slice(sealed.get(..BROADCAST_CIPHERTEXT_LEN).unwrap_or(&[0u8; 48]));
        }
        Ok(notice)
    }

    /// The individual notice of `new` to the holder with public key `recipient` (its Q_i).
    pub fn individual(
        signed: &SignedGroupInfo,
        role: Role,
        recipient: &Point,
        new: &SecretScalar,
        rng: &mut impl CryptoRngCore,
    ) -> Self {
        Self::individual_with_ephemeral(signed, role, recipient, new, &KeyPair::random(rng))
    }

    /// As [`RekeyNotice::individual`] with the given, fresh, ephemeral key pair.
    pub fn individual_with_ephemeral(
        signed: &SignedGroupInfo,
        role: Role,
        recipient: &Point,
        new: &SecretScalar,
        ephemeral: &KeyPair,
    ) -> Self {
        let info = signed.info_unverified();
        let ctx = key_context(&info.group, info.epoch, role);
        let out = ecies::seal_with_ephemeral(ephemeral, recipient, &ctx, &new.to_bytes()[..]);
        let mut sealed = [0u8; SEALED_KEY_LEN];
        // INVARIANT: ECIES of 32 bytes is exactly SEALED_KEY_LEN bytes.
        sealed.copy_from_slice(out.get(..SEALED_KEY_LEN).unwrap_or(&[0u8; SEALED_KEY_LEN]));
        RekeyNotice {
            role,
            signed: signed.clone(),
            body: NoticeBody::Individual { sealed },
        }
    }

    /// Broadcast or individual.
    pub fn kind(&self) -> NoticeKind {
        match self.body {
            NoticeBody::Broadcast { .. } => NoticeKind::Broadcast,
            NoticeBody::Individual { .. } => NoticeKind::Individual,
        }
    }

    /// The holders' role: publishers receive d_S, subscribers d_P.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The signed info of the new epoch, not yet verified.
    pub fn signed_info(&self) -> &SignedGroupInfo {
        &self.signed
    }

    /// The body.
    pub fn body(&self) -> &NoticeBody {
        &self.body
    }

    /// Opens a broadcast with the held previous key.
    ///
    /// # Errors
    /// [`VerifyError`] if this is not a broadcast, the key is wrong or a byte changed.
    pub(crate) fn open_broadcast(&self, old: &SecretScalar) -> Result<SecretScalar, VerifyError> {
        let NoticeBody::Broadcast { ct, .. } = &self.body else {
            return Err(VerifyError);
        };
        let key = self.broadcast_key(old);
        let plain = aead_open(&key, &self.header(), ct)?;
        let bytes: &[u8; 32] = plain.as_slice().try_into().map_err(|_| VerifyError)?;
        SecretScalar::from_bytes(bytes).map_err(|_| VerifyError)
    }

    /// Opens an individual notice with the device key d_i.
    ///
    /// # Errors
    /// [`VerifyError`] if this is not an individual notice, not for this device, or altered.
    pub(crate) fn open_individual(&self, device: &KeyPair) -> Result<SecretScalar, VerifyError> {
        let NoticeBody::Individual { sealed } = &self.body else {
            return Err(VerifyError);
        };
        let info = self.signed.info_unverified();
        let ctx = key_context(&info.group, info.epoch, self.role);
        ecies::open_scalar(device, &ctx, sealed)
    }

    /// `u8 1 || u8 kind || u8 role || ginfo || sig`: the broadcast's associated data.
    fn header(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(3 + 440);
        put_u8(&mut out, 1);
        put_u8(&mut out, self.kind() as u8);
        put_u8(&mut out, self.role.to_u8());
        self.signed.encode(&mut out);
        out
    }

    /// K = KDF("", sc(X_old), "quva/v1/rekey" || str(group) || u32 E+1 || u8 role).
    fn broadcast_key(&self, old: &SecretScalar) -> zeroize::Zeroizing<[u8; 32]> {
        let info = self.signed.info_unverified();
        let mut kdf_info = Vec::with_capacity(13 + 2 + info.group.as_str().len() + 5);
        kdf_info.extend_from_slice(b"quva/v1/rekey");
        info.group.encode(&mut kdf_info);
        put_u32(&mut kdf_info, info.epoch.0);
        put_u8(&mut kdf_info, self.role.to_u8());
        kdf(b"", &old.to_bytes()[..], &[&kdf_info])
    }
}

impl Encode for RekeyNotice {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.header());
        match &self.body {
            NoticeBody::Broadcast { previous_epoch, ct } => {
                put_u32(out, previous_epoch.0);
                put_blob(out, ct);
            }
            NoticeBody::Individual { sealed } => out.extend_from_slice(sealed),
        }
    }
}

impl Decode for RekeyNotice {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.version("rekey notice")?;
        let kind = r.u8("rekey notice kind")?;
        let role = Role::read(r, "rekey notice role")?;
        let signed = SignedGroupInfo::read(r)?;
        let body = match kind {
            1 => {
                let previous_epoch = Epoch(r.u32("rekey notice previous epoch")?);
                if previous_epoch.next() != Some(signed.info_unverified().epoch) {
                    return Err(DecodeError::InvalidValue("rekey notice previous epoch"));
                }
                let ct = r
                    .blob("rekey notice ct")?
                    .try_into()
                    .map_err(|_| DecodeError::InvalidValue("rekey notice ct length"))?;
                NoticeBody::Broadcast { previous_epoch, ct }
            }
            2 => NoticeBody::Individual {
                sealed: r.take_array("rekey notice ecies")?,
            },
            _ => return Err(DecodeError::InvalidValue("rekey notice kind")),
        };
        Ok(RekeyNotice { role, signed, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::{GroupKeys, Privacy};
    use crate::ids::GroupId;
    use proptest::prelude::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn signed(seed: u64, epoch: u32) -> (KeyPair, SignedGroupInfo) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let ca = KeyPair::random(&mut rng);
        let group = GroupId::new("a/b/c").unwrap();
        let keys = GroupKeys::derive(&ca, &group, Epoch(epoch), Privacy::Anonymous, []).unwrap();
        let signed = SignedGroupInfo::sign(&ca, keys.group_info().clone(), &mut rng).unwrap();
        (ca, signed)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn notices_round_trip(seed in any::<u64>(), epoch in 1u32.., publisher in any::<bool>()) {
            let role = if publisher { Role::Publisher } else { Role::Subscriber };
            let (_, s) = signed(seed, epoch);
            let mut rng = ChaCha20Rng::seed_from_u64(seed ^ 7);
            let old = SecretScalar::random(&mut rng);
            let new = SecretScalar::random(&mut rng);
            let device = KeyPair::random(&mut rng);
            let b = RekeyNotice::broadcast(&s, role, &old, &new).unwrap();
            let i = RekeyNotice::individual(&s, role, device.public(), &new, &mut rng);
            for n in [&b, &i] {
                let bytes = n.to_bytes();
                prop_assert_eq!(&RekeyNotice::from_bytes(&bytes).unwrap(), n);
                prop_assert_eq!(bytes[1], n.kind() as u8);
                prop_assert_eq!(bytes[2], role.to_u8());
            }
            prop_assert!(b.open_broadcast(&old).unwrap() == new);
            prop_assert!(i.open_individual(&device).unwrap() == new);
            prop_assert!(b.open_individual(&device).is_err());
            prop_assert!(i.open_broadcast(&old).is_err());
            prop_assert!(b.open_broadcast(&new).is_err());
        }
    }

    #[test]
    fn broadcast_layout_is_the_specified_one() {
        let (_, s) = signed(1, 9);
        let old = SecretScalar::new(k256::Scalar::from(3u64)).unwrap();
        let new = SecretScalar::new(k256::Scalar::from(4u64)).unwrap();
        let n = RekeyNotice::broadcast(&s, Role::Subscriber, &old, &new).unwrap();
        let bytes = n.to_bytes();
        let head = s.to_bytes();
        assert_eq!(&bytes[..3], &[1, 1, 2]);
        assert_eq!(&bytes[3..3 + head.len()], &head[..]);
        let body = &bytes[3 + head.len()..];
        assert_eq!(&body[..4], &8u32.to_be_bytes());
        assert_eq!(&body[4..8], &48u32.to_be_bytes());
        // The ciphertext is AEAD under the specified key and associated data.
        let mut info = b"quva/v1/rekey".to_vec();
        info.extend_from_slice(b"\x00\x05a/b/c");
        info.extend_from_slice(&9u32.to_be_bytes());
        info.push(2);
        let k = kdf(b"", &old.to_bytes()[..], &[&info]);
        let plain = aead_open(&k, &bytes[..3 + head.len()], &body[8..]).unwrap();
        assert_eq!(&plain[..], &new.to_bytes()[..]);
    }

    #[test]
    fn decoder_rejects_bad_fields() {
        let (_, s) = signed(2, 5);
        let old = SecretScalar::new(k256::Scalar::from(3u64)).unwrap();
        let b = RekeyNotice::broadcast(&s, Role::Publisher, &old, &old)
            .unwrap()
            .to_bytes();
        for (at, value, err) in [
            (0, 2, DecodeError::UnknownVersion("rekey notice")),
            (1, 3, DecodeError::InvalidValue("rekey notice kind")),
            (1, 0, DecodeError::InvalidValue("rekey notice kind")),
            (2, 0, DecodeError::InvalidValue("rekey notice role")),
        ] {
            let mut bad = b.clone();
            bad[at] = value;
            assert_eq!(RekeyNotice::from_bytes(&bad), Err(err));
        }
        let prev_at = 3 + s.to_bytes().len();
        let mut bad = b.clone();
        bad[prev_at + 3] = 5;
        assert_eq!(
            RekeyNotice::from_bytes(&bad),
            Err(DecodeError::InvalidValue("rekey notice previous epoch"))
        );
        let mut short = b[..prev_at + 4].to_vec();
        put_blob(&mut short, &[0u8; 47]);
        assert_eq!(
            RekeyNotice::from_bytes(&short),
            Err(DecodeError::InvalidValue("rekey notice ct length"))
        );
        // Epoch 0 has no previous epoch to broadcast under.
        let (_, s0) = signed(3, 0);
        assert_eq!(
            RekeyNotice::broadcast(&s0, Role::Publisher, &old, &old),
            Err(RekeyError::EpochGap)
        );
    }
}
