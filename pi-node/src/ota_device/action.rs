//! What the OTA agent asks its driver to do: the agent decides, the driver does the I/O.

use core::fmt;

use quva_client::ids::{DeviceId, GroupId};
use quva_client::ota::OtaState;
use zeroize::Zeroizing;

/// One chunk of the staging file to read back and check after a restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkSpan {
    /// The chunk index j.
    pub index: u32,
    /// Its offset in the image.
    pub offset: u64,
    /// Its plaintext length.
    pub len: u64,
}

/// How loud a [`OtaAction::Log`] line is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    /// Normal progress.
    Info,
    /// Something refused or failed.
    Warn,
}

/// An action for the driver, in the order given. File actions come before the status report
/// that depends on them (the version is recorded before `applied` is published).
#[non_exhaustive]
pub enum OtaAction {
    /// Subscribe to these topics (QoS 1): release manifests and key messages, or the next
    /// chunks to fetch (retained: subscribing fetches them).
    Subscribe(Vec<String>),
    /// Unsubscribe from these topics (a chunk that is stored).
    Unsubscribe(Vec<String>),
    /// Keep the verified manifest message and the accepted key message's M (a secret: K_c) of
    /// the group's release, so that a restart resumes without the key message.
    SaveRelease {
        /// The OTA group.
        group: GroupId,
        /// The signed manifest message.
        manifest: Vec<u8>,
        /// The accepted M (zeroized when dropped).
        key: Zeroizing<Vec<u8>>,
    },
    /// Create the group's staging file of `size` bytes, replacing any earlier one and its
    /// progress record.
    PrepareStaging {
        /// The OTA group.
        group: GroupId,
        /// The image size.
        size: u64,
    },
    /// Write `data` at `offset` of the staging file and fsync it, then replace the progress
    /// record with `progress` (atomically): the record never claims a chunk not on disk.
    StoreChunk {
        /// The OTA group.
        group: GroupId,
        /// The chunk index.
        index: u32,
        /// Where it goes.
        offset: u64,
        /// The decrypted chunk.
        data: Zeroizing<Vec<u8>>,
        /// A checkpoint, every [`CHECKPOINT_CHUNKS`](super::CHECKPOINT_CHUNKS) chunks and at the
        /// last: sync the staging file, then save this progress record
        /// ([`quva_client::ota::Download::progress`]), which claims only chunks written before.
        progress: Option<Vec<u8>>,
    },
    /// Replace the progress record (after a resumption found fewer chunks intact than it
    /// claimed).
    SaveProgress {
        /// The OTA group.
        group: GroupId,
        /// The progress record.
        progress: Vec<u8>,
    },
    /// Read these chunks back from the staging file and hand each to
    /// [`OtaAgent::on_staged_chunk`](super::OtaAgent::on_staged_chunk), then call
    /// [`OtaAgent::on_staged_checked`](super::OtaAgent::on_staged_checked).
    CheckStaged {
        /// The OTA group.
        group: GroupId,
        /// The release version.
        version: u64,
        /// The chunks the progress record claims.
        chunks: Vec<ChunkSpan>,
    },
    /// Every chunk is stored: fsync the staging file, hash it and hand the digest to
    /// [`OtaAgent::on_image_digest`](super::OtaAgent::on_image_digest).
    HashImage {
        /// The OTA group.
        group: GroupId,
        /// The release version.
        version: u64,
    },
    /// Run the apply command on the verified staging file and hand the result to
    /// [`OtaAgent::on_apply_result`](super::OtaAgent::on_apply_result).
    Apply {
        /// The OTA group.
        group: GroupId,
        /// The release version.
        version: u64,
        /// The image name from the key message.
        name: String,
    },
    /// Record `version` as the group's installed version (durably) before anything else.
    RecordInstalled {
        /// The OTA group.
        group: GroupId,
        /// The version now installed.
        version: u64,
        /// The signer of that release.
        signer: DeviceId,
    },
    /// Delete the group's staging file, progress record and saved release.
    Discard {
        /// The OTA group.
        group: GroupId,
    },
    /// Publish this sealed status report (option-2 query on `<group>/_q`, QoS 1, not
    /// retained).
    Publish {
        /// The topic.
        topic: String,
        /// The payload.
        payload: Vec<u8>,
    },
    /// A state was reported (the [`OtaAction::Publish`] of the report follows), for a line on the
    /// daemon's output.
    Status {
        /// The OTA group.
        group: GroupId,
        /// The release version.
        version: u64,
        /// The state.
        state: OtaState,
        /// The detail sent with it.
        detail: String,
    },
    /// A download's progress, for a progress line.
    Progress {
        /// The OTA group.
        group: GroupId,
        /// The release version.
        version: u64,
        /// Chunks stored.
        stored: u32,
        /// Chunks in the release.
        total: u32,
    },
    /// A line for the log (never a key or a payload).
    Log {
        /// How loud.
        level: LogLevel,
        /// The text.
        message: String,
    },
}

impl fmt::Debug for OtaAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OtaAction::Subscribe(t) => f.debug_tuple("Subscribe").field(t).finish(),
            OtaAction::Unsubscribe(t) => f.debug_tuple("Unsubscribe").field(t).finish(),
            OtaAction::SaveRelease { group, .. } => f
                .debug_struct("SaveRelease")
                .field("group", group)
                .finish_non_exhaustive(),
            OtaAction::PrepareStaging { group, size } => f
                .debug_struct("PrepareStaging")
                .field("group", group)
                .field("size", size)
                .finish(),
            OtaAction::StoreChunk {
                group,
                index,
                offset,
                data,
                ..
            } => f
                .debug_struct("StoreChunk")
                .field("group", group)
                .field("index", index)
                .field("offset", offset)
                .field("len", &data.len())
                .finish_non_exhaustive(),
            OtaAction::SaveProgress { group, .. } => f
                .debug_struct("SaveProgress")
                .field("group", group)
                .finish_non_exhaustive(),
            OtaAction::CheckStaged {
                group,
                version,
                chunks,
            } => f
                .debug_struct("CheckStaged")
                .field("group", group)
                .field("version", version)
                .field("chunks", &chunks.len())
                .finish(),
            OtaAction::HashImage { group, version } => f
                .debug_struct("HashImage")
                .field("group", group)
                .field("version", version)
                .finish(),
            OtaAction::Apply {
                group,
                version,
                name,
            } => f
                .debug_struct("Apply")
                .field("group", group)
                .field("version", version)
                .field("name", name)
                .finish(),
            OtaAction::RecordInstalled {
                group,
                version,
                signer,
            } => f
                .debug_struct("RecordInstalled")
                .field("group", group)
                .field("version", version)
                .field("signer", signer)
                .finish(),
            OtaAction::Discard { group } => {
                f.debug_struct("Discard").field("group", group).finish()
            }
            OtaAction::Publish { topic, payload } => f
                .debug_struct("Publish")
                .field("topic", topic)
                .field("len", &payload.len())
                .finish(),
            OtaAction::Status {
                group,
                version,
                state,
                detail,
            } => f
                .debug_struct("Status")
                .field("group", group)
                .field("version", version)
                .field("state", state)
                .field("detail", detail)
                .finish(),
            OtaAction::Progress {
                group,
                version,
                stored,
                total,
            } => f
                .debug_struct("Progress")
                .field("group", group)
                .field("version", version)
                .field("stored", stored)
                .field("total", total)
                .finish(),
            OtaAction::Log { level, message } => f
                .debug_struct("Log")
                .field("level", level)
                .field("message", message)
                .finish(),
        }
    }
}
