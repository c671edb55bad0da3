//! The owner's administration: registering devices (and re-issuing their secrets) and
//! creating groups.

use std::collections::BTreeMap;

use quva_client::codec::Encode;
use quva_client::enrollment::EnrollmentSecret;
use quva_client::group::Privacy;
use quva_client::ids::{DeviceId, Epoch, GroupId};
use quva_client::rekey::GroupState;
use quva_proto::v1::{Notice, NoticeKind};
use rand_core::CryptoRngCore;
use zeroize::Zeroizing;

use crate::audit_kind::AuditKind;
use crate::engine::audit::{Actor, RekeyReason, entry};
use crate::engine::command::Registered;
use crate::engine::core::CaCore;
use crate::engine::errors::rekey_err;
use crate::engine::state::Live;
use crate::enrollment;
use crate::error::CaError;
use crate::store::{DeviceRecord, DeviceState, EpochRecord, GroupRecord, Tables};

impl<T> CaCore<T> {
    pub(crate) fn register(
        &mut self,
        id: &DeviceId,
        note: String,
        reissue: bool,
        secret_validity_ms: u64,
        now: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Registered, CaError> {
        let existing = self.store.device(id)?;
        let mut dev = match (existing, reissue) {
            (Some(_), false) => return Err(CaError::AlreadyExists("device")),
            (None, true) => return Err(CaError::NotFound("device")),
            (Some(d), true) if d.is_revoked() => {
                return Err(CaError::FailedPrecondition("device is revoked"));
            }
            (Some(d), true) => d,
            (None, false) => {
                let mut d = DeviceRecord::default();
                d.id = id.as_str().to_owned();
                d.set_device_state(DeviceState::Registered);
                d.registered_ms = now;
                d
            }
        };
        if !note.is_empty() || !reissue {
            dev.note = note;
        }
        let secret = EnrollmentSecret::random(rng);
        let validity = if secret_validity_ms == 0 {
            self.cfg.secret_validity_ms
        } else {
            secret_validity_ms
        };
        enrollment::record_secret(&mut dev, &secret, now, validity);
        let mut tx = self.begin(now);
        tx.batch.put_device(&dev)?;
        let kind = if reissue {
            AuditKind::DeviceReissue
        } else {
            AuditKind::DeviceRegister
        };
        tx.audit(entry(
            kind,
            Actor::Admin,
            id.as_str(),
            "",
            "ok",
            String::new(),
        ));
        self.commit(tx)?;
        tracing::info!(device = %id, reissue, "device registered");
        Ok(Registered {
            device: dev,
            secret: Zeroizing::new(hex::encode(secret.as_bytes())),
        })
    }

    pub(crate) fn create_group(
        &mut self,
        id: &GroupId,
        privacy: Privacy,
        interval_secs: u64,
        now: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<GroupRecord, CaError> {
        if self.groups.contains_key(id) || self.store.group(id)?.is_some() {
            return Err(CaError::AlreadyExists("group"));
        }
        let state = GroupState::create(&self.ca, id.clone(), privacy, Epoch(0), now, rng)
            .map_err(rekey_err)?;
        let rec = GroupRecord {
            id: id.as_str().to_owned(),
            privacy: u32::from(privacy.to_u8()),
            rekey_interval_secs: interval_secs,
            created_ms: now,
            epoch: 0,
            epoch_started_ms: now,
            state: state.to_record(),
        };
        let mut tx = self.begin(now);
        tx.batch.put_group(&rec)?;
        let seq = tx.notice(Notice {
            kind: NoticeKind::GroupUpdated as i32,
            group: rec.id.clone(),
            epoch: 0,
            ..Default::default()
        });
        tx.batch.put_epoch(
            id,
            &EpochRecord {
                epoch: 0,
                started_ms: now,
                signed_ginfo: state.signed_info().to_bytes(),
                joined: Vec::new(),
                departed: Vec::new(),
                reason: RekeyReason::Create.as_str().into(),
                last_notice_seq: seq,
            },
        );
        tx.audit(entry(
            AuditKind::GroupCreate,
            Actor::Admin,
            "",
            id.as_str(),
            "ok",
            format!(
                "privacy {}, rekey interval {interval_secs}s",
                privacy.to_u8()
            ),
        ));
        self.commit(tx)?;
        let mut settings = rec.clone();
        settings.state = Vec::new();
        self.groups.insert(
            id.clone(),
            Live {
                settings,
                state,
                pending: None,
                joined: BTreeMap::new(),
                checked: true,
            },
        );
        tracing::info!(group = %id, "group created");
        Ok(rec)
    }
}
