//! The shared tier: replicas with their own data dirs sharing one bucket of a real
//! S3-compatible store (SeaweedFS on loopback), in front of one counting upstream.
//! Skipped, saying so, without `weed`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::upstream::admin;
use crate::upstream::clients::sha256_hex;
use crate::upstream::scenario::{curl, fetch, moon_bin, moon_update_and_add, ok};
use crate::upstream::seaweed::Seaweed;
use crate::upstream::{Gateway, Published, Registry, Upstream};

/// Two replicas (`a`, `b`) with separate data dirs, one bucket, one upstream.
struct Cluster {
    upstream: Upstream,
    store: Seaweed,
    a: Gateway,
    b: Gateway,
    /// The replicas' config file (for commands beside them).
    config: PathBuf,
    _config_dir: tempfile::TempDir,
}

/// Bucket prefix the replicas share.
const PREFIX: &str = "cluster";

async fn cluster<T>(
    test: &str,
    extra_toml: &str,
    publish: impl FnOnce(&Registry) -> T,
) -> Option<(Cluster, T)> {
    cluster_with(test, "", extra_toml, publish).await
}

/// [`cluster`] with `shared_toml` added to the `[storage.shared]` table.
async fn cluster_with<T>(
    test: &str,
    shared_toml: &str,
    extra_toml: &str,
    publish: impl FnOnce(&Registry) -> T,
) -> Option<(Cluster, T)> {
    let store = Seaweed::start(test)?;
    let registry = Arc::new(Registry::new());
    let published = publish(&registry);
    let upstream = Upstream::start(registry.clone()).await;
    let config_dir = tempfile::tempdir().expect("temp dir for the config");
    let config = config_dir.path().join("moonbit-registry.toml");
    let toml = format!("{}{shared_toml}\n{extra_toml}", store.toml(PREFIX));
    std::fs::write(&config, toml).expect("write config");
    let args = ["--config", config.to_str().expect("UTF-8 path")];
    let env = Seaweed::env();
    let a = Gateway::start_with_env(&upstream.url(), &upstream.ca_pem, &args, &env).await;
    let b = Gateway::start_with_env(&upstream.url(), &upstream.ca_pem, &args, &env).await;
    let cluster = Cluster {
        upstream,
        store,
        a,
        b,
        config,
        _config_dir: config_dir,
    };
    Some((cluster, published))
}

impl Cluster {
    fn archive_gets(&self, p: &Published) -> usize {
        self.upstream.count("GET", &p.url_path())
    }

    fn object_key(p: &Published) -> String {
        format!("{PREFIX}/sha256/{}", p.checksum)
    }

    /// Wait (bounded) until the bucket holds `p` with its right bytes.
    fn wait_uploaded(&self, p: &Published) {
        let started = Instant::now();
        loop {
            let (status, body) = self.store.get(&Cluster::object_key(p));
            if status == "200" && sha256_hex(&body) == p.checksum {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{} never reached the shared tier (status {status}); replica a's log:\n{}",
                p.key,
                self.a.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// GET an archive through `gw`: (curl's exit success, status, body sha256, head).
fn get(gw: &Gateway, p: &Published) -> (bool, String, String, String) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let (out, body, head) = fetch(gw, &p.segment, &tmp.path().join("a.zip"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        sha256_hex(&body),
        head,
    )
}

fn health(gw: &Gateway) -> serde_json::Value {
    let out = curl(&["-s", &format!("{}/-/health", gw.url())]);
    serde_json::from_slice(&out.stdout).expect("health is JSON")
}

fn shared_bytes_served(gw: &Gateway) -> u64 {
    let out = curl(&["-s", &format!("{}/-/metrics", gw.url())]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines()
        .find(|l| l.starts_with("moonbit_registry_served_bytes_total{tier=\"shared\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test]
async fn an_archive_fetched_through_one_replica_is_served_by_the_other_without_the_upstream() {
    let test = "an_archive_fetched_through_one_replica_is_served_by_the_other_without_the_upstream";
    let Some((c, p)) = cluster(test, "", |r| r.publish("alice/json", "0.1.0", &[])).await else {
        return;
    };
    let (done, status, sha, head) = get(&c.a, &p);
    assert!(
        done && status == "200" && sha == p.checksum,
        "{status} {head}"
    );
    assert!(head.contains("x-cache: miss"), "{head}");
    c.wait_uploaded(&p);
    assert_eq!(c.archive_gets(&p), 1);

    let (done, status, sha, head) = get(&c.b, &p);
    assert!(done && status == "200", "{status} {head}\n{}", c.b.log());
    assert_eq!(sha, p.checksum);
    assert!(
        head.contains("x-cache: hit"),
        "a shared-tier copy is a hit: {head}"
    );
    assert_eq!(
        c.archive_gets(&p),
        1,
        "replica b asked the upstream: {:?}",
        c.upstream.requests()
    );
    assert_eq!(
        shared_bytes_served(&c.b),
        p.size,
        "served_bytes_total{{tier=\"shared\"}}"
    );
    // Now on b's own disk: a plain hit, no more shared-tier bytes.
    let (_, _, sha, head) = get(&c.b, &p);
    assert!(sha == p.checksum && head.contains("x-cache: hit"), "{head}");
    assert_eq!(shared_bytes_served(&c.b), p.size);

    let h = health(&c.b);
    assert_eq!(h["shared"]["state"], "up", "{h}");
    assert_eq!(
        h["shared"]["url"],
        format!("s3://{}/{PREFIX}", c.store.bucket),
        "{h}"
    );
    assert!(
        c.store.keys(&format!("{PREFIX}/lease/")).is_empty(),
        "a lease was left behind"
    );
    let page = curl(&["-s", &format!("{}/-/", c.b.url())]);
    let page = String::from_utf8_lossy(&page.stdout);
    let line = format!("s3://{}/{PREFIX} (up)", c.store.bucket);
    assert!(
        page.contains(&line),
        "the status page does not show {line}:\n{page}"
    );
}

#[tokio::test]
async fn fifty_cold_requests_over_two_replicas_cause_one_upstream_fetch() {
    let test = "fifty_cold_requests_over_two_replicas_cause_one_upstream_fetch";
    let Some((c, p)) = cluster(test, "", |r| r.publish_sized("alice/big", "1.0.0", 4 << 20)).await
    else {
        return;
    };
    let (a, b) = (c.a.url(), c.b.url());
    let handles: Vec<_> = (0..50)
        .map(|i| {
            let url = format!(
                "{}/user/{}.zip",
                if i % 2 == 0 { &a } else { &b },
                p.segment
            );
            std::thread::spawn(move || {
                let out = std::process::Command::new("curl")
                    .args(["-s", "--max-time", "60", "-o", "-", &url])
                    .env_remove("http_proxy")
                    .env_remove("HTTP_PROXY")
                    .output()
                    .expect("run curl");
                (out.status.success(), sha256_hex(&out.stdout))
            })
        })
        .collect();
    for h in handles {
        let (done, sha) = h.join().expect("client thread");
        assert!(
            done,
            "a client's transfer failed\na: {}\nb: {}",
            c.a.log(),
            c.b.log()
        );
        assert_eq!(sha, p.checksum);
    }
    assert_eq!(
        c.archive_gets(&p),
        1,
        "the cluster fetched the archive more than once:\na: {}\nb: {}",
        c.a.log(),
        c.b.log()
    );
    let both = format!("{}{}", c.a.log(), c.b.log());
    assert!(both.contains("fetched from the shared tier"), "{both}");
}

#[tokio::test]
async fn with_the_store_down_replicas_serve_what_they_hold_and_fetch_the_rest_without_waiting() {
    let test =
        "with_the_store_down_replicas_serve_what_they_hold_and_fetch_the_rest_without_waiting";
    let Some((mut c, (x, y, z))) = cluster(test, "", |r| {
        (
            r.publish("alice/x", "1.0.0", &[]),
            r.publish("alice/y", "1.0.0", &[]),
            r.publish("alice/z", "1.0.0", &[]),
        )
    })
    .await
    else {
        return;
    };
    assert_eq!(get(&c.a, &x).2, x.checksum);
    c.wait_uploaded(&x);
    assert_eq!(get(&c.b, &x).2, x.checksum);
    assert_eq!(c.archive_gets(&x), 1);

    c.store.kill();
    for gw in [&c.a, &c.b] {
        for p in [&x, &y, &z] {
            let started = Instant::now();
            let (done, status, sha, head) = get(gw, p);
            assert!(
                done && status == "200" && sha == p.checksum,
                "{status} {head}\n{}",
                gw.log()
            );
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "{} took {:?} with the store down",
                p.key,
                started.elapsed()
            );
        }
    }
    // Held: not fetched again. The rest: once per replica, as without a shared tier.
    assert_eq!(c.archive_gets(&x), 1);
    assert_eq!(c.archive_gets(&y), 2);
    assert_eq!(c.archive_gets(&z), 2);
    let started = Instant::now();
    loop {
        let h = health(&c.a);
        if h["shared"]["state"] == "down" {
            assert!(h["shared"]["last_error"].is_string(), "{h}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the shared tier never showed down: {h}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_store_that_stops_answering_costs_at_most_its_short_timeout_then_nothing() {
    let test = "a_store_that_stops_answering_costs_at_most_its_short_timeout_then_nothing";
    let Some((c, ps)) = cluster_with(test, "first_byte_timeout = \"1s\"\n", "", |r| {
        (0..6)
            .map(|i| r.publish(&format!("alice/m{i}"), "1.0.0", &[]))
            .collect::<Vec<_>>()
    })
    .await
    else {
        return;
    };
    c.store.freeze();
    let mut took = Vec::new();
    for p in &ps {
        let started = Instant::now();
        let (done, status, sha, head) = get(&c.a, p);
        assert!(
            done && status == "200" && sha == p.checksum,
            "{status} {head}\n{}",
            c.a.log()
        );
        took.push(started.elapsed());
    }
    // Each of the first few waits for the 1 s timeout at most (a lookup and a
    // lease: two); once the breaker has the store down ([breaker] failures = 3),
    // nothing waits on it at all: well under one timeout, with room for a loaded
    // machine's fetch.
    assert!(
        took.iter().all(|t| *t < Duration::from_millis(3000)),
        "{took:?}"
    );
    assert!(
        took[4..].iter().all(|t| *t < Duration::from_millis(900)),
        "{took:?}"
    );
    assert_eq!(health(&c.a)["shared"]["state"], "down");
}

#[tokio::test]
async fn a_flipped_byte_in_the_shared_tier_is_detected_not_served_and_replaced() {
    let test = "a_flipped_byte_in_the_shared_tier_is_detected_not_served_and_replaced";
    let Some((c, p)) = cluster(test, "", |r| {
        r.publish_sized("alice/flip", "1.0.0", 1 << 20)
    })
    .await
    else {
        return;
    };
    assert_eq!(get(&c.a, &p).2, p.checksum);
    c.wait_uploaded(&p);
    let key = Cluster::object_key(&p);
    let (_, mut bytes) = c.store.get(&key);
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    c.store.put(&key, &bytes);
    assert_ne!(sha256_hex(&c.store.get(&key).1), p.checksum);

    // The first answer from b may be cut short, never a complete wrong archive.
    let (done, status, sha, _) = get(&c.b, &p);
    assert!(
        !done || (status == "200" && sha == p.checksum),
        "bad bytes were served as complete: status {status}"
    );
    let (done, status, sha, head) = get(&c.b, &p);
    assert!(
        done && status == "200" && sha == p.checksum,
        "{status} {head}\n{}",
        c.b.log()
    );
    assert!(
        c.b.log().contains("does not match the index checksum"),
        "{}",
        c.b.log()
    );
    assert_eq!(
        c.archive_gets(&p),
        2,
        "b fetched a good copy from the upstream"
    );
    // b replaced the bad object with its verified copy.
    c.wait_uploaded(&p);
}

/// VmHWM (peak resident set) of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Stream an archive through `gw` into sha256sum: (curl's status code, digest).
fn digest_through(gw: &Gateway, p: &Published) -> (String, String) {
    let url = format!("{}/user/{}.zip", gw.url(), p.segment);
    let script = format!("curl -s -f --max-time 600 '{url}' | sha256sum");
    let out = std::process::Command::new("sh")
        .args(["-c", &script])
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .output()
        .expect("run curl | sha256sum");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    (
        out.status.to_string(),
        text.split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string(),
    )
}

#[tokio::test]
async fn a_one_gib_archive_goes_through_the_shared_tier_in_bounded_memory() {
    let test = "a_one_gib_archive_goes_through_the_shared_tier_in_bounded_memory";
    let Some((c, p)) = cluster(test, "[storage]\nmemory = \"16 MiB\"\n", |r| {
        r.publish_sized("alice/huge", "1.0.0", 1 << 30)
    })
    .await
    else {
        return;
    };
    let (_, sha) = digest_through(&c.a, &p);
    assert_eq!(sha, p.checksum, "through a\n{}", c.a.log());
    // The upload (in parts, from the file) runs after the client's transfer.
    let started = Instant::now();
    while c.store.keys(&format!("{PREFIX}/sha256/")).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "never uploaded\n{}",
            c.a.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    while c.store.keys(&format!("{PREFIX}/lease/")).len() == 1 {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "lease never released\n{}",
            c.a.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (_, sha) = digest_through(&c.b, &p);
    assert_eq!(sha, p.checksum, "through b\n{}", c.b.log());
    assert_eq!(
        c.archive_gets(&p),
        1,
        "b went to the upstream\n{}",
        c.b.log()
    );
    assert!(
        c.b.log().contains("fetched from the shared tier"),
        "{}",
        c.b.log()
    );
    let (rss_a, rss_b) = (peak_rss(c.a.pid().unwrap()), peak_rss(c.b.pid().unwrap()));
    eprintln!(
        "1 GiB through the shared tier: peak RSS {} MiB uploading (a), {} MiB downloading (b)",
        rss_a >> 20,
        rss_b >> 20
    );
    assert!(rss_a < 200 << 20, "replica a peaked at {} MiB", rss_a >> 20);
    assert!(rss_b < 200 << 20, "replica b peaked at {} MiB", rss_b >> 20);
}

#[tokio::test]
async fn moon_adds_a_closure_through_one_replica_after_a_warm_through_the_other_without_the_upstream(
) {
    let test = "moon_adds_a_closure_through_one_replica_after_a_warm_through_the_other_without_the_upstream";
    let Some(bin) = moon_bin() else {
        eprintln!("SKIPPED {test}: set MOON_BIN to the moon client");
        return;
    };
    let Some((c, _)) = cluster(test, "", |r| {
        (
            r.publish("alice/core", "0.1.0", &[]),
            r.publish("bob/lex/runtime", "0.2.0", &[("alice/core", "0.1.0")]),
            r.publish("alice/app", "1.0.0", &[("bob/lex/runtime", "0.2.0")]),
        )
    })
    .await
    else {
        return;
    };
    // `warm` beside replica a, on its data dir: the one job that fills the cluster.
    let config = c.config.to_str().expect("UTF-8 path");
    let project = tempfile::tempdir().expect("project dir");
    let from = project.path().join("moon.mod.json");
    std::fs::write(
        &from,
        r#"{"name":"tester/proj","version":"0.1.0","deps":{"alice/app":"1.0.0"}}"#,
    )
    .expect("write moon.mod.json");
    let from = from.to_str().expect("UTF-8 path");
    let warm = admin::command(
        &["warm", "--config", config, "--from", from],
        Some(&c.a.data_dir),
        Some(&c.upstream),
    )
    .envs(Seaweed::env())
    .output()
    .expect("run warm");
    ok(&warm, "warm");
    let said = admin::stdout(&warm);
    assert!(
        said.contains("warm: 3 fetched"),
        "{said}{}",
        admin::stderr(&warm)
    );
    assert!(said.contains("shared tier"), "{said}");
    let archives = c.store.keys(&format!("{PREFIX}/sha256/"));
    assert_eq!(archives.len(), 3, "{archives:?}");

    c.upstream.clear_requests();
    let work = tempfile::tempdir().expect("moon work dir");
    moon_update_and_add(&bin, work.path(), &c.b.url(), "alice/app");
    let archive_gets: Vec<_> = c
        .upstream
        .requests()
        .into_iter()
        .filter(|(_, path)| path.starts_with("/user/"))
        .collect();
    assert!(
        archive_gets.is_empty(),
        "b asked the upstream for archives: {archive_gets:?}"
    );
    assert!(
        c.b.log().contains("fetched from the shared tier"),
        "{}",
        c.b.log()
    );
}

#[tokio::test]
async fn cache_list_and_verify_look_at_the_shared_tier_and_import_fills_it() {
    let test = "cache_list_and_verify_look_at_the_shared_tier_and_import_fills_it";
    let Some((c, (p, q))) = cluster(test, "", |r| {
        (
            r.publish("alice/p", "1.0.0", &[]),
            r.publish("alice/q", "1.0.0", &[]),
        )
    })
    .await
    else {
        return;
    };
    let config = c.config.to_str().expect("UTF-8 path");
    let shared_cmd = |args: &[&str], data: &std::path::Path| {
        let mut full = args.to_vec();
        full.extend(["--config", config]);
        admin::command(&full, Some(data), None)
            .envs(Seaweed::env())
            .output()
            .expect("run the command")
    };
    assert_eq!(get(&c.a, &p).2, p.checksum);
    c.wait_uploaded(&p);

    let list = shared_cmd(&["cache", "list", "--shared", "--json"], &c.a.data_dir);
    ok(&list, "cache list --shared");
    let rows: serde_json::Value = serde_json::from_slice(&list.stdout).expect("JSON list");
    assert_eq!(rows.as_array().map(Vec::len), Some(1), "{rows}");
    assert_eq!(rows[0]["sha256"], p.checksum.as_str());
    assert_eq!(rows[0]["size"], p.size);

    let clean = shared_cmd(&["cache", "verify", "--shared"], &c.a.data_dir);
    ok(&clean, "cache verify --shared");
    let key = Cluster::object_key(&p);
    let (_, mut bytes) = c.store.get(&key);
    bytes[0] ^= 0xff;
    c.store.put(&key, &bytes);
    let found = shared_cmd(&["cache", "verify", "--shared"], &c.a.data_dir);
    assert_eq!(found.status.code(), Some(1), "{}", admin::stdout(&found));
    assert!(
        admin::stdout(&found).contains("corrupt (removed)"),
        "{}",
        admin::stdout(&found)
    );
    assert!(c.store.keys(&format!("{PREFIX}/sha256/")).is_empty());

    // A bundle made without the shared tier, imported with it: the import uploads.
    let plain = tempfile::tempdir().expect("data dir");
    let bundle = plain.path().join("deps.tar");
    let export = admin::run(
        &[
            "export",
            "alice/q",
            "--out",
            bundle.to_str().expect("UTF-8 path"),
        ],
        Some(plain.path()),
        Some(&c.upstream),
    );
    ok(&export, "export");
    assert!(c.store.keys(&format!("{PREFIX}/sha256/")).is_empty());
    let target = tempfile::tempdir().expect("data dir");
    let upstream_url = c.upstream.url();
    let args = [
        "import",
        bundle.to_str().expect("UTF-8 path"),
        "--upstream",
        &upstream_url,
    ];
    let import = shared_cmd(&args, target.path());
    ok(&import, "import");
    assert!(
        admin::stdout(&import).contains("shared tier"),
        "{}",
        admin::stdout(&import)
    );
    c.wait_uploaded(&q);
}

#[tokio::test]
async fn a_live_lease_is_waited_for_at_most_wait_and_an_expired_one_is_taken_over() {
    let test = "a_live_lease_is_waited_for_at_most_wait_and_an_expired_one_is_taken_over";
    let Some((c, (live, dead))) = cluster_with(test, "wait = \"1s\"\n", "", |r| {
        (
            r.publish("alice/live", "1.0.0", &[]),
            r.publish("alice/dead", "1.0.0", &[]),
        )
    })
    .await
    else {
        return;
    };
    let lease = |p: &Published, expires: u64| {
        let body = format!(r#"{{"replica":"gone-1","expires_unix":{expires}}}"#);
        c.store
            .put(&format!("{PREFIX}/lease/{}", p.checksum), body.as_bytes());
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    // A replica holds a live lease and never uploads: a waits `wait`, then fetches.
    lease(&live, now + 3600);
    let started = Instant::now();
    let (done, status, sha, _) = get(&c.a, &live);
    let took = started.elapsed();
    assert!(
        done && status == "200" && sha == live.checksum,
        "{}",
        c.a.log()
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "waited {took:?} for a lease with wait = 1s"
    );
    assert_eq!(c.archive_gets(&live), 1);
    assert!(c
        .a
        .log()
        .contains("did not land in the shared tier in time"));
    c.wait_uploaded(&live);

    // A lease whose replica died long ago is taken over at once.
    lease(&dead, now - 60);
    let started = Instant::now();
    let (done, status, sha, _) = get(&c.b, &dead);
    assert!(
        done && status == "200" && sha == dead.checksum,
        "{}",
        c.b.log()
    );
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert!(c.b.log().contains("taking it over"), "{}", c.b.log());
    c.wait_uploaded(&dead);
    let started = Instant::now();
    while c
        .store
        .keys(&format!("{PREFIX}/lease/{}", dead.checksum))
        .len()
        == 1
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the taken-over lease stayed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
