//! Configuration: figment layers (built-in defaults -> TOML file -> `MOONBIT_REGISTRY_*`
//! environment -> command-line flags) resolved into a typed [`Config`] and its [`Source`]s.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use bytesize::ByteSize;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use url::Url;

/// The public registry, and the special case `moon` applies to it: archives and
/// `symbols.zip` live on the download host, not under the registry base.
pub const MOONCAKES: &str = "https://mooncakes.io";
const MOONCAKES_DOWNLOAD: &str = "https://download.mooncakes.io";

/// Name of the config file looked up in the working directory when `--config` is not given.
pub const DEFAULT_CONFIG_FILE: &str = "moonbit-registry.toml";

/// Everything the gateway's commands need, after all layers are merged. Each
/// table is the section of the module that owns it: `[timeouts]` the upstream
/// client, `[storage]` the archive store, `[index]` the index mirrors, `[mutable]`
/// the mutable cache, `[breaker]` the circuit breakers, `[proxy]` the doors.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the listener for registry and proxy traffic.
    pub listen: SocketAddr,
    /// Where the store, spool files and (later) the index mirror live.
    pub data_dir: PathBuf,
    /// Registry base of the default source; only used when `sources` is empty.
    pub upstream: Option<String>,
    /// Extra CA certificate (PEM) trusted for upstream TLS, on top of the system roots.
    pub upstream_ca: Option<PathBuf>,
    /// Hosts intercepted for the default source (the one `upstream` names); with
    /// `[[sources]]`, set `intercept_hosts` per source instead.
    pub intercept_hosts: Option<Vec<String>>,
    /// Ordered sources: archives are looked up in this order (internal first, then public).
    pub sources: Vec<SourceConfig>,
    pub server: ServerSettings,
    pub admin: AdminSettings,
    pub timeouts: Timeouts,
    pub storage: StoreSettings,
    pub index: IndexSettings,
    pub proxy: ProxySettings,
    pub publish: PublishSettings,
    /// Also accept raw TLS redirected by the network (transparent gateway); the SNI decides.
    pub transparent_listen: Option<SocketAddr>,
    /// Fetch an archive's dependencies (from the index) in the background when it is requested.
    pub prefetch: bool,
    /// `[mutable]`; `[freshness]` is its former name.
    #[serde(alias = "freshness")]
    pub mutable: MutableCacheSettings,
    /// `[breaker]`; `[health]` is its former name.
    #[serde(alias = "health")]
    pub breaker: BreakerSettings,
    /// Never contact an upstream: index from the mirror, archives from the store.
    pub offline: bool,
    /// `[log]`, for the log writer ([`crate::ops::log`]).
    pub log: LogSettings,
    /// `[jobs]`, for the per-CI-job counters ([`crate::ops::jobs`]).
    pub jobs: JobsSettings,
}

/// `[jobs]`: per-CI-job counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsSettings {
    /// Jobs remembered at once; the least recently seen are forgotten first.
    pub max: u64,
}

impl Default for JobsSettings {
    fn default() -> Self {
        JobsSettings { max: 1000 }
    }
}

/// `[log]`: how the gateway writes its log (to stderr).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `"text"` (default) or `"json"` (one object per line); `serve --log-format`.
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, fields at the top level.
    Json,
}

/// `[server]`, for the doors: what one client connection may cost.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Client connections open at once, over every door; further clients wait in
    /// the kernel's accept queue.
    pub max_connections: usize,
    /// Largest request head (request line and headers) accepted, like nginx's
    /// `large_client_header_buffers`.
    pub max_header_size: ByteSize,
    /// A client that takes no response bytes for this long is disconnected.
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// A keep-alive connection with no request for this long is closed, like
    /// nginx's `keepalive_timeout`.
    #[serde(with = "humantime_serde")]
    pub keep_alive_timeout: Duration,
    /// `user:password` required (HTTP Basic) on the registry endpoint, for gateways
    /// reachable beyond one host; proxy clients use `proxy.auth`.
    pub auth: Option<String>,
}

/// `[admin]`, for the gateway's own endpoints (`/-/index/refresh` and the like).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// Environment variable holding the bearer token admin endpoints require; when
    /// unset, they answer loopback clients only. Not a `MOONBIT_REGISTRY_*` name:
    /// those are read as configuration keys.
    pub token_env: Option<String>,
}

/// `[mutable]`, for the mutable cache (`symbols.zip`): RFC 9111 on top of RFC 5861.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MutableCacheSettings {
    /// While the upstream fails, a stored copy last confirmed within this long is
    /// served, whatever its own headers said: availability beats freshness here.
    #[serde(with = "humantime_serde")]
    pub stale_if_error: Duration,
    /// A copy stale by less than this is served at once while one background
    /// revalidation runs (the upstream's own `stale-while-revalidate` also counts).
    #[serde(with = "humantime_serde")]
    pub stale_while_revalidate: Duration,
    /// How long a client waits for the upstream to answer a revalidation when a
    /// stored copy exists (stale-on-slow). Past it, the stored copy is served with
    /// `Warning: 111` and the revalidation finishes in the background, so a silent
    /// upstream costs each client this long, not `timeouts.response`, before its
    /// breaker opens. Without a stored copy, clients wait for the upstream.
    #[serde(with = "humantime_serde")]
    pub revalidate_timeout: Duration,
    /// Largest mutable response stored; larger ones are passed through. Also the
    /// bound on the `symbols.zip` merged from several sources.
    pub mutable_max: ByteSize,
    /// Former place of `storage.not_found_ttl` (still read, with a warning).
    #[serde(with = "humantime_serde", skip_serializing)]
    pub not_found_ttl: Option<Duration>,
}

/// `[breaker]`, for the per-source circuit breakers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSettings {
    /// Consecutive failures (connection error, timeout, 5xx) that mark a source down.
    pub failures: u32,
    /// First back-off while down; doubled on each failed probe, up to `backoff_max`.
    #[serde(with = "humantime_serde")]
    pub backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
}

/// `[proxy]`, for the doors: the forward proxy (`HTTPS_PROXY`) and transparent doors.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySettings {
    /// What to do with `CONNECT` (and absolute-form requests) for hosts no source
    /// answers for: `"auto"` (allow only when listening on loopback), `"allow"`,
    /// `"deny"`, or a list of host patterns (`"github.com"`, `"*.example.com"`,
    /// `"example.com:8443"`).
    pub tunnel: TunnelSetting,
    /// `user:password` required in `Proxy-Authorization: Basic` on proxy requests.
    pub auth: Option<String>,
    /// A CA to mint interception certificates with, instead of the one the gateway
    /// creates in `<data_dir>/ca/`. Both or neither.
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TunnelSetting {
    Mode(TunnelMode),
    Hosts(Vec<String>),
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum TunnelMode {
    Auto,
    Allow,
    Deny,
}

/// `[index]`, for the index mirrors.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IndexSettings {
    /// A mirror older than this is refreshed before a client's clone or pull is answered.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// After a failed refresh, serve the stale mirror without retrying for this long.
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
    /// Bound on one git clone or fetch of the upstream index.
    #[serde(with = "humantime_serde")]
    pub fetch_timeout: Duration,
    /// How long a clone or pull waits for the refresh of an existing mirror; past
    /// it the mirror is served as it is and the refresh finishes in the background.
    /// The same bound as `mutable.revalidate_timeout`, for the same reason: a
    /// `moon update` asks for both, one after the other.
    #[serde(with = "humantime_serde")]
    pub refresh_wait: Duration,
    /// Keep the packs computed for clients, so identical clones share one computation,
    /// and git's answers to clients (in memory, per state of the refs), so a clone of
    /// a tip already cloned runs no git at all.
    pub pack_cache: bool,
    /// Longest pause between two chunks of a client's index request body (a
    /// `git-upload-pack` POST); a stalled body gets a 408 and its connection closed.
    #[serde(with = "humantime_serde")]
    pub request_body_idle: Duration,
    /// Longest a client's index request body may take to arrive in full (408 past it).
    #[serde(with = "humantime_serde")]
    pub request_body_timeout: Duration,
    /// Largest index request body accepted (413 past it); git is given the same bound.
    pub request_body_max: ByteSize,
    /// Index requests (git processes) one client address may have at once, of the
    /// 32 for everyone; its further requests wait for one of its own to end. Behind a
    /// reverse proxy every client has the proxy's address: 32 lifts the cap.
    pub slots_per_client: usize,
    /// Former place of `storage.bad_archive_ttl` (still read, with a warning).
    #[serde(with = "humantime_serde", skip_serializing)]
    pub bad_archive_ttl: Option<Duration>,
    /// Former place of `storage.prefetch_jobs` (still read, with a warning).
    #[serde(skip_serializing)]
    pub prefetch_jobs: Option<usize>,
}

/// One `[[sources]]` table: a registry and, optionally, where its parts live if not
/// at the usual places under the registry base.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub name: Option<String>,
    /// Registry base URL; absent for a `local` source.
    #[serde(default)]
    pub registry: Option<String>,
    pub index: Option<String>,
    pub archive: Option<String>,
    pub symbols: Option<String>,
    /// Hosts whose HTTPS traffic is intercepted for this source in proxy and
    /// transparent mode. Default: `mooncakes.io` and `download.mooncakes.io` for the
    /// public registry, else the host names of this source's URLs.
    pub intercept_hosts: Option<Vec<String>>,
    /// Module patterns (`acme/*`, `team-*/*`) only ever taken from this source,
    /// even when it lacks them: protection against dependency confusion.
    #[serde(default)]
    pub claims: Vec<String>,
    /// Credentials sent to this source only (index, archives, symbols, assets).
    #[serde(default)]
    pub auth: Option<SourceAuth>,
    /// A source the gateway hosts itself: its index and archives live in the data
    /// dir and are written by `publish`.
    #[serde(default)]
    pub local: bool,
}

/// `auth = { bearer_env = "VAR" }` or `auth = { basic_env = "VAR" }` (`VAR` holds
/// `user:password`): the secret is read from the environment, never from a file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct SourceAuth {
    pub bearer_env: Option<String>,
    pub basic_env: Option<String>,
}

impl SourceConfig {
    /// A source fetched from `registry`, every part at its usual place.
    pub fn remote(name: Option<String>, registry: String) -> SourceConfig {
        SourceConfig {
            name,
            registry: Some(registry),
            index: None,
            archive: None,
            symbols: None,
            intercept_hosts: None,
            claims: Vec::new(),
            auth: None,
            local: false,
        }
    }
}

/// `[publish]`, for publishing to a local source over HTTP (`POST /-/publish`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublishSettings {
    /// Environment variable holding the bearer token `POST /-/publish` requires;
    /// unset, the endpoint is off (the `publish` command still works).
    pub token_env: Option<String>,
    /// Longest pause between two chunks of an uploaded zip (408 past it).
    #[serde(with = "humantime_serde")]
    pub body_idle: Duration,
    /// Longest a whole upload may take (408 past it). Its size is bounded by
    /// `storage.archive_max` (413 past it).
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
}

impl Default for PublishSettings {
    fn default() -> Self {
        PublishSettings {
            token_env: None,
            body_idle: Duration::from_secs(30),
            body_timeout: Duration::from_secs(600),
        }
    }
}

/// `[timeouts]`, for the upstream client: how long the gateway waits for a source.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TCP + TLS connect.
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// From sending a request to the upstream's response head. `moon` gives up after 30 s.
    #[serde(with = "humantime_serde")]
    pub response: Duration,
    /// Longest pause between two body chunks from the upstream.
    #[serde(with = "humantime_serde")]
    pub idle_read: Duration,
}

/// `[storage]`, for the archive store: its tiers, its bounds, and what it remembers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// Bytes of hot archives kept in memory.
    pub memory: ByteSize,
    /// Archives larger than this are served from disk only.
    pub memory_item_max: ByteSize,
    /// Largest archive the gateway will fetch and store; a larger upstream body is refused.
    pub archive_max: ByteSize,
    /// Keep the disk store within this size (least recently used evicted first).
    pub max_size: Option<ByteSize>,
    /// How often the store size is checked against `max_size`.
    #[serde(with = "humantime_serde")]
    pub gc_interval: Duration,
    /// How long an archive whose upstream copy failed verification is refused
    /// without a new download (an index refresh also clears it).
    #[serde(with = "humantime_serde")]
    pub bad_archive_ttl: Duration,
    /// How long an upstream 404 for an archive is remembered (forgotten at once when
    /// the index starts listing that version).
    #[serde(with = "humantime_serde")]
    pub not_found_ttl: Duration,
    /// Dependencies prefetched at once.
    pub prefetch_jobs: usize,
    /// `[storage.shared]`: a tier in an S3-compatible bucket shared by replicas;
    /// off unless given.
    pub shared: Option<SharedSettings>,
}

/// `[storage.shared]`, for the shared tier ([`crate::store::shared`]): where the
/// bucket is and how long anything may wait on it. Credentials never come from
/// here but from the standard AWS chain (`AWS_ACCESS_KEY_ID` /
/// `AWS_SECRET_ACCESS_KEY`, web identity, instance metadata).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedSettings {
    /// `s3://BUCKET/PREFIX` (the prefix may be empty).
    pub url: String,
    /// The store's endpoint for non-AWS stores (MinIO, SeaweedFS, Ceph RGW, R2).
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default = "SharedSettings::default_region")]
    pub region: String,
    /// Allow a plain `http://` endpoint (a store on loopback or inside the cluster).
    #[serde(default)]
    pub allow_http: bool,
    /// Longest wait for a connection to the store.
    #[serde(default = "SharedSettings::default_short", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest wait for the store's answer to a lookup (its response head); a
    /// slower store is skipped and counts as a failure for its breaker.
    #[serde(default = "SharedSettings::default_short", with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// Longest pause between two chunks of a body read from the store.
    #[serde(default = "SharedSettings::default_idle", with = "humantime_serde")]
    pub idle_read: Duration,
    /// Longest time for one upload request (a small object, or one part).
    #[serde(default = "SharedSettings::default_upload", with = "humantime_serde")]
    pub upload_timeout: Duration,
    /// How long a replica's claim to fetch an archive from the upstream (its lease)
    /// holds; a lease older than this is taken over (its replica died).
    #[serde(default = "SharedSettings::default_lease", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Longest a request waits for another replica's fetch to land in the store
    /// before fetching from the upstream itself (keep it below `moon`'s 30 s).
    #[serde(default = "SharedSettings::default_wait", with = "humantime_serde")]
    pub wait: Duration,
}

impl SharedSettings {
    fn default_region() -> String {
        "us-east-1".into()
    }
    fn default_short() -> Duration {
        Duration::from_secs(2)
    }
    fn default_idle() -> Duration {
        Duration::from_secs(10)
    }
    fn default_upload() -> Duration {
        Duration::from_secs(60)
    }
    fn default_lease() -> Duration {
        Duration::from_secs(300)
    }
    fn default_wait() -> Duration {
        Duration::from_secs(20)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: default_data_dir(),
            upstream: None,
            upstream_ca: None,
            intercept_hosts: None,
            sources: Vec::new(),
            server: ServerSettings::default(),
            admin: AdminSettings::default(),
            timeouts: Timeouts::default(),
            storage: StoreSettings::default(),
            index: IndexSettings::default(),
            proxy: ProxySettings::default(),
            publish: PublishSettings::default(),
            transparent_listen: None,
            prefetch: true,
            mutable: MutableCacheSettings::default(),
            breaker: BreakerSettings::default(),
            offline: false,
            log: LogSettings::default(),
            jobs: JobsSettings::default(),
        }
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            max_connections: 1024,
            max_header_size: ByteSize::kib(64),
            send_timeout: Duration::from_secs(60),
            keep_alive_timeout: Duration::from_secs(30),
            auth: None,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            response: Duration::from_secs(25),
            idle_read: Duration::from_secs(25),
        }
    }
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            memory: ByteSize::mib(256),
            memory_item_max: ByteSize::mib(4),
            archive_max: ByteSize::gib(4),
            max_size: None,
            gc_interval: Duration::from_secs(60),
            bad_archive_ttl: Duration::from_secs(300),
            not_found_ttl: Duration::from_secs(10),
            prefetch_jobs: 4,
            shared: None,
        }
    }
}

impl Default for IndexSettings {
    fn default() -> Self {
        IndexSettings {
            max_age: Duration::from_secs(30),
            retry_after: Duration::from_secs(10),
            fetch_timeout: Duration::from_secs(300),
            refresh_wait: Duration::from_secs(2),
            pack_cache: true,
            request_body_idle: Duration::from_secs(10),
            request_body_timeout: Duration::from_secs(60),
            // git http-backend's own default (http.maxRequestBuffer).
            request_body_max: ByteSize::mib(10),
            slots_per_client: 8,
            bad_archive_ttl: None,
            prefetch_jobs: None,
        }
    }
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            tunnel: TunnelSetting::Mode(TunnelMode::Auto),
            auth: None,
            ca_cert: None,
            ca_key: None,
        }
    }
}

impl Default for MutableCacheSettings {
    fn default() -> Self {
        MutableCacheSettings {
            stale_if_error: Duration::from_secs(7 * 24 * 3600),
            stale_while_revalidate: Duration::ZERO,
            revalidate_timeout: Duration::from_secs(2),
            mutable_max: ByteSize::mib(256),
            not_found_ttl: None,
        }
    }
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failures: 3,
            backoff: Duration::from_secs(5),
            backoff_max: Duration::from_secs(300),
        }
    }
}

fn default_data_dir() -> PathBuf {
    directories::ProjectDirs::from("", "", "moonbit-registry")
        .map(|d| d.cache_dir().to_path_buf())
        .unwrap_or_else(|| PathBuf::from("moonbit-registry-data"))
}

/// Values given on the command line; `None` means "not given", so lower layers win.
#[derive(Debug, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ca: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transparent_listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offline: Option<bool>,
}

impl Config {
    /// Merge every layer. An explicit `--config` file must exist; the default file is optional.
    pub fn load(config_file: Option<&Path>, overrides: Overrides) -> anyhow::Result<Config> {
        // Defaults come from serde (`#[serde(default)]`), not a serialized layer, so
        // a section's former name (`[health]`, `[freshness]`) can stand for it.
        let mut figment = Figment::new();
        match config_file {
            Some(path) => {
                if !path.is_file() {
                    bail!("config file {} does not exist", path.display());
                }
                figment = figment.merge(Toml::file_exact(path));
            }
            None if Path::new(DEFAULT_CONFIG_FILE).is_file() => {
                figment = figment.merge(Toml::file_exact(DEFAULT_CONFIG_FILE));
            }
            None => {}
        }
        let mut config: Config = figment
            .merge(Env::prefixed("MOONBIT_REGISTRY_").split("__"))
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(|e| anyhow::anyhow!(one_line(&e)))?;
        for moved in config.move_former_keys() {
            tracing::warn!("configuration: {moved}");
        }
        config.sources()?; // validate now, so `serve` fails before it listens
        if config.breaker.failures == 0 {
            bail!("breaker.failures must be at least 1");
        }
        if let Some(var) = &config.admin.token_env {
            if var.starts_with("MOONBIT_REGISTRY_") {
                bail!("admin.token_env `{var}`: MOONBIT_REGISTRY_* variables are configuration keys; name another variable");
            }
        }
        if config.server.max_connections == 0 {
            bail!("server.max_connections must be at least 1");
        }
        if !(8 * 1024..=1024 * 1024).contains(&config.server.max_header_size.as_u64()) {
            bail!("server.max_header_size must be between 8 KiB and 1 MiB");
        }
        Ok(config)
    }

    /// Settings given where earlier versions read them are moved to the section of
    /// their owner; returns a note for each.
    fn move_former_keys(&mut self) -> Vec<String> {
        let mut notes = Vec::new();
        let mut note = |old: &str, new: &str| {
            notes.push(format!("`{old}` is read as `{new}`; please move it there"))
        };
        if let Some(ttl) = self.index.bad_archive_ttl.take() {
            self.storage.bad_archive_ttl = ttl;
            note("index.bad_archive_ttl", "storage.bad_archive_ttl");
        }
        if let Some(jobs) = self.index.prefetch_jobs.take() {
            self.storage.prefetch_jobs = jobs;
            note("index.prefetch_jobs", "storage.prefetch_jobs");
        }
        if let Some(ttl) = self.mutable.not_found_ttl.take() {
            self.storage.not_found_ttl = ttl;
            note("freshness.not_found_ttl", "storage.not_found_ttl");
        }
        notes
    }

    /// The ordered sources with every URL resolved.
    pub fn sources(&self) -> anyhow::Result<Vec<Source>> {
        if self.sources.is_empty() {
            let registry = self
                .upstream
                .clone()
                .unwrap_or_else(|| MOONCAKES.to_string());
            let source = SourceConfig {
                intercept_hosts: self.intercept_hosts.clone(),
                ..SourceConfig::remote(Some("default".into()), registry)
            };
            return Ok(vec![Source::resolve(&source, 0)?]);
        }
        if self.upstream.is_some() || self.intercept_hosts.is_some() {
            bail!("set either `upstream` (--upstream) and `intercept_hosts`, or [[sources]] tables, not both");
        }
        let sources = self
            .sources
            .iter()
            .enumerate()
            .map(|(i, s)| Source::resolve(s, i))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for (i, s) in sources.iter().enumerate() {
            if !s
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                || s.name.is_empty()
            {
                bail!(
                    "source name `{}` must be letters, digits, `-` or `_` (it names a directory)",
                    s.name
                );
            }
            if sources[..i].iter().any(|o| o.name == s.name) {
                bail!("two sources are named `{}`", s.name);
            }
            for earlier in &sources[..i] {
                if let Some((a, b)) = s.claims.overlap(&earlier.claims) {
                    bail!(
                        "sources `{}` and `{}` both claim modules matching `{b}` and `{a}`: a module may be claimed by one source only",
                        earlier.name, s.name
                    );
                }
            }
        }
        if let Some(var) = &self.publish.token_env {
            if var.starts_with("MOONBIT_REGISTRY_") {
                bail!("publish.token_env `{var}`: MOONBIT_REGISTRY_* variables are configuration keys; name another variable");
            }
        }
        Ok(sources)
    }
}

/// figment errors can span several lines; the CLI promises one.
fn one_line(e: &figment::Error) -> String {
    let text = e.to_string().replace('\n', " ");
    format!("invalid configuration: {text}")
}

/// A source with every URL worked out: where its index, archives and symbols live.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub name: String,
    /// Registry base, no trailing slash: `/assets/...` and unknown paths go here.
    pub registry: Url,
    /// The git index, no trailing slash (`<registry>/git/index`).
    pub index: Url,
    /// Archive base, no trailing slash (`<registry>/user`, or the download host).
    pub archive: Url,
    /// Full URL of `symbols.zip`.
    pub symbols: Url,
    /// Lower-case host names intercepted for this source.
    pub intercept_hosts: Vec<String>,
    /// Modules only ever taken from this source.
    pub claims: Claims,
    /// What this source is sent to prove who we are; `None` for a public one.
    pub credential: Option<Credential>,
    /// Hosted by the gateway itself (`local = true`): nothing is fetched from its
    /// URLs, which name no host (`<name>.local.invalid`).
    pub local: bool,
}

/// A source's secret, as an `Authorization` header value. Never printed: `Debug`
/// shows only its kind.
#[derive(Clone, PartialEq)]
pub struct Credential {
    pub header: http::HeaderValue,
    /// Which variable it came from, for error messages.
    pub var: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential(from ${}, redacted)", self.var)
    }
}

impl Credential {
    /// Read the secret `auth` names from the environment.
    fn resolve(source: &str, auth: &SourceAuth) -> anyhow::Result<Credential> {
        use base64::Engine;
        let (var, basic) = match (&auth.bearer_env, &auth.basic_env) {
            (Some(var), None) => (var, false),
            (None, Some(var)) => (var, true),
            _ => bail!("source `{source}`: auth needs exactly one of bearer_env or basic_env"),
        };
        if var.starts_with("MOONBIT_REGISTRY_") {
            bail!("source `{source}`: auth variable `{var}`: MOONBIT_REGISTRY_* variables are configuration keys; name another variable");
        }
        let secret = std::env::var(var)
            .ok()
            .filter(|v| !v.is_empty())
            .with_context(|| format!("source `{source}`: auth names `${var}`, which is not set"))?;
        let value = if basic {
            if !secret.contains(':') {
                bail!("source `{source}`: `${var}` must hold user:password");
            }
            let encoded = base64::engine::general_purpose::STANDARD.encode(secret.as_bytes());
            format!("Basic {encoded}")
        } else {
            format!("Bearer {secret}")
        };
        let mut header = http::HeaderValue::from_str(&value).map_err(|_| {
            anyhow::anyhow!("source `{source}`: `${var}` holds characters not allowed in a header")
        })?;
        header.set_sensitive(true);
        Ok(Credential {
            header,
            var: var.clone(),
        })
    }

    /// The header line git sends (`http.extraHeader`).
    pub fn git_header(&self) -> String {
        format!(
            "Authorization: {}",
            String::from_utf8_lossy(self.header.as_bytes())
        )
    }
}

/// Module patterns a source claims: `user/module` globs, `*` matching within the
/// user part, and anything (nested module paths included) in the module part.
#[derive(Debug, Clone, Default)]
pub struct Claims {
    patterns: Vec<(String, globset::GlobMatcher, globset::GlobMatcher)>,
}

impl PartialEq for Claims {
    fn eq(&self, other: &Claims) -> bool {
        self.patterns
            .iter()
            .map(|p| &p.0)
            .eq(other.patterns.iter().map(|p| &p.0))
    }
}

impl Claims {
    pub fn parse(source: &str, patterns: &[String]) -> anyhow::Result<Claims> {
        let mut out = Vec::new();
        for raw in patterns {
            let (user, module) = raw
                .split_once('/')
                .filter(|(u, m)| !u.is_empty() && !m.is_empty() && !u.contains(['/', '\\']))
                .with_context(|| {
                    format!("source `{source}`: claim `{raw}` is not `user/module` (e.g. `acme/*`)")
                })?;
            let glob = |part: &str| {
                globset::Glob::new(part)
                    .map(|g| g.compile_matcher())
                    .with_context(|| {
                        format!("source `{source}`: claim `{raw}` is not a valid pattern")
                    })
            };
            out.push((raw.clone(), glob(user)?, glob(module)?));
        }
        Ok(Claims { patterns: out })
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The patterns as written.
    pub fn patterns(&self) -> Vec<&str> {
        self.patterns.iter().map(|p| p.0.as_str()).collect()
    }

    /// Whether `name` (`user/module`) is claimed.
    pub fn matches(&self, name: &str) -> bool {
        let Some((user, module)) = name.split_once('/') else {
            return false;
        };
        self.patterns
            .iter()
            .any(|(_, u, m)| u.is_match(user) && m.is_match(module))
    }

    /// Two patterns of which one matches the other read as a name: a sure sign
    /// that both claim some module (`acme/*` and `acme/json`, or the same pattern).
    fn overlap(&self, other: &Claims) -> Option<(String, String)> {
        for (a, ..) in &self.patterns {
            for (b, ..) in &other.patterns {
                if self.matches(b) || other.matches(a) {
                    return Some((a.clone(), b.clone()));
                }
            }
        }
        None
    }
}

impl Source {
    fn resolve(c: &SourceConfig, position: usize) -> anyhow::Result<Source> {
        let name = c
            .name
            .clone()
            .unwrap_or_else(|| format!("source{position}"));
        let claims = Claims::parse(&name, &c.claims)?;
        let credential = c
            .auth
            .as_ref()
            .map(|auth| Credential::resolve(&name, auth))
            .transpose()?;
        // A hosted source's URLs name no host: nothing is ever fetched from them.
        let local_base = format!("http://{}.local.invalid", name.to_ascii_lowercase());
        let base = match (&c.registry, c.local) {
            (Some(registry), false) => registry.trim_end_matches('/'),
            (None, true) => local_base.as_str(),
            (None, false) => bail!("source `{name}`: set `registry` (or `local = true`)"),
            (Some(_), true) => bail!("source `{name}`: a local source has no `registry`"),
        };
        if c.local
            && (c.auth.is_some()
                || c.index.is_some()
                || c.archive.is_some()
                || c.symbols.is_some()
                || c.intercept_hosts.is_some())
        {
            bail!("source `{name}`: a local source takes only `name`, `local` and `claims`");
        }
        let registry = parse_url(&name, "registry", base)?;
        // The same rule `moon` applies: only this exact string means the download host.
        let download = if base == MOONCAKES {
            MOONCAKES_DOWNLOAD.to_string()
        } else {
            base.to_string()
        };
        let pick = |given: &Option<String>, what: &str, default: String| {
            let raw = given.clone().unwrap_or(default);
            parse_url(&name, what, raw.trim_end_matches('/'))
        };
        let index = pick(&c.index, "index", format!("{base}/git/index"))?;
        let archive = pick(&c.archive, "archive", format!("{download}/user"))?;
        let symbols = pick(&c.symbols, "symbols", format!("{download}/symbols.zip"))?;
        let intercept_hosts = match &c.intercept_hosts {
            Some(hosts) => hosts
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .collect(),
            None if base == MOONCAKES => {
                vec!["mooncakes.io".into(), "download.mooncakes.io".into()]
            }
            None if c.local => Vec::new(),
            None => {
                let mut hosts: Vec<String> = [&registry, &index, &archive, &symbols]
                    .iter()
                    .filter_map(|u| match u.host() {
                        Some(url::Host::Domain(d)) => Some(d.to_ascii_lowercase()),
                        _ => None, // an IP address cannot be named in a certificate we mint
                    })
                    .collect();
                hosts.sort();
                hosts.dedup();
                hosts
            }
        };
        for host in &intercept_hosts {
            if host.is_empty()
                || !host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                bail!("source `{name}`: intercept host `{host}` is not a DNS name");
            }
        }
        Ok(Source {
            index,
            archive,
            symbols,
            registry,
            name,
            intercept_hosts,
            claims,
            credential,
            local: c.local,
        })
    }
}

fn parse_url(source: &str, what: &str, raw: &str) -> anyhow::Result<Url> {
    let url = Url::parse(raw).with_context(|| format!("source `{source}`: {what} URL `{raw}`"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        bail!("source `{source}`: {what} URL `{raw}` must be http:// or https:// with a host");
    }
    if url.query().is_some() || url.fragment().is_some() {
        bail!("source `{source}`: {what} URL `{raw}` must not have a query or fragment");
    }
    Ok(url)
}

/// Join a base URL (no trailing slash) and a path that starts with `/`, keeping the
/// path bytes exactly as the client sent them (already percent-encoded).
pub fn join(base: &Url, path_and_query: &str) -> String {
    let base = base.as_str().trim_end_matches('/');
    format!("{base}{path_and_query}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(registry: &str) -> Source {
        let c = Config {
            upstream: Some(registry.into()),
            ..Config::default()
        };
        c.sources().unwrap().remove(0)
    }

    #[test]
    fn mooncakes_uses_the_download_host_like_moon() {
        let s = source("https://mooncakes.io/");
        assert_eq!(s.index.as_str(), "https://mooncakes.io/git/index");
        assert_eq!(s.archive.as_str(), "https://download.mooncakes.io/user");
        assert_eq!(
            s.symbols.as_str(),
            "https://download.mooncakes.io/symbols.zip"
        );
    }

    #[test]
    fn intercepted_hosts_default_to_the_registry_hosts() {
        assert_eq!(
            source("https://mooncakes.io").intercept_hosts,
            ["mooncakes.io", "download.mooncakes.io"]
        );
        assert_eq!(
            source("https://Registry.Example:8443").intercept_hosts,
            ["registry.example"]
        );
        assert!(source("https://127.0.0.1:9000").intercept_hosts.is_empty());
    }

    #[test]
    fn other_registries_keep_everything_under_the_base() {
        let s = source("https://127.0.0.1:9000");
        assert_eq!(s.archive.as_str(), "https://127.0.0.1:9000/user");
        assert_eq!(s.symbols.as_str(), "https://127.0.0.1:9000/symbols.zip");
        assert_eq!(
            join(&s.archive, "/a%2Fb%2F1.0.0.zip"),
            "https://127.0.0.1:9000/user/a%2Fb%2F1.0.0.zip"
        );
    }

    #[test]
    fn the_readme_example_is_a_valid_config() {
        let readme = include_str!("../README.md");
        let start = readme
            .find("## Configuration")
            .expect("a Configuration section");
        let block = readme[start..]
            .split("```toml\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("a toml block");
        let config: Config = Figment::new()
            .merge(Toml::string(block))
            .extract()
            .unwrap_or_else(|e| panic!("README example: {e}"));
        assert_eq!(config.mutable.revalidate_timeout, Duration::from_secs(2));
        assert_eq!(config.index.refresh_wait, Duration::from_secs(2));
        let sources = config.sources().unwrap();
        assert_eq!(sources[0].name, "internal");
        assert_eq!(
            sources[1].intercept_hosts,
            ["mooncakes.io", "download.mooncakes.io"]
        );
    }

    #[test]
    fn bad_urls_are_refused_with_the_source_name() {
        let c = Config {
            upstream: Some("ftp://x".into()),
            ..Config::default()
        };
        let e = c.sources().unwrap_err().to_string();
        assert!(e.contains("source `default`"), "{e}");
    }

    #[test]
    fn sources_and_upstream_together_are_refused() {
        let c = Config {
            upstream: Some("https://a".into()),
            sources: vec![SourceConfig::remote(None, "https://b".into())],
            ..Config::default()
        };
        assert!(c.sources().is_err());
    }

    #[test]
    fn former_section_names_and_keys_are_still_read() {
        let toml = "[health]\nfailures = 7\n[freshness]\nstale_if_error = \"1h\"\nrevalidate_timeout = \"3s\"\nnot_found_ttl = \"1h\"\n[index]\nbad_archive_ttl = \"2m\"\nprefetch_jobs = 9\n";
        let mut config: Config = Figment::new().merge(Toml::string(toml)).extract().unwrap();
        let notes = config.move_former_keys();
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert_eq!(config.breaker.failures, 7);
        assert_eq!(config.mutable.stale_if_error, Duration::from_secs(3600));
        assert_eq!(config.mutable.revalidate_timeout, Duration::from_secs(3));
        assert_eq!(config.storage.not_found_ttl, Duration::from_secs(3600));
        assert_eq!(config.storage.bad_archive_ttl, Duration::from_secs(120));
        assert_eq!(config.storage.prefetch_jobs, 9);
        // Everything else keeps its default.
        assert_eq!(config.breaker.backoff, BreakerSettings::default().backoff);
        assert_eq!(config.storage.memory, StoreSettings::default().memory);
    }

    #[test]
    fn the_shared_tier_is_off_unless_configured_and_its_bounds_default_short() {
        let config: Config = Figment::new().merge(Toml::string("")).extract().unwrap();
        assert!(config.storage.shared.is_none());
        let toml = "[storage.shared]\nurl = \"s3://bucket/prefix\"\nendpoint = \"http://127.0.0.1:9000\"\nallow_http = true\nwait = \"5s\"\n";
        let config: Config = Figment::new().merge(Toml::string(toml)).extract().unwrap();
        let shared = config.storage.shared.unwrap();
        assert_eq!(shared.url, "s3://bucket/prefix");
        assert!(shared.allow_http);
        assert_eq!(shared.wait, Duration::from_secs(5));
        assert_eq!(shared.first_byte_timeout, Duration::from_secs(2));
        assert_eq!(shared.region, "us-east-1");
        // No key the section does not know, e.g. a secret pasted in by mistake.
        let toml = "[storage.shared]\nurl = \"s3://b/p\"\nsecret_access_key = \"x\"\n";
        assert!(Figment::new()
            .merge(Toml::string(toml))
            .extract::<Config>()
            .is_err());
    }

    #[test]
    fn each_owner_reads_its_own_section() {
        let toml = "[breaker]\nfailures = 2\n[mutable]\nmutable_max = \"1 KiB\"\nrevalidate_timeout = \"500ms\"\n[storage]\nnot_found_ttl = \"5s\"\n";
        let mut config: Config = Figment::new().merge(Toml::string(toml)).extract().unwrap();
        assert!(config.move_former_keys().is_empty());
        assert_eq!(config.breaker.failures, 2);
        assert_eq!(config.mutable.mutable_max, ByteSize::kib(1));
        assert_eq!(
            config.mutable.revalidate_timeout,
            Duration::from_millis(500)
        );
        assert_eq!(config.storage.not_found_ttl, Duration::from_secs(5));
        let unknown = Figment::new()
            .merge(Toml::string("[storage]\nnot_a_key = 1\n"))
            .extract::<Config>();
        assert!(unknown.is_err());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any TOML text (often not even TOML) is a config or one clear error.
            #[test]
            fn any_config_text_is_a_config_or_an_error(
                text in "(\\[?(storage|index|server|proxy|breaker|health|mutable|freshness|timeouts)\\]?|[a-z_]{1,16} = (\"[^\"\\n]{0,20}\"|[0-9]{1,12}|true|\\[\\])|\\PC{0,10}|\\n){0,12}"
            ) {
                if let Ok(mut config) = Figment::new().merge(Toml::string(&text)).extract::<Config>() {
                    config.move_former_keys();
                    let _ = config.sources();
                }
            }
        }
    }
}

#[cfg(test)]
mod source_tests {
    use super::*;

    fn sources(toml: &str) -> anyhow::Result<Vec<Source>> {
        let config: Config = Figment::new()
            .merge(Toml::string(toml))
            .extract()
            .map_err(|e| anyhow::anyhow!(one_line(&e)))?;
        config.sources()
    }

    #[test]
    fn claims_match_user_and_nested_modules() {
        let c = Claims::parse("s", &["acme/*".into(), "team-*/*".into()]).unwrap();
        assert!(c.matches("acme/json"));
        assert!(c.matches("acme/lex/runtime"));
        assert!(c.matches("team-a/x"));
        assert!(!c.matches("acmex/json"));
        assert!(!c.matches("team/x"));
        assert!(Claims::parse("s", &["acme".into()]).is_err());
    }

    #[test]
    fn a_module_claimed_by_two_sources_is_an_error() {
        let err = sources(
            r#"
            [[sources]]
            name = "a"
            registry = "https://a.example"
            claims = ["acme/*"]
            [[sources]]
            name = "b"
            registry = "https://b.example"
            claims = ["acme/json"]
            "#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("both claim"), "{err}");
    }

    #[test]
    fn local_sources_need_no_registry_and_name_no_host() {
        let s = sources(
            r#"
            [[sources]]
            name = "local"
            local = true
            claims = ["acme/*"]
            [[sources]]
            name = "public"
            registry = "https://mooncakes.io"
            "#,
        )
        .unwrap();
        assert!(s[0].local);
        assert!(s[0].intercept_hosts.is_empty());
        assert!(s[0].archive.host_str().unwrap().ends_with(".invalid"));
        assert!(sources("[[sources]]\nname = \"x\"\n").is_err());
    }

    #[test]
    fn credentials_come_from_the_environment_and_are_never_printed() {
        std::env::set_var("SOURCE_TESTS_TOKEN", "s3cret");
        let s = sources(
            r#"
            [[sources]]
            name = "internal"
            registry = "https://internal.example"
            auth = { bearer_env = "SOURCE_TESTS_TOKEN" }
            "#,
        )
        .unwrap();
        let credential = s[0].credential.as_ref().unwrap();
        assert_eq!(credential.header, "Bearer s3cret");
        assert!(!format!("{:?}", s[0]).contains("s3cret"));
        let missing = sources(
            r#"
            [[sources]]
            name = "internal"
            registry = "https://internal.example"
            auth = { basic_env = "SOURCE_TESTS_UNSET_VARIABLE" }
            "#,
        )
        .unwrap_err();
        assert!(
            missing.to_string().contains("SOURCE_TESTS_UNSET_VARIABLE"),
            "{missing}"
        );
    }
}
