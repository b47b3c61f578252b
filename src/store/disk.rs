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

use super::usage::Hold;
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

    /// Stream an entry. The last chunk is held back until the digest is checked:
    /// if the bytes on disk no longer match, the transfer ends in an error (never
    /// a clean end) and the entry is removed so the next request refetches it.
    /// `hold` marks the content as in use until the body is dropped.
    pub async fn stream(
        &self,
        key: &str,
        entry: &Entry,
        hold: Hold,
    ) -> Result<GatewayBody, cacache::Error> {
        let reader = cacache::Reader::open_hash(&self.dir, entry.integrity.clone()).await?;
        let state = Streaming {
            reader,
            pending: None,
            disk: self.clone(),
            key: key.to_string(),
            entry: entry.clone(),
            _hold: hold,
        };
        let chunks = stream::unfold(Some(state), |state| async move {
            let mut s = state?;
            loop {
                let mut buf = vec![0u8; READ_CHUNK];
                match s.reader.read(&mut buf).await {
                    Ok(0) => {
                        let Streaming {
                            reader,
                            pending,
                            disk,
                            key,
                            entry,
                            ..
                        } = s;
                        return match reader.check() {
                            Ok(_) => pending.map(|last| (Ok(Frame::data(last)), None)),
                            Err(e) => {
                                tracing::error!(%key, sha256 = %entry.sha256(), error = %e, "stored entry is corrupt; transfer aborted, entry removed");
                                disk.remove_corrupt(&key, &entry).await;
                                Some((Err(Box::new(e) as BoxError), None))
                            }
                        };
                    }
                    Ok(n) => {
                        buf.truncate(n);
                        if let Some(previous) = s.pending.replace(Bytes::from(buf)) {
                            return Some((Ok(Frame::data(previous)), Some(s)));
                        }
                    }
                    Err(e) => return Some((Err(Box::new(e) as BoxError), None)),
                }
            }
        });
        Ok(StreamBody::new(chunks).boxed_unsync())
    }

    /// Drop an entry whose bytes no longer match its digest: the index record and
    /// the content, so a refetch writes fresh bytes.
    pub async fn remove_corrupt(&self, key: &str, entry: &Entry) {
        if let Err(e) = cacache::remove(&self.dir, key).await {
            tracing::warn!(key, error = %e, "could not remove the broken entry's index record");
        }
        if let Err(e) = cacache::remove_hash(&self.dir, &entry.integrity).await {
            tracing::warn!(key, error = %e, "could not remove the broken entry's content");
        }
    }

    /// Store the file at `path` (`size` bytes) under `key`, atomically.
    pub async fn commit_file(
        &self,
        key: &str,
        path: &Path,
        size: u64,
    ) -> Result<Integrity, cacache::Error> {
        let mut writer = self.writer(key, Some(size)).await?;
        let mut file = tokio::fs::File::open(path).await.map_err(io_error)?;
        tokio::io::copy(&mut file, &mut writer)
            .await
            .map_err(io_error)?;
        writer.commit().await
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

/// One disk read in progress: the chunk read last is `pending` until the next read
/// shows it is not the final one, or the digest check clears it.
struct Streaming {
    reader: cacache::Reader,
    pending: Option<Bytes>,
    disk: Disk,
    key: String,
    entry: Entry,
    _hold: Hold,
}

fn io_error(e: std::io::Error) -> cacache::Error {
    cacache::Error::IoError(e, "copying a spooled body into the store".into())
}
