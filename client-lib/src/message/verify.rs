//! Verification: the bridge's secret-free, batchable check and the receiving device's
//! check-and-decrypt (PROTOCOL.md §6 "Checks").
//!
//! Order of checks, cheapest first: size, group and epoch, timestamp window, a replay-cache
//! lookup, sender and role, signatures, decryption (devices only), and last the replay-cache
//! insertion, so that only fully verified messages occupy the cache.

use core::fmt;

use rand_core::CryptoRngCore;
use zeroize::Zeroizing;

use super::{
    AnonymousInner, ConnectionIdentity, Content, Directory, GroupLookupError, GroupPublicKeys,
    Header, HeldKeys, Policy, Protection, Rejection, TAG_MSG2, TAG_MSG3, TAG_MSG3_INNER,
    UnverifiedMessage,
};
use crate::codec::{Decode, put_blob};
use crate::curve::xdh;
use crate::ids::{DeviceId, Epoch, GroupId};
use crate::replay::{ReplayCache, ReplayError};

use super::BridgeReplay;
use crate::schnorr::{BatchItem, VerifyingKey, verify_batch};
use crate::symmetric::{aead_open, kdf};

impl UnverifiedMessage {
    /// Checks everything that needs no signature: size, group, epoch, window, replay lookup.
    fn check_envelope(
        &self,
        dir: &impl Directory,
        policy: &Policy,
        seen: impl FnOnce(&[u8; 32]) -> bool,
        now_ms: u64,
    ) -> Result<GroupPublicKeys, Rejection> {
        let keys = self.check_size_and_epoch(dir, policy, now_ms)?;
        check_time(self.header.t_ms, now_ms, policy.window_ms)?;
        if seen(&self.hash) {
            return Err(Rejection::Replayed);
        }
        Ok(keys)
    }

    /// Size, group and epoch: the envelope checks every receiver runs, late or not.
    fn check_size_and_epoch(
        &self,
        dir: &impl Directory,
        policy: &Policy,
        now_ms: u64,
    ) -> Result<GroupPublicKeys, Rejection> {
        if self.raw.len() > policy.max_payload {
            return Err(Rejection::TooLarge);
        }
        let h = &self.header;
        dir.group_keys(&h.group, h.epoch, now_ms)
            .map_err(|e| match e {
                GroupLookupError::UnknownGroup => Rejection::UnknownGroup,
                GroupLookupError::WrongEpoch => Rejection::WrongEpoch,
            })
    }

    /// Checks this message at the bridge, without any secret: group, epoch, window, replay lookup,
    /// and for options 1/2 that the sender is known, a member of the direction's role and the
    /// connection's identity; for option 3 that a group-level connection stays in its group and
    /// role. The signature is left to [`BridgeCheck::verify`] or [`verify_batch_at_bridge`].
    ///
    /// # Errors
    /// The first failing check's [`Rejection`].
    pub fn check_at_bridge(
        &self,
        dir: &impl Directory,
        connection: &ConnectionIdentity,
        policy: &Policy,
        replay: &BridgeReplay,
        now_ms: u64,
    ) -> Result<BridgeCheck<'_>, Rejection> {
        let part = self.replay_partition();
        let keys = self.check_envelope(dir, policy, |h| replay.contains(&part, h), now_ms)?;
        let h = &self.header;
        let key = match &self.content {
            Content::Authenticated { sender, .. } | Content::Confidential { sender, .. } => {
                match connection {
                    ConnectionIdentity::Device(id) if id == sender => {}
                    _ => return Err(Rejection::SenderMismatch),
                }
                member_key(dir, h, sender)?
            }
            Content::Anonymous { .. } => {
                if let ConnectionIdentity::Group { group, role } = connection {
                    if *group != h.group {
                        return Err(Rejection::SenderMismatch);
                    }
                    if *role != h.direction.sender_role() {
                        return Err(Rejection::NotMember);
                    }
                }
                keys.outer_verifier(h.direction)
            }
        };
        Ok(BridgeCheck { msg: self, key })
    }

    /// [`check_at_bridge`](Self::check_at_bridge), then the signature, then the replay insertion.
    ///
    /// # Errors
    /// The first failing check's [`Rejection`].
    pub fn verify_at_bridge(
        &self,
        dir: &impl Directory,
        connection: &ConnectionIdentity,
        policy: &Policy,
        replay: &mut BridgeReplay,
        now_ms: u64,
    ) -> Result<BridgeVerified, Rejection> {
        self.check_at_bridge(dir, connection, policy, replay, now_ms)?
            .verify(replay, now_ms)
    }

    /// Verifies and decrypts this message at a receiving device: every bridge check except the
    /// connection identity, then decryption with the held group key (d_P forward, d_S for
    /// queries); for option 3 also the inner signature and the sender's membership.
    ///
    /// # Errors
    /// The first failing check's [`Rejection`]; nothing is remembered in `replay` then.
    pub fn verify(
        &self,
        dir: &impl Directory,
        keyring: &impl HeldKeys,
        policy: &Policy,
        replay: &mut ReplayCache,
        now_ms: u64,
    ) -> Result<VerifiedMessage, Rejection> {
        let keys = self.check_envelope(dir, policy, |h| replay.contains(h), now_ms)?;
        let verified = self.open_checked(dir, keyring, &keys)?;
        insert_replay(replay, self, now_ms)?;
        Ok(verified)
    }

    /// Verifies and decrypts a message that is read long after it was published, without the
    /// timestamp window and the replay cache (PROTOCOL.md §7.2): a retained OTA key message,
    /// which a device opens only with the keys of its epoch and whose version orders releases,
    /// and an OTA status report, which a signer collects late from its persistent session and
    /// whose timestamp it orders per device and version. Everything else is checked as in
    /// [`verify`](Self::verify): size, group, the epoch as `dir` accepts it at `now_ms` (a signer
    /// collecting status reports passes a directory that still answers for past epochs), the
    /// sender's membership, every signature and the decryption. Use it for nothing else: a
    /// message verified this way can be replayed.
    ///
    /// # Errors
    /// The first failing check's [`Rejection`].
    pub fn verify_without_window(
        &self,
        dir: &impl Directory,
        keyring: &impl HeldKeys,
        policy: &Policy,
        now_ms: u64,
    ) -> Result<VerifiedMessage, Rejection> {
        let keys = self.check_size_and_epoch(dir, policy, now_ms)?;
        self.open_checked(dir, keyring, &keys)
    }

    /// The receiver's checks after the envelope: sender, signatures, decryption.
    fn open_checked(
        &self,
        dir: &impl Directory,
        keyring: &impl HeldKeys,
        keys: &GroupPublicKeys,
    ) -> Result<VerifiedMessage, Rejection> {
        let h = &self.header;
        let (sender, payload) = match &self.content {
            Content::Authenticated {
                sender, payload, ..
            } => {
                let q_i = member_key(dir, h, sender)?;
                self.check_signature(&q_i)?;
                let m = Zeroizing::new(self.slice(payload.clone()).to_vec());
                (sender.clone(), m)
            }
            Content::Confidential {
                sender,
                sender_end,
                salt,
                ciphertext,
            } => {
                let q_i = member_key(dir, h, sender)?;
                self.check_signature(&q_i)?;
                let held = keyring
                    .group_secret(&h.group, h.epoch, h.direction.target_key())
                    .ok_or(Rejection::KeyNotHeld)?;
                let shared = xdh(held.secret(), &q_i.0).map_err(|_| Rejection::DecryptionFailed)?;
                let prefix = self.slice(0..*sender_end);
                let key = kdf(salt, &shared[..], &[TAG_MSG2.as_bytes(), prefix]);
                let aad = self.slice(0..sender_end + salt.len());
                let m = aead_open(&key, aad, self.slice(ciphertext.clone()))
                    .map_err(|_| Rejection::DecryptionFailed)?;
                (sender.clone(), m)
            }
            Content::Anonymous { z, ciphertext } => {
                self.check_signature(&keys.outer_verifier(h.direction))?;
                let held = keyring
                    .group_secret(&h.group, h.epoch, h.direction.target_key())
                    .ok_or(Rejection::KeyNotHeld)?;
                let shared = xdh(held.secret(), z).map_err(|_| Rejection::DecryptionFailed)?;
                let z_bytes = z.to_bytes();
                let key = kdf(&z_bytes, &shared[..], &[TAG_MSG3.as_bytes(), self.hdr()]);
                let aad = self.slice(0..self.hdr_end + z_bytes.len());
                let plain = aead_open(&key, aad, self.slice(ciphertext.clone()))
                    .map_err(|_| Rejection::DecryptionFailed)?;
                let inner = AnonymousInner::from_bytes(&plain).map_err(Rejection::Malformed)?;
                let q_i = member_key(dir, h, &inner.sender)?;
                let mut signed = Zeroizing::new(aad.to_vec());
                inner.sender.encode(&mut signed);
                put_blob(&mut signed, &inner.payload);
                q_i.verify(TAG_MSG3_INNER, &signed, &inner.signature)
                    .map_err(|_| Rejection::BadSignature)?;
                (inner.sender, inner.payload)
            }
        };
        Ok(VerifiedMessage {
            header: h.clone(),
            sender,
            payload,
            hash: self.hash,
        })
    }

    fn check_signature(&self, key: &VerifyingKey) -> Result<(), Rejection> {
        key.verify(self.signature_tag(), self.body(), &self.signature)
            .map_err(|_| Rejection::BadSignature)
    }
}

/// The sender's key, if it is known and a member of the role `h`'s direction needs.
fn member_key(
    dir: &impl Directory,
    h: &Header,
    sender: &DeviceId,
) -> Result<VerifyingKey, Rejection> {
    let key = dir.device_key(sender).ok_or(Rejection::UnknownSender)?;
    if dir.is_member(&h.group, h.epoch, sender, h.direction.sender_role()) {
        Ok(key)
    } else {
        Err(Rejection::NotMember)
    }
}

fn check_time(t_ms: u64, now_ms: u64, window_ms: u64) -> Result<(), Rejection> {
    if t_ms < now_ms.saturating_sub(window_ms) {
        Err(Rejection::StaleTimestamp)
    } else if t_ms > now_ms.saturating_add(window_ms) {
        Err(Rejection::FutureTimestamp)
    } else {
        Ok(())
    }
}

fn insert_replay(
    replay: &mut ReplayCache,
    msg: &UnverifiedMessage,
    now_ms: u64,
) -> Result<(), Rejection> {
    replay_rejection(
        replay.check_and_insert(msg.hash, msg.header.t_ms, now_ms),
        msg.header.t_ms,
        now_ms,
    )
}

fn replay_rejection(r: Result<(), ReplayError>, t_ms: u64, now_ms: u64) -> Result<(), Rejection> {
    r.map_err(|e| match e {
        ReplayError::Replayed | ReplayError::BelowFloor => Rejection::Replayed,
        ReplayError::OutsideWindow if t_ms < now_ms => Rejection::StaleTimestamp,
        ReplayError::OutsideWindow => Rejection::FutureTimestamp,
    })
}

/// A message that passed the bridge's checks except its signature, bound to the key that must
/// have made it: the sender's Q_i (options 1/2) or the group key Q_S/Q_P (option 3).
#[derive(Debug)]
pub struct BridgeCheck<'m> {
    msg: &'m UnverifiedMessage,
    key: VerifyingKey,
}

impl<'m> BridgeCheck<'m> {
    /// The message under check.
    pub fn message(&self) -> &'m UnverifiedMessage {
        self.msg
    }

    /// The (key, tag, body, signature) to verify, for [`crate::schnorr::verify_batch`].
    pub fn batch_item(&self) -> BatchItem<'_> {
        BatchItem {
            key: &self.key,
            tag: self.msg.signature_tag(),
            body: self.msg.body(),
            signature: &self.msg.signature,
        }
    }

    /// Verifies the signature alone, then records the message in the replay cache.
    ///
    /// # Errors
    /// [`Rejection::BadSignature`] or a replay-cache [`Rejection`].
    pub fn verify(
        self,
        replay: &mut BridgeReplay,
        now_ms: u64,
    ) -> Result<BridgeVerified, Rejection> {
        self.verify_signature()?.accept(replay, now_ms)
    }

    /// Verifies the signature alone; the replay cache is left to [`SignedCheck::accept`], so
    /// that no lock on it need be held while signatures are checked.
    ///
    /// # Errors
    /// [`Rejection::BadSignature`].
    pub fn verify_signature(self) -> Result<SignedCheck<'m>, Rejection> {
        self.msg.check_signature(&self.key)?;
        Ok(SignedCheck { msg: self.msg })
    }
}

/// A message whose bridge checks and signature passed; only the replay cache is left.
#[derive(Debug)]
pub struct SignedCheck<'m> {
    msg: &'m UnverifiedMessage,
}

impl SignedCheck<'_> {
    /// Records the message in its replay partition (PROTOCOL.md §6, §8): the last step, so a
    /// duplicate accepted meanwhile (also inside the same batch) is refused here.
    ///
    /// # Errors
    /// [`Rejection::Replayed`], [`Rejection::StaleTimestamp`] or [`Rejection::FutureTimestamp`].
    pub fn accept(
        self,
        replay: &mut BridgeReplay,
        now_ms: u64,
    ) -> Result<BridgeVerified, Rejection> {
        let t_ms = self.msg.header.t_ms;
        let r = replay.check_and_insert(self.msg.replay_partition(), self.msg.hash, t_ms, now_ms);
        replay_rejection(r, t_ms, now_ms)?;
        Ok(BridgeVerified {
            header: self.msg.header.clone(),
            sender: self.msg.claimed_sender().cloned(),
            hash: self.msg.hash,
        })
    }
}

/// Verifies the signatures of many [`BridgeCheck`]s in one batch ([`verify_batch`]); one result
/// per check, in order. No replay cache is touched: accept the good ones in order with
/// [`SignedCheck::accept`].
pub fn verify_signatures<'m>(
    checks: Vec<BridgeCheck<'m>>,
    rng: &mut impl CryptoRngCore,
) -> Vec<Result<SignedCheck<'m>, Rejection>> {
    if checks.len() == 1 {
        return checks
            .into_iter()
            .map(BridgeCheck::verify_signature)
            .collect();
    }
    let verdicts = {
        let items: Vec<BatchItem<'_>> = checks.iter().map(BridgeCheck::batch_item).collect();
        verify_batch(&items, rng)
    };
    checks
        .into_iter()
        .zip(verdicts)
        .map(|(check, ok)| {
            if ok {
                Ok(SignedCheck { msg: check.msg })
            } else {
                Err(Rejection::BadSignature)
            }
        })
        .collect()
}

/// [`verify_signatures`], then [`SignedCheck::accept`] for each good one in order (so a
/// duplicate inside the batch is a replay). Returns one result per check, in order.
pub fn verify_batch_at_bridge(
    checks: Vec<BridgeCheck<'_>>,
    replay: &mut BridgeReplay,
    now_ms: u64,
    rng: &mut impl CryptoRngCore,
) -> Vec<Result<BridgeVerified, Rejection>> {
    verify_signatures(checks, rng)
        .into_iter()
        .map(|r| r.and_then(|signed| signed.accept(replay, now_ms)))
        .collect()
}

/// What the bridge learns from a message it accepted: routing facts, never the payload, and for
/// option 3 no sender.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeVerified {
    header: Header,
    sender: Option<DeviceId>,
    hash: [u8; 32],
}

impl BridgeVerified {
    /// The verified header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The sender of an option-1/2 message (equal to the connection's identity); `None` for
    /// option 3.
    pub fn sender(&self) -> Option<&DeviceId> {
        self.sender.as_ref()
    }

    /// SHA-256 of the message.
    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }
}

/// A message that passed every check at a receiving device; the only type that exposes a
/// payload.
pub struct VerifiedMessage {
    header: Header,
    sender: DeviceId,
    payload: Zeroizing<Vec<u8>>,
    hash: [u8; 32],
}

impl VerifiedMessage {
    /// The verified header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The group.
    pub fn group(&self) -> &GroupId {
        &self.header.group
    }

    /// The epoch.
    pub fn epoch(&self) -> Epoch {
        self.header.epoch
    }

    /// The protection option.
    pub fn protection(&self) -> Protection {
        self.header.protection
    }

    /// Forward or query.
    pub fn direction(&self) -> super::Direction {
        self.header.direction
    }

    /// The sender's timestamp.
    pub fn t_ms(&self) -> u64 {
        self.header.t_ms
    }

    /// The authenticated sender. For option 3 it comes from inside the ciphertext, checked by the
    /// inner signature: receivers learn it, the bridge does not.
    pub fn sender(&self) -> &DeviceId {
        &self.sender
    }

    /// The plaintext payload M.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The payload, zeroized when dropped.
    pub fn into_payload(self) -> Zeroizing<Vec<u8>> {
        self.payload
    }

    /// SHA-256 of the message.
    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }
}

impl fmt::Debug for VerifiedMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedMessage")
            .field("header", &self.header)
            .field("sender", &self.sender)
            .field("payload_len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::World;
    use super::super::{Direction, Sealer};
    use super::*;
    use crate::curve::{KeyPair, Point};
    use crate::ids::Role;
    use proptest::prelude::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    /// A directory with public material only: what the bridge has.
    struct PublicDirectory {
        group: GroupId,
        epoch: Epoch,
        keys: GroupPublicKeys,
        devices: Vec<(DeviceId, Point, Option<Role>)>,
    }

    impl PublicDirectory {
        fn of(w: &World) -> Self {
            PublicDirectory {
                group: w.group.clone(),
                epoch: w.epoch,
                keys: w.group_keys(),
                devices: vec![
                    (
                        w.publisher.clone(),
                        *w.pub_key.public(),
                        Some(Role::Publisher),
                    ),
                    (
                        w.subscriber.clone(),
                        *w.sub_key.public(),
                        Some(Role::Subscriber),
                    ),
                    (w.outsider.clone(), *w.out_key.public(), None),
                ],
            }
        }
    }

    impl Directory for PublicDirectory {
        fn group_keys(
            &self,
            group: &GroupId,
            epoch: Epoch,
            _now_ms: u64,
        ) -> Result<GroupPublicKeys, GroupLookupError> {
            if *group != self.group {
                Err(GroupLookupError::UnknownGroup)
            } else if epoch != self.epoch {
                Err(GroupLookupError::WrongEpoch)
            } else {
                Ok(self.keys)
            }
        }
        fn device_key(&self, id: &DeviceId) -> Option<VerifyingKey> {
            self.devices
                .iter()
                .find(|d| d.0 == *id)
                .map(|d| VerifyingKey(d.1))
        }
        fn is_member(&self, group: &GroupId, _e: Epoch, id: &DeviceId, role: Role) -> bool {
            *group == self.group && self.devices.iter().any(|d| d.0 == *id && d.2 == Some(role))
        }
    }

    fn conn(w: &World, d: Direction) -> ConnectionIdentity {
        ConnectionIdentity::Device(w.sender_id(d).clone())
    }

    fn at_bridge(
        w: &World,
        d: Direction,
        wire: &[u8],
        now: u64,
    ) -> Result<BridgeVerified, Rejection> {
        let msg = UnverifiedMessage::decode(wire)?;
        let mut replay = BridgeReplay::default();
        msg.verify_at_bridge(w, &conn(w, d), &Policy::default(), &mut replay, now)
    }

    fn at_receiver(
        w: &World,
        d: Direction,
        wire: &[u8],
        now: u64,
    ) -> Result<VerifiedMessage, Rejection> {
        let msg = UnverifiedMessage::decode(wire)?;
        let mut replay = ReplayCache::default();
        msg.verify(w, &w.receiver(d), &Policy::default(), &mut replay, now)
    }

    /// Asserts that both the bridge and the receiver refuse with `want`.
    fn both_reject(w: &World, d: Direction, wire: &[u8], now: u64, want: Rejection, what: &str) {
        assert_eq!(
            at_bridge(w, d, wire, now).err(),
            Some(want),
            "bridge: {what}"
        );
        assert_eq!(
            at_receiver(w, d, wire, now).err(),
            Some(want),
            "receiver: {what}"
        );
    }

    fn round_trip(w: &World, p: Protection, d: Direction, m: &[u8]) {
        let wire = w.seal(p, d, m, w.now);
        let b = at_bridge(w, d, &wire, w.now).unwrap();
        assert_eq!(b.header().protection, p);
        assert_eq!(b.header().direction, d);
        assert_eq!(b.header().group, w.group);
        match p {
            Protection::Anonymous => assert_eq!(b.sender(), None),
            _ => assert_eq!(b.sender(), Some(w.sender_id(d))),
        }
        let v = at_receiver(w, d, &wire, w.now).unwrap();
        assert_eq!(v.payload(), m);
        assert_eq!(v.sender(), w.sender_id(d));
        assert_eq!(v.protection(), p);
        assert_eq!(v.direction(), d);
        assert_eq!(v.group(), &w.group);
        assert_eq!(v.epoch(), w.epoch);
        assert_eq!(v.t_ms(), w.now);
        assert_eq!(v.hash(), b.hash());
    }

    #[test]
    fn empty_and_one_byte_payloads_round_trip_everywhere() {
        let w = World::new(20);
        for p in World::PROTECTIONS {
            for d in World::DIRECTIONS {
                round_trip(&w, p, d, b"");
                round_trip(&w, p, d, b"x");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn every_option_round_trips_in_both_directions(
            group in "[a-z0-9]{1,12}(/[A-Za-z0-9_.-]{1,12}){0,6}",
            payload in proptest::collection::vec(any::<u8>(), 0..600),
            seed: u64,
        ) {
            let w = World::with_group(seed, &group);
            for p in World::PROTECTIONS {
                for d in World::DIRECTIONS {
                    round_trip(&w, p, d, &payload);
                }
            }
        }
    }

    #[test]
    fn flipping_any_byte_fails_verification() {
        let w = World::new(21);
        for p in World::PROTECTIONS {
            for d in World::DIRECTIONS {
                let wire = w.seal(p, d, b"tamper me", w.now);
                assert!(at_bridge(&w, d, &wire, w.now).is_ok());
                assert!(at_receiver(&w, d, &wire, w.now).is_ok());
                for i in 0..wire.len() {
                    for mask in [0x01u8, 0x80] {
                        let mut bad = wire.clone();
                        bad[i] ^= mask;
                        assert!(
                            at_bridge(&w, d, &bad, w.now).is_err(),
                            "{p:?} {d:?}: bridge accepted byte {i} ^ {mask:#x}"
                        );
                        assert!(
                            at_receiver(&w, d, &bad, w.now).is_err(),
                            "{p:?} {d:?}: receiver accepted byte {i} ^ {mask:#x}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_unknown_group() {
        let w = World::new(22);
        let other = GroupId::new("plant/line-4/temp").unwrap();
        for p in World::PROTECTIONS {
            let d = Direction::Forward;
            let s = Sealer {
                group: &other,
                ..w.sealer(d)
            };
            let wire = w.seal_as(s, p, b"m", w.now);
            both_reject(
                &w,
                d,
                &wire,
                w.now,
                Rejection::UnknownGroup,
                "unknown group",
            );
        }
    }

    #[test]
    fn rejects_wrong_epoch_and_honours_the_grace_period() {
        let w = World::new(23);
        for p in World::PROTECTIONS {
            for d in World::DIRECTIONS {
                for e in [Epoch(5), Epoch(8)] {
                    let s = Sealer {
                        epoch: e,
                        ..w.sealer(d)
                    };
                    let wire = w.seal_as(s, p, b"m", w.now);
                    both_reject(&w, d, &wire, w.now, Rejection::WrongEpoch, "epoch");
                }
                // The previous epoch passes within its grace period and fails after it.
                let s = Sealer {
                    epoch: w.prev_epoch,
                    ..w.sealer(d)
                };
                let t = w.grace_until;
                let wire = w.seal_as(s, p, b"m", t);
                assert!(at_bridge(&w, d, &wire, t).is_ok());
                assert_eq!(at_receiver(&w, d, &wire, t).unwrap().payload(), b"m");
                both_reject(&w, d, &wire, t + 1, Rejection::WrongEpoch, "grace over");
            }
        }
    }

    #[test]
    fn rejects_stale_timestamps() {
        let w = World::new(24);
        for p in World::PROTECTIONS {
            for d in World::DIRECTIONS {
                let t = w.now - 60_000;
                let wire = w.seal(p, d, b"m", t);
                assert!(at_bridge(&w, d, &wire, w.now).is_ok(), "edge of window");
                let wire = w.seal(p, d, b"m", t - 1);
                both_reject(&w, d, &wire, w.now, Rejection::StaleTimestamp, "stale");
            }
        }
    }

    #[test]
    fn rejects_future_timestamps() {
        let w = World::new(25);
        for p in World::PROTECTIONS {
            for d in World::DIRECTIONS {
                let t = w.now + 60_000;
                let wire = w.seal(p, d, b"m", t);
                assert!(at_receiver(&w, d, &wire, w.now).is_ok(), "edge of window");
                let wire = w.seal(p, d, b"m", t + 1);
                both_reject(&w, d, &wire, w.now, Rejection::FutureTimestamp, "future");
            }
        }
    }

    #[test]
    fn rejects_replayed_messages() {
        let w = World::new(26);
        for p in World::PROTECTIONS {
            for d in World::DIRECTIONS {
                let wire = w.seal(p, d, b"m", w.now);
                let msg = UnverifiedMessage::decode(&wire).unwrap();
                let policy = Policy::default();
                let mut replay = BridgeReplay::default();
                let c = conn(&w, d);
                assert!(
                    msg.verify_at_bridge(&w, &c, &policy, &mut replay, w.now)
                        .is_ok()
                );
                assert_eq!(
                    msg.verify_at_bridge(&w, &c, &policy, &mut replay, w.now + 1),
                    Err(Rejection::Replayed)
                );
                let mut replay = ReplayCache::default();
                let keys = w.receiver(d);
                assert!(msg.verify(&w, &keys, &policy, &mut replay, w.now).is_ok());
                assert_eq!(
                    msg.verify(&w, &keys, &policy, &mut replay, w.now + 1).err(),
                    Some(Rejection::Replayed)
                );
                // After the window the replay is refused by its timestamp.
                assert_eq!(
                    msg.verify(&w, &keys, &policy, &mut replay, w.now + 60_001)
                        .err(),
                    Some(Rejection::StaleTimestamp)
                );
            }
        }
    }

    #[test]
    fn a_re_signed_option_3_copy_is_a_replay() {
        // Any holder of the group signing key (every publisher, forward) can strip the outer
        // signature of another publisher's option-3 message and sign the same body again.
        let w = World::new(31);
        let d = Direction::Forward;
        let wire = w.seal(Protection::Anonymous, d, b"m", w.now);
        let msg = UnverifiedMessage::decode(&wire).unwrap();
        let (_, d_s) = w.keys_at(w.epoch);
        let resigned_sig = d_s
            .sign(msg.signature_tag(), msg.body(), &mut *w.rng.borrow_mut())
            .unwrap();
        let mut copy = msg.body().to_vec();
        copy.extend_from_slice(&crate::codec::Encode::to_bytes(&resigned_sig));
        assert_ne!(copy, wire);
        let copy = UnverifiedMessage::decode(&copy).unwrap();
        let policy = Policy::default();
        let keys = w.receiver(d);
        let mut replay = ReplayCache::default();
        assert!(msg.verify(&w, &keys, &policy, &mut replay, w.now).is_ok());
        assert_eq!(
            copy.verify(&w, &keys, &policy, &mut replay, w.now + 1)
                .err(),
            Some(Rejection::Replayed)
        );
        let mut replay = BridgeReplay::default();
        let c = conn(&w, d);
        assert!(
            msg.verify_at_bridge(&w, &c, &policy, &mut replay, w.now)
                .is_ok()
        );
        assert_eq!(
            copy.verify_at_bridge(&w, &c, &policy, &mut replay, w.now + 1)
                .err(),
            Some(Rejection::Replayed)
        );
    }

    #[test]
    fn rejects_a_sender_in_the_wrong_role() {
        let w = World::new(27);
        for p in [Protection::Authenticated, Protection::Confidential] {
            // A publisher may not send a query, a subscriber may not publish forward.
            for d in World::DIRECTIONS {
                let wrong = w.sender_id(match d {
                    Direction::Forward => Direction::Query,
                    Direction::Query => Direction::Forward,
                });
                let wrong_key = if *wrong == w.publisher {
                    &w.pub_key
                } else {
                    &w.sub_key
                };
                let s = Sealer {
                    sender: wrong,
                    key: wrong_key,
                    ..w.sealer(d)
                };
                let wire = w.seal_as(s, p, b"m", w.now);
                let msg = UnverifiedMessage::decode(&wire).unwrap();
                let mut replay = BridgeReplay::default();
                assert_eq!(
                    msg.verify_at_bridge(
                        &w,
                        &ConnectionIdentity::Device(wrong.clone()),
                        &Policy::default(),
                        &mut replay,
                        w.now
                    ),
                    Err(Rejection::NotMember),
                    "{p:?} {d:?}"
                );
                assert_eq!(
                    at_receiver(&w, d, &wire, w.now).err(),
                    Some(Rejection::NotMember)
                );
            }
        }
        // Option 3: a registered non-member who somehow holds the group key is caught by the
        // receiver after decryption; the bridge cannot tell.
        for d in World::DIRECTIONS {
            let s = Sealer {
                sender: &w.outsider,
                key: &w.out_key,
                ..w.sealer(d)
            };
            let wire = w.seal_as(s, Protection::Anonymous, b"m", w.now);
            assert!(at_bridge(&w, d, &wire, w.now).is_ok());
            assert_eq!(
                at_receiver(&w, d, &wire, w.now).err(),
                Some(Rejection::NotMember)
            );
        }
    }

    #[test]
    fn rejects_an_unknown_sender() {
        let w = World::new(28);
        let ghost = DeviceId::new("ghost").unwrap();
        let ghost_key = KeyPair::random(&mut ChaCha20Rng::seed_from_u64(1));
        for p in World::PROTECTIONS {
            for d in World::DIRECTIONS {
                let s = Sealer {
                    sender: &ghost,
                    key: &ghost_key,
                    ..w.sealer(d)
                };
                let wire = w.seal_as(s, p, b"m", w.now);
                if p != Protection::Anonymous {
                    let msg = UnverifiedMessage::decode(&wire).unwrap();
                    let mut replay = BridgeReplay::default();
                    assert_eq!(
                        msg.verify_at_bridge(
                            &w,
                            &ConnectionIdentity::Device(ghost.clone()),
                            &Policy::default(),
                            &mut replay,
                            w.now
                        ),
                        Err(Rejection::UnknownSender)
                    );
                }
                assert_eq!(
                    at_receiver(&w, d, &wire, w.now).err(),
                    Some(Rejection::UnknownSender),
                    "{p:?} {d:?}"
                );
            }
        }
    }

    #[test]
    fn option3_inner_signature_must_be_the_claimed_senders() {
        // A holder of the group signing key who claims another member's identity: the outer
        // signature is fine, the inner one is not.
        let w = World::new(29);
        for d in World::DIRECTIONS {
            let s = Sealer {
                key: &w.out_key,
                ..w.sealer(d)
            };
            let wire = w.seal_as(s, Protection::Anonymous, b"m", w.now);
            assert!(at_bridge(&w, d, &wire, w.now).is_ok());
            assert_eq!(
                at_receiver(&w, d, &wire, w.now).err(),
                Some(Rejection::BadSignature)
            );
        }
    }

    #[test]
    fn oversize_is_refused_before_any_lookup_or_crypto() {
        struct Untouchable;
        impl Directory for Untouchable {
            fn group_keys(
                &self,
                _: &GroupId,
                _: Epoch,
                _: u64,
            ) -> Result<GroupPublicKeys, GroupLookupError> {
                panic!("directory consulted")
            }
            fn device_key(&self, _: &DeviceId) -> Option<VerifyingKey> {
                panic!("directory consulted")
            }
            fn is_member(&self, _: &GroupId, _: Epoch, _: &DeviceId, _: Role) -> bool {
                panic!("directory consulted")
            }
        }
        let w = World::new(30);
        let big = vec![7u8; 2048];
        let policy = Policy {
            max_payload: 1024,
            ..Policy::default()
        };
        for p in World::PROTECTIONS {
            for d in World::DIRECTIONS {
                let wire = w.seal(p, d, &big, w.now);
                assert_eq!(
                    UnverifiedMessage::decode_with_limit(&wire, policy.max_payload),
                    Err(Rejection::TooLarge)
                );
                // Decoded under a laxer limit, the policy still refuses it first.
                let msg = UnverifiedMessage::decode(&wire).unwrap();
                let mut replay = BridgeReplay::default();
                assert_eq!(
                    msg.verify_at_bridge(&Untouchable, &conn(&w, d), &policy, &mut replay, w.now),
                    Err(Rejection::TooLarge)
                );
                assert_eq!(
                    msg.verify(
                        &Untouchable,
                        &w.receiver(d),
                        &policy,
                        &mut ReplayCache::default(),
                        w.now
                    )
                    .err(),
                    Some(Rejection::TooLarge)
                );
            }
        }
    }

    #[test]
    fn bridge_rejects_a_sender_that_is_not_the_connection() {
        let w = World::new(31);
        for p in [Protection::Authenticated, Protection::Confidential] {
            for d in World::DIRECTIONS {
                let wire = w.seal(p, d, b"m", w.now);
                let msg = UnverifiedMessage::decode(&wire).unwrap();
                for c in [
                    ConnectionIdentity::Device(w.outsider.clone()),
                    ConnectionIdentity::Group {
                        group: w.group.clone(),
                        role: d.sender_role(),
                    },
                ] {
                    let mut replay = BridgeReplay::default();
                    assert_eq!(
                        msg.verify_at_bridge(&w, &c, &Policy::default(), &mut replay, w.now),
                        Err(Rejection::SenderMismatch),
                        "{p:?} {d:?} {c:?}"
                    );
                    assert!(replay.is_empty());
                }
            }
        }
    }

    #[test]
    fn group_connections_publish_only_option3_of_their_role_and_group() {
        let w = World::new(32);
        let other = GroupId::new("elsewhere").unwrap();
        for d in World::DIRECTIONS {
            let wire = w.seal(Protection::Anonymous, d, b"m", w.now);
            let msg = UnverifiedMessage::decode(&wire).unwrap();
            let check = |c: ConnectionIdentity| {
                let mut replay = BridgeReplay::default();
                msg.verify_at_bridge(&w, &c, &Policy::default(), &mut replay, w.now)
            };
            let role = d.sender_role();
            assert!(
                check(ConnectionIdentity::Group {
                    group: w.group.clone(),
                    role
                })
                .is_ok()
            );
            assert_eq!(
                check(ConnectionIdentity::Group {
                    group: w.group.clone(),
                    role: role.other()
                }),
                Err(Rejection::NotMember)
            );
            assert_eq!(
                check(ConnectionIdentity::Group {
                    group: other.clone(),
                    role
                }),
                Err(Rejection::SenderMismatch)
            );
        }
    }

    #[test]
    fn receivers_need_the_right_key() {
        let w = World::new(33);
        for p in [Protection::Confidential, Protection::Anonymous] {
            for d in World::DIRECTIONS {
                let wire = w.seal(p, d, b"m", w.now);
                let msg = UnverifiedMessage::decode(&wire).unwrap();
                // The senders' side holds the other key: it cannot read its own direction.
                let wrong_side = w.receiver(match d {
                    Direction::Forward => Direction::Query,
                    Direction::Query => Direction::Forward,
                });
                let mut replay = ReplayCache::default();
                assert_eq!(
                    msg.verify(&w, &wrong_side, &Policy::default(), &mut replay, w.now)
                        .err(),
                    Some(Rejection::KeyNotHeld)
                );
                assert!(replay.is_empty());
            }
        }
        // Encrypted to the wrong target: signatures verify, decryption fails.
        for d in World::DIRECTIONS {
            let s = w.sealer(d);
            let wrong_target = match d {
                Direction::Forward => w.d_s.public(),
                Direction::Query => w.d_p.public(),
            };
            let d_grp = match d {
                Direction::Forward => &w.d_s,
                Direction::Query => &w.d_p,
            };
            let mut rng = ChaCha20Rng::seed_from_u64(5);
            let two = s.option2(w.now, wrong_target, b"m", &mut rng).unwrap();
            let three = s
                .option3(w.now, d_grp, wrong_target, b"m", &mut rng)
                .unwrap();
            for wire in [two, three] {
                assert!(at_bridge(&w, d, &wire, w.now).is_ok());
                assert_eq!(
                    at_receiver(&w, d, &wire, w.now).err(),
                    Some(Rejection::DecryptionFailed)
                );
            }
        }
    }

    #[test]
    fn the_bridge_needs_no_secret_and_learns_no_option3_sender() {
        let w = World::new(34);
        let public = PublicDirectory::of(&w);
        for p in World::PROTECTIONS {
            for d in World::DIRECTIONS {
                let secret_payload = b"reading: 21.5 C";
                let wire = w.seal(p, d, secret_payload, w.now);
                let msg = UnverifiedMessage::decode(&wire).unwrap();
                let mut replay = BridgeReplay::default();
                let v = msg
                    .verify_at_bridge(
                        &public,
                        &conn(&w, d),
                        &Policy::default(),
                        &mut replay,
                        w.now,
                    )
                    .unwrap();
                if p == Protection::Anonymous {
                    assert_eq!(v.sender(), None);
                    assert_eq!(msg.claimed_sender(), None);
                    // Nothing in the bytes names or identifies the sender, or shows the payload.
                    let q_i = w.sender_key(d).public().to_bytes();
                    let needles: [&[u8]; 3] =
                        [w.sender_id(d).as_str().as_bytes(), &q_i, secret_payload];
                    for needle in needles {
                        assert!(!wire.windows(needle.len()).any(|x| x == needle));
                    }
                } else {
                    assert_eq!(v.sender(), Some(w.sender_id(d)));
                }
            }
        }
    }

    #[test]
    fn batch_verification_matches_single_verification() {
        let w = World::new(35);
        let mut wires = Vec::new();
        for p in World::PROTECTIONS {
            for d in World::DIRECTIONS {
                wires.push((d, w.seal(p, d, b"batch", w.now), true));
                // A forged signature: swap in another message's signature.
                let mut bad = w.seal(p, d, b"other", w.now);
                let n = bad.len();
                let donor = w.seal(p, d, b"donor", w.now);
                bad[n - 65..].copy_from_slice(&donor[donor.len() - 65..]);
                wires.push((d, bad, false));
            }
        }
        // A duplicate inside the batch is a replay.
        wires.push((wires[0].0, wires[0].1.clone(), false));
        let msgs: Vec<(Direction, UnverifiedMessage)> = wires
            .iter()
            .map(|(d, b, _)| (*d, UnverifiedMessage::decode(b).unwrap()))
            .collect();
        let mut replay = BridgeReplay::default();
        let checks: Vec<BridgeCheck<'_>> = msgs
            .iter()
            .map(|(d, m)| {
                m.check_at_bridge(&w, &conn(&w, *d), &Policy::default(), &replay, w.now)
                    .unwrap()
            })
            .collect();
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let results = verify_batch_at_bridge(checks, &mut replay, w.now, &mut rng);
        for (i, (r, (_, _, good))) in results.iter().zip(&wires).enumerate() {
            assert_eq!(r.is_ok(), *good, "item {i}: {r:?}");
        }
        assert_eq!(
            results.last().unwrap().as_ref().err(),
            Some(&Rejection::Replayed)
        );
        assert_eq!(results[1].as_ref().err(), Some(&Rejection::BadSignature));
        assert_eq!(replay.len(), 6);
    }

    #[test]
    fn verified_messages_do_not_print_their_payload() {
        let w = World::new(36);
        let wire = w.seal(
            Protection::Confidential,
            Direction::Forward,
            b"TOPSECRET",
            w.now,
        );
        let v = at_receiver(&w, Direction::Forward, &wire, w.now).unwrap();
        assert!(!format!("{v:?}").contains("TOPSECRET"));
        assert_eq!(&*v.into_payload(), b"TOPSECRET");
    }

    #[test]
    fn inner_plaintext_codec_round_trips_and_rejects_trailing_bytes() {
        use crate::codec::Encode;
        let w = World::new(37);
        let sig = w.pub_key.sign("t", b"b", &mut *w.rng.borrow_mut()).unwrap();
        let inner = AnonymousInner {
            sender: w.publisher.clone(),
            signature: sig,
            payload: Zeroizing::new(b"m".to_vec()),
        };
        let bytes = inner.to_bytes();
        let back = AnonymousInner::from_bytes(&bytes).unwrap();
        assert_eq!(back.sender, w.publisher);
        assert_eq!(back.signature, sig);
        assert_eq!(&*back.payload, b"m");
        let mut long = bytes.clone();
        long.push(0);
        assert!(AnonymousInner::from_bytes(&long).is_err());
        assert!(AnonymousInner::from_bytes(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn late_verification_skips_only_the_window_and_the_replay_cache() {
        let w = World::new(38);
        let late = w.now + 7 * 86_400_000;
        let policy = Policy::default();
        for p in World::PROTECTIONS {
            for d in World::DIRECTIONS {
                let wire = w.seal(p, d, b"retained", w.now);
                let msg = UnverifiedMessage::decode(&wire).unwrap();
                // The windowed check refuses it a week later; the late one accepts it, twice.
                assert_eq!(
                    at_receiver(&w, d, &wire, late).err(),
                    Some(Rejection::StaleTimestamp)
                );
                for _ in 0..2 {
                    let v = msg
                        .verify_without_window(&w, &w.receiver(d), &policy, late)
                        .unwrap();
                    assert_eq!(v.payload(), b"retained");
                }
                // Everything else is still checked.
                let mut bad = wire.clone();
                let n = bad.len();
                bad[n - 1] ^= 1;
                let bad = UnverifiedMessage::decode(&bad);
                if let Ok(bad) = bad {
                    assert_eq!(
                        bad.verify_without_window(&w, &w.receiver(d), &policy, late)
                            .err(),
                        Some(Rejection::BadSignature)
                    );
                }
                let small = Policy {
                    max_payload: wire.len() - 1,
                    ..policy
                };
                assert_eq!(
                    msg.verify_without_window(&w, &w.receiver(d), &small, late)
                        .err(),
                    Some(Rejection::TooLarge)
                );
            }
        }
        // Keys of an epoch the directory no longer answers for are refused.
        let old = Sealer {
            epoch: w.prev_epoch,
            ..w.sealer(Direction::Forward)
        };
        let wire = w.seal_as(old, Protection::Confidential, b"m", w.now);
        let msg = UnverifiedMessage::decode(&wire).unwrap();
        assert_eq!(
            msg.verify_without_window(&w, &w.receiver(Direction::Forward), &policy, late)
                .err(),
            Some(Rejection::WrongEpoch)
        );
        // A non-member sender is refused.
        let s = Sealer {
            sender: &w.outsider,
            key: &w.out_key,
            ..w.sealer(Direction::Forward)
        };
        let wire = w.seal_as(s, Protection::Confidential, b"m", w.now);
        let msg = UnverifiedMessage::decode(&wire).unwrap();
        assert_eq!(
            msg.verify_without_window(&w, &w.receiver(Direction::Forward), &policy, w.now)
                .err(),
            Some(Rejection::NotMember)
        );
    }
}
