//! The main listener's connections, from accept to close, with their idle
//! keep-alive time spent *parked*: held without hyper, and without a task.
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB write buffer (and its
//! connection state) for every open HTTP/1 connection, busy or not, and a task
//! keeps room for its largest state: ~20 KiB per idle keep-alive connection
//! where nginx needs ~1. So an HTTP/1 connection is served by a hyper connection
//! in a task of its own only while it is in use. Once hyper waits for the
//! client's next request with no request in flight and nothing left to write,
//! and no request came for [`PARK_AFTER`], the hyper connection is taken apart
//! (`into_parts`: the socket, and any bytes of a next request already read),
//! and the socket goes to the [`parking`](super::parking) lot, which hands it
//! back to a new task when the client sends again.
//!
//! What is never parked: a connection whose request had a body (hyper owns the
//! body's framing, and an unread rest must not be taken for a request), one
//! resumed with part of a request head already read (hyper's head timeout then
//! runs to the end), and h2 (left to hyper, which multiplexes anyway).

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::Request;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::parking::{Parkable, Parking};
use super::send_timeout::SendTimeout;
use super::{with_causes, Doors};
use crate::body::GatewayBody;
use crate::memfile::Sendable;
use crate::ops::metrics::{ConnectionGuard, DoorName};

/// How long a connection must have had no new request before it is parked. Not
/// at once: a fresh hyper connection per request would cost a busy client's
/// requests two new buffers each; parked after a quiet quarter second, a busy
/// connection keeps its hyper connection and pays one timer event per period.
const PARK_AFTER: Duration = Duration::from_millis(250);

/// The h2 connection preface starts so; no HTTP/1 method does.
const H2_PREFACE_START: &[u8] = b"PRI";

/// The main listener's connections: the doors that serve them, the tracker a
/// graceful stop waits on, and the lot their idle time is spent in.
pub struct Connections {
    doors: Arc<Doors>,
    tracker: TaskTracker,
    stop: CancellationToken,
    parking: Parking<Conn>,
}

/// An open connection between two hyper connections: all that parking keeps.
struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    /// Shared with a CONNECT tunnel born on this connection, which outlives the
    /// HTTP connection (hyper hands the socket over).
    permit: Arc<OwnedSemaphorePermit>,
    _open: ConnectionGuard,
    /// No request yet: it may still open with h2's preface.
    fresh: bool,
}

impl Parkable for Conn {
    fn socket(&self) -> &TcpStream {
        &self.stream
    }
}

impl Connections {
    /// Connections are tracked by `tracker`; `stop` ends them: a request in
    /// flight is finished, a parked connection closed at once.
    pub fn new(doors: Arc<Doors>, tracker: TaskTracker, stop: CancellationToken) -> Arc<Self> {
        Arc::new_cyclic(|me: &Weak<Connections>| {
            let me = me.clone();
            let idle = doors.keep_alive_timeout;
            let parking = Parking::new(&tracker, stop.clone(), idle, move |conn| {
                if let Some(connections) = me.upgrade() {
                    connections.spawn(conn);
                }
            });
            Connections {
                doors,
                tracker,
                stop,
                parking,
            }
        })
    }

    /// Serve a connection the listener accepted, holding its `permit`.
    pub fn accept(
        self: &Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) {
        let _ = stream.set_nodelay(true);
        self.spawn(Conn {
            stream,
            peer,
            permit: Arc::new(permit),
            _open: self.doors.app.metrics.connection(DoorName::Main),
            fresh: true,
        });
    }

    fn spawn(self: &Arc<Self>, conn: Conn) {
        self.tracker.spawn(serve(self.clone(), conn));
    }

    fn park(&self, conn: Conn) {
        self.parking.park(conn, self.doors.app.metrics.parked());
    }
}

/// Serve `conn` (new, or back from the lot) until the client closes it, it goes
/// quiet (then it is parked), or the stop (then a request in flight is
/// finished).
async fn serve(connections: Arc<Connections>, conn: Conn) {
    let Conn {
        stream,
        peer,
        permit,
        _open: open,
        mut fresh,
    } = conn;
    let doors = &connections.doors;
    let activity = Arc::new(Activity::default());
    let service = {
        let (doors, activity, permit) = (doors.clone(), activity.clone(), permit.clone());
        service_fn(move |req: Request<Incoming>| {
            let busy = Busy::enter(&activity);
            if !req.body().is_end_stream() {
                activity.keep.store(true, Ordering::Relaxed);
            }
            let handled = doors.clone().main(req, peer, permit.clone());
            let activity = activity.clone();
            async move {
                let resp = handled.await?;
                if let Some(sendable) = resp.extensions().get::<Sendable>() {
                    activity.send_from(sendable.clone());
                }
                Ok::<_, Infallible>(resp.map(|body| Held { body, _busy: busy }))
            }
        })
    };
    let mut io = SendTimeout::new(stream, doors.send_timeout);
    let mut stopped = std::pin::pin!(connections.stop.cancelled());
    // The park-after period, first for a request to come (immediate for a
    // connection back from the lot), then each time the connection is quiet.
    let mut timer = std::pin::pin!(tokio::time::sleep(PARK_AFTER));
    tokio::select! {
        ready = io.get_ref().readable() => if ready.is_err() {
            return;
        },
        _ = timer.as_mut() => {
            let stream = io.into_inner();
            return connections.park(Conn { stream, peer, permit, _open: open, fresh });
        }
        _ = stopped.as_mut() => return,
    }
    let mut read = Bytes::new();
    loop {
        if fresh && is_h2(io.get_ref()).await {
            // Boxed, like the HTTP/1 connection below.
            let mut conn = Box::pin(
                doors
                    .http
                    .serve_connection_with_upgrades(TokioIo::new(io), service),
            );
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                _ = stopped.as_mut() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                failed(peer, &*e);
            }
            return;
        }
        fresh = false;
        activity.read_waiting.store(false, Ordering::Relaxed);
        activity.unflushed.store(false, Ordering::Relaxed);
        activity.keep.store(!read.is_empty(), Ordering::Relaxed);
        let watched = Watched {
            io,
            read,
            activity: activity.clone(),
        };
        // Boxed: the task's future stays small while hyper is not serving.
        let mut conn = Box::new(
            doors
                .http1
                .serve_connection(TokioIo::new(watched), service.clone())
                .with_upgrades(),
        );
        let mut stopping = false;
        let mut seen = activity.requests.load(Ordering::Relaxed);
        timer.as_mut().reset(Instant::now() + PARK_AFTER);
        let ended = poll_fn(|cx| {
            if !stopping && stopped.as_mut().poll(cx).is_ready() {
                // Finish the request in flight, then close.
                stopping = true;
                Pin::new(&mut *conn).graceful_shutdown();
            }
            match Pin::new(&mut *conn).poll(cx) {
                Poll::Ready(ended) => Poll::Ready(Some(ended)),
                Poll::Pending if !stopping && activity.parkable() => {
                    // Idle now: park once a whole period passed without a request.
                    while timer.as_mut().poll(cx).is_ready() {
                        let requests = activity.requests.load(Ordering::Relaxed);
                        if requests == seen {
                            return Poll::Ready(None);
                        }
                        seen = requests;
                        timer.as_mut().reset(Instant::now() + PARK_AFTER);
                    }
                    Poll::Pending
                }
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        if let Some(ended) = ended {
            if let Err(e) = ended {
                failed(peer, &e);
            }
            return;
        }
        // Idle with nothing in flight or unwritten: keep the socket and any bytes
        // of the next request hyper read; drop the rest.
        let Some(parts) = conn.into_parts() else {
            return;
        };
        (io, read) = (parts.io.into_inner().io, parts.read_buf);
        if read.is_empty() {
            // Quiet for a whole period already: straight to the lot.
            let stream = io.into_inner();
            return connections.park(Conn {
                stream,
                peer,
                permit,
                _open: open,
                fresh,
            });
        }
    }
}

/// A connection that ended with an error: worth a debug line, nothing more (a
/// client going away mid-response is one).
fn failed(peer: SocketAddr, error: &(dyn std::error::Error + 'static)) {
    tracing::debug!(%peer, error = %with_causes(error), "connection ended with an error");
}

/// Whether the client opens with h2's preface (h2c with prior knowledge).
async fn is_h2(stream: &TcpStream) -> bool {
    let mut start = [0u8; 3];
    match stream.peek(&mut start).await {
        // Fewer bytes that could still be the preface: let hyper's auto
        // detection, which waits for the whole preface, decide.
        Ok(n) => H2_PREFACE_START.starts_with(&start[..n]) && n > 0,
        Err(_) => false,
    }
}

/// What the doors' service and the connection's socket tell the parking loop.
/// Touched only by the connection's own task; atomics only because hyper wants
/// a `Send` service.
#[derive(Default)]
struct Activity {
    /// Requests whose response body hyper still holds.
    busy: AtomicUsize,
    /// Requests seen, ever: whether one came during a quiet period.
    requests: AtomicU64,
    /// hyper's last read found nothing to read.
    read_waiting: AtomicBool,
    /// Bytes were written since hyper last flushed.
    unflushed: AtomicBool,
    /// This hyper connection serves on to its end: a request body was seen, or
    /// it began with part of a head.
    keep: AtomicBool,
    /// The in-memory file the last response's body lives in, if it does: the
    /// socket is handed the file for slices of it (see [`crate::memfile`]).
    /// Replaced by the next such response, dropped with the task: it is not
    /// cleared when the body ends, as hyper writes the bytes after that.
    sendable: Mutex<Option<Sendable>>,
}

impl Activity {
    fn send_from(&self, sendable: Sendable) {
        if let Ok(mut slot) = self.sendable.lock() {
            *slot = Some(sendable);
        }
    }

    fn parkable(&self) -> bool {
        self.busy.load(Ordering::Relaxed) == 0
            && self.read_waiting.load(Ordering::Relaxed)
            && !self.unflushed.load(Ordering::Relaxed)
            && !self.keep.load(Ordering::Relaxed)
    }
}

/// A request in flight, from the service call until hyper drops its response body.
struct Busy(Arc<Activity>);

impl Busy {
    fn enter(activity: &Arc<Activity>) -> Busy {
        activity.busy.fetch_add(1, Ordering::Relaxed);
        activity.requests.fetch_add(1, Ordering::Relaxed);
        Busy(activity.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its connection busy until hyper drops it.
pub struct Held {
    body: GatewayBody,
    _busy: Busy,
}

impl Body for Held {
    type Data = Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The socket as hyper sees it: first the bytes read before parking, and every
/// read and flush noted in [`Activity`].
struct Watched {
    io: SendTimeout<TcpStream>,
    read: Bytes,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        self.activity
            .read_waiting
            .store(polled.is_pending(), Ordering::Relaxed);
        polled
    }
}

impl Watched {
    /// Write `bufs` by `sendfile` if they start with a slice of the in-memory
    /// file the response came from; the slices before one, by a plain write.
    /// `None` when none is.
    fn send_mapped(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Option<Poll<io::Result<usize>>> {
        let slot = self.activity.sendable.lock().ok()?;
        let sendable = slot.as_ref()?;
        let at = bufs.iter().position(|b| sendable.offset_of(b).is_some())?;
        if at > 0 {
            return Some(self.io.poll_write_more(cx, &bufs[..at]));
        }
        let offset = sendable.offset_of(&bufs[0])?;
        Some(
            self.io
                .poll_sendfile(cx, sendable.file(), offset, bufs[0].len()),
        )
    }

    fn wrote<T>(&self, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Ok(_)) = polled {
            self.activity.unflushed.store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.wrote(polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = match self.send_mapped(cx, bufs) {
            Some(polled) => polled,
            None => Pin::new(&mut self.io).poll_write_vectored(cx, bufs),
        };
        self.wrote(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        if let Poll::Ready(Ok(())) = polled {
            self.activity.unflushed.store(false, Ordering::Relaxed);
        }
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
