//! Fetching ahead of time (`warm`, `export`): the same single-flight,
//! verify-then-commit path a client's request takes, awaited to its end and
//! reported as an outcome instead of a response.

use std::sync::Arc;

use super::flight::Outcome;
use super::{Object, Store, Trust};

/// How fetching one object ahead of time ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Ahead {
    /// Already in the store with the expected digest; nothing was downloaded.
    Present { size: u64 },
    /// Downloaded, verified and committed now.
    Fetched { size: u64 },
    /// Not stored; the reason says why (upstream status, mismatch, unreachable...).
    Failed(String),
}

impl Store {
    /// Make sure `object` is in the store, downloading it if needed. `progress` is
    /// called with the bytes received so far while a download runs.
    pub async fn fetch_ahead(
        self: &Arc<Self>,
        object: Object,
        mut progress: impl FnMut(u64),
    ) -> Ahead {
        if let Some(size) = self.stored_size(&object).await {
            self.share_stored(&object, size);
            return Ahead::Present { size };
        }
        if let Some(path) = &object.local {
            // Hosted here: its file is all there is, nothing can be fetched.
            return Ahead::Failed(format!(
                "the local source's file {} is missing",
                path.display()
            ));
        }
        if let Trust::Checksum { refreshes, .. } = &object.trust {
            if let Some(bad) = self.quarantine.get(&object.key, *refreshes) {
                return Ahead::Failed(format!(
                    "the upstream copy failed verification: the index says sha256 {}, the upstream sent {}",
                    bad.expected, bad.actual
                ));
            }
        }
        match self
            .flights
            .join(self, &object)
            .outcome(&mut progress)
            .await
        {
            Outcome::Fetched { len } => {
                progress(len);
                match self.stored_size(&object).await {
                    Some(size) => Ahead::Fetched { size },
                    None => Ahead::Failed(
                        "downloaded but could not be written to the store (see the log)".into(),
                    ),
                }
            }
            // Another process or flight committed it meanwhile.
            Outcome::Stored => match self.stored_size(&object).await {
                Some(size) => Ahead::Present { size },
                None => Ahead::Failed("stored by another fetch, then gone".into()),
            },
            Outcome::Broken(reason) => Ahead::Failed(reason.to_string()),
            Outcome::Refused { status, .. } => {
                Ahead::Failed(format!("the upstream answered {status}"))
            }
            Outcome::Unreachable(reason) => {
                Ahead::Failed(format!("no source could be reached: {reason}"))
            }
            Outcome::Abandoned => Ahead::Failed("the fetch ended without an answer".into()),
        }
    }

    /// Make sure the shared tier holds a stored archive too (so `warm` of what is
    /// here already still fills the cluster's tier), in the background.
    fn share_stored(&self, object: &Object, size: u64) {
        let Trust::Checksum { expected, .. } = &object.trust else {
            return;
        };
        if object.local.is_some() {
            return;
        }
        self.share_content(expected, size);
    }

    /// Make sure the shared tier holds the content `sha256` (`size` bytes) this
    /// replica's disk tier has, in the background: for `warm` and `import`.
    pub fn share_content(&self, sha256: &str, size: u64) {
        let Some(shared) = &self.shared else {
            return;
        };
        if let Some(file) = super::usage::content_path(self.disk.dir(), sha256) {
            shared.ensure_in_background(sha256.to_string(), file, size);
        }
    }

    /// Size of the stored copy of `object`, if there is one it accepts (for a
    /// hosted archive, its file's size: checked when it is served).
    pub async fn stored_size(&self, object: &Object) -> Option<u64> {
        if let Some(path) = &object.local {
            return tokio::fs::metadata(path).await.ok().map(|m| m.len());
        }
        match self.disk.lookup(&object.key).await {
            Ok(Some(entry)) if object.accepts(&entry.sha256()) => Some(entry.size),
            _ => None,
        }
    }
}
