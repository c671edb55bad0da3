//! Group commit: a [`CaStore`] view that collects the writes of many state changes and makes
//! them durable together in one synced batch.
//!
//! The engine's writer task stages each change with [`CaStore::commit`] (which here only
//! records it, visible to the task's own later reads), keeps the replies, and calls
//! [`Staged::sync`] once the queue of waiting commands is empty: one synced `WriteBatch` for all
//! of them, then every reply. A crash before the sync loses only unanswered requests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::{Batch, CaStore, Key, StoreError};

type Overlay = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// A [`CaStore`] whose commits are staged in memory until [`Staged::sync`].
pub struct Staged {
    inner: Arc<dyn CaStore>,
    pending: Mutex<(Overlay, Batch)>,
}

impl Staged {
    /// Stages over `inner`.
    pub fn new(inner: Arc<dyn CaStore>) -> Staged {
        Staged {
            inner,
            pending: Mutex::new((BTreeMap::new(), Batch::new())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, (Overlay, Batch)> {
        // Only the writer task locks it, never across a panic that matters: the data stays
        // consistent because every update is a single insert.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Number of staged operations.
    pub fn staged_ops(&self) -> usize {
        self.lock().1.len()
    }

    /// Writes every staged operation in one synced batch to the underlying store. The staged
    /// operations are dropped either way: on error nothing of them was applied, and the caller
    /// must reload its in-memory state from the store.
    ///
    /// # Errors
    /// [`StoreError`] from the underlying store.
    pub fn sync(&self) -> Result<(), StoreError> {
        let batch = {
            let mut p = self.lock();
            p.0.clear();
            std::mem::take(&mut p.1)
        };
        if batch.is_empty() {
            return Ok(());
        }
        self.inner.commit(batch)
    }

    /// The underlying store.
    pub fn inner(&self) -> &Arc<dyn CaStore> {
        &self.inner
    }
}

impl CaStore for Staged {
    fn get(&self, key: &Key) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.lock().0.get(key.as_bytes()) {
            return Ok(v.clone());
        }
        self.inner.get(key)
    }

    fn scan(
        &self,
        prefix: &Key,
        start: Option<&Key>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let from = start.unwrap_or(prefix).as_bytes().to_vec();
        let staged: Vec<(Vec<u8>, Option<Vec<u8>>)> = self
            .lock()
            .0
            .range(from..)
            .take_while(|(k, _)| k.starts_with(prefix.as_bytes()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if staged.is_empty() {
            return self.inner.scan(prefix, start, limit);
        }
        let mut rows: BTreeMap<Vec<u8>, Vec<u8>> =
            self.inner.scan(prefix, start, 0)?.into_iter().collect();
        for (k, v) in staged {
            match v {
                Some(v) => rows.insert(k, v),
                None => rows.remove(&k),
            };
        }
        let it = rows.into_iter();
        Ok(if limit == 0 {
            it.collect()
        } else {
            it.take(limit).collect()
        })
    }

    fn last(&self, prefix: &Key) -> Result<Option<(Vec<u8>, Vec<u8>)>, StoreError> {
        let has_staged = self
            .lock()
            .0
            .range(prefix.as_bytes().to_vec()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(prefix.as_bytes()));
        if !has_staged {
            return self.inner.last(prefix);
        }
        Ok(self.scan(prefix, None, 0)?.pop())
    }

    /// Stages `batch`: visible to reads through this view at once, durable at [`Staged::sync`].
    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        let mut p = self.lock();
        let mut batch = batch;
        for (key, value) in std::mem::take(&mut batch.ops) {
            p.0.insert(key.as_bytes().to_vec(), value.clone());
            p.1.ops.push((key, value));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::records::MetaRecord;
    use crate::store::{MemoryStore, Tables};
    use quva_proto::v1::AuditEntry;

    fn audit(seq: u64) -> AuditEntry {
        AuditEntry {
            seq,
            ..Default::default()
        }
    }

    #[test]
    fn staged_writes_are_read_back_and_reach_the_store_only_on_sync() {
        let inner = Arc::new(MemoryStore::new());
        let mut b = Batch::new();
        for seq in [1, 2, 3] {
            b.put_audit(&audit(seq));
        }
        inner.commit(b).unwrap();
        let s = Staged::new(inner.clone());
        let mut b = Batch::new();
        b.put_audit(&audit(4));
        b.delete(Key::audit(2));
        b.put_meta(&MetaRecord {
            next_serial: 7,
            ..Default::default()
        });
        s.commit(b).unwrap();
        let seqs = |st: &dyn CaStore, from, limit| -> Vec<u64> {
            st.audit(from, limit)
                .unwrap()
                .iter()
                .map(|a| a.seq)
                .collect()
        };
        assert_eq!(seqs(&s, 0, 0), vec![1, 3, 4]);
        assert_eq!(seqs(&s, 2, 1), vec![3]);
        assert_eq!(seqs(inner.as_ref(), 0, 0), vec![1, 2, 3]);
        assert_eq!(s.meta().unwrap().next_serial, 7);
        assert_eq!(inner.meta().unwrap().next_serial, 0);
        let (k, _) = s.last(&Key::audits()).unwrap().unwrap();
        assert_eq!(k, Key::audit(4).as_bytes());
        assert_eq!(s.staged_ops(), 3);
        s.sync().unwrap();
        assert_eq!(s.staged_ops(), 0);
        assert_eq!(seqs(inner.as_ref(), 0, 0), vec![1, 3, 4]);
        assert_eq!(inner.meta().unwrap().next_serial, 7);
    }
}
