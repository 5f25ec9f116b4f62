//! LUNs and their images: what backs each LUN, its identity on every node, and what keeps a
//! target out while its images are missing, invalid or not stored yet.

use super::*;

#[test]
fn a_writable_lun_gets_a_private_copy_with_a_per_node_identity() {
    let world = World::new().ready_image("scratch", DIGEST_A).target(
        "rw",
        json!({"luns": [{"lun": 0, "image": "scratch", "readOnly": false}]}),
    );
    let here = world.compute();
    let mut elsewhere_world = world;
    elsewhere_world.node.name = "storage-2".into();
    let elsewhere = elsewhere_world.compute();
    let (a, b) = (&here.targets[0].luns[0], &elsewhere.targets[0].luns[0]);
    let Backing::WritableCopy { seed, path } = &a.backing else {
        panic!("copy: {:?}", a.backing)
    };
    assert_eq!(
        seed,
        &PathBuf::from(format!("/var/lib/discus/images/{DIGEST_A}.raw"))
    );
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("file name");
    assert!(
        path.starts_with("/var/lib/discus/writable"),
        "{}",
        path.display()
    );
    assert!(
        name.starts_with("lab.rw.lun0-") && name.ends_with(".raw"),
        "{name}"
    );
    assert_ne!(
        a.serial, b.serial,
        "divergent copies must not look like one multipath device"
    );
}

#[test]
fn every_node_serving_an_image_presents_the_same_serial() {
    let world = World::new()
        .ready_image("debian", DIGEST_A)
        .ready_image("other", DIGEST_B)
        .target(
            "boot",
            json!({"luns": [{"lun": 0, "image": "debian"}, {"lun": 1, "image": "other"}]}),
        );
    let here = world.compute();
    let mut other = world;
    other.node = NodeFacts {
        name: "storage-2".into(),
        labels: BTreeMap::new(),
        addresses: vec!["10.0.0.12".parse().expect("ip")],
        own_networks: Vec::new(),
    };
    other.ready.get_mut(&key("debian")).expect("ready").path = PathBuf::from("/elsewhere/a.raw");
    let there = other.compute();
    assert_eq!(
        here.targets[0].luns[0].serial,
        there.targets[0].luns[0].serial
    );
    assert_ne!(
        here.targets[0].luns[0].serial,
        here.targets[0].luns[1].serial
    );
    assert_eq!(here.targets[0].iqn, there.targets[0].iqn);
}

#[test]
fn a_lun_whose_image_is_not_ready_keeps_the_target_out_and_says_so() {
    let state = World::new()
        .ready_image("debian", DIGEST_A)
        .image("pending", json!({}))
        .target(
            "boot",
            json!({"luns": [{"lun": 0, "image": "debian"}, {"lun": 1, "image": "pending"}]}),
        )
        .chap_grant("host-a")
        .compute();
    assert!(state.targets.is_empty());
    assert_eq!(
        reasons(&state),
        [
            (Kind::IscsiTarget, "boot".into(), Reason::ImageNotReady),
            (
                Kind::InitiatorAccess,
                "host-a".into(),
                Reason::TargetNotServed
            ),
        ]
    );
    assert!(
        state.problems[0]
            .message
            .contains("LUN 1: DiscImage pending is not ready on node storage-1")
    );
    assert!(!Reason::ImageNotReady.stalls());
    assert!(
        state.needed_images.contains(&key("pending")),
        "the node must fetch it"
    );
}

#[test]
fn missing_and_invalid_images_are_named() {
    let state = World::new()
        .image("broken", json!({"sha256": "not-a-digest"}))
        .target("a", json!({"luns": [{"lun": 0, "image": "ghost"}]}))
        .target("b", json!({"luns": [{"lun": 0, "image": "broken"}]}))
        .compute();
    assert_eq!(
        reasons(&state),
        [
            (Kind::DiscImage, "broken".into(), Reason::InvalidSpec),
            (Kind::IscsiTarget, "a".into(), Reason::ImageNotFound),
            (Kind::IscsiTarget, "b".into(), Reason::ImageInvalid),
        ]
    );
    assert!(
        state.problems[0]
            .message
            .contains("spec.sha256: must be a SHA-256 digest")
    );
}

#[test]
fn images_are_prefetched_where_their_node_selector_matches() {
    let state = World::new()
        .image(
            "golden",
            json!({"nodeSelector": {"matchLabels": {"discus.dev/storage": "true"}}}),
        )
        .image(
            "elsewhere",
            json!({"nodeSelector": {"matchLabels": {"discus.dev/storage": "false"}}}),
        )
        .compute();
    assert_eq!(state.needed_images, [key("golden")].into());
}

#[test]
fn cdrom_luns_need_a_backend_that_has_them() {
    let world = World::new().ready_image("win", DIGEST_A).target(
        "setup",
        json!({"luns": [{"lun": 0, "image": "win", "deviceType": "cdrom"}]}),
    );
    assert_eq!(
        reasons(&world.compute())[0].2,
        Reason::UnsupportedDeviceType
    );
    let mut tgt = world;
    tgt.settings.cdrom_supported = true;
    let state = tgt.compute();
    assert_eq!(state.targets[0].luns[0].device_type, DeviceType::Cdrom);
}
