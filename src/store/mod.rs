//! The cache of immutable objects (archives, wasm assets): memory tier, then disk
//! tier, then (for an archive) the tier replicas share in a bucket ([`shared`]),
//! then one shared upstream fetch per key, or, for an archive of a source the
//! gateway hosts, its file ([`local`]). Every answer says where it came from in
//! `x-cache` (`hit` from the store, the shared tier or a hosted file, `miss`
//! fetched now).

pub mod ahead;
pub mod disk;
pub mod eviction;
pub mod flight;
pub mod local;
pub mod memory;
pub mod not_found;
pub mod object;
pub mod quarantine;
pub mod shared;
pub mod usage;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};

use crate::body::{self, GatewayBody};
use crate::config::StoreSettings;
use crate::ops::metrics::{StoreCounters, Tier};
use crate::upstream::Upstream;
use disk::{Disk, Entry};
use flight::{Answer, Flight, Flights, Origin, Outcome};
use memory::{Hot, Memory};
use not_found::NotFound;
pub use object::{Object, Trust};
use quarantine::{Mismatch, Quarantine};
use shared::Shared;

/// Store key of the `symbols.zip` kept for offline use (by `export` and `import`).
pub const SYMBOLS_KEY: &str = "symbols/symbols.zip";

pub struct Limits {
    pub archive_max: u64,
    /// How long a copy that failed verification is refused without refetching.
    pub bad_archive_ttl: std::time::Duration,
    /// Background prefetches running at once.
    pub prefetch_jobs: usize,
    /// How long an upstream 404 is remembered.
    pub not_found_ttl: std::time::Duration,
}

impl Limits {
    /// The store's own section of the configuration, `[storage]`.
    pub fn new(settings: &StoreSettings) -> Limits {
        Limits {
            archive_max: settings.archive_max.as_u64(),
            bad_archive_ttl: settings.bad_archive_ttl,
            prefetch_jobs: settings.prefetch_jobs,
            not_found_ttl: settings.not_found_ttl,
        }
    }
}

pub struct Store {
    disk: Disk,
    memory: Memory,
    flights: Flights,
    upstream: Upstream,
    spool_dir: PathBuf,
    limits: Limits,
    quarantine: Quarantine,
    not_found: NotFound,
    prefetch_permits: tokio::sync::Semaphore,
    prefetch_pending: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Digests being streamed from disk; eviction leaves them alone.
    in_use: usage::InUse,
    /// `flight_waiters_total` and `evictions_total`.
    pub(crate) counters: StoreCounters,
    /// Bytes of distinct content on disk at the last size check (see `eviction`).
    pub(crate) disk_bytes: std::sync::atomic::AtomicU64,
    /// The tier replicas share, if `[storage.shared]` configures one.
    shared: Option<Arc<Shared>>,
}

impl Store {
    /// Open (creating if needed) the store under `data_dir`.
    pub fn open(
        data_dir: &Path,
        storage: &StoreSettings,
        upstream: Upstream,
    ) -> anyhow::Result<Store> {
        let spool_dir = data_dir.join("spool");
        // Spool files only live as long as a fetch; any left over are from a crash.
        if spool_dir.exists() {
            std::fs::remove_dir_all(&spool_dir)
                .with_context(|| format!("could not clear {}", spool_dir.display()))?;
        }
        // So are the store's own temp files; a command beside us writes to fresh ones.
        let (orphans, bytes, _) = eviction::sweep_tmp(&data_dir.join("store"), eviction::TMP_GRACE);
        if orphans > 0 {
            tracing::info!(
                files = orphans,
                bytes,
                "removed temp files left in the store by a crash"
            );
        }
        Store::open_with_spool(data_dir, spool_dir, storage, upstream)
    }

    /// Open the store with downloads spooled in `spool_dir`, which is left as it is:
    /// for commands (`warm`, `export`) that may run beside a `serve` on the same data dir.
    pub fn open_with_spool(
        data_dir: &Path,
        spool_dir: PathBuf,
        storage: &StoreSettings,
        upstream: Upstream,
    ) -> anyhow::Result<Store> {
        let limits = Limits::new(storage);
        let store_dir = data_dir.join("store");
        std::fs::create_dir_all(&store_dir)
            .with_context(|| format!("could not create store at {}", store_dir.display()))?;
        std::fs::create_dir_all(&spool_dir)
            .with_context(|| format!("could not create {}", spool_dir.display()))?;
        Ok(Store {
            disk: Disk::new(store_dir),
            memory: Memory::new(storage.memory.as_u64(), storage.memory_item_max.as_u64()),
            flights: Flights::default(),
            upstream,
            spool_dir,
            quarantine: Quarantine::new(limits.bad_archive_ttl),
            not_found: NotFound::new(limits.not_found_ttl),
            prefetch_permits: tokio::sync::Semaphore::new(limits.prefetch_jobs.max(1)),
            prefetch_pending: Default::default(),
            limits,
            in_use: usage::InUse::default(),
            counters: StoreCounters::default(),
            disk_bytes: std::sync::atomic::AtomicU64::new(0),
            shared: None,
        })
    }

    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// Bytes the memory tier holds.
    /// Bytes on disk at the last size check (every `storage.gc_interval`).
    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory.weighted_size()
    }

    /// Read from and fill `shared` between the disk tier and the upstream.
    pub fn share(&mut self, shared: Arc<Shared>) {
        self.shared = Some(shared);
    }

    /// The shared tier, if there is one.
    pub fn shared(&self) -> Option<&Arc<Shared>> {
        self.shared.as_ref()
    }

    /// Wait for the shared tier's background uploads (a command does before it
    /// exits); how many there were.
    pub async fn finish_uploads(&self) -> usize {
        match &self.shared {
            Some(shared) => shared.finish_background().await,
            None => 0,
        }
    }

    /// Count flight joins and evictions in these (registered) counters.
    pub fn count_into(&mut self, counters: StoreCounters) {
        self.counters = counters;
    }

    pub fn in_flight(&self) -> usize {
        self.flights.in_flight()
    }

    /// How long `key` has been held back for a copy that failed verification, if it
    /// is (`refreshes`: the index refresh count the caller's expectation was read at).
    pub fn held_back_for(&self, key: &str, refreshes: u64) -> Option<std::time::Duration> {
        self.quarantine.age(key, refreshes)
    }

    /// The answer for `key` if the upstream said 404 for it recently and the index
    /// (`listed`: whether it lists the version now) has not changed its mind.
    pub fn remembered_not_found(&self, key: &str, listed: bool) -> Option<Response<GatewayBody>> {
        if !self.not_found.remembered(key, listed) {
            return None;
        }
        let mut resp = body::text(
            StatusCode::NOT_FOUND,
            format!("{key} was not found upstream moments ago"),
        );
        resp.headers_mut()
            .insert("x-cache", HeaderValue::from_static("hit"));
        Some(resp)
    }

    /// Answer a GET (or HEAD) for `object` from memory, disk, or a shared upstream fetch.
    pub async fn respond(self: &Arc<Self>, object: Object, head: bool) -> Response<GatewayBody> {
        let listed = matches!(object.trust, Trust::Checksum { .. });
        if let Some(resp) = self.remembered_not_found(&object.key, listed) {
            return resp;
        }
        // A good copy held here wins over a remembered bad upstream copy.
        if let Some(resp) = self.serve_held(&object, head).await {
            return resp;
        }
        if let Some(path) = &object.local {
            return local::respond(self, &object, path, head).await;
        }
        if let Trust::Checksum { refreshes, .. } = &object.trust {
            if let Some(bad) = self.quarantine.get(&object.key, *refreshes) {
                return refuse_mismatch(&bad);
            }
        }
        if self.upstream.is_offline() {
            let missing_from = match object.trust {
                Trust::Unverified => "index",
                _ => "store (warm or import it first)",
            };
            return body::text(
                StatusCode::NOT_FOUND,
                format!(
                    "the gateway is offline and {} is not in its {missing_from}",
                    object.key
                ),
            );
        }
        if head {
            return self.head_upstream(&object).await;
        }
        let flight = self.flights.join(self, &object);
        self.serve_flight(&object, flight).await
    }

    /// Answer from the memory tier, else the disk tier; `None` if neither holds it.
    pub(crate) async fn serve_held(
        &self,
        object: &Object,
        head: bool,
    ) -> Option<Response<GatewayBody>> {
        if let Some(hot) = self
            .memory
            .get(&object.key)
            .filter(|h| object.accepts(&h.sha256))
        {
            return Some(self.answer_hot(&hot, head));
        }
        self.serve_stored(object, head).await
    }

    /// The hot path: answer `key` from the memory tier if it holds a copy that
    /// `vouched` accepts (the index's checksum), and nothing is remembered against
    /// the key (a recent upstream 404, a bad upstream copy), which the full path in
    /// [`Store::respond`] weighs instead. `None` sends the request down that path.
    pub fn memory_hit(
        &self,
        key: &str,
        head: bool,
        vouched: impl FnOnce(&str) -> bool,
    ) -> Option<Response<GatewayBody>> {
        if self.not_found.holds(key) || self.quarantine.holds(key) {
            return None;
        }
        let hot = self.memory.get(key)?;
        if !vouched(&hot.sha256) {
            return None;
        }
        Some(self.answer_hot(&hot, head))
    }

    /// A memory-tier entry as a response: its prepared head, its shared bytes.
    fn answer_hot(&self, hot: &Hot, head: bool) -> Response<GatewayBody> {
        if hot.due_for_touch(usage::TOUCH_EVERY) {
            usage::touch_now(self.disk.dir(), &hot.sha256);
        }
        let body = if head {
            body::empty()
        } else {
            body::full(hot.bytes.clone())
        };
        let mut resp = Response::new(body);
        *resp.headers_mut() = hot.head();
        // For `served_bytes_total{tier="memory"}`: other hits are the disk's.
        resp.extensions_mut().insert(Tier::Memory);
        if let (Some(sendable), false) = (&hot.sendable, head) {
            resp.extensions_mut().insert(sendable.clone());
        }
        resp
    }

    /// Fetch `object` into the store in the background unless it is there already;
    /// at most `prefetch_jobs` at a time. Never blocks a client's request.
    pub async fn prefetch(self: &Arc<Self>, object: Object) {
        // A hosted archive is here already, in its file.
        if object.local.is_some() {
            return;
        }
        // Cheap checks first, so a closure that is mostly present costs no queueing.
        if let Trust::Checksum { refreshes, .. } = &object.trust {
            if self.quarantine.get(&object.key, *refreshes).is_some() {
                return;
            }
        }
        let listed = matches!(object.trust, Trust::Checksum { .. });
        if self.not_found.remembered(&object.key, listed) || self.memory.get(&object.key).is_some()
        {
            return;
        }
        if let Ok(Some(entry)) = self.disk.lookup(&object.key).await {
            if object.accepts(&entry.sha256()) {
                return;
            }
        }
        // One queued prefetch per key, however many requests name it as a dependency.
        let Some(_pending) = PendingPrefetch::claim(self, &object.key) else {
            return;
        };
        let Ok(_permit) = self.prefetch_permits.acquire().await else {
            return;
        };
        tracing::debug!(key = %object.key, "prefetching");
        self.flights.join(self, &object).outcome(|_| {}).await;
    }

    async fn serve_stored(&self, object: &Object, head: bool) -> Option<Response<GatewayBody>> {
        let entry = match self.disk.lookup(&object.key).await {
            Ok(Some(entry)) => entry,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(key = %object.key, error = %e, "store lookup failed; treating as a miss");
                return None;
            }
        };
        let sha = entry.sha256();
        if !object.accepts(&sha) {
            // The index now names another digest (history rewritten upstream): refetch.
            tracing::warn!(key = %object.key, stored = %sha, "stored copy no longer matches the index; refetching");
            return None;
        }
        usage::touch(self.disk.dir(), &sha);
        if head {
            return Some(object_response(
                object,
                Some(entry.size),
                Some(&sha),
                "hit",
                body::empty(),
            ));
        }
        let body = if self.memory.fits(entry.size) {
            match self.disk.read(&entry).await {
                Ok(bytes) => {
                    let hot = Hot::new(bytes.clone(), sha.clone(), object.content_type);
                    self.memory.insert(object.key.clone(), hot);
                    body::full(bytes)
                }
                Err(e) => return self.drop_corrupt(object, &entry, e).await,
            }
        } else {
            let hold = self.in_use.hold(&sha);
            match self.disk.stream(&object.key, &entry, hold).await {
                Ok(body) => body,
                Err(e) => return self.drop_corrupt(object, &entry, e).await,
            }
        };
        Some(object_response(
            object,
            Some(entry.size),
            Some(&sha),
            "hit",
            body,
        ))
    }

    /// An entry whose bytes no longer match their digest is removed, so this request
    /// and the next ones fetch it again instead of failing forever. Any other read
    /// error (e.g. too many open files) keeps the entry and answers 503.
    async fn drop_corrupt(
        &self,
        object: &Object,
        entry: &Entry,
        error: cacache::Error,
    ) -> Option<Response<GatewayBody>> {
        match error {
            cacache::Error::IntegrityError(_) | cacache::Error::SizeMismatch(..) => {
                tracing::error!(key = %object.key, sha256 = %entry.sha256(), %error, "stored entry is corrupt; removing it and refetching");
                self.disk.remove_corrupt(&object.key, entry).await;
                None
            }
            // Evicted between lookup and read: simply a miss.
            cacache::Error::EntryNotFound(..) => None,
            cacache::Error::IoError(ref e, _) if e.kind() == std::io::ErrorKind::NotFound => None,
            other => {
                tracing::error!(key = %object.key, error = %other, "store read failed");
                Some(body::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the store could not read {}: {other}", object.key),
                ))
            }
        }
    }

    /// Answer a client from a fetch: the body as it arrives, or what ended the fetch.
    async fn serve_flight(&self, object: &Object, flight: Flight) -> Response<GatewayBody> {
        let outcome = match flight.answer().await {
            Answer::Body {
                len,
                body,
                origin: Origin::Upstream,
            } => return object_response(object, len, None, "miss", body),
            // Another replica fetched it: a hit for the cluster, counted as the
            // shared tier's bytes.
            Answer::Body {
                len,
                body,
                origin: Origin::Shared,
            } => {
                let mut resp = object_response(object, len, None, "hit", body);
                resp.extensions_mut().insert(Tier::Shared);
                return resp;
            }
            Answer::Unreadable(e) => {
                return body::text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("could not read the spool file: {e}"),
                )
            }
            Answer::Ended(outcome) => outcome,
        };
        match outcome {
            // Committed by another fetch (a fetch that completes gives a body instead).
            Outcome::Stored | Outcome::Fetched { .. } => {
                match self.serve_stored(object, false).await {
                    Some(resp) => resp,
                    None => body::text(StatusCode::BAD_GATEWAY, "stored object vanished; retry"),
                }
            }
            Outcome::Refused {
                status,
                content_type,
                body: bytes,
            } => {
                let mut resp = Response::new(body::full(bytes));
                *resp.status_mut() = status;
                if let Some(ct) = content_type {
                    resp.headers_mut().insert(header::CONTENT_TYPE, ct);
                }
                resp.headers_mut()
                    .insert("x-cache", HeaderValue::from_static("miss"));
                resp
            }
            Outcome::Broken(reason) => body::text(
                StatusCode::BAD_GATEWAY,
                format!("upstream transfer of {} failed: {reason}", object.key),
            ),
            Outcome::Unreachable(reason) => body::text(
                StatusCode::BAD_GATEWAY,
                format!(
                    "{} is not stored and no source could be reached: {reason}",
                    object.key
                ),
            ),
            Outcome::Abandoned => body::text(
                StatusCode::BAD_GATEWAY,
                "upstream fetch ended without an answer",
            ),
        }
    }

    /// HEAD on a miss: ask the first source, never start a download for it.
    async fn head_upstream(&self, object: &Object) -> Response<GatewayBody> {
        let Some(url) = object.urls.first() else {
            return body::text(StatusCode::BAD_GATEWAY, "no source configured");
        };
        let req = Request::builder()
            .method(Method::HEAD)
            .uri(url.as_str())
            .header(header::USER_AGENT, crate::USER_AGENT)
            .body(body::empty());
        let req = match req {
            Ok(req) => req,
            Err(e) => {
                return body::text(
                    StatusCode::BAD_GATEWAY,
                    format!("bad upstream URL {url}: {e}"),
                )
            }
        };
        match self.upstream.send_guarded(req).await {
            Ok(resp) => {
                let len = crate::upstream::content_length(resp.headers());
                let mut out = object_response(object, len, None, "miss", body::empty());
                *out.status_mut() = resp.status();
                out
            }
            Err(e) => body::text(StatusCode::BAD_GATEWAY, e.to_string()),
        }
    }
}

/// A key queued for prefetching; unqueued on drop, however the prefetch ends.
struct PendingPrefetch<'a> {
    store: &'a Store,
    key: String,
}

impl<'a> PendingPrefetch<'a> {
    fn claim(store: &'a Store, key: &str) -> Option<PendingPrefetch<'a>> {
        let mut pending = store
            .prefetch_pending
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        pending.insert(key.to_string()).then(|| PendingPrefetch {
            store,
            key: key.to_string(),
        })
    }
}

impl Drop for PendingPrefetch<'_> {
    fn drop(&mut self) {
        let mut pending = self
            .store
            .prefetch_pending
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        pending.remove(&self.key);
    }
}

/// The answer for an archive whose upstream copy is known to be bad.
pub fn refuse_mismatch(bad: &Mismatch) -> Response<GatewayBody> {
    body::text(
        StatusCode::BAD_GATEWAY,
        format!(
            "upstream archive {} failed verification: the index says sha256 {}, the upstream sent {}; not served",
            bad.label, bad.expected, bad.actual
        ),
    )
}

fn object_response(
    object: &Object,
    len: Option<u64>,
    sha256: Option<&str>,
    cache: &'static str,
    body: GatewayBody,
) -> Response<GatewayBody> {
    let mut resp = Response::new(body);
    *resp.headers_mut() = object::response_head(object.content_type, len, sha256, cache);
    resp
}
