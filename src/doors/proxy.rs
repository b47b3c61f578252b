//! The forward-proxy door (`HTTPS_PROXY=http://gw:8080`, same listener as the
//! registry endpoint): `CONNECT` to an intercepted host is decrypted and routed
//! like registry traffic; other `CONNECT`s and plain-HTTP absolute-form requests
//! are tunnelled or forwarded untouched, or refused, by the tunnel policy.

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::{tls, tunnel, Doors};
use crate::body::{self, GatewayBody};
use crate::passthrough;
use crate::router::Door;

/// Port that `CONNECT` must name for a registry host to be intercepted.
const HTTPS_PORT: u16 = 443;

/// Check `Proxy-Authorization` when the gateway requires it; `Some` is the 407.
fn refuse_unauthorized(doors: &Doors, req: &Request<Incoming>) -> Option<Response<GatewayBody>> {
    let expected = doors.proxy_auth.as_ref()?;
    let given = req
        .headers()
        .get(header::PROXY_AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Basic ")
                .or_else(|| v.strip_prefix("basic "))
        })
        .and_then(|b64| {
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .ok()
        });
    // Compared in constant time so the answer's timing tells nothing about the secret.
    let ok = given.is_some_and(|g| constant_time_eq(&g, expected.as_bytes()));
    if ok {
        return None;
    }
    let mut resp = body::text(
        StatusCode::PROXY_AUTHENTICATION_REQUIRED,
        "proxy authentication required",
    );
    resp.headers_mut().insert(
        header::PROXY_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"moonbit-registry\""),
    );
    Some(resp)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `CONNECT host:port`.
pub async fn connect(doors: Arc<Doors>, mut req: Request<Incoming>) -> Response<GatewayBody> {
    if let Some(resp) = refuse_unauthorized(&doors, &req) {
        return resp;
    }
    let Some(authority) = req.uri().authority().cloned() else {
        return body::text(StatusCode::BAD_REQUEST, "CONNECT needs host:port");
    };
    let host = authority.host().trim_end_matches('.').to_ascii_lowercase();
    let port = authority.port_u16().unwrap_or(HTTPS_PORT);
    let intercepted = port == HTTPS_PORT && doors.intercepted_source(&host).is_some();
    let upgrade = hyper::upgrade::on(&mut req);
    if intercepted {
        tokio::spawn(async move {
            match upgrade.await {
                Ok(upgraded) => tls::terminate(doors, TokioIo::new(upgraded), Some(host)).await,
                Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
            }
        });
        return Response::new(body::empty());
    }
    let addrs = match doors.tunnel.admit(&host, port).await {
        Ok(addrs) => addrs,
        Err(reason) => {
            tracing::info!(%host, port, %reason, "tunnel refused");
            return body::text(StatusCode::FORBIDDEN, reason);
        }
    };
    // Connect before answering 200, so a dead destination is a clear 502.
    let server = match tunnel::connect(&addrs).await {
        Ok(server) => server,
        Err(e) => {
            return body::text(
                StatusCode::BAD_GATEWAY,
                format!("cannot reach {host}:{port}: {e}"),
            )
        }
    };
    let label = format!("{host}:{port}");
    tracing::info!(target_host = %label, "tunnelling");
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => tunnel::splice(TokioIo::new(upgraded), server, &label).await,
            Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
        }
    });
    Response::new(body::empty())
}

/// `GET http://host/path` (absolute form): an intercepted host is routed like
/// registry traffic; any other host is forwarded under the tunnel policy.
pub async fn absolute(doors: &Doors, req: Request<Incoming>) -> Response<GatewayBody> {
    if let Some(resp) = refuse_unauthorized(doors, &req) {
        return resp;
    }
    let uri = req.uri().clone();
    let Some(host) = uri
        .host()
        .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
    else {
        return body::text(
            StatusCode::BAD_REQUEST,
            "absolute-form request without a host",
        );
    };
    if uri.scheme_str() != Some("http") {
        return body::text(
            StatusCode::BAD_REQUEST,
            "only http:// is forwarded; use CONNECT for https",
        );
    }
    if let Some(source) = doors.intercepted_source(&host) {
        return doors.route(req, Door::Intercepted { source }).await;
    }
    let port = uri.port_u16().unwrap_or(80);
    let addrs = match doors.tunnel.admit(&host, port).await {
        Ok(addrs) => addrs,
        Err(reason) => {
            tracing::info!(%host, port, %reason, "proxy request refused");
            return body::text(StatusCode::FORBIDDEN, reason);
        }
    };
    forward_to(doors, req, &addrs).await
}

/// Forward a plain-HTTP request over a connection to the addresses the policy
/// admitted: resolving the name again could give another (e.g. a metadata) address.
async fn forward_to(
    doors: &Doors,
    req: Request<Incoming>,
    addrs: &[SocketAddr],
) -> Response<GatewayBody> {
    let stream = match tunnel::connect(addrs).await {
        Ok(stream) => stream,
        Err(e) => return body::text(StatusCode::BAD_GATEWAY, format!("cannot connect: {e}")),
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(pair) => pair,
        Err(e) => {
            return body::text(
                StatusCode::BAD_GATEWAY,
                format!("HTTP handshake failed: {e}"),
            )
        }
    };
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "forwarded connection ended with an error");
        }
    });
    let (mut parts, incoming) = req.into_parts();
    let authority = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default();
    passthrough::strip_hop_by_hop(&mut parts.headers);
    if let Ok(host) = HeaderValue::from_str(&authority) {
        parts.headers.insert(header::HOST, host);
    }
    // The origin server gets origin-form.
    let origin_form = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    parts.uri = match origin_form.parse() {
        Ok(uri) => uri,
        Err(_) => return body::text(StatusCode::BAD_REQUEST, "bad request target"),
    };
    let out = Request::from_parts(parts, incoming);
    let timeout = doors.app.upstream.timeouts().response;
    match tokio::time::timeout(timeout, sender.send_request(out)).await {
        Ok(Ok(resp)) => {
            let (mut parts, incoming) = resp.into_parts();
            passthrough::strip_hop_by_hop(&mut parts.headers);
            parts
                .headers
                .insert("x-cache", HeaderValue::from_static("bypass"));
            Response::from_parts(parts, doors.app.upstream.idle_bounded(incoming))
        }
        Ok(Err(e)) => body::text(StatusCode::BAD_GATEWAY, format!("forwarding failed: {e}")),
        Err(_) => body::text(
            StatusCode::GATEWAY_TIMEOUT,
            format!("no answer within {timeout:?}"),
        ),
    }
}
