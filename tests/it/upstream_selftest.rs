//! Self tests of the integration-test harness in `tests/it/upstream/`: the test
//! registry and its HTTPS server, driven by real `git`, `curl` and reqwest.
//! They do not need the gateway binary.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::upstream::clients::{self, curl, git_trusting, run, run_ok, sha256_file, sha256_hex};
use crate::upstream::registry::temp_home;
use crate::upstream::{Fault, Registry, Upstream};

async fn upstream_with(publish: &[(&str, &str)]) -> Upstream {
    let registry = Arc::new(Registry::new());
    for (name, version) in publish {
        registry.publish(name, version, &[]);
    }
    Upstream::start(registry).await
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run_ok(cmd).stdout)
        .trim()
        .to_string()
}

/// `git clone --depth 1 --single-branch --no-tags <index> <dir>` as moon runs it.
fn clone_index(up: &Upstream, home: &Path, dir: &Path, config: &[&str]) {
    let mut cmd = git_trusting(home, &up.ca_pem);
    for c in config {
        cmd.args(["-c", c]);
    }
    cmd.args(["clone", "--depth", "1", "--single-branch", "--no-tags"])
        .arg(up.index_url())
        .arg(dir);
    run_ok(&mut cmd);
}

fn pull_main(up: &Upstream, home: &Path, dir: &Path, config: &[&str]) {
    let mut cmd = git_trusting(home, &up.ca_pem);
    for c in config {
        cmd.args(["-c", c]);
    }
    cmd.arg("-C").arg(dir).args(["pull", "origin", "main"]);
    run_ok(&mut cmd);
}

fn head_of(home: &Path, dir: &Path) -> String {
    stdout(
        clients::git(home)
            .arg("-C")
            .arg(dir)
            .args(["rev-parse", "HEAD"]),
    )
}

/// Clone, publish, pull: the whole index life cycle over one protocol.
fn index_round_trip(up: &Upstream, config: &[&str]) {
    let home = temp_home();
    let work = tempfile::tempdir().expect("temp dir");
    let dir = work.path().join("index");

    clone_index(up, home.path(), &dir, config);
    let first = std::fs::read_to_string(dir.join("user/alice/json.index"))
        .expect("cloned index has user/alice/json.index");
    assert_eq!(first, up.registry.index_file("alice/json").unwrap());
    assert_eq!(head_of(home.path(), &dir), up.registry.head());
    assert_eq!(
        stdout(
            clients::git(home.path())
                .arg("-C")
                .arg(&dir)
                .args(["rev-parse", "--is-shallow-repository"])
        ),
        "true"
    );
    assert_eq!(
        stdout(
            clients::git(home.path())
                .arg("-C")
                .arg(&dir)
                .args(["symbolic-ref", "HEAD"])
        ),
        "refs/heads/main"
    );

    let new = up
        .registry
        .publish("alice/json", "0.2.0", &[("bob/lex/runtime", "0.1.1")]);
    let nested = up.registry.publish("bob/lex/runtime", "0.1.1", &[]);
    pull_main(up, home.path(), &dir, config);
    assert_eq!(head_of(home.path(), &dir), up.registry.head());
    let pulled = std::fs::read_to_string(dir.join("user/alice/json.index")).unwrap();
    assert_eq!(pulled.lines().count(), 2);
    assert_eq!(pulled.lines().last().unwrap(), new.index_line);
    let nested_file = std::fs::read_to_string(dir.join("user/bob/lex/runtime.index")).unwrap();
    assert_eq!(nested_file, format!("{}\n", nested.index_line));

    let line: serde_json::Value = serde_json::from_str(&new.index_line).unwrap();
    assert_eq!(line["name"], "alice/json");
    assert_eq!(line["version"], "0.2.0");
    assert_eq!(line["deps"]["bob/lex/runtime"], "0.1.1");
    assert_eq!(line["checksum"], new.checksum.as_str());
    assert!(line["created_at"].as_str().unwrap().ends_with("+00:00"));
}

#[tokio::test]
async fn git_clone_and_pull_with_protocol_v2_over_h2() {
    let up = upstream_with(&[("alice/json", "0.1.0")]).await;
    index_round_trip(&up, &["protocol.version=2"]);

    let seen = up.seen();
    let refs = seen
        .iter()
        .find(|r| r.path == "/git/index/info/refs?service=git-upload-pack")
        .expect("info/refs request");
    assert_eq!(refs.method, "GET");
    assert_eq!(refs.header("git-protocol"), Some("version=2"));
    assert_eq!(
        refs.version, "HTTP/2.0",
        "git/libcurl negotiates h2 via ALPN"
    );
    assert!(up.count("POST", "/git/index/git-upload-pack") >= 2);
}

#[tokio::test]
async fn git_clone_and_pull_with_protocol_v0_over_http1() {
    let up = upstream_with(&[("alice/json", "0.1.0")]).await;
    index_round_trip(&up, &["protocol.version=0", "http.version=HTTP/1.1"]);

    let seen = up.seen();
    assert!(seen.iter().all(|r| r.header("git-protocol").is_none()));
    assert!(seen.iter().all(|r| r.version == "HTTP/1.1"));
    let posts: Vec<_> = seen.iter().filter(|r| r.method == "POST").collect();
    assert!(
        posts.len() >= 2,
        "one POST for the clone, one or more for the pull"
    );
    assert!(posts.iter().all(|r| r.path == "/git/index/git-upload-pack"));
}

#[tokio::test]
async fn curl_downloads_archives_matching_the_index_checksum() {
    let registry = Arc::new(Registry::new());
    let json = registry.publish("alice/json", "0.1.0", &[]);
    let core = registry.publish("moonbitlang/core", "0.1.20260213+3382e0600", &[]);
    let nested = registry.publish("bob/lex/runtime", "0.1.1", &[]);
    let camel = registry.publish("illusory0x0/🐫", "0.1.0", &[]);
    let up = Upstream::start(registry).await;
    let work = tempfile::tempdir().unwrap();

    assert_eq!(json.segment, "alice%2Fjson%2F0.1.0");
    assert_eq!(
        core.segment,
        "moonbitlang%2Fcore%2F0.1.20260213%2B3382e0600"
    );
    assert_eq!(nested.url_path(), "/user/bob%2Flex%2Fruntime%2F0.1.1.zip");
    assert_eq!(camel.segment, "illusory0x0%2F%F0%9F%90%AB%2F0.1.0");
    assert_eq!(camel.index_path, "user/illusory0x0/🐫.index");
    assert_eq!(clients::form_urlencode("a b*~"), "a+b*%7E");

    for (i, (published, path)) in [
        (&json, json.url_path()),
        (&json, json.slash_url_path()),
        (&core, core.url_path()),
        (&nested, nested.url_path()),
        (&camel, camel.url_path()),
    ]
    .into_iter()
    .enumerate()
    {
        let file = work.path().join(format!("{i}.zip"));
        let out = stdout(
            curl(&up.ca_pem)
                .args(["-f", "-o"])
                .arg(&file)
                .args(["-w", "%{http_code} %{content_type} %{http_version}"])
                .arg(format!("{}{path}", up.url())),
        );
        assert_eq!(out, "200 application/zip 2", "{path}");
        let checksum = sha256_file(&file);
        assert_eq!(checksum, published.checksum);
        let line: serde_json::Value = serde_json::from_str(
            up.registry
                .index_file(&published.name)
                .unwrap()
                .lines()
                .last()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(line["checksum"].as_str(), Some(checksum.as_str()));
    }

    // The zip root is the module root.
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(json.zip.to_vec())).unwrap();
    let mut mod_json = String::new();
    std::io::Read::read_to_string(
        &mut archive.by_name("moon.mod.json").unwrap(),
        &mut mod_json,
    )
    .unwrap();
    let mod_json: serde_json::Value = serde_json::from_str(&mod_json).unwrap();
    assert_eq!(mod_json["name"], "alice/json");
    assert_eq!(mod_json["version"], "0.1.0");

    let missing = stdout(
        curl(&up.ca_pem)
            .args(["-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("{}/user/alice%2Fjson%2F9.9.9.zip", up.url())),
    );
    assert_eq!(missing, "404");
    assert_eq!(up.count("GET", "/user/"), 6);
}

fn reqwest_client(up: &Upstream) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(up.ca_pem_text().as_bytes()).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(ca)
        .no_proxy()
        .build()
        .unwrap()
}

#[tokio::test]
async fn reqwest_gets_archives_symbols_and_assets() {
    let up = upstream_with(&[("alice/json", "0.1.0")]).await;
    let client = reqwest_client(&up);
    let key = "alice/json/0.1.0";

    let resp = client
        .get(format!("{}/user/alice%2Fjson%2F0.1.0.zip", up.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.content_length(),
        Some(up.registry.archive(key).unwrap().size)
    );
    let body = resp.bytes().await.unwrap();
    assert_eq!(
        sha256_hex(&body),
        up.registry.archive(key).unwrap().checksum
    );

    // symbols.zip: ETag, then 304 on If-None-Match, 200 again after a change.
    let resp = client
        .get(format!("{}/symbols.zip", up.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let etag = resp.headers()["etag"].to_str().unwrap().to_string();
    assert_eq!(resp.bytes().await.unwrap(), up.registry.symbols().0);
    let resp = client
        .get(format!("{}/symbols.zip", up.url()))
        .header("If-None-Match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 304);
    assert_eq!(resp.headers()["etag"].to_str().unwrap(), etag);
    let new_etag = up.registry.set_symbols(b"new symbols".to_vec());
    let resp = client
        .get(format!("{}/symbols.zip", up.url()))
        .header("If-None-Match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["etag"].to_str().unwrap(), new_etag);
    assert_eq!(&resp.bytes().await.unwrap()[..], b"new symbols");

    // Assets.
    let wasm = b"\0asm\x01\0\0\0".to_vec();
    let asset = "moonbitlang/parser@0.3.3/parser.wasm";
    up.registry.put_asset(asset, wasm.clone());
    up.registry
        .put_asset(&format!("/assets/{asset}.sha256"), sha256_hex(&wasm));
    let resp = client
        .get(format!("{}/assets/{asset}", up.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap(), wasm);
    let sum = client
        .get(format!("{}/assets/{asset}.sha256", up.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(sum, sha256_hex(&wasm));
    let resp = client
        .get(format!("{}/assets/nope/x@1.0.0/x.wasm", up.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);

    let seen = up.seen();
    let first = &seen[0];
    assert_eq!(first.method, "GET");
    assert_eq!(first.path, "/user/alice%2Fjson%2F0.1.0.zip");
    assert_eq!(seen[2].header("if-none-match"), Some(etag.as_str()));
}

#[tokio::test]
async fn bad_requests_get_short_error_answers() {
    let up = upstream_with(&[("alice/json", "0.1.0")]).await;
    let client = reqwest_client(&up);
    for (method, path, status) in [
        ("GET", "/user/%FF%FE.zip", 400),
        ("GET", "/user/alice%2Fjson%2F0.1.0", 404),
        ("GET", "/nothing/here", 404),
        ("GET", "/", 404),
        ("PUT", "/user/alice%2Fjson%2F0.1.0.zip", 405),
        ("DELETE", "/git/index/info/refs", 405),
        ("GET", "/git/nope/info/refs?service=git-upload-pack", 404),
        ("GET", "/git/index/info/refs?service=git-receive-pack", 403),
    ] {
        let resp = client
            .request(method.parse().unwrap(), format!("{}{path}", up.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{method} {path}");
        assert!(resp.bytes().await.unwrap().len() < 200);
    }
    // The server is still fine.
    let resp = client
        .get(format!("{}/user/alice%2Fjson%2F0.1.0.zip", up.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn truncated_archives_fail_curl_with_a_transfer_error() {
    let registry = Arc::new(Registry::new());
    let big = registry.publish_sized("alice/big", "1.0.0", 2 << 20);
    let up = Upstream::start(registry).await;
    up.set_fault(Fault::TruncateArchives);
    let url = format!("{}{}", up.url(), big.url_path());

    let out = run(curl(&up.ca_pem)
        .args(["--http1.1", "-o", "/dev/null"])
        .arg(&url));
    assert_eq!(
        out.status.code(),
        Some(18),
        "curl over HTTP/1.1 must report a partial file: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(curl(&up.ca_pem)
        .args(["--http2", "-o", "/dev/null"])
        .arg(&url));
    assert_eq!(
        out.status.code(),
        Some(92),
        "curl over h2 must see the stream reset: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let client = reqwest_client(&up);
    let resp = client.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.content_length(), Some(big.size));
    assert!(resp.bytes().await.is_err(), "reqwest must see a body error");

    up.set_fault(Fault::None);
    let file = tempfile::NamedTempFile::new().unwrap();
    run_ok(curl(&up.ca_pem).arg("-o").arg(file.path()).arg(&url));
    assert_eq!(sha256_file(file.path()), big.checksum);
}

#[tokio::test]
async fn stop_aborts_connections_and_refuses_new_ones_until_restart() {
    let registry = Arc::new(Registry::new());
    let big = registry.publish_sized("alice/big", "1.0.0", 1 << 20);
    let up = Upstream::start(registry).await;
    let url = format!("{}{}", up.url(), big.url_path());

    // A download in flight is cut off by stop().
    up.set_fault(Fault::SlowArchives {
        chunk: 16 * 1024,
        interval: Duration::from_millis(50),
    });
    let mut slow = curl(&up.ca_pem);
    slow.args(["--http1.1", "-o", "/dev/null"]).arg(&url);
    let in_flight = tokio::task::spawn_blocking(move || run(&mut slow));
    while up.count("GET", "/user/") == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    up.stop().await;
    let out = in_flight.await.unwrap();
    assert!(
        !out.status.success(),
        "a download cut by stop() must fail: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let refused = tokio::net::TcpStream::connect(up.addr).await;
    assert_eq!(
        refused.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    let out = run(curl(&up.ca_pem).args(["-o", "/dev/null"]).arg(&url));
    assert_eq!(out.status.code(), Some(7), "curl: couldn't connect");

    up.restart().await;
    up.set_fault(Fault::None);
    let file = tempfile::NamedTempFile::new().unwrap();
    run_ok(curl(&up.ca_pem).arg("-o").arg(file.path()).arg(&url));
    assert_eq!(sha256_file(file.path()), big.checksum);
}

#[tokio::test]
async fn sized_archives_are_exact_stored_and_streamed_from_disk() {
    let registry = Arc::new(Registry::new());
    let size = 8 << 20;
    let big = registry.publish_sized("alice/big", "1.0.0", size);
    assert_eq!(big.size, size as u64);
    let path = big.path.clone().expect("sized archives live on disk");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), size as u64);
    assert_eq!(big.zip.len(), size, "small enough to be kept in memory too");
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(big.zip.to_vec())).unwrap();
    let payload = archive.by_name("payload.bin").unwrap();
    assert_eq!(payload.compression(), zip::CompressionMethod::Stored);
    drop(payload);
    assert!(archive.by_name("moon.mod.json").is_ok());

    let up = Upstream::start(registry).await;
    let file = tempfile::NamedTempFile::new().unwrap();
    let started = Instant::now();
    run_ok(curl(&up.ca_pem).arg("-o").arg(file.path()).arg(format!(
        "{}{}",
        up.url(),
        big.url_path()
    )));
    assert_eq!(sha256_file(file.path()), big.checksum);
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn delay_and_status_faults_apply_to_every_request() {
    let up = upstream_with(&[("alice/json", "0.1.0")]).await;
    let client = reqwest_client(&up);
    let url = format!("{}/symbols.zip", up.url());

    up.set_fault(Fault::DelayEach(Duration::from_millis(300)));
    let started = Instant::now();
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(300));

    up.set_fault(Fault::Status(503));
    assert_eq!(client.get(&url).send().await.unwrap().status(), 503);
    let out =
        run(git_trusting(temp_home().path(), &up.ca_pem).args(["ls-remote", &up.index_url()]));
    assert!(!out.status.success());

    up.set_fault(Fault::SlowArchives {
        chunk: 1024,
        interval: Duration::from_millis(20),
    });
    let started = Instant::now();
    let body = client
        .get(format!("{}/user/alice%2Fjson%2F0.1.0.zip", up.url()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let chunks = body.len().div_ceil(1024) as u32;
    assert!(started.elapsed() >= Duration::from_millis(20) * (chunks - 1));
    assert_eq!(
        sha256_hex(&body),
        up.registry.archive("alice/json/0.1.0").unwrap().checksum
    );

    up.set_fault(Fault::None);
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    assert_eq!(up.count("GET", "/symbols.zip"), 3);
}

#[tokio::test]
async fn git_http_backend_accepts_gzip_request_bodies() {
    let up = upstream_with(&[("alice/json", "0.1.0")]).await;
    let work = tempfile::tempdir().unwrap();
    // Protocol v2 ls-refs, as pkt-lines.
    let request = b"0014command=ls-refs\n00010009peel\n000csymrefs\n0000";
    let plain = work.path().join("ls-refs.req");
    std::fs::write(&plain, request).unwrap();
    let gzipped = work.path().join("ls-refs.req.gz");
    let gz = run_ok(Command::new("gzip").arg("-c").arg(&plain)).stdout;
    std::fs::write(&gzipped, gz).unwrap();

    let head = up.registry.head();
    for (file, gzip) in [(&plain, false), (&gzipped, true)] {
        let mut cmd = curl(&up.ca_pem);
        cmd.args([
            "-f",
            "-H",
            "Content-Type: application/x-git-upload-pack-request",
        ])
        .args(["-H", "Git-Protocol: version=2"]);
        if gzip {
            cmd.args(["-H", "Content-Encoding: gzip"]);
        }
        let body = stdout(
            cmd.arg("--data-binary")
                .arg(format!("@{}", file.display()))
                .arg(format!("{}/git/index/git-upload-pack", up.url())),
        );
        assert!(
            body.contains(&format!("{head} HEAD symref-target:refs/heads/main")),
            "gzip={gzip}: {body:?}"
        );
        assert!(body.contains(&format!("{head} refs/heads/main")));
    }
    let posts: Vec<_> = up
        .seen()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect();
    assert_eq!(posts[1].header("content-encoding"), Some("gzip"));
}
