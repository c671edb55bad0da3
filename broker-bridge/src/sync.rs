//! One way to take the bridge's mutexes.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, also after a panic in another holder: every value the bridge keeps under a mutex
/// (caches, registries) stays usable when one update was cut short.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
