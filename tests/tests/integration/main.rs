//! Integration tests: a real OpenBao dev server, the real broker binary and the
//! real sidecar binary, all on ephemeral loopback ports (see `tessera_tests`).
#![allow(clippy::unwrap_used)]

mod audit;
mod auth;
mod bootstrap;
mod broker_life;
mod change_feed;
mod chart;
mod chart_install;
mod cli;
mod client;
mod clusters;
mod delivery;
mod docs;
mod drift;
mod exec;
mod gate;
mod hardening;
mod hardening_round3;
mod in_cluster;
mod install_doc;
mod kubernetes;
mod leases;
mod lifecycle;
mod memory;
mod namespaces;
mod observability;
mod outage;
mod peers;
mod pod_keys;
mod pod_shapes;
mod policy;
mod policy_resources;
mod python;
mod quickstart;
mod refusals;
mod secrecy;
mod sidecar;
mod sources;
mod tls;
mod tracing;
mod vault_cluster;
mod webhook;
