//! Runs one protocol operation a given number of times, for instruction counting:
//! `valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/opcount verify 100`
//! Every run does the operation once more before the N counted ones, so lazily built tables are
//! paid in both runs; the per-operation count is (count(N) − count(0)) / N, which
//! `scripts/opcount.sh` computes.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;

use quva_client::curve::KeyPair;
use quva_client::schnorr::{BatchItem, verify_batch};
use quva_client::testkit::signed_batch;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

const TAG: &str = "quva/v1/msg1";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(op), Some(n)) = (
        args.get(1),
        args.get(2).and_then(|n| n.parse::<usize>().ok()),
    ) else {
        eprintln!(
            "usage: opcount <sign|verify|batchN|batchN-one-key|libsecp-ecdsa-verify|libsecp-bip340-verify> <iterations>"
        );
        std::process::exit(2);
    };
    let n = n + 1; // one warm-up run
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    match op.as_str() {
        "sign" => {
            let k = KeyPair::random(&mut rng);
            for _ in 0..n {
                black_box(k.sign(TAG, black_box(&[7u8; 100]), &mut rng).unwrap());
            }
        }
        "verify" => {
            let s = signed_batch(1, TAG, &mut rng);
            let (k, body, sig) = &s[0];
            for _ in 0..n {
                k.verify(TAG, black_box(body), sig).unwrap();
            }
        }
        batch if batch.starts_with("batch") => {
            let (size, one_key) = match batch["batch".len()..].strip_suffix("-one-key") {
                Some(size) => (size, true),
                None => (&batch["batch".len()..], false),
            };
            let size: usize = size.parse().expect("batchN or batchN-one-key");
            let mut s = signed_batch(size, TAG, &mut rng);
            if one_key {
                let k = KeyPair::random(&mut rng);
                for (vk, body, sig) in &mut s {
                    *vk = k.verifying_key();
                    *sig = k.sign(TAG, body, &mut rng).unwrap();
                }
            }
            let items: Vec<BatchItem<'_>> = s
                .iter()
                .map(|(k, body, sig)| BatchItem {
                    key: k,
                    tag: TAG,
                    body,
                    signature: sig,
                })
                .collect();
            for _ in 0..n {
                assert!(
                    verify_batch(black_box(&items), &mut rng)
                        .iter()
                        .all(|&ok| ok)
                );
            }
        }
        "libsecp-ecdsa-verify" | "libsecp-bip340-verify" => {
            use secp256k1::{Keypair, Message, Secp256k1, SecretKey};
            let secp = Secp256k1::new();
            let sk = SecretKey::from_byte_array([0x42; 32]).unwrap();
            let digest = [9u8; 32];
            if op == "libsecp-ecdsa-verify" {
                let pk = sk.public_key(&secp);
                let sig = secp.sign_ecdsa(Message::from_digest(digest), &sk);
                for _ in 0..n {
                    secp.verify_ecdsa(Message::from_digest(black_box(digest)), &sig, &pk)
                        .unwrap();
                }
            } else {
                let kp = Keypair::from_secret_key(&secp, &sk);
                let (xonly, _) = kp.x_only_public_key();
                let sig = secp.sign_schnorr_no_aux_rand(&digest, &kp);
                for _ in 0..n {
                    secp.verify_schnorr(&sig, black_box(&digest), &xonly)
                        .unwrap();
                }
            }
        }
        other => {
            eprintln!("unknown operation {other}");
            std::process::exit(2);
        }
    }
}
