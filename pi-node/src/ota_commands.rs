//! `quva-node ota release` and `quva-node ota status`: the release signer's one-shot commands
//! (PROTOCOL.md §7.2). The decisions are in [`crate::signer`]; this module moves bytes and
//! prints.

use std::collections::HashMap;
use std::time::Duration;

use quva_client::ids::{DeviceId, GroupId, Role};
use quva_client::reasons::puback_meaning;
use quva_client::symmetric::TAG_LEN;
use quva_client::topics::{self, OtaItem};
use rand_core::OsRng;
use serde_json::json;

use crate::cli::OtaReleaseArgs;
use crate::error::{NodeError, rfc3339};
use crate::net::{Link, LinkEvent};
use crate::signer::{KeyArchive, Releases, StatusLedger, cut_release, state_name};
use crate::store::KeyStore;
use crate::terminal::{log_event, print_line};
use quva_daemon::now_ms;
use quva_daemon::shutdown_signal;

/// The session name of `ota status`: its client identifier is `<device>-ota-status`, the same
/// at every run, so that the broker queues the reports sent while it is away.
pub(crate) const STATUS_SESSION: &str = "ota-status";
/// How long the broker keeps that session: 7 days.
pub(crate) const STATUS_SESSION_EXPIRY_SECS: u32 = 7 * 24 * 3600;

/// An installed version and the signer of its release (none in an older record).
type Installed = (u64, Option<DeviceId>);

/// What `quva-node status` shows of group OTA ([`ota_summary`]).
#[derive(Debug, Default)]
pub(crate) struct OtaSummary {
    /// Per followed group (`[ota] groups`): the installed version and its signer, if any.
    pub followed: Vec<(GroupId, Option<Installed>)>,
    /// The pinned signers.
    pub signers: Vec<DeviceId>,
    /// The releases this device made as a signer: (group, version, epoch of the key message
    /// last deposited).
    pub releases: Vec<(GroupId, u64, Option<u32>)>,
}

impl OtaSummary {
    /// Lines for the human-readable status (none if this device takes no part in OTA).
    pub(crate) fn lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let pinned = self
            .signers
            .iter()
            .map(DeviceId::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        for (g, installed) in &self.followed {
            lines.push(match installed {
                Some((v, Some(s))) => {
                    format!("ota         {g}: version {v} from {s} installed (pinned: {pinned})")
                }
                Some((v, None)) => format!(
                    "ota         {g}: version {v} installed, signer not recorded (pinned: {pinned})"
                ),
                None => format!("ota         {g}: nothing installed yet (pinned: {pinned})"),
            });
        }
        for (g, v, epoch) in &self.releases {
            lines.push(match epoch {
                Some(e) => format!("ota release {g} version {v}, key message of epoch {e}"),
                None => format!("ota release {g} version {v}, key message to deposit again"),
            });
        }
        lines
    }

    /// The `ota` object of `status --json`.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        let followed: Vec<_> = self
            .followed
            .iter()
            .map(|(g, installed)| {
                json!({
                    "group": g.as_str(),
                    "installed_version": installed.as_ref().map(|(v, _)| *v),
                    "signer": installed.as_ref().and_then(|(_, s)| s.as_ref()).map(DeviceId::as_str),
                })
            })
            .collect();
        let releases: Vec<_> = self
            .releases
            .iter()
            .map(|(g, v, e)| json!({"group": g.as_str(), "version": v, "key_epoch": e}))
            .collect();
        json!({
            "followed": followed,
            "pinned_signers": self.signers.iter().map(DeviceId::as_str).collect::<Vec<_>>(),
            "releases": releases,
        })
    }
}

/// The installed OTA versions under `settings` (read only: a download directory that does not
/// exist yet means nothing installed) and the releases in `store`.
///
/// # Errors
/// [`NodeError::Store`] for a damaged record.
pub(crate) fn ota_summary(
    settings: &crate::config::OtaSettings,
    store: &KeyStore,
) -> Result<OtaSummary, NodeError> {
    let files = if settings.download_dir.is_dir() {
        Some(crate::ota_device::OtaFiles::open(&settings.download_dir)?)
    } else {
        None
    };
    let mut followed = Vec::new();
    for g in &settings.groups {
        let installed = match &files {
            Some(f) => f.installed_release(g)?,
            None => None,
        };
        followed.push((g.clone(), installed));
    }
    let releases = Releases::load(store)?
        .iter()
        .map(|r| (r.group.clone(), r.version, r.key_epoch.map(|e| e.0)))
        .collect();
    Ok(OtaSummary {
        followed,
        signers: settings.signers.clone(),
        releases,
    })
}

/// Waits until `role` in `group` is ready on `link`.
async fn wait_ready(
    link: &mut Link,
    group: &GroupId,
    role: Role,
    wait: Duration,
) -> Result<(), NodeError> {
    let deadline = tokio::time::Instant::now() + wait;
    while !link.is_ready(group, role) {
        tokio::select! {
            ev = link.next() => {
                let ev = ev?;
                log_event(&ev);
                if let LinkEvent::Removed { group: g, epoch, .. } = &ev
                    && g == group
                {
                    return Err(NodeError::Removed {
                        group: g.to_string(),
                        role: "publisher",
                        epoch: epoch.0,
                    });
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                return Err(NodeError::Lost(format!(
                    "the key of {group} as a publisher was not ready within {}s",
                    wait.as_secs()
                )));
            }
        }
    }
    Ok(())
}

/// What a deposit is, for progress and errors.
fn item_name(item: OtaItem) -> String {
    match item {
        OtaItem::Manifest => "the manifest".to_owned(),
        OtaItem::Key => "the key message".to_owned(),
        OtaItem::Chunk(j) => format!("chunk {j}"),
    }
}

/// `ota release`: cut, encrypt and sign once, deposit everything retained, wait for every
/// PUBACK, then store the release for the daemon.
///
/// # Errors
/// A refused deposit (with the PUBACK reason), an unreadable file, a refused release.
pub(crate) async fn release(
    mut link: Link,
    store: KeyStore,
    group: GroupId,
    args: &OtaReleaseArgs,
    wait: Duration,
) -> Result<(), NodeError> {
    let (version, name, file, chunk_size) = (
        args.version,
        args.name.as_str(),
        &args.file,
        args.chunk_size,
    );
    let image = std::fs::read(file)
        .map_err(|e| NodeError::Input(format!("cannot read {}: {e}", file.display())))?;
    if image.is_empty() {
        return Err(NodeError::Input(format!("{} is empty", file.display())));
    }
    let mut releases = Releases::load(&store)?;
    if releases.get(&group, version).is_some() {
        return Err(NodeError::Input(format!(
            "version {version} of {group} was already released from this store: release a \
             higher version"
        )));
    }
    link.want(group.clone(), Role::Publisher, false);
    wait_ready(&mut link, &group, Role::Publisher, wait).await?;
    let (deposits, stored) = cut_release(
        link.device(),
        &releases,
        &group,
        version,
        name,
        &image,
        chunk_size,
        now_ms(),
        &mut OsRng,
    )
    .map_err(|e| NodeError::Input(format!("cannot release: {e}")))?;
    let n_chunks = deposits
        .iter()
        .filter(|d| matches!(d.item, OtaItem::Chunk(_)))
        .count();
    let deposited: usize = deposits.iter().map(|d| d.payload.len()).sum();
    let mut pending: HashMap<u64, (OtaItem, usize)> = HashMap::new();
    for d in deposits {
        let plain = d.payload.len().saturating_sub(TAG_LEN);
        let id = link.publish_raw(d.topic, d.payload, true);
        pending.insert(id, (d.item, plain));
    }
    let (mut chunks_done, mut bytes_done, mut last_tenth) = (0usize, 0usize, 0usize);
    while !pending.is_empty() {
        let ev = link.next().await?;
        log_event(&ev);
        match ev {
            LinkEvent::Delivered { id } => {
                if let Some((OtaItem::Chunk(_), plain)) = pending.remove(&id) {
                    chunks_done += 1;
                    bytes_done += plain;
                    let tenth = chunks_done * 10 / n_chunks.max(1);
                    if tenth > last_tenth || chunks_done == n_chunks {
                        last_tenth = tenth;
                        print_line(&format!(
                            "published {chunks_done}/{n_chunks} chunks, {bytes_done}/{} bytes",
                            image.len()
                        ))?;
                    }
                }
            }
            LinkEvent::Refused { id, code } => {
                if let Some((item, _)) = pending.remove(&id) {
                    link.disconnect().await;
                    return Err(NodeError::Protocol(format!(
                        "the bridge refused {} of {group} version {version} (reason 0x{code:02x}: \
                         {}); the release is not stored",
                        item_name(item),
                        puback_meaning(code)
                    )));
                }
            }
            _ => {}
        }
    }
    link.disconnect().await;
    let epoch = stored.key_epoch.map_or(0, |e| e.0);
    releases.insert(stored);
    releases.save(&store)?;
    print_line(&format!(
        "released {group} version {version} ({name}): manifest, {n_chunks} chunks ({} bytes, \
         {deposited} deposited) and the key message of epoch {epoch}, retained on {}",
        image.len(),
        topics::ota_release_filter(&group, link.device().id(), version)
    ))
}

/// One line of the status table.
fn status_line(device: &DeviceId, version: u64, state: &str, t_ms: u64, detail: &str) -> String {
    let mut line = format!("{device:<24} {version:>8}  {state:<12} {}", rfc3339(t_ms));
    if !detail.is_empty() {
        line.push_str("  ");
        line.push_str(detail);
    }
    line
}

/// `ota status`: collects reports from the persistent session for `wait`, stores them, and
/// prints every report held for the group.
///
/// # Errors
/// The link's and the store's.
pub(crate) async fn status(
    mut link: Link,
    store: KeyStore,
    group: GroupId,
    wait: Duration,
    json_out: bool,
) -> Result<(), NodeError> {
    let mut ledger = StatusLedger::load(&store)?;
    let releases = Releases::load(&store)?;
    let mut archive = KeyArchive::load(&store, link.device().ca_public())?;
    link.persistent_session(STATUS_SESSION, STATUS_SESSION_EXPIRY_SECS);
    link.want(group.clone(), Role::Publisher, false);
    let query_topic = topics::query(&group);
    link.watch(query_topic.clone());
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut collected = 0usize;
    let mut held: Vec<Vec<u8>> = Vec::new();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = link.next() => {
                let ev = ev?;
                log_event(&ev);
                match ev {
                    LinkEvent::Connected if deadline.is_none() => {
                        deadline = Some(tokio::time::Instant::now() + wait);
                    }
                    LinkEvent::Publish { topic, payload, .. } if topic == query_topic => {
                        held.push(payload.to_vec());
                    }
                    _ => {}
                }
                // Reports wait for the publisher key and member list that verify them.
                if link.is_ready(&group, Role::Publisher) {
                    if archive.remember(link.device(), &group, now_ms()) {
                        archive.save(&store)?;
                    }
                    for payload in held.drain(..) {
                        match ledger.on_query(link.device(), &archive, &payload, now_ms()) {
                            Ok((st, _)) => {
                                collected += 1;
                                tracing::debug!(device = %st.device, version = st.report.version, "status report");
                            }
                            Err(e) => tracing::warn!(reason = %e, "status report refused"),
                        }
                    }
                }
            }
            () = sleep => break,
            () = &mut shutdown => break,
        }
    }
    if !held.is_empty() {
        tracing::warn!(
            waiting = held.len(),
            "reports not verified: the group key was not ready in time"
        );
    }
    link.disconnect().await;
    ledger.save(&store)?;
    let mine: Vec<(DeviceId, u64, ReceivedStatusView)> = ledger
        .book()
        .iter()
        .filter(|((g, _, _), _)| g == &group)
        .map(|((_, d, v), e)| {
            (
                d.clone(),
                *v,
                ReceivedStatusView {
                    state: state_name(e.state),
                    t_ms: e.t_ms,
                    detail: e.detail.clone(),
                },
            )
        })
        .collect();
    let released: Vec<_> = releases.iter().filter(|r| r.group == group).collect();
    if json_out {
        let reports: Vec<_> = mine
            .iter()
            .map(|(d, v, s)| {
                json!({
                    "device": d.as_str(),
                    "version": v,
                    "state": s.state,
                    "t_ms": s.t_ms,
                    "when": rfc3339(s.t_ms),
                    "detail": s.detail,
                })
            })
            .collect();
        let rel: Vec<_> = released
            .iter()
            .map(|r| {
                let (size, chunks) = r.sizes().unwrap_or((0, 0));
                json!({
                    "version": r.version,
                    "size": size,
                    "chunks": chunks,
                    "key_epoch": r.key_epoch.map(|e| e.0),
                })
            })
            .collect();
        return print_line(
            &json!({
                "group": group.as_str(),
                "collected": collected,
                "releases": rel,
                "reports": reports,
            })
            .to_string(),
        );
    }
    let mut lines = Vec::new();
    for r in &released {
        let (size, chunks) = r.sizes().unwrap_or((0, 0));
        lines.push(format!(
            "release {group} version {}: {size} bytes in {chunks} chunks, key message of epoch {}",
            r.version,
            r.key_epoch
                .map_or_else(|| "-".to_owned(), |e| e.0.to_string())
        ));
    }
    lines.push(format!(
        "{:<24} {:>8}  {:<12} {}",
        "DEVICE", "VERSION", "STATE", "WHEN"
    ));
    for (d, v, s) in &mine {
        lines.push(status_line(d, *v, s.state, s.t_ms, &s.detail));
    }
    if mine.is_empty() {
        lines.push("(no status report yet)".to_owned());
    }
    lines.push(format!("{collected} report(s) collected in this run"));
    print_line(&lines.join("\n"))
}

/// A report as shown.
struct ReceivedStatusView {
    state: &'static str,
    t_ms: u64,
    detail: String,
}
