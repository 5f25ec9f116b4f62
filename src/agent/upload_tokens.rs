//! Upload tokens in a cluster (what a token is: `upload::token`).
//!
//! **The key.** The agents sign tokens with one key, kept in a Secret in their own namespace
//! (`discus-upload-key`). The first agent that finds none makes it (random, 32 bytes); every
//! agent reads it at its start and every minute after, so a key replaced by an administrator
//! (delete the Secret) is used everywhere within a minute, and tokens signed with the old one are
//! minted again.
//!
//! **The tokens.** For each DiscImage whose source is an upload and that is not Ready on every
//! node that reported it, the lease holder keeps a token in a Secret the DiscImage owns,
//! `<name>-upload` in its namespace (data: `token`, `expires`, `keyId`), minted again when half
//! its life is gone or the key changed. Whoever RBAC lets read that Secret may upload; nobody
//! else can. A Secret of that name without discus's label and an owner reference to
//! this DiscImage is never touched.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use secrecy::ExposeSecret;

use crate::api::DiscImage;
use crate::api::disc_image::ImagePhase;
use crate::credentials::Keys;
use crate::credentials::token::{Audience, Scope, SigningKey, token_secret_name};
use crate::desired::ObjectKey;

/// The Secret with the agents' signing key, in their namespace.
pub const KEY_SECRET: &str = "discus-upload-key";
const KEY_FIELD: &str = "key";
/// The label of token Secrets.
pub const TOKEN_LABEL: &str = "discus.dev/upload-token";
const MANAGER: &str = "discus-upload-token";
/// How often an agent reads the key again.
const KEY_REFRESH: Duration = Duration::from_secs(60);

/// Keeps `keys` to the key in the agents' Secret, making it if there is none; runs for ever.
pub async fn maintain_key(client: Client, namespace: String, keys: Arc<Keys>) {
    let secrets = Api::<Secret>::namespaced(client, &namespace);
    loop {
        let wait = match load_or_make(&secrets).await {
            Ok(key) => {
                if keys.current().map(|k| k.id().to_owned()).as_deref() != Some(key.id()) {
                    tracing::info!(key_id = key.id(), "upload signing key in use");
                    keys.set(key);
                }
                KEY_REFRESH
            }
            Err(KeyError::Unreachable(error)) => {
                tracing::warn!(%error, secret = KEY_SECRET, "cannot read or make the upload signing key; retrying");
                Duration::from_secs(10)
            }
            Err(KeyError::Invalid(error)) => {
                // A key replaced by one that cannot be used: refuse every token rather than go
                // on with the old one.
                tracing::warn!(%error, secret = KEY_SECRET, "the upload signing key is not usable; every upload token is refused until it is");
                keys.clear();
                KEY_REFRESH
            }
        };
        tokio::time::sleep(wait).await;
    }
}

enum KeyError {
    /// The apiserver did not answer: keep the key as it is.
    Unreachable(String),
    /// The Secret holds no usable key.
    Invalid(String),
}

async fn load_or_make(secrets: &Api<Secret>) -> Result<SigningKey, KeyError> {
    let unreachable = |e: kube::Error| KeyError::Unreachable(e.to_string());
    if let Some(secret) = super::bounded(secrets.get_opt(KEY_SECRET))
        .await
        .map_err(unreachable)?
    {
        return key_of(&secret);
    }
    let mut bytes = vec![0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| KeyError::Unreachable(format!("no randomness from the system: {e}")))?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(KEY_SECRET.to_owned()),
            labels: Some(managed_by()),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([(KEY_FIELD.to_owned(), ByteString(bytes))])),
        ..Secret::default()
    };
    match super::bounded(secrets.create(&PostParams::default(), &secret)).await {
        Ok(created) => key_of(&created),
        // Another agent made it first: use theirs.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let secret = super::bounded(secrets.get(KEY_SECRET))
                .await
                .map_err(unreachable)?;
            key_of(&secret)
        }
        Err(error) => Err(unreachable(error)),
    }
}

fn key_of(secret: &Secret) -> Result<SigningKey, KeyError> {
    let bytes = (secret.data.as_ref())
        .and_then(|d| d.get(KEY_FIELD))
        .ok_or_else(|| {
            KeyError::Invalid(format!("Secret {KEY_SECRET} has no key {KEY_FIELD:?}"))
        })?;
    SigningKey::from_bytes(&bytes.0)
        .map_err(|e| KeyError::Invalid(format!("Secret {KEY_SECRET}: {e}")))
}

fn managed_by() -> BTreeMap<String, String> {
    BTreeMap::from([(
        "app.kubernetes.io/managed-by".to_owned(),
        "discus".to_owned(),
    )])
}

/// What a token Secret says of its token.
struct Minted {
    key_id: String,
    expires: u64,
}

fn minted(secret: &Secret) -> Option<Minted> {
    let data = secret.data.as_ref()?;
    let text = |field: &str| String::from_utf8(data.get(field)?.0.clone()).ok();
    Some(Minted {
        key_id: text("keyId")?,
        expires: text("expires")?.parse().ok()?,
    })
}

/// Whether a DiscImage awaits an upload somewhere: its source is an upload and a node reports
/// that it awaits the bytes.
pub fn awaits_upload(image: &DiscImage) -> bool {
    image.spec.source.upload.is_some()
        && image.uid().is_some()
        && (image.status.as_ref())
            .is_some_and(|s| (s.nodes.iter()).any(|n| n.phase == ImagePhase::Uploading))
}

/// Whether a token Secret that exists is discus's for this DiscImage.
fn owned_by(secret: &Secret, image: &DiscImage) -> bool {
    let labelled = secret.labels().get(TOKEN_LABEL).map(String::as_str) == Some("true");
    let owned = (secret.owner_references().iter()).any(|o| Some(&o.uid) == image.uid().as_ref());
    labelled && owned
}

/// What the lease holder does about one DiscImage's token.
#[derive(Debug, PartialEq, Eq)]
pub enum Due {
    /// Nothing: no upload awaited, or the token is good for a while (until then).
    No(Option<u64>),
    /// A (new) token.
    Mint,
    /// The Secret's name is taken by a Secret discus did not make for this image.
    Taken,
}

/// Whether `image`'s token must be minted at `now` (seconds), given its Secret, if any.
pub fn due(image: &DiscImage, existing: Option<&Secret>, key: &SigningKey, now: u64) -> Due {
    if !awaits_upload(image) {
        return Due::No(None);
    }
    let Some(secret) = existing else {
        return Due::Mint;
    };
    if !owned_by(secret, image) {
        return Due::Taken;
    }
    match minted(secret) {
        Some(m) if m.key_id == key.id() && SigningKey::renew_at(m.expires) > now => {
            Due::No(Some(SigningKey::renew_at(m.expires)))
        }
        _ => Due::Mint,
    }
}

/// The token Secret for `image`, with a token minted at `now`.
pub fn build(image: &DiscImage, key: &SigningKey, now: SystemTime) -> Result<Secret, String> {
    let uid = image.uid().ok_or("the DiscImage has no uid yet")?;
    let name = image.name_any();
    let scope = Scope {
        uid: uid.clone(),
        sha256: image.spec.sha256.clone(),
        namespace: image.namespace().unwrap_or_default(),
        name: name.clone(),
    };
    let minted = key
        .mint(&scope, Audience::Upload, now)
        .map_err(|e| e.to_string())?;
    let mut labels = managed_by();
    labels.insert(TOKEN_LABEL.to_owned(), "true".to_owned());
    let field = |v: &str| ByteString(v.as_bytes().to_vec());
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(token_secret_name(&name)),
            namespace: image.namespace(),
            labels: Some(labels),
            owner_references: Some(vec![OwnerReference {
                api_version: DiscImage::api_version(&()).into_owned(),
                kind: DiscImage::kind(&()).into_owned(),
                name,
                uid,
                ..OwnerReference::default()
            }]),
            ..ObjectMeta::default()
        },
        type_: Some("discus.dev/upload-token".to_owned()),
        data: Some(BTreeMap::from([
            ("token".to_owned(), field(minted.text.expose_secret())),
            ("expires".to_owned(), field(&minted.expires.to_string())),
            ("keyId".to_owned(), field(key.id())),
        ])),
        ..Secret::default()
    })
}

/// Writes a token Secret (server-side apply: made if absent, replaced if due).
pub async fn write(client: &Client, secret: &Secret) -> kube::Result<()> {
    let namespace = secret.namespace().unwrap_or_default();
    let secrets = Api::<Secret>::namespaced(client.clone(), &namespace);
    let name = secret.name_any();
    let params = PatchParams::apply(MANAGER).force();
    super::bounded(secrets.patch(&name, &params, &Patch::Apply(secret)))
        .await
        .map(drop)
}

/// Seconds since the epoch.
pub fn seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The key of a DiscImage's token Secret.
pub fn token_key(image: &DiscImage) -> ObjectKey {
    ObjectKey {
        namespace: image.namespace().unwrap_or_default(),
        name: token_secret_name(&image.name_any()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(nodes: &[ImagePhase]) -> DiscImage {
        let mut image: DiscImage = serde_json::from_value(serde_json::json!({
            "apiVersion": "discus.dev/v1alpha1",
            "kind": "DiscImage",
            "metadata": {"name": "installer", "namespace": "lab", "uid": "0b6a2c1e-57d4-4c7e-9a55-8f3d2b1c0e9a"},
            "spec": {"source": {"upload": {}}, "sha256": "ab".repeat(32)},
        }))
        .expect("DiscImage");
        image.status = Some(crate::api::disc_image::DiscImageStatus {
            nodes: (nodes.iter())
                .map(|phase| crate::api::disc_image::DiscImageNodeStatus {
                    node: "n".into(),
                    phase: *phase,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
        image
    }

    fn key(byte: u8) -> SigningKey {
        SigningKey::from_bytes(&[byte; 32]).expect("key")
    }

    #[test]
    fn a_token_is_minted_while_an_upload_is_awaited_and_again_when_due() {
        let awaiting = image(&[ImagePhase::Uploading, ImagePhase::Ready]);
        let now = SystemTime::now();
        assert_eq!(due(&awaiting, None, &key(1), seconds(now)), Due::Mint);
        let secret = build(&awaiting, &key(1), now).expect("secret");
        let fresh = due(&awaiting, Some(&secret), &key(1), seconds(now));
        assert!(matches!(fresh, Due::No(Some(_))), "{fresh:?}");
        let later = seconds(now) + crate::credentials::token::LIFETIME.as_secs() / 2 + 1;
        assert_eq!(due(&awaiting, Some(&secret), &key(1), later), Due::Mint);
        assert_eq!(
            due(&awaiting, Some(&secret), &key(2), seconds(now)),
            Due::Mint,
            "a new key"
        );
        let ready = image(&[ImagePhase::Ready, ImagePhase::Ready]);
        assert_eq!(due(&ready, None, &key(1), seconds(now)), Due::No(None));
        assert_eq!(due(&image(&[]), None, &key(1), seconds(now)), Due::No(None));
    }

    #[test]
    fn a_secret_discus_did_not_make_for_the_image_is_never_touched() {
        let awaiting = image(&[ImagePhase::Uploading]);
        let mut foreign = build(&awaiting, &key(1), SystemTime::now()).expect("secret");
        foreign.metadata.owner_references = None;
        assert_eq!(
            due(
                &awaiting,
                Some(&foreign),
                &key(1),
                seconds(SystemTime::now())
            ),
            Due::Taken
        );
    }
}
