//! Running the gateway like infrastructure: `GET /-/metrics` after real `moon`
//! runs (exact archive hits and misses for a known closure, a strict parse of the
//! exposition, a bounded number of series).

use std::collections::BTreeMap;

use crate::upstream::scenario::{curl, moon_bin, moon_update_and_add, ok, setup_configured};
use crate::upstream::Gateway;

/// One sample: metric name and its labels, sorted.
type Series = (String, Vec<(String, String)>);

/// Parse the text exposition strictly (OpenMetrics text as `prometheus-client`
/// writes it, which Prometheus scrapes): every line a `# HELP`, `# TYPE`, `# UNIT`,
/// a sample of a declared family, or the final `# EOF`; no series twice.
fn parse_exposition(text: &str) -> Result<BTreeMap<Series, f64>, String> {
    let mut families: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    if lines.last() != Some(&"# EOF") {
        return Err("the exposition does not end with `# EOF`".into());
    }
    for (n, line) in lines[..lines.len() - 1].iter().enumerate() {
        let at = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if !valid_name(name) {
                return Err(at("bad metric name"));
            }
            match kind {
                "HELP" | "UNIT" => {}
                "TYPE" => {
                    let t = parts.next().unwrap_or("");
                    let known = [
                        "counter",
                        "gauge",
                        "histogram",
                        "summary",
                        "info",
                        "stateset",
                        "unknown",
                    ];
                    if !known.contains(&t) {
                        return Err(at("unknown type"));
                    }
                    if families.insert(name.to_string(), t.to_string()).is_some() {
                        return Err(at("family declared twice"));
                    }
                }
                _ => return Err(at("unknown comment")),
            }
            continue;
        }
        let (series, value) = sample(line).ok_or_else(|| at("not a sample"))?;
        let family = families
            .iter()
            .find(|(f, t)| {
                let suffixes: &[&str] = match t.as_str() {
                    "counter" => &["_total", "_created"],
                    "histogram" => &["_bucket", "_count", "_sum", "_created"],
                    _ => &[""],
                };
                suffixes.iter().any(|s| series.0 == format!("{f}{s}"))
            })
            .ok_or_else(|| at("sample of an undeclared family"))?;
        if family.1 == "histogram"
            && series.0.ends_with("_bucket")
            && !series.1.iter().any(|(k, _)| k == "le")
        {
            return Err(at("histogram bucket without `le`"));
        }
        if samples.insert(series, value).is_some() {
            return Err(at("series twice"));
        }
    }
    Ok(samples)
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `name{k="v",...} value` (label values with `\\`, `\"`, `\n` escapes).
fn sample(line: &str) -> Option<(Series, f64)> {
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    if !valid_name(name) {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(mut body) = rest.strip_prefix('{') {
        loop {
            let eq = body.find('=')?;
            let key = &body[..eq];
            if !valid_name(key) || key.contains(':') {
                return None;
            }
            let quoted = body[eq + 1..].strip_prefix('"')?;
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '\\' => match chars.next()?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        _ => return None,
                    },
                    '"' => break i,
                    c => value.push(c),
                }
            };
            labels.push((key.to_string(), value));
            let after = &quoted[end + 1..];
            if let Some(tail) = after.strip_prefix('}') {
                rest = tail;
                break;
            }
            body = after.strip_prefix(',')?;
        }
    }
    let value = rest.strip_prefix(' ')?;
    // The gateway writes no timestamps or exemplars: a second field is refused.
    let v: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    let mut seen = std::collections::HashSet::new();
    if !labels.iter().all(|(k, _)| seen.insert(k.clone())) {
        return None;
    }
    labels.sort();
    Some(((name.to_string(), labels), v))
}

/// `GET /-/metrics`, parsed.
pub(crate) fn scrape(gw: &Gateway) -> BTreeMap<Series, f64> {
    let out = curl(&["-f", &format!("{}/-/metrics", gw.url())]);
    ok(&out, "GET /-/metrics");
    let text = String::from_utf8(out.stdout).expect("UTF-8 exposition");
    parse_exposition(&text).unwrap_or_else(|e| panic!("invalid exposition: {e}\n{text}"))
}

/// The value of `name` with exactly these labels (0 when absent).
pub(crate) fn value(m: &BTreeMap<Series, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut labels: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    labels.sort();
    m.get(&(name.to_string(), labels)).copied().unwrap_or(0.0)
}

fn archives(m: &BTreeMap<Series, f64>, cache: &str) -> f64 {
    value(
        m,
        "moonbit_registry_requests_total",
        &[("route", "archive"), ("cache", cache)],
    )
}

/// A gateway without prefetch (every archive it fetches is one moon asked for) in
/// front of a known closure: `alice/app` -> `bob/lex/runtime` -> `alice/core`.
async fn closure_registry() -> (
    crate::upstream::scenario::Setup,
    Vec<crate::upstream::Published>,
) {
    // The store measured often, for `store_bytes{tier="disk"}`.
    setup_configured(
        "prefetch = false\n[storage]\ngc_interval = \"100ms\"\n",
        |r| {
            vec![
                r.publish("alice/core", "0.1.0", &[]),
                r.publish("bob/lex/runtime", "0.2.0", &[("alice/core", "0.1.0")]),
                r.publish("alice/app", "1.0.0", &[("bob/lex/runtime", "0.2.0")]),
            ]
        },
    )
    .await
}

/// A known closure (app -> lex/runtime -> core) through `moon update` + `moon add`:
/// the first run misses every archive once, a second (fresh `MOON_HOME`) hits all
/// three; the exposition parses strictly, and 1,000 requests for different
/// archives that do not exist add no series.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_a_moon_closure_exactly_and_stay_bounded() {
    let Some(bin) = moon_bin() else {
        eprintln!("SKIPPED metrics_count_a_moon_closure_exactly_and_stay_bounded: set MOON_BIN to the moon client");
        return;
    };
    let (s, closure) = closure_registry().await;
    let gw = s.gateway.url();
    let before = scrape(&s.gateway);
    assert_eq!(archives(&before, "miss") + archives(&before, "hit"), 0.0);
    let work = tempfile::tempdir().unwrap();
    let symbols_bytes = s.registry.symbols().0.len() as u64;
    for round in ["cold", "warm"] {
        moon_update_and_add(&bin, &work.path().join(round), &gw, "alice/app");
        let m = scrape(&s.gateway);
        let (hits, misses) = if round == "cold" {
            (0.0, 3.0)
        } else {
            (3.0, 3.0)
        };
        assert_eq!(archives(&m, "miss"), misses, "{round}: archive misses");
        assert_eq!(archives(&m, "hit"), hits, "{round}: archive hits");
        // Each archive came from the upstream once, as the upstream saw it.
        for p in &closure {
            assert_eq!(s.upstream.count("GET", &p.url_path()), 1, "{}", p.name);
        }
        assert!(
            value(
                &m,
                "moonbit_registry_upstream_requests_total",
                &[("source", "default"), ("outcome", "ok")]
            ) >= 3.0,
            "upstream exchanges counted"
        );
        // Exactly the closure's archives (and `symbols.zip`, once: later asks
        // revalidate) came from the source, once each, timed.
        let closure_bytes: u64 = closure.iter().map(|p| p.size).sum::<u64>() + symbols_bytes;
        let source = [("source", "default")];
        assert_eq!(
            value(&m, "moonbit_registry_upstream_bytes_total", &source),
            closure_bytes as f64,
            "{round}: upstream bytes"
        );
        assert_eq!(
            value(&m, "moonbit_registry_upstream_fetch_seconds_count", &source),
            4.0,
            "{round}: upstream fetches"
        );
        // The index was served: moon update cloned it from the mirror.
        assert!(
            value(
                &m,
                "moonbit_registry_requests_total",
                &[("route", "index"), ("cache", "mirror")]
            ) > 0.0
        );
        // Archive bytes: from the upstream on the cold run, from the store after.
        let served = |tier| value(&m, "moonbit_registry_served_bytes_total", &[("tier", tier)]);
        let closure_bytes = closure.iter().map(|p| p.size).sum::<u64>() as f64;
        assert!(
            served("upstream") >= closure_bytes,
            "{round}: served from the upstream"
        );
        if round == "warm" {
            assert!(
                served("memory") + served("disk") >= closure_bytes,
                "served from the store"
            );
        }
        let durations = value(
            &m,
            "moonbit_registry_request_duration_seconds_count",
            &[("route", "archive")],
        );
        assert_eq!(
            durations,
            hits + misses,
            "{round}: one duration per archive request"
        );
    }
    let m = scrape(&s.gateway);
    assert_eq!(
        value(&m, "moonbit_registry_source_up", &[("source", "default")]),
        1.0
    );
    assert_eq!(value(&m, "moonbit_registry_flights_in_progress", &[]), 0.0);
    // Every clone has ended: no git process serves a client now.
    assert_eq!(value(&m, "moonbit_registry_git_slots_in_use", &[]), 0.0);
    // The disk tier holds the closure (measured every 100 ms here).
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let m = scrape(&s.gateway);
    let closure_bytes: u64 = closure.iter().map(|p| p.size).sum();
    assert_eq!(
        value(&m, "moonbit_registry_store_bytes", &[("tier", "disk")]),
        closure_bytes as f64
    );
    assert!(value(&m, "moonbit_registry_connections", &[("door", "main")]) >= 1.0);

    // 1,000 different archives, none of them published: not one new series.
    let series_before = m.len();
    // In parallel: requests for unknown archives share the paced index refreshes.
    let out = curl(&[
        "-Z",
        "--parallel-max",
        "250",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}\n",
        &format!("{gw}/user/nobody%2Fm[1-1000]%2F1.0.0.zip"),
    ]);
    ok(&out, "1,000 archive requests");
    let codes = String::from_utf8_lossy(&out.stdout);
    assert_eq!(codes.lines().count(), 1000);
    assert!(codes.lines().all(|c| c == "404"), "{codes}");
    let m = scrape(&s.gateway);
    assert_eq!(m.len(), series_before, "series grew with request keys");
    assert!(
        value(
            &m,
            "moonbit_registry_requests_total",
            &[("route", "archive"), ("cache", "none")]
        ) + value(
            &m,
            "moonbit_registry_requests_total",
            &[("route", "archive"), ("cache", "miss")]
        ) >= 1000.0
    );
    // Nothing in a label names a module or a client.
    assert!(m.keys().all(|(_, labels)| labels
        .iter()
        .all(|(_, v)| !v.contains("nobody") && !v.contains("127.0.0.1"))));
}

#[test]
fn the_strict_parser_refuses_what_prometheus_would() {
    let good = "# TYPE a counter\na_total{x=\"1\"} 2\n# EOF\n";
    assert_eq!(parse_exposition(good).unwrap().len(), 1);
    for bad in [
        "a_total 1\n# EOF\n",                                    // undeclared
        "# TYPE a counter\na_total{x=\"1} 2\n# EOF\n",           // open quote
        "# TYPE a counter\na_total 2\na_total 3\n# EOF\n",       // twice
        "# TYPE a counter\na_total two\n# EOF\n",                // not a number
        "# TYPE a counter\na_total 2\n",                         // no EOF
        "# TYPE a counter\na_total{x=\"1\",x=\"2\"} 2\n# EOF\n", // label twice
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted {bad:?}");
    }
}

/// The gateway's log as JSON objects, one per line; panics on a line that is not one.
fn json_log(gw: &Gateway) -> Vec<serde_json::Value> {
    gw.log()
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("log line is not a JSON object ({e}): {line}"))
        })
        .collect()
}

/// The access events of a log.
fn access_events(log: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    log.iter()
        .filter(|e| e["target"] == "moonbit_registry::access" && e["message"] == "request")
        .collect()
}

/// `log.format = "json"`: every line of the gateway's log is one JSON object, and
/// every request (curl's, and a real moon run's) has exactly one access event
/// with its door, method, route, status, bytes, duration, cache result and source.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_log_has_one_access_event_per_request() {
    let (s, core) = setup_configured("prefetch = false\n[log]\nformat = \"json\"\n", |r| {
        r.publish("alice/core", "0.1.0", &[])
    })
    .await;
    let gw = s.gateway.url();
    let archive = core.url_path();
    // Each request is told apart by its query string (which no route looks at here).
    let requests = [
        (format!("{archive}?n=1"), "archive", "miss", 200),
        (format!("{archive}?n=2"), "archive", "hit", 200),
        ("/-/health?n=3".to_string(), "admin", "none", 200),
        ("/-/metrics?n=4".to_string(), "admin", "none", 200),
        (
            "/user/alice%2Fnope%2F1.0.0.zip?n=5".to_string(),
            "archive",
            // The upstream's 404, passed on: fetched now.
            "miss",
            404,
        ),
        (
            "/user/not-an-archive?n=6".to_string(),
            "refused",
            "none",
            400,
        ),
        (
            "/git/index/info/refs?service=git-upload-pack&n=7".to_string(),
            "index",
            "mirror",
            200,
        ),
    ];
    // The harness's own requests (waiting for the gateway to answer) came before.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let earlier = access_events(&json_log(&s.gateway)).len();
    for (path, ..) in &requests {
        let out = curl(&["-s", "-o", "/dev/null", &format!("{gw}{path}")]);
        ok(&out, path);
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let log = json_log(&s.gateway);
    let events = access_events(&log);
    for (path, route, cache, status) in &requests {
        let mine: Vec<_> = events
            .iter()
            .filter(|e| e["path"] == path.as_str())
            .collect();
        assert_eq!(mine.len(), 1, "{path}: access events {mine:?}");
        let e = mine[0];
        assert_eq!(e["door"], "endpoint", "{e}");
        assert_eq!(e["method"], "GET", "{e}");
        assert_eq!(e["route"], *route, "{e}");
        assert_eq!(e["cache"], *cache, "{e}");
        assert_eq!(e["status"], *status, "{e}");
        assert_eq!(e["source"], "default", "{e}");
        assert!(e["duration_ms"].as_f64().is_some(), "{e}");
        assert_eq!(e["complete"], true, "{e}");
        assert!(e.get("job").is_none(), "{e}");
    }
    let archive_bytes = core.size;
    for n in ["1", "2"] {
        let e = events
            .iter()
            .find(|e| e["path"] == format!("{archive}?n={n}").as_str())
            .unwrap();
        assert_eq!(e["bytes"], archive_bytes, "{e}");
    }
    assert_eq!(
        events.len(),
        earlier + requests.len(),
        "no other request was logged"
    );

    // A real moon run: one access event per request the gateway answered, which the
    // metrics count the same way (the scrape itself is the one request more).
    if let Some(bin) = moon_bin() {
        let work = tempfile::tempdir().unwrap();
        moon_update_and_add(&bin, work.path(), &gw, "alice/core");
        let m = scrape(&s.gateway);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let log = json_log(&s.gateway);
        let events = access_events(&log);
        let counted: f64 = m
            .iter()
            .filter(|((name, _), _)| name == "moonbit_registry_requests_total")
            .map(|(_, v)| v)
            .sum();
        // The scrape is counted when its response ends, after it was written.
        assert_eq!(
            events.len() as f64,
            counted + 1.0,
            "access events vs counted requests"
        );
        assert!(events
            .iter()
            .any(|e| e["route"] == "index" && e["method"] == "POST"));
    } else {
        eprintln!("json_log_has_one_access_event_per_request: moon part SKIPPED (set MOON_BIN)");
    }
}

/// `serve --log-format json` does the same without a config file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_format_flag_writes_json_lines() {
    let (s, _) = crate::upstream::scenario::setup_with(|_| ()).await;
    let up = s.upstream.url();
    let gw = Gateway::start(&up, &s.upstream.ca_pem, &["--log-format", "json"]).await;
    ok(
        &curl(&["-s", "-o", "/dev/null", &format!("{}/-/health", gw.url())]),
        "health",
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let log = json_log(&gw);
    assert!(!log.is_empty());
    assert!(access_events(&log).iter().any(|e| e["path"] == "/-/health"));
}

/// `moonbit-registry <args>` beside the test gateway (its config file, its address).
fn cli(s: &crate::upstream::scenario::Setup, args: &[&str]) -> std::process::Output {
    let addr = s.gateway.addr.to_string();
    let config = s.config.to_str().unwrap();
    crate::upstream::scenario::run(
        std::process::Command::new(env!("CARGO_BIN_EXE_moonbit-registry"))
            .args(args)
            .args(["--listen", &addr, "--config", config])
            .env_remove("MOONBIT_CI_JOB")
            .env_remove("GITHUB_RUN_ID")
            .env_remove("CI_JOB_ID")
            .env_remove("BUILDKITE_JOB_ID"),
    )
}

/// `env --job J1` makes moon's registry `/job/J1/`; `report --job J1 --json` then
/// counts the closure's three archives, all fetched cold; a second job with the
/// same closure gets all three from the cache. Text and Markdown say the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_job_report_counts_a_moon_closure() {
    let Some(bin) = moon_bin() else {
        eprintln!("SKIPPED per_job_report_counts_a_moon_closure: set MOON_BIN to the moon client");
        return;
    };
    let (s, closure) = closure_registry().await;
    let closure_bytes: u64 = closure.iter().map(|p| p.size).sum();
    let work = tempfile::tempdir().unwrap();
    for (job, cold) in [("J1", 3), ("J2", 0)] {
        let out = cli(&s, &["env", "--registry", "--job", job]);
        ok(&out, "moonbit-registry env --job");
        let exports = String::from_utf8_lossy(&out.stdout).to_string();
        let registry = exports
            .lines()
            .find_map(|l| l.strip_prefix("export MOONCAKES_REGISTRY="))
            .map(|v| v.trim_matches('\'').to_string())
            .unwrap_or_else(|| panic!("no MOONCAKES_REGISTRY in {exports}"));
        assert_eq!(registry, format!("{}/job/{job}", s.gateway.url()));
        assert!(exports.contains(&format!("export MOONBIT_CI_JOB='{job}'")));

        let proj = moon_update_and_add(&bin, &work.path().join(job), &registry, "alice/app");
        for dir in ["alice/app", "bob/lex+runtime", "alice/core"] {
            let installed = proj.join(".mooncakes").join(dir).join("moon.mod.json");
            assert!(installed.is_file(), "{job}: {dir} not installed");
        }

        // As after `eval "$(moonbit-registry env --job J)"`: the exported variable
        // names the job, and is no configuration key the command would refuse.
        let out = crate::upstream::scenario::run(
            std::process::Command::new(env!("CARGO_BIN_EXE_moonbit-registry"))
                .args(["report", "--json", "--listen", &s.gateway.addr.to_string()])
                .args(["--config", s.config.to_str().unwrap()])
                .env("MOONBIT_CI_JOB", job),
        );
        ok(
            &out,
            "moonbit-registry report --json (job from MOONBIT_CI_JOB)",
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report JSON");
        assert_eq!(r["job"], job, "{r}");
        assert_eq!(r["archives"], 3, "{job}: {r}");
        assert_eq!(r["modules_fetched_cold"], cold, "{job}: {r}");
        assert_eq!(r["archives_from_cache"], 3 - cold, "{job}: {r}");
        assert_eq!(r["errors"], 0, "{job}: {r}");
        assert!(
            r["requests"].as_u64().unwrap() > 3,
            "index requests too: {r}"
        );
        assert!(r["bytes_served"].as_u64().unwrap() >= closure_bytes, "{r}");
        if cold == 3 {
            assert!(
                r["bytes_from_upstream"].as_u64().unwrap() >= closure_bytes,
                "{r}"
            );
        }

        let out = cli(&s, &["report", "--job", job]);
        ok(&out, "moonbit-registry report");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.starts_with(&format!("this job: 3 archives, {} from cache,", 3 - cold)),
            "{text}"
        );
        assert!(text.contains(&format!(", {cold} cold;")), "{text}");
        let out = cli(&s, &["report", "--job", job, "--markdown"]);
        ok(&out, "moonbit-registry report --markdown");
        let md = String::from_utf8_lossy(&out.stdout);
        assert!(
            md.contains(&format!("| modules fetched cold | {cold} |")),
            "{md}"
        );
    }

    // `/job/<id>/` composes with a pinned view, in either order.
    let now = humantime_now();
    for (path, job) in [
        (
            format!("/job/J3/at/{now}/git/index/info/refs?service=git-upload-pack"),
            "J3",
        ),
        (
            format!("/at/{now}/job/J4/git/index/info/refs?service=git-upload-pack"),
            "J4",
        ),
    ] {
        let out = curl(&[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("{}{path}", s.gateway.url()),
        ]);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{path}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let out = cli(&s, &["report", "--job", job, "--json"]);
        ok(&out, "report");
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["requests"], 1, "{path}: {r}");
    }
    // The status page shows the source, the counters and the jobs.
    let out = curl(&["-s", "-D", "-", &format!("{}/-/", s.gateway.url())]);
    ok(&out, "GET /-/");
    let page = String::from_utf8_lossy(&out.stdout).to_string();
    let (head, html) = page.split_once("\r\n\r\n").expect("a response head");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/html; charset=utf-8"),
        "{head}"
    );
    check_html(html).unwrap_or_else(|e| panic!("status page: {e}\n{html}"));
    assert!(
        !html.contains("<script") && !html.contains("http-equiv") && !html.contains("src="),
        "no scripts or external assets"
    );
    let row = |table: &str| {
        let start = html
            .find(&format!("<table id=\"{table}\">"))
            .unwrap_or_else(|| panic!("no {table} table"));
        html[start..start + html[start..].find("</table>").unwrap()].to_string()
    };
    let sources = row("sources");
    assert!(
        sources.contains("<td>default</td>") && sources.contains("<td class=\"up\">up</td>"),
        "{sources}"
    );
    let cache = row("cache");
    for line in [
        "<tr><th>archive hits (last hour)</th><td>3</td></tr>",
        "<tr><th>archive misses (last hour)</th><td>3</td></tr>",
        "<tr><th>archive hit ratio (last hour)</th><td>50.0 %</td></tr>",
        "<tr><th>archive hit ratio (since start)</th><td>50.0 %</td></tr>",
    ] {
        assert!(cache.contains(line), "{line} in {cache}");
    }
    // Each of the closure's three modules was asked for once per job.
    let modules = row("modules");
    assert_eq!(
        modules.matches("<tr><td>").count(),
        3,
        "three modules in {modules}"
    );
    assert_eq!(
        modules.matches("</td><td>2</td></tr>").count(),
        3,
        "{modules}"
    );
    assert!(modules.contains("<tr><td>alice/app</td>"), "{modules}");
    let jobs = row("jobs");
    assert!(
        jobs.contains("<tr><td>J1</td><td>3</td><td>0</td><td>3</td></tr>"),
        "{jobs}"
    );
    assert!(
        jobs.contains("<tr><td>J2</td><td>3</td><td>3</td><td>0</td></tr>"),
        "{jobs}"
    );

    // A job id that is not one is refused; an unknown job is a clear error.
    let out = curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{}/job/a%20b/git/index/info/refs", s.gateway.url()),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "400");
    let out = cli(&s, &["report", "--job", "never-seen"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("404"),
        "{out:?}"
    );
}

/// Now as RFC 3339 (UTC, seconds).
fn humantime_now() -> String {
    let out = crate::upstream::scenario::run(
        std::process::Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Through `HTTPS_PROXY` the job is the proxy user name `env --job` puts in the
/// proxy URL: curl (which sends it as `Proxy-Authorization` on its CONNECT) fetches
/// an archive twice from the intercepted download host, and the job's report
/// counts one cold archive and one from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_job_report_through_the_proxy() {
    if !crate::upstream::scenario::inside_loopback_namespace(
        module_path!(),
        "per_job_report_through_the_proxy",
    ) {
        return;
    }
    let intercept =
        "intercept_hosts = [\"mooncakes.io\", \"download.mooncakes.io\"]\n[proxy]\ntunnel = \"deny\"\n";
    let (s, json) = setup_configured(intercept, |r| r.publish("alice/json", "0.1.0", &[])).await;
    let data_dir = s.gateway.data_dir.to_str().unwrap().to_string();
    let out = cli(&s, &["env", "--job", "P1", "--data-dir", &data_dir]);
    ok(&out, "moonbit-registry env --job (proxy)");
    let exports = String::from_utf8_lossy(&out.stdout).to_string();
    let get = |name: &str| {
        exports
            .lines()
            .find_map(|l| l.strip_prefix(&format!("export {name}=")))
            .map(|v| v.trim_matches('\'').to_string())
            .unwrap_or_else(|| panic!("no {name} in {exports}"))
    };
    let proxy = get("HTTPS_PROXY");
    assert_eq!(proxy, format!("http://P1:@{}", s.gateway.addr));
    let bundle = get("SSL_CERT_FILE");
    let url = format!("https://download.mooncakes.io/user/{}.zip", json.segment);
    for _ in 0..2 {
        let out = curl(&[
            "-f",
            "-o",
            "/dev/null",
            "--proxy",
            &proxy,
            "--cacert",
            &bundle,
            &url,
        ]);
        ok(&out, "curl through the proxy");
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let out = cli(&s, &["report", "--job", "P1", "--json"]);
    ok(&out, "report");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["archives"], 2, "{r}");
    assert_eq!(r["modules_fetched_cold"], 1, "{r}");
    assert_eq!(r["archives_from_cache"], 1, "{r}");
    assert_eq!(r["bytes_served"], 2 * json.size, "{r}");
    assert_eq!(r["bytes_from_upstream"], json.size, "{r}");

    // A host that is not intercepted, with tunnels denied: refused, and counted.
    let out = curl(&[
        "-s",
        "-o",
        "/dev/null",
        "--proxy",
        &proxy,
        "https://example.com/",
    ]);
    assert!(!out.status.success());
    let m = scrape(&s.gateway);
    let tunnels = |d| value(&m, "moonbit_registry_tunnels_total", &[("decision", d)]);
    assert_eq!((tunnels("forbidden"), tunnels("allowed")), (1.0, 0.0));
    // The CONNECTs themselves are proxy requests; what came through them, archives.
    assert_eq!(archives(&m, "miss") + archives(&m, "hit"), 2.0);
    assert!(
        value(
            &m,
            "moonbit_registry_requests_total",
            &[("route", "proxy"), ("cache", "none")]
        ) >= 2.0
    );
}

/// Five clients asking at once for an archive the upstream sends slowly share one
/// fetch: the metrics count four waiters, one upstream request and one miss per client.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_clients_sharing_one_fetch() {
    let (s, big) = setup_configured("prefetch = false\n", |r| {
        r.publish("alice/big", "1.0.0", &[])
    })
    .await;
    s.upstream.set_fault(crate::upstream::Fault::DelayEach(
        std::time::Duration::from_millis(800),
    ));
    let url = format!("{}{}", s.gateway.url(), big.url_path());
    let clients: Vec<_> = (0..5)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || curl(&["-f", "-o", "/dev/null", &url]))
        })
        .collect();
    for c in clients {
        ok(&c.join().unwrap(), "download");
    }
    s.upstream.set_fault(crate::upstream::Fault::None);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(s.upstream.count("GET", &big.url_path()), 1);
    let m = scrape(&s.gateway);
    assert_eq!(value(&m, "moonbit_registry_flight_waiters_total", &[]), 4.0);
    assert_eq!(archives(&m, "miss"), 5.0);
    assert_eq!(
        value(
            &m,
            "moonbit_registry_served_bytes_total",
            &[("tier", "upstream")]
        ),
        5.0 * big.size as f64
    );
    assert_eq!(value(&m, "moonbit_registry_evictions_total", &[]), 0.0);
}

/// A strict check of the status page's HTML: a doctype, then elements that all
/// close in order (void elements excepted), attributes quoted.
fn check_html(html: &str) -> Result<(), String> {
    const VOID: &[&str] = &["meta", "br", "hr", "img", "link", "input"];
    let rest = html
        .strip_prefix("<!DOCTYPE html>")
        .ok_or("no <!DOCTYPE html> first")?;
    let mut open: Vec<String> = Vec::new();
    let mut at = rest;
    while let Some(lt) = at.find('<') {
        let gt = at[lt..].find('>').ok_or("a tag that never ends")? + lt;
        let tag = &at[lt + 1..gt];
        if let Some(name) = tag.strip_prefix('/') {
            match open.pop() {
                Some(top) if top == name => {}
                top => return Err(format!("</{name}> closes {top:?}")),
            }
        } else {
            let name = tag.split_whitespace().next().ok_or("an empty tag")?;
            if !name.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(format!("bad tag <{tag}>"));
            }
            let attrs = &tag[name.len()..];
            if attrs.matches('"').count() % 2 != 0 || (attrs.contains('=') && !attrs.contains('"'))
            {
                return Err(format!("unquoted attribute in <{tag}>"));
            }
            if !VOID.contains(&name) {
                open.push(name.to_string());
            }
        }
        at = &at[gt + 1..];
    }
    if open.is_empty() {
        Ok(())
    } else {
        Err(format!("never closed: {open:?}"))
    }
}

/// The status page in a real browser: headless Chromium takes a screenshot (kept
/// in the temp dir for a look) that must be a non-trivial PNG. Skipped, saying
/// so, when Chromium is not installed (`apt-get install chromium`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_renders_in_headless_chromium() {
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            std::process::Command::new("sh")
                .args(["-c", &format!("command -v {b}")])
                .output()
                .is_ok_and(|o| o.status.success())
        });
    let Some(browser) = found else {
        eprintln!("SKIPPED status_page_renders_in_headless_chromium: no chromium on PATH (apt-get install chromium)");
        return;
    };
    let (s, core) =
        crate::upstream::scenario::setup_with(|r| r.publish("alice/core", "0.1.0", &[])).await;
    // Something in the tables: one miss, one hit.
    for _ in 0..2 {
        let url = format!("{}{}", s.gateway.url(), core.url_path());
        ok(&curl(&["-fsS", "-o", "/dev/null", &url]), "GET the archive");
    }
    let dir = tempfile::tempdir().unwrap();
    let shot = dir.path().join("status.png");
    let out = crate::upstream::scenario::run(
        std::process::Command::new(browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                // Nothing of Chromium's own calls home (the machine has only loopback).
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--window-size=1024,900",
            ])
            .arg(format!("--screenshot={}", shot.display()))
            .arg(format!("{}/-/", s.gateway.url())),
    );
    ok(&out, "chromium --screenshot");
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 4096,
        "{} bytes",
        png.len()
    );
    eprintln!(
        "status page screenshot: {}",
        dir.keep().join("status.png").display()
    );
}
