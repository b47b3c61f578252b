//! The disk tier: a cacache store (content addressed by sha256, index keyed by
//! `archive/<user>/<module>/<version>`), written atomically so a crash never leaves a
//! half entry visible, and read back with the digest checked at the end. A fetched
//! body enters it as its spool file, under the digest computed as it arrived.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use cacache::{Algorithm, Integrity};
use futures_util::stream;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::AsyncReadExt;

use super::usage::{self, Hold};
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

    /// Store the file at `path` (`size` bytes) under `key`, as content whose sha256
    /// (lowercase hex) the caller computed while writing it: cacache is given that
    /// integrity, so the bytes are neither hashed nor, on one file system, copied
    /// again. Reads still check them against it. Nothing is visible under `key`
    /// until the content is in place.
    pub async fn commit_hashed(
        &self,
        key: &str,
        path: &Path,
        size: u64,
        sha256: &str,
    ) -> Result<Integrity, cacache::Error> {
        let integrity = Integrity::from_hex(sha256, Algorithm::Sha256)?;
        let dest = usage::content_path(&self.dir, sha256)
            .ok_or_else(|| io_error(std::io::Error::other(format!("bad sha256 {sha256}"))))?;
        let (src, tmp_dir) = (path.to_path_buf(), self.dir.join("tmp"));
        tokio::task::spawn_blocking(move || place_content(&src, &tmp_dir, &dest))
            .await
            .map_err(|e| io_error(std::io::Error::other(e)))?
            .map_err(io_error)?;
        let opts = cacache::WriteOpts::new()
            .integrity(integrity)
            .size(usize::try_from(size).unwrap_or(usize::MAX));
        cacache::index::insert_async(&self.dir, key, opts).await
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

/// Put the file at `src` at `dest` in cacache's content directory: hard-linked
/// (or, across file systems, copied) to a temp file in `tmp_dir`, then renamed
/// over `dest`, so a reader sees either no file or the whole one, as with
/// cacache's own writer.
fn place_content(src: &Path, tmp_dir: &Path, dest: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(tmp_dir)?;
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = match tempfile::Builder::new().make_in(tmp_dir, |p| std::fs::hard_link(src, p)) {
        Ok(linked) => linked.into_temp_path(),
        Err(_) => {
            let mut copy = tempfile::NamedTempFile::new_in(tmp_dir)?;
            std::io::copy(&mut std::fs::File::open(src)?, &mut copy)?;
            copy.into_temp_path()
        }
    };
    tmp.persist(dest).map_err(|e| e.error)
}

fn io_error(e: std::io::Error) -> cacache::Error {
    cacache::Error::IoError(e, "moving a spooled body into the store".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[tokio::test]
    async fn a_hashed_commit_is_what_cacache_would_have_written_and_outlives_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::new(dir.path().join("store"));
        let body = b"the bytes of one archive".repeat(1000);
        let sha = hex::encode(Sha256::digest(&body));
        let spool = tempfile::NamedTempFile::new_in(dir.path()).unwrap();
        std::fs::write(spool.path(), &body).unwrap();

        let integrity = disk
            .commit_hashed("archive/a/b/1.0.0", spool.path(), body.len() as u64, &sha)
            .await
            .unwrap();
        assert_eq!(integrity.to_hex().1, sha);
        drop(spool);
        let entry = disk.lookup("archive/a/b/1.0.0").await.unwrap().unwrap();
        assert_eq!((entry.sha256(), entry.size), (sha, body.len() as u64));
        // cacache's own read checks the bytes against the integrity it was given.
        let read = cacache::read(disk.dir(), "archive/a/b/1.0.0")
            .await
            .unwrap();
        assert_eq!(read, body);
        let tmp = std::fs::read_dir(disk.dir().join("tmp")).unwrap().count();
        assert_eq!(tmp, 0, "a temp link was left behind");
    }

    #[tokio::test]
    async fn reads_check_the_bytes_against_the_digest_given_at_commit() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::new(dir.path().join("store"));
        let spool = tempfile::NamedTempFile::new_in(dir.path()).unwrap();
        std::fs::write(spool.path(), b"other bytes").unwrap();
        let claimed = hex::encode(Sha256::digest(b"some bytes"));
        disk.commit_hashed("k", spool.path(), 11, &claimed)
            .await
            .unwrap();
        let entry = disk.lookup("k").await.unwrap().unwrap();
        assert!(matches!(
            disk.read(&entry).await,
            Err(cacache::Error::IntegrityError(_))
        ));
    }
}
