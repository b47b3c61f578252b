//! Running the gateway like infrastructure: Prometheus [`metrics`], the access
//! log ([`access`]), per-CI-job counters ([`jobs`]), the last hour ([`recent`]), the [`status`] page and the [`log`]
//! writer (text or JSON lines). Nothing here decides how a request is answered; the doors
//! and handlers record into it, and the router exposes it (`GET /-/metrics`).

pub mod access;
pub mod jobs;
pub mod log;
pub mod metrics;
pub mod recent;
pub mod status;
