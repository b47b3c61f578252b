//! The access log and request metrics: one event per request, written when its
//! response ends (the last byte sent, the transfer aborted, or the client gone),
//! so it carries the bytes really sent and the whole duration.
//!
//! The doors wrap every response in [`track`]; that is the one place a request is
//! counted. The router tags the response with the [`RouteName`] it decided.

use std::sync::Arc;
use std::time::Instant;

use http::{Method, Response, StatusCode, Uri};

use super::jobs::{Ended, JobId, Jobs};
use super::log;
use super::metrics::{CacheResult, Metrics, RouteName, Tier};
use crate::body::{self, End, GatewayBody};

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
        declared,
    };
    resp.map(|inner| {
        body::counted(inner, move |bytes, end| {
            let complete = match end {
                End::Complete => true,
                End::Failed => false,
                // An empty body hyper never polls is complete, and so is one whose
                // declared length was sent (hyper stops there); any other is cut short.
                End::Dropped { at_end } => at_end || record.declared == Some(bytes),
            };
            record.finish(bytes, complete);
        })
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
    /// `Content-Length`, when the response has one: hyper stops polling once it is sent.
    declared: Option<u64>,
}

impl Record {
    /// The response ended having sent `bytes`; `complete` unless cut short by an
    /// error or a client leaving.
    fn finish(self, bytes: u64, complete: bool) {
        let elapsed = self.access.started.elapsed();
        self.metrics
            .request(self.route, self.cache, elapsed.as_secs_f64());
        if let Some(tier) = self.tier {
            self.metrics.served(tier, bytes);
        }
        if let Some((job, jobs)) = &self.job {
            let ended = Ended {
                route: self.route,
                cache: self.cache,
                bytes,
                complete,
                elapsed,
            };
            jobs.record(job, &ended);
        }
        if !tracing::enabled!(target: "moonbit_registry::access", tracing::Level::INFO) {
            return;
        }
        // `None` only without `log::init` (library use), where nothing is logged.
        let Some(mut line) = log::Line::info("moonbit_registry::access", "request") else {
            return;
        };
        let a = &self.access;
        let path = match a.target.authority() {
            // Origin form, as nearly every request: no formatting.
            None => a.target.path_and_query().map_or("/", |p| p.as_str()),
            Some(_) => &a.target.to_string(),
        };
        line.str("door", a.door)
            .text("method", a.method.as_str())
            .text("path", path)
            .str("host", a.host.as_deref().unwrap_or("-"))
            .str("route", self.route.as_str())
            .u64("status", self.status.as_u16().into())
            .str("cache", self.cache.as_str())
            .str("tier", self.tier.map_or("-", Tier::as_str))
            .u64("bytes", bytes)
            .bool("complete", complete)
            .millis("duration_ms", elapsed)
            .str(
                "source",
                a.source.map_or("-", |i| self.metrics.source_name(i)),
            );
        if let Some((job, _)) = &self.job {
            line.str("job", job.as_str());
        }
        line.write();
    }
}
