//! Placement: which node serves which target under which IQN and portals, decided the same way
//! on every node; the administrator's policy; invalid targets touch nothing else.

use super::*;

#[test]
fn two_targets_claiming_one_iqn_the_older_wins_on_every_node() {
    let iqn = json!("iqn.2026-11.dev.discus:shared");
    let world = World::new()
        .ready_image("debian", DIGEST_A)
        .target_object(created(
            object(
                "IscsiTarget",
                "newer",
                json!({"iqn": iqn, "luns": [{"lun": 0, "image": "debian"}]}),
            ),
            "2026-11-20T00:00:00Z",
        ))
        .target_object(created(
            object(
                "IscsiTarget",
                "older",
                json!({"iqn": iqn, "luns": [{"lun": 0, "image": "debian"}],
                       "nodeSelector": {"matchLabels": {"kubernetes.io/hostname": "elsewhere"}}}),
            ),
            "2026-11-19T00:00:00Z",
        ));
    let state = world.compute();
    assert!(
        state.targets.is_empty(),
        "the newer target must not take the IQN where the older is absent"
    );
    let problem = &state.problems[0];
    assert_eq!(
        (problem.key.name.as_str(), problem.reason),
        ("newer", Reason::IqnConflict)
    );
    assert!(
        problem.message.contains("IscsiTarget lab/older"),
        "{}",
        problem.message
    );
}

#[test]
fn a_target_for_other_nodes_is_absent_without_a_problem() {
    let state = World::new()
        .ready_image("debian", DIGEST_A)
        .target(
            "boot",
            json!({"luns": [{"lun": 0, "image": "debian"}],
                               "nodeSelector": {"matchLabels": {"discus.dev/storage": "false"}}}),
        )
        .chap_grant("host-a")
        .compute();
    assert!(state.targets.is_empty());
    assert!(state.problems.is_empty(), "{:?}", state.problems);
    assert!(state.needed_images.is_empty());
}

#[test]
fn node_selectors_select_by_labels_and_expressions() {
    let state = World::new()
        .ready_image("debian", DIGEST_A)
        .target("boot", json!({"luns": [{"lun": 0, "image": "debian"}],
            "nodeSelector": {"matchExpressions": [{"key": "discus.dev/storage", "operator": "In", "values": ["true"]}]}}))
        .compute();
    assert_eq!(state.targets.len(), 1);
}

#[test]
fn a_default_iqn_too_long_for_iscsi_asks_for_spec_iqn() {
    let long = "t".repeat(210);
    let state = World::new()
        .ready_image("debian", DIGEST_A)
        .target(&long, json!({"luns": [{"lun": 0, "image": "debian"}]}))
        .compute();
    let problem = &state.problems[0];
    assert_eq!(problem.reason, Reason::InvalidSpec);
    assert!(
        problem.message.contains("must be at most 223 bytes")
            && problem.message.ends_with("set spec.iqn")
    );
}

#[test]
fn a_node_without_addresses_needs_explicit_portals() {
    let mut world = World::new().boot_target();
    world.node.addresses.clear();
    assert_eq!(reasons(&world.compute())[0].2, Reason::NoPortal);

    let state = World::new()
        .ready_image("debian", DIGEST_A)
        .target("boot", json!({"luns": [{"lun": 0, "image": "debian"}],
                               "portals": [{"address": "192.168.7.1"}, {"address": "fd00::1", "port": 3261}]}))
        .compute();
    let portals: Vec<String> = state.targets[0]
        .portals
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(portals, ["192.168.7.1:3260", "[fd00::1]:3261"]);
}

#[test]
fn an_invalid_target_is_reported_and_leaves_the_others_alone() {
    let state = World::new()
        .boot_target()
        .target("bad", json!({"iqn": "iqn.2026-11.dev.discus:../../core", "luns": [{"lun": 0, "image": "debian"}]}))
        .chap_grant("host-a")
        .compute();
    assert_eq!(
        reasons(&state),
        [(Kind::IscsiTarget, "bad".into(), Reason::InvalidSpec)]
    );
    assert!(
        state.problems[0]
            .message
            .starts_with("spec.iqn: must not contain '/'")
    );
    assert!(Reason::InvalidSpec.stalls());
    assert_eq!(state.targets.len(), 1);
    assert_eq!(state.targets[0].acls.len(), 1);
}

#[test]
fn targets_are_ordered_by_iqn_and_the_result_is_deterministic() {
    let world = World::new()
        .ready_image("debian", DIGEST_A)
        .target("zeta", json!({"luns": [{"lun": 0, "image": "debian"}]}))
        .target("alpha", json!({"luns": [{"lun": 0, "image": "debian"}]}));
    let state = world.compute();
    let iqns: Vec<_> = state.targets.iter().map(|t| t.iqn.as_str()).collect();
    assert_eq!(
        iqns,
        [
            "iqn.2026-11.dev.discus:lab.alpha",
            "iqn.2026-11.dev.discus:lab.zeta"
        ]
    );
    assert_eq!(state, world.compute());
}

#[test]
fn the_administrator_s_policy_refuses_portals_and_iqns_a_namespace_may_not_have() {
    let mut world = World::new().ready_image("debian", DIGEST_A);
    world.settings.policy = Policy::strict();
    let world = world
        // Another address of the host network, another port: refused for themselves.
        .target(
            "listens-elsewhere",
            json!({"luns": [{"lun": 0, "image": "debian"}], "portals": [{"address": "10.96.0.10", "port": 3260}]}),
        )
        .target(
            "odd-port",
            json!({"luns": [{"lun": 0, "image": "debian"}], "portals": [{"address": "10.0.0.11", "port": 22}]}),
        )
        // The node's own address on 3260, and the namespace's own IQNs: served.
        .target(
            "own",
            json!({"luns": [{"lun": 0, "image": "debian"}], "iqn": "iqn.2026-11.dev.discus:lab.own",
                   "portals": [{"address": "10.0.0.11", "port": 3260}]}),
        )
        // Another namespace's name, claimed first (older): refused, and claims nothing.
        .target_object(created(
            object(
                "IscsiTarget",
                "thief",
                json!({"luns": [{"lun": 0, "image": "debian"}], "iqn": "iqn.2026-11.dev.discus:prod.boot"}),
            ),
            "2026-01-01T00:00:00Z",
        ));
    let state = world.compute();
    assert_eq!(
        reasons(&state),
        [
            (
                Kind::IscsiTarget,
                "listens-elsewhere".into(),
                Reason::PortalNotAllowed
            ),
            (
                Kind::IscsiTarget,
                "odd-port".into(),
                Reason::PortalNotAllowed
            ),
            (Kind::IscsiTarget, "thief".into(), Reason::IqnNotAllowed),
        ]
    );
    let served: Vec<&str> = state.targets.iter().map(|t| t.iqn.as_str()).collect();
    assert_eq!(served, ["iqn.2026-11.dev.discus:lab.own"]);
    assert!(Reason::PortalNotAllowed.stalls() && Reason::IqnNotAllowed.stalls());
}
