//! PUBLISH checks off the async workers: the cheap checks and the signatures of one batch run on
//! tokio's blocking pool, at most one batch per CPU at a time; a lone small PUBLISH is checked on
//! the connection's own task (the hand-off would cost more than its one signature).
//!
//! Implements the bridge's checks of PROTOCOL.md §6 for the protected PUBLISHes of a batch with
//! quva-client's typed pipeline: decoding, group/epoch/window/replay lookup and membership
//! ([`UnverifiedMessage::check_at_bridge`]) under a short hold of the replay cache, then the
//! signatures with no lock held ([`verify_signatures`]: one batch verification, or a single
//! verification for a batch of one), then the replay cache again to record the accepted messages
//! in order in their group-and-sender partitions (PROTOCOL.md §8; a duplicate inside the batch, or
//! one accepted meanwhile by another connection, is a replay). Verdicts come back in batch order,
//! so acknowledgements keep PUBLISH order.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use quva_client::direct::UnverifiedDirect;
use quva_client::ids::{DeviceId, GroupId, Role};
use quva_client::message::{
    BridgeCheck, ConnectionIdentity, Direction, Policy, Rejection, UnverifiedMessage,
    verify_signatures,
};
use quva_client::ota::OtaPolicy;
use quva_client::topics::{OtaItem, OtaTopic};
use rand_core::OsRng;

use crate::directory::BridgeDirectory;
use crate::ota::{self, ManifestChecks, OtaRefusal};
use crate::reasons::PublishRefusal;
use crate::shared::{Shared, now_ms};
use crate::sync::lock;

/// A drop decision: the counter label and the PUBACK/PUBREC reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dropped {
    pub(crate) label: &'static str,
    pub(crate) reason: PublishRefusal,
}

impl Dropped {
    pub(crate) fn from_rejection(r: &Rejection) -> Self {
        Dropped {
            label: r.label(),
            reason: PublishRefusal::from_code(r.puback_reason_code()),
        }
    }

    pub(crate) const fn not_authorized(label: &'static str) -> Self {
        Dropped {
            label,
            reason: PublishRefusal::NotAuthorized,
        }
    }

    pub(crate) fn from_ota(r: &OtaRefusal) -> Self {
        Dropped {
            label: r.label(),
            reason: r.puback_reason(),
        }
    }
}

/// What happens to one PUBLISH of a batch.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Verdict {
    /// Not protected: relay.
    Relay,
    /// Protected and verified: relay and count.
    Accept,
    /// Drop with this reason.
    Drop(Dropped),
}

/// Whether `connection` is a current member of `group` in `role`.
pub(crate) fn has_role(
    connection: &ConnectionIdentity,
    dir: &BridgeDirectory,
    group: &GroupId,
    role: Role,
) -> bool {
    match connection {
        ConnectionIdentity::Device(id) => dir.is_current_member(group, id, role),
        ConnectionIdentity::Group { group: g, role: r } => g == group && *r == role,
    }
}

/// A protected PUBLISH waiting for its checks.
#[derive(Debug)]
pub(crate) struct Protected {
    /// Its position in the batch.
    pub(crate) index: usize,
    /// The PUBLISH payload (the Quva message).
    pub(crate) payload: Bytes,
    /// What its topic makes it.
    pub(crate) to: Addressed,
}

/// Where a protected PUBLISH goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Addressed {
    /// A group's data (forward) or query topic (PROTOCOL.md §6).
    Group(GroupId, Direction),
    /// A device's direct-message topic (PROTOCOL.md §7.1).
    Direct(DeviceId),
    /// A group's OTA manifest, key message or chunk (PROTOCOL.md §7.2), published by a device
    /// connection of the topic's signer.
    Ota(OtaTopic),
}

impl Protected {
    /// The group it is addressed to, if any.
    pub(crate) fn group(&self) -> Option<&GroupId> {
        match &self.to {
            Addressed::Group(g, _) => Some(g),
            Addressed::Ota(t) => Some(&t.group),
            Addressed::Direct(_) => None,
        }
    }
}

/// The largest payload of a lone PUBLISH checked on the connection's task instead of the
/// blocking pool: its check (one signature, or hashing an OTA chunk this small) stays well under
/// the ~100 µs a task may run between two awaits.
const INLINE_MAX_PAYLOAD: usize = 4096;

/// Checks the protected PUBLISHes of one batch on the blocking pool (a lone small one on the
/// caller's task); returns `(index, verdict)`
/// for each. A PUBLISH whose check could not run is missing from the answer (the caller drops
/// it as not authorized).
pub(crate) async fn check_batch(
    shared: &Arc<Shared>,
    connection: &ConnectionIdentity,
    items: Vec<Protected>,
) -> Vec<(usize, Verdict)> {
    let Ok(_permit) = shared.verifiers.acquire().await else {
        return Vec::new();
    };
    if let [one] = items.as_slice()
        && one.payload.len() <= INLINE_MAX_PAYLOAD
    {
        // A lone small message (the common case when a device publishes one message at a
        // time): one signature check costs less than the hand-off to the blocking pool and back.
        return check_now(shared, connection, items);
    }
    let shared = shared.clone();
    let connection = connection.clone();
    tokio::task::spawn_blocking(move || check_now(&shared, &connection, items))
        .await
        .unwrap_or_default()
}

/// The checks of a direct message at the bridge (PROTOCOL.md §7.1): window, sender = the
/// connection's device with the certificate the bridge knows for it, signature, the sender's
/// replay partition, and the recipient named by the topic.
fn check_direct(
    shared: &Shared,
    connection: &ConnectionIdentity,
    recipient: &DeviceId,
    payload: &[u8],
    now: u64,
) -> Verdict {
    let ConnectionIdentity::Device(sender) = connection else {
        return Verdict::Drop(Dropped::not_authorized("not_authorized"));
    };
    let Some(q_ca) = shared.ca_public() else {
        return Verdict::Drop(Dropped::not_authorized("not_authorized"));
    };
    let checked = UnverifiedDirect::decode_with_limit(payload, shared.cfg.limits.max_payload)
        .and_then(|m| {
            let view = shared.dir.view(now);
            let mut replay = lock(&shared.direct_replay);
            m.verify_at_bridge(
                sender,
                &q_ca,
                &view,
                &mut replay,
                shared.cfg.windows.timestamp_ms,
                now,
            )
        });
    match checked {
        Ok(d) if d.recipient() == recipient => Verdict::Accept,
        Ok(_) => Verdict::Drop(Dropped::not_authorized("topic_mismatch")),
        Err(r) => Verdict::Drop(Dropped {
            label: r.label(),
            reason: PublishRefusal::from_code(r.puback_reason_code()),
        }),
    }
}

/// The checks of a manifest or a chunk at the bridge (PROTOCOL.md §7.2, [`crate::ota`]); a key
/// message is checked with the group messages of the batch. The connection must be the device
/// connection of the topic's signer (the session has made sure of it already).
fn check_release_item(
    shared: &Shared,
    connection: &ConnectionIdentity,
    topic: &OtaTopic,
    payload: &[u8],
    now: u64,
) -> Verdict {
    // The session decided this already; checked again so that no path here relies on it.
    let ConnectionIdentity::Device(signer) = connection else {
        return Verdict::Drop(Dropped::not_authorized("ota_not_signer"));
    };
    if signer != &topic.signer {
        return Verdict::Drop(Dropped::not_authorized("ota_not_signer"));
    }
    let checked = match topic.item {
        OtaItem::Manifest => {
            let Some(q_ca) = shared.ca_public() else {
                return Verdict::Drop(Dropped::not_authorized("not_authorized"));
            };
            let view = shared.dir.view(now);
            let checks = ManifestChecks {
                q_ca: &q_ca,
                signers: &view,
                policy: ota_policy(shared),
                window_ms: shared.cfg.windows.timestamp_ms,
            };
            // Manifests are rare: the replay cache is held across their one signature check.
            let checked = {
                let mut replay = lock(&shared.replay);
                ota::check_manifest(topic, signer, payload, &checks, &mut replay, now)
            };
            checked.map(|m| lock(&shared.releases).remember(m))
        }
        // The signer must still be a publisher of the group: one removed since its manifest
        // was accepted deposits nothing more.
        OtaItem::Chunk(_)
            if !shared
                .dir
                .is_current_member(&topic.group, signer, Role::Publisher) =>
        {
            Err(OtaRefusal::Message(Rejection::NotMember))
        }
        OtaItem::Chunk(_) => lock(&shared.releases).check_chunk(topic, payload),
        // Key messages are group messages, checked with the batch's (`check_now`), never here.
        OtaItem::Key => Err(OtaRefusal::Ota(quva_client::ota::OtaError::NotOtaMessage)),
    };
    match checked {
        Ok(()) => Verdict::Accept,
        Err(r) => Verdict::Drop(Dropped::from_ota(&r)),
    }
}

/// The bridge's OTA limits: a manifest fits one PUBLISH, images up to `ota_max_image_bytes`,
/// chunks whose ciphertext fits one PUBLISH.
fn ota_policy(shared: &Shared) -> OtaPolicy {
    let max_payload = shared.cfg.limits.max_payload;
    OtaPolicy {
        max_image_size: shared.cfg.limits.ota_max_image_bytes,
        max_chunk_size: u32::try_from(max_payload.saturating_sub(quva_client::symmetric::TAG_LEN))
            .unwrap_or(u32::MAX),
        max_manifest_len: max_payload,
    }
}

/// The synchronous checks of [`check_batch`].
fn check_now(
    shared: &Shared,
    connection: &ConnectionIdentity,
    items: Vec<Protected>,
) -> Vec<(usize, Verdict)> {
    let started = Instant::now();
    let now = now_ms();
    let policy = Policy {
        max_payload: shared.cfg.limits.max_payload,
        window_ms: shared.cfg.windows.timestamp_ms,
    };
    let mut out = Vec::with_capacity(items.len());
    let mut messages: Vec<(usize, UnverifiedMessage)> = Vec::with_capacity(items.len());
    for p in items {
        let (group, direction, key_topic) = match p.to {
            Addressed::Group(g, d) => (g, d, None),
            Addressed::Direct(recipient) => {
                out.push((
                    p.index,
                    check_direct(shared, connection, &recipient, &p.payload, now),
                ));
                continue;
            }
            // A key message is a group message (option 2, forward, from the signer): it joins
            // the batch's group messages for the window, replay, sender and signature checks.
            Addressed::Ota(t) if t.item == OtaItem::Key => {
                (t.group.clone(), Direction::Forward, Some(t))
            }
            Addressed::Ota(t) => {
                out.push((
                    p.index,
                    check_release_item(shared, connection, &t, &p.payload, now),
                ));
                continue;
            }
        };
        match UnverifiedMessage::decode_with_limit(&p.payload, policy.max_payload) {
            Ok(m) => {
                let h = m.header();
                if key_topic
                    .as_ref()
                    .is_some_and(|t| !ota::key_message_fits(t, &m))
                {
                    out.push((
                        p.index,
                        Verdict::Drop(Dropped::not_authorized("ota_not_key_message")),
                    ));
                } else if h.group != group || h.direction != direction {
                    out.push((
                        p.index,
                        Verdict::Drop(Dropped::not_authorized("topic_mismatch")),
                    ));
                } else {
                    messages.push((p.index, m));
                }
            }
            Err(r) => out.push((p.index, Verdict::Drop(Dropped::from_rejection(&r)))),
        }
    }
    let mut indices = Vec::with_capacity(messages.len());
    let mut checks: Vec<BridgeCheck<'_>> = Vec::with_capacity(messages.len());
    {
        let view = shared.dir.view(now);
        let replay = lock(&shared.replay);
        for (i, m) in &messages {
            let h = m.header();
            match m.check_at_bridge(&view, connection, &policy, &replay, now) {
                // Topic access control after the cheap checks, before any signature.
                Ok(check)
                    if has_role(connection, &shared.dir, &h.group, h.direction.sender_role()) =>
                {
                    indices.push(*i);
                    checks.push(check);
                }
                Ok(_) => out.push((*i, Verdict::Drop(Dropped::not_authorized("not_authorized")))),
                Err(r) => out.push((*i, Verdict::Drop(Dropped::from_rejection(&r)))),
            }
        }
    }
    if checks.is_empty() {
        return out;
    }
    // The signatures, with no lock held; then the replay partitions, in batch order.
    let signed = verify_signatures(checks, &mut OsRng);
    let mut replay = lock(&shared.replay);
    for (i, r) in indices.into_iter().zip(signed) {
        let verdict = match r.and_then(|s| s.accept(&mut replay, now)) {
            Ok(_) => Verdict::Accept,
            Err(r) => Verdict::Drop(Dropped::from_rejection(&r)),
        };
        out.push((i, verdict));
    }
    drop(replay);
    shared.metrics.verify_time(started.elapsed());
    out
}
