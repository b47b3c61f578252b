//! Integration-test doubles: a real MoonBit registry on disk (git index,
//! archives, symbols, assets) served over HTTPS by [`Upstream`], the gateway
//! binary under test as [`Gateway`], and the real clients (`git`, `curl`).
//!
//! Include it from a test file with `mod upstream;`.
// Each test file uses a different part of the harness (and of the re-exports).
#![allow(dead_code, unused_imports)]

pub mod admin;
mod cgi;
pub mod clients;
pub mod gateway;
pub mod registry;
pub mod scenario;
pub mod server;
mod tls;

pub use gateway::{DataDir, Gateway};
pub use registry::{Published, Registry};
pub use server::{Fault, SeenRequest, Upstream};
