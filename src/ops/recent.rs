//! The last hour, for the status page: requests and archive hits and misses per
//! minute (a ring of 60 buckets), and the modules asked for most (a bounded
//! "space-saving" count). Recording costs a few atomic operations per request,
//! and a short uncontended lock per archive request, never an allocation once the
//! hot modules are known.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What one ended request adds to the hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    ArchiveHit,
    ArchiveMiss,
    /// Any other request (archives neither hit nor missed included).
    Other,
}

const MINUTES: usize = 60;
/// Modules counted at once; a module outside them replaces the least counted.
const TRACKED_MODULES: usize = 64;
/// Longer `user/module` names are not counted (the path classifier bounds them
/// already; this keeps the table small whatever it lets through).
const MODULE_NAME_MAX: usize = 200;

/// One minute's counts; `stamp` is the minute number + 1 (0: never used).
#[derive(Default)]
struct Minute {
    stamp: AtomicU64,
    requests: AtomicU64,
    archive_hits: AtomicU64,
    archive_misses: AtomicU64,
}

/// What the last hour (or the part of it the gateway has been up) shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastHour {
    pub requests: u64,
    pub archive_hits: u64,
    pub archive_misses: u64,
    /// How much time the counts cover (the gateway may be younger than an hour).
    pub covered: Duration,
}

pub struct Recent {
    origin: Instant,
    minutes: [Minute; MINUTES],
    modules: Mutex<TopModules>,
}

impl Default for Recent {
    fn default() -> Recent {
        Recent {
            origin: Instant::now(),
            minutes: std::array::from_fn(|_| Minute::default()),
            modules: Mutex::new(TopModules::default()),
        }
    }
}

impl Recent {
    fn minute_now(&self) -> u64 {
        self.origin.elapsed().as_secs() / 60
    }

    /// A request that ended.
    pub fn request(&self, ended: Ended) {
        self.request_in(self.minute_now(), ended);
    }

    fn request_in(&self, now: u64, ended: Ended) {
        let bucket = &self.minutes[(now % MINUTES as u64) as usize];
        let stamp = bucket.stamp.load(Ordering::Acquire);
        // The first request of a new minute clears the bucket it reuses. A count
        // racing with the clear may be lost: this is a status page, not billing.
        if stamp != now + 1
            && bucket
                .stamp
                .compare_exchange(stamp, now + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            bucket.requests.store(0, Ordering::Relaxed);
            bucket.archive_hits.store(0, Ordering::Relaxed);
            bucket.archive_misses.store(0, Ordering::Relaxed);
        }
        bucket.requests.fetch_add(1, Ordering::Relaxed);
        match ended {
            Ended::ArchiveHit => bucket.archive_hits.fetch_add(1, Ordering::Relaxed),
            Ended::ArchiveMiss => bucket.archive_misses.fetch_add(1, Ordering::Relaxed),
            Ended::Other => 0,
        };
    }

    /// An archive of `user/module` was asked for.
    pub fn module_asked(&self, user: &str, module: &str) {
        if user.len() + module.len() < MODULE_NAME_MAX {
            if let Ok(mut top) = self.modules.lock() {
                top.count(user, module);
            }
        }
    }

    /// The counts of the last 60 minutes (this one included).
    pub fn last_hour(&self) -> LastHour {
        self.hour_until(self.minute_now(), self.origin.elapsed())
    }

    /// The hour ending in minute `now`, `up` after start.
    fn hour_until(&self, now: u64, up: Duration) -> LastHour {
        let mut sum = LastHour {
            requests: 0,
            archive_hits: 0,
            archive_misses: 0,
            covered: up.min(Duration::from_secs(3600)),
        };
        for bucket in &self.minutes {
            let stamp = bucket.stamp.load(Ordering::Acquire);
            if stamp == 0 || stamp + (MINUTES as u64) <= now + 1 {
                continue;
            }
            sum.requests += bucket.requests.load(Ordering::Relaxed);
            sum.archive_hits += bucket.archive_hits.load(Ordering::Relaxed);
            sum.archive_misses += bucket.archive_misses.load(Ordering::Relaxed);
        }
        sum
    }

    /// Up to `n` modules asked for most since start, most first, with their counts
    /// (exact while fewer than 64 modules were asked for; otherwise an upper bound).
    pub fn top_modules(&self, n: usize) -> Vec<(String, u64)> {
        let Ok(top) = self.modules.lock() else {
            return Vec::new();
        };
        let mut all: Vec<(String, u64)> = top
            .counts
            .iter()
            .map(|(name, count)| (name.to_string(), *count))
            .collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }
}

/// The space-saving algorithm (Metwally et al.): at most [`TRACKED_MODULES`]
/// counters; a new name takes over the smallest one, inheriting its count, so a
/// module asked for often is never missing from the top.
#[derive(Default)]
struct TopModules {
    counts: HashMap<Box<str>, u64>,
    /// Reused to build `user/module` without allocating for a known module.
    scratch: String,
}

impl TopModules {
    fn count(&mut self, user: &str, module: &str) {
        self.scratch.clear();
        self.scratch.push_str(user);
        self.scratch.push('/');
        self.scratch.push_str(module);
        if let Some(count) = self.counts.get_mut(self.scratch.as_str()) {
            *count += 1;
            return;
        }
        let mut inherited = 0;
        if self.counts.len() >= TRACKED_MODULES {
            let smallest = self
                .counts
                .iter()
                .min_by_key(|(_, count)| **count)
                .map(|(name, count)| (name.clone(), *count));
            if let Some((name, count)) = smallest {
                self.counts.remove(&name);
                inherited = count;
            }
        }
        self.counts
            .insert(self.scratch.as_str().into(), inherited + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_hour_by_route_and_result() {
        let r = Recent::default();
        r.request(Ended::ArchiveHit);
        r.request(Ended::ArchiveHit);
        r.request(Ended::ArchiveMiss);
        r.request(Ended::Other);
        r.request(Ended::Other);
        let h = r.last_hour();
        assert_eq!(
            (h.requests, h.archive_hits, h.archive_misses),
            (5, 2, 1),
            "{h:?}"
        );
    }

    #[test]
    fn old_minutes_fall_out_of_the_hour() {
        let r = Recent::default();
        let up = Duration::from_secs(90 * 60);
        r.request_in(0, Ended::ArchiveHit);
        r.request_in(30, Ended::ArchiveHit);
        assert_eq!(r.hour_until(59, up).requests, 2);
        // Minute 0 is out of the hour ending in minute 60; its bucket is reused.
        assert_eq!(r.hour_until(60, up).requests, 1);
        r.request_in(60, Ended::ArchiveMiss);
        let h = r.hour_until(60, up);
        assert_eq!((h.requests, h.archive_hits, h.archive_misses), (2, 1, 1));
        assert_eq!(h.covered, Duration::from_secs(3600));
    }

    #[test]
    fn top_modules_stay_bounded_and_keep_the_hot_ones() {
        let r = Recent::default();
        for _ in 0..50 {
            r.module_asked("alice", "json");
        }
        for i in 0..1000 {
            r.module_asked("crowd", &format!("m{i}"));
            r.module_asked("bob", "util");
        }
        let top = r.top_modules(3);
        assert_eq!(top[0], ("bob/util".to_string(), 1000));
        assert_eq!(top[1].0, "alice/json");
        assert!(r.modules.lock().unwrap().counts.len() <= TRACKED_MODULES);
        let long = "x".repeat(MODULE_NAME_MAX);
        r.module_asked(&long, "y");
        assert!(r.top_modules(100).iter().all(|(name, _)| name.len() < 100));
    }
}
