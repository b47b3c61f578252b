//! The offline bundle: one tar file that carries a warm store to a machine that
//! never sees the upstream. It holds
//!
//! - `manifest.json`: what is inside (module, version, sha256, size, source of
//!   every archive; the index commit; creation time) and the digest of every
//!   other member;
//! - `manifest.sig` (optional): an ed25519 signature of `manifest.json`;
//! - `index.bundle`: a git bundle of the first source's index at that commit,
//!   and `index/<source>.bundle` for each further source (a gateway with several
//!   sources merges them again, into the same merged history);
//! - `archives/<sha256>.zip`: the archives;
//! - `symbols.zip`, when one was stored or could be fetched.
//!
//! [`export`] writes it; [`import`] verifies everything before anything
//! becomes visible; [`signing`] makes and checks signatures.

pub mod export;
pub mod import;
pub mod signing;

use serde::{Deserialize, Serialize};

/// `format` of the manifest this version writes (it reads [`FORMAT_V1`] too).
pub const FORMAT: &str = "moonbit-registry-bundle/2";
/// Bundles of one source, from earlier versions.
pub const FORMAT_V1: &str = "moonbit-registry-bundle/1";
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
    /// The indexes of the further sources, in source order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more_indexes: Vec<SourceIndex>,
    pub symbols: Option<Member>,
    pub archives: Vec<ArchiveEntry>,
}

/// A further source's index in the bundle (`index/<source>.bundle`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceIndex {
    pub source: String,
    pub commit: String,
    pub index: Member,
}

impl SourceIndex {
    /// Its path inside the bundle.
    pub fn member(&self) -> String {
        index_member(&self.source)
    }
}

/// Where a further source's index lives in the bundle.
pub fn index_member(source: &str) -> String {
    format!("{INDEX_DIR}{source}.bundle")
}

pub const INDEX_DIR: &str = "index/";

impl Manifest {
    /// `(source, commit, member, file)` of every index in the bundle, first source first.
    pub fn indexes(&self) -> Vec<(&str, &str, String, &Member)> {
        let mut out = vec![(
            self.source.as_str(),
            self.index_commit.as_str(),
            INDEX_BUNDLE.to_string(),
            &self.index,
        )];
        for more in &self.more_indexes {
            out.push((&more.source, &more.commit, more.member(), &more.index));
        }
        out
    }
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
