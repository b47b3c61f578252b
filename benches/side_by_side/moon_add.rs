//! Cold `moon add` (the real client, fresh MOON_HOME, fresh gateway data dir every
//! run) of a module with a dozen transitive dependencies, through an upstream that
//! adds a delay to every response:
//! - issue 4: the gateway's dependency prefetch on (the default) against
//!   `prefetch = false`, in time and in upstream archive requests (prefetch follows
//!   moon's minimal version selection, so it must fetch exactly what moon asks for);
//! - issue 16: a cold CI job, `moonbit-registry warm --from moon.mod.json` and then
//!   `moon add` through the gateway, against `moon add` straight from the upstream
//!   (and, with `BENCH_BASELINE_BIN`, the same job with that build of the gateway).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::side_by_side::report::{Better, Row};
use crate::side_by_side::{instances, Bench};
use crate::upstream::scenario::{moon, moon_bin, moon_command, ok};
use crate::upstream::{admin, Fault};

const UPSTREAM_DELAY: Duration = Duration::from_millis(50);
/// The cold CI job's upstream: 100 ms more per response, like a distant registry.
const JOB_DELAY: Duration = Duration::from_millis(100);

pub async fn run(b: &mut Bench) {
    let Some(bin) = moon_bin() else {
        let msg = "SKIPPED moon add scenarios: set MOON_BIN to the moon client".to_string();
        eprintln!("{msg}");
        b.notes.push(msg);
        return;
    };
    prefetch(b, &bin).await;
    cold_job(b, &bin).await;
}

async fn prefetch(b: &mut Bench, bin: &Path) {
    let (mut on, mut off) = (Vec::new(), Vec::new());
    let (mut gets_on, mut gets_off) = (Vec::new(), Vec::new());
    for round in 0..b.rounds {
        for k in 0..2 {
            let prefetch = (k + round) % 2 == 0;
            let (ms, gets) = cold_add(b, bin, prefetch, round).await;
            if prefetch {
                on.push(ms);
                gets_on.push(gets as f64);
            } else {
                off.push(ms);
                gets_off.push(gets as f64);
            }
        }
    }
    let scenario = format!(
        "cold moon add, {} transitive deps, upstream +50 ms/response",
        b.fixtures.app_deps
    );
    let peer_name = "same gateway, prefetch = false".to_string();
    b.rows.push(Row {
        scenario: scenario.clone(),
        metric: "moon add".into(),
        unit: "ms",
        better: Better::Lower,
        gateway: on,
        peer: off,
        peer_name: peer_name.clone(),
    });
    b.rows.push(Row {
        scenario,
        metric: "upstream archive requests".into(),
        unit: "count",
        better: Better::Lower,
        gateway: gets_on,
        peer: gets_off,
        peer_name,
    });
}

/// One cold `moon add` through a fresh gateway: (milliseconds, archive requests
/// the upstream saw until the gateway's background fetches had settled).
async fn cold_add(b: &Bench, bin: &Path, prefetch: bool, round: usize) -> (f64, usize) {
    // A top-level key: it must come before the `[index]` table.
    let config = format!("prefetch = {prefetch}\n{}", instances::BASE_CONFIG);
    let gw = instances::start(&b.upstream, &config).await;
    let work = tempfile::tempdir().expect("moon work dir");
    let home = work.path().join("moon-home");
    let proj = new_project(bin, &home, work.path(), &gw.url());
    let before = archive_gets(b);
    b.upstream.set_fault(Fault::DelayEach(UPSTREAM_DELAY));
    let started = Instant::now();
    let out = moon(bin, &home, &proj, &gw.url(), &["add", &b.fixtures.app.name]);
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    ok(
        &out,
        &format!("moon add (round {round}, prefetch {prefetch})"),
    );
    // Prefetches still running would be counted late: let them finish.
    tokio::time::sleep(UPSTREAM_DELAY * 4).await;
    b.upstream.set_fault(Fault::None);
    assert_unpacked(b, &proj);
    (ms, archive_gets(b) - before)
}

/// The cold CI job of issue 16, against the same `moon add` made straight to the
/// upstream (over TLS), interleaved: once from nothing (moon's own clone of the
/// index inside `moon add`, as long on both sides), and once with the index
/// already fetched by an untimed `moon update`, as the issue measured it.
async fn cold_job(b: &mut Bench, bin: &Path) {
    let baseline = instances::baseline();
    // The gateway under test, straight from the upstream, and the baseline build.
    let contenders = if baseline.is_some() { 3 } else { 2 };
    for index_fetched in [false, true] {
        let (mut job, mut direct, mut warm) = (Vec::new(), Vec::new(), Vec::new());
        let (mut job_before, mut warm_before) = (Vec::new(), Vec::new());
        for round in 0..b.rounds {
            for k in 0..contenders {
                match (k + round) % contenders {
                    0 => {
                        let (warm_ms, add_ms) = warm_then_add(b, bin, index_fetched, None).await;
                        warm.push(warm_ms);
                        job.push(warm_ms + add_ms);
                    }
                    1 => direct.push(direct_add(b, bin, index_fetched)),
                    _ => {
                        let (warm_ms, add_ms) =
                            warm_then_add(b, bin, index_fetched, baseline.as_deref()).await;
                        warm_before.push(warm_ms);
                        job_before.push(warm_ms + add_ms);
                    }
                }
            }
        }
        let index = if index_fetched {
            ", index already fetched"
        } else {
            ""
        };
        let scenario = format!(
            "cold CI job{index}, {} transitive deps, upstream +100 ms/response",
            b.fixtures.app_deps
        );
        let (job_ms, direct_ms) = (median(&mut job.clone()), median(&mut direct.clone()));
        b.rows.push(Row {
            scenario: scenario.clone(),
            metric: "warm --from moon.mod.json + moon add".into(),
            unit: "ms",
            better: Better::Lower,
            gateway: job.clone(),
            peer: direct,
            peer_name: "moon add straight from the upstream (TLS)".into(),
        });
        b.notes.push(format!(
            "cold CI job{index}: warm --from moon.mod.json took {:.0} ms (median) of the job; \
             the job took {:.2}x the direct moon add's time",
            median(&mut warm),
            job_ms / direct_ms
        ));
        if !job_before.is_empty() {
            b.notes.push(format!(
                "cold CI job{index}, gateway before (BENCH_BASELINE_BIN): {:.0} ms, {:.2}x the \
                 direct moon add's time (warm {:.0} ms)",
                median(&mut job_before.clone()),
                median(&mut job_before.clone()) / direct_ms,
                median(&mut warm_before)
            ));
            b.rows.push(Row {
                scenario,
                metric: "warm --from moon.mod.json + moon add".into(),
                unit: "ms",
                better: Better::Lower,
                gateway: job,
                peer: job_before,
                peer_name: "gateway before (BENCH_BASELINE_BIN)".into(),
            });
        }
    }
}

/// A fresh gateway (the build `gateway`, else the one under test); `warm --from
/// moon.mod.json` of the same build on its data dir, then `moon add` through it:
/// (warm ms, moon add ms). With `index_fetched`, moon's index is cloned first,
/// untimed.
async fn warm_then_add(
    b: &Bench,
    bin: &Path,
    index_fetched: bool,
    gateway: Option<&Path>,
) -> (f64, f64) {
    let gw = instances::start_build(&b.upstream, instances::BASE_CONFIG, gateway, &[]).await;
    let work = tempfile::tempdir().expect("moon work dir");
    let home = work.path().join("moon-home");
    let proj = new_project(bin, &home, work.path(), &gw.url());
    if index_fetched {
        ok(
            &moon(bin, &home, &proj, &gw.url(), &["update"]),
            "moon update",
        );
    }
    let manifest = work.path().join("moon.mod.json");
    let (_, version) = b
        .fixtures
        .app
        .key
        .rsplit_once('/')
        .expect("user/module/version");
    std::fs::write(
        &manifest,
        format!(
            "{{\"name\":\"bencher/proj\",\"version\":\"0.1.0\",\"deps\":{{\"{}\":\"{version}\"}}}}",
            b.fixtures.app.name
        ),
    )
    .expect("write moon.mod.json");
    b.upstream.set_fault(Fault::DelayEach(JOB_DELAY));
    let started = Instant::now();
    let args = [
        "warm",
        "--from",
        manifest.to_str().expect("UTF-8 temp path"),
    ];
    let data: Option<&Path> = Some(&gw.gateway.data_dir);
    let mut warm = match gateway {
        Some(build) => admin::build_command(build, &args, data, Some(&b.upstream)),
        None => admin::command(&args, data, Some(&b.upstream)),
    };
    let warmed = warm.output().expect("run moonbit-registry warm");
    let warm_ms = started.elapsed().as_secs_f64() * 1000.0;
    ok(&warmed, "moonbit-registry warm --from moon.mod.json");
    let started = Instant::now();
    let out = moon(bin, &home, &proj, &gw.url(), &["add", &b.fixtures.app.name]);
    let add_ms = started.elapsed().as_secs_f64() * 1000.0;
    b.upstream.set_fault(Fault::None);
    ok(&out, "moon add after warm");
    assert_unpacked(b, &proj);
    (warm_ms, add_ms)
}

/// `moon add` with `MOONCAKES_REGISTRY` the upstream itself, trusting its CA
/// (with `index_fetched`, after an untimed `moon update`).
fn direct_add(b: &Bench, bin: &Path, index_fetched: bool) -> f64 {
    let work = tempfile::tempdir().expect("moon work dir");
    let home = work.path().join("moon-home");
    let url = b.upstream.url();
    let proj = new_project(bin, &home, work.path(), &url);
    if index_fetched {
        let out = trusting(bin, b, &home, &proj, &url)
            .arg("update")
            .output()
            .expect("run moon");
        ok(&out, "moon update straight from the upstream");
    }
    b.upstream.set_fault(Fault::DelayEach(JOB_DELAY));
    let started = Instant::now();
    let out = trusting(bin, b, &home, &proj, &url)
        .args(["add", &b.fixtures.app.name])
        .output()
        .expect("run moon");
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    b.upstream.set_fault(Fault::None);
    ok(&out, "moon add straight from the upstream");
    assert_unpacked(b, &proj);
    ms
}

/// moon as `scenario::moon` runs it, plus trust of the test CA (for `registry`
/// the upstream itself, over TLS).
fn trusting(bin: &Path, b: &Bench, home: &Path, cwd: &Path, registry: &str) -> Command {
    let mut cmd = moon_command(bin, home, cwd, registry);
    cmd.env("SSL_CERT_FILE", &b.upstream.ca_pem)
        .env("GIT_SSL_CAINFO", &b.upstream.ca_pem);
    cmd
}

/// `moon new proj` in `dir/work` (no registry traffic); the project's directory.
fn new_project(bin: &Path, home: &Path, dir: &Path, registry: &str) -> std::path::PathBuf {
    let cwd = dir.join("work");
    std::fs::create_dir_all(&cwd).expect("moon cwd");
    ok(
        &moon(
            bin,
            home,
            &cwd,
            registry,
            &["new", "proj", "--user", "bencher"],
        ),
        "moon new",
    );
    cwd.join("proj")
}

fn assert_unpacked(b: &Bench, proj: &Path) {
    let fetched = std::fs::read_dir(proj.join(".mooncakes/bench"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(
        fetched,
        b.fixtures.app_deps + 1,
        "moon add did not unpack every module"
    );
}

fn archive_gets(b: &Bench) -> usize {
    b.upstream.count("GET", "/user/")
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}
