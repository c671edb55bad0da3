//! Quva device: enrollment, group keys, rekeying and end-to-end protected MQTT messages for one
//! device (a Raspberry Pi or any Linux host), implementing the device side of PROTOCOL.md.
//!
//! Layers, bottom up:
//! - [`Device`]: the sans-IO protocol core over `quva-client` — no sockets, no clock, no global
//!   RNG; events in, [`Output`]s out. `quva_client::members::MemberList` verifies the bridge's member certificate
//!   lists; [`Enrollment`] builds the CONNECT authentication of PROTOCOL.md §3.
//! - [`KeyStore`]: credentials and group keys on disk (0700/0600, atomic writes, checksums).
//! - [`OtaAgent`]: the device side of group OTA (PROTOCOL.md §7.2), sans-IO like [`Device`];
//!   [`OtaFiles`] keeps its installed versions, progress and staging files.
//! - [`Link`]: the MQTT 5 connection to the bridge (rumqttc), reconnecting with fresh proofs.
//! - [`cli`] and [`run`]: the `quva-node` commands; `main.rs` only parses, sets up logging and
//!   calls [`run`].

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

mod app;
pub mod cli;
mod config;
mod daemon;
mod device;
mod direct;
mod enroll;
mod error;
mod net;
mod ota_commands;
mod ota_device;
mod signer;
mod store;
mod terminal;
#[cfg(test)]
mod testkit;

// The public interface is:
pub use app::run;
pub use config::{
    Config, ConfigError, DEFAULT_CONFIG_FILE, DEFAULT_MAX_IMAGE_BYTES, OtaConfig, OtaSettings,
};
pub use device::{
    Device, DeviceConfig, DeviceView, DropReason, GroupSummary, JoinError, KeySource, MissedEpoch,
    Output, Purpose, QUERY_SUFFIX, SendError, StoredGroupKey, Subscription, data_topic,
    query_topic, receive_topic, suback_meaning,
};
pub use direct::{DirectBook, DirectSendError, receive_direct, seal_direct};
pub use enroll::{ConnectAuth, EnrollFailure, Enrollment, cert_connect_auth};
pub use error::{CLOCK_FLOOR_MS, NodeError, connack_meaning, puback_meaning, rfc3339};
pub use net::{
    Link, LinkConfig, LinkEvent, MAX_INCOMING_PACKET, check_clock, exchange, parse_address,
};
pub use ota_device::{
    ApplyCommand, ChunkSpan, FETCH_WINDOW, LogLevel, OtaAction, OtaAgent, OtaFiles, RestoredGroup,
    SavedRelease, apply_outcome, perform,
};
pub use quva_daemon::clock::now_ms;
pub use store::{DEFAULT_STORE_DIR, KeyStore, StoreError, StoredCredentials, StoredGroup};
