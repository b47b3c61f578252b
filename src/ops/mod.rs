//! Running the gateway like infrastructure: Prometheus [`metrics`] and the access
//! log ([`access`]). Nothing here decides how a request is answered; the doors
//! and handlers record into it, and the router exposes it (`GET /-/metrics`).

pub mod access;
pub mod metrics;
