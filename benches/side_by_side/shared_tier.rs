//! Issue 14's shared tier: four replicas cold-filling the same 20-archive closure
//! at once, each with its own data dir, with a shared tier (one SeaweedFS bucket on
//! loopback) against without one: how many archive requests reach the upstream and
//! how long until every replica has served all of it, with the test upstream as it
//! is (loopback, no latency) and 50 ms slower per request (closer to a registry
//! across the internet). Then a hit from the shared tier (another replica fetched
//! it) against a hit from the local disk.
//! Skipped, saying so, without `weed`.

use std::time::{Duration, Instant};

use futures_util::future::join_all;

use crate::side_by_side::client::{fresh_client, timed_get};
use crate::side_by_side::instances::{self, Instance};
use crate::side_by_side::report::{Better, Row};
use crate::side_by_side::Bench;
use crate::upstream::seaweed::Seaweed;
use crate::upstream::{Fault, Published};

const REPLICAS: usize = 4;
const CLOSURE: usize = 20;
const SIZE: usize = 256 * 1024;
/// The slower upstream's added latency per request.
const UPSTREAM_DELAY: Duration = Duration::from_millis(50);

pub async fn run(b: &mut Bench) {
    let Some(store) = Seaweed::start("bench shared") else {
        b.notes
            .push("shared: skipped, `weed` (SeaweedFS) is not installed".into());
        return;
    };
    // Each round, mode and upstream latency fills its own closure, so every fill is cold.
    let closures: Vec<[[Vec<Published>; 2]; 2]> = (0..b.rounds)
        .map(|round| {
            [0, 1].map(|mode| {
                [0, 1].map(|slow| {
                    (0..CLOSURE)
                        .map(|i| {
                            let name = format!("bench/shared-{round}-{mode}-{slow}-{i}");
                            b.upstream.registry.publish_sized(&name, "1.0.0", SIZE)
                        })
                        .collect()
                })
            })
        })
        .collect();
    let client = fresh_client(&b.upstream.ca_pem);
    let env = Seaweed::env();
    let (mut up_s, mut up_n, mut ms_s, mut ms_n) = (vec![], vec![], vec![], vec![]);
    let (mut slow_s, mut slow_n) = (vec![], vec![]);
    let (mut hit_shared, mut hit_disk) = (vec![], vec![]);
    for (round, closure) in closures.iter().enumerate() {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for &mode in &order {
            let toml = match mode {
                0 => format!(
                    "{}{}",
                    instances::BASE_CONFIG,
                    store.toml(&format!("bench-{round}"))
                ),
                _ => instances::BASE_CONFIG.to_string(),
            };
            // One after another: gateways started at once may pick the same free port.
            let mut replicas: Vec<Instance> = Vec::new();
            for _ in 0..REPLICAS {
                replicas.push(instances::start_with_env(&b.upstream, &toml, &env).await);
            }
            b.upstream.set_fault(Fault::DelayEach(UPSTREAM_DELAY));
            let (slow_ms, _) = fill(&client, b, &replicas, &closure[mode][1]).await;
            b.upstream.set_fault(Fault::None);
            let archives = &closure[mode][0];
            let (ms, requests) = fill(&client, b, &replicas, archives).await;
            if mode == 0 {
                slow_s.push(slow_ms);
                ms_s.push(ms);
                up_s.push(requests);
                // A fresh replica on the same bucket: shared-tier hits, then disk hits.
                // No memory tier, so the second GET is a disk hit, not a memory hit.
                let no_memory =
                    format!("{toml}[storage]\nmemory = \"0 B\"\nmemory_item_max = \"0 B\"\n");
                let fresh = instances::start_with_env(&b.upstream, &no_memory, &env).await;
                for p in archives {
                    let url = format!("{}{}", fresh.url(), p.url_path());
                    hit_shared.push(timed_get(&client, &url, p.size).await.total_ms);
                }
                for p in archives {
                    let url = format!("{}{}", fresh.url(), p.url_path());
                    hit_disk.push(timed_get(&client, &url, p.size).await.total_ms);
                }
                let log = fresh.gateway.log();
                assert!(
                    !log.contains("fetched from upstream"),
                    "the fresh replica went to the upstream:\n{log}"
                );
            } else {
                slow_n.push(slow_ms);
                ms_n.push(ms);
                up_n.push(requests);
            }
        }
    }
    let scenario =
        format!("{REPLICAS} replicas cold-fill a {CLOSURE}-archive closure (256 KiB each)");
    let peer_name = "the same replicas without a shared tier".to_string();
    b.rows.push(Row {
        scenario: scenario.clone(),
        metric: "upstream archive requests".into(),
        unit: "count",
        better: Better::Lower,
        gateway: up_s,
        peer: up_n,
        peer_name: peer_name.clone(),
    });
    b.rows.push(Row {
        scenario: scenario.clone(),
        metric: "all replicas done".into(),
        unit: "ms",
        better: Better::Lower,
        gateway: ms_s,
        peer: ms_n,
        peer_name: peer_name.clone(),
    });
    b.rows.push(Row {
        scenario,
        metric: "all replicas done, upstream +50 ms".into(),
        unit: "ms",
        better: Better::Lower,
        gateway: slow_s,
        peer: slow_n,
        peer_name,
    });
    b.rows.push(Row {
        scenario: "one archive (256 KiB), a replica that does not hold it".into(),
        metric: "GET from the shared tier".into(),
        unit: "ms",
        better: Better::Lower,
        gateway: hit_shared,
        peer: hit_disk,
        peer_name: "a hit from its local disk (memory tier off)".into(),
    });
}

/// Every replica fetches every archive of `archives`, one at a time (like `moon
/// add`), all replicas at once: (ms until the last is done, upstream GETs for them).
async fn fill(
    client: &reqwest::Client,
    b: &Bench,
    replicas: &[Instance],
    archives: &[Published],
) -> (f64, f64) {
    let gets = || -> usize {
        archives
            .iter()
            .map(|p| b.upstream.count("GET", &p.url_path()))
            .sum()
    };
    let before = gets();
    let started = Instant::now();
    join_all(replicas.iter().map(|r| {
        let base = r.url();
        async move {
            for p in archives {
                timed_get(client, &format!("{base}{}", p.url_path()), p.size).await;
            }
        }
    }))
    .await;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    (ms, (gets() - before) as f64)
}
