//! Scenario 2: a cold miss, through the gateway against straight from the upstream:
//! time to the response head, to the first body byte and to the last, on a fresh
//! connection per download as `moon` makes them; then the same with an upstream that
//! sends slowly, where the gateway must pass on the first bytes long before the
//! upstream has finished.

use std::time::Duration;

use crate::side_by_side::client::{fresh_client, timed_get, Timing};
use crate::side_by_side::fixtures::COLD_SIZE;
use crate::side_by_side::report::{self, Better, Row};
use crate::side_by_side::{instances, Bench};
use crate::upstream::{Fault, Published};

/// The slow upstream: 64 KiB every 25 ms, so a 1 MiB archive takes about 400 ms.
const SLOW_CHUNK: usize = 64 * 1024;
const SLOW_INTERVAL: Duration = Duration::from_millis(25);

pub async fn run(b: &mut Bench) {
    let gw = instances::start(&b.upstream, instances::BASE_CONFIG).await;
    let client = fresh_client(&b.upstream.ca_pem);
    let fast = b.fixtures.cold.clone();
    let (g, d) = measure(b, &client, &gw.url(), &fast).await;
    push(b, "cold miss 1 MiB", &g, &d);
    b.notes.push(format!(
        "cold miss 1 MiB: the gateway's own upstream fetch (spool + store + verify, from its log) \
         took {:.1} ms (median)",
        report::median(&fetch_ms(&gw.gateway.log(), "archive/bench/cold/"))
    ));

    b.upstream.set_fault(Fault::SlowArchives {
        chunk: SLOW_CHUNK,
        interval: SLOW_INTERVAL,
    });
    let slow = b.fixtures.cold_slow.clone();
    let (g, d) = measure(b, &client, &gw.url(), &slow).await;
    b.upstream.set_fault(Fault::None);
    push(b, "cold miss 1 MiB, slow upstream", &g, &d);
    // The gateway streams: its first byte must come before the upstream's last.
    let early = g
        .iter()
        .zip(&d)
        .filter(|(g, d)| g.first_byte_ms < d.total_ms / 2.0)
        .count();
    b.notes.push(format!(
        "slow upstream: the gateway's first body byte came before half the upstream's \
         transfer time in {early} of {} runs (first byte {:.0} ms, upstream total {:.0} ms, medians)",
        g.len(),
        report::median(&g.iter().map(|t| t.first_byte_ms).collect::<Vec<_>>()),
        report::median(&d.iter().map(|t| t.total_ms).collect::<Vec<_>>()),
    ));
    assert_eq!(
        early,
        g.len(),
        "the gateway did not stream a slow cold miss"
    );
}

/// One cold archive per run, fetched through the gateway and straight from the
/// upstream, alternating who goes first.
async fn measure(
    b: &Bench,
    client: &reqwest::Client,
    gateway: &str,
    archives: &[Published],
) -> (Vec<Timing>, Vec<Timing>) {
    let (mut g, mut d) = (Vec::new(), Vec::new());
    for (round, archive) in archives.iter().enumerate().take(b.rounds) {
        let path = archive.url_path();
        let through = format!("{gateway}{path}");
        let direct = format!("{}{path}", b.upstream.url());
        let len = COLD_SIZE as u64;
        assert_eq!(archive.size, len);
        if round % 2 == 0 {
            g.push(timed_get(client, &through, len).await);
            d.push(timed_get(client, &direct, len).await);
        } else {
            d.push(timed_get(client, &direct, len).await);
            g.push(timed_get(client, &through, len).await);
        }
    }
    (g, d)
}

/// Reads one number out of a transfer's timing.
type Metric = fn(&Timing) -> f64;

fn push(b: &mut Bench, scenario: &str, g: &[Timing], d: &[Timing]) {
    let metrics: [(&str, Metric); 3] = [
        ("response head", |t| t.head_ms),
        ("first body byte", |t| t.first_byte_ms),
        ("total", |t| t.total_ms),
    ];
    for (metric, get) in metrics {
        b.rows.push(Row {
            scenario: scenario.into(),
            metric: metric.into(),
            unit: "ms",
            better: Better::Lower,
            gateway: g.iter().map(get).collect(),
            peer: d.iter().map(get).collect(),
            peer_name: "upstream direct (TLS)".into(),
        });
    }
}

/// `ms=` of every "fetched from upstream" log line for keys starting with `prefix`.
fn fetch_ms(log: &str, prefix: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("fetched from upstream") && l.contains(&format!("key={prefix}")))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("ms="))?
                .parse()
                .ok()
        })
        .collect()
}
