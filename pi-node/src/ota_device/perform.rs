//! Does the agent's file actions against the download directory and feeds their results back;
//! returns the actions that need the network or the apply command.

use std::collections::VecDeque;

use rand_core::CryptoRngCore;

use super::{LogLevel, OtaAction, OtaAgent, OtaFiles};
use quva_client::device::Device;

/// Performs, in order, every file action of `actions` (and of what the agent answers to their
/// results): saving the release, preparing the staging file, storing chunks then progress,
/// re-checking staged chunks after a restart, hashing the image, recording the installed
/// version, discarding. A failing write fails the release ([`OtaAgent::on_io_error`]).
/// Returns the other actions — [`OtaAction::Subscribe`], [`OtaAction::Unsubscribe`],
/// [`OtaAction::Publish`], [`OtaAction::Apply`], [`OtaAction::Status`], [`OtaAction::Progress`],
/// [`OtaAction::Log`] — in order, for the caller. A version is recorded before the `applied`
/// report that follows it is returned.
pub fn perform(
    agent: &mut OtaAgent,
    files: &OtaFiles,
    dev: &Device,
    now_ms: u64,
    rng: &mut impl CryptoRngCore,
    actions: Vec<OtaAction>,
) -> Vec<OtaAction> {
    let mut queue: VecDeque<OtaAction> = actions.into();
    let mut rest = Vec::new();
    while let Some(action) = queue.pop_front() {
        let failed = match action {
            OtaAction::SaveRelease {
                group,
                manifest,
                key,
            } => files
                .save_release(&group, &manifest, &key)
                .err()
                .map(|e| (group, e)),
            OtaAction::PrepareStaging { group, size } => files
                .prepare_staging(&group, size)
                .err()
                .map(|e| (group, e)),
            OtaAction::StoreChunk {
                group,
                offset,
                data,
                progress,
                ..
            } => files
                .write_chunk(&group, offset, &data)
                .and_then(|()| match progress {
                    // The record claims only chunks that are on disk: sync first.
                    Some(p) => files
                        .sync_staging(&group)
                        .and_then(|()| files.save_progress(&group, &p)),
                    None => Ok(()),
                })
                .err()
                .map(|e| (group, e)),
            OtaAction::SaveProgress { group, progress } => files
                .save_progress(&group, &progress)
                .err()
                .map(|e| (group, e)),
            OtaAction::CheckStaged {
                group,
                version,
                chunks,
            } => {
                for span in chunks {
                    // A chunk that cannot be read back is fetched again.
                    if let Ok(bytes) = files.read_chunk(&group, span.offset, span.len) {
                        agent.on_staged_chunk(&group, version, span.index, &bytes);
                    }
                }
                queue.extend(agent.on_staged_checked(&group, version, dev, now_ms, rng));
                None
            }
            OtaAction::HashImage { group, version } => match files.hash_staging(&group) {
                Ok(digest) => {
                    queue.extend(agent.on_image_digest(&group, version, &digest, dev, now_ms, rng));
                    None
                }
                Err(e) => Some((group, e)),
            },
            OtaAction::RecordInstalled {
                group,
                version,
                signer,
            } => {
                if let Err(e) = files.record_installed(&group, version, &signer) {
                    rest.push(OtaAction::Log {
                        level: LogLevel::Warn,
                        message: format!("ota {group}: cannot record v{version} as installed: {e}"),
                    });
                }
                None
            }
            OtaAction::Discard { group } => {
                if let Err(e) = files.discard(&group) {
                    rest.push(OtaAction::Log {
                        level: LogLevel::Warn,
                        message: format!("ota {group}: cannot delete the release files: {e}"),
                    });
                }
                None
            }
            other => {
                rest.push(other);
                None
            }
        };
        if let Some((group, e)) = failed {
            queue.extend(agent.on_io_error(&group, &e.to_string(), dev, now_ms, rng));
        }
    }
    rest
}
