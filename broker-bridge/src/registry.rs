//! The session registry: which live connections belong to which device or anonymous group, so
//! that a revocation, a deny or a removal ends them at once (PROTOCOL.md §8).

use std::collections::HashMap;
use std::sync::Mutex;

use quva_client::ids::{DeviceId, GroupId};
use tokio_util::sync::CancellationToken;

use crate::identity::Identity;
use crate::sync::lock;

/// Live sessions by device and by anonymous group. Every method takes `&self`.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    devices: Mutex<HashMap<DeviceId, Vec<CancellationToken>>>,
    groups: Mutex<HashMap<GroupId, Vec<CancellationToken>>>,
}

impl Registry {
    /// Registers a session; the returned token is cancelled when the session must end.
    pub(crate) fn register(&self, identity: &Identity) -> CancellationToken {
        let kick = CancellationToken::new();
        match identity {
            Identity::Device(id) => lock(&self.devices)
                .entry(id.clone())
                .or_default()
                .push(kick.clone()),
            Identity::Group(g, _) => lock(&self.groups)
                .entry(g.clone())
                .or_default()
                .push(kick.clone()),
            Identity::Anonymous => {}
        }
        kick
    }

    /// Forgets a session that ended (and any others already cancelled).
    pub(crate) fn unregister(&self, identity: &Identity, kick: &CancellationToken) {
        fn forget<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Vec<CancellationToken>>, key: &K) {
            if let Some(v) = map.get_mut(key) {
                v.retain(|t| !t.is_cancelled());
                if v.is_empty() {
                    map.remove(key);
                }
            }
        }
        kick.cancel();
        match identity {
            Identity::Device(id) => forget(&mut lock(&self.devices), id),
            Identity::Group(g, _) => forget(&mut lock(&self.groups), g),
            Identity::Anonymous => {}
        }
    }

    /// Ends every session of a device; returns how many.
    pub(crate) fn end_device(&self, id: &DeviceId) -> usize {
        end(lock(&self.devices).remove(id))
    }

    /// Ends every group-level connection of an anonymous group; returns how many.
    pub(crate) fn end_group(&self, group: &GroupId) -> usize {
        end(lock(&self.groups).remove(group))
    }

    /// Sessions registered (device and group connections).
    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.devices).values().map(Vec::len).sum::<usize>()
            + lock(&self.groups).values().map(Vec::len).sum::<usize>()
    }
}

fn end(tokens: Option<Vec<CancellationToken>>) -> usize {
    let tokens = tokens.unwrap_or_default();
    for t in &tokens {
        t.cancel();
    }
    tokens.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use quva_client::ids::Role;

    #[test]
    fn ends_the_sessions_of_a_device_or_group_only() {
        let r = Registry::default();
        let a = Identity::Device(DeviceId::new("a").unwrap());
        let b = Identity::Device(DeviceId::new("b").unwrap());
        let g = GroupId::new("plant/x").unwrap();
        let anon = Identity::Group(g.clone(), Role::Publisher);
        let (ka1, ka2, kb, kg) = (
            r.register(&a),
            r.register(&a),
            r.register(&b),
            r.register(&anon),
        );
        assert!(!r.register(&Identity::Anonymous).is_cancelled());
        assert_eq!(r.len(), 4);
        assert_eq!(r.end_device(&DeviceId::new("a").unwrap()), 2);
        assert!(ka1.is_cancelled() && ka2.is_cancelled() && !kb.is_cancelled());
        assert_eq!(r.end_group(&g), 1);
        assert!(kg.is_cancelled() && !kb.is_cancelled());
        r.unregister(&b, &kb);
        assert_eq!(r.len(), 0);
    }
}
