//! The upload endpoint (HTTPS, off unless enabled): where `discus image upload` sends bytes.
//!
//! ```text
//! HEAD  /v1/uploads/<DiscImage uid>    where the upload stands: Upload-Offset, Upload-Length
//! PATCH /v1/uploads/<DiscImage uid>    appends the body at Upload-Offset (the held bytes, or 0
//!                                      to start again) of an upload of Upload-Length bytes
//! GET   /v1/images/<sha256>            a verified uploaded image, to another agent (`peers`)
//! ```
//!
//! The headers are those of the tus resumable-upload protocol, and mean the same. Every request
//! carries `Authorization: Bearer <token>` (see `token`): a token for another DiscImage, an
//! expired one or a forged one gets nothing, not even whether this node awaits an upload. The
//! bytes go to the node's uploads (`images::upload`), which judge offsets, lengths, space and
//! pace, and verify the digest before anything is stored. Answers are JSON: where the upload
//! stands, or an error that says what to do.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch};
use secrecy::SecretString;
use tokio::net::TcpListener;

use crate::credentials::Keys;
use crate::credentials::tls::NodeIdentity;
use crate::credentials::token::{Audience, Scope, TokenError};
use crate::http_server::{self, Limits};
use crate::images::Importer;
use crate::images::fetch::FetchError;
use crate::images::upload::{Appended, Held, UploadError};

pub const OFFSET: HeaderName = HeaderName::from_static("upload-offset");
pub const LENGTH: HeaderName = HeaderName::from_static("upload-length");

/// The path of a DiscImage's upload.
pub fn path(uid: &str) -> String {
    format!("/v1/uploads/{uid}")
}

/// Where the endpoint listens, with what certificate, checking tokens with which key.
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    pub address: SocketAddr,
    pub identity: Arc<NodeIdentity>,
    pub keys: Arc<Keys>,
}

pub(super) struct Endpoint {
    pub(super) importer: Arc<Importer>,
    keys: Arc<Keys>,
}

/// Uploads are long: an exchange may take hours, as long as bytes keep coming at the pace the
/// uploads ask for. Few at once, and few per client.
fn limits() -> Limits {
    Limits {
        connections: 32,
        per_address: 8,
        per_network: 16,
        head_deadline: Duration::from_secs(10),
        exchange_deadline: Duration::from_secs(24 * 3600),
    }
}

/// Starts serving; returns the address bound.
pub async fn start(
    config: &EndpointConfig,
    importer: Arc<Importer>,
) -> Result<SocketAddr, std::io::Error> {
    let keys = Arc::clone(&config.keys);
    let tls = config.identity.acceptor().map_err(std::io::Error::other)?;
    let listener = TcpListener::bind(config.address).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/v1/uploads/{uid}", patch(append).head(status))
        .route("/v1/images/{sha256}", get(super::peers::image))
        .with_state(Arc::new(Endpoint { importer, keys }));
    tokio::spawn(http_server::serve_tls(
        listener,
        app,
        limits(),
        "upload",
        tls,
    ));
    tracing::info!(address = %bound, fingerprint = config.identity.fingerprint(), "serving uploads over HTTPS");
    Ok(bound)
}

/// An answer: a status, where the upload stands (when known), and a message.
pub(super) struct Answer {
    status: StatusCode,
    held: Option<Held>,
    message: String,
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "bytes": self.held.map(|h| h.bytes),
            "length": self.held.and_then(|h| h.length),
            "message": self.message,
        });
        let mut response = (self.status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(held) = self.held {
            headers.insert(OFFSET, HeaderValue::from(held.bytes));
            if let Some(length) = held.length {
                headers.insert(LENGTH, HeaderValue::from(length));
            }
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        response
    }
}

pub(super) fn refused(status: StatusCode, message: impl ToString) -> Answer {
    Answer {
        status,
        held: None,
        message: message.to_string(),
    }
}

async fn status(
    State(endpoint): State<Arc<Endpoint>>,
    Path(uid): Path<String>,
    headers: HeaderMap,
) -> Answer {
    let scope = match endpoint.authorize(&headers, &uid) {
        Ok(scope) => scope,
        Err(answer) => return answer,
    };
    match endpoint.importer.uploads().held(&uid, &scope.sha256) {
        Ok(held) => Answer {
            status: StatusCode::OK,
            held: Some(held),
            message: "awaiting the rest".into(),
        },
        Err(error) => answer(error),
    }
}

async fn append(
    State(endpoint): State<Arc<Endpoint>>,
    Path(uid): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Answer {
    let scope = match endpoint.authorize(&headers, &uid) {
        Ok(scope) => scope,
        Err(answer) => return answer,
    };
    let (Some(offset), Some(length)) = (number(&headers, &OFFSET), number(&headers, &LENGTH))
    else {
        return refused(
            StatusCode::BAD_REQUEST,
            "Upload-Offset and Upload-Length must be given, as whole numbers",
        );
    };
    let announced = number(&headers, &header::CONTENT_LENGTH);
    let uploads = endpoint.importer.uploads();
    let appended = uploads
        .append(
            &uid,
            &scope.sha256,
            offset,
            length,
            announced,
            body.into_data_stream(),
        )
        .await;
    match appended {
        Ok(Appended::Partial(held)) => Answer {
            status: StatusCode::OK,
            held: Some(held),
            message: "received; send the rest".into(),
        },
        Ok(Appended::Verified) => Answer {
            status: StatusCode::CREATED,
            held: Some(Held {
                bytes: length,
                length: Some(length),
            }),
            message: "received and verified against spec.sha256; the node imports it".into(),
        },
        Err(error) => {
            tracing::info!(uid, %error, "upload request refused or ended");
            answer(error)
        }
    }
}

impl Endpoint {
    /// The scope of the request's upload token, which must be for `uid`.
    fn authorize(&self, headers: &HeaderMap, uid: &str) -> Result<Scope, Answer> {
        let scope = self.scope(headers, Audience::Upload)?;
        if scope.uid != uid {
            return Err(refused(
                StatusCode::FORBIDDEN,
                "the token is for another DiscImage",
            ));
        }
        Ok(scope)
    }

    /// The scope of the request's token, if the agents' key signed it for `audience`.
    pub(super) fn scope(&self, headers: &HeaderMap, audience: Audience) -> Result<Scope, Answer> {
        let Some(key) = self.keys.current() else {
            return Err(refused(
                StatusCode::SERVICE_UNAVAILABLE,
                "this node has not read the agents' upload key yet; try again shortly",
            ));
        };
        let token = bearer(headers).ok_or_else(|| {
            refused(
                StatusCode::UNAUTHORIZED,
                "no token: send Authorization: Bearer <token>",
            )
        })?;
        key.verify(&token, audience).map_err(|error| {
            let status = match error {
                TokenError::Sign(_) | TokenError::ShortKey(_) => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::UNAUTHORIZED,
            };
            refused(status, error)
        })
    }
}

fn bearer(headers: &HeaderMap) -> Option<SecretString> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ")?.trim();
    (!token.is_empty()).then(|| SecretString::from(token.to_owned()))
}

fn number(headers: &HeaderMap, name: &HeaderName) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

fn answer(error: UploadError) -> Answer {
    if let UploadError::Space(FetchError::NoSpace {
        needed, available, ..
    }) = &error
    {
        // Without the node's paths.
        return refused(
            StatusCode::INSUFFICIENT_STORAGE,
            format!(
                "the node has {available} bytes free and the rest of the upload needs {needed}: \
                 nothing was kept; free space on the node and try again"
            ),
        );
    }
    let held = match &error {
        UploadError::Offset { held }
        | UploadError::Idle { held, .. }
        | UploadError::TooSlow { held, .. }
        | UploadError::Interrupted { held, .. } => Some(Held {
            bytes: *held,
            length: None,
        }),
        _ => None,
    };
    let status = match &error {
        UploadError::Uid(_) | UploadError::Interrupted { .. } => StatusCode::BAD_REQUEST,
        UploadError::NotAwaited => StatusCode::NOT_FOUND,
        UploadError::OtherDigest
        | UploadError::InProgress
        | UploadError::Offset { .. }
        | UploadError::Length { .. } => StatusCode::CONFLICT,
        UploadError::TooLarge { .. } | UploadError::TooLong { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        UploadError::Space(_) => StatusCode::INSUFFICIENT_STORAGE,
        UploadError::Idle { .. } | UploadError::TooSlow { .. } => StatusCode::REQUEST_TIMEOUT,
        UploadError::DigestMismatch { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        UploadError::Busy(_) | UploadError::Abandoned => StatusCode::SERVICE_UNAVAILABLE,
        UploadError::Store(_) | UploadError::Io(_) => {
            tracing::warn!(%error, "the upload could not be written");
            return refused(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the node could not write the upload (its log says why); try again later",
            );
        }
    };
    Answer {
        status,
        held,
        message: error.to_string(),
    }
}
