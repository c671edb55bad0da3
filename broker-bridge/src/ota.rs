//! The bridge's checks of group OTA publishes and the releases it has accepted.
//!
//! Implements the bridge's part of PROTOCOL.md §7.2 with quva-client's OTA pipeline:
//! - a manifest on `<group>/_ota/<S>/<v>/m` is decoded under a size limit, checked for the
//!   time window and the replay cache of the group and signer (as every protected publish), then
//!   with [`UnverifiedManifest::verify_at_bridge`] (topic, signer = the connection, sizes within
//!   the configured limits, certificate under the pinned Q_CA, valid now and the signer's
//!   current publisher certificate in the group, signature) and remembered in [`Releases`];
//! - a chunk on `…/<v>/c/<j>` passes only from a current publisher S of the group, against an
//!   accepted manifest of that release ([`VerifiedManifest::check_chunk`]: j < n_chunks, its
//!   length, H(ct) = h_j);
//! - a key message on `…/<v>/k` must be an option-2 forward message of the group from S
//!   ([`key_message_fits`]); its window, replay, sender and signature checks are the ones of
//!   every group message, with the batch of the connection.
//!
//! That only S's device connections publish under `<group>/_ota/<S>/` is decided earlier, by the
//! session, without any work. A bridge that restarts forgets its releases: a signer republishes
//! (re-signs, with a fresh T_ms) a release's manifest before publishing more of its chunks.
//!
//! # Usage
//! ```text
//! let mut releases = Releases::new(4, 256);
//! let manifest = check_manifest(&topic, &signer, &payload, &checks, &mut replay, now)?;
//! releases.remember(manifest);
//! releases.check_chunk(&chunk_topic, &ciphertext)?;
//! ```

use std::collections::VecDeque;

use quva_client::curve::{Point, sha256};
use quva_client::ids::DeviceId;
use quva_client::message::{
    BridgeReplay, Direction, Protection, Rejection, ReplayPartition, UnverifiedMessage,
};
use quva_client::ota::{OtaError, OtaPolicy, SignerListing, UnverifiedManifest, VerifiedManifest};
use quva_client::replay::ReplayError;
use quva_client::topics::{OtaItem, OtaTopic};

use crate::reasons::PublishRefusal;

/// Why an OTA publish was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum OtaRefusal {
    /// A manifest or chunk check of quva-client failed.
    #[error(transparent)]
    Ota(#[from] OtaError),
    /// The time window or the replay cache refused a manifest.
    #[error(transparent)]
    Message(#[from] Rejection),
    /// A chunk of a release whose manifest the bridge has not accepted (or has forgotten).
    #[error("no accepted manifest for this release")]
    UnknownRelease,
}

impl OtaRefusal {
    /// The metric label.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            OtaRefusal::Ota(e) => e.label(),
            OtaRefusal::Message(r) => r.label(),
            OtaRefusal::UnknownRelease => "ota_unknown_release",
        }
    }

    /// The PUBACK reason: payload format invalid for malformed or oversize payloads, not
    /// authorized otherwise.
    pub(crate) fn puback_reason(&self) -> PublishRefusal {
        match self {
            OtaRefusal::Ota(e) => PublishRefusal::from_code(e.puback_reason_code()),
            OtaRefusal::Message(r) => PublishRefusal::from_code(r.puback_reason_code()),
            OtaRefusal::UnknownRelease => PublishRefusal::NotAuthorized,
        }
    }
}

/// What a manifest is checked against, besides itself.
pub(crate) struct ManifestChecks<'a, L: ?Sized> {
    /// Q_CA, pinned from the configuration.
    pub(crate) q_ca: &'a Point,
    /// Who the group's current publishers are, with their certificates.
    pub(crate) signers: &'a L,
    /// Size limits (manifest, image, chunk).
    pub(crate) policy: OtaPolicy,
    /// Accepted |T_ms − now|, ms.
    pub(crate) window_ms: u64,
}

/// Checks a manifest published on `topic` (an `m` topic) by the device `connection`, cheapest
/// first: size and decoding; the time window; not seen before in the replay partition of its
/// group and signer; [`UnverifiedManifest::verify_at_bridge`]; then records it in `replay`.
///
/// # Errors
/// The first failing check's [`OtaRefusal`].
pub(crate) fn check_manifest<L: SignerListing + ?Sized>(
    topic: &OtaTopic,
    connection: &DeviceId,
    payload: &[u8],
    checks: &ManifestChecks<'_, L>,
    replay: &mut BridgeReplay,
    now_ms: u64,
) -> Result<VerifiedManifest, OtaRefusal> {
    let unverified =
        UnverifiedManifest::decode_with_limit(payload, checks.policy.max_manifest_len)?;
    let m = unverified.manifest();
    if m.t_ms.abs_diff(now_ms) > checks.window_ms {
        return Err(if m.t_ms < now_ms {
            Rejection::StaleTimestamp
        } else {
            Rejection::FutureTimestamp
        }
        .into());
    }
    let partition = ReplayPartition::Sender(m.group.clone(), m.signer.clone());
    let hash = sha256(&[payload]);
    if replay.contains(&partition, &hash) {
        return Err(Rejection::Replayed.into());
    }
    let verified = unverified.verify_at_bridge(
        topic,
        connection,
        checks.q_ca,
        checks.signers,
        &checks.policy,
        now_ms,
    )?;
    replay
        .check_and_insert(partition, hash, verified.manifest().t_ms, now_ms)
        .map_err(|e| match e {
            ReplayError::OutsideWindow if verified.manifest().t_ms < now_ms => {
                Rejection::StaleTimestamp
            }
            ReplayError::OutsideWindow => Rejection::FutureTimestamp,
            _ => Rejection::Replayed,
        })?;
    Ok(verified)
}

/// Whether a message published on a key topic (`…/<v>/k`) is what §7.2 puts there: an option-2
/// forward message of the topic's group whose sender is the topic's signer.
pub(crate) fn key_message_fits(topic: &OtaTopic, m: &UnverifiedMessage) -> bool {
    let h = m.header();
    topic.item == OtaItem::Key
        && h.group == topic.group
        && h.direction == Direction::Forward
        && h.protection == Protection::Confidential
        && m.claimed_sender() == Some(&topic.signer)
}

/// The manifests the bridge has accepted, so that it can check chunks: at most `per_group`
/// releases per group and `total` in all, the oldest accepted forgotten first.
///
/// Memory: each release holds one [`VerifiedManifest`], the signed manifest as received and its
/// decoded form (certificate and 32 bytes per chunk), about twice the manifest's length; a
/// manifest is at most `limits.max_payload` bytes (256 KiB by default), so the store holds at most
/// `total × 2 × max_payload` (256 × 512 KiB = 128 MiB with the defaults, reached only by
/// manifests of about 8,000 chunks each; a 256 MiB image in 64 KiB chunks has a 128 KiB
/// manifest). Only a group's current publishers, with valid signatures, can add to it.
#[derive(Debug)]
pub(crate) struct Releases {
    per_group: usize,
    total: usize,
    /// Oldest accepted first.
    accepted: VecDeque<VerifiedManifest>,
}

impl Releases {
    /// An empty store keeping at most `per_group` releases per group and `total` in all (each at
    /// least 1).
    pub(crate) fn new(per_group: usize, total: usize) -> Self {
        Releases {
            per_group: per_group.max(1),
            total: total.max(1),
            accepted: VecDeque::new(),
        }
    }

    /// Remembers an accepted manifest; it replaces an earlier one of the same release (a
    /// republished or re-signed manifest), and the oldest of its group, then the oldest of all,
    /// are forgotten beyond the caps.
    pub(crate) fn remember(&mut self, manifest: VerifiedManifest) {
        let topic = manifest.manifest().topic(OtaItem::Manifest);
        self.accepted
            .retain(|r| r.manifest().topic(OtaItem::Manifest) != topic);
        let group = &manifest.manifest().group;
        let in_group = self
            .accepted
            .iter()
            .filter(|r| &r.manifest().group == group)
            .count();
        if in_group >= self.per_group
            && let Some(oldest) = self
                .accepted
                .iter()
                .position(|r| &r.manifest().group == group)
        {
            self.accepted.remove(oldest);
        }
        self.accepted.push_back(manifest);
        while self.accepted.len() > self.total {
            self.accepted.pop_front();
        }
    }

    /// The accepted manifest of the release `topic` belongs to.
    fn release(&self, topic: &OtaTopic) -> Option<&VerifiedManifest> {
        self.accepted.iter().find(|r| {
            let m = r.manifest();
            m.group == topic.group && m.signer == topic.signer && m.version == topic.version
        })
    }

    /// Checks a chunk published on `topic` (a `c/<j>` topic) against its release's accepted
    /// manifest: j < n_chunks, the chunk's length, H(ct) = h_j.
    ///
    /// # Errors
    /// [`OtaRefusal::UnknownRelease`] without an accepted manifest, else the
    /// [`VerifiedManifest::check_chunk`] error.
    pub(crate) fn check_chunk(&self, topic: &OtaTopic, ct: &[u8]) -> Result<(), OtaRefusal> {
        let OtaItem::Chunk(j) = topic.item else {
            return Err(OtaError::TopicMismatch.into());
        };
        let release = self.release(topic).ok_or(OtaRefusal::UnknownRelease)?;
        Ok(release.check_chunk(j, ct)?)
    }

    /// Releases remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.accepted.len()
    }
}

#[cfg(test)]
#[path = "ota_tests.rs"]
mod tests;
