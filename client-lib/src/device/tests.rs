use super::*;
use crate::rekey::tree::TreeError;
use crate::testkit::{Node, T0, World};

fn messages(outs: &[Output]) -> Vec<&VerifiedMessage> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Message(m) => Some(m),
            _ => None,
        })
        .collect()
}

fn rejections(outs: &[Output]) -> Vec<DropReason> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Dropped { reason, .. } => Some(*reason),
            _ => None,
        })
        .collect()
}

fn missed_epochs(outs: &[Output]) -> Vec<MissedEpoch> {
    outs.iter()
        .filter_map(|o| match o {
            Output::MissedEpoch(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

fn adopted(outs: &[Output]) -> Vec<(Role, Epoch, KeySource)> {
    outs.iter()
        .filter_map(|o| match o {
            Output::KeyAdopted {
                role,
                epoch,
                source,
                ..
            } => Some((*role, *epoch, *source)),
            _ => None,
        })
        .collect()
}

const OPTIONS: [Protection; 3] = [
    Protection::Authenticated,
    Protection::Confidential,
    Protection::Anonymous,
];

/// A group with one publisher (listening for queries) and two subscribers, all joined and
/// caught up.
struct Setup {
    w: World,
    g: GroupId,
    p: Node,
    s1: Node,
    s2: Node,
}

fn setup(seed: u64) -> Setup {
    let mut w = World::new(seed);
    let g = w.group("plant/line-3/temp");
    w.register("pub-1", &g, Role::Publisher);
    w.register("sub-1", &g, Role::Subscriber);
    w.register("sub-2", &g, Role::Subscriber);
    let mut p = Node::new(w.enroll("pub-1"));
    let mut s1 = Node::new(w.enroll("sub-1"));
    let mut s2 = Node::new(w.enroll("sub-2"));
    let out = w.join_node(&mut p, &g, Role::Publisher, true);
    assert_eq!(
        adopted(&out),
        vec![(Role::Publisher, Epoch(1), KeySource::Delivery)]
    );
    assert!(p.subs.contains("plant/line-3/temp/_q"));
    w.join_node(&mut s1, &g, Role::Subscriber, true);
    w.join_node(&mut s2, &g, Role::Subscriber, true);
    assert!(s1.subs.contains("plant/line-3/temp"));
    w.flush(&mut [&mut p, &mut s1, &mut s2]);
    let epoch = w.state(&g).epoch();
    assert_eq!(epoch, Epoch(3));
    for n in [&p, &s1, &s2] {
        let summary = n.dev.summary();
        assert_eq!(summary[0].epoch, Some(epoch), "{}", n.dev.id());
        assert_eq!(summary[0].members, Some(3));
    }
    Setup { w, g, p, s1, s2 }
}

impl Setup {
    fn send(&mut self, from: Direction, option: Protection, text: &[u8]) -> (String, Vec<u8>) {
        let node = match from {
            Direction::Forward => &self.p,
            Direction::Query => &self.s1,
        };
        node.dev
            .seal(&self.g, option, from, text, self.w.now, &mut self.w.rng)
            .unwrap()
    }

    fn publish(&mut self, topic: &str, bytes: &[u8]) -> Vec<Vec<Output>> {
        self.w
            .publish(&mut [&mut self.p, &mut self.s1, &mut self.s2], topic, bytes)
    }

    fn flush(&mut self) -> Vec<Vec<Output>> {
        self.w.flush(&mut [&mut self.p, &mut self.s1, &mut self.s2])
    }
}

#[test]
fn messages_of_all_options_in_both_directions() {
    let mut s = setup(1);
    for option in OPTIONS {
        let text = format!("21.5 C via option {}", option.number());
        let (topic, bytes) = s.send(Direction::Forward, option, text.as_bytes());
        assert_eq!(topic, "plant/line-3/temp");
        let outs = s.publish(&topic, &bytes);
        assert!(outs[0].is_empty(), "the publisher does not receive data");
        for out in &outs[1..] {
            let m = messages(out);
            assert_eq!(m.len(), 1, "{option:?}: {out:?}");
            assert_eq!(m[0].payload(), text.as_bytes());
            assert_eq!(m[0].sender().as_str(), "pub-1");
            assert_eq!(m[0].protection(), option);
            assert_eq!(m[0].direction(), Direction::Forward);
        }

        let query = format!("status? option {}", option.number());
        let (topic, bytes) = s.send(Direction::Query, option, query.as_bytes());
        assert_eq!(topic, "plant/line-3/temp/_q");
        let outs = s.publish(&topic, &bytes);
        let m = messages(&outs[0]);
        assert_eq!(m.len(), 1, "{option:?}: {:?}", outs[0]);
        assert_eq!(m[0].payload(), query.as_bytes());
        assert_eq!(m[0].sender().as_str(), "sub-1");
        assert_eq!(m[0].direction(), Direction::Query);
        assert!(outs[1].is_empty() && outs[2].is_empty());
    }
}

#[test]
fn replays_tampering_and_wrong_senders_are_dropped() {
    let mut s = setup(2);
    let (topic, bytes) = s.send(Direction::Forward, Protection::Confidential, b"x");
    assert_eq!(messages(&s.publish(&topic, &bytes)[1]).len(), 1);
    let outs = s.publish(&topic, &bytes);
    assert_eq!(
        rejections(&outs[1]),
        vec![DropReason::Message(Rejection::Replayed)]
    );

    for option in OPTIONS {
        let (topic, bytes) = s.send(Direction::Forward, option, b"tamper me");
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            let out = s.s1.dev.on_publish(&topic, &bad, s.w.now, &mut s.w.rng);
            assert!(messages(&out).is_empty(), "{option:?} byte {i}");
        }
        assert_eq!(messages(&s.publish(&topic, &bytes)[1]).len(), 1);
    }

    // A subscriber cannot send forward traffic: it holds no publisher key.
    let err =
        s.s1.dev
            .seal(
                &s.g,
                Protection::Authenticated,
                Direction::Forward,
                b"x",
                s.w.now,
                &mut s.w.rng,
            )
            .unwrap_err();
    assert!(matches!(
        err,
        SendError::NotJoined {
            role: Role::Publisher,
            ..
        }
    ));

    // Unknown topics are reported, not processed.
    let out =
        s.s1.dev
            .on_publish("other/topic", b"x", s.w.now, &mut s.w.rng);
    assert_eq!(rejections(&out), vec![DropReason::UnknownTopic]);
}

#[test]
fn rekey_by_broadcast_and_the_grace_period() {
    let mut s = setup(3);
    let old = s.w.state(&s.g).epoch();
    let (topic, early) = s.send(Direction::Forward, Protection::Confidential, b"early");
    s.w.now += 1;
    let (_, late) = s.send(Direction::Forward, Protection::Anonymous, b"late");

    s.w.periodic(&s.g);
    let outs = s.flush();
    let new = old.next().unwrap();
    assert_eq!(
        adopted(&outs[0]),
        vec![(Role::Publisher, new, KeySource::Notice)]
    );
    assert_eq!(
        adopted(&outs[1]),
        vec![(Role::Subscriber, new, KeySource::Notice)]
    );

    // Within the grace period the old epoch still verifies.
    s.w.now += 10_000;
    assert_eq!(messages(&s.publish(&topic, &early)[1]).len(), 1);
    // After it, the old epoch is refused.
    s.w.now += DEFAULT_GRACE_MS;
    let out = s.s1.dev.tick(s.w.now, &mut s.w.rng);
    assert!(out.is_empty());
    let outs = s.publish(&topic, &late);
    assert_eq!(
        rejections(&outs[1]),
        vec![DropReason::Message(Rejection::WrongEpoch)]
    );

    // The new epoch works in both directions.
    for option in OPTIONS {
        let (topic, bytes) = s.send(Direction::Forward, option, b"new");
        assert_eq!(messages(&s.publish(&topic, &bytes)[2]).len(), 1);
        let (topic, bytes) = s.send(Direction::Query, option, b"new?");
        assert_eq!(messages(&s.publish(&topic, &bytes)[0]).len(), 1);
    }
}

/// The requests of `id` the CA has seen.
fn requests_of(w: &World, id: &str) -> usize {
    w.requests
        .iter()
        .filter(|(d, _, _)| d.as_str() == id)
        .count()
}

/// The SUBSCRIBEs among `outs`.
fn subscribes(outs: &[Output]) -> Vec<&Subscription> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Subscribe(sub) => Some(sub),
            _ => None,
        })
        .collect()
}

#[test]
fn a_departure_reaches_the_remaining_holders_and_not_the_departed() {
    let mut s = setup(4);
    let before = s.w.state(&s.g).epoch();
    let published = s.w.leave(&s.g, "sub-2", Role::Subscriber);
    // One tree notice per role on the key topics (and the member list); no individual topics.
    let mut topics: Vec<&str> = published.iter().map(|(t, _)| t.as_str()).collect();
    topics.sort_unstable();
    assert_eq!(
        topics,
        [
            "quva/c/plant/line-3/temp",
            "quva/k/plant/line-3/temp/pub",
            "quva/k/plant/line-3/temp/sub"
        ]
    );
    assert!(
        s.s1.subs
            .iter()
            .all(|t| !t.starts_with("quva/k/") || t.ends_with("/sub")),
        "{:?}",
        s.s1.subs
    );
    let requests = requests_of(&s.w, "sub-2");
    let outs = s.flush();
    let new = before.next().unwrap();
    assert_eq!(
        adopted(&outs[0]),
        vec![(Role::Publisher, new, KeySource::Notice)]
    );
    assert_eq!(
        adopted(&outs[1]),
        vec![(Role::Subscriber, new, KeySource::Notice)]
    );
    // sub-2 cannot open the new d_P: the notice is dropped, its key stays, it learns of the
    // removal from the member list, and it does not ask for the key.
    assert!(adopted(&outs[2]).is_empty());
    assert!(
        matches!(rejections(&outs[2])[..], [DropReason::Notice(_)]),
        "{:?}",
        outs[2]
    );
    assert!(
        outs[2]
            .iter()
            .any(|o| matches!(o, Output::Removed { epoch, .. } if *epoch == new))
    );
    assert_eq!(s.s2.dev.summary()[0].epoch, Some(before));
    assert_eq!(requests_of(&s.w, "sub-2"), requests);

    let (topic, bytes) = s.send(Direction::Forward, Protection::Confidential, b"secret");
    let outs = s.publish(&topic, &bytes);
    assert_eq!(messages(&outs[1]).len(), 1);
    // sub-2 (still subscribed at the broker in this simulation) cannot read it: it waits for a
    // key it will never get, and is dropped when the window has passed.
    assert!(messages(&outs[2]).is_empty());
    s.w.now += s.s2.dev.config().policy.window_ms + 1;
    let out = s.s2.dev.tick(s.w.now, &mut s.w.rng);
    assert!(messages(&out).is_empty());
    assert_eq!(rejections(&out).len(), 1, "{out:?}");

    // The next epoch's notice does not follow its key: it asks once, is refused (no longer
    // allowed), and still holds no key of the new epochs; it does not keep asking.
    s.w.periodic(&s.g);
    let outs = s.flush();
    assert_eq!(
        adopted(&outs[1]),
        vec![(Role::Subscriber, s.w.state(&s.g).epoch(), KeySource::Notice)]
    );
    assert!(adopted(&outs[2]).is_empty(), "{:?}", outs[2]);
    assert!(
        outs[2]
            .iter()
            .any(|o| matches!(o, Output::KeyRequestDeferred { code: 0x87, .. })),
        "{:?}",
        outs[2]
    );
    assert_eq!(requests_of(&s.w, "sub-2"), requests + 1);
    for _ in 0..5 {
        s.w.now += s.s2.dev.config().rerequest_interval_ms;
        let out = s.s2.dev.tick(s.w.now, &mut s.w.rng);
        assert!(subscribes(&out).is_empty(), "{out:?}");
    }
    assert_eq!(s.s2.dev.summary()[0].epoch, Some(before));
}

#[test]
fn catch_up_after_three_missed_rekeys_asks_the_ca_again() {
    let mut s = setup(5);
    let start = s.w.state(&s.g).epoch();
    for _ in 0..3 {
        s.w.periodic(&s.g);
    }
    s.w.outbox.clear(); // sub-1 was offline: nothing reached it.
    let current = s.w.state(&s.g).epoch();
    assert_eq!(current.0, start.0 + 3);
    assert_eq!(s.s1.dev.summary()[0].epoch, Some(start));

    // A live notice arrives while connected: it does not follow the held epoch, so the device
    // says so, asks the CA again and gets the current key in the SUBACK.
    s.w.now += s.s1.dev.config().rerequest_interval_ms;
    let notice = s.w.retained["quva/k/plant/line-3/temp/sub"].clone();
    let out = s.s1.dev.on_publish(
        "quva/k/plant/line-3/temp/sub",
        &notice,
        s.w.now,
        &mut s.w.rng,
    );
    assert!(
        matches!(
            out.as_slice(),
            [
                Output::MissedEpoch(MissedEpoch { notice, held: Some(held), .. }),
                Output::Subscribe(Subscription {
                    purpose: Purpose::Join { .. },
                    ..
                })
            ] if *notice == current && *held == start
        ),
        "{out:?}"
    );
    let out = s.w.run(&mut s.s1, out);
    assert_eq!(
        adopted(&out),
        vec![(Role::Subscriber, current, KeySource::Delivery)]
    );

    // A second gap soon after waits for the re-request interval (no request storm).
    for _ in 0..3 {
        s.w.periodic(&s.g);
    }
    s.w.outbox.clear();
    let notice = s.w.retained["quva/k/plant/line-3/temp/sub"].clone();
    let out = s.s1.dev.on_publish(
        "quva/k/plant/line-3/temp/sub",
        &notice,
        s.w.now,
        &mut s.w.rng,
    );
    assert!(out.is_empty(), "{out:?}");
    s.w.now += s.s1.dev.config().rerequest_interval_ms;
    let out = s.s1.dev.tick(s.w.now, &mut s.w.rng);
    assert_eq!(missed_epochs(&out).len(), 1, "{out:?}");
    let out = s.w.run(&mut s.s1, out);
    assert_eq!(
        adopted(&out),
        vec![(
            Role::Subscriber,
            s.w.state(&s.g).epoch(),
            KeySource::Delivery
        )]
    );
}

#[test]
fn a_missed_epoch_is_reported_and_joined_again_once() {
    let mut s = setup(12);
    let held = s.w.state(&s.g).epoch();
    // Two epochs while sub-1 hears nothing: a departure, then a periodic rekey. The key topic
    // retains only the latest notice.
    s.w.leave(&s.g, "sub-2", Role::Subscriber);
    s.w.periodic(&s.g);
    let published = core::mem::take(&mut s.w.outbox);
    s.w.deliver(&mut [&mut s.p], &published);
    let current = s.w.state(&s.g).epoch();
    assert_eq!(current.0, held.0 + 2);
    let requests = requests_of(&s.w, "sub-1");
    // (Its last request, the join, is older than the re-request interval.)
    s.w.now += s.s1.dev.config().rerequest_interval_ms;

    let t = "quva/k/plant/line-3/temp/sub";
    let latest = s.w.retained[t].clone();
    let out = s.s1.dev.on_publish(t, &latest, s.w.now, &mut s.w.rng);
    let missed = missed_epochs(&out);
    assert_eq!(
        missed,
        vec![MissedEpoch {
            group: s.g.clone(),
            role: Role::Subscriber,
            notice: current,
            held: Some(held),
        }]
    );
    assert_eq!(
        missed[0].to_string(),
        format!(
            "missed an epoch of plant/line-3/temp as subscriber; joining again (notice of epoch \
             {}, held key of epoch {})",
            current.0, held.0
        )
    );
    let joins = subscribes(&out);
    assert_eq!(joins.len(), 1, "{out:?}");
    assert!(joins[0].group_key_request.is_some());
    assert!(rejections(&out).is_empty(), "not a drop: {out:?}");

    // While that join is in flight, the same notice again (a redelivery) and the passing of time
    // send nothing more: at most one join per (group, role).
    let join = joins[0].clone();
    // The held key is known to be old: the role is not current, so nothing is sealed with it.
    assert!(!s.s1.dev.is_current(&s.g, Role::Subscriber));
    for _ in 0..3 {
        let again = s.s1.dev.on_publish(t, &latest, s.w.now, &mut s.w.rng);
        assert!(again.is_empty(), "{again:?}");
        s.w.now += s.s1.dev.config().rerequest_interval_ms;
        let out = s.s1.dev.tick(s.w.now, &mut s.w.rng);
        assert!(subscribes(&out).is_empty(), "{out:?}");
    }
    let out = s.w.run(&mut s.s1, vec![Output::Subscribe(join)]);
    assert_eq!(
        adopted(&out),
        vec![(Role::Subscriber, current, KeySource::Delivery)]
    );
    assert_eq!(requests_of(&s.w, "sub-1"), requests + 1, "exactly one join");
    assert!(s.s1.dev.is_current(&s.g, Role::Subscriber));
    assert_eq!(
        s.s1.dev
            .keyring(&s.g, Role::Subscriber)
            .unwrap()
            .current_key(),
        s.w.state(&s.g).keys().held_by(Role::Subscriber)
    );
    s.w.now += 10 * s.s1.dev.config().rerequest_interval_ms;
    assert!(s.s1.dev.tick(s.w.now, &mut s.w.rng).is_empty());

    // With the path of the delivery it follows the next notice again.
    s.w.periodic(&s.g);
    let outs = s.flush();
    assert_eq!(
        adopted(&outs[1]),
        vec![(Role::Subscriber, s.w.state(&s.g).epoch(), KeySource::Notice)]
    );
    assert_eq!(requests_of(&s.w, "sub-1"), requests + 1);
}

#[test]
fn a_notice_before_the_suback_waits_for_the_delivery() {
    let mut w = World::new(13);
    let g = w.group("plant/a");
    w.register("sub-1", &g, Role::Subscriber);
    w.register("sub-2", &g, Role::Subscriber);
    let mut s1 = Node::new(w.enroll("sub-1"));
    w.join_node(&mut s1, &g, Role::Subscriber, false);
    let mut dev = w.enroll("sub-2");
    let sub = dev
        .join(&g, Role::Subscriber, false, w.now, &mut w.rng)
        .unwrap();
    // The CA answers with the key of the join's epoch, but the notice of the next epoch
    // overtakes the SUBACK.
    let (codes, gk) = w.answer(dev.id(), &sub);
    let joined = w.state(&g).epoch();
    w.periodic(&g);
    let notice = w.retained[&topics::key(&g, Role::Subscriber)].clone();
    let requests = requests_of(&w, "sub-2");
    let out = dev.on_publish(
        &topics::key(&g, Role::Subscriber),
        &notice,
        w.now,
        &mut w.rng,
    );
    assert!(out.is_empty(), "waits, no second join: {out:?}");
    let out = dev
        .on_suback(&sub.purpose, &codes, gk.as_deref(), w.now, &mut w.rng)
        .unwrap();
    assert_eq!(
        adopted(&out),
        vec![
            (Role::Subscriber, joined, KeySource::Delivery),
            (Role::Subscriber, joined.next().unwrap(), KeySource::Notice)
        ]
    );
    assert_eq!(requests_of(&w, "sub-2"), requests);
    w.now += 10 * dev.config().rerequest_interval_ms;
    assert!(dev.tick(w.now, &mut w.rng).is_empty());
}

#[test]
fn a_notice_without_a_held_key_joins_again() {
    let mut w = World::new(14);
    let g = w.group("plant/a");
    w.register("sub-1", &g, Role::Subscriber);
    w.register("sub-2", &g, Role::Subscriber);
    let mut s2 = Node::new(w.enroll("sub-2"));
    w.join_node(&mut s2, &g, Role::Subscriber, false);
    let mut dev = w.enroll("sub-1");
    let sub = dev
        .join(&g, Role::Subscriber, false, w.now, &mut w.rng)
        .unwrap();
    // The SUBACK's delivery is not for this device: refused, no key held.
    let (codes, _) = w.answer(dev.id(), &sub);
    let foreign = w.delivery_for(&g, s2.dev.id(), Role::Subscriber);
    let err = dev
        .on_suback(&sub.purpose, &codes, Some(&foreign), w.now, &mut w.rng)
        .unwrap_err();
    assert!(matches!(err, JoinError::BadDelivery { .. }), "{err}");
    assert!(dev.keyring(&g, Role::Subscriber).is_none());
    // The key topic was granted: the next notice comes, and the device joins again, once.
    w.now += dev.config().rerequest_interval_ms;
    w.periodic(&g);
    let t = topics::key(&g, Role::Subscriber);
    let notice = w.retained[&t].clone();
    let current = w.state(&g).epoch();
    let out = dev.on_publish(&t, &notice, w.now, &mut w.rng);
    assert_eq!(
        missed_epochs(&out),
        vec![MissedEpoch {
            group: g.clone(),
            role: Role::Subscriber,
            notice: current,
            held: None,
        }]
    );
    assert!(missed_epochs(&out)[0].to_string().ends_with("no key held)"));
    assert_eq!(subscribes(&out).len(), 1);
    let mut node = Node::new(dev);
    let out = w.run(&mut node, out);
    assert_eq!(
        adopted(&out),
        vec![(Role::Subscriber, current, KeySource::Delivery)]
    );
    // A forged notice (not CA-signed) for a role without a key is only dropped.
    let mut other = World::new(15);
    let og = other.group("plant/a");
    other.register("x", &og, Role::Publisher);
    let mut x = Node::new(other.enroll("x"));
    other.join_node(&mut x, &og, Role::Publisher, false);
    other.register("y", &og, Role::Subscriber);
    let mut y = Node::new(other.enroll("y"));
    other.join_node(&mut y, &og, Role::Subscriber, false);
    let forged = other.retained[&topics::key(&og, Role::Publisher)].clone();
    let mut dev = w.enroll("sub-2");
    let sub = dev
        .join(&g, Role::Publisher, false, w.now, &mut w.rng)
        .unwrap();
    let err = dev
        .on_suback(&sub.purpose, &[0, 0], Some("AAAA"), w.now, &mut w.rng)
        .unwrap_err();
    assert!(matches!(err, JoinError::BadDelivery { .. }));
    let out = dev.on_publish(
        &topics::key(&g, Role::Publisher),
        &forged,
        w.now,
        &mut w.rng,
    );
    assert!(missed_epochs(&out).is_empty(), "{out:?}");
    assert!(subscribes(&out).is_empty(), "{out:?}");
    assert!(
        matches!(rejections(&out)[..], [DropReason::Notice(_)]),
        "{out:?}"
    );
}

#[test]
fn notices_of_the_held_epoch_or_older_are_ignored_silently() {
    let mut s = setup(16);
    let t = "quva/k/plant/line-3/temp/sub";
    let first = s.w.retained[t].clone();
    s.w.periodic(&s.g);
    s.flush();
    let current = s.w.state(&s.g).epoch();
    let second = s.w.retained[t].clone();
    // A joiner sees the notice of its own epoch: nothing to do, nothing to report.
    s.w.register("sub-3", &s.g, Role::Subscriber);
    let mut s3 = Node::new(s.w.enroll("sub-3"));
    let out = s.w.join_node(&mut s3, &s.g, Role::Subscriber, false);
    let joined = s.w.state(&s.g).epoch();
    assert_eq!(
        adopted(&out),
        vec![(Role::Subscriber, joined, KeySource::Delivery)]
    );
    assert!(s3.subs.contains(t));
    assert!(rejections(&out).is_empty(), "{out:?}");
    assert!(missed_epochs(&out).is_empty(), "{out:?}");
    let own = s.w.retained[t].clone();
    assert!(s3.dev.on_publish(t, &own, s.w.now, &mut s.w.rng).is_empty());
    // Older and replayed notices at a member that followed them.
    s.flush();
    for n in [&first, &second, &own] {
        let out = s.s1.dev.on_publish(t, n, s.w.now, &mut s.w.rng);
        assert!(out.is_empty(), "{out:?}");
    }
    assert_eq!(s.s1.dev.summary()[0].epoch, Some(joined));
    assert!(joined > current);
}

#[test]
fn notices_of_the_other_role_or_another_group_are_ignored() {
    let mut s = setup(17);
    let g2 = s.w.group("plant/line-4/temp");
    s.w.register("x", &g2, Role::Subscriber);
    s.w.register("y", &g2, Role::Publisher);
    let mut x = Node::new(s.w.enroll("x"));
    let mut y = Node::new(s.w.enroll("y"));
    s.w.join_node(&mut x, &g2, Role::Subscriber, false);
    s.w.join_node(&mut y, &g2, Role::Publisher, false);
    s.w.periodic(&g2);
    s.w.periodic(&s.g);
    let published = core::mem::take(&mut s.w.outbox);
    let held = s.s1.dev.summary()[0].epoch;
    let ring = s.s1.dev.keyring(&s.g, Role::Subscriber).unwrap().clone();
    let t = "quva/k/plant/line-3/temp/sub";
    let requests = requests_of(&s.w, "sub-1");
    // (A request would not be held back by the re-request interval.)
    s.w.now += s.s1.dev.config().rerequest_interval_ms;
    // The same CA's notices of the next epoch: for publishers of this group, and for the same
    // role of another group, arriving on this role's key topic.
    let for_publishers = s.w.retained["quva/k/plant/line-3/temp/pub"].clone();
    let other_group = s.w.retained["quva/k/plant/line-4/temp/sub"].clone();
    for (n, want) in [
        (
            &for_publishers,
            RekeyError::Tree(TreeError::WrongRole("tree notice")),
        ),
        (
            &other_group,
            RekeyError::Tree(TreeError::WrongGroup("tree notice")),
        ),
    ] {
        let out = s.s1.dev.on_publish(t, n, s.w.now, &mut s.w.rng);
        assert_eq!(rejections(&out), vec![DropReason::Notice(want)], "{out:?}");
        assert!(adopted(&out).is_empty() && missed_epochs(&out).is_empty());
        assert!(subscribes(&out).is_empty(), "{out:?}");
    }
    assert_eq!(s.s1.dev.summary()[0].epoch, held);
    assert_eq!(
        s.s1.dev.keyring(&s.g, Role::Subscriber).unwrap().tree(),
        ring.tree()
    );
    assert_eq!(requests_of(&s.w, "sub-1"), requests);
    // The right notice still applies afterwards.
    let outs = s.w.deliver(&mut [&mut s.s1], &published);
    assert_eq!(
        adopted(&outs[0]),
        vec![(Role::Subscriber, s.w.state(&s.g).epoch(), KeySource::Notice)]
    );
}

#[test]
fn a_device_restored_from_its_stored_keys_follows_the_next_notice() {
    let mut s = setup(6);
    // sub-1's keys as the daemon's key store keeps them.
    let stored = s.s1.dev.stored_keys();
    // A departure while sub-1 is down: only the publisher and sub-2 hear its notice.
    s.w.leave(&s.g, "sub-2", Role::Subscriber);
    let published = core::mem::take(&mut s.w.outbox);
    s.w.deliver(&mut [&mut s.p], &published);
    let current = s.w.state(&s.g).epoch();

    // sub-1 restarts from its stored keys while the CA is down: the SUBACK refuses the request,
    // and the retained tree notice opens with the stored path.
    let creds = s.s1.dev.credentials().clone();
    let mut dev = Device::new(creds, *s.w.ca.public(), DeviceConfig::default());
    for k in &stored {
        let out = dev.restore(k).unwrap();
        assert!(matches!(
            out,
            Some(Output::KeyAdopted {
                source: KeySource::Restored,
                ..
            })
        ));
    }
    let mut node = Node::new(dev);
    s.w.ca_up = false;
    let requests = s.w.requests.len();
    let sub = node
        .dev
        .join(&s.g, Role::Subscriber, true, s.w.now, &mut s.w.rng)
        .unwrap();
    let out = s.w.run(&mut node, vec![Output::Subscribe(sub)]);
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::KeyRequestDeferred { code: 0x80, .. }))
    );
    assert_eq!(
        adopted(&out),
        vec![(Role::Subscriber, current, KeySource::Notice)]
    );
    assert_eq!(s.w.requests.len(), requests, "the CA was down");
    assert!(missed_epochs(&out).is_empty(), "{out:?}");
    assert!(node.subs.contains("plant/line-3/temp"));

    // Messages of the current epoch verify (the member list was retained too).
    let (topic, bytes) = s.send(Direction::Forward, Protection::Anonymous, b"hello again");
    let out = s.w.publish(&mut [&mut node], &topic, &bytes);
    assert_eq!(messages(&out[0]).len(), 1, "{:?}", out[0]);

    // And the live notice after that too.
    s.w.periodic(&s.g);
    let published = core::mem::take(&mut s.w.outbox);
    let out = s.w.deliver(&mut [&mut node], &published);
    assert_eq!(
        adopted(&out[0]),
        vec![(Role::Subscriber, s.w.state(&s.g).epoch(), KeySource::Notice)]
    );

    // After a reconnection the held key is resumed, without asking the CA again.
    s.w.ca_up = true;
    node.subs.clear();
    let subs = node.dev.resume_all(s.w.now, &mut s.w.rng).unwrap();
    assert_eq!(subs.len(), 1);
    let out =
        s.w.run(&mut node, subs.into_iter().map(Output::Subscribe).collect());
    assert!(adopted(&out).is_empty(), "same epoch: {out:?}");
    assert_eq!(s.w.requests.len(), requests);
    assert!(node.subs.contains("plant/line-3/temp"));
}

#[test]
fn a_device_without_any_key_is_refused_clearly() {
    let mut w = World::new(7);
    let g = w.group("plant/a");
    w.register("sub-1", &g, Role::Subscriber);
    let mut dev = w.enroll("sub-1");
    // Allowed as subscriber, asks as publisher.
    let sub = dev
        .join(&g, Role::Publisher, true, w.now, &mut w.rng)
        .unwrap();
    let err = dev
        .on_suback(&sub.purpose, &[0x87, 0, 0], None, w.now, &mut w.rng)
        .unwrap_err();
    assert!(matches!(err, JoinError::Refused { code: 0x87, .. }));
    assert!(err.to_string().contains("not authorized"), "{err}");
    // The CA down and no stored key.
    let sub = dev
        .join(&g, Role::Subscriber, true, w.now, &mut w.rng)
        .unwrap();
    let err = dev
        .on_suback(&sub.purpose, &[0x80, 0, 0], None, w.now, &mut w.rng)
        .unwrap_err();
    assert!(err.to_string().contains("CA is unavailable"), "{err}");
    // Accepted without a delivery: not a Quva bridge.
    let err = dev
        .on_suback(&sub.purpose, &[0, 0, 0], None, w.now, &mut w.rng)
        .unwrap_err();
    assert!(matches!(err, JoinError::NoDelivery(_)));
    let err = dev
        .on_suback(
            &sub.purpose,
            &[0, 0, 0],
            Some("not-base64!"),
            w.now,
            &mut w.rng,
        )
        .unwrap_err();
    assert!(matches!(err, JoinError::BadDelivery { .. }));
    // A refused data subscription.
    let listen = Purpose::Listen {
        group: g.clone(),
        role: Role::Subscriber,
    };
    let err = dev
        .on_suback(&listen, &[0x87], None, w.now, &mut w.rng)
        .unwrap_err();
    assert!(matches!(err, JoinError::ListenRefused { code: 0x87, .. }));
}

#[test]
fn messages_wait_for_a_later_key_and_for_member_lists() {
    let mut s = setup(8);
    s.w.periodic(&s.g);
    let published = core::mem::take(&mut s.w.outbox);
    // Only the publisher hears the rekey at first.
    let (pub_notices, rest): (Vec<_>, Vec<_>) = published
        .into_iter()
        .partition(|(t, _)| t.starts_with("quva/k/plant/line-3/temp/pub"));
    s.w.deliver(&mut [&mut s.p], &pub_notices);
    let (topic, bytes) = s.send(Direction::Forward, Protection::Confidential, b"ahead");
    let outs = s.publish(&topic, &bytes);
    assert!(outs[1].is_empty(), "waits: {:?}", outs[1]);
    // Then the subscriber's notice and the new member list arrive.
    let outs = s.w.deliver(&mut [&mut s.s1], &rest);
    let m = messages(&outs[0]);
    assert_eq!(m.len(), 1, "{:?}", outs[0]);
    assert_eq!(m[0].payload(), b"ahead");
}

#[test]
fn bad_notices_and_lists_are_dropped_and_old_ones_ignored() {
    let mut s = setup(9);
    let t = "quva/k/plant/line-3/temp/sub".to_owned();
    let notice = s.w.retained[&t].clone();
    // An old retained notice: silently ignored.
    assert!(
        s.s1.dev
            .on_publish(&t, &notice, s.w.now, &mut s.w.rng)
            .is_empty()
    );
    let out = s.s1.dev.on_publish(&t, b"junk", s.w.now, &mut s.w.rng);
    assert!(matches!(rejections(&out)[..], [DropReason::Notice(_)]));
    let c = "quva/c/plant/line-3/temp";
    let mut list = s.w.retained[c].clone();
    list[5] ^= 1;
    let out = s.s1.dev.on_publish(c, &list, s.w.now, &mut s.w.rng);
    assert!(matches!(rejections(&out)[..], [DropReason::Members(_)]));
    // A notice of another group's CA is refused.
    let mut other = World::new(99);
    let g = other.group("plant/line-3/temp");
    other.register("x", &g, Role::Subscriber);
    other.register("y", &g, Role::Subscriber);
    let mut x = Node::new(other.enroll("x"));
    let mut y = Node::new(other.enroll("y"));
    other.join_node(&mut x, &g, Role::Subscriber, false);
    other.join_node(&mut y, &g, Role::Subscriber, false);
    let foreign = other.retained[&t].clone();
    let out = s.s1.dev.on_publish(&t, &foreign, s.w.now, &mut s.w.rng);
    assert!(
        matches!(rejections(&out)[..], [DropReason::Notice(_)]),
        "{out:?}"
    );
    assert_eq!(s.s1.dev.summary()[0].epoch, Some(s.w.state(&s.g).epoch()));
}

#[test]
fn stored_keys_restore_and_redact() {
    let s = setup(10);
    let stored = s.p.dev.stored_keys();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].role, Role::Publisher);
    let text = format!("{:?}", stored[0]);
    let secret = hex::encode(&stored[0].key_set.x().to_bytes()[..]);
    assert!(!text.contains(&secret), "Debug leaks the key");
    for (_, k) in stored[0].key_set.path() {
        assert!(
            !text.contains(&hex::encode(k.as_bytes())),
            "Debug leaks a path key"
        );
    }
    let mut w = s.w;
    let mut dev = Device::new(
        s.p.dev.credentials().clone(),
        *w.ca.public(),
        DeviceConfig::default(),
    );
    dev.restore(&stored[0]).unwrap();
    assert_eq!(
        dev.keyring(&s.g, Role::Publisher).unwrap().epoch(),
        w.state(&s.g).epoch()
    );
    // A key that does not match its info is refused.
    let mut wrong = stored[0].clone();
    let set = &stored[0].key_set;
    wrong.key_set = TreeKeySet::new(
        KeyPair::random(&mut w.rng).secret().clone(),
        set.width(),
        set.leaf(),
        set.path().to_vec(),
    )
    .unwrap();
    let mut dev2 = Device::new(
        s.p.dev.credentials().clone(),
        *w.ca.public(),
        DeviceConfig::default(),
    );
    assert!(dev2.restore(&wrong).is_err());
    assert!(T0 <= w.now);
}

#[test]
fn a_later_member_list_without_a_notice_leads_to_a_new_request() {
    let mut s = setup(11);
    s.w.now += 60_000;
    s.w.periodic(&s.g);
    // The notices are lost; only the member list of the new epoch arrives.
    let published = core::mem::take(&mut s.w.outbox);
    let lists: Vec<_> = published
        .into_iter()
        .filter(|(t, _)| t.starts_with("quva/c/"))
        .collect();
    let out = s.w.deliver(&mut [&mut s.s1], &lists);
    assert!(adopted(&out[0]).is_empty());
    // Nothing happens at once (the notice may still come)…
    let out = s.s1.dev.tick(s.w.now, &mut s.w.rng);
    assert!(out.is_empty(), "{out:?}");
    // …but after the interval the device asks the CA again.
    s.w.now += s.s1.dev.config().rerequest_interval_ms;
    let out = s.s1.dev.tick(s.w.now, &mut s.w.rng);
    let out = s.w.run(&mut s.s1, out);
    let current = s.w.state(&s.g).epoch();
    assert_eq!(
        adopted(&out),
        vec![(Role::Subscriber, current, KeySource::Delivery)]
    );
    // Up to date: no further requests.
    s.w.now += 10 * s.s1.dev.config().rerequest_interval_ms;
    assert!(s.s1.dev.tick(s.w.now, &mut s.w.rng).is_empty());

    // A removed member does not keep asking.
    s.w.leave(&s.g, "sub-2", Role::Subscriber);
    let published = core::mem::take(&mut s.w.outbox);
    let lists: Vec<_> = published
        .into_iter()
        .filter(|(t, _)| t.starts_with("quva/c/"))
        .collect();
    let outs = s.w.deliver(&mut [&mut s.s1, &mut s.s2], &lists);
    let removed = |out: &[Output]| -> Vec<(Role, Epoch)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Removed { role, epoch, .. } => Some((*role, *epoch)),
                _ => None,
            })
            .collect()
    };
    // The removed member learns it from the list; the one still listed does not.
    let current = s.w.state(&s.g).epoch();
    assert_eq!(removed(&outs[1]), vec![(Role::Subscriber, current)]);
    assert!(removed(&outs[0]).is_empty());
    s.w.now += 10 * s.s2.dev.config().rerequest_interval_ms;
    assert!(s.s2.dev.tick(s.w.now, &mut s.w.rng).is_empty());
}

#[test]
fn a_removed_publisher_is_refused_in_the_grace_period_of_its_old_epoch() {
    let mut s = setup(11);
    let before = s.w.state(&s.g).epoch();
    // Sealed while still a member: accepted.
    let (topic, early) = s.send(Direction::Forward, Protection::Confidential, b"early");
    let outs = s.publish(&topic, &early);
    assert_eq!(messages(&outs[1]).len(), 1);

    s.w.leave(&s.g, "pub-1", Role::Publisher);
    let outs = s.flush();
    assert_eq!(
        adopted(&outs[1]),
        vec![(Role::Subscriber, before.next().unwrap(), KeySource::Notice)]
    );
    // The removed publisher still holds the old epoch's keys, and that epoch is within its
    // grace period at the subscribers; the newer member list no longer names it.
    for option in OPTIONS {
        let (topic, bytes) = s.send(Direction::Forward, option, b"after removal");
        let outs = s.publish(&topic, &bytes);
        for out in &outs[1..] {
            assert!(messages(out).is_empty(), "{option:?}: {out:?}");
            assert_eq!(
                rejections(out),
                vec![DropReason::Message(Rejection::NotMember)],
                "{option:?}"
            );
        }
    }
}

/// The member list format through the device's test world.
mod member_lists {
    use super::*;
    use crate::members::MemberListError;

    #[test]
    fn verifies_the_bridge_format_and_rejects_tampering() {
        let mut w = World::new(1);
        let g = w.group("plant/a");
        w.register("pub-1", &g, Role::Publisher);
        w.register("sub-1", &g, Role::Subscriber);
        let mut p = Node::new(w.enroll("pub-1"));
        let mut s = Node::new(w.enroll("sub-1"));
        w.join_node(&mut p, &g, Role::Publisher, false);
        w.join_node(&mut s, &g, Role::Subscriber, true);
        let bytes = w.member_list(&g);
        let list = MemberList::verify(&bytes, w.ca.public(), &g).unwrap();
        assert_eq!(list.members().len(), 2);
        assert!(list.contains(&DeviceId::new("pub-1").unwrap(), Role::Publisher));
        assert!(!list.contains(&DeviceId::new("pub-1").unwrap(), Role::Subscriber));
        let now = w.now;
        assert!(list.key_of(&DeviceId::new("sub-1").unwrap(), now).is_some());
        assert!(
            list.key_of(&DeviceId::new("sub-1").unwrap(), u64::MAX)
                .is_none()
        );

        let other = GroupId::new("plant/b").unwrap();
        assert_eq!(
            MemberList::verify(&bytes, w.ca.public(), &other).unwrap_err(),
            MemberListError::WrongGroup
        );
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(
                MemberList::verify(&bad, w.ca.public(), &g).is_err(),
                "byte {i}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(MemberList::verify(&longer, w.ca.public(), &g).is_err());
        assert!(MemberList::verify(&bytes[..bytes.len() - 1], w.ca.public(), &g).is_err());
    }

    #[test]
    fn a_list_missing_a_member_does_not_match() {
        let mut w = World::new(2);
        let g = w.group("plant/a");
        w.register("pub-1", &g, Role::Publisher);
        let mut p = Node::new(w.enroll("pub-1"));
        w.join_node(&mut p, &g, Role::Publisher, false);
        let signed = w.state(&g).signed_info().clone();
        let bytes = MemberList::encode(&signed, &[]);
        assert_eq!(
            MemberList::verify(&bytes, w.ca.public(), &g).unwrap_err(),
            MemberListError::MembersMismatch
        );
    }
}

/// Resumption (PROTOCOL.md §4 v1.1): reconnections and restarts with a held key.
mod resumption {
    use super::*;

    fn failures(outs: &[Output]) -> Vec<ResumeFailure> {
        outs.iter()
            .filter_map(|o| match o {
                Output::ResumeFailed { reason, .. } => Some(*reason),
                _ => None,
            })
            .collect()
    }

    fn resumed(outs: &[Output]) -> Vec<(Role, Epoch)> {
        outs.iter()
            .filter_map(|o| match o {
                Output::Resumed { role, epoch, .. } => Some((*role, *epoch)),
                _ => None,
            })
            .collect()
    }

    /// sub-1 restarted from its key store (a new connection: the broker forgot its
    /// subscriptions), taking part as a receiving subscriber again.
    fn restart_sub1(s: &mut Setup) -> (Node, Vec<Output>) {
        let stored = s.s1.dev.stored_keys();
        let creds = s.s1.dev.credentials().clone();
        let mut dev = Device::new(creds, *s.w.ca.public(), DeviceConfig::default());
        for k in &stored {
            let out = dev.restore(k).unwrap();
            assert!(matches!(
                out,
                Some(Output::KeyAdopted {
                    source: KeySource::Restored,
                    ..
                })
            ));
        }
        let sub = dev
            .resume(&s.g, Role::Subscriber, true, s.w.now, &mut s.w.rng)
            .unwrap();
        assert!(matches!(sub.purpose, Purpose::Resume { .. }), "{sub:?}");
        assert_eq!(sub.group_key_request, None);
        assert!(
            !dev.is_current(&s.g, Role::Subscriber),
            "not before the SUBACK"
        );
        let mut node = Node::new(dev);
        let out = s.w.run(&mut node, vec![Output::Subscribe(sub)]);
        (node, out)
    }

    /// Only pub-1 and sub-2 hear what was published since the last flush.
    fn sub1_offline(s: &mut Setup) {
        let published = core::mem::take(&mut s.w.outbox);
        s.w.deliver(&mut [&mut s.p, &mut s.s2], &published);
    }

    /// A forward message of the current epoch reaches `node`.
    fn receives(s: &mut Setup, node: &mut Node) {
        let (topic, bytes) = s.send(Direction::Forward, Protection::Confidential, b"still here");
        let out = s.w.publish(&mut [node], &topic, &bytes);
        let m = messages(&out[0]);
        assert_eq!(m.len(), 1, "{:?}", out[0]);
        assert_eq!(m[0].payload(), b"still here");
    }

    #[test]
    fn a_reconnection_with_a_current_key_resumes_without_a_request() {
        let mut s = setup(21);
        let current = s.w.state(&s.g).epoch();
        let before = s.w.requests.len();

        // The same process reconnects: every role is resumed, none joined.
        s.s1.subs.clear();
        let subs = s.s1.dev.resume_all(s.w.now, &mut s.w.rng).unwrap();
        assert_eq!(subs.len(), 1);
        assert!(
            subs.iter().all(|sub| sub.group_key_request.is_none()
                && matches!(sub.purpose, Purpose::Resume { .. }))
        );
        assert_eq!(subs[0].filters[0], "quva/k/plant/line-3/temp/sub");
        let out =
            s.w.run(&mut s.s1, subs.into_iter().map(Output::Subscribe).collect());
        assert_eq!(resumed(&out), vec![(Role::Subscriber, current)]);
        assert!(failures(&out).is_empty(), "{out:?}");
        assert!(adopted(&out).is_empty(), "{out:?}");
        assert!(s.s1.dev.is_current(&s.g, Role::Subscriber));
        assert!(s.s1.subs.contains("plant/line-3/temp"), "data resubscribed");

        // A restart from the key store resumes too.
        let (mut node, out) = restart_sub1(&mut s);
        assert_eq!(resumed(&out), vec![(Role::Subscriber, current)]);
        assert!(failures(&out).is_empty(), "{out:?}");
        assert!(node.dev.is_current(&s.g, Role::Subscriber));
        assert_eq!(
            s.w.requests.len(),
            before,
            "no group-key request reached the CA"
        );
        receives(&mut s, &mut node);

        // Nothing is asked later either.
        s.w.now += 10 * node.dev.config().rerequest_interval_ms;
        assert!(node.dev.tick(s.w.now, &mut s.w.rng).is_empty());
    }

    #[test]
    fn a_key_one_epoch_behind_catches_up_from_the_retained_notice() {
        let mut s = setup(22);
        s.w.periodic(&s.g);
        sub1_offline(&mut s);
        let current = s.w.state(&s.g).epoch();
        let requests = requests_of(&s.w, "sub-1");

        let (mut node, out) = restart_sub1(&mut s);
        assert_eq!(
            adopted(&out),
            vec![(Role::Subscriber, current, KeySource::Notice)]
        );
        assert!(failures(&out).is_empty(), "{out:?}");
        assert_eq!(requests_of(&s.w, "sub-1"), requests, "no join");
        assert!(node.dev.is_current(&s.g, Role::Subscriber));
        receives(&mut s, &mut node);
        s.w.now += 10 * node.dev.config().rerequest_interval_ms;
        assert!(node.dev.tick(s.w.now, &mut s.w.rng).is_empty());
    }

    #[test]
    fn a_missed_epoch_joins_again_once() {
        let mut s = setup(23);
        let held = s.w.state(&s.g).epoch();
        // Two rekeys while offline: the retained tree notice follows an epoch sub-1 never had.
        s.w.periodic(&s.g);
        s.w.periodic(&s.g);
        sub1_offline(&mut s);
        let current = s.w.state(&s.g).epoch();
        let requests = requests_of(&s.w, "sub-1");

        let (mut node, out) = restart_sub1(&mut s);
        assert!(failures(&out).is_empty(), "{out:?}");
        let missed = missed_epochs(&out);
        assert_eq!(
            missed,
            vec![MissedEpoch {
                group: s.g.clone(),
                role: Role::Subscriber,
                notice: current,
                held: Some(held),
            }]
        );
        assert!(
            missed[0]
                .to_string()
                .starts_with("missed an epoch of plant/line-3/temp as subscriber; joining again"),
            "{}",
            missed[0]
        );
        assert_eq!(
            adopted(&out),
            vec![(Role::Subscriber, current, KeySource::Delivery)]
        );
        assert_eq!(requests_of(&s.w, "sub-1"), requests + 1, "exactly one join");
        assert!(node.dev.is_current(&s.g, Role::Subscriber));
        receives(&mut s, &mut node);
        s.w.now += 10 * node.dev.config().rerequest_interval_ms;
        assert!(node.dev.tick(s.w.now, &mut s.w.rng).is_empty());
        assert_eq!(requests_of(&s.w, "sub-1"), requests + 1);
    }

    #[test]
    fn a_notice_that_does_not_open_joins_again() {
        let mut s = setup(24);
        s.w.periodic(&s.g);
        sub1_offline(&mut s);
        let current = s.w.state(&s.g).epoch();
        // The retained notice of the next epoch is CA-signed but its ciphertext does not open.
        let t = "quva/k/plant/line-3/temp/sub".to_owned();
        let notice = s.w.retained.get_mut(&t).unwrap();
        let last = notice.len() - 1;
        notice[last] ^= 1;
        let requests = requests_of(&s.w, "sub-1");

        let (node, out) = restart_sub1(&mut s);
        assert_eq!(
            failures(&out),
            vec![ResumeFailure::Unopenable { epoch: current }]
        );
        assert_eq!(
            adopted(&out),
            vec![(Role::Subscriber, current, KeySource::Delivery)]
        );
        assert_eq!(requests_of(&s.w, "sub-1"), requests + 1);
        assert!(node.dev.is_current(&s.g, Role::Subscriber));
    }

    #[test]
    fn a_refused_resumption_joins_again_and_a_refused_join_is_reported() {
        let mut s = setup(25);
        // sub-2 is removed while offline.
        s.w.leave(&s.g, "sub-2", Role::Subscriber);
        s.w.outbox.clear();
        let subs = s.s2.dev.resume_all(s.w.now, &mut s.w.rng).unwrap();
        assert!(matches!(subs[0].purpose, Purpose::Resume { .. }));
        let id = s.s2.dev.id().clone();
        assert!(!s.w.is_member(&s.g, &id, Role::Subscriber));
        // The bridge refuses the key topic (not a member); the device joins again, once.
        let out =
            s.s2.dev
                .on_suback(&subs[0].purpose, &[0x87, 0, 0], None, s.w.now, &mut s.w.rng)
                .unwrap();
        assert_eq!(failures(&out), vec![ResumeFailure::Refused { code: 0x87 }]);
        assert!(failures(&out)[0].to_string().contains("not authorized"));
        let joins: Vec<&Subscription> = out
            .iter()
            .filter_map(|o| match o {
                Output::Subscribe(sub) => Some(sub),
                _ => None,
            })
            .collect();
        assert_eq!(joins.len(), 1, "{out:?}");
        assert!(matches!(joins[0].purpose, Purpose::Join { .. }));
        assert!(joins[0].group_key_request.is_some());
        // The join is refused too: as before resumption, the stored key is kept and reported.
        let out =
            s.s2.dev
                .on_suback(
                    &joins[0].purpose,
                    &[0x87, 0, 0],
                    None,
                    s.w.now,
                    &mut s.w.rng,
                )
                .unwrap();
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::KeyRequestDeferred { code: 0x87, .. })),
            "{out:?}"
        );
        assert!(failures(&out).is_empty(), "no second fallback: {out:?}");
        let asks = |out: &[Output]| {
            out.iter().any(|o| {
                matches!(
                    o,
                    Output::Subscribe(Subscription {
                        group_key_request: Some(_),
                        ..
                    })
                )
            })
        };
        assert!(!asks(&out), "{out:?}");
        // …and not later either: no loop of requests.
        for _ in 0..5 {
            s.w.now += s.s2.dev.config().rerequest_interval_ms;
            let out = s.s2.dev.tick(s.w.now, &mut s.w.rng);
            assert!(!asks(&out), "{out:?}");
        }

        // A role without a key is joined, and a refusal is the error it always was.
        let mut w = World::new(26);
        let g = w.group("plant/a");
        w.register("sub-1", &g, Role::Subscriber);
        let mut dev = w.enroll("sub-1");
        let sub = dev
            .resume(&g, Role::Publisher, false, w.now, &mut w.rng)
            .unwrap();
        assert!(matches!(sub.purpose, Purpose::Join { .. }));
        assert!(sub.group_key_request.is_some());
        let err = dev
            .on_suback(&sub.purpose, &[0x87, 0, 0], None, w.now, &mut w.rng)
            .unwrap_err();
        assert!(matches!(err, JoinError::Refused { code: 0x87, .. }));
    }

    #[test]
    fn a_resumption_that_no_member_list_confirms_joins_after_the_interval() {
        let mut s = setup(27);
        s.w.retained.remove("quva/c/plant/line-3/temp");
        let requests = requests_of(&s.w, "sub-1");
        let (mut node, out) = restart_sub1(&mut s);
        assert_eq!(resumed(&out).len(), 1);
        // Not known to be current yet: a publisher would wait before sealing with it.
        assert!(!node.dev.is_current(&s.g, Role::Subscriber));
        assert!(node.dev.tick(s.w.now, &mut s.w.rng).is_empty());
        s.w.now += node.dev.config().rerequest_interval_ms;
        let out = node.dev.tick(s.w.now, &mut s.w.rng);
        assert_eq!(failures(&out), vec![ResumeFailure::Unconfirmed]);
        s.w.run(&mut node, out);
        assert_eq!(requests_of(&s.w, "sub-1"), requests + 1);
        assert!(node.dev.is_current(&s.g, Role::Subscriber));
    }
}
