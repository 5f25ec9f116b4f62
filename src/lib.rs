//! discus serves verified disc images as iSCSI targets from the storage nodes of a Kubernetes
//! cluster, or from one server without a cluster.
#![forbid(unsafe_code)]

pub mod agent;
pub mod api;
pub mod backend;
pub mod boot;
pub mod cli;
pub mod client;
pub mod crds;
pub mod credentials;
pub mod desired;
pub mod fsutil;
pub mod fuzz;
pub mod http;
pub mod http_server;
pub mod images;
pub mod manifests;
pub mod metrics;
pub mod node_runtime;
pub mod reasons;
pub mod standalone;
pub mod status;
pub mod sync;
pub mod telemetry;
pub mod upload;
pub mod validate;
