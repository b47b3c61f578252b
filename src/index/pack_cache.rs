//! A cache of packs computed for clients of the index mirror, so that many clones
//! of the same tip cost one `git pack-objects` run, not one each.
//!
//! `git upload-pack` runs `uploadpack.packObjectsHook` instead of `git pack-objects`
//! when it is set in protected (here: command-scope, via `GIT_CONFIG_*`)
//! configuration. The hook is this binary (`moonbit-registry pack-objects-cache`):
//! the pack is a pure function of pack-objects' arguments and stdin (wanted and
//! shallow commits, which name immutable objects), so it is keyed by their sha256.
//! The first request for a key computes and stores the pack while streaming it;
//! concurrent ones wait for it and replay it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

use crate::git::{self, Git};

/// pack-objects' stdin (wanted, shallow and common commits) is small; a larger one
/// is not cached (the pack is computed directly).
const STDIN_MAX: usize = 16 << 20;
/// Packs kept; the oldest go first.
const KEEP: usize = 32;
/// How long a waiter waits for another process computing the same pack.
const WAIT_MAX: Duration = Duration::from_secs(300);

/// The hook command line, worked out once (it names this binary and the cache dir).
pub struct Hook(String);

impl Hook {
    /// A hook keeping packs in `dir`; `None` if this binary's path is unknown.
    pub fn new(dir: &Path) -> Option<Hook> {
        let exe = std::env::current_exe().ok()?;
        Some(Hook(format!(
            "{} pack-objects-cache {}",
            shell_quote(&exe.to_string_lossy()),
            shell_quote(&dir.to_string_lossy())
        )))
    }

    /// `git` (a `git http-backend` or `git upload-pack`), set to use the cache.
    pub fn configure(&self, git: Git) -> Git {
        git.protected_config("uploadpack.packObjectsHook", &self.0)
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The hook: `args` is the pack-objects command line (`git pack-objects ...`).
pub fn run(dir: &Path, args: &[String]) -> ExitCode {
    match serve(dir, args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("moonbit-registry pack cache: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(dir: &Path, args: &[String]) -> io::Result<ExitCode> {
    let Some((program, rest)) = args.split_first() else {
        return Err(io::Error::other("no pack-objects command given"));
    };
    let mut input = Vec::new();
    io::stdin()
        .take(STDIN_MAX as u64 + 1)
        .read_to_end(&mut input)?;
    if input.len() > STDIN_MAX {
        // Too much to key on: stream the rest straight into pack-objects.
        return compute(program, rest, &input, true, None);
    }
    fs::create_dir_all(dir)?;
    let mut hasher = Sha256::new();
    for arg in args {
        hasher.update(arg.as_bytes());
        hasher.update([0]);
    }
    hasher.update(&input);
    let key = hex::encode(hasher.finalize());
    let pack = dir.join(format!("{key}.pack"));
    let lock = dir.join(format!("{key}.lock"));
    let started = Instant::now();
    loop {
        if let Ok(file) = File::open(&pack) {
            return replay(file);
        }
        match OpenOptions::new().write(true).create_new(true).open(&lock) {
            Ok(_) => {
                let result = compute(program, rest, &input, false, Some(&pack));
                let _ = fs::remove_file(&lock);
                prune(dir);
                return result;
            }
            // Someone else is computing this pack: wait for it, bounded.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let stale = fs::metadata(&lock)
                    .and_then(|m| m.modified())
                    .map(|t| SystemTime::now().duration_since(t).unwrap_or_default() > WAIT_MAX)
                    .unwrap_or(false);
                if stale || started.elapsed() > WAIT_MAX {
                    let _ = fs::remove_file(&lock);
                    return compute(program, rest, &input, false, None);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

fn replay(mut file: File) -> io::Result<ExitCode> {
    io::copy(&mut file, &mut io::stdout().lock())?;
    Ok(ExitCode::SUCCESS)
}

/// Run pack-objects, streaming its pack to stdout and, with `store`, into the cache
/// (made visible by rename only when pack-objects succeeded).
fn compute(
    program: &str,
    args: &[String],
    input: &[u8],
    rest_of_stdin: bool,
    store: Option<&PathBuf>,
) -> io::Result<ExitCode> {
    let mut child = git::hooked_pack_objects(program, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| io::Error::other("no stdin"))?;
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || -> io::Result<()> {
        stdin.write_all(&input)?;
        if rest_of_stdin {
            io::copy(&mut io::stdin().lock(), &mut stdin)?;
        }
        Ok(())
    });
    let mut tmp = match store {
        Some(pack) => Some(tempfile::NamedTempFile::new_in(
            pack.parent().unwrap_or(Path::new(".")),
        )?),
        None => None,
    };
    let mut out = child
        .stdout
        .take()
        .ok_or_else(|| io::Error::other("no stdout"))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut stdout = io::stdout().lock();
    loop {
        let n = out.read(&mut buf)?;
        if n == 0 {
            break;
        }
        stdout.write_all(&buf[..n])?;
        if let Some(t) = tmp.as_mut() {
            if t.write_all(&buf[..n]).is_err() {
                tmp = None; // out of space: still serve, just do not cache
            }
        }
    }
    stdout.flush()?;
    let _ = feeder.join();
    let status = child.wait()?;
    if !status.success() {
        return Ok(ExitCode::from(
            status.code().unwrap_or(1).clamp(1, 255) as u8
        ));
    }
    if let (Some(t), Some(pack)) = (tmp, store) {
        let _ = t.persist(pack);
    }
    Ok(ExitCode::SUCCESS)
}

/// Keep the newest `KEEP` packs.
fn prune(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut packs: Vec<(SystemTime, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "pack"))
        .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    if packs.len() <= KEEP {
        return;
    }
    packs.sort();
    for (_, old) in &packs[..packs.len() - KEEP] {
        let _ = fs::remove_file(old);
    }
}
