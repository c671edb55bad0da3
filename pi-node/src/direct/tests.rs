use quva_client::direct::{DirectFloor, DirectRejection, DirectSealer};
use quva_client::ids::{DeviceId, GroupId, Role};

use super::*;
use quva_client::testkit::{Node, World};

/// `owner` publishes and `sensor-01` subscribes in `fw/a`; `stranger` publishes in `fw/b` only.
struct Setup {
    w: World,
    g: GroupId,
    owner: Node,
    sensor: Node,
    stranger: Node,
}

fn setup(seed: u64) -> Setup {
    let mut w = World::new(seed);
    let g = w.group("fw/a");
    let other = w.group("fw/b");
    w.register("owner", &g, Role::Publisher);
    w.register("sensor-01", &g, Role::Subscriber);
    w.register("sensor-02", &g, Role::Subscriber);
    w.register("stranger", &other, Role::Publisher);
    let mut owner = Node::new(w.enroll("owner"));
    let mut sensor = Node::new(w.enroll("sensor-01"));
    let mut sensor2 = Node::new(w.enroll("sensor-02"));
    let mut stranger = Node::new(w.enroll("stranger"));
    w.join_node(&mut owner, &g, Role::Publisher, false);
    w.join_node(&mut sensor, &g, Role::Subscriber, true);
    w.join_node(&mut sensor2, &g, Role::Subscriber, true);
    w.join_node(&mut stranger, &other, Role::Publisher, false);
    w.flush(&mut [&mut owner, &mut sensor, &mut sensor2, &mut stranger]);
    assert_eq!(owner.dev.member_list(&g).unwrap().members().len(), 3);
    Setup {
        w,
        g,
        owner,
        sensor,
        stranger,
    }
}

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

#[test]
fn a_member_sends_and_the_recipient_opens_once_also_after_a_restart() {
    let mut s = setup(1);
    let dir = tempfile::tempdir().unwrap();
    let store = KeyStore::create(dir.path().join("sensor")).unwrap();
    let mut sent_book = DirectBook::default();
    let (topic, wire, t_ms) = seal_direct(
        &s.owner.dev,
        &mut sent_book,
        &s.g,
        &id("sensor-01"),
        b"reboot at 03:00",
        s.w.now,
        &mut s.w.rng,
    )
    .unwrap();
    assert_eq!(topic, "quva/d/sensor-01");
    assert_eq!(t_ms, s.w.now);

    let mut book = DirectBook::load(&store).unwrap();
    let staged = receive_direct(&s.sensor.dev, &book, &topic, &wire, s.w.now + 5).unwrap();
    let (sender, floor) = staged.floor();
    assert_eq!(sender.as_str(), "owner");
    book.raise_floor(&sender.clone(), floor);
    book.save(&store).unwrap();
    let opened = staged.commit();
    assert_eq!(opened.payload(), b"reboot at 03:00");

    // Delivered again (a QoS 1 redelivery, or an attacker's replay): refused by the floor.
    let again = receive_direct(&s.sensor.dev, &book, &topic, &wire, s.w.now + 6);
    assert_eq!(again.err(), Some(DirectRejection::Replayed));

    // After a restart, the floor comes from the key store and still refuses it.
    let restarted = DirectBook::load(&store).unwrap();
    assert_eq!(restarted.floor(&id("owner")), DirectFloor::at(t_ms));
    let replay = receive_direct(&s.sensor.dev, &restarted, &topic, &wire, s.w.now + 10_000);
    assert_eq!(replay.err(), Some(DirectRejection::Replayed));
    // An empty book (the floor not persisted) would have accepted it: the store is what refuses.
    assert!(
        receive_direct(
            &s.sensor.dev,
            &DirectBook::default(),
            &topic,
            &wire,
            s.w.now
        )
        .is_ok()
    );

    // The next message in the same millisecond gets a larger T_ms and is accepted.
    let (_, next, t2) = seal_direct(
        &s.owner.dev,
        &mut sent_book,
        &s.g,
        &id("sensor-01"),
        b"cancel",
        s.w.now,
        &mut s.w.rng,
    )
    .unwrap();
    assert_eq!(t2, t_ms + 1);
    assert!(receive_direct(&s.sensor.dev, &restarted, &topic, &next, s.w.now).is_ok());
}

#[test]
fn a_sender_in_no_group_of_the_recipient_is_refused() {
    let mut s = setup(2);
    // The stranger is enrolled under the same CA, with a valid certificate, but shares no group
    // with sensor-01. It got sensor-01's public key some other way.
    let q = *s.sensor.dev.credentials().key().public();
    let creds = s.stranger.dev.credentials();
    let sealer = DirectSealer {
        key: creds.key(),
        cert: creds.cert(),
    };
    let wire = sealer
        .seal(
            &id("sensor-01"),
            &q,
            s.w.now,
            b"open the valve",
            &mut s.w.rng,
        )
        .unwrap();
    let r = receive_direct(
        &s.sensor.dev,
        &DirectBook::default(),
        "quva/d/sensor-01",
        &wire,
        s.w.now,
    );
    assert_eq!(r.err(), Some(DirectRejection::NotListed));
    // The stranger cannot even find sensor-01 in a list it holds.
    let err = seal_direct(
        &s.stranger.dev,
        &mut DirectBook::default(),
        &GroupId::new("fw/b").unwrap(),
        &id("sensor-01"),
        b"x",
        s.w.now,
        &mut s.w.rng,
    )
    .unwrap_err();
    assert!(matches!(err, DirectSendError::NotListed { .. }), "{err}");
}

#[test]
fn a_message_for_another_device_is_refused() {
    let mut s = setup(3);
    let (topic, wire, _) = seal_direct(
        &s.owner.dev,
        &mut DirectBook::default(),
        &s.g,
        &id("sensor-02"),
        b"for sensor-02 only",
        s.w.now,
        &mut s.w.rng,
    )
    .unwrap();
    assert_eq!(topic, "quva/d/sensor-02");
    // Relayed to sensor-01 on its own topic, or seen on sensor-02's topic: both refused.
    for t in ["quva/d/sensor-01", topic.as_str()] {
        let r = receive_direct(&s.sensor.dev, &DirectBook::default(), t, &wire, s.w.now);
        assert_eq!(r.err(), Some(DirectRejection::NotForMe), "{t}");
    }
}

#[test]
fn a_sender_removed_from_the_group_is_refused_at_once() {
    let mut s = setup(4);
    let (topic, wire, _) = seal_direct(
        &s.owner.dev,
        &mut DirectBook::default(),
        &s.g,
        &id("sensor-01"),
        b"sent before removal",
        s.w.now,
        &mut s.w.rng,
    )
    .unwrap();
    assert!(
        receive_direct(
            &s.sensor.dev,
            &DirectBook::default(),
            &topic,
            &wire,
            s.w.now
        )
        .is_ok()
    );
    let published = s.w.leave(&s.g, "owner", Role::Publisher);
    s.w.deliver(&mut [&mut s.sensor], &published);
    s.w.flush(&mut [&mut s.sensor]);
    assert!(
        !s.sensor
            .dev
            .lists_member(&s.g, &id("owner"), Role::Publisher)
    );
    let r = receive_direct(
        &s.sensor.dev,
        &DirectBook::default(),
        &topic,
        &wire,
        s.w.now,
    );
    assert_eq!(r.err(), Some(DirectRejection::NotListed));
}

#[test]
fn a_tampered_message_is_refused() {
    let mut s = setup(5);
    let (topic, mut wire, _) = seal_direct(
        &s.owner.dev,
        &mut DirectBook::default(),
        &s.g,
        &id("sensor-01"),
        b"value 1",
        s.w.now,
        &mut s.w.rng,
    )
    .unwrap();
    let n = wire.len();
    wire[n - 70] ^= 1;
    let r = receive_direct(
        &s.sensor.dev,
        &DirectBook::default(),
        &topic,
        &wire,
        s.w.now,
    )
    .err();
    assert!(
        matches!(
            r,
            Some(DirectRejection::BadSignature | DirectRejection::Malformed(_))
        ),
        "{r:?}"
    );
}

#[test]
fn a_save_never_lowers_what_another_process_saved() {
    let dir = tempfile::tempdir().unwrap();
    let store = KeyStore::create(dir.path().join("node")).unwrap();
    // Two processes of one device load the same book…
    let mut a = DirectBook::load(&store).unwrap();
    let mut b = DirectBook::load(&store).unwrap();
    // …one accepts from x and y, the other later only from x.
    a.raise_floor(&id("x"), DirectFloor::at(10));
    a.raise_floor(&id("y"), DirectFloor::at(20));
    a.next_send_time(&id("z"), 500);
    a.save(&store).unwrap();
    b.raise_floor(&id("x"), DirectFloor::at(11));
    b.save(&store).unwrap();
    let disk = DirectBook::load(&store).unwrap();
    assert_eq!(disk.floor(&id("x")), DirectFloor::at(11));
    assert_eq!(
        disk.floor(&id("y")),
        DirectFloor::at(20),
        "y's floor survived b's save"
    );
    let mut c = disk.clone();
    assert_eq!(c.next_send_time(&id("z"), 400), 501);
}

#[test]
fn the_book_round_trips_and_refuses_garbage() {
    let mut b = DirectBook::default();
    b.next_send_time(&id("a"), 10);
    b.raise_floor(&id("b"), DirectFloor::at(7));
    b.raise_floor(&id("b"), DirectFloor::at(3));
    assert_eq!(
        b.floor(&id("b")),
        DirectFloor::at(7),
        "a floor never goes down"
    );
    let bytes = b.to_bytes();
    assert_eq!(DirectBook::from_bytes(&bytes).unwrap(), b);
    assert!(DirectBook::from_bytes(&bytes[..bytes.len() - 1]).is_err());
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(DirectBook::from_bytes(&longer).is_err());
}
