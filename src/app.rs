//! The app's services (sources, breakers, upstream client, archive store, index
//! mirrors, mutable cache), built in one place for every command: `serve`,
//! `serve --offline`, `warm`, `export`, `import` and `cache` all call
//! [`Services::open`]. Each service is given its own section of the [`Config`],
//! never the whole config.
//!
//! A [`Mode`] is data: offline means an upstream client that refuses everything and
//! an index that never refreshes; the router and handlers have no second code path.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use bytesize::ByteSize;

use crate::archive::ArchiveKey;
use crate::breaker::Breakers;
use crate::ca_bundle::write_ca_bundle;
use crate::config::{join, Config, Source};
use crate::hosted::Hosted;
use crate::index::mirror::MirrorSettings;
use crate::index::{Expectation, Index};
use crate::mutable_cache::MutableCache;
use crate::ops::jobs::Jobs;
use crate::ops::metrics::Metrics;
use crate::store::shared::Shared;
use crate::store::{Object, Store};
use crate::symbols::MergedSymbols;
use crate::upstream::Upstream;

/// What the services are opened for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `serve`: sources reachable, the index refreshed, storage bounds enforced.
    Serve,
    /// `serve --offline`: no upstream at all; the mirrors and the store as they are.
    Offline,
    /// A one-shot command (`warm`, `export`, `import`, `cache`), possibly beside a
    /// running `serve` on the same data dir: downloads spool in a directory of this
    /// process's own, and nothing is kept in memory (nothing is served twice).
    Command,
}

/// Prefix of the per-process spool directories of [`Mode::Command`].
const SPOOL_PREFIX: &str = ".spool-";

/// Everything a request handler or a command needs, shared by all connections.
pub struct Services {
    pub config: Config,
    pub mode: Mode,
    pub sources: Vec<Source>,
    /// Per-source circuit breakers, fed by every upstream exchange and git fetch.
    pub breakers: Arc<Breakers>,
    pub upstream: Upstream,
    pub store: Arc<Store>,
    pub index: Arc<Index>,
    /// Mutable resources (`symbols.zip`), revalidated and served stale on failure.
    pub mutable: Arc<MutableCache>,
    /// `symbols.zip` as clients see it: one source's, or every source's merged.
    pub symbols: MergedSymbols,
    /// Fetch an archive's dependencies in the background when it is requested.
    pub prefetch: bool,
    /// Bearer token the admin endpoints require (`admin.token_env`); without one
    /// they answer loopback clients only.
    pub admin_token: Option<String>,
    /// Bearer token `POST /-/publish` requires (`publish.token_env`); without one
    /// the endpoint is off.
    pub publish_token: Option<String>,
    /// Prometheus metrics (`GET /-/metrics`), recorded by the doors and breakers.
    pub metrics: Arc<Metrics>,
    /// Per-CI-job counters (`GET /-/jobs/<id>`), bounded by `jobs.max`.
    pub jobs: Arc<Jobs>,
    /// A command's spool files and git CA bundle; removed when it ends.
    _scratch: Option<tempfile::TempDir>,
}

impl Services {
    /// Open the data dir `config` names (creating it) and build every service.
    pub fn open(config: &Config, mode: Mode) -> anyhow::Result<Services> {
        let sources = config.sources()?;
        let admin_token = match (&config.admin.token_env, mode) {
            (Some(var), Mode::Serve | Mode::Offline) => Some(
                std::env::var(var)
                    .ok()
                    .filter(|t| !t.is_empty())
                    .with_context(|| format!("admin.token_env names `{var}`, which is not set"))?,
            ),
            _ => None,
        };
        let publish_token = match (&config.publish.token_env, mode) {
            (Some(var), Mode::Serve | Mode::Offline) => Some(
                std::env::var(var)
                    .ok()
                    .filter(|t| !t.is_empty())
                    .with_context(|| {
                        format!("publish.token_env names `{var}`, which is not set")
                    })?,
            ),
            _ => None,
        };
        let data_dir = &config.data_dir;
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("could not create data dir {}", data_dir.display()))?;
        let scratch = match mode {
            Mode::Command => {
                sweep_dead_spools(data_dir);
                Some(
                    tempfile::Builder::new()
                        .prefix(&format!("{SPOOL_PREFIX}{}-", std::process::id()))
                        .tempdir_in(data_dir)
                        .with_context(|| {
                            format!("could not create a spool dir in {}", data_dir.display())
                        })?,
                )
            }
            Mode::Serve | Mode::Offline => None,
        };
        // Where this process keeps what it writes for itself.
        let own_dir = scratch.as_ref().map_or(data_dir.as_path(), |s| s.path());

        let metrics = Arc::new(Metrics::new(sources.iter().map(|s| s.name.as_str())));
        let breakers = Arc::new(Breakers::counted(&sources, &config.breaker, Some(&metrics)));
        let mut upstream = Upstream::new(config.upstream_ca.as_deref(), config.timeouts.clone())?
            .with_health(breakers.clone());
        if mode == Mode::Offline {
            upstream = upstream.offline();
        }

        let store = match mode {
            Mode::Command => {
                let mut storage = config.storage.clone();
                storage.memory = ByteSize(0);
                Store::open_with_spool(data_dir, own_dir.join("spool"), &storage, upstream.clone())?
            }
            Mode::Serve | Mode::Offline => {
                Store::open(data_dir, &config.storage, upstream.clone())?
            }
        };

        let mut store = store;
        store.count_into(metrics.store_counters());
        // Offline means no network at all, the shared tier's included.
        if let (Some(settings), false) = (&config.storage.shared, mode == Mode::Offline) {
            store.share(Arc::new(Shared::open(settings, &config.breaker)?));
        }

        let ca_bundle = match &config.upstream_ca {
            Some(ca) => {
                let bundle = own_dir.join("upstream-ca-bundle.pem");
                write_ca_bundle(ca, &bundle)?;
                Some(bundle)
            }
            None => None,
        };
        let mirrors = MirrorSettings {
            max_age: config.index.max_age,
            retry_after: config.index.retry_after,
            fetch_timeout: config.index.fetch_timeout,
            ca_bundle,
            health: breakers.clone(),
            pack_cache: config.index.pack_cache,
        };
        let limits = crate::index::serve::Limits {
            body_idle: config.index.request_body_idle,
            body_timeout: config.index.request_body_timeout,
            body_max: config.index.request_body_max.as_u64(),
            slots_per_client: config.index.slots_per_client,
            refresh_wait: config.index.refresh_wait,
        };
        let mut index = Index::new(data_dir, &sources, mirrors, limits);
        if mode == Mode::Offline {
            index = index.offline();
        }

        let mutable = Arc::new(MutableCache::open(
            &data_dir.join("mutable"),
            upstream.clone(),
            config.mutable.clone(),
        )?);
        let symbols = MergedSymbols::open(
            &data_dir.join("symbols"),
            &sources,
            mutable.clone(),
            config.mutable.mutable_max.as_u64(),
        )?;
        Ok(Services {
            prefetch: config.prefetch && mode == Mode::Serve,
            admin_token,
            publish_token,
            metrics,
            jobs: Arc::new(Jobs::new(config.jobs.max)),
            config: config.clone(),
            mode,
            sources,
            breakers,
            upstream,
            store: Arc::new(store),
            index: Arc::new(index),
            mutable,
            symbols,
            _scratch: scratch,
        })
    }

    /// Start what runs in the background while serving: reading (and, online,
    /// refreshing) the index mirrors, keeping the store within its bound, and
    /// (online) probing sources that are down.
    pub async fn start(&self) {
        self.index.start().await;
        if self.mode == Mode::Serve {
            self.probe_sources_that_are_down();
            if let Some(shared) = self.store.shared() {
                shared.probe_in_background();
            }
        }
        let bound = match self.config.storage.max_size {
            // Offline, nothing evicted could be fetched again.
            Some(_) if self.mode == Mode::Offline => {
                tracing::warn!("storage.max_size is not enforced while offline");
                None
            }
            max => max.map(|m| m.as_u64()),
        };
        // Without a bound a served store is still measured, for
        // `store_bytes{tier="disk"}`.
        if bound.is_some() || self.mode != Mode::Command {
            self.store
                .keep_within(bound, self.config.storage.gc_interval);
        }
    }

    /// A source that is down is probed without waiting for a client: a GET of its
    /// index's ref advertisement, the cheapest request every source must answer
    /// (what `git fetch` asks first), through the upstream client and its timeouts.
    fn probe_sources_that_are_down(&self) {
        let upstream = self.upstream.clone();
        let targets: Vec<(String, String)> = self
            .sources
            .iter()
            // A hosted source is never fetched from, so never probed.
            .filter(|s| !s.local)
            .map(|s| {
                let url = join(&s.index, "/info/refs?service=git-upload-pack");
                (s.name.clone(), url)
            })
            .collect();
        self.breakers.probe_in_background(move |source| {
            let upstream = upstream.clone();
            let url = targets
                .iter()
                .find(|(name, _)| name == source)
                .map(|(_, url)| url.clone())
                .ok_or_else(|| format!("source `{source}` has no probe URL"));
            async move { upstream.probe(&url?).await }
        });
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    /// What to fetch for `key`, verified against the index (for a source hosted
    /// here, the file it is read from); `None` if no index lists it.
    pub fn archive_object(&self, key: &ArchiveKey, expectation: &Expectation) -> Option<Object> {
        let Expectation::Known { source, checksum } = expectation else {
            return None;
        };
        let src = &self.sources[*source];
        if src.local {
            let file = Hosted::new(self.data_dir(), &src.name).archive_path(key);
            return Some(Object::local_archive(
                key,
                checksum.clone(),
                self.index.refreshes(),
                file,
            ));
        }
        let url = join(&src.archive, &key.upstream_path());
        Some(Object::archive(
            key,
            checksum.clone(),
            self.index.refreshes(),
            vec![url],
        ))
    }
}

/// Spool dirs of processes that are gone (killed mid-download) are removed.
fn sweep_dead_spools(data_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix(SPOOL_PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or_default();
        // Only where liveness can be checked cheaply; elsewhere leftovers stay.
        if Path::new("/proc/self").exists() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
