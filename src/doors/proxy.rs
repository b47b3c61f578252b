//! The forward-proxy door (`HTTPS_PROXY=http://gw:8080`, same listener as the
//! registry endpoint): `CONNECT` to an intercepted host is decrypted and routed
//! like registry traffic; other `CONNECT`s and plain-HTTP absolute-form requests
//! are tunnelled or forwarded untouched, or refused, by the tunnel policy.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;

use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::{tls, tunnel, with_causes, Carrying, Doors, TunnelRefused};
use crate::body::{self, GatewayBody};
use crate::client::basic_matches;
use crate::ops::jobs::JobId;
use crate::passthrough;
use crate::router::Door;

/// Port that `CONNECT` must name for a registry host to be intercepted.
const HTTPS_PORT: u16 = 443;

/// Check `Proxy-Authorization` when the gateway requires it; `Some` is the 407.
fn refuse_unauthorized(doors: &Doors, req: &Request<Incoming>) -> Option<Response<GatewayBody>> {
    let expected = doors.proxy_auth.as_ref()?;
    if basic_matches(req.headers().get(header::PROXY_AUTHORIZATION), expected) {
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

/// The CI job a proxy client names as its user (`HTTPS_PROXY=http://<job>:@gw`),
/// when the gateway asks for no proxy credentials; an invalid name is ignored.
fn proxy_user_job(req: &Request<Incoming>) -> Option<JobId> {
    use base64::Engine;
    let value = req
        .headers()
        .get(header::PROXY_AUTHORIZATION)?
        .to_str()
        .ok()?;
    let b64 = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let user_pass = String::from_utf8(decoded).ok()?;
    let user = user_pass
        .split_once(':')
        .map_or(user_pass.as_str(), |(u, _)| u);
    let user = percent_encoding::percent_decode_str(user)
        .decode_utf8()
        .ok()?;
    JobId::parse(&user).ok()
}

/// The `host:port` of a `CONNECT` target (RFC 9110 §9.3.6 authority-form), strictly:
/// a port is required and must be 1-65535, no user info, an IPv6 host in brackets.
/// The host comes back lower-case without a trailing dot.
pub fn parse_connect_target(target: &str) -> Result<(String, u16), &'static str> {
    if target.contains(['@', '/', '?', '#']) || target.chars().any(|c| c.is_ascii_whitespace()) {
        return Err("CONNECT needs host:port, nothing else");
    }
    let (host, port) = target.rsplit_once(':').ok_or("CONNECT needs host:port")?;
    // Digits only: `u16::from_str` would also take a leading `+`.
    let port = match port.parse::<u16>() {
        Ok(number) if number != 0 && port.bytes().all(|b| b.is_ascii_digit()) => number,
        _ => return Err("CONNECT port must be a number from 1 to 65535"),
    };
    let host = match host.strip_prefix('[') {
        Some(v6) => {
            let inner = v6.strip_suffix(']').ok_or("bad IPv6 host in CONNECT")?;
            inner
                .parse::<std::net::Ipv6Addr>()
                .map_err(|_| "bad IPv6 host in CONNECT")?;
            inner.to_string()
        }
        None if host.contains(':') => return Err("an IPv6 host must be in brackets"),
        None => host.trim_end_matches('.').to_ascii_lowercase(),
    };
    if host.is_empty() {
        return Err("CONNECT needs a host");
    }
    Ok((host, port))
}

/// `CONNECT host:port`.
pub async fn connect(
    doors: Arc<Doors>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    permit: Arc<OwnedSemaphorePermit>,
) -> Response<GatewayBody> {
    if let Some(resp) = refuse_unauthorized(&doors, &req) {
        return resp;
    }
    let target = req.uri().authority().map(|a| a.as_str()).unwrap_or("");
    let (host, port) = match parse_connect_target(target) {
        Ok(parsed) => parsed,
        Err(reason) => return body::text(StatusCode::BAD_REQUEST, reason),
    };
    let intercepted = port == HTTPS_PORT && doors.intercepted_source(&host).is_some();
    let job = if doors.proxy_auth.is_none() {
        proxy_user_job(&req)
    } else {
        None
    };
    let upgrade = hyper::upgrade::on(&mut req);
    if intercepted {
        tokio::spawn(async move {
            let _permit = permit;
            match upgrade.await {
                Ok(upgraded) => {
                    tls::terminate(doors, TokioIo::new(upgraded), Some(host), peer, job).await
                }
                Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
            }
        });
        return Response::new(body::empty());
    }
    // Connect before answering 200, so a dead destination is a clear 502.
    let server = match doors.open_tunnel(&host, port, Carrying::Connect).await {
        Ok(server) => server,
        Err(refused) => return refusal(&host, port, refused),
    };
    let label = format!("{host}:{port}");
    tracing::info!(target_host = %label, "tunnelling");
    tokio::spawn(async move {
        let _permit = permit;
        match upgrade.await {
            Ok(upgraded) => tunnel::splice(TokioIo::new(upgraded), server, &label).await,
            Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
        }
    });
    Response::new(body::empty())
}

/// `GET http://host/path` (absolute form): an intercepted host is routed like
/// registry traffic; any other host is forwarded under the tunnel policy.
pub async fn absolute(
    doors: &Doors,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<GatewayBody> {
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
        return doors.route(req, Door::Intercepted { source }, peer).await;
    }
    let port = match (uri.port(), uri.port_u16()) {
        (None, _) => 80,
        (Some(_), Some(port)) if port != 0 => port,
        _ => {
            return body::text(
                StatusCode::BAD_REQUEST,
                "the port must be a number from 1 to 65535",
            )
        }
    };
    // Connected to the addresses the policy admitted: resolving the name again
    // could give another (e.g. a metadata) address.
    let stream = match doors.open_tunnel(&host, port, Carrying::Forward).await {
        Ok(stream) => stream,
        Err(refused) => return refusal(&host, port, refused),
    };
    forward_to(doors, req, stream, peer).await
}

/// The answer to a tunnel or forward that was not opened.
fn refusal(host: &str, port: u16, refused: TunnelRefused) -> Response<GatewayBody> {
    match refused {
        TunnelRefused::Forbidden(reason) => {
            tracing::info!(%host, port, %reason, "tunnel refused");
            body::text(StatusCode::FORBIDDEN, reason)
        }
        TunnelRefused::Unreachable(e) => body::text(
            StatusCode::BAD_GATEWAY,
            format!("cannot reach {host}:{port}: {e}"),
        ),
    }
}

/// Forward a plain-HTTP request over `stream`.
async fn forward_to(
    doors: &Doors,
    req: Request<Incoming>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
) -> Response<GatewayBody> {
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
            tracing::debug!(error = %with_causes(&e), "forwarded connection ended with an error");
        }
    });
    let (mut parts, incoming) = req.into_parts();
    // Host is host[:port]: user info in the target is never forwarded.
    let authority = match (parts.uri.host(), parts.uri.port()) {
        (Some(host), Some(port)) => format!("{host}:{port}"),
        (Some(host), None) => host.to_string(),
        _ => String::new(),
    };
    passthrough::strip_hop_by_hop(&mut parts.headers);
    if let Ok(host) = HeaderValue::from_str(&authority) {
        parts.headers.insert(header::HOST, host);
    }
    // Say who asked (RFC 7239): the destination, even this gateway itself reached
    // through loopback, must not take the request for a local one.
    let client = match peer.ip() {
        std::net::IpAddr::V4(ip) => format!("for={ip}"),
        std::net::IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
    };
    if let Ok(value) = HeaderValue::from_str(&client) {
        parts.headers.append(header::FORWARDED, value);
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn connect_targets_are_strict() {
        assert_eq!(
            parse_connect_target("Mooncakes.IO.:443"),
            Ok(("mooncakes.io".into(), 443))
        );
        assert_eq!(parse_connect_target("[::1]:8443"), Ok(("::1".into(), 8443)));
        for bad in [
            "127.0.0.1:99999",
            "host",
            "host:",
            "host:0",
            "host:+443",
            ":443",
            "u:p@host:443",
            "::1:443",
            "[::1:443",
            "host:443/x",
            "ho st:443",
        ] {
            assert!(parse_connect_target(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn any_connect_target_is_a_host_and_port_or_an_error(target in "\\PC{0,80}") {
            if let Ok((host, port)) = parse_connect_target(&target) {
                prop_assert!(port != 0);
                prop_assert!(!host.is_empty());
                prop_assert!(!host.contains(['@', '/', ' ']));
            }
        }

        #[test]
        fn host_and_port_round_trip(host in "[a-z0-9]([a-z0-9.-]{0,30}[a-z0-9])?", port in 1u16..) {
            prop_assert_eq!(parse_connect_target(&format!("{host}:{port}")), Ok((host.trim_end_matches('.').to_string(), port)));
        }
    }
}
