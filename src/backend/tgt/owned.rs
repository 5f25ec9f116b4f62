//! What discus created in tgtd, remembered across restarts in `owned.json` (tgtd has no place
//! for a tag), and how each operation changes that record — before it runs (what might be
//! half-done) and after it succeeded.

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};

use super::plan::TgtOp;
use crate::api::chap::Password;

/// What discus created in tgtd, remembered across restarts (tgtd has no place for a tag).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Owned {
    pub targets: BTreeSet<String>,
    /// Account name → fingerprint of the password tgtd holds for it (tgtd never shows one), or
    /// `None` while it is being changed: an account whose password discus does not know for
    /// certain is made again, never trusted.
    pub accounts: BTreeMap<String, Option<String>>,
    /// Random, per data directory, so that fingerprints say nothing about the passwords.
    pub salt: String,
}

impl Owned {
    pub fn fingerprint(&self, password: &Password) -> String {
        let mut hash = Sha256::new();
        hash.update(self.salt.as_bytes());
        hash.update([0]);
        hash.update(password.expose().as_bytes());
        hex::encode(hash.finalize())
    }

    /// Records what `op` is about to change, and whether that changed the record: a target is
    /// owned before it exists, and an account's password is marked unknown before tgtd changes
    /// it (so that the record never claims a password tgtd does not hold).
    pub fn before(&mut self, op: &TgtOp) -> bool {
        match op {
            TgtOp::CreateTarget { iqn, .. } => self.targets.insert(iqn.clone()),
            TgtOp::CreateAccount { user, .. } | TgtOp::DeleteAccount { user } => {
                self.accounts.insert(user.clone(), None) != Some(None)
            }
            _ => false,
        }
    }

    /// Records what `op` changed once tgtd did it, and whether that changed the record.
    pub fn after(&mut self, op: &TgtOp) -> bool {
        match op {
            TgtOp::DeleteTarget { iqn, .. } => self.targets.remove(iqn),
            TgtOp::CreateAccount { user, password } => {
                let known = Some(self.fingerprint(password));
                self.accounts.insert(user.clone(), known.clone()) != Some(known)
            }
            TgtOp::DeleteAccount { user } => self.accounts.remove(user).is_some(),
            _ => false,
        }
    }

    /// Whether tgtd is known to hold `password` for `user`.
    pub fn matches(&self, user: &str, password: &Password) -> bool {
        self.accounts
            .get(user)
            .is_some_and(|known| known.as_deref() == Some(self.fingerprint(password).as_str()))
    }
}
