//! Mutable resources and upstream outages: `symbols.zip` revalidated by RFC 9111
//! (304s refresh without a download), served stale when the upstream returns 5xx,
//! is stopped or hangs, or is silent past `mutable.revalidate_timeout` (stale-on-
//! slow), a per-source circuit breaker that answers at once while the source is
//! down and closes after a probe (a request's, or the background one's with no
//! traffic at all), remembered archive 404s, and the real `moon` client working at
//! full speed against an upstream that never answers, from the first try on.
//! End to end for `src/mutable_cache.rs` and `src/breaker.rs`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::upstream;
use crate::upstream::clients::sha256_hex;
use crate::upstream::scenario::{
    curl_get, fetch, moon, moon_bin, moon_project, ok, refresh_index, setup_configured,
};
use crate::upstream::Fault;

/// One response as curl saw it.
struct Got {
    status: String,
    /// Response head, lower-cased.
    head: String,
    body: Vec<u8>,
    took: Duration,
}

impl Got {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            (n.trim() == name).then(|| v.trim().to_string())
        })
    }
}

fn get(gw: &upstream::Gateway, path: &str, headers: &[&str]) -> Got {
    let started = Instant::now();
    let (status, head, body) = curl_get(gw, path, headers);
    Got {
        status,
        head,
        body,
        took: started.elapsed(),
    }
}

fn health(gw: &upstream::Gateway) -> serde_json::Value {
    let got = get(gw, "/-/health", &[]);
    serde_json::from_slice(&got.body).expect("health is JSON")
}

fn symbols_requests(s: &upstream::scenario::Setup) -> Vec<upstream::SeenRequest> {
    s.upstream
        .seen()
        .into_iter()
        .filter(|r| r.path == "/symbols.zip")
        .collect()
}

/// A `symbols.zip` that differs per `n`.
fn symbols_v(n: u32) -> Bytes {
    let text = format!("test symbols, version {n}\n");
    upstream::registry::zip_of(&[("README.txt", text.as_bytes())])
}

/// Wait (bounded) until `cond` holds.
async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn symbols_are_revalidated_and_replaced_by_rfc_9111() {
    let (s, _) = setup_configured("", |r| {
        r.set_symbols(symbols_v(1));
        r.set_symbols_cache_control(Some("max-age=1"));
    })
    .await;
    let (v1, etag1) = s.registry.symbols();

    let first = get(&s.gateway, "/symbols.zip", &[]);
    assert_eq!(first.status, "200", "{}", first.head);
    assert_eq!(first.body, v1);
    assert_eq!(first.header("x-cache").as_deref(), Some("miss"));
    assert_eq!(first.header("etag").as_deref(), Some(etag1.as_str()));

    // Fresh (max-age=1): from the store, the upstream is not asked.
    let hit = get(&s.gateway, "/symbols.zip", &[]);
    assert_eq!(hit.body, v1);
    assert_eq!(hit.header("x-cache").as_deref(), Some("hit"));
    // A client's own conditional request matching the stored ETag: 304 from the gateway.
    let inm = format!("If-None-Match: {etag1}");
    let not_modified = get(&s.gateway, "/symbols.zip", &[&inm]);
    assert_eq!(not_modified.status, "304", "{}", not_modified.head);
    assert!(not_modified.body.is_empty());
    assert_eq!(symbols_requests(&s).len(), 1, "fresh copies answer alone");

    // Changed upstream, asked after max-age: revalidated with the old ETag, new bytes.
    let etag2 = s.registry.set_symbols(symbols_v(2));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let changed = get(&s.gateway, "/symbols.zip", &[&inm]);
    assert_eq!(changed.status, "200", "{}", changed.head);
    assert_eq!(changed.body, symbols_v(2));
    assert_eq!(changed.header("etag").as_deref(), Some(etag2.as_str()));
    let seen = symbols_requests(&s);
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].header("if-none-match"), Some(etag1.as_str()));

    // Unchanged upstream after max-age: a 304 upstream (no body re-sent), same bytes.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let revalidated = get(&s.gateway, "/symbols.zip", &[]);
    assert_eq!(revalidated.status, "200");
    assert_eq!(revalidated.body, symbols_v(2));
    assert_eq!(
        revalidated.header("x-cache").as_deref(),
        Some("revalidated")
    );
    let seen = symbols_requests(&s);
    assert_eq!(seen.len(), 3);
    assert_eq!(
        seen[2].header("if-none-match"),
        Some(etag2.as_str()),
        "the upstream can only have answered 304"
    );
    // The 304 refreshed the stored policy: fresh again, the upstream is not asked.
    let hit = get(&s.gateway, "/symbols.zip", &[]);
    assert_eq!(hit.header("x-cache").as_deref(), Some("hit"));
    assert_eq!(symbols_requests(&s).len(), 3);

    // Requests with credentials never touch the cache.
    let private = get(&s.gateway, "/symbols.zip", &["Authorization: Bearer t"]);
    assert_eq!(private.header("x-cache").as_deref(), Some("bypass"));
    let seen = symbols_requests(&s);
    assert_eq!(
        seen.last().unwrap().header("authorization"),
        Some("Bearer t")
    );
    assert!(s.gateway.log().contains("revalidated: not modified"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_copy_is_served_at_once_while_one_background_revalidation_runs() {
    let config = "[freshness]\nstale_while_revalidate = \"1h\"\n";
    let (s, _) = setup_configured(config, |r| {
        r.set_symbols(symbols_v(1));
    })
    .await;
    assert_eq!(get(&s.gateway, "/symbols.zip", &[]).body, symbols_v(1));
    // No Cache-Control: stale at once. Changed upstream: the stored copy answers now,
    // marked stale, and the revalidation behind it brings the new one.
    s.registry.set_symbols(symbols_v(2));
    let stale = get(&s.gateway, "/symbols.zip", &[]);
    assert_eq!(stale.body, symbols_v(1));
    assert_eq!(stale.header("x-cache").as_deref(), Some("stale"));
    assert!(
        stale
            .header("warning")
            .is_some_and(|w| w.starts_with("110")),
        "{}",
        stale.head
    );
    let gw = &s.gateway;
    eventually(
        "the background revalidation stored v2",
        Duration::from_secs(10),
        || get(gw, "/symbols.zip", &[]).body == symbols_v(2),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stored_copies_are_served_through_outages_and_the_breaker_closes_after_a_probe() {
    let config = r#"
[timeouts]
response = "1s"
[health]
failures = 3
backoff = "1s"
backoff_max = "2s"
"#;
    let (s, (json, later)) = setup_configured(config, |r| {
        r.set_symbols(symbols_v(1));
        (
            r.publish("alice/json", "0.1.0", &[]),
            r.publish("alice/json", "0.2.0", &[]),
        )
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    // Warm: one archive and symbols.zip (no Cache-Control: stale at once, always revalidated).
    let (out, body, _) = fetch(&s.gateway, &json.segment, &tmp.path().join("a"));
    ok(&out, "warm archive");
    assert_eq!(sha256_hex(&body), json.checksum);
    assert_eq!(get(&s.gateway, "/symbols.zip", &[]).body, symbols_v(1));

    let stale_ok = |got: &Got, what: &str| {
        assert_eq!(got.status, "200", "{what}: {}", got.head);
        assert_eq!(got.body, symbols_v(1), "{what}");
        assert_eq!(got.header("x-cache").as_deref(), Some("stale"), "{what}");
        assert!(
            got.header("warning").is_some_and(|w| w.starts_with("111")),
            "{what}: {}",
            got.head
        );
    };
    // 1. The upstream answers 500.
    s.upstream.set_fault(Fault::Status(500));
    stale_ok(&get(&s.gateway, "/symbols.zip", &[]), "upstream 500");
    // 2. The upstream is stopped (connection refused).
    s.upstream.set_fault(Fault::None);
    s.upstream.stop().await;
    stale_ok(&get(&s.gateway, "/symbols.zip", &[]), "upstream stopped");
    assert_eq!(health(&s.gateway)["sources"][0]["state"], "up");
    // 3. The upstream hangs for 30 s: one wait of the response timeout, then the
    //    third consecutive failure opens the breaker.
    s.upstream.restart().await;
    s.upstream
        .set_fault(Fault::DelayEach(Duration::from_secs(30)));
    stale_ok(&get(&s.gateway, "/symbols.zip", &[]), "upstream hangs");
    let h = health(&s.gateway);
    let source = &h["sources"][0];
    assert_eq!(source["state"], "down", "{h}");
    assert_eq!(source["name"], "default", "{h}");
    assert!(source["since"].as_str().is_some(), "{h}");
    assert!(
        source["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("no response head")),
        "{h}"
    );

    // Circuit open, upstream still hanging: everything the store holds comes at once.
    let before = s.upstream.count("GET", "/");
    for round in 0..3 {
        let got = get(&s.gateway, "/symbols.zip", &[]);
        stale_ok(&got, "breaker open");
        assert!(
            got.took < Duration::from_secs(1),
            "round {round}: symbols took {:?}",
            got.took
        );
        let started = Instant::now();
        let (out, body, head) = fetch(&s.gateway, &json.segment, &tmp.path().join("b"));
        ok(&out, "stored archive while down");
        assert_eq!(sha256_hex(&body), json.checksum);
        assert!(head.contains("x-cache: hit"), "{head}");
        assert!(started.elapsed() < Duration::from_secs(1));
        // What the store does not hold fails fast, and says why.
        let started = Instant::now();
        let (out, body, _) = fetch(&s.gateway, &later.segment, &tmp.path().join("c"));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "502");
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("is down"), "{text}");
        assert!(started.elapsed() < Duration::from_secs(1), "{text}");
    }
    // At most one probe per back-off went out meanwhile.
    assert!(s.upstream.count("GET", "/") - before <= 2);

    // The upstream comes back with new content: a probe closes the breaker, and
    // fresh content flows again.
    s.upstream.stop().await; // drops the hanging requests
    s.upstream.set_fault(Fault::None);
    s.upstream.restart().await;
    s.registry.set_symbols(symbols_v(2));
    let gw = &s.gateway;
    eventually("new symbols are served", Duration::from_secs(10), || {
        get(gw, "/symbols.zip", &[]).body == symbols_v(2)
    })
    .await;
    assert_eq!(health(gw)["sources"][0]["state"], "up");
    let (out, body, _) = fetch(gw, &later.segment, &tmp.path().join("d"));
    ok(&out, "archive after recovery");
    assert_eq!(sha256_hex(&body), later.checksum);
    let log = gw.log();
    assert!(log.contains("source marked down"), "{log}");
    assert!(log.contains("serving the stored copy (stale-if-error)"));
    assert!(log.contains("source is up again"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_that_breaks_off_is_never_served_or_stored() {
    let (s, _) = setup_configured("", |r| {
        r.set_symbols(symbols_v(1));
    })
    .await;
    // Nothing stored yet: a 502, never a partial 200.
    s.upstream.set_fault(Fault::TruncateSymbols);
    let broken = get(&s.gateway, "/symbols.zip", &[]);
    assert_eq!(broken.status, "502", "{}", broken.head);
    let text = String::from_utf8_lossy(&broken.body).to_string();
    assert!(
        text.contains("upstream failed") && text.contains("broke off"),
        "{text}"
    );
    s.upstream.set_fault(Fault::None);
    assert_eq!(get(&s.gateway, "/symbols.zip", &[]).body, symbols_v(1));
    // Stored: the new copy breaks off, the old one is served stale, and kept.
    s.registry.set_symbols(symbols_v(2));
    s.upstream.set_fault(Fault::TruncateSymbols);
    let stale = get(&s.gateway, "/symbols.zip", &[]);
    assert_eq!(stale.body, symbols_v(1));
    assert_eq!(stale.header("x-cache").as_deref(), Some("stale"));
    s.upstream.set_fault(Fault::None);
    let fixed = get(&s.gateway, "/symbols.zip", &[]);
    assert_eq!(fixed.body, symbols_v(2));
    assert_eq!(fixed.header("x-cache").as_deref(), Some("miss"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn archive_404s_are_remembered_until_the_index_lists_the_version() {
    let config = "[freshness]\nnot_found_ttl = \"1h\"\n";
    let (s, _) = setup_configured(config, |r| r.publish("alice/json", "0.1.0", &[])).await;
    let tmp = tempfile::tempdir().unwrap();
    let segment = "alice%2Fjson%2F0.2.0";
    let path = format!("/user/{segment}.zip");
    let (out, _, _) = fetch(&s.gateway, segment, &tmp.path().join("a"));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
    let index_requests = s.upstream.count("GET", "/git/index");
    for _ in 0..3 {
        let (out, _, head) = fetch(&s.gateway, segment, &tmp.path().join("b"));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
        assert!(head.contains("x-cache: hit"), "{head}");
    }
    assert_eq!(s.upstream.count("GET", &path), 1, "remembered");
    assert_eq!(
        s.upstream.count("GET", "/git/index"),
        index_requests,
        "no index refresh for a remembered 404"
    );

    // Published: forgotten as soon as the index mirror shows the version.
    let p = s.registry.publish("alice/json", "0.2.0", &[]);
    refresh_index(&s.gateway);
    let (out, body, _) = fetch(&s.gateway, segment, &tmp.path().join("c"));
    ok(&out, "download after publish");
    assert_eq!(sha256_hex(&body), p.checksum);
}

/// A listener that accepts connections and never answers (not even TLS).
struct BlackHole {
    task: tokio::task::JoinHandle<()>,
}

impl BlackHole {
    async fn on(addr: SocketAddr) -> BlackHole {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_reuseaddr(true).unwrap();
            match socket.bind(addr).and_then(|_| socket.listen(128)) {
                Ok(l) => break l,
                Err(e) if Instant::now() > deadline => panic!("cannot listen on {addr}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        BlackHole { task }
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moon_runs_at_full_speed_while_the_upstream_never_answers() {
    let Some(bin) = moon_bin() else {
        eprintln!("SKIPPED moon_runs_at_full_speed_while_the_upstream_never_answers: set MOON_BIN to the moon client");
        return;
    };
    // Every index advertisement refreshes the mirror, so the outage is met at once.
    let config = r#"
[timeouts]
response = "1s"
[index]
max_age = "0s"
retry_after = "0s"
fetch_timeout = "2s"
[health]
failures = 2
backoff = "60s"
"#;
    let (s, _) = setup_configured(config, |r| {
        r.set_symbols(symbols_v(1));
        r.publish("alice/core", "0.1.0", &[]);
        r.publish("alice/app", "1.0.0", &[("alice/core", "0.1.0")]);
    })
    .await;
    let gw = s.gateway.url();
    let work = tempfile::tempdir().unwrap();
    let run_moon = |round: &str| -> (Duration, String) {
        let home = work.path().join(format!("home-{round}"));
        let cwd = work.path().join(format!("work-{round}"));
        let proj = moon_project(&bin, &home, &cwd, &gw);
        let started = Instant::now();
        let update = moon(&bin, &home, &proj, &gw, &["update"]);
        ok(&update, &format!("moon update ({round})"));
        let add = moon(&bin, &home, &proj, &gw, &["add", "alice/app"]);
        ok(&add, &format!("moon add ({round})"));
        let took = started.elapsed();
        for dir in ["alice/app", "alice/core"] {
            let m = proj.join(".mooncakes").join(dir).join("moon.mod.json");
            assert!(m.is_file(), "{round}: {dir} missing");
        }
        assert!(
            symbols_present(&home),
            "{round}: symbols.zip was not unpacked"
        );
        let stderr = format!(
            "{}{}",
            String::from_utf8_lossy(&update.stderr),
            String::from_utf8_lossy(&add.stderr)
        );
        (took, stderr)
    };
    let (healthy, stderr) = run_moon("healthy");
    assert!(!stderr.to_lowercase().contains("warn"), "{stderr}");

    // The upstream is replaced by a listener that accepts and never answers.
    s.upstream.stop().await;
    let _hole = BlackHole::on(s.upstream.addr).await;
    // The first run meets the outage: its index refresh times out, which marks the
    // source slow (nothing waits on it any more), and failures mark it down.
    let (first, stderr) = run_moon("outage-starts");
    assert!(!stderr.to_lowercase().contains("warn"), "{stderr}");
    let h = health(&s.gateway);
    assert!(
        h["sources"][0]["state"] == "down" || h["sources"][0]["slow"] == true,
        "{h}"
    );
    // From then on: index from the mirror, symbols.zip and archives from the store,
    // nothing waits on the upstream.
    let (outage, stderr) = run_moon("outage");
    assert!(!stderr.to_lowercase().contains("warn"), "{stderr}");
    eprintln!(
        "moon update + add: healthy {healthy:?}, outage starting {first:?}, circuit open {outage:?}"
    );
    assert!(
        outage < healthy + Duration::from_millis(1500),
        "circuit open took {outage:?}, healthy {healthy:?}"
    );
    // The exchanges left running in the background fail in turn and open the breaker.
    eventually("the breaker opens", Duration::from_secs(10), || {
        health(&s.gateway)["sources"][0]["state"] == "down"
    })
    .await;
}

fn symbols_present(home: &Path) -> bool {
    std::fs::read_dir(home.join("registry/symbols"))
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn responses_over_the_size_limit_are_passed_through_not_refused() {
    let (s, _) = setup_configured("[freshness]\nmutable_max = \"16 B\"\n", |r| {
        r.set_symbols(symbols_v(1));
        r.set_symbols_cache_control(Some("max-age=600"));
    })
    .await;
    let (v1, _) = s.registry.symbols();
    assert!(v1.len() > 16);
    for _ in 0..2 {
        let got = get(&s.gateway, "/symbols.zip", &[]);
        assert_eq!(got.status, "200", "{}", got.head);
        assert_eq!(got.body, v1);
    }
    // Not stored, so each request went upstream.
    assert_eq!(symbols_requests(&s).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_first_moon_update_after_the_upstream_dies_takes_seconds() {
    let Some(bin) = moon_bin() else {
        eprintln!("SKIPPED the_first_moon_update_after_the_upstream_dies_takes_seconds: set MOON_BIN to the moon client");
        return;
    };
    // Default upstream timeouts (25 s for a response head, minutes for a git
    // fetch) and breaker: only `mutable.revalidate_timeout` and
    // `index.refresh_wait` (2 s each by default) bound what a client waits while
    // nothing has failed yet. max_age 0: every advertisement asks the upstream.
    let config = "[index]\nmax_age = \"0s\"\n";
    let (s, _) = setup_configured(config, |r| {
        r.set_symbols(symbols_v(1));
        r.publish("alice/core", "0.1.0", &[]);
    })
    .await;
    let gw = s.gateway.url();
    let work = tempfile::tempdir().unwrap();
    let update = |round: &str| -> Duration {
        let home = work.path().join(format!("home-{round}"));
        let cwd = work.path().join(format!("work-{round}"));
        let proj = moon_project(&bin, &home, &cwd, &gw);
        let started = Instant::now();
        let out = moon(&bin, &home, &proj, &gw, &["update"]);
        let took = started.elapsed();
        ok(&out, &format!("moon update ({round})"));
        assert!(
            symbols_present(&home),
            "{round}: symbols.zip was not unpacked"
        );
        assert!(
            home.join("registry/index/user/alice/core.index").is_file(),
            "{round}: the index was not cloned"
        );
        took
    };
    let healthy = update("healthy");

    // The upstream dies: a listener that accepts and never answers (not even TLS),
    // so every exchange would wait for the full upstream timeouts.
    s.upstream.stop().await;
    let _hole = BlackHole::on(s.upstream.addr).await;
    let first = update("first-after-outage");
    eprintln!("moon update: healthy {healthy:?}, first try against a silent upstream {first:?}");
    assert!(
        first < Duration::from_secs(5),
        "the first moon update against a silent upstream took {first:?}"
    );
    // The index wait gave up once; symbols.zip then did not wait at all.
    let log = s.gateway.log();
    assert!(log.contains("refresh continues in the background"), "{log}");
    assert!(log.contains("source is slow"), "{log}");
    assert!(log.contains("its source is down or slow"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stored_symbols_zip_is_served_after_revalidate_timeout_when_the_upstream_is_silent() {
    // Default timeouts: the upstream would hold a request for 25 s; the default
    // `mutable.revalidate_timeout` (2 s) is what bounds the wait.
    let (s, _) = setup_configured("", |r| {
        r.set_symbols(symbols_v(1));
    })
    .await;
    assert_eq!(get(&s.gateway, "/symbols.zip", &[]).body, symbols_v(1));
    s.upstream.stop().await;
    let _hole = BlackHole::on(s.upstream.addr).await;
    // Two clients in a row (two CI jobs): the first waits the revalidate timeout,
    // not the response timeout; the source is then known slow, so the second is
    // answered at once while a revalidation goes on in the background.
    for (client, waits) in [("first", true), ("second", false)] {
        let got = get(&s.gateway, "/symbols.zip", &[]);
        eprintln!(
            "{client} symbols.zip against a silent upstream: {:?}",
            got.took
        );
        assert_eq!(got.status, "200", "{client}: {}", got.head);
        assert_eq!(got.body, symbols_v(1), "{client}");
        assert_eq!(got.header("x-cache").as_deref(), Some("stale"), "{client}");
        assert!(
            got.header("warning").is_some_and(|w| w.starts_with("111")),
            "{client}: {}",
            got.head
        );
        let expected = if waits {
            Duration::from_millis(1900)..Duration::from_millis(3500)
        } else {
            Duration::ZERO..Duration::from_millis(1000)
        };
        assert!(
            expected.contains(&got.took),
            "{client}: answered after {:?}",
            got.took
        );
    }
    assert!(s
        .gateway
        .log()
        .contains("did not answer within 2s; revalidation continues in the background"));
    // Nothing failed yet (the upstream's own timeout has not run out): still up,
    // but known slow.
    let health = health(&s.gateway);
    assert_eq!(health["sources"][0]["state"], "up");
    assert_eq!(health["sources"][0]["slow"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_revalidation_finishes_in_the_background_and_updates_the_stored_copy() {
    let config = "[mutable]\nrevalidate_timeout = \"300ms\"\n";
    let (s, _) = setup_configured(config, |r| {
        r.set_symbols(symbols_v(1));
    })
    .await;
    assert_eq!(get(&s.gateway, "/symbols.zip", &[]).body, symbols_v(1));
    // A slow upstream with new content: the old copy now, the new one once the
    // revalidation left running has stored it.
    s.registry.set_symbols(symbols_v(2));
    s.upstream
        .set_fault(Fault::DelayEach(Duration::from_millis(1500)));
    let slow = get(&s.gateway, "/symbols.zip", &[]);
    assert_eq!(slow.body, symbols_v(1));
    assert!(
        slow.header("warning").is_some_and(|w| w.starts_with("111")),
        "{}",
        slow.head
    );
    assert!(slow.took < Duration::from_millis(1200), "{:?}", slow.took);
    s.upstream.set_fault(Fault::None);
    let gw = &s.gateway;
    eventually(
        "the background revalidation stored v2",
        Duration::from_secs(10),
        || gw.log().matches("stored a new copy").count() >= 2,
    )
    .await;
    let fresh = get(gw, "/symbols.zip", &[]);
    assert_eq!(fresh.body, symbols_v(2));
    // The first download, the slow revalidation, and this request's own (a 304).
    assert_eq!(symbols_requests(&s).len(), 3);
    assert_eq!(fresh.header("x-cache").as_deref(), Some("revalidated"));
    assert_eq!(health(gw)["sources"][0]["state"], "up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_breaker_closes_without_traffic_when_the_upstream_comes_back() {
    let config = r#"
[timeouts]
connect = "1s"
response = "1s"
[breaker]
failures = 1
backoff = "300ms"
backoff_max = "600ms"
"#;
    let (s, _) = setup_configured(config, |r| {
        r.set_symbols(symbols_v(1));
    })
    .await;
    let gw = &s.gateway;
    assert_eq!(get(gw, "/symbols.zip", &[]).body, symbols_v(1));
    // Upstream down: one failure opens the breaker.
    s.upstream.stop().await;
    let stale = get(gw, "/symbols.zip", &[]);
    assert_eq!(stale.body, symbols_v(1));
    assert_eq!(health(gw)["sources"][0]["state"], "down");
    // Probes go out by themselves meanwhile, fail, and keep the source down.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let h = health(gw);
    assert_eq!(h["sources"][0]["state"], "down", "{h}");
    assert!(gw.log().contains("probe failed; source stays down"), "{h}");

    // Upstream back; from here on only /-/health is asked, which never goes upstream.
    s.upstream.restart().await;
    s.upstream.clear_requests();
    let back = Instant::now();
    eventually(
        "/-/health shows the source up",
        Duration::from_secs(5),
        || health(gw)["sources"][0]["state"] == "up",
    )
    .await;
    eprintln!(
        "source up again {:?} after the upstream came back",
        back.elapsed()
    );
    let seen = s.upstream.seen();
    assert!(!seen.is_empty(), "no probe reached the upstream");
    assert!(
        seen.iter()
            .all(|r| r.method == "GET" && r.path == "/git/index/info/refs?service=git-upload-pack"),
        "{:?}",
        seen.iter().map(|r| &r.path).collect::<Vec<_>>()
    );
    assert!(gw.log().contains("source is up again"));
}
