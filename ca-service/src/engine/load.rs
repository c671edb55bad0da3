//! Start-up: rebuilds the counters and every group state from the store and checks that each
//! stored share and group state verifies under the CA key.

use std::collections::BTreeMap;

use quva_client::curve::{KeyPair, Point, SecretScalar};
use quva_client::group::{JoinedMember, Member};
use quva_client::ids::GroupId;
use quva_client::rekey::GroupState;
use zeroize::Zeroizing;

use crate::engine::state::{JoinedCert, Live};
use crate::error::CaError;
use crate::store::{CaStore, MetaRecord, Tables, member_ids};

/// The groups of the core, by ID.
pub(crate) type Groups<T> = BTreeMap<GroupId, Live<T>>;

/// Reads the counters and every group state; `now` dates a fresh store.
///
/// # Errors
/// [`CaError::Store`] if the store cannot be read; [`CaError::Crypto`] if a stored share or
/// group state does not verify under `ca` (wrong key or corrupt data).
pub(crate) fn load<T>(
    store: &dyn CaStore,
    ca: &KeyPair,
    now: u64,
) -> Result<(MetaRecord, Groups<T>), CaError> {
    let mut meta = store.meta()?;
    if meta.created_ms == 0 {
        meta.created_ms = now;
    }
    meta.next_serial = meta.next_serial.max(1);
    meta.next_notice_seq = meta.next_notice_seq.max(1);
    meta.next_audit_seq = meta.next_audit_seq.max(1);
    let mut groups = BTreeMap::new();
    for rec in store.groups()? {
        let id = GroupId::new(&rec.id).map_err(|_| CaError::Crypto("stored group id"))?;
        let mut members = Vec::new();
        let mut joined = BTreeMap::new();
        let nodes = store.tree_nodes(&id)?;
        for row in store.members(&id)? {
            if !row.joined() {
                continue;
            }
            let (device, role) = member_ids(&row)?;
            let cert = store
                .cert(row.serial)?
                .ok_or(CaError::Crypto("member certificate missing"))?;
            let member = Member {
                id: device.clone(),
                role,
                q: Point::from_bytes(&cert.public_key).ok_or(CaError::Crypto("stored Q_i"))?,
                g: Point::from_bytes(&cert.share_point).ok_or(CaError::Crypto("stored G_i"))?,
            };
            let bytes = Zeroizing::new(
                <[u8; 32]>::try_from(row.share.as_slice())
                    .map_err(|_| CaError::Crypto("stored share"))?,
            );
            let share =
                SecretScalar::from_bytes(&bytes).map_err(|_| CaError::Crypto("stored share"))?;
            let share = JoinedMember::new(member, share).map_err(|_| {
                tracing::error!(group = %id, device = %device, "stored share does not match");
                CaError::Crypto("stored share")
            })?;
            members.push((share, row.leaf));
            joined.insert(
                (role, device),
                JoinedCert {
                    serial: row.serial,
                    not_after_ms: cert.not_after_ms,
                },
            );
        }
        let state = GroupState::from_record(ca, &rec.state, members, nodes).map_err(|e| {
            tracing::error!(group = %id, error = %e, "stored group state does not verify");
            CaError::Crypto("stored group state")
        })?;
        let mut settings = rec;
        settings.state = Vec::new();
        groups.insert(
            id,
            Live {
                settings,
                state,
                pending: None,
                joined,
                checked: false,
            },
        );
    }
    Ok((meta, groups))
}
