//! moonbit-registry: a caching gateway for the MoonBit package registry.
//!
//! Requests come in through the [`doors`] (registry endpoint, forward proxy with
//! TLS [`intercept`]ion or tunnels, transparent TLS), are classified once by the
//! [`router`], and go to the archive cache ([`store`]), the index mirror
//! ([`index`]), the merged [`symbols`] over the [`mutable_cache`] (`symbols.zip`) or straight through
//! ([`passthrough`]) to a source reached with the [`upstream`] client behind its
//! [`breaker`]. [`app`] builds these services once, for every command.

pub mod app;
pub mod archive;
pub mod body;
pub mod breaker;
pub mod bundle;
pub mod ca_bundle;
pub mod cache_admin;
pub mod client;
pub mod config;
pub mod doors;
pub mod git;
pub mod hosted;
pub mod index;
pub mod intercept;
pub mod memfile;
pub mod mutable_cache;
pub mod ops;
pub mod passthrough;
pub mod progress;
pub mod publish;
pub mod router;
pub mod store;
pub mod symbols;
pub mod upstream;
pub mod warm;

/// How the gateway names itself on its own upstream fetches (forwarded requests keep
/// the client's User-Agent).
pub const USER_AGENT: &str = concat!("moonbit-registry/", env!("CARGO_PKG_VERSION"));
