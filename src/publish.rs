//! Publishing a module version to a source the gateway hosts (`local = true`):
//! the `publish` command and `POST /-/publish` both end in [`publish`].
//!
//! A version is published by (1) making or checking its archive (a module
//! directory is zipped deterministically; a zip is checked entry by entry), (2)
//! checking its `moon.mod.json` (name, semver version, the source's claims, every
//! registry dependency known to some source's index), then, holding the source's
//! publish lock, (3) renaming the archive into place and (4) appending its line to
//! `user/<user>/<module>.index` in a commit on `main` made with a private git index
//! file and `update-ref <new> <old>`, so a concurrent writer is detected, never
//! overwritten. Until step 4 the version does not exist for any client, and every
//! refusal leaves the source as it was. Published versions are immutable.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::app::Services;
use crate::body::{self, GatewayBody};
use crate::client::bearer_matches;
use crate::config::Source;
use crate::git::{self, Git};
use crate::hosted::{self, Hosted};
use crate::index::checksums::registry_deps;
use crate::index::Index;

/// Largest `moon.mod.json` read.
const MANIFEST_MAX: u64 = 1024 * 1024;
/// Most entries in one archive (real modules have hundreds at most).
const ENTRIES_MAX: usize = 50_000;
/// Unpacked bytes allowed per byte of `storage.archive_max`: text compresses
/// well, a zip bomb does not get past this.
const UNPACKED_FACTOR: u64 = 8;
/// How long a publish waits for another one to finish.
const LOCK_WAIT: Duration = Duration::from_secs(60);
/// Scratch files older than the longest upload plus this are a crash's leftovers.
const TMP_GRACE: Duration = Duration::from_secs(3600);
/// Bound on one git command in the hosted index (all local and quick).
const GIT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest module name accepted.
const NAME_MAX: usize = 256;
/// Top-level directories of a module directory that are build output or caches,
/// never part of its archive (`.git` is left out at any depth).
const SKIPPED_AT_ROOT: [&str; 3] = [".mooncakes", "_build", "target"];

/// What was published.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Published {
    pub name: String,
    pub version: String,
    pub checksum: String,
    pub source: String,
}

/// Why nothing was published; each kind has its HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// No such local source, or none configured.
    #[error("{0}")]
    Source(String),
    /// The version is published already: archives are immutable.
    #[error("{0}")]
    Exists(String),
    /// The module itself is wrong: `moon.mod.json`, its name, version or deps.
    #[error("{0}")]
    Module(String),
    /// Not a usable archive: not a zip, path tricks, too many entries.
    #[error("{0}")]
    Archive(String),
    /// The name is not this source's to publish.
    #[error("{0}")]
    Claims(String),
    #[error("{0}")]
    TooLarge(String),
    /// The upload took too long.
    #[error("{0}")]
    Timeout(String),
    /// The gateway failed (disk, git): nothing was published.
    #[error("{0}")]
    Failed(String),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Source(_) => StatusCode::NOT_FOUND,
            Refusal::Exists(_) => StatusCode::CONFLICT,
            Refusal::Module(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Refusal::Archive(_) => StatusCode::BAD_REQUEST,
            Refusal::Claims(_) => StatusCode::FORBIDDEN,
            Refusal::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            Refusal::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

fn failed(context: &str) -> impl FnOnce(std::io::Error) -> Refusal + '_ {
    move |e| Refusal::Failed(format!("{context}: {e}"))
}

/// What to publish.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// A module directory (with `moon.mod.json`), zipped here.
    Dir(&'a Path),
    /// A zip laid out as `moon package` makes it (module root at the zip root).
    Zip(&'a Path),
}

/// The local source to publish to: the one named, else the first local one.
pub fn target<'a>(sources: &'a [Source], name: Option<&str>) -> Result<&'a Source, Refusal> {
    match name {
        Some(name) => match sources.iter().find(|s| s.name == name) {
            Some(s) if s.local => Ok(s),
            Some(_) => Err(Refusal::Source(format!(
                "source `{name}` is not hosted here (`local = true`): nothing can be published to it"
            ))),
            None => Err(Refusal::Source(format!("there is no source named `{name}`"))),
        },
        None => sources.iter().find(|s| s.local).ok_or_else(|| {
            Refusal::Source(
                "no local source is configured: add [[sources]] name = \"local\" local = true".into(),
            )
        }),
    }
}

/// Publish `input` to the local source `source` (default: the first one). The
/// index mirrors are read as they are (the hosted ones re-read first): a
/// dependency must be known to one of them.
pub async fn publish(
    app: &Services,
    input: Input<'_>,
    source: Option<&str>,
) -> Result<Published, Refusal> {
    let target = target(&app.sources, source)?;
    let hosted = Hosted::new(app.data_dir(), &target.name);
    let tmp = hosted.tmp_dir();
    tokio::fs::create_dir_all(&tmp)
        .await
        .map_err(failed("cannot create the publish scratch dir"))?;
    let archive_max = app.config.storage.archive_max.as_u64();
    let prepared = {
        let (input, tmp) = (owned(input), tmp.clone());
        tokio::task::spawn_blocking(move || prepare(&input, &tmp, archive_max))
            .await
            .map_err(|e| Refusal::Failed(format!("archive task failed: {e}")))??
    };
    let module = Module::check(&prepared.manifest)?;
    let label = format!("{}@{}", module.name, module.version);
    if !target.claims.is_empty() && !target.claims.matches(&module.name) {
        return Err(Refusal::Claims(format!(
            "`{}` is outside what source `{}` claims: publish it to another source or extend its claims",
            module.name, target.name
        )));
    }
    if let Some(other) = app
        .sources
        .iter()
        .find(|s| s.name != target.name && s.claims.matches(&module.name))
    {
        return Err(Refusal::Claims(format!(
            "`{}` is claimed by source `{}`, not `{}`",
            module.name, other.name, target.name
        )));
    }

    let _lock = lock(&hosted.lock_path()).await?;
    // What a crash left: nothing running can be older than an upload may last.
    sweep(&tmp, app.config.publish.body_timeout + TMP_GRACE);
    let repo = hosted.index_dir();
    hosted::create_index(&repo).await.map_err(Refusal::Failed)?;
    // Re-read what other processes may have published meanwhile.
    for m in app.index.mirrors().iter().filter(|m| m.is_hosted()) {
        m.refresh_now(false).await;
    }
    let tip = git_text(
        &repo,
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            "refs/heads/main^{commit}",
        ],
    )
    .await
    .ok();
    let index_path = format!("user/{}.index", module.name);
    let existing = match &tip {
        Some(tip) => read_file_at(&repo, tip, &index_path).await?,
        None => None,
    };
    let text = existing.unwrap_or_default();
    if lists_version(&text, &module.version) {
        return Err(Refusal::Exists(format!(
            "{label} is already published in source `{}`; published versions are immutable: publish a new version",
            target.name
        )));
    }
    let unknown: Vec<&str> = module
        .deps
        .iter()
        .map(|(dep, _)| dep.as_str())
        .filter(|dep| !known(&app.index, dep))
        .collect();
    if !unknown.is_empty() {
        return Err(Refusal::Module(format!(
            "{label} depends on {}, which no source's index lists",
            unknown.join(", ")
        )));
    }

    // The archive first: a version is only visible once its index line is
    // committed, and then its file is already there.
    let key = crate::archive::ArchiveKey {
        user: module.user.clone(),
        module: module.module.clone(),
        version: module.version.clone(),
    };
    let path = hosted.archive_path(&key);
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(failed("cannot create the archive dir"))?;
    }
    // A file here without an index line is what a crashed publish left: replaced.
    prepared
        .file
        .persist(&path)
        .map_err(|e| Refusal::Failed(format!("cannot move the archive into place: {e}")))?;
    let line = index_line(prepared.manifest, &prepared.sha256);
    let mut content = text;
    if !content.is_empty() && !content.ends_with('\n') {
        content.push('\n');
    }
    content.push_str(&line);
    content.push('\n');
    let message = format!("publish {label}");
    if let Err(e) = commit(&repo, &tmp, tip.as_deref(), &index_path, &content, &message).await {
        let _ = tokio::fs::remove_file(&path).await;
        return Err(e);
    }
    // The running server sees it at once (another process: at its next advertisement).
    app.index
        .mirror_named(&target.name)
        .refresh_now(false)
        .await;
    tracing::info!(module = %label, source = %target.name, checksum = %prepared.sha256, "published");
    Ok(Published {
        name: module.name,
        version: module.version,
        checksum: prepared.sha256,
        source: target.name.clone(),
    })
}

/// `moonbit-registry publish PATH [--source NAME]`: every mirror read from the data
/// dir as it is (nothing fetched), then [`publish`].
pub async fn run(app: &Services, path: &Path, source: Option<&str>) -> anyhow::Result<Published> {
    for m in app.index.mirrors() {
        if let Err(error) = m.load().await {
            tracing::warn!(source = %m.source, %error, "index mirror unreadable");
        }
    }
    let meta = std::fs::metadata(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let input = if meta.is_dir() {
        Input::Dir(path)
    } else {
        Input::Zip(path)
    };
    Ok(publish(app, input, source).await?)
}

/// `POST /-/publish[?source=NAME]` with the zip as the body and the publish token.
pub async fn handle(
    app: &Services,
    req: Request<GatewayBody>,
    source: Option<&str>,
) -> Response<GatewayBody> {
    let Some(token) = &app.publish_token else {
        return body::text(
            StatusCode::NOT_FOUND,
            "publishing over HTTP is off: set [publish] token_env to the name of an environment variable holding a token (or use `moonbit-registry publish`)",
        );
    };
    if !bearer_matches(req.headers().get(header::AUTHORIZATION), token) {
        let mut resp = body::text(
            StatusCode::UNAUTHORIZED,
            "publishing needs the publish bearer token (Authorization: Bearer ...)",
        );
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return resp;
    }
    match receive_and_publish(app, req, source).await {
        Ok(published) => body::json(
            StatusCode::CREATED,
            &serde_json::to_value(&published).unwrap_or_default(),
        ),
        Err(refusal) => body::json(
            refusal.status(),
            &serde_json::json!({ "error": refusal.to_string() }),
        ),
    }
}

async fn receive_and_publish(
    app: &Services,
    req: Request<GatewayBody>,
    source: Option<&str>,
) -> Result<Published, Refusal> {
    let target = target(&app.sources, source)?;
    let tmp = Hosted::new(app.data_dir(), &target.name).tmp_dir();
    tokio::fs::create_dir_all(&tmp)
        .await
        .map_err(failed("cannot create the publish scratch dir"))?;
    let upload =
        tempfile::NamedTempFile::new_in(&tmp).map_err(failed("cannot spool the upload"))?;
    let settings = &app.config.publish;
    let max = app.config.storage.archive_max.as_u64();
    let receive = receive(req, upload.path(), max, settings.body_idle);
    match tokio::time::timeout(settings.body_timeout, receive).await {
        Ok(received) => received?,
        Err(_) => {
            return Err(Refusal::Timeout(format!(
                "the upload took longer than {:?}",
                settings.body_timeout
            )))
        }
    }
    publish(app, Input::Zip(upload.path()), Some(&target.name)).await
}

/// Write the request body to `path`: at most `max` bytes, no pause over `idle`.
async fn receive(
    req: Request<GatewayBody>,
    path: &Path,
    max: u64,
    idle: Duration,
) -> Result<(), Refusal> {
    let too_large = || {
        Refusal::TooLarge(format!(
            "the archive is larger than storage.archive_max ({max} bytes)"
        ))
    };
    if crate::upstream::content_length(req.headers()).is_some_and(|len| len > max) {
        return Err(too_large());
    }
    let mut body = req.into_body();
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(failed("cannot spool the upload"))?;
    let mut written = 0u64;
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => {
                return Err(Refusal::Timeout(format!(
                    "the upload paused for longer than {idle:?}"
                )))
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(Refusal::Archive(format!("the upload broke off: {e}"))),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        written += data.len() as u64;
        if written > max {
            return Err(too_large());
        }
        file.write_all(&data)
            .await
            .map_err(failed("cannot spool the upload"))?;
    }
    file.flush()
        .await
        .map_err(failed("cannot spool the upload"))?;
    Ok(())
}

/// [`Input`] with its own path, for a blocking task.
enum OwnedInput {
    Dir(PathBuf),
    Zip(PathBuf),
}

fn owned(input: Input<'_>) -> OwnedInput {
    match input {
        Input::Dir(p) => OwnedInput::Dir(p.to_path_buf()),
        Input::Zip(p) => OwnedInput::Zip(p.to_path_buf()),
    }
}

/// An archive ready to be moved into place.
struct Prepared {
    file: tempfile::NamedTempFile,
    sha256: String,
    manifest: Map<String, Value>,
}

/// Make (from a directory) or copy and check (a zip) the archive into a temp file
/// in `tmp`, with its sha256 and its `moon.mod.json`.
fn prepare(input: &OwnedInput, tmp: &Path, archive_max: u64) -> Result<Prepared, Refusal> {
    let mut file =
        tempfile::NamedTempFile::new_in(tmp).map_err(failed("cannot create a temp file"))?;
    match input {
        OwnedInput::Dir(dir) => {
            zip_dir(dir, file.as_file_mut(), archive_max)?;
        }
        OwnedInput::Zip(zip) => {
            let mut src = std::fs::File::open(zip)
                .map_err(|e| Refusal::Archive(format!("cannot read {}: {e}", zip.display())))?;
            let len = src.metadata().map_err(failed("cannot read the zip"))?.len();
            if len > archive_max {
                return Err(Refusal::TooLarge(format!(
                    "the archive is {len} bytes, more than storage.archive_max ({archive_max})"
                )));
            }
            // Copied, so what is checked is what is kept, whatever happens to the input.
            std::io::copy(&mut (&mut src).take(archive_max + 1), file.as_file_mut())
                .map_err(failed("cannot copy the zip"))?;
        }
    }
    let f = file.as_file_mut();
    f.sync_all().map_err(failed("cannot write the archive"))?;
    let len = f
        .metadata()
        .map_err(failed("cannot write the archive"))?
        .len();
    if len > archive_max {
        return Err(Refusal::TooLarge(format!(
            "the archive is {len} bytes, more than storage.archive_max ({archive_max})"
        )));
    }
    f.rewind().map_err(failed("cannot read the archive back"))?;
    let manifest = check_zip(&mut *f, archive_max)?;
    f.rewind().map_err(failed("cannot read the archive back"))?;
    let mut hasher = Sha256::new();
    std::io::copy(f, &mut hasher).map_err(failed("cannot read the archive back"))?;
    Ok(Prepared {
        file,
        sha256: hex::encode(hasher.finalize()),
        manifest,
    })
}

/// Check every entry of a zip (no path tricks, no links, bounded count and
/// unpacked size) and return its root `moon.mod.json`.
fn check_zip<R: Read + Seek>(reader: R, archive_max: u64) -> Result<Map<String, Value>, Refusal> {
    let mut zip = zip::ZipArchive::new(reader)
        .map_err(|e| Refusal::Archive(format!("not a readable zip: {e}")))?;
    if zip.len() > ENTRIES_MAX {
        return Err(Refusal::Archive(format!(
            "the zip has {} entries, more than {ENTRIES_MAX}",
            zip.len()
        )));
    }
    let unpacked_max = archive_max.saturating_mul(UNPACKED_FACTOR);
    let mut unpacked = 0u64;
    for i in 0..zip.len() {
        let entry = zip
            .by_index_raw(i)
            .map_err(|e| Refusal::Archive(format!("zip entry {i} is unreadable: {e}")))?;
        let name = entry.name().to_string();
        if let Some(why) = bad_entry_name(&name) {
            return Err(Refusal::Archive(format!("zip entry `{name}`: {why}")));
        }
        if entry.is_symlink() {
            return Err(Refusal::Archive(format!(
                "zip entry `{name}` is a symbolic link; archives hold files only"
            )));
        }
        if entry.encrypted() {
            return Err(Refusal::Archive(format!("zip entry `{name}` is encrypted")));
        }
        unpacked = unpacked.saturating_add(entry.size());
        if unpacked > unpacked_max {
            return Err(Refusal::Archive(format!(
                "the zip unpacks to more than {unpacked_max} bytes"
            )));
        }
    }
    let mut manifest = zip.by_name("moon.mod.json").map_err(|_| {
        Refusal::Module(
            "no moon.mod.json at the root of the archive (the zip root must be the module root)"
                .into(),
        )
    })?;
    let mut text = Vec::new();
    (&mut manifest)
        .take(MANIFEST_MAX + 1)
        .read_to_end(&mut text)
        .map_err(|e| Refusal::Archive(format!("moon.mod.json cannot be unpacked: {e}")))?;
    parse_manifest(&text)
}

/// Why a zip entry name could write outside the module root, if it could.
fn bad_entry_name(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > 4096 {
        return Some("empty or overlong name");
    }
    if name.starts_with('/') || name.contains('\\') || name.contains(':') {
        return Some("absolute path, backslash or drive letter");
    }
    if name.chars().any(char::is_control) {
        return Some("control character in the name");
    }
    let path = name.strip_suffix('/').unwrap_or(name);
    if path
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Some("empty, `.` or `..` path segment");
    }
    None
}

fn parse_manifest(text: &[u8]) -> Result<Map<String, Value>, Refusal> {
    if text.len() as u64 > MANIFEST_MAX {
        return Err(Refusal::Module(format!(
            "moon.mod.json is larger than {MANIFEST_MAX} bytes"
        )));
    }
    match serde_json::from_slice::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Refusal::Module("moon.mod.json is not a JSON object".into())),
        Err(e) => Err(Refusal::Module(format!(
            "moon.mod.json is not valid JSON: {e}"
        ))),
    }
}

/// Zip the module directory `dir` into `out`: files only, sorted by path, fixed
/// timestamps and modes, so the same tree always gives the same bytes (and sha256).
fn zip_dir(dir: &Path, out: &mut std::fs::File, archive_max: u64) -> Result<(), Refusal> {
    let manifest = dir.join("moon.mod.json");
    if !manifest.is_file() {
        return Err(Refusal::Module(format!(
            "{} has no moon.mod.json: not a module directory",
            dir.display()
        )));
    }
    let mut files = Vec::new();
    let mut total = 0u64;
    collect(dir, "", &mut files, &mut total, archive_max)?;
    files.sort();
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(out));
    for (name, path, executable) in &files {
        let size = std::fs::metadata(path)
            .map_err(failed("cannot read a module file"))?
            .len();
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .last_modified_time(zip::DateTime::default())
            .unix_permissions(if *executable { 0o755 } else { 0o644 })
            .large_file(size >= u64::from(u32::MAX));
        zip.start_file(name.as_str(), options)
            .map_err(|e| Refusal::Failed(format!("cannot write the zip: {e}")))?;
        let mut src = std::fs::File::open(path).map_err(failed("cannot read a module file"))?;
        // Bounded by the size seen when listed: a file growing meanwhile is cut, and
        // the archive stays within the bound checked.
        std::io::copy(&mut (&mut src).take(size), &mut zip)
            .map_err(failed("cannot write the zip"))?;
    }
    let mut writer = zip
        .finish()
        .map_err(|e| Refusal::Failed(format!("cannot write the zip: {e}")))?;
    writer.flush().map_err(failed("cannot write the zip"))?;
    Ok(())
}

/// The files under `dir` (relative name with `/`, path, executable bit), minus
/// build output and `.git`; symbolic links are refused (they could point anywhere).
fn collect(
    dir: &Path,
    prefix: &str,
    files: &mut Vec<(String, PathBuf, bool)>,
    total: &mut u64,
    archive_max: u64,
) -> Result<(), Refusal> {
    let entries = std::fs::read_dir(dir).map_err(failed("cannot list the module directory"))?;
    for entry in entries {
        let entry = entry.map_err(failed("cannot list the module directory"))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(Refusal::Module(format!(
                "{}: file names must be UTF-8",
                entry.path().display()
            )));
        };
        if name == ".git" || (prefix.is_empty() && SKIPPED_AT_ROOT.contains(&name)) {
            continue;
        }
        let relative = format!("{prefix}{name}");
        let kind = entry
            .file_type()
            .map_err(failed("cannot read a module file"))?;
        if kind.is_symlink() {
            return Err(Refusal::Module(format!(
                "`{relative}` is a symbolic link; archives hold files only"
            )));
        }
        if kind.is_dir() {
            collect(
                &entry.path(),
                &format!("{relative}/"),
                files,
                total,
                archive_max,
            )?;
        } else if kind.is_file() {
            let meta = entry
                .metadata()
                .map_err(failed("cannot read a module file"))?;
            *total = total.saturating_add(meta.len());
            if *total > archive_max {
                return Err(Refusal::TooLarge(format!(
                    "the module's files are larger than storage.archive_max ({archive_max} bytes)"
                )));
            }
            use std::os::unix::fs::PermissionsExt;
            let executable = meta.permissions().mode() & 0o111 != 0;
            files.push((relative, entry.path(), executable));
            if files.len() > ENTRIES_MAX {
                return Err(Refusal::Archive(format!(
                    "the module has more than {ENTRIES_MAX} files"
                )));
            }
        }
    }
    Ok(())
}

/// The parts of `moon.mod.json` publishing relies on, checked.
struct Module {
    name: String,
    user: String,
    module: String,
    version: String,
    /// Registry dependencies (path and git ones are not published here).
    deps: Vec<(String, String)>,
}

impl Module {
    fn check(manifest: &Map<String, Value>) -> Result<Module, Refusal> {
        let name = match manifest.get("name") {
            Some(Value::String(n)) => n.clone(),
            _ => return Err(Refusal::Module("moon.mod.json has no `name` string".into())),
        };
        let (user, module) = name
            .split_once('/')
            .filter(|_| valid_name(&name))
            .ok_or_else(|| {
                Refusal::Module(format!(
                    "moon.mod.json: name `{name}` is not `user/module` (letters, digits, `-`, `_`, `.`; no `..`)"
                ))
            })?;
        let version = match manifest.get("version") {
            Some(Value::String(v)) => v.clone(),
            _ => {
                return Err(Refusal::Module(
                    "moon.mod.json has no `version` string".into(),
                ))
            }
        };
        if semver::Version::parse(&version).is_err() {
            return Err(Refusal::Module(format!(
                "moon.mod.json: version `{version}` is not a semantic version (e.g. 0.1.0)"
            )));
        }
        let deps = match manifest.get("deps") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(deps)) => {
                for (dep, spec) in deps {
                    if !matches!(spec, Value::String(_) | Value::Object(_)) {
                        return Err(Refusal::Module(format!(
                            "moon.mod.json: dependency `{dep}` is neither a version nor an object"
                        )));
                    }
                }
                registry_deps(deps.clone())
            }
            Some(_) => {
                return Err(Refusal::Module(
                    "moon.mod.json: `deps` is not an object".into(),
                ))
            }
        };
        Ok(Module {
            user: user.to_string(),
            module: module.to_string(),
            name: name.clone(),
            version,
            deps,
        })
    }
}

/// `user/module[/more]`, every segment a plain word: it names files and URLs.
fn valid_name(name: &str) -> bool {
    let segments: Vec<&str> = name.split('/').collect();
    name.len() <= NAME_MAX
        && segments.len() >= 2
        && segments.iter().all(|s| {
            !s.is_empty()
                && *s != "."
                && *s != ".."
                && !s.starts_with('.')
                && s.chars()
                    .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

/// Whether some source's index (as this process holds it) lists module `name`.
fn known(index: &Index, name: &str) -> bool {
    index
        .mirrors()
        .iter()
        .any(|m| m.snapshot().checksums.versions(name).next().is_some())
}

/// Whether an index file's text has a line for `version`.
fn lists_version(text: &str, version: &str) -> bool {
    text.lines().any(|line| {
        serde_json::from_str::<Value>(line)
            .ok()
            .and_then(|v| {
                v.get("version")
                    .and_then(Value::as_str)
                    .map(|v| v == version)
            })
            .unwrap_or(false)
    })
}

/// The index line: the module's `moon.mod.json` fields plus `checksum` and
/// `created_at`, compact, one line.
fn index_line(mut manifest: Map<String, Value>, sha256: &str) -> String {
    manifest.insert("checksum".into(), Value::String(sha256.to_string()));
    manifest.insert("created_at".into(), Value::String(created_at()));
    Value::Object(manifest).to_string()
}

/// Now as mooncakes.io writes it: `2026-02-12T16:19:37.264178+00:00`.
fn created_at() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}+00:00",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// Remove what in `dir` was last modified more than `age` ago.
fn sweep(dir: &Path, age: Duration) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|elapsed| elapsed > age);
        if old {
            let path = entry.path();
            let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
        }
    }
}

/// One publish at a time per source, across processes: an exclusive lock on the
/// source's lock file, released when the returned file is dropped.
async fn lock(path: &Path) -> Result<std::fs::File, Refusal> {
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(failed("cannot create the local source dir"))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(failed("cannot open the publish lock"))?;
    let deadline = tokio::time::Instant::now() + LOCK_WAIT;
    loop {
        match fs4::fs_std::FileExt::try_lock_exclusive(&file) {
            Ok(true) => return Ok(file),
            Ok(false) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Ok(false) => {
                return Err(Refusal::Failed(format!(
                    "another publish held {} for over {LOCK_WAIT:?}",
                    path.display()
                )))
            }
            Err(e) => {
                return Err(Refusal::Failed(format!(
                    "cannot take the publish lock: {e}"
                )))
            }
        }
    }
}

/// A git command in the hosted index `repo`, bounded in time.
fn in_index(repo: &Path, args: &[&str]) -> Git {
    Git::in_repo(repo, args).with(&git::Options {
        ca_bundle: None,
        timeout: Some(GIT_TIMEOUT),
        ..git::Options::default()
    })
}

/// git in the hosted index, its output trimmed.
async fn git_text(repo: &Path, args: &[&str]) -> Result<String, Refusal> {
    in_index(repo, args)
        .text()
        .await
        .map(|t| t.trim().to_string())
        .map_err(|e| Refusal::Failed(e.to_string()))
}

/// The text of `path` at commit `tip`, `None` if it has no such file.
async fn read_file_at(repo: &Path, tip: &str, path: &str) -> Result<Option<String>, Refusal> {
    let listing = git_text(repo, &["ls-tree", "-z", tip, "--", path]).await?;
    let Some(oid) = listing
        .split('\t')
        .next()
        .and_then(|meta| meta.split(' ').nth(2))
        .filter(|_| !listing.is_empty())
    else {
        return Ok(None);
    };
    let bytes = in_index(repo, &["cat-file", "blob", oid])
        .output()
        .await
        .map_err(|e| Refusal::Failed(e.to_string()))?;
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// Commit `content` as `path` on `main` on top of `tip` (none: the first commit),
/// through a private git index file, and move `main` only if it is still at `tip`.
async fn commit(
    repo: &Path,
    tmp: &Path,
    tip: Option<&str>,
    path: &str,
    content: &str,
    message: &str,
) -> Result<(), Refusal> {
    let scratch = tempfile::tempdir_in(tmp).map_err(failed("cannot create a scratch dir"))?;
    let blob_file = scratch.path().join("blob");
    tokio::fs::write(&blob_file, content)
        .await
        .map_err(failed("cannot write the index file"))?;
    let index_file = scratch.path().join("index");
    let git = |args: &[&str]| {
        in_index(repo, args)
            .env("GIT_INDEX_FILE", &index_file)
            .env("GIT_AUTHOR_NAME", "moonbit-registry")
            .env("GIT_AUTHOR_EMAIL", "publish@moonbit-registry.invalid")
            .env("GIT_COMMITTER_NAME", "moonbit-registry")
            .env("GIT_COMMITTER_EMAIL", "publish@moonbit-registry.invalid")
    };
    let run = |g: Git| async move {
        g.text()
            .await
            .map(|t| t.trim().to_string())
            .map_err(|e| Refusal::Failed(e.to_string()))
    };
    let blob_path = blob_file.to_string_lossy().into_owned();
    let blob = run(git(&[
        "hash-object",
        "-w",
        "--no-filters",
        "--",
        &blob_path,
    ]))
    .await?;
    if let Some(tip) = tip {
        run(git(&["read-tree", tip])).await?;
    }
    let cacheinfo = format!("100644,{blob},{path}");
    run(git(&["update-index", "--add", "--cacheinfo", &cacheinfo])).await?;
    let tree = run(git(&["write-tree"])).await?;
    let mut args = vec!["commit-tree", tree.as_str(), "-m", message];
    if let Some(tip) = tip {
        args.extend(["-p", tip]);
    }
    let new = run(git(&args)).await?;
    // `update-ref` with the old value is the compare-and-swap: empty means "must not exist".
    run(git(&[
        "update-ref",
        "-m",
        message,
        "refs/heads/main",
        &new,
        tip.unwrap_or(""),
    ]))
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_that_escape_are_refused() {
        for bad in [
            "../evil",
            "a/../../b",
            "/etc/passwd",
            "a\\b",
            "C:x",
            "a//b",
            "./a",
            "",
        ] {
            assert!(bad_entry_name(bad).is_some(), "{bad}");
        }
        for good in ["moon.mod.json", "src/lib/x.mbt", "src/", "🐫/a"] {
            assert!(bad_entry_name(good).is_none(), "{good}");
        }
    }

    #[test]
    fn names_are_user_slash_module() {
        for good in ["alice/json", "bob/lex/runtime", "a-b/c_d.e"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in [
            "alice",
            "alice/",
            "/json",
            "a/../b",
            "a/.hidden",
            "a b/c",
            "a/b%2F",
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn only_old_scratch_files_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (dir.path().join("old"), dir.path().join("new"));
        std::fs::write(&new, "running").unwrap();
        let f = std::fs::File::create(&old).unwrap();
        f.set_modified(std::time::SystemTime::now() - Duration::from_secs(7200))
            .unwrap();
        sweep(dir.path(), Duration::from_secs(3600));
        assert!(!old.exists() && new.exists());
    }

    #[test]
    fn created_at_has_microseconds_and_utc_offset() {
        let t = created_at();
        assert_eq!(t.len(), "2026-02-12T16:19:37.264178+00:00".len(), "{t}");
        assert!(t.ends_with("+00:00") && t.as_bytes()[10] == b'T', "{t}");
    }

    #[test]
    fn a_directory_zips_to_the_same_bytes_every_time() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("m");
        std::fs::create_dir_all(root.join("src/lib")).unwrap();
        std::fs::create_dir_all(root.join("_build/x")).unwrap();
        std::fs::create_dir_all(root.join(".git")).unwrap();
        std::fs::write(
            root.join("moon.mod.json"),
            r#"{"name":"a/b","version":"0.1.0"}"#,
        )
        .unwrap();
        std::fs::write(root.join("src/lib/x.mbt"), "fn x() {}").unwrap();
        std::fs::write(root.join("_build/x/out"), "junk").unwrap();
        std::fs::write(root.join(".git/HEAD"), "junk").unwrap();
        let input = OwnedInput::Dir(root.clone());
        let a = prepare(&input, dir.path(), 1 << 20).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        let b = prepare(&input, dir.path(), 1 << 20).unwrap();
        assert_eq!(a.sha256, b.sha256);
        let zip = zip::ZipArchive::new(std::fs::File::open(a.file.path()).unwrap()).unwrap();
        let names: Vec<&str> = zip.file_names().collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(sorted, ["moon.mod.json", "src/lib/x.mbt"]);
    }
}
