//! The disk tier: a cacache store (content addressed by sha256, index keyed by
//! `archive/<user>/<module>/<version>`), written atomically so a crash never leaves a
//! half entry visible, and read back with the digest checked at the end.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use cacache::{Algorithm, Integrity};
use futures_util::stream;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::AsyncReadExt;

use crate::body::{BoxError, GatewayBody};

/// Chunk size for streaming from disk; `moon` reads in 64 KiB pieces too.
const READ_CHUNK: usize = 64 * 1024;

/// An object the disk tier holds.
#[derive(Debug, Clone)]
pub struct Entry {
    pub integrity: Integrity,
    pub size: u64,
}

impl Entry {
    /// Lowercase hex sha256, the same string an index line's `checksum` holds.
    pub fn sha256(&self) -> String {
        self.integrity.to_hex().1
    }
}

#[derive(Debug, Clone)]
pub struct Disk {
    dir: PathBuf,
}

impl Disk {
    pub fn new(dir: PathBuf) -> Disk {
        Disk { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The entry for `key`, if its index record and its content both exist.
    pub async fn lookup(&self, key: &str) -> Result<Option<Entry>, cacache::Error> {
        let Some(meta) = cacache::metadata(&self.dir, key).await? else {
            return Ok(None);
        };
        if !cacache::exists(&self.dir, &meta.integrity).await {
            // Content removed behind our back (e.g. by hand): a miss, refetch it.
            tracing::warn!(
                key,
                "store index names content that is gone; treating as a miss"
            );
            return Ok(None);
        }
        Ok(Some(Entry {
            integrity: meta.integrity,
            size: meta.size as u64,
        }))
    }

    /// Read a small entry whole; the digest is checked by cacache.
    pub async fn read(&self, entry: &Entry) -> Result<Bytes, cacache::Error> {
        cacache::read_hash(&self.dir, &entry.integrity)
            .await
            .map(Bytes::from)
    }

    /// Stream an entry; the stream ends with an error instead of a clean end if the
    /// bytes on disk no longer match their digest, so a client never sees them as complete.
    pub async fn stream(&self, entry: &Entry) -> Result<GatewayBody, cacache::Error> {
        let reader = cacache::Reader::open_hash(&self.dir, entry.integrity.clone()).await?;
        let chunks = stream::unfold(Some(reader), |state| async move {
            let mut reader = state?;
            let mut buf = vec![0u8; READ_CHUNK];
            match reader.read(&mut buf).await {
                Ok(0) => match reader.check() {
                    Ok(_) => None,
                    Err(e) => {
                        tracing::error!(error = %e, "stored entry is corrupt; transfer aborted");
                        Some((Err(Box::new(e) as BoxError), None))
                    }
                },
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(Frame::data(Bytes::from(buf))), Some(reader)))
                }
                Err(e) => Some((Err(Box::new(e) as BoxError), None)),
            }
        });
        Ok(StreamBody::new(chunks).boxed_unsync())
    }

    /// Start writing an entry. Nothing is visible under `key` until
    /// [`cacache::Writer::commit`]; dropping the writer discards the temp file.
    pub async fn writer(
        &self,
        key: &str,
        size: Option<u64>,
    ) -> Result<cacache::Writer, cacache::Error> {
        let mut opts = cacache::WriteOpts::new().algorithm(Algorithm::Sha256);
        if let Some(size) = size.and_then(|s| usize::try_from(s).ok()) {
            opts = opts.size(size);
        }
        opts.open(&self.dir, key).await
    }
}
