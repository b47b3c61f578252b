//! The one body type every handler answers with (a boxed stream of bytes), and
//! the small responses the gateway writes itself: errors, health, plain text.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Streams from the upstream, the store or memory all become this.
pub type GatewayBody = UnsyncBoxBody<Bytes, BoxError>;

/// A client's request body, as the router and handlers take it.
pub fn incoming(body: hyper::body::Incoming) -> GatewayBody {
    body.map_err(|e| Box::new(e) as BoxError).boxed_unsync()
}

pub fn empty() -> GatewayBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn full(bytes: impl Into<Bytes>) -> GatewayBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A plain-text answer written by the gateway itself, e.g. a clear error.
pub fn text(status: StatusCode, message: impl Into<String>) -> Response<GatewayBody> {
    let mut message = message.into();
    if !message.ends_with('\n') {
        message.push('\n');
    }
    let mut resp = Response::new(full(message));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The answer to anything that would need an upstream while the gateway is
/// offline (`serve --offline`).
pub fn offline() -> Response<GatewayBody> {
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        "the gateway is offline (serve --offline): it answers only the index, stored archives, assets and symbols.zip",
    )
}

pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<GatewayBody> {
    let mut resp = Response::new(full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
