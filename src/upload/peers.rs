//! `GET /v1/images/<sha256>`: a verified uploaded image, to another agent that needs it.
//!
//! An uploaded image reaches one node from its client; every other node that needs it fetches
//! it from a node that holds it (`images::peers`). This is the holding node's side. It answers
//! only a peer token (which only the agents can mint) for that digest, and only with a copy it
//! offers (`images::peers::Offers`): one it holds Ready for an uploaded DiscImage of the token's
//! namespace — whose upload proved those bytes — and hashed since the start (when it was stored,
//! or read again by the scrub, which reads first what was served before the start). It serves the stored raw file, with Range requests so that a
//! dropped transfer resumes; the fetching agent checks the digest of what it got against the
//! one this node published.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tower_http::services::ServeFile;

use super::endpoint::{Endpoint, refused};
use crate::credentials::token::Audience;
use crate::images::Requester;

/// The digest of the bytes a node serves for an image (its raw file): what the fetching agent
/// checks them against.
pub const SERVED_SHA256: HeaderName = HeaderName::from_static("discus-served-sha256");

/// Sends the stored image whose source has digest `sha256`, if the token allows it.
pub(super) async fn image(
    State(endpoint): State<Arc<Endpoint>>,
    Path(sha256): Path<String>,
    request: Request,
) -> Response {
    let scope = match endpoint.scope(request.headers(), Audience::Peer) {
        Ok(scope) => scope,
        Err(answer) => return answer.into_response(),
    };
    if scope.sha256 != sha256 || crate::api::rules::sha256_hex(&sha256).is_err() {
        return refused(StatusCode::FORBIDDEN, "the token is for another image").into_response();
    }
    let requester = Requester::Namespace(scope.namespace.clone());
    let stored = match endpoint.importer.store().lookup(&sha256, &requester) {
        Ok(Some(stored)) => stored,
        Ok(None) => {
            return refused(
                StatusCode::NOT_FOUND,
                "this node holds no verified copy of that image for the token's namespace",
            )
            .into_response();
        }
        Err(error) => {
            tracing::warn!(%error, sha256, "cannot read the store for a peer");
            return refused(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the store")
                .into_response();
        }
    };
    if !endpoint
        .importer
        .peer_offers()
        .offers(&sha256, &scope.namespace)
    {
        return refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node does not offer that image now (not an uploaded image it holds Ready, or \
             not read again since it started); try again shortly",
        )
        .into_response();
    }
    tracing::info!(sha256, namespace = scope.namespace, name = scope.name, range = ?request.headers().get(axum::http::header::RANGE), "sending an uploaded image to a peer");
    let served = ServeFile::new(&stored.path)
        .with_buf_chunk_size(1 << 20)
        .try_call(request)
        .await;
    let mut response = match served {
        Ok(response) => response.into_response(),
        Err(error) => {
            tracing::warn!(%error, sha256, "cannot send a stored image to a peer");
            return refused(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the image")
                .into_response();
        }
    };
    if let Ok(value) = HeaderValue::from_str(&stored.served_sha256) {
        response.headers_mut().insert(SERVED_SHA256, value);
    }
    response
}
