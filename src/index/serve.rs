//! Git smart HTTP answered from the local mirror: `git http-backend` (which runs
//! `git upload-pack --stateless-rpc` for v0 and v2, shallow and full) as a CGI
//! program, request body streamed into it and its output streamed back.

use std::path::Path;
use std::sync::Arc;

use bytes::BytesMut;
use futures_util::stream;
use http::header::{HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::ChildStdout;
use tokio::sync::Semaphore;

use super::pack_cache;
use crate::body::{self, BoxError, GatewayBody};
use crate::git::{self, Git};

/// git writes a few hundred bytes of CGI headers; anything past this is broken.
const CGI_HEADER_MAX: usize = 16 * 1024;
/// How long a request waits for a free git slot before a 503.
const SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// Bound on how long git may take before it starts answering.
const CGI_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Serve `rest` (`info/refs?...` or `git-upload-pack`) from the bare repo
/// `<root>/<repo>`.
pub async fn upload_pack(
    root: &Path,
    repo: &str,
    rest: &str,
    req: Request<GatewayBody>,
    slots: &Arc<Semaphore>,
    pack_cache: Option<&pack_cache::Hook>,
) -> Response<GatewayBody> {
    // Held until the response body is done (or dropped with it).
    let slot = match tokio::time::timeout(SLOT_WAIT, slots.clone().acquire_owned()).await {
        Ok(Ok(slot)) => slot,
        _ => {
            return body::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many index clones in progress; retry shortly",
            )
        }
    };
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path != "info/refs" && path != "git-upload-pack" {
        // Dumb-protocol paths (objects/..., HEAD) are not served: moon needs smart HTTP.
        return body::text(
            StatusCode::NOT_FOUND,
            format!("/git/index/{path} is not served by the mirror"),
        );
    }
    let mut git = Git::http_backend(root)
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("REQUEST_METHOD", req.method().as_str())
        .env("PATH_INFO", format!("/{repo}/{path}"))
        .env("QUERY_STRING", query)
        .env("REMOTE_ADDR", "127.0.0.1")
        .holding(slot);
    // Identical clones (same tip, same depth) share one pack computation.
    if let Some(hook) = pack_cache {
        git = hook.configure(git);
    }
    for (header, var) in [
        ("content-type", "CONTENT_TYPE"),
        ("content-length", "CONTENT_LENGTH"),
        ("git-protocol", "GIT_PROTOCOL"),
        ("content-encoding", "HTTP_CONTENT_ENCODING"),
    ] {
        if let Some(v) = req.headers().get(header).and_then(|v| v.to_str().ok()) {
            git = git.env(var, v);
        }
    }
    let git::Spawned {
        mut stdin,
        stdout,
        stderr,
        process,
    } = match git.spawn(git::Stderr::Pipe) {
        Ok(spawned) => spawned,
        Err(e) => return body::text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let mut incoming = req.into_body();
    tokio::spawn(async move {
        while let Some(Ok(frame)) = incoming.frame().await {
            if let Ok(data) = frame.into_data() {
                if stdin.write_all(&data).await.is_err() {
                    return;
                }
            }
        }
        let _ = stdin.shutdown().await;
    });
    if let Some(stderr) = stderr {
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::warn!(%line, "git http-backend");
            }
        });
    }
    let mut stdout = BufReader::with_capacity(64 * 1024, stdout);
    let head = match tokio::time::timeout(CGI_HEADER_TIMEOUT, read_cgi_head(&mut stdout)).await {
        Ok(Ok(head)) => head,
        Ok(Err(e)) => return body::text(StatusCode::BAD_GATEWAY, format!("git http-backend: {e}")),
        Err(_) => {
            return body::text(
                StatusCode::GATEWAY_TIMEOUT,
                "git http-backend did not answer",
            )
        }
    };
    let output = CgiOutput { stdout, process };
    let body = stream::unfold(Some(output), |state| async move {
        let mut out = state?;
        let mut buf = BytesMut::with_capacity(64 * 1024);
        match out.stdout.read_buf(&mut buf).await {
            // A pack cut short must not look complete to the client.
            Ok(0) => match out.process.finish().await {
                Ok(()) => None,
                Err(e) => Some((Err(Box::new(e) as BoxError), None)),
            },
            Ok(_) => Some((Ok(Frame::data(buf.freeze())), Some(out))),
            Err(e) => Some((Err(Box::new(e) as BoxError), None)),
        }
    });
    let mut resp = Response::new(StreamBody::new(body).boxed_unsync());
    *resp.status_mut() = head.0;
    *resp.headers_mut() = head.1;
    resp.headers_mut()
        .insert("x-cache", HeaderValue::from_static("mirror"));
    resp
}

/// Keeps git (and its slot) alive exactly as long as the client reads its output.
struct CgiOutput {
    stdout: BufReader<ChildStdout>,
    process: git::Process,
}

async fn read_cgi_head(
    stdout: &mut BufReader<ChildStdout>,
) -> Result<(StatusCode, http::HeaderMap), String> {
    let mut status = StatusCode::OK;
    let mut headers = http::HeaderMap::new();
    let mut seen = 0;
    loop {
        let mut line = Vec::new();
        let n = stdout
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("ended before its headers".into());
        }
        seen += n;
        if seen > CGI_HEADER_MAX {
            return Err("header block too long".into());
        }
        let line = String::from_utf8_lossy(&line);
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            return Ok((status, headers));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {line:?}"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split_whitespace().next().unwrap_or_default();
            status = code
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .ok_or_else(|| format!("bad status {value:?}"))?;
        } else {
            let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|e| e.to_string())?;
            let value = HeaderValue::from_str(value).map_err(|e| e.to_string())?;
            headers.append(name, value);
        }
    }
}
