//! Issue 4's prefetch measurement: a cold `moon add` (the real client, fresh
//! MOON_HOME, fresh gateway data dir every run) of a module with 12 transitive
//! dependencies, through an upstream that adds 50 ms to every response, with the
//! gateway's dependency prefetch on (the default) against `prefetch = false`.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::side_by_side::report::{Better, Row};
use crate::side_by_side::{instances, Bench};
use crate::upstream::scenario::{moon, moon_bin, ok};
use crate::upstream::Fault;

const UPSTREAM_DELAY: Duration = Duration::from_millis(50);

pub async fn run(b: &mut Bench) {
    let Some(bin) = moon_bin() else {
        let msg = "SKIPPED moon add scenario: set MOON_BIN to the moon client".to_string();
        eprintln!("{msg}");
        b.notes.push(msg);
        return;
    };
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for round in 0..b.rounds {
        for k in 0..2 {
            let prefetch = (k + round) % 2 == 0;
            let ms = cold_add(b, &bin, prefetch, round).await;
            if prefetch {
                on.push(ms);
            } else {
                off.push(ms);
            }
        }
    }
    b.rows.push(Row {
        scenario: format!(
            "cold moon add, {} transitive deps, upstream +50 ms/response",
            b.fixtures.app_deps
        ),
        metric: "moon add".into(),
        unit: "ms",
        better: Better::Lower,
        gateway: on,
        peer: off,
        peer_name: "same gateway, prefetch = false".into(),
    });
}

async fn cold_add(b: &Bench, bin: &Path, prefetch: bool, round: usize) -> f64 {
    // A top-level key: it must come before the `[index]` table.
    let config = format!("prefetch = {prefetch}\n{}", instances::BASE_CONFIG);
    let gw = instances::start(&b.upstream, &config).await;
    let work = tempfile::tempdir().expect("moon work dir");
    let home = work.path().join("moon-home");
    let cwd = work.path().join("work");
    std::fs::create_dir_all(&cwd).expect("moon cwd");
    let url = gw.url();
    ok(
        &moon(
            bin,
            &home,
            &cwd,
            &url,
            &["new", "proj", "--user", "bencher"],
        ),
        "moon new",
    );
    let proj = cwd.join("proj");
    b.upstream.set_fault(Fault::DelayEach(UPSTREAM_DELAY));
    let started = Instant::now();
    let out = moon(bin, &home, &proj, &url, &["add", &b.fixtures.app.name]);
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    b.upstream.set_fault(Fault::None);
    ok(
        &out,
        &format!("moon add (round {round}, prefetch {prefetch})"),
    );
    let fetched = std::fs::read_dir(proj.join(".mooncakes/bench"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(
        fetched,
        b.fixtures.app_deps + 1,
        "moon add did not unpack every module"
    );
    ms
}
