//! CHAP credentials read from a Secret. Passwords are redacted in every `Debug` and `Display`.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::Secret;
use secrecy::{ExposeSecret, SecretString};

use super::field::{FieldErrors, FieldPath};
use super::rules;

pub const USERNAME_KEY: &str = "username";
pub const PASSWORD_KEY: &str = "password";
pub const MUTUAL_USERNAME_KEY: &str = "mutualUsername";
pub const MUTUAL_PASSWORD_KEY: &str = "mutualPassword";

/// A CHAP secret. Compared by value (the planner must notice a rotated secret), shown as
/// `<redacted>`.
#[derive(Clone)]
pub struct Password(SecretString);

impl Password {
    pub fn new(secret: String) -> Self {
        Self(SecretString::from(secret))
    }

    /// The secret itself, for the one place that hands it to the target.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl PartialEq for Password {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl Eq for Password {}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One direction of CHAP: the name and secret one side proves it knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChapAccount {
    pub username: String,
    pub password: Password,
}

/// What an ACL needs: the initiator's account and, for mutual CHAP, the target's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChapCredentials {
    pub initiator: ChapAccount,
    pub mutual: Option<ChapAccount>,
}

/// The data of a Secret with `stringData` folded in, as the apiserver stores it.
pub type SecretData = BTreeMap<String, Vec<u8>>;

pub fn secret_data(secret: &Secret) -> SecretData {
    let mut data: SecretData = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in secret.string_data.iter().flatten() {
        data.insert(k.clone(), v.clone().into_bytes());
    }
    data
}

impl ChapCredentials {
    /// Reads and checks the credentials in a Secret's data. Errors name the Secret's keys
    /// (`data[password]`) and never contain a secret.
    pub fn from_secret_data(data: &SecretData, mutual: bool) -> Result<Self, FieldErrors> {
        let root = FieldPath::root("data");
        let mut errors = FieldErrors::new();
        let mut read =
            |key: &str, check: fn(&str) -> Result<(), rules::RuleError>| -> Option<String> {
                let path = root.key(key);
                let Some(bytes) = data.get(key) else {
                    errors.push(path, "is missing");
                    return None;
                };
                let Ok(text) = std::str::from_utf8(bytes) else {
                    errors.push(path, "must be UTF-8 text");
                    return None;
                };
                errors.check(&path, check(text)).map(|()| text.to_owned())
            };
        let username = read(USERNAME_KEY, rules::chap_username);
        let password = read(PASSWORD_KEY, rules::chap_secret);
        let mutual_account = if mutual {
            let username = read(MUTUAL_USERNAME_KEY, rules::chap_username);
            let password = read(MUTUAL_PASSWORD_KEY, rules::chap_secret);
            username.zip(password)
        } else {
            None
        };
        if let (Some(p), Some((_, mp))) = (&password, &mutual_account)
            && p == mp
        {
            errors.push(
                root.key(MUTUAL_PASSWORD_KEY),
                "must differ from password: each direction of CHAP needs its own secret (RFC 3720 §8.2.1)",
            );
        }
        match (username, password) {
            (Some(username), Some(password)) if errors.is_empty() => Ok(Self {
                initiator: ChapAccount {
                    username,
                    password: Password::new(password),
                },
                mutual: mutual_account.map(|(username, password)| ChapAccount {
                    username,
                    password: Password::new(password),
                }),
            }),
            _ => Err(errors),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> SecretData {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn reads_one_way_and_mutual_credentials() {
        let one_way = data(&[("username", "host-a"), ("password", "s3cret-s3cret")]);
        let creds = ChapCredentials::from_secret_data(&one_way, false).expect("valid");
        assert_eq!(creds.initiator.username, "host-a");
        assert_eq!(creds.initiator.password.expose(), "s3cret-s3cret");
        assert!(creds.mutual.is_none());

        let mutual = data(&[
            ("username", "host-a"),
            ("password", "s3cret-s3cret"),
            ("mutualUsername", "target"),
            ("mutualPassword", "other-secret-1"),
        ]);
        let creds = ChapCredentials::from_secret_data(&mutual, true).expect("valid");
        assert_eq!(creds.mutual.expect("mutual").username, "target");
    }

    /// Secret data, whether mutual CHAP is asked for, and the expected error.
    type Case<'a> = (&'a [(&'a str, &'a str)], bool, &'a str);

    #[test]
    fn refuses_bad_credentials_naming_the_key() {
        let cases: &[Case<'_>] = &[
            (
                &[("password", "s3cret-s3cret")],
                false,
                "data[username]: is missing",
            ),
            (
                &[("username", "a,b"), ("password", "s3cret-s3cret")],
                false,
                "data[username]: must not contain ','",
            ),
            (
                &[("username", "a"), ("password", "short")],
                false,
                "data[password]: must be 12 to 16 characters, got 5",
            ),
            (
                &[("username", "a"), ("password", "seventeen-chars-x")],
                false,
                "data[password]: must be 12 to 16",
            ),
            (
                &[("username", "a"), ("password", "s3cret-s3cret\n")],
                false,
                "data[password]: must not contain control",
            ),
            (
                &[("username", "a"), ("password", "s3cret-s3cret")],
                true,
                "data[mutualUsername]: is missing",
            ),
            (
                &[
                    ("username", "a"),
                    ("password", "s3cret-s3cret"),
                    ("mutualUsername", "t"),
                    ("mutualPassword", "s3cret-s3cret"),
                ],
                true,
                "data[mutualPassword]: must differ from password",
            ),
        ];
        for (pairs, mutual, expected) in cases {
            let errors =
                ChapCredentials::from_secret_data(&data(pairs), *mutual).expect_err(expected);
            assert!(
                errors.to_string().contains(expected),
                "{errors} should contain {expected}"
            );
        }
    }

    #[test]
    fn secrets_never_show_in_debug_or_errors() {
        let secret = data(&[("username", "host-a"), ("password", "topsecretvalue")]);
        let creds = ChapCredentials::from_secret_data(&secret, false).expect("valid");
        assert!(!format!("{creds:?}").contains("topsecretvalue"));
        let bad = data(&[
            ("username", "host-a"),
            ("password", "topsecretvalue-too-long"),
        ]);
        let errors = ChapCredentials::from_secret_data(&bad, false).expect_err("too long");
        assert!(!errors.to_string().contains("topsecretvalue"));
    }

    #[test]
    fn string_data_is_folded_into_data() {
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s"},
            "data": {"username": "aG9zdC1h", "password": "b2xkLXZhbHVlLXh4eA=="},
            "stringData": {"password": "new-value-xxxx"},
        }))
        .expect("secret");
        let data = secret_data(&secret);
        assert_eq!(data["username"], b"host-a");
        assert_eq!(data["password"], b"new-value-xxxx");
    }
}
