//! The pure translation of DiscImages and their Secrets into import requests: the CA bundle and
//! the headers a source names, taken from its namespace's Secrets.

use std::collections::BTreeMap;

use crate::api::chap::{Password, SecretData};
use crate::api::disc_image::{SecretKeyRef, SecretRef, ValidImage, ValidSource};
use crate::desired::{Kind, ObjectKey, Problem, Reason, Snapshot};
use crate::images::{HttpAuth, ImportRequest, Requester, Source};

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
/// problems); those whose Secrets are missing, or whose upload this node cannot receive, become
/// problems.
pub fn import_requests(
    snapshot: &Snapshot<'_>,
    default_max_virtual_size: u64,
    uploads: &UploadReception,
    problems: &mut Vec<Problem>,
) -> BTreeMap<ObjectKey, ImportRequest> {
    let mut requests = BTreeMap::new();
    for image in &snapshot.images {
        let Ok(valid) = &image.valid else {
            continue;
        };
        let uid = image.object.metadata.uid.as_deref();
        let source = source(&image.key, valid, uid, uploads, snapshot.secrets);
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
    uid: Option<&str>,
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
        ValidSource::Upload => match (uploads, uid) {
            (UploadReception::Off(why), _) => {
                return Err((Reason::UploadUnavailable, why.clone()));
            }
            (UploadReception::On(_), None) => {
                return Err((Reason::NotConverged, "the DiscImage has no uid yet".into()));
            }
            (UploadReception::On(_), Some(uid)) => Source::Upload {
                uid: uid.to_owned(),
            },
        },
    })
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
