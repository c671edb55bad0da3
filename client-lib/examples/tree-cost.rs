//! The cost of key-tree rekeying (PROTOCOL.md §5.1) at 10 to 100,000 holders, in process:
//! `cargo run --release -p quva-client --example tree-cost`
//!
//! For each size n, a subscribers' tree of n holders (leaves 0..n) and, for the revoke, a
//! publishers' tree of the same devices. "leave": one subscriber departs (one tree, one notice).
//! "revoke": a device that is publisher and subscriber is removed from both trees (two notices).
//! Planner time is `KeyTree::plan` (median of runs, nothing committed); holder time is
//! `TreeHolder::apply` for the leaver's sibling (the longest chain of openings), which includes the
//! ginfo signature check and X_new·G; openings are the most any sampled remaining holder needed.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use quva_client::codec::Encode;
use quva_client::curve::KeyPair;
use quva_client::group::{GroupInfo, Privacy, SignedGroupInfo};
use quva_client::ids::{DeviceId, Epoch, GroupId, Role};
use quva_client::rekey::tree::{KeyTree, NodeKey, TreeChanges, TreeHolder, TreeNotice, index};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

const SIZES: [u32; 5] = [10, 100, 1_000, 10_000, 100_000];
const RUNS: usize = 15;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn tree(group: &GroupId, role: Role, n: u32, rng: &mut ChaCha20Rng) -> KeyTree {
    let w = n.next_power_of_two();
    let holders = (0..n).map(|i| (DeviceId::new(&format!("d{i:06}")).unwrap(), i));
    let nodes: Vec<(u32, NodeKey)> = (0..(2 * w - 1))
        .filter(|&x| index::leaf_span(x).0 < u64::from(n))
        .map(|x| (x, NodeKey::random(rng)))
        .collect();
    KeyTree::from_parts(group.clone(), role, Epoch(1), w, holders, nodes).unwrap()
}

fn signed(ca: &KeyPair, group: &GroupId, x_p: &KeyPair, x_s: &KeyPair) -> SignedGroupInfo {
    let p = *x_p.public();
    let info = GroupInfo {
        group: group.clone(),
        epoch: Epoch(2),
        q_cag_p: p,
        q_cag_s: p,
        q_p: p,
        q_s: *x_s.public(),
        privacy: Privacy::Standard,
        n_pub: 0,
        n_sub: 0,
        members_digest: [0; 32],
    };
    let mut rng = ChaCha20Rng::seed_from_u64(9);
    SignedGroupInfo::sign(ca, info, &mut rng).unwrap()
}

fn holder(t: &KeyTree, leaf: u32) -> TreeHolder {
    let path = index::path(leaf, t.width())
        .into_iter()
        .map(|x| (x, t.key(x).unwrap().clone()))
        .collect();
    TreeHolder::from_parts(
        t.group().clone(),
        t.role(),
        t.epoch(),
        t.width(),
        leaf,
        path,
    )
    .unwrap()
}

/// Plans `changes` RUNS times; returns the median time and the last notice.
fn plan(
    t: &KeyTree,
    changes: &TreeChanges,
    x: &KeyPair,
    s: &SignedGroupInfo,
    rng: &mut ChaCha20Rng,
) -> (Duration, TreeNotice) {
    let mut times = Vec::new();
    let mut notice = None;
    for _ in 0..RUNS {
        let start = Instant::now();
        let staged = t.plan(changes, x.secret(), s, rng).unwrap();
        times.push(start.elapsed());
        notice = staged.notice().cloned();
    }
    (median(times), notice.unwrap())
}

/// The holder time for `leaf` (median) and the most openings over a sample of holders.
fn process(
    ca: &KeyPair,
    t: &KeyTree,
    notice: &TreeNotice,
    leaf: u32,
    gone: u32,
) -> (Duration, usize) {
    let q_ca = ca.verifying_key();
    let base = holder(t, leaf);
    let mut times = Vec::new();
    for _ in 0..RUNS {
        let mut h = base.clone();
        let start = Instant::now();
        h.apply(&q_ca, notice).unwrap();
        times.push(start.elapsed());
    }
    let n = t.len() as u32;
    let step = (n / 200).max(1);
    let mut most = 0;
    for l in (0..n).step_by(step as usize).chain([leaf]) {
        if l == gone {
            continue;
        }
        let mut h = holder(t, l);
        most = most.max(h.apply(&q_ca, notice).unwrap().openings());
    }
    (median(times), most)
}

fn main() {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let ca = KeyPair::random(&mut rng);
    let group = GroupId::new("plant/line-3/temp").unwrap();
    let x_p = KeyPair::random(&mut rng);
    let x_s = KeyPair::random(&mut rng);
    let s = signed(&ca, &group, &x_p, &x_s);
    println!(
        "| holders | W | operation | planner time | notice bytes | wraps | holder time | AEAD openings (max) | log2(W)+1 |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for n in SIZES {
        let subs = tree(&group, Role::Subscriber, n, &mut rng);
        let pubs = tree(&group, Role::Publisher, n, &mut rng);
        let w = subs.width();
        let bound = w.trailing_zeros() as usize + 1;
        // The leaver sits in the middle; its sibling needs the most openings.
        let gone = n / 2;
        let sibling = gone ^ 1;
        let id = DeviceId::new(&format!("d{gone:06}")).unwrap();
        let changes = TreeChanges::leaving(vec![id]);

        let (t_leave, notice) = plan(&subs, &changes, &x_p, &s, &mut rng);
        let (h_time, openings) = process(&ca, &subs, &notice, sibling, gone);
        let bytes = notice.to_bytes().len();
        println!(
            "| {n} | {w} | leave | {:.1} µs | {bytes} | {} | {:.1} µs | {openings} | {bound} |",
            t_leave.as_secs_f64() * 1e6,
            notice.wraps().len(),
            h_time.as_secs_f64() * 1e6,
        );

        let (t_pub, notice_pub) = plan(&pubs, &changes, &x_s, &s, &mut rng);
        let (h_pub, open_pub) = process(&ca, &pubs, &notice_pub, sibling, gone);
        let bytes_both = bytes + notice_pub.to_bytes().len();
        println!(
            "| {n} | {w} | revoke (both trees) | {:.1} µs | {bytes_both} | {} | {:.1} µs | {} | {bound} |",
            (t_leave + t_pub).as_secs_f64() * 1e6,
            notice.wraps().len() + notice_pub.wraps().len(),
            h_pub.as_secs_f64() * 1e6,
            openings.max(open_pub),
        );
    }
}
