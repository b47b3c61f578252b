//! The benchmark's registry: a realistic index (thousands of module files, a few MiB
//! of JSON Lines shaped like mooncakes.io's), the archives each scenario fetches (a
//! fresh one per run where a run must be cold), and a module with a dozen transitive
//! dependencies for `moon add`.

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::upstream::clients::sha256_hex;
use crate::upstream::{Published, Registry};

/// Users and modules per user in the generated index.
const INDEX_USERS: usize = 300;
const MODULES_PER_USER: usize = 10;

/// Archive size for cold misses and stampedes.
pub const COLD_SIZE: usize = 1 << 20;
/// The big archive streamed cold for the memory scenario.
pub const HUGE_SIZE: usize = 1 << 30;
/// Concurrent clients in the stampede.
pub const STAMPEDE_CLIENTS: usize = 200;

/// Everything published, by the scenario that uses it.
pub struct Fixtures {
    /// (label, archive) served hot: 4 KiB, 64 KiB, 1 MiB.
    pub hot: Vec<(&'static str, Published)>,
    /// One per run and per side: each run fetches an archive nobody fetched before.
    pub cold: Vec<Published>,
    pub cold_slow: Vec<Published>,
    pub stampede: Vec<Published>,
    pub huge: Option<Published>,
    /// `bench/app`, whose closure is [`Fixtures::app_deps`] modules.
    pub app: Published,
    pub app_deps: usize,
    /// Size of the generated index: files, lines, bytes.
    pub index_files: usize,
    pub index_lines: usize,
    pub index_bytes: usize,
}

impl Fixtures {
    /// Every archive nginx may serve as a static file: (`user/module/version`, file).
    pub fn static_files(&self) -> Vec<(String, PathBuf)> {
        self.hot
            .iter()
            .map(|(_, p)| {
                (
                    p.key.clone(),
                    p.path.clone().expect("sized archive on disk"),
                )
            })
            .collect()
    }
}

/// Publish everything; `runs` cold archives per side and scenario.
pub fn publish(registry: &Registry, runs: usize, huge: bool) -> Fixtures {
    let (index_files, index_lines, index_bytes) = realistic_index(registry);
    let hot = vec![
        (
            "4 KiB",
            registry.publish_sized("bench/hot4k", "1.0.0", 4 << 10),
        ),
        (
            "64 KiB",
            registry.publish_sized("bench/hot64k", "1.0.0", 64 << 10),
        ),
        (
            "1 MiB",
            registry.publish_sized("bench/hot1m", "1.0.0", 1 << 20),
        ),
    ];
    let many = |name: &str, count: usize| -> Vec<Published> {
        (0..count)
            .map(|i| registry.publish_sized(name, &format!("1.0.{i}"), COLD_SIZE))
            .collect()
    };
    // Gateway and direct fetch the same cold archive per run (the direct side keeps nothing).
    let cold = many("bench/cold", runs);
    let cold_slow = many("bench/coldslow", runs);
    // The gateway and nginx each need their own never-fetched archive per run.
    let stampede = many("bench/stampede", runs * 2);
    let huge = huge.then(|| registry.publish_sized("bench/huge", "1.0.0", HUGE_SIZE));
    let (app, app_deps) = module_tree(registry);
    // A served index is packed (gc'd) like any maintained git server's; thousands of
    // loose objects would make every direct clone pay for compressing them afresh.
    registry.git(&["repack", "-a", "-d", "-q"]);
    Fixtures {
        hot,
        cold,
        cold_slow,
        stampede,
        huge,
        app,
        app_deps,
        index_files,
        index_lines,
        index_bytes,
    }
}

/// `bench/app` -> 4 modules -> 2 leaves each: 12 transitive dependencies (and one
/// leaf has a later version that none of them requires).
fn module_tree(registry: &Registry) -> (Published, usize) {
    let mut mids = Vec::new();
    for m in 0..4 {
        let mut leaves = Vec::new();
        for l in 0..2 {
            let name = format!("bench/leaf{m}x{l}");
            registry.publish(&name, "0.1.0", &[]);
            leaves.push(name);
        }
        let name = format!("bench/mid{m}");
        let deps: Vec<(&str, &str)> = leaves.iter().map(|l| (l.as_str(), "0.1.0")).collect();
        registry.publish(&name, "0.2.0", &deps);
        mids.push(name);
    }
    // A newer version nothing requires: moon's minimal version selection never asks
    // for it, so neither may the gateway's prefetch.
    registry.publish("bench/leaf0x0", "0.1.1", &[]);
    let deps: Vec<(&str, &str)> = mids.iter().map(|m| (m.as_str(), "0.2.0")).collect();
    (registry.publish("bench/app", "1.0.0", &deps), 12)
}

/// Write `INDEX_USERS * MODULES_PER_USER` index files, 1 to 4 versions each, lines
/// shaped like the real index's (description, deps, keywords, checksum, created_at),
/// committed at once. Returns (files, lines, bytes).
fn realistic_index(registry: &Registry) -> (usize, usize, usize) {
    let root = registry.git_dir();
    let (mut files, mut lines, mut bytes) = (0, 0, 0);
    for u in 0..INDEX_USERS {
        let user = format!("user{u:03}");
        let dir = root.join("user").join(&user);
        std::fs::create_dir_all(&dir).expect("index user dir");
        for m in 0..MODULES_PER_USER {
            let module = format!("module{m}");
            let name = format!("{user}/{module}");
            let mut text = String::new();
            for v in 0..(1 + (u + m) % 4) {
                let version = format!("0.{}.{}", v / 2, v % 2 * 3);
                let mut deps = String::new();
                for d in 0..((u * 7 + m) % 4) {
                    let dep = format!("user{:03}/module{}", (u + d + 1) % INDEX_USERS, d);
                    let _ = write!(
                        deps,
                        "{}\"{dep}\": \"0.1.0\"",
                        if d > 0 { ", " } else { "" }
                    );
                }
                let checksum = sha256_hex(format!("{name}@{version}").as_bytes());
                let _ = writeln!(
                    text,
                    "{{\"name\": \"{name}\", \"version\": \"{version}\", \
                     \"description\": \"A MoonBit library number {m} by {user}, for benchmarks of the registry gateway\", \
                     \"deps\": {{{deps}}}, \"source\": \"src\", \"readme\": \"README.mbt.md\", \
                     \"repository\": \"https://github.com/{user}/{module}\", \"license\": \"Apache-2.0\", \
                     \"keywords\": [\"moonbit\", \"bench\", \"{module}\"], \"exclude\": [\"_build\", \"target\"], \
                     \"checksum\": \"{checksum}\", \"created_at\": \"2026-02-12T16:19:37.264178+00:00\"}}"
                );
                lines += 1;
            }
            bytes += text.len();
            files += 1;
            std::fs::write(dir.join(format!("{module}.index")), text).expect("write index file");
        }
    }
    registry.git(&["add", "user"]);
    registry.git(&["commit", "-q", "-m", "the realistic index"]);
    (files, lines, bytes)
}
