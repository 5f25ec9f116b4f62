//! Tokens: what lets a client send bytes for one DiscImage, or an agent fetch one uploaded image
//! from another node, and nothing else.
//!
//! A token is a JWT (HS256) signed with a key only the agents hold. It names one DiscImage — by
//! uid, so a DiscImage deleted and created again under the same name needs a new token — and
//! the digest its bytes must have, and it expires within the hour. The lease holder writes it
//! into a Secret the DiscImage owns: whoever RBAC lets read that Secret may upload, and nobody
//! else. A node checks the signature, the expiry (with a minute of leeway for clocks between
//! nodes), the audience and the issuer, then that it awaits an upload for that uid and digest.
//!
//! An agent that needs an uploaded image another node holds mints itself a token of the peer
//! audience, for that image's digest on behalf of its DiscImage's namespace: only the agents
//! hold the key, so only an agent has one, and an upload token is no peer token (nor the
//! reverse).
//!
//! The key's id (a digest of the key) travels in the token's header, so that a token signed with
//! a key that was replaced is told apart from a forged one, and minted again.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const ISSUER: &str = "discus";

/// Who a token is for: the audiences are apart, so a token for one never serves the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Audience {
    /// A client sending an image's bytes to a node.
    Upload,
    /// An agent fetching a verified uploaded image from another node.
    Peer,
}

impl Audience {
    fn name(self) -> &'static str {
        match self {
            Self::Upload => "discus-upload",
            Self::Peer => "discus-peer",
        }
    }
}
/// How long a token is valid; the lease holder mints a new one when half of it is gone.
pub const LIFETIME: Duration = Duration::from_secs(3600);
/// The fewest bytes of key: HS256 wants at least its output's 32.
pub const MIN_KEY_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the upload signing key has {0} bytes, fewer than {MIN_KEY_BYTES}")]
    ShortKey(usize),
    #[error("the token was signed with another key (the agents' key was replaced); get a new one")]
    OtherKey,
    #[error("the token has expired; get a new one")]
    Expired,
    #[error("the token is not a valid discus upload token ({0})")]
    Invalid(String),
    #[error("cannot sign a token: {0}")]
    Sign(String),
}

/// What a token allows: sending the bytes of one DiscImage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    /// The DiscImage's uid.
    #[serde(rename = "sub")]
    pub uid: String,
    pub sha256: String,
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    iat: u64,
    exp: u64,
    #[serde(flatten)]
    scope: Scope,
}

/// A minted token: its text is a secret.
pub struct Token {
    pub text: SecretString,
    /// Seconds since the epoch.
    pub expires: u64,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

/// The agents' key. Its bytes never leave it: Debug shows its id only.
pub struct SigningKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
    id: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("id", &self.id).finish()
    }
}

impl SigningKey {
    pub fn from_bytes(key: &[u8]) -> Result<Self, TokenError> {
        if key.len() < MIN_KEY_BYTES {
            return Err(TokenError::ShortKey(key.len()));
        }
        Ok(Self {
            encoding: EncodingKey::from_secret(key),
            decoding: DecodingKey::from_secret(key),
            id: hex::encode(&Sha256::digest(key)[..8]),
        })
    }

    /// A digest of the key, which says which key signed a token without showing it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A token for `scope` and `audience`, valid for [`LIFETIME`] from `now`.
    pub fn mint(
        &self,
        scope: &Scope,
        audience: Audience,
        now: SystemTime,
    ) -> Result<Token, TokenError> {
        let iat = seconds(now);
        let claims = Claims {
            iss: ISSUER.into(),
            aud: audience.name().into(),
            iat,
            exp: iat + LIFETIME.as_secs(),
            scope: scope.clone(),
        };
        let header = Header {
            kid: Some(self.id.clone()),
            ..Header::new(Algorithm::HS256)
        };
        let text = jsonwebtoken::encode(&header, &claims, &self.encoding)
            .map_err(|e| TokenError::Sign(e.to_string()))?;
        Ok(Token {
            text: text.into(),
            expires: claims.exp,
        })
    }

    /// What a token allows, if this key signed it for `audience` and it has not expired.
    pub fn verify(&self, token: &SecretString, audience: Audience) -> Result<Scope, TokenError> {
        let text = token.expose_secret();
        let header =
            jsonwebtoken::decode_header(text).map_err(|e| TokenError::Invalid(e.to_string()))?;
        if header.kid.as_deref() != Some(self.id.as_str()) {
            return Err(TokenError::OtherKey);
        }
        let mut rules = Validation::new(Algorithm::HS256);
        rules.set_audience(&[audience.name()]);
        rules.set_issuer(&[ISSUER]);
        rules.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        let claims = jsonwebtoken::decode::<Claims>(text, &self.decoding, &rules).map_err(|e| {
            match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                kind => TokenError::Invalid(format!("{kind:?}")),
            }
        })?;
        Ok(claims.claims.scope)
    }

    /// When a token that expires at `expires` should be replaced: half its lifetime on.
    pub fn renew_at(expires: u64) -> u64 {
        expires.saturating_sub(LIFETIME.as_secs() / 2)
    }
}

/// The name of the Secret that holds a DiscImage's upload token (`discus image upload` reads
/// it): `<name>-upload`, or, for a name too long for that, its start and a digest of it.
pub fn token_secret_name(image: &str) -> String {
    const SUFFIX: &str = "-upload";
    if image.len() + SUFFIX.len() <= 253 {
        return format!("{image}{SUFFIX}");
    }
    use sha2::Digest;
    let digest = hex::encode(&sha2::Sha256::digest(image)[..8]);
    let start = image
        .get(..200)
        .unwrap_or(image)
        .trim_end_matches(['-', '.']);
    format!("{start}-{digest}{SUFFIX}")
}

fn seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope() -> Scope {
        Scope {
            uid: "0b6a2c1e-57d4-4c7e-9a55-8f3d2b1c0e9a".into(),
            sha256: "ab".repeat(32),
            namespace: "lab".into(),
            name: "installer".into(),
        }
    }

    fn key(byte: u8) -> SigningKey {
        SigningKey::from_bytes(&[byte; 32]).expect("key")
    }

    #[test]
    fn a_token_allows_what_it_names_until_it_expires() {
        let token = key(1)
            .mint(&scope(), Audience::Upload, SystemTime::now())
            .expect("mint");
        assert_eq!(
            key(1).verify(&token.text, Audience::Upload).expect("valid"),
            scope()
        );
        let old = SystemTime::now() - LIFETIME - Duration::from_secs(120);
        let expired = key(1).mint(&scope(), Audience::Upload, old).expect("mint");
        assert!(matches!(
            key(1).verify(&expired.text, Audience::Upload),
            Err(TokenError::Expired)
        ));
    }

    #[test]
    fn a_token_of_another_key_or_a_tampered_one_is_refused() {
        let token = key(1)
            .mint(&scope(), Audience::Upload, SystemTime::now())
            .expect("mint");
        assert!(matches!(
            key(2).verify(&token.text, Audience::Upload),
            Err(TokenError::OtherKey)
        ));
        // The same key id with other claims: the signature no longer matches.
        let text = token.text.expose_secret();
        let mut parts: Vec<&str> = text.split('.').collect();
        let other = key(1)
            .mint(
                &Scope {
                    uid: "1b6a2c1e-57d4-4c7e-9a55-8f3d2b1c0e9a".into(),
                    ..scope()
                },
                Audience::Upload,
                SystemTime::now(),
            )
            .expect("mint");
        let other_text = other.text.expose_secret().to_owned();
        parts[1] = other_text.split('.').nth(1).unwrap_or_default();
        let forged = SecretString::from(parts.join("."));
        assert!(matches!(
            key(1).verify(&forged, Audience::Upload),
            Err(TokenError::Invalid(_))
        ));
        assert!(matches!(
            key(1).verify(&SecretString::from("not a token"), Audience::Upload),
            Err(TokenError::Invalid(_))
        ));
    }

    #[test]
    fn a_token_serves_its_own_audience_only() {
        let upload = key(1)
            .mint(&scope(), Audience::Upload, SystemTime::now())
            .expect("mint");
        let peer = key(1)
            .mint(&scope(), Audience::Peer, SystemTime::now())
            .expect("mint");
        assert!(key(1).verify(&peer.text, Audience::Peer).is_ok());
        assert!(matches!(
            key(1).verify(&upload.text, Audience::Peer),
            Err(TokenError::Invalid(_))
        ));
        assert!(matches!(
            key(1).verify(&peer.text, Audience::Upload),
            Err(TokenError::Invalid(_))
        ));
    }

    #[test]
    fn short_keys_are_refused_and_keys_never_show() {
        assert!(matches!(
            SigningKey::from_bytes(&[1; 16]),
            Err(TokenError::ShortKey(16))
        ));
        let key = key(7);
        let shown = format!("{key:?}");
        assert!(
            shown.contains(key.id()) && !shown.contains("0707"),
            "{shown}"
        );
        let token = key
            .mint(&scope(), Audience::Upload, SystemTime::now())
            .expect("mint");
        let shown = format!("{token:?}");
        assert!(!shown.contains(token.text.expose_secret()), "{shown}");
    }

    #[test]
    fn token_secret_names_fit() {
        assert_eq!(token_secret_name("installer"), "installer-upload");
        let long = "a".repeat(250);
        let name = token_secret_name(&long);
        assert!(name.len() <= 253 && name.ends_with("-upload"), "{name}");
        assert_ne!(name, token_secret_name(&"a".repeat(251)));
    }
}
