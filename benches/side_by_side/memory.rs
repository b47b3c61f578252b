//! Scenario 5: memory. Peak RSS while a 1 GiB archive streams through cold (gateway
//! against nginx `proxy_cache`, both fresh), and resident memory with 1,000 idle
//! keep-alive connections open (gateway against nginx serving static files).

use std::time::{Duration, Instant};

use futures_util::future::join_all;

use crate::side_by_side::client::IdleConnection;
use crate::side_by_side::fixtures::HUGE_SIZE;
use crate::side_by_side::instances::{self, status_kib, sum_mib};
use crate::side_by_side::peers::{static_root, Nginx, Role};
use crate::side_by_side::report::{Better, Row};
use crate::side_by_side::Bench;

const IDLE_CONNECTIONS: usize = 1000;

pub async fn run(b: &mut Bench) {
    if let Some(huge) = b.fixtures.huge.clone() {
        let path = huge.url_path();
        // Gateway: fresh process and data dir, so its high-water mark is this transfer's.
        let gw = instances::start(&b.upstream, instances::BASE_CONFIG).await;
        let g_before = status_kib(gw.pid(), "VmRSS") as f64 / 1024.0;
        let g_secs = download(b, &format!("{}{path}", gw.url()));
        let g_peak = status_kib(gw.pid(), "VmHWM") as f64 / 1024.0;
        drop(gw);
        let nginx = Nginx::start(Role::ProxyCache {
            upstream: b.upstream.addr,
            ca_pem: &b.upstream.ca_pem,
        });
        let n_secs = download(b, &format!("{}{path}", nginx.url()));
        let n_peak = sum_mib(&nginx.pids(), "VmHWM");
        drop(nginx);
        let scenario = "1 GiB archive, cold, streamed".to_string();
        let peer_name = "nginx proxy_cache (master+workers)".to_string();
        b.rows.push(Row {
            scenario: scenario.clone(),
            metric: "peak RSS".into(),
            unit: "MiB",
            better: Better::Lower,
            gateway: vec![g_peak],
            peer: vec![n_peak],
            peer_name: peer_name.clone(),
        });
        b.rows.push(Row {
            scenario,
            metric: "transfer time".into(),
            unit: "s",
            better: Better::Lower,
            gateway: vec![g_secs],
            peer: vec![n_secs],
            peer_name,
        });
        b.notes.push(format!(
            "1 GiB cold: gateway RSS {g_before:.1} MiB at rest, {g_peak:.1} MiB peak; \
             {:.0} MiB/s through the gateway, {:.0} MiB/s through nginx",
            1024.0 / g_secs,
            1024.0 / n_secs
        ));
    }

    // Idle keep-alive connections, each after one request for a hot 4 KiB archive.
    let hot = b.fixtures.hot[0].1.clone();
    let path = hot.url_path();
    let gw = instances::start(&b.upstream, instances::BASE_CONFIG).await;
    let out = b.curl(&["-f", "-o", "/dev/null", &format!("{}{path}", gw.url())]);
    assert!(out.status.success(), "priming the gateway failed");
    let (g_rest, g_idle, g_alive) = idle(&[gw.pid()], gw.gateway.addr, &path).await;
    drop(gw);
    let root = tempfile::tempdir().expect("static root");
    static_root(root.path(), &b.fixtures.static_files());
    let nginx = Nginx::start(Role::Static { root: root.path() });
    let (n_rest, n_idle, n_alive) = idle(&nginx.pids(), nginx.addr, &path).await;
    drop(nginx);
    if let Some(bin) = instances::baseline() {
        let before =
            instances::start_build(&b.upstream, instances::BASE_CONFIG, Some(&bin), &[]).await;
        let out = b.curl(&["-f", "-o", "/dev/null", &format!("{}{path}", before.url())]);
        assert!(out.status.success(), "priming the baseline gateway failed");
        let (rest, with_idle, alive) = idle(&[before.pid()], before.gateway.addr, &path).await;
        drop(before);
        b.rows.push(per_connection(
            g_idle - g_rest,
            with_idle - rest,
            "gateway before (BENCH_BASELINE_BIN)",
        ));
        b.notes.push(format!(
            "{IDLE_CONNECTIONS} idle connections, gateway before: {rest:.1} -> {with_idle:.1} MiB, \
             {alive} still answering"
        ));
    }
    b.rows.push(per_connection(
        g_idle - g_rest,
        n_idle - n_rest,
        "nginx static (master+workers)",
    ));
    b.rows.push(Row {
        scenario: format!("{IDLE_CONNECTIONS} idle keep-alive connections"),
        metric: "RSS".into(),
        unit: "MiB",
        better: Better::Lower,
        gateway: vec![g_idle],
        peer: vec![n_idle],
        peer_name: "nginx static (master+workers)".into(),
    });
    b.notes.push(format!(
        "{IDLE_CONNECTIONS} idle connections: gateway {g_rest:.1} -> {g_idle:.1} MiB \
         ({:.1} KiB each), {g_alive} still answering after the idle pause; nginx {n_rest:.1} -> \
         {n_idle:.1} MiB ({:.1} KiB each), {n_alive} still answering",
        (g_idle - g_rest) * 1024.0 / IDLE_CONNECTIONS as f64,
        (n_idle - n_rest) * 1024.0 / IDLE_CONNECTIONS as f64,
    ));
}

/// Download with curl to /dev/null; seconds taken. Panics unless all bytes came.
fn download(b: &Bench, url: &str) -> f64 {
    let started = Instant::now();
    let out = b.curl(&["-f", "-o", "/dev/null", "-w", "%{size_download}", url]);
    let secs = started.elapsed().as_secs_f64();
    let got = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && got.trim() == HUGE_SIZE.to_string(),
        "GET {url} failed or came short ({got} bytes): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    secs
}

/// Open the connections, let them sit, measure; then check how many still answer.
/// Returns (RSS MiB before, RSS MiB with them idle, connections still usable).
async fn idle(pids: &[u32], addr: std::net::SocketAddr, path: &str) -> (f64, f64, usize) {
    // Settled first, as after the idle pause below: memory an earlier scenario
    // freed may still be on its way back to the system.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rest = sum_mib(pids, "VmRSS");
    let mut conns = Vec::with_capacity(IDLE_CONNECTIONS);
    // In batches, so the listen backlog never overflows.
    for _ in 0..IDLE_CONNECTIONS / 100 {
        let batch = join_all((0..100).map(|_| IdleConnection::open(addr, path))).await;
        for c in batch {
            conns.push(c.unwrap_or_else(|e| panic!("opening an idle connection to {addr}: {e}")));
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let with_idle = sum_mib(pids, "VmRSS");
    let alive = join_all(conns.iter_mut().map(|c| c.request_once()))
        .await
        .into_iter()
        .filter(Result::is_ok)
        .count();
    (rest, with_idle, alive)
}

/// The row comparing RSS growth (MiB, over [`IDLE_CONNECTIONS`] idle
/// connections) per connection, in KiB.
fn per_connection(gateway_mib: f64, peer_mib: f64, peer_name: &str) -> Row {
    Row {
        scenario: format!("{IDLE_CONNECTIONS} idle keep-alive connections, RSS growth"),
        metric: "per connection".into(),
        unit: "KiB",
        better: Better::Lower,
        gateway: vec![gateway_mib * 1024.0 / IDLE_CONNECTIONS as f64],
        peer: vec![peer_mib * 1024.0 / IDLE_CONNECTIONS as f64],
        peer_name: peer_name.into(),
    }
}
