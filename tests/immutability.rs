//! What may not change once set is refused the same way by the CRD's CEL rules (which the
//! apiserver runs; tests/apiserver.rs) and by the code `discus serve` runs without an apiserver.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking

mod support;

use discus::api::{DiscImage, IscsiTarget};
use discus::manifests::{Manifest, decode, parse_documents};
use kube::core::cel::Validator;

fn schema(kind: &str) -> serde_json::Value {
    let crd = discus::api::all_crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .expect("crd");
    let schema = crd.spec.versions[0]
        .schema
        .clone()
        .and_then(|s| s.open_api_v3_schema)
        .expect("schema");
    serde_json::to_value(schema).expect("json")
}

#[test]
fn code_and_cel_refuse_every_immutable_change() {
    let folder = support::repo().join("tests/manifests/invalid-updates");
    let mut files: Vec<_> = std::fs::read_dir(folder)
        .expect("folder")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 5);
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        let [old, new] = parse_documents(&text)
            .expect("yaml")
            .try_into()
            .expect("two documents");
        let kind = old["kind"].as_str().expect("kind").to_owned();

        let cel = Validator::new().validate(&schema(&kind), &new, Some(&old));
        let cel = cel.expect_err(&format!("{}: CEL accepted the change", file.display()));
        assert!(
            cel.iter().any(|e| e.message.contains("is immutable")),
            "{}: {cel:?}",
            file.display()
        );

        let code = match (decode(&old).expect("old"), decode(&new).expect("new")) {
            (Manifest::DiscImage(old), Manifest::DiscImage(new)) => {
                immutable::<DiscImage>(&old, &new)
            }
            (Manifest::IscsiTarget(old), Manifest::IscsiTarget(new)) => {
                immutable::<IscsiTarget>(&old, &new)
            }
            _ => panic!("{}: unexpected kinds", file.display()),
        };
        assert!(
            code.contains("is immutable"),
            "{}: code accepted the change: {code}",
            file.display()
        );

        // And the unchanged object is fine for both.
        assert!(
            Validator::new()
                .validate(&schema(&kind), &old, Some(&old))
                .is_ok()
        );
    }
}

trait Immutable {
    fn changes(&self, old: &Self) -> String;
}

impl Immutable for DiscImage {
    fn changes(&self, old: &Self) -> String {
        self.spec.immutable_changes(&old.spec).to_string()
    }
}

impl Immutable for IscsiTarget {
    fn changes(&self, old: &Self) -> String {
        self.spec.immutable_changes(&old.spec).to_string()
    }
}

fn immutable<T: Immutable>(old: &T, new: &T) -> String {
    new.changes(old)
}
