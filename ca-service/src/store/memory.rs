//! An in-memory [`CaStore`] for unit tests: one ordered map per column family.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{Batch, CaStore, Key, StoreError, keys::ALL_CFS};

/// Rows by key, per column family.
type Cfs = BTreeMap<&'static str, BTreeMap<Vec<u8>, Vec<u8>>>;

/// A [`CaStore`] that keeps everything in memory.
#[derive(Default)]
pub struct MemoryStore {
    cfs: Mutex<Cfs>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        let cfs = ALL_CFS.iter().map(|cf| (*cf, BTreeMap::new())).collect();
        MemoryStore {
            cfs: Mutex::new(cfs),
        }
    }

    fn with_cf<T>(
        &self,
        cf: &'static str,
        f: impl FnOnce(&BTreeMap<Vec<u8>, Vec<u8>>) -> T,
    ) -> Result<T, StoreError> {
        let cfs = self
            .cfs
            .lock()
            .map_err(|_| StoreError::Backend("poisoned lock"))?;
        let map = cfs.get(cf).ok_or(StoreError::MissingCf(cf))?;
        Ok(f(map))
    }
}

impl CaStore for MemoryStore {
    fn get(&self, key: &Key) -> Result<Option<Vec<u8>>, StoreError> {
        self.with_cf(key.cf(), |m| m.get(key.as_bytes()).cloned())
    }

    fn scan(
        &self,
        prefix: &Key,
        start: Option<&Key>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let from = start.unwrap_or(prefix).as_bytes().to_vec();
        self.with_cf(prefix.cf(), |m| {
            let it = m
                .range(from..)
                .take_while(|(k, _)| k.starts_with(prefix.as_bytes()))
                .map(|(k, v)| (k.clone(), v.clone()));
            if limit == 0 {
                it.collect()
            } else {
                it.take(limit).collect()
            }
        })
    }

    fn last(&self, prefix: &Key) -> Result<Option<(Vec<u8>, Vec<u8>)>, StoreError> {
        self.with_cf(prefix.cf(), |m| {
            m.range(prefix.as_bytes().to_vec()..)
                .take_while(|(k, _)| k.starts_with(prefix.as_bytes()))
                .last()
                .map(|(k, v)| (k.clone(), v.clone()))
        })
    }

    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        let mut cfs = self
            .cfs
            .lock()
            .map_err(|_| StoreError::Backend("poisoned lock"))?;
        for (key, _) in batch.ops() {
            if !cfs.contains_key(key.cf()) {
                return Err(StoreError::MissingCf(key.cf()));
            }
        }
        let mut batch = batch;
        for (key, value) in std::mem::take(&mut batch.ops) {
            if let Some(map) = cfs.get_mut(key.cf()) {
                match value {
                    Some(v) => map.insert(key.as_bytes().to_vec(), v),
                    None => map.remove(key.as_bytes()),
                };
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Tables;
    use crate::store::records::MetaRecord;
    use quva_proto::v1::AuditEntry;

    #[test]
    fn scan_respects_prefix_start_and_limit() {
        let s = MemoryStore::new();
        let mut b = Batch::new();
        for seq in 1..=5 {
            b.put_audit(&AuditEntry {
                seq,
                ..Default::default()
            });
        }
        b.put_meta(&MetaRecord::default());
        s.commit(b).unwrap();
        let got: Vec<u64> = s.audit(2, 2).unwrap().iter().map(|a| a.seq).collect();
        assert_eq!(got, vec![2, 3]);
        assert_eq!(s.audit(0, 0).unwrap().len(), 5);
        let (k, _) = s.last(&Key::audits()).unwrap().unwrap();
        assert_eq!(k, Key::audit(5).as_bytes());
    }
}
