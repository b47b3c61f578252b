//! Git smart HTTP answered from the local mirror: `git http-backend` (which runs
//! `git upload-pack --stateless-rpc` for v0 and v2, shallow and full) as a CGI
//! program, request body fed into it and its output streamed back.
//!
//! A git process is the scarce thing ([`Slots`]: 32 at once), so a client gets
//! one only when git can work without waiting on it: the request body (a few
//! negotiation lines) is read whole first, bounded in size and time ([`Limits`]),
//! since git writes its response head before it reads the body and would
//! otherwise sit on a stalled upload as long as the client keeps it open. And one
//! client address holds at most `slots_per_client` of those processes (counted
//! from when its request is taken up, body included); its further requests wait
//! for one of its own to end, so no one client can starve the others.
//!
//! git's verdict comes after its head: a failure then aborts the body (see
//! [`git::Process::finish`]), so the client sees a failed transfer, never a
//! clean, empty `200`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::ChildStdout;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::answers::{Answers, Recording};
use super::pack_cache;
use crate::body::{self, BoxError, GatewayBody};
use crate::client::Client;
use crate::git::{self, Git};

/// git writes a few hundred bytes of CGI headers; anything past this is broken.
const CGI_HEADER_MAX: usize = 16 * 1024;
/// How long a request waits for a free git slot (and, before that, for one of
/// its client's) before a 503 (a 429).
pub const SLOT_WAIT: Duration = Duration::from_secs(30);
/// Bound on how long git may take before it starts answering.
const CGI_HEADER_TIMEOUT: Duration = Duration::from_secs(60);

/// Bounds on a client's index request before git is started for it (`[index]`).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest pause between two chunks of the request body.
    pub body_idle: Duration,
    /// Longest the whole request body may take.
    pub body_timeout: Duration,
    /// Largest request body; git http-backend is given the same bound.
    pub body_max: u64,
    /// Git slots one client address may hold at once.
    pub slots_per_client: usize,
    /// Longest a client's clone or pull waits for a refresh of an existing mirror.
    pub refresh_wait: Duration,
}

/// The git processes serving clients: at most `all` at once, at most
/// `per_client` of them for one client address.
pub struct Slots {
    all: Arc<Semaphore>,
    total: usize,
    per_client: usize,
    /// Each client address with requests holding or awaiting one of its slots.
    clients: Arc<Mutex<HashMap<IpAddr, Share>>>,
    wait: Duration,
}

/// One client address's slots, and how many of its requests hold or await one
/// (the entry goes when that count is back to 0).
struct Share {
    slots: Arc<Semaphore>,
    users: usize,
}

impl Slots {
    pub fn new(all: usize, per_client: usize, wait: Duration) -> Slots {
        let all = all.max(1);
        Slots {
            all: Arc::new(Semaphore::new(all)),
            total: all,
            per_client: per_client.clamp(1, all),
            clients: Arc::new(Mutex::new(HashMap::new())),
            wait,
        }
    }

    /// One of `client`'s own slots, waited for (bounded) while it holds all of
    /// them; `None` for a request no door attached a client to.
    async fn for_client(
        &self,
        client: Option<Client>,
    ) -> Result<Option<ClientSlot>, Response<GatewayBody>> {
        let Some(Client(addr)) = client else {
            return Ok(None);
        };
        // An IPv4 client reaching an IPv6 listener is still the same client.
        let ip = addr.ip().to_canonical();
        let (entered, slots) = {
            let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
            let share = clients.entry(ip).or_insert_with(|| Share {
                slots: Arc::new(Semaphore::new(self.per_client)),
                users: 0,
            });
            share.users += 1;
            let entered = Entered {
                ip,
                clients: self.clients.clone(),
            };
            (entered, share.slots.clone())
        };
        match tokio::time::timeout(self.wait, slots.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Some(ClientSlot {
                _permit: permit,
                _entered: entered,
            })),
            _ => Err(body::text(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "{ip} already has {} index requests in progress, the most one client may have \
                     (of {} for everyone); retry when one has ended",
                    self.per_client, self.total
                ),
            )),
        }
    }

    /// A free git slot, waited for (bounded).
    async fn for_git(&self) -> Result<OwnedSemaphorePermit, Response<GatewayBody>> {
        match tokio::time::timeout(self.wait, self.all.clone().acquire_owned()).await {
            Ok(Ok(slot)) => Ok(slot),
            _ => Err(body::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many index clones in progress; retry shortly",
            )),
        }
    }

    /// Git processes serving clients right now.
    pub fn in_use(&self) -> usize {
        self.total - self.all.available_permits()
    }

    /// Client addresses with requests holding or awaiting a slot.
    #[cfg(test)]
    fn clients(&self) -> usize {
        self.clients.lock().unwrap().len()
    }
}

/// A request of `ip` counted in its [`Share`] (holding or awaiting a slot).
struct Entered {
    ip: IpAddr,
    clients: Arc<Mutex<HashMap<IpAddr, Share>>>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(share) = clients.get_mut(&self.ip) {
            share.users -= 1;
            if share.users == 0 {
                clients.remove(&self.ip);
            }
        }
    }
}

/// One of a client's slots (the permit is returned before the count drops).
struct ClientSlot {
    _permit: OwnedSemaphorePermit,
    _entered: Entered,
}

/// What answers clients' git requests from the mirrors: `git http-backend`, its
/// slots, the bounds on a request, and the pack cache identical clones share.
pub struct Backend {
    pub slots: Slots,
    pub limits: Limits,
    pub pack_cache: Option<pack_cache::Hook>,
    /// git's answers kept per state of the refs (with `pack_cache`).
    pub answers: Option<Answers>,
}

/// Serve `rest` (`info/refs?...` or `git-upload-pack`) from the bare repo `repo`
/// (a mirror's directory), for `client`.
pub async fn upload_pack(
    backend: &Backend,
    repo: &Path,
    rest: &str,
    req: Request<GatewayBody>,
    client: Option<Client>,
) -> Response<GatewayBody> {
    let Backend {
        slots,
        limits,
        pack_cache,
        answers,
    } = backend;
    let pack_cache = pack_cache.as_ref();
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path != "info/refs" && path != "git-upload-pack" {
        // Dumb-protocol paths (objects/..., HEAD) are not served: moon needs smart HTTP.
        return body::text(
            StatusCode::NOT_FOUND,
            format!("/git/index/{path} is not served by the mirror"),
        );
    }
    // Both held until git has ended (with the response body, or dropped with it).
    let client_slot = match slots.for_client(client).await {
        Ok(slot) => slot,
        Err(refused) => return refused,
    };
    let (parts, incoming) = req.into_parts();
    let request_body = match read_body(&parts.headers, incoming, limits).await {
        Ok(bytes) => bytes,
        Err(refused) => return refused,
    };
    // The same question about the same refs: git's answer, replayed (no git slot).
    let question = match answers {
        Some(_) => {
            Answers::question(repo, &parts.method, rest, &parts.headers, &request_body).await
        }
        None => None,
    };
    if let (Some(answers), Some(question)) = (answers, &question) {
        if let Some(mut resp) = answers.replay(question) {
            resp.headers_mut()
                .insert("x-cache", HeaderValue::from_static("mirror"));
            return resp;
        }
    }
    let git_slot = match slots.for_git().await {
        Ok(slot) => slot,
        Err(refused) => return refused,
    };
    // http-backend serves repositories below a root: the mirror's parent.
    let (Some(root), Some(name)) = (repo.parent(), repo.file_name()) else {
        return body::text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{} is not a repository path", repo.display()),
        );
    };
    let name = name.to_string_lossy();
    let mut git = Git::http_backend(root)
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("PATH_INFO", format!("/{name}/{path}"))
        .env("QUERY_STRING", query)
        .env("REMOTE_ADDR", "127.0.0.1")
        // git's own bound on a body it buffers, one past ours: git refuses a body of
        // exactly its bound when it reads to the end (chunked), not one we took.
        .env(
            "GIT_HTTP_MAX_REQUEST_BUFFER",
            (limits.body_max + 1).to_string(),
        )
        .holding((client_slot, git_slot));
    // Identical clones (same tip, same depth) share one pack computation.
    if let Some(hook) = pack_cache {
        git = hook.configure(git);
    }
    for (header, var) in [
        ("content-type", "CONTENT_TYPE"),
        ("content-length", "CONTENT_LENGTH"),
        ("git-protocol", "GIT_PROTOCOL"),
        ("content-encoding", "HTTP_CONTENT_ENCODING"),
    ] {
        if let Some(v) = parts.headers.get(header).and_then(|v| v.to_str().ok()) {
            git = git.env(var, v);
        }
    }
    let git::Spawned {
        mut stdin,
        stdout,
        process,
    } = match git.spawn(git::Stderr::Log) {
        Ok(spawned) => spawned,
        Err(e) => return body::text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    // In a task: git may answer (its head) before it reads, and a body larger than
    // the pipe would block until then.
    tokio::spawn(async move {
        if stdin.write_all(&request_body).await.is_ok() {
            let _ = stdin.shutdown().await;
        }
    });
    let mut stdout = BufReader::with_capacity(64 * 1024, stdout);
    let head = match tokio::time::timeout(CGI_HEADER_TIMEOUT, read_cgi_head(&mut stdout)).await {
        Ok(Ok(head)) => head,
        Ok(Err(e)) => return body::text(StatusCode::BAD_GATEWAY, format!("git http-backend: {e}")),
        Err(_) => {
            return body::text(
                StatusCode::GATEWAY_TIMEOUT,
                "git http-backend did not answer",
            )
        }
    };
    // Recorded as it streams, kept once git has ended well.
    let recording = answers
        .clone()
        .zip(question)
        .map(|(answers, q)| (answers, Recording::new(q, head.0, head.1.clone())));
    let output = CgiOutput {
        stdout,
        process,
        recording,
    };
    let body = stream::unfold(Some(output), |state| async move {
        let mut out = state?;
        let mut buf = BytesMut::with_capacity(64 * 1024);
        match out.stdout.read_buf(&mut buf).await {
            // A pack cut short, or a failure git reported after its head, must not
            // look complete to the client: the error aborts the transfer.
            Ok(0) => match out.process.finish().await {
                Ok(()) => {
                    if let Some((answers, recording)) = out.recording {
                        recording.finish(&answers).await;
                    }
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %e, "git failed after its response head; the transfer is aborted");
                    Some((Err(Box::new(e) as BoxError), None))
                }
            },
            Ok(_) => {
                if let Some((_, recording)) = &mut out.recording {
                    recording.add(&buf);
                }
                Some((Ok(Frame::data(buf.freeze())), Some(out)))
            }
            Err(e) => Some((Err(Box::new(e) as BoxError), None)),
        }
    });
    let mut resp = Response::new(StreamBody::new(body).boxed_unsync());
    *resp.status_mut() = head.0;
    *resp.headers_mut() = head.1;
    resp.headers_mut()
        .insert("x-cache", HeaderValue::from_static("mirror"));
    resp
}

/// The whole request body, or the answer refusing it: larger than
/// `limits.body_max` (413, before reading when its length says so), or not all
/// there within `body_idle` of the previous chunk or `body_timeout` of the start
/// (408; the connection is then closed, its body unread).
async fn read_body(
    headers: &HeaderMap,
    mut incoming: GatewayBody,
    limits: &Limits,
) -> Result<Bytes, Response<GatewayBody>> {
    let too_large = || {
        body::text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "an index request body is limited to {} bytes",
                limits.body_max
            ),
        )
    };
    let declared = crate::upstream::content_length(headers);
    if declared.is_some_and(|len| len > limits.body_max) {
        return Err(too_large());
    }
    let deadline = tokio::time::Instant::now() + limits.body_timeout;
    let mut bytes = BytesMut::new();
    loop {
        let next = tokio::time::timeout(limits.body_idle, incoming.frame());
        let frame = match tokio::time::timeout_at(deadline, next).await {
            Ok(Ok(None)) => return Ok(bytes.freeze()),
            Ok(Ok(Some(Ok(frame)))) => frame,
            Ok(Ok(Some(Err(e)))) => {
                return Err(body::text(
                    StatusCode::BAD_REQUEST,
                    format!("the request body could not be read: {e}"),
                ))
            }
            Ok(Err(_)) => {
                return Err(body::text(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request body stalled: nothing came for {:?}",
                        limits.body_idle
                    ),
                ))
            }
            Err(_) => {
                return Err(body::text(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request body did not arrive within {:?}",
                        limits.body_timeout
                    ),
                ))
            }
        };
        if let Ok(data) = frame.into_data() {
            if (bytes.len() + data.len()) as u64 > limits.body_max {
                return Err(too_large());
            }
            bytes.extend_from_slice(&data);
        }
    }
}

/// Keeps git (and its slot) alive exactly as long as the client reads its output.
struct CgiOutput {
    stdout: BufReader<ChildStdout>,
    process: git::Process,
    /// The answer so far, to keep if git ends well.
    recording: Option<(Answers, Recording)>,
}

async fn read_cgi_head(
    stdout: &mut BufReader<ChildStdout>,
) -> Result<(StatusCode, http::HeaderMap), String> {
    let mut status = StatusCode::OK;
    let mut headers = http::HeaderMap::new();
    let mut seen = 0;
    loop {
        let mut line = Vec::new();
        let n = stdout
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("ended before its headers".into());
        }
        seen += n;
        if seen > CGI_HEADER_MAX {
            return Err("header block too long".into());
        }
        let line = String::from_utf8_lossy(&line);
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            return Ok((status, headers));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {line:?}"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split_whitespace().next().unwrap_or_default();
            status = code
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .ok_or_else(|| format!("bad status {value:?}"))?;
        } else {
            let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|e| e.to_string())?;
            let value = HeaderValue::from_str(value).map_err(|e| e.to_string())?;
            headers.append(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::net::SocketAddr;

    fn client(ip: &str) -> Option<Client> {
        Some(Client(SocketAddr::new(ip.parse().unwrap(), 40000)))
    }

    fn limits() -> Limits {
        Limits {
            body_idle: Duration::from_millis(100),
            body_timeout: Duration::from_millis(400),
            body_max: 10,
            slots_per_client: 2,
            refresh_wait: Duration::from_secs(2),
        }
    }

    async fn text(resp: Response<GatewayBody>) -> (StatusCode, String) {
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn one_client_holds_at_most_its_share() {
        let slots = Slots::new(3, 2, Duration::from_millis(100));
        let a1 = slots.for_client(client("10.0.0.1")).await.unwrap();
        let _a2 = slots.for_client(client("10.0.0.1")).await.unwrap();
        // The same client over IPv6 (v4-mapped) is the same client.
        let refused = slots
            .for_client(client("::ffff:10.0.0.1"))
            .await
            .err()
            .unwrap();
        let (status, message) = text(refused).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert!(
            message.contains("10.0.0.1 already has 2 index requests in progress"),
            "{message}"
        );
        // Others are not held up, nor are requests no door attached a client to.
        assert!(slots
            .for_client(client("10.0.0.2"))
            .await
            .unwrap()
            .is_some());
        assert!(slots.for_client(None).await.unwrap().is_none());
        // A waiting request gets the slot its client frees.
        let (waited, ()) = tokio::join!(slots.for_client(client("10.0.0.1")), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(a1);
        });
        assert!(waited.unwrap().is_some());
    }

    #[tokio::test]
    async fn clients_are_forgotten_when_they_hold_and_await_nothing() {
        let slots = Slots::new(4, 1, Duration::from_millis(50));
        let held = slots.for_client(client("10.0.0.1")).await.unwrap();
        // One that waits in vain still counts while it waits, not after.
        assert!(slots.for_client(client("10.0.0.1")).await.is_err());
        assert_eq!(slots.clients(), 1);
        drop(held);
        assert_eq!(slots.clients(), 0);
    }

    #[tokio::test]
    async fn git_slots_are_waited_for_then_refused() {
        let slots = Slots::new(1, 1, Duration::from_millis(50));
        let held = slots.for_git().await.unwrap();
        let (status, _) = text(slots.for_git().await.err().unwrap()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        drop(held);
        assert!(slots.for_git().await.is_ok());
    }

    /// A body sending `chunks`, each after its delay.
    fn body_of(chunks: Vec<(u64, &'static str)>) -> GatewayBody {
        let frames = stream::iter(chunks).then(|(ms, data)| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(data.as_bytes())))
        });
        StreamBody::new(frames).boxed_unsync()
    }

    async fn read(
        headers: &[(&str, &str)],
        body: GatewayBody,
    ) -> Result<Bytes, (StatusCode, String)> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        match read_body(&map, body, &limits()).await {
            Ok(bytes) => Ok(bytes),
            Err(resp) => Err(text(resp).await),
        }
    }

    #[tokio::test]
    async fn request_bodies_are_bounded_in_size_and_time() {
        let whole = read(&[], body_of(vec![(0, "0011"), (50, "done")])).await;
        assert_eq!(whole.unwrap(), Bytes::from_static(b"0011done"));

        // Refused on its declared length, before any of it is read.
        let never = body_of(vec![(10_000, "x")]);
        let (status, message) = read(&[("content-length", "11")], never).await.unwrap_err();
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(message.contains("limited to 10 bytes"), "{message}");
        // Or once more than that has come (chunked).
        let (status, _) = read(&[], body_of(vec![(0, "123456"), (0, "78901")]))
            .await
            .unwrap_err();
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

        let (status, message) = read(&[], body_of(vec![(0, "1"), (300, "2")]))
            .await
            .unwrap_err();
        assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
        assert!(message.contains("stalled"), "{message}");
        // Never idle for long, but never done either.
        let trickle = (0..10).map(|_| (60, "")).collect();
        let (status, message) = read(&[], body_of(trickle)).await.unwrap_err();
        assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
        assert!(message.contains("within 400ms"), "{message}");
    }
}
