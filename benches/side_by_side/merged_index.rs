//! Issue 12's cost of one registry from two sources: a gateway whose index is the
//! merge of an "internal" source with a long history (2,000 commits) and the
//! benchmark's public registry (its realistic 3,000-file index), against the same
//! gateway with the public source alone. Measured: the time from start until the
//! index answers (mirror clone, plus building the merged history), a shallow clone,
//! and a refresh after one publish upstream (appending one merged commit).

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::side_by_side::report::{Better, Row};
use crate::side_by_side::{index_clone, Bench};
use crate::upstream::clients;
use crate::upstream::{Gateway, Registry, Upstream};

/// Commits in the internal source's history.
const INTERNAL_COMMITS: usize = 2000;

pub async fn run(b: &mut Bench) {
    let internal = Arc::new(Registry::new());
    long_history(&internal, INTERNAL_COMMITS);
    let internal = Upstream::start(internal).await;
    let work = tempfile::tempdir().expect("work dir");
    let ca = work.path().join("cas.pem");
    let pems = [&internal.ca_pem, &b.upstream.ca_pem]
        .map(|p| std::fs::read_to_string(p).expect("an upstream CA"));
    std::fs::write(&ca, pems.concat()).expect("CA bundle");
    let merged_toml = format!(
        "[[sources]]\nname = \"internal\"\nregistry = \"{}\"\nclaims = [\"acme/*\"]\n\
         [[sources]]\nname = \"public\"\nregistry = \"{}\"\n[index]\nmax_age = \"10m\"\n",
        internal.url(),
        b.upstream.url()
    );
    let single_toml = format!(
        "[[sources]]\nname = \"public\"\nregistry = \"{}\"\n[index]\nmax_age = \"10m\"\n",
        b.upstream.url()
    );
    let configs = [("merged", merged_toml), ("single", single_toml)].map(|(name, toml)| {
        let path = work.path().join(format!("{name}.toml"));
        std::fs::write(&path, toml).expect("config");
        path
    });
    let home = work.path().join("home");
    std::fs::create_dir_all(&home).expect("git home");

    let (mut start_m, mut start_s) = (Vec::new(), Vec::new());
    let (mut clone_m, mut clone_s) = (Vec::new(), Vec::new());
    let (mut refresh_m, mut refresh_s) = (Vec::new(), Vec::new());
    for round in 0..b.rounds {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut gateways: Vec<Option<Gateway>> = vec![None, None];
        for &k in &order {
            let args = ["--config", configs[k].to_str().expect("UTF-8 path")];
            let started = Instant::now();
            let gw = Gateway::start_with_env("", &ca, &args, &[]).await;
            let url = format!("{}/git/index", gw.url());
            wait_for_index(&home, &url).await;
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            if k == 0 { &mut start_m } else { &mut start_s }.push(ms);
            gateways[k] = Some(gw);
        }
        for &k in &order {
            let gw = gateways[k].as_ref().expect("started");
            let url = format!("{}/git/index", gw.url());
            let dir = work.path().join(format!("clone-{round}-{k}"));
            let started = Instant::now();
            let out = index_clone::clone(&home, &ca, &url, &dir)
                .wait_with_output()
                .expect("wait for git clone");
            assert!(out.status.success(), "clone {url} failed");
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            if k == 0 { &mut clone_m } else { &mut clone_s }.push(ms);
            std::fs::remove_dir_all(&dir).ok();
        }
        b.upstream
            .registry
            .publish("bench/merged-refresh", &format!("0.{round}.0"), &[]);
        for &k in &order {
            let gw = gateways[k].as_ref().expect("started");
            let started = Instant::now();
            let out = b.curl(&[
                "-fsS",
                "-X",
                "POST",
                &format!("{}/-/index/refresh", gw.url()),
            ]);
            assert!(out.status.success(), "refresh failed");
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            if k == 0 {
                &mut refresh_m
            } else {
                &mut refresh_s
            }
            .push(ms);
        }
    }
    let peer_name = "same gateway, public source alone".to_string();
    let scenario = format!(
        "merged index: internal ({INTERNAL_COMMITS} commits) + public ({} files)",
        b.fixtures.index_files
    );
    for (metric, gateway, peer) in [
        ("start until the index answers", start_m, start_s),
        ("clone --depth 1", clone_m, clone_s),
        ("refresh after one publish", refresh_m, refresh_s),
    ] {
        b.rows.push(Row {
            scenario: scenario.clone(),
            metric: metric.into(),
            unit: "ms",
            better: Better::Lower,
            gateway,
            peer,
            peer_name: peer_name.clone(),
        });
    }
}

/// Poll `git ls-remote` until the index answers.
async fn wait_for_index(home: &std::path::Path, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = clients::run(clients::git(home).args(["ls-remote", url, "refs/heads/main"]));
        if out.status.success() && !out.stdout.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "{url} did not answer in 120 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `commits` commits on `main`, each adding or changing one `acme/*` index file,
/// written by one `git fast-import` (publishing them one by one would take minutes).
fn long_history(registry: &Registry, commits: usize) {
    let parent = registry.head();
    let mut stream = Vec::new();
    for i in 0..commits {
        let module = i % 500;
        let line = format!(
            "{{\"name\":\"acme/m{module}\",\"version\":\"0.{}.0\",\"checksum\":\"{}\"}}\n",
            i / 500,
            clients::sha256_hex(format!("acme/m{module}@{i}").as_bytes())
        );
        let message = format!("publish acme/m{module}");
        let _ = write!(
            stream,
            "commit refs/heads/main\ncommitter bench <bench@example.invalid> {} +0000\ndata {}\n{message}\n",
            1_700_000_000 + i,
            message.len()
        );
        if i == 0 {
            let _ = writeln!(stream, "from {parent}");
        }
        let _ = write!(
            stream,
            "M 100644 inline user/acme/m{module}.index\ndata {}\n{line}\n",
            line.len()
        );
    }
    let mut child = Command::new("git")
        .arg("-C")
        .arg(registry.git_dir())
        .args(["fast-import", "--quiet", "--force"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("git fast-import");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&stream)
        .expect("feed fast-import");
    assert!(child.wait().expect("fast-import").success());
}
