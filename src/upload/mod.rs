//! Uploads into the cluster (`discus image upload`): the HTTPS endpoint a client sends an
//! image's bytes to, and from which the other agents fetch it once the node verified it.
//!
//! The bytes themselves go where a download goes (`images::upload`): hashed as they arrive,
//! verified against the DiscImage's digest, never served before. Who may send or fetch them is
//! `credentials`' business.

pub mod endpoint;
pub mod peers;
