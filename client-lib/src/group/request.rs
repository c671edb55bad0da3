//! The group-key request (proof of possession of the share v_i), PROTOCOL.md §4.

use rand_core::CryptoRngCore;

use super::{GroupError, JoinedMember, Member, property_bytes, property_text};
use crate::codec::{Decode, DecodeError, Encode, Reader, put_blob, put_u8, put_u64};
use crate::curve::{KeyPair, Point, SecretScalar};
use crate::ids::{DeviceId, GroupId, Role};
use crate::symmetric::{VerifyError, aead_open, aead_seal, kdf};

/// Length of `ct` = AEAD_K(sc(v_i), aad): 32 bytes and the tag.
pub const POP_CIPHERTEXT_LEN: usize = 32 + crate::symmetric::TAG_LEN;

/// `u8 1 || str(id) || str(group) || u8 role || u64 T_ms || 16-byte nonce || blob(ct)`, carried as
/// the `quva-gk` user property of the SUBSCRIBE to the device's key topic.
///
/// ct = AEAD_K(sc(v_i), aad = all fields before the blob), K = KDF(nonce, xdh(d_i, Q_CA),
/// "quva/v1/pop" || str(id) || str(group) || u8 role || u64 T_ms).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupKeyRequest {
    id: DeviceId,
    group: GroupId,
    role: Role,
    t_ms: u64,
    nonce: [u8; 16],
    ct: [u8; POP_CIPHERTEXT_LEN],
}

impl GroupKeyRequest {
    /// The device's request, with a fresh nonce from `rng`. `device` is its key pair d_i, `g` its
    /// enrollment secret g_i, `q_ca` the pre-loaded CA key.
    ///
    /// # Errors
    /// [`GroupError::Curve`] if d_i + g_i = 0 (probability 2⁻²⁵⁶).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: &DeviceId,
        group: &GroupId,
        role: Role,
        t_ms: u64,
        device: &KeyPair,
        g: &SecretScalar,
        q_ca: &Point,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Self, GroupError> {
        let mut nonce = [0u8; 16];
        rng.fill_bytes(&mut nonce);
        Self::new_with_nonce(id, group, role, t_ms, nonce, device, g, q_ca)
    }

    /// The request with the given nonce (the `pop` test vectors). The nonce must never repeat.
    ///
    /// # Errors
    /// [`GroupError::Curve`] if d_i + g_i = 0 (probability 2⁻²⁵⁶).
    #[allow(clippy::too_many_arguments)]
    pub fn new_with_nonce(
        id: &DeviceId,
        group: &GroupId,
        role: Role,
        t_ms: u64,
        nonce: [u8; 16],
        device: &KeyPair,
        g: &SecretScalar,
        q_ca: &Point,
    ) -> Result<Self, GroupError> {
        let share = SecretScalar::new(*device.secret().as_scalar() + g.as_scalar())?;
        let mut req = GroupKeyRequest {
            id: id.clone(),
            group: group.clone(),
            role,
            t_ms,
            nonce,
            ct: [0u8; POP_CIPHERTEXT_LEN],
        };
        let shared = device.xdh(q_ca)?;
        let key = req.key(&shared);
        let sealed = aead_seal(&key, &req.aad(), &share.to_bytes()[..]);
        // INVARIANT: AEAD output of a 32-byte message is 32 + TAG_LEN bytes.
        req.ct
            .copy_from_slice(sealed.get(..POP_CIPHERTEXT_LEN).unwrap_or(&[0u8; 48]));
        Ok(req)
    }

    /// The requesting device.
    pub fn id(&self) -> &DeviceId {
        &self.id
    }

    /// The group asked for.
    pub fn group(&self) -> &GroupId {
        &self.group
    }

    /// The role asked for.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The request time T_ms.
    pub fn t_ms(&self) -> u64 {
        self.t_ms
    }

    /// The 16-byte nonce, for the CA's nonce cache.
    pub fn nonce(&self) -> &[u8; 16] {
        &self.nonce
    }

    /// `base64url-nopad` of the encoding: the `quva-gk` property value.
    pub fn to_property(&self) -> String {
        property_text(&self.to_bytes())
    }

    /// Parses a `quva-gk` property value.
    ///
    /// # Errors
    /// [`DecodeError`] for bad base64 or a malformed request.
    pub fn from_property(text: &str) -> Result<Self, DecodeError> {
        Self::from_bytes(&property_bytes(text)?)
    }

    /// The CA's check for the member it authorized to ask (`member` from the device's
    /// certificate and the registered role): the request names that device and role, |T − now|
    /// ≤ `window_ms`, ct opens under xdh(d_CA, Q_i) and v_i·G == Q_i + G_i. Authorization of
    /// (device, group, role) and nonce uniqueness remain the caller's.
    ///
    /// # Errors
    /// [`GroupError::WrongDevice`], [`GroupError::WrongRole`], [`GroupError::StaleTimestamp`], or
    /// the opaque [`GroupError::Verify`] for a failed decryption or proof.
    pub fn open(
        &self,
        ca: &KeyPair,
        member: &Member,
        now_ms: u64,
        window_ms: u64,
    ) -> Result<JoinedMember, GroupError> {
        if member.id != self.id {
            return Err(GroupError::WrongDevice("group-key request"));
        }
        if member.role != self.role {
            return Err(GroupError::WrongRole("group-key request"));
        }
        if now_ms.abs_diff(self.t_ms) > window_ms {
            return Err(GroupError::StaleTimestamp);
        }
        let shared = ca.xdh(&member.q).map_err(|_| VerifyError)?;
        let key = self.key(&shared);
        let plain = aead_open(&key, &self.aad(), &self.ct)?;
        let bytes: &[u8; 32] = plain.as_slice().try_into().map_err(|_| VerifyError)?;
        let share = SecretScalar::from_bytes(bytes).map_err(|_| VerifyError)?;
        JoinedMember::new(member.clone(), share)
    }

    /// All fields before `blob(ct)`: the AEAD's associated data.
    fn aad(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 2 + 64 + 2 + 128 + 1 + 8 + 16);
        put_u8(&mut out, 1);
        self.id.encode(&mut out);
        self.group.encode(&mut out);
        put_u8(&mut out, self.role.to_u8());
        put_u64(&mut out, self.t_ms);
        out.extend_from_slice(&self.nonce);
        out
    }

    fn key(&self, shared: &[u8; 32]) -> zeroize::Zeroizing<[u8; 32]> {
        let mut info = Vec::with_capacity(11 + 2 + 64 + 2 + 128 + 1 + 8);
        info.extend_from_slice(b"quva/v1/pop");
        self.id.encode(&mut info);
        self.group.encode(&mut info);
        put_u8(&mut info, self.role.to_u8());
        put_u64(&mut info, self.t_ms);
        kdf(&self.nonce, shared, &[&info])
    }
}

impl Encode for GroupKeyRequest {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.aad());
        put_blob(out, &self.ct);
    }
}

impl Decode for GroupKeyRequest {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.version("group-key request")?;
        let id = DeviceId::read(r, "group-key request id")?;
        let group = GroupId::read(r, "group-key request group")?;
        let role = Role::read(r, "group-key request role")?;
        let t_ms = r.u64("group-key request T_ms")?;
        let nonce = r.take_array("group-key request nonce")?;
        let ct = r
            .blob("group-key request ct")?
            .try_into()
            .map_err(|_| DecodeError::InvalidValue("group-key request ct length"))?;
        Ok(GroupKeyRequest {
            id,
            group,
            role,
            t_ms,
            nonce,
            ct,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::TestDevice;
    use super::*;
    use proptest::prelude::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    const NOW: u64 = 1_700_000_000_000;
    const WINDOW: u64 = 60_000;

    struct Setup {
        ca: KeyPair,
        dev: TestDevice,
        group: GroupId,
    }

    fn setup(seed: u64, role: Role) -> Setup {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        Setup {
            ca: KeyPair::random(&mut rng),
            dev: TestDevice::new("sensor-01", role, &mut rng),
            group: GroupId::new("plant/line-3/temp").unwrap(),
        }
    }

    fn request(s: &Setup, t_ms: u64, nonce: [u8; 16]) -> GroupKeyRequest {
        let m = s.dev.member();
        GroupKeyRequest::new_with_nonce(
            &m.id,
            &s.group,
            m.role,
            t_ms,
            nonce,
            &s.dev.key,
            &s.dev.g,
            s.ca.public(),
        )
        .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn request_round_trips_and_opens(
            seed in any::<u64>(), publisher in any::<bool>(), t in any::<u64>(),
            nonce in any::<[u8; 16]>(), group in "[a-z0-9]{1,10}(/[a-z0-9]{1,10}){0,3}",
        ) {
            let role = if publisher { Role::Publisher } else { Role::Subscriber };
            let mut s = setup(seed, role);
            s.group = GroupId::new(&group).unwrap();
            let req = request(&s, t, nonce);
            let text = req.to_property();
            let back = GroupKeyRequest::from_property(&text).unwrap();
            prop_assert_eq!(&back, &req);
            prop_assert_eq!(GroupKeyRequest::from_bytes(&req.to_bytes()).unwrap(), req);
            let joined = back.open(&s.ca, s.dev.member(), t, 0).unwrap();
            prop_assert_eq!(joined, s.dev.joined.clone());
        }
    }

    #[test]
    fn random_nonce_entry_point_matches_the_deterministic_one() {
        let s = setup(1, Role::Subscriber);
        let mut rng = ChaCha20Rng::seed_from_u64(99);
        let m = s.dev.member();
        let a = GroupKeyRequest::new(
            &m.id,
            &s.group,
            m.role,
            NOW,
            &s.dev.key,
            &s.dev.g,
            s.ca.public(),
            &mut rng,
        )
        .unwrap();
        assert_eq!(a, request(&s, NOW, *a.nonce()));
        assert!(a.open(&s.ca, m, NOW, WINDOW).is_ok());
    }

    #[test]
    fn request_tamper_fails() {
        let s = setup(2, Role::Publisher);
        let bytes = request(&s, NOW, [7; 16]).to_bytes();
        for i in 0..bytes.len() {
            for mask in [0x01u8, 0x80] {
                let mut bad = bytes.clone();
                bad[i] ^= mask;
                let ok = GroupKeyRequest::from_bytes(&bad)
                    .is_ok_and(|r| r.open(&s.ca, s.dev.member(), NOW, WINDOW).is_ok());
                assert!(!ok, "flipped byte {i} still opens");
            }
        }
        assert!(GroupKeyRequest::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        let mut long = bytes;
        long.push(0);
        assert!(GroupKeyRequest::from_bytes(&long).is_err());
    }

    #[test]
    fn request_rejections() {
        let s = setup(3, Role::Subscriber);
        let req = request(&s, NOW, [1; 16]);
        let m = s.dev.member();
        // Stale and future timestamps.
        assert_eq!(
            req.open(&s.ca, m, NOW + WINDOW + 1, WINDOW),
            Err(GroupError::StaleTimestamp)
        );
        assert_eq!(
            req.open(&s.ca, m, NOW - WINDOW - 1, WINDOW),
            Err(GroupError::StaleTimestamp)
        );
        assert!(req.open(&s.ca, m, NOW + WINDOW, WINDOW).is_ok());
        // Wrong role and device against what the CA authorized.
        let mut as_pub = m.clone();
        as_pub.role = Role::Publisher;
        assert!(matches!(
            req.open(&s.ca, &as_pub, NOW, WINDOW),
            Err(GroupError::WrongRole(_))
        ));
        let mut other_id = m.clone();
        other_id.id = DeviceId::new("sensor-02").unwrap();
        assert!(matches!(
            req.open(&s.ca, &other_id, NOW, WINDOW),
            Err(GroupError::WrongDevice(_))
        ));
        // Another CA cannot open it.
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let other_ca = KeyPair::random(&mut rng);
        assert_eq!(
            req.open(&other_ca, m, NOW, WINDOW),
            Err(GroupError::Verify(VerifyError))
        );
        // A device that knows d_i but not g_i: the ciphertext opens, the proof
        // v_i·G == Q_i + G_i fails.
        let wrong_g = SecretScalar::random(&mut rng);
        let forged = GroupKeyRequest::new_with_nonce(
            &m.id,
            &s.group,
            m.role,
            NOW,
            [2; 16],
            &s.dev.key,
            &wrong_g,
            s.ca.public(),
        )
        .unwrap();
        assert_eq!(
            forged.open(&s.ca, m, NOW, WINDOW),
            Err(GroupError::Verify(VerifyError))
        );
        // Somebody else's key under this device's name: the decryption fails.
        let mallory = KeyPair::random(&mut rng);
        let forged = GroupKeyRequest::new_with_nonce(
            &m.id,
            &s.group,
            m.role,
            NOW,
            [3; 16],
            &mallory,
            &s.dev.g,
            s.ca.public(),
        )
        .unwrap();
        assert_eq!(
            forged.open(&s.ca, m, NOW, WINDOW),
            Err(GroupError::Verify(VerifyError))
        );
    }

    #[test]
    fn decoder_rejects_bad_fields() {
        let s = setup(5, Role::Subscriber);
        let bytes = request(&s, NOW, [1; 16]).to_bytes();
        let mut v2 = bytes.clone();
        v2[0] = 2;
        assert_eq!(
            GroupKeyRequest::from_bytes(&v2),
            Err(DecodeError::UnknownVersion("group-key request"))
        );
        let role_at = 1 + 2 + 9 + 2 + "plant/line-3/temp".len();
        let mut bad_role = bytes.clone();
        bad_role[role_at] = 3;
        assert_eq!(
            GroupKeyRequest::from_bytes(&bad_role),
            Err(DecodeError::InvalidValue("group-key request role"))
        );
        // A ct of the wrong length.
        let mut short = bytes[..bytes.len() - POP_CIPHERTEXT_LEN - 4].to_vec();
        put_blob(&mut short, &[0u8; 47]);
        assert_eq!(
            GroupKeyRequest::from_bytes(&short),
            Err(DecodeError::InvalidValue("group-key request ct length"))
        );
        assert!(GroupKeyRequest::from_property("not base64!").is_err());
    }
}
