//! The one place that decides what a request is ([`Route`]) and which handler
//! answers it, once, whatever door the request came in by ([`Door`]) and whatever
//! the mode: the doors hand over one origin-form request, the router classifies it
//! and calls the archive store, the index, the mutable cache, publishing or the
//! passthrough.
//!
//! Sources the gateway hosts (`local = true`) have URLs that name no host: they are
//! left out of every list of URLs to fetch from, and their archives are served
//! from their files ([`Object::local_archive`]).

use http::{header, Method, Request, Response, StatusCode};

use crate::app::Services;
use crate::archive::{ArchiveKey, AssetPath, PathError};
use crate::body::{self, GatewayBody};
use crate::client::{bearer_matches, Client};
use crate::config::{join, Source};
use crate::index::mirror::Freshness;
use crate::index::{Expectation, Offline};
use crate::ops::jobs::JobId;
use crate::ops::metrics::{RouteName, Scraped};
use crate::ops::status::{render, JobStatus, SourceStatus, Status};
use crate::passthrough;
use crate::store::{Object, Trust};

/// An archive refused for a copy that failed verification this long ago triggers
/// a fresh look at the index and the upstream when asked for again.
const RECHECK_BAD_AFTER: std::time::Duration = std::time::Duration::from_secs(3);

/// Dependencies prefetched for one archive request, at most.
const PREFETCH_LIMIT: usize = 256;

/// What a request is, decided from its method, path and headers alone.
#[derive(Debug, PartialEq)]
pub enum Route {
    /// `GET /-/health`: the gateway's own liveness answer.
    Health,
    /// `POST /-/index/refresh`: refresh every index mirror now.
    IndexRefresh,
    /// `GET /-/metrics`: Prometheus metrics (admin).
    Metrics,
    /// `GET /-/jobs/<id>`: one CI job's counters as JSON (admin).
    JobReport(String),
    /// `GET /-/` or `/-/status`: the HTML status page (admin).
    Status,
    /// `POST /-/publish[?source=NAME]`: publish the zip in the body to a local source.
    Publish { source: Option<String> },
    /// `GET|HEAD /user/<enc>.zip`: an immutable archive, cached.
    Archive(ArchiveKey),
    /// `GET|HEAD /assets/...`: a prebuilt wasm asset or its `.sha256`, cached.
    Asset(AssetPath),
    /// `/git/index/<rest>`: git smart HTTP for the index; `rest` keeps the query.
    Index(String),
    /// `/symbols.zip`: mutable, merged over the sources ([`crate::symbols`]); cached by RFC 9111 unless the request carries
    /// credentials or is not a GET/HEAD, then passed through.
    Symbols,
    /// Anything else (API, publishing, web pages, requests with credentials).
    Pass,
    /// Refused with a clear reason.
    Refuse(StatusCode, String),
}

/// Classify a request. `path_and_query` is the raw (still percent-encoded) target.
pub fn classify(method: &Method, path_and_query: &str, has_credentials: bool) -> Route {
    // `MOONCAKES_REGISTRY=http://gw/` makes moon ask for `//git/index/...`; a
    // target with one leading slash (every other one) is used as it is.
    let trimmed = path_and_query.trim_start_matches('/');
    let target: std::borrow::Cow<'_, str> = if path_and_query.len() == trimmed.len() + 1 {
        path_and_query.into()
    } else {
        format!("/{trimmed}").into()
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target.as_ref(), None),
    };
    let read = matches!(*method, Method::GET | Method::HEAD);
    if let Some(rest) = path.strip_prefix("/git/index/") {
        if rest.contains("git-receive-pack")
            || query.is_some_and(|q| q.contains("git-receive-pack"))
        {
            return Route::Refuse(
                StatusCode::FORBIDDEN,
                "pushing to the index is not allowed through the gateway".into(),
            );
        }
        let rest = match query {
            Some(q) => format!("{rest}?{q}"),
            None => rest.to_string(),
        };
        return Route::Index(rest);
    }
    if path == "/-/health" && read {
        return Route::Health;
    }
    if path == "/-/index/refresh" && *method == Method::POST {
        return Route::IndexRefresh;
    }
    if path == "/-/metrics" && read {
        return Route::Metrics;
    }
    if (path == "/-/" || path == "/-/status") && read {
        return Route::Status;
    }
    if let Some(id) = path.strip_prefix("/-/jobs/").filter(|_| read) {
        return Route::JobReport(id.to_string());
    }
    if path == "/-/publish" && *method == Method::POST {
        let source = query.and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "source")
                .map(|(_, v)| v.into_owned())
        });
        return Route::Publish { source };
    }
    // Credentials mean a personal answer: never served from or stored in the cache.
    if has_credentials || !read {
        return if path == "/symbols.zip" {
            Route::Symbols
        } else {
            Route::Pass
        };
    }
    if let Some(rest) = path.strip_prefix("/user/") {
        return match ArchiveKey::parse(rest) {
            Ok(key) => Route::Archive(key),
            Err(e) => refuse_path("archive", e),
        };
    }
    if let Some(rest) = path.strip_prefix("/assets/") {
        return match AssetPath::parse(rest) {
            Ok(asset) => Route::Asset(asset),
            Err(e) => refuse_path("asset", e),
        };
    }
    if path == "/symbols.zip" {
        return Route::Symbols;
    }
    Route::Pass
}

fn refuse_path(what: &str, e: PathError) -> Route {
    Route::Refuse(
        StatusCode::BAD_REQUEST,
        format!("not a valid {what} path: {e}"),
    )
}

/// Which way a request came in, and so which source answers for it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Door {
    /// Origin-form to the registry endpoint: the first source.
    Endpoint,
    /// Decrypted from an intercepted host (or absolute-form to one): its source.
    Intercepted { source: usize },
}

impl Door {
    fn source(self) -> usize {
        match self {
            Door::Endpoint => 0,
            Door::Intercepted { source } => source,
        }
    }
}

/// Classify and answer an origin-form request: the one code path for every door
/// and every mode (offline is a property of the services, not a branch here).
/// `client` is who sent it (`None` for a request made in-process).
pub async fn route(
    app: &Services,
    req: Request<GatewayBody>,
    door: Door,
    client: Option<Client>,
) -> Response<GatewayBody> {
    match classify_request(app, req, door, client) {
        Routed::Answered(resp) => resp,
        // Boxed: hyper keeps each connection's request future allocated for the
        // connection's life, so what only other requests need is not part of it.
        Routed::Pending(pending) => Box::pin(pending.answer(app)).await,
    }
}

/// A request after [`classify_request`]: answered already, or still to answer.
pub enum Routed {
    Answered(Response<GatewayBody>),
    Pending(Box<Pending>),
}

/// A classified request the hot path could not answer, owning what
/// [`Pending::answer`] needs (so a door can run it in a future of its own).
pub struct Pending {
    route: Route,
    req: Request<GatewayBody>,
    door: Door,
    client: Option<Client>,
    at: Option<std::time::SystemTime>,
    /// The target without the `/job/` and `/at/` prefixes, from this byte of the
    /// request's path and query.
    from: usize,
    job: Option<JobId>,
}

/// The synchronous part of [`route`]: classify `req`, and answer it at once
/// when the memory tier can, or it is refused. No future is needed for those,
/// so a hot hit costs the doors no per-request future to build and move.
pub fn classify_request(
    app: &Services,
    req: Request<GatewayBody>,
    door: Door,
    client: Option<Client>,
) -> Routed {
    let full = req.uri().path_and_query().map_or("/", |p| p.as_str());
    // `/job/<id>/` and `/at/<time>/` prefixes, in either order: data on the request.
    let prefixes = job_prefix(full).and_then(|(job, rest)| {
        let (at, rest) = pinned(rest)?;
        match job {
            Some(job) => Ok((Some(job), at, rest)),
            None => job_prefix(rest).map(|(job, rest)| (job, at, rest)),
        }
    });
    let (job, at, target) = match prefixes {
        Ok(found) => found,
        Err(reason) => {
            let mut resp = body::text(StatusCode::BAD_REQUEST, reason);
            resp.extensions_mut().insert(RouteName::Refused);
            return Routed::Answered(resp);
        }
    };
    let from = full.len() - target.len();
    // A job named by the door (the proxy user name) when the path names none.
    let job = job.or_else(|| req.extensions().get::<JobId>().cloned());
    let credentials = req.headers().contains_key(header::AUTHORIZATION)
        || req.headers().contains_key(header::COOKIE);
    let route = classify(req.method(), target, credentials);
    if let Route::Archive(key) = &route {
        app.metrics.recent().module_asked(&key.user, &key.module);
    }
    match memory_hit(app, &route, req.method() == Method::HEAD) {
        Some(hit) => Routed::Answered(labelled(hit, route.name(), job)),
        None => Routed::Pending(Box::new(Pending {
            route,
            req,
            door,
            client,
            at,
            from,
            job,
        })),
    }
}

impl Pending {
    /// Answer the request: the handlers, the upstream, the disk.
    pub async fn answer(self, app: &Services) -> Response<GatewayBody> {
        let name = self.route.name();
        // The target borrowed from a copy of the URI (shared bytes, nothing
        // copied), since the request itself moves on to the handler.
        let uri = self.req.uri().clone();
        let full = uri.path_and_query().map_or("/", |p| p.as_str());
        let view = View {
            at: self.at,
            target: full.get(self.from..).unwrap_or("/"),
        };
        let source = self.door.source();
        let resp = dispatch(app, self.route, self.req, source, self.client, view).await;
        labelled(resp, name, self.job)
    }
}

/// For the access log, metrics and job counters, counted by the doors when the
/// response ends.
fn labelled(
    mut resp: Response<GatewayBody>,
    name: RouteName,
    job: Option<JobId>,
) -> Response<GatewayBody> {
    resp.extensions_mut().insert(name);
    if let Some(job) = job {
        resp.extensions_mut().insert(job);
    }
    resp
}

/// The hot path: an archive the memory tier holds, that the index vouches for
/// (its sha256), with nothing remembered against it. No object, no URLs, no
/// refresh: one index read and one memory-tier lookup. `None` for anything else.
fn memory_hit(app: &Services, route: &Route, head: bool) -> Option<Response<GatewayBody>> {
    let Route::Archive(key) = route else {
        return None;
    };
    app.store.memory_hit(&key.store_key(), head, |sha256| {
        app.index.vouches(key, sha256)
    })
}

/// Split `/job/<id>/rest` into the job and `/rest`; other targets are returned whole.
fn job_prefix(target: &str) -> Result<(Option<JobId>, &str), String> {
    let Some(rest) = target.trim_start_matches('/').strip_prefix("job/") else {
        return Ok((None, target));
    };
    let (raw, rest) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    JobId::parse(raw)
        .map(|job| (Some(job), rest))
        .map_err(|e| format!("`/job/<id>/`: {e}"))
}

impl Route {
    /// The route's label in metrics and the access log.
    pub fn name(&self) -> RouteName {
        match self {
            Route::Health
            | Route::IndexRefresh
            | Route::Metrics
            | Route::JobReport(_)
            | Route::Status
            | Route::Publish { .. } => RouteName::Admin,
            Route::Archive(_) => RouteName::Archive,
            Route::Asset(_) => RouteName::Asset,
            Route::Index(_) => RouteName::Index,
            Route::Symbols => RouteName::Symbols,
            Route::Pass => RouteName::Passthrough,
            Route::Refuse(..) => RouteName::Refused,
        }
    }
}

/// What a request sees of the registry: as it is now, or (`/at/<time>/...`, for
/// reproducible CI) the index as it stood at `at`; `target` is the path and query
/// with that prefix taken off.
struct View<'a> {
    at: Option<std::time::SystemTime>,
    target: &'a str,
}

/// Split `/at/<RFC 3339 time>/rest` into the time and `/rest`; other targets are
/// returned whole.
fn pinned(target: &str) -> Result<(Option<std::time::SystemTime>, &str), String> {
    let Some(rest) = target.trim_start_matches('/').strip_prefix("at/") else {
        return Ok((None, target));
    };
    let (raw, rest) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let decoded = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
    match humantime::parse_rfc3339_weak(&decoded) {
        Ok(at) => Ok((Some(at), rest)),
        Err(e) => Err(format!(
            "`/at/{raw}/`: not a time (use RFC 3339, e.g. /at/2026-11-01T00:00:00Z/): {e}"
        )),
    }
}

async fn dispatch(
    app: &Services,
    route: Route,
    req: Request<GatewayBody>,
    source: usize,
    client: Option<Client>,
    view: View<'_>,
) -> Response<GatewayBody> {
    let src = &app.sources[source];
    let head = req.method() == Method::HEAD;
    match route {
        Route::Health => health(app),
        Route::IndexRefresh => match admin_refusal(app, &req, client) {
            Some(refusal) => refusal,
            None => refresh_asked(app).await,
        },
        Route::Metrics => match admin_refusal(app, &req, client) {
            Some(refusal) => refusal,
            None => metrics(app),
        },
        Route::Status => match admin_refusal(app, &req, client) {
            Some(refusal) => refusal,
            None => status_page(app),
        },
        Route::JobReport(id) => match admin_refusal(app, &req, client) {
            Some(refusal) => refusal,
            None => job_report(app, &id),
        },
        Route::Publish { source } => crate::publish::handle(app, req, source.as_deref()).await,
        Route::Archive(key) => {
            let store_key = key.store_key();
            // Before the index is asked (which may refresh it): a recent 404 answers.
            if let Some(resp) = app
                .store
                .remembered_not_found(&store_key, app.index.lists(&key))
            {
                return resp;
            }
            let mut object = object_for(app, &key, app.index.expect(&key).await);
            if let Trust::Checksum { refreshes, .. } = object.trust {
                // Held back for a bad upstream copy for a while: look again (rate
                // limited), so a corrected upstream heals within seconds.
                let held = app.store.held_back_for(&object.key, refreshes);
                if held.is_some_and(|age| age >= RECHECK_BAD_AFTER) {
                    app.index.recheck().await;
                    object = object_for(app, &key, app.index.expect(&key).await);
                }
            }
            let prefetch = app.prefetch && !head && matches!(object.trust, Trust::Checksum { .. });
            let resp = app.store.respond(object, head).await;
            // A hit's dependencies were prefetched when it was fetched: only a miss
            // resolves them, so hot hits do no index work.
            if prefetch && resp.headers().get("x-cache").is_some_and(|v| v == "miss") {
                prefetch_closure(app, &key);
            }
            resp
        }
        Route::Asset(asset) => {
            let path = format!("/assets/{}", asset.raw);
            let urls = remote_sources(app)
                .map(|s| join(&s.registry, &path))
                .collect();
            let object = Object::asset(&asset, urls);
            app.store.respond(object, head).await
        }
        Route::Index(rest) => {
            app.index
                .handle(&app.upstream, src, req, &rest, client, view.at)
                .await
        }
        Route::Symbols => {
            let Some(src) = remote_for(app, source) else {
                // Only hosted sources: no symbols but one an imported bundle brought.
                return app.store.respond(Object::symbols(Vec::new()), head).await;
            };
            let private = req.headers().contains_key(header::AUTHORIZATION)
                || req.headers().contains_key(header::COOKIE);
            let read = matches!(*req.method(), Method::GET | Method::HEAD);
            if !read || private {
                return match app.symbols.passthrough_url(src) {
                    Some(url) => passthrough::forward(&app.upstream, req, &url).await,
                    None => body::text(StatusCode::NOT_FOUND, "no source serves symbols.zip"),
                };
            }
            match app.symbols.respond(src, req.headers(), head).await {
                Some(resp) => resp,
                // No upstream and no copy of its own: the one an imported bundle brought.
                None => app.store.respond(Object::symbols(Vec::new()), head).await,
            }
        }
        Route::Pass => {
            let Some(src) = remote_for(app, source) else {
                return body::text(
                    StatusCode::NOT_FOUND,
                    "this gateway hosts its sources itself and has no registry to pass this request to",
                );
            };
            let url = join(
                &src.registry,
                &format!("/{}", view.target.trim_start_matches('/')),
            );
            passthrough::forward(&app.upstream, req, &url).await
        }
        Route::Refuse(status, reason) => body::text(status, reason),
    }
}

/// Admin endpoints answer a bearer token when `admin.token_env` is set, else
/// loopback clients only; `Some` is the refusal.
fn admin_refusal(
    app: &Services,
    req: &Request<GatewayBody>,
    client: Option<Client>,
) -> Option<Response<GatewayBody>> {
    match &app.admin_token {
        Some(token) if bearer_matches(req.headers().get(header::AUTHORIZATION), token) => None,
        Some(_) => Some(body::text(
            StatusCode::UNAUTHORIZED,
            "this admin endpoint needs the admin bearer token",
        )),
        // No door attached a client (a request built in-process): nothing to check.
        // A request relayed by a proxy (this gateway's own forwarding included)
        // is not a local one, whatever address it arrives from.
        None => {
            let relayed = req.headers().contains_key(header::FORWARDED)
                || req.headers().contains_key("x-forwarded-for");
            match client {
                Some(Client(addr)) if relayed || !addr.ip().is_loopback() => Some(body::text(
                    StatusCode::FORBIDDEN,
                    "admin endpoints answer local clients only (set admin.token_env to allow others)",
                )),
                _ => None,
            }
        }
    }
}

/// `POST /-/index/refresh`: refresh every mirror now, sharing a refresh that
/// started within the last few seconds (callers cannot make the gateway hammer
/// its sources).
async fn refresh_asked(app: &Services) -> Response<GatewayBody> {
    match app.index.refresh_asked().await {
        Ok(results) => {
            let ok = results.iter().all(|(_, f)| *f == Freshness::Fresh);
            let body = results
                .iter()
                .map(
                    |(source, f)| serde_json::json!({"source": source, "result": format!("{f:?}")}),
                )
                .collect::<Vec<_>>();
            let status = if ok {
                StatusCode::OK
            } else {
                StatusCode::BAD_GATEWAY
            };
            body::json(
                status,
                &serde_json::json!({ "refreshed": ok, "sources": body }),
            )
        }
        Err(Offline) => body::offline(),
    }
}

/// `GET /-/metrics`: the Prometheus exposition (OpenMetrics text), with the
/// gauges read from the services now.
fn metrics(app: &Services) -> Response<GatewayBody> {
    let scraped = Scraped {
        flights_in_progress: i64::try_from(app.store.in_flight()).unwrap_or(i64::MAX),
        memory_bytes: i64::try_from(app.store.memory_bytes()).unwrap_or(i64::MAX),
        disk_bytes: i64::try_from(app.store.disk_bytes()).unwrap_or(i64::MAX),
        git_slots_in_use: i64::try_from(app.index.git_slots_in_use()).unwrap_or(i64::MAX),
        sources: app
            .sources
            .iter()
            .map(|s| {
                let age = app
                    .index
                    .mirrors()
                    .iter()
                    .find(|m| m.source == s.name)
                    .and_then(|m| m.age())
                    .map(|a| a.as_secs());
                (!app.breakers.is_down(&s.name), age)
            })
            .collect(),
    };
    let mut resp = Response::new(body::full(app.metrics.encode(scraped)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    resp
}

/// Jobs listed on the status page, at most.
const STATUS_JOBS: usize = 20;
/// Modules the status page lists.
const STATUS_MODULES: usize = 10;

/// `GET /-/`: the status page, from the same state `/-/health` and `/-/metrics` read.
fn status_page(app: &Services) -> Response<GatewayBody> {
    let (requests, archive_hits, archive_misses) = app.metrics.totals();
    let mirrors = app.index.mirrors();
    let health = app.breakers.report();
    let sources = app
        .sources
        .iter()
        .zip(health)
        .map(|(s, h)| {
            let mirror = mirrors.iter().find(|m| m.source == s.name);
            SourceStatus {
                name: s.name.clone(),
                registry: s.registry.as_str().to_string(),
                up: !app.breakers.is_down(&s.name),
                last_error: h["last_error"].as_str().map(str::to_string),
                index_commit: mirror.and_then(|m| m.snapshot().commit.clone()),
                index_age_seconds: mirror.and_then(|m| m.age()).map(|a| a.as_secs()),
            }
        })
        .collect();
    let status = Status {
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: app.metrics.uptime_seconds(),
        sources,
        memory_bytes: app.store.memory_bytes(),
        memory_budget: app.config.storage.memory.as_u64(),
        disk_bound: app.config.storage.max_size.map(|b| b.as_u64()),
        shared: app.store.shared().map(|shared| {
            let report = shared.report();
            let state = report["state"].as_str().unwrap_or("?").to_string();
            match report["last_error"].as_str() {
                Some(error) if state != "up" => {
                    format!("{} ({state}; last error: {error})", shared.url())
                }
                _ => format!("{} ({state})", shared.url()),
            }
        }),
        requests,
        archive_hits,
        archive_misses,
        last_hour: app.metrics.recent().last_hour(),
        top_modules: app.metrics.recent().top_modules(STATUS_MODULES),
        disk_bytes: app.store.disk_bytes(),
        flights: app.store.in_flight(),
        jobs: app
            .jobs
            .some(STATUS_JOBS)
            .into_iter()
            .map(|(id, archives, from_cache, cold)| JobStatus {
                id,
                archives,
                from_cache,
                cold,
            })
            .collect(),
    };
    let mut resp = Response::new(body::full(render(&status)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

/// `GET /-/jobs/<id>`: the job's counters, or 404 if it was never seen (or forgotten).
fn job_report(app: &Services, id: &str) -> Response<GatewayBody> {
    let job = match JobId::parse(id) {
        Ok(job) => job,
        Err(reason) => return body::text(StatusCode::BAD_REQUEST, reason),
    };
    match app.jobs.get(&job) {
        Some(counters) => body::json(StatusCode::OK, &counters.to_json(job.as_str())),
        None => body::text(
            StatusCode::NOT_FOUND,
            format!(
                "no request of job `{}` seen (or forgotten: jobs.max)",
                job.as_str()
            ),
        ),
    }
}

/// `GET /-/health`: the gateway's own view of its sources and mirrors.
fn health(app: &Services) -> Response<GatewayBody> {
    body::json(
        StatusCode::OK,
        &serde_json::json!({
            "status": "ok",
            "in_flight": app.store.in_flight(),
            "shared": app.store.shared().map(|shared| shared.report()),
            "merged_index": app.index.merged_tip().map(|tip| serde_json::json!({
                "commit": tip.commit,
                "sources": tip.parts.iter().map(|(source, commit)| serde_json::json!({
                    "source": source, "commit": commit,
                })).collect::<Vec<_>>(),
            })),
            "index": app.index.mirrors().iter().map(|m| serde_json::json!({
                "source": m.source,
                "commit": m.snapshot().commit.clone(),
                "age_seconds": m.age().map(|a| a.as_secs()),
                "last_error": m.last_error(),
            })).collect::<Vec<_>>(),
            "sources": app.sources.iter().zip(app.breakers.report()).map(|(s, mut health)| {
                health["name"] = s.name.clone().into();
                health["registry"] = s.registry.as_str().into();
                health
            }).collect::<Vec<_>>(),
        }),
    )
}

/// The sources the gateway fetches from: every one but those it hosts.
fn remote_sources(app: &Services) -> impl Iterator<Item = &Source> {
    app.sources.iter().filter(|s| !s.local)
}

/// The source a request for the door's source `position` is passed to: that one,
/// or, if it is hosted here, the first source that is not.
fn remote_for(app: &Services, position: usize) -> Option<&Source> {
    Some(&app.sources[position])
        .filter(|s| !s.local)
        .or_else(|| remote_sources(app).next())
}

/// Where to fetch an archive and what to check it against: the source whose
/// index lists it (its file, for a source hosted here), or every source fetched
/// from (unverified, not stored) if none does.
fn object_for(app: &Services, key: &ArchiveKey, expectation: Expectation) -> Object {
    if let Some(listed) = app.archive_object(key, &expectation) {
        return listed;
    }
    tracing::warn!(archive = %key, "not in any source's index; streaming it without storing");
    let path = key.upstream_path();
    // A claimed module is asked of its claimant only, never of a later source.
    let claimant = app.index.claimant(&key.name());
    let urls = app
        .sources
        .iter()
        .enumerate()
        .filter(|(i, s)| !s.local && claimant.is_none_or(|c| c == *i))
        .map(|(_, s)| join(&s.archive, &path))
        .collect();
    Object::unlisted_archive(key, urls)
}

/// Start fetching `key`'s dependencies in the background: `moon` asks for them
/// one at a time, so the next ones should already be here or on their way.
fn prefetch_closure(app: &Services, key: &ArchiveKey) {
    let deps = app.index.closure(key, PREFETCH_LIMIT);
    if deps.is_empty() {
        return;
    }
    tracing::debug!(archive = %key, deps = deps.len(), "prefetching dependencies");
    for (dep, expectation) in deps {
        let object = object_for(app, &dep, expectation);
        let store = app.store.clone();
        tokio::spawn(async move { store.prefetch(object).await });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archives_assets_index_and_the_rest() {
        let get = Method::GET;
        assert!(matches!(
            classify(&get, "/user/a%2Fb%2F1.0.0.zip", false),
            Route::Archive(_)
        ));
        assert!(matches!(
            classify(&Method::HEAD, "/user/a%2Fb%2F1.0.0.zip", false),
            Route::Archive(_)
        ));
        assert!(matches!(
            classify(&get, "/assets/a/b@1.0.0/b.wasm", false),
            Route::Asset(_)
        ));
        assert_eq!(
            classify(&get, "/git/index/info/refs?service=git-upload-pack", false),
            Route::Index("info/refs?service=git-upload-pack".into())
        );
        assert_eq!(
            classify(&Method::POST, "//git/index/git-upload-pack", false),
            Route::Index("git-upload-pack".into())
        );
        assert_eq!(classify(&get, "/symbols.zip", false), Route::Symbols);
        assert_eq!(classify(&get, "/api/v0/search?kw=x", false), Route::Pass);
        assert_eq!(classify(&get, "/-/health", false), Route::Health);
        // Publishing carries its token: classified before credentials bypass the rest.
        assert_eq!(
            classify(&Method::POST, "/-/publish?source=local", true),
            Route::Publish {
                source: Some("local".into())
            }
        );
        assert_eq!(
            classify(&Method::POST, "/-/publish", true),
            Route::Publish { source: None }
        );
        assert_eq!(classify(&get, "/-/publish", false), Route::Pass);
    }

    #[test]
    fn credentials_and_writes_bypass_the_cache() {
        assert_eq!(
            classify(&Method::GET, "/user/a%2Fb%2F1.0.0.zip", true),
            Route::Pass
        );
        assert_eq!(
            classify(&Method::PUT, "/user/a%2Fb%2F1.0.0.zip", false),
            Route::Pass
        );
    }

    #[test]
    fn pushes_and_bad_paths_are_refused() {
        assert!(matches!(
            classify(&Method::POST, "/git/index/git-receive-pack", false),
            Route::Refuse(StatusCode::FORBIDDEN, _)
        ));
        assert!(matches!(
            classify(
                &Method::GET,
                "/git/index/info/refs?service=git-receive-pack",
                false
            ),
            Route::Refuse(StatusCode::FORBIDDEN, _)
        ));
        assert!(matches!(
            classify(&Method::GET, "/user/..%2F..%2Fx%2F1.0.0.zip", false),
            Route::Refuse(StatusCode::BAD_REQUEST, _)
        ));
    }
}

/// Properties of the classifier over hostile input.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_request_is_classified_without_panicking(
            method in prop::sample::select(vec![Method::GET, Method::HEAD, Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS]),
            prefix in prop::sample::select(vec!["/", "//", "/user/", "/assets/", "/git/index/", "/-/", "/symbols.zip"]),
            rest in "(\\PC|%[0-9a-fA-F]{2}|/|\\.|\\?){0,100}",
            credentials in any::<bool>(),
        ) {
            let target = format!("{prefix}{rest}");
            match classify(&method, &target, credentials) {
                Route::Refuse(status, reason) => {
                    prop_assert!(status.is_client_error(), "{target}: {status}");
                    prop_assert!(!reason.is_empty());
                }
                Route::Archive(key) => prop_assert!(!key.store_key().contains("/../")),
                Route::Index(rest) => prop_assert!(!rest.contains("git-receive-pack")),
                _ => {}
            }
        }
    }
}

/// The dispatch itself, driven with real services on a temporary data dir: offline
/// (an upstream that refuses everything) and online with a source nobody listens on.
#[cfg(test)]
mod dispatch_tests {
    use super::*;
    use crate::app::Mode;
    use crate::config::Config;
    use http_body_util::BodyExt;

    fn services(mode: Mode) -> (Services, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            // A loopback port nothing listens on: nothing can leave the machine.
            upstream: Some("http://127.0.0.1:9".into()),
            ..Config::default()
        };
        (Services::open(&config, mode).unwrap(), dir)
    }

    async fn answer(app: &Services, method: Method, target: &str) -> (StatusCode, String) {
        let req = Request::builder()
            .method(method)
            .uri(target)
            .body(body::empty())
            .unwrap();
        let resp = route(app, req, Door::Endpoint, None).await;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn offline_every_route_answers_without_an_upstream() {
        let (app, _dir) = services(Mode::Offline);
        let (status, text) = answer(&app, Method::GET, "/-/health").await;
        assert_eq!(status, StatusCode::OK);
        assert!(text.contains("\"sources\""), "{text}");
        let (status, text) = answer(&app, Method::GET, "/user/a%2Fb%2F1.0.0.zip").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(text.contains("offline") && text.contains("index"), "{text}");
        let (status, text) = answer(&app, Method::GET, "/assets/a/b@1.0.0/b.wasm").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(text.contains("not in its store"), "{text}");
        let (status, _) = answer(&app, Method::GET, "/symbols.zip").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, text) = answer(
            &app,
            Method::GET,
            "/git/index/info/refs?service=git-upload-pack",
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(text.contains("no index mirror"), "{text}");
        for (method, target) in [
            (Method::POST, "/-/index/refresh"),
            (Method::GET, "/api/v0/search"),
            (Method::PUT, "/symbols.zip"),
        ] {
            let (status, text) = answer(&app, method, target).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{target}");
            assert!(text.contains("offline"), "{target}: {text}");
        }
    }

    #[tokio::test]
    async fn refusals_are_the_same_in_every_mode() {
        for mode in [Mode::Serve, Mode::Offline] {
            let (app, _dir) = services(mode);
            let (status, _) = answer(&app, Method::POST, "/git/index/git-receive-pack").await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{mode:?}");
            let (status, _) = answer(&app, Method::GET, "/user/..%2F..%2Fx%2F1.0.0.zip").await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{mode:?}");
        }
    }

    #[tokio::test]
    async fn admin_endpoints_answer_local_clients_only() {
        let (app, _dir) = services(Mode::Offline);
        for (addr, relayed, allowed) in [
            ("127.0.0.1:5000", false, true),
            ("10.0.0.7:5000", false, false),
            ("127.0.0.1:5000", true, false),
        ] {
            let mut req = Request::builder()
                .method(Method::POST)
                .uri("/-/index/refresh")
                .body(body::empty())
                .unwrap();
            if relayed {
                req.headers_mut()
                    .insert(header::FORWARDED, "for=10.0.0.7".parse().unwrap());
            }
            let client = Some(Client(addr.parse().unwrap()));
            let status = route(&app, req, Door::Endpoint, client).await.status();
            // Allowed, it reaches the offline index: 503; refused: 403.
            let expected = if allowed {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::FORBIDDEN
            };
            assert_eq!(status, expected, "{addr} relayed={relayed}");
        }
    }

    #[tokio::test]
    async fn online_a_dead_source_is_a_clear_bad_gateway() {
        let (app, _dir) = services(Mode::Serve);
        let (status, text) = answer(&app, Method::GET, "/api/v0/search").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert!(text.contains("127.0.0.1:9"), "{text}");
    }
}
