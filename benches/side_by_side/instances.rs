//! Gateway instances for the benchmark (the release binary, through the test
//! harness's launcher) with a given config, and the memory they use as the kernel
//! reports it.

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
    start_with_env(upstream, toml, &[]).await
}

/// [`start`] with `env` added to the gateway's environment (e.g. store credentials).
pub async fn start_with_env(upstream: &Upstream, toml: &str, env: &[(&str, &str)]) -> Instance {
    let config = tempfile::tempdir().expect("config dir");
    let path = config.path().join("moonbit-registry.toml");
    std::fs::write(&path, toml).expect("write gateway config");
    let args = ["--config", path.to_str().expect("UTF-8 temp path")];
    let gateway = Gateway::start_with_env(&upstream.url(), &upstream.ca_pem, &args, env).await;
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
