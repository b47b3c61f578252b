//! Requests the gateway does not cache (index traffic, `symbols.zip`, the API,
//! publishing, anything with `Authorization`) are forwarded as they are: request and
//! response bodies streamed both ways, end-to-end headers kept, hop-by-hop headers
//! dropped (RFC 9110 §7.6.1).

use crate::body::{self, GatewayBody};
use crate::upstream::{Upstream, UpstreamError};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};

/// Headers that describe one connection, not the message.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Remove hop-by-hop headers, including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Forward `req` to `target` (a full URL) and stream the answer back.
pub async fn forward(
    upstream: &Upstream,
    req: Request<GatewayBody>,
    target: &str,
) -> Response<GatewayBody> {
    let (parts, incoming) = req.into_parts();
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    // The client addressed us; the upstream's Host comes from the target URL.
    headers.remove(header::HOST);
    let mut out = Request::builder().method(parts.method).uri(target);
    if let Some(h) = out.headers_mut() {
        *h = headers;
    }
    let out = match out.body(incoming) {
        Ok(out) => out,
        Err(e) => {
            return body::text(
                StatusCode::BAD_GATEWAY,
                format!("bad upstream URL {target}: {e}"),
            )
        }
    };
    let started = std::time::Instant::now();
    match upstream.send(out).await {
        Ok(resp) => {
            let (mut parts, incoming) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            parts
                .headers
                .insert("x-cache", HeaderValue::from_static("bypass"));
            Response::from_parts(
                parts,
                upstream.idle_bounded_metered(target, started, incoming),
            )
        }
        Err(UpstreamError::Offline { .. }) => body::offline(),
        Err(e) => {
            tracing::warn!(%target, error = %e, "upstream request failed");
            body::text(StatusCode::BAD_GATEWAY, e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("git-protocol", HeaderValue::from_static("version=2"));
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(h.get(header::TRANSFER_ENCODING).is_none());
        assert_eq!(h.get("git-protocol").unwrap(), "version=2");
        assert_eq!(h.get(header::CONTENT_ENCODING).unwrap(), "gzip");
    }
}
