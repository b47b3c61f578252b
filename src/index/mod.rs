//! The registry index: a local git mirror per source ([`mirror`]), merged into
//! one index when there are several sources ([`merge`]), served over smart HTTP
//! ([`serve`]), and read for the checksum and dependencies of every archive
//! ([`checksums`]).
//!
//! Clients' index requests are answered from the mirrors, refreshed first when
//! older than `index.max_age` (waiting at most `index.refresh_wait`, then the
//! refresh finishes in the background); when a refresh fails the stale mirror is
//! served and the log says how stale. With one source, clients get its mirror (the
//! upstream's own commits); with several, the merged repository. Before any mirror
//! of a lone source exists, requests stream straight through to the upstream. An
//! offline index (`serve --offline`) is the same index with refreshes switched
//! off: mirrors are served as they are. A pinned view (`/at/<time>/`) serves each
//! source's history as it stood at that time.
//! A source the gateway hosts (`local = true`) has a hosted mirror, which
//! `publish` writes and which is never fetched (offline included, it re-reads its
//! tip on every advertisement).

pub mod answers;
pub mod checksums;
pub mod merge;
pub mod mirror;
pub mod pack_cache;
pub mod selection;
pub mod serve;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};

use crate::archive::ArchiveKey;
use crate::body::{self, GatewayBody};
use crate::client::Client;
use crate::config::{join, Claims, Source};
use crate::passthrough;
use crate::upstream::Upstream;
use mirror::{Freshness, Mirror, MirrorSettings};

/// What the index says about an archive a client asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum Expectation {
    /// Published in source number `source` with this sha256.
    Known { source: usize, checksum: String },
    /// In no source's index, even after a refresh.
    Unknown,
}

/// The mirrors of every source, in source order.
pub struct Index {
    mirrors: Vec<Arc<Mirror>>,
    /// What each source claims, in source order.
    claims: Vec<Claims>,
    /// The merged repository (served with more than one source) and pinned views.
    merged: merge::Merged,
    /// Refreshes for archives the index does not know.
    unknown_pacer: Pacer,
    /// Refreshes asked for by clients, and rechecks after a bad upstream copy.
    asked_pacer: Pacer,
    /// What serves clients' clones: git processes (bounded, and each client's
    /// share), the bounds on a request (its body, how long it waits for a
    /// refresh), and the shared pack cache.
    backend: serve::Backend,
    /// Never refresh (`serve --offline`): the mirrors are served as they are.
    offline: bool,
}

/// Why the index was not refreshed.
#[derive(Debug, thiserror::Error)]
#[error("the gateway is offline: the index is served as it is and never refreshed")]
pub struct Offline;

/// Refreshes triggered by requests for archives the index does not know start at
/// most this often.
const UNKNOWN_REFRESH_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Refreshes asked for by clients (`POST /-/index/refresh`) share one that started
/// this recently.
const ASKED_REFRESH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Starts of one kind of refresh, at most one per `every`: a caller waits for the
/// next start, and callers waiting together share it, so requests cannot make the
/// gateway hammer its sources, and each caller still sees a refresh that started
/// after it asked.
struct Pacer {
    every: std::time::Duration,
    next: std::sync::Mutex<tokio::time::Instant>,
}

impl Pacer {
    fn new(every: std::time::Duration) -> Pacer {
        Pacer {
            every,
            next: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// Wait for the next start; returns it.
    async fn wait(&self) -> std::time::Instant {
        let slot = {
            let mut scheduled = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let now = tokio::time::Instant::now();
            if *scheduled <= now {
                *scheduled = now.max(*scheduled + self.every);
            }
            *scheduled
        };
        tokio::time::sleep_until(slot).await;
        slot.into_std()
    }
}

/// Clones and fetches served at once; the rest wait (bounded) for a slot.
const GIT_SLOTS: usize = 32;

impl Index {
    pub fn new(
        data_dir: &Path,
        sources: &[Source],
        settings: MirrorSettings,
        limits: serve::Limits,
    ) -> Index {
        let root = data_dir.join("index");
        let pack_cache = settings
            .pack_cache
            .then(|| pack_cache::Hook::new(&root.join(".pack-cache")))
            .flatten();
        let mirrors = sources
            .iter()
            .map(|s| {
                if s.local {
                    let dir = crate::hosted::Hosted::new(data_dir, &s.name).index_dir();
                    return Arc::new(Mirror::hosted(&s.name, dir, settings.clone()));
                }
                let dir = root.join(repo_name(&s.name));
                Arc::new(
                    Mirror::new(&s.name, s.index.as_str(), dir, settings.clone())
                        .with_credential(s.credential.clone()),
                )
            })
            .collect();
        let merged = merge::Merged::new(&root);
        Index {
            mirrors,
            claims: sources.iter().map(|s| s.claims.clone()).collect(),
            merged,
            unknown_pacer: Pacer::new(UNKNOWN_REFRESH_EVERY),
            asked_pacer: Pacer::new(ASKED_REFRESH_EVERY),
            backend: serve::Backend {
                slots: serve::Slots::new(GIT_SLOTS, limits.slots_per_client, serve::SLOT_WAIT),
                limits,
                answers: settings.pack_cache.then(answers::Answers::default),
                pack_cache,
            },
            offline: false,
        }
    }

    /// The same index with refreshes switched off (`serve --offline`).
    pub fn offline(mut self) -> Index {
        self.offline = true;
        self
    }

    pub fn mirrors(&self) -> &[Arc<Mirror>] {
        &self.mirrors
    }

    /// The mirror of the source named `name`, else the primary one.
    pub fn mirror_named(&self, name: &str) -> &Arc<Mirror> {
        self.mirrors
            .iter()
            .find(|m| m.source == name)
            .unwrap_or(&self.mirrors[0])
    }

    /// Read existing mirrors (and merge what they hold), then (online) refresh them
    /// all in the background.
    pub async fn start(self: &Arc<Self>) {
        for m in &self.mirrors {
            match m.load().await {
                Err(error) => {
                    tracing::warn!(source = %m.source, %error, "existing index mirror unreadable")
                }
                Ok(()) if !self.offline => {}
                Ok(()) if m.exists() => tracing::info!(
                    source = %m.source, commit = %m.snapshot().commit.as_deref().unwrap_or("-"),
                    "offline: serving the index mirror as it is"
                ),
                Ok(()) => {
                    tracing::warn!(source = %m.source, "offline: no index mirror; import a bundle first")
                }
            }
        }
        if let Err(error) = self.merged.load().await {
            tracing::warn!(%error, "existing merged index unreadable");
        }
        self.merge().await;
        if self.offline {
            return;
        }
        let index = self.clone();
        tokio::spawn(async move {
            let _ = index.refresh_all(false).await;
        });
    }

    /// Whether clients are served the merged repository (several sources).
    pub fn is_merged(&self) -> bool {
        self.mirrors.len() > 1
    }

    /// Bring the merged index up to the mirrors' tips (several sources only); a
    /// failure is logged and the last merge goes on being served.
    pub async fn merge(&self) -> Option<Arc<merge::Tip>> {
        if !self.is_merged() {
            return None;
        }
        let parts = self.parts();
        if !parts.is_empty() {
            if let Err(error) = self.merged.update(&parts).await {
                tracing::error!(%error, "could not merge the sources' indexes; serving the last merge");
            }
        }
        self.merged.tip()
    }

    /// The current merged commit, if the index is merged.
    pub fn merged_tip(&self) -> Option<Arc<merge::Tip>> {
        self.is_merged().then(|| self.merged.tip()).flatten()
    }

    /// Each mirrored source's part of a merge: its tip (sources with no mirror
    /// have none).
    fn parts(&self) -> Vec<merge::Part> {
        self.mirrors
            .iter()
            .zip(&self.claims)
            .filter_map(|(m, claims)| {
                Some(merge::Part {
                    source: m.source.clone(),
                    dir: m.dir().to_path_buf(),
                    claims: claims.clone(),
                    commit: m.snapshot().commit.clone()?,
                })
            })
            .collect()
    }

    /// A refresh a client asked for: every mirror refreshed by a fetch that started
    /// after the ask, at most one per `ASKED_REFRESH_EVERY` (asks in between share
    /// it), with a recent failure not holding it back.
    pub async fn refresh_asked(&self) -> Result<Vec<(String, Freshness)>, Offline> {
        if self.offline {
            return Err(Offline);
        }
        let slot = self.asked_pacer.wait().await;
        let mut out = Vec::new();
        for m in &self.mirrors {
            out.push((m.source.clone(), m.refresh_since(Some(slot), true).await));
        }
        self.merge().await;
        Ok(out)
    }

    /// Look again after an archive failed verification (the index or the upstream
    /// copy may have been corrected): a refresh that counts as asked for, so the
    /// verdicts it outdates are forgotten. Paced like asked refreshes; sources that
    /// are down are not waited for.
    pub async fn recheck(&self) {
        if self.offline {
            return;
        }
        let slot = self.asked_pacer.wait().await;
        for m in self.mirrors.iter().filter(|m| !m.source_down()) {
            m.refresh_since(Some(slot), true).await;
        }
        self.merge().await;
    }

    /// Refresh every mirror (at most one fetch each at a time).
    pub async fn refresh_all(&self, force: bool) -> Result<Vec<(String, Freshness)>, Offline> {
        if self.offline {
            return Err(Offline);
        }
        let mut out = Vec::new();
        for m in &self.mirrors {
            out.push((m.source.clone(), m.refresh_now(force).await));
        }
        self.merge().await;
        Ok(out)
    }

    /// Answer a client's index request: from the lone source's mirror (straight
    /// through while none exists; offline, a clear 503), from the merged
    /// repository, or (`at`) from the pinned view of that time.
    pub async fn handle(
        &self,
        upstream: &Upstream,
        source: &Source,
        req: Request<GatewayBody>,
        rest: &str,
        client: Option<Client>,
        at: Option<std::time::SystemTime>,
    ) -> Response<GatewayBody> {
        // Only the ref advertisement refreshes: the POSTs of one clone must see the
        // same tip their GET advertised.
        let advertisement = req.method() == Method::GET;
        let freshness = futures_util::future::join_all(self.mirrors.iter().map(|m| async move {
            if advertisement && (!self.offline || m.is_hosted()) {
                self.freshen(m).await
            } else if m.exists() {
                Freshness::Fresh
            } else {
                Freshness::Missing {
                    error: "no mirror yet".into(),
                }
            }
        }))
        .await;
        for (m, f) in self.mirrors.iter().zip(&freshness) {
            if let Freshness::Stale { age, error } = f {
                let age = age
                    .map(|a| format!("{}s", a.as_secs()))
                    .unwrap_or_else(|| "unknown".into());
                tracing::warn!(source = %m.source, age = %age, %error, "upstream index unavailable; serving the stale mirror");
            }
        }
        if advertisement {
            self.merge().await;
        }
        let repo: PathBuf = if let Some(at) = at {
            match self.pin(at).await {
                Ok(repo) => repo,
                Err(error) => {
                    return body::text(
                        StatusCode::NOT_FOUND,
                        format!("no index as of {}: {error}", merge::rfc3339(at)),
                    )
                }
            }
        } else if self.is_merged() {
            if !self.merged.exists() {
                let why = if self.offline {
                    "the gateway is offline and has no index mirror (import a bundle first)"
                } else {
                    "no source's index could be mirrored yet; retry shortly"
                };
                return body::text(StatusCode::SERVICE_UNAVAILABLE, why);
            }
            self.merged.dir().to_path_buf()
        } else {
            let mirror = &self.mirrors[0];
            match &freshness[0] {
                Freshness::Missing { error } if mirror.is_hosted() => {
                    // Its URLs name no host: there is nothing to pass through to.
                    return body::text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "the index of local source `{}` could not be created: {error}",
                            mirror.source
                        ),
                    );
                }
                Freshness::Missing { .. } if self.offline => {
                    return body::text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the gateway is offline and has no index mirror (import a bundle first)",
                    )
                }
                Freshness::Missing { error } => {
                    tracing::warn!(source = %self.mirrors[0].source, %error, "no index mirror yet; passing the request through");
                    let url = join(&source.index, &format!("/{rest}"));
                    return passthrough::forward(upstream, req, &url).await;
                }
                _ => mirror.dir().to_path_buf(),
            }
        };
        serve::upload_pack(&self.backend, &repo, rest, req, client).await
    }

    /// The repository serving the view at `at` (see [`merge::Merged::pin`]): the
    /// last merged commit by then, or with one source its last commit by then.
    async fn pin(&self, at: std::time::SystemTime) -> Result<PathBuf, String> {
        let (objects, commit) = if self.is_merged() {
            let commit = self.merged.commit_at(at).await?;
            (self.merged.dir().join("objects"), commit)
        } else {
            let mirror = &self.mirrors[0];
            if !mirror.exists() {
                return Err("no mirror of the index yet".into());
            }
            let commit = merge::commit_at(mirror.dir(), at, "HEAD").await?;
            (mirror.dir().join("objects"), commit)
        };
        let commit = commit.ok_or("nothing had been published by then")?;
        self.merged.pin(at, &objects, &commit).await
    }

    /// Refresh `mirror` for a client's advertisement, bounded: a source known to be
    /// down or slow is not waited on, and past `refresh_wait` the mirror is served
    /// as it is while the refresh finishes in the background.
    async fn freshen(&self, mirror: &Arc<Mirror>) -> Freshness {
        if mirror.exists() && mirror.source_down_or_slow() {
            // Never wait on a source known to be down or too slow: serve the mirror,
            // and let a background refresh try (or probe) the upstream.
            mirror.refresh_in_background();
            return Freshness::Stale {
                age: mirror.age(),
                error: format!("source `{}` is down or slow", mirror.source),
            };
        }
        if !mirror.exists() {
            return mirror.ensure_fresh().await;
        }
        // A slow upstream must not hold a clone for long: past `refresh_wait` the
        // current mirror is served and the refresh finishes in the background.
        // It is short (2 s) because `moon update` then asks for symbols.zip, which
        // waits as long again before its stored copy is served, and nothing has
        // failed yet for the breaker to count until the upstream's own timeouts.
        let refresh = {
            let mirror = mirror.clone();
            tokio::spawn(async move { mirror.ensure_fresh().await })
        };
        let wait = self.backend.limits.refresh_wait;
        match tokio::time::timeout(wait, refresh).await {
            Ok(Ok(freshness)) => freshness,
            Ok(Err(e)) => Freshness::Stale {
                age: mirror.age(),
                error: format!("refresh task failed: {e}"),
            },
            Err(_) => {
                // The next callers (e.g. this `moon update`'s symbols.zip) need
                // not wait on it again.
                mirror.mark_source_slow();
                Freshness::Stale {
                    age: mirror.age(),
                    error: format!("upstream index did not answer within {wait:?}; refresh continues in the background"),
                }
            }
        }
    }

    /// The checksum the index holds for `key`, refreshing once if no source knows it
    /// (it may have been published seconds ago).
    pub async fn expect(&self, key: &ArchiveKey) -> Expectation {
        if let Some(known) = self.lookup(key) {
            return known;
        }
        // Offline, only a hosted index (ours, never fetched) can have changed.
        if self.offline && !self.mirrors.iter().any(|m| m.is_hosted()) {
            return Expectation::Unknown;
        }
        // Requests for unknown archives cannot make the gateway hammer the upstream.
        let slot = self.unknown_pacer.wait().await;
        // A source that is down is not waited for (its probe may be running).
        let refreshed = self
            .mirrors
            .iter()
            .filter(|m| !m.source_down() && (!self.offline || m.is_hosted()));
        for m in refreshed {
            m.refresh_started_after(slot).await;
        }
        self.lookup(key).unwrap_or(Expectation::Unknown)
    }

    /// Whether some source's index lists `key` now (no refresh).
    pub fn lists(&self, key: &ArchiveKey) -> bool {
        self.lookup(key).is_some()
    }

    /// Whether the index that provides `key` lists it with this sha256 now (no
    /// refresh): what a stored copy needs to answer for it. Reads one snapshot and
    /// copies no checksum, for the hot path.
    pub fn vouches(&self, key: &ArchiveKey, sha256: &str) -> bool {
        self.with_checksum(key, |_, checksum| checksum == sha256)
            .unwrap_or(false)
    }

    fn lookup(&self, key: &ArchiveKey) -> Option<Expectation> {
        self.with_checksum(key, |source, checksum| Expectation::Known {
            source,
            checksum: checksum.to_string(),
        })
    }

    /// `f` of the source that provides `key` and the checksum its index lists now.
    fn with_checksum<T>(&self, key: &ArchiveKey, f: impl FnOnce(usize, &str) -> T) -> Option<T> {
        let name = key.name();
        let source = self.provider(&name)?;
        let snapshot = self.mirrors[source].snapshot();
        let release = snapshot.checksums.get(&name, &key.version)?;
        Some(f(source, &release.checksum))
    }

    /// The source that provides module `name`, by the merge's rule: the one that
    /// claims it, else the first whose index has it.
    pub fn provider(&self, name: &str) -> Option<usize> {
        merge::provider(name, &self.claims, |s| {
            self.mirrors[s].snapshot().checksums.has_module(name)
        })
    }

    /// The source that claims module `name`, if one does: no other may serve it.
    pub fn claimant(&self, name: &str) -> Option<usize> {
        self.claims.iter().position(|c| c.matches(name))
    }

    /// Dependencies of `key` as `moon` will select them (minimal version selection
    /// over every source's index, at most `limit` versions visited), each with the
    /// source and checksum that vouch for it.
    pub fn closure(&self, key: &ArchiveKey, limit: usize) -> Vec<(ArchiveKey, Expectation)> {
        let name = key.name();
        let Some(root) = self.release(&name, &key.version) else {
            return Vec::new();
        };
        let list =
            checksums::build_list(root.deps, |n, v| self.release(n, v).map(|r| r.deps), limit);
        list.modules
            .into_iter()
            .filter(|(dep, _)| *dep != name)
            .filter_map(|(dep, version)| {
                let (user, module) = dep.split_once('/')?;
                let key = ArchiveKey {
                    user: user.to_string(),
                    module: module.to_string(),
                    version,
                };
                let expectation = self.lookup(&key)?;
                Some((key, expectation))
            })
            .collect()
    }

    /// Git processes serving clients' clones and fetches right now.
    pub fn git_slots_in_use(&self) -> usize {
        self.backend.slots.in_use()
    }

    /// Successful refreshes so far, over all mirrors: a bad upstream copy is only
    /// remembered until the next one.
    pub fn refreshes(&self) -> u64 {
        self.mirrors.iter().map(|m| m.refreshes()).sum()
    }
}

/// Directory name of a source's mirror; source names are validated as plain words.
fn repo_name(source: &str) -> String {
    format!("{source}.git")
}
