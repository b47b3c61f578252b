//! Prometheus metrics (`GET /-/metrics`), with the `prometheus-client` crate.
//!
//! Every label set is small and fixed (routes, cache results, tunnel decisions,
//! door names, and the source names the config declares), and every series a
//! request touches is resolved once when [`Metrics`] is built: recording is an
//! atomic increment on the hot path, never a lookup, a lock or an allocation.

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Which class of request a response answered (the router's decision).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteName {
    Archive,
    Asset,
    Index,
    Symbols,
    Passthrough,
    /// The gateway's own endpoints (`/-/...`).
    Admin,
    /// Forward-proxy traffic not routed as a registry request (`CONNECT`, plain
    /// `http://` forwarding) and requests refused at the door.
    Proxy,
    /// Refused by the router (bad path, pushing to the index, bad `/at/` time).
    Refused,
}

impl RouteName {
    pub const ALL: [RouteName; 8] = [
        RouteName::Archive,
        RouteName::Asset,
        RouteName::Index,
        RouteName::Symbols,
        RouteName::Passthrough,
        RouteName::Admin,
        RouteName::Proxy,
        RouteName::Refused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RouteName::Archive => "archive",
            RouteName::Asset => "asset",
            RouteName::Index => "index",
            RouteName::Symbols => "symbols",
            RouteName::Passthrough => "passthrough",
            RouteName::Admin => "admin",
            RouteName::Proxy => "proxy",
            RouteName::Refused => "refused",
        }
    }
}

/// What the cache did for a response, from its `x-cache` header and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheResult {
    Hit,
    Miss,
    Mirror,
    Stale,
    Revalidated,
    Bypass,
    /// A 5xx: the gateway or its upstream failed.
    Error,
    /// Nothing cacheable (admin answers, refusals, tunnels).
    None,
}

impl CacheResult {
    pub const ALL: [CacheResult; 8] = [
        CacheResult::Hit,
        CacheResult::Miss,
        CacheResult::Mirror,
        CacheResult::Stale,
        CacheResult::Revalidated,
        CacheResult::Bypass,
        CacheResult::Error,
        CacheResult::None,
    ];

    /// Classify a response by its status and `x-cache` value.
    pub fn of(status: http::StatusCode, x_cache: Option<&[u8]>) -> CacheResult {
        if status.is_server_error() {
            return CacheResult::Error;
        }
        match x_cache {
            Some(b"hit") => CacheResult::Hit,
            Some(b"miss") => CacheResult::Miss,
            Some(b"mirror") => CacheResult::Mirror,
            Some(b"stale") => CacheResult::Stale,
            Some(b"revalidated") => CacheResult::Revalidated,
            Some(b"bypass") => CacheResult::Bypass,
            _ => CacheResult::None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::Mirror => "mirror",
            CacheResult::Stale => "stale",
            CacheResult::Revalidated => "revalidated",
            CacheResult::Bypass => "bypass",
            CacheResult::Error => "error",
            CacheResult::None => "none",
        }
    }
}

/// Where the bytes of a response came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    /// The memory tier (the store tags its responses from memory).
    Memory,
    /// This machine's disk: the disk tier, the index mirror, stored `symbols.zip`.
    Disk,
    /// Streamed from an upstream now (misses, pass-through, revalidations).
    Upstream,
    /// Streamed from the shared tier (the bucket replicas share) now.
    Shared,
}

impl Tier {
    /// In the order of their `served_bytes_total` counters.
    pub const ALL: [Tier; 4] = [Tier::Memory, Tier::Disk, Tier::Upstream, Tier::Shared];

    /// Its label value in `served_bytes_total` and the access log.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Disk => "disk",
            Tier::Upstream => "upstream",
            Tier::Shared => "shared",
        }
    }

    /// The tier of a response the store did not tag, by its cache result; `None`
    /// for answers the gateway writes itself (admin, refusals, errors).
    pub fn of(cache: CacheResult) -> Option<Tier> {
        match cache {
            CacheResult::Hit | CacheResult::Mirror | CacheResult::Stale => Some(Tier::Disk),
            CacheResult::Miss | CacheResult::Bypass | CacheResult::Revalidated => {
                Some(Tier::Upstream)
            }
            CacheResult::Error | CacheResult::None => None,
        }
    }
}

/// How a tunnel request was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TunnelDecision {
    Allowed,
    Forbidden,
    Unreachable,
}

/// The door a connection came in by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DoorName {
    /// The main listener: registry endpoint and forward proxy.
    Main,
    /// The transparent TLS listener.
    Transparent,
}

impl DoorName {
    pub fn as_str(self) -> &'static str {
        match self {
            DoorName::Main => "main",
            DoorName::Transparent => "transparent",
        }
    }
}

/// A label value that is one of a fixed set of words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Word(&'static str);

impl EncodeLabelValue for Word {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        encoder.write_str(self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteCache {
    route: Word,
    cache: Word,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteOnly {
    route: Word,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SourceOutcome {
    source: String,
    outcome: Word,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SourceOnly {
    source: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TierOnly {
    tier: Word,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DecisionOnly {
    decision: Word,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DoorOnly {
    door: Word,
}

/// Counters of one source's upstream exchanges, as its circuit breaker judged them,
/// and of the archive and asset bodies fetched from it.
#[derive(Debug, Clone)]
pub struct SourceOutcomes {
    pub ok: Counter,
    pub error: Counter,
    pub bytes: Counter,
    pub fetch_seconds: Histogram,
}

impl Default for SourceOutcomes {
    fn default() -> Self {
        SourceOutcomes {
            ok: Counter::default(),
            error: Counter::default(),
            bytes: Counter::default(),
            fetch_seconds: fetch_histogram(),
        }
    }
}

/// Buckets for a whole archive fetch: 1 ms to about a minute.
fn fetch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The store's own counters (a store built for a one-shot command keeps its
/// unregistered defaults).
#[derive(Debug, Clone, Default)]
pub struct StoreCounters {
    /// Clients that joined an upstream fetch already in progress.
    pub flight_waiters: Counter,
    /// Entries removed from the disk tier to keep it within `storage.max_size`.
    pub evictions: Counter,
}

/// Values read from the services when metrics are scraped (they are state, not events).
#[derive(Debug, Default)]
pub struct Scraped {
    pub flights_in_progress: i64,
    pub memory_bytes: i64,
    /// At the store's last size check.
    pub disk_bytes: i64,
    pub git_slots_in_use: i64,
    /// Per source, in config order: up (not marked down), index mirror age.
    pub sources: Vec<(bool, Option<u64>)>,
}

/// Every metric the gateway exposes, with its series resolved up front.
pub struct Metrics {
    registry: Registry,
    /// `[route][cache]`, in the order of [`RouteName::ALL`] and [`CacheResult::ALL`].
    requests: Vec<Counter>,
    durations: Vec<Histogram>,
    tunnels: [Counter; 3],
    served: [Counter; 4],
    connections: [Gauge; 2],
    parked: Gauge,
    flights: Gauge,
    git_slots: Gauge,
    memory_bytes: Gauge,
    disk_bytes: Gauge,
    source_up: Vec<Gauge>,
    index_age: Vec<Gauge>,
    upstream: Vec<SourceOutcomes>,
    store: StoreCounters,
    started: std::time::Instant,
    /// The last hour and the most asked-for modules, for the status page.
    recent: super::recent::Recent,
    /// The sources' names, in config order (for the access log).
    source_names: Vec<String>,
}

impl Metrics {
    /// Metrics for a gateway with these sources (names from the config: bounded).
    pub fn new<'a>(sources: impl IntoIterator<Item = &'a str>) -> Metrics {
        let sources: Vec<&str> = sources.into_iter().collect();
        let mut registry = Registry::with_prefix("moonbit_registry");

        let requests_family = Family::<RouteCache, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by route and cache result (counted when the response ends)",
            requests_family.clone(),
        );
        let mut requests = Vec::new();
        for route in RouteName::ALL {
            for cache in CacheResult::ALL {
                requests.push(requests_family.get_or_create_owned(&RouteCache {
                    route: Word(route.as_str()),
                    cache: Word(cache.as_str()),
                }));
            }
        }

        let durations_family = Family::<RouteOnly, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "request_duration_seconds",
            "Time from the request head to the end of the response, by route",
            durations_family.clone(),
        );
        let durations = RouteName::ALL
            .iter()
            .map(|r| {
                durations_family.get_or_create_owned(&RouteOnly {
                    route: Word(r.as_str()),
                })
            })
            .collect();

        let served_family = Family::<TierOnly, Counter>::default();
        registry.register(
            "served_bytes",
            "Response body bytes sent to clients, by where they came from (memory, disk, upstream, shared)",
            served_family.clone(),
        );
        let served = Tier::ALL.map(|t| {
            served_family.get_or_create_owned(&TierOnly {
                tier: Word(t.as_str()),
            })
        });

        let tunnels_family = Family::<DecisionOnly, Counter>::default();
        registry.register(
            "tunnels",
            "Tunnels asked for (CONNECT, plain HTTP forwarding, transparent), by decision",
            tunnels_family.clone(),
        );
        let tunnels = ["allowed", "forbidden", "unreachable"]
            .map(|d| tunnels_family.get_or_create_owned(&DecisionOnly { decision: Word(d) }));

        let connections_family = Family::<DoorOnly, Gauge>::default();
        registry.register(
            "connections",
            "Client connections open, by door",
            connections_family.clone(),
        );
        let connections = [DoorName::Main, DoorName::Transparent].map(|d| {
            connections_family.get_or_create_owned(&DoorOnly {
                door: Word(d.as_str()),
            })
        });

        let parked = Gauge::default();
        registry.register(
            "connections_parked",
            "Connections of the main listener waiting for a request, held without HTTP buffers",
            parked.clone(),
        );

        let flights = Gauge::default();
        registry.register(
            "flights_in_progress",
            "Upstream archive fetches in progress (one per key, however many clients wait)",
            flights.clone(),
        );
        let git_slots = Gauge::default();
        registry.register(
            "git_slots_in_use",
            "Git processes serving clients' index clones and fetches (of 32)",
            git_slots.clone(),
        );
        let store_family = Family::<TierOnly, Gauge>::default();
        registry.register(
            "store_bytes",
            "Bytes held by a store tier",
            store_family.clone(),
        );
        let memory_bytes = store_family.get_or_create_owned(&TierOnly {
            tier: Word("memory"),
        });
        let disk_bytes = store_family.get_or_create_owned(&TierOnly { tier: Word("disk") });

        let up_family = Family::<SourceOnly, Gauge>::default();
        registry.register(
            "source_up",
            "1 while the source's circuit breaker lets requests through, 0 while it is down",
            up_family.clone(),
        );
        let age_family = Family::<SourceOnly, Gauge>::default();
        registry.register(
            "index_age_seconds",
            "Seconds since the source's index mirror was last refreshed",
            age_family.clone(),
        );
        let outcome_family = Family::<SourceOutcome, Counter>::default();
        registry.register(
            "upstream_requests",
            "Upstream exchanges (archives, symbols, index fetches, probes), by source and outcome (error: transport error, timeout or 5xx)",
            outcome_family.clone(),
        );
        let bytes_family = Family::<SourceOnly, Counter>::default();
        registry.register(
            "upstream_bytes",
            "Archive and asset bytes received from the source",
            bytes_family.clone(),
        );
        let fetch_family = Family::<SourceOnly, Histogram>::new_with_constructor(
            fetch_histogram as fn() -> Histogram,
        );
        registry.register(
            "upstream_fetch_seconds",
            "Time to fetch an archive or asset from the source, from the request to its last byte",
            fetch_family.clone(),
        );
        let label = |s: &str| SourceOnly {
            source: s.to_string(),
        };
        let source_up = sources
            .iter()
            .map(|s| up_family.get_or_create_owned(&label(s)))
            .collect();
        let index_age = sources
            .iter()
            .map(|s| age_family.get_or_create_owned(&label(s)))
            .collect();
        let upstream = sources
            .iter()
            .map(|s| {
                let outcome = |o| SourceOutcome {
                    source: s.to_string(),
                    outcome: Word(o),
                };
                SourceOutcomes {
                    ok: outcome_family.get_or_create_owned(&outcome("ok")),
                    error: outcome_family.get_or_create_owned(&outcome("error")),
                    bytes: bytes_family.get_or_create_owned(&label(s)),
                    fetch_seconds: fetch_family.get_or_create_owned(&label(s)),
                }
            })
            .collect();

        let store = StoreCounters::default();
        registry.register(
            "flight_waiters",
            "Clients that joined an upstream archive fetch already in progress instead of starting one",
            store.flight_waiters.clone(),
        );
        registry.register(
            "evictions",
            "Entries evicted from the disk tier to keep it within storage.max_size",
            store.evictions.clone(),
        );

        Metrics {
            source_names: sources.iter().map(|s| s.to_string()).collect(),
            started: std::time::Instant::now(),
            recent: super::recent::Recent::default(),
            store,
            registry,
            requests,
            durations,
            tunnels,
            served,
            connections,
            parked,
            flights,
            git_slots,
            disk_bytes,
            memory_bytes,
            source_up,
            index_age,
            upstream,
        }
    }

    /// One response ended: count it and its duration.
    pub fn request(&self, route: RouteName, cache: CacheResult, seconds: f64) {
        let (r, c) = (route as usize, cache as usize);
        self.requests[r * CacheResult::ALL.len() + c].inc();
        self.durations[r].observe(seconds);
        self.recent.request(match (route, cache) {
            (RouteName::Archive, CacheResult::Hit) => super::recent::Ended::ArchiveHit,
            (RouteName::Archive, CacheResult::Miss) => super::recent::Ended::ArchiveMiss,
            _ => super::recent::Ended::Other,
        });
    }

    /// The last hour's counts and the most asked-for modules.
    pub fn recent(&self) -> &super::recent::Recent {
        &self.recent
    }

    /// Body bytes one response sent, from `tier`.
    pub fn served(&self, tier: Tier, bytes: u64) {
        self.served[tier as usize].inc_by(bytes);
    }

    pub fn tunnel(&self, decision: TunnelDecision) {
        self.tunnels[decision as usize].inc();
    }

    /// A connection opened on `door`; the gauge goes down when the guard is dropped.
    pub fn connection(&self, door: DoorName) -> ConnectionGuard {
        let gauge = self.connections[door as usize].clone();
        gauge.inc();
        ConnectionGuard(gauge)
    }

    /// An idle keep-alive connection parked until its guard drops.
    pub fn parked(&self) -> ConnectionGuard {
        self.parked.inc();
        ConnectionGuard(self.parked.clone())
    }

    /// Requests answered, and archive hits and misses, since start.
    pub fn totals(&self) -> (u64, u64, u64) {
        let cache = CacheResult::ALL.len();
        let requests = self.requests.iter().map(Counter::get).sum();
        let archive = RouteName::Archive as usize * cache;
        let hits = self.requests[archive + CacheResult::Hit as usize].get();
        let misses = self.requests[archive + CacheResult::Miss as usize].get();
        (requests, hits, misses)
    }

    /// The name of the source at `position`, or `-`.
    pub fn source_name(&self, position: usize) -> &str {
        self.source_names.get(position).map_or("-", String::as_str)
    }

    /// Seconds since the metrics (and so the gateway) started.
    pub fn uptime_seconds(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// The counters the store increments.
    pub fn store_counters(&self) -> StoreCounters {
        self.store.clone()
    }

    /// The counters of the source at `position` in the config, if there is one.
    pub fn upstream(&self, position: usize) -> Option<SourceOutcomes> {
        self.upstream.get(position).cloned()
    }

    /// The text exposition, after setting the gauges that are read at scrape time.
    pub fn encode(&self, scraped: Scraped) -> String {
        self.flights.set(scraped.flights_in_progress);
        self.git_slots.set(scraped.git_slots_in_use);
        self.disk_bytes.set(scraped.disk_bytes);
        self.memory_bytes.set(scraped.memory_bytes);
        for (i, (up, age)) in scraped.sources.into_iter().enumerate() {
            if let Some(g) = self.source_up.get(i) {
                g.set(i64::from(up));
            }
            if let (Some(g), Some(age)) = (self.index_age.get(i), age) {
                g.set(i64::try_from(age).unwrap_or(i64::MAX));
            }
        }
        let mut text = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Holds one connection's place in the `connections` (or `connections_parked`) gauge.
pub struct ConnectionGuard(Gauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
