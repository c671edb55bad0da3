//! Quva broker bridge: an MQTT 5 proxy in front of a stock broker that enforces Quva's rules.
//!
//! Implements the bridge of PROTOCOL.md §1: honest but curious, it relays, stores public material,
//! verifies signatures and drops bad traffic, and learns no plaintext of options 2/3. For each
//! device connection it opens one upstream connection to the real broker and relays every packet
//! except CONNECT/CONNACK (authentication, §3), SUBSCRIBE/SUBACK (group keys and access control,
//! §4) and PUBLISH (message checks, §6). It follows the CA's rekey notices and republishes them
//! retained (§5, §8).
//!
//! Data flow:
//! ```text
//! device ──MQTT 5──▶ session ──MQTT 5──▶ broker     (session::machine::Session decides,
//!                      │  ▲                          the session task moves the bytes)
//!              CaClient│  │BridgeDirectory (Q_CA, groups, members, revocations)
//!                      ▼  │
//!                      CA ──WatchNotices──▶ notices ──retained PUBLISH──▶ broker
//! ```
//!
//! # Usage
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use quva_bridge::{Bridge, Config};
//! let cfg = Config::from_toml("listen = \"127.0.0.1:0\"\n[upstream]\naddress = \"127.0.0.1:1883\"")?;
//! let bridge = Bridge::start(cfg, None).await?;
//! println!("devices connect to {}", bridge.local_addr());
//! bridge.shutdown().await;
//! # Ok(()) }
//! ```

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

#[cfg(any(fuzzing, test))]
#[doc(hidden)]
pub mod __fuzz;
mod bridge;
mod dialect;
mod frames;
mod gateway;
mod identity;
mod notices;
mod ota;
mod reasons;
mod registry;
mod session;
mod shared;
mod sync;
mod verify;

// The public interface is these modules and the re-exports below.
pub mod ca;
pub mod config;
pub mod directory;
pub mod grpc;
pub mod metrics;
pub mod topics;

pub use bridge::{Bridge, StartError};
pub use config::Config;
pub use metrics::Metrics;
pub use shared::now_ms;

/// The CA client named by `cfg.ca.endpoint` (gRPC, [`grpc::GrpcCa`]), or `None` without one
/// (unprotected relaying only).
///
/// # Errors
/// If the endpoint or the token is not usable.
pub fn grpc_ca(cfg: &Config) -> Result<Option<std::sync::Arc<dyn ca::CaClient>>, StartError> {
    if cfg.ca.endpoint.is_empty() {
        return Ok(None);
    }
    let token = cfg.ca_token()?;
    let tls = cfg.ca_tls()?;
    let mut endpoint = quva_proto::tls::endpoint(&cfg.ca.endpoint, tls.as_ref())
        .map_err(config::ConfigError::Tls)?;
    if cfg.ca.keepalive_ms > 0 {
        // A dead CA link (a silent middlebox, a frozen peer) fails the notice stream after one
        // unanswered ping instead of silently stopping notices (PROTOCOL.md §8).
        let every = std::time::Duration::from_millis(cfg.ca.keepalive_ms);
        endpoint = endpoint
            .http2_keep_alive_interval(every)
            .keep_alive_timeout(every)
            .keep_alive_while_idle(true);
    }
    let ca = grpc::GrpcCa::new(endpoint, token.as_deref(), cfg.ca_timeout())
        .map_err(|_| config::ConfigError::Invalid("ca.token"))?;
    Ok(Some(std::sync::Arc::new(ca)))
}
