//! The mutating admission webhook: adds the Tessera sidecar, its in-memory
//! volume and a projected token to pods annotated `tessera.dev/inject: "true"`,
//! and refuses pods that ask for bindings their service account may not have.
//! Served over HTTPS (TLS 1.3) on its own port, `POST /mutate`.

pub mod annotations;
pub mod api_client;
pub mod denial;
pub mod env_mode;
mod grants;
pub mod inject;
pub mod names;
pub mod objects;
mod patch;
mod pod_checks;
pub mod pod_output;
mod resources;
mod review;
mod server;
#[cfg(test)]
mod tests;

pub use self::{
    review::{ADMISSION_API_VERSION, KvKeysLookup, Webhook, resolve_mode},
    server::Server,
};
pub use crate::config::webhook::{Injection, Settings, SidecarMode};
