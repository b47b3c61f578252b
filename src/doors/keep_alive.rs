//! One connection of the main listener, from accept to close, with its idle
//! keep-alive time spent *parked*: held without hyper.
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB write buffer (and its
//! connection state) for every open HTTP/1 connection, busy or not: ~20 KiB per
//! idle keep-alive connection where nginx needs ~1. So an HTTP/1 connection is
//! served by a hyper connection only while it is in use. Once hyper waits for the
//! client's next request with no request in flight and nothing left to write,
//! and no request came for [`PARK_AFTER`], the hyper connection is taken apart
//! (`into_parts`: the socket, and any bytes of a next request already read) and
//! dropped, and the task waits for the socket to become readable, holding only
//! the socket. The next request gets a fresh hyper connection.
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
use std::sync::Arc;
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

use super::send_timeout::SendTimeout;
use super::{with_causes, Doors};
use crate::body::GatewayBody;

/// How long a parked connection waits for its next request, like hyper's own
/// head timeout did for an idle one before.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a connection must have had no new request before it is parked. Not
/// at once: a fresh hyper connection per request would cost a busy client's
/// requests two new buffers each; parked after a quiet quarter second, a busy
/// connection keeps its hyper connection and pays one timer event per period.
const PARK_AFTER: Duration = Duration::from_millis(250);

/// The h2 connection preface starts so; no HTTP/1 method does.
const H2_PREFACE_START: &[u8] = b"PRI";

/// Serve `stream` until the client closes it, it idles out, or `stop` (then a
/// request in flight is finished, a parked connection closed at once).
pub async fn serve(
    doors: Arc<Doors>,
    stream: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    stop: CancellationToken,
) {
    // Shared with a CONNECT tunnel born on this connection, which outlives the
    // HTTP connection (hyper hands the socket over).
    let permit = Arc::new(permit);
    let activity = Arc::new(Activity::default());
    let service = {
        let (doors, activity) = (doors.clone(), activity.clone());
        service_fn(move |req: Request<Incoming>| {
            let busy = Busy::enter(&activity);
            if !req.body().is_end_stream() {
                activity.keep.store(true, Ordering::Relaxed);
            }
            let handled = doors.clone().main(req, peer, permit.clone());
            async move {
                let resp = handled.await?;
                Ok::<_, Infallible>(resp.map(|body| Held { body, _busy: busy }))
            }
        })
    };
    let mut io = SendTimeout::new(stream, doors.send_timeout);
    let mut read = Bytes::new();
    // One registration for the connection's life, not one per request.
    let mut stopped = std::pin::pin!(stop.cancelled_owned());
    // One timer, for the idle bound while parked and the quiet period while not:
    // every byte of a parked task counts.
    let mut timer = std::pin::pin!(tokio::time::sleep(IDLE_TIMEOUT));
    for cycle in 0u64.. {
        // Parked: the socket, nothing more. Bytes of a next request already read
        // (pipelined, or hyper parked between two polls) are served at once.
        if read.is_empty() {
            let _parked = doors.app.metrics.parked();
            timer.as_mut().reset(Instant::now() + IDLE_TIMEOUT);
            tokio::select! {
                ready = io.get_ref().readable() => if ready.is_err() {
                    return;
                },
                _ = timer.as_mut() => return,
                _ = stopped.as_mut() => return,
            }
        }
        if cycle == 0 && is_h2(io.get_ref()).await {
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
        activity.read_waiting.store(false, Ordering::Relaxed);
        activity.unflushed.store(false, Ordering::Relaxed);
        activity.keep.store(!read.is_empty(), Ordering::Relaxed);
        let watched = Watched {
            io,
            read,
            activity: activity.clone(),
        };
        // Boxed: a parked task must not keep room for a hyper connection.
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
}

impl Activity {
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
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
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
