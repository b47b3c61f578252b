//! The HTTP client the gateway uses to reach its sources: pooled connections,
//! HTTP/1.1 and HTTP/2 by ALPN, system roots plus an optional extra CA, and
//! timeouts on connect, on the response head and between body chunks.
//!
//! The gateway's own requests ([`Upstream::send_guarded`], [`Upstream::probe`])
//! carry the credential of the source the URL belongs to, and only that one;
//! [`Upstream::send`] (the passthrough of clients' requests) adds nothing, so a
//! client never rides on the gateway's credentials.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, BodyStream, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio_stream::StreamExt;

use crate::body::{BoxError, GatewayBody};
use crate::breaker::{Breakers, Refusal};
use crate::config::Timeouts;

/// Why an upstream exchange failed, in words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not reach {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("{url} sent no response head within {0:?}", timeout)]
    Timeout { url: String, timeout: Duration },
    #[error("bad upstream URL {0}")]
    BadUrl(String),
    /// `serve --offline` (or an air-gapped command): there is no upstream to ask.
    #[error("the gateway is offline: {url} was not asked")]
    Offline { url: String },
    /// The source's circuit breaker is open: not even tried.
    #[error(transparent)]
    Down(#[from] Refusal),
}

/// Shared, cheap to clone client for every source.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, GatewayBody>,
    timeouts: Timeouts,
    /// Per-source circuit breakers consulted and fed by [`Upstream::send_guarded`].
    health: Arc<Breakers>,
    /// No source is reachable by design (`serve --offline`): every exchange is
    /// refused at once, so offline is a property of the sources, not a code path.
    offline: bool,
}

impl Upstream {
    pub fn new(extra_ca: Option<&Path>, timeouts: Timeouts) -> anyhow::Result<Upstream> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            tracing::warn!(%error, "could not load some system root certificates");
        }
        let (_, ignored) = roots.add_parsable_certificates(native.certs);
        if ignored > 0 {
            tracing::debug!(ignored, "system root certificates rustls could not parse");
        }
        if let Some(path) = extra_ca {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .with_context(|| format!("could not read upstream CA {}", path.display()))?;
            if certs.is_empty() {
                anyhow::bail!("upstream CA {} holds no PEM certificate", path.display());
            }
            for cert in certs {
                roots
                    .add(cert)
                    .with_context(|| format!("upstream CA {} is not usable", path.display()))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS set-up")?
            .with_root_certificates(roots)
            .with_no_client_auth();

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeouts.connect));
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(60)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build(https);
        Ok(Upstream {
            client,
            timeouts,
            health: Arc::new(Breakers::default()),
            offline: false,
        })
    }

    /// The same client with no upstream behind it: every request is refused with
    /// [`UpstreamError::Offline`] before anything leaves the machine.
    pub fn offline(mut self) -> Upstream {
        self.offline = true;
        self
    }

    pub fn is_offline(&self) -> bool {
        self.offline
    }

    /// Use `health`'s breakers for guarded calls.
    pub fn with_health(mut self, health: Arc<Breakers>) -> Upstream {
        self.health = health;
        self
    }

    pub fn health(&self) -> &Arc<Breakers> {
        &self.health
    }

    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    /// [`Upstream::send`] behind the source's circuit breaker: refused at once while
    /// the source is down, and the outcome (5xx and transport errors are failures)
    /// reported back.
    pub async fn send_guarded(
        &self,
        mut req: Request<GatewayBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let url = req.uri().to_string();
        if self.offline {
            return Err(UpstreamError::Offline { url });
        }
        let ticket = self.health.admit_url(&url)?;
        self.authorize(&mut req);
        let result = self.send(req).await;
        self.note_auth(&url, &result);
        match verdict(&url, &result) {
            Ok(()) => ticket.success(),
            Err(error) => ticket.failure(&error),
        }
        result
    }

    /// A gateway request carries its source's credential, or no `Authorization`
    /// at all (whatever a caller left there is not the gateway's to send).
    fn authorize<B>(&self, req: &mut Request<B>) {
        let url = req.uri().to_string();
        let headers = req.headers_mut();
        headers.remove(http::header::AUTHORIZATION);
        if let Some(credential) = self.health.credential_for_url(&url) {
            headers.insert(http::header::AUTHORIZATION, credential.header.clone());
        }
    }

    /// A 401/403 is the source refusing the gateway: visible in the log and in
    /// `/-/health`, though not a breaker failure (the source is up).
    fn note_auth(&self, url: &str, result: &Result<Response<Incoming>, UpstreamError>) {
        if let Ok(resp) = result {
            self.health.auth_outcome_url(url, resp.status());
        }
    }

    /// Whether the source behind `url` answers: a GET, judged like a guarded call
    /// (5xx and transport errors fail), bounded by `[timeouts]`; the body is not read.
    /// Not behind the breaker: the caller holds the probe ticket and reports.
    pub async fn probe(&self, url: &str) -> Result<(), String> {
        let mut req = Request::get(url)
            .header(http::header::USER_AGENT, crate::USER_AGENT)
            .header(http::header::ACCEPT, "*/*")
            .body(crate::body::empty())
            .map_err(|_| UpstreamError::BadUrl(url.to_string()).to_string())?;
        self.authorize(&mut req);
        let result = self.send(req).await;
        self.note_auth(url, &result);
        verdict(url, &result)
    }

    /// Send a request as it is and wait (bounded) for the response head. No
    /// credential of the gateway's is added: this is what passthrough uses.
    pub async fn send(
        &self,
        req: Request<GatewayBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let url = req.uri().to_string();
        if self.offline {
            return Err(UpstreamError::Offline { url });
        }
        let timeout = self.timeouts.response;
        match tokio::time::timeout(timeout, self.client.request(req)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(source)) => Err(UpstreamError::Connect { url, source }),
            Err(_) => Err(UpstreamError::Timeout { url, timeout }),
        }
    }

    /// A plain GET with the headers `moon` itself sends, behind the circuit breaker.
    pub async fn get(&self, url: &str) -> Result<Response<Incoming>, UpstreamError> {
        let req = Request::get(url)
            .header(http::header::USER_AGENT, crate::USER_AGENT)
            .header(http::header::ACCEPT, "*/*")
            .body(crate::body::empty())
            .map_err(|_| UpstreamError::BadUrl(url.to_string()))?;
        self.send_guarded(req).await
    }

    /// Turn an upstream body into a stream of data chunks that fails when the
    /// upstream pauses longer than `idle_read`, so no client waits forever.
    pub fn idle_bounded(&self, body: Incoming) -> GatewayBody {
        let idle = self.timeouts.idle_read;
        let frames = BodyStream::new(body).timeout(idle).map(move |r| match r {
            Ok(Ok(frame)) => Ok(frame),
            Ok(Err(e)) => Err(Box::new(e) as BoxError),
            Err(_) => Err(format!("upstream sent nothing for {idle:?}").into()),
        });
        StreamBody::new(frames).boxed_unsync()
    }

    /// [`Upstream::idle_bounded`], with the body's bytes and the time since
    /// `started` counted for `url`'s source (`upstream_bytes_total`,
    /// `upstream_fetch_seconds`) once it ends, fails or is dropped: what passes
    /// through uncached still came from that source. A URL of no source is only bounded.
    pub fn idle_bounded_metered(&self, url: &str, started: Instant, body: Incoming) -> GatewayBody {
        let inner = self.idle_bounded(body);
        if !self.health.knows_url(url) {
            return inner;
        }
        let (health, url) = (self.health.clone(), url.to_string());
        // A client that left early still had these bytes fetched for it.
        crate::body::counted(inner, move |bytes, _| {
            health.record_transfer(&url, bytes, started.elapsed().as_secs_f64());
        })
    }
}

/// How an exchange counts for the source's breaker: 5xx and transport errors are
/// failures, any other answer means the source is there.
fn verdict(url: &str, result: &Result<Response<Incoming>, UpstreamError>) -> Result<(), String> {
    match result {
        Ok(resp) if resp.status().is_server_error() => {
            Err(format!("{url} answered {}", resp.status()))
        }
        Ok(_) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// The length a message announces in `Content-Length`, if it is a valid number.
pub fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether a cut in this response's body would show as an error. An HTTP/1.1 body
/// with neither a length nor chunking ends when the connection closes, so a cut
/// looks like a clean end: such a body must not be kept unless a digest vouches for it.
pub fn body_is_delimited<B>(resp: &Response<B>) -> bool {
    content_length(resp.headers()).is_some()
        || resp.version() == http::Version::HTTP_2
        || resp
            .headers()
            .get(http::header::TRANSFER_ENCODING)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
}

/// Read the next data chunk of a body (an upstream's, or a shared-tier copy's),
/// bounded by `idle`. Trailers are skipped. The error says what happened, not to
/// whom: callers name the sender.
pub async fn next_chunk<B>(body: &mut B, idle: Duration) -> Result<Option<Bytes>, String>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    loop {
        let frame = tokio::time::timeout(idle, body.frame())
            .await
            .map_err(|_| format!("sent nothing for {idle:?}"))?;
        match frame {
            None => return Ok(None),
            Some(Err(e)) => return Err(format!("body broke off: {e}")),
            Some(Ok(frame)) => {
                if let Ok(data) = Frame::into_data(frame) {
                    return Ok(Some(data));
                }
            }
        }
    }
}

/// Read a small body whole (error pages), keeping at most `limit` bytes.
pub async fn collect_limited(mut body: Incoming, limit: usize, idle: Duration) -> Bytes {
    let mut out = Vec::new();
    while out.len() < limit {
        match next_chunk(&mut body, idle).await {
            Ok(Some(chunk)) => {
                let room = limit - out.len();
                out.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            _ => break,
        }
    }
    Bytes::from(out)
}
