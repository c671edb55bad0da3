//! The Quva certificate authority daemon: enrollment, group keys and rekeying over gRPC.
//!
//! The implementation lands in the following commits.
