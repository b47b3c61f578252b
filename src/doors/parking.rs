//! The parking lot: idle keep-alive connections held without a task of their
//! own until their client sends again.
//!
//! A task costs its future's largest state for as long as it lives: ~1.6 KiB
//! for a connection's serving task, idle or not, where nginx holds an idle
//! keep-alive connection in ~1.2 KiB all told. A parked connection is instead an
//! entry of a few words in a `FuturesUnordered` of one of a few *lots* (one per
//! runtime worker), each a task that waits for any of its sockets to become
//! readable and hands that connection back ([`Parking::new`]'s `resume`).
//!
//! The idle bound needs no timer per connection: a lot parks connections in rows
//! of one second, and drops a row whole, closing what is still in it, once it is
//! older than the bound. Stopping drops every lot, closing every parked
//! connection at once.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ops::metrics::ConnectionGuard;

/// How finely the idle bound is kept: connections parked within one row's
/// time are closed together.
const ROW: Duration = Duration::from_secs(1);

/// The most lots, whatever the worker count: each costs a task and a timer.
const MAX_LOTS: usize = 16;

/// What can wait in the lot: anything that owns the socket it waits on.
pub trait Parkable: Send + Unpin + 'static {
    fn socket(&self) -> &TcpStream;
}

/// Where idle connections of type `T` wait; cheap to share.
pub struct Parking<T> {
    lots: Vec<mpsc::UnboundedSender<Parked<T>>>,
    next: AtomicUsize,
}

/// A connection in the lot, and its place in the `connections_parked` gauge.
struct Parked<T> {
    conn: T,
    _gauge: ConnectionGuard,
}

impl<T: Parkable> Parking<T> {
    /// Open one lot per runtime worker (tracked by `tracker`, ended by `stop`).
    /// A parked connection whose client sends again (or closes) goes to `resume`;
    /// one idle for `idle` is closed.
    pub fn new(
        tracker: &TaskTracker,
        stop: CancellationToken,
        idle: Duration,
        resume: impl Fn(T) + Send + Sync + 'static,
    ) -> Parking<T> {
        let resume = Arc::new(resume);
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        let lots = (0..workers.clamp(1, MAX_LOTS))
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                tracker.spawn(lot(rx, stop.clone(), idle, resume.clone()));
                tx
            })
            .collect();
        Parking {
            lots,
            next: AtomicUsize::new(0),
        }
    }

    /// Hold `conn` until its socket is readable. After a stop it is dropped:
    /// closed, as every parked connection is then.
    pub fn park(&self, conn: T, gauge: ConnectionGuard) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.lots.len();
        let _ = self.lots[i].send(Parked {
            conn,
            _gauge: gauge,
        });
    }
}

/// One lot: its arrivals, and its rows of parked connections, oldest first.
async fn lot<T: Parkable, R: Fn(T)>(
    mut arrivals: mpsc::UnboundedReceiver<Parked<T>>,
    stop: CancellationToken,
    idle: Duration,
    resume: Arc<R>,
) {
    let mut rows: VecDeque<(Instant, FuturesUnordered<Waiting<T>>)> = VecDeque::new();
    let mut tick = tokio::time::interval(ROW);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut stopped = std::pin::pin!(stop.cancelled());
    loop {
        tokio::select! {
            _ = stopped.as_mut() => return,
            arrived = arrivals.recv() => {
                let Some(parked) = arrived else { return };
                let now = Instant::now();
                if rows.back().is_none_or(|(opened, _)| now - *opened >= ROW) {
                    rows.push_back((now, FuturesUnordered::new()));
                }
                if let Some((_, row)) = rows.back_mut() {
                    row.push(Waiting(Some(parked)));
                }
            }
            _ = tick.tick() => {
                // Idle past the bound, or emptied by their clients: gone.
                while rows
                    .front()
                    .is_some_and(|(opened, row)| row.is_empty() || opened.elapsed() >= idle)
                {
                    rows.pop_front();
                }
            }
            parked = readable(&mut rows) => resume(parked.conn),
        }
    }
}

/// The next parked connection whose socket became readable.
async fn readable<T: Parkable>(
    rows: &mut VecDeque<(Instant, FuturesUnordered<Waiting<T>>)>,
) -> Parked<T> {
    poll_fn(|cx| {
        for (_, row) in rows.iter_mut() {
            // `None` ends an empty row's stream; `Some(None)`, a failed socket.
            while let Poll::Ready(Some(ready)) = row.poll_next_unpin(cx) {
                if let Some(parked) = ready {
                    return Poll::Ready(parked);
                }
            }
        }
        Poll::Pending
    })
    .await
}

/// A parked connection waiting for its socket: no future of its own, the
/// socket's read readiness holds the waker. `None` once it is done.
struct Waiting<T>(Option<Parked<T>>);

impl<T: Parkable> Future for Waiting<T> {
    /// The connection, or `None` when its socket failed (it is dropped: closed).
    type Output = Option<Parked<T>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(parked) = &self.0 else {
            return Poll::Ready(None);
        };
        match parked.conn.socket().poll_read_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(self.0.take()),
            Poll::Ready(Err(_)) => Poll::Ready(None),
        }
    }
}
