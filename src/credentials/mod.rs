//! What the agents trust one another and their clients by: a signing key only the agents hold
//! (for short-lived tokens: a client's to upload one image, an agent's to fetch an uploaded
//! image from another), and a key and certificate each node makes at its start, pinned by its
//! digest through status (TLS without a CA to manage).
//!
//! Below `images` and `upload`: the store fetches from peers with these, the upload endpoint
//! checks them.

pub mod tls;
pub mod token;

use std::sync::Arc;

use parking_lot::RwLock;

use token::SigningKey;

/// The agents' signing key as this node knows it: none until it read the key's Secret.
#[derive(Default)]
pub struct Keys {
    current: RwLock<Option<Arc<SigningKey>>>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let id = self.current().map(|k| k.id().to_owned());
        f.debug_struct("Keys").field("current", &id).finish()
    }
}

impl Keys {
    pub fn set(&self, key: SigningKey) {
        *self.current.write() = Some(Arc::new(key));
    }

    /// Forgets the key: every token is refused until one is set.
    pub fn clear(&self) {
        *self.current.write() = None;
    }

    pub fn current(&self) -> Option<Arc<SigningKey>> {
        self.current.read().clone()
    }
}
