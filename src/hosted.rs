//! Where a source the gateway hosts itself (`local = true`) lives in the data dir:
//! `<data_dir>/local/<name>/index.git` (a bare git repository, `HEAD ->
//! refs/heads/main`, written only by `publish`) and
//! `<data_dir>/local/<name>/archives/<user>/<module>/<version>.zip` (durable: the
//! store's eviction never looks here). The index mirror, the store and `publish`
//! all find a hosted source's files through [`Hosted`], so the layout is said once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::archive::ArchiveKey;
use crate::git::{self, Git};

/// Bound on `git init` (local and quick; a hung file system must not hang a clone).
const INIT_TIMEOUT: Duration = Duration::from_secs(60);

/// The files of one hosted source.
#[derive(Debug, Clone)]
pub struct Hosted {
    dir: PathBuf,
}

impl Hosted {
    /// The hosted source `name` (a plain word: config validates source names).
    pub fn new(data_dir: &Path, name: &str) -> Hosted {
        Hosted {
            dir: data_dir.join("local").join(name),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The bare repository holding the source's index.
    pub fn index_dir(&self) -> PathBuf {
        self.dir.join("index.git")
    }

    /// Where the archive of `key` is kept. The key's parts were checked when it
    /// was parsed (no `..`, no empty or absolute segment), so this stays inside.
    pub fn archive_path(&self, key: &ArchiveKey) -> PathBuf {
        let mut path = self.dir.join("archives").join(&key.user);
        for part in key.module.split('/') {
            path.push(part);
        }
        path.join(format!("{}.zip", key.version))
    }

    /// Scratch space on the same file system as the archives, so a finished
    /// archive is renamed into place, never copied.
    pub fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    /// The file `publish` holds a lock on while it writes: one publish at a time,
    /// across processes (the server and the command line).
    pub fn lock_path(&self) -> PathBuf {
        self.dir.join("publish.lock")
    }
}

/// Create the empty bare repository at `dir` with `HEAD -> refs/heads/main` if
/// there is none; atomic (made beside it, then renamed), so two processes racing
/// to create it both end up with one good repository.
pub async fn create_index(dir: &Path) -> Result<(), String> {
    if git::is_bare_repo(dir) {
        return Ok(());
    }
    let parent = dir.parent().unwrap_or(Path::new("."));
    tokio::fs::create_dir_all(parent)
        .await
        .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".init-")
        .tempdir_in(parent)
        .map_err(|e| format!("cannot create a temp dir in {}: {e}", parent.display()))?;
    let repo = tmp.path().join("index.git");
    Git::new(["init", "--quiet", "--bare", "--initial-branch=main"])
        .arg(&repo)
        .with(&git::Options {
            ca_bundle: None,
            timeout: Some(INIT_TIMEOUT),
            ..git::Options::default()
        })
        .output()
        .await
        .map_err(|e| e.to_string())?;
    match tokio::fs::rename(&repo, dir).await {
        Ok(()) => Ok(()),
        // Another process made it first: theirs is as good as ours.
        Err(_) if git::is_bare_repo(dir) => Ok(()),
        Err(e) => Err(format!(
            "cannot move the new index into {}: {e}",
            dir.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archives_live_under_the_source() {
        let h = Hosted::new(Path::new("/data"), "local");
        let key = ArchiveKey::parse("alice%2Flex%2Fruntime%2F1.0.0.zip").unwrap();
        assert_eq!(
            h.archive_path(&key),
            Path::new("/data/local/local/archives/alice/lex/runtime/1.0.0.zip")
        );
        assert_eq!(h.index_dir(), Path::new("/data/local/local/index.git"));
    }

    #[tokio::test]
    async fn the_index_is_created_once_with_main_as_head() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("local/x/index.git");
        create_index(&dir).await.unwrap();
        create_index(&dir).await.unwrap();
        let head = std::fs::read_to_string(dir.join("HEAD")).unwrap();
        assert_eq!(head.trim(), "ref: refs/heads/main");
    }
}
