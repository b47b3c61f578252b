//! The gateway as a registry endpoint (`MOONCAKES_REGISTRY=http://gw`): real `git`,
//! `curl` and `moon` against the real binary, in front of a real TLS test upstream.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::upstream::clients::sha256_hex;
use crate::upstream::scenario::{
    curl, fetch, fetch_miss_then_hit, git, moon, moon_bin, moon_project, ok, refresh_index, run,
    setup_configured, setup_with,
};
use crate::upstream::{Fault, Gateway};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn index_clones_shallow_and_pulls_through_the_gateway() {
    let (s, _) = setup_with(|r| r.publish("alice/json", "0.1.0", &[])).await;
    let work = tempfile::tempdir().unwrap();
    for (name, protocol) in [("v2", "2"), ("v0", "0")] {
        let dir = work.path().join(name);
        let url = format!("{}/git/index", s.gateway.url());
        let proto = format!("protocol.version={protocol}");
        let out = git(
            None,
            &[
                "-c",
                &proto,
                "clone",
                "--depth",
                "1",
                "--single-branch",
                "--no-tags",
                &url,
                dir.to_str().unwrap(),
            ],
        );
        ok(&out, "git clone through the gateway");
        let index = std::fs::read_to_string(dir.join("user/alice/json.index")).unwrap();
        assert!(index.contains("\"0.1.0\""), "{index}");
    }
    // A new version published upstream reaches an existing clone with `git pull`
    // once the gateway's mirror has refreshed (here: on request).
    let newer = s.registry.publish("alice/json", "0.2.0", &[]);
    refresh_index(&s.gateway);
    for (name, protocol) in [("v2", "2"), ("v0", "0")] {
        let dir = work.path().join(name);
        let proto = format!("protocol.version={protocol}");
        let out = git(Some(&dir), &["-c", &proto, "pull", "origin", "main"]);
        ok(&out, "git pull through the gateway");
        let index = std::fs::read_to_string(dir.join("user/alice/json.index")).unwrap();
        assert!(
            index.contains(&newer.checksum),
            "pull did not bring 0.2.0: {index}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn archives_are_stored_once_and_served_when_the_upstream_is_down() {
    let (s, json) = setup_with(|r| r.publish("alice/json", "0.1.0", &[])).await;
    let tmp = tempfile::tempdir().unwrap();
    let path = format!("/user/{}.zip", json.segment);

    let (out, first, head) = fetch(&s.gateway, &json.segment, &tmp.path().join("a"));
    ok(&out, "first download");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    assert!(head.contains("x-cache: miss"), "{head}");
    assert_eq!(sha256_hex(&first), json.checksum);

    let (out, second, head) = fetch(&s.gateway, &json.segment, &tmp.path().join("b"));
    ok(&out, "second download");
    assert!(head.contains("x-cache: hit"), "{head}");
    assert!(
        head.contains(&format!("content-length: {}", json.zip.len())),
        "{head}"
    );
    assert_eq!(first, second);
    assert_eq!(
        s.upstream.count("GET", &path),
        1,
        "the upstream saw a second request"
    );

    s.upstream.stop().await;
    let (out, third, _) = fetch(&s.gateway, &json.segment, &tmp.path().join("c"));
    ok(&out, "download with the upstream stopped");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    assert_eq!(third, first);

    // A store hit survives a gateway restart (disk tier, not only memory).
    let data_dir = s.gateway.data_dir.clone();
    drop(s.gateway);
    let again =
        Gateway::start_with_data_dir(&s.upstream.url(), &s.upstream.ca_pem, &data_dir, &[]).await;
    let (out, fourth, head) = fetch(&again, &json.segment, &tmp.path().join("d"));
    ok(&out, "download after restart, upstream still down");
    assert!(head.contains("x-cache: hit"), "{head}");
    assert_eq!(fourth, first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_misses_cause_one_upstream_fetch() {
    let (s, big) = setup_with(|r| r.publish_sized("alice/big", "1.0.0", 2 << 20)).await;
    // A slow body keeps the fetch open while all fifty clients arrive.
    s.upstream.set_fault(Fault::SlowArchives {
        chunk: 64 * 1024,
        interval: Duration::from_millis(15),
    });
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("{}/user/{}.zip", s.gateway.url(), big.segment);
    let mut children = Vec::new();
    for i in 0..50 {
        let file = tmp.path().join(format!("{i}.zip"));
        let child = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "60",
                "-o",
                file.to_str().unwrap(),
                &url,
            ])
            .spawn()
            .unwrap();
        children.push((file, child));
    }
    for (file, mut child) in children {
        let status = child.wait().unwrap();
        assert!(status.success(), "a concurrent download failed: {status}");
        let bytes = std::fs::read(&file).unwrap();
        assert_eq!(
            sha256_hex(&bytes),
            big.checksum,
            "wrong bytes in {}",
            file.display()
        );
    }
    assert_eq!(
        s.upstream
            .count("GET", &format!("/user/{}.zip", big.segment)),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_miss_streams_before_the_upstream_finishes() {
    let (s, big) = setup_with(|r| r.publish_sized("alice/slow", "1.0.0", 1 << 20)).await;
    // The index is mirrored before the clock starts: a request the gateway cannot
    // yet check against the index waits for a refresh, which is not the streaming
    // under test (on a loaded machine that wait alone was a third of the total).
    refresh_index(&s.gateway);
    // 16 chunks, 100 ms apart: the upstream needs about 1.6 s for the whole body.
    s.upstream.set_fault(Fault::SlowArchives {
        chunk: 64 * 1024,
        interval: Duration::from_millis(100),
    });
    let url = format!("{}/user/{}.zip", s.gateway.url(), big.segment);
    let started = Instant::now();
    let mut resp = reqwest::get(&url).await.unwrap();
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.unwrap().expect("a first chunk");
    let first_at = started.elapsed();
    let mut all = first.to_vec();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        all.extend_from_slice(&chunk);
    }
    let total = started.elapsed();
    assert_eq!(sha256_hex(&all), big.checksum);
    assert!(
        first_at * 3 < total,
        "first bytes after {first_at:?} of {total:?}: the gateway buffered the body"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_cut_short_is_never_stored() {
    let (s, (json, big)) = setup_with(|r| {
        (
            r.publish("alice/json", "0.1.0", &[]),
            r.publish_sized("alice/big", "1.0.0", 1 << 20),
        )
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    s.upstream.set_fault(Fault::TruncateArchives);
    for p in [&json, &big] {
        // An aborted transfer, or a 502 if the fetch had failed before curl joined it.
        let (out, _, _) = fetch(&s.gateway, &p.segment, &tmp.path().join("cut"));
        let code = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            !out.status.success() || code == "502",
            "curl saw a clean end ({code}) of a truncated body of {}",
            p.name
        );
    }
    // Nothing was committed: the next request goes upstream again and is complete.
    s.upstream.set_fault(Fault::None);
    for p in [&json, &big] {
        let (out, body, head) = fetch(&s.gateway, &p.segment, &tmp.path().join("whole"));
        ok(&out, "download after the fault cleared");
        assert!(head.contains("x-cache: miss"), "{head}");
        assert_eq!(sha256_hex(&body), p.checksum);
        assert_eq!(
            s.upstream.count("GET", &format!("/user/{}.zip", p.segment)),
            2
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_without_content_length_is_stored_with_its_length() {
    let (s, (json, big)) = setup_with(|r| {
        (
            r.publish("alice/json", "0.1.0", &[]),
            r.publish_sized("alice/big", "1.0.0", 1 << 20),
        )
    })
    .await;
    s.upstream.set_fault(Fault::ChunkedArchives);
    for p in [&json, &big] {
        let hit = fetch_miss_then_hit(&s.gateway, p, "download of a chunked archive");
        let want = format!("content-length: {}", p.size);
        assert!(hit.contains(&want), "{hit}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn not_found_is_passed_on_and_not_stored() {
    let (s, _) = setup_with(|_| ()).await;
    let tmp = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let (out, _, head) = fetch(&s.gateway, "alice%2Fnope%2F0.1.0", &tmp.path().join("x"));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "404", "{head}");
    }
    // The second 404 came from the gateway's short memory of the first.
    assert_eq!(s.upstream.count("GET", "/user/alice%2Fnope%2F0.1.0.zip"), 1);
    // Published afterwards, it is found as soon as the index shows it (moon syncs
    // the index before it downloads).
    let p = s.registry.publish("alice/nope", "0.1.0", &[]);
    refresh_index(&s.gateway);
    let (out, body, _) = fetch(&s.gateway, &p.segment, &tmp.path().join("y"));
    ok(&out, "download after publish");
    assert_eq!(sha256_hex(&body), p.checksum);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_and_private_requests() {
    let (s, json) = setup_with(|r| r.publish("alice/json", "0.1.0", &[])).await;
    let gw = s.gateway.url();
    let code = |args: &[&str]| {
        let mut all = vec!["-o", "/dev/null", "-w", "%{http_code}"];
        all.extend_from_slice(args);
        String::from_utf8_lossy(&curl(&all).stdout).to_string()
    };
    // Path tricks are refused before anything reaches the upstream or the disk.
    assert_eq!(
        code(&[
            "--path-as-is",
            &format!("{gw}/user/..%2F..%2Fetc%2F1.0.0.zip")
        ]),
        "400"
    );
    assert_eq!(
        code(&[&format!("{gw}/user/alice%2Fjson%2Fnot-a-version.zip")]),
        "400"
    );
    assert_eq!(
        code(&["-X", "POST", &format!("{gw}/git/index/git-receive-pack")]),
        "403"
    );
    assert_eq!(s.upstream.count("GET", "/user/"), 0);

    // HEAD on a miss asks the upstream but starts no download.
    let url = format!("{gw}/user/{}.zip", json.segment);
    assert_eq!(code(&["-I", &url]), "200");
    assert_eq!(s.upstream.count("GET", "/user/"), 0);

    // Requests with credentials are never served from or stored in the cache.
    for _ in 0..2 {
        assert_eq!(code(&["-H", "Authorization: Bearer t0ken", &url]), "200");
    }
    assert_eq!(
        s.upstream
            .count("GET", &format!("/user/{}.zip", json.segment)),
        2
    );
    assert_eq!(code(&[&url]), "200");
    assert_eq!(code(&[&url]), "200");
    assert_eq!(
        s.upstream
            .count("GET", &format!("/user/{}.zip", json.segment)),
        3
    );

    // Unknown paths go to the upstream untouched.
    assert_eq!(code(&[&format!("{gw}/api/v0/search?kw=json")]), "404");
    assert_eq!(s.upstream.count("GET", "/api/v0/search?kw=json"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wasm_assets_are_cached_like_archives() {
    let (s, _) = setup_with(|_| ()).await;
    let wasm = b"\0asm\x01\0\0\0 a tiny module".to_vec();
    let sum = format!("{}  tool.wasm\n", sha256_hex(&wasm));
    s.registry
        .put_asset("alice/tool@1.0.0/tool.wasm", wasm.clone());
    s.registry.put_asset(
        "alice/tool@1.0.0/tool.wasm.sha256",
        sum.clone().into_bytes(),
    );
    let tmp = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        for (name, want) in [
            ("tool.wasm.sha256", sum.as_bytes()),
            ("tool.wasm", &wasm[..]),
        ] {
            let file = tmp.path().join(name);
            let url = format!("{}/assets/alice/tool@1.0.0/{name}", s.gateway.url());
            ok(
                &curl(&["-f", "-o", file.to_str().unwrap(), &url]),
                "asset download",
            );
            assert_eq!(std::fs::read(&file).unwrap(), want);
        }
    }
    assert_eq!(
        s.upstream
            .count("GET", "/assets/alice/tool@1.0.0/tool.wasm"),
        2,
        "wasm + .sha256, once each"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_configuration_is_one_clear_line() {
    let bin = env!("CARGO_BIN_EXE_moonbit-registry");
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 3] = [
        (
            &["serve", "--upstream", "ftp://example"],
            "must be http:// or https://",
        ),
        (
            &["serve", "--config", "/nonexistent/moonbit-registry.toml"],
            "does not exist",
        ),
        (
            &[
                "serve",
                "--upstream-ca",
                "/nonexistent/ca.pem",
                "--listen",
                "127.0.0.1:0",
            ],
            "upstream CA",
        ),
    ];
    for (args, expect) in cases {
        let out = run(Command::new(bin)
            .args(args)
            .arg("--data-dir")
            .arg(tmp.path())
            .env("RUST_LOG", "off"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let toml = tmp.path().join("bad.toml");
    std::fs::write(&toml, "listen = \"not an address\"\n").unwrap();
    let out = run(Command::new(bin)
        .args(["serve", "--config", toml.to_str().unwrap()])
        .env("RUST_LOG", "off"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("listen"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moon_update_and_add_through_the_gateway() {
    let Some(bin) = moon_bin() else {
        eprintln!("SKIPPED moon_update_and_add_through_the_gateway: set MOON_BIN to the moon client (CI sets it to ../shared/tools/moon)");
        return;
    };
    let (s, published) = setup_with(|r| {
        [
            r.publish("alice/core", "0.1.0", &[]),
            r.publish("alice/json", "0.1.0", &[("alice/core", "0.1.0")]),
            r.publish("bob/lex/runtime", "0.1.0", &[]),
            r.publish("carol/meta", "0.1.0+build5", &[("alice/core", "0.1.0")]),
            r.publish(
                "alice/app",
                "0.1.0",
                &[
                    ("alice/json", "0.1.0"),
                    ("bob/lex/runtime", "0.1.0"),
                    ("carol/meta", "0.1.0+build5"),
                ],
            ),
        ]
    })
    .await;
    let gw = s.gateway.url();
    let work = tempfile::tempdir().unwrap();
    let mut archive_requests = 0;
    for round in 0..2 {
        let home = work.path().join(format!("home{round}"));
        let cwd = work.path().join(format!("work{round}"));
        std::fs::create_dir_all(&cwd).unwrap();
        let out = moon(&bin, &home, &cwd, &gw, &["update"]);
        ok(&out, "moon update");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("Warning"), "moon update warned: {stderr}");

        let proj = moon_project(&bin, &home, &cwd, &gw);
        let out = moon(&bin, &home, &proj, &gw, &["add", "alice/app"]);
        ok(&out, "moon add");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("Warning"), "moon add warned: {stderr}");
        for dir in [
            "alice/app",
            "alice/json",
            "alice/core",
            "bob/lex+runtime",
            "carol/meta",
        ] {
            let root = proj.join(".mooncakes").join(dir);
            assert!(
                root.join("moon.mod.json").is_file(),
                "{dir} missing from .mooncakes ({stderr})"
            );
        }
        let now: usize = published
            .iter()
            .map(|p| s.upstream.count("GET", &format!("/user/{}.zip", p.segment)))
            .sum();
        if round == 0 {
            assert_eq!(now, published.len(), "each archive fetched upstream once");
        } else {
            assert_eq!(
                now, archive_requests,
                "the second run fetched archives upstream"
            );
        }
        archive_requests = now;
    }
}

/// `[server] auth` (issue 13): the registry endpoint wants Basic credentials;
/// `moonbit-registry env --registry` exports a URL carrying them, and moon (its
/// HTTP client and git) works through it, archives cached as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moon_works_with_registry_credentials_from_env() {
    let toml = "[server]\nauth = \"ci:s3cret\"\n";
    let (s, published) = setup_configured(toml, |r| {
        [
            r.publish("alice/core", "0.1.0", &[]),
            r.publish("alice/json", "0.1.0", &[("alice/core", "0.1.0")]),
        ]
    })
    .await;
    let gw = s.gateway.url();
    let port = gw.rsplit(':').next().unwrap();
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("gateway.toml");
    std::fs::write(&config, toml).unwrap();
    let out = run(Command::new(env!("CARGO_BIN_EXE_moonbit-registry")).args([
        "env",
        "--registry",
        "--config",
        config.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{port}"),
    ]));
    ok(&out, "env --registry");
    let exported = String::from_utf8_lossy(&out.stdout).to_string();
    let registry = exported
        .trim()
        .strip_prefix("export MOONCAKES_REGISTRY='")
        .and_then(|r| r.strip_suffix('\''))
        .unwrap_or_else(|| panic!("not one export: {exported}"))
        .to_string();
    assert_eq!(registry, format!("http://ci:s3cret@127.0.0.1:{port}"));

    // Without the credentials: 401 with a Basic challenge, nothing fetched.
    let url = format!("{gw}/user/{}.zip", published[0].segment);
    let out = curl(&["-sS", "-o", "/dev/null", "-D", "-", &url]);
    let head = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(head.starts_with("http/1.1 401"), "{head}");
    assert!(head.contains("www-authenticate: basic"), "{head}");
    // With them: cached like any other request (the credentials are the gateway's).
    for expected in ["miss", "hit"] {
        let out = curl(&["-sS", "-u", "ci:s3cret", "-o", "/dev/null", "-D", "-", &url]);
        let head = String::from_utf8_lossy(&out.stdout).to_lowercase();
        assert!(head.contains(&format!("x-cache: {expected}")), "{head}");
    }

    let Some(bin) = moon_bin() else {
        eprintln!("SKIPPED the moon part of moon_works_with_registry_credentials_from_env: set MOON_BIN to the moon client");
        return;
    };
    let (home, cwd) = (work.path().join("home"), work.path().join("work"));
    std::fs::create_dir_all(&cwd).unwrap();
    ok(
        &moon(&bin, &home, &cwd, &registry, &["update"]),
        "moon update",
    );
    let proj = moon_project(&bin, &home, &cwd, &registry);
    ok(
        &moon(&bin, &home, &proj, &registry, &["add", "alice/json"]),
        "moon add",
    );
    for dir in ["alice/json", "alice/core"] {
        assert!(
            proj.join(".mooncakes")
                .join(dir)
                .join("moon.mod.json")
                .is_file(),
            "{dir} missing from .mooncakes"
        );
    }
    // And moon without the credentials is refused.
    let home2 = work.path().join("home2");
    let out = moon(&bin, &home2, &cwd, &gw, &["update"]);
    assert!(
        !out.status.success(),
        "moon update without credentials succeeded"
    );
}
