//! Shared test support.
pub mod vectors;
