//! Quva device: enrollment, group keys, rekeying and end-to-end protected MQTT messages for one
//! device (a Raspberry Pi or any Linux host), implementing the device side of PROTOCOL.md.
//!
//! Layers, bottom up:
//! - [`quva_client::device`]: the sans-IO protocol core — no sockets, no clock, no global RNG;
//!   events in, outputs out. Its `Device` verifies the bridge's member certificate lists and
//!   follows the rekeys; its `Enrollment` builds the CONNECT authentication of PROTOCOL.md §3.
//!   This crate drives it.
//! - [`KeyStore`]: credentials and group keys on disk (0700/0600, atomic writes, checksums).
//! - [`OtaAgent`]: the device side of group OTA (PROTOCOL.md §7.2), sans-IO like the `Device`;
//!   [`OtaFiles`] keeps its installed versions, progress and staging files.
//! - [`Link`]: the MQTT 5 connection to the bridge (rumqttc), reconnecting with fresh proofs.
//! - [`cli`] and [`run`]: the `quva-node` commands; `main.rs` only parses, sets up logging and
//!   calls [`run`].

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

mod app;
pub mod cli;
mod config;
mod daemon;
mod direct;
mod error;
mod net;
mod ota_commands;
mod ota_device;
mod signer;
mod store;
mod terminal;

// The public interface is:
pub use app::run;
pub use config::{
    Config, ConfigError, DEFAULT_CONFIG_FILE, DEFAULT_MAX_IMAGE_BYTES, OtaConfig, OtaSettings,
};
pub use direct::{DirectBook, DirectSendError, receive_direct, seal_direct};
pub use error::{CLOCK_FLOOR_MS, NodeError, rfc3339};
pub use net::{
    Link, LinkConfig, LinkEvent, MAX_INCOMING_PACKET, check_clock, exchange, parse_address,
};
pub use ota_device::{
    ApplyCommand, ChunkSpan, FETCH_WINDOW, LogLevel, OtaAction, OtaAgent, OtaFiles, RestoredGroup,
    SavedRelease, apply_outcome, perform,
};
pub use quva_daemon::clock::now_ms;
pub use store::{DEFAULT_STORE_DIR, KeyStore, StoreError, StoredCredentials, StoredGroup};
