//! `moonbit-registry cache list|verify|gc`: what the store holds, whether every
//! entry is intact, and eviction of the least recently used content down to a
//! size bound. Safe beside a running `serve` (cacache writes atomically; a
//! removed entry is refetched on its next request).

use std::path::Path;
use std::time::UNIX_EPOCH;

use bytesize::ByteSize;
use std::io::Read;

use crate::progress::Progress;
use crate::store::eviction::{self, StoredEntry};
use crate::store::shared::Shared;

/// `archive/alice/json/0.1.0` -> (`alice/json`, `0.1.0`); other keys as they are.
fn module_version(key: &str) -> (String, String) {
    if let Some(rest) = key.strip_prefix("archive/") {
        if let Some((name, version)) = rest.rsplit_once('/') {
            return (name.to_string(), version.to_string());
        }
    }
    (key.to_string(), String::new())
}

fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `cache list`.
pub fn list(store_dir: &Path, json: bool) {
    let mut entries = eviction::list(store_dir);
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    if json {
        let rows: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| {
                let (module, version) = module_version(&e.key);
                serde_json::json!({
                    "key": e.key,
                    "module": module,
                    "version": version,
                    "sha256": e.sha256,
                    "size": e.size,
                    "last_used": rfc3339(e.last_used),
                    "last_used_unix": e.last_used.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return;
    }
    println!(
        "{:<40} {:<24} {:>10}  last used",
        "module", "version", "size"
    );
    let mut total = 0;
    for e in &entries {
        let (module, version) = module_version(&e.key);
        println!(
            "{module:<40} {version:<24} {:>10}  {}",
            ByteSize(e.size).to_string(),
            rfc3339(e.last_used)
        );
        total += e.size;
    }
    println!("{} entries, {}", entries.len(), ByteSize(total));
}

/// `cache verify`: re-hash every entry; corrupt ones are removed. Returns how many were.
pub fn verify(store_dir: &Path) -> usize {
    let entries = eviction::list(store_dir);
    let progress = Progress::new("verify", entries.len() as u64);
    let mut corrupt: Vec<(StoredEntry, String)> = Vec::new();
    let mut bytes = 0u64;
    for (i, e) in entries.iter().enumerate() {
        let verdict = check(store_dir, e);
        bytes += e.size;
        progress.bytes(bytes);
        let line = match &verdict {
            Ok(()) => format!("ok {}", e.key),
            Err(reason) => format!("failed {}: {reason}", e.key),
        };
        progress.item(i as u64 + 1, &line);
        if let Err(reason) = verdict {
            corrupt.push((e.clone(), reason));
        }
    }
    let elapsed = progress.finish();
    for (e, reason) in &corrupt {
        if let Err(error) = cacache::remove_sync(store_dir, &e.key) {
            tracing::warn!(key = %e.key, %error, "could not remove the index record");
        }
        let _ = cacache::remove_hash_sync(store_dir, &e.integrity());
        println!("corrupt (removed): {} sha256 {}: {reason}", e.key, e.sha256);
    }
    println!(
        "verify: {} entries ({}) checked in {:.1}s, {} corrupt{}",
        entries.len(),
        ByteSize(bytes),
        elapsed.as_secs_f64(),
        corrupt.len(),
        if corrupt.is_empty() {
            ""
        } else {
            " and removed (they are refetched on their next request)"
        }
    );
    corrupt.len()
}

/// Read the content back in full and compare its digest with its name.
fn check(store_dir: &Path, e: &StoredEntry) -> Result<(), String> {
    let mut reader = cacache::SyncReader::open_hash(store_dir, e.integrity())
        .map_err(|err| format!("unreadable: {err}"))?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(err) => return Err(format!("read failed: {err}")),
        }
    }
    reader
        .check()
        .map(|_| ())
        .map_err(|_| "bytes on disk do not match the digest".to_string())
}

/// `cache list --shared`: what the shared tier holds, by digest (the bucket knows
/// no module names; `cache list` on a replica maps them).
pub async fn list_shared(shared: &Shared, json: bool) -> anyhow::Result<()> {
    let mut objects = shared.list().await?;
    objects.sort_by(|a, b| a.sha256.cmp(&b.sha256));
    if json {
        let rows: Vec<serde_json::Value> = objects
            .iter()
            .map(|o| {
                serde_json::json!({
                    "sha256": o.sha256,
                    "size": o.size,
                    "last_modified": rfc3339(o.last_modified),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    println!("{:<64} {:>10}  last modified", "sha256", "size");
    let mut total = 0;
    for o in &objects {
        println!(
            "{:<64} {:>10}  {}",
            o.sha256,
            ByteSize(o.size).to_string(),
            rfc3339(o.last_modified)
        );
        total += o.size;
    }
    println!(
        "{} objects in {}, {}",
        objects.len(),
        shared.url(),
        ByteSize(total)
    );
    Ok(())
}

/// `cache verify --shared`: read every object of the shared tier back and compare
/// its digest with its name; bad ones are deleted. Returns how many were.
pub async fn verify_shared(shared: &Shared) -> anyhow::Result<usize> {
    let objects = shared.list().await?;
    let progress = Progress::new("verify", objects.len() as u64);
    let (mut bad, mut bytes) = (0usize, 0u64);
    for (i, o) in objects.iter().enumerate() {
        let line = match shared.check(&o.sha256).await {
            Ok(true) => format!("ok {}", o.sha256),
            Ok(false) => {
                bad += 1;
                println!("corrupt (removed): sha256 {}", o.sha256);
                format!("failed {}", o.sha256)
            }
            Err(e) => {
                bad += 1;
                println!("unreadable: sha256 {}: {e}", o.sha256);
                format!("failed {}", o.sha256)
            }
        };
        bytes += o.size;
        progress.bytes(bytes);
        progress.item(i as u64 + 1, &line);
    }
    let elapsed = progress.finish();
    println!(
        "verify: {} objects in {} ({}) checked in {:.1}s, {} bad",
        objects.len(),
        shared.url(),
        ByteSize(bytes),
        elapsed.as_secs_f64(),
        bad
    );
    Ok(bad)
}

/// `cache gc --max-size`.
pub fn gc(store_dir: &Path, max: u64) {
    let report = eviction::collect(store_dir, max, &|_| false);
    for e in &report.evicted {
        println!(
            "evicted {} ({}, last used {})",
            e.key,
            ByteSize(e.size),
            rfc3339(e.last_used)
        );
    }
    println!(
        "gc: {} -> {} (bound {}), {} entries evicted",
        ByteSize(report.before),
        ByteSize(report.after),
        ByteSize(max),
        report.evicted.len()
    );
}
