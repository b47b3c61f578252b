//! The gateway binary's one-shot commands (`warm`, `export`, `import`, `keygen`,
//! `cache`), run the way an operator runs them, isolated from the developer's
//! environment like the served gateway.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use super::clients::without_proxies;
use super::Upstream;

const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_moonbit-registry");

/// `moonbit-registry <args>` with `--data-dir`, `--upstream` and `--upstream-ca`
/// of `upstream` appended when `data_dir` is given (every command but `keygen`).
pub fn command(args: &[&str], data_dir: Option<&Path>, upstream: Option<&Upstream>) -> Command {
    build_command(Path::new(GATEWAY_BIN), args, data_dir, upstream)
}

/// [`command`] of the binary `bin` (another build of the gateway, e.g. the one
/// before a change, for a benchmark to compare with).
pub fn build_command(
    bin: &Path,
    args: &[&str],
    data_dir: Option<&Path>,
    upstream: Option<&Upstream>,
) -> Command {
    let mut cmd = Command::new(bin);
    without_proxies(&mut cmd);
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("MOONBIT_REGISTRY") || k.starts_with("MOONCAKES_") {
            cmd.env_remove(&key);
        }
    }
    cmd.args(args).env("RUST_LOG", "moonbit_registry=info");
    if let Some(dir) = data_dir {
        cmd.arg("--data-dir").arg(dir);
    }
    if let Some(up) = upstream {
        cmd.arg("--upstream")
            .arg(up.url())
            .arg("--upstream-ca")
            .arg(&up.ca_pem);
    }
    // Run from a directory without a moonbit-registry.toml.
    cmd.current_dir(std::env::temp_dir());
    cmd
}

/// Run a command to its end.
pub fn run(args: &[&str], data_dir: Option<&Path>, upstream: Option<&Upstream>) -> Output {
    command(args, data_dir, upstream)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {GATEWAY_BIN}: {e}"))
}

/// Start a command without waiting (to kill it midway).
pub fn spawn(args: &[&str], data_dir: &Path, upstream: &Upstream) -> Child {
    command(args, Some(data_dir), Some(upstream))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {GATEWAY_BIN}: {e}"))
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every file under `dir` with its size, for "nothing changed" checks.
pub fn tree(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let rel = path
                .strip_prefix(dir)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            match e.metadata() {
                Ok(m) if m.is_dir() => {
                    out.push((format!("{rel}/"), 0));
                    stack.push(path);
                }
                Ok(m) => out.push((rel, m.len())),
                Err(_) => {}
            }
        }
    }
    out.sort();
    out
}

/// `cache list --json` as (key, sha256, size).
pub fn stored(data_dir: &Path) -> Vec<(String, String, u64)> {
    let out = run(&["cache", "list", "--json"], Some(data_dir), None);
    assert!(out.status.success(), "cache list failed: {}", stderr(&out));
    let rows: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("cache list --json output");
    let mut v: Vec<_> = rows
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap().to_string(),
                r["sha256"].as_str().unwrap().to_string(),
                r["size"].as_u64().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Where the store keeps the content with this sha256 (cacache's layout).
pub fn content_file(data_dir: &Path, sha256: &str) -> std::path::PathBuf {
    data_dir
        .join("store/content-v2/sha256")
        .join(&sha256[0..2])
        .join(&sha256[2..4])
        .join(&sha256[4..])
}

/// Flip one byte of a file in place.
pub fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    bytes[at] ^= 0x55;
    // The store writes content read-only; tests may change it anyway.
    let mut perms = std::fs::metadata(path).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(path, perms).unwrap();
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
