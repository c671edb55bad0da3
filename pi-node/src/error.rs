//! The device daemon's errors, each with a message an operator can act on.
//!
//! CONNACK refusals (MQTT 5 §3.2.2.2) are explained as PROTOCOL.md §3 uses them
//! ([`quva_client::reasons`]): 0x87 not authorized (unknown or revoked device, bad proof, stale
//! timestamp), 0x88 the bridge cannot reach the CA, 0x8C not a Quva bridge.
//!
//! # Usage
//! ```
//! use quva_node::NodeError;
//! let e = NodeError::Refused { code: 0x87 };
//! assert!(e.to_string().contains("not authorized"));
//! assert!(!e.is_transient());
//! assert!(NodeError::Refused { code: 0x88 }.is_transient());
//! ```

use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use quva_client::device::{EnrollFailure, JoinError, SendError};
use quva_client::reasons::{connack_is_transient, connack_meaning, puback_meaning};

use crate::config::ConfigError;
use crate::store::StoreError;

/// Clocks before this (2020-01-01T00:00:00Z) are taken as never set (a Raspberry Pi has no
/// battery-backed clock and starts in 1970 until NTP runs).
pub const CLOCK_FLOOR_MS: u64 = 1_577_836_800_000;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The configuration could not be loaded.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The key store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No broker address is configured.
    #[error("no broker address: pass --broker HOST:PORT or set `broker` in the configuration")]
    NoBroker,
    /// The broker address is not `host:port`.
    #[error("invalid broker address {0:?}: expected HOST:PORT")]
    BadBroker(String),
    /// The bridge could not be reached.
    #[error("cannot reach the bridge at {address}: {message}")]
    Unreachable {
        /// host:port.
        address: String,
        /// What failed.
        message: String,
    },
    /// The CONNACK refused the connection.
    #[error("the bridge refused the connection (reason 0x{code:02x}): {}", connack_meaning(*code))]
    Refused {
        /// The reason code.
        code: u8,
    },
    /// The connection dropped during a one-shot exchange.
    #[error("the connection to the bridge was lost: {0}")]
    Lost(String),
    /// The system clock has not been set.
    #[error(
        "the system clock reads {now} (before 2020): it has not been set; start NTP \
         (timedatectl set-ntp true) and retry"
    )]
    ClockNotSet {
        /// The clock's reading, RFC 3339.
        now: String,
    },
    /// The clock is before the certificate's start.
    #[error(
        "the system clock ({now}) is before the certificate's start ({not_before}): check the \
         clock (NTP)"
    )]
    ClockBehind {
        /// The clock, RFC 3339.
        now: String,
        /// The certificate's start, RFC 3339.
        not_before: String,
    },
    /// The certificate has expired.
    #[error(
        "the certificate expired at {not_after}: ask the owner for a new enrollment secret and \
         run `quva-node enroll --force` (or `quva-node renew` before it expires)"
    )]
    CertificateExpired {
        /// The end of validity, RFC 3339.
        not_after: String,
    },
    /// Enrollment failed.
    #[error("enrollment failed: {0}")]
    Enroll(#[from] EnrollFailure),
    /// The device is already enrolled.
    #[error("{0} already holds credentials; pass --force to replace them")]
    AlreadyEnrolled(PathBuf),
    /// Joining a group failed.
    #[error(transparent)]
    Join(#[from] JoinError),
    /// A message could not be sealed.
    #[error(transparent)]
    Send(#[from] SendError),
    /// The bridge dropped published messages.
    #[error("the bridge dropped {count} message(s), last with reason 0x{code:02x}: {}",
        puback_meaning(*code))]
    Dropped {
        /// How many.
        count: usize,
        /// The last PUBACK reason code.
        code: u8,
    },
    /// Bad input on the command line, a file or stdin.
    #[error("{0}")]
    Input(String),
    /// Reading a sensor or running a command failed.
    #[error("{0}")]
    Reading(String),
    /// The device was removed from a group role it uses.
    #[error(
        "removed from {group} as {role} at epoch {epoch} (denied, revoked or the certificate \
         expired): ask the owner to allow it again (`quva-ca group allow`)"
    )]
    Removed {
        /// The group.
        group: String,
        /// `publisher` or `subscriber`.
        role: &'static str,
        /// The first epoch without it.
        epoch: u32,
    },
    /// A protocol step that should not fail did.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl NodeError {
    /// Whether retrying later may succeed (the CA or network may come back); everything else
    /// needs an operator.
    pub fn is_transient(&self) -> bool {
        match self {
            NodeError::Unreachable { .. } | NodeError::Lost(_) => true,
            NodeError::Refused { code } => connack_is_transient(*code),
            _ => false,
        }
    }
}

/// The last millisecond RFC 3339 can write (9999-12-31T23:59:59.999Z).
const RFC3339_MAX_MS: u64 = 253_402_300_799_999;

/// Formats Unix milliseconds as RFC 3339 UTC (`2024-05-01T12:00:00.000Z`). Times past the year
/// 9999, which RFC 3339 cannot write (a certificate that never expires), show as its last
/// millisecond.
pub fn rfc3339(ms: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.min(RFC3339_MAX_MS));
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(CLOCK_FLOOR_MS), "2020-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_700_000_000_000), "2023-11-14T22:13:20.000Z");
        assert_eq!(rfc3339(RFC3339_MAX_MS), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(u64::MAX), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn meanings() {
        let e = NodeError::Refused { code: 0x8C };
        assert!(e.to_string().contains("does not speak Quva"), "{e}");
        let e = NodeError::Dropped {
            count: 2,
            code: 0x87,
        };
        assert!(e.to_string().contains("2 message(s)"));
    }
}
