//! The RocksDB [`CaStore`]: one column family per [`super::KeyKind`], every commit one synced
//! `WriteBatch`.

use std::path::Path;

use rocksdb::{
    ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions,
};

use super::{Batch, CaStore, Key, StoreError, keys::ALL_CFS};

/// A [`CaStore`] on RocksDB.
pub struct RocksStore {
    db: DB,
}

impl RocksStore {
    /// Opens (creating if missing) the database in `path` with every column family.
    ///
    /// # Errors
    /// [`StoreError::Backend`] if RocksDB cannot open it (missing permissions, another process
    /// holding the lock, corruption).
    pub fn open(path: &Path) -> Result<RocksStore, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_paranoid_checks(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let cfs = ALL_CFS
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(*name, Options::default()));
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| {
            tracing::error!(error = %e, path = %path.display(), "cannot open RocksDB");
            StoreError::Backend("open")
        })?;
        Ok(RocksStore { db })
    }

    fn cf(&self, name: &'static str) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.db.cf_handle(name).ok_or(StoreError::MissingCf(name))
    }
}

fn backend(what: &'static str) -> impl FnOnce(rocksdb::Error) -> StoreError {
    move |e| {
        tracing::error!(error = %e, what, "RocksDB error");
        StoreError::Backend(what)
    }
}

impl CaStore for RocksStore {
    fn get(&self, key: &Key) -> Result<Option<Vec<u8>>, StoreError> {
        self.db
            .get_cf(self.cf(key.cf())?, key.as_bytes())
            .map_err(backend("get"))
    }

    fn scan(
        &self,
        prefix: &Key,
        start: Option<&Key>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let from = start.unwrap_or(prefix).as_bytes();
        let it = self.db.iterator_cf(
            self.cf(prefix.cf())?,
            IteratorMode::From(from, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in it {
            let (k, v) = item.map_err(backend("scan"))?;
            if !k.starts_with(prefix.as_bytes()) || (limit != 0 && out.len() == limit) {
                break;
            }
            out.push((k.into_vec(), v.into_vec()));
        }
        Ok(out)
    }

    fn last(&self, prefix: &Key) -> Result<Option<(Vec<u8>, Vec<u8>)>, StoreError> {
        // Seek to the first key past the prefix (its last non-0xff byte incremented) and walk
        // backwards to the first key that still has the prefix.
        let mut upper = prefix.as_bytes().to_vec();
        let mut it_mode_end = None;
        while let Some(b) = upper.pop() {
            if b < 0xff {
                upper.push(b + 1);
                it_mode_end = Some(upper);
                break;
            }
        }
        let cf = self.cf(prefix.cf())?;
        let it = match &it_mode_end {
            Some(end) => self
                .db
                .iterator_cf(cf, IteratorMode::From(end, Direction::Reverse)),
            None => self.db.iterator_cf(cf, IteratorMode::End),
        };
        for item in it {
            let (k, v) = item.map_err(backend("last"))?;
            if k.starts_with(prefix.as_bytes()) {
                return Ok(Some((k.into_vec(), v.into_vec())));
            }
            if k.as_ref() < prefix.as_bytes() {
                break;
            }
        }
        Ok(None)
    }

    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        let mut wb = WriteBatch::default();
        for (key, value) in batch.ops() {
            let cf = self.cf(key.cf())?;
            match value {
                Some(v) => wb.put_cf(cf, key.as_bytes(), v),
                None => wb.delete_cf(cf, key.as_bytes()),
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(wb, &wo).map_err(backend("commit"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Tables;
    use crate::store::records::MetaRecord;
    use quva_proto::v1::Notice;

    #[test]
    fn commit_scan_last_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RocksStore::open(dir.path()).unwrap();
            let mut b = Batch::new();
            for seq in [1u64, 2, 256, 257] {
                b.put_notice(&Notice {
                    seq,
                    ..Default::default()
                });
            }
            b.put_meta(&MetaRecord {
                next_serial: 9,
                ..Default::default()
            });
            s.commit(b).unwrap();
            let seqs: Vec<u64> = s.notices(2, 0).unwrap().iter().map(|n| n.seq).collect();
            assert_eq!(seqs, vec![2, 256, 257]);
            let (k, _) = s.last(&Key::notices()).unwrap().unwrap();
            assert_eq!(k, Key::notice(257).as_bytes());
            assert!(s.last(&Key::audits()).unwrap().is_none());
        }
        let s = RocksStore::open(dir.path()).unwrap();
        assert_eq!(s.meta().unwrap().next_serial, 9);
        assert_eq!(s.notices(0, 1).unwrap()[0].seq, 1);
    }
}
