//! Criterion micro-benchmarks of the per-request hot path: classifying a request,
//! parsing an archive path, and answering a cached archive from the memory and the
//! disk tier. Run with `cargo bench --bench hot_path`; compare runs to see regressions.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytesize::ByteSize;
use criterion::{criterion_group, criterion_main, Criterion};
use http::Method;
use http_body_util::BodyExt;
use moonbit_registry::archive::ArchiveKey;
use moonbit_registry::config::Config;
use moonbit_registry::router::{classify, Route};
use moonbit_registry::store::disk::Disk;
use moonbit_registry::store::memory::{Hot, Memory};
use moonbit_registry::store::{Object, Store};
use moonbit_registry::upstream::Upstream;
use tokio::io::AsyncWriteExt;

/// What `moon` asks for: one form-urlencoded segment, build metadata included.
const ARCHIVE: &str = "/user/moonbitlang%2Fcore%2F0.1.20260213%2B3382e0600.zip";
const NESTED: &str = "/user/moonbitlang%2Flex%2Fruntime%2F0.1.1.zip";
const INDEX: &str = "/git/index/info/refs?service=git-upload-pack";

fn routing(c: &mut Criterion) {
    let mut g = c.benchmark_group("route");
    g.bench_function("classify archive", |b| {
        b.iter(|| {
            let route = classify(&Method::GET, black_box(ARCHIVE), false);
            assert!(matches!(route, Route::Archive(_)));
            route
        })
    });
    g.bench_function("classify index", |b| {
        b.iter(|| classify(&Method::GET, black_box(INDEX), false))
    });
    g.bench_function("classify other", |b| {
        b.iter(|| classify(&Method::GET, black_box("/api/v0/search?kw=json"), false))
    });
    g.finish();

    let mut g = c.benchmark_group("archive path");
    g.bench_function("parse", |b| {
        b.iter(|| ArchiveKey::parse(black_box(&ARCHIVE["/user/".len()..])))
    });
    g.bench_function("parse nested module", |b| {
        b.iter(|| ArchiveKey::parse(black_box(&NESTED["/user/".len()..])))
    });
    let key = ArchiveKey::parse(&ARCHIVE["/user/".len()..]).expect("valid key");
    g.bench_function("store key", |b| b.iter(|| black_box(&key).store_key()));
    g.bench_function("upstream path", |b| {
        b.iter(|| black_box(&key).upstream_path())
    });
    g.finish();
}

/// A store holding one 64 KiB archive, with (`memory_item_max` above it) or without
/// (below it) a memory tier for it.
async fn store_with_archive(dir: &std::path::Path, in_memory: bool) -> (Arc<Store>, Object) {
    let bytes = vec![7u8; 64 * 1024];
    let mut config = Config::default();
    config.storage.memory = ByteSize::mib(64);
    config.storage.memory_item_max = if in_memory {
        ByteSize::mib(4)
    } else {
        ByteSize::kib(1)
    };
    config.storage.archive_max = ByteSize::gib(1);
    let upstream = Upstream::new(None, Config::default().timeouts).expect("upstream client");
    let store = Arc::new(Store::open(dir, &config.storage, upstream).expect("open store"));
    let archive = ArchiveKey::parse("moonbitlang%2Fcore%2F0.1.0.zip").expect("valid key");
    let key = archive.store_key();
    let mut writer = store
        .disk()
        .writer(&key, Some(bytes.len() as u64))
        .await
        .expect("store writer");
    writer.write_all(&bytes).await.expect("write entry");
    let integrity = writer.commit().await.expect("commit entry");
    let object = Object::archive(
        &archive,
        integrity.to_hex().1,
        0,
        vec!["https://127.0.0.1:9/user/unused.zip".into()],
    );
    (store, object)
}

fn store_lookup(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut g = c.benchmark_group("store");

    let memory = Memory::new(64 << 20, 4 << 20);
    memory.insert(
        "archive/a/b/1.0.0".into(),
        Hot::new(
            bytes::Bytes::from(vec![1u8; 64 * 1024]),
            "0".repeat(64),
            "application/zip",
        ),
    );
    g.bench_function("memory tier get", |b| {
        b.iter(|| memory.get(black_box("archive/a/b/1.0.0")))
    });

    let (hot, object) = rt.block_on(store_with_archive(&dir.path().join("hot"), true));
    // The first answer reads the disk and fills the memory tier; the rest are memory hits.
    rt.block_on(hot.respond(object.clone(), false));
    g.bench_function("respond 64 KiB, memory hit", |b| {
        b.to_async(&rt).iter(|| async {
            let resp = hot.respond(object.clone(), false).await;
            assert_eq!(resp.headers()["x-cache"], "hit");
            resp.into_body().collect().await.expect("body").to_bytes()
        })
    });

    let (cold, object) = rt.block_on(store_with_archive(&dir.path().join("disk"), false));
    let disk = Disk::new(dir.path().join("disk").join("store"));
    g.bench_function("disk tier lookup", |b| {
        b.to_async(&rt)
            .iter(|| async { disk.lookup(black_box(&object.key)).await })
    });
    g.bench_function("respond 64 KiB, disk hit", |b| {
        b.to_async(&rt).iter(|| async {
            let resp = cold.respond(object.clone(), false).await;
            assert_eq!(resp.headers()["x-cache"], "hit");
            resp.into_body().collect().await.expect("body").to_bytes()
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = routing, store_lookup
}
criterion_main!(benches);
