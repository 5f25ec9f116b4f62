//! An uploaded image from another node that holds it (peer transfer).
//!
//! An upload reaches one node; every other node that needs the image fetches it from a node
//! whose status entry says it holds a verified copy (`Ready`, with the address and certificate
//! of its endpoint). The fetch is a download like any other — resumed with `Range` after a
//! dropped connection, paced, bounded, hashed as it arrives — with three differences: the node
//! is reached at the address its agent published, whatever the destination policy says (it is
//! in the cluster's own networks); only the certificate it published is accepted; and the
//! request carries a peer token this agent mints with the agents' key. The bytes are the holder's
//! raw file: they must hash to the digest it published for them (`servedSha256`: the source's
//! own digest for iso and raw images, which nothing else may be) before anything is stored.
//!
//! The holder's side: [`Offers`] says what a node gives (the endpoint's `GET` asks it).

use std::collections::BTreeSet;
use std::time::SystemTime;

use parking_lot::RwLock;

use url::Url;

use super::fetch::{FetchError, Fetcher, HttpAuth};
use super::inspect::Format;
use super::progress::ProgressReporter;
use super::sink::{Sink, Written};
use super::{ImportError, ImportRequest, Requester, Store};
use crate::api::chap::Password;
use crate::credentials::Keys;
use crate::credentials::token::{Audience, Scope, TokenError};

/// The path of an uploaded image on a node that holds it.
pub fn path(sha256: &str) -> String {
    format!("/v1/images/{sha256}")
}

/// The nodes an uploaded image may come from, as their status entries say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSource {
    /// The DiscImage's uid and name: what the peer token names.
    pub uid: String,
    pub name: String,
    /// In the order to try them.
    pub copies: Vec<PeerCopy>,
}

/// A node that holds a verified copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCopy {
    pub node: String,
    /// The image's URLs on the node's endpoint (https, an address, [`path`]).
    pub urls: Vec<Url>,
    pub certificate_sha256: String,
    /// The digest of the raw bytes the node serves.
    pub served_sha256: String,
    /// The format the node detected in the source.
    pub format: Format,
}

/// The uploaded images this node gives other nodes: (source digest, namespace) of each it holds
/// `Ready` for an uploaded DiscImage of that namespace and hashed since its start — what its
/// status entries publish. Each pass replaces them.
#[derive(Debug, Default)]
pub struct Offers {
    offered: RwLock<BTreeSet<(String, String)>>,
}

impl Offers {
    pub fn replace(&self, offered: BTreeSet<(String, String)>) {
        *self.offered.write() = offered;
    }

    pub fn offers(&self, sha256: &str, namespace: &str) -> bool {
        let key = (sha256.to_owned(), namespace.to_owned());
        self.offered.read().contains(&key)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error(
        "fetching the uploaded image from another node takes the agents' key, which this \
         node has not read yet"
    )]
    NoKey,
    #[error("cannot make a peer token: {0}")]
    Token(#[from] TokenError),
    #[error("no node holds a verified copy")]
    NoCopy,
    #[error("from node {node}: {source}")]
    Fetch {
        node: String,
        #[source]
        source: FetchError,
    },
    #[error(
        "from node {node}: the bytes' SHA-256 is {actual}, not {expected} as the node published; \
         nothing was kept"
    )]
    Digest {
        node: String,
        expected: String,
        actual: String,
    },
}

/// Fetches the image from the first copy that gives bytes with the digest its node published;
/// returns them (not yet stored) and that copy.
pub(super) async fn fetch<'a>(
    fetcher: &Fetcher,
    keys: Option<&Keys>,
    store: &Store,
    request: &ImportRequest,
    peer: &'a PeerSource,
    progress: &mut ProgressReporter,
) -> Result<(Written, &'a PeerCopy), ImportError> {
    let token = token(keys, request, peer)?;
    let mut last = PeerError::NoCopy;
    for copy in &peer.copies {
        let auth = HttpAuth {
            headers: vec![("authorization".into(), token.clone())],
            pinned_certificate: Some(copy.certificate_sha256.clone()),
            ..HttpAuth::default()
        };
        for url in &copy.urls {
            let sink = Sink::start(store.staging()?)?;
            let pace = fetcher.options().pace();
            let limit = request.max_virtual_size;
            let fetched = fetcher
                .fetch(url, &auth, limit, pace, &sink, progress)
                .await;
            if let Err(source) = fetched {
                tracing::warn!(node = copy.node, %source, "cannot fetch the uploaded image from this node");
                last = PeerError::Fetch {
                    node: copy.node.clone(),
                    source,
                };
                continue;
            }
            let written = sink.finish().await?;
            match check(&written, request, copy) {
                Ok(()) => return Ok((written, copy)),
                Err(error) => last = error,
            }
        }
    }
    Err(ImportError::Peer(last))
}

/// A peer token for the request's digest, on behalf of its namespace.
fn token(
    keys: Option<&Keys>,
    request: &ImportRequest,
    peer: &PeerSource,
) -> Result<Password, PeerError> {
    let key = keys.and_then(Keys::current).ok_or(PeerError::NoKey)?;
    // Peer sources come from DiscImages only; the operator imports from sources of its own.
    let Requester::Namespace(namespace) = &request.requester else {
        return Err(PeerError::NoCopy);
    };
    let scope = Scope {
        uid: peer.uid.clone(),
        sha256: request.sha256.clone(),
        namespace: namespace.clone(),
        name: peer.name.clone(),
    };
    let minted = key.mint(&scope, Audience::Peer, SystemTime::now())?;
    use secrecy::ExposeSecret;
    Ok(Password::new(format!(
        "Bearer {}",
        minted.text.expose_secret()
    )))
}

/// Whether the bytes are the raw image the node published: for an iso or raw image, the
/// source's own bytes.
fn check(written: &Written, request: &ImportRequest, copy: &PeerCopy) -> Result<(), PeerError> {
    let as_it_came = copy.format.is_raw() && copy.served_sha256 != request.sha256;
    if as_it_came || written.sha256 != copy.served_sha256 {
        return Err(PeerError::Digest {
            node: copy.node.clone(),
            expected: copy.served_sha256.clone(),
            actual: written.sha256.clone(),
        });
    }
    Ok(())
}
