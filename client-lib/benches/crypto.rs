//! Costs of the Quva v1 primitives and protocol steps, with libsecp256k1 as the speed anchor.
//!
//! Run: `cargo bench -p quva-client --bench crypto`; results and ratios live in docs/benchmarks.md.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use quva_client::curve::KeyPair;
use quva_client::ecies;
use quva_client::schnorr::{BatchItem, Signature, VerifyingKey, verify_batch};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use std::hint::black_box;

const TAG: &str = "quva/v1/msg1";

fn signed(n: usize, rng: &mut ChaCha20Rng) -> Vec<(VerifyingKey, Vec<u8>, Signature)> {
    (0..n)
        .map(|i| {
            let k = KeyPair::random(rng);
            let body = vec![i as u8; 100];
            let sig = k.sign(TAG, &body, rng).unwrap();
            (k.verifying_key(), body, sig)
        })
        .collect()
}

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
        let sigs = signed(n, &mut rng);
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

criterion_group!(benches, schnorr, libsecp256k1_anchor, ecies_bench);
criterion_main!(benches);
