//! The index's smart HTTP side: `git http-backend` run as a CGI program, with
//! the request body streamed into its stdin and its stdout streamed back.
//!
//! Packs are never collected in memory; a client that goes away drops the
//! body stream, which kills the child (`kill_on_drop`).

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;

use bytes::BytesMut;
use futures_util::stream;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use percent_encoding::percent_decode_str;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

use super::server::{text, Body, Shared};

/// Upper bound for the CGI header block; git writes a few hundred bytes.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Answers `GET|POST /git/<repo>/...` by running `git http-backend`.
pub(super) async fn git_http_backend(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let Some(rest) = req.uri().path().strip_prefix("/git") else {
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    let path_info = match percent_decode_str(rest).decode_utf8() {
        Ok(p) if p.starts_with('/') => p.into_owned(),
        Ok(_) => return text(StatusCode::NOT_FOUND, "not found\n"),
        Err(_) => return text(StatusCode::BAD_REQUEST, "path is not UTF-8\n"),
    };
    let registry = &shared.registry;
    let mut cmd = Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", registry.home())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", registry.home().join(".gitconfig"))
        .env("GIT_PROJECT_ROOT", registry.git_project_root())
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("SERVER_SOFTWARE", "moonbit-registry-test-upstream")
        .env("SERVER_PROTOCOL", format!("{:?}", req.version()))
        .env("REQUEST_METHOD", req.method().as_str())
        .env("PATH_INFO", path_info)
        .env("QUERY_STRING", req.uri().query().unwrap_or(""))
        .env("REMOTE_ADDR", peer.ip().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let headers = req.headers();
    for (header, var) in [
        ("content-type", "CONTENT_TYPE"),
        ("content-length", "CONTENT_LENGTH"),
        ("git-protocol", "GIT_PROTOCOL"),
        ("content-encoding", "HTTP_CONTENT_ENCODING"),
    ] {
        if let Some(value) = headers.get(header).and_then(|v| v.to_str().ok()) {
            cmd.env(var, value);
        }
    }

    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("cannot start git http-backend: {e}\n"),
            )
        }
    };
    let (Some(mut stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "git http-backend pipes missing\n",
        );
    };

    // Request body -> stdin, then EOF. A client error just ends the input.
    let mut body = req.into_body();
    shared.spawn(async move {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            if let Ok(data) = frame.into_data() {
                if stdin.write_all(&data).await.is_err() {
                    break;
                }
            }
        }
        let _ = stdin.shutdown().await;
    });
    // stderr -> test output, so a failing clone explains itself.
    shared.spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[test upstream] git http-backend: {line}");
        }
    });

    let mut stdout = BufReader::with_capacity(64 * 1024, stdout);
    let mut response = Response::builder();
    let mut status = StatusCode::OK;
    let mut header_bytes = 0;
    loop {
        let mut line = Vec::new();
        match stdout.read_until(b'\n', &mut line).await {
            Ok(0) => {
                return text(
                    StatusCode::BAD_GATEWAY,
                    "git http-backend ended before its CGI headers\n",
                )
            }
            Ok(n) => header_bytes += n,
            Err(e) => {
                return text(
                    StatusCode::BAD_GATEWAY,
                    &format!("reading git http-backend output: {e}\n"),
                )
            }
        }
        if header_bytes > MAX_HEADER_BYTES {
            return text(
                StatusCode::BAD_GATEWAY,
                "git http-backend header block too long\n",
            );
        }
        let line = String::from_utf8_lossy(&line);
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            return text(
                StatusCode::BAD_GATEWAY,
                &format!("bad CGI header line from git http-backend: {line:?}\n"),
            );
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split_whitespace().next().unwrap_or("");
            match code
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
            {
                Some(code) => status = code,
                None => {
                    return text(
                        StatusCode::BAD_GATEWAY,
                        &format!("bad CGI Status from git http-backend: {value:?}\n"),
                    )
                }
            }
            continue;
        }
        if is_hop_by_hop(name) {
            continue;
        }
        match (
            HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(name), Ok(value)) => response = response.header(name, value),
            _ => {
                return text(
                    StatusCode::BAD_GATEWAY,
                    &format!("bad CGI header from git http-backend: {line:?}\n"),
                )
            }
        }
    }

    let body = stream::unfold(Some(CgiOutput { stdout, child }), |state| async move {
        let mut state = state?;
        let mut buf = BytesMut::with_capacity(64 * 1024);
        match state.stdout.read_buf(&mut buf).await {
            Ok(0) => match state.child.wait().await {
                Ok(exit) if exit.success() => None,
                // The pack may be cut short: fail the body rather than end it cleanly.
                Ok(exit) => Some((
                    Err(std::io::Error::other(format!("git http-backend {exit}"))),
                    None,
                )),
                Err(e) => Some((Err(e), None)),
            },
            Ok(_) => Some((Ok(Frame::data(buf.freeze())), Some(state))),
            Err(e) => Some((Err(e), None)),
        }
    });
    match response.status(status).body(StreamBody::new(body).boxed()) {
        Ok(response) => response,
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("building the response: {e}\n"),
        ),
    }
}

/// The child and its stdout, kept together so dropping the body kills git.
struct CgiOutput {
    stdout: BufReader<ChildStdout>,
    child: Child,
}

fn is_hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
        "te",
        "trailer",
    ]
    .iter()
    .any(|h| name.trim().eq_ignore_ascii_case(h))
}
