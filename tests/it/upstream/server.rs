//! `Upstream`: the test registry served over HTTPS on 127.0.0.1, the way
//! mooncakes.io serves it (git index, archives, `symbols.zip`, assets), with
//! a request log (headers included, so a test can tell who sent credentials),
//! injectable faults, and optionally a private registry's check: every request
//! must carry one exact `Authorization` value, else 401.
//!
//! The server runs on its own Tokio runtime (two worker threads), so a test
//! may block its own thread (run `git`, `curl`, publish) on any runtime
//! flavour without starving the server.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::stream;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use percent_encoding::percent_decode_str;
use tempfile::TempDir;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::runtime::{Handle, Runtime};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use super::cgi;
use super::registry::{ArchiveBody, Registry};
use super::tls::TestPki;

/// Response body used throughout the server.
pub type Body = http_body_util::combinators::BoxBody<Bytes, io::Error>;

/// Chunk size for archive bodies when no fault says otherwise.
const ARCHIVE_CHUNK: usize = 64 * 1024;

/// Misbehaviour to inject; applies to requests that arrive after `set_fault`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    /// Answer normally.
    #[default]
    None,
    /// Archive responses: 200 with the full `Content-Length`, about half of
    /// the body, then the connection is closed (HTTP/1.1) or reset (h2).
    TruncateArchives,
    /// Wait this long before answering every request (it is logged first).
    DelayEach(Duration),
    /// Archive bodies go out `chunk` bytes at a time with `interval` between
    /// chunks (headers are sent at once).
    SlowArchives { chunk: usize, interval: Duration },
    /// Answer every request with this status and a short text body.
    Status(u16),
    /// Archive responses without `Content-Length` (chunked over HTTP/1.1).
    ChunkedArchives,
    /// `symbols.zip` (unconditional 200s): the full `Content-Length`, about half
    /// of the body, then the body breaks off.
    TruncateSymbols,
}

/// One request as the server saw it, before answering.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub method: String,
    /// Path and query, as sent (still percent-encoded).
    pub path: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// Header names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
}

impl SeenRequest {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The running test upstream. Dropping it stops the server.
pub struct Upstream {
    /// Where it listens: 127.0.0.1 and a port picked by the OS.
    pub addr: SocketAddr,
    /// PEM file of the CA that signed the server certificate.
    pub ca_pem: PathBuf,
    /// The registry it serves; publish into it at any time.
    pub registry: Arc<Registry>,
    shared: Arc<Shared>,
    runtime: Option<Runtime>,
    _dir: TempDir,
}

/// State shared by the accept loop, the connections and the handle.
pub(super) struct Shared {
    pub(super) registry: Arc<Registry>,
    acceptor: TlsAcceptor,
    handle: Handle,
    log: Mutex<Vec<SeenRequest>>,
    fault: Mutex<Fault>,
    /// The `Authorization` value every request must carry (a private registry).
    required_auth: Mutex<Option<String>>,
    accept_task: Mutex<Option<JoinHandle<()>>>,
    /// Every connection, h2 stream and CGI helper task, so `stop` can abort them.
    tasks: Mutex<JoinSet<()>>,
}

impl Shared {
    /// Spawns a task that `Upstream::stop` aborts.
    pub(super) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = lock(&self.tasks);
        while tasks.try_join_next().is_some() {}
        tasks.spawn_on(task, &self.handle);
    }
}

impl Upstream {
    /// Generates a CA and a certificate for 127.0.0.1/localhost, binds
    /// 127.0.0.1:0 and serves `registry` over HTTP/1.1 and h2 (ALPN).
    pub async fn start(registry: Arc<Registry>) -> Upstream {
        let pki = TestPki::generate();
        let dir = tempfile::Builder::new()
            .prefix("test-upstream-")
            .tempdir()
            .expect("create temp dir for the test upstream");
        let ca_pem = dir.path().join("ca.pem");
        std::fs::write(&ca_pem, &pki.ca_pem).expect("write the test CA certificate");

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("test-upstream")
            .enable_all()
            .build()
            .expect("build the test upstream runtime");
        let listener = {
            let _enter = runtime.enter();
            listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("bind 127.0.0.1:0")
        };
        let addr = listener.local_addr().expect("listener address");
        let shared = Arc::new(Shared {
            registry: registry.clone(),
            acceptor: TlsAcceptor::from(pki.server_config),
            handle: runtime.handle().clone(),
            log: Mutex::new(Vec::new()),
            fault: Mutex::new(Fault::None),
            required_auth: Mutex::new(None),
            accept_task: Mutex::new(None),
            tasks: Mutex::new(JoinSet::new()),
        });
        let task = runtime.spawn(accept_loop(shared.clone(), listener));
        *lock(&shared.accept_task) = Some(task);
        Upstream {
            addr,
            ca_pem,
            registry,
            shared,
            runtime: Some(runtime),
            _dir: dir,
        }
    }

    /// `https://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The index URL moon would be configured with: `<url>/git/index`.
    pub fn index_url(&self) -> String {
        format!("{}/git/index", self.url())
    }

    /// The CA certificate as PEM text.
    pub fn ca_pem_text(&self) -> String {
        std::fs::read_to_string(&self.ca_pem).expect("read the test CA certificate")
    }

    /// Every request seen so far, in arrival order: (method, path+query).
    pub fn requests(&self) -> Vec<(String, String)> {
        lock(&self.shared.log)
            .iter()
            .map(|r| (r.method.clone(), r.path.clone()))
            .collect()
    }

    /// Every request seen so far with its version and headers.
    pub fn seen(&self) -> Vec<SeenRequest> {
        lock(&self.shared.log).clone()
    }

    /// How many requests had this method and a path (with query) starting
    /// with `path_prefix`.
    pub fn count(&self, method: &str, path_prefix: &str) -> usize {
        lock(&self.shared.log)
            .iter()
            .filter(|r| r.method.eq_ignore_ascii_case(method) && r.path.starts_with(path_prefix))
            .count()
    }

    /// Forgets the requests seen so far.
    pub fn clear_requests(&self) {
        lock(&self.shared.log).clear();
    }

    /// From now on every request must carry `Authorization: <value>` (e.g.
    /// `Bearer t0k3n`, `Basic dXNlcjpwdw==`), else it gets a 401; `None`: public.
    pub fn require_authorization(&self, value: Option<&str>) {
        *lock(&self.shared.required_auth) = value.map(str::to_string);
    }

    /// The `Authorization` header of every request seen so far, in order, with
    /// its path (`None`: the request had none).
    pub fn authorizations(&self) -> Vec<(String, Option<String>)> {
        lock(&self.shared.log)
            .iter()
            .map(|r| {
                (
                    r.path.clone(),
                    r.header("authorization").map(str::to_string),
                )
            })
            .collect()
    }

    /// Sets the fault for requests from now on (`Fault::None` clears it).
    pub fn set_fault(&self, fault: Fault) {
        *lock(&self.shared.fault) = fault;
    }

    /// Stops listening and aborts every open connection and running
    /// `git http-backend`. Afterwards connecting to `addr` is refused.
    pub async fn stop(&self) {
        let accept = lock(&self.shared.accept_task).take();
        if let Some(accept) = accept {
            accept.abort();
            let _ = accept.await; // the listener is closed once this returns
        }
        let mut tasks = std::mem::take(&mut *lock(&self.shared.tasks));
        tasks.shutdown().await;
    }

    /// Listens again on the same port after `stop` (no-op while running).
    /// Retries for up to 5 s if the port is still busy.
    pub async fn restart(&self) {
        if lock(&self.shared.accept_task).is_some() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            let bound = {
                let _enter = self.shared.handle.enter();
                listen(self.addr)
            };
            match bound {
                Ok(listener) => break listener,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("test upstream cannot listen on {} again: {e}", self.addr),
            }
        };
        let task = self
            .shared
            .handle
            .spawn(accept_loop(self.shared.clone(), listener));
        *lock(&self.shared.accept_task) = Some(task);
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Tokio refuses to block on a runtime shutdown inside an async
            // context, so wait on a plain thread. Waiting means every task
            // (and its hold on the registry) is gone before the temp dirs are
            // removed, rather than racing the end of the test process.
            let _ =
                std::thread::spawn(move || runtime.shutdown_timeout(Duration::from_secs(5))).join();
        }
    }
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let _ = tcp.set_nodelay(true);
                let conn_shared = shared.clone();
                shared.spawn(serve_connection(conn_shared, tcp, peer));
            }
            // e.g. out of file descriptors: back off instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Runs h2 streams as tracked tasks so `stop` aborts them too.
#[derive(Clone)]
struct TrackedExecutor(Arc<Shared>);

impl<F> hyper::rt::Executor<F> for TrackedExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.spawn(async move {
            let _ = fut.await;
        });
    }
}

async fn serve_connection(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let tls = match tokio::time::timeout(Duration::from_secs(10), shared.acceptor.accept(tcp)).await
    {
        Ok(Ok(tls)) => tls,
        // Handshake failures (a client not trusting the CA, a port probe) are
        // the client's business; nothing to answer.
        _ => return,
    };
    // Lets a fault drop the whole connection (TCP close) mid-response.
    let kill = Arc::new(Notify::new());
    let service = {
        let shared = shared.clone();
        let kill = kill.clone();
        service_fn(move |req| {
            let shared = shared.clone();
            let kill = kill.clone();
            async move { Ok::<_, Infallible>(handle(shared, req, peer, kill).await) }
        })
    };
    let builder = auto::Builder::new(TrackedExecutor(shared.clone()));
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    tokio::select! {
        _ = conn => {}
        _ = kill.notified() => {}
    }
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    peer: SocketAddr,
    kill: Arc<Notify>,
) -> Response<Body> {
    let seen = SeenRequest {
        method: req.method().to_string(),
        path: req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| req.uri().path().to_string()),
        version: format!("{:?}", req.version()),
        headers: req
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    };
    let required = lock(&shared.required_auth).clone();
    let given = seen.header("authorization").map(str::to_string);
    lock(&shared.log).push(seen);
    if let Some(required) = required {
        if given.as_deref() != Some(required.as_str()) {
            let mut resp = text(StatusCode::UNAUTHORIZED, "credentials required\n");
            resp.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Bearer realm=\"test registry\""),
            );
            return resp;
        }
    }

    let fault = lock(&shared.fault).clone();
    match fault {
        Fault::DelayEach(delay) => tokio::time::sleep(delay).await,
        Fault::Status(code) => {
            return match StatusCode::from_u16(code) {
                Ok(status) => text(status, "injected fault\n"),
                Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "bad injected status\n"),
            }
        }
        _ => {}
    }

    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let read_only = method == Method::GET || method == Method::HEAD;
    if path == "/git" || path.starts_with("/git/") {
        if method != Method::GET && method != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        }
        return cgi::git_http_backend(&shared, req, peer).await;
    }
    if !read_only {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    if let Some(segment) = path
        .strip_prefix("/user/")
        .and_then(|p| p.strip_suffix(".zip"))
    {
        // h2: resetting the stream is enough; HTTP/1.1: close the connection.
        let kill = (req.version() < Version::HTTP_2).then_some(kill);
        return archive(&shared, segment, &fault, kill).await;
    }
    if path == "/symbols.zip" {
        return symbols(&shared, &req, fault == Fault::TruncateSymbols);
    }
    if let Some(asset) = path.strip_prefix("/assets/") {
        return asset_response(&shared, asset);
    }
    text(StatusCode::NOT_FOUND, "not found\n")
}

/// `GET /user/<form-urlencoded user/module/version>.zip` or the slash form.
async fn archive(
    shared: &Shared,
    segment: &str,
    fault: &Fault,
    kill: Option<Arc<Notify>>,
) -> Response<Body> {
    // Percent-decoding only: '+' stays '+' (semver build metadata).
    let key = match percent_decode_str(segment).decode_utf8() {
        Ok(key) => key.into_owned(),
        Err(_) => return text(StatusCode::BAD_REQUEST, "archive name is not UTF-8\n"),
    };
    let Some(archive) = shared.registry.archive(&key) else {
        return text(StatusCode::NOT_FOUND, "no such archive\n");
    };
    let source = match archive.body {
        ArchiveBody::Memory(bytes) => Source::Memory(bytes),
        ArchiveBody::File(path) => match tokio::fs::File::open(&path).await {
            Ok(file) => Source::File(file),
            Err(e) => {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("cannot open archive file: {e}\n"),
                )
            }
        },
    };
    let mut sending = Sending {
        source,
        sent: 0,
        limit: archive.size,
        chunk: ARCHIVE_CHUNK,
        interval: None,
        truncate: None,
    };
    match fault {
        Fault::TruncateArchives => {
            sending.limit = archive.size / 2;
            sending.truncate = Some(kill);
        }
        Fault::SlowArchives { chunk, interval } => {
            sending.chunk = (*chunk).max(1);
            sending.interval = Some(*interval);
        }
        _ => {}
    }
    let body = stream::unfold(Some(sending), |state| async move {
        let mut st = state?;
        if st.sent >= st.limit {
            if let Some(kill) = st.truncate.take() {
                // Give the first half time to reach the socket, then cut: the
                // error resets an h2 stream; HTTP/1.1 also drops the connection.
                tokio::time::sleep(Duration::from_millis(100)).await;
                if let Some(kill) = kill {
                    kill.notify_one();
                }
                let cut = io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "injected fault: archive truncated",
                );
                return Some((Err(cut), None));
            }
            return None;
        }
        if st.sent > 0 {
            if let Some(interval) = st.interval {
                tokio::time::sleep(interval).await;
            }
        }
        let n = (st.limit - st.sent).min(st.chunk as u64) as usize;
        let data = match &mut st.source {
            Source::Memory(bytes) => bytes.slice(st.sent as usize..st.sent as usize + n),
            Source::File(file) => {
                let mut buf = BytesMut::zeroed(n);
                if let Err(e) = file.read_exact(&mut buf).await {
                    return Some((Err(e), None));
                }
                buf.freeze()
            }
        };
        st.sent += n as u64;
        Some((Ok(Frame::data(data)), Some(st)))
    });
    let mut resp = Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/zip");
    if *fault != Fault::ChunkedArchives {
        resp = resp.header(CONTENT_LENGTH, archive.size);
    }
    resp.body(StreamBody::new(body).boxed())
        .unwrap_or_else(|e| text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")))
}

/// Where archive bytes come from while they are being sent.
enum Source {
    Memory(Bytes),
    File(tokio::fs::File),
}

/// Progress of one archive body.
struct Sending {
    source: Source,
    sent: u64,
    /// Bytes to send before ending (or cutting) the body.
    limit: u64,
    chunk: usize,
    interval: Option<Duration>,
    /// Set for `TruncateArchives`: end with an error after `limit` bytes,
    /// and for HTTP/1.1 notify the connection to drop.
    truncate: Option<Option<Arc<Notify>>>,
}

/// `GET /symbols.zip` with a strong ETag; `If-None-Match` -> 304.
fn symbols(shared: &Shared, req: &Request<Incoming>, truncate: bool) -> Response<Body> {
    let (bytes, etag) = shared.registry.symbols();
    let matches = req
        .headers()
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.trim_start_matches("W/") == etag);
    let mut builder = Response::builder().header(ETAG, &etag);
    if let Some(cc) = shared.registry.symbols_cache_control() {
        builder = builder.header(hyper::header::CACHE_CONTROL, cc);
    }
    let response = if matches {
        builder
            .status(StatusCode::NOT_MODIFIED)
            .body(Empty::new().map_err(|never| match never {}).boxed())
    } else if truncate {
        let half = bytes.slice(..bytes.len() / 2);
        let cut = io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "injected fault: symbols.zip truncated",
        );
        // Let the head and the first half reach the client before the break.
        let frames = futures_util::StreamExt::chain(
            stream::iter([Ok(Frame::data(half))]),
            stream::once(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Err(cut)
            }),
        );
        builder
            .status(StatusCode::OK)
            .header(CONTENT_TYPE, "application/zip")
            .header(CONTENT_LENGTH, bytes.len())
            .body(StreamBody::new(frames).boxed())
    } else {
        builder
            .status(StatusCode::OK)
            .header(CONTENT_TYPE, "application/zip")
            .header(CONTENT_LENGTH, bytes.len())
            .body(full(bytes))
    };
    response.unwrap_or_else(|e| text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")))
}

/// `GET /assets/<path>`: whatever `Registry::put_asset` stored.
fn asset_response(shared: &Shared, asset: &str) -> Response<Body> {
    let path = match percent_decode_str(asset).decode_utf8() {
        Ok(path) => path.into_owned(),
        Err(_) => return text(StatusCode::BAD_REQUEST, "asset path is not UTF-8\n"),
    };
    let Some(bytes) = shared.registry.asset(&path) else {
        return text(StatusCode::NOT_FOUND, "no such asset\n");
    };
    let content_type = if path.ends_with(".wasm") {
        "application/wasm"
    } else if path.ends_with(".sha256") {
        "text/plain"
    } else {
        "application/octet-stream"
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, content_type)
        .header(CONTENT_LENGTH, bytes.len())
        .body(full(bytes))
        .unwrap_or_else(|e| text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")))
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// A short `text/plain` response.
pub(super) fn text(status: StatusCode, message: &str) -> Response<Body> {
    let mut response = Response::new(full(Bytes::from(message.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not take the server down with it.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
