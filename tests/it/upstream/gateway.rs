//! `Gateway`: the moonbit-registry binary under test, started as a child
//! process against a test upstream, killed on drop.
//!
//! Its stdout and stderr go to a log file; when a test panics while a
//! gateway is alive, the log is printed so the failure explains itself.
//!
//! A data dir made by [`Gateway::start`] lives as long as any clone of
//! [`Gateway::data_dir`], so a restart test can do
//! `let dir = gw.data_dir.clone(); drop(gw); Gateway::start_with_data_dir(.., &dir, ..)`.

use std::fs::OpenOptions;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::clients::without_proxies;

/// The binary under test (Cargo builds it before integration tests).
const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_moonbit-registry");

/// How long the gateway may take to answer `GET /-/health` with 200.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// A gateway's `--data-dir`: derefs to `Path`. When the harness created it,
/// it is deleted once the gateway and every clone of this value are gone.
#[derive(Clone, Debug)]
pub struct DataDir {
    path: PathBuf,
    _owner: Option<Arc<TempDir>>,
}

impl DataDir {
    /// A new empty temp dir, deleted when the last gateway using it is gone.
    fn fresh() -> DataDir {
        let owner = tempfile::Builder::new()
            .prefix("test-gateway-data-")
            .tempdir()
            .expect("create temp data dir for the gateway");
        DataDir {
            path: owner.path().to_path_buf(),
            _owner: Some(Arc::new(owner)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Deref for DataDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for DataDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

/// A running gateway process.
pub struct Gateway {
    /// `127.0.0.1:<port>` it listens on (plain HTTP).
    pub addr: SocketAddr,
    /// Its `--data-dir` (use it as a `&Path`; clone it to keep it).
    pub data_dir: DataDir,
    /// Where its stdout and stderr go (appended across restarts).
    pub log_path: PathBuf,
    child: Option<Child>,
    upstream_url: String,
    ca_pem: PathBuf,
    extra_args: Vec<String>,
    /// Extra environment variables for the process (e.g. an admin token).
    env: Vec<(String, String)>,
    /// Set once a panic message already carries the log.
    log_shown: bool,
    /// The binary run: the one under test, or another build to compare with.
    bin: PathBuf,
    /// Holds the log and `$HOME`.
    work: TempDir,
}

impl Gateway {
    /// Starts the gateway with a fresh data dir:
    /// `serve --listen 127.0.0.1:<free port> --data-dir <tmp> --upstream
    /// <upstream_url> --upstream-ca <ca_pem> <extra_args>` (no `--upstream` when
    /// `upstream_url` is empty: a config file's [[sources]] then), and waits until
    /// `GET /-/health` answers 200 (or 401, when `server.auth` asks for credentials).
    pub async fn start(upstream_url: &str, ca_pem: &Path, extra_args: &[&str]) -> Gateway {
        Gateway::start_with_env(upstream_url, ca_pem, extra_args, &[]).await
    }

    /// Like [`Gateway::start`], with `env` added to the process's environment.
    pub async fn start_with_env(
        upstream_url: &str,
        ca_pem: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Gateway {
        Gateway::unstarted(DataDir::fresh(), upstream_url, ca_pem, extra_args, env)
            .started()
            .await
    }

    /// Like [`Gateway::start`], running the binary `bin` (another build of the
    /// gateway, e.g. the one before a change, for a benchmark to compare with).
    #[allow(dead_code)] // the benchmark's; no test runs another build
    pub async fn start_binary(
        bin: &Path,
        upstream_url: &str,
        ca_pem: &Path,
        extra_args: &[&str],
    ) -> Gateway {
        let mut gateway =
            Gateway::unstarted(DataDir::fresh(), upstream_url, ca_pem, extra_args, &[]);
        gateway.bin = bin.to_path_buf();
        gateway.started().await
    }

    /// Like [`Gateway::start`] but with an existing data dir (for restart
    /// scenarios). This gateway does not delete the directory.
    pub async fn start_with_data_dir(
        upstream_url: &str,
        ca_pem: &Path,
        data_dir: &Path,
        extra_args: &[&str],
    ) -> Gateway {
        Gateway::start_with_data_dir_env(upstream_url, ca_pem, data_dir, extra_args, &[]).await
    }

    /// [`Gateway::start_with_data_dir`] with `env` added to the process's environment.
    pub async fn start_with_data_dir_env(
        upstream_url: &str,
        ca_pem: &Path,
        data_dir: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Gateway {
        let data_dir = DataDir {
            path: data_dir.to_path_buf(),
            _owner: None,
        };
        Gateway::unstarted(data_dir, upstream_url, ca_pem, extra_args, env)
            .started()
            .await
    }

    /// Like [`Gateway::start_with_data_dir`], keeping `data_dir` (and the temp dir
    /// it may own) for as long as this gateway lives.
    pub async fn start_on(
        upstream_url: &str,
        ca_pem: &Path,
        data_dir: DataDir,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Gateway {
        Gateway::unstarted(data_dir, upstream_url, ca_pem, extra_args, env)
            .started()
            .await
    }

    /// Run it and wait until it answers.
    async fn started(mut self) -> Gateway {
        self.spawn_and_wait().await;
        self
    }

    fn unstarted(
        data_dir: DataDir,
        upstream_url: &str,
        ca_pem: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Gateway {
        let work = work_dir();
        Gateway {
            addr: free_local_addr(),
            data_dir,
            log_path: work.path().join("gateway.log"),
            child: None,
            upstream_url: upstream_url.to_string(),
            ca_pem: ca_pem.to_path_buf(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log_shown: false,
            bin: PathBuf::from(GATEWAY_BIN),
            work,
        }
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything the gateway printed so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The child's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Asks the process to stop (SIGTERM) and waits for it at most `within`:
    /// its exit status, or `None` if it is still running then (it is killed).
    pub fn terminate(&mut self, within: std::time::Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM failed");
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Kills the process (SIGKILL) and reaps it; the data dir stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn spawn_and_wait(&mut self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log_path.display()));
        let log_err = log.try_clone().expect("clone the log file handle");
        let home = self.work.path().join("home");
        std::fs::create_dir_all(&home).expect("create gateway home");

        let mut cmd = Command::new(&self.bin);
        without_proxies(&mut cmd);
        // Settings from the developer's environment must not reach the binary.
        for (key, _) in std::env::vars_os() {
            let key_str = key.to_string_lossy();
            if key_str.starts_with("MOONBIT_REGISTRY") || key_str.starts_with("MOONCAKES_") {
                cmd.env_remove(&key);
            }
        }
        cmd.arg("serve")
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--data-dir")
            .arg(self.data_dir.path());
        // No URL: the config file's [[sources]] name the upstreams (`--upstream`
        // and [[sources]] together are refused).
        if !self.upstream_url.is_empty() {
            cmd.arg("--upstream").arg(&self.upstream_url);
        }
        cmd.arg("--upstream-ca")
            .arg(&self.ca_pem)
            .args(&self.extra_args)
            .env("RUST_LOG", "moonbit_registry=debug")
            .env("RUST_BACKTRACE", "1")
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_CACHE_HOME", home.join(".cache"))
            .env("XDG_DATA_HOME", home.join(".local/share"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start gateway {}: {e}", self.bin.display()));
        self.child = Some(child);
        self.wait_healthy().await;
    }

    async fn wait_healthy(&mut self) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    self.log_shown = true;
                    panic!(
                        "gateway exited during startup ({status}); log {}:\n{}",
                        self.log_path.display(),
                        self.log()
                    );
                }
            }
            let last = match http_status(self.addr, "/-/health").await {
                // With `server.auth` the health endpoint asks for credentials too:
                // the gateway is up.
                Ok(200 | 401) => return,
                Ok(code) => format!("GET /-/health answered {code}"),
                Err(e) => format!("GET /-/health failed: {e}"),
            };
            if Instant::now() >= deadline {
                self.kill();
                self.log_shown = true;
                panic!(
                    "gateway not healthy on {} after {STARTUP_TIMEOUT:?} ({last}); log {}:\n{}",
                    self.addr,
                    self.log_path.display(),
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() && !self.log_shown {
            eprintln!(
                "--- gateway log ({}) ---\n{}--- end of gateway log ---",
                self.log_path.display(),
                self.log()
            );
        }
    }
}

fn work_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("test-gateway-")
        .tempdir()
        .expect("create temp dir for the gateway")
}

/// A port that was free a moment ago (the OS picks it; small race accepted).
pub fn free_local_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .expect("bind 127.0.0.1:0 to find a free port");
    listener.local_addr().expect("local address")
}

/// Status code of a plain `GET path` over a fresh HTTP/1.1 connection
/// (2 s budget), without any client library or proxy in the way.
pub async fn http_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut head = Vec::new();
        let mut buf = [0u8; 256];
        while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let line = String::from_utf8_lossy(&head);
        line.split_whitespace()
            .nth(1)
            .and_then(|code| code.parse::<u16>().ok())
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("not an HTTP status line: {:?}", line.lines().next()),
                )
            })
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}
