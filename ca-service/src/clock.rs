//! Wall-clock time in Unix milliseconds, behind a trait so tests can move time by hand.
//!
//! The clock is quva-daemon's, shared by every Quva daemon; this module keeps the CA's paths
//! (`quva_ca::clock::ManualClock` in tests).
//!
//! # Usage
//! ```
//! use quva_ca::clock::{Clock, ManualClock};
//! let c = ManualClock::new(5);
//! c.advance(1);
//! assert_eq!(c.now_ms(), 6);
//! ```

pub use quva_daemon::clock::{Clock, ManualClock, SystemClock};
