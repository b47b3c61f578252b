//! Ahead of time and offline: `warm` fetches exactly a dependency closure and
//! resumes after being killed; `export` / `import` carry it to a fresh data dir;
//! `serve --offline` answers clones and archives with the upstream stopped; damaged
//! or wrongly signed bundles are refused and change nothing. Real binary, real
//! test upstream, real `git`, `curl` and (with MOON_BIN) `moon`.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::upstream::admin::{self, flip_byte, stderr, stdout, stored, tree};
use crate::upstream::clients::sha256_hex;
use crate::upstream::scenario::{clone_index, curl, fetch, moon, moon_bin, ok};
use crate::upstream::{Fault, Gateway, Published, Registry, Upstream};

/// alice/app 1.0.0 -> alice/json 0.1.0 -> alice/core 0.1.0, and
/// alice/app 1.0.0 -> bob/lex/runtime 0.2.0+build7 -> alice/core 0.2.0.
/// Minimal version selection picks alice/core 0.2.0 only.
struct Modules {
    closure: Vec<Published>,
    core_old: Published,
    unrelated: Vec<Published>,
}

fn publish(r: &Registry) -> Modules {
    let core_old = r.publish("alice/core", "0.1.0", &[]);
    let core = r.publish("alice/core", "0.2.0", &[]);
    let json = r.publish("alice/json", "0.1.0", &[("alice/core", "0.1.0")]);
    let lex = r.publish(
        "bob/lex/runtime",
        "0.2.0+build7",
        &[("alice/core", "0.2.0")],
    );
    let app = r.publish(
        "alice/app",
        "1.0.0",
        &[("alice/json", "0.1.0"), ("bob/lex/runtime", "0.2.0+build7")],
    );
    let json_new = r.publish("alice/json", "0.2.0", &[]);
    let other = r.publish("carol/x", "1.0.0", &[]);
    Modules {
        closure: vec![app, json, lex, core],
        core_old,
        unrelated: vec![json_new, other],
    }
}

/// A project whose only dependency is alice/app.
fn project(dir: &Path, deps: &str) -> std::path::PathBuf {
    let file = dir.join("moon.mod.json");
    std::fs::write(
        &file,
        format!("{{\"name\":\"tester/proj\",\"version\":\"0.1.0\",\"deps\":{{{deps}}}}}"),
    )
    .unwrap();
    file
}

fn archive_gets(up: &Upstream) -> usize {
    up.count("GET", "/user/")
}

fn succeeded(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        stdout(out),
        stderr(out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn warm_fetches_exactly_the_closure_once_and_reports_what_is_missing() {
    let registry = std::sync::Arc::new(Registry::new());
    let m = publish(&registry);
    let up = Upstream::start(registry.clone()).await;
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let from = project(work.path(), "\"alice/app\":\"1.0.0\"");
    let from = from.to_str().unwrap();

    let dry = admin::run(
        &["warm", "--dry-run", "--from", from],
        Some(&data),
        Some(&up),
    );
    succeeded(&dry, "warm --dry-run");
    assert!(
        stdout(&dry).contains("dry run: 4 to fetch"),
        "{}",
        stdout(&dry)
    );
    assert_eq!(
        archive_gets(&up),
        0,
        "a dry run downloaded: {:?}",
        up.requests()
    );

    let first = admin::run(
        &["warm", "--from", from, "--jobs", "2"],
        Some(&data),
        Some(&up),
    );
    succeeded(&first, "warm");
    assert!(
        stdout(&first).contains("warm: 4 fetched"),
        "{}",
        stdout(&first)
    );
    for p in &m.closure {
        assert_eq!(up.count("GET", &p.url_path()), 1, "{} fetched once", p.key);
    }
    assert_eq!(
        archive_gets(&up),
        4,
        "only the closure: {:?}",
        up.requests()
    );
    assert_eq!(
        up.count("GET", &m.core_old.url_path()),
        0,
        "MVS picks alice/core 0.2.0"
    );
    for p in &m.unrelated {
        assert_eq!(up.count("GET", &p.url_path()), 0);
    }
    let keys: Vec<String> = stored(&data).into_iter().map(|(k, _, _)| k).collect();
    assert_eq!(keys.len(), 4, "{keys:?}");

    let again = admin::run(&["warm", "--from", from], Some(&data), Some(&up));
    succeeded(&again, "second warm");
    assert!(
        stdout(&again).contains("warm: 0 fetched (0 B), 4 already present"),
        "{}",
        stdout(&again)
    );
    assert_eq!(archive_gets(&up), 4, "the second run downloaded");

    // Patterns and --latest; a missing dependency is named and fails the run.
    let latest = admin::run(
        &["warm", "alice/json@^0.1", "carol/*", "--latest"],
        Some(&data),
        Some(&up),
    );
    succeeded(&latest, "warm patterns");
    assert!(
        stdout(&latest).contains("warm: 1 fetched"),
        "{}",
        stdout(&latest)
    );
    assert_eq!(up.count("GET", &m.unrelated[1].url_path()), 1);
    let ghost = project(
        work.path(),
        "\"alice/app\":\"1.0.0\",\"alice/ghost\":\"9.9.9\"",
    );
    let missing = admin::run(
        &["warm", "--from", ghost.to_str().unwrap()],
        Some(&data),
        Some(&up),
    );
    assert!(
        !missing.status.success(),
        "a missing dependency must fail the run"
    );
    assert!(
        stdout(&missing).contains("alice/ghost@9.9.9"),
        "{}",
        stdout(&missing)
    );
}

/// `warm` downloads what the mirror selects while it refreshes, and the
/// refreshed index decides: what was published since is fetched too, and what
/// it no longer selects is not reported. A refresh that finds nothing new costs
/// one request to the upstream (git's v0 ref advertisement).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn warm_fetches_what_the_refreshed_index_selects_and_an_unchanged_index_costs_one_request() {
    let registry = std::sync::Arc::new(Registry::new());
    let m = publish(&registry);
    let up = Upstream::start(registry.clone()).await;
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let from = project(work.path(), "\"alice/app\":\"1.0.0\"");
    let from = from.to_str().unwrap();
    let warm = |args: &[&str]| {
        let out = admin::run(args, Some(&data), Some(&up));
        succeeded(&out, &format!("warm {args:?}"));
        stdout(&out)
    };
    let first = warm(&["warm", "--from", from]);
    assert!(first.contains("warm: 4 fetched"), "{first}");

    up.clear_requests();
    let again = warm(&["warm", "--from", from]);
    assert!(
        again.contains("warm: 0 fetched (0 B), 4 already present"),
        "{again}"
    );
    assert_eq!(
        up.requests(),
        vec![(
            "GET".to_string(),
            "/git/index/info/refs?service=git-upload-pack".to_string()
        )],
        "an index with nothing new, every archive stored: one ref advertisement"
    );

    // Published after the mirror's last refresh: the mirror cannot select it,
    // the refreshed index does.
    let core3 = registry.publish("alice/core", "0.3.0", &[]);
    let app11 = registry.publish(
        "alice/app",
        "1.1.0",
        &[("alice/json", "0.1.0"), ("alice/core", "0.3.0")],
    );
    project(work.path(), "\"alice/app\":\"1.1.0\"");
    up.clear_requests();
    let newer = warm(&["warm", "--from", from]);
    assert!(
        newer.contains("warm: 2 fetched") && newer.contains("1 already present"),
        "{newer}"
    );
    for p in [&core3, &app11] {
        assert_eq!(up.count("GET", &p.url_path()), 1, "{} fetched once", p.key);
    }
    assert_eq!(archive_gets(&up), 2, "{:?}", up.requests());

    // The mirror's newest alice/core (0.3.0, stored) is superseded by 0.4.0:
    // only 0.4.0 is the run's, fetched once.
    let core4 = registry.publish("alice/core", "0.4.0", &[]);
    up.clear_requests();
    let latest = warm(&["warm", "alice/core", "--latest"]);
    assert!(
        latest.contains("warm: 1 fetched") && latest.contains("0 already present"),
        "{latest}"
    );
    assert_eq!(up.count("GET", &core4.url_path()), 1);
    assert_eq!(archive_gets(&up), 1, "{:?}", up.requests());
    assert_eq!(up.count("GET", &m.core_old.url_path()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_warm_killed_midway_leaves_nothing_half_written_and_resumes() {
    let registry = std::sync::Arc::new(Registry::new());
    let big = registry.publish_sized("alice/big", "1.0.0", 256 * 1024);
    let small = registry.publish("alice/small", "1.0.0", &[]);
    let up = Upstream::start(registry.clone()).await;
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    up.set_fault(Fault::SlowArchives {
        chunk: 4096,
        interval: Duration::from_millis(50),
    });
    let mut child = admin::spawn(&["warm", "alice/*"], &data, &up);
    let deadline = Instant::now() + Duration::from_secs(20);
    while up.count("GET", &big.url_path()) == 0 {
        assert!(
            Instant::now() < deadline,
            "warm never asked for the big archive"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    assert!(
        !stored(&data)
            .iter()
            .any(|(k, _, _)| k.contains("alice/big")),
        "a half download became visible"
    );

    up.set_fault(Fault::None);
    let rerun = admin::run(&["warm", "alice/*"], Some(&data), Some(&up));
    succeeded(&rerun, "warm after the kill");
    let entries = stored(&data);
    for p in [&big, &small] {
        assert!(
            entries
                .iter()
                .any(|(k, sha, _)| k.ends_with(&p.key) && *sha == p.checksum),
            "{} not stored after the rerun: {entries:?}",
            p.key
        );
    }
    let verify = admin::run(&["cache", "verify"], Some(&data), None);
    succeeded(&verify, "cache verify");
    let leftovers: Vec<_> = tree(&data)
        .into_iter()
        .filter(|(p, _)| p.starts_with(".spool-") && !p.ends_with('/'))
        .collect();
    assert!(
        leftovers.is_empty(),
        "spool files of the killed run remain: {leftovers:?}"
    );
}

/// Export (signed) from a warm gateway data dir; returns the bundle path.
fn export(
    up: &Upstream,
    work: &Path,
    from: &str,
    key: Option<&Path>,
    name: &str,
) -> std::path::PathBuf {
    let data = work.join(format!("export-data-{name}"));
    let out = work.join(format!("{name}.tar"));
    let mut args = vec!["export", "--from", from, "--out", out.to_str().unwrap()];
    if let Some(key) = key {
        args.extend(["--sign-key", key.to_str().unwrap()]);
    }
    let res = admin::run(&args, Some(&data), Some(up));
    succeeded(&res, "export");
    assert!(stdout(&res).contains("4 archives"), "{}", stdout(&res));
    out
}

fn keygen(work: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = work.join(name);
    succeeded(
        &admin::run(&["keygen", key.to_str().unwrap()], None, None),
        "keygen",
    );
    let public = work.join(format!("{name}.pub"));
    (key, public)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_imported_bundle_serves_the_closure_offline_with_the_upstream_stopped() {
    let registry = std::sync::Arc::new(Registry::new());
    let m = publish(&registry);
    let up = Upstream::start(registry.clone()).await;
    let work = tempfile::tempdir().unwrap();
    let from = project(work.path(), "\"alice/app\":\"1.0.0\"");
    let (key, public) = keygen(work.path(), "signer");
    let bundle = export(
        &up,
        work.path(),
        from.to_str().unwrap(),
        Some(&key),
        "signed",
    );

    let data = work.path().join("offline-data");
    let imported = admin::run(
        &[
            "import",
            bundle.to_str().unwrap(),
            "--trust-key",
            public.to_str().unwrap(),
        ],
        Some(&data),
        None,
    );
    succeeded(&imported, "import");
    assert!(
        stdout(&imported).contains("4 archives added"),
        "{}",
        stdout(&imported)
    );

    up.stop().await;
    up.clear_requests();
    let gw = Gateway::start_with_data_dir(&up.url(), &up.ca_pem, &data, &["--offline"]).await;
    let clone_dir = work.path().join("clone");
    ok(
        &clone_index(&gw, &clone_dir, "2", &["--depth", "1"]),
        "shallow clone offline",
    );
    assert!(clone_dir.join("user/alice/app.index").is_file());
    for p in &m.closure {
        let (out, body, head) = fetch(&gw, &p.segment, &work.path().join("a.zip"));
        ok(&out, "download offline");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{}", p.key);
        assert_eq!(sha256_hex(&body), p.checksum, "{}", p.key);
        assert!(head.contains("x-cache: hit"), "{head}");
    }
    let (out, _, _) = fetch(&gw, &m.core_old.segment, &work.path().join("old.zip"));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "404",
        "not in the bundle: a 404"
    );
    let api = curl(&[
        "-w",
        "%{http_code}",
        &format!("{}/api/v0/search?kw=x", gw.url()),
    ]);
    let text = String::from_utf8_lossy(&api.stdout);
    assert!(text.ends_with("503") && text.contains("offline"), "{text}");
    let symbols = curl(&[
        "-f",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{}/symbols.zip", gw.url()),
    ]);
    ok(&symbols, "symbols.zip offline");
    assert!(
        up.requests().is_empty(),
        "the offline gateway reached the upstream"
    );

    let Some(bin) = moon_bin() else {
        eprintln!("SKIPPED the moon part of an_imported_bundle_serves_the_closure_offline: set MOON_BIN to the moon client");
        return;
    };
    let home = work.path().join("moon-home");
    let cwd = work.path().join("moon-work");
    std::fs::create_dir_all(&cwd).unwrap();
    let url = gw.url();
    ok(
        &moon(
            &bin,
            &home,
            &cwd,
            &url,
            &["new", "proj", "--user", "tester"],
        ),
        "moon new",
    );
    let proj = cwd.join("proj");
    let update = moon(&bin, &home, &proj, &url, &["update"]);
    ok(&update, "moon update");
    let add = moon(&bin, &home, &proj, &url, &["add", "alice/app"]);
    ok(&add, "moon add");
    for out in [&update, &add] {
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(
            !err.contains("warn") && !err.contains("fail"),
            "moon complained: {err}"
        );
    }
    for dir in ["alice/app", "alice/json", "bob/lex+runtime", "alice/core"] {
        assert!(
            proj.join(".mooncakes")
                .join(dir)
                .join("moon.mod.json")
                .is_file(),
            "{dir} missing after moon add"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn damaged_and_wrongly_signed_bundles_are_refused_and_change_nothing() {
    let registry = std::sync::Arc::new(Registry::new());
    let m = publish(&registry);
    let up = Upstream::start(registry.clone()).await;
    let work = tempfile::tempdir().unwrap();
    let from = project(work.path(), "\"alice/app\":\"1.0.0\"");
    let from = from.to_str().unwrap();
    let (key_a, pub_a) = keygen(work.path(), "a");
    let (key_b, _) = keygen(work.path(), "b");
    let good = export(&up, work.path(), from, Some(&key_a), "good");
    let other = export(&up, work.path(), from, Some(&key_b), "other");
    let unsigned = export(&up, work.path(), from, None, "unsigned");

    // One byte flipped inside an archive member.
    let flipped = work.path().join("flipped.tar");
    std::fs::copy(&good, &flipped).unwrap();
    let bytes = std::fs::read(&flipped).unwrap();
    let at = bytes
        .windows(m.closure[0].zip.len().min(32))
        .position(|w| w == &m.closure[0].zip[..w.len()])
        .expect("the archive is in the bundle");
    flip_byte(&flipped, at + 40);

    let data = work.path().join("target-data");
    std::fs::create_dir_all(&data).unwrap();
    let before = tree(&data);
    let trust = pub_a.to_str().unwrap();
    for (bundle, trusted, reason) in [
        (&flipped, false, "damaged"),
        (&flipped, true, "damaged"),
        (&other, true, "not by the trusted key"),
        (&unsigned, true, "not signed"),
    ] {
        let mut args = vec!["import", bundle.to_str().unwrap()];
        if trusted {
            args.extend(["--trust-key", trust]);
        }
        let out = admin::run(&args, Some(&data), None);
        assert!(!out.status.success(), "{} was accepted", bundle.display());
        assert!(stderr(&out).contains(reason), "{reason}: {}", stderr(&out));
        assert_eq!(tree(&data), before, "a refused import changed the data dir");
    }
    succeeded(
        &admin::run(
            &["import", good.to_str().unwrap(), "--trust-key", trust],
            Some(&data),
            None,
        ),
        "import of the good bundle",
    );
    assert_eq!(stored(&data).len(), 5, "4 archives and symbols.zip");
}
