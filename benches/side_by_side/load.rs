//! The load generator: `wrk` with a fixed connection count, its output parsed into
//! requests per second and latency percentiles. Any error or non-2xx answer fails
//! the run, so a fast error page never counts as a fast archive.

use std::process::Command;

/// What one wrk run measured.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub requests_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// `wrk -t2 -c<connections> -d<seconds>s --latency <url>`.
pub fn wrk(url: &str, connections: u32, seconds: u32) -> Load {
    let out = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
            url,
        ])
        .output()
        .expect("run wrk (see benches/peers.sh)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "wrk failed on {url}: {text}");
    for bad in ["Non-2xx or 3xx responses", "Socket errors"] {
        assert!(
            !text.contains(bad),
            "wrk saw errors on {url} (the result would not be comparable):\n{text}"
        );
    }
    parse(&text).unwrap_or_else(|| panic!("cannot read wrk's output for {url}:\n{text}"))
}

fn parse(text: &str) -> Option<Load> {
    let mut rps = None;
    let mut p50 = None;
    let mut p99 = None;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => rps = v.parse().ok(),
            ["50%", v] => p50 = duration_ms(v),
            ["99%", v] => p99 = duration_ms(v),
            _ => {}
        }
    }
    Some(Load {
        requests_per_sec: rps?,
        p50_ms: p50?,
        p99_ms: p99?,
    })
}

/// wrk prints `635.91us`, `1.23ms`, `2.00s`, `1.50m`.
fn duration_ms(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}
