//! The one integration-test binary (`cargo test --test it`): the real gateway
//! binary (`CARGO_BIN_EXE_moonbit-registry`) driven by real clients (`git`, `curl`,
//! and `moon` when `MOON_BIN` is set or `moon` is on `PATH`) in front of a real
//! TLS test registry.
//!
//! One binary rather than one per file, so the harness is compiled and linked
//! once. Its modules:
//!
//! - [`upstream`] the harness: the test registry and its HTTPS server (git index by
//!   `git http-backend`, archives, symbols, faults), the gateway under test, and
//!   the clients and scenarios the tests share.
//! - One module per area of the gateway, each holding that area's tests:
//!   [`registry_endpoint`] (the gateway as `MOONCAKES_REGISTRY`), [`index_mirror`],
//!   [`proxy_intercept`] (`HTTPS_PROXY` and the transparent TLS gateway),
//!   [`mutable_cache_and_breaker`] (`symbols.zip` and upstream outages),
//!   [`sources`] (several sources as one registry: the merged index, claims,
//!   pinned views), [`offline_bundle`] (`warm`, `export` / `import`, `serve --offline`),
//!   [`store_admin`] (`cache gc`, `cache verify`, the size bound),
//!   [`private_sources`] (several sources: credentials, merged `symbols.zip`),
//!   [`publish`] (local sources: `publish`, `POST /-/publish`), [`shared_tier`]
//!   (replicas sharing an S3 bucket, against SeaweedFS), [`ops`] (metrics,
//!   access log, per-job reports),
//!   [`hostile_git`] and [`hostile`] (hostile clients and hanging upstreams).
//! - [`ci_snippets`] the CI files in `deploy/` run as GitHub Actions and GitLab CI
//!   would run them, with the real `moon`.
//! - [`upstream_selftest`] tests of the harness itself, without the gateway.
//!
//! Test names carry their module (`index_mirror::clones_and_pulls_are_answered_from_the_mirror`),
//! so `cargo test --test it index_mirror::` runs one area.

mod upstream;

mod ci_snippets;
mod hostile;
mod hostile_git;
mod index_mirror;
mod mutable_cache_and_breaker;
mod offline_bundle;
mod ops;
mod private_sources;
mod proxy_intercept;
mod publish;
mod registry_endpoint;
mod shared_tier;
mod sources;
mod store_admin;
mod upstream_selftest;
