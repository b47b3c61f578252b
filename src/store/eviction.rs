//! Keeping the disk tier within a size bound: list what is stored, and evict the
//! least recently used content until the total fits. Used by `cache gc` and, with
//! `storage.max_size` set, by a background task of `serve`, which passes the
//! digests being streamed so they are never removed under a reader.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::usage;
use super::Store;

/// One key in the store.
#[derive(Debug, Clone)]
pub struct StoredEntry {
    pub key: String,
    pub sha256: String,
    pub size: u64,
    /// When it was written.
    pub written: SystemTime,
    /// When it was last served (falls back to when it was written).
    pub last_used: SystemTime,
}

/// Every live entry of the store at `store_dir` (unreadable index records are skipped).
pub fn list(store_dir: &Path) -> Vec<StoredEntry> {
    let mut out = Vec::new();
    let mut keys = std::collections::HashSet::new();
    for meta in cacache::list_sync(store_dir) {
        let key = match meta {
            Ok(meta) => meta.key,
            // A store nothing was written to yet has no index directory: empty, not broken.
            Err(cacache::Error::IoError(e, _)) if e.kind() == std::io::ErrorKind::NotFound => {
                continue
            }
            Err(e) => {
                tracing::warn!(error = %e, "skipping an unreadable store index record");
                continue;
            }
        };
        if !keys.insert(key.clone()) {
            continue;
        }
        // cacache's listing also returns records that were removed or replaced
        // later in the same bucket; a lookup gives the live one, if any.
        let meta = match cacache::metadata_sync(store_dir, &key) {
            Ok(Some(meta)) => meta,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(%key, error = %e, "skipping an unreadable store index record");
                continue;
            }
        };
        let sha256 = meta.integrity.to_hex().1;
        let written = UNIX_EPOCH + Duration::from_millis(meta.time as u64);
        let last_used = usage::last_used(store_dir, &sha256).unwrap_or(written);
        // The record's size is 0 when the writer was not told the length up front.
        let size = usage::content_path(store_dir, &sha256)
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .unwrap_or(meta.size as u64);
        out.push(StoredEntry {
            key: meta.key,
            sha256,
            size,
            written,
            last_used,
        });
    }
    out
}

/// What one collection did.
#[derive(Debug, Default)]
pub struct Collected {
    /// Bytes of distinct content before and after.
    pub before: u64,
    pub after: u64,
    pub evicted: Vec<StoredEntry>,
    /// Content left in place because a client is reading it.
    pub skipped_in_use: usize,
}

/// Temp files in a store's `tmp/` untouched for this long belong to no live writer
/// (writers append continuously, and commits rename at once): a killed process's.
pub const TMP_GRACE: Duration = Duration::from_secs(60);

/// Remove the temp files under `store_dir/tmp` untouched for `older_than` (left by
/// a process killed mid-write); returns how many and how many bytes, and the bytes
/// of those that remain (writes in progress).
pub fn sweep_tmp(store_dir: &Path, older_than: Duration) -> (usize, u64, u64) {
    let (mut removed, mut freed, mut remaining) = (0, 0, 0);
    let Ok(entries) = std::fs::read_dir(store_dir.join("tmp")) else {
        return (0, 0, 0);
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        let idle = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .unwrap_or_default();
        let stale = idle >= older_than;
        let gone = stale
            && if meta.is_dir() {
                std::fs::remove_dir_all(entry.path()).is_ok()
            } else {
                std::fs::remove_file(entry.path()).is_ok()
            };
        if gone {
            removed += 1;
            freed += meta.len();
        } else {
            remaining += meta.len();
        }
    }
    (removed, freed, remaining)
}

/// Evict least recently used content until the distinct content fits in `max`
/// bytes. Content for which `in_use` says yes is kept whatever its age. Orphaned
/// temp files go first; those still being written count against the bound.
pub fn collect(store_dir: &Path, max: u64, in_use: &dyn Fn(&str) -> bool) -> Collected {
    let (orphans, orphan_bytes, writing) = sweep_tmp(store_dir, TMP_GRACE);
    if orphans > 0 {
        tracing::info!(
            files = orphans,
            bytes = orphan_bytes,
            "removed orphaned temp files from the store"
        );
    }
    let mut by_content: HashMap<String, Vec<StoredEntry>> = HashMap::new();
    for entry in list(store_dir) {
        by_content
            .entry(entry.sha256.clone())
            .or_default()
            .push(entry);
    }
    let mut contents: Vec<(SystemTime, u64, Vec<StoredEntry>)> = by_content
        .into_values()
        .map(|entries| {
            let used = entries
                .iter()
                .map(|e| e.last_used)
                .max()
                .unwrap_or(UNIX_EPOCH);
            let size = entries.iter().map(|e| e.size).max().unwrap_or(0);
            (used, size, entries)
        })
        .collect();
    contents.sort_by_key(|(used, _, _)| *used);
    let before: u64 = contents.iter().map(|(_, size, _)| size).sum::<u64>() + writing;
    let mut report = Collected {
        before,
        after: before,
        ..Collected::default()
    };
    for (_, size, entries) in contents {
        if report.after <= max {
            break;
        }
        let sha = &entries[0].sha256;
        if in_use(sha) {
            report.skipped_in_use += 1;
            continue;
        }
        for e in &entries {
            if let Err(error) = cacache::remove_sync(store_dir, &e.key) {
                tracing::warn!(key = %e.key, %error, "could not remove an index record");
            }
        }
        let integrity = entries[0].integrity();
        if let Err(error) = cacache::remove_hash_sync(store_dir, &integrity) {
            tracing::warn!(sha256 = %sha, %error, "could not remove evicted content");
            continue;
        }
        report.after -= size;
        report.evicted.extend(entries);
    }
    report
}

impl StoredEntry {
    pub fn integrity(&self) -> cacache::Integrity {
        cacache::Integrity::from_hex(&self.sha256, cacache::Algorithm::Sha256)
            .unwrap_or_else(|_| cacache::Integrity::from(self.sha256.as_bytes()))
    }
}

/// Bytes of distinct content in the store, and of temp files being written.
pub fn measure(store_dir: &Path) -> u64 {
    let (_, _, writing) = sweep_tmp(store_dir, Duration::MAX);
    let mut sizes: HashMap<String, u64> = HashMap::new();
    for entry in list(store_dir) {
        let size = sizes.entry(entry.sha256).or_default();
        *size = (*size).max(entry.size);
    }
    sizes.values().sum::<u64>() + writing
}

impl Store {
    /// Keep the disk tier within `max` bytes from now on (`None`: only measure it,
    /// for `store_bytes{tier="disk"}`): a check every `every`.
    pub fn keep_within(self: &Arc<Self>, max: Option<u64>, every: Duration) {
        let store = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(store) = store.upgrade() else {
                    return;
                };
                let dir: PathBuf = store.disk.dir().to_path_buf();
                let Some(max) = max else {
                    if let Ok(bytes) = tokio::task::spawn_blocking(move || measure(&dir)).await {
                        store.disk_bytes.store(bytes, Ordering::Relaxed);
                    }
                    continue;
                };
                let in_use = store.in_use.clone();
                let report = tokio::task::spawn_blocking(move || {
                    collect(&dir, max, &|sha| in_use.contains(sha))
                })
                .await;
                if let Ok(r) = &report {
                    store.disk_bytes.store(r.after, Ordering::Relaxed);
                }
                if let Ok(r) = &report {
                    store.counters.evictions.inc_by(r.evicted.len() as u64);
                }
                match report {
                    Ok(r) if !r.evicted.is_empty() || r.skipped_in_use > 0 => tracing::info!(
                        before = r.before,
                        after = r.after,
                        evicted = r.evicted.len(),
                        skipped_in_use = r.skipped_in_use,
                        max,
                        "store kept within its size bound"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "store size check failed"),
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_first_and_spares_what_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path();
        let mut shas = Vec::new();
        for (i, key) in ["a", "b", "c"].iter().enumerate() {
            let data = vec![i as u8; 1000];
            let sri = cacache::write_sync_with_algo(cacache::Algorithm::Sha256, store, key, &data)
                .unwrap();
            let sha = sri.to_hex().1;
            // Used in order a (oldest), b, c (newest).
            let path = usage::content_path(store, &sha).unwrap();
            assert!(path.is_file(), "content path differs from cacache's");
            let when = SystemTime::now() - Duration::from_secs(100 - i as u64 * 10);
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(when)
                .unwrap();
            shas.push(sha);
        }
        let a = shas[0].clone();
        let r = collect(store, 2000, &|sha| sha == a);
        assert_eq!(r.before, 3000);
        assert_eq!(r.skipped_in_use, 1);
        let gone: Vec<&str> = r.evicted.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(gone, ["b"]);
        let left: Vec<String> = list(store).into_iter().map(|e| e.key).collect();
        assert_eq!(left.len(), 2);
        assert!(!cacache::exists_sync(store, &r.evicted[0].integrity()));
        let r = collect(store, 1000, &|_| false);
        assert_eq!(r.evicted[0].key, "a");
        assert_eq!(r.after, 1000);
    }
}
