//! `serve --offline`: every route answered without an upstream. The index comes
//! from the mirror as it is, archives, assets and `symbols.zip` from the store;
//! anything else is a 503 that says the gateway is offline.

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::{self, GatewayBody};
use crate::index::Expectation;
use crate::router::{Gateway, Route};
use crate::store::offline::SYMBOLS_KEY;
use crate::store::{Object, Trust};

impl Gateway {
    /// Answer `route` with no upstream. Health is answered by the normal path.
    pub(crate) async fn dispatch_offline(
        &self,
        route: Route,
        req: Request<Incoming>,
        source: usize,
    ) -> Response<GatewayBody> {
        let head = req.method() == Method::HEAD;
        match route {
            Route::Archive(key) => match self.index.expect_offline(&key) {
                Expectation::Known { checksum, .. } => {
                    let object = Object {
                        key: key.store_key(),
                        urls: Vec::new(),
                        content_type: "application/zip",
                        trust: Trust::Checksum {
                            label: format!("{}@{}", key.name(), key.version),
                            expected: checksum,
                            refreshes: self.index.refreshes(),
                        },
                    };
                    self.store.respond_offline(object, head).await
                }
                Expectation::Unknown => body::text(
                    StatusCode::NOT_FOUND,
                    format!(
                        "the gateway is offline and {}@{} is not in its index",
                        key.name(),
                        key.version
                    ),
                ),
            },
            Route::Asset(asset) => {
                let object = Object {
                    key: asset.store_key(),
                    urls: Vec::new(),
                    content_type: asset.content_type(),
                    trust: Trust::Complete,
                };
                self.store.respond_offline(object, head).await
            }
            Route::Symbols if matches!(*req.method(), Method::GET | Method::HEAD) => {
                // The copy kept while online, else the one an imported bundle brought.
                let url = self.sources[source].symbols.to_string();
                if let Some(resp) = self.mutable.respond_stored(&url, req.headers(), head).await {
                    return resp;
                }
                let object = Object {
                    key: SYMBOLS_KEY.into(),
                    urls: Vec::new(),
                    content_type: "application/zip",
                    trust: Trust::Complete,
                };
                self.store.respond_offline(object, head).await
            }
            Route::Index(rest) => self.index.handle_offline(source, req, &rest).await,
            Route::Refuse(status, reason) => body::text(status, reason),
            Route::IndexRefresh | Route::Symbols | Route::Pass | Route::Health => body::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the gateway is offline (serve --offline): it answers only the index, stored archives, assets and symbols.zip",
            ),
        }
    }
}
