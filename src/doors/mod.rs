//! The doors: how requests arrive, and nothing else. The main [`listener`] takes
//! registry-endpoint and forward-[`proxy`] traffic (`CONNECT`, absolute-form, proxy
//! auth); [`tls`] terminates intercepted TLS; the [`transparent`] listener reads the
//! SNI of redirected connections ([`sni`]); [`tunnel`]s carry what is not
//! intercepted. Every door hands the router one origin-form request and the
//! [`Door`] it came by; nothing below the doors knows about them.

pub mod keep_alive;
pub mod listener;
pub mod parking;
pub mod proxy;
pub mod send_timeout;
pub mod sni;
pub mod tls;
pub mod transparent;
pub mod tunnel;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::Either;
use http::{header, Method, Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::app::Services;
use crate::body::{self, GatewayBody};
use crate::client::{basic_matches, Client};
use crate::intercept::{load_ca, Interceptor};
use crate::ops::access::{self, Access};
use crate::ops::metrics::TunnelDecision;
use crate::router::{self, Door, Routed};
use tunnel::TunnelPolicy;

/// The future of one main-listener request: ready at once, or boxed.
pub type Served = Either<
    std::future::Ready<Result<Response<GatewayBody>, Infallible>>,
    Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, Infallible>> + Send>>,
>;

/// A main-listener request that needs a future: what it waits on.
enum Deferred {
    Connect(Request<Incoming>, Arc<OwnedSemaphorePermit>),
    Absolute(Request<Incoming>),
    Routed(Box<router::Pending>),
}

/// How long a client may take to send a request head; bounds slow-loris connections.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The app behind the doors, and what only the doors need: interception, the
/// tunnel policy and proxy credentials.
pub struct Doors {
    pub app: Arc<Services>,
    /// Present when the proxy and transparent doors can intercept TLS.
    pub interceptor: Option<Arc<Interceptor>>,
    pub tunnel: TunnelPolicy,
    /// `user:password` required from proxy clients, if set.
    pub proxy_auth: Option<String>,
    /// The addresses the gateway's own listeners are bound to: a tunnel there
    /// would come back to the gateway, again and again.
    pub listening: Vec<SocketAddr>,
    /// One permit per open client connection, over every door (`server.max_connections`).
    pub connections: Arc<Semaphore>,
    /// HTTP/1.1 + h2 settings every door serves with (head size and time bounds).
    pub http: auto::Builder<TokioExecutor>,
    /// The same HTTP/1.1 settings, for the main listener's [`keep_alive`] loop.
    pub http1: http1::Builder,
    /// A client that takes no response bytes for this long is disconnected.
    pub send_timeout: Duration,
    /// A main-listener connection idle this long between requests is closed.
    pub keep_alive_timeout: Duration,
    /// `user:password` required on the registry endpoint (`server.auth`), if set.
    pub server_auth: Option<String>,
}

/// What a connection opened by the doors carries, and so where it may not go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrying {
    /// A `CONNECT` tunnel: never to the gateway's own listeners.
    Connect,
    /// A tunnel from the transparent door: never to the gateway, nor to loopback
    /// (a redirected connection for `localhost` would come straight back).
    Transparent,
    /// One plain-HTTP request in origin-form: it cannot loop, so only the policy applies.
    Forward,
}

/// Why a tunnel was not opened.
#[derive(Debug)]
pub enum TunnelRefused {
    /// The policy (or the self-loop guard) forbids it: 403.
    Forbidden(String),
    /// Allowed, but the destination did not answer: 502.
    Unreachable(String),
}

impl Doors {
    /// The doors `app.config` asks for: the interception CA (created on first use)
    /// when some source names a host to intercept, and the tunnel policy.
    pub fn open(app: Arc<Services>, listening: Vec<SocketAddr>) -> anyhow::Result<Doors> {
        let config = &app.config;
        let interceptor = if Interceptor::all_hosts(&app.sources).is_empty() {
            tracing::info!(
                "no source names a host to intercept; CONNECTs are tunnelled by policy only"
            );
            None
        } else {
            let ca = load_ca(config, &app.sources, true)?;
            Some(Arc::new(Interceptor::new(ca, &app.sources)))
        };
        let loopback_only = config.listen.ip().is_loopback()
            && config
                .transparent_listen
                .is_none_or(|a| a.ip().is_loopback());
        let tunnel = TunnelPolicy::from_setting(&config.proxy.tunnel, loopback_only)
            .map_err(|e| anyhow::anyhow!("proxy.tunnel: {e}"))?;
        if matches!(tunnel, TunnelPolicy::Deny) {
            tracing::info!(
                "tunnelling of non-registry hosts is off (set proxy.tunnel to allow some)"
            );
        }
        let server = &config.server;
        Ok(Doors {
            connections: Arc::new(Semaphore::new(server.max_connections)),
            http: http_builder(server.max_header_size.as_u64()),
            http1: http1_builder(server.max_header_size.as_u64()),
            send_timeout: server.send_timeout,
            keep_alive_timeout: server.keep_alive_timeout,
            server_auth: server.auth.clone(),
            listening,
            // A gateway that wants credentials on its registry endpoint wants them
            // from proxy clients too: the same cache is behind both doors.
            proxy_auth: config.proxy.auth.clone().or_else(|| server.auth.clone()),
            app,
            interceptor,
            tunnel,
        })
    }

    /// The source answering for `host` if the doors intercept it.
    pub fn intercepted_source(&self, host: &str) -> Option<usize> {
        self.interceptor.as_ref()?.source_for(host)
    }

    /// A connection to `host:port` for a tunnel or a forwarded request, if the policy
    /// admits it and a tunnel does not lead back to the gateway itself.
    pub async fn open_tunnel(
        &self,
        host: &str,
        port: u16,
        carrying: Carrying,
    ) -> Result<TcpStream, TunnelRefused> {
        let result = self.try_open_tunnel(host, port, carrying).await;
        self.app.metrics.tunnel(match &result {
            Ok(_) => TunnelDecision::Allowed,
            Err(TunnelRefused::Forbidden(_)) => TunnelDecision::Forbidden,
            Err(TunnelRefused::Unreachable(_)) => TunnelDecision::Unreachable,
        });
        result
    }

    async fn try_open_tunnel(
        &self,
        host: &str,
        port: u16,
        carrying: Carrying,
    ) -> Result<TcpStream, TunnelRefused> {
        let addrs = self
            .tunnel
            .admit(host, port)
            .await
            .map_err(TunnelRefused::Forbidden)?;
        let forbidden = |a: &SocketAddr| match carrying {
            Carrying::Forward => false,
            Carrying::Connect => self.is_own(*a),
            Carrying::Transparent => a.ip().is_loopback() || self.is_own(*a),
        };
        if let Some(addr) = addrs.iter().find(|a| forbidden(a)) {
            return Err(TunnelRefused::Forbidden(format!(
                "{host}:{port} ({addr}) is this gateway or its loopback: not tunnelled"
            )));
        }
        let stream = tunnel::connect(&addrs)
            .await
            .map_err(TunnelRefused::Unreachable)?;
        // A name for another of this machine's addresses, on a port a listener bound
        // to every address holds: only the connection itself tells.
        if let (Ok(local), Ok(peer)) = (stream.local_addr(), stream.peer_addr()) {
            if carrying != Carrying::Forward && local.ip() == peer.ip() && self.is_own(peer) {
                return Err(TunnelRefused::Forbidden(format!(
                    "{host}:{port} ({peer}) is this gateway: not tunnelled"
                )));
            }
        }
        Ok(stream)
    }

    /// Whether `addr` is one of the gateway's own listening addresses.
    fn is_own(&self, addr: SocketAddr) -> bool {
        self.listening.iter().any(|own| {
            own.port() == addr.port()
                && (own.ip() == addr.ip()
                    || (own.ip().is_unspecified()
                        && (addr.ip().is_loopback() || addr.ip().is_unspecified())))
        })
    }

    /// With `server.auth`, a registry-endpoint request (but `/-/health`) must carry
    /// those Basic credentials; they are the gateway's, so they are taken off the request
    /// (which is then cached like any other, not passed through as personal).
    #[allow(clippy::result_large_err)]
    fn endpoint_credentials(
        &self,
        mut req: Request<Incoming>,
    ) -> Result<Request<Incoming>, Response<GatewayBody>> {
        let Some(expected) = &self.server_auth else {
            return Ok(req);
        };
        // Liveness probes (load balancers, Kubernetes) carry no credentials, and with
        // an admin or publish token those endpoints check their own (Bearer) credentials.
        let path = req.uri().path();
        if path == "/-/health"
            || (path.starts_with("/-/") && self.app.admin_token.is_some())
            || (path == "/-/publish" && self.app.publish_token.is_some())
        {
            return Ok(req);
        }
        if basic_matches(req.headers().get(header::AUTHORIZATION), expected) {
            req.headers_mut().remove(header::AUTHORIZATION);
            return Ok(req);
        }
        let mut resp = body::text(
            http::StatusCode::UNAUTHORIZED,
            "this gateway requires credentials (server.auth)",
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Basic realm=\"moonbit-registry\""),
        );
        Err(resp)
    }

    /// Hand an origin-form request to the router, with the client it came from.
    async fn route(
        &self,
        req: Request<Incoming>,
        door: Door,
        peer: SocketAddr,
    ) -> Response<GatewayBody> {
        router::route(&self.app, req.map(body::incoming), door, Some(Client(peer))).await
    }

    /// Every request on the main listener: registry endpoint or forward proxy.
    /// `permit` is the connection's place under `server.max_connections`.
    ///
    /// What can be answered at once (a memory-tier hit, a refusal) is, with a
    /// ready future: hyper moves each request's future into place, and the one
    /// for everything else (boxed here) is ~2 KiB.
    pub fn main(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        permit: Arc<OwnedSemaphorePermit>,
    ) -> Served {
        let proxied = req.method() == Method::CONNECT || req.uri().authority().is_some();
        let access = Access {
            door: if proxied { "proxy" } else { "endpoint" },
            method: req.method().clone(),
            target: req.uri().clone(),
            host: proxied.then(|| req.uri().host().unwrap_or("-").to_string()),
            source: (!proxied).then_some(0),
            started: Instant::now(),
        };
        let deferred = if req.method() == Method::CONNECT {
            Deferred::Connect(req, permit)
        } else if req.uri().authority().is_some() && req.version() < http::Version::HTTP_2 {
            // h2 requests always carry an authority; only HTTP/1 absolute-form is proxy traffic.
            Deferred::Absolute(req)
        } else {
            let req = match self.endpoint_credentials(req) {
                Ok(req) => req.map(body::incoming),
                Err(refusal) => return self.answered(access, refusal),
            };
            match router::classify_request(&self.app, req, Door::Endpoint, Some(Client(peer))) {
                Routed::Answered(resp) => return self.answered(access, resp),
                Routed::Pending(pending) => Deferred::Routed(pending),
            }
        };
        Either::Right(Box::pin(async move {
            let resp = match deferred {
                Deferred::Connect(req, permit) => {
                    proxy::connect(self.clone(), req, peer, permit).await
                }
                Deferred::Absolute(req) => proxy::absolute(&self, req, peer).await,
                Deferred::Routed(pending) => pending.answer(&self.app).await,
            };
            Ok(access::track(self.recorders(), access, resp))
        }))
    }

    fn answered(&self, access: Access, resp: Response<GatewayBody>) -> Served {
        Either::Left(std::future::ready(Ok(access::track(
            self.recorders(),
            access,
            resp,
        ))))
    }

    /// A request decrypted from an intercepted TLS connection for `source`.
    pub async fn intercepted(
        self: Arc<Self>,
        req: Request<Incoming>,
        source: usize,
        peer: SocketAddr,
    ) -> Result<Response<GatewayBody>, std::convert::Infallible> {
        let started = Instant::now();
        let (method, target) = (req.method().clone(), req.uri().clone());
        let host = req
            .uri()
            .host()
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or("-")
            .to_string();
        let resp = self.route(req, Door::Intercepted { source }, peer).await;
        let access = Access {
            door: "intercepted",
            method,
            target,
            host: Some(host),
            source: Some(source),
            started,
        };
        Ok(access::track(self.recorders(), access, resp))
    }

    fn recorders(&self) -> access::Recorders<'_> {
        access::Recorders {
            metrics: &self.app.metrics,
            jobs: &self.app.jobs,
        }
    }
}

/// The HTTP/1.1 + h2 connection settings every door uses: a request head takes
/// at most `HEADER_READ_TIMEOUT` and `max_header` bytes (HTTP/1.1 read buffer, h2
/// header list).
pub fn http_builder(max_header: u64) -> auto::Builder<TokioExecutor> {
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(head_limit(max_header));
    http.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(head_limit(max_header) as u32);
    http
}

/// [`http_builder`]'s HTTP/1.1 settings on their own, with the head size bound
/// exactly (hyper-util's builder cannot say so).
pub fn http1_builder(max_header: u64) -> http1::Builder {
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(head_limit(max_header))
        // Exact: the buffer bound alone lets one large read carry a longer head.
        .max_header_size(head_limit(max_header));
    http1
}

/// `server.max_header_size` within what hyper accepts (its read buffer starts at 8 KiB).
fn head_limit(max_header: u64) -> usize {
    max_header.clamp(8 * 1024, 1024 * 1024) as usize
}

/// An error with its causes, `a: b: c`: hyper's own message ("error writing a
/// body to connection") hides why (e.g. the send timeout).
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
