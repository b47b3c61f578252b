//! The offline bundle: one tar file that carries a warm store to a machine that
//! never sees the upstream. It holds
//!
//! - `manifest.json`: what is inside (module, version, sha256, size, source of
//!   every archive; the index commit; creation time) and the digest of every
//!   other member;
//! - `manifest.sig` (optional): an ed25519 signature of `manifest.json`;
//! - `index.bundle`: a git bundle of the source's index at that commit;
//! - `archives/<sha256>.zip`: the archives;
//! - `symbols.zip`, when one was stored or could be fetched.
//!
//! [`export`] writes it; [`import`] verifies everything before anything
//! becomes visible; [`signing`] makes and checks signatures.

pub mod export;
pub mod import;
pub mod signing;

use serde::{Deserialize, Serialize};

/// `format` of the manifest this version writes and reads.
pub const FORMAT: &str = "moonbit-registry-bundle/1";
pub const MANIFEST: &str = "manifest.json";
pub const SIGNATURE: &str = "manifest.sig";
pub const INDEX_BUNDLE: &str = "index.bundle";
pub const SYMBOLS: &str = "symbols.zip";
pub const ARCHIVES_DIR: &str = "archives/";

/// What a bundle holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// Name of the source whose index and archives these are.
    pub source: String,
    /// The index commit the archives were checked against.
    pub index_commit: String,
    pub index: Member,
    pub symbols: Option<Member>,
    pub archives: Vec<ArchiveEntry>,
}

/// A file in the bundle and its digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub sha256: String,
    pub size: u64,
}

/// One archive in the bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveEntry {
    /// `user/module`.
    pub module: String,
    pub version: String,
    pub sha256: String,
    pub size: u64,
    pub source: String,
}

impl ArchiveEntry {
    /// Its path inside the bundle.
    pub fn member(&self) -> String {
        archive_member(&self.sha256)
    }
}

pub fn archive_member(sha256: &str) -> String {
    format!("{ARCHIVES_DIR}{sha256}.zip")
}

/// Lowercase hex sha256, as the index writes it.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}
