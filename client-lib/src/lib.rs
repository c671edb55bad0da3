//! Quva v1 protocol core: end-to-end security for MQTT publish/subscribe groups.
//!
//! A sans-IO library implementing `PROTOCOL.md` (docs/protocol.md in this repository): it never
//! opens a socket, reads a clock or owns a random generator. Time (`now_ms`) and randomness
//! (`&mut impl CryptoRngCore`) are parameters, so every protocol step is testable in memory; the
//! CA daemon, the broker bridge and the device daemon own the I/O, and only they pass the
//! operating system's generator (`rand_core::OsRng`). Tests pass a seeded one.
//!
//! Layers, bottom up: [`codec`] (the one wire codec), [`curve`] and [`symmetric`] (primitives),
//! [`schnorr`] and [`ecies`], then the protocol: [`ecqv`] and [`enrollment`] (§3), [`group`] (§4),
//! [`rekey`] (§5), [`message`] (§6), [`direct`] (§7.1), [`ota`] (§7.2), [`members`] (the member
//! certificate lists of §8), [`topics`] (the topic layout of §8) and [`reasons`] (the MQTT reason
//! codes and their meanings). On top, [`device`] is one enrolled device's state machine: events
//! in, outputs out, for the device daemon, benchmarks and tests alike.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

// The public interface is these modules.
pub mod codec;
pub mod curve;
pub mod device;
pub mod direct;
pub mod ecies;
pub mod ecqv;
pub mod enrollment;
pub mod group;
pub mod ids;
pub mod members;
pub mod message;
pub mod ota;
pub mod reasons;
pub mod rekey;
pub mod replay;
pub mod schnorr;
pub mod symmetric;
pub mod topics;

#[cfg(any(fuzzing, feature = "testkit"))]
#[doc(hidden)]
pub mod __fuzz;
mod msm;
#[cfg(any(test, feature = "testkit"))]
#[doc(hidden)]
pub mod testkit;
