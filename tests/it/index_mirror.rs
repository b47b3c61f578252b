//! The index mirror: clones and pulls answered from the gateway's own git mirror,
//! kept current, served stale when the upstream fails, and used to verify and
//! prefetch archives. Real `git` and `curl` against the real binary.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::upstream;
use crate::upstream::clients::sha256_hex;
use crate::upstream::scenario::{
    clone_index, curl, fetch, fetch_miss_then_hit, git, moon, moon_bin, moon_project, ok,
    refresh_index, setup_configured, setup_with,
};
use crate::upstream::Fault;

fn index_requests(s: &upstream::scenario::Setup) -> usize {
    s.upstream.count("GET", "/git/index") + s.upstream.count("POST", "/git/index")
}

fn read(dir: &std::path::Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap_or_default()
}

/// Wait (bounded) until `cond` holds.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A gateway refreshing its mirror on every clone, started and mirrored.
async fn mirrored_with_max_age_zero() -> upstream::scenario::Setup {
    let (s, _) = setup_configured("[index]\nmax_age = \"0s\"\n", |r| {
        r.publish("alice/json", "0.1.0", &[])
    })
    .await;
    eventually("the mirror exists", || {
        s.gateway.log().contains("index mirror refreshed")
    })
    .await;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clones_and_pulls_are_answered_from_the_mirror() {
    let (s, _) = setup_with(|r| r.publish("alice/json", "0.1.0", &[])).await;
    // The gateway mirrors the index at start; wait for that, then watch the upstream.
    eventually("the mirror exists", || {
        s.gateway.log().contains("index mirror refreshed")
    })
    .await;
    s.upstream.clear_requests();

    let work = tempfile::tempdir().unwrap();
    let shallow_v2 = work.path().join("v2");
    let shallow_v0 = work.path().join("v0");
    let full = work.path().join("full");
    ok(
        &clone_index(&s.gateway, &shallow_v2, "2", &["--depth", "1"]),
        "shallow clone, v2",
    );
    ok(
        &clone_index(&s.gateway, &shallow_v0, "0", &["--depth", "1"]),
        "shallow clone, v0",
    );
    ok(&clone_index(&s.gateway, &full, "2", &[]), "full clone");
    for dir in [&shallow_v2, &shallow_v0, &full] {
        assert!(read(dir, "user/alice/json.index").contains("\"0.1.0\""));
    }
    assert!(
        std::fs::metadata(shallow_v2.join(".git/shallow")).is_ok(),
        "not shallow"
    );
    assert_eq!(
        index_requests(&s),
        0,
        "a fresh mirror answered by itself: {:?}",
        s.upstream.requests()
    );

    // Published upstream, refreshed on request: every kind of clone pulls it.
    let newer = s.registry.publish("alice/json", "0.2.0", &[]);
    refresh_index(&s.gateway);
    for (dir, protocol) in [(&shallow_v2, "2"), (&shallow_v0, "0"), (&full, "2")] {
        let proto = format!("protocol.version={protocol}");
        ok(
            &git(Some(dir), &["-c", &proto, "pull", "origin", "main"]),
            "git pull",
        );
        assert!(read(dir, "user/alice/json.index").contains(&newer.checksum));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_old_mirror_is_refreshed_before_it_is_served() {
    let (s, _) = setup_configured("[index]\nmax_age = \"0s\"\n", |r| {
        r.publish("alice/json", "0.1.0", &[])
    })
    .await;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("clone");
    ok(
        &clone_index(&s.gateway, &dir, "2", &["--depth", "1"]),
        "clone",
    );
    let newer = s.registry.publish("alice/json", "0.2.0", &[]);
    ok(&git(Some(&dir), &["pull", "origin", "main"]), "pull");
    assert!(
        read(&dir, "user/alice/json.index").contains(&newer.checksum),
        "max_age 0 served an old tip"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clones_share_one_refresh() {
    let s = mirrored_with_max_age_zero().await;
    s.upstream.clear_requests();
    // Slow upstream answers keep the refresh open while all clones arrive.
    s.upstream
        .set_fault(Fault::DelayEach(Duration::from_millis(300)));
    let work = tempfile::tempdir().unwrap();
    let url = format!("{}/git/index", s.gateway.url());
    let children: Vec<_> = (0..12)
        .map(|i| {
            let dir = work.path().join(format!("c{i}"));
            std::process::Command::new("git")
                .args([
                    "clone",
                    "--depth",
                    "1",
                    "--single-branch",
                    "--no-tags",
                    &url,
                ])
                .arg(&dir)
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success(), "a concurrent clone failed");
    }
    let fetches = s.upstream.count("GET", "/git/index/info/refs");
    // One refresh serves everyone who asked before it started; those who arrived
    // during it share a second one.
    assert!(
        (1..=2).contains(&fetches),
        "{fetches} upstream fetches for 12 clones"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_mirror_is_served_when_the_upstream_fails() {
    let config = "[index]\nmax_age = \"0s\"\nretry_after = \"0s\"\nfetch_timeout = \"2s\"\n";
    let (s, _) = setup_configured(config, |r| r.publish("alice/json", "0.1.0", &[])).await;
    let work = tempfile::tempdir().unwrap();
    ok(
        &clone_index(
            &s.gateway,
            &work.path().join("first"),
            "2",
            &["--depth", "1"],
        ),
        "clone",
    );

    // 5xx, then a hang longer than the fetch timeout, then connection refused.
    s.upstream.set_fault(Fault::Status(500));
    ok(
        &clone_index(
            &s.gateway,
            &work.path().join("on500"),
            "2",
            &["--depth", "1"],
        ),
        "clone while upstream 500s",
    );
    s.upstream
        .set_fault(Fault::DelayEach(Duration::from_secs(30)));
    let started = Instant::now();
    ok(
        &clone_index(
            &s.gateway,
            &work.path().join("hang"),
            "2",
            &["--depth", "1"],
        ),
        "clone while upstream hangs",
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "waited {:?} on a hanging upstream",
        started.elapsed()
    );
    s.upstream.set_fault(Fault::None);
    s.upstream.stop().await;
    ok(
        &clone_index(
            &s.gateway,
            &work.path().join("down"),
            "0",
            &["--depth", "1"],
        ),
        "clone while upstream is down",
    );
    assert!(read(&work.path().join("down"), "user/alice/json.index").contains("\"0.1.0\""));

    let log = s.gateway.log();
    assert!(log.contains("serving the stale mirror"), "{log}");
    assert!(
        log.contains("age="),
        "the log does not say how stale: {log}"
    );
    assert!(log.contains("source=default"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_archive_that_disagrees_with_the_index_is_refused() {
    let (s, json) = setup_with(|r| r.publish("alice/json", "0.1.0", &[])).await;
    let tampered = Bytes::from_static(b"PK\x03\x04 not the published archive, same length? no");
    s.registry.set_archive_bytes(&json.key, tampered.clone());
    let tmp = tempfile::tempdir().unwrap();

    // The client sees a broken transfer (mismatch found mid-stream) or, if the
    // fetch had already failed when it asked, the 502: never a clean 200.
    let (out, _, head) = fetch(&s.gateway, &json.segment, &tmp.path().join("a"));
    let code = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        !out.status.success() || code == "502",
        "curl saw a clean end ({code}): {head}"
    );

    // Then: a clear 502 naming module, version and both digests, without refetching.
    let url = format!("{}/user/{}.zip", s.gateway.url(), json.segment);
    let out = curl(&["-w", "\n%{http_code}", &url]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.ends_with("502"), "{text}");
    assert!(text.contains("alice/json@0.1.0"), "{text}");
    assert!(text.contains(&json.checksum), "{text}");
    assert!(text.contains(&sha256_hex(&tampered)), "{text}");
    assert_eq!(s.upstream.count("GET", &json.url_path()), 1);
    let log = s.gateway.log();
    assert!(
        log.contains("does not match the index checksum") && log.contains(&json.checksum),
        "{log}"
    );

    // Fixed upstream + index refresh: the good copy is fetched, verified, stored.
    s.registry.set_archive_bytes(&json.key, json.zip.clone());
    refresh_index(&s.gateway);
    fetch_miss_then_hit(&s.gateway, &json, "download after the fix");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_freshly_published_archive_triggers_one_index_refresh() {
    let (s, _) = setup_with(|r| r.publish("alice/json", "0.1.0", &[])).await;
    eventually("the mirror exists", || {
        s.gateway.log().contains("index mirror refreshed")
    })
    .await;
    let fresh = s.registry.publish("alice/fresh", "1.0.0", &[]);
    s.upstream.clear_requests();
    fetch_miss_then_hit(&s.gateway, &fresh, "download of a just-published archive");
    assert_eq!(
        s.upstream.count("GET", "/git/index/info/refs"),
        1,
        "{:?}",
        s.upstream.requests()
    );

    // Unknown even after the refresh: passed on, never stored.
    let tmp2 = tempfile::tempdir().unwrap();
    let (out, _, _) = fetch(&s.gateway, "alice%2Fghost%2F1.0.0", &tmp2.path().join("g"));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_index_lines_are_skipped() {
    let (s, (v1, v2)) = setup_with(|r| {
        let v1 = r.publish("alice/json", "0.1.0", &[]);
        r.append_index_line("alice/json", "{this is not json");
        r.append_index_line("alice/json", r#"{"version":"0.1.5","checksum":"NOT-HEX"}"#);
        (v1, r.publish("alice/json", "0.2.0", &[]))
    })
    .await;
    for p in [&v1, &v2] {
        fetch_miss_then_hit(&s.gateway, p, "download next to malformed lines");
    }
    let log = s.gateway.log();
    assert!(log.contains("skipping malformed index line"), "{log}");
    assert!(log.contains("skipped=2"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dependencies_are_prefetched_unless_turned_off() {
    let modules = |r: &upstream::Registry| {
        let core = r.publish("alice/core", "0.1.0", &[]);
        let json = r.publish("alice/json", "0.1.0", &[("alice/core", "0.1.0")]);
        let app = r.publish("alice/app", "1.0.0", &[("alice/json", "0.1.0")]);
        (core, json, app)
    };
    let (s, (core, json, app)) = setup_with(modules).await;
    let tmp = tempfile::tempdir().unwrap();
    ok(
        &fetch(&s.gateway, &app.segment, &tmp.path().join("app")).0,
        "download app",
    );
    eventually("both dependencies are fetched", || {
        s.upstream.count("GET", &json.url_path()) == 1
            && s.upstream.count("GET", &core.url_path()) == 1
    })
    .await;
    for dep in [&json, &core] {
        // The fetch may still be committing; a hit or a join of that fetch, never a second download.
        let (out, body, _) = fetch(&s.gateway, &dep.segment, &tmp.path().join("dep"));
        ok(&out, "download a prefetched dependency");
        assert_eq!(sha256_hex(&body), dep.checksum);
        assert_eq!(s.upstream.count("GET", &dep.url_path()), 1);
    }

    let (s, (core, json, app)) = setup_configured("prefetch = false\n", modules).await;
    ok(
        &fetch(&s.gateway, &app.segment, &tmp.path().join("app2")).0,
        "download app",
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        s.upstream.count("GET", &json.url_path()) + s.upstream.count("GET", &core.url_path()),
        0
    );
}

/// Prefetch selects versions as moon does (minimal version selection): `app`
/// needs `x` 0.4.37 directly and 0.4.40 through `json`, so moon asks for 0.4.40
/// only, and the gateway must not fetch 0.4.37 (nor 0.4.38, never required).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefetch_fetches_only_the_versions_moon_asks_for() {
    let Some(bin) = moon_bin() else {
        eprintln!("SKIPPED prefetch_fetches_only_the_versions_moon_asks_for: set MOON_BIN to the moon client");
        return;
    };
    let (s, (x37, x38, x40, json, app)) = setup_with(|r| {
        let x37 = r.publish("alice/x", "0.4.37", &[]);
        let x38 = r.publish("alice/x", "0.4.38", &[]);
        let x40 = r.publish("alice/x", "0.4.40", &[]);
        let json = r.publish("alice/json", "0.1.0", &[("alice/x", "0.4.40")]);
        let app = r.publish(
            "alice/app",
            "1.0.0",
            &[("alice/x", "0.4.37"), ("alice/json", "0.1.0")],
        );
        (x37, x38, x40, json, app)
    })
    .await;
    let gw = s.gateway.url();
    let work = tempfile::tempdir().unwrap();
    let (home, cwd) = (work.path().join("home"), work.path().join("work"));
    std::fs::create_dir_all(&cwd).unwrap();
    ok(&moon(&bin, &home, &cwd, &gw, &["update"]), "moon update");
    let proj = moon_project(&bin, &home, &cwd, &gw);
    ok(
        &moon(&bin, &home, &proj, &gw, &["add", "alice/app"]),
        "moon add",
    );
    // Prefetches run in the background: give them time to (wrongly) happen.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (p, wanted) in [(&x37, 0), (&x38, 0), (&x40, 1), (&json, 1), (&app, 1)] {
        assert_eq!(
            s.upstream.count("GET", &p.url_path()),
            wanted,
            "{} fetched from the upstream",
            p.url_path()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moon_works_from_the_mirror_and_store_with_the_upstream_down() {
    let Some(bin) = moon_bin() else {
        eprintln!("SKIPPED moon_works_from_the_mirror_and_store_with_the_upstream_down: set MOON_BIN to the moon client");
        return;
    };
    let (s, _) = setup_with(|r| {
        r.publish("alice/core", "0.1.0", &[]);
        r.publish(
            "bob/lex/runtime",
            "0.2.0+build7",
            &[("alice/core", "0.1.0")],
        );
        r.publish("alice/app", "1.0.0", &[("bob/lex/runtime", "0.2.0+build7")]);
    })
    .await;
    let gw = s.gateway.url();
    let work = tempfile::tempdir().unwrap();
    let run_moon = |round: &str| {
        let home = work.path().join(format!("home-{round}"));
        let cwd = work.path().join(format!("work-{round}"));
        let proj = moon_project(&bin, &home, &cwd, &gw);
        let out = moon(&bin, &home, &proj, &gw, &["add", "alice/app"]);
        ok(&out, &format!("moon add ({round})"));
        for dir in ["alice/app", "bob/lex+runtime", "alice/core"] {
            assert!(
                cwd.join("proj/.mooncakes")
                    .join(dir)
                    .join("moon.mod.json")
                    .is_file(),
                "{round}: {dir} missing"
            );
        }
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    run_moon("warm");
    s.upstream.stop().await;
    // Index from the mirror, archives from the store. (symbols.zip is not cached
    // yet, so moon may warn about it; nothing else may fail.)
    let stderr = run_moon("upstream-down");
    assert!(stderr.contains("Registry index"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_clones_share_one_pack_computation() {
    let (s, _) = setup_with(|r| {
        for i in 0..20 {
            r.publish(&format!("alice/m{i}"), "0.1.0", &[]);
        }
    })
    .await;
    let work = tempfile::tempdir().unwrap();
    let cache = s.gateway.data_dir.join("index").join(".pack-cache");
    let packs = || {
        std::fs::read_dir(&cache)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "pack"))
                    .count()
            })
            .unwrap_or(0)
    };
    for i in 0..3 {
        let dir = work.path().join(format!("c{i}"));
        ok(
            &clone_index(&s.gateway, &dir, "2", &["--depth", "1"]),
            "shallow clone",
        );
        assert!(read(&dir, "user/alice/m19.index").contains("0.1.0"));
        // The first clone computed and kept the pack; the others replayed it.
        assert_eq!(packs(), 1, "clone {i}");
    }
    // Another shape of request (a full clone) is its own entry, and works too.
    ok(
        &clone_index(&s.gateway, &work.path().join("full"), "2", &[]),
        "full clone",
    );
    assert_eq!(packs(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_upstream_delays_a_clone_by_seconds_at_most() {
    // Default fetch timeout (minutes): only the bounded wait keeps the clone quick.
    let s = mirrored_with_max_age_zero().await;
    s.upstream
        .set_fault(Fault::DelayEach(Duration::from_secs(60)));
    let work = tempfile::tempdir().unwrap();
    let started = Instant::now();
    ok(
        &clone_index(&s.gateway, &work.path().join("c"), "2", &["--depth", "1"]),
        "clone while the upstream hangs",
    );
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "the clone waited {took:?} on a hanging upstream"
    );
    assert!(read(&work.path().join("c"), "user/alice/json.index").contains("0.1.0"));
    assert!(
        s.gateway
            .log()
            .contains("refresh continues in the background"),
        "{}",
        s.gateway.log()
    );
    s.upstream.stop().await;
}
