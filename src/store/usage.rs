//! When each stored object was last used, and which ones are being read right
//! now: the two facts eviction needs. "Last used" is the modification time of the
//! content file, bumped on every hit, so it survives restarts and is shared by
//! every process using the data dir; "in use" is a count per digest held by the
//! guards of transfers in progress, so eviction never removes an entry under a reader.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Where cacache keeps the content with this sha256 (hex). cacache does not export
/// its path function; this is its documented layout, `content-v2/<algo>/xx/yy/rest`.
pub fn content_path(store_dir: &Path, sha256: &str) -> Option<PathBuf> {
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(
        store_dir
            .join("content-v2")
            .join("sha256")
            .join(&sha256[0..2])
            .join(&sha256[2..4])
            .join(&sha256[4..]),
    )
}

/// A content file's last use is recorded at most this often: eviction needs
/// minutes of precision, and a hot hit must not cost a file-system call each time.
pub const TOUCH_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Mark the content `sha256` as used now (off the async threads; best effort).
pub fn touch(store_dir: &Path, sha256: &str) {
    let Some(path) = content_path(store_dir, sha256) else {
        return;
    };
    // One table per process: paths are unique across stores.
    static RECENT: std::sync::OnceLock<moka::sync::Cache<PathBuf, ()>> = std::sync::OnceLock::new();
    let recent = RECENT.get_or_init(|| {
        moka::sync::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(TOUCH_EVERY)
            .build()
    });
    if recent.contains_key(&path) {
        return;
    }
    recent.insert(path.clone(), ());
    record_use(path);
}

/// Mark the content `sha256` as used now, unthrottled: for callers that already
/// record uses at most every [`TOUCH_EVERY`] (memory-tier entries do, per entry).
pub fn touch_now(store_dir: &Path, sha256: &str) {
    if let Some(path) = content_path(store_dir, sha256) {
        record_use(path);
    }
}

fn record_use(path: PathBuf) {
    tokio::task::spawn_blocking(move || {
        // Read-only open: setting times needs ownership, not write permission.
        let result = std::fs::File::open(&path).and_then(|f| f.set_modified(SystemTime::now()));
        if let Err(e) = result {
            tracing::debug!(path = %path.display(), error = %e, "could not record last use");
        }
    });
}

/// When the content `sha256` was last used (its file's modification time).
pub fn last_used(store_dir: &Path, sha256: &str) -> Option<SystemTime> {
    std::fs::metadata(content_path(store_dir, sha256)?)
        .and_then(|m| m.modified())
        .ok()
}

/// Digests being streamed to clients right now.
#[derive(Default, Clone)]
pub struct InUse {
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

impl InUse {
    /// Hold `sha256` until the returned guard is dropped.
    pub fn hold(&self, sha256: &str) -> Hold {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        *counts.entry(sha256.to_string()).or_default() += 1;
        Hold {
            owner: self.clone(),
            sha256: sha256.to_string(),
        }
    }

    pub fn contains(&self, sha256: &str) -> bool {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(sha256)
    }
}

/// Keeps one digest marked as in use; released on drop, however the transfer ends.
pub struct Hold {
    owner: InUse,
    sha256: String,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut counts = self.owner.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.sha256) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.sha256);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_count_and_release() {
        let in_use = InUse::default();
        let a = in_use.hold("x");
        let b = in_use.hold("x");
        drop(a);
        assert!(in_use.contains("x"));
        drop(b);
        assert!(!in_use.contains("x"));
    }

    #[test]
    fn content_paths_follow_cacache() {
        let sha = "ab".repeat(32);
        let p = content_path(Path::new("/s"), &sha).unwrap();
        assert_eq!(p, Path::new("/s/content-v2/sha256/ab/ab").join(&sha[4..]));
        assert!(content_path(Path::new("/s"), "../x").is_none());
    }
}
