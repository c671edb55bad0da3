//! The notice follower's state file: where a restarted bridge resumes the CA's notice log.
//!
//! The file holds the sequence number of the next notice to apply and everything the bridge
//! built from the notices before it that a fresh start would otherwise lose: the retained set
//! (the latest payload of every topic it published, the epoch of each group's certificate list)
//! and the revocations (revoked and superseded serials, with the revoked device). Group data and
//! device keys are not kept: they are fetched again from the CA (`GetGroup`), and a superseded
//! or revoked serial stays refused because the revocations are kept. Nothing in it is secret:
//! notices and certificate lists are public.
//!
//! The file is trusted whole or not at all: a missing file, one that does not decode or whose
//! checksum fails, or one written for another CA (its key identifier differs) makes the bridge
//! read the log from its start, as without a file.
//!
//! Layout (quva-client's codec): `"QVNS" || u8 1 || ca_kid[8] || u64 next_seq ||
//! u32 n || n × (str topic || blob payload) || u32 n || n × (str group || u32 epoch) ||
//! u32 n || n × (u64 serial || str device) || sha256(everything before)[32]`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use quva_client::codec::{DecodeError, Reader, put_blob, put_str, put_u8, put_u32, put_u64};
use quva_client::curve::sha256;
use quva_client::enrollment::CaKid;

const MAGIC: &[u8; 4] = b"QVNS";
const VERSION: u8 = 1;
const KID_LEN: usize = 8;

/// What a restarted bridge needs to resume the notice log after `next_seq - 1`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FollowerState {
    /// The sequence number of the next notice to apply.
    pub(crate) next_seq: u64,
    /// The latest payload published retained on each topic.
    pub(crate) topics: BTreeMap<String, Vec<u8>>,
    /// The epoch of each group's published certificate list.
    pub(crate) lists: BTreeMap<String, u32>,
    /// Revoked and superseded serials, with the revoked device (empty for a superseded one).
    pub(crate) revoked: BTreeMap<u64, String>,
}

/// Why a state file was not used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StateError {
    /// The file could not be read.
    #[error("cannot read the state file: {0}")]
    Read(std::io::Error),
    /// The file is damaged or not a state file.
    #[error("corrupt state file ({0})")]
    Corrupt(&'static str),
    /// The file was written while following another CA.
    #[error("state file of another CA")]
    OtherCa,
}

impl From<DecodeError> for StateError {
    fn from(_: DecodeError) -> StateError {
        StateError::Corrupt("truncated or invalid field")
    }
}

impl FollowerState {
    /// The file's bytes for the CA `kid`.
    pub(crate) fn encode(&self, kid: &CaKid) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        put_u8(&mut out, VERSION);
        out.extend_from_slice(&kid.0);
        put_u64(&mut out, self.next_seq);
        put_u32(&mut out, len32(self.topics.len()));
        for (topic, payload) in &self.topics {
            put_str(&mut out, topic);
            put_blob(&mut out, payload);
        }
        put_u32(&mut out, len32(self.lists.len()));
        for (group, epoch) in &self.lists {
            put_str(&mut out, group);
            put_u32(&mut out, *epoch);
        }
        put_u32(&mut out, len32(self.revoked.len()));
        for (serial, device) in &self.revoked {
            put_u64(&mut out, *serial);
            put_str(&mut out, device);
        }
        let sum = sha256(&[&out]);
        out.extend_from_slice(&sum);
        out
    }

    /// Decodes a file written for the CA `kid`.
    ///
    /// # Errors
    /// [`StateError::Corrupt`] or [`StateError::OtherCa`].
    pub(crate) fn decode(bytes: &[u8], kid: &CaKid) -> Result<FollowerState, StateError> {
        let body_len = bytes
            .len()
            .checked_sub(32)
            .ok_or(StateError::Corrupt("too short"))?;
        let (body, sum) = bytes.split_at(body_len);
        if sha256(&[body]).as_slice() != sum {
            return Err(StateError::Corrupt("checksum"));
        }
        let mut r = Reader::new(body);
        if r.take_array::<4>("magic")? != *MAGIC {
            return Err(StateError::Corrupt("not a notice state file"));
        }
        if r.u8("version")? != VERSION {
            return Err(StateError::Corrupt("unknown version"));
        }
        if r.take_array::<KID_LEN>("ca kid")? != kid.0 {
            return Err(StateError::OtherCa);
        }
        let next_seq = r.u64("next seq")?;
        if next_seq == 0 {
            return Err(StateError::Corrupt("next seq 0"));
        }
        let mut state = FollowerState {
            next_seq,
            ..FollowerState::default()
        };
        for _ in 0..r.u32("topics")? {
            let topic = r.str("topic")?.to_owned();
            let payload = r.blob("payload")?.to_vec();
            state.topics.insert(topic, payload);
        }
        for _ in 0..r.u32("lists")? {
            let group = r.str("group")?.to_owned();
            let epoch = r.u32("epoch")?;
            state.lists.insert(group, epoch);
        }
        for _ in 0..r.u32("revoked")? {
            let serial = r.u64("serial")?;
            let device = r.str("device")?.to_owned();
            state.revoked.insert(serial, device);
        }
        r.finish("state file")?;
        Ok(state)
    }

    /// Reads `path`: `Ok(None)` if there is no file.
    ///
    /// # Errors
    /// [`StateError`]; the caller then reads the log from its start.
    pub(crate) fn load(path: &Path, kid: &CaKid) -> Result<Option<FollowerState>, StateError> {
        match std::fs::read(path) {
            Ok(bytes) => FollowerState::decode(&bytes, kid).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StateError::Read(e)),
        }
    }
}

fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Replaces `path` with `bytes` atomically: a temporary file beside it, written and synced, then
/// renamed over it, then the directory synced, so that a crash leaves the old or the new file.
///
/// # Errors
/// Any I/O error; the old file is then left as it was.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // A name of its own per write: a write left running by a stopped follower never shares
    // its temporary file with the next one (the later rename wins; both files are whole).
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let mut tmp = PathBuf::from(path);
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".{}.tmp", WRITES.fetch_add(1, Ordering::Relaxed)));
    tmp.set_file_name(name);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Best effort: some file systems cannot sync a directory.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn sample() -> FollowerState {
        let mut s = FollowerState {
            next_seq: 42,
            ..FollowerState::default()
        };
        s.topics.insert("quva/k/plant/temp/1".into(), vec![1, 2, 3]);
        s.topics.insert("quva/c/plant/temp".into(), vec![]);
        s.lists.insert("plant/temp".into(), 7);
        s.revoked.insert(5, "d1".into());
        s.revoked.insert(6, String::new());
        s
    }

    #[test]
    fn a_state_round_trips_for_its_ca_only() {
        let kid = CaKid([1; 8]);
        let bytes = sample().encode(&kid);
        assert_eq!(FollowerState::decode(&bytes, &kid).unwrap(), sample());
        assert!(matches!(
            FollowerState::decode(&bytes, &CaKid([2; 8])),
            Err(StateError::OtherCa)
        ));
    }

    #[test]
    fn every_altered_or_cut_file_is_refused_whole() {
        let kid = CaKid([1; 8]);
        let bytes = sample().encode(&kid);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            assert!(FollowerState::decode(&b, &kid).is_err(), "byte {i} flipped");
            assert!(
                FollowerState::decode(&bytes[..i], &kid).is_err(),
                "cut at {i}"
            );
        }
    }

    #[test]
    fn files_are_replaced_whole_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notices.state");
        let kid = CaKid([3; 8]);
        assert!(FollowerState::load(&path, &kid).unwrap().is_none());
        write_atomically(&path, &sample().encode(&kid)).unwrap();
        let mut next = sample();
        next.next_seq = 43;
        write_atomically(&path, &next.encode(&kid)).unwrap();
        assert_eq!(FollowerState::load(&path, &kid).unwrap(), Some(next));
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file left");
    }
}
