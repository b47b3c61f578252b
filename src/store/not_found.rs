//! Upstream 404s for archives and assets, remembered for `freshness.not_found_ttl`
//! so a client retrying a missing version does not cost an index refresh and an
//! upstream request each time. An entry recorded while the index did not list the
//! version is forgotten as soon as it does (it has just been published).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// More than this many live entries and new 404s are not remembered (bounded memory
/// whatever a client asks for).
const MAX_ENTRIES: usize = 10_000;

struct Entry {
    at: Instant,
    /// Whether the index listed the version when the upstream said 404.
    listed: bool,
}

pub struct NotFound {
    ttl: Duration,
    entries: Mutex<HashMap<String, Entry>>,
}

impl NotFound {
    pub fn new(ttl: Duration) -> NotFound {
        NotFound {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Remember that the upstream answered 404 for `key`.
    pub fn record(&self, key: &str, listed: bool) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, e| e.at.elapsed() < self.ttl);
            if entries.len() >= MAX_ENTRIES {
                return;
            }
        }
        entries.insert(
            key.to_string(),
            Entry {
                at: Instant::now(),
                listed,
            },
        );
    }

    /// Whether anything, current or not, is kept about `key`: cheap when nothing
    /// is kept at all, which is what every hot hit asks.
    pub fn holds(&self, key: &str) -> bool {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        !entries.is_empty() && entries.contains_key(key)
    }

    /// Whether a 404 for `key` is still current, given whether the index lists it now.
    pub fn remembered(&self, key: &str, listed_now: bool) -> bool {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = entries.get(key) else {
            return false;
        };
        if entry.at.elapsed() < self.ttl && (entry.listed || !listed_now) {
            return true;
        }
        entries.remove(key);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgotten_after_the_ttl_or_once_the_index_lists_the_version() {
        let n = NotFound::new(Duration::from_secs(60));
        n.record("archive/a/b/1.0.0", false);
        assert!(n.remembered("archive/a/b/1.0.0", false));
        assert!(!n.remembered("archive/a/b/1.0.0", true), "published since");
        assert!(
            !n.remembered("archive/a/b/1.0.0", false),
            "forgotten for good"
        );
        // Listed and still 404 upstream: only the TTL forgets it.
        n.record("archive/a/b/2.0.0", true);
        assert!(n.remembered("archive/a/b/2.0.0", true));
        let n = NotFound::new(Duration::from_millis(10));
        n.record("k", false);
        std::thread::sleep(Duration::from_millis(20));
        assert!(!n.remembered("k", false));
        let off = NotFound::new(Duration::ZERO);
        off.record("k", false);
        assert!(!off.remembered("k", false));
    }
}
