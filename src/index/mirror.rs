//! A bare git mirror of one source's index in the data dir, refreshed from the
//! upstream by one `git fetch` at a time however many clients wait, and the
//! checksums read from its tip.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::checksums::{module_of_path, Checksums};
use crate::breaker::Breakers;

/// Bound on what git may print on stderr that we keep for an error message.
const STDERR_KEEP: usize = 2048;

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

pub struct Mirror {
    pub source: String,
    url: String,
    dir: PathBuf,
    settings: MirrorSettings,
    refresh: tokio::sync::Mutex<RefreshState>,
    snapshot: RwLock<Arc<Snapshot>>,
    /// Wall-clock time of the last successful refresh, for "age" in logs and health.
    refreshed_at: RwLock<Option<SystemTime>>,
    refreshes: AtomicU64,
    /// A background refresh (started while the source is down) is queued or running.
    background: AtomicBool,
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
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            refreshed_at: RwLock::new(refreshed_at),
            refreshes: AtomicU64::new(0),
            background: AtomicBool::new(false),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn exists(&self) -> bool {
        self.dir.join("HEAD").is_file() && self.dir.join("objects").is_dir()
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
    async fn refresh_since(&self, since: Option<Instant>, force: bool) -> Freshness {
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
            Ok(()) => ticket.success(),
            Err(error) => ticket.failure(error),
        }
        match fetched {
            Ok(()) => {
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

    /// Clone (first time, into a temp dir then renamed, so a half clone is never
    /// used) or fetch the upstream's branches.
    async fn fetch(&self) -> Result<(), String> {
        if self.exists() {
            let refspec = "+refs/heads/*:refs/heads/*";
            return self
                .git(
                    Some(&self.dir),
                    &[
                        "fetch",
                        "--prune",
                        "--quiet",
                        "--no-tags",
                        &self.url,
                        refspec,
                    ],
                )
                .await
                .map(|_| ());
        }
        let parent = self.dir.parent().unwrap_or(Path::new("."));
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix(".clone-")
            .tempdir_in(parent)
            .map_err(|e| format!("cannot create a temp dir in {}: {e}", parent.display()))?;
        let target = tmp.path().join("repo.git");
        let target_str = target.to_string_lossy().to_string();
        self.git(
            None,
            &["clone", "--mirror", "--quiet", &self.url, &target_str],
        )
        .await?;
        if self.dir.exists() {
            // A broken leftover (no HEAD or objects): replace it.
            let _ = tokio::fs::remove_dir_all(&self.dir).await;
        }
        tokio::fs::rename(&target, &self.dir).await.map_err(|e| {
            format!(
                "cannot move the new mirror into {}: {e}",
                self.dir.display()
            )
        })
    }

    /// Re-read the checksums if the tip moved. Returns whether it did.
    async fn reload(&self) -> Result<bool, String> {
        let commit = self
            .git(
                Some(&self.dir),
                &["rev-parse", "--verify", "--quiet", "HEAD^{commit}"],
            )
            .await?;
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

    /// Every `user/**.index` file at `commit`, through one `git cat-file --batch`.
    async fn read_checksums(&self, commit: &str) -> Result<Checksums, String> {
        let listing = self
            .git(
                Some(&self.dir),
                &["ls-tree", "-r", "-z", commit, "--", "user/"],
            )
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
        let mut child = self
            .command(Some(&self.dir))
            .args(["cat-file", "--batch"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run git: {e}"))?;
        let mut stdin = child.stdin.take().ok_or("git stdin missing")?;
        let ids: String = files.iter().map(|(_, oid)| format!("{oid}\n")).collect();
        // Written from its own task: git's output could fill the pipe before we read it.
        let writer = tokio::spawn(async move {
            let _ = stdin.write_all(ids.as_bytes()).await;
        });
        let mut out = Vec::new();
        child
            .stdout
            .take()
            .ok_or("git stdout missing")?
            .read_to_end(&mut out)
            .await
            .map_err(|e| format!("reading git cat-file: {e}"))?;
        let _ = writer.await;
        let _ = child.wait().await;

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

    fn command(&self, dir: Option<&Path>) -> Command {
        let mut cmd = Command::new("git");
        if let Some(dir) = dir {
            cmd.arg("--git-dir").arg(dir);
        }
        cmd.env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env_remove("GIT_DIR")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(bundle) = &self.settings.ca_bundle {
            // The env variable would override the -c setting; the bundle already holds the system roots.
            cmd.env_remove("GIT_SSL_CAINFO")
                .arg("-c")
                .arg(format!("http.sslCAInfo={}", bundle.display()));
        }
        // A stalled transfer fails instead of hanging: under 1 KiB/s for 30 s.
        cmd.args([
            "-c",
            "http.lowSpeedLimit=1024",
            "-c",
            "http.lowSpeedTime=30",
            "-c",
            "credential.helper=",
        ]);
        cmd
    }

    /// Run git, returning stdout, or stderr's gist as the error.
    async fn git(&self, dir: Option<&Path>, args: &[&str]) -> Result<Vec<u8>, String> {
        let mut cmd = self.command(dir);
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        let what = args.first().copied().unwrap_or("git");
        let out = tokio::time::timeout(self.settings.fetch_timeout, cmd.output())
            .await
            .map_err(|_| {
                format!(
                    "git {what} took longer than {:?}",
                    self.settings.fetch_timeout
                )
            })?
            .map_err(|e| format!("cannot run git: {e}"))?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut gist: String = stderr.trim().replace('\n', "; ");
        if gist.len() > STDERR_KEEP {
            let cut = (0..=STDERR_KEEP)
                .rev()
                .find(|&i| gist.is_char_boundary(i))
                .unwrap_or(0);
            gist.truncate(cut);
        }
        Err(format!("git {what} failed ({}): {gist}", out.status))
    }
}
