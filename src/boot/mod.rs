//! Network boot: each storage node answers iPXE with a script that logs the machine in to the
//! target of its grant and boots from it (`sanboot`).
//!
//! A machine is known by the MAC address of the card it boots from; an InitiatorAccess with a
//! `boot` block names the cards it boots. Only this node's applied grants are in its table
//! (`table`), the script is text built from them (`script`), and the HTTP side (`endpoint`)
//! refuses by default, limits each source, and logs every script it hands out.

pub mod endpoint;
pub mod script;
pub mod table;

pub use endpoint::{BootOptions, BootTables, ServedScript};
pub use table::{BootEntry, BootTable, Refusal};
