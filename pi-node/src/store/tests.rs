use std::os::unix::fs::PermissionsExt;

use super::*;
use quva_client::device::{Device, DeviceConfig, KeySource, Output};
use quva_client::testkit::{Node, World};
use quva_client::topics;

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// An enrolled publisher that joined a group, and a fresh store.
fn fixture() -> (tempfile::TempDir, KeyStore, World, Device) {
    let tmp = tempfile::tempdir().unwrap();
    let store = KeyStore::create(tmp.path().join("a/b/node")).unwrap();
    let mut w = World::new(11);
    let g = w.group("plant/line-3/temp");
    w.register("pub-1", &g, Role::Publisher);
    let mut node = Node::new(w.enroll("pub-1"));
    w.join_node(&mut node, &g, Role::Publisher, false);
    (tmp, store, w, node.dev)
}

#[test]
fn round_trip_with_private_permissions() {
    let (_tmp, store, w, dev) = fixture();
    assert_eq!(mode(store.path()), 0o700);
    assert!(matches!(
        store.load_credentials(),
        Err(StoreError::NotEnrolled(_))
    ));
    store
        .save_credentials(dev.credentials(), w.ca.public())
        .unwrap();
    assert!(store.is_enrolled());
    let path = store.path().join(CREDENTIALS_FILE);
    assert_eq!(mode(&path), 0o600);
    let loaded = store.load_credentials().unwrap();
    assert_eq!(&loaded.credentials, dev.credentials());
    assert_eq!(&loaded.ca_public, w.ca.public());

    let keys = dev.stored_keys();
    store.save_group_key(&keys[0], 42).unwrap();
    assert_eq!(mode(&store.path().join(GROUPS_DIR)), 0o700);
    let loaded = store.load_group_keys().unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].1, 42);
    assert_eq!(loaded[0].0.group, keys[0].group);
    assert_eq!(loaded[0].0.signed_info, keys[0].signed_info);
    assert_eq!(loaded[0].0.key_set, keys[0].key_set);
    assert!(!loaded[0].0.key_set.path().is_empty());
    for f in fs::read_dir(store.path().join(GROUPS_DIR)).unwrap() {
        assert_eq!(mode(&f.unwrap().path()), 0o600);
    }
    store
        .remove_group_key(&keys[0].group, keys[0].role)
        .unwrap();
    assert!(store.load_group_keys().unwrap().is_empty());
    store
        .remove_group_key(&keys[0].group, keys[0].role)
        .unwrap();
}

#[test]
fn keys_loaded_from_the_store_follow_the_next_notice() {
    let (_tmp, store, mut w, dev) = fixture();
    for k in dev.stored_keys() {
        store.save_group_key(&k, w.now).unwrap();
    }
    let g = dev.stored_keys()[0].group.clone();
    // A rekey while the device is down; its notice stays retained on the key topic.
    let published = w.periodic(&g);

    let mut restored = Device::new(
        dev.credentials().clone(),
        *w.ca.public(),
        DeviceConfig::default(),
    );
    for (k, _) in store.load_group_keys().unwrap() {
        let out = restored.restore(&k).unwrap();
        assert!(
            matches!(
                out,
                Some(Output::KeyAdopted {
                    source: KeySource::Restored,
                    ..
                })
            ),
            "{out:?}"
        );
    }
    let mut node = Node::new(restored);
    node.subs.insert(topics::key(&g, Role::Publisher));
    let outs = w.deliver(&mut [&mut node], &published);
    let epoch = w.state(&g).epoch();
    assert!(
        outs[0].iter().any(|o| matches!(
            o,
            Output::KeyAdopted {
                role: Role::Publisher,
                source: KeySource::Notice,
                epoch: e,
                ..
            } if *e == epoch
        )),
        "{outs:?}"
    );
}

#[test]
fn refuses_paths_open_to_other_users() {
    let (_tmp, store, w, dev) = fixture();
    store
        .save_credentials(dev.credentials(), w.ca.public())
        .unwrap();
    let path = store.path().join(CREDENTIALS_FILE);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let err = store.load_credentials().unwrap_err();
    assert!(
        matches!(err, StoreError::Permissions { mode: 0o644, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("chmod 600"), "{err}");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();

    fs::set_permissions(store.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let err = KeyStore::open(store.path()).unwrap_err();
    assert!(
        matches!(err, StoreError::Permissions { mode: 0o755, .. }),
        "{err}"
    );
    fs::set_permissions(store.path(), fs::Permissions::from_mode(0o700)).unwrap();
    assert!(KeyStore::open(store.path()).is_ok());
    let missing = KeyStore::open(store.path().join("nope")).unwrap_err();
    assert!(matches!(missing, StoreError::NotEnrolled(_)), "{missing}");
}

#[test]
fn writes_are_atomic_and_leave_no_temporary_files() {
    let (_tmp, store, w, dev) = fixture();
    store
        .save_credentials(dev.credentials(), w.ca.public())
        .unwrap();
    // A temporary file left by a crash before the rename changes nothing.
    let stale = store.path().join(".credentials.tmp.1");
    fs::write(&stale, b"half a record").unwrap();
    assert_eq!(
        store.load_credentials().unwrap().credentials,
        *dev.credentials()
    );
    fs::remove_file(&stale).unwrap();
    // Replacing is a rename over the old file: the result is always one whole record.
    for i in 0..3 {
        store.save_broker(&format!("10.0.0.{i}:1883")).unwrap();
        assert_eq!(store.broker().unwrap().unwrap(), format!("10.0.0.{i}:1883"));
    }
    let names: Vec<String> = fs::read_dir(store.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp.")), "{names:?}");
}

#[test]
fn corruption_is_detected() {
    let (_tmp, store, w, dev) = fixture();
    store
        .save_credentials(dev.credentials(), w.ca.public())
        .unwrap();
    let path = store.path().join(CREDENTIALS_FILE);
    let good = fs::read(&path).unwrap();
    for i in 0..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 0x10;
        fs::write(&path, &bad).unwrap();
        let err = store.load_credentials().unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "byte {i}: {err}");
    }
    for len in [0, 10, good.len() - 1] {
        fs::write(&path, &good[..len]).unwrap();
        assert!(matches!(
            store.load_credentials(),
            Err(StoreError::Corrupt { .. })
        ));
    }
    // A whole, well-formed record of another kind is refused too.
    store.save_group_key(&dev.stored_keys()[0], 1).unwrap();
    let group_files: Vec<_> = fs::read_dir(store.path().join(GROUPS_DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    fs::copy(&group_files[0], &path).unwrap();
    let err = store.load_credentials().unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Corrupt {
                what: "wrong record kind",
                ..
            }
        ),
        "{err}"
    );
    // A group key renamed to another group's file is refused.
    let other = store.group_file(&GroupId::new("other").unwrap(), Role::Publisher);
    fs::rename(&group_files[0], &other).unwrap();
    let err = store.load_group_keys().unwrap_err();
    assert!(err.to_string().contains("wrong file"), "{err}");
}

#[test]
fn credentials_that_do_not_belong_together_are_refused() {
    let (_tmp, store, mut w, dev) = fixture();
    // Stored under another CA key: the certificate does not open.
    let other = KeyPair::random(&mut w.rng);
    store
        .save_credentials(dev.credentials(), other.public())
        .unwrap();
    let err = store.load_credentials().unwrap_err();
    assert!(matches!(err, StoreError::Mismatch { .. }), "{err}");
}

#[test]
fn secrets_are_not_in_error_messages_or_debug_output() {
    let (_tmp, store, w, dev) = fixture();
    store
        .save_credentials(dev.credentials(), w.ca.public())
        .unwrap();
    let loaded = store.load_credentials().unwrap();
    let d = hex::encode(&loaded.credentials.key().secret().to_bytes()[..]);
    let g = hex::encode(&loaded.credentials.group_secret().to_bytes()[..]);
    let text = format!("{loaded:?}");
    assert!(!text.contains(&d) && !text.contains(&g));
}

/// The body of a group-key file of the format before key trees: the held key without its path.
fn outdated_body(key: &StoredGroupKey) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, key.group.as_str());
    put_u8(&mut body, key.role.to_u8());
    put_blob(&mut body, &key.signed_info.to_bytes());
    body.extend_from_slice(&key.key_set.x().to_bytes()[..]);
    put_u64(&mut body, 7);
    body
}

#[test]
fn a_group_key_keeps_its_tree_path_and_a_bad_path_is_corrupt() {
    let (_tmp, store, _w, dev) = fixture();
    let key = &dev.stored_keys()[0];
    store.save_group_key(key, 5).unwrap();
    let path = store.group_file(&key.group, key.role);
    let body = store.read_record(&path, KIND_GROUP_KEY_SET).unwrap();
    // The key set is stored whole, as PROTOCOL.md §5.1 encodes it.
    let set = key.key_set.to_bytes();
    assert!(body.windows(set.len()).any(|w| w == &set[..]));

    // A well-framed record whose path does not fit its leaf (a node index changed, checksum
    // recomputed) is refused as corrupt, not loaded as a different path.
    let at = body.windows(set.len()).position(|w| w == &set[..]).unwrap();
    let node_at = at + 32 + 4 + 4 + 1 + 3;
    let mut bad = body.to_vec();
    bad[node_at] ^= 0x01;
    store.write_record(&path, KIND_GROUP_KEY_SET, &bad).unwrap();
    let err = store.load_groups().unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Corrupt {
                what: "group key",
                ..
            }
        ),
        "{err}"
    );
    // A truncated key set too.
    let mut short = body[..at].to_vec();
    put_blob(&mut short, &set[..set.len() - 1]);
    short.extend_from_slice(&body[at + set.len()..]);
    store
        .write_record(&path, KIND_GROUP_KEY_SET, &short)
        .unwrap();
    assert!(matches!(
        store.load_groups(),
        Err(StoreError::Corrupt { .. })
    ));
}

#[test]
fn a_group_key_of_the_format_without_a_path_is_outdated_and_replaced() {
    let (_tmp, store, _w, dev) = fixture();
    let key = &dev.stored_keys()[0];
    let path = store.group_file(&key.group, key.role);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::set_permissions(path.parent().unwrap(), fs::Permissions::from_mode(0o700)).unwrap();
    store
        .write_record(&path, KIND_GROUP_KEY_V1, &outdated_body(key))
        .unwrap();
    // Its key is not used; its group and role are listed, to join again.
    assert!(store.load_group_keys().unwrap().is_empty());
    let groups = store.load_groups().unwrap();
    assert_eq!(groups.len(), 1);
    assert!(
        matches!(&groups[0], StoredGroup::Outdated { group, role }
            if group == &key.group && *role == key.role),
        "{groups:?}"
    );
    assert_eq!(groups[0].role(), (&key.group, key.role));
    // The next save replaces it.
    store.save_group_key(key, 9).unwrap();
    let groups = store.load_groups().unwrap();
    assert!(
        matches!(&groups[..], [StoredGroup::Key(k, 9)] if k.key_set == key.key_set),
        "{groups:?}"
    );
    // An outdated file under another group's name is still refused.
    store
        .write_record(&path, KIND_GROUP_KEY_V1, &outdated_body(key))
        .unwrap();
    let other = store.group_file(&GroupId::new("other").unwrap(), Role::Publisher);
    fs::rename(&path, &other).unwrap();
    let err = store.load_groups().unwrap_err();
    assert!(err.to_string().contains("wrong file"), "{err}");
    // A record of another kind in the groups directory is corrupt.
    store.write_record(&other, KIND_SETTINGS, b"x").unwrap();
    assert!(matches!(
        store.load_groups(),
        Err(StoreError::Corrupt { .. })
    ));
}

#[test]
fn stored_tree_keys_are_not_in_debug_output() {
    let (_tmp, store, _w, dev) = fixture();
    let key = &dev.stored_keys()[0];
    store.save_group_key(key, 1).unwrap();
    let loaded = store.load_groups().unwrap();
    let text = format!("{loaded:?} {key:?}");
    let x = hex::encode(&key.key_set.x().to_bytes()[..]);
    assert!(!text.contains(&x), "X in Debug output");
    for (_, k) in key.key_set.path() {
        assert!(
            !text.contains(&hex::encode(k.as_bytes())),
            "a path key in Debug output"
        );
    }
    assert!(text.contains("redacted"), "{text}");
}
