//! Building blocks of the gateway's integration tests: a registry, its upstream and
//! a gateway started in front of it, and the clients (`curl`, `git`, `moon`) pointed
//! at the gateway the way a user would point them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use super::{Gateway, Registry, Upstream};

/// Run a command, returning its output; panics only if it cannot be started.
pub fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    cmd.output()
        .unwrap_or_else(|e| panic!("could not run {shown}: {e}"))
}

pub fn curl(args: &[&str]) -> Output {
    run(Command::new("curl")
        .args(["-sS", "--max-time", "60"])
        .args(args))
}

/// git with no user or system config, so the developer's settings cannot matter.
pub fn git(dir: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new("git");
    if let Some(dir) = dir {
        cmd.arg("-C").arg(dir);
    }
    cmd.args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env_remove("GIT_SSL_CAINFO");
    run(&mut cmd)
}

pub fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct Setup {
    pub registry: Arc<Registry>,
    pub upstream: Upstream,
    pub gateway: Gateway,
    /// The gateway's config file (for one-shot commands beside it).
    pub config: PathBuf,
    /// Holds the gateway's config file for as long as the gateway runs.
    _config_dir: tempfile::TempDir,
}

/// A registry with what `publish` puts in it, its upstream, and a gateway started
/// after publishing (the gateway mirrors the index at start, and clients see a
/// publish made later only after `index.max_age` or a `POST /-/index/refresh`).
pub async fn setup_with<T>(publish: impl FnOnce(&Registry) -> T) -> (Setup, T) {
    setup_configured("", publish).await
}

/// Like [`setup_with`], with `toml` as the gateway's config file.
pub async fn setup_configured<T>(toml: &str, publish: impl FnOnce(&Registry) -> T) -> (Setup, T) {
    setup_configured_env(toml, &[], publish).await
}

/// Like [`setup_configured`], with `env` added to the gateway's environment.
pub async fn setup_configured_env<T>(
    toml: &str,
    env: &[(&str, &str)],
    publish: impl FnOnce(&Registry) -> T,
) -> (Setup, T) {
    start(toml, env, false, publish).await
}

/// Like [`setup_configured_env`], for a config with `[[sources]]` tables instead
/// of `--upstream`: `{upstream}` in `toml` becomes the test upstream's URL.
pub async fn setup_sources<T>(
    toml: &str,
    env: &[(&str, &str)],
    publish: impl FnOnce(&Registry) -> T,
) -> (Setup, T) {
    start(toml, env, true, publish).await
}

async fn start<T>(
    toml: &str,
    env: &[(&str, &str)],
    sources: bool,
    publish: impl FnOnce(&Registry) -> T,
) -> (Setup, T) {
    let registry = Arc::new(Registry::new());
    let published = publish(&registry);
    let upstream = Upstream::start(registry.clone()).await;
    let config_dir = tempfile::tempdir().expect("temp dir for the gateway config");
    let config = config_dir.path().join("moonbit-registry.toml");
    std::fs::write(&config, toml.replace("{upstream}", &upstream.url()))
        .expect("write the gateway config");
    let args = ["--config", config.to_str().expect("UTF-8 temp path")];
    let upstream_url = if sources {
        String::new()
    } else {
        upstream.url()
    };
    let gateway = Gateway::start_with_env(&upstream_url, &upstream.ca_pem, &args, env).await;
    let setup = Setup {
        registry,
        upstream,
        gateway,
        config,
        _config_dir: config_dir,
    };
    (setup, published)
}

/// [`TwoSources`] and a gateway in front of them; derefs to the sources.
pub struct TwoSourcesGateway {
    pub sources: TwoSources,
    pub gateway: Gateway,
}

impl std::ops::Deref for TwoSourcesGateway {
    type Target = TwoSources;
    fn deref(&self) -> &TwoSources {
        &self.sources
    }
}

impl TwoSourcesGateway {
    /// Start the gateway again on its data dir.
    pub async fn restart_gateway(&mut self) {
        let data_dir = self.gateway.data_dir.clone();
        self.gateway.kill();
        self.gateway = self.sources.gateway_on(data_dir).await;
    }
}

/// [`TwoSources`] with a gateway: `publish` fills (internal, public) first;
/// `extra_toml` comes first in the config file (top-level keys and sections),
/// `internal_auth` goes into the internal source's table (`{internal}` there stands
/// for the internal upstream's URL), `env` into the gateway's environment; the
/// internal upstream requires `Authorization: <internal_requires>` if given (from
/// before the gateway starts).
pub async fn setup_two_sources<T>(
    extra_toml: &str,
    internal_auth: &str,
    internal_requires: Option<&str>,
    env: &[(&str, &str)],
    publish: impl FnOnce(&Registry, &Registry) -> T,
) -> (TwoSourcesGateway, T) {
    let toml = format!(
        "{extra_toml}\n\n[[sources]]\nname = \"internal\"\nregistry = \"{{internal}}\"\n{internal_auth}\n\n[[sources]]\nname = \"public\"\nregistry = \"{{public}}\"\n",
    );
    let (sources, published) = TwoSources::start(&toml, env, publish).await;
    sources.internal.require_authorization(internal_requires);
    let gateway = sources.gateway().await;
    (TwoSourcesGateway { sources, gateway }, published)
}

/// `git clone` of the gateway's index into `dir`; `extra` goes before the URL
/// (e.g. `--depth 1`). Protocol `2` or `0`.
pub fn clone_index(gw: &Gateway, dir: &Path, protocol: &str, extra: &[&str]) -> Output {
    let proto = format!("protocol.version={protocol}");
    let url = format!("{}/git/index", gw.url());
    let mut args = vec!["-c", &proto, "clone", "--single-branch", "--no-tags"];
    args.extend_from_slice(extra);
    args.push(&url);
    args.push(dir.to_str().expect("UTF-8 temp path"));
    git(None, &args)
}

/// Ask the gateway to refresh its index mirror now.
pub fn refresh_index(gw: &Gateway) {
    let out = curl(&["-f", "-X", "POST", &format!("{}/-/index/refresh", gw.url())]);
    ok(&out, "POST /-/index/refresh");
}

/// Download an archive with curl, returning (body, response headers).
pub fn fetch(gw: &Gateway, segment: &str, out_file: &Path) -> (Output, Vec<u8>, String) {
    let url = format!("{}/user/{segment}.zip", gw.url());
    let headers = out_file.with_extension("headers");
    let out = curl(&[
        "-o",
        out_file.to_str().unwrap(),
        "-D",
        headers.to_str().unwrap(),
        "-w",
        "%{http_code}",
        &url,
    ]);
    let body = std::fs::read(out_file).unwrap_or_default();
    let head = std::fs::read_to_string(&headers).unwrap_or_default();
    (out, body, head.to_ascii_lowercase())
}

/// Download `p` twice through the gateway: the first answer fetched upstream
/// (`x-cache: miss`), the second from the store (`hit`), both with the index's
/// sha256. Returns the second answer's (lower-case) head.
pub fn fetch_miss_then_hit(gw: &Gateway, p: &super::Published, what: &str) -> String {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut head = String::new();
    for expect in ["x-cache: miss", "x-cache: hit"] {
        let (out, body, h) = fetch(gw, &p.segment, &tmp.path().join("archive.zip"));
        ok(&out, what);
        assert!(h.contains(expect), "{what}: expected {expect}: {h}");
        assert_eq!(super::clients::sha256_hex(&body), p.checksum, "{what}");
        head = h;
    }
    head
}

/// `moon new proj` in `cwd`; returns the project directory.
pub fn moon_project(bin: &Path, home: &Path, cwd: &Path, registry: &str) -> PathBuf {
    std::fs::create_dir_all(cwd).expect("work dir");
    ok(
        &moon(
            bin,
            home,
            cwd,
            registry,
            &["new", "proj", "--user", "tester"],
        ),
        "moon new",
    );
    cwd.join("proj")
}

/// The real client, `moon`, through the gateway: found via `MOON_BIN` or `PATH`.
pub fn moon_bin() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("MOON_BIN") {
        return Some(std::path::PathBuf::from(p));
    }
    let out = Command::new("sh")
        .args(["-c", "command -v moon"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

pub fn moon(bin: &Path, home: &Path, cwd: &Path, registry: &str, args: &[&str]) -> Output {
    run(moon_command(bin, home, cwd, registry).args(args))
}

/// `moon` with `MOONCAKES_REGISTRY` set and nothing of this machine's proxy, TLS
/// or git settings, arguments still to add.
pub fn moon_command(bin: &Path, home: &Path, cwd: &Path, registry: &str) -> Command {
    let mut cmd = Command::new(bin);
    cmd.current_dir(cwd)
        .env("MOON_HOME", home)
        .env("MOONCAKES_REGISTRY", registry);
    // Only loopback: no proxy, and moon's TLS/git settings from this machine must not leak in.
    for var in [
        "HTTPS_PROXY",
        "HTTP_PROXY",
        "https_proxy",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "GIT_SSL_CAINFO",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("RUST_BACKTRACE", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_COUNT", "1")
        .env("GIT_CONFIG_KEY_0", "init.defaultBranch")
        .env("GIT_CONFIG_VALUE_0", "main");
    cmd
}

/// Tests that use the real registry host names (mooncakes.io) run inside a network
/// namespace that holds only loopback, so even a misrouted request cannot leave
/// the machine. Call first thing in such a test, as
/// `inside_loopback_namespace(module_path!(), "the_test_fn")`: in the outer process
/// it re-runs exactly that test (this binary, `--exact` on its full libtest name)
/// inside `unshare -n` and returns `false` (the outer test is then done); inside
/// the namespace it returns `true` and the test body runs.
pub fn inside_loopback_namespace(module: &str, test_fn: &str) -> bool {
    const MARK: &str = "MBR_TEST_INSIDE_NETNS";
    if std::env::var_os(MARK).is_some() {
        return true;
    }
    // libtest names a test by its path without the crate: `it::proxy_intercept`
    // and `fn x` give `proxy_intercept::x`.
    let test_name = match module.split_once("::") {
        Some((_crate, path)) => format!("{path}::{test_fn}"),
        None => test_fn.to_string(),
    };
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new("unshare")
        .args([
            "--net",
            "sh",
            "-c",
            "ip link set lo up && exec \"$0\" \"$@\"",
        ])
        .arg(&exe)
        .args(["--exact", &test_name, "--nocapture", "--test-threads=1"])
        .env(MARK, "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run unshare (util-linux) for {test_name}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Exactly this test ran and passed: a wrong name would filter every test out
    // and "pass" with 0 tests.
    assert!(
        out.status.success()
            && stdout.contains(&format!("test {test_name} ... ok"))
            && stdout.contains("test result: ok. 1 passed;"),
        "{test_name} failed inside its loopback-only network namespace ({}):\n{stdout}\n{stderr}",
        out.status
    );
    false
}

/// The exports `moonbit-registry env` prints, as (name, value) pairs.
pub fn gateway_env(gw: &Gateway) -> Vec<(String, String)> {
    let data_dir = gw.data_dir.to_str().expect("UTF-8 data dir");
    let listen = gw.addr.to_string();
    let out = run(Command::new(env!("CARGO_BIN_EXE_moonbit-registry"))
        .args(["env", "--data-dir", data_dir, "--listen", &listen])
        .env("RUST_LOG", "off"));
    ok(&out, "moonbit-registry env");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
        .collect()
}

/// Two registries behind upstreams of their own, "internal" and "public", and
/// gateways configured with both as `[[sources]]`.
pub struct TwoSources {
    pub internal: Upstream,
    pub public: Upstream,
    /// Both upstreams' CAs, as the gateways' `--upstream-ca`.
    pub ca_bundle: PathBuf,
    /// The gateways' config file.
    pub config: PathBuf,
    env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

impl TwoSources {
    /// Start both upstreams after `publish` filled their registries; `toml` is the
    /// gateways' config, with `{internal}` and `{public}` standing for their URLs.
    pub async fn start<T>(
        toml: &str,
        env: &[(&str, &str)],
        publish: impl FnOnce(&Registry, &Registry) -> T,
    ) -> (TwoSources, T) {
        let (internal, public) = (Arc::new(Registry::new()), Arc::new(Registry::new()));
        let published = publish(&internal, &public);
        let internal = Upstream::start(internal).await;
        let public = Upstream::start(public).await;
        let dir = tempfile::tempdir().expect("temp dir for the gateway config");
        let ca_bundle = dir.path().join("upstreams-ca.pem");
        let pems = [&internal.ca_pem, &public.ca_pem]
            .map(|p| std::fs::read_to_string(p).expect("read an upstream CA"));
        std::fs::write(&ca_bundle, pems.concat()).expect("write the CA bundle");
        let config = dir.path().join("moonbit-registry.toml");
        let toml = toml
            .replace("{internal}", &internal.url())
            .replace("{public}", &public.url());
        std::fs::write(&config, toml).expect("write the gateway config");
        let sources = TwoSources {
            internal,
            public,
            ca_bundle,
            config,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            _dir: dir,
        };
        (sources, published)
    }

    /// A gateway (with a data dir of its own) in front of both sources.
    pub async fn gateway(&self) -> Gateway {
        let args = ["--config", self.config.to_str().expect("UTF-8 temp path")];
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Gateway::start_with_env("", &self.ca_bundle, &args, &env).await
    }

    /// A gateway on `data_dir` (kept as long as the gateway runs).
    pub async fn gateway_on(&self, data_dir: super::gateway::DataDir) -> Gateway {
        let args = ["--config", self.config.to_str().expect("UTF-8 temp path")];
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Gateway::start_on("", &self.ca_bundle, data_dir, &args, &env).await
    }

    /// Stop `gw` and start a gateway on its data dir.
    pub async fn restart(&self, gw: Gateway) -> Gateway {
        let dir = gw.data_dir.clone();
        drop(gw);
        self.gateway_on(dir).await
    }
}

/// A fresh `moon update`, `moon new` and `moon add module` through `registry`,
/// with `MOON_HOME` at `work/home`; returns the project (`work/work/proj`).
/// Panics with moon's output when a step fails.
pub fn moon_update_and_add(bin: &Path, work: &Path, registry: &str, module: &str) -> PathBuf {
    let (home, cwd) = (work.join("home"), work.join("work"));
    std::fs::create_dir_all(&cwd).expect("work dir");
    ok(
        &moon(bin, &home, &cwd, registry, &["update"]),
        "moon update",
    );
    let proj = moon_project(bin, &home, &cwd, registry);
    let out = moon(bin, &home, &proj, registry, &["add", module]);
    ok(&out, &format!("moon add {module} through {registry}"));
    proj
}

/// `moon args` in `dir` with its built-in registry (no `MOONCAKES_REGISTRY`),
/// through the gateway as `HTTPS_PROXY`: `env` is what `moonbit-registry env`
/// exports (see [`gateway_env`]).
pub fn moon_through_proxy(
    bin: &Path,
    home: &Path,
    dir: &Path,
    env: &[(String, String)],
    args: &[&str],
) -> Output {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .current_dir(dir)
        .env("MOON_HOME", home)
        .env_remove("MOONCAKES_REGISTRY")
        .env_remove("SSL_CERT_DIR")
        .env("RUST_BACKTRACE", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null");
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(&mut cmd)
}

/// `curl` a gateway path with extra request `headers`: (status, lower-cased
/// response head, body).
pub fn curl_get(gw: &Gateway, path: &str, headers: &[&str]) -> (String, String, Vec<u8>) {
    let dir = tempfile::tempdir().expect("temp dir for curl");
    let body = dir.path().join("body");
    let head = dir.path().join("head");
    let url = format!("{}{path}", gw.url());
    let mut args = vec![
        "-o",
        body.to_str().expect("UTF-8 temp path"),
        "-D",
        head.to_str().expect("UTF-8 temp path"),
        "-w",
        "%{http_code}",
    ];
    for h in headers {
        args.extend(["-H", h]);
    }
    args.push(&url);
    let out = curl(&args);
    (
        String::from_utf8_lossy(&out.stdout).to_string(),
        std::fs::read_to_string(&head)
            .unwrap_or_default()
            .to_ascii_lowercase(),
        std::fs::read(&body).unwrap_or_default(),
    )
}
