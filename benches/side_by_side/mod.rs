//! The side-by-side benchmark: the gateway against the peers a user would otherwise
//! deploy (nginx static, nginx `proxy_cache`, the upstream itself, `git http-backend`),
//! on the same files, on the same machine, in one run, with interleaved runs and a
//! table of medians and ratios at the end.
//!
//! Environment: `BENCH_ROUNDS` (runs per measurement, default 5), `BENCH_SECONDS`
//! (length of one wrk run, default 3), `BENCH_HUGE=0` skips the 1 GiB archive,
//! `BENCH_HOT=64` runs only the hot-hit sizes whose label holds it (e.g. to profile one).
//! Arguments pick scenarios: `hot cold stampede index memory moon merge shared` (default: all).

mod client;
mod cold_miss;
mod fixtures;
mod hot_hits;
mod index_clone;
mod instances;
mod load;
mod memory;
mod merged_index;
mod moon_add;
mod peers;
mod report;
mod shared_tier;
mod stampede;

use std::process::Output;
use std::sync::Arc;
use std::time::Instant;

use crate::upstream::clients;
use crate::upstream::{Registry, Upstream};
use fixtures::Fixtures;
use report::Row;

const SCENARIOS: &[&str] = &[
    "hot", "cold", "stampede", "index", "memory", "moon", "merge", "shared",
];

/// What every scenario works with, and what they report.
pub struct Bench {
    pub rounds: usize,
    pub seconds: u32,
    pub upstream: Upstream,
    pub fixtures: Fixtures,
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
}

impl Bench {
    /// `curl -q -sS --noproxy '*' --cacert <test CA> ARGS`.
    pub fn curl(&self, args: &[&str]) -> Output {
        clients::run(clients::curl(&self.upstream.ca_pem).args(args))
    }
}

fn env_number(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
        Err(_) => default,
    }
}

pub async fn run() {
    let picked: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    for p in &picked {
        assert!(
            SCENARIOS.contains(&p.as_str()),
            "unknown scenario {p}; pick from {SCENARIOS:?}"
        );
    }
    let wanted = |s: &str| picked.is_empty() || picked.iter().any(|p| p == s);
    peers::ensure_installed();

    let started = Instant::now();
    let rounds = env_number("BENCH_ROUNDS", 5).max(1);
    let seconds = env_number("BENCH_SECONDS", 3).max(1) as u32;
    let huge = env_number("BENCH_HUGE", 1) != 0 && wanted("memory");
    let registry = Arc::new(Registry::new());
    eprintln!("bench: publishing the test registry ({rounds} rounds)...");
    let fixtures = fixtures::publish(&registry, rounds, huge);
    let upstream = Upstream::start(registry.clone()).await;
    eprintln!(
        "bench: index of {} files, {} lines, {:.1} MiB; upstream on {} ({:.0} s)",
        fixtures.index_files,
        fixtures.index_lines,
        fixtures.index_bytes as f64 / (1 << 20) as f64,
        upstream.addr,
        started.elapsed().as_secs_f64()
    );
    let mut bench = Bench {
        rounds,
        seconds,
        upstream,
        fixtures,
        rows: Vec::new(),
        notes: Vec::new(),
    };
    for scenario in SCENARIOS.iter().filter(|s| wanted(s)) {
        let t = Instant::now();
        eprintln!("bench: {scenario}...");
        match *scenario {
            "hot" => hot_hits::run(&mut bench).await,
            "cold" => cold_miss::run(&mut bench).await,
            "stampede" => stampede::run(&mut bench).await,
            "index" => index_clone::run(&mut bench).await,
            "memory" => memory::run(&mut bench).await,
            "moon" => moon_add::run(&mut bench).await,
            "merge" => merged_index::run(&mut bench).await,
            "shared" => shared_tier::run(&mut bench).await,
            _ => unreachable!("checked above"),
        }
        eprintln!(
            "bench: {scenario} done in {:.0} s",
            t.elapsed().as_secs_f64()
        );
    }
    bench.notes.push(format!(
        "{} cores, {rounds} interleaved runs per measurement, wrk runs of {seconds} s; \
         gateway = release build with default settings except index.max_age = 10m; \
         the direct upstream and git http-backend are the test registry over TLS; \
         total {:.0} s",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        started.elapsed().as_secs_f64()
    ));
    println!("{}", report::render(&bench.rows, &bench.notes));
}
