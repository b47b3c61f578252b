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
        match self.serve_held(&object, head).await {
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
