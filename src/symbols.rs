//! `GET /symbols.zip`, merged: one remote source's `symbols.zip` is served as it
//! is (its bytes and ETag, through the mutable cache); with several, the gateway
//! serves one zip combining every source's entries, earlier sources winning on
//! the same entry path.
//!
//! Each part is revalidated through the mutable cache as a single one would be
//! (per source URL, with that source's credential, stale-if-error included), and
//! the combined zip is rebuilt only when a part changed: it is named by a digest
//! over the parts' digests, which is also its strong ETag. Entries are copied raw
//! (never recompressed) off the async threads, bounded by `mutable.mutable_max`,
//! into `<data_dir>/symbols/<key>.zip` beside a small record of which key is
//! current, both replaced atomically, so a restart serves it at once.
//!
//! When a part has neither an upstream answer nor a stored copy, the last
//! combined zip is served (with `Warning: 111`) rather than one missing that
//! source's symbols. A source that has no `symbols.zip` (404) contributes nothing;
//! local sources have none.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use futures_util::StreamExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::body::{self, BoxError, GatewayBody};
use crate::config::Source;
use crate::mutable_cache::{if_none_match, Current, MutableCache, StoredBody};

/// The file naming the current combined zip.
const CURRENT: &str = "current.json";

/// Bytes a zip entry costs beyond its data and name (local header, data
/// descriptor, central directory record), for the size bound.
const ENTRY_OVERHEAD: u64 = 128;

/// The merged `symbols.zip` of every remote source.
pub struct MergedSymbols {
    /// (source name, symbols URL) of each remote source, in source order.
    parts: Vec<(String, String)>,
    mutable: Arc<MutableCache>,
    /// `<data_dir>/symbols`: the combined zips and [`CURRENT`].
    dir: PathBuf,
    /// Largest combined zip built (`mutable.mutable_max`).
    max: u64,
    /// One build at a time; whoever waited finds the result in [`CURRENT`].
    building: tokio::sync::Mutex<()>,
}

/// What [`CURRENT`] records: the combined zip in use.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Combined {
    /// Hex sha256 over the parts (source name and body digest, in source order):
    /// the zip's file name and its ETag.
    key: String,
    size: u64,
    /// The parts it was built from: (source, `sha256-...`).
    parts: Vec<(String, String)>,
}

/// One part going into a build.
struct Part {
    source: String,
    body: StoredBody,
}

impl MergedSymbols {
    /// Keep merged zips in `dir`; the parts are the remote `sources`' symbols.
    pub fn open(
        dir: &Path,
        sources: &[Source],
        mutable: Arc<MutableCache>,
        max: u64,
    ) -> anyhow::Result<MergedSymbols> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("could not create {}", dir.display()))?;
        // Leftovers of a build a crash interrupted (scratch dirs, unfinished files).
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(".build-") {
                let _ = std::fs::remove_dir_all(e.path());
            } else if name.starts_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(MergedSymbols {
            parts: sources
                .iter()
                .filter(|s| !s.local)
                .map(|s| (s.name.clone(), s.symbols.to_string()))
                .collect(),
            mutable,
            dir: dir.to_path_buf(),
            max,
            building: tokio::sync::Mutex::new(()),
        })
    }

    /// Answer a GET or HEAD for `/symbols.zip` that came in for `door` (the source
    /// whose host was addressed, or the first). `None`: nothing to serve at all
    /// and no upstream to ask (offline): the caller may have an imported copy.
    pub async fn respond(
        &self,
        door: &Source,
        client: &HeaderMap,
        head: bool,
    ) -> Option<Response<GatewayBody>> {
        if self.parts.len() > 1 {
            return self.merged(client, head).await;
        }
        // One remote source: exactly its symbols.zip, as the mutable cache serves it.
        let url = if door.local {
            self.parts.first()?.1.clone()
        } else {
            door.symbols.to_string()
        };
        self.mutable.respond(&url, client, head).await
    }

    /// Where a `/symbols.zip` request that is not cached (a write, or one with
    /// the client's own credentials) is passed to: the door's source, or the first
    /// remote one when the door's is local (whose URLs are never fetched).
    pub fn passthrough_url(&self, door: &Source) -> Option<String> {
        if door.local {
            return self.parts.first().map(|(_, url)| url.clone());
        }
        Some(door.symbols.to_string())
    }

    async fn merged(&self, client: &HeaderMap, head: bool) -> Option<Response<GatewayBody>> {
        // Every part at once: each may wait up to `revalidate_timeout` on its source.
        let currents = futures_util::future::join_all(
            self.parts.iter().map(|(_, url)| self.mutable.current(url)),
        )
        .await;
        let mut parts = Vec::new();
        let mut errors = Vec::new();
        for ((source, url), current) in self.parts.iter().zip(currents) {
            match current {
                Current::Body(body) => parts.push(Part {
                    source: source.clone(),
                    body,
                }),
                Current::Absent => {
                    tracing::debug!(%source, %url, "no symbols.zip; contributes nothing")
                }
                Current::Failed(error) => errors.push(format!("source `{source}`: {error}")),
            }
        }
        let last = self.current().await;
        if !errors.is_empty() {
            // A zip missing a source's symbols is worse than yesterday's whole one.
            if let Some(last) = &last {
                tracing::warn!(errors = %errors.join("; "), "symbols.zip: a source is unavailable; serving the last combined zip");
                return Some(self.serve(last, client, head, "stale").await);
            }
            if parts.is_empty() {
                if self.mutable.is_offline() {
                    return None;
                }
                return Some(body::text(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "no source's symbols.zip is available: {}",
                        errors.join("; ")
                    ),
                ));
            }
        }
        let stale = parts.iter().any(|p| p.body.stale);
        let key = key_of(&parts);
        if let Some(last) = last.filter(|c| c.key == key) {
            let served = if stale { "stale" } else { "hit" };
            return Some(self.serve(&last, client, head, served).await);
        }
        match self.build(key, parts).await {
            // Built from a part that could not be confirmed: say so.
            Ok(combined) => {
                let served = if stale { "stale" } else { "miss" };
                Some(self.serve(&combined, client, head, served).await)
            }
            Err(error) => {
                tracing::error!(%error, "could not build the merged symbols.zip");
                Some(body::text(
                    StatusCode::BAD_GATEWAY,
                    format!("could not build the merged symbols.zip: {error}"),
                ))
            }
        }
    }

    /// The combined zip in use, if its record and file are both there.
    async fn current(&self) -> Option<Combined> {
        let bytes = tokio::fs::read(self.dir.join(CURRENT)).await.ok()?;
        let combined: Combined = serde_json::from_slice(&bytes).ok()?;
        // The key names a file: only ever hex.
        if combined.key.len() != 64 || !combined.key.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let meta = tokio::fs::metadata(self.zip_path(&combined.key))
            .await
            .ok()?;
        (meta.len() == combined.size).then_some(combined)
    }

    fn zip_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.zip"))
    }

    /// Build the zip for `parts` (one build at a time) and make it current.
    async fn build(&self, key: String, parts: Vec<Part>) -> Result<Combined, String> {
        let _building = self.building.lock().await;
        // Built by whoever held the lock before us.
        if let Some(done) = self.current().await.filter(|c| c.key == key) {
            return Ok(done);
        }
        let dir = self.dir.clone();
        let max = self.max;
        let started = std::time::Instant::now();
        let combined = tokio::task::spawn_blocking(move || build_blocking(&dir, key, &parts, max))
            .await
            .map_err(|e| format!("build task failed: {e}"))??;
        tracing::info!(
            key = %combined.key, bytes = combined.size, parts = combined.parts.len(),
            ms = started.elapsed().as_millis() as u64, "merged symbols.zip built"
        );
        Ok(combined)
    }

    async fn serve(
        &self,
        combined: &Combined,
        client: &HeaderMap,
        head: bool,
        served: &'static str,
    ) -> Response<GatewayBody> {
        let etag = format!("\"{}\"", combined.key);
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&etag) {
            headers.insert(header::ETAG, v);
        }
        // Clients ask again each time; a 304 costs nothing.
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        headers.insert("x-cache", HeaderValue::from_static(served));
        if served == "stale" {
            headers.insert(
                header::WARNING,
                HeaderValue::from_static("111 - \"Revalidation Failed\""),
            );
        }
        if if_none_match(client, &etag) {
            let mut resp = Response::new(body::empty());
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            *resp.headers_mut() = headers;
            return resp;
        }
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/zip"),
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(combined.size));
        let body = if head {
            body::empty()
        } else {
            match tokio::fs::File::open(self.zip_path(&combined.key)).await {
                Ok(file) => StreamBody::new(
                    tokio_util::io::ReaderStream::new(file)
                        .map(|r| r.map(Frame::data).map_err(|e| Box::new(e) as BoxError)),
                )
                .boxed_unsync(),
                Err(e) => {
                    return body::text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("the merged symbols.zip is unreadable ({e}); retry"),
                    )
                }
            }
        };
        let mut resp = Response::new(body);
        *resp.headers_mut() = headers;
        resp
    }
}

/// Hex sha256 over each part's source name and body digest, in order.
fn key_of(parts: &[Part]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.source.as_bytes());
        h.update([0]);
        h.update(p.body.integrity.as_bytes());
        h.update([b'\n']);
    }
    hex::encode(h.finalize())
}

/// Copy every part's entries raw into `<dir>/<key>.zip` (first part wins on a
/// name), then record it as current and remove older combined zips. Blocking.
fn build_blocking(dir: &Path, key: String, parts: &[Part], max: u64) -> Result<Combined, String> {
    let scratch = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(dir)
        .map_err(|e| format!("cannot create a build dir in {}: {e}", dir.display()))?;
    let out =
        tempfile::NamedTempFile::new_in(dir).map_err(|e| format!("cannot create the zip: {e}"))?;
    let mut writer = zip::ZipWriter::new(out);
    let mut seen = HashSet::new();
    let mut total: u64 = 0;
    let mut used = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let path = scratch.path().join(format!("{i}.zip"));
        part.body.link_to(&path)?;
        let file = std::fs::File::open(&path).map_err(|e| format!("cannot open a part: {e}"))?;
        // A source's zip is hostile input: one that cannot be read contributes nothing.
        let mut archive = match zip::ZipArchive::new(std::io::BufReader::new(file)) {
            Ok(archive) => archive,
            Err(e) => {
                tracing::warn!(source = %part.source, error = %e, "symbols.zip is not a readable zip; skipped");
                continue;
            }
        };
        for n in 0..archive.len() {
            let entry = archive
                .by_index_raw(n)
                .map_err(|e| format!("source `{}`: symbols.zip entry {n}: {e}", part.source))?;
            let name = entry.name().to_string();
            if !seen.insert(name.clone()) {
                continue;
            }
            total = total
                .saturating_add(entry.compressed_size())
                .saturating_add(2 * name.len() as u64 + ENTRY_OVERHEAD);
            if total > max {
                return Err(format!(
                    "the combined symbols.zip would exceed mutable.mutable_max ({max} bytes)"
                ));
            }
            writer
                .raw_copy_file(entry)
                .map_err(|e| format!("source `{}`: copying {name}: {e}", part.source))?;
        }
        used.push((part.source.clone(), part.body.integrity.clone()));
    }
    let out = writer
        .finish()
        .map_err(|e| format!("cannot finish the zip: {e}"))?;
    out.as_file()
        .sync_all()
        .map_err(|e| format!("cannot write the zip: {e}"))?;
    let size = out
        .as_file()
        .metadata()
        .map_err(|e| format!("cannot write the zip: {e}"))?
        .len();
    if size > max {
        return Err(format!(
            "the combined symbols.zip would exceed mutable.mutable_max ({max} bytes)"
        ));
    }
    out.persist(dir.join(format!("{key}.zip")))
        .map_err(|e| format!("cannot keep the zip: {e}"))?;
    let combined = Combined {
        key,
        size,
        parts: used,
    };
    let json = serde_json::to_vec(&combined).map_err(|e| e.to_string())?;
    let mut record = tempfile::NamedTempFile::new_in(dir).map_err(|e| e.to_string())?;
    record
        .write_all(&json)
        .and_then(|_| record.as_file().sync_all())
        .map_err(|e| format!("cannot write {CURRENT}: {e}"))?;
    record
        .persist(dir.join(CURRENT))
        .map_err(|e| format!("cannot write {CURRENT}: {e}"))?;
    // Older zips: readers streaming one keep their open file.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.ends_with(".zip") && name != format!("{}.zip", combined.key) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(combined)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Read};

    fn zip_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for (name, data) in files {
            w.start_file(*name, options).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    /// A part stored in a real cacache content store, as the mutable cache keeps it.
    fn part(content: &Path, source: &str, bytes: &[u8]) -> Part {
        let sri = cacache::write_hash_sync(content, bytes).unwrap();
        Part {
            source: source.into(),
            body: StoredBody::for_tests(sri.to_string(), bytes.len() as u64, content),
        }
    }

    fn entries(path: &Path) -> Vec<(String, Vec<u8>)> {
        let mut a = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
        (0..a.len())
            .map(|i| {
                let mut f = a.by_index(i).unwrap();
                let mut out = Vec::new();
                f.read_to_end(&mut out).unwrap();
                (f.name().to_string(), out)
            })
            .collect()
    }

    #[test]
    fn entries_are_combined_first_source_winning_and_bad_parts_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let content = dir.path().join("content");
        let parts = vec![
            part(
                &content,
                "a",
                &zip_of(&[("x", b"from a"), ("only-a", b"1")]),
            ),
            part(&content, "b", b"not a zip at all"),
            part(
                &content,
                "c",
                &zip_of(&[("x", b"from c"), ("only-c", b"2")]),
            ),
        ];
        let key = key_of(&parts);
        let combined = build_blocking(dir.path(), key.clone(), &parts, 1 << 20).unwrap();
        assert_eq!(combined.key, key);
        let got = entries(&dir.path().join(format!("{key}.zip")));
        assert_eq!(
            got,
            vec![
                ("x".to_string(), b"from a".to_vec()),
                ("only-a".to_string(), b"1".to_vec()),
                ("only-c".to_string(), b"2".to_vec()),
            ]
        );
        // Too small a bound is a clear error, and nothing becomes current.
        let other = vec![part(&content, "a", &zip_of(&[("y", &[7u8; 4096])]))];
        let err = build_blocking(dir.path(), key_of(&other), &other, 100).unwrap_err();
        assert!(err.contains("mutable_max"), "{err}");
        let current: Combined =
            serde_json::from_slice(&std::fs::read(dir.path().join(CURRENT)).unwrap()).unwrap();
        assert_eq!(current.key, key);
    }
}
