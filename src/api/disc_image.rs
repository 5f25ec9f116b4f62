//! `DiscImage`: where an image comes from and what it must be.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::core::Selector;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::field::{FieldErrors, FieldPath};
use super::{quantity, rules, schema};

const IMMUTABLE_CONTENT: &str =
    "is immutable: a served LUN must never change content under a client; create a new DiscImage";
const IMMUTABLE_FORMAT: &str =
    "is immutable: it decides the bytes that are served; create a new DiscImage";

/// A disc image that storage nodes download, verify and serve. Its content never changes:
/// `source`, `sha256` and `format` are immutable, and a new image is a new DiscImage.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "discus.dev",
    version = "v1alpha1",
    kind = "DiscImage",
    doc = "A disc image that storage nodes download, verify against its SHA-256, and serve through IscsiTargets.",
    namespaced,
    status = "DiscImageStatus",
    shortname = "dimg",
    category = "discus",
    printcolumn(name = "Format", type_ = "string", json_path = ".status.format"),
    printcolumn(name = "Size", type_ = "string", json_path = ".status.virtualSize"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        priority = 1,
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DiscImageSpec {
    /// Where the image comes from: exactly one of `http` or `file`.
    #[x_kube(validation = Rule::new("self == oldSelf").message(IMMUTABLE_CONTENT))]
    pub source: ImageSource,

    /// SHA-256 of the bytes at the source, 64 lower-case hex digits. Nothing is served before the
    /// downloaded bytes match it.
    #[schemars(schema_with = "schema::sha256")]
    #[x_kube(validation = Rule::new("self == oldSelf").message(IMMUTABLE_CONTENT))]
    pub sha256: String,

    /// The image format; `auto` detects it from the image's magic bytes. Anything but `iso` and
    /// `raw` is converted to raw before it is served.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message(IMMUTABLE_FORMAT))]
    pub format: ImageFormat,

    /// Refuse images whose virtual (unpacked) size is larger than this. Defaults to the agent's limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::byte_quantity")]
    pub max_virtual_size: Option<Quantity>,

    /// Fetch the image ahead of time onto the storage nodes this selects. Without it, a node
    /// fetches the image when a target placed on it needs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
}

/// Where an image comes from. More kinds of source may be added; exactly one is set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("(has(self.http) ? 1 : 0) + (has(self.file) ? 1 : 0) + (has(self.upload) ? 1 : 0) == 1").message(ONE_SOURCE))]
#[serde(rename_all = "camelCase")]
pub struct ImageSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileSource>,
    /// Bytes sent by `discus image upload` to a storage node's upload endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<UploadSource>,
}

const ONE_SOURCE: &str = "exactly one of http, file or upload must be set";

/// The image is uploaded with `discus image upload`; it has no settings (yet). The bytes must
/// hash to `spec.sha256` like any other source's.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct UploadSource {}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpSource {
    /// An http or https URL, without credentials.
    #[schemars(schema_with = "schema::http_url")]
    pub url: String,
    /// A Secret with the CA certificates (PEM) to trust for this URL, instead of the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle_secret_ref: Option<SecretKeyRef>,
    /// A Secret whose keys and values are sent as HTTP request headers (for example `Authorization`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_secret_ref: Option<SecretRef>,
}

/// A file on the storage node. Allowed only under the roots the agent is configured with; off by
/// default in a cluster.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FileSource {
    /// An absolute path on the storage node.
    #[schemars(schema_with = "schema::node_path")]
    pub path: String,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// The Secret's name, in the namespace of the object that refers to it.
    #[schemars(schema_with = "schema::object_name")]
    pub name: String,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name, in the namespace of the object that refers to it.
    #[schemars(schema_with = "schema::object_name")]
    pub name: String,
    /// The key in the Secret.
    #[serde(default = "default_ca_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_ca_key() -> String {
    "ca.crt".to_owned()
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    #[default]
    Auto,
    Iso,
    Raw,
    Qcow2,
    Vhdx,
    Vmdk,
}

impl ImageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Iso => "iso",
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
            Self::Vhdx => "vhdx",
            Self::Vmdk => "vmdk",
        }
    }
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DiscImageStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Reconciling` and `Stalled`, as kstatus, Flux and Argo CD read them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The detected format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ImageFormat>,
    /// The size of the served (raw) image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_size: Option<Quantity>,
    /// The verified digest of the source bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The digest of the raw bytes that are served; equal to `sha256` for iso and raw images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_sha256: Option<String>,
    /// One entry per storage node, as that node's agent reported it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["node".into()]))]
    pub nodes: Vec<DiscImageNodeStatus>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DiscImageNodeStatus {
    pub node: String,
    /// The generation of the spec this entry describes: the last its node applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    pub phase: ImagePhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_done: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_total: Option<i64>,
    /// Once ready: the format this node detected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ImageFormat>,
    /// Once ready: the size of the raw image served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_size: Option<Quantity>,
    /// Once ready: the digest of the raw bytes this node serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_sha256: Option<String>,
    /// Why it is not ready on this node (a condition reason: `ImageNotReady`, `BackendLimit`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// While the node awaits the image's upload: where to send it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<NodeEndpointStatus>,
    /// Once ready, for an uploaded image: where the other storage nodes that need it fetch it
    /// from this node (with a token only the agents can make).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<NodeEndpointStatus>,
}

/// Where a node's upload endpoint offers an image: to a client uploading it (`discus image
/// upload` reads it), or to the other agents once the node holds it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeEndpointStatus {
    /// HTTPS URLs of the node's upload endpoint for this image, one per address it listens on.
    pub urls: Vec<String>,
    /// The SHA-256 of the certificate the node serves them with (made at its start): a client
    /// accepts that certificate and no other.
    pub certificate_sha256: String,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ImagePhase {
    #[default]
    Pending,
    /// Awaiting bytes from `discus image upload`.
    Uploading,
    Downloading,
    Verifying,
    Converting,
    Ready,
    Failed,
    /// The node's agent is not reporting: nobody knows.
    Unknown,
}

/// A DiscImage spec that passed every rule.
#[derive(Clone, Debug)]
pub struct ValidImage {
    pub source: ValidSource,
    pub sha256: String,
    pub format: ImageFormat,
    pub max_virtual_size: Option<u64>,
    pub node_selector: Option<Selector>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ValidSource {
    Http {
        url: url::Url,
        ca_bundle: Option<SecretKeyRef>,
        headers: Option<SecretRef>,
    },
    File {
        path: String,
    },
    Upload,
}

impl DiscImageSpec {
    pub fn validate(&self) -> Result<ValidImage, FieldErrors> {
        let spec = FieldPath::root("spec");
        let mut errors = FieldErrors::new();
        let source_path = spec.child("source");
        let source = match (&self.source.http, &self.source.file, &self.source.upload) {
            (Some(http), None, None) => {
                let path = source_path.child("http");
                let url = errors.check(&path.child("url"), rules::http_url(&http.url));
                if let Some(ca) = &http.ca_bundle_secret_ref {
                    let ca_path = path.child("caBundleSecretRef");
                    errors.check(&ca_path.child("name"), rules::object_name(&ca.name));
                    if ca.key.is_empty() {
                        errors.push(ca_path.child("key"), rules::RuleError::Empty.to_string());
                    }
                }
                if let Some(headers) = &http.headers_secret_ref {
                    errors.check(
                        &path.child("headersSecretRef").child("name"),
                        rules::object_name(&headers.name),
                    );
                }
                url.map(|url| ValidSource::Http {
                    url,
                    ca_bundle: http.ca_bundle_secret_ref.clone(),
                    headers: http.headers_secret_ref.clone(),
                })
            }
            (None, None, Some(UploadSource {})) => Some(ValidSource::Upload),
            (None, Some(file), None) => errors
                .check(
                    &source_path.child("file").child("path"),
                    rules::node_path(&file.path),
                )
                .map(|()| ValidSource::File {
                    path: file.path.clone(),
                }),
            _ => {
                errors.push(source_path, ONE_SOURCE);
                None
            }
        };
        errors.check(&spec.child("sha256"), rules::sha256_hex(&self.sha256));
        let max_virtual_size = self
            .max_virtual_size
            .as_ref()
            .and_then(|q| errors.check(&spec.child("maxVirtualSize"), quantity::parse_bytes(q)));
        let node_selector = super::label_selector(
            self.node_selector.as_ref(),
            &spec.child("nodeSelector"),
            &mut errors,
        );
        match source {
            Some(source) if errors.is_empty() => Ok(ValidImage {
                source,
                sha256: self.sha256.clone(),
                format: self.format,
                max_virtual_size,
                node_selector,
            }),
            _ => Err(errors),
        }
    }

    /// The fields that must not change once the image exists, with what changed. The apiserver
    /// enforces this too; `discus serve` has no apiserver and asks here.
    pub fn immutable_changes(&self, old: &DiscImageSpec) -> FieldErrors {
        let spec = FieldPath::root("spec");
        let mut errors = FieldErrors::new();
        if self.source != old.source {
            errors.push(spec.child("source"), IMMUTABLE_CONTENT);
        }
        if self.sha256 != old.sha256 {
            errors.push(spec.child("sha256"), IMMUTABLE_CONTENT);
        }
        if self.format != old.format {
            errors.push(spec.child("format"), IMMUTABLE_FORMAT);
        }
        errors
    }
}
