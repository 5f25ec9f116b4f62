//! The pure translation of DiscImages and their Secrets into import requests: the CA bundle and
//! the headers a source names, taken from its namespace's Secrets; for an uploaded image, the
//! other nodes whose status entries say they hold it, to fetch it from.

use std::collections::BTreeMap;

use url::Url;

use crate::api::DiscImage;
use crate::api::chap::{Password, SecretData};
use crate::api::disc_image::{
    DiscImageNodeStatus, ImagePhase, SecretKeyRef, SecretRef, ValidImage, ValidSource,
};
use crate::api::rules::sha256_hex;
use crate::desired::{Kind, ObjectKey, Problem, Reason, Snapshot};
use crate::images::inspect::Format;
use crate::images::{HttpAuth, ImportRequest, PeerCopy, PeerSource, Requester, Source, peers};

/// Whether this node receives uploads (`spec.source.upload`), or why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UploadReception {
    /// The node's upload endpoint is on.
    On(Receiving),
    /// Off: the message says how to turn it on, or what to use instead.
    Off(String),
}

/// Where the node's upload endpoint listens, and the certificate it serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receiving {
    pub bound: std::net::SocketAddr,
    pub certificate_sha256: String,
}

impl UploadReception {
    /// An agent whose upload endpoint is off.
    pub fn off_in_agent() -> Self {
        Self::Off(
            "spec.source.upload: this node's upload endpoint is off; turn it on (the chart's              upload.enabled, the agent's --upload-listen) or use an http source"
                .into(),
        )
    }

    /// `discus serve`, which has no uploads.
    pub fn off_in_serve() -> Self {
        Self::Off(
            "spec.source.upload: uploads go to a cluster's storage nodes; `discus serve` reads              images as spec.source.file under --file-root"
                .into(),
        )
    }
}

/// An import request for every valid DiscImage (the invalid ones are the desired state's
/// problems) on the node `node`; those whose Secrets are missing, or whose upload this node
/// cannot receive, become problems.
pub fn import_requests(
    snapshot: &Snapshot<'_>,
    node: &str,
    default_max_virtual_size: u64,
    uploads: &UploadReception,
    problems: &mut Vec<Problem>,
) -> BTreeMap<ObjectKey, ImportRequest> {
    let mut requests = BTreeMap::new();
    for image in &snapshot.images {
        let Ok(valid) = &image.valid else {
            continue;
        };
        let source = match (&valid.source, uploads, image.object.metadata.uid.as_deref()) {
            (ValidSource::Upload, UploadReception::On(_), Some(uid)) => {
                Ok(uploaded(image.object, uid, &valid.sha256, node))
            }
            _ => source(&image.key, valid, uploads, snapshot.secrets),
        };
        match source {
            Ok(source) => {
                let request = ImportRequest {
                    requester: Requester::Namespace(image.key.namespace.clone()),
                    source,
                    sha256: valid.sha256.clone(),
                    format: valid.format,
                    max_virtual_size: valid.max_virtual_size.unwrap_or(default_max_virtual_size),
                };
                requests.insert(image.key.clone(), request);
            }
            Err((reason, message)) => problems.push(Problem {
                kind: Kind::DiscImage,
                key: image.key.clone(),
                reason,
                message,
            }),
        }
    }
    requests
}

fn source(
    key: &ObjectKey,
    image: &ValidImage,
    uploads: &UploadReception,
    secrets: &BTreeMap<ObjectKey, SecretData>,
) -> Result<Source, (Reason, String)> {
    Ok(match &image.source {
        ValidSource::File { path } => Source::File { path: path.into() },
        ValidSource::Http {
            url,
            ca_bundle,
            headers,
        } => Source::Http {
            url: url.clone(),
            auth: http_auth(key, ca_bundle.as_ref(), headers.as_ref(), secrets)
                .map_err(|message| (Reason::SecretNotFound, message))?,
        },
        ValidSource::Upload => match uploads {
            UploadReception::Off(why) => return Err((Reason::UploadUnavailable, why.clone())),
            UploadReception::On(_) => {
                return Err((Reason::NotConverged, "the DiscImage has no uid yet".into()));
            }
        },
    })
}

/// Where an uploaded image comes from on `node`: the other nodes that hold a verified copy, as
/// their entries say; while none does, its client.
fn uploaded(image: &DiscImage, uid: &str, sha256: &str, node: &str) -> Source {
    let entries = image.status.iter().flat_map(|status| &status.nodes);
    let copies: Vec<PeerCopy> = entries
        .filter(|entry| entry.node != node && entry.phase == ImagePhase::Ready)
        .filter_map(|entry| peer_copy(entry, sha256))
        .collect();
    if copies.is_empty() {
        return Source::Upload {
            uid: uid.to_owned(),
        };
    }
    Source::Peer(PeerSource {
        uid: uid.to_owned(),
        name: image.metadata.name.clone().unwrap_or_default(),
        copies,
    })
}

/// A node's copy, if its entry says all a fetch needs, well-formed. Agents write the entries;
/// still, only an https URL of an address, with the image's path, is ever fetched.
fn peer_copy(entry: &DiscImageNodeStatus, sha256: &str) -> Option<PeerCopy> {
    let endpoint = entry.peer.as_ref()?;
    let served_sha256 = entry.served_sha256.clone()?;
    sha256_hex(&served_sha256).ok()?;
    sha256_hex(&endpoint.certificate_sha256).ok()?;
    let format = Format::from_name(entry.format?.as_str())?;
    // An iso or raw image is served as it came: anything else is not that image.
    if format.is_raw() && served_sha256 != sha256 {
        return None;
    }
    let urls: Vec<Url> = (endpoint.urls.iter())
        .filter_map(|text| peer_url(text, sha256))
        .collect();
    (!urls.is_empty()).then(|| PeerCopy {
        node: entry.node.clone(),
        urls,
        certificate_sha256: endpoint.certificate_sha256.clone(),
        served_sha256,
        format,
    })
}

fn peer_url(text: &str, sha256: &str) -> Option<Url> {
    let url = Url::parse(text).ok()?;
    let address = matches!(url.host(), Some(url::Host::Ipv4(_) | url::Host::Ipv6(_)));
    let plain = url.username().is_empty()
        && url.password().is_none()
        && url.query().is_none()
        && url.fragment().is_none();
    (url.scheme() == "https" && address && plain && url.path() == peers::path(sha256))
        .then_some(url)
}

/// The CA bundle and the request headers an http source takes from its namespace's Secrets.
fn http_auth(
    key: &ObjectKey,
    ca_bundle: Option<&SecretKeyRef>,
    headers: Option<&SecretRef>,
    secrets: &BTreeMap<ObjectKey, SecretData>,
) -> Result<HttpAuth, String> {
    let mut auth = HttpAuth::default();
    if let Some(reference) = ca_bundle {
        let data = secrets.get(&key.sibling(&reference.name)).ok_or_else(|| {
            format!(
                "spec.source.http.caBundleSecretRef: Secret {} not found",
                reference.name
            )
        })?;
        let pem = data.get(&reference.key).ok_or_else(|| {
            format!(
                "spec.source.http.caBundleSecretRef: Secret {} has no key {}",
                reference.name, reference.key
            )
        })?;
        auth.ca_bundle = Some(pem.clone());
    }
    if let Some(reference) = headers {
        let data = secrets.get(&key.sibling(&reference.name)).ok_or_else(|| {
            format!(
                "spec.source.http.headersSecretRef: Secret {} not found",
                reference.name
            )
        })?;
        for (name, value) in data {
            let value = String::from_utf8(value.clone()).map_err(|_| {
                format!("spec.source.http.headersSecretRef: the value of {name} is not text")
            })?;
            auth.headers.push((name.clone(), Password::new(value)));
        }
    }
    Ok(auth)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "ab";

    fn digest(byte: &str) -> String {
        byte.repeat(32)
    }

    fn entry(node: &str, phase: &str, url: &str) -> serde_json::Value {
        serde_json::json!({
            "node": node, "phase": phase, "format": "iso", "servedSha256": digest(SHA),
            "peer": {"urls": [url], "certificateSha256": digest("cd")},
        })
    }

    fn image(entries: Vec<serde_json::Value>) -> DiscImage {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "discus.dev/v1alpha1", "kind": "DiscImage",
            "metadata": {"name": "installer", "namespace": "lab", "uid": "u1"},
            "spec": {"source": {"upload": {}}, "sha256": digest(SHA)},
            "status": {"nodes": entries},
        }))
        .expect("a DiscImage")
    }

    #[test]
    fn an_uploaded_image_comes_from_the_other_nodes_that_hold_it_else_from_its_client() {
        let good = format!("https://10.0.0.2:8443/v1/images/{}", digest(SHA));
        // Converted: the raw bytes have a digest of their own.
        let mut converted = entry("converted", "Ready", &good);
        converted["format"] = "qcow2".into();
        converted["servedSha256"] = digest("ef").into();
        // An iso is served as it came: other bytes are not that image.
        let mut other_bytes = entry("other-bytes", "Ready", &good);
        other_bytes["servedSha256"] = digest("ef").into();
        let image = image(vec![
            entry("self", "Ready", &good),
            entry("uploading", "Uploading", &good),
            entry("holder", "Ready", &good),
            entry("plain-http", "Ready", &good.replace("https", "http")),
            entry("named", "Ready", &good.replace("10.0.0.2", "evil.example")),
            entry("elsewhere", "Ready", "https://10.0.0.3:8443/v1/uploads/u1"),
            entry("with-query", "Ready", &format!("{good}?x=1")),
            converted.clone(),
            other_bytes,
        ]);
        let Source::Peer(peer) = uploaded(&image, "u1", &digest(SHA), "self") else {
            panic!("a peer source");
        };
        let nodes: Vec<&str> = peer.copies.iter().map(|c| c.node.as_str()).collect();
        assert_eq!(nodes, ["holder", "converted"]);
        assert_eq!(peer.copies[0].served_sha256, digest(SHA));
        assert_eq!(peer.copies[1].served_sha256, digest("ef"));
        assert_eq!(peer.copies[0].format, Format::Iso);
        assert_eq!((peer.uid.as_str(), peer.name.as_str()), ("u1", "installer"));

        let alone = self::image(vec![entry("self", "Ready", &good)]);
        assert!(matches!(
            uploaded(&alone, "u1", &digest(SHA), "self"),
            Source::Upload { uid } if uid == "u1"
        ));
    }

    #[test]
    fn a_copy_without_a_served_digest_or_a_certificate_is_not_fetched_from() {
        let good = format!("https://10.0.0.2:8443/v1/images/{}", digest(SHA));
        let mut bad_certificate = entry("a", "Ready", &good);
        bad_certificate["peer"]["certificateSha256"] = "nope".into();
        let mut no_digest = entry("b", "Ready", &good);
        no_digest["servedSha256"] = serde_json::Value::Null;
        let mut no_format = entry("c", "Ready", &good);
        no_format["format"] = serde_json::Value::Null;
        let image = image(vec![bad_certificate, no_digest, no_format]);
        assert!(matches!(
            uploaded(&image, "u1", &digest(SHA), "self"),
            Source::Upload { .. }
        ));
    }
}
