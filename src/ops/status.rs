//! `GET /-/` (or `/-/status`): a small status page, rendered on the server as one
//! HTML document with its style inline (no scripts, no external assets).

use std::fmt::Write as _;

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

/// The page.
pub fn render(s: &Status) -> String {
    let mut h = String::with_capacity(8 * 1024);
    let archives = s.archive_hits + s.archive_misses;
    let ratio = if archives == 0 {
        "-".to_string()
    } else {
        format!("{:.1} %", 100.0 * s.archive_hits as f64 / archives as f64)
    };
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
        ("requests", s.requests.to_string()),
        ("requests per second (since start)", format!("{rate:.2}")),
        ("archive hits", s.archive_hits.to_string()),
        ("archive misses", s.archive_misses.to_string()),
        ("archive hit ratio (since start)", ratio),
        ("fetches in progress", s.flights.to_string()),
        (
            "memory tier",
            format!("{} of {}", bytes(s.memory_bytes), bytes(s.memory_budget)),
        ),
        (
            "disk tier bound",
            s.disk_bound.map_or("none".to_string(), bytes),
        ),
        (
            "shared tier",
            s.shared.clone().unwrap_or_else(|| "none".to_string()),
        ),
    ];
    for (name, value) in rows {
        let _ = writeln!(h, "<tr><th>{name}</th><td>{}</td></tr>", esc(&value));
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
