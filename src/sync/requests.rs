//! The pure translation of DiscImages and their Secrets into import requests: the CA bundle and
//! the headers a source names, taken from its namespace's Secrets.

use std::collections::BTreeMap;

use crate::api::chap::{Password, SecretData};
use crate::api::disc_image::{SecretKeyRef, SecretRef, ValidImage, ValidSource};
use crate::desired::{Kind, ObjectKey, Problem, Reason, Snapshot};
use crate::images::{HttpAuth, ImportRequest, Requester, Source};

/// An import request for every valid DiscImage (the invalid ones are the desired state's
/// problems); those whose Secrets are missing become problems.
pub fn import_requests(
    snapshot: &Snapshot<'_>,
    default_max_virtual_size: u64,
    problems: &mut Vec<Problem>,
) -> BTreeMap<ObjectKey, ImportRequest> {
    let mut requests = BTreeMap::new();
    for image in &snapshot.images {
        let Ok(valid) = &image.valid else {
            continue;
        };
        match request(
            &image.key,
            valid,
            snapshot.secrets,
            default_max_virtual_size,
        ) {
            Ok(request) => {
                requests.insert(image.key.clone(), request);
            }
            Err(message) => problems.push(Problem {
                kind: Kind::DiscImage,
                key: image.key.clone(),
                reason: Reason::SecretNotFound,
                message,
            }),
        }
    }
    requests
}

fn request(
    key: &ObjectKey,
    image: &ValidImage,
    secrets: &BTreeMap<ObjectKey, SecretData>,
    default_max_virtual_size: u64,
) -> Result<ImportRequest, String> {
    let source = match &image.source {
        ValidSource::File { path } => Source::File { path: path.into() },
        ValidSource::Http {
            url,
            ca_bundle,
            headers,
        } => Source::Http {
            url: url.clone(),
            auth: http_auth(key, ca_bundle.as_ref(), headers.as_ref(), secrets)?,
        },
    };
    Ok(ImportRequest {
        requester: Requester::Namespace(key.namespace.clone()),
        source,
        sha256: image.sha256.clone(),
        format: image.format,
        max_virtual_size: image.max_virtual_size.unwrap_or(default_max_virtual_size),
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
