//! The peers: nginx serving the archives as static files, and nginx `proxy_cache` in
//! front of the same test upstream, each its own process on 127.0.0.1 with its own
//! prefix directory; and the check that nginx, wrk, git and curl are installed.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Make sure every tool the benchmark drives is on PATH, running `benches/peers.sh`
/// (apt-get, as root) when one is missing.
pub fn ensure_installed() {
    let tools = ["nginx", "wrk", "git", "curl"];
    let missing = |t: &&str| {
        !Command::new("sh")
            .args(["-c", &format!("command -v {t} >/dev/null")])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !tools.iter().any(missing) {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers.sh");
    eprintln!("installing the benchmark's peers with {}", script.display());
    let status = Command::new("bash")
        .arg(&script)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(status.success(), "{} failed ({status})", script.display());
    let still: Vec<_> = tools.iter().filter(|t| missing(t)).collect();
    assert!(still.is_empty(), "still missing after peers.sh: {still:?}");
}

/// What an nginx instance serves.
pub enum Role<'a> {
    /// Files under this root, URL path = file path (nginx decodes `%2F` to `/`).
    Static { root: &'a Path },
    /// `proxy_cache` (with `proxy_cache_lock on`) in front of an HTTPS upstream.
    ProxyCache {
        upstream: SocketAddr,
        ca_pem: &'a Path,
    },
}

/// A running nginx (master + workers); stopped with SIGTERM on drop.
pub struct Nginx {
    pub addr: SocketAddr,
    pub prefix: TempDir,
    child: Option<Child>,
}

impl Nginx {
    pub fn start(role: Role<'_>) -> Nginx {
        let prefix = tempfile::Builder::new()
            .prefix("bench-nginx-")
            .tempdir()
            .expect("nginx prefix dir");
        let addr = free_addr();
        let p = prefix.path().display().to_string();
        for dir in ["tmp", "cache"] {
            std::fs::create_dir_all(prefix.path().join(dir)).expect("nginx dirs");
        }
        let location = match role {
            Role::Static { root } => format!(
                "root {};\n            add_header x-cache static;",
                root.display()
            ),
            Role::ProxyCache { upstream, ca_pem } => format!(
                "proxy_pass https://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_ssl_session_reuse on;
            proxy_cache bench;
            proxy_cache_valid 200 1y;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 120s;
            proxy_cache_lock_age 120s;
            add_header x-cache $upstream_cache_status;",
                ca = ca_pem.display()
            ),
        };
        // Defaults an operator would keep, except: workers run as root (the files are
        // in root's temp dirs); keep-alive connections are not recycled every 1000
        // requests (the gateway never recycles them; wrk would pay reconnects only
        // here); and no `tcp_nopush`, which stalls proxy_cache hits of 64 KiB for
        // ~40 ms each (delayed ACK) and would make nginx look 30x slower than it is.
        let mut conf = String::new();
        let _ = write!(
            conf,
            "worker_processes auto;
user root;
daemon off;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {p}/access.log;
    sendfile on;
    tcp_nopush off;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    types {{ application/zip zip; }}
    default_type application/octet-stream;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    proxy_cache_path {p}/cache levels=1:2 keys_zone=bench:16m max_size=16g inactive=1d use_temp_path=off;
    server {{
        listen {addr};
        location / {{
            {location}
        }}
    }}
}}
"
        );
        let conf_path = prefix.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let child = Command::new("nginx")
            .arg("-p")
            .arg(prefix.path())
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nginx");
        let nginx = Nginx {
            addr,
            prefix,
            child: Some(child),
        };
        nginx.wait_listening();
        nginx
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Master and worker process ids (workers are the master's children).
    pub fn pids(&self) -> Vec<u32> {
        let Some(master) = self.child.as_ref().map(Child::id) else {
            return Vec::new();
        };
        let mut pids = vec![master];
        pids.extend(children_of(master));
        pids
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_err() {
            let log =
                std::fs::read_to_string(self.prefix.path().join("error.log")).unwrap_or_default();
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {}: {log}",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SIGTERM to our master only: it stops its own workers (SIGKILL would orphan them).
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Direct children of `pid`, from `/proc/*/stat`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    // Fields after the `(comm)`: state, ppid, ...
                    let rest = &stat[stat.rfind(')')? + 2..];
                    rest.split(' ').nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// A port that was free a moment ago.
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr")
}

/// Lay the archives out for nginx's static root: `<root>/user/<user>/<module>/<version>.zip`,
/// the path nginx maps `/user/<user>%2F<module>%2F<version>.zip` to. Hard links when possible.
pub fn static_root(root: &Path, archives: &[(String, PathBuf)]) {
    for (key, src) in archives {
        let dst = root.join("user").join(format!("{key}.zip"));
        std::fs::create_dir_all(dst.parent().expect("parent")).expect("static dirs");
        if std::fs::hard_link(src, &dst).is_err() {
            std::fs::copy(src, &dst).expect("copy archive for nginx");
        }
    }
}
