//! Scenario 1 (and issue 3): hot archive hits under 64 concurrent connections, the
//! gateway (memory tier) against nginx serving the same files statically and nginx
//! `proxy_cache` in front of the same upstream, warm (and, with `BENCH_BASELINE_BIN`,
//! another build of the gateway).

use crate::side_by_side::peers::{Nginx, Role};
use crate::side_by_side::report::{Better, Row};
use crate::side_by_side::{instances, load, Bench};

const CONNECTIONS: u32 = 64;

/// Reads one number out of a wrk result.
type Metric = fn(&load::Load) -> f64;

pub async fn run(b: &mut Bench) {
    let gw = instances::start(&b.upstream, instances::BASE_CONFIG).await;
    let root = tempfile::tempdir().expect("static root");
    crate::side_by_side::peers::static_root(root.path(), &b.fixtures.static_files());
    let statics = Nginx::start(Role::Static { root: root.path() });
    let proxy = Nginx::start(Role::ProxyCache {
        upstream: b.upstream.addr,
        ca_pem: &b.upstream.ca_pem,
    });
    let baseline = match instances::baseline() {
        Some(bin) => {
            Some(instances::start_build(&b.upstream, instances::BASE_CONFIG, Some(&bin), &[]).await)
        }
        None => None,
    };
    let mut servers = vec![
        ("gateway", gw.url(), "hit"),
        ("nginx static", statics.url(), "static"),
        ("nginx proxy_cache", proxy.url(), "hit"),
    ];
    if let Some(before) = &baseline {
        servers.push(("gateway before (BENCH_BASELINE_BIN)", before.url(), "hit"));
    }
    for (label, archive) in &b.fixtures.hot.clone() {
        if std::env::var("BENCH_HOT").is_ok_and(|w| !label.contains(&w)) {
            continue;
        }
        let path = archive.url_path();
        // Warm every server, then check each answers from its cache with the right bytes.
        for (name, url, cached) in &servers {
            for _ in 0..2 {
                let out = b.curl(&["-f", "-o", "/dev/null", &format!("{url}{path}")]);
                assert!(out.status.success(), "{name}: GET {path} failed");
            }
            let out = b.curl(&[
                "-f",
                "-D",
                "-",
                "-o",
                "/dev/null",
                "-w",
                "size=%{size_download}\n",
                &format!("{url}{path}"),
            ]);
            let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
            assert!(
                text.contains(&format!("x-cache: {cached}"))
                    && text.contains(&format!("size={}", archive.size)),
                "{name} is not serving {path} from its cache:\n{text}"
            );
        }
        let mut results: Vec<Vec<load::Load>> = vec![Vec::new(); servers.len()];
        for round in 0..b.rounds {
            // Rotate who goes first, so no server always runs on a cooler machine.
            for k in 0..servers.len() {
                let i = (k + round) % servers.len();
                let url = format!("{}{path}", servers[i].1);
                results[i].push(load::wrk(&url, CONNECTIONS, b.seconds));
            }
        }
        let scenario = format!("hot hit {label}, {CONNECTIONS} conns");
        for (peer, name) in servers.iter().enumerate().skip(1).map(|(i, s)| (i, s.0)) {
            let metrics: [(&str, &'static str, Better, Metric); 3] = [
                ("req/s", "req/s", Better::Higher, |l| l.requests_per_sec),
                ("p50 latency", "ms", Better::Lower, |l| l.p50_ms),
                ("p99 latency", "ms", Better::Lower, |l| l.p99_ms),
            ];
            for (metric, unit, better, get) in metrics {
                b.rows.push(Row {
                    scenario: scenario.clone(),
                    metric: metric.into(),
                    unit,
                    better,
                    gateway: results[0].iter().map(get).collect(),
                    peer: results[peer].iter().map(get).collect(),
                    peer_name: name.into(),
                });
            }
        }
    }
}
