//! The index for `serve --offline`: mirrors read once at start, never refreshed,
//! served as they are; with no mirror, a clear 503 instead of a pass-through.

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::{repo_name, serve, Expectation, Index};
use crate::archive::ArchiveKey;
use crate::body::{self, GatewayBody};

impl Index {
    /// Read the existing mirrors; no upstream is contacted, now or later.
    pub async fn start_offline(&self) {
        for m in &self.mirrors {
            match m.load().await {
                Ok(()) if m.exists() => tracing::info!(
                    source = %m.source, commit = %m.snapshot().commit.as_deref().unwrap_or("-"),
                    "offline: serving the index mirror as it is"
                ),
                Ok(()) => {
                    tracing::warn!(source = %m.source, "offline: no index mirror; import a bundle first")
                }
                Err(error) => {
                    tracing::warn!(source = %m.source, %error, "offline: index mirror unreadable")
                }
            }
        }
    }

    /// Answer a client's index request from the primary mirror as it is.
    pub async fn handle_offline(
        &self,
        position: usize,
        req: Request<Incoming>,
        rest: &str,
    ) -> Response<GatewayBody> {
        let mirror = &self.mirrors[position];
        if !mirror.exists() {
            return body::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the gateway is offline and has no index mirror (import a bundle first)",
            );
        }
        serve::upload_pack(
            &self.root,
            &repo_name(&mirror.source),
            rest,
            req,
            &self.git_slots,
            self.pack_cache.as_ref(),
        )
        .await
    }

    /// What the mirrors say about `key`, without refreshing.
    pub fn expect_offline(&self, key: &ArchiveKey) -> Expectation {
        self.lookup(key).unwrap_or(Expectation::Unknown)
    }
}
