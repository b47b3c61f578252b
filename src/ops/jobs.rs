//! Per-CI-job counters: what the cache did for one job (`GET /-/jobs/<id>`,
//! `moonbit-registry report`). A job id comes with the request (a `/job/<id>/`
//! path prefix on the registry endpoint); the jobs seen most recently are kept,
//! at most `jobs.max` of them, so memory stays bounded whatever ids clients send.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use super::metrics::{CacheResult, RouteName};

/// Longest job id accepted.
pub const JOB_ID_MAX: usize = 128;

/// A job id as it travels with a request (validated: letters, digits, `.`, `_`, `-`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobId(pub Arc<str>);

impl JobId {
    /// A job id, or why `raw` is not one.
    pub fn parse(raw: &str) -> Result<JobId, String> {
        let ok = !raw.is_empty()
            && raw.len() <= JOB_ID_MAX
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(JobId(raw.into()))
        } else {
            Err(format!(
                "not a job id (1 to {JOB_ID_MAX} letters, digits, `.`, `_` or `-`): {:?}",
                raw.chars().take(JOB_ID_MAX).collect::<String>()
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One job's counters.
#[derive(Debug, Default)]
pub struct JobCounters {
    requests: AtomicU64,
    archives: AtomicU64,
    archive_hits: AtomicU64,
    archive_misses: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    bytes_served: AtomicU64,
    upstream_bytes: AtomicU64,
    upstream_wait_ms: AtomicU64,
    errors: AtomicU64,
}

/// One response that ended, as the access log saw it.
pub struct Ended {
    pub route: RouteName,
    pub cache: CacheResult,
    pub bytes: u64,
    pub complete: bool,
    pub elapsed: Duration,
}

impl JobCounters {
    fn record(&self, e: &Ended) {
        self.requests.fetch_add(1, Relaxed);
        self.bytes_served.fetch_add(e.bytes, Relaxed);
        let from_upstream = matches!(
            e.cache,
            CacheResult::Miss | CacheResult::Bypass | CacheResult::Revalidated
        );
        match e.cache {
            CacheResult::Hit | CacheResult::Mirror | CacheResult::Stale => {
                self.hits.fetch_add(1, Relaxed);
            }
            CacheResult::Miss => {
                self.misses.fetch_add(1, Relaxed);
            }
            _ => {}
        }
        if from_upstream {
            // The body streamed from the upstream as it arrived: its bytes and its
            // whole duration are what the job got from, and waited on, the upstream.
            self.upstream_bytes.fetch_add(e.bytes, Relaxed);
            let ms = u64::try_from(e.elapsed.as_millis()).unwrap_or(u64::MAX);
            self.upstream_wait_ms.fetch_add(ms, Relaxed);
        }
        if e.cache == CacheResult::Error || !e.complete {
            self.errors.fetch_add(1, Relaxed);
        }
        if e.route == RouteName::Archive {
            self.archives.fetch_add(1, Relaxed);
            match e.cache {
                CacheResult::Hit => {
                    self.archive_hits.fetch_add(1, Relaxed);
                }
                CacheResult::Miss => {
                    self.archive_misses.fetch_add(1, Relaxed);
                }
                _ => {}
            }
        }
    }

    /// The report `GET /-/jobs/<id>` answers.
    pub fn to_json(&self, id: &str) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Relaxed);
        serde_json::json!({
            "job": id,
            "requests": get(&self.requests),
            "hits": get(&self.hits),
            "misses": get(&self.misses),
            "archives": get(&self.archives),
            "archives_from_cache": get(&self.archive_hits),
            // An archive fetched from the upstream for this job: a module fetched cold.
            "modules_fetched_cold": get(&self.archive_misses),
            "bytes_served": get(&self.bytes_served),
            "bytes_from_upstream": get(&self.upstream_bytes),
            "upstream_wait_seconds": get(&self.upstream_wait_ms) as f64 / 1000.0,
            "errors": get(&self.errors),
        })
    }
}

/// The jobs seen most recently, at most `max`.
pub struct Jobs {
    jobs: moka::sync::Cache<JobId, Arc<JobCounters>>,
}

impl Jobs {
    pub fn new(max: u64) -> Jobs {
        Jobs {
            jobs: moka::sync::Cache::new(max.max(1)),
        }
    }

    /// Count a response that ended for `job`.
    pub fn record(&self, job: &JobId, ended: &Ended) {
        self.jobs
            .get_with_by_ref(job, || Arc::new(JobCounters::default()))
            .record(ended);
    }

    /// Up to `n` remembered jobs with their (archives, from cache, cold) counts.
    pub fn some(&self, n: usize) -> Vec<(String, u64, u64, u64)> {
        self.jobs
            .iter()
            .take(n)
            .map(|(id, c)| {
                let get = |a: &AtomicU64| a.load(Relaxed);
                (
                    id.as_str().to_string(),
                    get(&c.archives),
                    get(&c.archive_hits),
                    get(&c.archive_misses),
                )
            })
            .collect()
    }

    /// The counters of `job`, if it is still remembered.
    pub fn get(&self, job: &JobId) -> Option<Arc<JobCounters>> {
        self.jobs.get(job)
    }
}
