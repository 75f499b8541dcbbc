//! sandboxd: a gRPC service that manages fast, isolated sandboxes on one node over containerd.

pub mod api;
pub mod caller;
pub mod cli;
pub mod config;
pub mod error;
pub mod files;
pub mod image;
pub mod metrics;
pub mod net;
pub mod pb;
#[cfg(test)]
mod robust;
pub mod runtime;
pub mod sandbox;
pub mod server;
pub mod sys;
pub mod telemetry;
pub mod tenants;
pub mod tls;
pub mod util;
pub mod watched;
