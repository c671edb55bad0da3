//! Measures a group OTA release of PROTOCOL.md §7.2 in process: the signer's CPU to release an
//! image (chunk, encrypt, hash, sign the manifest, seal the key message), the bytes it deposits on
//! the broker against the image size, and a device's CPU to verify the manifest, open the key
//! message, check and decrypt every chunk and check H(image). Also one direct message (§7.1).
//!
//! `cargo run --release -p quva-client --example ota-cost -- [image bytes] [chunk bytes] [runs]`
//! (defaults: 1 MiB, 64 KiB, 20 runs; the median of the runs is printed).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use quva_client::curve::KeyPair;
use quva_client::direct::{DirectFloor, DirectSealer, UnverifiedDirect};
use quva_client::enrollment::{Credentials, EnrollmentSecret, PendingEnrollment};
use quva_client::group::{GroupKeys, JoinedMember, Privacy, SignedGroupInfo};
use quva_client::ids::{DeviceId, Epoch, GroupId, GroupKeyKind, Role};
use quva_client::members::MemberList;
use quva_client::message::{
    Direction, Directory, GroupLookupError, GroupPublicKeys, HeldKeys, Policy, Sealer,
    UnverifiedMessage,
};
use quva_client::ota::{Download, ImageDigest, OtaPolicy, ReleaseSigner, UnverifiedManifest};
use quva_client::schnorr::VerifyingKey;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

const NOW: u64 = 1_800_000_000_000;

fn enroll(ca: &KeyPair, name: &str, serial: u64, rng: &mut ChaCha20Rng) -> Credentials {
    let secret = EnrollmentSecret::random(rng);
    let pending = PendingEnrollment::new(DeviceId::new(name).unwrap(), NOW, rng);
    let response = pending
        .enroll_request(&secret)
        .verify(&secret, NOW, 60_000)
        .unwrap()
        .issue(ca, serial, NOW - 1, NOW + 86_400_000, rng)
        .unwrap();
    pending.accept(&response, ca.public()).unwrap()
}

/// The device's view of the OTA group at one epoch.
struct View {
    group: GroupId,
    keys: GroupKeys,
    list: MemberList,
}

impl Directory for View {
    fn group_keys(
        &self,
        g: &GroupId,
        e: Epoch,
        _: u64,
    ) -> Result<GroupPublicKeys, GroupLookupError> {
        if *g != self.group || e != self.list.epoch() {
            return Err(GroupLookupError::WrongEpoch);
        }
        Ok(GroupPublicKeys {
            q_p: *self.keys.key(GroupKeyKind::P).public(),
            q_s: *self.keys.key(GroupKeyKind::S).public(),
        })
    }
    fn device_key(&self, id: &DeviceId) -> Option<VerifyingKey> {
        self.list.key_of(id, NOW)
    }
    fn is_member(&self, g: &GroupId, _: Epoch, id: &DeviceId, role: Role) -> bool {
        *g == self.group && self.list.contains(id, role)
    }
}

impl HeldKeys for View {
    fn group_secret(&self, g: &GroupId, _: Epoch, kind: GroupKeyKind) -> Option<&KeyPair> {
        (*g == self.group && kind == GroupKeyKind::P).then(|| self.keys.key(kind))
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let size = *args.first().unwrap_or(&(1 << 20)) as usize;
    let chunk = *args.get(1).unwrap_or(&(64 * 1024)) as u32;
    let runs = *args.get(2).unwrap_or(&20) as usize;

    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let ca = KeyPair::random(&mut rng);
    let signer = enroll(&ca, "release-1", 1, &mut rng);
    let device = enroll(&ca, "dev-1", 2, &mut rng);
    let group = GroupId::new("fw/sensor-v2").unwrap();
    let joined = [
        JoinedMember::from_keys(
            signer.id().clone(),
            Role::Publisher,
            signer.key().secret(),
            signer.group_secret(),
        )
        .unwrap(),
        JoinedMember::from_keys(
            device.id().clone(),
            Role::Subscriber,
            device.key().secret(),
            device.group_secret(),
        )
        .unwrap(),
    ];
    let keys = GroupKeys::derive(&ca, &group, Epoch(1), Privacy::Standard, &joined).unwrap();
    let signed = SignedGroupInfo::sign(&ca, keys.group_info().clone(), &mut rng).unwrap();
    let list_bytes = MemberList::encode(
        &signed,
        &[
            (Role::Publisher, signer.cert()),
            (Role::Subscriber, device.cert()),
        ],
    );
    let list = MemberList::verify(&list_bytes, ca.public(), &group).unwrap();
    let view = View {
        group: group.clone(),
        keys,
        list,
    };

    let mut image = vec![0u8; size];
    rng.fill_bytes(&mut image);
    let release_signer = ReleaseSigner {
        group: &group,
        key: signer.key(),
        cert: signer.cert(),
    };
    let sealer = Sealer {
        group: &group,
        epoch: Epoch(1),
        direction: Direction::Forward,
        sender: signer.id(),
        key: signer.key(),
    };
    let q_p = *view.keys.key(GroupKeyKind::P).public();
    let pins = [signer.id().clone()];

    let (mut sign_t, mut device_t) = (Vec::new(), Vec::new());
    let mut published = (0usize, 0usize, 0usize, 0usize);
    for run in 0..=runs {
        // Signer: release + key message.
        let t0 = Instant::now();
        let release = release_signer
            .release(1, "sensor-fw-1.bin", &image, chunk, NOW, &mut rng)
            .unwrap();
        let key_wire = release
            .key_message()
            .seal(&sealer, &q_p, NOW, &mut rng)
            .unwrap();
        let t1 = Instant::now();
        // Device: manifest, key message, every chunk, H(image).
        let man = UnverifiedManifest::decode(release.manifest_message())
            .unwrap()
            .verify(
                &group,
                &pins,
                Some(0),
                ca.public(),
                &view.list,
                &OtaPolicy::default(),
                NOW,
            )
            .unwrap();
        let msg = UnverifiedMessage::decode(&key_wire)
            .unwrap()
            .verify_without_window(&view, &view, &Policy::default(), NOW)
            .unwrap();
        let key = man.accept_key_message(&msg).unwrap();
        let mut download = Download::new(man, key).unwrap();
        let mut staging = vec![0u8; size];
        for (j, ct) in release.chunks().iter().enumerate() {
            let c = download.open_chunk(j as u32, ct).unwrap();
            let at = c.offset() as usize;
            staging[at..at + c.plaintext().len()].copy_from_slice(c.plaintext());
            download.mark_stored(j as u32).unwrap();
        }
        let mut digest = ImageDigest::new();
        digest.update(&staging);
        black_box(download.finish(&digest.finalize()).unwrap());
        let t2 = Instant::now();
        if run > 0 {
            sign_t.push(t1 - t0);
            device_t.push(t2 - t1);
        }
        published = (
            release.manifest_message().len(),
            release.chunks().iter().map(Vec::len).sum(),
            key_wire.len(),
            release.chunks().len(),
        );
    }

    let (man_len, chunks_len, key_len, n) = published;
    let total = man_len + chunks_len + key_len;
    println!("image {size} bytes, chunk size {chunk}, {n} chunks, {runs} runs (median)");
    println!(
        "signer: release + key message        {}",
        ms(median(sign_t))
    );
    println!(
        "device: verify, decrypt, H(image)    {}",
        ms(median(device_t))
    );
    println!("published: manifest {man_len} B, chunks {chunks_len} B, key message {key_len} B");
    println!(
        "published total {total} B = image + {} B ({:.3}% overhead)",
        total - size,
        100.0 * (total - size) as f64 / size as f64
    );

    // One direct message of 100 bytes, sealed by the signer and opened by the device.
    let lists = vec![view.list.clone()];
    let m = [0x42u8; 100];
    let (mut seal_t, mut open_t) = (Vec::new(), Vec::new());
    let mut wire_len = 0;
    for i in 0..=runs * 10 {
        let t0 = Instant::now();
        let wire = DirectSealer {
            key: signer.key(),
            cert: signer.cert(),
        }
        .seal(
            device.id(),
            device.key().public(),
            NOW + i as u64,
            &m,
            &mut rng,
        )
        .unwrap();
        let t1 = Instant::now();
        let opened = UnverifiedDirect::decode(&wire)
            .unwrap()
            .open(
                device.id(),
                device.key(),
                ca.public(),
                &lists,
                DirectFloor::NONE,
                NOW,
            )
            .unwrap()
            .commit();
        let t2 = Instant::now();
        black_box(opened);
        if i > 0 {
            seal_t.push(t1 - t0);
            open_t.push(t2 - t1);
        }
        wire_len = wire.len();
    }
    println!(
        "direct message, 100 B payload: {wire_len} B on the wire, seal {}, open {}",
        ms(median(seal_t)),
        ms(median(open_t))
    );
}
