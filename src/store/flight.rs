//! Single flight: one upstream fetch per key, however many clients miss at once.
//!
//! The fetch runs in its own task, so it finishes (and fills the store) even if the
//! client that started it goes away. It goes in four steps: `head` asks the
//! upstream, `spool` appends the body to a spool file (digesting it on the way),
//! `verify` checks the digest, `commit` links the spool file into the store.
//! Every waiting client, the first one included, streams the spool file as it
//! grows, so late joiners still get every byte from the start and memory stays
//! bounded whatever the archive size. The entry is committed only when the body is
//! complete (length as announced, no reset) and verified; otherwise every reader's
//! transfer is aborted and nothing is stored.
//!
//! With a shared tier ([`super::shared`]), `run` first looks there (or waits for
//! another replica's fetch under its lease): a copy found there is the byte source
//! instead of the upstream, through the same spool, verify and commit steps. A
//! copy that fails them is deleted from the tier, every follower of it is aborted
//! (it never sees a clean end) and the fetch goes on from the upstream. A body
//! fetched from the upstream is uploaded to the tier once committed.
//!
//! Waiters hold a [`Flight`]: [`Flight::answer`] for a client that streams the body
//! as it arrives, [`Flight::outcome`] for one that only waits for the end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::{stream, FutureExt};
use http::{HeaderValue, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use sha2::{Digest, Sha256};
use tempfile::TempPath;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::memory::Hot;
use super::quarantine::Mismatch;
use super::shared::{Before, Lease, SharedCopy};
use super::{Object, Store, Trust};
use crate::body::{self, BoxError, GatewayBody};
use crate::upstream::{body_is_delimited, collect_limited, content_length, next_chunk};

/// Bytes a reader takes from the spool file at a time.
const READ_CHUNK: usize = 256 * 1024;
/// Most bytes gathered from the upstream before one write to the spool file.
const WRITE_BATCH: usize = 256 * 1024;
/// Error pages from the upstream are handed on, but only this much of them.
const REFUSAL_BODY_MAX: usize = 64 * 1024;

/// How a fetch ended.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Every byte arrived and passed verification; the object is committed to the
    /// store (unless the store itself failed, which only costs a later refetch).
    Fetched { len: u64 },
    /// Another fetch committed the object just before this one started.
    Stored,
    /// The upstream answered something other than 200 (e.g. 404): handed on, not stored.
    Refused {
        status: StatusCode,
        content_type: Option<HeaderValue>,
        body: Bytes,
    },
    /// The body broke off, ran long or short, or failed verification: readers
    /// abort, nothing was stored.
    Broken(Arc<str>),
    /// No source could be reached.
    Unreachable(Arc<str>),
    /// The fetch task went away without saying how it ended (it panicked).
    Abandoned,
}

/// Where the bytes of a fetch come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A source, now.
    Upstream,
    /// The shared tier (another replica fetched it from the upstream).
    Shared,
}

/// What a client streaming a fetch gets once the upstream has answered.
pub enum Answer {
    /// The upstream's (or the shared tier's) 200 body (`len` as announced),
    /// followed from the spool file as the fetch fills it. It ends in an error,
    /// never cleanly, if the fetch breaks or fails verification.
    Body {
        len: Option<u64>,
        body: GatewayBody,
        origin: Origin,
    },
    /// The spool file could not be opened.
    Unreadable(std::io::Error),
    /// The fetch ended with no body to follow (so never [`Outcome::Fetched`]).
    Ended(Outcome),
}

/// Where one fetch stands; every waiter watches it through its [`Flight`].
#[derive(Clone, Debug)]
enum FlightState {
    /// Asking the upstream; no response head yet.
    Connecting,
    /// The upstream answered 200; `written` bytes of the body are in the spool file.
    Streaming {
        spool: Arc<TempPath>,
        len: Option<u64>,
        written: u64,
        origin: Origin,
    },
    /// Every byte arrived and passed verification; the spool file stays readable
    /// for the clients still following it.
    Complete {
        spool: Arc<TempPath>,
        len: u64,
        origin: Origin,
    },
    /// The fetch ended without a body to follow.
    Ended(Outcome),
}

/// One waiter's hold on a fetch, from [`Flights::join`].
pub struct Flight {
    rx: watch::Receiver<FlightState>,
}

impl Flight {
    /// Wait for the upstream's answer: the body, to stream as it arrives, or how
    /// the fetch ended without one.
    pub async fn answer(mut self) -> Answer {
        let (spool, len, origin) = loop {
            let state = self.rx.borrow_and_update().clone();
            match state {
                FlightState::Connecting => {}
                FlightState::Streaming {
                    spool, len, origin, ..
                } => break (spool, len, origin),
                FlightState::Complete { spool, len, origin } => break (spool, Some(len), origin),
                FlightState::Ended(outcome) => return Answer::Ended(outcome),
            }
            if self.rx.changed().await.is_err() {
                return Answer::Ended(Outcome::Abandoned);
            }
        };
        match follow(spool, self.rx).await {
            Ok(body) => Answer::Body { len, body, origin },
            Err(e) => Answer::Unreadable(e),
        }
    }

    /// Wait for the fetch to end; `progress` is called with the bytes spooled so
    /// far while the body arrives.
    pub async fn outcome(mut self, mut progress: impl FnMut(u64)) -> Outcome {
        loop {
            let state = self.rx.borrow_and_update().clone();
            match state {
                FlightState::Connecting => {}
                FlightState::Streaming { written, .. } => progress(written),
                FlightState::Complete { len, .. } => return Outcome::Fetched { len },
                FlightState::Ended(outcome) => return outcome,
            }
            if self.rx.changed().await.is_err() {
                return Outcome::Abandoned;
            }
        }
    }
}

/// The fetches in progress, by store key.
#[derive(Default)]
pub struct Flights {
    live: Mutex<HashMap<String, watch::Receiver<FlightState>>>,
}

impl Flights {
    /// Join the fetch for `object`, starting it if there is none.
    pub fn join(&self, store: &Arc<Store>, object: &Object) -> Flight {
        // Keyed by what the fetch will be checked against too: a client that expects
        // a digest never shares a fetch made under weaker (or other) expectations.
        let flight = flight_key(object);
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = live.get(&flight) {
            store.counters.flight_waiters.inc();
            return Flight { rx: rx.clone() };
        }
        let (tx, rx) = watch::channel(FlightState::Connecting);
        live.insert(flight.clone(), rx.clone());
        drop(live);
        let landing = Landing {
            store: store.clone(),
            key: flight,
        };
        tokio::spawn(fetch(store.clone(), object.clone(), tx, landing));
        Flight { rx }
    }

    fn land(&self, key: &str) {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Number of fetches in progress (for health and tests).
    pub fn in_flight(&self) -> usize {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Removes the flight from the table however the fetch task ends, panics included,
/// so a failed fetch never blocks the next attempt.
struct Landing {
    store: Arc<Store>,
    key: String,
}

impl Drop for Landing {
    fn drop(&mut self) {
        self.store.flights.land(&self.key);
    }
}

fn flight_key(object: &Object) -> String {
    match &object.trust {
        Trust::Checksum { expected, .. } => format!("{}#{expected}", object.key),
        Trust::Complete => format!("{}#complete", object.key),
        Trust::Unverified => format!("{}#unverified", object.key),
    }
}

async fn fetch(
    store: Arc<Store>,
    object: Object,
    tx: watch::Sender<FlightState>,
    landing: Landing,
) {
    let started = Instant::now();
    // Closes the race with a flight that committed between our caller's store lookup
    // and our registration: without it, that object would be fetched twice.
    if let Ok(Some(entry)) = store.disk.lookup(&object.key).await {
        if object.accepts(&entry.sha256()) {
            tx.send_replace(FlightState::Ended(Outcome::Stored));
            return;
        }
    }
    let end = match run(&store, &object, &tx).await {
        Ok(complete) => complete,
        Err(outcome) => FlightState::Ended(outcome),
    };
    report(&store, &object, &end, started);
    // Land before announcing the end: a client that sees `Complete` and asks again
    // must find the store, not this finished flight.
    drop(landing);
    tx.send_replace(end);
}

/// The fetch proper: [`head`], [`spool`], [`verify`], [`commit`]. `Err` is how
/// it ended early, so `?` reads naturally.
async fn run(
    store: &Store,
    object: &Object,
    tx: &watch::Sender<FlightState>,
) -> Result<FlightState, Outcome> {
    let lease = match from_shared(store, object, tx).await {
        Ok(complete) => return Ok(complete),
        Err(lease) => lease,
    };
    let started = Instant::now();
    let answer = head(store, object).await?;
    let url = answer.url.clone();
    let spooled = spool(store, object, answer, tx).await?;
    let seconds = started.elapsed().as_secs_f64();
    store
        .upstream
        .health()
        .record_transfer(&url, spooled.len, seconds);
    verify(store, object, &spooled)?;
    if commit(store, object, &spooled).await {
        upload(store, &spooled, lease);
    }
    Ok(FlightState::Complete {
        spool: spooled.file,
        len: spooled.len,
        origin: Origin::Upstream,
    })
}

/// Try the shared tier first (for an archive whose digest the index gives): its
/// copy, spooled, verified and committed like an upstream body, or, waiting on
/// the way for another replica's fetch under its lease. `Err` means fetch from
/// the upstream, holding this replica's lease if it won one.
async fn from_shared(
    store: &Store,
    object: &Object,
    tx: &watch::Sender<FlightState>,
) -> Result<FlightState, Option<Lease>> {
    let (Some(shared), Trust::Checksum { expected, .. }) = (&store.shared, &object.trust) else {
        return Err(None);
    };
    let copy = match shared
        .before_upstream(expected, store.limits.archive_max)
        .await
    {
        Before::Found(copy) => copy,
        Before::Fetch(lease) => return Err(lease),
    };
    let SharedCopy { len, body } = copy;
    let head = Head {
        url: shared.url().to_string(),
        body,
        len: Some(len),
        delimited: true,
        idle: shared.idle_read(),
        origin: Origin::Shared,
    };
    let spooled = match spool(store, object, head, tx).await {
        Ok(spooled) => spooled,
        Err(outcome) => {
            // Followers of this copy see the state move on and abort.
            tx.send_replace(FlightState::Connecting);
            tracing::warn!(key = %object.key, ?outcome, "reading the shared tier's copy failed; fetching from the upstream");
            return Err(None);
        }
    };
    if spooled.sha256.as_deref() != Some(expected.as_str()) {
        tx.send_replace(FlightState::Connecting);
        tracing::error!(
            key = %object.key, %expected, actual = spooled.sha256.as_deref().unwrap_or(""),
            "the shared tier's copy does not match the index checksum; not served, removed, fetching from the upstream"
        );
        shared.remove(expected).await;
        return Err(None);
    }
    commit(store, object, &spooled).await;
    Ok(FlightState::Complete {
        spool: spooled.file,
        len: spooled.len,
        origin: Origin::Shared,
    })
}

/// Hand a verified, committed upstream body to the shared tier, in the background,
/// from its file in the disk tier (the spool file goes when the readers are done).
fn upload(store: &Store, spooled: &Spooled, lease: Option<Lease>) {
    let (Some(shared), Some(sha256)) = (&store.shared, &spooled.sha256) else {
        return;
    };
    let Some(file) = super::usage::content_path(store.disk.dir(), sha256) else {
        return;
    };
    shared.upload_in_background(sha256.clone(), file, spooled.len, lease);
}

/// The upstream's (or the shared tier's) 200 answer, its body still to come.
struct Head {
    /// The URL that answered.
    url: String,
    body: GatewayBody,
    len: Option<u64>,
    /// Whether the body's end can be told from a cut (see [`body_is_delimited`]).
    delimited: bool,
    /// Longest pause between two chunks of the body.
    idle: Duration,
    origin: Origin,
}

/// Send the request and check the answer: anything but 200 is handed on as
/// refused, a body announced larger than `archive_max` is refused unread.
async fn head(store: &Store, object: &Object) -> Result<Head, Outcome> {
    let (resp, url) = first_answer(store, object).await?;
    let status = resp.status();
    if status != StatusCode::OK {
        let content_type = resp.headers().get(http::header::CONTENT_TYPE).cloned();
        let idle = store.upstream.timeouts().idle_read;
        let body = collect_limited(resp.into_body(), REFUSAL_BODY_MAX, idle).await;
        return Err(Outcome::Refused {
            status,
            content_type,
            body,
        });
    }
    let len = content_length(resp.headers());
    let limit = store.limits.archive_max;
    if len.is_some_and(|len| len > limit) {
        return Err(broken(format!(
            "upstream object is larger than the {limit}-byte limit"
        )));
    }
    Ok(Head {
        url,
        delimited: body_is_delimited(&resp),
        body: body::incoming(resp.into_body()),
        len,
        idle: store.upstream.timeouts().idle_read,
        origin: Origin::Upstream,
    })
}

/// Ask each source in order; a 404 or an unreachable source moves on to the next.
async fn first_answer(
    store: &Store,
    object: &Object,
) -> Result<(http::Response<Incoming>, String), Outcome> {
    let mut last = None;
    for (i, url) in object.urls.iter().enumerate() {
        let more = i + 1 < object.urls.len();
        match store.upstream.get(url).await {
            Ok(resp) if resp.status() == StatusCode::NOT_FOUND && more => {
                tracing::debug!(%url, "not found here; trying the next source");
            }
            Ok(resp) => return Ok((resp, url.clone())),
            Err(e) => {
                tracing::warn!(%url, error = %e, "source unreachable");
                last = Some(e.to_string());
            }
        }
    }
    Err(Outcome::Unreachable(
        last.unwrap_or_else(|| "no source answered".into()).into(),
    ))
}

/// A body wholly in its spool file.
struct Spooled {
    file: Arc<TempPath>,
    len: u64,
    /// Lowercase hex sha256 of the body if it is to be kept; `None` for a body that
    /// is only streamed (nothing to verify or store, so nothing to hash).
    sha256: Option<String>,
    /// The body again, for the memory tier, if it is to be kept and small enough.
    hot: Option<Bytes>,
}

/// Write the body to the spool file as it arrives, announcing each batch to the
/// followers, and digest it on the way if it is to be kept: the one pass over
/// its bytes that [`verify`] and [`commit`] rely on. Fails if the body breaks
/// off, or runs longer or shorter than announced (or than `archive_max`).
async fn spool(
    store: &Store,
    object: &Object,
    head: Head,
    tx: &watch::Sender<FlightState>,
) -> Result<Spooled, Outcome> {
    let Head {
        mut body,
        len,
        delimited,
        idle,
        origin,
        ..
    } = head;
    let limit = len.unwrap_or(store.limits.archive_max);
    let spool = tempfile::NamedTempFile::new_in(&store.spool_dir)
        .map_err(|e| broken(format!("cannot create spool file: {e}")))?;
    let (file, path) = spool.into_parts();
    let path = Arc::new(path);
    let mut file = tokio::fs::File::from_std(file);
    let keep = match object.trust {
        Trust::Checksum { .. } => true,
        Trust::Complete => delimited,
        Trust::Unverified => false,
    };
    let mut hasher = keep.then(Sha256::new);
    let mut hot = len
        .filter(|&l| keep && store.memory.fits(l))
        .map(|l| BytesMut::with_capacity(l as usize));
    tx.send_replace(FlightState::Streaming {
        spool: path.clone(),
        len,
        written: 0,
        origin,
    });

    let mut written: u64 = 0;
    loop {
        let Some((chunk, last)) = next_batch(&mut body, idle).await.map_err(broken)? else {
            break;
        };
        let now = written + chunk.len() as u64;
        if now > limit {
            return Err(broken(format!(
                "upstream sent more than the {limit} bytes announced"
            )));
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| broken(format!("spool write failed: {e}")))?;
        // Readers open the spool by path: bytes must reach the file before they are announced.
        file.flush()
            .await
            .map_err(|e| broken(format!("spool write failed: {e}")))?;
        if let Some(h) = hasher.as_mut() {
            h.update(&chunk);
        }
        if let Some(h) = hot.as_mut() {
            h.extend_from_slice(&chunk);
        }
        written = now;
        tx.send_modify(|state| {
            if let FlightState::Streaming { written: w, .. } = state {
                *w = written;
            }
        });
        if last {
            break;
        }
    }
    if let Some(len) = len.filter(|&len| len != written) {
        return Err(broken(format!(
            "upstream body ended after {written} of {len} bytes"
        )));
    }
    Ok(Spooled {
        file: path,
        len: written,
        sha256: hasher.map(|h| hex::encode(h.finalize())),
        hot: hot.map(BytesMut::freeze),
    })
}

/// The next bytes of `body`, and whether it ended right after them; `None` at its
/// end. One chunk is waited for, then whatever else has already arrived is taken,
/// up to a batch: one spool write per batch instead of per 16 KiB frame, without
/// ever waiting for more (the first bytes still go out at once).
async fn next_batch(
    body: &mut GatewayBody,
    idle: Duration,
) -> Result<Option<(Bytes, bool)>, String> {
    let Some(first) = next_chunk(body, idle).await? else {
        return Ok(None);
    };
    let mut batch = BytesMut::from(&first[..]);
    while batch.len() < WRITE_BATCH {
        match body.frame().now_or_never() {
            Some(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    batch.extend_from_slice(&data);
                }
            }
            Some(None) => return Ok(Some((batch.freeze(), true))),
            Some(Some(Err(e))) => return Err(format!("body broke off: {e}")),
            None => break,
        }
    }
    Ok(Some((batch.freeze(), false)))
}

/// Check the body against the sha256 the index gives for it. A mismatch is logged
/// loudly and remembered until the index refreshes, and the fetch ends broken:
/// no follower sees a clean end, and [`commit`] is never reached.
fn verify(store: &Store, object: &Object, spooled: &Spooled) -> Result<(), Outcome> {
    let Trust::Checksum {
        label,
        expected,
        refreshes,
    } = &object.trust
    else {
        return Ok(());
    };
    // A checksum always makes the body one to keep, so it was digested.
    if spooled.sha256.as_deref() == Some(expected.as_str()) {
        return Ok(());
    }
    let actual = spooled.sha256.clone().unwrap_or_default();
    tracing::error!(
        key = %object.key, module = %label, %expected, %actual,
        "upstream archive does not match the index checksum; refused, not stored"
    );
    let reason = format!("{label}: the index says sha256 {expected}, the upstream sent {actual}");
    let mismatch = Mismatch {
        label: label.clone(),
        expected: expected.clone(),
        actual,
    };
    store.quarantine.record(&object.key, mismatch, *refreshes);
    Err(broken(reason))
}

/// Keep a verified body: the spool file goes into the disk tier under the digest
/// [`spool`] computed (nothing is read or hashed again), a small body into the
/// memory tier too. A store failure is only logged: the clients have their bytes,
/// and a later request fetches again. Whether the disk tier has it now.
async fn commit(store: &Store, object: &Object, spooled: &Spooled) -> bool {
    let Some(sha256) = &spooled.sha256 else {
        return false;
    };
    let committed = store
        .disk
        .commit_hashed(&object.key, &spooled.file, spooled.len, sha256)
        .await;
    if let Err(e) = committed {
        tracing::warn!(key = %object.key, error = %e, "store commit failed; served without caching");
        return false;
    }
    if let Some(bytes) = &spooled.hot {
        let hot = Hot::new(bytes.clone(), sha256.clone(), object.content_type);
        store.memory.insert(object.key.clone(), hot);
    }
    true
}

/// Say how the fetch ended in the log, and remember an upstream 404.
fn report(store: &Store, object: &Object, end: &FlightState, started: Instant) {
    match end {
        FlightState::Complete {
            len,
            origin: Origin::Upstream,
            ..
        } => tracing::info!(
            key = %object.key, bytes = len, ms = started.elapsed().as_millis() as u64,
            stored = object.trust != Trust::Unverified,
            "fetched from upstream"
        ),
        FlightState::Complete {
            len,
            origin: Origin::Shared,
            ..
        } => tracing::info!(
            key = %object.key, bytes = len, ms = started.elapsed().as_millis() as u64,
            "fetched from the shared tier"
        ),
        FlightState::Ended(Outcome::Broken(reason)) => tracing::warn!(
            key = %object.key, %reason, "upstream transfer failed; nothing stored"
        ),
        FlightState::Ended(Outcome::Refused { status, .. }) => {
            tracing::info!(key = %object.key, %status, "upstream refused; passed on, not stored");
            if *status == StatusCode::NOT_FOUND {
                let listed = matches!(object.trust, Trust::Checksum { .. });
                store.not_found.record(&object.key, listed);
            }
        }
        FlightState::Ended(Outcome::Unreachable(reason)) => tracing::warn!(
            key = %object.key, %reason, "no source could be reached"
        ),
        _ => {}
    }
}

fn broken(reason: String) -> Outcome {
    Outcome::Broken(reason.into())
}

/// A body that follows the spool file as the fetch fills it, ending cleanly only
/// once the fetch is complete and every byte has been read.
async fn follow(
    spool: Arc<TempPath>,
    rx: watch::Receiver<FlightState>,
) -> std::io::Result<GatewayBody> {
    let file = tokio::fs::File::open(&*spool).await?;
    let reader = Follower {
        spool,
        file,
        pos: 0,
        rx,
    };
    let chunks = stream::unfold(Some(reader), |state| async move {
        let mut reader = state?;
        match reader.next().await {
            Ok(Some(bytes)) => Some((Ok(Frame::data(bytes)), Some(reader))),
            Ok(None) => None,
            Err(e) => Some((Err(e), None)),
        }
    });
    Ok(StreamBody::new(chunks).boxed_unsync())
}

struct Follower {
    /// Keeps the spool file alive while this reader needs it.
    spool: Arc<TempPath>,
    file: tokio::fs::File,
    pos: u64,
    rx: watch::Receiver<FlightState>,
}

impl Follower {
    async fn next(&mut self) -> Result<Option<Bytes>, BoxError> {
        loop {
            let (available, done) = match &*self.rx.borrow_and_update() {
                // The fetch moved to another byte source (a shared copy that failed):
                // what this reader sent so far may be wrong, so it never ends cleanly.
                FlightState::Streaming { spool, .. } | FlightState::Complete { spool, .. }
                    if !Arc::ptr_eq(spool, &self.spool) =>
                {
                    return Err("the shared tier's copy failed; transfer aborted".into())
                }
                FlightState::Connecting => {
                    return Err("the shared tier's copy failed; transfer aborted".into())
                }
                // The last byte waits for the verdict: a body that fails verification
                // must end in an abort, never in a clean, complete-looking transfer.
                FlightState::Streaming { written, len, .. } if Some(*written) == *len => {
                    (written.saturating_sub(1), false)
                }
                FlightState::Streaming { written, .. } => (*written, false),
                FlightState::Complete { len, .. } => (*len, true),
                FlightState::Ended(Outcome::Broken(reason)) => {
                    return Err(format!("upstream transfer failed: {reason}").into())
                }
                other => return Err(format!("flight ended unexpectedly: {other:?}").into()),
            };
            if self.pos < available {
                let want = (available - self.pos).min(READ_CHUNK as u64) as usize;
                let mut buf = vec![0u8; want];
                self.file.read_exact(&mut buf).await?;
                self.pos += want as u64;
                return Ok(Some(Bytes::from(buf)));
            }
            if done {
                return Ok(None);
            }
            if self.rx.changed().await.is_err() {
                return Err("fetch task ended without finishing".into());
            }
        }
    }
}
