//! The memory tier: a moka cache of small, hot objects, weighted by their size in
//! bytes so the configured budget is a real bound. Each entry is shared (`Arc`):
//! a hit clones a pointer, and answers with the body as shared `Bytes` and the
//! response head prepared when the entry was made, so a hot hit formats nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use moka::sync::Cache;

use super::object::response_head;
use crate::memfile::{self, Sendable};

/// What the memory tier keeps for one object.
pub struct Hot {
    pub bytes: Bytes,
    pub sha256: String,
    /// The head every answer from this entry carries: content type, length, ETag
    /// and `x-cache: hit`, built once.
    head: HeaderMap,
    /// When the content file's last use was last recorded (seconds on [`clock`]),
    /// so a hit checks one atomic instead of a table of paths.
    touched: AtomicU64,
    /// For a larger object, `bytes` live in an in-memory file the doors can
    /// `sendfile` from.
    pub sendable: Option<Sendable>,
}

impl Hot {
    pub fn new(bytes: Bytes, sha256: String, content_type: &'static str) -> Hot {
        // Exactly what a hit from the disk tier answers with.
        let head = response_head(content_type, Some(bytes.len() as u64), Some(&sha256), "hit");
        let (bytes, sendable) = match bytes.len() >= memfile::MIN_SIZE {
            true => match Sendable::copy_of(&bytes) {
                Some((mapped, sendable)) => (mapped, Some(sendable)),
                None => (bytes, None),
            },
            false => (bytes, None),
        };
        Hot {
            bytes,
            sha256,
            head,
            touched: AtomicU64::new(u64::MAX),
            sendable,
        }
    }

    /// The prepared response head (a copy: header values are shared, not re-encoded).
    pub fn head(&self) -> HeaderMap {
        self.head.clone()
    }

    /// Whether this hit should record the content's last use on disk: at most once
    /// every `every` per entry (the first hit always does).
    pub fn due_for_touch(&self, every: Duration) -> bool {
        let now = clock();
        let last = self.touched.load(Ordering::Relaxed);
        if last != u64::MAX && now.saturating_sub(last) < every.as_secs() {
            return false;
        }
        // One of the hits racing here records it.
        self.touched
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

/// Seconds since the first call in this process: a cheap, monotonic clock.
fn clock() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

#[derive(Clone)]
pub struct Memory {
    cache: Cache<String, Arc<Hot>>,
    item_max: u64,
}

impl Memory {
    pub fn new(budget: u64, item_max: u64) -> Memory {
        let cache = Cache::builder()
            .max_capacity(budget)
            .weigher(|key: &String, hot: &Arc<Hot>| {
                let weight = key.len() + hot.sha256.len() + hot.bytes.len();
                u32::try_from(weight).unwrap_or(u32::MAX)
            })
            .build();
        Memory {
            cache,
            item_max: item_max.min(u64::from(u32::MAX)),
        }
    }

    /// Whether an object of `size` bytes is small enough to keep here.
    pub fn fits(&self, size: u64) -> bool {
        size <= self.item_max
    }

    /// Bytes held now (by the weigher: keys, digests and bodies).
    pub fn weighted_size(&self) -> u64 {
        self.cache.weighted_size()
    }

    // Synchronous: a lookup is a hash and a read lock, nothing to wait for, and
    // moka's async `get` would make every request's future ~1 KiB larger (hyper
    // moves it into place per request).
    pub fn get(&self, key: &str) -> Option<Arc<Hot>> {
        self.cache.get(key)
    }

    pub fn insert(&self, key: String, hot: Hot) {
        if self.fits(hot.bytes.len() as u64) {
            self.cache.insert(key, Arc::new(hot));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use http::header;

    #[test]
    fn the_prepared_head_is_the_object_response_head() {
        let hot = Hot::new(
            Bytes::from_static(b"zip"),
            "ab".repeat(32),
            "application/zip",
        );
        let head = hot.head();
        assert_eq!(head[header::CONTENT_TYPE], "application/zip");
        assert_eq!(head[header::CONTENT_LENGTH], "3");
        assert_eq!(
            head[header::ETAG],
            format!("\"{}\"", "ab".repeat(32)).as_str()
        );
        assert_eq!(head["x-cache"], "hit");
    }

    #[test]
    fn a_hit_records_its_use_once_per_period() {
        let hot = Hot::new(Bytes::new(), String::new(), "application/zip");
        assert!(hot.due_for_touch(Duration::from_secs(60)));
        assert!(!hot.due_for_touch(Duration::from_secs(60)));
        assert!(hot.due_for_touch(Duration::ZERO));
    }
}
