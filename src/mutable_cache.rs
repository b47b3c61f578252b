//! Mutable resources (`symbols.zip`; the rule is general, keyed by upstream URL):
//! stored with their response headers and served by RFC 9111 through
//! http-cache-semantics, with RFC 5861 on top, which that crate does not do.
//!
//! - Fresh copies are served from the store. Stale ones are revalidated with the
//!   upstream (`If-None-Match` / `If-Modified-Since`); a 304 refreshes the stored
//!   policy without a download, a 200 replaces the copy.
//! - stale-if-error: when the upstream fails (transport error, timeout, 5xx, broken
//!   body) or its source is down, a copy last confirmed within
//!   `mutable.stale_if_error` is served with a `Warning`, whatever its headers said.
//! - stale-on-slow: when the upstream has not answered a revalidation within
//!   `mutable.revalidate_timeout`, that same copy is served the same way while the
//!   revalidation finishes in the background (its result is stored and feeds the
//!   breaker as usual). A dead upstream that accepts connections and never answers
//!   would otherwise hold every client for the upstream's full response timeout
//!   until enough of them had failed to open the breaker.
//! - stale-while-revalidate: a copy stale by less than the larger of the upstream's
//!   directive and `mutable.stale_while_revalidate` is served at once while one
//!   background revalidation runs.
//! - A client's own `If-None-Match` matching the stored ETag gets a 304.
//!
//! Bodies are downloaded into the content store (cacache, by sha256) and committed
//! before anyone is served from them, so a partial body is never served; the
//! record (policy, headers, digest) is a small JSON file per URL replaced atomically.
//! The router never sends requests with credentials here.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cacache::{Algorithm, Integrity};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_cache_semantics::{AfterResponse, BeforeRequest, CacheOptions, CachePolicy};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::body::{self, GatewayBody};
use crate::config::MutableCacheSettings;
use crate::passthrough::strip_hop_by_hop;
use crate::store::disk::{Disk, Entry};
use crate::store::usage::InUse;
use crate::upstream::{body_is_delimited, content_length, next_chunk, Upstream};

/// Response headers never kept with a stored copy: per-message or per-user.
const NOT_STORED: [HeaderName; 4] = [
    header::CONTENT_LENGTH,
    header::SET_COOKIE,
    header::AGE,
    header::WARNING,
];

/// What is kept about one stored response, next to its body in the content store.
#[derive(Clone, Serialize, Deserialize)]
struct Record {
    url: String,
    policy: CachePolicy,
    /// End-to-end response headers as last confirmed by the upstream.
    headers: Vec<(String, String)>,
    /// `sha256-...` of the body in the content store.
    integrity: String,
    size: u64,
    /// Unix milliseconds of the last 200 or 304 from the upstream.
    validated_at: u64,
    /// Unix milliseconds until which the copy is fresh (RFC 9111 lifetime).
    fresh_until: u64,
    /// The upstream's own `stale-while-revalidate`, in seconds.
    upstream_swr: u64,
}

/// How one exchange with the upstream ended.
enum Outcome {
    /// The stored copy is current (304, or revalidated meanwhile by someone else).
    Current(Record),
    /// A new copy was downloaded and stored.
    Replaced(Record),
    /// An answer to hand on as it is (not storable, 4xx): nothing stored.
    Passed(Response<GatewayBody>),
    /// The upstream failed or is down: stale-if-error territory.
    Failed(String),
}

/// What to answer for a URL, before it is turned into a response (or, for
/// [`MutableCache::current`], into the stored body it names).
enum Decision {
    /// This stored copy, served this way.
    Serve(Record, Served),
    /// The upstream failed (the error): stale-if-error with this copy, if recent enough.
    Stale(Record, String),
    /// The upstream's answer, handed on as it is.
    Pass(Response<GatewayBody>),
    /// Not stored, and the upstream failed.
    Fail(String),
}

/// A mutable resource's content as [`MutableCache::current`] found it.
pub enum Current {
    /// A stored body (fresh, just revalidated or downloaded, or stale-if-error).
    Body(StoredBody),
    /// The upstream has none (404 or 410): nothing stored either.
    Absent,
    /// The upstream failed and no stored copy may stand in for it.
    Failed(String),
}

/// A body in the mutable cache's content store.
#[derive(Debug, Clone)]
pub struct StoredBody {
    /// `sha256-...` (SRI) of the body: names it, and changes with it.
    pub integrity: String,
    pub size: u64,
    /// The content store it is in.
    content: PathBuf,
    /// Served in place of an upstream that failed (stale-if-error).
    pub stale: bool,
}

impl StoredBody {
    #[cfg(test)]
    pub(crate) fn for_tests(integrity: String, size: u64, content: &Path) -> StoredBody {
        StoredBody {
            integrity,
            size,
            content: content.to_path_buf(),
            stale: false,
        }
    }

    /// Put the body at `to` (a hard link, or a copy across file systems), checked
    /// against its digest, for blocking readers: it stays readable there whatever
    /// the cache does to its own copy meanwhile. Blocking.
    pub fn link_to(&self, to: &Path) -> Result<(), String> {
        let sri: Integrity = self
            .integrity
            .parse()
            .map_err(|e| format!("bad stored digest: {e}"))?;
        cacache::hard_link_hash_sync(&self.content, &sri, to)
            .or_else(|_| cacache::copy_hash_sync(&self.content, &sri, to).map(|_| ()))
            .map_err(|e| format!("stored copy unreadable: {e}"))
    }
}

/// How a stored copy is being served, for `x-cache` and `Warning`.
#[derive(Clone, Copy)]
enum Served {
    Hit,
    Revalidated,
    Miss,
    /// Stale, a background revalidation runs (RFC 5861 stale-while-revalidate).
    StaleRevalidating,
    /// Stale because the upstream failed (RFC 5861 stale-if-error).
    StaleError,
}

pub struct MutableCache {
    records: PathBuf,
    content: Disk,
    upstream: Upstream,
    settings: MutableCacheSettings,
    /// One upstream exchange per URL at a time.
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    in_use: InUse,
}

/// One URL's exchanges with the upstream.
#[derive(Default)]
struct Slot {
    /// Held for the length of an exchange. It guards how the last exchange failed,
    /// if it did: whoever waited behind a failing exchange shares its failure
    /// instead of asking a failing upstream once more.
    exchange: tokio::sync::Mutex<Option<Failure>>,
    /// The running exchange has the upstream's response head (its body may still be
    /// coming): the upstream is answering, so a client is not served stale for it.
    answered: AtomicBool,
}

struct Failure {
    at: Instant,
    error: String,
}

/// Clears [`Slot::answered`] however an exchange ends (cancelled included).
struct ExchangeEnds<'a>(&'a AtomicBool);

impl Drop for ExchangeEnds<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl MutableCache {
    /// Open (creating) the store of mutable responses under `dir`.
    pub fn open(
        dir: &Path,
        upstream: Upstream,
        settings: MutableCacheSettings,
    ) -> anyhow::Result<MutableCache> {
        let records = dir.join("records");
        let content = dir.join("content");
        for d in [&records, &content] {
            std::fs::create_dir_all(d)
                .map_err(|e| anyhow::anyhow!("could not create {}: {e}", d.display()))?;
        }
        Ok(MutableCache {
            records,
            content: Disk::new(content),
            upstream,
            settings,
            slots: Mutex::new(HashMap::new()),
            in_use: InUse::default(),
        })
    }

    /// Answer a GET or HEAD for the mutable resource at upstream `url`. With no
    /// upstream (offline) the stored copy is served as it is, whatever its age, and
    /// `None` says there is none.
    pub async fn respond(
        self: &Arc<Self>,
        url: &str,
        client: &HeaderMap,
        head: bool,
    ) -> Option<Response<GatewayBody>> {
        let resp = match self.decide(url).await? {
            Decision::Serve(rec, served) => self.serve(&rec, client, head, served).await,
            Decision::Stale(rec, error) => self.serve_stale(&rec, client, head, &error).await,
            Decision::Pass(resp) => resp,
            Decision::Fail(error) => body::text(
                StatusCode::BAD_GATEWAY,
                format!("{url} is not stored and the upstream failed: {error}"),
            ),
        };
        Some(resp)
    }

    /// What `url` holds now, by the same rules as [`MutableCache::respond`] (fresh,
    /// revalidated, replaced, or stale-if-error), for a caller that combines it
    /// with other resources instead of serving it (the merged `symbols.zip`).
    pub async fn current(self: &Arc<Self>, url: &str) -> Current {
        let Some(decision) = self.decide(url).await else {
            return Current::Failed("offline, and no stored copy".into());
        };
        match decision {
            Decision::Serve(rec, _) => Current::Body(self.stored_body(&rec, false)),
            Decision::Stale(rec, error) if self.may_serve_stale(&rec) => {
                tracing::warn!(%url, %error, "upstream unavailable; using the stored copy (stale-if-error)");
                Current::Body(self.stored_body(&rec, true))
            }
            Decision::Stale(_, error) | Decision::Fail(error) => Current::Failed(error),
            Decision::Pass(resp)
                if matches!(resp.status(), StatusCode::NOT_FOUND | StatusCode::GONE) =>
            {
                Current::Absent
            }
            Decision::Pass(resp) => Current::Failed(format!(
                "the upstream answered {} (not stored)",
                resp.status()
            )),
        }
    }

    /// No upstream is asked (`serve --offline`).
    pub fn is_offline(&self) -> bool {
        self.upstream.is_offline()
    }

    fn stored_body(&self, rec: &Record, stale: bool) -> StoredBody {
        StoredBody {
            integrity: rec.integrity.clone(),
            size: rec.size,
            content: self.content.dir().to_path_buf(),
            stale,
        }
    }

    /// RFC 9111 / 5861: what to answer for `url`, asking the upstream if need be.
    /// `None`: offline with no stored copy.
    async fn decide(self: &Arc<Self>, url: &str) -> Option<Decision> {
        let stored = self.load(url).await;
        if self.upstream.is_offline() {
            return Some(Decision::Serve(stored?, Served::Hit));
        }
        Some(self.decide_online(url, stored).await)
    }

    async fn decide_online(self: &Arc<Self>, url: &str, stored: Option<Record>) -> Decision {
        let Some(stored) = stored else {
            return match self.exchange(url, None).await {
                Outcome::Current(rec) | Outcome::Replaced(rec) => {
                    Decision::Serve(rec, Served::Miss)
                }
                Outcome::Passed(resp) => Decision::Pass(resp),
                Outcome::Failed(error) => Decision::Fail(error),
            };
        };
        let now = SystemTime::now();
        let canonical = canonical_request(url);
        if let BeforeRequest::Fresh(_) = stored.policy.before_request(&canonical, now) {
            return Decision::Serve(stored, Served::Hit);
        }
        if self.upstream.health().is_down_or_slow_url(url) {
            // Never wait on a source known to be down or too slow to wait for; a
            // probe or revalidation goes on in the background.
            self.revalidate_in_background(url);
            return Decision::Stale(stored, "its source is down or slow".into());
        }
        let stale_for = millis(now).saturating_sub(stored.fresh_until);
        let swr = self
            .settings
            .stale_while_revalidate
            .max(Duration::from_secs(stored.upstream_swr));
        if u128::from(stale_for) < swr.as_millis() {
            self.revalidate_in_background(url);
            return Decision::Serve(stored, Served::StaleRevalidating);
        }
        let outcome = if self.may_serve_stale(&stored) {
            match self.revalidate_or_give_up(url, &stored).await {
                Some(outcome) => outcome,
                None => {
                    self.upstream.health().mark_slow_url(url);
                    let waited = self.settings.revalidate_timeout;
                    let error = format!(
                        "the upstream did not answer within {waited:?}; revalidation continues in the background"
                    );
                    return Decision::Stale(stored, error);
                }
            }
        } else {
            // Too old to be served in place of an answer: wait for the upstream.
            self.exchange(url, Some(stored.clone())).await
        };
        match outcome {
            Outcome::Current(rec) => Decision::Serve(rec, Served::Revalidated),
            Outcome::Replaced(rec) => Decision::Serve(rec, Served::Miss),
            Outcome::Passed(resp) => Decision::Pass(resp),
            Outcome::Failed(error) => Decision::Stale(stored, error),
        }
    }

    /// stale-on-slow: revalidate `stored` in a task of its own and wait for it at
    /// most `revalidate_timeout`, or longer if the upstream has answered by then and
    /// its body is coming. `None`: the upstream is silent; the task goes on in the
    /// background and stores (and reports to the breaker) whatever comes of it.
    async fn revalidate_or_give_up(
        self: &Arc<Self>,
        url: &str,
        stored: &Record,
    ) -> Option<Outcome> {
        let slot = self.slot(url);
        let mut task = {
            let this = self.clone();
            let url = url.to_string();
            let prior = stored.clone();
            tokio::spawn(async move { this.exchange(&url, Some(prior)).await })
        };
        let joined = match tokio::time::timeout(self.settings.revalidate_timeout, &mut task).await {
            Ok(joined) => joined,
            // `exchange` bounds the rest of the wait.
            Err(_) if slot.answered.load(Ordering::Acquire) => task.await,
            // Dropping the handle detaches the task; it is not cancelled.
            Err(_) => return None,
        };
        Some(joined.unwrap_or_else(|e| Outcome::Failed(format!("revalidation task failed: {e}"))))
    }

    /// Whether `stored` was confirmed recently enough to stand in for the upstream's
    /// answer (`mutable.stale_if_error`).
    fn may_serve_stale(&self, stored: &Record) -> bool {
        confirmed_ago(stored) <= self.settings.stale_if_error
    }

    /// stale-if-error: the stored copy if it is recent enough, else a 502.
    async fn serve_stale(
        &self,
        stored: &Record,
        client: &HeaderMap,
        head: bool,
        error: &str,
    ) -> Response<GatewayBody> {
        let confirmed_ago = confirmed_ago(stored);
        if !self.may_serve_stale(stored) {
            tracing::warn!(
                url = %stored.url, %error, confirmed_seconds_ago = confirmed_ago.as_secs(),
                "upstream failed and the stored copy is older than stale_if_error; not served"
            );
            return body::text(
                StatusCode::BAD_GATEWAY,
                format!(
                    "{} could not be revalidated ({error}) and the stored copy was last confirmed {}s ago",
                    stored.url,
                    confirmed_ago.as_secs()
                ),
            );
        }
        tracing::warn!(
            url = %stored.url, %error, confirmed_seconds_ago = confirmed_ago.as_secs(),
            "upstream unavailable; serving the stored copy (stale-if-error)"
        );
        self.serve(stored, client, head, Served::StaleError).await
    }

    /// One revalidation in a task of its own, unless one is already running.
    fn revalidate_in_background(self: &Arc<Self>, url: &str) {
        let slot = self.slot(url);
        if slot.exchange.try_lock().is_err() {
            return;
        }
        let this = self.clone();
        let url = url.to_string();
        tokio::spawn(async move {
            // Taken again here: the guard cannot move into the task with the slot.
            let Ok(mut last_failure) = slot.exchange.try_lock() else {
                return;
            };
            let Some(stored) = this.load(&url).await else {
                return;
            };
            match this
                .exchange_held(&url, Some(stored), &slot, &mut last_failure)
                .await
            {
                Outcome::Failed(error) => {
                    tracing::debug!(%url, %error, "background revalidation failed")
                }
                _ => tracing::debug!(%url, "background revalidation done"),
            }
        });
    }

    fn slot(&self, url: &str) -> Arc<Slot> {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(url.to_string())
            .or_default()
            .clone()
    }

    /// Talk to the upstream about `url`, one exchange per URL at a time: whoever
    /// waited for another's exchange reuses its result, a failure included.
    /// Bounded as a whole (waiting included): a trickling upstream turns into a
    /// failure, so the stale copy is served before `moon`'s own 30 s run out.
    async fn exchange(&self, url: &str, prior: Option<Record>) -> Outcome {
        // Twice the head timeout: the upstream client's own timeout must fire first
        // (and count against the source's breaker); this one only bounds the rest.
        let limit = self.upstream.timeouts().response * 2;
        let asked = Instant::now();
        let exchange = async {
            let slot = self.slot(url);
            let mut last_failure = slot.exchange.lock().await;
            let now = self.load(url).await;
            match (&prior, now) {
                (None, Some(rec)) => return Outcome::Current(rec),
                (Some(before), Some(rec)) if rec.validated_at > before.validated_at => {
                    return Outcome::Current(rec)
                }
                _ => {}
            }
            if let Some(failure) = last_failure.as_ref().filter(|f| f.at >= asked) {
                return Outcome::Failed(failure.error.clone());
            }
            self.exchange_held(url, prior.clone(), &slot, &mut last_failure)
                .await
        };
        match tokio::time::timeout(limit, exchange).await {
            Ok(outcome) => outcome,
            Err(_) => Outcome::Failed(format!(
                "no complete answer from the upstream within {limit:?}"
            )),
        }
    }

    /// One exchange, with `slot`'s lock held by the caller (`last_failure` is what
    /// it guards): remembers a failure for those who waited, and says while it runs
    /// whether the upstream has answered.
    async fn exchange_held(
        &self,
        url: &str,
        prior: Option<Record>,
        slot: &Slot,
        last_failure: &mut Option<Failure>,
    ) -> Outcome {
        let _ends = ExchangeEnds(&slot.answered);
        let outcome = self.exchange_locked(url, prior, &slot.answered).await;
        *last_failure = match &outcome {
            Outcome::Failed(error) => Some(Failure {
                at: Instant::now(),
                error: error.clone(),
            }),
            _ => None,
        };
        outcome
    }

    async fn exchange_locked(
        &self,
        url: &str,
        prior: Option<Record>,
        answered: &AtomicBool,
    ) -> Outcome {
        let canonical = canonical_request(url);
        let (parts, policy) = match &prior {
            Some(rec) => match rec.policy.before_request(&canonical, SystemTime::now()) {
                BeforeRequest::Stale { request, .. } => (request, Some(&rec.policy)),
                // Became fresh meanwhile (clock) or never needed: still ask, plainly.
                BeforeRequest::Fresh(_) => (canonical.into_parts().0, None),
            },
            None => (canonical.into_parts().0, None),
        };
        let mut req = Request::from_parts(parts.clone(), body::empty());
        // The cache's own request: never a client's credentials or cookies.
        req.headers_mut().remove(header::AUTHORIZATION);
        req.headers_mut().remove(header::COOKIE);
        let started = std::time::Instant::now();
        let mut resp = match self.upstream.send_guarded(req).await {
            Ok(resp) => resp,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        clamp_age(resp.headers_mut());
        let status = resp.status();
        if !status.is_server_error() {
            answered.store(true, Ordering::Release);
        }
        let sent = Request::from_parts(parts, ());
        let received_at = SystemTime::now();
        if status.is_server_error() {
            return Outcome::Failed(format!("upstream answered {status}"));
        }
        if status == StatusCode::NOT_MODIFIED {
            let (Some(rec), Some(policy)) = (&prior, policy) else {
                return Outcome::Failed("upstream answered 304 to an unconditional request".into());
            };
            return match policy.after_response(&sent, &resp, received_at) {
                AfterResponse::NotModified(policy, parts) => {
                    let rec = Record {
                        headers: storable_headers(&parts.headers),
                        upstream_swr: directive_secs(&parts.headers, "stale-while-revalidate"),
                        fresh_until: millis(received_at)
                            .saturating_add(duration_millis(policy.time_to_live(received_at))),
                        validated_at: millis(received_at),
                        policy,
                        ..rec.clone()
                    };
                    if let Err(e) = self.save(&rec).await {
                        tracing::warn!(%url, error = %e, "could not update the stored policy");
                    }
                    tracing::info!(%url, "revalidated: not modified");
                    Outcome::Current(rec)
                }
                AfterResponse::Modified(..) => {
                    Outcome::Failed("upstream answered 304 for a different validator".into())
                }
            };
        }
        let policy = CachePolicy::new_options(
            &canonical_request(url),
            &resp,
            received_at,
            CacheOptions {
                shared: true,
                ..CacheOptions::default()
            },
        );
        // Vary would make the stored copy depend on headers the canonical request
        // does not carry: never risk serving another variant.
        let varies = resp.headers().contains_key(header::VARY);
        // Too large for the store, or ended only by the connection closing (a cut
        // would look complete): handed on, not kept.
        let too_large = content_length(resp.headers())
            .is_some_and(|len| len > self.settings.mutable_max.as_u64());
        let delimited = body_is_delimited(&resp);
        let storable =
            status == StatusCode::OK && policy.is_storable() && !varies && !too_large && delimited;
        if !storable {
            if matches!(status, StatusCode::NOT_FOUND | StatusCode::GONE) || status.is_success() {
                self.forget(url).await;
            }
            tracing::info!(%url, %status, "upstream answer not stored; passed on");
            let (mut parts, incoming) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            parts
                .headers
                .insert("x-cache", HeaderValue::from_static("miss"));
            return Outcome::Passed(Response::from_parts(
                parts,
                self.upstream.idle_bounded_metered(url, started, incoming),
            ));
        }
        let headers = storable_headers(resp.headers());
        let upstream_swr = directive_secs(resp.headers(), "stale-while-revalidate");
        let (integrity, size) = match self.download(url, resp).await {
            Ok(stored) => stored,
            Err(e) => return Outcome::Failed(e),
        };
        self.upstream
            .health()
            .record_transfer(url, size, started.elapsed().as_secs_f64());
        let rec = Record {
            url: url.to_string(),
            headers,
            integrity: integrity.to_string(),
            size,
            validated_at: millis(received_at),
            fresh_until: millis(received_at)
                .saturating_add(duration_millis(policy.time_to_live(received_at))),
            upstream_swr,
            policy,
        };
        if let Err(e) = self.save(&rec).await {
            tracing::warn!(%url, error = %e, "could not store the response record");
        }
        if let Some(old) = prior.filter(|old| old.integrity != rec.integrity) {
            self.remove_content(&old.integrity).await;
        }
        tracing::info!(%url, bytes = size, "stored a new copy");
        Outcome::Replaced(rec)
    }

    /// Stream the body into the content store, bounded in size and in pauses; only
    /// a complete body (as long as announced) is committed.
    async fn download(
        &self,
        url: &str,
        resp: Response<Incoming>,
    ) -> Result<(Integrity, u64), String> {
        let limit = self.settings.mutable_max.as_u64();
        let announced = content_length(resp.headers());
        if announced.is_some_and(|len| len > limit) {
            return Err(format!("{url} is larger than the {limit}-byte limit"));
        }
        let mut opts = cacache::WriteOpts::new().algorithm(Algorithm::Sha256);
        if let Some(len) = announced.and_then(|l| usize::try_from(l).ok()) {
            opts = opts.size(len);
        }
        let mut writer = opts
            .open_hash(self.content.dir())
            .await
            .map_err(|e| format!("cannot write to the store: {e}"))?;
        let idle = self.upstream.timeouts().idle_read;
        let mut body = resp.into_body();
        let mut written: u64 = 0;
        loop {
            let chunk = match next_chunk(&mut body, idle).await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(e) => return Err(format!("upstream {e}")),
            };
            written += chunk.len() as u64;
            if written > announced.unwrap_or(limit) {
                return Err(format!(
                    "{url}: upstream sent more than announced or allowed"
                ));
            }
            writer
                .write_all(&chunk)
                .await
                .map_err(|e| format!("store write failed: {e}"))?;
        }
        if announced.is_some_and(|len| len != written) {
            return Err(format!("{url}: upstream body ended after {written} bytes"));
        }
        let integrity = writer
            .commit()
            .await
            .map_err(|e| format!("store commit failed: {e}"))?;
        Ok((integrity, written))
    }

    /// Build the answer from a stored copy; a matching `If-None-Match` gets a 304.
    async fn serve(
        &self,
        rec: &Record,
        client: &HeaderMap,
        head: bool,
        served: Served,
    ) -> Response<GatewayBody> {
        let mut headers = HeaderMap::new();
        for (name, value) in &rec.headers {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                headers.append(n, v);
            }
        }
        let age = rec.policy.age(SystemTime::now()).as_secs();
        headers.insert(header::AGE, HeaderValue::from(age));
        let (cache, warning) = match served {
            Served::Hit => ("hit", None),
            Served::Revalidated => ("revalidated", None),
            Served::Miss => ("miss", None),
            Served::StaleRevalidating => ("stale", Some("110 - \"Response is Stale\"")),
            Served::StaleError => ("stale", Some("111 - \"Revalidation Failed\"")),
        };
        headers.insert("x-cache", HeaderValue::from_static(cache));
        if let Some(w) = warning {
            headers.insert(header::WARNING, HeaderValue::from_static(w));
        }
        let etag = headers.get(header::ETAG).and_then(|v| v.to_str().ok());
        if etag.is_some_and(|etag| if_none_match(client, etag)) {
            let mut resp = Response::new(body::empty());
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            headers.remove(header::CONTENT_TYPE);
            headers.remove(header::CONTENT_ENCODING);
            *resp.headers_mut() = headers;
            return resp;
        }
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(rec.size));
        let body = if head {
            body::empty()
        } else {
            let entry = match rec.integrity.parse::<Integrity>() {
                Ok(integrity) => Entry {
                    integrity,
                    size: rec.size,
                },
                Err(e) => return self.broken_record(rec, e.to_string()).await,
            };
            // Nothing collects garbage in this store; the hold only satisfies the stream's contract.
            let hold = self.in_use.hold(&entry.sha256());
            match self.content.stream(&rec.url, &entry, hold).await {
                Ok(body) => body,
                Err(e) => return self.broken_record(rec, e.to_string()).await,
            }
        };
        let mut resp = Response::new(body);
        *resp.headers_mut() = headers;
        resp
    }

    async fn broken_record(&self, rec: &Record, error: String) -> Response<GatewayBody> {
        tracing::error!(url = %rec.url, %error, "stored copy unreadable; forgetting it");
        self.forget(&rec.url).await;
        body::text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the stored copy of {} was unreadable; retry", rec.url),
        )
    }

    fn record_path(&self, url: &str) -> PathBuf {
        let name = hex::encode(Sha256::digest(url.as_bytes()));
        self.records.join(format!("{name}.json"))
    }

    /// The record for `url`, if it and its content are both there.
    async fn load(&self, url: &str) -> Option<Record> {
        let path = self.record_path(url);
        let bytes = tokio::fs::read(&path).await.ok()?;
        let rec: Record = match serde_json::from_slice(&bytes) {
            Ok(rec) => rec,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable record; treating as a miss");
                return None;
            }
        };
        if rec.url != url {
            return None;
        }
        let integrity = rec.integrity.parse::<Integrity>().ok()?;
        if !cacache::exists(self.content.dir(), &integrity).await {
            tracing::warn!(%url, "stored content is gone; treating as a miss");
            return None;
        }
        Some(rec)
    }

    /// Replace the record atomically: a crash leaves the old one or the new one.
    async fn save(&self, rec: &Record) -> Result<(), String> {
        let json = serde_json::to_vec(rec).map_err(|e| e.to_string())?;
        let path = self.record_path(&rec.url);
        let dir = self.records.clone();
        tokio::task::spawn_blocking(move || {
            let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(|e| e.to_string())?;
            tmp.write_all(&json).map_err(|e| e.to_string())?;
            tmp.as_file().sync_all().map_err(|e| e.to_string())?;
            tmp.persist(&path).map_err(|e| e.to_string())?;
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    async fn forget(&self, url: &str) {
        if let Some(rec) = self.load(url).await {
            let _ = tokio::fs::remove_file(self.record_path(url)).await;
            self.remove_content(&rec.integrity).await;
        }
    }

    async fn remove_content(&self, integrity: &str) {
        if let Ok(sri) = integrity.parse::<Integrity>() {
            if let Err(e) = cacache::remove_hash(self.content.dir(), &sri).await {
                tracing::debug!(error = %e, "could not remove old content");
            }
        }
    }
}

/// The request the cache itself makes for `url`: the same for every client.
fn canonical_request(url: &str) -> Request<()> {
    let mut req = Request::new(());
    *req.uri_mut() = url.parse().unwrap_or_default();
    req.headers_mut().insert(
        header::USER_AGENT,
        HeaderValue::from_static(crate::USER_AGENT),
    );
    req.headers_mut()
        .insert(header::ACCEPT, HeaderValue::from_static("*/*"));
    req
}

fn storable_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    let mut headers = headers.clone();
    strip_hop_by_hop(&mut headers);
    for name in &NOT_STORED {
        headers.remove(name);
    }
    headers.remove("x-cache");
    headers
        .iter()
        .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect()
}

/// `name=N` from `Cache-Control`, in seconds (0 when absent or malformed).
fn directive_secs(headers: &HeaderMap, name: &str) -> u64 {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|d| d.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v.trim().trim_matches('"').parse().ok())
        .unwrap_or(0)
}

/// RFC 9110 §13.1.2: weak comparison; `*` matches any stored representation.
pub(crate) fn if_none_match(client: &HeaderMap, etag: &str) -> bool {
    let ours = etag.trim().trim_start_matches("W/");
    client
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.trim_start_matches("W/") == ours)
}

/// How long ago the upstream last confirmed `rec` (a 200 or a 304).
fn confirmed_ago(rec: &Record) -> Duration {
    Duration::from_millis(millis(SystemTime::now()).saturating_sub(rec.validated_at))
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

fn duration_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// An `Age` the upstream may send is clamped to ten years (dropped if unreadable):
/// http-cache-semantics adds it to other durations, which must not overflow.
fn clamp_age(headers: &mut HeaderMap) {
    const MAX_AGE: u64 = 10 * 365 * 24 * 3600;
    let Some(value) = headers.get(header::AGE) else {
        return;
    };
    match value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        Some(age) if age <= MAX_AGE => {}
        Some(_) => {
            headers.insert(header::AGE, HeaderValue::from(MAX_AGE));
        }
        None => {
            headers.remove(header::AGE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_ages_cannot_overflow_the_policy() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AGE,
            HeaderValue::from_static("18446744073709551615"),
        );
        clamp_age(&mut h);
        assert_eq!(h.get(header::AGE).unwrap(), "315360000");
        h.insert(header::AGE, HeaderValue::from_static("soon"));
        clamp_age(&mut h);
        assert!(h.get(header::AGE).is_none());
        let req = http::Request::get("https://r/symbols.zip")
            .body(())
            .unwrap();
        let mut resp = http::Response::builder()
            .header(header::AGE, "18446744073709551615")
            .header(header::CACHE_CONTROL, "max-age=18446744073709551615")
            .body(())
            .unwrap();
        clamp_age(resp.headers_mut());
        let policy =
            CachePolicy::new_options(&req, &resp, SystemTime::now(), CacheOptions::default());
        let _ = policy.time_to_live(SystemTime::now());
        let _ = policy.age(SystemTime::now());
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn if_none_match_compares_weakly_and_lists() {
        let h = headers(&[("if-none-match", "\"a\", W/\"b\"")]);
        assert!(if_none_match(&h, "\"b\""));
        assert!(if_none_match(&h, "W/\"a\""));
        assert!(!if_none_match(&h, "\"c\""));
        assert!(if_none_match(&headers(&[("if-none-match", "*")]), "\"x\""));
        assert!(!if_none_match(&HeaderMap::new(), "\"x\""));
    }

    #[test]
    fn directives_are_read_from_cache_control() {
        let h = headers(&[(
            "cache-control",
            "max-age=60, stale-while-revalidate=30, stale-if-error=\"9\"",
        )]);
        assert_eq!(directive_secs(&h, "stale-while-revalidate"), 30);
        assert_eq!(directive_secs(&h, "stale-if-error"), 9);
        assert_eq!(directive_secs(&h, "s-maxage"), 0);
    }

    #[test]
    fn per_message_and_per_user_headers_are_not_stored() {
        let h = headers(&[
            ("etag", "\"1\""),
            ("set-cookie", "s=1"),
            ("content-length", "3"),
            ("connection", "close"),
            ("cache-control", "max-age=5"),
        ]);
        let kept: Vec<String> = storable_headers(&h).into_iter().map(|(n, _)| n).collect();
        assert_eq!(kept, ["etag", "cache-control"]);
    }
}
