//! The Quva certificate authority daemon.
//!
//! Implements the CA of PROTOCOL.md: enrollment and renewal with modified ECQV (§3), group-key
//! requests with proof of possession (§4) and batched rekeying with notices (§5), served over
//! gRPC (`quva.ca.v1`, crate quva-proto) to bridges, plus the owner's admin API.
//!
//! Data flow: a gRPC call passes the token [`auth::Guard`], then [`service`] sends state changes
//! to the single writer task in [`engine`] (reads go straight to [`store`]); the engine's sans-IO
//! core verifies with quva-client, stages epochs and returns the writes and replies, and its task
//! commits each change with its notices and audit entries in one synced RocksDB batch before
//! replying. Bridges stream the notice log with
//! `WatchNotices` and publish it on the key topics.
//!
//! # Usage
//! ```
//! use quva_ca::store::{MemoryStore, Tables};
//! let store = MemoryStore::new();
//! assert_eq!(store.meta().unwrap().next_serial, 0); // the engine starts serials at 1
//! ```

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

// The public interface is these modules.
pub mod audit_kind;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod datadir;
pub mod engine;
pub mod enrollment;
pub mod error;
pub mod metrics;
pub mod refusals;
pub mod server;
pub mod service;
pub mod store;
