//! Hostile clients of the gateway's doors, admin endpoints and store (issue 13),
//! each hole reproduced against the real binary with real sockets on loopback:
//! malformed `CONNECT` targets, user info in absolute-form targets, a transparent
//! tunnel that leads back to the gateway, oversized and unfinished request heads,
//! more connections than allowed, clients that stop reading, admin calls without
//! a token and refresh storms, store temp files orphaned by a crash, and an
//! upstream copy that was corrupt and is fixed. Each test names its item of the
//! issue and asserts the fixed behaviour, within seconds.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::upstream::admin;
use crate::upstream::clients::sha256_hex;
use crate::upstream::gateway::http_status;
use crate::upstream::scenario::{
    curl, fetch, fetch_miss_then_hit, inside_loopback_namespace, ok, run, setup_configured,
    setup_configured_env, setup_with, Setup,
};
use crate::upstream::{Gateway, Published, Registry, Upstream};

/// A gateway with `toml` as its config, in front of a registry holding alice/json.
async fn json_gateway(toml: &str) -> (Setup, Published) {
    setup_configured(toml, |r: &Registry| r.publish("alice/json", "0.1.0", &[])).await
}

/// Wait (bounded) until `cond` holds.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Everything the peer sends on `conn` until it closes it (end of stream or
/// reset), reading for at most `bound`; and whether it was closed by then.
async fn read_to_close(conn: &mut TcpStream, bound: Duration) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let closed = tokio::time::timeout(bound, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (got, closed)
}

/// Reads a response head (up to the blank line) from `conn`, within 10 s.
async fn read_head(conn: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while !head.ends_with(b"\r\n\r\n") {
            match conn.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no response head within 10 s: {head:?}");
    String::from_utf8_lossy(&head).into_owned()
}

/// Sends `request` (which should say `Connection: close`) on a new connection
/// to `addr` and returns the whole answer.
async fn exchange(addr: SocketAddr, request: &str) -> String {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(request.as_bytes()).await.unwrap();
    let (got, closed) = read_to_close(&mut conn, Duration::from_secs(10)).await;
    let answer = String::from_utf8_lossy(&got).into_owned();
    assert!(closed, "{request:?}: still open after 10 s; got {answer:?}");
    answer
}

/// The status code of a raw HTTP/1.1 answer (0 when there is none).
fn status(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// Value of header `name` in a raw request or response head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then_some(value.trim())
    })
}

/// Open file descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/fd: {e}"))
        .count()
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// Item 7: a `CONNECT` target must be `host:port` with a port from 1 to 65535
/// and nothing else. `127.0.0.1:99999`, a missing port, port 0, user info and
/// other junk are a 400 and connect nowhere: not to port 443 (where a port that
/// did not parse used to default to), not to the port behind the user info or
/// the `+`; the same listener is reached by a well-formed `CONNECT`. Runs in a
/// loopback-only network namespace (port 443).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_connect_targets_are_refused_and_connect_nowhere() {
    if !inside_loopback_namespace(
        module_path!(),
        "malformed_connect_targets_are_refused_and_connect_nowhere",
    ) {
        return;
    }
    let (s, _) = json_gateway("").await;
    let gw = s.gateway.addr;
    let https = TcpListener::bind((Ipv4Addr::LOCALHOST, 443)).await.unwrap();
    let https_v6 = TcpListener::bind((std::net::Ipv6Addr::LOCALHOST, 443))
        .await
        .ok();
    let watch = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let port = watch.local_addr().unwrap().port();
    let targets = [
        "127.0.0.1:99999".to_string(),
        "127.0.0.1".to_string(),
        "localhost".to_string(),
        "127.0.0.1:0".to_string(),
        format!("user:pw@127.0.0.1:{port}"),
        format!("127.0.0.1:+{port}"),
        format!("127.0.0.1:{port}/x"),
    ];
    for target in &targets {
        let answer = exchange(
            gw,
            &format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(status(&answer), 400, "CONNECT {target}: {answer:?}");
    }
    // A tunnel is connected before the answer: by now any would be queued.
    for listener in [&https, &watch].into_iter().chain(https_v6.as_ref()) {
        let accepted = tokio::time::timeout(Duration::from_millis(300), listener.accept()).await;
        assert!(
            accepted.is_err(),
            "a refused CONNECT reached {:?}",
            listener.local_addr()
        );
    }
    assert!(
        !s.gateway.log().contains("tunnelling"),
        "{}",
        s.gateway.log()
    );

    // The control: a well-formed CONNECT to the watched port is tunnelled there.
    let mut conn = TcpStream::connect(gw).await.unwrap();
    let target = format!("127.0.0.1:{port}");
    conn.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut conn).await;
    assert_eq!(status(&head), 200, "{head:?}");
    tokio::time::timeout(Duration::from_secs(5), watch.accept())
        .await
        .expect("the well-formed CONNECT was not tunnelled")
        .unwrap();
}

/// Item 8: user info in an absolute-form target (`GET http://user:pw@host:port/x`)
/// is never forwarded: the origin gets origin-form and `Host: host:port`, without
/// `user:pw@` (nor an `Authorization` made of it), whatever Host the client sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn user_info_in_an_absolute_form_target_is_not_forwarded() {
    let (s, _) = json_gateway("").await;
    // A tiny plain-HTTP origin that records the request head it receives.
    let origin = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let port = origin.local_addr().unwrap().port();
    let recorder = tokio::spawn(async move {
        let (mut conn, _) = origin.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\norigin")
            .await
            .unwrap();
        String::from_utf8_lossy(&head).into_owned()
    });
    let answer = exchange(
        s.gateway.addr,
        &format!(
            "GET http://user:pw@127.0.0.1:{port}/x?q=1 HTTP/1.1\r\n\
             Host: user:pw@127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status(&answer), 200, "{answer:?}");
    assert!(answer.ends_with("origin"), "{answer:?}");
    let head = tokio::time::timeout(Duration::from_secs(5), recorder)
        .await
        .expect("the origin saw no request")
        .unwrap();
    eprintln!("the origin received:\n{head}");
    assert_eq!(head.lines().next(), Some("GET /x?q=1 HTTP/1.1"), "{head}");
    let expected_host = format!("127.0.0.1:{port}");
    assert_eq!(
        header(&head, "host"),
        Some(expected_host.as_str()),
        "{head}"
    );
    assert!(!head.contains("user") && !head.contains("pw@"), "{head}");
    assert!(header(&head, "authorization").is_none(), "{head}");
}

/// Item 2: the transparent door asked (by SNI `localhost`) to tunnel to port 443
/// of loopback, which is the transparent listener itself, refuses: the gateway's
/// open files stay few (without the guard the connection loops back into the
/// gateway until it runs out of descriptors: 1,021 under a limit of 1,024, and
/// 5,820 within 1.2 s here), it still answers, and its log says why. Runs in a
/// loopback-only network namespace (port 443).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transparent_tunnel_back_to_the_gateway_is_refused() {
    if !inside_loopback_namespace(
        module_path!(),
        "a_transparent_tunnel_back_to_the_gateway_is_refused",
    ) {
        return;
    }
    let toml = "transparent_listen = \"127.0.0.1:443\"\n[proxy]\ntunnel = \"allow\"\n";
    let (s, _) = json_gateway(toml).await;
    let pid = s.gateway.pid().expect("the gateway runs");
    let before = open_fds(pid);
    let mut hello = Command::new("timeout")
        .args(["10", "openssl", "s_client", "-connect", "127.0.0.1:443"])
        .args(["-servername", "localhost"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run openssl s_client");
    let started = Instant::now();
    let mut most = before;
    while started.elapsed() < Duration::from_millis(1200) {
        most = most.max(open_fds(pid));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while hello.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "openssl s_client never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = open_fds(pid);
    eprintln!(
        "gateway fds: {before} before the ClientHello, at most {most} in 1.2 s, {after} after"
    );
    assert!(most < 64, "the gateway held {most} descriptors");
    assert_eq!(http_status(s.gateway.addr, "/-/health").await.unwrap(), 200);
    let log = s.gateway.log();
    assert!(log.contains("transparent tunnel refused"), "{log}");
    assert_eq!(
        log.matches("transparent tunnel refused").count(),
        1,
        "more than the one connection came in: {log}"
    );
}

/// Item 4: a request head larger than `server.max_header_size` (64 KiB by
/// default), here one 100 KiB header, is refused (431 or closed), never served;
/// one just under the limit is.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_head_over_the_limit_is_refused() {
    let (s, _) = json_gateway("").await;
    let gw = s.gateway.addr;
    let request = |pad: usize| {
        format!(
            "GET /-/health HTTP/1.1\r\nHost: gw\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(pad)
        )
    };
    let mut conn = TcpStream::connect(gw).await.unwrap();
    // The gateway may close while this is still being written.
    let written = conn.write_all(request(100 * 1024).as_bytes()).await;
    let (got, closed) = read_to_close(&mut conn, Duration::from_secs(10)).await;
    let answer = String::from_utf8_lossy(&got);
    eprintln!(
        "100 KiB header: write {written:?}, answer {:?}",
        answer.lines().next()
    );
    assert!(closed, "the connection stayed open: {answer:?}");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer:?}"
    );
    assert_eq!(status(&exchange(gw, &request(60 * 1024)).await), 200);
}

/// Item 4: with `server.max_connections = 8`, eight idle connections hold every
/// slot: a ninth client's request is answered only once one of them closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_past_max_connections_waits_for_a_free_slot() {
    let (s, _) = json_gateway("[server]\nmax_connections = 8\n").await;
    let gw = s.gateway.addr;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(TcpStream::connect(gw).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ninth = TcpStream::connect(gw).await.unwrap();
    ninth
        .write_all(b"GET /-/health HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answered = tokio::spawn(async move {
        let (got, closed) = read_to_close(&mut ninth, Duration::from_secs(20)).await;
        (
            String::from_utf8_lossy(&got).into_owned(),
            closed,
            Instant::now(),
        )
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !answered.is_finished(),
        "the ninth connection was served while eight were held: {:?}",
        answered.await.unwrap().0
    );
    let freed = Instant::now();
    drop(held.pop());
    let (answer, closed, at) = answered.await.unwrap();
    assert!(closed, "{answer:?}");
    assert_eq!(status(&answer), 200, "{answer:?}");
    let waited = at - freed;
    eprintln!("the ninth request was answered {waited:?} after one of the eight closed");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
}

/// Item 4: 1,000 connections each holding an unfinished ~60 KiB request head
/// cost the gateway a bounded amount of memory (the head buffer is capped at
/// 64 KiB), and it keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_unfinished_heads_cost_bounded_memory() {
    const CONNECTIONS: usize = 1000;
    let (s, _) = json_gateway("").await;
    let gw = s.gateway.addr;
    let pid = s.gateway.pid().expect("the gateway runs");
    let before = rss_kib(pid);
    let head = format!(
        "GET /-/health HTTP/1.1\r\nHost: gw\r\nX-Pad: {}",
        "a".repeat(60 * 1024)
    );
    let started = Instant::now();
    let mut conns = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let mut conn = TcpStream::connect(gw).await.unwrap();
        conn.write_all(head.as_bytes()).await.unwrap();
        conns.push(conn);
    }
    let opened = started.elapsed();
    let mut most = before;
    let sampling = Instant::now();
    while sampling.elapsed() < Duration::from_millis(1500) {
        most = most.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let grown_mib = (most.saturating_sub(before)) as f64 / 1024.0;
    eprintln!(
        "gateway RSS {before} KiB before, at most {most} KiB with {CONNECTIONS} unfinished \
         60 KiB heads (+{grown_mib:.1} MiB; opened in {opened:?}); {} fds",
        open_fds(pid)
    );
    assert!(grown_mib < 150.0, "RSS grew by {grown_mib:.1} MiB");
    assert_eq!(http_status(gw, "/-/health").await.unwrap(), 200);
    drop(conns);
}

/// A client with a tiny receive window that asks for `path` and then reads
/// nothing for 3 s; returns how many bytes it could read afterwards before the
/// gateway's close, the start of what it read, and its own address; or panics if
/// the gateway still held the connection open.
async fn stalled_download(gw: SocketAddr, path: &str) -> (usize, String, SocketAddr) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut conn = socket.connect(gw).await.unwrap();
    let me = conn.local_addr().unwrap();
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: {gw}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (got, closed) = read_to_close(&mut conn, Duration::from_secs(5)).await;
    let head = String::from_utf8_lossy(&got[..got.len().min(200)]).into_owned();
    assert!(
        closed,
        "still connected after 3 s without reading ({} bytes read since): {head:?}",
        got.len()
    );
    (got.len(), head, me)
}

/// Item 6: with `server.send_timeout = "1s"`, a client that asks for an archive
/// and then reads nothing is disconnected: after 3 s it can read only what was
/// already in flight, then the stream ends; on a miss and on a hit. A client
/// that reads gets the whole archive.
///
/// 16 MiB rather than 1 MiB: on loopback the kernel grows the gateway's send
/// buffer to `net.ipv4.tcp_wmem`'s maximum (4 MiB, seen 3.9 MB with BBR) however
/// small the client's window, so a 1 MiB response fits in the kernel at once,
/// the gateway never waits on a write, and there is nothing for it to time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_stops_reading_is_disconnected() {
    let (s, big) = setup_configured("[server]\nsend_timeout = \"1s\"\n", |r: &Registry| {
        r.publish_sized("alice/big", "1.0.0", 16 << 20)
    })
    .await;
    let gw = s.gateway.addr;
    // The index is mirrored first: the miss then starts streaming at once.
    eventually("the mirror exists", || {
        s.gateway.log().contains("index mirror refreshed")
    })
    .await;
    let (miss, head, first) = stalled_download(gw, &big.url_path()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
    let tmp = tempfile::tempdir().unwrap();
    let (out, body, _) = fetch(&s.gateway, &big.segment, &tmp.path().join("big.zip"));
    ok(&out, "a download that reads");
    assert_eq!(body.len() as u64, big.size);
    assert_eq!(sha256_hex(&body), big.checksum);
    let (hit, head, second) = stalled_download(gw, &big.url_path()).await;
    assert!(head.contains("x-cache: hit"), "{head:?}");
    eprintln!(
        "a stalled client of a {} byte archive read {miss} bytes (miss) and {hit} bytes (hit) before the close",
        big.size
    );
    assert!((miss as u64) < big.size && (hit as u64) < big.size);
    // The gateway gave up on writing to both (hyper's message drops the cause,
    // "the client took no data for 1s").
    let log = s.gateway.log();
    for client in [first, second] {
        assert!(
            log.contains(&format!(
                "connection ended with an error peer={client} error=error writing a body"
            )),
            "{client}: {log}"
        );
    }
}

const REFRESH: &str =
    "POST /-/index/refresh HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// `POST /-/index/refresh` with `Authorization: Bearer <token>`.
fn refresh_with(token: &str) -> String {
    REFRESH.replace(
        "Content-Length: 0\r\n",
        &format!("Content-Length: 0\r\nAuthorization: Bearer {token}\r\n"),
    )
}

/// Item 9: without `admin.token_env`, loopback clients may refresh without
/// credentials; 20 refreshes asked at once share a few upstream fetches.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refreshes_asked_at_once_share_a_few_upstream_fetches() {
    let (s, _) = json_gateway("").await;
    let gw = s.gateway.addr;
    eventually("the mirror exists", || {
        s.gateway.log().contains("index mirror refreshed")
    })
    .await;
    let answer = exchange(gw, REFRESH).await;
    assert_eq!(status(&answer), 200, "{answer}");
    s.upstream.clear_requests();
    let started = Instant::now();
    let calls: Vec<_> = (0..20)
        .map(|_| tokio::spawn(async move { exchange(gw, REFRESH).await }))
        .collect();
    for call in calls {
        let answer = call.await.unwrap();
        assert_eq!(status(&answer), 200, "{answer}");
    }
    let took = started.elapsed();
    let fetches = s.upstream.count("GET", "/git/index/info/refs");
    eprintln!("20 concurrent refreshes: {took:?}, {fetches} upstream info/refs requests");
    assert!(
        (1..=4).contains(&fetches),
        "{fetches} upstream fetches: {:?}",
        s.upstream.requests()
    );
}

/// Item 9: with `admin.token_env`, the admin endpoint wants that bearer token,
/// from loopback too: none or a wrong one is a 401, the right one a 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_admin_token_is_required_when_configured() {
    let token = "hostile-test-admin-token";
    let (s, _) = setup_configured_env(
        "[admin]\ntoken_env = \"MR_ADMIN_TOKEN\"\n",
        &[("MR_ADMIN_TOKEN", token)],
        |r: &Registry| r.publish("alice/json", "0.1.0", &[]),
    )
    .await;
    let gw = s.gateway.addr;
    assert_eq!(status(&exchange(gw, REFRESH).await), 401);
    assert_eq!(status(&exchange(gw, &refresh_with("wrong")).await), 401);
    let answer = exchange(gw, &refresh_with(token)).await;
    assert_eq!(status(&answer), 200, "{answer}");
}

/// `curl` of an archive with `-u credentials` (if any) into `out`: the status
/// code, the body and the lower-case head.
fn fetch_as(
    gw: &Gateway,
    p: &Published,
    credentials: Option<&str>,
    out: &Path,
) -> (String, Vec<u8>, String) {
    let headers = out.with_extension("h");
    let url = format!("{}{}", gw.url(), p.url_path());
    let mut args = vec![
        "-o",
        out.to_str().unwrap(),
        "-D",
        headers.to_str().unwrap(),
        "-w",
        "%{http_code}",
    ];
    if let Some(c) = credentials {
        args.extend(["-u", c]);
    }
    args.push(&url);
    let res = curl(&args);
    (
        String::from_utf8_lossy(&res.stdout).into_owned(),
        std::fs::read(out).unwrap_or_default(),
        std::fs::read_to_string(&headers)
            .unwrap_or_default()
            .to_ascii_lowercase(),
    )
}

/// Item 9: with `server.auth`, the registry endpoint asks for those credentials
/// (401 with `WWW-Authenticate`); with them an archive is served and cached like
/// any other: the gateway's own credentials do not make a request a bypass, and
/// they are not passed upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_auth_guards_the_endpoint_without_bypassing_the_cache() {
    let (s, json) = json_gateway("[server]\nauth = \"ci:secret\"\n").await;
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a.zip");
    for credentials in [None, Some("ci:wrong")] {
        let (code, _, head) = fetch_as(&s.gateway, &json, credentials, &file);
        assert_eq!(code, "401", "{credentials:?}: {head}");
        assert!(
            head.contains("www-authenticate: basic"),
            "{credentials:?}: {head}"
        );
    }
    for expect in ["x-cache: miss", "x-cache: hit"] {
        let (code, body, head) = fetch_as(&s.gateway, &json, Some("ci:secret"), &file);
        assert_eq!(code, "200", "{head}");
        assert!(head.contains(expect), "expected {expect}: {head}");
        assert_eq!(sha256_hex(&body), json.checksum);
    }
    let archive_gets: Vec<_> = s
        .upstream
        .seen()
        .into_iter()
        .filter(|r| r.path == json.url_path())
        .collect();
    assert_eq!(archive_gets.len(), 1);
    assert!(archive_gets[0].header("authorization").is_none());
}

/// Sets a file's modification time to 10 minutes ago.
fn age_ten_minutes(path: &Path) {
    ok(
        &run(Command::new("touch")
            .args(["-d", "10 minutes ago"])
            .arg(path)),
        "touch -d '10 minutes ago'",
    );
}

/// Item 3: store temp files orphaned by a crash (untouched for longer than the
/// grace for writers in progress) are removed when the gateway starts and by
/// `cache gc`; a recent one, maybe being written, is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn orphaned_store_temp_files_are_removed_at_start_and_by_gc() {
    let registry = Arc::new(Registry::new());
    let json = registry.publish("alice/json", "0.1.0", &[]);
    let up = Upstream::start(registry.clone()).await;
    let mut gw = Gateway::start(&up.url(), &up.ca_pem, &[]).await;
    let work = tempfile::tempdir().unwrap();
    let (out, body, _) = fetch(&gw, &json.segment, &work.path().join("a.zip"));
    ok(&out, "first download");
    assert_eq!(sha256_hex(&body), json.checksum);
    let data = gw.data_dir.clone();
    gw.kill();

    let tmp = data.join("store/tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let orphan = tmp.join("orphan-of-a-crash");
    std::fs::write(&orphan, vec![7u8; 64 * 1024]).unwrap();
    age_ten_minutes(&orphan);
    let recent = tmp.join("being-written");
    std::fs::write(&recent, b"in progress").unwrap();

    let gw = Gateway::start_with_data_dir(&up.url(), &up.ca_pem, &data, &[]).await;
    assert!(!orphan.exists(), "the orphan survived a restart");
    assert!(recent.exists(), "a recent temp file was removed at start");
    assert!(
        gw.log()
            .contains("removed temp files left in the store by a crash"),
        "{}",
        gw.log()
    );
    let (out, body, head) = fetch(&gw, &json.segment, &work.path().join("b.zip"));
    ok(&out, "download after the restart");
    assert!(head.contains("x-cache: hit"), "{head}");
    assert_eq!(sha256_hex(&body), json.checksum);

    let orphan = tmp.join("another-orphan");
    std::fs::write(&orphan, vec![7u8; 64 * 1024]).unwrap();
    age_ten_minutes(&orphan);
    let gc = admin::run(&["cache", "gc", "--max-size", "1 GiB"], Some(&data), None);
    assert!(gc.status.success(), "{}", admin::stderr(&gc));
    assert!(!orphan.exists(), "cache gc left an old orphan");
    assert!(recent.exists(), "cache gc removed a recent temp file");
}

/// Item 11: an archive refused because the upstream copy disagreed with the
/// index heals by itself once the upstream is fixed: asked again 3 s or more
/// after the verdict, the gateway looks again (no `/-/index/refresh` needed),
/// fetches the right bytes and stores them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_upstream_copy_heals_by_itself() {
    let (s, json) = setup_with(|r| r.publish("alice/json", "0.1.0", &[])).await;
    let tampered = Bytes::from_static(b"PK\x03\x04 not the published archive");
    s.registry.set_archive_bytes(&json.key, tampered.clone());
    let tmp = tempfile::tempdir().unwrap();
    let (out, _, head) = fetch(&s.gateway, &json.segment, &tmp.path().join("a"));
    let code = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        !out.status.success() || code == "502",
        "curl saw a clean end ({code}): {head}"
    );
    let verdict = Instant::now();
    let (out, _, _) = fetch(&s.gateway, &json.segment, &tmp.path().join("b"));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "502");
    assert_eq!(s.upstream.count("GET", &json.url_path()), 1);

    s.registry.set_archive_bytes(&json.key, json.zip.clone());
    tokio::time::sleep(
        (verdict + Duration::from_millis(3500)).saturating_duration_since(Instant::now()),
    )
    .await;
    let asked = Instant::now();
    fetch_miss_then_hit(&s.gateway, &json, "download once the upstream is fixed");
    eprintln!(
        "healed {:?} after the verdict, the recheck took {:?}",
        verdict.elapsed(),
        asked.elapsed()
    );
    assert_eq!(s.upstream.count("GET", &json.url_path()), 2);
}

/// One keep-alive request on `conn`: (status, response head, body), the body
/// read to its `content-length`.
async fn keep_alive_get(conn: &mut TcpStream, path: &str) -> (u16, String, Vec<u8>) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(conn).await;
    let len: usize = header(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no content-length: {head}"));
    let mut body = vec![0u8; len];
    tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut body))
        .await
        .expect("body within 10 s")
        .unwrap();
    (status(&head), head, body)
}

fn parked(gw: &Gateway) -> f64 {
    crate::ops::value(
        &crate::ops::scrape(gw),
        "moonbit_registry_connections_parked",
        &[],
    )
}

/// Idle keep-alive connections are parked (held without hyper's per-connection
/// buffers, `moonbit_registry_connections_parked`) and answer their next request
/// as before; h2 with prior knowledge is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_keep_alive_connections_are_parked_and_answer_their_next_request() {
    let (s, json) = json_gateway("").await;
    let gw = s.gateway.addr;
    let mut conns = Vec::new();
    for _ in 0..10 {
        let mut conn = TcpStream::connect(gw).await.unwrap();
        let (code, head, body) = keep_alive_get(&mut conn, &json.url_path()).await;
        assert_eq!(code, 200, "{head}");
        assert_eq!(sha256_hex(&body), json.checksum);
        conns.push(conn);
    }
    // Parked after a quarter second without a request.
    eventually("the ten idle connections are parked", || {
        parked(&s.gateway) == 10.0
    })
    .await;
    for conn in &mut conns {
        let (code, head, body) = keep_alive_get(conn, &json.url_path()).await;
        assert_eq!(code, 200, "{head}");
        assert_eq!(header(&head, "x-cache"), Some("hit"), "{head}");
        assert_eq!(sha256_hex(&body), json.checksum);
    }
    assert_eq!(s.upstream.count("GET", &json.url_path()), 1);
    drop(conns);
    eventually("closed connections leave the gauge", || {
        parked(&s.gateway) == 0.0
    })
    .await;

    let out = curl(&[
        "-s",
        "--http2-prior-knowledge",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{http_version}",
        &format!("{}/-/health", s.gateway.url()),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200 2");
}

/// `server.keep_alive_timeout` bounds a parked connection's idle time: it is
/// closed, and leaves the gauge; one that speaks within the bound is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parked_connections_are_closed_after_the_keep_alive_timeout() {
    let (s, json) = json_gateway("[server]\nkeep_alive_timeout = \"2s\"\n").await;
    let gw = s.gateway.addr;
    let (mut idle, mut busy) = (
        TcpStream::connect(gw).await.unwrap(),
        TcpStream::connect(gw).await.unwrap(),
    );
    for conn in [&mut idle, &mut busy] {
        assert_eq!(keep_alive_get(conn, &json.url_path()).await.0, 200);
    }
    eventually("both connections are parked", || parked(&s.gateway) == 2.0).await;
    let started = Instant::now();
    // `busy` speaks every second, within the bound each time.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(keep_alive_get(&mut busy, "/-/health").await.0, 200);
    }
    let (got, closed) = read_to_close(&mut idle, Duration::from_secs(5)).await;
    let waited = started.elapsed();
    assert!(closed && got.is_empty(), "closed without a word: {got:?}");
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(5),
        "closed after {waited:?}, the bound being 2 s (kept in rows of 1 s)"
    );
    eventually("the closed connection leaves the gauge", || {
        parked(&s.gateway) <= 1.0
    })
    .await;
    assert_eq!(keep_alive_get(&mut busy, "/-/health").await.0, 200);
}

/// On SIGTERM a parked connection is closed at once and the gateway exits
/// without waiting out its drain bound (10 s) on the parking lot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stop_closes_parked_connections_at_once() {
    let (mut s, json) = json_gateway("").await;
    let mut conn = TcpStream::connect(s.gateway.addr).await.unwrap();
    assert_eq!(keep_alive_get(&mut conn, &json.url_path()).await.0, 200);
    eventually("the connection is parked", || parked(&s.gateway) == 1.0).await;
    let started = Instant::now();
    let status = tokio::task::block_in_place(|| s.gateway.terminate(Duration::from_secs(5)));
    let status = status.expect("the gateway still ran 5 s after SIGTERM");
    assert!(status.success(), "exit status {status}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "stopping took {:?}",
        started.elapsed()
    );
    let (got, closed) = read_to_close(&mut conn, Duration::from_secs(1)).await;
    assert!(closed && got.is_empty(), "closed without a word: {got:?}");
}

/// Memory-tier hits of larger archives are sent from an in-memory file
/// (`sendfile`): keep-alive and pipelined hits get exactly the archive's bytes,
/// a HEAD gets none, and a client that stops reading a hit is disconnected
/// after `server.send_timeout` as with a write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hits_sent_from_memory_files_are_whole_and_bounded_in_time() {
    let config = "[server]\nsend_timeout = \"1s\"\n[storage]\nmemory_item_max = \"32 MiB\"\n";
    let (s, big) = setup_configured(config, |r: &Registry| {
        r.publish_sized("alice/big", "1.0.0", 16 << 20)
    })
    .await;
    let gw = s.gateway.addr;
    let path = big.url_path();
    let mut conn = TcpStream::connect(gw).await.unwrap();
    for expected in ["miss", "hit", "hit"] {
        let (code, head, body) = keep_alive_get(&mut conn, &path).await;
        assert_eq!(code, 200, "{head}");
        assert_eq!(header(&head, "x-cache"), Some(expected), "{head}");
        assert_eq!(sha256_hex(&body), big.checksum);
    }
    // Two GETs around a HEAD in one write: answered in order, bodies whole.
    let get = format!("GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n");
    let head_req = format!("HEAD {path} HTTP/1.1\r\nHost: gw\r\n\r\n");
    conn.write_all(format!("{get}{head_req}{get}").as_bytes())
        .await
        .unwrap();
    for method in ["GET", "HEAD", "GET"] {
        let head = read_head(&mut conn).await;
        assert_eq!(status(&head), 200, "{method}: {head}");
        if method == "GET" {
            let mut body = vec![0u8; big.size as usize];
            tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut body))
                .await
                .expect("body within 10 s")
                .unwrap();
            assert_eq!(sha256_hex(&body), big.checksum, "{method}");
        }
    }
    let (hit, head, client) = stalled_download(gw, &path).await;
    assert!(head.contains("x-cache: hit"), "{head:?}");
    assert!(
        (hit as u64) < big.size,
        "{hit} bytes reached a client that read nothing"
    );
    let log = s.gateway.log();
    assert!(
        log.contains(&format!("connection ended with an error peer={client}")),
        "{client}: {log}"
    );
}

/// A parked connection loses no bytes: two requests in one write, and request
/// heads that arrive in pieces around the moment it parks, are all answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_and_split_request_heads_survive_parking() {
    let (s, _) = json_gateway("").await;
    let gw = s.gateway.addr;
    let health = "GET /-/health HTTP/1.1\r\nHost: gw\r\n\r\n";
    let last = "GET /-/health HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n";
    let park = || tokio::time::sleep(Duration::from_millis(700));

    // Pipelined: both in one write.
    let answer = exchange(gw, &format!("{health}{last}")).await;
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer}");

    // One request, then the next head in pieces, each after the connection parked.
    let mut conn = TcpStream::connect(gw).await.unwrap();
    assert_eq!(keep_alive_get(&mut conn, "/-/health").await.0, 200);
    for piece in ["GET /-/he", "alth HTTP/1.1\r\n", "Host: gw\r\n"] {
        park().await;
        conn.write_all(piece.as_bytes()).await.unwrap();
    }
    park().await;
    conn.write_all(b"Connection: close\r\n\r\n").await.unwrap();
    let (got, closed) = read_to_close(&mut conn, Duration::from_secs(10)).await;
    let answer = String::from_utf8_lossy(&got);
    assert!(closed && answer.starts_with("HTTP/1.1 200"), "{answer}");

    // A whole request and the start of the next in one write; the rest later.
    let mut conn = TcpStream::connect(gw).await.unwrap();
    conn.write_all(format!("{health}GET /-/hea").as_bytes())
        .await
        .unwrap();
    park().await;
    conn.write_all(b"lth HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (got, closed) = read_to_close(&mut conn, Duration::from_secs(10)).await;
    let answer = String::from_utf8_lossy(&got);
    assert!(closed, "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer}");
}
