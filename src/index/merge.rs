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
//! branch `main` with one commit per change of the sources' tips, parent = the
//! previous merged commit, so client pulls are fast-forwards. Commits are
//! deterministic: tree, parent, message (the sources' tips), author and dates
//! (the newest source commit's date) depend on nothing else, so gateways that see
//! the same tips build the same commit ids.
//!
//! A pinned view (`/at/<time>/git/index`) is a repository of its own under
//! `pins/`, borrowing the objects of the merged repository (or, with one source,
//! of its mirror) through `objects/info/alternates`, whose `main` is the merge of
//! each source's last commit at or before that time.

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
const AUTHOR: (&str, &str) = ("moonbit-registry", "merge@moonbit-registry.invalid");

/// One source's part in a merge: its mirror and the commit taken from it.
#[derive(Debug, Clone)]
pub struct Part {
    pub source: String,
    /// The source's mirror (a bare repository).
    pub dir: PathBuf,
    pub claims: Claims,
    /// The commit of the mirror to take (its tip, or its last commit before a pin).
    pub commit: String,
}

/// The current merged commit and the source commits it was made of.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tip {
    pub commit: String,
    /// `(source, commit)`, in source order.
    pub parts: Vec<(String, String)>,
}

/// The merged repository of an index with several sources.
pub struct Merged {
    root: PathBuf,
    dir: PathBuf,
    /// One merge (or pin) at a time: they share the temp index file and refs.
    lock: tokio::sync::Mutex<()>,
    tip: RwLock<Option<Arc<Tip>>>,
}

impl Merged {
    /// The merged repository `<root>/merged.git` (created on the first merge).
    pub fn new(root: &Path) -> Merged {
        Merged {
            root: root.to_path_buf(),
            dir: root.join(REPO),
            lock: tokio::sync::Mutex::new(()),
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

    /// Make `main` the merge of `parts` (a new commit on top of the current one)
    /// unless it already is. Returns whether a commit was made.
    pub async fn update(&self, parts: &[Part]) -> Result<bool, String> {
        let _guard = self.lock.lock().await;
        let wanted: Vec<(String, String)> = parts
            .iter()
            .map(|p| (p.source.clone(), p.commit.clone()))
            .collect();
        if self.tip().is_some_and(|t| t.parts == wanted) {
            return Ok(false);
        }
        self.init().await?;
        self.take_objects(parts).await?;
        let parent = self.tip().map(|t| t.commit.clone());
        let message = message("Merged index", &wanted);
        let commit = self.commit(parts, parent.as_deref(), &message).await?;
        run(Git::in_repo(
            &self.dir,
            [
                "update-ref",
                "-m",
                "merge",
                "refs/heads/main",
                &commit,
                parent.as_deref().unwrap_or(""),
            ],
        ))
        .await?;
        tracing::info!(commit = %commit, parts = ?wanted, "merged index updated");
        *self.tip.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(Tip {
            commit,
            parts: wanted,
        }));
        Ok(true)
    }

    /// The repository (relative to the index root) serving the view at `at`: with
    /// one part, its commit as it is; with several, their merge (a commit of its
    /// own, with no parent: a pinned view has no history to pull). Made or moved on
    /// demand; `parts` hold each source's last commit at or before `at`.
    pub async fn pin(&self, at: SystemTime, parts: &[Part]) -> Result<String, String> {
        let _guard = self.lock.lock().await;
        let (objects, commit) = match parts {
            [] => return Err("no source had published anything by then".into()),
            [one] => (one.dir.join("objects"), one.commit.clone()),
            several => {
                self.init().await?;
                self.take_objects(several).await?;
                let wanted: Vec<(String, String)> = several
                    .iter()
                    .map(|p| (p.source.clone(), p.commit.clone()))
                    .collect();
                let message = message(&format!("Merged index as of {}", rfc3339(at)), &wanted);
                let commit = self.commit(several, None, &message).await?;
                (self.dir.join("objects"), commit)
            }
        };
        let secs = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let name = format!("{PINS}/{secs}.git");
        let dir = self.root.join(&name);
        if !git::is_bare_repo(&dir) {
            run(Git::new(["init", "--bare", "--quiet", "--initial-branch=main"]).arg(&dir)).await?;
        }
        // Absolute, so the pin keeps working wherever git is started from.
        let objects = std::path::absolute(&objects).map_err(|e| e.to_string())?;
        let alternates = dir.join("objects/info/alternates");
        write_atomically(&alternates, format!("{}\n", objects.display()).as_bytes())
            .await
            .map_err(|e| format!("cannot write {}: {e}", alternates.display()))?;
        run(Git::in_repo(
            &dir,
            ["update-ref", "refs/heads/main", &commit],
        ))
        .await?;
        prune_pins(&self.root.join(PINS)).await;
        Ok(name)
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
            ("uploadpack.hideRefs", "refs/pins"),
            // The history must never lose an object a client was given.
            ("gc.pruneExpire", "never"),
        ] {
            run(Git::in_repo(&self.dir, ["config", "--add", key, value])).await?;
        }
        Ok(())
    }

    /// Copy into the merged repository what it lacks of each part's commit
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
                // The mirror's whole history: pinned views need older commits too.
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

    /// Write the merged tree of `parts` and a commit of it.
    async fn commit(
        &self,
        parts: &[Part],
        parent: Option<&str>,
        message: &str,
    ) -> Result<String, String> {
        let mut trees = Vec::new();
        for part in parts {
            let listing = run(Git::in_repo(
                &self.dir,
                ["ls-tree", "-r", "-z", "--full-tree", &part.commit],
            ))
            .await?;
            trees.push(parse_tree(&listing));
        }
        let claims: Vec<&Claims> = parts.iter().map(|p| &p.claims).collect();
        let (entries, refused) = select(&trees, &claims);
        for (path, source) in refused {
            tracing::warn!(path, source = %parts[source].source, "claimed by another source: left out of the merged index");
        }
        let mut input = Vec::new();
        for e in &entries {
            input.extend_from_slice(format!("{} {}\t", e.mode, e.oid).as_bytes());
            input.extend_from_slice(e.path.as_bytes());
            input.push(0);
        }
        let scratch = tempfile::Builder::new()
            .prefix(".merge-index-")
            .tempfile_in(&self.dir)
            .map_err(|e| format!("cannot create a temp index: {e}"))?;
        let index_file = scratch.path().to_path_buf();
        // git wants to create the index itself.
        let _ = std::fs::remove_file(&index_file);
        let with_index = |args: &[&str]| {
            Git::in_repo(&self.dir, args.iter().copied()).env("GIT_INDEX_FILE", &index_file)
        };
        run(with_index(&["read-tree", "--empty"])).await?;
        let git::Spawned {
            mut stdin,
            mut process,
            ..
        } = with_index(&["update-index", "-z", "--index-info"])
            .spawn(git::Stderr::Log)
            .map_err(|e| e.to_string())?;
        stdin
            .write_all(&input)
            .await
            .map_err(|e| format!("feeding git update-index: {e}"))?;
        drop(stdin);
        process.finish().await.map_err(|e| e.to_string())?;
        let tree = text(with_index(&["write-tree"])).await?;
        let _ = std::fs::remove_file(&index_file);

        let mut date = 0u64;
        for part in parts {
            let at = text(Git::in_repo(
                &self.dir,
                ["show", "-s", "--format=%ct", &part.commit],
            ))
            .await?;
            date = date.max(at.parse().unwrap_or(0));
        }
        let date = format!("@{date} +0000");
        let mut commit = Git::in_repo(&self.dir, ["commit-tree", "--no-gpg-sign", &tree]);
        if let Some(parent) = parent {
            commit = commit.args(["-p", parent]);
        }
        let commit = commit
            .args(["-m", message])
            // The user's own git config (signing, encodings) must not change the ids.
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_AUTHOR_NAME", AUTHOR.0)
            .env("GIT_AUTHOR_EMAIL", AUTHOR.1)
            .env("GIT_AUTHOR_DATE", &date)
            .env("GIT_COMMITTER_NAME", AUTHOR.0)
            .env("GIT_COMMITTER_EMAIL", AUTHOR.1)
            .env("GIT_COMMITTER_DATE", &date);
        text(commit).await
    }
}

/// Directory name of the merged repository under the index root.
pub const REPO: &str = "merged.git";
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
pub fn provider(name: &str, claims: &[&Claims], has: impl Fn(usize) -> bool) -> Option<usize> {
    match claims.iter().position(|c| c.matches(name)) {
        Some(claimer) => has(claimer).then_some(claimer),
        None => (0..claims.len()).find(|&s| has(s)),
    }
}

/// The merged tree's entries, sorted by path, and `(path, source)` of module
/// files left out because another source claims them.
fn select(trees: &[Vec<Entry>], claims: &[&Claims]) -> (Vec<Entry>, Vec<(String, usize)>) {
    let by_path: Vec<HashMap<&str, &Entry>> = trees
        .iter()
        .map(|t| t.iter().map(|e| (e.path.as_str(), e)).collect())
        .collect();
    let mut chosen: HashMap<&str, &Entry> = HashMap::new();
    let mut refused = Vec::new();
    for (source, tree) in trees.iter().enumerate() {
        for entry in tree {
            let path = entry.path.as_str();
            if chosen.contains_key(path) {
                continue;
            }
            let owner = match module_of_path(path) {
                Some(name) => provider(name, claims, |s| by_path[s].contains_key(path)),
                None => (0..trees.len()).find(|&s| by_path[s].contains_key(path)),
            };
            match owner {
                Some(owner) => {
                    chosen.insert(path, by_path[owner][path]);
                }
                None => refused.push((path.to_string(), source)),
            }
        }
    }
    let mut entries: Vec<Entry> = chosen.into_values().cloned().collect();
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    refused.sort();
    refused.dedup();
    (entries, refused)
}

/// A merged commit's message: what it is, and each source's commit, one per line
/// (read back by [`read_tip`]).
fn message(title: &str, parts: &[(String, String)]) -> String {
    let mut out = format!("{title}\n\n");
    for (source, commit) in parts {
        out.push_str(&format!("Source: {source} {commit}\n"));
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
    Ok(Some(Tip { commit, parts }))
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

/// The last commit of the mirror at `dir` at or before `at` (committer date, first
/// parents), if any.
pub async fn commit_at(dir: &Path, at: SystemTime) -> Result<Option<String>, String> {
    let secs = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let out = text(Git::in_repo(
        dir,
        [
            "rev-list",
            "-1",
            "--first-parent",
            &format!("--before={secs}"),
            "HEAD",
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

    #[test]
    fn the_first_source_with_a_module_provides_the_whole_file() {
        let internal = vec![entry("user/acme/json.index", "a1")];
        let public = vec![
            entry("user/acme/json.index", "b1"),
            entry("user/bob/x.index", "b2"),
            entry("stats.json", "b3"),
        ];
        let none = Claims::default();
        let (entries, refused) = select(&[internal, public], &[&none, &none]);
        let oids: Vec<(&str, &str)> = entries
            .iter()
            .map(|e| (e.path.as_str(), e.oid.as_str()))
            .collect();
        assert_eq!(
            oids,
            [
                ("stats.json", "b3"),
                ("user/acme/json.index", "a1"),
                ("user/bob/x.index", "b2")
            ]
        );
        assert!(refused.is_empty());
    }

    #[test]
    fn claimed_modules_never_come_from_another_source() {
        let internal = vec![entry("user/acme/json.index", "a1")];
        let public = vec![
            entry("user/acme/evil.index", "b1"),
            entry("user/acme/json.index", "b2"),
            entry("user/bob/x.index", "b3"),
        ];
        let c = claims(&["acme/*"]);
        let none = Claims::default();
        let (entries, refused) = select(&[internal, public], &[&c, &none]);
        let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["user/acme/json.index", "user/bob/x.index"]);
        assert_eq!(entries[0].oid, "a1");
        assert_eq!(refused, [("user/acme/evil.index".to_string(), 1)]);
        // A claim on a later source wins over an earlier source that has the module.
        let (entries, _) = select(
            &[
                vec![entry("user/acme/json.index", "first")],
                vec![entry("user/acme/json.index", "claimer")],
            ],
            &[&none, &c],
        );
        assert_eq!(entries[0].oid, "claimer");
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
