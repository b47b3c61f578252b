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

/// Everything `serve` needs, after all layers are merged.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address of the listener for registry and proxy traffic.
    pub listen: SocketAddr,
    /// Where the store, spool files and (later) the index mirror live.
    pub data_dir: PathBuf,
    /// Registry base of the default source; only used when `sources` is empty.
    pub upstream: Option<String>,
    /// Extra CA certificate (PEM) trusted for upstream TLS, on top of the system roots.
    pub upstream_ca: Option<PathBuf>,
    /// Ordered sources: archives are looked up in this order (internal first, then public).
    pub sources: Vec<SourceConfig>,
    pub timeouts: Timeouts,
    pub storage: Storage,
    pub index: IndexSettings,
    /// Fetch an archive's dependencies (from the index) in the background when it is requested.
    pub prefetch: bool,
    /// Never contact an upstream: index from the mirror, archives from the store.
    pub offline: bool,
}

/// The index mirror and what is read from it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// How long an archive whose upstream copy failed verification is refused
    /// without a new download (an index refresh also clears it).
    #[serde(with = "humantime_serde")]
    pub bad_archive_ttl: Duration,
    /// Dependencies prefetched at once.
    pub prefetch_jobs: usize,
}

/// One `[[sources]]` table: a registry and, optionally, where its parts live if not
/// at the usual places under the registry base.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub name: Option<String>,
    pub registry: String,
    pub index: Option<String>,
    pub archive: Option<String>,
    pub symbols: Option<String>,
}

/// Bounds on how long the gateway waits for an upstream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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

/// Limits of the archive store.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Storage {
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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: default_data_dir(),
            upstream: None,
            upstream_ca: None,
            sources: Vec::new(),
            timeouts: Timeouts {
                connect: Duration::from_secs(10),
                response: Duration::from_secs(25),
                idle_read: Duration::from_secs(25),
            },
            storage: Storage {
                memory: ByteSize::mib(256),
                memory_item_max: ByteSize::mib(4),
                archive_max: ByteSize::gib(4),
                max_size: None,
                gc_interval: Duration::from_secs(60),
            },
            index: IndexSettings {
                max_age: Duration::from_secs(30),
                retry_after: Duration::from_secs(10),
                fetch_timeout: Duration::from_secs(300),
                bad_archive_ttl: Duration::from_secs(300),
                prefetch_jobs: 4,
            },
            prefetch: true,
            offline: false,
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
    pub offline: Option<bool>,
}

impl Config {
    /// Merge every layer. An explicit `--config` file must exist; the default file is optional.
    pub fn load(config_file: Option<&Path>, overrides: Overrides) -> anyhow::Result<Config> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
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
        let config: Config = figment
            .merge(Env::prefixed("MOONBIT_REGISTRY_").split("__"))
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(|e| anyhow::anyhow!(one_line(&e)))?;
        config.sources()?; // validate now, so `serve` fails before it listens
        Ok(config)
    }

    /// The ordered sources with every URL resolved.
    pub fn sources(&self) -> anyhow::Result<Vec<Source>> {
        if self.sources.is_empty() {
            let registry = self
                .upstream
                .clone()
                .unwrap_or_else(|| MOONCAKES.to_string());
            let source = SourceConfig {
                name: Some("default".into()),
                registry,
                index: None,
                archive: None,
                symbols: None,
            };
            return Ok(vec![Source::resolve(&source, 0)?]);
        }
        if self.upstream.is_some() {
            bail!("set either `upstream` (--upstream) or [[sources]] tables, not both");
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
}

impl Source {
    fn resolve(c: &SourceConfig, position: usize) -> anyhow::Result<Source> {
        let name = c
            .name
            .clone()
            .unwrap_or_else(|| format!("source{position}"));
        let base = c.registry.trim_end_matches('/');
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
        Ok(Source {
            index: pick(&c.index, "index", format!("{base}/git/index"))?,
            archive: pick(&c.archive, "archive", format!("{download}/user"))?,
            symbols: pick(&c.symbols, "symbols", format!("{download}/symbols.zip"))?,
            registry,
            name,
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
            sources: vec![SourceConfig {
                name: None,
                registry: "https://b".into(),
                index: None,
                archive: None,
                symbols: None,
            }],
            ..Config::default()
        };
        assert!(c.sources().is_err());
    }
}
