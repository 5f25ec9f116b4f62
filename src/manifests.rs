//! Manifests in files: YAML (one or many documents per file) or JSON, as kubectl reads them.
//! `discus validate` checks them; `discus serve` serves them.

use std::fmt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Secret;
use kube::Resource;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::api::{self, DiscImage, FieldErrors, FieldPath, InitiatorAccess, IscsiTarget};
use crate::desired::{ObjectKey, object_key};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not YAML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error(
        "{path}: more than the {MAX_FILE_BYTES} bytes a manifest file may have; split it into several files"
    )]
    TooLarge { path: PathBuf },
}

/// The largest manifest file discus reads: thousands of targets with their grants fit in a
/// fraction of it, and parsing costs many times the file's size in memory.
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// The manifest files under the given paths: files as given, folders searched recursively for
/// `*.yaml`, `*.yml` and `*.json`, in name order.
pub fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ManifestError> {
    let mut files = Vec::new();
    for path in paths {
        let metadata = std::fs::metadata(path).map_err(|source| ManifestError::Read {
            path: path.clone(),
            source,
        })?;
        if metadata.is_dir() {
            collect_folder(path, &mut files)?;
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

fn collect_folder(folder: &Path, files: &mut Vec<PathBuf>) -> Result<(), ManifestError> {
    let read = |source| ManifestError::Read {
        path: folder.to_owned(),
        source,
    };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(folder)
        .map_err(read)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(read)?;
    entries.sort();
    for entry in entries {
        // Following links; one that leads nowhere is an error, not an absent file: what it
        // declared is not "nothing".
        let metadata = std::fs::metadata(&entry).map_err(|source| ManifestError::Read {
            path: entry.clone(),
            source,
        })?;
        if metadata.is_dir() {
            collect_folder(&entry, files)?;
        } else if entry
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml" || ext == "json")
        {
            files.push(entry);
        }
    }
    Ok(())
}

/// Every non-empty document of a file. JSON is YAML, so one parser reads both.
pub fn read_documents(path: &Path) -> Result<Vec<Value>, ManifestError> {
    use std::io::Read;
    let read = |source| ManifestError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let mut text = String::new();
    // One byte more than allowed tells a file at the limit from one past it, whatever its size
    // said before it was read.
    file.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(ManifestError::TooLarge {
            path: path.to_owned(),
        });
    }

    parse_documents(&text).map_err(|message| ManifestError::Syntax {
        path: path.to_owned(),
        message,
    })
}

pub fn parse_documents(text: &str) -> Result<Vec<Value>, String> {
    // serde-saphyr's default budget stops at 1,024 documents; a folder describing a thousand
    // targets with their grants has more. Alias and anchor limits (billion laughs) stay as they are.
    let mut budget = serde_saphyr::Budget::default();
    budget.max_documents = 1_000_000;
    budget.max_nodes = 50_000_000;
    budget.max_events = 200_000_000;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    // The parser would quote the offending source line, which may hold a Secret's value.
    options.with_snippet = false;
    let documents: Vec<Value> =
        serde_saphyr::from_multiple_with_options(text, options).map_err(|e| syntax_error(&e))?;
    Ok(documents.into_iter().filter(|d| !d.is_null()).collect())
}

/// A YAML error as position and kind, never the text it was found in.
fn syntax_error(error: &serde_saphyr::Error) -> String {
    let message = without_quoted_values(&error.to_string());
    match error.location() {
        Some(at) => format!("line {}, column {}: {message}", at.line(), at.column()),
        None => message,
    }
}

/// serde's `invalid type: string "…", expected …` without the value it quotes, which may be a
/// secret; the expected values it lists (the API's own words) stay.
fn without_echoed_value(message: &str) -> String {
    static ECHOED: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(
            r#"^(invalid (?:type|value|length): [a-z ]+?)\s*("(?:[^"\\]|\\.)*"|'[^']*'|`[^`]*`)"#,
        )
        .unwrap_or_else(|e| panic!("invalid built-in pattern: {e}"))
    });
    let first_line = message.lines().next().unwrap_or_default();
    ECHOED.replace(first_line, "$1").into_owned()
}

/// Drops what a parser or serde quotes from the input (`"…"`, `'…'`, `` `…` ``) and keeps the
/// first line: an error names the place and the rule, never the value, which may be a secret.
pub fn without_quoted_values(message: &str) -> String {
    static QUOTED: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r#"\s*("(?:[^"\\]|\\.)*"?|'[^']*'?|`[^`]*`?)"#)
            .unwrap_or_else(|e| panic!("invalid built-in pattern: {e}"))
    });
    let first_line = message.lines().next().unwrap_or_default();
    QUOTED.replace_all(first_line, "").into_owned()
}

/// A manifest, decoded into its type.
#[derive(Clone, Debug)]
pub enum Manifest {
    DiscImage(DiscImage),
    IscsiTarget(IscsiTarget),
    InitiatorAccess(InitiatorAccess),
    Secret(Secret),
    /// A kind discus does not read (a Namespace, a Deployment…): skipped, not an error.
    Other,
}

/// Where a manifest's object is: its kind, namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectId {
    pub kind: String,
    pub key: ObjectKey,
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", crate::api::printable(&self.kind), self.key)
    }
}

impl ObjectId {
    /// Reads the kind, namespace and name without decoding the rest, so that even a broken
    /// manifest can be named in an error.
    pub fn of(value: &Value) -> Self {
        let text = |pointer: &str| value.pointer(pointer).and_then(Value::as_str);
        Self {
            kind: text("/kind").unwrap_or("<no kind>").to_owned(),
            key: ObjectKey::new(
                text("/metadata/namespace").unwrap_or("default"),
                text("/metadata/name").unwrap_or("<no name>"),
            ),
        }
    }
}

/// Decodes a manifest strictly: a field the type does not have is an error (as with kubectl's
/// strict field validation), so a misspelt `expiresAt` cannot silently leave a grant open forever.
pub fn decode(value: &Value) -> Result<Manifest, FieldErrors> {
    let text = |field: &str| value.get(field).and_then(Value::as_str);
    let mut errors = FieldErrors::new();
    let (Some(api_version), Some(kind)) = (text("apiVersion"), text("kind")) else {
        errors.push(FieldPath::default(), "apiVersion and kind are required");
        return Err(errors);
    };
    let manifest = match (api_version, kind) {
        (api::API_VERSION, "DiscImage") => strict::<DiscImage>(value).map(Manifest::DiscImage),
        (api::API_VERSION, "IscsiTarget") => {
            strict::<IscsiTarget>(value).map(Manifest::IscsiTarget)
        }
        (api::API_VERSION, "InitiatorAccess") => {
            strict::<InitiatorAccess>(value).map(Manifest::InitiatorAccess)
        }
        ("v1", "Secret") => strict::<Secret>(value).map(Manifest::Secret),
        (version, kind) if version.split('/').next() == Some(api::GROUP) => {
            errors.push(
                FieldPath::root("apiVersion"),
                format!(
                    "{kind} in {version} is not part of the API; discus serves DiscImage, IscsiTarget and \
                     InitiatorAccess in {}",
                    api::API_VERSION
                ),
            );
            return Err(errors);
        }
        _ => return Ok(Manifest::Other),
    }?;
    if let Some(meta) = manifest.meta() {
        let path = FieldPath::root("metadata");
        match &meta.name {
            None => errors.push(path.child("name"), "is required"),
            Some(name) => {
                errors.check(&path.child("name"), api::rules::object_name(name));
            }
        }
        if let Some(namespace) = &meta.namespace {
            errors.check(&path.child("namespace"), api::rules::object_name(namespace));
        }
    }
    errors.into_result(manifest)
}

impl Manifest {
    pub fn meta(&self) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta> {
        match self {
            Self::DiscImage(o) => Some(o.meta()),
            Self::IscsiTarget(o) => Some(o.meta()),
            Self::InitiatorAccess(o) => Some(o.meta()),
            Self::Secret(o) => Some(o.meta()),
            Self::Other => None,
        }
    }

    pub fn key(&self) -> Option<ObjectKey> {
        self.meta().map(object_key)
    }

    /// The rules its spec breaks, for discus's kinds (the checks of the files as they are read;
    /// a pass validates again what it serves, once, in its snapshot).
    pub fn spec_errors(&self) -> Option<FieldErrors> {
        match self {
            Self::DiscImage(o) => o.spec.validate().err(),
            Self::IscsiTarget(o) => o.spec.validate().err(),
            Self::InitiatorAccess(o) => o.spec.validate().err(),
            Self::Secret(_) | Self::Other => None,
        }
    }
}

fn strict<T: DeserializeOwned>(value: &Value) -> Result<T, FieldErrors> {
    let mut errors = FieldErrors::new();
    let mut unknown = Vec::new();
    let mut record = |path: serde_ignored::Path<'_>| unknown.push(field_path(&path));
    let deserializer = serde_ignored::Deserializer::new(value, &mut record);
    let decoded = serde_path_to_error::deserialize::<_, T>(deserializer);
    // kube's derived resources read apiVersion and kind without claiming them.
    for path in unknown {
        if !matches!(path.as_str(), "apiVersion" | "kind") {
            errors.push(path, "unknown field");
        }
    }
    match decoded {
        Ok(object) if errors.is_empty() => Ok(object),
        Ok(_) => Err(errors),
        Err(error) => {
            let path = error.path().to_string();
            let message = without_echoed_value(&error.into_inner().to_string());
            errors.push(
                if path == "." {
                    FieldPath::default()
                } else {
                    FieldPath::root(&path)
                },
                message,
            );
            Err(errors)
        }
    }
}

/// `spec.luns[0].readonly`, the way the rest of discus writes paths.
fn field_path(path: &serde_ignored::Path<'_>) -> FieldPath {
    use serde_ignored::Path;
    match path {
        Path::Root => FieldPath::default(),
        Path::Seq { parent, index } => field_path(parent).index(*index),
        Path::Map { parent, key } => field_path(parent).child(key),
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => field_path(parent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_multi_document_yaml_and_skips_empty_documents() {
        let documents = parse_documents(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: lab}\n---\n# only a comment\n---\n\
             apiVersion: discus.dev/v1alpha1\nkind: DiscImage\nmetadata: {name: a}\n...\n",
        )
        .expect("parses");
        assert_eq!(documents.len(), 2);
        assert_eq!(documents[1]["kind"], "DiscImage");
    }

    #[test]
    fn thousands_of_documents_in_one_file_are_read() {
        let text: String = (0..5000)
            .map(|i| format!("---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c{i}}}\n"))
            .collect();
        assert_eq!(parse_documents(&text).expect("parses").len(), 5000);
    }

    #[test]
    fn json_is_read_too() {
        let documents =
            parse_documents(r#"{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}"#)
                .expect("parses");
        assert!(matches!(decode(&documents[0]), Ok(Manifest::Secret(_))));
    }

    #[test]
    fn unknown_fields_are_reported_with_their_path() {
        let value = serde_json::json!({
            "apiVersion": "discus.dev/v1alpha1", "kind": "InitiatorAccess",
            "metadata": {"name": "g", "lables": {}},
            "spec": {"targetRef": {"name": "t"}, "initiatorIqn": "iqn.2026-11.dev.discus:x", "expiresAT": "2026-01-01T00:00:00Z",
                     "chap": {"secretRef": {"name": "s", "key": "x"}}},
        });
        let errors = decode(&value).expect_err("unknown fields");
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "metadata.lables: unknown field",
                "spec.chap.secretRef.key: unknown field",
                "spec.expiresAT: unknown field",
            ]
        );
    }

    #[test]
    fn type_errors_name_the_field() {
        let value = serde_json::json!({
            "apiVersion": "discus.dev/v1alpha1", "kind": "IscsiTarget", "metadata": {"name": "t"},
            "spec": {"luns": [{"lun": "zero", "image": "a"}]},
        });
        let errors = decode(&value).expect_err("type error");
        assert!(
            errors
                .to_string()
                .starts_with("spec.luns[0].lun: invalid type: string, expected"),
            "{errors}"
        );
    }

    #[test]
    fn errors_never_quote_the_values_they_are_about() {
        let secret = serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
            "stringData": {"password": ["hunter2-hunter2"]},
        });
        let errors = decode(&secret).expect_err("a list is not a string");
        assert!(!errors.to_string().contains("hunter2"), "{errors}");
        for text in [
            "apiVersion: v1\nkind: Secret\nstringData:\n  password: \"hunter2-hunter2\n",
            "apiVersion: v1\nkind: Secret\nstringData: {password: hunter2-hunter2\n",
            "apiVersion: v1\nkind: Secret\nstringData:\n  password: 'hunter2-hunter2' x: [\n",
            "apiVersion: v1\nkind: Secret\nstringData:\n  password: hunter2-hunter2\n    bad: indent\n",
        ] {
            let error = parse_documents(text).expect_err("not YAML");
            assert!(!error.contains("hunter2"), "{error}");
            assert!(error.starts_with("line "), "{error}");
        }
    }

    #[test]
    fn a_file_past_the_size_limit_is_refused_unread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("big.yaml");
        let file = std::fs::File::create(&path).expect("create");
        file.set_len(MAX_FILE_BYTES + 1).expect("sparse");
        let error = read_documents(&path).expect_err("too large");
        assert!(error.to_string().contains("more than the"), "{error}");
    }

    #[test]
    fn other_kinds_are_skipped_and_wrong_discus_kinds_are_not() {
        let other = serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {}});
        assert!(matches!(decode(&other), Ok(Manifest::Other)));
        let wrong = serde_json::json!({"apiVersion": "discus.dev/v1", "kind": "DiscImage", "metadata": {"name": "d"}});
        let errors = decode(&wrong).expect_err("unknown version");
        assert!(
            errors
                .to_string()
                .starts_with("apiVersion: DiscImage in discus.dev/v1 is not part of the API")
        );
    }

    #[test]
    fn names_must_be_kubernetes_names() {
        let value = serde_json::json!({
            "apiVersion": "discus.dev/v1alpha1", "kind": "DiscImage", "metadata": {"name": "Debian_12"},
            "spec": {"source": {"file": {"path": "/a"}}, "sha256": "a".repeat(64)},
        });
        let errors = decode(&value).expect_err("bad name");
        assert!(
            errors
                .to_string()
                .starts_with("metadata.name: must be a lower-case RFC 1123 name")
        );
    }
}
