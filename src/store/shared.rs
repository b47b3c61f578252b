//! The shared tier: archives in an S3-compatible bucket that every replica of a
//! cluster reads and fills, so an archive leaves the upstream once per cluster.
//!
//! Objects are keyed by content, `PREFIX/sha256/<hex>`: the index line names the
//! digest before anything is fetched, so any replica can look one up, and a copy
//! read from here goes through the same spool, verify and commit steps as an
//! upstream body (see [`super::flight`]). The replica that fetches from the
//! upstream uploads the verified file afterwards, in the background.
//!
//! Concurrent cold misses on several replicas are collapsed by a lease,
//! `PREFIX/lease/<hex>`, created with `If-None-Match: *`: the replica that creates
//! it fetches, the others poll for the object for at most `wait`, then fetch
//! themselves. A lease carries its expiry, so a dead replica's lease is taken over.
//!
//! The store being down or slow never costs a client more than a short timeout:
//! every call is bounded, and a breaker (the upstream's, [`crate::breaker`]) stops
//! calling it after a few failures until a probe finds it back.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientOptions, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig, WriteMultipart,
};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio_util::task::TaskTracker;

use crate::body::{BoxError, GatewayBody};
use crate::breaker::Breakers;
use crate::config::{BreakerSettings, SharedSettings};

/// Name of the tier's breaker, in logs and `/-/health`.
const TIER: &str = "shared";
/// Objects up to this size are uploaded in one request; larger ones in parts.
const SINGLE_PUT_MAX: u64 = 8 << 20;
/// Size of one part of a multipart upload (S3 wants at least 5 MiB).
const PART: usize = 8 << 20;
/// Parts in flight at once: with [`PART`], what an upload holds in memory.
const PARTS_IN_FLIGHT: usize = 2;
/// Uploads at once: bounds the memory and connections uploads take.
const UPLOADS_AT_ONCE: usize = 4;
/// Bytes read from the local file per read while uploading.
const READ_CHUNK: usize = 1 << 20;
/// A lease body is a few dozen bytes; anything larger is not ours.
const LEASE_MAX: usize = 4096;
/// First and longest pause between two looks for another replica's upload.
const POLL_MIN: Duration = Duration::from_millis(20);
const POLL_MAX: Duration = Duration::from_millis(250);

/// A bucket shared by the replicas of one cluster.
pub struct Shared {
    bucket: Arc<dyn ObjectStore>,
    /// `s3://BUCKET/PREFIX`, for messages.
    url: String,
    prefix: ObjectPath,
    settings: SharedSettings,
    breaker: Arc<Breakers>,
    /// Who this replica is, in the leases it writes.
    replica: String,
    /// Uploads and lease releases still running; a command waits for them.
    background: TaskTracker,
    /// Uploads running at once (each holds up to a few parts in memory).
    upload_slots: tokio::sync::Semaphore,
}

/// A copy found in the shared tier: its size and its body, still to be read
/// (and verified by the caller).
pub struct SharedCopy {
    pub len: u64,
    pub body: GatewayBody,
}

/// What to do before fetching an archive from the upstream.
pub enum Before {
    /// The shared tier has it: read this instead.
    Found(SharedCopy),
    /// Fetch it from the upstream; holding the lease if this replica won it.
    Fetch(Option<Lease>),
}

/// Why a call to the store did not give what was asked.
#[derive(Debug)]
enum Failure {
    /// The object is not there.
    NotFound,
    /// A create-only write found the object there already.
    Exists,
    /// The store is down, slow or refused (or its breaker is open): skip it.
    Unavailable(String),
}

/// This replica's claim to fetch one archive from the upstream; deleted when
/// released or dropped, so the other replicas stop waiting for it.
pub struct Lease {
    shared: Arc<Shared>,
    path: ObjectPath,
    released: bool,
}

/// One object the shared tier holds (for `cache list --shared`).
#[derive(Debug, Clone)]
pub struct Listed {
    pub sha256: String,
    pub size: u64,
    pub last_modified: SystemTime,
}

impl Shared {
    /// The tier `settings` describe, credentials from the AWS environment chain.
    /// Nothing is contacted yet.
    pub fn open(settings: &SharedSettings, breaker: &BreakerSettings) -> anyhow::Result<Shared> {
        let url = url::Url::parse(&settings.url)
            .map_err(|e| anyhow::anyhow!("storage.shared.url `{}`: {e}", settings.url))?;
        if url.scheme() != "s3" {
            anyhow::bail!(
                "storage.shared.url `{}` must be s3://BUCKET/PREFIX",
                settings.url
            );
        }
        let bucket_name = url.host_str().filter(|b| !b.is_empty()).ok_or_else(|| {
            anyhow::anyhow!("storage.shared.url `{}` names no bucket", settings.url)
        })?;
        let prefix = url.path().trim_matches('/');
        let client = ClientOptions::new()
            .with_connect_timeout(settings.connect_timeout)
            // Bodies of any size are read and written under our own idle bounds;
            // a whole-request timeout would cut a large archive.
            .with_timeout_disabled()
            .with_allow_http(settings.allow_http);
        let retry = RetryConfig {
            // A store that fails is skipped, not retried: the upstream is there.
            max_retries: 0,
            retry_timeout: settings.first_byte_timeout,
            ..RetryConfig::default()
        };
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket_name)
            .with_region(&settings.region)
            .with_allow_http(settings.allow_http)
            .with_client_options(client)
            .with_retry(retry)
            // Leases need `If-None-Match: *` on create.
            .with_conditional_put(S3ConditionalPut::ETagMatch);
        if let Some(endpoint) = &settings.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let bucket = builder
            .build()
            .map_err(|e| anyhow::anyhow!("storage.shared: {e}"))?;
        Ok(Shared {
            bucket: Arc::new(bucket),
            url: settings.url.clone(),
            prefix: ObjectPath::from(prefix),
            settings: settings.clone(),
            breaker: Arc::new(Breakers::single(TIER, breaker)),
            replica: replica_name(),
            background: TaskTracker::new(),
            upload_slots: tokio::sync::Semaphore::new(UPLOADS_AT_ONCE),
        })
    }

    /// `s3://BUCKET/PREFIX`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The tier's state for `GET /-/health`: its breaker's report and its URL.
    pub fn report(&self) -> serde_json::Value {
        let mut report = self
            .breaker
            .report()
            .pop()
            .unwrap_or(serde_json::Value::Null);
        report["url"] = self.url.clone().into();
        report["uploads_in_progress"] = self.background.len().into();
        report
    }

    /// Whether the tier's breaker has it down.
    pub fn is_down(&self) -> bool {
        self.breaker.is_down(TIER)
    }

    /// Probe the store while its breaker is open, without waiting for traffic.
    pub fn probe_in_background(self: &Arc<Self>) {
        let shared = Arc::downgrade(self);
        self.breaker.probe_in_background(move |_| {
            let shared = shared.clone();
            async move {
                let Some(shared) = shared.upgrade() else {
                    return Err("gone".to_string());
                };
                let probe = shared.prefix.child("probe");
                let limit = shared.settings.first_byte_timeout;
                match tokio::time::timeout(limit, shared.bucket.head(&probe)).await {
                    Ok(Ok(_)) | Ok(Err(object_store::Error::NotFound { .. })) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {limit:?}")),
                }
            }
        });
    }

    fn object_path(&self, sha256: &str) -> ObjectPath {
        self.prefix.child("sha256").child(sha256)
    }

    fn lease_path(&self, sha256: &str) -> ObjectPath {
        self.prefix.child("lease").child(sha256)
    }

    /// Run one call to the store under the breaker, bounded by `limit`. Answers
    /// that are not failures of the store (not found, exists) keep it up.
    async fn call<T>(
        &self,
        limit: Duration,
        op: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<T, Failure> {
        let ticket = self
            .breaker
            .admit_source(TIER)
            .map_err(|refusal| Failure::Unavailable(refusal.to_string()))?;
        match tokio::time::timeout(limit, op).await {
            Ok(Ok(value)) => {
                ticket.success();
                Ok(value)
            }
            Ok(Err(object_store::Error::NotFound { .. })) => {
                ticket.success();
                Err(Failure::NotFound)
            }
            Ok(Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            )) => {
                ticket.success();
                Err(Failure::Exists)
            }
            Ok(Err(e)) => {
                let error = e.to_string();
                tracing::warn!(tier = TIER, %error, "shared tier call failed");
                ticket.failure(&error);
                Err(Failure::Unavailable(error))
            }
            Err(_) => {
                let error = format!("the shared tier did not answer within {limit:?}");
                tracing::warn!(tier = TIER, "{error}");
                ticket.failure(&error);
                Err(Failure::Unavailable(error))
            }
        }
    }

    /// The copy of `sha256` the tier holds, its body still to come (bounded by
    /// `idle_read` between chunks by the reader); `None` if it holds none, is
    /// unavailable, or holds one larger than `max` bytes.
    pub async fn get(&self, sha256: &str, max: u64) -> Option<SharedCopy> {
        self.find(sha256, max).await.ok().flatten()
    }

    /// [`Shared::get`], telling a miss (`Ok(None)`) from a store that could not
    /// be asked (`Err`).
    async fn find(&self, sha256: &str, max: u64) -> Result<Option<SharedCopy>, Failure> {
        let path = self.object_path(sha256);
        let got = match self
            .call(self.settings.first_byte_timeout, self.bucket.get(&path))
            .await
        {
            Ok(got) => got,
            Err(Failure::NotFound | Failure::Exists) => return Ok(None),
            Err(unavailable) => return Err(unavailable),
        };
        let len = got.meta.size;
        if len > max {
            tracing::warn!(
                sha256,
                len,
                max,
                "shared copy is larger than storage.archive_max; ignored"
            );
            return Ok(None);
        }
        let chunks = got
            .into_stream()
            .map_ok(Frame::data)
            .map_err(|e| Box::new(e) as BoxError);
        Ok(Some(SharedCopy {
            len,
            body: StreamBody::new(chunks).boxed_unsync(),
        }))
    }

    /// Before an upstream fetch of `sha256`: read it from here if the tier has it;
    /// else claim its lease and fetch, or, if another replica holds the lease,
    /// wait for its upload (at most `wait`), then fetch anyway.
    pub async fn before_upstream(self: &Arc<Self>, sha256: &str, max: u64) -> Before {
        // The digest comes from an index line: only a real one names an object.
        if !is_sha256(sha256) {
            return Before::Fetch(None);
        }
        match self.find(sha256, max).await {
            Ok(Some(copy)) => return Before::Found(copy),
            Ok(None) => {}
            // Down or slow: no second call to wait on, straight to the upstream.
            Err(failure) => {
                tracing::debug!(sha256, ?failure, "shared tier skipped");
                return Before::Fetch(None);
            }
        }
        let deadline = tokio::time::Instant::now() + self.settings.wait;
        let mut pause = POLL_MIN;
        // Expiry of the lease seen last: read again only once it has passed.
        let mut seen: Option<u64> = None;
        loop {
            match self.claim(sha256, &mut seen).await {
                Claim::Won(lease) => {
                    // Its holder may have uploaded and let go between our two looks.
                    if let Some(copy) = self.get(sha256, max).await {
                        lease.release().await;
                        return Before::Found(copy);
                    }
                    return Before::Fetch(Some(lease));
                }
                Claim::Unavailable => return Before::Fetch(None),
                Claim::Held => {}
            }
            if tokio::time::Instant::now() + pause > deadline {
                tracing::info!(
                    sha256,
                    waited_ms = self.settings.wait.as_millis() as u64,
                    "another replica's fetch did not land in the shared tier in time; fetching from the upstream"
                );
                return Before::Fetch(None);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(POLL_MAX);
            match self.find(sha256, max).await {
                Ok(Some(copy)) => return Before::Found(copy),
                Ok(None) => {}
                Err(_) => return Before::Fetch(None),
            }
        }
    }

    /// Create the lease of `sha256` unless another replica holds a live one; a
    /// lease past its expiry (its replica died mid-fetch) is deleted and retaken.
    ///
    /// Two replicas that find the same expired lease may both delete it, the second
    /// deleting the first's new lease (S3 has no conditional delete): both then
    /// fetch, which costs one extra upstream fetch, only after a replica died.
    async fn claim(self: &Arc<Self>, sha256: &str, seen: &mut Option<u64>) -> Claim {
        let path = self.lease_path(sha256);
        let now = unix_secs(SystemTime::now());
        let expires = now + self.settings.lease_ttl.as_secs().max(1);
        let body =
            serde_json::json!({ "replica": self.replica, "expires_unix": expires }).to_string();
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let created = self
            .call(
                self.settings.first_byte_timeout,
                self.bucket
                    .put_opts(&path, PutPayload::from(body.into_bytes()), opts),
            )
            .await;
        match created {
            Ok(_) => {
                return Claim::Won(Lease {
                    shared: self.clone(),
                    path,
                    released: false,
                })
            }
            Err(Failure::Exists) => {}
            Err(Failure::NotFound) => return Claim::Unavailable,
            Err(Failure::Unavailable(reason)) => {
                tracing::debug!(sha256, %reason, "no lease: the shared tier is unavailable");
                return Claim::Unavailable;
            }
        }
        // Held: is it alive? Its expiry is read once, and again once it has passed.
        if seen.is_some_and(|expiry| expiry > now) {
            return Claim::Held;
        }
        let Some(current) = self.read_lease(&path).await else {
            return Claim::Held;
        };
        // A body that is not a lease of ours counts as expired.
        let expiry = lease_expiry(&current).unwrap_or(0);
        *seen = Some(expiry);
        if expiry <= now {
            tracing::warn!(
                sha256,
                "a replica's lease expired before its upload; taking it over"
            );
            let _ = self
                .call(self.settings.first_byte_timeout, self.bucket.delete(&path))
                .await;
        }
        Claim::Held
    }

    /// The body of the lease at `path`, bounded; `None` if gone or unreadable.
    async fn read_lease(&self, path: &ObjectPath) -> Option<Bytes> {
        let limit = self.settings.first_byte_timeout;
        let got = self.call(limit, self.bucket.get(path)).await.ok()?;
        if got.meta.size > LEASE_MAX as u64 {
            return Some(Bytes::new());
        }
        tokio::time::timeout(limit, got.bytes()).await.ok()?.ok()
    }

    /// Delete a copy that failed verification, so no replica reads it again.
    pub async fn remove(&self, sha256: &str) {
        let path = self.object_path(sha256);
        match self
            .call(self.settings.first_byte_timeout, self.bucket.delete(&path))
            .await
        {
            Ok(()) | Err(Failure::NotFound) => {
                tracing::warn!(sha256, "removed the bad copy from the shared tier")
            }
            Err(e) => {
                tracing::warn!(sha256, error = ?e, "could not remove the bad copy from the shared tier")
            }
        }
    }

    /// Whether the tier holds `sha256`; `None` when it cannot tell.
    pub async fn contains(&self, sha256: &str) -> Option<bool> {
        let path = self.object_path(sha256);
        match self
            .call(self.settings.first_byte_timeout, self.bucket.head(&path))
            .await
        {
            Ok(_) => Some(true),
            Err(Failure::NotFound) => Some(false),
            Err(_) => None,
        }
    }

    /// Upload the verified local file `file` (`len` bytes, digest `sha256`) in the
    /// background, then let go of `lease`. A failure is logged, never raised: the
    /// clients have their bytes, and another replica will fetch it too.
    pub fn upload_in_background(
        self: &Arc<Self>,
        sha256: String,
        file: std::path::PathBuf,
        len: u64,
        lease: Option<Lease>,
    ) {
        let shared = self.clone();
        self.background.spawn(async move {
            let slot = shared.upload_slots.acquire().await;
            let uploaded = match slot {
                Ok(_slot) => shared.upload(&sha256, &file, len).await,
                Err(_) => Err("uploads are shut down".into()),
            };
            match uploaded {
                Ok(()) => tracing::info!(sha256, bytes = len, "uploaded to the shared tier"),
                Err(error) => {
                    tracing::warn!(sha256, %error, "upload to the shared tier failed; it stays local")
                }
            }
            if let Some(lease) = lease {
                lease.release().await;
            }
        });
    }

    /// Upload `file` under `sha256` unless the tier already holds it (for `warm`
    /// of what is stored here already, and `import`), in the background.
    pub fn ensure_in_background(
        self: &Arc<Self>,
        sha256: String,
        file: std::path::PathBuf,
        len: u64,
    ) {
        let shared = self.clone();
        self.background.spawn(async move {
            // The slot covers the look too: an import of thousands of archives asks
            // a few at a time.
            let Ok(_slot) = shared.upload_slots.acquire().await else {
                return;
            };
            if shared.contains(&sha256).await != Some(false) {
                return;
            }
            match shared.upload(&sha256, &file, len).await {
                Ok(()) => tracing::info!(sha256, bytes = len, "uploaded to the shared tier"),
                Err(error) => tracing::warn!(sha256, %error, "upload to the shared tier failed"),
            }
        });
    }

    /// Wait until every background upload and lease release has ended (a command
    /// does before it exits). Returns how many there were at the call.
    pub async fn finish_background(&self) -> usize {
        let pending = self.background.len();
        self.background.close();
        self.background.wait().await;
        self.background.reopen();
        pending
    }

    /// Upload the file: one request when small, else parts, a few in flight, read
    /// from the file as they go, so memory stays bounded whatever the size.
    async fn upload(&self, sha256: &str, file: &std::path::Path, len: u64) -> Result<(), String> {
        let path = self.object_path(sha256);
        let limit = self.settings.upload_timeout;
        let mut reader = tokio::fs::File::open(file)
            .await
            .map_err(|e| format!("cannot open {}: {e}", file.display()))?;
        if len <= SINGLE_PUT_MAX {
            let mut bytes = Vec::with_capacity(len as usize);
            (&mut reader)
                .take(SINGLE_PUT_MAX + 1)
                .read_to_end(&mut bytes)
                .await
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            if bytes.len() as u64 != len {
                return Err(format!("{} changed while uploading", file.display()));
            }
            let payload = PutPayload::from(bytes);
            return self
                .call(limit, self.bucket.put(&path, payload))
                .await
                .map(|_| ())
                .map_err(|e| format!("{e:?}"));
        }
        let upload = self
            .call(limit, self.bucket.put_multipart(&path))
            .await
            .map_err(|e| format!("{e:?}"))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut buf = vec![0u8; READ_CHUNK];
        let mut sent = 0u64;
        let written: Result<(), String> = async {
            loop {
                let n = reader
                    .read(&mut buf)
                    .await
                    .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
                if n == 0 {
                    break;
                }
                sent += n as u64;
                tokio::time::timeout(limit, writer.wait_for_capacity(PARTS_IN_FLIGHT))
                    .await
                    .map_err(|_| format!("a part took longer than {limit:?}"))?
                    .map_err(|e| e.to_string())?;
                writer.write(&buf[..n]);
            }
            if sent != len {
                return Err(format!("{} changed while uploading", file.display()));
            }
            Ok(())
        }
        .await;
        if let Err(e) = written {
            let _ = tokio::time::timeout(limit, writer.abort()).await;
            return Err(e);
        }
        match tokio::time::timeout(limit, writer.finish()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("completing the upload took longer than {limit:?}")),
        }
    }

    /// Every object in the tier (for `cache list --shared`).
    pub async fn list(&self) -> anyhow::Result<Vec<Listed>> {
        let root = self.prefix.child("sha256");
        let mut out = Vec::new();
        let mut objects = self.bucket.list(Some(&root));
        while let Some(meta) = objects.next().await {
            let meta = meta.map_err(|e| anyhow::anyhow!("listing {}: {e}", self.url))?;
            let Some(sha256) = meta.location.filename().map(str::to_string) else {
                continue;
            };
            out.push(Listed {
                sha256,
                size: meta.size,
                last_modified: meta.last_modified.into(),
            });
        }
        Ok(out)
    }

    /// Read `sha256` back in full and compare its digest with its name; a copy
    /// that does not match is deleted. `Ok(false)` when it was bad.
    pub async fn check(&self, sha256: &str) -> anyhow::Result<bool> {
        let path = self.object_path(sha256);
        let got = self
            .bucket
            .get(&path)
            .await
            .map_err(|e| anyhow::anyhow!("reading {sha256}: {e}"))?;
        let mut stream = got.into_stream();
        let mut hasher = Sha256::new();
        loop {
            let next = tokio::time::timeout(self.settings.idle_read, stream.next())
                .await
                .map_err(|_| anyhow::anyhow!("reading {sha256}: stalled"))?;
            match next {
                Some(chunk) => {
                    hasher.update(&chunk.map_err(|e| anyhow::anyhow!("reading {sha256}: {e}"))?)
                }
                None => break,
            }
        }
        if hex::encode(hasher.finalize()) == sha256 {
            return Ok(true);
        }
        self.bucket
            .delete(&path)
            .await
            .map_err(|e| anyhow::anyhow!("deleting bad {sha256}: {e}"))?;
        Ok(false)
    }

    /// How long to wait between chunks of a copy read from here.
    pub fn idle_read(&self) -> Duration {
        self.settings.idle_read
    }
}

/// How a claim on a lease went.
enum Claim {
    Won(Lease),
    /// Another replica holds a live lease.
    Held,
    /// The store could not be asked.
    Unavailable,
}

impl Lease {
    /// Delete the lease: the other replicas stop waiting for this one.
    pub async fn release(mut self) {
        self.released = true;
        let shared = self.shared.clone();
        let limit = shared.settings.first_byte_timeout;
        let _ = shared.call(limit, shared.bucket.delete(&self.path)).await;
    }
}

impl Drop for Lease {
    /// A fetch that ended early lets go of its lease in the background.
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let (shared, path) = (self.shared.clone(), self.path.clone());
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let background = shared.background.clone();
            let _guard = handle.enter();
            background.spawn(async move {
                let limit = shared.settings.first_byte_timeout;
                let _ = shared.call(limit, shared.bucket.delete(&path)).await;
            });
        }
    }
}

/// 64 lowercase hex digits.
fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The expiry a lease body names, if it is one of ours.
fn lease_expiry(body: &[u8]) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.get("expires_unix")?.as_u64()
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `host-pid`: enough to tell replicas apart in a lease.
fn replica_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "replica".into());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_names_its_expiry_and_anything_else_has_none() {
        assert_eq!(
            lease_expiry(br#"{"replica":"a-1","expires_unix":42}"#),
            Some(42)
        );
        assert_eq!(lease_expiry(b"garbage"), None);
        assert_eq!(lease_expiry(br#"{"replica":"a-1"}"#), None);
    }

    #[test]
    fn only_a_real_digest_names_an_object() {
        assert!(is_sha256(&"ab".repeat(32)));
        assert!(!is_sha256(&"AB".repeat(32)));
        assert!(!is_sha256("../../etc/passwd"));
        assert!(!is_sha256(&"a".repeat(63)));
    }

    #[test]
    fn a_url_without_a_bucket_or_of_another_scheme_is_refused() {
        let mut settings: SharedSettings =
            serde_json::from_value(serde_json::json!({ "url": "http://bucket/x" })).unwrap();
        assert!(Shared::open(&settings, &BreakerSettings::default()).is_err());
        settings.url = "s3:///prefix".into();
        assert!(Shared::open(&settings, &BreakerSettings::default()).is_err());
    }
}
