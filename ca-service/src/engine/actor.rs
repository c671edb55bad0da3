//! The engine's tokio task: it owns the [`CaCore`], feeds it the commands of its queue, the
//! clock and the system RNG, and carries out the effects: one synced batch for every command
//! waiting in the queue (group commit), then the held-back replies; a sleep until the next
//! batching deadline; the sweep timer.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use quva_client::curve::KeyPair;
use rand_core::OsRng;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::clock::Clock;
use crate::engine::command::{Command, Outcome};
use crate::engine::config::{DEFAULT_MAX_GROUP_COMMIT, EngineConfig};
use crate::engine::core::CaCore;
use crate::engine::handle::{EngineHandle, ReplyTo, Request};
use crate::engine::retention::Compacted;
use crate::engine::stats::{Stats, bump};
use crate::error::CaError;
use crate::store::CaStore;

/// The writer task's state. Create it with [`Engine::spawn`].
pub struct Engine {
    core: CaCore<ReplyTo>,
    cfg: EngineConfig,
    clock: Arc<dyn Clock>,
    rng: OsRng,
    notice_tx: watch::Sender<u64>,
    stats: Arc<Stats>,
    /// Replies held back until the staged writes are synced.
    answers: Vec<(ReplyTo, Outcome)>,
    /// Notices staged since the last sync.
    staged_notices: u64,
    /// Notices and audit entries whose deletion was staged since the last sync.
    staged_compaction: Compacted,
    /// Set by a shutdown command: flush, sync, confirm, stop.
    stopping: Option<oneshot::Sender<()>>,
    /// The next batching deadline (ms of the clock) and the instant the task wakes for it, kept
    /// while the deadline stays the same so that a stream of commands does not push it back.
    wake: Option<(u64, Instant)>,
}

impl Engine {
    /// Loads the state from `store` and starts the writer task.
    ///
    /// # Errors
    /// [`CaError::Store`] if the store cannot be read; [`CaError::Crypto`] if a stored group
    /// state does not verify under this CA key (wrong key or corrupt data).
    pub fn spawn(
        store: Arc<dyn CaStore>,
        ca: KeyPair,
        cfg: EngineConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<(EngineHandle, JoinHandle<()>), CaError> {
        let stats = Arc::new(Stats::default());
        let core = CaCore::new(store.clone(), ca, cfg, stats.clone(), clock.now_ms())?;
        let issuer = core.issuer().clone();
        let clock_for_handle = clock.clone();
        let (notice_tx, notices) = watch::channel(core.last_notice_seq());
        let (tx, rx) = mpsc::channel(DEFAULT_MAX_GROUP_COMMIT);
        let engine = Engine {
            core,
            cfg,
            clock,
            rng: OsRng,
            notice_tx,
            stats: stats.clone(),
            answers: Vec::new(),
            staged_notices: 0,
            staged_compaction: Compacted::default(),
            stopping: None,
            wake: None,
        };
        let task = tokio::spawn(engine.run(rx));
        let handle = EngineHandle::new(tx, notices, stats, issuer, store, clock_for_handle);
        Ok((handle, task))
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut sweep = tokio::time::interval(self.cfg.sweep_interval);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = self.wake_for(self.core.next_deadline_ms());
            let far = Instant::now() + Duration::from_secs(3600);
            tokio::select! {
                req = rx.recv() => match req {
                    Some(req) => {
                        self.receive(req);
                        // Group commit: take every command already waiting, then sync once.
                        let mut n = 1;
                        while n < self.cfg.max_group_commit && self.stopping.is_none() {
                            let Ok(req) = rx.try_recv() else { break };
                            self.receive(req);
                            n += 1;
                        }
                    }
                    None => {
                        self.apply(Command::CloseAll);
                        let _ = self.sync();
                        break;
                    }
                },
                () = tokio::time::sleep_until(wake.map_or(far, |(_, at)| at)), if wake.is_some() => {
                    if let Some((until_ms, _)) = wake {
                        self.apply(Command::CloseWindows { until_ms });
                    }
                }
                _ = sweep.tick() => self.apply(Command::Sweep),
            }
            if let Some(done) = self.stopping.take() {
                self.apply(Command::CloseAll);
                let _ = self.sync();
                let _ = done.send(());
                break;
            }
            if self.sync().is_err() {
                break;
            }
            let pending = u64::try_from(self.core.pending_changes()).unwrap_or(u64::MAX);
            self.stats.pending_changes.store(pending, Ordering::Relaxed);
        }
        tracing::info!("engine stopped");
    }

    /// The instant to wake for `deadline` (ms of the clock): the same instant as long as the
    /// deadline is the same, else the time left on the clock from now.
    fn wake_for(&mut self, deadline: Option<u64>) -> Option<(u64, Instant)> {
        let Some(deadline) = deadline else {
            self.wake = None;
            return None;
        };
        match self.wake {
            Some((d, at)) if d == deadline => Some((d, at)),
            _ => {
                let left = deadline.saturating_sub(self.clock.now_ms());
                let at = Instant::now() + Duration::from_millis(left);
                self.wake = Some((deadline, at));
                self.wake
            }
        }
    }

    fn receive(&mut self, req: Request) {
        match req {
            Request::Command(cmd) => self.apply(cmd),
            Request::Shutdown(done) => self.stopping = Some(done),
        }
    }

    /// Runs one command through the core and keeps its replies for after the sync.
    fn apply(&mut self, cmd: Command<ReplyTo>) {
        let effects = self.core.handle(cmd, self.clock.now_ms(), &mut self.rng);
        self.staged_notices += u64::try_from(effects.notices.len()).unwrap_or(u64::MAX);
        self.staged_compaction.notices += effects.compacted.notices;
        self.staged_compaction.audits += effects.compacted.audits;
        self.answers.extend(effects.replies);
    }

    /// Makes every staged write durable in one synced batch, then sends the held-back replies.
    /// On failure every success becomes the error and the core is reloaded from the store;
    /// `Err` means even that failed and the engine must stop.
    fn sync(&mut self) -> Result<(), ()> {
        let answers = std::mem::take(&mut self.answers);
        let staged = self.core.store().staged_ops();
        let result = if staged == 0 {
            Ok(())
        } else {
            let store = self.core.store().clone();
            sync_blocking(move || store.sync())
        };
        let mut fatal = false;
        let error = match result {
            Ok(()) => {
                if staged > 0 {
                    bump(&self.stats.commits);
                }
                let compacted = std::mem::take(&mut self.staged_compaction);
                let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
                self.stats
                    .compacted_notices
                    .fetch_add(count(compacted.notices), Ordering::Relaxed);
                self.stats
                    .compacted_audits
                    .fetch_add(count(compacted.audits), Ordering::Relaxed);
                let notices = std::mem::take(&mut self.staged_notices);
                if notices > 0 {
                    self.stats.notices.fetch_add(notices, Ordering::Relaxed);
                    self.notice_tx.send_replace(self.core.last_notice_seq());
                }
                None
            }
            Err(e) => {
                bump(&self.stats.commit_failures);
                tracing::error!(error = %e, "commit failed; nothing of the batch was written");
                self.staged_notices = 0;
                self.staged_compaction = Compacted::default();
                if let Err(e) = self.core.reload(self.clock.now_ms()) {
                    tracing::error!(error = %e, "cannot reload the state after a failed commit");
                    fatal = true;
                }
                Some(CaError::from(e))
            }
        };
        for (to, outcome) in answers {
            to.send(outcome, error.as_ref());
        }
        if fatal { Err(()) } else { Ok(()) }
    }
}

/// Runs the synced write off the async worker when the runtime has others to keep serving.
fn sync_blocking<T>(f: impl FnOnce() -> T) -> T {
    let multi = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}
