//! `discus validate`: the checks the apiserver and the agent make, run on manifest files, so that
//! a GitOps repository finds its mistakes in its own CI.
//!
//! Per object: strict decoding (unknown fields, wrong types), the rules in code, and the CRD's own
//! CEL rules evaluated client-side. Across the files: one name per object, one owner per IQN, and
//! every CHAP Secret a grant names (when the Secret is in the files) holds valid credentials.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use kube::core::cel::{CompiledSchema, Validator, compile_schema};
use serde_json::Value;

use crate::api::chap::{self, ChapCredentials};
use crate::api::{FieldErrors, FieldPath};
use crate::desired::{DEFAULT_IQN_AUTHORITY, ObjectKey};
use crate::manifests::{self, Manifest, ObjectId};

/// One problem in one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub file: PathBuf,
    /// The object, when the problem belongs to one.
    pub object: Option<ObjectId>,
    pub path: FieldPath,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file.display())?;
        if let Some(object) = &self.object {
            write!(f, "{object}: ")?;
        }
        if !self.path.as_str().is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// What was checked, and what was wrong.
#[derive(Debug, Default)]
pub struct Report {
    pub files: usize,
    pub objects: usize,
    pub skipped: usize,
    pub findings: Vec<Finding>,
}

impl Report {
    fn merge(&mut self, other: Report) {
        self.files += other.files;
        self.objects += other.objects;
        self.skipped += other.skipped;
        self.findings.extend(other.findings);
    }
}

/// Checks every manifest under `paths`.
pub fn validate_paths(paths: &[PathBuf]) -> Report {
    let mut report = Report::default();
    let mut files = Vec::new();
    for path in paths {
        match manifests::collect_files(std::slice::from_ref(path)) {
            Ok(found) => files.extend(found),
            Err(error) => report.findings.push(file_finding(path, error.to_string())),
        }
    }
    let mut documents = Vec::new();
    for file in files {
        report.files += 1;
        match manifests::read_documents(&file) {
            Ok(values) => documents.extend(values.into_iter().map(|v| (file.clone(), v))),
            Err(error) => report.findings.push(file_finding(&file, error.to_string())),
        }
    }
    report.merge(validate_documents(&documents));
    report
}

/// Checks documents already read, each with the file it came from.
pub fn validate_documents(documents: &[(PathBuf, Value)]) -> Report {
    let mut report = Report::default();
    CHECKER.with(|checker| checker.check(documents, &mut report));
    report
}

thread_local! {
    // Compiling the CRDs' CEL rules is the expensive part; do it once per thread.
    static CHECKER: Checker = Checker::new();
}

fn file_finding(file: &Path, message: String) -> Finding {
    // The error already names the file.
    let message = message
        .strip_prefix(&format!("{}: ", file.display()))
        .map(str::to_owned)
        .unwrap_or(message);
    Finding {
        file: file.to_owned(),
        object: None,
        path: FieldPath::default(),
        message,
    }
}

/// The CRDs' schemas, compiled once for client-side CEL evaluation.
struct Checker {
    validator: Validator,
    schemas: BTreeMap<String, CompiledSchema>,
}

/// A decoded object and where it came from.
struct Decoded<'a> {
    file: &'a Path,
    id: ObjectId,
    manifest: Manifest,
}

impl Checker {
    fn new() -> Self {
        let schemas = crate::api::all_crds()
            .into_iter()
            .filter_map(|crd| {
                let schema = crd
                    .spec
                    .versions
                    .first()?
                    .schema
                    .as_ref()?
                    .open_api_v3_schema
                    .as_ref()?;
                let schema = serde_json::to_value(schema).ok()?;
                Some((crd.spec.names.kind, compile_schema(&schema)))
            })
            .collect();
        Self {
            validator: Validator::new(),
            schemas,
        }
    }

    fn check(&self, documents: &[(PathBuf, Value)], report: &mut Report) {
        let mut decoded = Vec::new();
        for (file, value) in documents {
            let id = ObjectId::of(value);
            let mut errors = match manifests::decode(value) {
                Ok(Manifest::Other) => {
                    report.skipped += 1;
                    continue;
                }
                Ok(manifest) => {
                    let errors = self.object_errors(&manifest, &id, value);
                    decoded.push(Decoded {
                        file,
                        id: id.clone(),
                        manifest,
                    });
                    errors
                }
                Err(errors) => errors,
            };
            report.objects += 1;
            push_all(report, file, &id, std::mem::take(&mut errors));
        }
        check_unique_names(&decoded, report);
        check_unique_iqns(&decoded, report);
        check_chap_secrets(&decoded, report);
    }

    /// The rules in code, then the CRD's CEL rules for fields the code found nothing wrong with
    /// (the two state the same rules, and one message per mistake is enough).
    fn object_errors(&self, manifest: &Manifest, id: &ObjectId, value: &Value) -> FieldErrors {
        let mut errors = manifest.spec_errors().unwrap_or_default();
        if let Some(schema) = self.schemas.get(&id.kind)
            && let Err(cel) = self.validator.validate_compiled(schema, value, None)
        {
            for error in cel.iter() {
                let path = FieldPath::root(error.field_path.trim_start_matches('.'));
                let covered = errors.iter().any(|e| {
                    e.path.as_str().starts_with(path.as_str())
                        || path.as_str().starts_with(e.path.as_str())
                });
                if !covered {
                    errors.push(path, error.message.clone());
                }
            }
        }
        errors
    }
}

fn push_all(report: &mut Report, file: &Path, id: &ObjectId, errors: FieldErrors) {
    for error in errors {
        report.findings.push(Finding {
            file: file.to_owned(),
            object: Some(id.clone()),
            path: error.path,
            message: error.message,
        });
    }
}

fn push(report: &mut Report, object: &Decoded<'_>, path: FieldPath, message: String) {
    report.findings.push(Finding {
        file: object.file.to_owned(),
        object: Some(object.id.clone()),
        path,
        message,
    });
}

fn check_unique_names(decoded: &[Decoded<'_>], report: &mut Report) {
    let mut seen: BTreeMap<&ObjectId, &Path> = BTreeMap::new();
    for object in decoded {
        if let Some(first) = seen.insert(&object.id, object.file) {
            push(
                report,
                object,
                FieldPath::root("metadata").child("name"),
                format!(
                    "{} is defined twice (also in {})",
                    object.id,
                    first.display()
                ),
            );
        }
    }
}

/// Two targets with one IQN: the apiserver cannot see it, the agents would serve only one.
/// Targets without `spec.iqn` are compared by the default IQN of an agent with the default
/// IQN authority.
fn check_unique_iqns(decoded: &[Decoded<'_>], report: &mut Report) {
    let mut owners: BTreeMap<String, &ObjectId> = BTreeMap::new();
    for object in decoded {
        let Manifest::IscsiTarget(target) = &object.manifest else {
            continue;
        };
        let key = &object.id.key;
        let iqn =
            target.spec.iqn.clone().unwrap_or_else(|| {
                format!("{DEFAULT_IQN_AUTHORITY}:{}.{}", key.namespace, key.name)
            });
        if let Some(owner) = owners.get(&iqn) {
            if **owner == object.id {
                continue; // the same object twice, reported as such
            }
            let message =
                format!("IQN {iqn} is also claimed by {owner}; each target needs its own IQN");
            push(
                report,
                object,
                FieldPath::root("spec").child("iqn"),
                message,
            );
        } else {
            owners.insert(iqn, &object.id);
        }
    }
}

/// Every Secret a grant names, when it is among the files, must hold valid CHAP credentials.
fn check_chap_secrets(decoded: &[Decoded<'_>], report: &mut Report) {
    let secrets: BTreeMap<ObjectKey, &Decoded<'_>> = decoded
        .iter()
        .filter(|d| matches!(d.manifest, Manifest::Secret(_)))
        .map(|d| (d.id.key.clone(), d))
        .collect();
    let mut checked = std::collections::BTreeSet::new();
    for object in decoded {
        let Manifest::InitiatorAccess(grant) = &object.manifest else {
            continue;
        };
        let Some(chap_spec) = &grant.spec.chap else {
            continue;
        };
        let key = object.id.key.sibling(&chap_spec.secret_ref.name);
        let Some(secret_object) = secrets.get(&key) else {
            continue;
        };
        let Manifest::Secret(secret) = &secret_object.manifest else {
            continue;
        };
        if !checked.insert((key, chap_spec.mutual)) {
            continue;
        }
        let data = chap::secret_data(secret);
        if let Err(errors) = ChapCredentials::from_secret_data(&data, chap_spec.mutual) {
            for error in errors {
                let message = format!(
                    "{} (CHAP Secret of InitiatorAccess {})",
                    error.message, object.id.key.name
                );
                push(report, secret_object, error.path, message);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(yaml: &str) -> Vec<String> {
        let documents = manifests::parse_documents(yaml)
            .expect("yaml")
            .into_iter()
            .map(|v| (PathBuf::from("m.yaml"), v))
            .collect::<Vec<_>>();
        let mut report = Report::default();
        Checker::new().check(&documents, &mut report);
        report.findings.iter().map(ToString::to_string).collect()
    }

    const IMAGE: &str = "apiVersion: discus.dev/v1alpha1\nkind: DiscImage\nmetadata: {name: debian, namespace: lab}\n\
        spec:\n  source: {http: {url: 'https://example.com/debian.iso'}}\n  sha256: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n";

    #[test]
    fn a_valid_image_has_no_findings() {
        assert_eq!(check(IMAGE), Vec::<String>::new());
    }

    #[test]
    fn findings_name_file_object_field_and_rule() {
        let bad = IMAGE.replace("https://", "ftp://");
        assert_eq!(
            check(&bad),
            [
                "m.yaml: DiscImage/lab/debian: spec.source.http.url: must be a URL with scheme http or https"
            ]
        );
    }

    #[test]
    fn cel_rules_catch_what_code_does_not_check_twice() {
        // Both the code and the CEL rule refuse a source with both http and file: one finding.
        let both = IMAGE.replace(
            "source: {http: {url: 'https://example.com/debian.iso'}}",
            "source: {http: {url: 'https://example.com/debian.iso'}, file: {path: /srv/a.iso}}",
        );
        assert_eq!(
            check(&both),
            [
                "m.yaml: DiscImage/lab/debian: spec.source: exactly one of http, file or upload must be set"
            ]
        );
    }

    #[test]
    fn duplicate_names_and_iqns_across_files() {
        let target = |name: &str| {
            format!(
                "---\napiVersion: discus.dev/v1alpha1\nkind: IscsiTarget\nmetadata: {{name: {name}, namespace: lab}}\n\
                 spec:\n  iqn: iqn.2026-11.dev.discus:same\n  luns: [{{lun: 0, image: debian}}]\n"
            )
        };
        let findings = check(&format!("{}{}{}", target("a"), target("b"), target("a")));
        assert_eq!(
            findings,
            [
                "m.yaml: IscsiTarget/lab/a: metadata.name: IscsiTarget/lab/a is defined twice (also in m.yaml)",
                "m.yaml: IscsiTarget/lab/b: spec.iqn: IQN iqn.2026-11.dev.discus:same is also claimed by IscsiTarget/lab/a; each target needs its own IQN",
            ]
        );
    }

    #[test]
    fn chap_secrets_named_by_grants_are_checked() {
        let yaml = "apiVersion: discus.dev/v1alpha1\nkind: InitiatorAccess\nmetadata: {name: g, namespace: lab}\n\
            spec:\n  targetRef: {name: t}\n  initiatorIqn: iqn.1993-08.org.debian:01:a\n  chap: {secretRef: {name: s}, mutual: true}\n\
            ---\napiVersion: v1\nkind: Secret\nmetadata: {name: s, namespace: lab}\nstringData: {username: 'a,b', password: short}\n\
            ---\napiVersion: v1\nkind: Secret\nmetadata: {name: unrelated, namespace: lab}\nstringData: {password: short}\n";
        assert_eq!(
            check(yaml),
            [
                "m.yaml: Secret/lab/s: data[username]: must not contain ',' (CHAP Secret of InitiatorAccess g)",
                "m.yaml: Secret/lab/s: data[password]: must be 12 to 16 characters, got 5 (CHAP Secret of InitiatorAccess g)",
                "m.yaml: Secret/lab/s: data[mutualUsername]: is missing (CHAP Secret of InitiatorAccess g)",
                "m.yaml: Secret/lab/s: data[mutualPassword]: is missing (CHAP Secret of InitiatorAccess g)",
            ]
        );
    }
}
