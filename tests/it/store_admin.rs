//! Store management: `cache gc` keeps the store under a bound (least recently used
//! first) and the gateway still serves what remains; `storage.max_size` does the
//! same in the background; a byte flipped on disk is caught by `cache verify` and
//! by `serve`, which never delivers corrupt bytes as a complete transfer.

use std::time::{Duration, Instant};

use crate::upstream::admin::{self, content_file, flip_byte, stderr, stdout, stored};
use crate::upstream::clients::sha256_hex;
use crate::upstream::scenario::{fetch, ok, setup_configured};
use crate::upstream::{Gateway, Registry, Upstream};

fn total(data: &std::path::Path) -> u64 {
    stored(data).iter().map(|(_, _, size)| size).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_gc_evicts_least_recently_used_and_the_rest_is_still_served() {
    let registry = std::sync::Arc::new(Registry::new());
    let a = registry.publish_sized("alice/a", "1.0.0", 100 * 1024);
    let b = registry.publish_sized("alice/b", "1.0.0", 100 * 1024);
    let c = registry.publish_sized("alice/c", "1.0.0", 100 * 1024);
    let up = Upstream::start(registry.clone()).await;
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let warm = admin::run(&["warm", "alice/*"], Some(&data), Some(&up));
    assert!(warm.status.success(), "{}", stderr(&warm));
    assert_eq!(stored(&data).len(), 3);

    // Use a and c through the gateway: b is now the least recently used.
    let gw = Gateway::start_with_data_dir(&up.url(), &up.ca_pem, &data, &[]).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    for p in [&a, &c] {
        let (out, body, head) = fetch(&gw, &p.segment, &work.path().join("x.zip"));
        ok(&out, "download");
        assert!(head.contains("x-cache: hit"));
        assert_eq!(sha256_hex(&body), p.checksum);
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // last-use stamps are written off-thread

    let gc = admin::run(&["cache", "gc", "--max-size", "250 KiB"], Some(&data), None);
    assert!(gc.status.success(), "{}", stderr(&gc));
    assert!(
        stdout(&gc).contains("evicted archive/alice/b/1.0.0"),
        "{}",
        stdout(&gc)
    );
    assert!(
        total(&data) <= 250 * 1024,
        "store over the bound: {:?}",
        stored(&data)
    );
    up.clear_requests();
    for p in [&a, &c] {
        let (out, body, head) = fetch(&gw, &p.segment, &work.path().join("y.zip"));
        ok(&out, "download after gc");
        assert!(head.contains("x-cache: hit"), "{head}");
        assert_eq!(sha256_hex(&body), p.checksum);
    }
    // The evicted one is simply fetched again.
    let (out, body, head) = fetch(&gw, &b.segment, &work.path().join("z.zip"));
    ok(&out, "download of the evicted archive");
    assert!(head.contains("x-cache: miss"), "{head}");
    assert_eq!(sha256_hex(&body), b.checksum);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storage_max_size_keeps_the_running_gateway_within_its_bound() {
    let toml = "[storage]\nmax_size = \"250 KiB\"\ngc_interval = \"200ms\"\n";
    let (s, published) = setup_configured(toml, |r| {
        ["a", "b", "c"].map(|n| r.publish_sized(&format!("alice/{n}"), "1.0.0", 100 * 1024))
    })
    .await;
    let work = tempfile::tempdir().unwrap();
    for p in &published {
        let (out, body, _) = fetch(&s.gateway, &p.segment, &work.path().join("x.zip"));
        ok(&out, "download");
        assert_eq!(sha256_hex(&body), p.checksum);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while total(&s.gateway.data_dir) > 250 * 1024 {
        assert!(
            Instant::now() < deadline,
            "the store never came under its bound"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(s.gateway.log().contains("store kept within its size bound"));
    for p in &published {
        let (out, body, _) = fetch(&s.gateway, &p.segment, &work.path().join("y.zip"));
        ok(&out, "download after eviction");
        assert_eq!(sha256_hex(&body), p.checksum);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flipped_byte_is_caught_by_verify_and_never_served_as_complete() {
    let registry = std::sync::Arc::new(Registry::new());
    let small = registry.publish("alice/small", "1.0.0", &[]);
    let big = registry.publish_sized("alice/big", "1.0.0", 200 * 1024);
    let up = Upstream::start(registry.clone()).await;
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let warm = || admin::run(&["warm", "alice/*"], Some(&data), Some(&up));
    assert!(warm().status.success());

    // cache verify finds and removes it; a warm puts it back.
    flip_byte(&content_file(&data, &small.checksum), 10);
    let verify = admin::run(&["cache", "verify"], Some(&data), None);
    assert!(!verify.status.success(), "corruption must fail verify");
    assert!(
        stdout(&verify).contains("corrupt (removed): archive/alice/small/1.0.0"),
        "{}",
        stdout(&verify)
    );
    assert!(!stored(&data).iter().any(|(k, _, _)| k.contains("small")));
    assert!(warm().status.success());
    assert!(admin::run(&["cache", "verify"], Some(&data), None)
        .status
        .success());

    // serve: small entries are read whole and checked, big ones streamed with
    // the last chunk held back until the digest is checked.
    flip_byte(&content_file(&data, &small.checksum), 10);
    flip_byte(&content_file(&data, &big.checksum), 150 * 1024);
    let config = work.path().join("gw.toml");
    std::fs::write(&config, "[storage]\nmemory_item_max = \"16 KiB\"\n").unwrap();
    let gw = Gateway::start_with_data_dir(
        &up.url(),
        &up.ca_pem,
        &data,
        &["--config", config.to_str().unwrap()],
    )
    .await;
    up.clear_requests();
    let (out, body, head) = fetch(&gw, &small.segment, &work.path().join("s.zip"));
    ok(&out, "small archive");
    assert_eq!(sha256_hex(&body), small.checksum, "corrupt bytes served");
    assert!(head.contains("x-cache: miss"), "refetched: {head}");

    let (out, body, _) = fetch(&gw, &big.segment, &work.path().join("b.zip"));
    assert!(
        !out.status.success(),
        "a corrupt big entry was delivered as a complete transfer ({} bytes)",
        body.len()
    );
    assert!(body.len() < big.size as usize, "every byte was sent");
    let (out, body, head) = fetch(&gw, &big.segment, &work.path().join("b2.zip"));
    ok(&out, "big archive after the abort");
    assert_eq!(sha256_hex(&body), big.checksum);
    assert!(head.contains("x-cache: miss"), "{head}");
    assert_eq!(up.count("GET", &big.url_path()), 1, "refetched once");
    assert!(gw.log().contains("stored entry is corrupt"));
}
