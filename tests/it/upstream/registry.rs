//! A real test registry on disk: a git repository of JSON Lines index files
//! on branch `main`, the archives they point at, `symbols.zip` and wasm
//! assets, laid out the way mooncakes.io serves them.
//!
//! Publishing works while a server is running (everything sits behind
//! mutexes); each publish is one git commit on top of `main`, so clients can
//! fast-forward.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Cursor, Seek, Write};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tempfile::TempDir;
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

use super::clients::{self, form_urlencode, sha256_file, sha256_hex};

/// `publish_sized` archives up to this size are also kept in memory
/// (`Published::zip`); bigger ones only on disk.
pub const SIZED_IN_MEMORY_LIMIT: u64 = 64 << 20;

/// A module version as published: what the index says and what is served.
#[derive(Clone, Debug)]
pub struct Published {
    /// `user/module`, e.g. `alice/json` or `bob/lex/runtime`.
    pub name: String,
    /// Lowercase hex SHA-256 of the archive bytes; also in the index line.
    pub checksum: String,
    /// The archive bytes; empty for `publish_sized` archives bigger than
    /// [`SIZED_IN_MEMORY_LIMIT`] (read `path` instead).
    pub zip: Bytes,
    /// Form-urlencoded `user/module/version`, e.g. `alice%2Fjson%2F0.1.0`.
    pub segment: String,
    /// `user/module/version`: the archive key, as `Registry::archive` takes it.
    pub key: String,
    /// Archive size in bytes.
    pub size: u64,
    /// Where the archive is stored, for `publish_sized` archives.
    pub path: Option<PathBuf>,
    /// Index file inside the git repository, e.g. `user/alice/json.index`.
    pub index_path: String,
    /// The exact line appended to the index file (without the newline).
    pub index_line: String,
}

impl Published {
    /// The request path moon uses: `/user/<segment>.zip`.
    pub fn url_path(&self) -> String {
        format!("/user/{}.zip", self.segment)
    }

    /// The slash form linked by the web site: `/user/alice/json/0.1.0.zip`.
    pub fn slash_url_path(&self) -> String {
        format!("/user/{}.zip", self.key)
    }
}

/// Where an archive's bytes live.
#[derive(Clone, Debug)]
pub enum ArchiveBody {
    /// Small archives, kept in memory.
    Memory(Bytes),
    /// Big archives, streamed from this file.
    File(PathBuf),
}

/// One archive the server can answer `/user/<segment>.zip` with.
#[derive(Clone, Debug)]
pub struct Archive {
    /// SHA-256 of the bytes served (may differ from the index after
    /// `Registry::set_archive_bytes`).
    pub checksum: String,
    pub size: u64,
    pub body: ArchiveBody,
}

/// The test registry. Dropping it deletes everything.
pub struct Registry {
    root: TempDir,
    /// Serialises git commands that change the repository.
    git_lock: Mutex<()>,
    state: Mutex<State>,
}

struct State {
    archives: HashMap<String, Archive>,
    assets: HashMap<String, Bytes>,
    symbols: Bytes,
    symbols_etag: String,
    /// `Cache-Control` sent with `symbols.zip` (none by default, like mooncakes.io).
    symbols_cache_control: Option<String>,
    next_file: u64,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl Registry {
    /// Creates the git repository (`git init -b main`, local identity, a
    /// first commit holding a README) and an initial `symbols.zip`.
    pub fn new() -> Registry {
        let root = tempfile::Builder::new()
            .prefix("test-registry-")
            .tempdir()
            .expect("create temp dir for the test registry");
        for dir in ["home", "git", "archives"] {
            fs::create_dir_all(root.path().join(dir))
                .unwrap_or_else(|e| panic!("create {dir} in the test registry: {e}"));
        }
        let symbols = zip_of(&[("README.txt", b"test symbols, version 1\n".as_slice())]);
        let symbols_etag = etag_of(&symbols);
        let registry = Registry {
            root,
            git_lock: Mutex::new(()),
            state: Mutex::new(State {
                archives: HashMap::new(),
                assets: HashMap::new(),
                symbols,
                symbols_etag,
                symbols_cache_control: None,
                next_file: 0,
            }),
        };
        let repo = registry.git_dir();
        let home = registry.home();
        let mut init = clients::git(&home);
        clients::run_ok(init.args(["init", "-q", "-b", "main"]).arg(&repo));
        registry.git(&["config", "user.name", "Test Registry"]);
        registry.git(&["config", "user.email", "registry@example.invalid"]);
        registry.git(&["config", "commit.gpgsign", "false"]);
        fs::write(
            repo.join("README.md"),
            "Test index for moonbit-registry integration tests.\n",
        )
        .expect("write README.md");
        registry.git(&["add", "README.md"]);
        registry.git(&["commit", "-q", "-m", "initial commit"]);
        registry
    }

    /// Publishes `name@version` with `deps` (`[("bob/lex", "0.2.0")]`): builds
    /// a zip whose root holds `moon.mod.json` and a small source package,
    /// appends its index line and commits.
    pub fn publish(&self, name: &str, version: &str, deps: &[(&str, &str)]) -> Published {
        let deps_json = deps_object(deps);
        let mod_json = format!(
            "{{\"name\":{},\"version\":{},\"deps\":{},\"source\":\"src\"}}\n",
            json_str(name),
            json_str(version),
            deps_json
        );
        let lib = format!("///|\npub fn hello() -> String {{\n  \"{name}@{version}\"\n}}\n");
        let zip = zip_of(&[
            ("moon.mod.json", mod_json.as_bytes()),
            ("src/lib/moon.pkg.json", b"{}\n".as_slice()),
            ("src/lib/hello.mbt", lib.as_bytes()),
        ]);
        let checksum = sha256_hex(&zip);
        let key = archive_key(name, version);
        let archive = Archive {
            checksum: checksum.clone(),
            size: zip.len() as u64,
            body: ArchiveBody::Memory(zip.clone()),
        };
        self.lock_state().archives.insert(key, archive);
        self.commit_version(name, version, &deps_json, &checksum, zip, None)
    }

    /// Publishes `name@version` whose archive is about `size_bytes` long
    /// (exactly, unless smaller than the zip overhead): `moon.mod.json` plus
    /// one STORED file of pseudo-random bytes. The archive is written to disk
    /// and streamed from there; see [`SIZED_IN_MEMORY_LIMIT`] for `zip`.
    pub fn publish_sized(&self, name: &str, version: &str, size_bytes: usize) -> Published {
        let mod_json = format!(
            "{{\"name\":{},\"version\":{},\"deps\":{{}}}}\n",
            json_str(name),
            json_str(version)
        );
        // Same entries with an empty payload: what the zip costs around it.
        let overhead = {
            let mut cursor = Cursor::new(Vec::new());
            write_sized_zip(&mut cursor, &mod_json, 0, 0).expect("measure zip overhead");
            cursor.into_inner().len()
        };
        let payload = size_bytes.saturating_sub(overhead) as u64;
        let path = {
            let mut state = self.lock_state();
            state.next_file += 1;
            self.root
                .path()
                .join("archives")
                .join(format!("{}.zip", state.next_file))
        };
        let mut file =
            File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        let seed =
            u64::from_str_radix(&sha256_hex(archive_key(name, version).as_bytes())[..16], 16)
                .expect("hex seed");
        write_sized_zip(&mut file, &mod_json, payload, seed)
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        file.sync_all().ok();
        drop(file);
        let size = fs::metadata(&path).expect("stat sized archive").len();
        let checksum = sha256_file(&path);
        let zip = if size <= SIZED_IN_MEMORY_LIMIT {
            Bytes::from(fs::read(&path).expect("read sized archive"))
        } else {
            Bytes::new()
        };
        let key = archive_key(name, version);
        let archive = Archive {
            checksum: checksum.clone(),
            size,
            body: ArchiveBody::File(path.clone()),
        };
        self.lock_state().archives.insert(key, archive);
        self.commit_version(name, version, "{}", &checksum, zip, Some((path, size)))
    }

    /// Appends `line` verbatim (a newline is added) to `user/<name>.index`
    /// and commits: for malformed or unusual index lines.
    pub fn append_index_line(&self, name: &str, line: &str) {
        let index_path = index_path(name);
        self.append_and_commit(&index_path, line, &format!("append raw line to {name}"));
    }

    /// Serves `bytes` for `key` (`user/module/version`) from now on without
    /// touching the index, e.g. to make the archive disagree with its checksum.
    pub fn set_archive_bytes(&self, key: &str, bytes: Bytes) {
        let archive = Archive {
            checksum: sha256_hex(&bytes),
            size: bytes.len() as u64,
            body: ArchiveBody::Memory(bytes),
        };
        self.lock_state().archives.insert(key.to_string(), archive);
    }

    /// The archive served for `key` (`user/module/version`), if any.
    pub fn archive(&self, key: &str) -> Option<Archive> {
        self.lock_state().archives.get(key).cloned()
    }

    /// Serves `bytes` at `/assets/<path>`; `path` may start with `/assets/`
    /// or `/`, e.g. `moonbitlang/parser@0.3.3/parser.wasm`.
    pub fn put_asset(&self, path: &str, bytes: impl Into<Bytes>) {
        let path = asset_key(path).to_string();
        self.lock_state().assets.insert(path, bytes.into());
    }

    /// The bytes served at `/assets/<path>`, if any.
    pub fn asset(&self, path: &str) -> Option<Bytes> {
        self.lock_state().assets.get(asset_key(path)).cloned()
    }

    /// Replaces `symbols.zip`; returns the new ETag (quoted, strong).
    pub fn set_symbols(&self, bytes: impl Into<Bytes>) -> String {
        let bytes = bytes.into();
        let etag = etag_of(&bytes);
        let mut state = self.lock_state();
        state.symbols = bytes;
        state.symbols_etag = etag.clone();
        etag
    }

    /// The current `symbols.zip` and its ETag.
    pub fn symbols(&self) -> (Bytes, String) {
        let state = self.lock_state();
        (state.symbols.clone(), state.symbols_etag.clone())
    }

    /// Sends `Cache-Control: <value>` with `symbols.zip` from now on (`None`: no header).
    pub fn set_symbols_cache_control(&self, value: Option<&str>) {
        self.lock_state().symbols_cache_control = value.map(str::to_string);
    }

    /// The `Cache-Control` value sent with `symbols.zip`, if any.
    pub fn symbols_cache_control(&self) -> Option<String> {
        self.lock_state().symbols_cache_control.clone()
    }

    /// The index repository (a work tree with `.git`).
    pub fn git_dir(&self) -> PathBuf {
        self.root.path().join("git").join("index")
    }

    /// `GIT_PROJECT_ROOT` for `git http-backend`: URL `/git/index` maps to
    /// [`Registry::git_dir`].
    pub fn git_project_root(&self) -> PathBuf {
        self.root.path().join("git")
    }

    /// `$HOME` for every git command run on the registry's behalf.
    pub fn home(&self) -> PathBuf {
        self.root.path().join("home")
    }

    /// The commit id `main` points at.
    pub fn head(&self) -> String {
        self.git(&["rev-parse", "HEAD"]).trim().to_string()
    }

    /// Current contents of `user/<name>.index` in the repository, if any.
    pub fn index_file(&self, name: &str) -> Option<String> {
        fs::read_to_string(self.git_dir().join(index_path(name))).ok()
    }

    /// Runs isolated `git -C <repo> ARGS`, panics on failure, returns stdout.
    pub fn git(&self, args: &[&str]) -> String {
        let mut cmd = clients::git(&self.home());
        cmd.arg("-C").arg(self.git_dir()).args(args);
        let out = clients::run_ok(&mut cmd);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn commit_version(
        &self,
        name: &str,
        version: &str,
        deps_json: &str,
        checksum: &str,
        zip: Bytes,
        file: Option<(PathBuf, u64)>,
    ) -> Published {
        let index_line = format!(
            "{{\"name\":{},\"version\":{},\"deps\":{},\"checksum\":{},\"created_at\":{}}}",
            json_str(name),
            json_str(version),
            deps_json,
            json_str(checksum),
            json_str(&created_at_now())
        );
        let index_path = index_path(name);
        self.append_and_commit(
            &index_path,
            &index_line,
            &format!("publish {name}@{version}"),
        );
        let key = archive_key(name, version);
        let (path, size) = match file {
            Some((path, size)) => (Some(path), size),
            None => (None, zip.len() as u64),
        };
        Published {
            name: name.to_string(),
            checksum: checksum.to_string(),
            segment: form_urlencode(&key),
            key,
            zip,
            size,
            path,
            index_path,
            index_line,
        }
    }

    fn append_and_commit(&self, index_path: &str, line: &str, message: &str) {
        let _guard = self.git_lock.lock().unwrap_or_else(|e| e.into_inner());
        let file = self.git_dir().join(index_path);
        if let Some(parent) = file.parent() {
            fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("create {}: {e}", parent.display()));
        }
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&file)
            .unwrap_or_else(|e| panic!("open {}: {e}", file.display()));
        f.write_all(format!("{line}\n").as_bytes())
            .unwrap_or_else(|e| panic!("append to {}: {e}", file.display()));
        drop(f);
        self.git(&["add", "--", index_path]);
        self.git(&["commit", "-q", "-m", message]);
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `user/module/version`.
pub fn archive_key(name: &str, version: &str) -> String {
    format!("{name}/{version}")
}

/// `user/<name>.index`, relative to the repository root.
pub fn index_path(name: &str) -> String {
    format!("user/{name}.index")
}

fn asset_key(path: &str) -> &str {
    let path = path.strip_prefix("/assets/").unwrap_or(path);
    path.trim_start_matches('/')
}

fn etag_of(bytes: &[u8]) -> String {
    format!("\"{}\"", &sha256_hex(bytes)[..16])
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("serialize a string")
}

/// `{"a/b":"1.0.0",...}` in the given order, compact.
fn deps_object(deps: &[(&str, &str)]) -> String {
    let fields: Vec<String> = deps
        .iter()
        .map(|(name, version)| format!("{}:{}", json_str(name), json_str(version)))
        .collect();
    format!("{{{}}}", fields.join(","))
}

/// A small deflated zip with fixed timestamps (same input, same bytes).
pub fn zip_of(files: &[(&str, &[u8])]) -> Bytes {
    let mut writer = ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Deflated)
        .unix_permissions(0o644);
    for (name, contents) in files {
        writer.start_file(*name, options).expect("zip start_file");
        writer.write_all(contents).expect("zip write");
    }
    Bytes::from(writer.finish().expect("zip finish").into_inner())
}

/// `moon.mod.json` (deflated) and `payload.bin`: `payload` STORED
/// pseudo-random bytes, written in 64 KiB pieces.
fn write_sized_zip<W: Write + Seek>(
    out: W,
    mod_json: &str,
    payload: u64,
    seed: u64,
) -> zip::result::ZipResult<()> {
    let mut writer = ZipWriter::new(out);
    let deflated = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Deflated)
        .unix_permissions(0o644);
    writer.start_file("moon.mod.json", deflated)?;
    writer.write_all(mod_json.as_bytes())?;
    let stored = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Stored)
        .unix_permissions(0o644);
    writer.start_file("payload.bin", stored)?;
    let mut rng = SplitMix64(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = payload;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        for word in buf[..n].chunks_mut(8) {
            let bytes = rng.next().to_le_bytes();
            word.copy_from_slice(&bytes[..word.len()]);
        }
        writer.write_all(&buf[..n])?;
        left -= n as u64;
    }
    writer.finish()?;
    Ok(())
}

struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Now as ISO-8601 with microseconds and `+00:00`, like the real index.
fn created_at_now() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}+00:00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_micros()
    )
}

/// Days since 1970-01-01 to (year, month, day); Howard Hinnant's algorithm.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A throwaway `$HOME` for clients started by tests.
pub fn temp_home() -> TempDir {
    tempfile::Builder::new()
        .prefix("test-home-")
        .tempdir()
        .expect("create temp home")
}
