//! The life of an enrollment secret and of a device's certificates: when a secret may be used,
//! which certificate a new one supersedes, and what the first use of a certificate changes.
//!
//! Implements the rules of PROTOCOL.md §3 (v1.1), written out in docs/protocol.md §4.6:
//!
//! - the enrollment secret is spent by the first *use* of a certificate (a `quva-cert-v1`
//!   connection reported by the bridge, a renewal, or a group-key request), not by the issue, so
//!   that a lost reply does not lock the device out;
//! - until then a new request (fresh nonce) gets a new certificate that supersedes the unused
//!   one, which is revoked at once;
//! - a secret expires (by default 7 days after it was issued);
//! - the first use of a certificate revokes the device's previous one.
//!
//! A device row therefore holds at most two live certificates: the one in use (`serial`, whose
//! first use the CA has seen) and the latest issued one that is not used yet (`pending_serial`).
//! The functions here decide; the engine reads the rows, writes the changes in one synced batch
//! and answers.
//!
//! # Usage
//! ```
//! use quva_ca::enrollment::{CertUse, classify_use, record_first_use, record_issue};
//! use quva_ca::store::DeviceRecord;
//!
//! let mut dev = DeviceRecord::default();
//! dev.enroll_secret = vec![7; 32];
//! assert_eq!(record_issue(&mut dev, 1), None); // the reply is lost
//! assert_eq!(record_issue(&mut dev, 2), Some(1)); // the retry supersedes serial 1
//! assert_eq!(classify_use(&dev, 1), None);
//! assert_eq!(classify_use(&dev, 2), Some(CertUse::First));
//! let used = record_first_use(&mut dev, 2);
//! assert!(used.secret_spent && dev.enroll_secret.is_empty());
//! assert_eq!(classify_use(&dev, 2), Some(CertUse::InUse));
//! ```

use quva_client::enrollment::{ENROLLMENT_SECRET_LEN, EnrollmentSecret};

use crate::store::DeviceRecord;

/// Default lifetime of an enrollment secret: 7 days (PROTOCOL.md §3).
pub const DEFAULT_SECRET_VALIDITY_MS: u64 = 7 * 24 * 3600 * 1000;

/// Why an enrollment request cannot be checked against the device's secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// No secret is outstanding: never issued, spent by a first use, or wiped by a revocation.
    #[error("no enrollment secret")]
    Missing,
    /// The secret is older than its lifetime.
    #[error("enrollment secret expired")]
    Expired,
}

impl SecretError {
    /// The reason for logs and the audit log.
    pub fn reason(self) -> &'static str {
        match self {
            SecretError::Missing => "no enrollment secret",
            SecretError::Expired => "enrollment secret expired",
        }
    }
}

/// When the device's outstanding secret expires, Unix ms (inclusive). Rows written before
/// secrets expired carry 0: their secret lives `default_validity_ms` from the registration.
pub fn secret_expiry(dev: &DeviceRecord, default_validity_ms: u64) -> u64 {
    if dev.secret_expires_ms != 0 {
        dev.secret_expires_ms
    } else {
        dev.registered_ms.saturating_add(default_validity_ms)
    }
}

/// The device's enrollment secret if one is outstanding and not expired at `now_ms`.
///
/// # Errors
/// [`SecretError::Missing`] or [`SecretError::Expired`].
pub fn usable_secret(
    dev: &DeviceRecord,
    now_ms: u64,
    default_validity_ms: u64,
) -> Result<EnrollmentSecret, SecretError> {
    let bytes: &[u8; ENROLLMENT_SECRET_LEN] = dev
        .enroll_secret
        .as_slice()
        .try_into()
        .map_err(|_| SecretError::Missing)?;
    if now_ms > secret_expiry(dev, default_validity_ms) {
        return Err(SecretError::Expired);
    }
    Ok(EnrollmentSecret::from_bytes(bytes))
}

/// What a proof made with the certificate `serial` means for its device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertUse {
    /// The certificate in use: nothing changes.
    InUse,
    /// The pending certificate's first use: apply [`record_first_use`].
    First,
}

/// Whether a proof with certificate `serial` may be accepted for `dev`, and what it means. `None`
/// for a superseded, unknown or another device's certificate (revocation and validity of the
/// certificate itself are the caller's checks).
pub fn classify_use(dev: &DeviceRecord, serial: u64) -> Option<CertUse> {
    if serial == 0 {
        None
    } else if serial == dev.pending_serial {
        Some(CertUse::First)
    } else if serial == dev.serial {
        Some(CertUse::InUse)
    } else {
        None
    }
}

/// The certificates a signature of the device may be checked against, in this order: the
/// pending one (its use is the first), then the one in use. Zero serials are left out.
pub fn live_serials(dev: &DeviceRecord) -> impl Iterator<Item = u64> {
    [dev.pending_serial, dev.serial]
        .into_iter()
        .filter(|s| *s != 0)
}

/// Records that certificate `serial` was issued to `dev` and is not used yet. Returns the unused
/// certificate it supersedes, which the caller revokes in the same batch. The secret and the
/// certificate in use stay as they are.
pub fn record_issue(dev: &mut DeviceRecord, serial: u64) -> Option<u64> {
    let superseded = std::mem::replace(&mut dev.pending_serial, serial);
    (superseded != 0 && superseded != serial).then_some(superseded)
}

/// What a first use changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FirstUse {
    /// The certificate used until now, which the caller revokes in the same batch.
    pub revoked: Option<u64>,
    /// Whether an outstanding enrollment secret was spent.
    pub secret_spent: bool,
}

/// Records the first use of the pending certificate: it becomes the certificate in use, the
/// previous one is to be revoked, and any outstanding enrollment secret is spent (wiped). Call
/// only after [`classify_use`] returned [`CertUse::First`].
pub fn record_first_use(dev: &mut DeviceRecord, serial: u64) -> FirstUse {
    let previous = std::mem::replace(&mut dev.serial, serial);
    dev.pending_serial = 0;
    let secret_spent = !dev.enroll_secret.is_empty();
    zeroize::Zeroize::zeroize(&mut dev.enroll_secret);
    dev.enroll_secret = Vec::new();
    dev.secret_expires_ms = 0;
    FirstUse {
        revoked: (previous != 0 && previous != serial).then_some(previous),
        secret_spent,
    }
}

/// Records a new enrollment secret issued at `now_ms` that lives `validity_ms`.
pub fn record_secret(
    dev: &mut DeviceRecord,
    secret: &EnrollmentSecret,
    now_ms: u64,
    validity_ms: u64,
) {
    dev.enroll_secret = secret.as_bytes().to_vec();
    dev.secret_expires_ms = now_ms.saturating_add(validity_ms).max(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 24 * 3600 * 1000;

    fn registered(now: u64) -> DeviceRecord {
        let mut dev = DeviceRecord::default();
        dev.registered_ms = now;
        record_secret(
            &mut dev,
            &EnrollmentSecret::from_bytes(&[9; 32]),
            now,
            DEFAULT_SECRET_VALIDITY_MS,
        );
        dev
    }

    #[test]
    fn a_secret_is_usable_until_its_expiry_inclusive() {
        let dev = registered(1_000);
        assert!(usable_secret(&dev, 1_000 + 7 * DAY, DEFAULT_SECRET_VALIDITY_MS).is_ok());
        assert_eq!(
            usable_secret(&dev, 1_001 + 7 * DAY, DEFAULT_SECRET_VALIDITY_MS).err(),
            Some(SecretError::Expired)
        );
    }

    #[test]
    fn a_per_device_lifetime_overrides_the_default() {
        let mut dev = DeviceRecord::default();
        record_secret(&mut dev, &EnrollmentSecret::from_bytes(&[9; 32]), 0, DAY);
        assert!(usable_secret(&dev, DAY, DEFAULT_SECRET_VALIDITY_MS).is_ok());
        assert_eq!(
            usable_secret(&dev, DAY + 1, DEFAULT_SECRET_VALIDITY_MS).err(),
            Some(SecretError::Expired)
        );
    }

    #[test]
    fn rows_without_an_expiry_use_the_registration_time() {
        let mut dev = DeviceRecord::default();
        dev.registered_ms = 5;
        dev.enroll_secret = vec![1; 32];
        assert_eq!(secret_expiry(&dev, 10), 15);
        assert!(usable_secret(&dev, 15, 10).is_ok());
        assert_eq!(
            usable_secret(&dev, 16, 10).err(),
            Some(SecretError::Expired)
        );
    }

    #[test]
    fn a_missing_or_malformed_secret_is_missing() {
        let mut dev = DeviceRecord::default();
        assert_eq!(
            usable_secret(&dev, 0, DAY).err(),
            Some(SecretError::Missing)
        );
        dev.enroll_secret = vec![1; 31];
        assert_eq!(
            usable_secret(&dev, 0, DAY).err(),
            Some(SecretError::Missing)
        );
    }

    #[test]
    fn retries_before_the_first_use_supersede_the_unused_certificate() {
        let mut dev = registered(0);
        assert_eq!(record_issue(&mut dev, 1), None);
        assert_eq!(record_issue(&mut dev, 2), Some(1));
        assert_eq!(record_issue(&mut dev, 3), Some(2));
        assert!(
            usable_secret(&dev, 0, DAY).is_ok(),
            "issue does not spend the secret"
        );
        for old in [1, 2] {
            assert_eq!(classify_use(&dev, old), None, "serial {old}");
        }
        assert_eq!(classify_use(&dev, 3), Some(CertUse::First));
        assert_eq!(live_serials(&dev).collect::<Vec<_>>(), vec![3]);
    }

    #[test]
    fn the_first_use_spends_the_secret_and_is_the_only_first() {
        let mut dev = registered(0);
        record_issue(&mut dev, 4);
        let used = record_first_use(&mut dev, 4);
        assert_eq!(
            used,
            FirstUse {
                revoked: None,
                secret_spent: true
            }
        );
        assert_eq!(
            usable_secret(&dev, 0, DAY).err(),
            Some(SecretError::Missing)
        );
        assert_eq!(classify_use(&dev, 4), Some(CertUse::InUse));
        assert_eq!(dev.pending_serial, 0);
    }

    #[test]
    fn the_first_use_of_a_renewed_certificate_revokes_the_previous_one() {
        let mut dev = registered(0);
        record_issue(&mut dev, 1);
        record_first_use(&mut dev, 1);
        // Renewal: the old certificate stays in use until the new one is used.
        assert_eq!(record_issue(&mut dev, 2), None);
        assert_eq!(classify_use(&dev, 1), Some(CertUse::InUse));
        assert_eq!(live_serials(&dev).collect::<Vec<_>>(), vec![2, 1]);
        // A repeated renewal before that use supersedes the unused one.
        assert_eq!(record_issue(&mut dev, 3), Some(2));
        assert_eq!(classify_use(&dev, 2), None);
        let used = record_first_use(&mut dev, 3);
        assert_eq!(
            used,
            FirstUse {
                revoked: Some(1),
                secret_spent: false
            }
        );
        assert_eq!(classify_use(&dev, 1), None);
        assert_eq!(live_serials(&dev).collect::<Vec<_>>(), vec![3]);
    }

    #[test]
    fn serial_zero_is_never_a_certificate() {
        let dev = DeviceRecord::default();
        assert_eq!(classify_use(&dev, 0), None);
        assert_eq!(live_serials(&dev).count(), 0);
    }
}
