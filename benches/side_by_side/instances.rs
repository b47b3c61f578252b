//! Gateway instances for the benchmark (the release binary, through the test
//! harness's launcher) with a given config, and the memory and CPU time they use
//! as the kernel reports them.

use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::upstream::{Gateway, Upstream};

/// The benchmark's config: the defaults, except that the index mirror counts as fresh
/// for 10 minutes, so clones are served from the mirror without a refresh in between.
pub const BASE_CONFIG: &str = "[index]\nmax_age = \"10m\"\n";

/// A running gateway and the directory holding its config file.
pub struct Instance {
    pub gateway: Gateway,
    _config: TempDir,
}

impl Instance {
    pub fn url(&self) -> String {
        self.gateway.url()
    }

    pub fn pid(&self) -> u32 {
        self.gateway.pid().expect("gateway running")
    }
}

/// Start a gateway with a fresh data dir and `toml` as its config, and wait until
/// its index mirror is in place.
pub async fn start(upstream: &Upstream, toml: &str) -> Instance {
    start_build(upstream, toml, None, &[]).await
}

/// [`start`] with `env` added to the gateway's environment (e.g. store credentials).
pub async fn start_with_env(upstream: &Upstream, toml: &str, env: &[(&str, &str)]) -> Instance {
    start_build(upstream, toml, None, env).await
}

/// The gateway build to compare with, `BENCH_BASELINE_BIN` (e.g. a copy of the
/// release binary before a change), if set: scenarios that support it run it
/// side by side as one more peer.
pub fn baseline() -> Option<std::path::PathBuf> {
    std::env::var_os("BENCH_BASELINE_BIN").map(std::path::PathBuf::from)
}

/// [`start`] with the binary `bin` instead of the one under test (which alone
/// takes `env`).
pub async fn start_build(
    upstream: &Upstream,
    toml: &str,
    bin: Option<&std::path::Path>,
    env: &[(&str, &str)],
) -> Instance {
    let config = tempfile::tempdir().expect("config dir");
    let path = config.path().join("moonbit-registry.toml");
    std::fs::write(&path, toml).expect("write gateway config");
    let args = ["--config", path.to_str().expect("UTF-8 temp path")];
    let gateway = match bin {
        Some(bin) => Gateway::start_binary(bin, &upstream.url(), &upstream.ca_pem, &args).await,
        None => Gateway::start_with_env(&upstream.url(), &upstream.ca_pem, &args, env).await,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !gateway.log().contains("index mirror refreshed") {
        assert!(
            Instant::now() < deadline,
            "the gateway's index mirror was not ready after 60 s:\n{}",
            gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Instance {
        gateway,
        _config: config,
    }
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`), 0 if the process is gone.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Sum of a status field over several processes (nginx's master and workers), in MiB.
pub fn sum_mib(pids: &[u32], field: &str) -> f64 {
    pids.iter().map(|&p| status_kib(p, field)).sum::<u64>() as f64 / 1024.0
}

/// CPU time `pid` and its waited-for children (git, for the gateway) have used, in
/// milliseconds: user + system, from `/proc/<pid>/stat` (clock-tick resolution).
pub fn cpu_ms(pid: u32) -> f64 {
    static TICK_MS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let tick_ms = *TICK_MS.get_or_init(|| {
        let out = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output();
        let hz = out
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(100.0);
        1000.0 / hz
    });
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after `(comm) `: state is the first; utime, stime, cutime, cstime the 12th to 15th.
    let Some(rest) = stat.rfind(") ").map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let ticks: f64 = rest
        .split(' ')
        .skip(11)
        .take(4)
        .filter_map(|v| v.parse::<f64>().ok())
        .sum();
    ticks * tick_ms
}
