//! The fuzz targets as property tests, so that every run of the test suite exercises them without
//! cargo-fuzz: random bytes, and valid encodings with bytes flipped, inserted and deleted, fed to
//! every function of the hidden `quva_client::__fuzz` module (decode→encode round trips and the
//! verification paths). A failed round trip or a panic on bad input fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::Path;

use proptest::prelude::*;
use quva_client::__fuzz::{TARGETS, run, seeds};

/// One edit of a valid encoding.
#[derive(Clone, Debug)]
enum Mutation {
    /// XOR the byte at this position (mod the length) with a non-zero mask.
    Flip(usize, u8),
    /// Insert a byte at this position (mod the length + 1).
    Insert(usize, u8),
    /// Delete the byte at this position (mod the length).
    Delete(usize),
    /// Cut the input at this position (mod the length + 1).
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 1..=255u8).prop_map(|(p, m)| Mutation::Flip(p, m)),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Insert(p, b)),
        2 => any::<usize>().prop_map(Mutation::Delete),
        1 => any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(data: &mut Vec<u8>, m: &Mutation) {
    let len = data.len();
    match *m {
        Mutation::Flip(p, mask) if len > 0 => data[p % len] ^= mask,
        Mutation::Insert(p, b) => data.insert(p % (len + 1), b),
        Mutation::Delete(p) if len > 0 => {
            data.remove(p % len);
        }
        Mutation::Truncate(p) => data.truncate(p % (len + 1)),
        _ => {}
    }
}

fn target_names() -> BTreeSet<&'static str> {
    TARGETS.iter().map(|(name, _)| *name).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// Arbitrary bytes, to every target.
    #[test]
    fn random_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..700)) {
        for (_, target) in TARGETS {
            target(&data);
        }
    }

    /// A valid prefix followed by arbitrary bytes: gets past the version and kind bytes.
    #[test]
    fn valid_prefix_then_noise(
        seed in any::<prop::sample::Index>(),
        cut in any::<prop::sample::Index>(),
        tail in prop::collection::vec(any::<u8>(), 0..80),
    ) {
        let seeds = seeds();
        let (name, input) = seed.get(&seeds);
        let mut data = input[..cut.index(input.len() + 1)].to_vec();
        data.extend_from_slice(&tail);
        run(name, &data);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3_000))]

    /// Valid encodings with up to six edits.
    #[test]
    fn mutated_valid_encodings(
        seed in any::<prop::sample::Index>(),
        edits in prop::collection::vec(mutation(), 1..=6),
    ) {
        let seeds = seeds();
        let (name, input) = seed.get(&seeds);
        let mut data = input.clone();
        for m in &edits {
            apply(&mut data, m);
        }
        run(name, &data);
    }
}

/// Every seed, then every single-byte flip (two masks) and every truncation of it.
#[test]
fn every_flip_and_truncation_of_every_seed() {
    for (name, input) in seeds() {
        run(name, &input);
        for i in 0..input.len() {
            for mask in [0x01, 0x80] {
                let mut data = input.clone();
                data[i] ^= mask;
                run(name, &data);
            }
            run(name, &input[..i]);
        }
    }
}

/// Every target has a cargo-fuzz target file that calls it, and a seed; nothing else is there
/// (besides the bridge's targets, which call `quva_bridge::__fuzz`).
#[test]
fn fuzz_directory_matches_the_targets() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).unwrap();
    let mut files = BTreeSet::new();
    for entry in std::fs::read_dir(fuzz.join("fuzz_targets")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            manifest.contains(&format!("path = \"fuzz_targets/{name}.rs\"")),
            "{name} is not a [[bin]] of fuzz/Cargo.toml"
        );
        if text.contains("quva_bridge::__fuzz::") {
            // The bridge's targets are checked by quva-bridge's own tests.
            continue;
        }
        assert!(
            text.contains(&format!("quva_client::__fuzz::{name}(data)")),
            "{name}.rs does not call __fuzz::{name}"
        );
        files.insert(name);
    }
    let names: BTreeSet<String> = target_names().into_iter().map(str::to_owned).collect();
    assert_eq!(files, names);
    let seeded: BTreeSet<&str> = seeds().into_iter().map(|(name, _)| name).collect();
    assert_eq!(seeded, target_names());
}
