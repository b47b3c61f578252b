//! Single flight: one upstream fetch per key, however many clients miss at once.
//!
//! The fetch runs in its own task, so it finishes (and fills the store) even if the
//! client that started it goes away. It appends the body to a spool file and tees it
//! into a cacache writer; every waiting client, the first one included, streams the
//! spool file as it grows, so late joiners still get every byte from the start and
//! memory stays bounded whatever the archive size. The entry is committed only when
//! the body is complete (length as announced, no reset); otherwise every reader's
//! transfer is aborted and nothing is stored.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::{stream, FutureExt};
use http::{HeaderValue, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use tempfile::TempPath;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use sha2::{Digest, Sha256};

use super::memory::Hot;
use super::quarantine::Mismatch;
use super::{Object, Store, Trust};
use crate::body::{BoxError, GatewayBody};
use crate::upstream::{body_is_delimited, collect_limited, content_length, next_chunk};

/// Bytes a reader takes from the spool file at a time.
const READ_CHUNK: usize = 256 * 1024;
/// Most bytes gathered from the upstream before one write to spool and store.
const WRITE_BATCH: usize = 256 * 1024;
/// Error pages from the upstream are handed on, but only this much of them.
const REFUSAL_BODY_MAX: usize = 64 * 1024;

/// Where one fetch stands; every waiting client watches this.
#[derive(Clone, Debug)]
pub enum FlightState {
    /// Asking the upstream; no response head yet.
    Connecting,
    /// The upstream answered 200; `written` bytes of the body are in the spool file.
    Streaming {
        spool: Arc<TempPath>,
        len: Option<u64>,
        written: u64,
    },
    /// Every byte arrived; the object is committed to the store (unless the store
    /// itself failed, which only costs a later refetch).
    Complete { spool: Arc<TempPath>, len: u64 },
    /// The body broke off, ran long or short: readers abort, nothing was stored.
    Broken {
        spool: Option<Arc<TempPath>>,
        reason: Arc<str>,
    },
    /// Another fetch committed the object just before this one started.
    Stored,
    /// The upstream answered something other than 200 (e.g. 404): handed on, not stored.
    Refused {
        status: StatusCode,
        content_type: Option<HeaderValue>,
        body: Bytes,
    },
    /// No source could be reached.
    Unreachable(Arc<str>),
}

/// The fetches in progress, by store key.
#[derive(Default)]
pub struct Flights {
    live: Mutex<HashMap<String, watch::Receiver<FlightState>>>,
}

impl Flights {
    /// Join the fetch for `object`, starting it if there is none.
    pub fn join(&self, store: &Arc<Store>, object: &Object) -> watch::Receiver<FlightState> {
        // Keyed by what the fetch will be checked against too: a client that expects
        // a digest never shares a fetch made under weaker (or other) expectations.
        let flight = flight_key(object);
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = live.get(&flight) {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(FlightState::Connecting);
        live.insert(flight.clone(), rx.clone());
        drop(live);
        let landing = Landing {
            store: store.clone(),
            key: flight,
        };
        tokio::spawn(fetch(store.clone(), object.clone(), tx, landing));
        rx
    }

    /// Wait until the fetch behind `rx` has ended, however it ended.
    pub async fn settle(mut rx: watch::Receiver<FlightState>) {
        loop {
            if !matches!(
                *rx.borrow_and_update(),
                FlightState::Connecting | FlightState::Streaming { .. }
            ) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
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
            tx.send_replace(FlightState::Stored);
            return;
        }
    }
    let final_state = match run(&store, &object, &tx).await {
        Ok(state) => state,
        Err(state) => state,
    };
    match &final_state {
        FlightState::Complete { len, .. } => tracing::info!(
            key = %object.key, bytes = len, ms = started.elapsed().as_millis() as u64,
            stored = object.trust != Trust::Unverified,
            "fetched from upstream"
        ),
        FlightState::Broken { reason, .. } => tracing::warn!(
            key = %object.key, %reason, "upstream transfer failed; nothing stored"
        ),
        FlightState::Refused { status, .. } => {
            tracing::info!(key = %object.key, %status, "upstream refused; passed on, not stored");
            if *status == StatusCode::NOT_FOUND {
                let listed = matches!(object.trust, Trust::Checksum { .. });
                store.not_found.record(&object.key, listed);
            }
        }
        FlightState::Unreachable(reason) => tracing::warn!(
            key = %object.key, %reason, "no source could be reached"
        ),
        _ => {}
    }
    // Land before announcing the end: a client that sees `Complete` and asks again
    // must find the store, not this finished flight.
    drop(landing);
    tx.send_replace(final_state);
}

/// The fetch proper. `Err` carries a failure state, so `?` reads naturally.
async fn run(
    store: &Store,
    object: &Object,
    tx: &watch::Sender<FlightState>,
) -> Result<FlightState, FlightState> {
    let resp = first_answer(store, object).await?;
    let status = resp.status();
    let idle = store.upstream.timeouts().idle_read;
    if status != StatusCode::OK {
        let content_type = resp.headers().get(http::header::CONTENT_TYPE).cloned();
        let body = collect_limited(resp.into_body(), REFUSAL_BODY_MAX, idle).await;
        return Ok(FlightState::Refused {
            status,
            content_type,
            body,
        });
    }
    let len = content_length(resp.headers());
    let delimited = body_is_delimited(&resp);
    let limit = store.limits.archive_max;
    if len.is_some_and(|len| len > limit) {
        return Err(broken(
            None,
            format!("upstream object is larger than the {limit}-byte limit"),
        ));
    }

    let spool = tempfile::NamedTempFile::new_in(&store.spool_dir)
        .map_err(|e| broken(None, format!("cannot create spool file: {e}")))?;
    let (file, path) = spool.into_parts();
    let spool = Arc::new(path);
    let mut file = tokio::fs::File::from_std(file);
    let keep = match object.trust {
        Trust::Checksum { .. } => true,
        Trust::Complete => delimited,
        Trust::Unverified => false,
    };
    // Without a Content-Length the store's record would carry no size, so such a
    // body is committed from the spool file once its length is known (below).
    let tee = keep && len.is_some();
    let mut writer = match store.disk.writer(&object.key, len).await {
        Ok(w) if tee => Some(w),
        Ok(_) => None,
        Err(e) => {
            // The client still gets its bytes; only the caching is lost.
            tracing::warn!(key = %object.key, error = %e, "cannot write to the store; streaming without caching");
            None
        }
    };
    let mut hasher = Sha256::new();
    let mut hot = len
        .filter(|&l| keep && store.memory.fits(l))
        .map(|l| BytesMut::with_capacity(l as usize));
    tx.send_replace(FlightState::Streaming {
        spool: spool.clone(),
        len,
        written: 0,
    });

    let mut body: Incoming = resp.into_body();
    let mut written: u64 = 0;
    let fail = |reason: String| broken(Some(spool.clone()), reason);
    let mut ended = false;
    while !ended {
        let first = match next_chunk(&mut body, idle).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => return Err(fail(e.to_string())),
        };
        // Take whatever else has already arrived, up to a batch: one spool write and
        // one store write per batch instead of per 16 KiB frame, without ever waiting
        // for more (the first bytes still go out at once).
        let mut batch = BytesMut::from(&first[..]);
        while batch.len() < WRITE_BATCH {
            match body.frame().now_or_never() {
                Some(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        batch.extend_from_slice(&data);
                    }
                }
                Some(None) => {
                    ended = true;
                    break;
                }
                Some(Some(Err(e))) => return Err(fail(format!("upstream body broke off: {e}"))),
                None => break,
            }
        }
        let chunk = batch.freeze();
        let now = written + chunk.len() as u64;
        if now > len.unwrap_or(limit) {
            return Err(fail(format!(
                "upstream sent more than the {} bytes announced",
                len.unwrap_or(limit)
            )));
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| fail(format!("spool write failed: {e}")))?;
        // Readers open the spool by path: bytes must reach the file before they are announced.
        file.flush()
            .await
            .map_err(|e| fail(format!("spool write failed: {e}")))?;
        if let Some(w) = writer.as_mut() {
            if let Err(e) = w.write_all(&chunk).await {
                tracing::warn!(key = %object.key, error = %e, "store write failed; streaming without caching");
                writer = None;
            }
        }
        hasher.update(&chunk);
        if let Some(h) = hot.as_mut() {
            h.extend_from_slice(&chunk);
        }
        written = now;
        tx.send_modify(|state| {
            if let FlightState::Streaming { written: w, .. } = state {
                *w = written;
            }
        });
    }
    if let Some(len) = len.filter(|&len| len != written) {
        return Err(fail(format!(
            "upstream body ended after {written} of {len} bytes"
        )));
    }
    let actual = hex::encode(hasher.finalize());
    if let Trust::Checksum {
        label,
        expected,
        refreshes,
    } = &object.trust
    {
        if *expected != actual {
            let mismatch = Mismatch {
                label: label.clone(),
                expected: expected.clone(),
                actual: actual.clone(),
            };
            tracing::error!(
                key = %object.key, module = %label, %expected, %actual,
                "upstream archive does not match the index checksum; refused, not stored"
            );
            store.quarantine.record(&object.key, mismatch, *refreshes);
            return Err(fail(format!(
                "{label}: the index says sha256 {expected}, the upstream sent {actual}"
            )));
        }
    }
    if keep && !tee {
        if let Err(e) = store.disk.commit_file(&object.key, &spool, written).await {
            tracing::warn!(key = %object.key, error = %e, "store commit failed; served without caching");
        }
    }
    if let Some(w) = writer {
        match w.commit().await {
            Ok(integrity) => {
                if let Some(h) = hot {
                    let hot = Hot {
                        bytes: h.freeze(),
                        sha256: integrity.to_hex().1,
                    };
                    store.memory.insert(object.key.clone(), hot).await;
                }
            }
            Err(e) => {
                tracing::warn!(key = %object.key, error = %e, "store commit failed; served without caching")
            }
        }
    }
    Ok(FlightState::Complete {
        spool,
        len: written,
    })
}

/// Ask each source in order; a 404 or an unreachable source moves on to the next.
async fn first_answer(
    store: &Store,
    object: &Object,
) -> Result<http::Response<Incoming>, FlightState> {
    let mut last = None;
    for (i, url) in object.urls.iter().enumerate() {
        let more = i + 1 < object.urls.len();
        match store.upstream.get(url).await {
            Ok(resp) if resp.status() == StatusCode::NOT_FOUND && more => {
                tracing::debug!(%url, "not found here; trying the next source");
            }
            Ok(resp) => return Ok(resp),
            Err(e) => {
                tracing::warn!(%url, error = %e, "source unreachable");
                last = Some(e.to_string());
            }
        }
    }
    Err(FlightState::Unreachable(
        last.unwrap_or_else(|| "no source answered".into()).into(),
    ))
}

fn broken(spool: Option<Arc<TempPath>>, reason: String) -> FlightState {
    FlightState::Broken {
        spool,
        reason: reason.into(),
    }
}

/// A body that follows the spool file as the fetch fills it, ending cleanly only
/// once the fetch is complete and every byte has been read.
pub async fn follow(
    spool: Arc<TempPath>,
    rx: watch::Receiver<FlightState>,
) -> std::io::Result<GatewayBody> {
    let file = tokio::fs::File::open(&*spool).await?;
    let reader = Follower {
        _spool: spool,
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
    _spool: Arc<TempPath>,
    file: tokio::fs::File,
    pos: u64,
    rx: watch::Receiver<FlightState>,
}

impl Follower {
    async fn next(&mut self) -> Result<Option<Bytes>, BoxError> {
        loop {
            let (available, done) = match &*self.rx.borrow_and_update() {
                // The last byte waits for the verdict: a body that fails verification
                // must end in an abort, never in a clean, complete-looking transfer.
                FlightState::Streaming { written, len, .. } if Some(*written) == *len => {
                    (written.saturating_sub(1), false)
                }
                FlightState::Streaming { written, .. } => (*written, false),
                FlightState::Complete { len, .. } => (*len, true),
                FlightState::Broken { reason, .. } => {
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
