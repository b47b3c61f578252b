//! Upstream copies that failed verification: remembered for a short time (and
//! until the next index refresh) so clients get a clear 502 naming the expected
//! and actual digest instead of another doomed download.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why an archive is refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    /// `user/module@version`, for messages.
    pub label: String,
    pub expected: String,
    pub actual: String,
}

struct Entry {
    mismatch: Mismatch,
    at: Instant,
    /// Index refresh count when recorded; any later refresh forgets the entry.
    refreshes: u64,
}

pub struct Quarantine {
    ttl: Duration,
    entries: Mutex<HashMap<String, Entry>>,
}

impl Quarantine {
    pub fn new(ttl: Duration) -> Quarantine {
        Quarantine {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn record(&self, key: &str, mismatch: Mismatch, refreshes: u64) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: expired entries go whenever a new one comes in.
        entries.retain(|_, e| e.at.elapsed() < self.ttl);
        entries.insert(
            key.to_string(),
            Entry {
                mismatch,
                at: Instant::now(),
                refreshes,
            },
        );
    }

    /// Whether anything, current or not, is kept about `key`: cheap when nothing
    /// is kept at all, which is what every hot hit asks.
    pub fn holds(&self, key: &str) -> bool {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        !entries.is_empty() && entries.contains_key(key)
    }

    /// How long ago the still-current verdict on `key` was reached, if there is one.
    pub fn age(&self, key: &str, refreshes: u64) -> Option<Duration> {
        self.current(key, refreshes, |entry| entry.at.elapsed())
    }

    /// The remembered mismatch for `key`, if still current.
    pub fn get(&self, key: &str, refreshes: u64) -> Option<Mismatch> {
        self.current(key, refreshes, |entry| entry.mismatch.clone())
    }

    /// `read` of the entry for `key` if it is still current (younger than the TTL
    /// and no index refresh since); an outdated entry is forgotten.
    fn current<T>(&self, key: &str, refreshes: u64, read: impl FnOnce(&Entry) -> T) -> Option<T> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let entry = entries.get(key)?;
        if entry.at.elapsed() < self.ttl && entry.refreshes == refreshes {
            return Some(read(entry));
        }
        entries.remove(key);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m() -> Mismatch {
        Mismatch {
            label: "a/b@1.0.0".into(),
            expected: "e".into(),
            actual: "a".into(),
        }
    }

    #[test]
    fn forgotten_after_ttl_or_refresh() {
        let q = Quarantine::new(Duration::from_secs(60));
        q.record("k", m(), 3);
        assert_eq!(q.get("k", 3), Some(m()));
        assert_eq!(q.get("k", 4), None);
        assert_eq!(q.get("k", 3), None, "a refresh forgets it for good");
        let q = Quarantine::new(Duration::ZERO);
        q.record("k", m(), 0);
        assert_eq!(q.get("k", 0), None);
    }
}
