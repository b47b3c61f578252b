//! Answers from the store alone, for `serve --offline`: what is stored (and still
//! intact) is served, anything else is a clear 404 that never reaches an upstream.

use http::{Response, StatusCode};

use super::{Object, Store};
use crate::body::{self, GatewayBody};

/// Store key of the `symbols.zip` kept for offline use (by `export` and `import`).
pub const SYMBOLS_KEY: &str = "symbols/symbols.zip";

impl Store {
    /// Serve `object` from memory or disk, or say it is not stored.
    pub async fn respond_offline(&self, object: Object, head: bool) -> Response<GatewayBody> {
        if let Some(hot) = self
            .memory
            .get(&object.key)
            .await
            .filter(|h| object.accepts(&h.sha256))
        {
            let len = hot.bytes.len() as u64;
            super::usage::touch(self.disk.dir(), &hot.sha256);
            let body = if head {
                body::empty()
            } else {
                body::full(hot.bytes)
            };
            return super::object_response(&object, Some(len), Some(&hot.sha256), "hit", body);
        }
        match self.serve_stored(&object, head).await {
            Some(resp) => resp,
            None => body::text(
                StatusCode::NOT_FOUND,
                format!(
                    "the gateway is offline and {} is not in its store (warm or import it first)",
                    object.key
                ),
            ),
        }
    }
}
