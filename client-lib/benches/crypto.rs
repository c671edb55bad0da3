//! Costs of the Quva v1 primitives and protocol steps, with libsecp256k1 as the speed anchor.
//!
//! Run: `cargo bench -p quva-client --bench crypto`; results and ratios live in docs/benchmarks.md.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use quva_client::codec::{Decode, Encode};
use quva_client::curve::{KeyPair, SecretScalar};
use quva_client::ecies;
use quva_client::enrollment::{EnrollRequest, EnrollmentSecret, PendingEnrollment};
use quva_client::group::{GroupKeys, JoinedMember, Privacy};
use quva_client::ids::{DeviceId, Epoch, GroupId, GroupKeyKind, Role};
use quva_client::message::{
    Direction, Directory, GroupLookupError, GroupPublicKeys, HeldKeys, Policy, Sealer,
    UnverifiedMessage,
};
use quva_client::rekey::{Change, GroupState, Plan};
use quva_client::replay::ReplayCache;
use quva_client::schnorr::{BatchItem, VerifyingKey, verify_batch};
use quva_client::testkit::signed_batch;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use std::hint::black_box;

const TAG: &str = "quva/v1/msg1";

fn schnorr(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let key = KeyPair::random(&mut rng);
    let body = [7u8; 100];
    let sig = key.sign(TAG, &body, &mut rng).unwrap();
    let vk = key.verifying_key();
    let mut g = c.benchmark_group("schnorr");
    g.bench_function("sign", |b| {
        b.iter(|| key.sign(TAG, black_box(&body), &mut rng).unwrap())
    });
    g.bench_function("verify", |b| {
        b.iter(|| vk.verify(TAG, black_box(&body), &sig).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("schnorr_batch_verify");
    for n in [8usize, 64, 256] {
        let sigs = signed_batch(n, TAG, &mut rng);
        let items: Vec<BatchItem<'_>> = sigs
            .iter()
            .map(|(k, body, s)| BatchItem {
                key: k,
                tag: TAG,
                body,
                signature: s,
            })
            .collect();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &items, |b, items| {
            b.iter(|| assert!(verify_batch(items, &mut rng).iter().all(|&ok| ok)))
        });
    }
    g.finish();
}

fn libsecp256k1_anchor(c: &mut Criterion) {
    use secp256k1::{Keypair, Message, Secp256k1, SecretKey};
    let secp = Secp256k1::new();
    let sk = SecretKey::from_byte_array([0x42; 32]).unwrap();
    let pk = sk.public_key(&secp);
    let digest = [9u8; 32];
    let msg = Message::from_digest(digest);
    let ecdsa = secp.sign_ecdsa(msg, &sk);
    let kp = Keypair::from_secret_key(&secp, &sk);
    let (xonly, _) = kp.x_only_public_key();
    let bip340 = secp.sign_schnorr_no_aux_rand(&digest, &kp);
    let mut g = c.benchmark_group("libsecp256k1");
    g.bench_function("ecdsa_verify", |b| {
        b.iter(|| secp.verify_ecdsa(black_box(msg), &ecdsa, &pk).unwrap())
    });
    g.bench_function("bip340_verify", |b| {
        b.iter(|| {
            secp.verify_schnorr(&bip340, black_box(&digest), &xonly)
                .unwrap()
        })
    });
    g.finish();
}

fn ecies_bench(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let bob = KeyPair::random(&mut rng);
    let m = [1u8; 32];
    let ct = ecies::seal(bob.public(), b"quva/v1/gk", &m, &mut rng);
    let mut g = c.benchmark_group("ecies");
    g.bench_function("seal_32B", |b| {
        b.iter(|| ecies::seal(bob.public(), b"quva/v1/gk", black_box(&m), &mut rng))
    });
    g.bench_function("open_32B", |b| {
        b.iter(|| ecies::open(&bob, b"quva/v1/gk", black_box(&ct)).unwrap())
    });
    g.finish();
}

const NOW: u64 = 1_795_000_000_000;

fn ecqv(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    let ca = KeyPair::random(&mut rng);
    let secret = EnrollmentSecret::random(&mut rng);
    let id = DeviceId::new("sensor-01").unwrap();
    let pending = PendingEnrollment::new(id, NOW, &mut rng);
    let request = EnrollRequest::from_bytes(&pending.enroll_request(&secret).to_bytes()).unwrap();
    let verified = request.verify(&secret, NOW, 60_000).unwrap();
    let response = verified
        .issue(&ca, 1, NOW, NOW + 86_400_000, &mut rng)
        .unwrap();
    let mut g = c.benchmark_group("ecqv");
    g.bench_function("issue", |b| {
        b.iter(|| {
            verified
                .issue(&ca, 1, NOW, NOW + 86_400_000, &mut rng)
                .unwrap()
        })
    });
    g.bench_function("accept", |b| {
        b.iter(|| pending.accept(black_box(&response), ca.public()).unwrap())
    });
    g.bench_function("open", |b| {
        b.iter(|| black_box(&response.cert).open(ca.public()).unwrap())
    });
    g.finish();
}

/// One group, one publisher and one subscriber, as a receiving device sees it.
struct World {
    group: GroupId,
    publisher: DeviceId,
    pub_key: KeyPair,
    d_p: KeyPair,
    d_s: KeyPair,
}

impl Directory for World {
    fn group_keys(
        &self,
        group: &GroupId,
        epoch: Epoch,
        _now: u64,
    ) -> Result<GroupPublicKeys, GroupLookupError> {
        if group != &self.group {
            return Err(GroupLookupError::UnknownGroup);
        }
        if epoch != Epoch(1) {
            return Err(GroupLookupError::WrongEpoch);
        }
        Ok(GroupPublicKeys {
            q_p: *self.d_p.public(),
            q_s: *self.d_s.public(),
        })
    }
    fn device_key(&self, id: &DeviceId) -> Option<VerifyingKey> {
        (id == &self.publisher).then(|| self.pub_key.verifying_key())
    }
    fn is_member(&self, _g: &GroupId, _e: Epoch, id: &DeviceId, role: Role) -> bool {
        id == &self.publisher && role == Role::Publisher
    }
}

impl HeldKeys for World {
    fn group_secret(&self, _g: &GroupId, _e: Epoch, kind: GroupKeyKind) -> Option<&KeyPair> {
        Some(match kind {
            GroupKeyKind::P => &self.d_p,
            GroupKeyKind::S => &self.d_s,
        })
    }
}

fn messages(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let w = World {
        group: GroupId::new("plant/line-3/temp").unwrap(),
        publisher: DeviceId::new("pub-1").unwrap(),
        pub_key: KeyPair::random(&mut rng),
        d_p: KeyPair::random(&mut rng),
        d_s: KeyPair::random(&mut rng),
    };
    let sealer = Sealer {
        group: &w.group,
        epoch: Epoch(1),
        direction: Direction::Forward,
        sender: &w.publisher,
        key: &w.pub_key,
    };
    let m = [0x5au8; 100];
    let policy = Policy::default();
    let mut g = c.benchmark_group("message_100B");
    for option in 1..=3u8 {
        let seal = |rng: &mut ChaCha20Rng| {
            match option {
                1 => sealer.option1(NOW, &m, rng),
                2 => sealer.option2(NOW, w.d_p.public(), &m, rng),
                _ => sealer.option3(NOW, &w.d_s, w.d_p.public(), &m, rng),
            }
            .unwrap()
        };
        let wire = seal(&mut rng);
        g.bench_function(format!("option{option}_seal"), |b| {
            b.iter(|| seal(&mut rng))
        });
        g.bench_function(format!("option{option}_open"), |b| {
            b.iter_batched_ref(
                || ReplayCache::new(60_000, 16),
                |replay| {
                    let msg = UnverifiedMessage::decode(black_box(&wire)).unwrap();
                    msg.verify(&w, &w, &policy, replay, NOW).unwrap()
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn group_key_derivation(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(6);
    let ca = KeyPair::random(&mut rng);
    let group = GroupId::new("fleet/eu/temp").unwrap();
    let mut g = c.benchmark_group("group_key_derivation");
    g.sample_size(10);
    for n in [10usize, 1_000, 100_000] {
        let members: Vec<JoinedMember> = (0..n)
            .map(|i| {
                let role = if i % 10 == 0 {
                    Role::Publisher
                } else {
                    Role::Subscriber
                };
                let d = SecretScalar::random(&mut rng);
                let gi = SecretScalar::random(&mut rng);
                JoinedMember::from_keys(DeviceId::new(&format!("dev-{i}")).unwrap(), role, &d, &gi)
                    .unwrap()
            })
            .collect();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &members, |b, members| {
            b.iter(|| GroupKeys::derive(&ca, &group, Epoch(2), Privacy::Standard, members).unwrap())
        });
    }
    g.finish();
}

/// The CA's compute for one join into a group of n members: the net change, the new keys over
/// the sorted membership, the ginfo signature, the broadcast and the joiner's ECIES.
fn ca_join(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let ca = KeyPair::random(&mut rng);
    let group = GroupId::new("fleet/eu/temp").unwrap();
    let member = |i: usize, rng: &mut ChaCha20Rng| {
        let role = if i % 10 == 0 {
            Role::Publisher
        } else {
            Role::Subscriber
        };
        let d = SecretScalar::random(rng);
        let gi = SecretScalar::random(rng);
        JoinedMember::from_keys(DeviceId::new(&format!("dev-{i}")).unwrap(), role, &d, &gi).unwrap()
    };
    let mut g = c.benchmark_group("ca_join");
    g.sample_size(20);
    for n in [10usize, 1_000, 10_000] {
        let mut state =
            GroupState::create(&ca, group.clone(), Privacy::Standard, Epoch(0), 0, &mut rng)
                .unwrap();
        let joins: Vec<Change> = (0..n).map(|i| Change::Join(member(i, &mut rng))).collect();
        let Plan::Rekey(staged) = state.stage(&ca, joins, 0, &mut rng).unwrap() else {
            unreachable!("joins change the membership")
        };
        state.commit(*staged).unwrap();
        let newcomer = member(n + 1, &mut rng);
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                state
                    .stage_join(&ca, newcomer.clone(), 1, &mut rng)
                    .unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    schnorr,
    libsecp256k1_anchor,
    ecies_bench,
    ecqv,
    messages,
    group_key_derivation,
    ca_join
);
criterion_main!(benches);
