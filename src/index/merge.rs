//! The merged index: one git history made of every source's index, so `moon`
//! sees one registry however many sources the gateway has.
//!
//! Each module file (`user/<user>/<module>.index`) comes whole from one source:
//! the source that claims the module (`claims`), else the first source, in
//! source order, that has the file (internal first: a private module shadows a
//! public one of the same name). Other files come from the first source that has
//! them.
//!
//! The merged repository (`merged.git`) holds every source's objects (fetched
//! from the mirrors under `refs/sources/<name>`, hidden from clients) and a
//! branch `main` with one commit per source commit: the sources' first-parent
//! histories interleaved by commit date (then source order), each merged commit
//! dated like the source commit it takes in, by a fixed author, its message
//! naming every source's position. So the history is a function of the sources'
//! histories, not of when the gateway looked: gateways (replicas, restarts, a
//! fresh one) build the same commit ids, and a client's pull is a fast-forward.
//! New source commits are appended ([`git fast-import`] writes them in one
//! run); a source whose history was rewritten, or a change of the sources or
//! their claims, starts the merged history afresh (clients then re-clone once).
//! One case stays order-dependent: a source commit that shows up after a newer
//! commit of another source was merged is appended after it.
//!
//! A pinned view (`/at/<time>/git/index`) is a repository of its own under
//! `pins/`, borrowing the objects of the merged repository (or, with one source,
//! of its mirror) through `objects/info/alternates`, whose `main` is the last
//! merged (or source) commit at or before that time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt;

use super::checksums::module_of_path;
use crate::config::Claims;
use crate::git::{self, Git};

/// Pinned views kept on disk at once; the least recently made go first.
const PINS_KEPT: usize = 64;

/// Who commits merged history: fixed, so commit ids depend only on the content.
const AUTHOR: &str = "moonbit-registry <merge@moonbit-registry.invalid>";

/// Where a merge is built before `main` is moved to it; one per process, since a
/// command (`warm`) may merge beside a running `serve` on the same data dir.
fn build_ref() -> String {
    format!("refs/merge/build-{}", std::process::id())
}

/// One source's part in a merge: its mirror and the commit taken from it.
#[derive(Debug, Clone)]
pub struct Part {
    pub source: String,
    /// The source's mirror (a bare repository).
    pub dir: PathBuf,
    pub claims: Claims,
    /// The mirror's tip.
    pub commit: String,
}

/// The current merged commit and the source commits it was made of.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tip {
    pub commit: String,
    /// `(source, commit)`, in source order, for sources merged so far.
    pub parts: Vec<(String, String)>,
    /// The sources and their claims the history was made with.
    recipe: String,
}

/// The merged repository of an index with several sources.
pub struct Merged {
    root: PathBuf,
    dir: PathBuf,
    /// One merge (or pin) at a time; it holds the trees of the current merged
    /// commit, kept between merges so appending does not list them again.
    lock: tokio::sync::Mutex<Option<Kept>>,
    tip: RwLock<Option<Arc<Tip>>>,
}

impl Merged {
    /// The merged repository `<root>/merged.git` (created on the first merge).
    pub fn new(root: &Path) -> Merged {
        Merged {
            root: root.to_path_buf(),
            dir: root.join(REPO),
            lock: tokio::sync::Mutex::new(None),
            tip: RwLock::new(None),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn exists(&self) -> bool {
        git::is_bare_repo(&self.dir) && self.tip().is_some()
    }

    pub fn tip(&self) -> Option<Arc<Tip>> {
        self.tip.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Read the current merged commit of an existing repository (at start).
    pub async fn load(&self) -> Result<(), String> {
        if !git::is_bare_repo(&self.dir) {
            return Ok(());
        }
        let _guard = self.lock.lock().await;
        let tip = read_tip(&self.dir).await?;
        *self.tip.write().unwrap_or_else(|p| p.into_inner()) = tip.map(Arc::new);
        Ok(())
    }

    /// Append to `main` a merged commit for each source commit up to the tips in
    /// `parts` (or start afresh, see the module docs). Returns whether `main` moved.
    pub async fn update(&self, parts: &[Part]) -> Result<bool, String> {
        let mut kept = self.lock.lock().await;
        let wanted: Vec<(String, String)> = parts
            .iter()
            .map(|p| (p.source.clone(), p.commit.clone()))
            .collect();
        if self.tip().is_some_and(|t| t.parts == wanted) {
            return Ok(false);
        }
        self.init().await?;
        self.take_objects(parts).await?;
        let recipe = recipe(parts);
        let old = self.tip();
        let base = match &old {
            Some(tip) if tip.recipe == recipe && self.continues(tip, parts).await => Some(tip),
            Some(tip) => {
                tracing::warn!(old = %tip.recipe, new = %recipe, "the sources, their claims or a source's history changed: the merged index starts a new history (clients re-clone once)");
                None
            }
            None => None,
        };
        let claims: Vec<Claims> = parts.iter().map(|p| p.claims.clone()).collect();
        let mut positions: Vec<Option<String>> = vec![None; parts.len()];
        if let Some(base) = base {
            for (s, part) in parts.iter().enumerate() {
                positions[s] = base
                    .parts
                    .iter()
                    .find(|(n, _)| *n == part.source)
                    .map(|(_, at)| at.clone());
            }
        }
        // Taken out: a merge that fails half-way leaves none, and the next lists again.
        let mut state = match (base, kept.take()) {
            (Some(base), Some(k)) if k.commit == base.commit => k.state,
            (Some(_), _) => {
                let mut state = State::new(claims);
                for (s, at) in positions.iter().enumerate() {
                    if let Some(at) = at {
                        let listing = run(Git::in_repo(
                            &self.dir,
                            ["ls-tree", "-r", "-z", "--full-tree", at],
                        ))
                        .await?;
                        state.load(s, parse_tree(&listing));
                    }
                }
                state.settle();
                state
            }
            (None, _) => State::new(claims),
        };
        let mut histories = Vec::new();
        for (s, part) in parts.iter().enumerate() {
            let range = match &positions[s] {
                Some(at) => format!("{at}..{}", part.commit),
                None => part.commit.clone(),
            };
            let log = run(Git::in_repo(
                &self.dir,
                [
                    "log",
                    "--first-parent",
                    "--reverse",
                    "--no-renames",
                    "--raw",
                    "-z",
                    "--no-abbrev",
                    "--diff-merges=first-parent",
                    "--root",
                    "--format=%x01%H %ct",
                    &range,
                ],
            ))
            .await?;
            histories.push(parse_log(&log));
        }
        let build = build_ref();
        let mut stream = format!("reset {build}\n").into_bytes();
        if let Some(base) = base {
            stream.extend_from_slice(format!("from {}\n", base.commit).as_bytes());
        }
        let names: Vec<&str> = parts.iter().map(|p| p.source.as_str()).collect();
        let mut made = 0usize;
        for (s, commit) in interleave(&histories) {
            let changes = state.apply(s, &commit.changes);
            positions[s] = Some(commit.id.clone());
            let message = message(&recipe, &names, &positions);
            stream.extend_from_slice(
                format!(
                    "commit {build}\nauthor {AUTHOR} {date} +0000\ncommitter {AUTHOR} {date} +0000\ndata {len}\n{message}\n",
                    date = commit.date,
                    len = message.len(),
                )
                .as_bytes(),
            );
            for (path, entry) in changes {
                match entry {
                    Some((mode, oid)) => {
                        stream.extend_from_slice(format!("M {mode} {oid} ").as_bytes())
                    }
                    None => stream.extend_from_slice(b"D "),
                }
                stream.extend_from_slice(&quote_path(&path));
                stream.push(b'\n');
            }
            made += 1;
        }
        stream.extend_from_slice(b"done\n");
        if made == 0 {
            if let Some(base) = base {
                *kept = Some(Kept {
                    commit: base.commit.clone(),
                    state,
                });
            }
            return Ok(false);
        }
        run(Git::in_repo(&self.dir, ["update-ref", "-d", &build]))
            .await
            .ok();
        let git::Spawned {
            mut stdin,
            stdout,
            mut process,
        } = Git::in_repo(&self.dir, ["fast-import", "--quiet", "--done"])
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .spawn(git::Stderr::Log)
            .map_err(|e| e.to_string())?;
        stdin
            .write_all(&stream)
            .await
            .map_err(|e| format!("feeding git fast-import: {e}"))?;
        drop(stdin);
        process.finish().await.map_err(|e| e.to_string())?;
        drop(stdout);
        let commit = text(Git::in_repo(
            &self.dir,
            ["rev-parse", "--verify", &format!("{build}^{{commit}}")],
        ))
        .await?;
        let old_commit = old.as_ref().map(|t| t.commit.as_str()).unwrap_or("");
        run(Git::in_repo(
            &self.dir,
            [
                "update-ref",
                "-m",
                "merge",
                "refs/heads/main",
                &commit,
                old_commit,
            ],
        ))
        .await?;
        run(Git::in_repo(&self.dir, ["update-ref", "-d", &build])).await?;
        let parts_now: Vec<(String, String)> = names
            .iter()
            .zip(&positions)
            .filter_map(|(n, p)| Some((n.to_string(), p.clone()?)))
            .collect();
        tracing::info!(%commit, commits = made, parts = ?parts_now, "merged index updated");
        *kept = Some(Kept {
            commit: commit.clone(),
            state,
        });
        *self.tip.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(Tip {
            commit,
            parts: parts_now,
            recipe,
        }));
        Ok(true)
    }

    /// Whether every source's merged position is in its new tip's first-parent
    /// history, so the merged history can go on from there.
    async fn continues(&self, tip: &Tip, parts: &[Part]) -> bool {
        for (source, at) in &tip.parts {
            let Some(part) = parts.iter().find(|p| p.source == *source) else {
                return false;
            };
            let ancestor =
                Git::in_repo(&self.dir, ["merge-base", "--is-ancestor", at, &part.commit])
                    .output()
                    .await
                    .is_ok();
            if !ancestor {
                return false;
            }
        }
        true
    }

    /// The repository serving the view at `at`: its
    /// `main` is `commit` (of the merged history, or of a lone source's mirror
    /// at `objects`). Made or moved on demand.
    pub async fn pin(
        &self,
        at: SystemTime,
        objects: &Path,
        commit: &str,
    ) -> Result<PathBuf, String> {
        let _guard = self.lock.lock().await;
        let secs = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let name = format!("{PINS}/{secs}.git");
        let dir = self.root.join(&name);
        if !git::is_bare_repo(&dir) {
            run(Git::new(["init", "--bare", "--quiet", "--initial-branch=main"]).arg(&dir)).await?;
        }
        // Absolute, so the pin keeps working wherever git is started from.
        let objects = std::path::absolute(objects).map_err(|e| e.to_string())?;
        let alternates = dir.join("objects/info/alternates");
        write_atomically(&alternates, format!("{}\n", objects.display()).as_bytes())
            .await
            .map_err(|e| format!("cannot write {}: {e}", alternates.display()))?;
        run(Git::in_repo(
            &dir,
            ["update-ref", "refs/heads/main", commit],
        ))
        .await?;
        prune_pins(&self.root.join(PINS)).await;
        Ok(dir)
    }

    /// Create the repository: `HEAD -> main`, the sources' refs hidden from clients.
    async fn init(&self) -> Result<(), String> {
        if git::is_bare_repo(&self.dir) {
            return Ok(());
        }
        run(Git::new(["init", "--bare", "--quiet", "--initial-branch=main"]).arg(&self.dir))
            .await?;
        for (key, value) in [
            ("uploadpack.hideRefs", "refs/sources"),
            ("uploadpack.hideRefs", "refs/merge"),
            // The history must never lose an object a client was given.
            ("gc.pruneExpire", "never"),
        ] {
            run(Git::in_repo(&self.dir, ["config", "--add", key, value])).await?;
        }
        Ok(())
    }

    /// Copy into the merged repository what it lacks of each part's history
    /// (a local fetch from the mirror; nothing when it has it already).
    async fn take_objects(&self, parts: &[Part]) -> Result<(), String> {
        for part in parts {
            let have = Git::in_repo(
                &self.dir,
                ["cat-file", "-e", &format!("{}^{{commit}}", part.commit)],
            )
            .output()
            .await
            .is_ok();
            if !have {
                let refspec = format!("+refs/heads/*:refs/sources/{}/*", part.source);
                run(Git::in_repo(
                    &self.dir,
                    ["fetch", "--quiet", "--no-tags", "--no-write-fetch-head"],
                )
                .arg(&part.dir)
                .arg(refspec))
                .await?;
            }
            // A commit the mirror's branches no longer reach is kept by a ref of its own.
            run(Git::in_repo(
                &self.dir,
                [
                    "update-ref",
                    &format!("refs/sources/{}/@taken", part.source),
                    &part.commit,
                ],
            ))
            .await?;
        }
        Ok(())
    }

    /// The last merged commit at or before `at`, if any.
    pub async fn commit_at(&self, at: SystemTime) -> Result<Option<String>, String> {
        if !self.exists() {
            return Ok(None);
        }
        commit_at(&self.dir, at, "refs/heads/main").await
    }
}

/// A tree entry: `(mode, oid)`.
type Blob = (String, String);

/// The trees of a merged commit, for the next merge to go on from.
struct Kept {
    commit: String,
    state: State,
}

/// The sources' trees and the merged tree, kept in step as source commits are
/// taken in.
struct State {
    claims: Vec<Claims>,
    sources: Vec<HashMap<String, Blob>>,
    merged: HashMap<String, Blob>,
}

impl State {
    fn new(claims: Vec<Claims>) -> State {
        State {
            sources: vec![HashMap::new(); claims.len()],
            claims,
            merged: HashMap::new(),
        }
    }

    /// Source `s`'s tree, whole (before [`State::settle`]).
    fn load(&mut self, s: usize, entries: Vec<Entry>) {
        self.sources[s] = entries
            .into_iter()
            .map(|e| (e.path, (e.mode, e.oid)))
            .collect();
    }

    /// Work out the merged tree from the loaded sources' trees.
    fn settle(&mut self) {
        let paths: Vec<String> = self
            .sources
            .iter()
            .flat_map(|t| t.keys().cloned())
            .collect();
        for path in paths {
            if let Some(blob) = self.owner_blob(&path) {
                self.merged.insert(path, blob);
            }
        }
    }

    /// What the merged tree holds at `path`: the entry of the source that provides it.
    fn owner_blob(&self, path: &str) -> Option<Blob> {
        let has = |s: usize| self.sources[s].contains_key(path);
        let owner = match module_of_path(path) {
            Some(name) => provider(name, &self.claims, has),
            None => (0..self.sources.len()).find(|&s| has(s)),
        }?;
        self.sources[owner].get(path).cloned()
    }

    /// Take in one commit of source `s`; returns the merged tree's changes.
    fn apply(&mut self, s: usize, changes: &[Change]) -> Vec<(String, Option<Blob>)> {
        let mut out = Vec::new();
        for change in changes {
            match &change.blob {
                Some(blob) => self.sources[s].insert(change.path.clone(), blob.clone()),
                None => self.sources[s].remove(&change.path),
            };
            let now = self.owner_blob(&change.path);
            if self.merged.get(&change.path) != now.as_ref() {
                match &now {
                    Some(blob) => self.merged.insert(change.path.clone(), blob.clone()),
                    None => self.merged.remove(&change.path),
                };
                out.push((change.path.clone(), now));
            }
        }
        out
    }
}

/// One source commit: its id, committer date and changes against its first parent.
#[derive(Debug, Clone, PartialEq)]
struct Commit {
    id: String,
    date: u64,
    changes: Vec<Change>,
}

/// A path changed by a commit: its new entry, or `None` when removed.
#[derive(Debug, Clone, PartialEq)]
struct Change {
    path: String,
    blob: Option<Blob>,
}

/// `git log -z --raw --format=%x01%H %ct` output, read in order (a path may hold
/// any byte but NUL). Submodules and paths that are not UTF-8 are skipped.
fn parse_log(out: &[u8]) -> Vec<Commit> {
    let mut commits = Vec::new();
    let mut fields = out.split(|&b| b == 0).peekable();
    while let Some(field) = fields.next() {
        let field = field.strip_prefix(b"\n").unwrap_or(field);
        if let Some(header) = field.strip_prefix(b"\x01") {
            let header = String::from_utf8_lossy(header);
            let (id, date) = header.split_once(' ').unwrap_or((&header, "0"));
            commits.push(Commit {
                id: id.to_string(),
                date: date.trim().parse().unwrap_or(0),
                changes: Vec::new(),
            });
            continue;
        }
        let Some(meta) = field.strip_prefix(b":") else {
            continue;
        };
        let Some(path) = fields.next() else { break };
        let meta = String::from_utf8_lossy(meta);
        let mut meta = meta.split(' ');
        let (_old_mode, new_mode, _old, new_oid, status) = (
            meta.next().unwrap_or(""),
            meta.next().unwrap_or(""),
            meta.next(),
            meta.next().unwrap_or(""),
            meta.next().unwrap_or(""),
        );
        let (Ok(path), Some(commit)) = (std::str::from_utf8(path), commits.last_mut()) else {
            continue;
        };
        if new_mode == "160000" {
            continue;
        }
        let blob = (!status.starts_with('D')).then(|| (new_mode.to_string(), new_oid.to_string()));
        commit.changes.push(Change {
            path: path.to_string(),
            blob,
        });
    }
    commits
}

/// The sources' commits in merge order: each source's own order kept, and
/// among the sources' next commits the oldest (then the earliest source) first.
fn interleave(histories: &[Vec<Commit>]) -> Vec<(usize, Commit)> {
    let mut next = vec![0usize; histories.len()];
    let mut out = Vec::new();
    loop {
        let pick = (0..histories.len())
            .filter(|&s| next[s] < histories[s].len())
            .min_by_key(|&s| (histories[s][next[s]].date, s));
        let Some(s) = pick else { break };
        out.push((s, histories[s][next[s]].clone()));
        next[s] += 1;
    }
    out
}

/// A path for a fast-import `M`/`D` line: C-quoted when git would misread it.
fn quote_path(path: &str) -> Vec<u8> {
    if !path.starts_with('"') && !path.contains('\n') {
        return path.as_bytes().to_vec();
    }
    let mut out = vec![b'"'];
    for b in path.bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            _ => out.push(b),
        }
    }
    out.push(b'"');
    out
}

/// What the merged history is made with: the sources in order and their claims.
fn recipe(parts: &[Part]) -> String {
    parts
        .iter()
        .map(|p| match p.claims.patterns().is_empty() {
            true => p.source.clone(),
            false => format!("{}[{}]", p.source, p.claims.patterns().join(",")),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Directory name of the merged repository under the index root.
const REPO: &str = "merged.git";
/// Directory of the pinned views under the index root.
const PINS: &str = "pins";

/// One entry of a tree listing.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    mode: String,
    oid: String,
    path: String,
}

/// `git ls-tree -r -z` output: blobs (and symlinks) only; submodules are no files.
fn parse_tree(listing: &[u8]) -> Vec<Entry> {
    listing
        .split(|&b| b == 0)
        .filter_map(|raw| {
            let raw = std::str::from_utf8(raw).ok()?;
            let (meta, path) = raw.split_once('\t')?;
            let mut meta = meta.split(' ');
            let (mode, kind, oid) = (meta.next()?, meta.next()?, meta.next()?);
            (kind == "blob").then(|| Entry {
                mode: mode.to_string(),
                oid: oid.to_string(),
                path: path.to_string(),
            })
        })
        .collect()
}

/// Which source provides the module `name`: the one that claims it (even if it
/// lacks it: then none), else the first that `has` it.
pub fn provider(name: &str, claims: &[Claims], has: impl Fn(usize) -> bool) -> Option<usize> {
    match claims.iter().position(|c| c.matches(name)) {
        Some(claimer) => has(claimer).then_some(claimer),
        None => (0..claims.len()).find(|&s| has(s)),
    }
}

/// A merged commit's message: the recipe and each merged source's position, one
/// per line (read back by [`read_tip`]).
fn message(recipe: &str, names: &[&str], positions: &[Option<String>]) -> String {
    let mut out = format!("Merged index\n\nSources: {recipe}\n");
    for (source, at) in names.iter().zip(positions) {
        if let Some(at) = at {
            out.push_str(&format!("Source: {source} {at}\n"));
        }
    }
    out
}

/// The merged `main` and the source commits its message names.
async fn read_tip(dir: &Path) -> Result<Option<Tip>, String> {
    let Ok(commit) = text(Git::in_repo(
        dir,
        [
            "rev-parse",
            "--verify",
            "--quiet",
            "refs/heads/main^{commit}",
        ],
    ))
    .await
    else {
        return Ok(None);
    };
    let body = text(Git::in_repo(dir, ["show", "-s", "--format=%B", &commit])).await?;
    let parts = body
        .lines()
        .filter_map(|l| l.strip_prefix("Source: "))
        .filter_map(|l| l.split_once(' '))
        .map(|(s, c)| (s.to_string(), c.to_string()))
        .collect();
    let recipe = body
        .lines()
        .find_map(|l| l.strip_prefix("Sources: "))
        .unwrap_or_default()
        .to_string();
    Ok(Some(Tip {
        commit,
        parts,
        recipe,
    }))
}

/// Keep the newest [`PINS_KEPT`] pinned views.
async fn prune_pins(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut pins: Vec<(SystemTime, PathBuf)> = entries
        .flatten()
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if pins.len() <= PINS_KEPT {
        return;
    }
    pins.sort();
    for (_, old) in &pins[..pins.len() - PINS_KEPT] {
        let _ = tokio::fs::remove_dir_all(old).await;
    }
}

async fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    tokio::fs::create_dir_all(dir).await?;
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    tokio::fs::write(tmp.path(), bytes).await?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// `2026-11-01T00:00:00Z`.
pub fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

async fn run(git: Git) -> Result<Vec<u8>, String> {
    git.output().await.map_err(|e| e.to_string())
}

/// git's output, without the trailing newline.
async fn text(git: Git) -> Result<String, String> {
    let out = git.text().await.map_err(|e| e.to_string())?;
    Ok(out.trim().to_string())
}

/// The last commit of `rev` in the repository at `dir` at or before `at`
/// (committer date, first parents), if any.
pub async fn commit_at(dir: &Path, at: SystemTime, rev: &str) -> Result<Option<String>, String> {
    let secs = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let out = text(Git::in_repo(
        dir,
        [
            "rev-list",
            "-1",
            "--first-parent",
            &format!("--before={secs}"),
            rev,
        ],
    ))
    .await?;
    Ok((!out.is_empty()).then_some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, oid: &str) -> Entry {
        Entry {
            mode: "100644".into(),
            oid: oid.into(),
            path: path.into(),
        }
    }

    fn claims(patterns: &[&str]) -> Claims {
        let patterns: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
        Claims::parse("t", &patterns).unwrap()
    }

    fn change(path: &str, oid: Option<&str>) -> Change {
        Change {
            path: path.into(),
            blob: oid.map(|o| ("100644".to_string(), o.to_string())),
        }
    }

    fn merged(state: &State) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = state
            .merged
            .iter()
            .map(|(p, (_, o))| (p.clone(), o.clone()))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn the_first_source_with_a_module_provides_the_whole_file() {
        let none = Claims::default();
        let mut state = State::new(vec![none.clone(), none.clone()]);
        state.load(0, vec![entry("user/acme/json.index", "a1")]);
        state.load(
            1,
            vec![
                entry("user/acme/json.index", "b1"),
                entry("user/bob/x.index", "b2"),
                entry("stats.json", "b3"),
            ],
        );
        state.settle();
        let oids = merged(&state);
        let oids: Vec<(&str, &str)> = oids.iter().map(|(p, o)| (p.as_str(), o.as_str())).collect();
        assert_eq!(
            oids,
            [
                ("stats.json", "b3"),
                ("user/acme/json.index", "a1"),
                ("user/bob/x.index", "b2")
            ]
        );
        // A change to a shadowed file changes nothing; the internal file going
        // away uncovers the public one.
        assert!(state
            .apply(1, &[change("user/acme/json.index", Some("b9"))])
            .is_empty());
        let out = state.apply(0, &[change("user/acme/json.index", None)]);
        assert_eq!(
            out,
            [(
                "user/acme/json.index".to_string(),
                Some(("100644".to_string(), "b9".to_string()))
            )]
        );
    }

    #[test]
    fn claimed_modules_never_come_from_another_source() {
        let c = claims(&["acme/*"]);
        let none = Claims::default();
        let mut state = State::new(vec![c.clone(), none.clone()]);
        let out = state.apply(
            1,
            &[
                change("user/acme/evil.index", Some("b1")),
                change("user/bob/x.index", Some("b3")),
            ],
        );
        assert_eq!(out.len(), 1, "{out:?}");
        state.apply(0, &[change("user/acme/json.index", Some("a1"))]);
        assert_eq!(
            merged(&state),
            [
                ("user/acme/json.index".to_string(), "a1".to_string()),
                ("user/bob/x.index".to_string(), "b3".to_string())
            ]
        );
        // A claim on a later source wins over an earlier source that has the module.
        let mut state = State::new(vec![none, c]);
        state.apply(0, &[change("user/acme/json.index", Some("first"))]);
        state.apply(1, &[change("user/acme/json.index", Some("claimer"))]);
        assert_eq!(merged(&state)[0].1, "claimer");
    }

    #[test]
    fn histories_interleave_by_date_keeping_each_sources_order() {
        let c = |id: &str, date| Commit {
            id: id.into(),
            date,
            changes: Vec::new(),
        };
        let order: Vec<String> = interleave(&[
            vec![c("a1", 10), c("a2", 5), c("a3", 30)],
            vec![c("b1", 10), c("b2", 20)],
        ])
        .into_iter()
        .map(|(_, c)| c.id)
        .collect();
        assert_eq!(order, ["a1", "a2", "b1", "b2", "a3"]);
    }

    #[test]
    fn logs_are_read_in_order_whatever_the_paths_hold() {
        let log = b"\x01aaa 100\x00\n:000000 100644 0000 b1 A\x00user/a/x.index\x00\x01bbb 200\x00\n:100644 000000 b1 0000 D\x00user/a/x.index\x00:000000 100644 0000 c1 A\x00odd\x01name\x00\x01ccc 300\x00";
        let commits = parse_log(log);
        assert_eq!(commits.len(), 3);
        assert_eq!(commits[0].changes, [change("user/a/x.index", Some("b1"))]);
        assert_eq!(
            commits[1].changes,
            [
                change("user/a/x.index", None),
                change("odd\x01name", Some("c1"))
            ]
        );
        assert_eq!((commits[2].id.as_str(), commits[2].date), ("ccc", 300));
        assert_eq!(quote_path("\"q\nx"), b"\"\\\"q\\nx\"".to_vec());
    }

    #[test]
    fn tree_listings_keep_odd_paths() {
        let listing =
            b"100644 blob abc\tuser/illusory0x0/\xf0\x9f\x90\xab.index\x00160000 commit def\tsub\0";
        let entries = parse_tree(listing);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].path, "user/illusory0x0/🐫.index");
    }
}
