//! Scenario 3: a stampede, 200 clients asking at once for one archive nobody has
//! fetched yet: how many requests reach the upstream (the gateway must send exactly
//! one) and how long until every client has all of it, against nginx `proxy_cache`
//! with `proxy_cache_lock on`.

use std::time::Instant;

use futures_util::future::join_all;

use crate::side_by_side::client::{fresh_client, timed_get};
use crate::side_by_side::fixtures::{COLD_SIZE, STAMPEDE_CLIENTS};
use crate::side_by_side::peers::{Nginx, Role};
use crate::side_by_side::report::{Better, Row};
use crate::side_by_side::{instances, Bench};
use crate::upstream::Published;

pub async fn run(b: &mut Bench) {
    let gw = instances::start(&b.upstream, instances::BASE_CONFIG).await;
    let nginx = Nginx::start(Role::ProxyCache {
        upstream: b.upstream.addr,
        ca_pem: &b.upstream.ca_pem,
    });
    let client = fresh_client(&b.upstream.ca_pem);
    let (mut g_ms, mut n_ms, mut g_up, mut n_up) = (vec![], vec![], vec![], vec![]);
    let archives = b.fixtures.stampede.clone();
    for round in 0..b.rounds {
        let (ga, na) = (&archives[2 * round], &archives[2 * round + 1]);
        let (gw_url, nginx_url) = (gw.url(), nginx.url());
        let ((gt, gu), (nt, nu)) = if round % 2 == 0 {
            let g = stampede(b, &client, &gw_url, ga).await;
            (g, stampede(b, &client, &nginx_url, na).await)
        } else {
            let n = stampede(b, &client, &nginx_url, na).await;
            (stampede(b, &client, &gw_url, ga).await, n)
        };
        g_ms.push(gt);
        g_up.push(gu);
        n_ms.push(nt);
        n_up.push(nu);
    }
    assert!(
        g_up.iter().all(|&n| n == 1.0),
        "the gateway sent more than one upstream request in a stampede: {g_up:?}"
    );
    let scenario = format!("stampede, {STAMPEDE_CLIENTS} cold clients, 1 MiB");
    let peer_name = "nginx proxy_cache_lock";
    b.rows.push(Row {
        scenario: scenario.clone(),
        metric: "all clients done".into(),
        unit: "ms",
        better: Better::Lower,
        gateway: g_ms,
        peer: n_ms,
        peer_name: peer_name.into(),
    });
    b.rows.push(Row {
        scenario,
        metric: "upstream requests".into(),
        unit: "count",
        better: Better::Lower,
        gateway: g_up,
        peer: n_up,
        peer_name: peer_name.into(),
    });
}

/// All clients at once; returns (ms until the last one finished, upstream GETs).
async fn stampede(
    b: &Bench,
    client: &reqwest::Client,
    base: &str,
    archive: &Published,
) -> (f64, f64) {
    let path = archive.url_path();
    let url = format!("{base}{path}");
    let before = b.upstream.count("GET", &path);
    let started = Instant::now();
    join_all((0..STAMPEDE_CLIENTS).map(|_| timed_get(client, &url, COLD_SIZE as u64))).await;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let upstream = b.upstream.count("GET", &path) - before;
    (ms, upstream as f64)
}
