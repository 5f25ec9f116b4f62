use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use super::*;
use crate::api::chap::SecretData;
use crate::api::{DiscImage, InitiatorAccess, IscsiTarget};

const DIGEST_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const DIGEST_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const INITIATOR: &str = "iqn.1993-08.org.debian:01:host-a";

/// A cluster to compute the desired state of, built one resource at a time.
struct World {
    images: Vec<DiscImage>,
    targets: Vec<IscsiTarget>,
    grants: Vec<InitiatorAccess>,
    secrets: BTreeMap<ObjectKey, SecretData>,
    node: NodeFacts,
    ready: BTreeMap<ObjectKey, ReadyImage>,
    settings: Settings,
    now: Timestamp,
}

fn object<T: serde::de::DeserializeOwned>(kind: &str, name: &str, spec: Value) -> T {
    serde_json::from_value(json!({
        "apiVersion": "discus.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": "lab", "uid": format!("uid-{name}")},
        "spec": spec,
    }))
    .expect("fixture deserializes")
}

fn created<T: kube::Resource>(mut object: T, at: &str) -> T {
    object.meta_mut().creation_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at.parse().expect("timestamp")),
    );
    object
}

fn key(name: &str) -> ObjectKey {
    ObjectKey::new("lab", name)
}

impl World {
    fn new() -> Self {
        Self {
            images: Vec::new(),
            targets: Vec::new(),
            grants: Vec::new(),
            secrets: BTreeMap::new(),
            node: NodeFacts {
                name: "storage-1".into(),
                labels: BTreeMap::from([("discus.dev/storage".into(), "true".into())]),
                addresses: vec!["10.0.0.11".parse().expect("ip")],
                own_networks: Vec::new(),
            },
            ready: BTreeMap::new(),
            settings: Settings::default(),
            now: "2026-11-21T12:00:00Z".parse().expect("now"),
        }
    }

    /// An image, verified and stored on this node.
    fn ready_image(mut self, name: &str, served: &str) -> Self {
        self = self.image(name, json!({}));
        self.ready.insert(
            key(name),
            ReadyImage {
                path: PathBuf::from(format!("/var/lib/discus/images/{served}.raw")),
                size_bytes: 1 << 30,
                served_sha256: served.into(),
            },
        );
        self
    }

    fn image(mut self, name: &str, extra: Value) -> Self {
        let mut spec = json!({"source": {"http": {"url": format!("https://images.example/{name}.iso")}}, "sha256": DIGEST_A});
        merge(&mut spec, extra);
        self.images.push(object("DiscImage", name, spec));
        self
    }

    fn target(mut self, name: &str, spec: Value) -> Self {
        self.targets.push(object("IscsiTarget", name, spec));
        self
    }

    fn target_object(mut self, target: IscsiTarget) -> Self {
        self.targets.push(target);
        self
    }

    /// The usual target: LUN 0 from image `debian`, CHAP on.
    fn boot_target(self) -> Self {
        self.ready_image("debian", DIGEST_A)
            .target("boot", json!({"luns": [{"lun": 0, "image": "debian"}]}))
    }

    fn grant(mut self, name: &str, spec: Value) -> Self {
        self.grants.push(object("InitiatorAccess", name, spec));
        self
    }

    fn grant_object(mut self, grant: InitiatorAccess) -> Self {
        self.grants.push(grant);
        self
    }

    /// The usual grant: INITIATOR on `boot`, CHAP from Secret `host-a-chap`.
    fn chap_grant(self, name: &str) -> Self {
        self.secret(
            "host-a-chap",
            &[("username", "host-a"), ("password", "s3cret-s3cret")],
        )
        .grant(
            name,
            json!({
                "targetRef": {"name": "boot"},
                "initiatorIqn": INITIATOR,
                "chap": {"secretRef": {"name": "host-a-chap"}},
            }),
        )
    }

    fn secret(mut self, name: &str, pairs: &[(&str, &str)]) -> Self {
        self.secrets.insert(
            key(name),
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
                .collect(),
        );
        self
    }

    fn compute(&self) -> DesiredState {
        let snapshot = Snapshot::new(&self.images, &self.targets, &self.grants, &self.secrets);
        desired_state(&Inputs {
            snapshot: &snapshot,
            node: &self.node,
            ready: &self.ready,
            settings: &self.settings,
            now: self.now,
        })
    }
}

fn merge(base: &mut Value, extra: Value) {
    if let (Some(base), Value::Object(extra)) = (base.as_object_mut(), extra) {
        base.extend(extra);
    }
}

fn reasons(state: &DesiredState) -> Vec<(Kind, String, Reason)> {
    state
        .problems
        .iter()
        .map(|p| (p.kind, p.key.name.clone(), p.reason))
        .collect()
}

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
