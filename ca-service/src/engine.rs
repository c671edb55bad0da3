//! The rekey engine: one writer that owns every state change of the CA.
//!
//! Implements the CA side of PROTOCOL.md §3 (enrollment and renewal), §4 (group-key requests)
//! and §5 (rekeying). Membership changes of a group (joins, denials, revocations, certificate
//! expiry, the periodic timer, a forced rekey) open a batching window (default 200 ms); when it
//! closes, quva-client's [`GroupState::stage`](quva_client::rekey::GroupState::stage) plans one
//! epoch with its notices, and the change, the new group state, the epoch record, the notices,
//! the audit entries and the counters are written in one synced batch before any waiting caller
//! gets its reply. Only then is the staged state committed in memory. A crash before the write
//! loses only unacknowledged requests.
//!
//! # Core and actor
//! The decisions live in [`CaCore`], a sans-IO state machine: it takes a [`Command`], the time
//! (`now_ms`) and an RNG, reads through the [`CaStore`](crate::store::CaStore) trait, stages its
//! writes in a [`Staged`](crate::store::Staged) view and returns [`Effects`]: the replies (each
//! with the caller's ticket), the notices and audit entries it staged, and the next batching
//! deadline in ms of the same clock. It never awaits, sleeps, syncs or picks randomness, so unit
//! tests drive it with a [`MemoryStore`](crate::store::MemoryStore), a seeded RNG and a manual
//! `now`. The tokio task in `actor` only carries the effects out: it takes commands from an mpsc
//! channel (many per synced batch: group commit), syncs on the blocking pool, then sends the
//! held-back replies; a failed sync turns every success into the error and reloads the core from
//! the store. It turns the next deadline into a sleep and runs the sweep on a timer.
//! [`EngineHandle`] is the async front of the task.
//!
//! Enrollments and renewals are prepared before they reach the task: the [`EngineHandle`] runs
//! [`Issuer`]'s checks on the durable store, takes a serial and computes the certificate on the
//! caller's task (the curve work, in parallel), and sends the [`Prepared`] certificate; the core
//! re-checks what may have changed and stages it. A request the precheck refuses goes to the task
//! as it came, which checks it again and records the refusal.
//!
//! Reads (listings, group info, certificates, the notice log) go straight to the store.
//!
//! # Usage
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use std::sync::Arc;
//! use quva_ca::clock::SystemClock;
//! use quva_ca::engine::{Engine, EngineConfig};
//! use quva_ca::store::MemoryStore;
//! use quva_client::curve::KeyPair;
//! use quva_client::group::Privacy;
//! use quva_client::ids::GroupId;
//!
//! let ca = KeyPair::random(&mut rand_core::OsRng);
//! let (engine, task) = Engine::spawn(Arc::new(MemoryStore::new()), ca,
//!     EngineConfig::default(), Arc::new(SystemClock)).unwrap();
//! let g = engine.create_group(GroupId::new("plant/temp").unwrap(), Privacy::Standard, 0)
//!     .await.unwrap();
//! assert_eq!(g.epoch, 0);
//! engine.shutdown().await;
//! task.await.unwrap();
//! # }
//! ```

mod actor;
mod admin;
mod audit;
mod batching;
mod command;
mod compaction;
mod config;
mod core;
mod enroll;
mod errors;
mod handle;
mod issuer;
mod load;
mod membership;
mod retention;
mod state;
mod stats;
mod sweep;
#[cfg(test)]
mod testkit;

// The public interface is these items.
pub use self::core::{CaCore, Effects};
pub use actor::Engine;
pub use audit::RekeyReason;
pub use command::{CertificateUse, Command, JoinReply, Outcome, Registered};
pub use config::{
    DEFAULT_AUDIT_DAYS, DEFAULT_COMPACTION_PER_SWEEP, DEFAULT_MAX_GROUP_COMMIT,
    DEFAULT_NOTICE_EPOCHS, EngineConfig, MAX_CERT_PROOF_LEN, MAX_CERT_REQUEST_LEN, Retention,
};
pub use handle::EngineHandle;
pub use issuer::{Issuer, Prepared};
pub use retention::{Compacted, REVOKED_EXPIRY_MARGIN_MS};
pub use stats::Stats;
