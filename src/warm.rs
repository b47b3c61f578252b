//! `moonbit-registry warm`: refresh the index mirror, select module versions
//! (patterns, `--latest`, `--from moon.mod.json`) and download every selected
//! archive that is not stored yet, through the same fetch-verify-commit path as
//! `serve`, `--jobs` at a time.
//!
//! The refresh is a `git fetch` (one or more round trips to the source), so what
//! the mirror already selects is downloaded while it runs; the refreshed index
//! then decides: what it selects that was not fetched under the same index line
//! (a version published since, a corrected checksum) is fetched after it.
//!
//! Safe to interrupt (cacache commits atomically; an unfinished download leaves
//! nothing visible) and to rerun (what is stored is skipped), and safe beside a
//! running `serve` on the same data dir (downloads spool in a directory of their
//! own, never in `serve`'s).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use bytesize::ByteSize;
use http::{header, Method, Request};

use crate::app::{Mode, Services};
use crate::archive::ArchiveKey;
use crate::body;
use crate::config::Config;
use crate::index::mirror::Freshness;
use crate::index::selection::{Chosen, Selection};
use crate::index::Expectation;
use crate::progress::Progress;
use crate::store::ahead::Ahead;
use crate::upstream::Upstream;

/// Archives downloaded at once unless `--jobs` says otherwise: enough for a
/// typical project's whole closure (a few dozen modules) in one round trip to the
/// source, still a bound (over HTTP/2 they share one connection).
pub const DEFAULT_JOBS: usize = 32;

/// Read the mirrors, then refresh them from the upstream (see [`refresh_only`]).
pub async fn refresh(app: &Services) -> anyhow::Result<()> {
    load(app).await;
    refresh_only(app).await
}

/// Read the mirrors as they are, without contacting the upstream.
async fn load(app: &Services) {
    for m in app.index.mirrors() {
        if let Err(error) = m.load().await {
            tracing::warn!(source = %m.source, %error, "existing index mirror unreadable");
        }
    }
}

/// Refresh the mirrors from the upstream. A failed refresh of an existing
/// mirror is a warning (its last state is used); with no mirror at all there is
/// nothing to select from.
async fn refresh_only(app: &Services) -> anyhow::Result<()> {
    for (source, freshness) in app.index.refresh_all(true).await? {
        match freshness {
            Freshness::Fresh => {}
            Freshness::Stale { error, .. } => {
                eprintln!("warning: index of source `{source}` not refreshed, using the mirror as it is: {error}")
            }
            Freshness::Missing { error } => {
                bail!("no index mirror of source `{source}` and the upstream index could not be cloned: {error}")
            }
        }
    }
    Ok(())
}

/// Refresh the index and make sure every archive `selection` picks from the
/// refreshed index is stored; returns that choice and how each archive went.
///
/// While the refresh runs, the mirror is read and what it selects is fetched
/// (verified against the line the mirror holds). Once refreshed, what the
/// refreshed index selects with another line, or that the mirror did not have,
/// is fetched; archives fetched early that it no longer selects stay stored
/// (verified, of a published version) and are counted as fetched.
pub async fn refresh_and_fetch(
    app: &Services,
    selection: &Selection,
    jobs: usize,
    verb: &'static str,
) -> anyhow::Result<(Chosen, Summary)> {
    let early = async {
        load(app).await;
        // No mirror yet, or nothing it can select yet: the refreshed index decides.
        let archives = app
            .index
            .select(selection)
            .map(|c| c.archives)
            .unwrap_or_default();
        let early = Chosen {
            archives,
            missing: Vec::new(),
        };
        let summary = fetch_all(app, &early, jobs, verb).await;
        (early, summary)
    };
    let (refreshed, (early, early_summary)) = tokio::join!(refresh_only(app), early);
    refreshed?;
    let chosen = app.index.select(selection)?;
    let settled: HashMap<&ArchiveKey, &Expectation> =
        early.archives.iter().map(|(k, e)| (k, e)).collect();
    let (same, rest): (Vec<_>, Vec<_>) = chosen
        .archives
        .iter()
        .cloned()
        .partition(|(key, expectation)| settled.get(key) == Some(&expectation));
    let rest = Chosen {
        archives: rest,
        missing: chosen.missing.clone(),
    };
    let late = fetch_all(app, &rest, jobs, verb).await;
    let kept: HashSet<String> = same.iter().map(|(k, _)| k.label()).collect();
    let mut summary = early_summary;
    // What the refreshed index no longer selects is no failure of this run.
    summary.present.retain(|(name, _)| kept.contains(name));
    summary.failed.retain(|(name, _)| kept.contains(name));
    summary.fetched.extend(late.fetched);
    summary.present.extend(late.present);
    summary.failed.extend(late.failed);
    for list in [&mut summary.fetched, &mut summary.present] {
        list.sort();
    }
    Ok((chosen, summary))
}

/// How a run ended, per archive.
#[derive(Debug, Default)]
pub struct Summary {
    pub fetched: Vec<(String, u64)>,
    pub present: Vec<(String, u64)>,
    pub failed: Vec<(String, String)>,
}

impl Summary {
    pub fn print(&self, what: &str, elapsed: Duration) {
        let bytes = |items: &[(String, u64)]| ByteSize(items.iter().map(|(_, s)| s).sum());
        println!(
            "{what}: {} fetched ({}), {} already present ({}), {} failed, in {:.1}s",
            self.fetched.len(),
            bytes(&self.fetched),
            self.present.len(),
            bytes(&self.present),
            self.failed.len(),
            elapsed.as_secs_f64()
        );
        for (name, reason) in &self.failed {
            println!("failed: {name}: {reason}");
        }
    }
}

/// Make sure every chosen archive is stored. Missing selections count as failures.
pub async fn fetch_all(
    app: &Services,
    chosen: &Chosen,
    jobs: usize,
    verb: &'static str,
) -> Summary {
    let mut summary = Summary::default();
    for (name, reason) in &chosen.missing {
        summary.failed.push((name.clone(), reason.clone()));
    }
    let progress = Arc::new(Progress::new(verb, chosen.archives.len() as u64));
    for (name, reason) in &chosen.missing {
        progress.item(0, &format!("failed {name}: {reason}"));
    }
    let permits = Arc::new(tokio::sync::Semaphore::new(jobs.max(1)));
    let moved = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for (key, expectation) in &chosen.archives {
        let name = key.label();
        let Some(object) = app.archive_object(key, expectation) else {
            summary.failed.push((name, "not in the index".into()));
            continue;
        };
        let (store, permits, moved, done, progress) = (
            app.store.clone(),
            permits.clone(),
            moved.clone(),
            done.clone(),
            progress.clone(),
        );
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let mut seen = 0u64;
            let outcome = store
                .fetch_ahead(object, |written| {
                    let total = moved.fetch_add(written.saturating_sub(seen), Ordering::Relaxed)
                        + written.saturating_sub(seen);
                    seen = written;
                    progress.bytes(total);
                })
                .await;
            let n = done.fetch_add(1, Ordering::Relaxed) + 1;
            let line = match &outcome {
                Ahead::Fetched { size } => format!("fetched {name} ({})", ByteSize(*size)),
                Ahead::Present { size } => format!("present {name} ({})", ByteSize(*size)),
                Ahead::Failed(reason) => format!("failed {name}: {reason}"),
            };
            progress.item(n, &line);
            (name, outcome)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((name, Ahead::Fetched { size })) => summary.fetched.push((name, size)),
            Ok((name, Ahead::Present { size })) => summary.present.push((name, size)),
            Ok((name, Ahead::Failed(reason))) => summary.failed.push((name, reason)),
            Err(e) => summary
                .failed
                .push(("?".into(), format!("task failed: {e}"))),
        }
    }
    progress.finish();
    for list in [&mut summary.fetched, &mut summary.present] {
        list.sort();
    }
    summary
}

/// `--dry-run`: what would be fetched, with sizes from a HEAD request where the
/// upstream gives one.
pub async fn dry_run(app: &Services, chosen: &Chosen, jobs: usize) -> bool {
    let mut to_fetch = Vec::new();
    let mut present = 0usize;
    for (key, expectation) in &chosen.archives {
        let Some(object) = app.archive_object(key, expectation) else {
            continue;
        };
        if app.store.stored_size(&object).await.is_some() {
            present += 1;
        } else {
            to_fetch.push((key.label(), object.urls[0].clone()));
        }
    }
    let permits = Arc::new(tokio::sync::Semaphore::new(jobs.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (_, url)) in to_fetch.iter().enumerate() {
        let (upstream, url, permits) = (app.upstream.clone(), url.clone(), permits.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            (i, head_size(&upstream, &url).await)
        });
    }
    let mut sizes = vec![None; to_fetch.len()];
    while let Some(Ok((i, size))) = tasks.join_next().await {
        sizes[i] = size;
    }
    for ((name, _), size) in to_fetch.iter().zip(&sizes) {
        match size {
            Some(s) => println!("would fetch {name} ({})", ByteSize(*s)),
            None => println!("would fetch {name} (size unknown)"),
        }
    }
    for (name, reason) in &chosen.missing {
        println!("missing {name}: {reason}");
    }
    let known: u64 = sizes.iter().flatten().sum();
    let unknown = sizes.iter().filter(|s| s.is_none()).count();
    let unknown = if unknown > 0 {
        format!(", {unknown} of unknown size")
    } else {
        String::new()
    };
    println!(
        "dry run: {} to fetch ({}{unknown}), {present} already present, {} missing",
        to_fetch.len(),
        ByteSize(known),
        chosen.missing.len()
    );
    chosen.missing.is_empty()
}

async fn head_size(upstream: &Upstream, url: &str) -> Option<u64> {
    let req = Request::builder()
        .method(Method::HEAD)
        .uri(url)
        .header(header::USER_AGENT, crate::USER_AGENT)
        .body(body::empty())
        .ok()?;
    // The gateway's own request: guarded, with the source's credential.
    let resp = upstream.send_guarded(req).await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    crate::upstream::content_length(resp.headers())
}

/// The `warm` command: returns whether everything selected is now stored.
pub async fn run(
    config: Config,
    selection: Selection,
    jobs: usize,
    dry: bool,
) -> anyhow::Result<bool> {
    if selection.patterns.is_empty() && selection.from.is_none() {
        bail!("nothing selected: give patterns (alice/json, alice/*, alice/json@^0.3) and/or --from moon.mod.json");
    }
    let app = Services::open(&config, Mode::Command)?;
    if dry {
        refresh(&app).await?;
        let chosen = app.index.select(&selection)?;
        return Ok(dry_run(&app, &chosen, jobs).await);
    }
    let started = std::time::Instant::now();
    let (_, summary) = refresh_and_fetch(&app, &selection, jobs, "warm").await?;
    // The cluster's tier is filled before the command ends (see `Store::share_stored`).
    if let Some(shared) = app.store.shared() {
        let uploads = app.store.finish_uploads().await;
        println!(
            "warm: shared tier {} checked ({uploads} uploads)",
            shared.url()
        );
    }
    summary.print("warm", started.elapsed());
    Ok(summary.failed.is_empty())
}

/// Where a `--from` path points, checked up front for a clear error.
pub fn check_from(path: &Path) -> anyhow::Result<PathBuf> {
    if !path.is_file() {
        bail!(
            "{} is not a file (expected a moon.mod.json)",
            path.display()
        );
    }
    Ok(path.to_path_buf())
}
