//! What the store is asked for: an immutable object, where to fetch it, and what a
//! fetched body may be checked against (which decides whether it may be kept). Each
//! kind of object has its constructor here, so every door and command that asks
//! for an archive, an asset or `symbols.zip` describes it the same way.

use std::path::PathBuf;

use http::{header, HeaderMap, HeaderValue};

use super::SYMBOLS_KEY;
use crate::archive::{ArchiveKey, AssetPath};

/// Content type of archives and `symbols.zip`.
const ZIP: &str = "application/zip";

/// The head of every answer with an object's body: its content type, its length
/// and (for a stored copy) its digest as a strong ETag when known, and where it
/// came from (`x-cache`).
pub fn response_head(
    content_type: &'static str,
    len: Option<u64>,
    sha256: Option<&str>,
    cache: &'static str,
) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(4);
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(len) = len {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    if let Some(sha) = sha256.and_then(|s| HeaderValue::from_str(&format!("\"{s}\"")).ok()) {
        h.insert(header::ETAG, sha);
    }
    h.insert("x-cache", HeaderValue::from_static(cache));
    h
}

/// One immutable object a client asked for.
#[derive(Clone, Debug)]
pub struct Object {
    /// Store key, e.g. `archive/alice/json/0.1.0`.
    pub key: String,
    /// Where to fetch it, in source order.
    pub urls: Vec<String>,
    /// The file it is read from instead, for an archive of a source the gateway
    /// hosts (`local = true`): never fetched, never copied into the store.
    pub local: Option<PathBuf>,
    pub content_type: &'static str,
    pub trust: Trust,
}

/// What the gateway may check a fetched body against, and so whether it may keep it.
#[derive(Clone, Debug, PartialEq)]
pub enum Trust {
    /// The index vouches for this sha256: a body with any other digest is refused,
    /// never stored, and remembered as bad until the index refreshes.
    Checksum {
        /// `user/module@version`, for messages.
        label: String,
        expected: String,
        /// Index refresh count when the expectation was read.
        refreshes: u64,
    },
    /// Nothing to check against (wasm assets): stored once complete.
    Complete,
    /// Unknown to the index: streamed to the client, never stored.
    Unverified,
}

impl Object {
    /// An archive an index lists with `sha256`: served and stored only if the body
    /// has that digest. `refreshes` is the index's refresh count when the checksum
    /// was read; `urls` are where to fetch it (none when offline).
    pub fn archive(key: &ArchiveKey, sha256: String, refreshes: u64, urls: Vec<String>) -> Object {
        Object {
            key: key.store_key(),
            urls,
            local: None,
            content_type: ZIP,
            trust: Trust::Checksum {
                label: key.label(),
                expected: sha256,
                refreshes,
            },
        }
    }

    /// An archive of a source the gateway hosts, kept in the file `path` that
    /// `publish` wrote, served only with the `sha256` the index gives for it.
    pub fn local_archive(
        key: &ArchiveKey,
        sha256: String,
        refreshes: u64,
        path: PathBuf,
    ) -> Object {
        Object {
            local: Some(path),
            ..Object::archive(key, sha256, refreshes, Vec::new())
        }
    }

    /// An archive no index lists: streamed from the first of `urls` that has it,
    /// never stored.
    pub fn unlisted_archive(key: &ArchiveKey, urls: Vec<String>) -> Object {
        Object {
            key: key.store_key(),
            urls,
            local: None,
            content_type: ZIP,
            trust: Trust::Unverified,
        }
    }

    /// A wasm asset (or its `.sha256`): nothing to check it against, stored once
    /// complete.
    pub fn asset(asset: &AssetPath, urls: Vec<String>) -> Object {
        Object {
            key: asset.store_key(),
            urls,
            local: None,
            content_type: asset.content_type(),
            trust: Trust::Complete,
        }
    }

    /// The `symbols.zip` kept for offline use and bundles (under [`SYMBOLS_KEY`]),
    /// stored once complete.
    pub fn symbols(urls: Vec<String>) -> Object {
        Object {
            key: SYMBOLS_KEY.into(),
            urls,
            local: None,
            content_type: ZIP,
            trust: Trust::Complete,
        }
    }

    /// Whether a stored copy with this digest may answer for the object.
    pub(super) fn accepts(&self, sha256: &str) -> bool {
        match &self.trust {
            Trust::Checksum { expected, .. } => expected == sha256,
            Trust::Complete | Trust::Unverified => true,
        }
    }
}
