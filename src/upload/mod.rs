//! Uploads into the cluster (`discus image upload`): who may send bytes for a DiscImage, and
//! how a node proves who it is to the client sending them.
//!
//! The bytes themselves go where a download goes (`images::upload`): hashed as they arrive,
//! verified against the DiscImage's digest, never served before.

pub mod endpoint;
pub mod tls;
pub mod token;
