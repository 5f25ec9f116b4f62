//! CHAP Secrets for grants with `chap.generateSecret: true`: the lease holder creates the named
//! Secret when it does not exist, with random values, owned by the grant (so it goes with it).
//! An existing Secret is never changed, whoever made it: rotating is deleting it.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::PostParams;
use kube::{Api, Client, Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::api::InitiatorAccess;
use crate::api::chap::{MUTUAL_PASSWORD_KEY, MUTUAL_USERNAME_KEY, PASSWORD_KEY, USERNAME_KEY};
use crate::desired::ObjectKey;

/// 16 characters (the most CHAP allows here) from 62: about 95 bits.
const PASSWORD_CHARS: usize = 16;
const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("no randomness from the system: {0}")]
    Random(getrandom::Error),
    #[error("the grant has no uid yet")]
    NoUid,
}

/// The Secret a grant asks discus to generate, if it asks and the Secret is not there.
pub fn wanted(grant: &InitiatorAccess, exists: &dyn Fn(&ObjectKey) -> bool) -> Option<ObjectKey> {
    let chap = grant.spec.chap.as_ref().filter(|c| c.generate_secret)?;
    let key = ObjectKey {
        namespace: grant.namespace().unwrap_or_default(),
        name: chap.secret_ref.name.clone(),
    };
    (!exists(&key)).then_some(key)
}

/// A new Secret with random credentials for `grant`, owned by it.
pub fn build(grant: &InitiatorAccess, key: &ObjectKey) -> Result<Secret, GenerateError> {
    let uid = grant.uid().ok_or(GenerateError::NoUid)?;
    let mutual = grant.spec.chap.as_ref().is_some_and(|c| c.mutual);
    // Usernames are not secret; derived from the grant, they are stable and tell whose they are.
    let id = &hex::encode(Sha256::digest(format!(
        "{}/{}",
        key.namespace,
        grant.name_any()
    )))[..12];
    let mut data = BTreeMap::new();
    let mut put = |k: &str, v: String| data.insert(k.to_owned(), ByteString(v.into_bytes()));
    put(USERNAME_KEY, format!("discus-{id}"));
    put(PASSWORD_KEY, password()?);
    if mutual {
        put(MUTUAL_USERNAME_KEY, format!("discus-target-{id}"));
        put(MUTUAL_PASSWORD_KEY, password()?);
    }
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(key.name.clone()),
            namespace: Some(key.namespace.clone()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "discus".to_owned(),
            )])),
            owner_references: Some(vec![OwnerReference {
                api_version: InitiatorAccess::api_version(&()).into_owned(),
                kind: InitiatorAccess::kind(&()).into_owned(),
                name: grant.name_any(),
                uid,
                ..OwnerReference::default()
            }]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(data),
        ..Secret::default()
    })
}

/// Creates the Secret; one that appeared meanwhile is left as it is.
pub async fn create(client: &Client, secret: &Secret) -> kube::Result<bool> {
    let namespace = secret.namespace().unwrap_or_default();
    let secrets = Api::<Secret>::namespaced(client.clone(), &namespace);
    match super::bounded(secrets.create(&PostParams::default(), secret)).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(error) => Err(error),
    }
}

/// A random password of letters and digits, without bias (bytes past the last whole multiple
/// of the alphabet are drawn again).
fn password() -> Result<String, GenerateError> {
    let limit = u8::MAX - (u8::MAX % ALPHABET.len() as u8);
    let mut password = String::with_capacity(PASSWORD_CHARS);
    let mut bytes = [0u8; 32];
    while password.len() < PASSWORD_CHARS {
        getrandom::fill(&mut bytes).map_err(GenerateError::Random)?;
        for &byte in bytes.iter().filter(|&&b| b < limit) {
            if password.len() == PASSWORD_CHARS {
                break;
            }
            password.push(char::from(ALPHABET[usize::from(byte) % ALPHABET.len()]));
        }
    }
    Ok(password)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::chap::ChapCredentials;

    fn grant(yaml: serde_json::Value) -> InitiatorAccess {
        serde_json::from_value(yaml).expect("grant")
    }

    fn generated(mutual: bool) -> InitiatorAccess {
        grant(serde_json::json!({
            "apiVersion": "discus.dev/v1alpha1", "kind": "InitiatorAccess",
            "metadata": {"name": "client", "namespace": "lab", "uid": "1234"},
            "spec": {"targetRef": {"name": "boot"}, "initiatorIqn": "iqn.2026-11.dev.discus:client",
                     "chap": {"secretRef": {"name": "client-chap"}, "generateSecret": true, "mutual": mutual}},
        }))
    }

    fn data(secret: &Secret) -> crate::api::chap::SecretData {
        crate::api::chap::secret_data(secret)
    }

    #[test]
    fn only_grants_that_ask_and_miss_their_secret_get_one() {
        let asks = generated(false);
        let key = ObjectKey {
            namespace: "lab".into(),
            name: "client-chap".into(),
        };
        assert_eq!(wanted(&asks, &|_| false), Some(key));
        assert!(
            wanted(&asks, &|_| true).is_none(),
            "an existing Secret is kept"
        );
        let mut plain = asks.clone();
        if let Some(chap) = plain.spec.chap.as_mut() {
            chap.generate_secret = false;
        }
        assert!(wanted(&plain, &|_| false).is_none());
    }

    #[test]
    fn a_generated_secret_passes_the_rules_and_belongs_to_its_grant() {
        for mutual in [false, true] {
            let grant = generated(mutual);
            let key = wanted(&grant, &|_| false).expect("wanted");
            let secret = build(&grant, &key).expect("built");
            let credentials =
                ChapCredentials::from_secret_data(&data(&secret), mutual).expect("valid CHAP");
            assert_eq!(
                credentials.initiator.password.expose().len(),
                PASSWORD_CHARS
            );
            assert_eq!(credentials.mutual.is_some(), mutual);
            let owner = &secret.metadata.owner_references.as_ref().expect("owner")[0];
            assert_eq!(
                (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
                ("InitiatorAccess", "client", "1234")
            );
            assert_eq!(secret.metadata.namespace.as_deref(), Some("lab"));
        }
    }

    #[test]
    fn passwords_differ_and_use_the_whole_alphabet() {
        let passwords: Vec<String> = (0..200).map(|_| password().expect("random")).collect();
        let distinct: std::collections::BTreeSet<&String> = passwords.iter().collect();
        assert_eq!(distinct.len(), passwords.len());
        let used: std::collections::BTreeSet<char> =
            passwords.iter().flat_map(|p| p.chars()).collect();
        assert_eq!(used.len(), ALPHABET.len(), "3200 draws cover 62 characters");
    }
}
