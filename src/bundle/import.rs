//! `moonbit-registry import FILE`: unpack a bundle into a staging dir inside the
//! data dir, verify every member (sizes, digests, the signature when a trust key
//! is given, the git bundle, and every archive against the index it carries),
//! and only then add the archives to the store and the index to the mirror.
//! A damaged or tampered bundle is refused with the reason, and nothing from it
//! is imported.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use bytesize::ByteSize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{is_sha256, signing, Manifest, Member, FORMAT, FORMAT_V1};
use super::{ARCHIVES_DIR, INDEX_BUNDLE, INDEX_DIR, MANIFEST, SIGNATURE, SYMBOLS};
use crate::app::{Mode, Services};
use crate::config::Config;
use crate::git::{self, Git};
use crate::index::mirror::Mirror;
use crate::store::SYMBOLS_KEY;

/// Bounds on what a bundle member may be; a bundle is hostile input.
const MANIFEST_MAX: u64 = 64 << 20;
const SIGNATURE_MAX: u64 = 4096;
const INDEX_MAX: u64 = 4 << 30;
const SYMBOLS_MAX: u64 = 1 << 30;
const MEMBERS_MAX: usize = 1_000_000;

/// A member unpacked into the staging dir, with what it really hashes to.
struct Staged {
    path: PathBuf,
    member: Member,
}

/// Run `import`.
pub async fn run(config: Config, file: &Path, trust_key: Option<&Path>) -> anyhow::Result<()> {
    let trusted = trust_key.map(signing::trusted_key).transpose()?;
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("could not create data dir {}", data_dir.display()))?;
    let bundle = std::fs::File::open(file)
        .with_context(|| format!("cannot open bundle {}", file.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(".import-")
        .tempdir_in(&data_dir)
        .with_context(|| format!("cannot create a staging dir in {}", data_dir.display()))?;
    let archive_max = config.storage.archive_max.as_u64();
    let stage_dir = staging.path().to_path_buf();
    let staged = tokio::task::spawn_blocking(move || unpack(bundle, &stage_dir, archive_max))
        .await
        .context("unpacking task failed")?
        .with_context(|| format!("refused {}", file.display()))?;

    let checked = verify(&staged, staging.path(), trusted.as_ref())
        .await
        .with_context(|| format!("refused {}", file.display()))?;
    let Verified {
        manifest,
        index_repos,
    } = checked;

    // Everything checked: now, and only now, change the data dir.
    let app = Services::open(&config, Mode::Command)?;
    // Every index must land in the mirror of a configured source of that name.
    let mut targets = Vec::new();
    for (source, _, _, _) in manifest.indexes() {
        let mirror = app
            .index
            .mirrors()
            .iter()
            .find(|m| m.source == source)
            .with_context(|| {
                format!("refused {}: it carries the index of source `{source}`, which is not configured here", file.display())
            })?;
        // A hosted index is written by `publish` alone: a bundle never replaces it.
        if mirror.is_hosted() {
            anyhow::bail!(
                "refused {}: its index would replace that of local source `{source}`, which only `publish` writes",
                file.display()
            );
        }
        targets.push(mirror.dir().to_path_buf());
    }
    let store_dir = data_dir.join("store");
    std::fs::create_dir_all(&store_dir)?;
    let mut added = 0usize;
    let mut bytes = 0u64;
    for entry in &manifest.archives {
        let key = format!("archive/{}/{}", entry.module, entry.version);
        if let Ok(Some(meta)) = cacache::metadata(&store_dir, &key).await {
            if meta.integrity.to_hex().1 == entry.sha256
                && cacache::exists(&store_dir, &meta.integrity).await
            {
                continue;
            }
        }
        let staged_file = &staged[&entry.member()].path;
        commit_file(&store_dir, &key, staged_file, &entry.sha256, entry.size).await?;
        added += 1;
        bytes += entry.size;
    }
    if let Some(symbols) = &manifest.symbols {
        commit_file(
            &store_dir,
            SYMBOLS_KEY,
            &staged[SYMBOLS].path,
            &symbols.sha256,
            symbols.size,
        )
        .await?;
    }
    // So one import fills the whole cluster: what the tier lacks is uploaded.
    if let Some(shared) = app.store.shared() {
        for entry in &manifest.archives {
            app.store.share_content(&entry.sha256, entry.size);
        }
        let checked = app.store.finish_uploads().await;
        println!(
            "import: {checked} archives checked against the shared tier {}",
            shared.url()
        );
    }
    let mut notes = Vec::new();
    for ((source, commit, _, _), (repo, target)) in manifest
        .indexes()
        .into_iter()
        .zip(index_repos.iter().zip(&targets))
    {
        let note = update_mirror(repo, target, commit).await?;
        notes.push(format!("`{source}`: {note}"));
    }
    let index_note = notes.join(", ");
    println!(
        "import: {} archives added ({}), {} already present, index {}, symbols.zip {}",
        added,
        ByteSize(bytes),
        manifest.archives.len() - added,
        index_note,
        if manifest.symbols.is_some() {
            "stored"
        } else {
            "not in the bundle"
        }
    );
    Ok(())
}

/// Read the tar, writing each allowed member to the staging dir while hashing it.
fn unpack(
    bundle: std::fs::File,
    dir: &Path,
    archive_max: u64,
) -> anyhow::Result<HashMap<String, Staged>> {
    let mut tar = tar::Archive::new(std::io::BufReader::new(bundle));
    let mut staged = HashMap::new();
    std::fs::create_dir_all(dir.join(ARCHIVES_DIR))?;
    std::fs::create_dir_all(dir.join(INDEX_DIR))?;
    for entry in tar.entries().context("not a bundle (unreadable tar)")? {
        let mut entry = entry.context("damaged bundle (unreadable tar entry)")?;
        if staged.len() >= MEMBERS_MAX {
            bail!("more than {MEMBERS_MAX} members");
        }
        let name = entry
            .path()
            .context("member with an unreadable name")?
            .to_string_lossy()
            .to_string();
        if entry.header().entry_type() != tar::EntryType::Regular {
            bail!("member `{name}` is not a regular file");
        }
        let limit = match name.as_str() {
            MANIFEST => MANIFEST_MAX,
            other
                if other
                    .strip_prefix(INDEX_DIR)
                    .and_then(|n| n.strip_suffix(".bundle"))
                    .is_some_and(|n| {
                        !n.is_empty()
                            && n.bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    }) =>
            {
                INDEX_MAX
            }
            SIGNATURE => SIGNATURE_MAX,
            INDEX_BUNDLE => INDEX_MAX,
            SYMBOLS => SYMBOLS_MAX,
            other => match other
                .strip_prefix(ARCHIVES_DIR)
                .and_then(|n| n.strip_suffix(".zip"))
            {
                Some(sha) if is_sha256(sha) => archive_max,
                _ => bail!("unexpected member `{name}`"),
            },
        };
        let size = entry.header().size().context("member with a bad size")?;
        if size > limit {
            bail!("member `{name}` is {size} bytes, more than the {limit} allowed");
        }
        if staged.contains_key(&name) {
            bail!("member `{name}` appears twice");
        }
        let path = dir.join(&name);
        let mut out = std::fs::File::create(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut written = 0u64;
        loop {
            let n = entry
                .read(&mut buf)
                .with_context(|| format!("damaged bundle: member `{name}` is cut short"))?;
            if n == 0 {
                break;
            }
            written += n as u64;
            if written > limit {
                bail!("member `{name}` is longer than {limit} bytes");
            }
            hasher.update(&buf[..n]);
            std::io::Write::write_all(&mut out, &buf[..n])?;
        }
        let member = Member {
            sha256: hex::encode(hasher.finalize()),
            size: written,
        };
        staged.insert(name, Staged { path, member });
    }
    Ok(staged)
}

struct Verified {
    manifest: Manifest,
    /// The staging bare repos holding the bundle's indexes, in manifest order.
    index_repos: Vec<PathBuf>,
}

async fn verify(
    staged: &HashMap<String, Staged>,
    dir: &Path,
    trusted: Option<&ed25519_dalek::VerifyingKey>,
) -> anyhow::Result<Verified> {
    let manifest_file = staged
        .get(MANIFEST)
        .context("no manifest.json: not a bundle")?;
    let manifest_bytes = std::fs::read(&manifest_file.path)?;
    if let Some(key) = trusted {
        let sig = staged
            .get(SIGNATURE)
            .context("the bundle is not signed, and a trust key is configured")?;
        signing::verify(&manifest_bytes, &std::fs::read(&sig.path)?, key)?;
    }
    let manifest: Manifest =
        serde_json::from_slice(&manifest_bytes).context("manifest.json is not a valid manifest")?;
    if manifest.format != FORMAT && manifest.format != FORMAT_V1 {
        bail!("bundle format `{}` is not `{FORMAT}`", manifest.format);
    }
    let check = |name: &str, expected: &Member| -> anyhow::Result<()> {
        let got = staged
            .get(name)
            .with_context(|| format!("`{name}` is listed but missing"))?;
        if got.member != *expected {
            bail!(
                "`{name}` is damaged: the manifest says sha256 {} ({} bytes), the file has {} ({} bytes)",
                expected.sha256, expected.size, got.member.sha256, got.member.size
            );
        }
        Ok(())
    };
    let indexes = manifest.indexes();
    let mut names = HashSet::new();
    for (source, _, member, file) in &indexes {
        if !names.insert(*source) {
            bail!("the index of source `{source}` appears twice");
        }
        check(member, file)?;
    }
    if let Some(extra) = staged
        .keys()
        .find(|k| k.starts_with(INDEX_DIR) && !indexes.iter().any(|(_, _, member, _)| member == *k))
    {
        bail!("`{extra}` is not listed in the manifest");
    }
    match &manifest.symbols {
        Some(symbols) => check(SYMBOLS, symbols)?,
        None if staged.contains_key(SYMBOLS) => bail!("`{SYMBOLS}` is not listed in the manifest"),
        None => {}
    }
    let mut listed = HashSet::new();
    for entry in &manifest.archives {
        if !is_sha256(&entry.sha256) {
            bail!(
                "{}@{}: `{}` is not a sha256",
                entry.module,
                entry.version,
                entry.sha256
            );
        }
        let expected = Member {
            sha256: entry.sha256.clone(),
            size: entry.size,
        };
        check(&entry.member(), &expected)
            .with_context(|| format!("archive {}@{}", entry.module, entry.version))?;
        listed.insert(entry.member());
    }
    if let Some(extra) = staged
        .keys()
        .find(|k| k.starts_with(ARCHIVES_DIR) && !listed.contains(*k))
    {
        bail!("`{extra}` is not listed in the manifest");
    }

    // Each index: a well-formed git bundle whose HEAD is the manifest's commit,
    // that vouches for every archive of its source, exactly as `serve` would check it.
    let mut repos = Vec::new();
    for (n, (source, commit, member, _)) in indexes.iter().enumerate() {
        let repo = dir.join(format!("index-{n}.git"));
        let mirror = stage_index(&repo, source, commit, &staged[member].path, member).await?;
        let snapshot = mirror.snapshot();
        for entry in manifest.archives.iter().filter(|e| e.source == *source) {
            match snapshot.checksums.get(&entry.module, &entry.version) {
                Some(release) if release.checksum == entry.sha256 => {}
                Some(release) => bail!(
                    "archive {}@{}: the bundle's index says sha256 {}, the archive is {}",
                    entry.module,
                    entry.version,
                    release.checksum,
                    entry.sha256
                ),
                None => bail!(
                    "archive {}@{} is not in the bundle's index of `{source}`",
                    entry.module,
                    entry.version
                ),
            }
        }
        repos.push(repo);
    }
    if let Some(entry) = manifest
        .archives
        .iter()
        .find(|e| !indexes.iter().any(|(source, ..)| *source == e.source))
    {
        bail!(
            "archive {}@{} names source `{}`, whose index is not in the bundle",
            entry.module,
            entry.version,
            entry.source
        );
    }
    Ok(Verified {
        manifest,
        index_repos: repos,
    })
}

/// Fetch the git bundle `file` (member `member`) into a new bare repo at `repo`,
/// check that its HEAD is `commit`, and read its index.
async fn stage_index(
    repo: &Path,
    source: &str,
    commit: &str,
    file: &Path,
    member: &str,
) -> anyhow::Result<Mirror> {
    Git::new(["init", "--quiet", "--bare"])
        .arg(repo)
        .output()
        .await?;
    Git::in_repo(repo, ["fetch", "--quiet", "--no-tags"])
        .arg(file)
        .arg("+HEAD:refs/heads/main")
        .output()
        .await
        .with_context(|| format!("{member} is not a usable git bundle"))?;
    Git::in_repo(repo, ["symbolic-ref", "HEAD", "refs/heads/main"])
        .output()
        .await?;
    let head = Git::in_repo(repo, ["rev-parse", "HEAD"]).text().await?;
    if head.trim() != commit {
        bail!(
            "{member} holds commit {}, the manifest says {commit}",
            head.trim()
        );
    }
    let mirror = Mirror::detached(source, repo.to_path_buf());
    mirror
        .load()
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the bundle's index of `{source}`: {e}"))?;
    Ok(mirror)
}

/// Copy a verified file into the store under `key`; cacache checks the digest
/// again on commit, and nothing is visible before it.
async fn commit_file(
    store_dir: &Path,
    key: &str,
    file: &Path,
    sha256: &str,
    size: u64,
) -> anyhow::Result<()> {
    let integrity = cacache::Integrity::from_hex(sha256, cacache::Algorithm::Sha256)
        .with_context(|| format!("bad digest {sha256}"))?;
    let mut writer = cacache::WriteOpts::new()
        .algorithm(cacache::Algorithm::Sha256)
        .size(usize::try_from(size)?)
        .integrity(integrity)
        .open(store_dir, key)
        .await
        .with_context(|| format!("cannot write {key} to the store"))?;
    let mut input = tokio::fs::File::open(file).await?;
    tokio::io::copy(&mut input, &mut writer)
        .await
        .with_context(|| format!("cannot write {key} to the store"))?;
    writer.flush().await?;
    writer
        .commit()
        .await
        .with_context(|| format!("cannot commit {key} to the store"))?;
    Ok(())
}

/// Bring the mirror at `target` to the bundle's commit: created if absent,
/// fast-forwarded if behind, left alone if it already contains the commit.
async fn update_mirror(staged: &Path, target: &Path, commit: &str) -> anyhow::Result<String> {
    if !git::is_bare_repo(target) {
        git::clone_mirror(staged, target, &git::Options::default()).await?;
        return Ok(format!(
            "mirror created at {}",
            &commit[..12.min(commit.len())]
        ));
    }
    let in_mirror = |args: &[&str]| Git::in_repo(target, args);
    in_mirror(&["fetch", "--quiet", "--no-tags"])
        .arg(staged)
        .arg("+HEAD:refs/moonbit-registry/import")
        .output()
        .await?;
    let branch = in_mirror(&["symbolic-ref", "HEAD"]).text().await?;
    let branch = branch.trim().to_string();
    let contains = in_mirror(&["merge-base", "--is-ancestor", commit, "HEAD"])
        .output()
        .await
        .is_ok();
    let note = if contains {
        "already at or past the bundle's commit".to_string()
    } else {
        let fast_forward = in_mirror(&["merge-base", "--is-ancestor", "HEAD", commit])
            .output()
            .await
            .is_ok();
        if !fast_forward {
            eprintln!(
                "warning: the mirror's history and the bundle's diverge; taking the bundle's"
            );
        }
        in_mirror(&["update-ref", &branch, commit]).output().await?;
        format!("mirror moved to {}", &commit[..12.min(commit.len())])
    };
    in_mirror(&["update-ref", "-d", "refs/moonbit-registry/import"])
        .output()
        .await?;
    Ok(note)
}
