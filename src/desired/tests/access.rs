//! Access: a target admits nobody without a grant; a grant adds one ACL, with its CHAP and
//! LUNs, never widening what the target allows; grants that cannot apply say why.

use super::*;

#[test]
fn a_target_without_a_grant_serves_nobody() {
    let state = World::new().boot_target().compute();
    assert!(state.problems.is_empty(), "{:?}", state.problems);
    let [target] = state.targets.as_slice() else {
        panic!("one target: {state:?}")
    };
    assert_eq!(target.iqn, "iqn.2026-11.dev.discus:lab.boot");
    assert!(target.chap_required);
    assert!(target.acls.is_empty(), "deny by default");
    assert_eq!(
        target.portals,
        vec![Portal {
            address: "10.0.0.11".parse().expect("ip"),
            port: 3260
        }]
    );
    let [lun] = target.luns.as_slice() else {
        panic!("one LUN")
    };
    assert_eq!(
        lun.backing,
        Backing::Image(PathBuf::from(format!(
            "/var/lib/discus/images/{DIGEST_A}.raw"
        )))
    );
    assert!(lun.read_only);
    assert_eq!(lun.size_bytes, 1 << 30);
    assert_eq!(lun.serial.len(), 32);
    assert_eq!(state.needed_images, [key("debian")].into());
}

#[test]
fn a_grant_adds_one_acl_with_chap_and_read_only_luns() {
    let state = World::new().boot_target().chap_grant("host-a").compute();
    assert!(state.problems.is_empty(), "{:?}", state.problems);
    let acl = &state.targets[0].acls[0];
    assert_eq!(acl.initiator, INITIATOR);
    assert_eq!(acl.grant, key("host-a"));
    let chap = acl.chap.as_ref().expect("chap");
    assert_eq!(chap.initiator.username, "host-a");
    assert_eq!(chap.initiator.password.expose(), "s3cret-s3cret");
    assert!(chap.mutual.is_none());
    assert_eq!(
        acl.luns,
        vec![MappedLun {
            lun: 0,
            read_only: true
        }]
    );
}

#[test]
fn secrets_do_not_appear_in_debug_output_of_the_desired_state() {
    let state = World::new().boot_target().chap_grant("host-a").compute();
    assert!(!format!("{state:?}").contains("s3cret-s3cret"));
}

#[test]
fn mutual_chap_reads_the_target_credentials() {
    let state = World::new()
        .boot_target()
        .secret(
            "mutual",
            &[
                ("username", "host-a"),
                ("password", "s3cret-s3cret"),
                ("mutualUsername", "boot"),
                ("mutualPassword", "other-secret"),
            ],
        )
        .grant(
            "host-a",
            json!({
                "targetRef": {"name": "boot"}, "initiatorIqn": INITIATOR,
                "chap": {"secretRef": {"name": "mutual"}, "mutual": true},
            }),
        )
        .compute();
    assert!(state.problems.is_empty(), "{:?}", state.problems);
    let chap = state.targets[0].acls[0].chap.as_ref().expect("chap");
    assert_eq!(chap.mutual.as_ref().expect("mutual").username, "boot");
}

#[test]
fn an_expired_grant_is_absent_and_reported() {
    let mut world = World::new()
        .boot_target()
        .secret("chap", &[("username", "u"), ("password", "s3cret-s3cret")]);
    for (name, initiator, expires) in [
        ("past", INITIATOR, "2026-11-21T11:59:59Z"),
        (
            "exactly-now",
            "iqn.1993-08.org.debian:01:host-b",
            "2026-11-21T12:00:00Z",
        ),
        (
            "later",
            "iqn.1993-08.org.debian:01:host-c",
            "2026-11-22T00:00:00Z",
        ),
        (
            "sooner",
            "iqn.1993-08.org.debian:01:host-d",
            "2026-11-21T14:00:00+01:00",
        ),
    ] {
        world = world.grant(
            name,
            json!({
                "targetRef": {"name": "boot"}, "initiatorIqn": initiator,
                "chap": {"secretRef": {"name": "chap"}}, "expiresAt": expires,
            }),
        );
    }
    world.now = "2026-11-21T12:00:00Z".parse().expect("now");
    let state = world.compute();
    assert!(state.problems.is_empty(), "{:?}", state.problems);
    assert_eq!(state.expired, vec![key("exactly-now"), key("past")]);
    let initiators: Vec<_> = state.targets[0]
        .acls
        .iter()
        .map(|a| a.grant.name.as_str())
        .collect();
    assert_eq!(initiators, ["later", "sooner"]);
    // Offsets count: 14:00+01:00 is 13:00Z, the earliest expiry still ahead.
    assert_eq!(
        state.next_expiry,
        Some("2026-11-21T13:00:00Z".parse().expect("ts"))
    );
}

#[test]
fn a_grant_never_makes_a_read_only_lun_writable() {
    let state = World::new()
        .ready_image("debian", DIGEST_A)
        .ready_image("scratch", DIGEST_B)
        .target("boot", json!({"authentication": "none", "luns": [
            {"lun": 0, "image": "debian"},
            {"lun": 1, "image": "scratch", "readOnly": false},
        ]}))
        .grant("writer", json!({"targetRef": {"name": "boot"}, "initiatorIqn": INITIATOR, "readOnly": false}))
        .grant("reader", json!({"targetRef": {"name": "boot"}, "initiatorIqn": "iqn.1993-08.org.debian:01:reader"}))
        .compute();
    assert!(state.problems.is_empty(), "{:?}", state.problems);
    let acls = &state.targets[0].acls;
    let writer = acls
        .iter()
        .find(|a| a.grant.name == "writer")
        .expect("writer");
    assert_eq!(
        writer.luns,
        vec![
            MappedLun {
                lun: 0,
                read_only: true
            },
            MappedLun {
                lun: 1,
                read_only: false
            }
        ]
    );
    let reader = acls
        .iter()
        .find(|a| a.grant.name == "reader")
        .expect("reader");
    assert!(
        reader.luns.iter().all(|l| l.read_only),
        "grants are read-only by default"
    );
}

#[test]
fn a_grant_for_a_missing_target_is_a_problem() {
    let state = World::new()
        .boot_target()
        .chap_grant("host-a")
        .grant(
            "lost",
            json!({
                "targetRef": {"name": "nowhere"}, "initiatorIqn": INITIATOR,
            }),
        )
        .compute();
    assert_eq!(
        reasons(&state),
        [(Kind::InitiatorAccess, "lost".into(), Reason::TargetNotFound)]
    );
    assert_eq!(
        state.targets[0].acls.len(),
        1,
        "the other grant is untouched"
    );
}

#[test]
fn chap_rules_between_target_and_grant() {
    let base = || World::new().boot_target();
    let no_chap = base()
        .grant(
            "g",
            json!({"targetRef": {"name": "boot"}, "initiatorIqn": INITIATOR}),
        )
        .compute();
    assert_eq!(reasons(&no_chap)[0].2, Reason::ChapRequired);

    let unused = World::new()
        .ready_image("debian", DIGEST_A)
        .target(
            "boot",
            json!({"authentication": "none", "luns": [{"lun": 0, "image": "debian"}]}),
        )
        .chap_grant("g")
        .compute();
    assert_eq!(reasons(&unused)[0].2, Reason::ChapNotUsed);

    let missing = base()
        .grant("g", json!({"targetRef": {"name": "boot"}, "initiatorIqn": INITIATOR, "chap": {"secretRef": {"name": "absent"}}}))
        .compute();
    assert_eq!(reasons(&missing)[0].2, Reason::SecretNotFound);

    let pending = base()
        .grant(
            "g",
            json!({"targetRef": {"name": "boot"}, "initiatorIqn": INITIATOR,
                          "chap": {"secretRef": {"name": "absent"}, "generateSecret": true}}),
        )
        .compute();
    assert_eq!(reasons(&pending)[0].2, Reason::SecretPending);

    let invalid = base()
        .secret("host-a-chap", &[("username", "host-a"), ("password", "short")])
        .grant("g", json!({"targetRef": {"name": "boot"}, "initiatorIqn": INITIATOR, "chap": {"secretRef": {"name": "host-a-chap"}}}))
        .compute();
    let problem = &invalid.problems[0];
    assert_eq!(problem.reason, Reason::SecretInvalid);
    assert_eq!(
        problem.message,
        "Secret host-a-chap: data[password]: must be 12 to 16 characters, got 5"
    );
    for state in [&no_chap, &unused, &missing, &pending, &invalid] {
        assert!(
            state.targets.iter().all(|t| t.acls.is_empty()),
            "no ACL without valid credentials"
        );
    }
}

#[test]
fn a_grant_for_a_lun_the_target_lacks_is_a_problem() {
    let state = World::new()
        .boot_target()
        .grant(
            "g",
            json!({"targetRef": {"name": "boot"}, "initiatorIqn": INITIATOR, "luns": [0, 3],
                          "chap": {"secretRef": {"name": "c"}}}),
        )
        .secret("c", &[("username", "u"), ("password", "s3cret-s3cret")])
        .compute();
    assert_eq!(
        reasons(&state),
        [(Kind::InitiatorAccess, "g".into(), Reason::LunNotFound)]
    );
    assert!(state.problems[0].message.contains("has no LUN 3"));
}

#[test]
fn a_second_grant_for_the_same_initiator_and_target_is_refused() {
    let grant = |name| -> InitiatorAccess {
        object(
            "InitiatorAccess",
            name,
            json!({"targetRef": {"name": "boot"}, "initiatorIqn": INITIATOR,
                                                "chap": {"secretRef": {"name": "c"}}}),
        )
    };
    let state = World::new()
        .boot_target()
        .secret("c", &[("username", "u"), ("password", "s3cret-s3cret")])
        .grant_object(created(grant("second"), "2026-11-20T00:00:00Z"))
        .grant_object(created(grant("first"), "2026-11-19T00:00:00Z"))
        .compute();
    assert_eq!(
        reasons(&state),
        [(
            Kind::InitiatorAccess,
            "second".into(),
            Reason::DuplicateGrant
        )]
    );
    assert_eq!(state.targets[0].acls[0].grant, key("first"));
}

fn held_grant(world: World, name: &str, initiator: &str) -> World {
    world.grant(
        name,
        json!({
            "targetRef": {"name": "boot"}, "initiatorIqn": initiator,
            "chap": {"secretRef": {"name": "host-a-chap"}},
            "heartbeat": {"graceSeconds": 30},
        }),
    )
}

#[test]
fn a_held_grant_has_an_acl_only_while_held() {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(12);
    let world = held_grant(
        World::new().boot_target().chap_grant("plain"),
        "held",
        "iqn.2026-11.dev.discus:held",
    )
    .grant(
        "never-judged",
        json!({
            "targetRef": {"name": "boot"}, "initiatorIqn": "iqn.2026-11.dev.discus:other",
            "chap": {"secretRef": {"name": "host-a-chap"}},
            "heartbeat": {"graceSeconds": 60},
        }),
    );
    let mut world = world;
    world.holds = Some(Holds::from([(key("held"), Hold::Held { until })]));
    let state = world.compute();
    let initiators: Vec<&str> = state.targets[0]
        .acls
        .iter()
        .map(|a| a.initiator.as_str())
        .collect();
    assert_eq!(initiators, [INITIATOR, "iqn.2026-11.dev.discus:held"]);
    assert_eq!(state.next_lapse, Some(until));
    // A grant nobody judged is not held: fail closed, and say why.
    let problem = (state.problems.iter())
        .find(|p| p.key == key("never-judged"))
        .expect("problem");
    assert_eq!(problem.reason, Reason::HeartbeatLapsed);
    assert!(
        problem.message.contains("lab/never-judged") && problem.message.contains("60s"),
        "{problem}"
    );

    world.holds = Some(Holds::from([(
        key("held"),
        Hold::Lapsed("silent for 31s".into()),
    )]));
    let state = world.compute();
    assert_eq!(
        state.targets[0].acls.len(),
        1,
        "only the grant without heartbeat"
    );
    assert_eq!(state.next_lapse, None);
    let problem = (state.problems.iter())
        .find(|p| p.key == key("held"))
        .expect("problem");
    assert_eq!(
        (problem.reason, problem.message.as_str()),
        (Reason::HeartbeatLapsed, "silent for 31s")
    );
    assert!(!problem.reason.stalls());
}

#[test]
fn a_held_grant_where_nothing_judges_heartbeats_is_never_applied_and_stalls() {
    let mut world = held_grant(
        World::new().boot_target().chap_grant("plain"),
        "held",
        "iqn.2026-11.dev.discus:held",
    );
    world.holds = None;
    let state = world.compute();
    assert_eq!(state.targets[0].acls.len(), 1);
    let problem = (state.problems.iter())
        .find(|p| p.key == key("held"))
        .expect("problem");
    assert_eq!(problem.reason, Reason::HeartbeatUnsupported);
    assert!(
        problem.reason.stalls() && problem.message.starts_with("spec.heartbeat: "),
        "{problem}"
    );
}

#[test]
fn a_grace_out_of_range_names_the_field() {
    let world = World::new().boot_target().grant(
        "held",
        json!({
            "targetRef": {"name": "boot"}, "initiatorIqn": INITIATOR,
            "heartbeat": {"graceSeconds": 5},
        }),
    );
    let state = world.compute();
    let problem = (state.problems.iter())
        .find(|p| p.key == key("held"))
        .expect("problem");
    assert_eq!(problem.reason, Reason::InvalidSpec);
    assert!(
        problem
            .message
            .contains("spec.heartbeat.graceSeconds: must be between 10 and 86400 seconds, got 5"),
        "{problem}"
    );
}

#[test]
fn a_lapsed_held_grant_keeps_its_initiator_from_a_newer_grant() {
    let mut world = held_grant(World::new().boot_target(), "held", INITIATOR).secret(
        "host-a-chap",
        &[("username", "host-a"), ("password", "s3cret-s3cret")],
    );
    world = world.grant_object(created(
        object(
            "InitiatorAccess",
            "newer",
            json!({"targetRef": {"name": "boot"}, "initiatorIqn": INITIATOR,
                   "chap": {"secretRef": {"name": "host-a-chap"}}, "readOnly": false}),
        ),
        "2030-01-01T00:00:00Z",
    ));
    world.holds = Some(Holds::from([(key("held"), Hold::Lapsed("silent".into()))]));
    let state = world.compute();
    assert!(
        state.targets[0].acls.is_empty(),
        "{:?}",
        state.targets[0].acls
    );
    let newer = (state.problems.iter())
        .find(|p| p.key == key("newer"))
        .expect("problem");
    assert_eq!(newer.reason, Reason::DuplicateGrant, "{newer}");
}
