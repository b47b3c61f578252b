//! The registry index (git smart HTTP: `info/refs`, `git-upload-pack`), streamed to
//! and from the source's index URL. Bodies flow both ways unbuffered and the
//! `Git-Protocol` and `Content-Encoding` headers are kept, so protocol v2, shallow
//! clones and later pulls work as they do against the upstream.

use http::{Request, Response};
use hyper::body::Incoming;

use crate::body::GatewayBody;
use crate::config::{join, Source};
use crate::passthrough;
use crate::upstream::Upstream;

/// Forward one index request; `rest` is what follows `/git/index/`, query included.
pub async fn forward(
    upstream: &Upstream,
    source: &Source,
    req: Request<Incoming>,
    rest: &str,
) -> Response<GatewayBody> {
    let url = join(&source.index, &format!("/{rest}"));
    passthrough::forward(upstream, req, &url).await
}
