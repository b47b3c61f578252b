//! `GET /-/` (or `/-/status`): a small status page, rendered on the server as one
//! HTML document with its style inline (no scripts, no external assets).

use std::fmt::Write as _;

use super::recent::LastHour;

/// One source's line on the page.
pub struct SourceStatus {
    pub name: String,
    pub registry: String,
    pub up: bool,
    pub last_error: Option<String>,
    pub index_commit: Option<String>,
    pub index_age_seconds: Option<u64>,
}

/// One recent job's line.
pub struct JobStatus {
    pub id: String,
    pub archives: u64,
    pub from_cache: u64,
    pub cold: u64,
}

/// Everything the page shows.
pub struct Status {
    pub version: &'static str,
    pub uptime_seconds: u64,
    pub sources: Vec<SourceStatus>,
    pub memory_bytes: u64,
    pub memory_budget: u64,
    pub disk_bound: Option<u64>,
    /// The shared tier in a line (its URL and state), if there is one.
    pub shared: Option<String>,
    pub requests: u64,
    pub archive_hits: u64,
    pub archive_misses: u64,
    pub last_hour: LastHour,
    /// The most asked-for modules (`user/module`) and their archive requests.
    pub top_modules: Vec<(String, u64)>,
    /// Distinct content on disk at the store's last size check.
    pub disk_bytes: u64,
    pub flights: usize,
    pub jobs: Vec<JobStatus>,
}

/// Escape text for HTML element content and attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn bytes(n: u64) -> String {
    bytesize::ByteSize(n).display().iec().to_string()
}

/// `hits` of `hits + misses` as a percentage, `-` when there were none.
fn ratio(hits: u64, misses: u64) -> String {
    match hits + misses {
        0 => "-".to_string(),
        all => format!("{:.1} %", 100.0 * hits as f64 / all as f64),
    }
}

/// The page.
pub fn render(s: &Status) -> String {
    let mut h = String::with_capacity(8 * 1024);
    let hour = &s.last_hour;
    // Whole seconds, like the rate since start, so the two agree on a young gateway.
    let hour_rate = hour.requests as f64 / hour.covered.as_secs().max(1) as f64;
    let rate = s.requests as f64 / s.uptime_seconds.max(1) as f64;
    // Writing to a String cannot fail.
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
<title>moonbit-registry status</title>\n<style>\n\
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}\n\
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}\n\
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; }}\n\
th {{ background: #f3f3f3; }}\n.up {{ color: #176f2c; font-weight: bold; }}\n\
.down {{ color: #b00020; font-weight: bold; }}\n</style>\n</head>\n<body>\n\
<h1>moonbit-registry {}</h1>\n<p>up for {} s</p>\n",
        esc(s.version),
        s.uptime_seconds
    );
    h.push_str("<h2>Sources</h2>\n<table id=\"sources\">\n<tr><th>source</th><th>registry</th><th>state</th><th>index tip</th><th>index age</th><th>last error</th></tr>\n");
    for src in &s.sources {
        let (class, state) = if src.up {
            ("up", "up")
        } else {
            ("down", "down")
        };
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td class=\"{class}\">{state}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&src.name),
            esc(&src.registry),
            esc(src.index_commit.as_deref().map_or("-", |c| &c[..c.len().min(12)])),
            src.index_age_seconds.map_or("-".to_string(), |a| format!("{a} s")),
            esc(src.last_error.as_deref().unwrap_or("-")),
        );
    }
    h.push_str("</table>\n<h2>Cache</h2>\n<table id=\"cache\">\n");
    let rows = [
        ("requests (last hour)", hour.requests.to_string()),
        ("requests per second (last hour)", format!("{hour_rate:.2}")),
        (
            "archive hit ratio (last hour)",
            ratio(hour.archive_hits, hour.archive_misses),
        ),
        ("archive hits (last hour)", hour.archive_hits.to_string()),
        (
            "archive misses (last hour)",
            hour.archive_misses.to_string(),
        ),
        ("requests (since start)", s.requests.to_string()),
        ("requests per second (since start)", format!("{rate:.2}")),
        (
            "archive hit ratio (since start)",
            ratio(s.archive_hits, s.archive_misses),
        ),
        ("fetches in progress", s.flights.to_string()),
        (
            "memory tier",
            format!("{} of {}", bytes(s.memory_bytes), bytes(s.memory_budget)),
        ),
        (
            "disk tier (at the last size check)",
            match s.disk_bound {
                Some(bound) => format!("{} of {}", bytes(s.disk_bytes), bytes(bound)),
                None => format!("{} (no bound)", bytes(s.disk_bytes)),
            },
        ),
        (
            "shared tier",
            s.shared.clone().unwrap_or_else(|| "none".to_string()),
        ),
    ];
    for (name, value) in rows {
        let _ = writeln!(h, "<tr><th>{name}</th><td>{}</td></tr>", esc(&value));
    }
    h.push_str("</table>\n<h2>Top modules</h2>\n<table id=\"modules\">\n<tr><th>module</th><th>archive requests</th></tr>\n");
    for (module, count) in &s.top_modules {
        let _ = writeln!(h, "<tr><td>{}</td><td>{count}</td></tr>", esc(module));
    }
    h.push_str("</table>\n<h2>Recent jobs</h2>\n<table id=\"jobs\">\n<tr><th>job</th><th>archives</th><th>from cache</th><th>cold</th></tr>\n");
    for j in &s.jobs {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&j.id),
            j.archives,
            j.from_cache,
            j.cold
        );
    }
    h.push_str("</table>\n</body>\n</html>\n");
    h
}
