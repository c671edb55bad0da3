//! Checks tests/vectors/quva-v1.json (PROTOCOL.md §10): every case recomputes from its inputs,
//! passes independent semantic checks, and the file is exactly what the generator writes.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeMap;

use serde_json::Value;
use support::vectors;

const FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/vectors/quva-v1.json");

fn load() -> Value {
    let text = std::fs::read_to_string(FILE).expect("tests/vectors/quva-v1.json is readable");
    serde_json::from_str(&text).expect("the vectors file is JSON")
}

#[test]
fn every_case_recomputes_from_its_inputs() {
    let file = load();
    assert_eq!(file["version"], 1);
    for (n, case) in file["cases"].as_array().expect("cases").iter().enumerate() {
        let kind = case["kind"].as_str().unwrap_or("?");
        let outputs = vectors::compute(case);
        for (name, expected) in outputs.as_object().unwrap() {
            assert_eq!(&case[name], expected, "vector {n} ({kind}): field {name}");
        }
        vectors::check_semantics(case);
    }
}

#[test]
fn at_least_three_cases_of_each_kind() {
    let file = load();
    let mut counts = BTreeMap::new();
    for case in file["cases"].as_array().unwrap() {
        *counts
            .entry(case["kind"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    for kind in [
        "hash_to_scalar",
        "schnorr",
        "ecqv",
        "ecies",
        "pop",
        "group_keys",
        "msg1",
        "msg2",
        "msg3",
        "tree_rekey",
        "direct",
        "ota",
    ] {
        assert!(
            counts.get(kind).copied().unwrap_or(0) >= 3,
            "fewer than 3 {kind} vectors: {counts:?}"
        );
    }
}

/// §10: `tree_rekey` has a case of each listed scenario.
#[test]
fn tree_rekey_covers_every_scenario() {
    let file = load();
    let described: Vec<&str> = file["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "tree_rekey")
        .map(|c| c["description"].as_str().unwrap())
        .collect();
    for scenario in [
        "leave only",
        "join only",
        "join with one doubling",
        "join with two doublings in one epoch",
        "batched leave + join",
        "a leaf reused by a joiner",
        "periodic (no change)",
    ] {
        assert!(
            described.contains(&scenario),
            "no tree_rekey case: {scenario}"
        );
    }
    // The shapes behind the descriptions.
    for c in file["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "tree_rekey")
    {
        let (before, after) = (
            c["w_before"].as_u64().unwrap(),
            c["w_after"].as_u64().unwrap(),
        );
        let (departed, joined) = (
            c["departed"].as_array().unwrap().len(),
            c["joined"].as_array().unwrap().len(),
        );
        match c["description"].as_str().unwrap() {
            "join with one doubling" => assert_eq!(after, 2 * before),
            "join with two doublings in one epoch" => assert_eq!(after, 4 * before),
            "periodic (no change)" => assert_eq!((departed, joined, after), (0, 0, before)),
            "leave only" => assert_eq!((departed > 0, joined), (true, 0)),
            "join only" => assert_eq!((departed, joined > 0, after), (0, true, before)),
            _ => {}
        }
    }
}

#[test]
fn file_is_what_the_generator_writes() {
    assert_eq!(
        load(),
        vectors::generate(),
        "regenerate with: cargo run -p quva-client --example gen-vectors > tests/vectors/quva-v1.json"
    );
}
