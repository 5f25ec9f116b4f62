//! Nothing panics on any input: every leaf of every example is replaced, one at a time, by hostile
//! values, and the result goes through `discus validate` and the desired-state core.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking

use std::collections::BTreeMap;
use std::path::PathBuf;

use discus::desired::{self, Inputs, NodeFacts, ObjectKey, ReadyImage, Settings};
use discus::manifests::{self, Manifest};
use serde_json::{Value, json};

fn hostile() -> Vec<Value> {
    vec![
        Value::Null,
        json!(""),
        json!("x".repeat(10_000)),
        json!("\u{0}\n../../"),
        json!(-1),
        json!(u64::MAX),
        json!(1e300),
        json!(true),
        json!([]),
        json!({}),
        json!([{"lun": 0}, {"lun": 0}]),
        json!("2026-13-45T99:99:99Z"),
    ]
}

/// Every JSON pointer below the root, except apiVersion and kind.
fn leaves(value: &Value) -> Vec<String> {
    let mut pointers = Vec::new();
    let mut stack = vec![String::new()];
    while let Some(pointer) = stack.pop() {
        match value.pointer(&pointer) {
            Some(Value::Object(map)) => stack.extend(map.keys().map(|k| format!("{pointer}/{k}"))),
            Some(Value::Array(items)) => {
                stack.extend((0..items.len()).map(|i| format!("{pointer}/{i}")))
            }
            _ => {}
        }
        if !matches!(pointer.as_str(), "" | "/apiVersion" | "/kind") {
            pointers.push(pointer);
        }
    }
    pointers
}

fn examples() -> Vec<(PathBuf, Value)> {
    let folder = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
    manifests::collect_files(&[folder])
        .expect("examples")
        .into_iter()
        .flat_map(|file| {
            manifests::read_documents(&file)
                .expect("yaml")
                .into_iter()
                .map(move |d| (file.clone(), d))
        })
        .collect()
}

fn desired_state_of(documents: &[Value]) -> desired::DesiredState {
    let (mut images, mut targets, mut grants, mut secrets) =
        (Vec::new(), Vec::new(), Vec::new(), BTreeMap::new());
    for document in documents {
        match manifests::decode(document) {
            Ok(Manifest::DiscImage(o)) => images.push(o),
            Ok(Manifest::IscsiTarget(o)) => targets.push(o),
            Ok(Manifest::InitiatorAccess(o)) => grants.push(o),
            Ok(Manifest::Secret(o)) => {
                let key = desired::object_key(&o.metadata);
                secrets.insert(key, discus::api::chap::secret_data(&o));
            }
            _ => {}
        }
    }
    let ready: BTreeMap<ObjectKey, ReadyImage> = images
        .iter()
        .map(|image| {
            let key = desired::object_key(&image.metadata);
            let ready = ReadyImage {
                path: "/var/lib/discus/x.raw".into(),
                size_bytes: 1 << 20,
                served_sha256: "a".repeat(64),
            };
            (key, ready)
        })
        .collect();
    let node = NodeFacts {
        name: "storage-1".into(),
        labels: BTreeMap::from([("discus.dev/storage".into(), "true".into())]),
        addresses: vec!["10.0.0.1".parse().expect("ip")],
        own_networks: Vec::new(),
    };
    // Every grant held by heartbeat is held: its holder renews.
    let held_until = std::time::Instant::now() + std::time::Duration::from_secs(3600);
    let holds: desired::Holds = (grants.iter())
        .filter(|g| g.spec.heartbeat.is_some())
        .map(|g| {
            (
                desired::object_key(&g.metadata),
                desired::Hold::Held { until: held_until },
            )
        })
        .collect();
    let snapshot = desired::Snapshot::new(&images, &targets, &grants, &secrets);
    desired::desired_state(&Inputs {
        snapshot: &snapshot,
        node: &node,
        ready: &ready,
        settings: &Settings::default(),
        now: "2026-11-21T12:00:00Z".parse().expect("now"),
        holds: Some(&holds),
    })
}

#[test]
fn the_examples_serve_as_expected_before_mutation() {
    let documents: Vec<Value> = examples().into_iter().map(|(_, d)| d).collect();
    let state = desired_state_of(&documents);
    assert!(state.problems.is_empty(), "{:?}", state.problems);
    // The installer, the golden image, the standalone demo and the network boot; eight grants
    // between them (one held by heartbeat), two of them booting a machine.
    assert_eq!(state.targets.len(), 4);
    assert_eq!(state.targets.iter().map(|t| t.acls.len()).sum::<usize>(), 8);
    assert_eq!(state.boots.len(), 2);
}

#[test]
fn hostile_values_anywhere_are_findings_or_problems_never_panics() {
    let documents = examples();
    let values: Vec<Value> = documents.iter().map(|(_, d)| d.clone()).collect();
    let mut runs = 0;
    for (index, (file, document)) in documents.iter().enumerate() {
        for pointer in leaves(document) {
            for replacement in hostile() {
                let mut mutated = document.clone();
                if let Some(slot) = mutated.pointer_mut(&pointer) {
                    *slot = replacement;
                }
                discus::validate::validate_documents(&[(file.clone(), mutated.clone())]);
                let mut world = values.clone();
                world[index] = mutated;
                desired_state_of(&world);
                runs += 1;
            }
        }
    }
    assert!(runs > 1000, "{runs}");
}
