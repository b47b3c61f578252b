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

/// How a [`Counted`] body's life ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Its last frame was read.
    Complete,
    /// It failed while being read.
    Failed,
    /// It was dropped unfinished; `at_end` says whether the inner body had nothing
    /// left (an empty body hyper never polls).
    Dropped { at_end: bool },
}

/// `inner` with its data bytes counted: `on_end(bytes, how)` runs exactly once,
/// when the body ends, fails or is dropped. What the access log and the upstream
/// byte counts are both made of.
pub fn counted<F>(inner: GatewayBody, on_end: F) -> GatewayBody
where
    F: FnOnce(u64, End) + Send + Unpin + 'static,
{
    Counted {
        inner,
        bytes: 0,
        on_end: Some(on_end),
    }
    .boxed_unsync()
}

struct Counted<F: FnOnce(u64, End)> {
    inner: GatewayBody,
    bytes: u64,
    on_end: Option<F>,
}

impl<F: FnOnce(u64, End)> Counted<F> {
    fn end(&mut self, how: End) {
        if let Some(on_end) = self.on_end.take() {
            on_end(self.bytes, how);
        }
    }
}

impl<F: FnOnce(u64, End) + Unpin> http_body::Body for Counted<F> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
            }
            // The end of the body is the end of the request: recorded now rather
            // than when the connection gets round to dropping it.
            Poll::Ready(None) => this.end(End::Complete),
            Poll::Ready(Some(Err(_))) => this.end(End::Failed),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<F: FnOnce(u64, End)> Drop for Counted<F> {
    fn drop(&mut self) {
        let at_end = http_body::Body::is_end_stream(&self.inner);
        self.end(End::Dropped { at_end });
    }
}
