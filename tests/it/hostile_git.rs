//! Hostile clients of the index's git serving (issue 13): request bodies that
//! stall or trickle cannot hold git slots, one client address cannot take every
//! slot, and a git failure after the response head reaches the client as an
//! error, never as a clean `200` with an empty body. Real gateway, real `git`
//! and `curl`, raw TCP for the misbehaving clients (bound to other loopback
//! addresses, 127.0.0.2 and up, to be other clients).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::upstream::scenario::{clone_index, curl, ok, setup_configured, Setup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Short body timeouts, so stalled clients are dropped within the test.
const IDLE: Duration = Duration::from_secs(1);
const TOTAL: Duration = Duration::from_secs(3);

fn config(idle: Duration, total: Duration) -> String {
    format!(
        "[index]\nrequest_body_idle = \"{}ms\"\nrequest_body_timeout = \"{}ms\"\n",
        idle.as_millis(),
        total.as_millis()
    )
}

/// A gateway with `toml` as its config, its index mirrored.
async fn mirrored(toml: &str) -> Setup {
    let (s, _) = setup_configured(toml, |r| r.publish("alice/json", "0.1.0", &[])).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.gateway.log().contains("index mirror refreshed") {
        assert!(Instant::now() < deadline, "the mirror never appeared");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    s
}

/// Loopback address 127.0.0.N, another client as far as the gateway can tell.
fn loopback(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// A TCP connection to the gateway from `from`.
async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// An upload-pack POST that promises 1000 bytes of body and sends 16.
async fn stall(from: IpAddr, gw: SocketAddr) -> TcpStream {
    let mut conn = connect_from(from, gw).await;
    let head = format!(
        "POST /git/index/git-upload-pack HTTP/1.1\r\nHost: {gw}\r\n\
         Content-Type: application/x-git-upload-pack-request\r\n\
         Git-Protocol: version=2\r\nContent-Length: 1000\r\n\r\n0014command=fetch"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn
}

/// Everything the gateway sends on `conn` until it closes it (bounded), and when
/// it closed it.
async fn until_closed(mut conn: TcpStream, bound: Duration) -> (String, Instant) {
    let mut got = Vec::new();
    let read = tokio::time::timeout(bound, async {
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the connection was still open after {bound:?}; got {:?}",
        String::from_utf8_lossy(&got)
    );
    (String::from_utf8_lossy(&got).into_owned(), Instant::now())
}

/// The status line of a `GET info/refs` sent from `from`, and when it arrived.
async fn advertisement_from(from: IpAddr, gw: SocketAddr) -> (String, Instant) {
    let mut conn = connect_from(from, gw).await;
    let req = format!(
        "GET /git/index/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: {gw}\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let (answer, _) = until_closed(conn, Duration::from_secs(20)).await;
    let arrived = Instant::now();
    (
        answer.lines().next().unwrap_or_default().to_string(),
        arrived,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_upload_bodies_do_not_hold_git_slots() {
    let s = mirrored(&config(IDLE, TOTAL)).await;
    let gw = s.gateway.addr;
    // 32 stalled bodies (as many as there are git slots), 8 from each of four
    // addresses (each address's whole share), and one body trickling a byte
    // every 300 ms, never idle long enough for the idle timeout.
    let opened = Instant::now();
    let mut stalled = Vec::new();
    for n in 2..=5 {
        for _ in 0..8 {
            stalled.push(stall(loopback(n), gw).await);
        }
    }
    let mut trickle = stall(loopback(6), gw).await;
    let trickler = tokio::spawn(async move {
        let started = Instant::now();
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            tokio::select! {
                read = trickle.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                },
                _ = tokio::time::sleep(Duration::from_millis(300)) => {
                    if trickle.write_all(b"0").await.is_err() {
                        break;
                    }
                }
            }
            assert!(started.elapsed() < Duration::from_secs(20), "never cut off");
        }
        (
            String::from_utf8_lossy(&answer).into_owned(),
            started.elapsed(),
        )
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("clone");
    let gateway = s.gateway.url();
    let started = Instant::now();
    let out = tokio::task::spawn_blocking({
        let url = gateway.clone();
        move || {
            let mut cmd = std::process::Command::new("timeout");
            cmd.args([
                "60",
                "git",
                "-c",
                "protocol.version=2",
                "clone",
                "--depth",
                "1",
            ])
            .args(["--single-branch", "--no-tags"])
            .arg(format!("{url}/git/index"))
            .arg(&dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0");
            cmd.output().unwrap()
        }
    })
    .await
    .unwrap();
    let took = started.elapsed();
    eprintln!("clone while 32 upload bodies stall: {took:?}");
    ok(&out, "git clone --depth 1 while 32 upload bodies stall");
    assert!(took < Duration::from_secs(15), "the clone took {took:?}");

    // Every stalled body is cut off by the idle timeout, with a 408.
    for conn in stalled {
        let (answer, closed) = until_closed(conn, Duration::from_secs(15)).await;
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "a stalled body got {answer:?}"
        );
        let after = closed - opened;
        assert!(
            after < IDLE + Duration::from_secs(6),
            "dropped after {after:?}"
        );
    }
    // The trickling one by the total timeout.
    let (answer, after) = trickler.await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "the trickle got {answer:?}"
    );
    assert!(
        after >= TOTAL - Duration::from_millis(100) && after < TOTAL + Duration::from_secs(6),
        "the trickle was cut off after {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_client_address_cannot_take_every_slot() {
    // A longer idle timeout: the other client's answer must come while the
    // first one's stalled requests are all still held.
    let idle = Duration::from_secs(3);
    let s = mirrored(&config(idle, Duration::from_secs(10))).await;
    let gw = s.gateway.addr;
    // 127.0.0.2 uses its whole share (8) with stalled bodies.
    let opened = Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..8 {
        stalled.push(stall(loopback(2), gw).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Its ninth request waits for one of its own to end; another client's does not.
    let ninth = tokio::spawn(advertisement_from(loopback(2), gw));
    let (other, other_at) = advertisement_from(loopback(3), gw).await;
    assert!(
        other.starts_with("HTTP/1.1 200"),
        "another client got {other:?}"
    );
    assert!(
        other_at < opened + idle,
        "another client was answered only after {:?}",
        other_at - opened
    );
    let (status, ninth_at) = ninth.await.unwrap();
    assert!(
        status.starts_with("HTTP/1.1 200"),
        "the ninth got {status:?}"
    );
    // Not before the first stalled request was cut off (at `idle`).
    assert!(
        ninth_at >= opened + idle - Duration::from_millis(100),
        "the ninth request was answered after {:?}, with 8 requests of its client still held",
        ninth_at - opened
    );
    for conn in stalled {
        let (answer, _) = until_closed(conn, Duration::from_secs(15)).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    }
}

/// `curl` posting `body` (a file) to the gateway's upload-pack with `headers`:
/// its output with `-w '%{http_code}'`.
fn post_upload_pack(s: &Setup, body: &std::path::Path, headers: &[&str]) -> std::process::Output {
    let url = format!("{}/git/index/git-upload-pack", s.gateway.url());
    let data = format!("@{}", body.display());
    let mut args = vec![
        "--noproxy",
        "*",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Content-Type: application/x-git-upload-pack-request",
    ];
    for h in headers {
        args.extend(["-H", h]);
    }
    args.extend(["--data-binary", &data, &url]);
    curl(&args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn git_failures_are_never_a_clean_empty_200() {
    let s = mirrored("").await;
    let work = tempfile::tempdir().unwrap();

    // git http-backend fails after writing its head (it cannot inflate a body
    // that claims to be gzip), and exits 0: the transfer must still fail.
    let garbage = work.path().join("garbage");
    std::fs::write(&garbage, b"this is not gzip at all").unwrap();
    let out = post_upload_pack(&s, &garbage, &["Content-Encoding: gzip"]);
    let code = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!(
        "gzip garbage: HTTP {code}, curl {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    assert!(
        !out.status.success() || code.starts_with('4') || code.starts_with('5'),
        "a body git could not read was answered {code} and ended cleanly: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Larger than git would take (10 MiB): a clear 413 before git runs, with a
    // Content-Length and chunked.
    let big = work.path().join("big");
    std::fs::write(&big, vec![b'0'; 11 << 20]).unwrap();
    for headers in [&[][..], &["Transfer-Encoding: chunked"][..]] {
        let out = post_upload_pack(&s, &big, headers);
        let code = String::from_utf8_lossy(&out.stdout).to_string();
        assert_eq!(
            code,
            "413",
            "{headers:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // And the index is still served.
    let dir = work.path().join("clone");
    ok(
        &clone_index(&s.gateway, &dir, "2", &["--depth", "1"]),
        "clone afterwards",
    );
}
