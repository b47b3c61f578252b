//! The real clients that tests drive (`git`, `curl`), isolated from the
//! developer's configuration, plus the encodings and digests they check.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output};

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::{Digest, Sha256};

/// Proxy variables that git, curl and reqwest would otherwise pick up: tests
/// talk to 127.0.0.1 only.
const PROXY_VARS: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "no_proxy",
    "NO_PROXY",
];

/// Environment of the developer's own git that must not leak into tests
/// (for example when `cargo test` runs from a git hook).
const GIT_VARS: &[&str] = &[
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_CONFIG",
    "GIT_CONFIG_PARAMETERS",
    "GIT_CONFIG_COUNT",
    "GIT_SSL_CAINFO",
    "GIT_SSL_CAPATH",
    "GIT_SSL_NO_VERIFY",
    "GIT_PROTOCOL",
    "GIT_TRACE",
    "GIT_CURL_VERBOSE",
];

/// Removes proxy settings from a command's environment.
pub fn without_proxies(cmd: &mut Command) -> &mut Command {
    for var in PROXY_VARS {
        cmd.env_remove(var);
    }
    cmd
}

/// `git` with no system or global configuration: `home` becomes `$HOME`
/// (an empty directory is fine), prompts are off, proxies are removed.
pub fn git(home: &Path) -> Command {
    let mut cmd = Command::new("git");
    without_proxies(&mut cmd);
    for var in GIT_VARS {
        cmd.env_remove(var);
    }
    cmd.env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", home.join(".gitconfig"))
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "true")
        .env("LC_ALL", "C");
    cmd
}

/// Isolated `git` (see [`git`]) that trusts `ca_pem` for HTTPS.
pub fn git_trusting(home: &Path, ca_pem: &Path) -> Command {
    let mut cmd = git(home);
    cmd.env("GIT_SSL_CAINFO", ca_pem);
    cmd
}

/// `curl -sS --noproxy '*' --cacert CA` (no config file, no retries).
pub fn curl(ca_pem: &Path) -> Command {
    let mut cmd = Command::new("curl");
    without_proxies(&mut cmd);
    cmd.arg("-q") // must come first: ignore ~/.curlrc
        .args(["-sS", "--noproxy", "*", "--cacert"])
        .arg(ca_pem);
    cmd
}

/// Runs a command and returns its output; panics (with both output streams)
/// when it cannot start or exits non-zero.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    if !out.status.success() {
        panic!(
            "command failed ({}): {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            cmd,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Runs a command to completion, whatever its exit status; panics only when
/// it cannot be started.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is it installed?)"))
}

/// The `application/x-www-form-urlencoded` byte serializer used by moon for
/// archive URLs: `A-Z a-z 0-9 * - . _` kept, space -> `+`, every other byte
/// -> `%XX` with upper-case hex.
pub fn form_urlencode(s: &str) -> String {
    const FORM: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'*')
        .remove(b'-')
        .remove(b'.')
        .remove(b'_');
    // '%' itself is encoded as %25, so "%20" can only come from a space.
    utf8_percent_encode(s, FORM).to_string().replace("%20", "+")
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Lowercase hex SHA-256 of a file's contents, read in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> String {
    let mut file = std::fs::File::open(path)
        .unwrap_or_else(|e| panic!("cannot open {} to hash it: {e}", path.display()));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hex::encode(hasher.finalize())
}
