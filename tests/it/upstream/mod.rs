//! Integration-test doubles: a real MoonBit registry on disk (git index,
//! archives, symbols, assets) served over HTTPS by [`Upstream`], the gateway
//! binary under test as [`Gateway`], and the real clients (`git`, `curl`).
//!
//! Declared once, by the integration-test binary `tests/it/main.rs`, whose test
//! modules reach it as `crate::upstream`; `benches/gateway.rs` includes it too.

pub mod admin;
mod cgi;
pub mod clients;
pub mod gateway;
pub mod registry;
pub mod scenario;
pub mod seaweed;
pub mod server;
mod tls;

pub use gateway::Gateway;
pub use registry::{Published, Registry};
pub use server::{Fault, SeenRequest, Upstream};
