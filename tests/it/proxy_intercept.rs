//! The gateway as an `HTTPS_PROXY` and as a transparent TLS gateway: the registry
//! hosts are intercepted with the gateway's own CA and served from the same cache;
//! other hosts are tunnelled untouched or refused by policy.
//!
//! Tests that name mooncakes.io run inside a loopback-only network namespace and
//! with tunnelling denied, so nothing can leave the machine even if misrouted.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::upstream::clients::sha256_hex;
use crate::upstream::scenario::{
    curl, gateway_env, inside_loopback_namespace, moon_bin, moon_through_proxy, ok, run,
    setup_configured, Setup,
};
use crate::upstream::{Gateway, Published, Registry};

/// Intercept the public registry's names for the loopback test upstream; no tunnels.
const INTERCEPT: &str =
    "intercept_hosts = [\"mooncakes.io\", \"download.mooncakes.io\"]\n[proxy]\ntunnel = \"deny\"\n";

fn ca_path(gw: &Gateway) -> PathBuf {
    let out = run(Command::new(env!("CARGO_BIN_EXE_moonbit-registry"))
        .args(["ca", "--data-dir", gw.data_dir.to_str().unwrap()])
        .env("RUST_LOG", "off"));
    ok(&out, "moonbit-registry ca");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn proxy(gw: &Gateway) -> String {
    format!("http://{}", gw.addr)
}

/// curl an https URL through the gateway as proxy, trusting the gateway CA;
/// returns (exit ok, body, lower-case headers).
fn curl_via(gw: &Gateway, ca: &Path, url: &str, out: &Path) -> (bool, Vec<u8>, String) {
    let headers = out.with_extension("h");
    let res = curl(&[
        "--proxy",
        &proxy(gw),
        "--cacert",
        ca.to_str().unwrap(),
        "-f",
        "-o",
        out.to_str().unwrap(),
        "-D",
        headers.to_str().unwrap(),
        url,
    ]);
    let body = std::fs::read(out).unwrap_or_default();
    let head = std::fs::read_to_string(&headers)
        .unwrap_or_default()
        .to_ascii_lowercase();
    (res.status.success(), body, head)
}

async fn json_registry(toml: &str) -> (Setup, Published) {
    setup_configured(toml, |r: &Registry| r.publish("alice/json", "0.1.0", &[])).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn curl_through_the_proxy_reaches_the_cache() {
    if !inside_loopback_namespace(module_path!(), "curl_through_the_proxy_reaches_the_cache") {
        return;
    }
    let (s, json) = json_registry(INTERCEPT).await;
    let ca = ca_path(&s.gateway);
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("https://download.mooncakes.io/user/{}.zip", json.segment);
    for expect in ["x-cache: miss", "x-cache: hit"] {
        let (ok, body, head) = curl_via(&s.gateway, &ca, &url, &tmp.path().join("a.zip"));
        assert!(ok, "download through the proxy failed: {}", s.gateway.log());
        assert!(head.contains(expect), "{head}");
        assert_eq!(sha256_hex(&body), json.checksum);
    }
    assert_eq!(s.upstream.count("GET", &json.url_path()), 1);
    // Other paths of an intercepted host go to that source's upstream URLs.
    let (ok, _, head) = curl_via(
        &s.gateway,
        &ca,
        "https://mooncakes.io/symbols.zip",
        &tmp.path().join("s"),
    );
    assert!(ok, "{head}");
    assert_eq!(s.upstream.count("GET", "/symbols.zip"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn git_clones_the_index_through_the_proxy_with_the_env_bundle() {
    if !inside_loopback_namespace(
        module_path!(),
        "git_clones_the_index_through_the_proxy_with_the_env_bundle",
    ) {
        return;
    }
    let (s, _) = json_registry(INTERCEPT).await;
    let env = gateway_env(&s.gateway);
    let get = |k: &str| {
        env.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    let bundle = get("GIT_SSL_CAINFO");
    assert_eq!(bundle, get("SSL_CERT_FILE"));
    assert_eq!(get("https_proxy"), proxy(&s.gateway));
    let dir = tempfile::tempdir().unwrap();
    let clone = dir.path().join("index");
    let out = run(Command::new("git")
        .args([
            "clone",
            "--depth",
            "1",
            "--single-branch",
            "--no-tags",
            "https://mooncakes.io/git/index",
        ])
        .arg(&clone)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("https_proxy", get("https_proxy"))
        .env("GIT_SSL_CAINFO", &bundle));
    ok(&out, "git clone through the proxy");
    assert!(std::fs::read_to_string(clone.join("user/alice/json.index"))
        .unwrap()
        .contains("0.1.0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn other_hosts_are_tunnelled_untouched_or_refused() {
    // Only loopback destinations here: the test upstream is the "other" TLS server.
    let (s, _) = json_registry("").await;
    let url = format!("https://127.0.0.1:{}/symbols.zip", s.upstream.addr.port());
    let out = curl(&[
        "--proxy",
        &proxy(&s.gateway),
        "--cacert",
        s.upstream.ca_pem.to_str().unwrap(),
        "-f",
        "-o",
        "/dev/null",
        &url,
    ]);
    // Verified against the upstream's own CA: the gateway did not intercept it.
    ok(
        &out,
        "tunnelled download (gateway on loopback: tunnels allowed by default)",
    );
    assert_eq!(s.upstream.count("GET", "/symbols.zip"), 1);

    let (denied, _) = json_registry("[proxy]\ntunnel = \"deny\"\n").await;
    let out = curl(&[
        "--proxy",
        &proxy(&denied.gateway),
        "-w",
        "%{http_connect}",
        "-o",
        "/dev/null",
        &url,
    ]);
    assert!(!out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403");
    assert_eq!(denied.upstream.count("GET", "/symbols.zip"), 0);

    // Plain-HTTP absolute-form requests follow the same policy (the gateway's own
    // loopback port serves as the plain-HTTP destination).
    let plain = format!("{}/-/health", s.gateway.url());
    let out = curl(&[
        "--proxy",
        &proxy(&s.gateway),
        "-f",
        "-o",
        "/dev/null",
        &plain,
    ]);
    ok(&out, "absolute-form request forwarded");
    let out = curl(&[
        "--proxy",
        &proxy(&denied.gateway),
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        &plain,
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403");

    // Metadata addresses are refused even when tunnels are allowed.
    let out = curl(&[
        "--proxy",
        &proxy(&s.gateway),
        "-w",
        "%{http_connect}",
        "-o",
        "/dev/null",
        "https://169.254.169.254/",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_authentication_is_required_when_configured() {
    let toml = format!("{INTERCEPT}auth = \"ci:s3cret\"\n");
    let (s, json) = json_registry(&toml).await;
    let ca = ca_path(&s.gateway);
    let url = format!("https://download.mooncakes.io/user/{}.zip", json.segment);
    let ca = ca.to_str().unwrap();
    let p = proxy(&s.gateway);
    // curl through the proxy with `credentials` (if any): the CONNECT status and curl's output.
    let connect = |credentials: Option<&str>| {
        let mut args = vec![
            "--proxy",
            &p,
            "--cacert",
            ca,
            "-w",
            "%{http_connect}",
            "-o",
            "/dev/null",
        ];
        if let Some(c) = credentials {
            args.extend(["--proxy-user", c]);
        }
        args.push(&url);
        let out = curl(&args);
        (String::from_utf8_lossy(&out.stdout).to_string(), out)
    };
    assert_eq!(connect(None).0, "407");
    assert_eq!(connect(Some("ci:wrong")).0, "407");
    let (code, out) = connect(Some("ci:s3cret"));
    assert_eq!(code, "200");
    ok(&out, "download with proxy credentials");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_ca_is_private_and_name_constrained() {
    if !inside_loopback_namespace(module_path!(), "the_ca_is_private_and_name_constrained") {
        return;
    }
    let (s, _) = json_registry(INTERCEPT).await;
    let ca = ca_path(&s.gateway);
    let key = ca.with_file_name("ca.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The key is never served, whatever path is asked for.
    let out = curl(&["-s", &format!("{}/ca/ca.key", s.gateway.url())]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("PRIVATE KEY"));

    // The leaf the gateway presents for mooncakes.io verifies against its CA...
    let tmp = tempfile::tempdir().unwrap();
    let shown = run(Command::new("openssl")
        .args([
            "s_client",
            "-proxy",
            &s.gateway.addr.to_string(),
            "-connect",
            "mooncakes.io:443",
        ])
        .args(["-servername", "mooncakes.io", "-showcerts"])
        .stdin(std::process::Stdio::null()));
    let text = String::from_utf8_lossy(&shown.stdout);
    let leaf_pem = text
        .split("-----BEGIN CERTIFICATE-----")
        .nth(1)
        .and_then(|rest| rest.split("-----END CERTIFICATE-----").next())
        .map(|b64| format!("-----BEGIN CERTIFICATE-----{b64}-----END CERTIFICATE-----\n"))
        .unwrap_or_else(|| panic!("no certificate from openssl s_client: {text}"));
    let leaf = tmp.path().join("leaf.pem");
    std::fs::write(&leaf, leaf_pem).unwrap();
    let verify = |cert: &Path, name: &str| {
        run(Command::new("openssl")
            .args([
                "verify",
                "-CAfile",
                ca.to_str().unwrap(),
                "-verify_hostname",
                name,
            ])
            .arg(cert))
    };
    ok(
        &verify(&leaf, "mooncakes.io"),
        "openssl verify of the minted leaf",
    );

    // ...while a certificate for any other name, signed with the same (stolen) key, is rejected.
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(&ca).unwrap(),
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(&key).unwrap()).unwrap(),
    )
    .unwrap();
    let evil_key = rcgen::KeyPair::generate().unwrap();
    let evil = rcgen::CertificateParams::new(vec!["bank.example".to_string()])
        .unwrap()
        .signed_by(&evil_key, &issuer)
        .unwrap();
    let evil_path = tmp.path().join("evil.pem");
    std::fs::write(&evil_path, evil.pem()).unwrap();
    let out = verify(&evil_path, "bank.example");
    assert!(!out.status.success(), "a leaf for another name verified");
    let why =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        why.contains("subtree"),
        "expected a name-constraint failure: {why}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_transparent_listener_intercepts_by_sni() {
    if !inside_loopback_namespace(module_path!(), "the_transparent_listener_intercepts_by_sni") {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let toml = format!("transparent_listen = \"127.0.0.1:{port}\"\n{INTERCEPT}");
    let (s, json) = json_registry(&toml).await;
    let ca = ca_path(&s.gateway);
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("https://download.mooncakes.io/user/{}.zip", json.segment);
    let connect_to = format!("download.mooncakes.io:443:127.0.0.1:{port}");
    for expect in ["x-cache: miss", "x-cache: hit"] {
        let file = tmp.path().join("t.zip");
        let headers = tmp.path().join("t.h");
        let out = curl(&[
            "--connect-to",
            &connect_to,
            "--cacert",
            ca.to_str().unwrap(),
            "-f",
            "-o",
            file.to_str().unwrap(),
            "-D",
            headers.to_str().unwrap(),
            &url,
        ]);
        ok(&out, "download through the transparent listener");
        let head = std::fs::read_to_string(&headers)
            .unwrap()
            .to_ascii_lowercase();
        assert!(head.contains(expect), "{head}");
        assert_eq!(sha256_hex(&std::fs::read(&file).unwrap()), json.checksum);
    }
    // Another SNI under `deny`: closed, not tunnelled.
    let out = curl(&[
        "--connect-to",
        &format!("example.org:443:127.0.0.1:{port}"),
        "https://example.org/",
    ]);
    assert!(!out.status.success());
    assert!(
        s.gateway.log().contains("transparent tunnel refused"),
        "{}",
        s.gateway.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moon_works_through_https_proxy_with_the_builtin_registry() {
    let Some(bin) = moon_bin() else {
        eprintln!("SKIPPED moon_works_through_https_proxy_with_the_builtin_registry: set MOON_BIN to the moon client");
        return;
    };
    if !inside_loopback_namespace(
        module_path!(),
        "moon_works_through_https_proxy_with_the_builtin_registry",
    ) {
        return;
    }
    let (s, published) = setup_configured(INTERCEPT, |r: &Registry| {
        [
            r.publish("alice/core", "0.1.0", &[]),
            r.publish(
                "bob/lex/runtime",
                "0.1.0+build3",
                &[("alice/core", "0.1.0")],
            ),
            r.publish("alice/app", "1.0.0", &[("bob/lex/runtime", "0.1.0+build3")]),
        ]
    })
    .await;
    let env = gateway_env(&s.gateway);
    let work = tempfile::tempdir().unwrap();
    let archive_gets = || -> usize {
        published
            .iter()
            .map(|p| s.upstream.count("GET", &p.url_path()))
            .sum()
    };
    for round in ["cold", "cached"] {
        let home = work.path().join(format!("home-{round}"));
        let cwd = work.path().join(format!("work-{round}"));
        std::fs::create_dir_all(&cwd).unwrap();
        let moon = |dir: &Path, args: &[&str]| moon_through_proxy(&bin, &home, dir, &env, args);
        for (what, out) in [
            ("moon update", moon(&cwd, &["update"])),
            ("moon new", moon(&cwd, &["new", "proj", "--user", "tester"])),
            ("moon add", moon(&cwd.join("proj"), &["add", "alice/app"])),
        ] {
            ok(&out, what);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !stderr.contains("Warning") && !stderr.contains("failed"),
                "{what} ({round}): {stderr}"
            );
        }
        for dir in ["alice/app", "bob/lex+runtime", "alice/core"] {
            assert!(
                cwd.join("proj/.mooncakes")
                    .join(dir)
                    .join("moon.mod.json")
                    .is_file(),
                "{round}: {dir}"
            );
        }
        assert_eq!(
            archive_gets(),
            published.len(),
            "{round}: upstream archive requests"
        );
    }
}
