//! A bare git mirror of one source's index in the data dir, refreshed from the
//! upstream by one `git fetch` at a time however many clients wait, and the
//! checksums read from its tip.
//!
//! A private source's fetches carry its credential (see [`crate::git::Options`]);
//! a fetch the source refuses (401/403) is an authentication error of the source,
//! logged and shown in `/-/health`, not a breaker failure: the source is up.
//!
//! A hosted mirror ([`Mirror::hosted`]) is the index
//! of a source the gateway hosts itself: never fetched, its refresh only re-reads
//! the tip that `publish` moved.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::checksums::{module_of_path, Checksums};
use crate::breaker::Breakers;
use crate::config::Credential;
use crate::git::{self, Git};

/// What the mirror holds at its current tip.
#[derive(Default)]
pub struct Snapshot {
    /// Tip commit of `HEAD`, if the mirror exists.
    pub commit: Option<String>,
    pub checksums: Checksums,
}

/// How current the mirror is after a refresh was attempted.
#[derive(Debug, Clone, PartialEq)]
pub enum Freshness {
    /// Refreshed within the allowed age.
    Fresh,
    /// Exists, but the last refresh failed: serve it, and say how old it is.
    Stale {
        age: Option<Duration>,
        error: String,
    },
    /// No mirror yet and it could not be created.
    Missing { error: String },
}

/// Settings shared by every mirror.
#[derive(Debug, Clone)]
pub struct MirrorSettings {
    /// A mirror older than this is refreshed before it is served.
    pub max_age: Duration,
    /// After a failed refresh, do not try again for this long (serve stale meanwhile).
    pub retry_after: Duration,
    /// Bound on one clone or fetch.
    pub fetch_timeout: Duration,
    /// CA bundle (system roots + the extra upstream CA) for git, if an extra CA is set.
    pub ca_bundle: Option<PathBuf>,
    /// Circuit breakers: no fetch is tried while the source is down.
    pub health: Arc<Breakers>,
    /// Share computed packs between identical clones (see `pack_cache`).
    pub pack_cache: bool,
}

struct RefreshState {
    /// When the last successful refresh *started*: only a refresh that started after
    /// a caller asked can have seen what was published before it asked.
    last_ok: Option<Instant>,
    last_error: Option<(Instant, String)>,
}

/// The parsed index of the tip, kept beside the bare repository (see
/// [`Checksums::save`]); git ignores it.
const SAVED_INDEX: &str = "moonbit-registry-index";

pub struct Mirror {
    pub source: String,
    url: String,
    dir: PathBuf,
    settings: MirrorSettings,
    refresh: tokio::sync::Mutex<RefreshState>,
    /// Held by each reload from reading the tip to replacing the snapshot: a
    /// reload at start may run beside a refresh's (`warm` reads the mirror while
    /// it fetches), and the snapshot must never go back to an older tip.
    reloading: tokio::sync::Mutex<()>,
    snapshot: RwLock<Arc<Snapshot>>,
    /// Wall-clock time of the last successful refresh, for "age" in logs and health.
    refreshed_at: RwLock<Option<SystemTime>>,
    refreshes: AtomicU64,
    /// A background refresh (started while the source is down) is queued or running.
    background: AtomicBool,
    /// Sent with every fetch from the source (its `auth`).
    credential: Option<Credential>,
    /// Why the last refresh failed, until one succeeds (for `/-/health`).
    last_failure: std::sync::Mutex<Option<String>>,
    /// The index of a source hosted here: created empty, never fetched.
    hosted: bool,
}

impl Mirror {
    /// A repository outside the index (e.g. a bundle being checked): read only,
    /// never fetched, so no breaker or CA applies.
    pub fn detached(source: &str, dir: PathBuf) -> Mirror {
        let settings = MirrorSettings {
            max_age: Duration::MAX,
            retry_after: Duration::MAX,
            fetch_timeout: Duration::from_secs(300),
            ca_bundle: None,
            health: Arc::new(Breakers::default()),
            pack_cache: false,
        };
        Mirror::new(source, "", dir, settings)
    }

    /// The index of a source the gateway hosts (`local = true`), kept in `dir` and
    /// written by `publish`, possibly from another process: every refresh re-reads
    /// the tip (a cheap `git rev-parse`; `max_age` is zero so each client's ref
    /// advertisement does one), and nothing is ever fetched.
    pub fn hosted(source: &str, dir: PathBuf, settings: MirrorSettings) -> Mirror {
        let settings = MirrorSettings {
            max_age: Duration::ZERO,
            ..settings
        };
        Mirror {
            hosted: true,
            ..Mirror::new(source, "", dir, settings)
        }
    }

    /// A mirror of `url` kept in `dir` (a bare repository, created on first refresh).
    pub fn new(source: &str, url: &str, dir: PathBuf, settings: MirrorSettings) -> Mirror {
        let refreshed_at = std::fs::metadata(dir.join("FETCH_HEAD"))
            .or_else(|_| std::fs::metadata(dir.join("HEAD")))
            .and_then(|m| m.modified())
            .ok();
        Mirror {
            source: source.to_string(),
            url: url.to_string(),
            dir,
            settings,
            refresh: tokio::sync::Mutex::new(RefreshState {
                last_ok: None,
                last_error: None,
            }),
            reloading: tokio::sync::Mutex::new(()),
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            refreshed_at: RwLock::new(refreshed_at),
            refreshes: AtomicU64::new(0),
            background: AtomicBool::new(false),
            credential: None,
            last_failure: std::sync::Mutex::new(None),
            hosted: false,
        }
    }

    /// Fetch with `credential` (the source's `auth`), if any.
    pub fn with_credential(mut self, credential: Option<Credential>) -> Mirror {
        self.credential = credential;
        self
    }

    /// Why the last refresh failed, if the last one did.
    pub fn last_error(&self) -> Option<String> {
        self.last_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_last_error(&self, error: Option<String>) {
        *self.last_failure.lock().unwrap_or_else(|p| p.into_inner()) = error;
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether this is the index of a source hosted here ([`Mirror::hosted`]).
    pub fn is_hosted(&self) -> bool {
        self.hosted
    }

    pub fn exists(&self) -> bool {
        git::is_bare_repo(&self.dir)
    }

    /// Successful refreshes since start.
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Time since the last successful refresh (this run or an earlier one).
    pub fn age(&self) -> Option<Duration> {
        let at = (*self.refreshed_at.read().unwrap_or_else(|p| p.into_inner()))?;
        Some(SystemTime::now().duration_since(at).unwrap_or_default())
    }

    /// Read the checksums of an existing mirror without contacting the upstream
    /// (at start, so archives are verifiable even while the upstream is down).
    pub async fn load(&self) -> Result<(), String> {
        if !self.exists() {
            return Ok(());
        }
        self.reload().await.map(|_| ())
    }

    /// Refresh if the mirror is older than `max_age`.
    pub async fn ensure_fresh(&self) -> Freshness {
        let since = Instant::now().checked_sub(self.settings.max_age);
        self.refresh_since(since, false).await
    }

    /// Whether this mirror's source is marked down by its circuit breaker.
    pub fn source_down(&self) -> bool {
        self.settings.health.is_down(&self.source)
    }

    /// Whether this mirror's source is down or was too slow to wait for lately.
    pub fn source_down_or_slow(&self) -> bool {
        self.settings.health.is_down_or_slow(&self.source)
    }

    /// A client stopped waiting for a refresh of this mirror.
    pub fn mark_source_slow(&self) {
        self.settings.health.mark_slow(&self.source);
    }

    /// [`Mirror::ensure_fresh`] in a task of its own, at most one at a time: the
    /// caller serves what the mirror holds without waiting on the upstream.
    pub fn refresh_in_background(self: &Arc<Self>) {
        if self.background.swap(true, Ordering::AcqRel) {
            return;
        }
        let mirror = self.clone();
        tokio::spawn(async move {
            mirror.ensure_fresh().await;
            mirror.background.store(false, Ordering::Release);
        });
    }

    /// Make sure a refresh that started at or after `t` has run (sharing one if it has).
    pub async fn refresh_started_after(&self, t: Instant) -> Freshness {
        self.refresh_since(Some(t), false).await
    }

    /// Refresh now unless a refresh finished after this call was made. With
    /// `force`, a recent failure does not hold the attempt back.
    pub async fn refresh_now(&self, force: bool) -> Freshness {
        self.refresh_since(Some(Instant::now()), force).await
    }

    /// Make sure a refresh succeeded after `since` (`None`: ever), running at most one
    /// git fetch at a time: callers that queued behind a refresh reuse its result.
    pub async fn refresh_since(&self, since: Option<Instant>, force: bool) -> Freshness {
        let mut state = self.refresh.lock().await;
        if let (Some(ok), Some(since)) = (state.last_ok, since) {
            if ok >= since {
                return Freshness::Fresh;
            }
        }
        if let Some((at, error)) = &state.last_error {
            let recent = at.elapsed() < self.settings.retry_after;
            let newer_than_ok = state.last_ok.is_none_or(|ok| *at > ok);
            if recent && newer_than_ok && !force {
                return self.degraded(error.clone());
            }
        }
        // While the source is down, answer at once; only the one probe goes out.
        let ticket = match self.settings.health.admit_source(&self.source) {
            Ok(ticket) => ticket,
            Err(refusal) => return self.degraded(refusal.to_string()),
        };
        let started = Instant::now();
        let fetched = self.fetch().await;
        match &fetched {
            Ok(()) => {
                ticket.success();
                self.settings.health.auth_accepted(&self.source);
            }
            Err(error) if refused(error) => {
                // The source answered: up, but not to us. git asks for a user name
                // only after a 401.
                ticket.success();
                let status = if error.contains("returned error: 403") {
                    "403 Forbidden"
                } else {
                    "401 Unauthorized"
                };
                self.settings.health.auth_refused(
                    &self.source,
                    &format!("{status} for the index fetch ({error})"),
                );
            }
            Err(error) => ticket.failure(error),
        }
        match fetched {
            Ok(()) => {
                self.set_last_error(None);
                state.last_ok = Some(started);
                state.last_error = None;
                *self.refreshed_at.write().unwrap_or_else(|p| p.into_inner()) =
                    Some(SystemTime::now());
                match self.reload().await {
                    Ok(changed) => {
                        // What counts as "an index refresh" for remembered verdicts: a
                        // new tip, or one asked for; not every max_age poll.
                        if changed || force {
                            self.refreshes.fetch_add(1, Ordering::Relaxed);
                        }
                        tracing::info!(
                            source = %self.source, ms = started.elapsed().as_millis() as u64,
                            commit = %self.snapshot().commit.as_deref().unwrap_or("-"), changed,
                            "index mirror refreshed"
                        )
                    }
                    Err(e) => {
                        tracing::error!(source = %self.source, error = %e, "index mirror unreadable after refresh")
                    }
                }
                Freshness::Fresh
            }
            Err(error) => {
                self.set_last_error(Some(error.clone()));
                state.last_error = Some((Instant::now(), error.clone()));
                tracing::warn!(source = %self.source, %error, "index refresh failed");
                self.degraded(error)
            }
        }
    }

    fn degraded(&self, error: String) -> Freshness {
        if self.exists() {
            Freshness::Stale {
                age: self.age(),
                error,
            }
        } else {
            Freshness::Missing { error }
        }
    }

    /// Clone (first time, atomically: a half clone is never used) or fetch the
    /// upstream's branches.
    async fn fetch(&self) -> Result<(), String> {
        // Only runs that reach the source carry its credential.
        let options = git::Options {
            credential: self.credential.clone(),
            ..self.git_options()
        };
        if self.hosted {
            // Nothing to fetch: `publish` writes it; an empty one is made on first use.
            return crate::hosted::create_index(&self.dir).await;
        }
        if !self.exists() {
            return git::clone_mirror(&self.url, &self.dir, &options)
                .await
                .map_err(|e| e.to_string());
        }
        let refspec = "+refs/heads/*:refs/heads/*";
        Git::in_repo(
            &self.dir,
            [
                "fetch",
                "--prune",
                "--quiet",
                "--no-tags",
                &self.url,
                refspec,
            ],
        )
        .with(&options)
        .output()
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    /// Re-read the checksums if the tip moved. Returns whether it did.
    async fn reload(&self) -> Result<bool, String> {
        let _one = self.reloading.lock().await;
        let commit = match self
            .git(&["rev-parse", "--verify", "--quiet", "HEAD^{commit}"])
            .await
        {
            Ok(commit) => commit,
            // A hosted index nothing was published to yet has no commit: empty.
            Err(_) if self.hosted && self.snapshot().commit.is_none() => return Ok(false),
            Err(e) => return Err(e),
        };
        let commit = String::from_utf8_lossy(&commit).trim().to_string();
        if self.snapshot().commit.as_deref() == Some(commit.as_str()) {
            return Ok(false);
        }
        let checksums = self.read_checksums(&commit).await?;
        tracing::info!(
            source = %self.source, %commit, modules = checksums.modules(),
            versions = checksums.releases(), skipped = checksums.skipped, "index loaded"
        );
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Snapshot {
            commit: Some(commit),
            checksums,
        });
        Ok(true)
    }

    /// The index at `commit`: as saved by the last read of that commit, else
    /// read from git (and saved for the next start).
    async fn read_checksums(&self, commit: &str) -> Result<Checksums, String> {
        let saved = self.dir.join(SAVED_INDEX);
        if let Ok(text) = tokio::fs::read_to_string(&saved).await {
            if let Some(checksums) = Checksums::restore(&text, commit) {
                return Ok(checksums);
            }
        }
        let checksums = self.read_index_files(commit).await?;
        if let Some(text) = checksums.save(commit) {
            let dir = self.dir.clone();
            // Atomically, so a reader sees the old file or the new one; a failure
            // only costs the next start the read from git.
            let written = tokio::task::spawn_blocking(move || {
                let mut file = tempfile::NamedTempFile::new_in(&dir)?;
                std::io::Write::write_all(&mut file, text.as_bytes())?;
                file.persist(dir.join(SAVED_INDEX)).map_err(|e| e.error)?;
                Ok::<_, std::io::Error>(())
            })
            .await;
            if let Ok(Err(e)) = written {
                tracing::debug!(source = %self.source, error = %e, "parsed index not saved");
            }
        }
        Ok(checksums)
    }

    /// Every `user/**.index` file at `commit`, through one `git cat-file --batch`.
    async fn read_index_files(&self, commit: &str) -> Result<Checksums, String> {
        let listing = self
            .git(&["ls-tree", "-r", "-z", commit, "--", "user/"])
            .await?;
        let mut files = Vec::new();
        for entry in listing.split(|&b| b == 0).filter(|e| !e.is_empty()) {
            let entry = String::from_utf8_lossy(entry);
            let Some((meta, path)) = entry.split_once('\t') else {
                continue;
            };
            let mut meta = meta.split(' ');
            let (Some(_mode), Some("blob"), Some(oid)) = (meta.next(), meta.next(), meta.next())
            else {
                continue;
            };
            if let Some(name) = module_of_path(path) {
                files.push((name.to_string(), oid.to_string()));
            }
        }
        let git::Spawned {
            mut stdin,
            mut stdout,
            mut process,
            ..
        } = Git::in_repo(&self.dir, ["cat-file", "--batch"])
            .with(&self.git_options())
            .spawn(git::Stderr::Discard)
            .map_err(|e| e.to_string())?;
        let ids: String = files.iter().map(|(_, oid)| format!("{oid}\n")).collect();
        // Written from its own task: git's output could fill the pipe before we read it.
        let writer = tokio::spawn(async move {
            let _ = stdin.write_all(ids.as_bytes()).await;
        });
        let mut out = Vec::new();
        stdout
            .read_to_end(&mut out)
            .await
            .map_err(|e| format!("reading git cat-file: {e}"))?;
        let _ = writer.await;
        // A short answer is caught below, entry by entry.
        let _ = process.finish().await;

        let mut checksums = Checksums::default();
        let mut rest = &out[..];
        for (name, _) in &files {
            let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
                break;
            };
            let header = String::from_utf8_lossy(&rest[..nl]).to_string();
            rest = &rest[nl + 1..];
            let size: usize = match header.rsplit(' ').next().and_then(|s| s.parse().ok()) {
                Some(size) if header.contains(" blob ") && size <= rest.len() => size,
                _ => return Err(format!("unexpected git cat-file output: {header}")),
            };
            checksums.add_file(&self.source, name, &String::from_utf8_lossy(&rest[..size]));
            rest = rest.get(size + 1..).unwrap_or_default();
        }
        Ok(checksums)
    }

    /// How this mirror's git runs reach the source (the credential is added by
    /// the runs that do: [`Mirror::fetch`]).
    fn git_options(&self) -> git::Options {
        git::Options {
            ca_bundle: self.settings.ca_bundle.clone(),
            timeout: Some(self.settings.fetch_timeout),
            credential: None,
        }
    }

    /// Run git in the mirror, returning stdout, or stderr's gist as the error.
    async fn git(&self, args: &[&str]) -> Result<Vec<u8>, String> {
        Git::in_repo(&self.dir, args)
            .with(&self.git_options())
            .output()
            .await
            .map_err(|e| e.to_string())
    }
}

/// Whether a failed fetch was the source refusing us: git reports a 401/403 as
/// `returned error: 401`, or, having no credentials to offer (no helper, no
/// prompt), as being unable to read a user name.
fn refused(error: &str) -> bool {
    error.contains("returned error: 401")
        || error.contains("returned error: 403")
        || error.contains("could not read Username")
        || error.contains("Authentication failed")
}

#[cfg(test)]
mod tests {
    use super::refused;

    #[test]
    fn refusals_are_told_from_outages() {
        assert!(refused("git fetch failed (exit status: 128): fatal: unable to access 'https://h/git/index/': The requested URL returned error: 403"));
        assert!(refused("git clone failed (exit status: 128): fatal: could not read Username for 'https://h': terminal prompts disabled"));
        assert!(!refused("git fetch failed (exit status: 128): fatal: unable to access 'https://h/git/index/': The requested URL returned error: 502"));
        assert!(!refused("git fetch took longer than 5s"));
    }
}
