//! The OTA agent inside `quva-node run`: its actions carried out on the [`Link`], the apply
//! command run as a child process without blocking the link, and a line on standard output for
//! every reported state and every tenth of a download.

use std::collections::BTreeMap;
use std::time::Duration;

use quva_client::direct::VerifiedDirect;
use quva_client::ids::GroupId;
use rand_core::OsRng;
use serde_json::json;
use tokio::sync::mpsc;

use super::apply::run_limited;
use super::{ApplyCommand, LogLevel, OtaAction, OtaAgent, OtaFiles, apply_outcome, perform};
use crate::config::OtaSettings;
use crate::error::NodeError;
use crate::net::Link;
use crate::signer::state_name;
use crate::terminal::print_line;
use quva_daemon::now_ms;

/// The result of an apply command that ran in the background.
#[derive(Debug)]
pub(crate) struct ApplyDone {
    group: GroupId,
    version: u64,
    result: Result<(), String>,
}

/// The device side of group OTA in the daemon.
pub(crate) struct OtaService {
    agent: OtaAgent,
    files: OtaFiles,
    apply: ApplyCommand,
    /// How long the apply command may run before it is killed.
    apply_timeout: Duration,
    json: bool,
    rng: OsRng,
    done_tx: mpsc::UnboundedSender<ApplyDone>,
    done_rx: Option<ApplyResults>,
    /// Per group, the version and tenth of the download last shown.
    shown: BTreeMap<GroupId, (u64, u32)>,
}

/// Where the results of the apply commands arrive ([`OtaService::take_results`]).
pub(crate) type ApplyResults = mpsc::UnboundedReceiver<ApplyDone>;

/// The next apply result, or never without a receiver (for `select!`).
pub(crate) async fn next_applied(results: &mut Option<ApplyResults>) -> Option<ApplyDone> {
    match results {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl OtaService {
    /// The service for `settings` (groups present), resuming from its download directory.
    ///
    /// # Errors
    /// [`NodeError::Store`] for a download directory that cannot be opened or read,
    /// [`NodeError::Input`] without an apply command.
    pub(crate) fn new(settings: &OtaSettings, json: bool) -> Result<Self, NodeError> {
        let files = OtaFiles::open(&settings.download_dir)?;
        let restored = files.load(&settings.groups)?;
        let apply = ApplyCommand::new(settings.apply_command.clone())
            .ok_or_else(|| NodeError::Input("ota.apply_command is empty".to_owned()))?;
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Ok(OtaService {
            agent: OtaAgent::new(settings, restored),
            files,
            apply,
            apply_timeout: settings.apply_timeout,
            json,
            rng: OsRng,
            done_tx,
            done_rx: Some(done_rx),
            shown: BTreeMap::new(),
        })
    }

    /// The OTA groups (the daemon takes part in each as a subscriber).
    pub(crate) fn groups(&self) -> Vec<GroupId> {
        self.agent.groups().cloned().collect()
    }

    /// Logs what the daemon follows.
    pub(crate) fn announce(&self) {
        for g in self.agent.groups() {
            tracing::info!(group = %g, installed = ?self.agent.installed(g), "following OTA releases");
        }
    }

    /// The device holds `group`'s subscriber key on this connection: subscribe to its releases
    /// (the bridge lets only the group's joined subscribers read them).
    pub(crate) fn start_group(&mut self, link: &mut Link, group: &GroupId) {
        let actions = self.agent.start_group(group);
        self.execute(link, actions);
    }

    /// Whether `topic` is an OTA topic this service follows.
    pub(crate) fn handles(&self, topic: &str) -> bool {
        self.agent.handles(topic)
    }

    /// A PUBLISH on an OTA topic.
    pub(crate) fn on_publish(&mut self, link: &mut Link, topic: &str, payload: &[u8]) {
        tracing::debug!(topic, bytes = payload.len(), "OTA item received");
        let now = now_ms();
        let actions = self
            .agent
            .on_publish(topic, payload, link.device(), now, &mut self.rng);
        self.execute(link, actions);
    }

    /// A refused subscription: if it is one of the release filters, that group's releases
    /// from that signer are not seen on this connection; say so clearly.
    pub(crate) fn on_refused(&self, filter: &str, code: u8) {
        if self.agent.is_release_filter(filter) {
            tracing::error!(
                filter,
                code,
                "the bridge refused an OTA release subscription: releases on it are not seen until \
                 the next connection; check that this device is a subscriber of the group and that \
                 the bridge grants wildcards inside a group's _ota/ level"
            );
        }
    }

    /// A verified direct message carrying an OTA key message.
    pub(crate) fn on_direct(&mut self, link: &mut Link, msg: &VerifiedDirect) {
        let now = now_ms();
        let actions = self.agent.on_direct(msg, link.device(), now, &mut self.rng);
        if actions.is_empty() {
            tracing::info!(sender = %msg.sender(), "an OTA key no release waits for; ignored");
        }
        self.execute(link, actions);
    }

    /// The passing of time.
    pub(crate) fn tick(&mut self, link: &mut Link) {
        let now = now_ms();
        let actions = self.agent.tick(link.device(), now, &mut self.rng);
        self.execute(link, actions);
    }

    /// The receiver of the apply commands' results, for the daemon's loop ([`next_applied`]);
    /// `None` after the first call.
    pub(crate) fn take_results(&mut self) -> Option<ApplyResults> {
        self.done_rx.take()
    }

    /// The result of an apply command.
    pub(crate) fn on_applied(&mut self, link: &mut Link, done: ApplyDone) {
        let now = now_ms();
        let actions = self.agent.on_apply_result(
            &done.group,
            done.version,
            done.result,
            link.device(),
            now,
            &mut self.rng,
        );
        self.execute(link, actions);
    }

    fn execute(&mut self, link: &mut Link, actions: Vec<OtaAction>) {
        let now = now_ms();
        let rest = perform(
            &mut self.agent,
            &self.files,
            link.device(),
            now,
            &mut self.rng,
            actions,
        );
        for action in rest {
            match action {
                OtaAction::Subscribe(filters) => {
                    for f in filters {
                        link.watch(f);
                    }
                }
                OtaAction::Unsubscribe(filters) => {
                    for f in filters {
                        link.unwatch(&f);
                    }
                }
                OtaAction::Publish { topic, payload } => {
                    link.publish_raw(topic, payload, false);
                }
                OtaAction::Apply {
                    group,
                    version,
                    name,
                } => self.spawn_apply(group, version, &name),
                OtaAction::Status {
                    group,
                    version,
                    state,
                    detail,
                } => {
                    let line = if self.json {
                        json!({
                            "ota": group.as_str(),
                            "version": version,
                            "state": state_name(state),
                            "detail": detail,
                        })
                        .to_string()
                    } else if detail.is_empty() {
                        format!("ota {group} v{version}: {}", state_name(state))
                    } else {
                        format!("ota {group} v{version}: {}: {detail}", state_name(state))
                    };
                    show(&line);
                }
                OtaAction::Progress {
                    group,
                    version,
                    stored,
                    total,
                } => self.progress(&group, version, stored, total),
                OtaAction::Log { level, message } => match level {
                    LogLevel::Info => tracing::info!("{message}"),
                    LogLevel::Warn => tracing::warn!("{message}"),
                },
                other => tracing::debug!(action = ?other, "unexpected OTA action"),
            }
        }
    }

    /// A progress line at each tenth of the download and at its end.
    fn progress(&mut self, group: &GroupId, version: u64, stored: u32, total: u32) {
        let tenth = (u64::from(stored) * 10 / u64::from(total.max(1))) as u32;
        if self.shown.get(group) == Some(&(version, tenth)) {
            return;
        }
        self.shown.insert(group.clone(), (version, tenth));
        let line = if self.json {
            json!({"ota": group.as_str(), "version": version, "stored": stored, "total": total})
                .to_string()
        } else {
            format!(
                "ota {group} v{version}: {stored}/{total} chunks ({}%)",
                u64::from(stored) * 100 / u64::from(total.max(1))
            )
        };
        show(&line);
    }

    /// Runs the apply command in the background; its result comes back through
    /// [`next_applied`].
    fn spawn_apply(&mut self, group: GroupId, version: u64, name: &str) {
        let image = self.files.staging_path(&group);
        let cmd = self.apply.command(&image, &group, version, name);
        let tx = self.done_tx.clone();
        let timeout = self.apply_timeout;
        tracing::info!(group = %group, version, timeout_secs = timeout.as_secs(), "running the apply command");
        tokio::spawn(async move {
            let result = match run_limited(cmd, timeout).await {
                Ok(out) => {
                    for line in String::from_utf8_lossy(&out.stdout).lines() {
                        tracing::info!(group = %group, version, "apply: {line}");
                    }
                    for line in String::from_utf8_lossy(&out.stderr).lines() {
                        tracing::warn!(group = %group, version, "apply: {line}");
                    }
                    apply_outcome(&out)
                }
                Err(e) => Err(e),
            };
            let _ = tx.send(ApplyDone {
                group,
                version,
                result,
            });
        });
    }
}

/// Prints a line; standard output closed is not a reason to stop updating.
fn show(line: &str) {
    if let Err(e) = print_line(line) {
        tracing::debug!(error = %e, "cannot print");
    }
}
