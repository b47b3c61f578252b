//! Scenario 4 (and issue 4): `git clone --depth 1` of a realistic index through the
//! gateway (answered from its mirror) against straight from the upstream's
//! `git http-backend`, one clone alone and 16 at once.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use crate::side_by_side::report::{Better, Row};
use crate::side_by_side::{instances, Bench};
use crate::upstream::clients;

pub async fn run(b: &mut Bench) {
    let gw = instances::start(&b.upstream, instances::BASE_CONFIG).await;
    let through = format!("{}/git/index", gw.url());
    // The same gateway without its pack cache, to show what the cache is worth.
    let plain_config = format!("{}pack_cache = false\n", instances::BASE_CONFIG);
    let plain = instances::start(&b.upstream, &plain_config).await;
    let uncached = format!("{}/git/index", plain.url());
    let direct = b.upstream.index_url();
    let work = tempfile::tempdir().expect("clone dir");
    let home = work.path().join("home");
    std::fs::create_dir_all(&home).expect("git home");
    let expected = b.fixtures.index_files;
    let mut n = 0;
    // Each run's wall time, and the CPU the serving gateway (with its git
    // children) spent per clone; the direct upstream is this process, not measured.
    let mut clones = |url: &str, pid: Option<u32>, count: usize| -> (f64, f64) {
        n += 1;
        let cpu_before = pid.map_or(0.0, instances::cpu_ms);
        let dirs: Vec<_> = (0..count)
            .map(|i| work.path().join(format!("run{n}-{i}")))
            .collect();
        let started = Instant::now();
        let children: Vec<Child> = dirs
            .iter()
            .map(|dir| clone(&home, &b.upstream.ca_pem, url, dir))
            .collect();
        for child in children {
            let out = child.wait_with_output().expect("wait for git clone");
            assert!(
                out.status.success(),
                "git clone {url} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        // git's CPU time reaches the gateway's counters when it reaps git, which may
        // come just after the client is done: let that happen inside this window.
        if pid.is_some() {
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        let cpu = pid.map_or(0.0, |p| (instances::cpu_ms(p) - cpu_before) / count as f64);
        for dir in &dirs {
            let files = count_index_files(&dir.join("user"));
            assert!(
                files >= expected,
                "{url}: clone has {files} index files, expected {expected}+"
            );
            std::fs::remove_dir_all(dir).expect("remove clone");
        }
        (ms, cpu)
    };
    let (gw_pid, plain_pid) = (Some(gw.pid()), Some(plain.pid()));
    for count in [1, 16] {
        let (mut g, mut d, mut u) = (Vec::new(), Vec::new(), Vec::new());
        let (mut g_cpu, mut u_cpu) = (Vec::new(), Vec::new());
        for round in 0..b.rounds {
            // Alternate the order, so no side always runs first.
            let order: [usize; 3] = if round % 2 == 0 { [0, 1, 2] } else { [2, 1, 0] };
            for side in order {
                match side {
                    0 => {
                        let (ms, cpu) = clones(&through, gw_pid, count);
                        g.push(ms);
                        g_cpu.push(cpu);
                    }
                    1 => d.push(clones(&direct, None, count).0),
                    _ => {
                        let (ms, cpu) = clones(&uncached, plain_pid, count);
                        u.push(ms);
                        u_cpu.push(cpu);
                    }
                }
            }
        }
        b.rows.push(Row {
            scenario: format!(
                "index clone --depth 1 ({} files, {:.1} MiB)",
                b.fixtures.index_files,
                b.fixtures.index_bytes as f64 / (1 << 20) as f64
            ),
            metric: format!("{count} concurrent"),
            unit: "ms",
            better: Better::Lower,
            gateway: g.clone(),
            peer: d,
            peer_name: "git http-backend direct (TLS)".into(),
        });
        b.rows.push(Row {
            scenario: "index clone --depth 1, pack cache".into(),
            metric: format!("{count} concurrent"),
            unit: "ms",
            better: Better::Lower,
            gateway: g,
            peer: u,
            peer_name: "same gateway, pack_cache = false".into(),
        });
        b.rows.push(Row {
            scenario: "index clone --depth 1, server CPU per clone (gateway + git)".into(),
            metric: format!("{count} concurrent"),
            unit: "ms",
            better: Better::Lower,
            gateway: g_cpu,
            peer: u_cpu,
            peer_name: "same gateway, pack_cache = false".into(),
        });
    }
    drop(gw);
    drop(plain);
}

/// `git clone --depth 1 --single-branch --no-tags URL DIR` as moon runs it, isolated
/// from this machine's git config, trusting the test CA for the direct clone.
pub fn clone(home: &Path, ca_pem: &Path, url: &str, dir: &Path) -> Child {
    let mut cmd: Command = clients::git_trusting(home, ca_pem);
    cmd.args([
        "clone",
        "--quiet",
        "--depth",
        "1",
        "--single-branch",
        "--no-tags",
        url,
    ])
    .arg(dir)
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap_or_else(|e| panic!("cannot run git: {e}"))
}

fn count_index_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| {
            let path = e.path();
            if path.is_dir() {
                count_index_files(&path)
            } else {
                usize::from(path.extension().is_some_and(|x| x == "index"))
            }
        })
        .sum()
}
