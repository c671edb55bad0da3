//! Persistent CA state: the [`CaStore`] trait, its RocksDB and in-memory implementations, and
//! typed access to the rows of [`keys`] with the values of [`records`].
//!
//! All writes go through [`CaStore::commit`] with a [`Batch`]: one atomic, synced write per state
//! change, holding the change, its notices and its audit entries together. Only the engine's
//! writer task commits; readers may read at any time.
//!
//! # Usage
//! ```
//! use quva_ca::store::{Batch, CaStore, MemoryStore, Tables, records::MetaRecord};
//! let store = MemoryStore::new();
//! let mut batch = Batch::new();
//! batch.put_meta(&MetaRecord { next_serial: 1, ..Default::default() });
//! store.commit(batch).unwrap();
//! assert_eq!(store.meta().unwrap().next_serial, 1);
//! ```

pub mod keys;
pub mod records;

mod memory;
mod rocks;
mod staged;

use prost::Message;
use quva_client::ids::{DeviceId, GroupId, Role};
use quva_client::rekey::tree::NodeKey;
use zeroize::{Zeroize, Zeroizing};

pub use keys::{Key, KeyKind, NonceScope};
pub use memory::MemoryStore;
pub use records::{
    CertRecord, DeviceRecord, DeviceState, EpochRecord, GroupRecord, MemberRecord, MetaRecord,
    NonceRecord,
};
pub use rocks::RocksStore;
pub use staged::Staged;

use quva_proto::v1::{AuditEntry, Notice};

/// A storage failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database reported an error (I/O, corruption detected by RocksDB, ...).
    #[error("storage backend error: {0}")]
    Backend(&'static str),
    /// A stored value could not be decoded.
    #[error("corrupt stored {0}")]
    Corrupt(&'static str),
    /// A column family is missing.
    #[error("missing column family {0}")]
    MissingCf(&'static str),
}

/// One atomic write: puts and deletes over any column families. Values (which include shares
/// and node keys) are zeroized when the batch is dropped.
#[derive(Default)]
pub struct Batch {
    ops: Vec<(Key, Option<Vec<u8>>)>,
}

impl Drop for Batch {
    fn drop(&mut self) {
        for (_, value) in &mut self.ops {
            if let Some(v) = value {
                v.zeroize();
            }
        }
    }
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Batch {
        Batch::default()
    }

    /// Adds a put.
    pub fn put(&mut self, key: Key, value: Vec<u8>) {
        self.ops.push((key, Some(value)));
    }

    /// Adds a delete.
    pub fn delete(&mut self, key: Key) {
        self.ops.push((key, None));
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The operations, in order.
    pub fn ops(&self) -> &[(Key, Option<Vec<u8>>)] {
        &self.ops
    }

    fn put_record<M: Message>(&mut self, key: Key, m: &M) {
        self.put(key, records::encode(m));
    }

    /// Writes the counters row.
    pub fn put_meta(&mut self, m: &MetaRecord) {
        self.put_record(Key::meta(), m);
    }

    /// Writes a device row.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] if the record's ID is not a valid device ID.
    pub fn put_device(&mut self, d: &DeviceRecord) -> Result<(), StoreError> {
        let id = DeviceId::new(&d.id).map_err(|_| StoreError::Corrupt("device id"))?;
        self.put_record(Key::device(&id), d);
        Ok(())
    }

    /// Writes a certificate row.
    pub fn put_cert(&mut self, c: &CertRecord) {
        self.put_record(Key::cert(c.serial), c);
    }

    /// Writes a group row.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] if the record's ID is not a valid group ID.
    pub fn put_group(&mut self, g: &GroupRecord) -> Result<(), StoreError> {
        let id = GroupId::new(&g.id).map_err(|_| StoreError::Corrupt("group id"))?;
        self.put_record(Key::group(&id), g);
        Ok(())
    }

    /// Writes a member row.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] if the record's device ID or role is invalid.
    pub fn put_member(&mut self, group: &GroupId, m: &MemberRecord) -> Result<(), StoreError> {
        let (device, role) = member_ids(m)?;
        self.put_record(Key::member(group, role, &device), m);
        Ok(())
    }

    /// Deletes a member row.
    pub fn delete_member(&mut self, group: &GroupId, role: Role, device: &DeviceId) {
        self.delete(Key::member(group, role, device));
    }

    /// Writes a key-tree node key (a secret).
    pub fn put_tree_node(&mut self, group: &GroupId, role: Role, node: u32, key: &NodeKey) {
        self.put(Key::tree_node(group, role, node), key.as_bytes().to_vec());
    }

    /// Deletes a key-tree node row (the node became blank).
    pub fn delete_tree_node(&mut self, group: &GroupId, role: Role, node: u32) {
        self.delete(Key::tree_node(group, role, node));
    }

    /// Writes an epoch row.
    pub fn put_epoch(&mut self, group: &GroupId, e: &EpochRecord) {
        self.put_record(Key::epoch(group, e.epoch), e);
    }

    /// Writes a notice row.
    pub fn put_notice(&mut self, n: &Notice) {
        self.put_record(Key::notice(n.seq), n);
    }

    /// Writes an audit row.
    pub fn put_audit(&mut self, a: &AuditEntry) {
        self.put_record(Key::audit(a.seq), a);
    }

    /// Writes a replay-cache row.
    pub fn put_nonce(&mut self, scope: NonceScope, nonce: &[u8; 16], expires_ms: u64) {
        self.put_record(Key::nonce(scope, nonce), &NonceRecord { expires_ms });
    }
}

/// The device and role a member row is about.
///
/// # Errors
/// [`StoreError::Corrupt`] for an invalid stored ID or role.
pub fn member_ids(m: &MemberRecord) -> Result<(DeviceId, Role), StoreError> {
    let device = DeviceId::new(&m.device).map_err(|_| StoreError::Corrupt("member device"))?;
    let role = u8::try_from(m.role)
        .ok()
        .and_then(Role::from_u8)
        .ok_or(StoreError::Corrupt("member role"))?;
    Ok((device, role))
}

/// One stored row: key bytes and value bytes.
pub type Row = (Vec<u8>, Vec<u8>);

/// The raw key-value store: reads, ordered scans and atomic synced commits.
pub trait CaStore: Send + Sync + 'static {
    /// Reads one value.
    ///
    /// # Errors
    /// [`StoreError`] from the backend.
    fn get(&self, key: &Key) -> Result<Option<Vec<u8>>, StoreError>;

    /// Up to `limit` rows of `prefix`'s kind whose keys start with `prefix` and are ≥ `start`,
    /// in key order (all of them when `limit` is 0).
    ///
    /// # Errors
    /// [`StoreError`] from the backend.
    fn scan(&self, prefix: &Key, start: Option<&Key>, limit: usize)
    -> Result<Vec<Row>, StoreError>;

    /// The last row (highest key) starting with `prefix`.
    ///
    /// # Errors
    /// [`StoreError`] from the backend.
    fn last(&self, prefix: &Key) -> Result<Option<Row>, StoreError>;

    /// Applies every operation of `batch` atomically and durably (synced) before returning.
    ///
    /// # Errors
    /// [`StoreError`] from the backend; then nothing of the batch was applied.
    fn commit(&self, batch: Batch) -> Result<(), StoreError>;
}

/// Typed reads over any [`CaStore`].
pub trait Tables {
    /// The counters row (defaults when absent).
    ///
    /// # Errors
    /// [`StoreError`] from the backend or a corrupt row.
    fn meta(&self) -> Result<MetaRecord, StoreError>;
    /// A device.
    ///
    /// # Errors
    /// [`StoreError`] from the backend or a corrupt row.
    fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError>;
    /// Every device, sorted by ID length then ID.
    ///
    /// # Errors
    /// [`StoreError`] from the backend or a corrupt row.
    fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError>;
    /// A certificate.
    ///
    /// # Errors
    /// [`StoreError`] from the backend or a corrupt row.
    fn cert(&self, serial: u64) -> Result<Option<CertRecord>, StoreError>;
    /// Every certificate, by serial.
    ///
    /// # Errors
    /// [`StoreError`] from the backend or a corrupt row.
    fn certs(&self) -> Result<Vec<CertRecord>, StoreError>;
    /// A group.
    ///
    /// # Errors
    /// [`StoreError`] from the backend or a corrupt row.
    fn group(&self, id: &GroupId) -> Result<Option<GroupRecord>, StoreError>;
    /// Every group.
    ///
    /// # Errors
    /// [`StoreError`] from the backend or a corrupt row.
    fn groups(&self) -> Result<Vec<GroupRecord>, StoreError>;
    /// One member row.
    ///
    /// # Errors
    /// [`StoreError`] from the backend or a corrupt row.
    fn member(
        &self,
        group: &GroupId,
        role: Role,
        device: &DeviceId,
    ) -> Result<Option<MemberRecord>, StoreError>;
    /// Every member row of a group, by role then device.
    ///
    /// # Errors
    /// [`StoreError`] from the backend or a corrupt row.
    fn members(&self, group: &GroupId) -> Result<Vec<MemberRecord>, StoreError>;
    /// Every key-tree node key of a group as (holders' role, node, key).
    ///
    /// # Errors
    /// [`StoreError`] from the backend or a corrupt row.
    fn tree_nodes(&self, group: &GroupId) -> Result<Vec<(Role, u32, NodeKey)>, StoreError>;
    /// One epoch record.
    ///
    /// # Errors
    /// [`StoreError`] from the backend or a corrupt row.
    fn epoch(&self, group: &GroupId, epoch: u32) -> Result<Option<EpochRecord>, StoreError>;
    /// Notices with `seq ≥ from`, at most `limit` (0: all).
    ///
    /// # Errors
    /// [`StoreError`] from the backend or a corrupt row.
    fn notices(&self, from: u64, limit: usize) -> Result<Vec<Notice>, StoreError>;
    /// Audit entries with `seq ≥ from`, at most `limit` (0: all).
    ///
    /// # Errors
    /// [`StoreError`] from the backend or a corrupt row.
    fn audit(&self, from: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError>;
    /// The replay-cache entry of a nonce.
    ///
    /// # Errors
    /// [`StoreError`] from the backend or a corrupt row.
    fn nonce(&self, scope: NonceScope, nonce: &[u8; 16])
    -> Result<Option<NonceRecord>, StoreError>;
    /// Every replay-cache key with its entry.
    ///
    /// # Errors
    /// [`StoreError`] from the backend or a corrupt row.
    fn nonces(&self) -> Result<Vec<(Key, NonceRecord)>, StoreError>;
}

fn decode_all<M: Message + Default>(
    rows: Vec<(Vec<u8>, Vec<u8>)>,
    what: &'static str,
) -> Result<Vec<M>, StoreError> {
    rows.iter().map(|(_, v)| records::decode(v, what)).collect()
}

impl<S: CaStore + ?Sized> Tables for S {
    fn meta(&self) -> Result<MetaRecord, StoreError> {
        match self.get(&Key::meta())? {
            Some(v) => records::decode(&v, "meta"),
            None => Ok(MetaRecord::default()),
        }
    }

    fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        self.get(&Key::device(id))?
            .map(|v| records::decode(&v, "device"))
            .transpose()
    }

    fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        decode_all(self.scan(&Key::devices(), None, 0)?, "device")
    }

    fn cert(&self, serial: u64) -> Result<Option<CertRecord>, StoreError> {
        self.get(&Key::cert(serial))?
            .map(|v| records::decode(&v, "certificate"))
            .transpose()
    }

    fn certs(&self) -> Result<Vec<CertRecord>, StoreError> {
        decode_all(self.scan(&Key::certs(), None, 0)?, "certificate")
    }

    fn group(&self, id: &GroupId) -> Result<Option<GroupRecord>, StoreError> {
        self.get(&Key::group(id))?
            .map(|v| records::decode(&v, "group"))
            .transpose()
    }

    fn groups(&self) -> Result<Vec<GroupRecord>, StoreError> {
        decode_all(self.scan(&Key::groups(), None, 0)?, "group")
    }

    fn member(
        &self,
        group: &GroupId,
        role: Role,
        device: &DeviceId,
    ) -> Result<Option<MemberRecord>, StoreError> {
        self.get(&Key::member(group, role, device))?
            .map(|v| records::decode(&v, "member"))
            .transpose()
    }

    fn members(&self, group: &GroupId) -> Result<Vec<MemberRecord>, StoreError> {
        decode_all(self.scan(&Key::members(group), None, 0)?, "member")
    }

    fn tree_nodes(&self, group: &GroupId) -> Result<Vec<(Role, u32, NodeKey)>, StoreError> {
        let prefix = Key::tree_nodes(group);
        let at = prefix.as_bytes().len();
        self.scan(&prefix, None, 0)?
            .into_iter()
            .map(|(k, v)| {
                let v = Zeroizing::new(v);
                let role = k
                    .get(at)
                    .copied()
                    .and_then(Role::from_u8)
                    .ok_or(StoreError::Corrupt("tree node role"))?;
                let node = k
                    .get(at + 1..)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(u32::from_be_bytes)
                    .ok_or(StoreError::Corrupt("tree node index"))?;
                let key = Zeroizing::new(
                    <[u8; 32]>::try_from(v.as_slice())
                        .map_err(|_| StoreError::Corrupt("tree node key"))?,
                );
                Ok((role, node, NodeKey::from_bytes(&key)))
            })
            .collect()
    }

    fn epoch(&self, group: &GroupId, epoch: u32) -> Result<Option<EpochRecord>, StoreError> {
        self.get(&Key::epoch(group, epoch))?
            .map(|v| records::decode(&v, "epoch"))
            .transpose()
    }

    fn notices(&self, from: u64, limit: usize) -> Result<Vec<Notice>, StoreError> {
        decode_all(
            self.scan(&Key::notices(), Some(&Key::notice(from)), limit)?,
            "notice",
        )
    }

    fn audit(&self, from: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        decode_all(
            self.scan(&Key::audits(), Some(&Key::audit(from)), limit)?,
            "audit entry",
        )
    }

    fn nonce(
        &self,
        scope: NonceScope,
        nonce: &[u8; 16],
    ) -> Result<Option<NonceRecord>, StoreError> {
        self.get(&Key::nonce(scope, nonce))?
            .map(|v| records::decode(&v, "nonce"))
            .transpose()
    }

    fn nonces(&self) -> Result<Vec<(Key, NonceRecord)>, StoreError> {
        let rows = self.scan(&Key::nonces(), None, 0)?;
        rows.into_iter()
            .map(|(k, v)| {
                let rec = records::decode(&v, "nonce")?;
                let key = Key::from_raw(k).ok_or(StoreError::Corrupt("nonce key"))?;
                Ok((key, rec))
            })
            .collect()
    }
}
