//! The access log and request metrics: one event per request, written when its
//! response ends (the last byte sent, the transfer aborted, or the client gone),
//! so it carries the bytes really sent and the whole duration.
//!
//! The doors wrap every response in [`track`]; that is the one place a request is
//! counted. The router tags the response with the [`RouteName`] it decided.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use super::jobs::{Ended, JobId, Jobs};
use super::metrics::{CacheResult, Metrics, RouteName, Tier};
use crate::body::{BoxError, GatewayBody};

/// What the doors know of a request when its response head is ready.
pub struct Access {
    /// `endpoint`, `proxy` or `intercepted`.
    pub door: &'static str,
    pub method: Method,
    /// The request target as sent (its bytes are shared with the request's).
    pub target: Uri,
    /// The host an intercepted or proxied request named.
    pub host: Option<String>,
    /// The position (in the config) of the source the door hands the request to;
    /// its name is looked up only when the event is written.
    pub source: Option<usize>,
    pub started: Instant,
}

/// Where ended requests are counted.
pub struct Recorders<'a> {
    pub metrics: &'a Arc<Metrics>,
    pub jobs: &'a Arc<Jobs>,
}

/// Wrap `resp` so the request is counted and logged once, when its body ends or
/// is dropped.
pub fn track(
    to: Recorders<'_>,
    access: Access,
    resp: Response<GatewayBody>,
) -> Response<GatewayBody> {
    let route = resp
        .extensions()
        .get::<RouteName>()
        .copied()
        .unwrap_or(RouteName::Proxy);
    let job = resp
        .extensions()
        .get::<JobId>()
        .map(|job| (job.clone(), to.jobs.clone()));
    let tier = resp.extensions().get::<Tier>().copied();
    let status = resp.status();
    let cache = CacheResult::of(status, resp.headers().get("x-cache").map(|v| v.as_bytes()));
    let declared = resp
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let record = Record {
        metrics: to.metrics.clone(),
        job,
        access,
        route,
        status,
        cache,
        tier: tier.or_else(|| Tier::of(cache)),
        bytes: 0,
        declared,
        complete: false,
    };
    resp.map(|inner| {
        Tracked {
            inner,
            record: Some(record),
        }
        .boxed_unsync()
    })
}

struct Record {
    metrics: Arc<Metrics>,
    job: Option<(JobId, Arc<Jobs>)>,
    access: Access,
    route: RouteName,
    status: StatusCode,
    cache: CacheResult,
    /// Where the body comes from, if it is a cached class's.
    tier: Option<Tier>,
    bytes: u64,
    /// `Content-Length`, when the response has one: hyper stops polling once it is sent.
    declared: Option<u64>,
    /// The body reached its end (not cut short by an error or a client leaving).
    complete: bool,
}

impl Record {
    fn finish(self) {
        let elapsed = self.access.started.elapsed();
        self.metrics
            .request(self.route, self.cache, elapsed.as_secs_f64());
        if let Some(tier) = self.tier {
            self.metrics.served(tier, self.bytes);
        }
        if let Some((job, jobs)) = &self.job {
            let ended = Ended {
                route: self.route,
                cache: self.cache,
                bytes: self.bytes,
                complete: self.complete,
                elapsed,
            };
            jobs.record(job, &ended);
        }
        let a = &self.access;
        tracing::info!(
            target: "moonbit_registry::access",
            door = a.door,
            method = %a.method,
            path = %a.target,
            host = a.host.as_deref().unwrap_or("-"),
            route = self.route.as_str(),
            status = self.status.as_u16(),
            cache = self.cache.as_str(),
            tier = self.tier.map_or("-", Tier::as_str),
            bytes = self.bytes,
            complete = self.complete,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            source = a.source.map_or("-", |i| self.metrics.source_name(i)),
            job = self.job.as_ref().map(|(job, _)| job.as_str()),
            "request"
        );
    }
}

struct Tracked {
    inner: GatewayBody,
    record: Option<Record>,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Some(record) = this.record.as_mut() {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        record.bytes += data.len() as u64;
                    }
                }
                Poll::Ready(None) => record.complete = true,
                _ => {}
            }
        }
        // The end of the body is the end of the request: log it now rather than
        // when the connection gets round to dropping it.
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            if let Some(record) = this.record.take() {
                record.finish();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            // An empty body hyper never polls is complete, and so is one whose declared
            // length was sent (hyper stops there); any other is cut short.
            if self.inner.is_end_stream() || record.declared == Some(record.bytes) {
                record_complete(record);
            } else {
                record.finish();
            }
        }
    }
}

fn record_complete(mut record: Record) {
    record.complete = true;
    record.finish();
}
