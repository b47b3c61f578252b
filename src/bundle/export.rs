//! `moonbit-registry export --out FILE [selection]`: warm the selection, then
//! write the bundle (see the [module docs](super)) to a temporary file beside
//! `FILE` and rename it into place, so `FILE` is either complete or absent.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use bytesize::ByteSize;
use sha2::{Digest, Sha256};

use super::{
    archive_member, index_member, signing, ArchiveEntry, Manifest, Member, SourceIndex, FORMAT,
};
use super::{INDEX_BUNDLE, MANIFEST, SIGNATURE, SYMBOLS};
use crate::app::{Mode, Services};
use crate::config::Config;
use crate::git::{self, Git};
use crate::index::selection::Selection;
use crate::index::Expectation;
use crate::store::ahead::Ahead;
use crate::store::SYMBOLS_KEY;
use crate::store::{usage, Object};
use crate::warm;

/// Run `export`. Returns whether everything selected went into the bundle.
pub async fn run(
    config: Config,
    selection: Selection,
    jobs: usize,
    out: &Path,
    sign_key: Option<&Path>,
) -> anyhow::Result<bool> {
    if selection.patterns.is_empty() && selection.from.is_none() {
        bail!("nothing selected: give patterns and/or --from moon.mod.json");
    }
    if let Some(key) = sign_key {
        // Fail before any download if the key is unusable.
        signing::sign(b"check", key)?;
    }
    let app = Services::open(&config, Mode::Command)?;
    if let Some(local) = app.sources.iter().find(|s| s.local) {
        // Its archives are files of its own, not in the store a bundle is made from,
        // and an importing gateway could not merge its index without them.
        bail!(
            "source `{}` is hosted here (local = true): bundles carry fetched sources only; back up {} instead",
            local.name,
            crate::hosted::Hosted::new(app.data_dir(), &local.name).dir().display()
        );
    }
    let primary = &app.sources[0];
    let started = std::time::Instant::now();
    let (chosen, summary) = warm::refresh_and_fetch(&app, &selection, jobs, "export").await?;
    // What it fetched or found went to the shared tier too, like `warm`'s.
    app.store.finish_uploads().await;
    summary.print("export", started.elapsed());
    if !summary.failed.is_empty() {
        eprintln!(
            "export: not written: {} selected archives are missing",
            summary.failed.len()
        );
        return Ok(false);
    }

    let mut archives = Vec::new();
    for (key, expectation) in &chosen.archives {
        let Expectation::Known { checksum, source } = expectation else {
            continue;
        };
        let object = app
            .archive_object(key, expectation)
            .context("archive vanished from the index")?;
        app.store
            .stored_size(&object)
            .await
            .with_context(|| format!("{} is no longer in the store", key.label()))?;
        // The content file's length: the store record says 0 when the length was unknown.
        let size = usage::content_path(app.store.disk().dir(), checksum)
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .with_context(|| format!("{} is no longer in the store", key.label()))?;
        archives.push(ArchiveEntry {
            module: key.name(),
            version: key.version.clone(),
            sha256: checksum.clone(),
            size,
            source: app.sources[*source].name.clone(),
        });
    }

    let scratch =
        tempfile::tempdir_in(&app.config.data_dir).context("scratch dir for the export")?;
    // Every source's index: a gateway with the same sources merges them again.
    let mirror = &app.index.mirrors()[0];
    let index_file = scratch.path().join(INDEX_BUNDLE);
    let index_commit = git_bundle(mirror.dir(), &index_file).await?;
    let mut more = Vec::new();
    for mirror in app.index.mirrors().iter().skip(1) {
        if !mirror.exists() {
            eprintln!(
                "warning: no index mirror of source `{}`; the bundle has none",
                mirror.source
            );
            continue;
        }
        let file = scratch.path().join(format!("{}.bundle", mirror.source));
        let commit = git_bundle(mirror.dir(), &file).await?;
        more.push((mirror.source.clone(), commit, file));
    }

    // The latest stored symbols.zip, or the source's current one (moon update asks
    // for it); with several sources, the merged one the gateway serves.
    let symbols_object = Object::symbols(vec![primary.symbols.to_string()]);
    let symbols = if app.sources.len() > 1 {
        let file = scratch.path().join(SYMBOLS);
        match merged_symbols(&app, &file).await {
            Ok(()) => Some(file),
            Err(e) => {
                eprintln!("warning: no merged symbols.zip ({e}); the bundle has none");
                None
            }
        }
    } else {
        match app.store.fetch_ahead(symbols_object, |_| {}).await {
            Ahead::Present { .. } | Ahead::Fetched { .. } => {
                let file = scratch.path().join(SYMBOLS);
                match cacache::copy(app.store.disk().dir(), SYMBOLS_KEY, &file).await {
                    Ok(_) => Some(file),
                    Err(e) => {
                        eprintln!("warning: stored symbols.zip unreadable, not exported: {e}");
                        None
                    }
                }
            }
            Ahead::Failed(reason) => {
                eprintln!(
                "warning: no symbols.zip stored and none fetched ({reason}); the bundle has none"
            );
                None
            }
        }
    };

    let store_dir = app.store.disk().dir().to_path_buf();
    let out_path = out.to_path_buf();
    let source = primary.name.clone();
    let signing_key = sign_key.map(Path::to_path_buf);
    let written = tokio::task::spawn_blocking(move || {
        let more_indexes = more
            .iter()
            .map(|(source, commit, file)| {
                Ok(SourceIndex {
                    source: source.clone(),
                    commit: commit.clone(),
                    index: member_of(file)?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let more_files: Vec<&Path> = more.iter().map(|(_, _, f)| f.as_path()).collect();
        let manifest = Manifest {
            format: FORMAT.into(),
            created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            source,
            index_commit,
            index: member_of(&index_file)?,
            more_indexes,
            symbols: symbols.as_deref().map(member_of).transpose()?,
            archives,
        };
        write_tar(
            &out_path,
            &manifest,
            &index_file,
            &more_files,
            symbols.as_deref(),
            &store_dir,
            signing_key.as_deref(),
        )?;
        Ok::<_, anyhow::Error>(manifest)
    })
    .await
    .context("export task failed")??;
    let size = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    println!(
        "export: wrote {} ({}): {} archives, index commit {}, symbols.zip {}{}",
        out.display(),
        ByteSize(size),
        written.archives.len(),
        written.index_commit,
        if written.symbols.is_some() {
            "included"
        } else {
            "absent"
        },
        if sign_key.is_some() { ", signed" } else { "" },
    );
    Ok(true)
}

/// The merged `symbols.zip`, as `GET /symbols.zip` would answer it, streamed into `file`.
async fn merged_symbols(app: &Services, file: &Path) -> anyhow::Result<()> {
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;
    let resp = app
        .symbols
        .respond(&app.sources[0], &http::HeaderMap::new(), false)
        .await
        .context("no source answered")?;
    if resp.status() != http::StatusCode::OK {
        bail!("the merge answered {}", resp.status());
    }
    let mut body = resp.into_body();
    let mut out = tokio::fs::File::create(file).await?;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| anyhow::anyhow!("reading the merged zip: {e}"))?;
        if let Ok(data) = frame.into_data() {
            out.write_all(&data).await?;
        }
    }
    out.flush().await?;
    Ok(())
}

/// `git bundle create` of the mirror's HEAD and branch; returns the commit it holds.
async fn git_bundle(mirror: &Path, file: &Path) -> anyhow::Result<String> {
    // Fails, saying nothing, when HEAD is detached.
    let branch = match Git::in_repo(mirror, ["symbolic-ref", "--quiet", "HEAD"])
        .text()
        .await
    {
        Ok(branch) => branch.trim().to_string(),
        Err(git::Error::Failed { .. }) => String::new(),
        Err(e) => return Err(e.into()),
    };
    if branch.is_empty() {
        bail!(
            "the index mirror {} has no branch at HEAD; refresh it first",
            mirror.display()
        );
    }
    Git::in_repo(mirror, ["bundle", "create", "--quiet"])
        .arg(file)
        .args(["HEAD", &branch])
        .output()
        .await?;
    let heads = Git::new(["bundle", "list-heads"])
        .arg(file)
        .arg("HEAD")
        .text()
        .await?;
    let commit = heads
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    if commit.len() < 40 {
        bail!("git bundle of {} holds no HEAD", mirror.display());
    }
    Ok(commit)
}

fn member_of(path: &Path) -> anyhow::Result<Member> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut hasher = Sha256::new();
    let size = std::io::copy(&mut file, &mut hasher)?;
    Ok(Member {
        sha256: hex::encode(hasher.finalize()),
        size,
    })
}

/// Write the tar to a temp file beside `out`, then rename it into place.
fn write_tar(
    out: &Path,
    manifest: &Manifest,
    index_file: &Path,
    more_index_files: &[&Path],
    symbols: Option<&Path>,
    store_dir: &Path,
    sign_key: Option<&Path>,
) -> anyhow::Result<()> {
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".export-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(tmp.as_file()));
    let manifest_bytes = serde_json::to_vec_pretty(manifest)?;
    append(
        &mut tar,
        MANIFEST,
        manifest_bytes.len() as u64,
        &manifest_bytes[..],
    )?;
    if let Some(key) = sign_key {
        let sig = signing::sign(&manifest_bytes, key)?;
        append(&mut tar, SIGNATURE, sig.len() as u64, &sig[..])?;
    }
    let index = std::fs::File::open(index_file)?;
    append(&mut tar, INDEX_BUNDLE, manifest.index.size, index)?;
    for (more, file) in manifest.more_indexes.iter().zip(more_index_files) {
        let index = std::fs::File::open(file)?;
        append(
            &mut tar,
            &index_member(&more.source),
            more.index.size,
            index,
        )?;
    }
    if let (Some(path), Some(member)) = (symbols, &manifest.symbols) {
        append(
            &mut tar,
            super::SYMBOLS,
            member.size,
            std::fs::File::open(path)?,
        )?;
    }
    let mut done = std::collections::HashSet::new();
    for entry in &manifest.archives {
        if !done.insert(entry.sha256.clone()) {
            continue;
        }
        let integrity = cacache::Integrity::from_hex(&entry.sha256, cacache::Algorithm::Sha256)
            .with_context(|| format!("bad digest {}", entry.sha256))?;
        let reader = cacache::SyncReader::open_hash(store_dir, integrity).with_context(|| {
            format!(
                "cannot read {}@{} from the store",
                entry.module, entry.version
            )
        })?;
        let mut checked = Checked {
            inner: reader,
            hasher: Sha256::new(),
        };
        append(
            &mut tar,
            &archive_member(&entry.sha256),
            entry.size,
            &mut checked,
        )?;
        // The stored bytes are re-hashed on the way out: a corrupt store entry never
        // ends up in a bundle (the import would refuse it anyway).
        if hex::encode(checked.hasher.finalize()) != entry.sha256 {
            bail!(
                "{}@{} is corrupt in the store; run `moonbit-registry cache verify`, then export again",
                entry.module,
                entry.version
            );
        }
    }
    let mut writer = tar.into_inner().context("finishing the tar")?;
    writer.flush()?;
    drop(writer);
    tmp.as_file().sync_all()?;
    tmp.persist(out)
        .with_context(|| format!("cannot move the bundle into {}", out.display()))?;
    Ok(())
}

fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    size: u64,
    data: impl Read,
) -> anyhow::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut header, name, data)
        .with_context(|| format!("writing {name} into the bundle"))
}

/// Hashes what passes through.
struct Checked<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Checked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Where `--out` points, checked up front.
pub fn check_out(path: &Path) -> anyhow::Result<PathBuf> {
    if path.is_dir() {
        bail!("--out {} is a directory; give a file name", path.display());
    }
    Ok(path.to_path_buf())
}
