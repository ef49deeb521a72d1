//! Tessera sidecar: presents the pod's service-account token to the broker and
//! writes the credentials it receives into a tmpfs volume, laid out like a
//! Kubernetes Secret volume, so applications only read files.
//!
//! It knows little on purpose: no Vault client, no Kubernetes client.

pub mod agent;
pub mod cli;
pub mod client;
pub mod exec;
pub mod metrics;
pub mod notify;
pub mod pod_output;
pub mod status;
pub mod writer;
