//! Per-source circuit breaker: after `breaker.failures` consecutive failures
//! (connection error, timeout, 5xx) a source is marked down for a back-off that
//! doubles on every failed probe (capped). While it is down, upstream calls for it
//! are refused at once, so requests the store can answer never wait on upstream
//! timeouts; one probe at a time tests recovery once the back-off has passed.
//!
//! Archive fetches, index refreshes and mutable resources all go through
//! [`Breakers::admit_url`] / [`Breakers::admit_source`] and report back with a [`Ticket`].
//!
//! Recovery does not wait for traffic: [`Breakers::probe_in_background`] takes the
//! probe slot of each open breaker as soon as its back-off has passed and runs the
//! probe it is given (the app's: a cheap request to the source), reporting through
//! the same ticket. So `/-/health` turns `up` when the source comes back, and the
//! first client after an outage is not the one that finds out.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use crate::config::{BreakerSettings, Credential, Source};
use crate::ops::metrics::{Metrics, SourceOutcomes};

/// Every source's breaker, and which URLs belong to which source.
#[derive(Debug, Default)]
pub struct Breakers {
    breakers: Vec<Arc<Breaker>>,
    /// URL prefixes (registry, index, archive base, symbols) and their breaker.
    prefixes: Vec<(String, usize)>,
}

/// One source's breaker.
#[derive(Debug)]
pub struct Breaker {
    pub source: String,
    settings: BreakerSettings,
    state: Mutex<State>,
    /// What the gateway's own requests to this source carry (`auth` of its table).
    credential: Option<Credential>,
    /// `upstream_requests_total` of this source.
    outcomes: SourceOutcomes,
}

#[derive(Debug)]
struct State {
    /// Failures since the last success.
    failures: u32,
    /// Set while the source is down.
    outage: Option<Outage>,
    /// Wall-clock time of the last change between up and down (or of the start).
    since: SystemTime,
    last_error: Option<(SystemTime, String)>,
    /// A probe ticket is out; nobody else may try until it reports.
    probing: bool,
    /// A caller gave up waiting on this source (it accepts but does not answer in
    /// time); until anything succeeds, callers with something to serve do not wait.
    slow: bool,
    /// The source refused the gateway's requests (401/403), until it accepts one.
    auth_error: Option<(SystemTime, String)>,
}

#[derive(Debug)]
struct Outage {
    /// When the next probe may run.
    retry_at: Instant,
    /// The back-off that set `retry_at`; doubled on a failed probe.
    backoff: Duration,
}

/// Why an upstream call was not even attempted.
#[derive(Debug, Clone, thiserror::Error)]
#[error("source `{name}` is down (for {down_for}s, last error: {last_error}); next probe in {retry_in}s")]
pub struct Refusal {
    /// The source's name.
    pub name: String,
    pub down_for: u64,
    pub retry_in: u64,
    pub last_error: String,
}

/// Permission to call the upstream; report how it went with [`Ticket::success`]
/// or [`Ticket::failure`]. A probe ticket dropped without a report frees the
/// probe slot, so an abandoned probe never blocks recovery.
#[derive(Debug)]
pub struct Ticket {
    breaker: Option<Arc<Breaker>>,
    probe: bool,
}

impl Breakers {
    pub fn new(sources: &[Source], settings: &BreakerSettings) -> Breakers {
        Breakers::counted(sources, settings, None)
    }

    /// Like [`Breakers::new`], counting every judged exchange in `metrics`.
    pub fn counted(
        sources: &[Source],
        settings: &BreakerSettings,
        metrics: Option<&Metrics>,
    ) -> Breakers {
        let mut breakers = Vec::new();
        let mut prefixes = Vec::new();
        for (i, s) in sources.iter().enumerate() {
            breakers.push(Arc::new(Breaker::new(
                &s.name,
                settings,
                s.credential.clone(),
                metrics.and_then(|m| m.upstream(i)).unwrap_or_default(),
            )));
            for url in [&s.registry, &s.index, &s.archive, &s.symbols] {
                prefixes.push((url.as_str().trim_end_matches('/').to_string(), i));
            }
        }
        // Longest prefix first: `https://h/user` must win over `https://h`.
        prefixes.sort_by_key(|(p, i)| (std::cmp::Reverse(p.len()), *i));
        Breakers { breakers, prefixes }
    }

    /// One breaker named `name` for something that is not a source (the shared
    /// tier): no URLs, no credential, the same states, back-off and probes.
    pub fn single(name: &str, settings: &BreakerSettings) -> Breakers {
        Breakers {
            breakers: vec![Arc::new(Breaker::new(
                name,
                settings,
                None,
                SourceOutcomes::default(),
            ))],
            prefixes: Vec::new(),
        }
    }

    /// The breaker of the source `url` belongs to, if any.
    fn for_url(&self, url: &str) -> Option<&Arc<Breaker>> {
        self.prefixes
            .iter()
            .find(|(prefix, _)| {
                url.strip_prefix(prefix.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', '?']))
            })
            .map(|(_, i)| &self.breakers[*i])
    }

    /// The source `url` belongs to and the credential the gateway sends it, if
    /// it has one. URLs of no known source get none.
    pub fn credential_for_url(&self, url: &str) -> Option<&Credential> {
        self.for_url(url)?.credential.as_ref()
    }

    /// `url`'s source answered a gateway request with `status`: a 401/403 is
    /// remembered (and logged when it is news), anything else clears it.
    pub fn auth_outcome_url(&self, url: &str, status: http::StatusCode) {
        if let Some(b) = self.for_url(url) {
            if matches!(status.as_u16(), 401 | 403) {
                b.auth_refused(&format!("{status} for {url}"));
            } else {
                b.auth_accepted();
            }
        }
    }

    /// The source named `source` refused the gateway (`detail`: what it said).
    pub fn auth_refused(&self, source: &str, detail: &str) {
        if let Some(b) = self.named(source) {
            b.auth_refused(detail);
        }
    }

    /// The source named `source` accepted a gateway request.
    pub fn auth_accepted(&self, source: &str) {
        if let Some(b) = self.named(source) {
            b.auth_accepted();
        }
    }

    fn named(&self, source: &str) -> Option<&Arc<Breaker>> {
        self.breakers.iter().find(|b| b.source == source)
    }

    /// Whether `url` belongs to a configured source.
    pub fn knows_url(&self, url: &str) -> bool {
        self.for_url(url).is_some()
    }

    /// A body of `bytes` fetched from `url`'s source in `seconds`, from the
    /// request to its last byte (`upstream_bytes_total`, `upstream_fetch_seconds`).
    pub fn record_transfer(&self, url: &str, bytes: u64, seconds: f64) {
        if let Some(b) = self.for_url(url) {
            b.outcomes.bytes.inc_by(bytes);
            b.outcomes.fetch_seconds.observe(seconds);
        }
    }

    /// May a request to `url` go out now? URLs of no known source always may.
    pub fn admit_url(&self, url: &str) -> Result<Ticket, Refusal> {
        admit(self.for_url(url))
    }

    pub fn admit_source(&self, source: &str) -> Result<Ticket, Refusal> {
        admit(self.named(source))
    }

    /// Whether `url`'s source is down right now (no probe slot is taken).
    pub fn is_down_url(&self, url: &str) -> bool {
        self.for_url(url).is_some_and(|b| b.lock().outage.is_some())
    }

    /// Note that a caller gave up waiting on the source of `url` (or named `source`).
    pub fn mark_slow_url(&self, url: &str) {
        if let Some(b) = self.for_url(url) {
            b.mark_slow();
        }
    }

    pub fn mark_slow(&self, source: &str) {
        if let Some(b) = self.named(source) {
            b.mark_slow();
        }
    }

    /// Whether the source of `url` is down or known slow: nothing should wait on it.
    pub fn is_down_or_slow_url(&self, url: &str) -> bool {
        self.for_url(url).is_some_and(|b| b.down_or_slow())
    }

    pub fn is_down_or_slow(&self, source: &str) -> bool {
        self.named(source).is_some_and(|b| b.down_or_slow())
    }

    pub fn is_down(&self, source: &str) -> bool {
        self.named(source)
            .is_some_and(|b| b.lock().outage.is_some())
    }

    /// Each source's state for `GET /-/health`, in source order.
    pub fn report(&self) -> Vec<serde_json::Value> {
        self.breakers.iter().map(|b| b.report()).collect()
    }

    /// The probe ticket of `breaker` if it is open, its back-off has passed and no
    /// probe is out; never an ordinary ticket (a source that is up needs no probe).
    fn admit_probe(breaker: &Arc<Breaker>) -> Option<Ticket> {
        let due = {
            let state = breaker.lock();
            !state.probing
                && state
                    .outage
                    .as_ref()
                    .is_some_and(|o| Instant::now() >= o.retry_at)
        };
        if !due {
            return None;
        }
        // `admit` looks again under its lock: a request may have taken the slot, or
        // the source come back, meanwhile.
        admit(Some(breaker)).ok().filter(Ticket::is_probe)
    }

    /// How long until the next probe is due among open breakers with no probe out
    /// (zero: now); `None` when there is no such breaker.
    fn next_probe_in(&self) -> Option<Duration> {
        let now = Instant::now();
        self.breakers
            .iter()
            .filter_map(|b| {
                let state = b.lock();
                let outage = state.outage.as_ref().filter(|_| !state.probing)?;
                Some(outage.retry_at.saturating_duration_since(now))
            })
            .min()
    }

    /// Probe every open breaker's source in the background once its back-off has
    /// passed, one probe per source at a time, with `probe(source name)`: `Ok` closes
    /// the breaker, `Err` lengthens the back-off, exactly as a request's probe would.
    /// `probe` must bound itself in time. Runs until the breakers are dropped.
    pub fn probe_in_background<F, Fut>(self: &Arc<Self>, probe: F)
    where
        F: Fn(&str) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        /// Longest sleep between two looks: a breaker that opens meanwhile is seen
        /// this late at most (its back-off is usually longer anyway).
        const IDLE: Duration = Duration::from_secs(1);
        /// Shortest sleep, so a loop never spins.
        const MIN: Duration = Duration::from_millis(20);
        let breakers: Weak<Breakers> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(this) = breakers.upgrade() else {
                    return;
                };
                for breaker in &this.breakers {
                    let Some(ticket) = Breakers::admit_probe(breaker) else {
                        continue;
                    };
                    let probing = probe(&breaker.source);
                    let source = breaker.source.clone();
                    tokio::spawn(async move {
                        match probing.await {
                            Ok(()) => ticket.success(),
                            Err(error) => {
                                tracing::debug!(%source, %error, "background probe failed");
                                ticket.failure(&error)
                            }
                        }
                    });
                }
                let wait = this.next_probe_in().unwrap_or(IDLE).clamp(MIN, IDLE);
                drop(this);
                tokio::time::sleep(wait).await;
            }
        });
    }
}

fn admit(breaker: Option<&Arc<Breaker>>) -> Result<Ticket, Refusal> {
    let Some(breaker) = breaker else {
        return Ok(Ticket {
            breaker: None,
            probe: false,
        });
    };
    let mut state = breaker.lock();
    let Some(outage) = &state.outage else {
        return Ok(Ticket {
            breaker: Some(breaker.clone()),
            probe: false,
        });
    };
    let now = Instant::now();
    if !state.probing && now >= outage.retry_at {
        state.probing = true;
        tracing::info!(source = %breaker.source, "source is down; probing whether it is back");
        return Ok(Ticket {
            breaker: Some(breaker.clone()),
            probe: true,
        });
    }
    Err(Refusal {
        name: breaker.source.clone(),
        down_for: elapsed_secs(state.since),
        retry_in: outage.retry_at.saturating_duration_since(now).as_secs(),
        last_error: state
            .last_error
            .as_ref()
            .map(|(_, e)| e.clone())
            .unwrap_or_default(),
    })
}

impl Breaker {
    fn new(
        name: &str,
        settings: &BreakerSettings,
        credential: Option<Credential>,
        outcomes: SourceOutcomes,
    ) -> Breaker {
        Breaker {
            source: name.to_string(),
            settings: settings.clone(),
            state: Mutex::new(State {
                failures: 0,
                outage: None,
                since: SystemTime::now(),
                last_error: None,
                probing: false,
                slow: false,
                auth_error: None,
            }),
            credential,
            outcomes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn down_or_slow(&self) -> bool {
        let state = self.lock();
        state.outage.is_some() || state.slow
    }

    fn mark_slow(&self) {
        let mut state = self.lock();
        if !state.slow {
            state.slow = true;
            tracing::warn!(source = %self.source, "source is slow: callers with something to serve stop waiting on it until it answers");
        }
    }

    /// The message an operator sees: which source, which variable, what it said.
    fn auth_refused(&self, detail: &str) {
        let error = match &self.credential {
            Some(c) => format!(
                "source `{}` refused the gateway's credentials (${}): {detail}",
                self.source, c.var
            ),
            None => format!(
                "source `{}` asks for credentials and none are configured (set `auth` in its [[sources]] table): {detail}",
                self.source
            ),
        };
        let mut state = self.lock();
        let news = state.auth_error.as_ref().is_none_or(|(_, e)| *e != error);
        state.auth_error = Some((SystemTime::now(), error.clone()));
        drop(state);
        // Once per change: every request would otherwise repeat it.
        if news {
            tracing::error!(source = %self.source, "{error}");
        } else {
            tracing::debug!(source = %self.source, "{error}");
        }
    }

    fn auth_accepted(&self) {
        let mut state = self.lock();
        if state.auth_error.take().is_some() {
            tracing::info!(source = %self.source, "source accepts the gateway's requests again");
        }
    }

    fn success(&self, probe: bool) {
        self.outcomes.ok.inc();
        let mut state = self.lock();
        state.failures = 0;
        state.slow = false;
        if probe {
            state.probing = false;
        }
        if state.outage.take().is_some() {
            let down_for = elapsed_secs(state.since);
            state.since = SystemTime::now();
            tracing::info!(source = %self.source, down_for_seconds = down_for, "source is up again");
        }
    }

    fn failure(&self, probe: bool, error: &str) {
        self.outcomes.error.inc();
        let mut state = self.lock();
        state.failures = state.failures.saturating_add(1);
        state.last_error = Some((SystemTime::now(), error.to_string()));
        if probe {
            state.probing = false;
        }
        let max = self.settings.backoff_max.max(self.settings.backoff);
        let failures = state.failures;
        match state.outage.as_mut() {
            // Only a failed probe lengthens the back-off: calls admitted before the
            // source went down may still be failing in.
            Some(outage) if probe => {
                outage.backoff = (outage.backoff * 2).min(max);
                outage.retry_at = Instant::now() + outage.backoff;
                tracing::warn!(
                    source = %self.source, %error, next_probe_in_seconds = outage.backoff.as_secs(),
                    "probe failed; source stays down"
                );
            }
            Some(_) => {}
            None if failures >= self.settings.failures.max(1) => {
                let backoff = self.settings.backoff.min(max);
                state.outage = Some(Outage {
                    retry_at: Instant::now() + backoff,
                    backoff,
                });
                state.since = SystemTime::now();
                tracing::warn!(
                    source = %self.source, failures, %error, next_probe_in_seconds = backoff.as_secs(),
                    "source marked down; answering from the store without waiting for it"
                );
            }
            None => {}
        }
    }

    fn report(&self) -> serde_json::Value {
        let state = self.lock();
        let now = Instant::now();
        serde_json::json!({
            "state": if state.outage.is_some() { "down" } else { "up" },
            "slow": state.slow,
            "since": humantime::format_rfc3339_seconds(state.since).to_string(),
            "for_seconds": elapsed_secs(state.since),
            "consecutive_failures": state.failures,
            "last_error": state.last_error.as_ref().map(|(_, e)| e.clone()),
            "last_error_at": state.last_error.as_ref()
                .map(|(at, _)| humantime::format_rfc3339_seconds(*at).to_string()),
            "next_probe_in_seconds": state.outage.as_ref()
                .map(|o| o.retry_at.saturating_duration_since(now).as_secs()),
            "auth_error": state.auth_error.as_ref().map(|(_, e)| e.clone()),
            "auth_error_at": state.auth_error.as_ref()
                .map(|(at, _)| humantime::format_rfc3339_seconds(*at).to_string()),
        })
    }
}

impl Ticket {
    /// The upstream answered (any status but 5xx).
    pub fn success(mut self) {
        if let Some(b) = self.breaker.take() {
            b.success(self.probe);
        }
    }

    /// The upstream could not be reached, timed out or answered 5xx.
    pub fn failure(mut self, error: &str) {
        if let Some(b) = self.breaker.take() {
            b.failure(self.probe, error);
        }
    }

    /// Whether this call is the one probe of a source that is down.
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(b) = self.breaker.take() {
            if self.probe {
                b.lock().probing = false;
            }
        }
    }
}

fn elapsed_secs(since: SystemTime) -> u64 {
    SystemTime::now()
        .duration_since(since)
        .unwrap_or_default()
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn health(failures: u32, backoff_ms: u64) -> Breakers {
        let config = Config {
            upstream: Some("https://registry.test".into()),
            ..Config::default()
        };
        let settings = BreakerSettings {
            failures,
            backoff: Duration::from_millis(backoff_ms),
            backoff_max: Duration::from_millis(backoff_ms * 4),
        };
        Breakers::new(&config.sources().unwrap(), &settings)
    }

    #[test]
    fn a_credential_goes_to_its_own_source_only_and_refusals_are_remembered() {
        use crate::config::{Credential, SourceConfig};
        let table =
            |name: &str, registry: &str| SourceConfig::remote(Some(name.into()), registry.into());
        let config = Config {
            // Same host: the longer prefix decides.
            sources: vec![
                table("internal", "https://h.test/internal"),
                table("public", "https://h.test"),
            ],
            ..Config::default()
        };
        let mut sources = config.sources().unwrap();
        let mut header = http::HeaderValue::from_static("Bearer t");
        header.set_sensitive(true);
        sources[0].credential = Some(Credential {
            header,
            var: "T".into(),
        });
        let b = Breakers::new(&sources, &BreakerSettings::default());
        assert!(b
            .credential_for_url("https://h.test/internal/user/a%2Fb%2F1.0.0.zip")
            .is_some());
        assert!(b
            .credential_for_url("https://h.test/user/a%2Fb%2F1.0.0.zip")
            .is_none());
        assert!(b
            .credential_for_url("https://h.test/internalx/symbols.zip")
            .is_none());
        assert!(b
            .credential_for_url("https://other.test/internal")
            .is_none());

        let url = "https://h.test/internal/symbols.zip";
        b.auth_outcome_url(url, http::StatusCode::UNAUTHORIZED);
        let report = b.report();
        let error = report[0]["auth_error"].as_str().unwrap();
        assert!(
            error.contains("source `internal` refused the gateway's credentials ($T): 401"),
            "{error}"
        );
        assert_eq!(report[0]["state"], "up");
        assert!(report[1]["auth_error"].is_null());
        b.auth_outcome_url(url, http::StatusCode::NOT_FOUND);
        assert!(b.report()[0]["auth_error"].is_null());
    }

    #[test]
    fn urls_map_to_their_source_by_whole_segments() {
        let h = health(1, 1000);
        assert!(h
            .for_url("https://registry.test/user/a%2Fb%2F1.0.0.zip")
            .is_some());
        assert!(h.for_url("https://registry.test/symbols.zip").is_some());
        assert!(h.for_url("https://registry.test").is_some());
        assert!(h.for_url("https://registry.testing/x").is_none());
        assert!(h.for_url("https://other.test/x").is_none());
    }

    #[test]
    fn consecutive_failures_open_the_breaker_and_a_success_resets_the_count() {
        let h = health(2, 60_000);
        let url = "https://registry.test/symbols.zip";
        h.admit_url(url).unwrap().failure("boom");
        h.admit_url(url).unwrap().success();
        h.admit_url(url).unwrap().failure("boom");
        assert!(!h.is_down_url(url), "failures must be consecutive");
        h.admit_url(url).unwrap().failure("boom again");
        assert!(h.is_down_url(url));
        let refusal = h.admit_url(url).unwrap_err();
        assert_eq!(refusal.name, "default");
        assert_eq!(refusal.last_error, "boom again");
        assert_eq!(h.report()[0]["state"], "down");
    }

    #[test]
    fn one_probe_at_a_time_and_a_failed_probe_backs_off_longer() {
        let h = health(1, 30);
        let url = "https://registry.test/symbols.zip";
        h.admit_url(url).unwrap().failure("down");
        assert!(h.admit_url(url).is_err(), "within the back-off");
        std::thread::sleep(Duration::from_millis(40));
        let probe = h.admit_url(url).unwrap();
        assert!(probe.is_probe());
        assert!(h.admit_url(url).is_err(), "a second probe while one is out");
        probe.failure("still down");
        std::thread::sleep(Duration::from_millis(40));
        assert!(h.admit_url(url).is_err(), "back-off doubled to 60 ms");
        std::thread::sleep(Duration::from_millis(30));
        let probe = h.admit_url(url).unwrap();
        drop(probe); // abandoned: the slot is free again
        let probe = h.admit_url(url).unwrap();
        probe.success();
        assert!(!h.is_down_url(url));
        assert!(!h.admit_url(url).unwrap().is_probe());
        assert_eq!(h.report()[0]["state"], "up");
    }

    #[tokio::test]
    async fn open_breakers_are_probed_in_the_background_until_the_source_answers() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let h = Arc::new(health(1, 30));
        let url = "https://registry.test/symbols.zip";
        let calls = Arc::new(AtomicU32::new(0));
        let running = Arc::new(AtomicU32::new(0));
        let overlapped = Arc::new(AtomicU32::new(0));
        let (c, r, o) = (calls.clone(), running.clone(), overlapped.clone());
        h.probe_in_background(move |source| {
            assert_eq!(source, "default");
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            let (r, o) = (r.clone(), o.clone());
            async move {
                if r.fetch_add(1, Ordering::SeqCst) > 0 {
                    o.fetch_add(1, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                r.fetch_sub(1, Ordering::SeqCst);
                // The source comes back on the third probe.
                if n < 3 {
                    Err("still down".to_string())
                } else {
                    Ok(())
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 0, "nothing to probe while up");

        h.admit_url(url).unwrap().failure("down");
        assert!(h.is_down_url(url));
        let deadline = Instant::now() + Duration::from_secs(5);
        while h.is_down_url(url) {
            assert!(Instant::now() < deadline, "never probed back up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(overlapped.load(Ordering::SeqCst), 0, "one probe at a time");
        assert_eq!(h.report()[0]["last_error"], "still down");
        // Up again: no more probes.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }
}
