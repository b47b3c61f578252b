//! The one place that runs git: every git command line is built here, with the
//! same hygiene, and fails with the same typed [`Error`].
//!
//! Two ways to run one: to completion ([`Git::output`], [`Git::text`]: clone,
//! fetch, rev-parse, bundle create...), bounded by an optional timeout; or
//! streamed ([`Git::spawn`]: `git http-backend` answering a client, `cat-file
//! --batch`), where the caller moves the bytes and git lives as long as its
//! [`Process`] (and the git slot it may hold). [`clone_mirror`] is the one atomic
//! "clone into a temp dir, rename into place".
//!
//! A streamed run's verdict ([`Process::finish`]) is its exit status and, with
//! [`Stderr::Log`], what it said: `git http-backend` reports a `die()` that comes
//! after its response head (a body it cannot inflate, one larger than its
//! buffer) with a `fatal:` line and exit status 0, which must not pass for success.
//!
//! Hygiene, for every run: no system config (`GIT_CONFIG_NOSYSTEM`), never a
//! prompt (`GIT_TERMINAL_PROMPT=0`, no askpass program), no credential helper, no `GIT_DIR` from our
//! own environment (the gateway may itself be started from a git hook), stdin
//! closed unless piped, the child killed when its handle is dropped, and a stalled
//! transfer fails (under 1 KiB/s for 30 s). With a CA bundle, git trusts exactly
//! it (`http.sslCAInfo`, and `GIT_SSL_CAINFO` removed since it would win). A CGI
//! run ([`Git::http_backend`]) starts from an empty environment but for `PATH`
//! and `HOME`: it sees the request, not the gateway's environment. A source's
//! credential ([`Options::credential`]) goes in as `http.extraHeader` through the
//! protected config environment, never the command line (which `ps` shows and
//! errors quote) nor a repository's config (which the data dir keeps), with
//! git's HTTP tracing switched off so it is never printed either. The one git
//! command git itself hands us, the pack cache hook's `pack-objects`
//! ([`hooked_pack_objects`]), keeps the environment git gave it.

use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinHandle;

/// Set on every git run: no system config, never a prompt.
const ENV: [(&str, &str); 2] = [("GIT_CONFIG_NOSYSTEM", "1"), ("GIT_TERMINAL_PROMPT", "0")];

/// Command-line config on every git run: a stalled transfer fails instead of
/// hanging, and no stored credentials are read or written.
const CONFIG: [&str; 5] = [
    "http.lowSpeedLimit=1024",
    "http.lowSpeedTime=30",
    "credential.helper=",
    // A source refusing us is an error to report, never a question to ask.
    "core.askPass=",
    // Only git as a client reads this (a served clone speaks what its client
    // asks for): v0 names the refs in its first answer, so a mirror fetch that
    // finds nothing new ends after one round trip to the source, and a clone or
    // a fetch that moves takes two, where v2 spends one more on `ls-refs`.
    "protocol.version=0",
];

/// Bound on what git may print on stderr that we keep for an error message.
const STDERR_KEEP: usize = 2048;

/// How long [`Process::finish`] waits, once git has exited, for the rest of what
/// it said ([`Stderr::Log`]): a child git left behind may hold stderr open.
const STDERR_DRAIN: Duration = Duration::from_secs(5);

/// Why a git run failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// git could not be started (not installed, not on `PATH`, no processes left).
    #[error("cannot run git {what}: {error}")]
    Spawn { what: String, error: io::Error },
    /// The run outlived its bound; git was killed.
    #[error("git {what} took longer than {limit:?}")]
    TimedOut { what: String, limit: Duration },
    /// git ran and exited unsuccessfully; `stderr` is the tail of what it said.
    #[error("git {what} failed ({status}){}", said(.stderr))]
    Failed {
        what: String,
        status: ExitStatus,
        stderr: String,
    },
    /// git exited 0 but said `fatal:` ([`Stderr::Log`]); `stderr` is the tail.
    #[error("git {what} failed: {stderr}")]
    Fatal { what: String, stderr: String },
    /// Talking to git, or moving what it made, failed.
    #[error("{context}: {error}")]
    Io { context: String, error: io::Error },
}

/// `: STDERR` after a failure's status, or nothing when git said nothing.
fn said(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    }
}

/// Settings for git runs that may reach a source.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// CA bundle (system roots + the extra upstream CA), if an extra CA is set.
    pub ca_bundle: Option<PathBuf>,
    /// Bound on one run to completion; git is killed past it.
    pub timeout: Option<Duration>,
    /// The source's credential, sent as `Authorization` on git's HTTP requests.
    pub credential: Option<crate::config::Credential>,
}

/// Tracing that would print HTTP headers (the credential among them).
const TRACE_ENV: [&str; 4] = [
    "GIT_TRACE_CURL",
    "GIT_CURL_VERBOSE",
    "GIT_TRACE",
    "GIT_TRACE_PACKET",
];

/// Where git's stderr goes when it is streamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stderr {
    /// Dropped: what git says there is not needed.
    Discard,
    /// Each line logged as a warning, the tail kept for [`Process::finish`], and a
    /// `fatal:` line a failure whatever the exit status.
    Log,
}

/// A git command line being built.
pub struct Git {
    git_dir: Option<PathBuf>,
    args: Vec<OsString>,
    /// Start from an empty environment but for `PATH` and `HOME` (CGI).
    cgi: bool,
    env: Vec<(OsString, OsString)>,
    /// Protected config passed through `GIT_CONFIG_COUNT`/`KEY_n`/`VALUE_n`.
    config_env: Vec<(String, String)>,
    options: Options,
    slot: Option<Slot>,
}

/// Whatever bounds the git processes serving clients (see [`Git::holding`]).
type Slot = Box<dyn Send>;

impl Git {
    /// `git ARGS` outside any repository (clone, init, bundle list-heads).
    pub fn new<I, S>(args: I) -> Git
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Git {
            git_dir: None,
            args: Vec::new(),
            cgi: false,
            env: Vec::new(),
            config_env: Vec::new(),
            options: Options::default(),
            slot: None,
        }
        .args(args)
    }

    /// `git --git-dir DIR ARGS`.
    pub fn in_repo<I, S>(dir: &Path, args: I) -> Git
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Git {
            git_dir: Some(dir.to_path_buf()),
            ..Git::new(args)
        }
    }

    /// `git http-backend` as a CGI program serving every bare repository under
    /// `root`; the caller adds the request's CGI variables with [`Git::env`].
    pub fn http_backend(root: &Path) -> Git {
        let mut git = Git::new(["http-backend"])
            .env("GIT_PROJECT_ROOT", root)
            .env("GIT_HTTP_EXPORT_ALL", "1");
        git.cgi = true;
        git
    }

    /// One more argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Git {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// More arguments.
    pub fn args<I, S>(mut self, args: I) -> Git
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// One environment variable for git.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Git {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// `key = value` as command-scope config in the environment, which git
    /// treats as protected (`uploadpack.packObjectsHook` is only read from there)
    /// and which git's children inherit.
    pub fn protected_config(mut self, key: &str, value: &str) -> Git {
        self.config_env.push((key.to_string(), value.to_string()));
        self
    }

    /// The CA bundle and timeout of `options`.
    pub fn with(mut self, options: &Options) -> Git {
        self.options = options.clone();
        self
    }

    /// Hold `slot` (e.g. semaphore permits) until git has ended or its
    /// [`Process`] is dropped: bounds how many git processes serve clients at once.
    pub fn holding(mut self, slot: impl Send + 'static) -> Git {
        self.slot = Some(Box::new(slot));
        self
    }

    /// What the errors call this run: the subcommand, e.g. `fetch`, `bundle create`
    /// (the leading plain words, up to the first option, path or URL).
    fn what(&self) -> String {
        let words: Vec<&str> = self
            .args
            .iter()
            .map_while(|a| a.to_str())
            .take_while(|a| {
                !a.is_empty()
                    && !a.starts_with('-')
                    && a.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
            })
            .take(2)
            .collect();
        if words.is_empty() {
            "command".to_string()
        } else {
            words.join(" ")
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("git");
        if self.cgi {
            cmd.env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default());
            if let Some(home) = std::env::var_os("HOME") {
                cmd.env("HOME", home);
            }
        }
        cmd.envs(ENV)
            .env_remove("GIT_DIR")
            .env_remove("GIT_ASKPASS")
            .env_remove("SSH_ASKPASS")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(dir) = &self.git_dir {
            cmd.arg("--git-dir").arg(dir);
        }
        if let Some(bundle) = &self.options.ca_bundle {
            // The env variable would override the -c setting; the bundle already holds the system roots.
            cmd.env_remove("GIT_SSL_CAINFO")
                .arg("-c")
                .arg(format!("http.sslCAInfo={}", bundle.display()));
        }
        for config in CONFIG {
            cmd.arg("-c").arg(config);
        }
        let mut config_env: Vec<(&str, String)> = self
            .config_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        if let Some(credential) = &self.options.credential {
            config_env.push(("http.extraHeader", credential.git_header()));
            for var in TRACE_ENV {
                cmd.env_remove(var);
            }
        }
        if !config_env.is_empty() {
            cmd.env("GIT_CONFIG_COUNT", config_env.len().to_string());
            for (i, (key, value)) in config_env.iter().enumerate() {
                cmd.env(format!("GIT_CONFIG_KEY_{i}"), key)
                    .env(format!("GIT_CONFIG_VALUE_{i}"), value);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.args(&self.args);
        cmd
    }

    /// Run to completion (within the timeout, if any); stdout, or why not.
    pub async fn output(self) -> Result<Vec<u8>, Error> {
        let what = self.what();
        let mut cmd = self.command();
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let run = cmd.output();
        let out = match self.options.timeout {
            // Dropping the output future drops the child, which kills it.
            Some(limit) => tokio::time::timeout(limit, run)
                .await
                .map_err(|_| Error::TimedOut {
                    what: what.clone(),
                    limit,
                })?,
            None => run.await,
        }
        .map_err(|error| Error::Spawn {
            what: what.clone(),
            error,
        })?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        Err(Error::Failed {
            what,
            status: out.status,
            stderr: tail(&out.stderr),
        })
    }

    /// [`Git::output`] as text (lossy UTF-8).
    pub async fn text(self) -> Result<String, Error> {
        Ok(String::from_utf8_lossy(&self.output().await?).into_owned())
    }

    /// Start git with stdin and stdout piped, for the caller to stream; the
    /// timeout does not apply (whoever reads decides how long it lives).
    pub fn spawn(self, stderr: Stderr) -> Result<Spawned, Error> {
        let what = self.what();
        let mut cmd = self.command();
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        cmd.stderr(match stderr {
            Stderr::Discard => Stdio::null(),
            Stderr::Log => Stdio::piped(),
        });
        let mut child = cmd.spawn().map_err(|error| Error::Spawn {
            what: what.clone(),
            error,
        })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(Error::Io {
                context: format!("git {what}"),
                error: io::Error::other("pipes missing"),
            });
        };
        // Drained from the start: git blocks once the pipe is full.
        let said = child.stderr.take().map(|stderr| {
            let what = what.clone();
            tokio::spawn(async move {
                let mut said = Said::default();
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::warn!(%line, "git {what}");
                    said.hear(&line);
                }
                said
            })
        });
        Ok(Spawned {
            stdin,
            stdout,
            process: Process {
                child,
                what,
                said,
                _slot: self.slot,
            },
        })
    }
}

/// What a streamed git said on stderr ([`Stderr::Log`]).
#[derive(Debug, Default)]
struct Said {
    /// The last lines, up to about [`STDERR_KEEP`] bytes.
    tail: String,
    fatal: bool,
}

impl Said {
    fn hear(&mut self, line: &str) {
        // git's die() prefix; a child's die is relayed with the same prefix.
        self.fatal |= line.starts_with("fatal:");
        if !self.tail.is_empty() {
            self.tail.push('\n');
        }
        self.tail.push_str(line);
        if self.tail.len() > 2 * STDERR_KEEP {
            self.tail = tail(self.tail.as_bytes());
        }
    }
}

/// A streamed git run: its pipes, and the process they belong to.
pub struct Spawned {
    pub stdin: ChildStdin,
    pub stdout: ChildStdout,
    pub process: Process,
}

/// A running git; killed (and its slot freed) when dropped before it ends.
pub struct Process {
    child: Child,
    what: String,
    /// With [`Stderr::Log`]: the task draining stderr, and what it heard.
    said: Option<JoinHandle<Said>>,
    _slot: Option<Slot>,
}

impl Process {
    /// Wait for git to exit (after its output ended): a failure must not pass
    /// for success, e.g. a pack cut short, or (with [`Stderr::Log`]) a `fatal:`
    /// git reported and then exited 0 for.
    pub async fn finish(&mut self) -> Result<(), Error> {
        let status = self.child.wait().await.map_err(|error| Error::Io {
            context: format!("waiting for git {}", self.what),
            error,
        })?;
        // git has exited, so what it said is in the pipe; bounded, since a child it
        // left behind may keep the pipe open.
        let said = match self.said.take() {
            Some(task) => match tokio::time::timeout(STDERR_DRAIN, task).await {
                Ok(Ok(said)) => said,
                _ => Said::default(),
            },
            None => Said::default(),
        };
        let stderr = tail(said.tail.as_bytes());
        if !status.success() {
            return Err(Error::Failed {
                what: self.what.clone(),
                status,
                stderr,
            });
        }
        if said.fatal {
            return Err(Error::Fatal {
                what: self.what.clone(),
                stderr,
            });
        }
        Ok(())
    }
}

/// The last [`STDERR_KEEP`] bytes of stderr on one line: git says what went wrong
/// last ("fatal: ..."), after any warnings.
fn tail(stderr: &[u8]) -> String {
    let gist = String::from_utf8_lossy(stderr).trim().replace('\n', "; ");
    if gist.len() <= STDERR_KEEP {
        return gist;
    }
    let cut = (gist.len() - STDERR_KEEP..gist.len())
        .find(|&i| gist.is_char_boundary(i))
        .unwrap_or(gist.len());
    gist[cut..].to_string()
}

/// Whether `dir` looks like a usable bare repository (a clone that died half way
/// leaves no such thing in place: see [`clone_mirror`]).
pub fn is_bare_repo(dir: &Path) -> bool {
    dir.join("HEAD").is_file() && dir.join("objects").is_dir()
}

/// `git clone --mirror SOURCE TARGET` (a URL or a local path), atomically: into a
/// temp dir beside `target`, then renamed into place, so a half clone is never
/// used. A broken leftover at `target` is replaced.
pub async fn clone_mirror(
    source: impl AsRef<OsStr>,
    target: &Path,
    options: &Options,
) -> Result<(), Error> {
    let io_error = |context: String| move |error| Error::Io { context, error };
    let parent = target.parent().unwrap_or(Path::new("."));
    tokio::fs::create_dir_all(parent)
        .await
        .map_err(io_error(format!("cannot create {}", parent.display())))?;
    let tmp = tempfile::Builder::new()
        .prefix(".clone-")
        .tempdir_in(parent)
        .map_err(io_error(format!(
            "cannot create a temp dir in {}",
            parent.display()
        )))?;
    let repo = tmp.path().join("repo.git");
    Git::new(["clone", "--mirror", "--quiet"])
        .arg(source)
        .arg(&repo)
        .with(options)
        .output()
        .await?;
    if target.exists() {
        let _ = tokio::fs::remove_dir_all(target).await;
    }
    tokio::fs::rename(&repo, target)
        .await
        .map_err(io_error(format!(
            "cannot move the new mirror into {}",
            target.display()
        )))
}

/// The `git pack-objects` that upload-pack handed to its `packObjectsHook`
/// (see `index::pack_cache`), run synchronously by the hook process. git chose
/// its program, arguments and environment: `GIT_DIR` names the repository being
/// served, so it is kept; the rest of the hygiene was applied to the
/// `git http-backend` it descends from, and what can be is set again here.
pub fn hooked_pack_objects(program: &str, args: &[String]) -> std::process::Command {
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).envs(ENV);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_subcommand() {
        let what = |args: &[&str]| Git::new(args).what();
        assert_eq!(what(&["fetch", "--prune", "https://x/y"]), "fetch");
        assert_eq!(
            what(&["bundle", "create", "--quiet", "/tmp/f"]),
            "bundle create"
        );
        assert_eq!(
            what(&["symbolic-ref", "HEAD", "refs/heads/main"]),
            "symbolic-ref"
        );
        assert_eq!(
            what(&["update-ref", "refs/heads/main", "abc"]),
            "update-ref"
        );
        assert_eq!(what(&["init", "--quiet", "--bare", "repo"]), "init");
        assert_eq!(what(&[]), "command");
    }

    #[test]
    fn stderr_keeps_its_last_words_on_one_line() {
        assert_eq!(tail(b"warning: a\nfatal: b\n"), "warning: a; fatal: b");
        let long = format!("{}\nfatal: the end", "é".repeat(STDERR_KEEP));
        let kept = tail(long.as_bytes());
        assert!(kept.len() <= STDERR_KEEP && kept.ends_with("; fatal: the end"));
    }

    #[tokio::test]
    async fn a_failed_run_says_what_git_said() {
        let dir = tempfile::tempdir().unwrap();
        let err = Git::in_repo(dir.path(), ["rev-parse", "HEAD"])
            .output()
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::Failed { .. }), "{text}");
        assert!(
            text.starts_with("git rev-parse failed (exit status: "),
            "{text}"
        );
        assert!(text.contains("not a git repository"), "{text}");
    }

    #[tokio::test]
    async fn a_run_past_its_timeout_is_killed() {
        // A server that accepts the connection and never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/index", silent.local_addr().unwrap());
        let options = Options {
            timeout: Some(Duration::from_millis(300)),
            ..Options::default()
        };
        let started = std::time::Instant::now();
        let err = Git::new(["ls-remote", "--heads"])
            .arg(&url)
            .env("no_proxy", "*")
            .with(&options)
            .output()
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(err.to_string(), "git ls-remote took longer than 300ms");
    }

    #[tokio::test]
    async fn a_fatal_after_exit_status_0_is_a_failure() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        Git::new(["init", "--quiet", "--bare"])
            .arg(dir.path().join("repo.git"))
            .output()
            .await
            .unwrap();
        // git http-backend writes its head, cannot inflate a body said to be gzip,
        // says so and exits 0.
        let garbage = b"not gzip";
        let Spawned {
            mut stdin,
            mut stdout,
            mut process,
        } = Git::http_backend(dir.path())
            .env("REQUEST_METHOD", "POST")
            .env("PATH_INFO", "/repo.git/git-upload-pack")
            .env("CONTENT_TYPE", "application/x-git-upload-pack-request")
            .env("CONTENT_LENGTH", garbage.len().to_string())
            .env("HTTP_CONTENT_ENCODING", "gzip")
            .spawn(Stderr::Log)
            .unwrap();
        stdin.write_all(garbage).await.unwrap();
        drop(stdin);
        let mut out = Vec::new();
        stdout.read_to_end(&mut out).await.unwrap();
        assert!(String::from_utf8_lossy(&out).contains("x-git-upload-pack-result"));
        let err = process.finish().await.unwrap_err();
        assert!(matches!(err, Error::Fatal { .. }), "{err}");
        let text = err.to_string();
        assert!(text.starts_with("git http-backend failed: "), "{text}");
        assert!(
            text.contains("fatal: zlib error inflating request"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn clone_mirror_puts_a_whole_repository_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source.git");
        Git::new(["init", "--quiet", "--bare"])
            .arg(&source)
            .output()
            .await
            .unwrap();
        let target = dir.path().join("mirrors").join("copy.git");
        // A broken leftover is replaced.
        std::fs::create_dir_all(&target).unwrap();
        clone_mirror(&source, &target, &Options::default())
            .await
            .unwrap();
        assert!(is_bare_repo(&target));

        let missing = dir.path().join("missing.git");
        let other = dir.path().join("other.git");
        let err = clone_mirror(&missing, &other, &Options::default())
            .await
            .unwrap_err();
        assert!(err.to_string().starts_with("git clone failed"), "{err}");
        assert!(!other.exists(), "a failed clone left {}", other.display());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".clone-"))
            .collect();
        assert!(leftovers.is_empty(), "temp dirs left behind");
    }
}
