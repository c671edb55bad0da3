//! Injected traffic: forged, replayed, tampered and stale messages.
