//! Archives of a source the gateway hosts (`local = true`): read from the file
//! `publish` wrote, never fetched. The file was verified when it was published;
//! it is checked again against the index's sha256 as it is read (one pass, no
//! second read), so a file changed or damaged on disk is never served as a
//! complete archive: a small one is refused outright, a streamed one ends in an
//! error instead of a clean end.

use std::path::Path;

use bytes::{Bytes, BytesMut};
use futures_util::stream;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use super::memory::Hot;
use super::{object_response, Object, Store, Trust};
use crate::body::{self, BoxError, GatewayBody};

/// Bytes read from the file at a time.
const READ_CHUNK: usize = 256 * 1024;

/// Answer a GET or HEAD for `object` from the hosted file at `path`.
pub(super) async fn respond(
    store: &Store,
    object: &Object,
    path: &Path,
    head: bool,
) -> Response<GatewayBody> {
    let Trust::Checksum {
        label, expected, ..
    } = &object.trust
    else {
        // Only archives the index lists are hosted.
        return body::text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{} has no checksum to serve it by", object.key),
        );
    };
    let file = match tokio::fs::File::open(path).await {
        Ok(file) => file,
        Err(e) => {
            tracing::error!(archive = %label, path = %path.display(), error = %e, "the local source's index lists an archive whose file is unreadable");
            return body::text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{label} is published here but its file cannot be read: {e}"),
            );
        }
    };
    let size = match file.metadata().await {
        Ok(m) => m.len(),
        Err(e) => {
            return body::text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{label}: cannot stat its file: {e}"),
            )
        }
    };
    if size > store.limits.archive_max {
        return body::text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "{label}: its file is larger than storage.archive_max ({} bytes)",
                store.limits.archive_max
            ),
        );
    }
    if head {
        return object_response(object, Some(size), Some(expected), "hit", body::empty());
    }
    if store.memory.fits(size) {
        return match read_small(file, size).await {
            Ok((bytes, sha256)) if sha256 == *expected => {
                let hot = Hot::new(bytes.clone(), sha256, object.content_type);
                store.memory.insert(object.key.clone(), hot);
                object_response(object, Some(size), Some(expected), "hit", body::full(bytes))
            }
            Ok((_, actual)) => refuse_damaged(label, expected, &actual, path),
            Err(e) => body::text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{label}: reading its file failed: {e}"),
            ),
        };
    }
    let body = stream_checked(file, size, expected.clone(), label.clone());
    object_response(object, Some(size), Some(expected), "hit", body)
}

/// Read a file of `size` bytes whole, with its sha256; it must not have changed size.
async fn read_small(mut file: tokio::fs::File, size: u64) -> std::io::Result<(Bytes, String)> {
    let mut buf = Vec::with_capacity(size as usize);
    // One byte more than expected is enough to see that the file grew.
    (&mut file).take(size + 1).read_to_end(&mut buf).await?;
    if buf.len() as u64 != size {
        return Err(std::io::Error::other(format!(
            "the file changed size while read ({} of {size} bytes)",
            buf.len()
        )));
    }
    let sha256 = hex::encode(Sha256::digest(&buf));
    Ok((Bytes::from(buf), sha256))
}

fn refuse_damaged(label: &str, expected: &str, actual: &str, path: &Path) -> Response<GatewayBody> {
    tracing::error!(archive = %label, path = %path.display(), %expected, %actual, "a local archive file does not match its index checksum; not served");
    body::text(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("{label}: the file kept here has sha256 {actual}, the index says {expected}; not served"),
    )
}

/// Stream the file, digesting it; the last chunk is held back until the digest
/// and length are checked, so a damaged file ends the transfer with an error.
fn stream_checked(
    file: tokio::fs::File,
    size: u64,
    expected: String,
    label: String,
) -> GatewayBody {
    struct State {
        file: tokio::fs::File,
        hasher: Sha256,
        read: u64,
        pending: Option<Bytes>,
    }
    let state = State {
        file,
        hasher: Sha256::new(),
        read: 0,
        pending: None,
    };
    let chunks = stream::unfold(Some(state), move |state| {
        let (expected, label) = (expected.clone(), label.clone());
        async move {
            let mut s = state?;
            loop {
                let mut buf = BytesMut::zeroed(READ_CHUNK);
                match s.file.read(&mut buf).await {
                    Ok(0) => {
                        let actual = hex::encode(s.hasher.finalize());
                        if actual == expected && s.read == size {
                            return s.pending.map(|last| (Ok(Frame::data(last)), None));
                        }
                        tracing::error!(archive = %label, %expected, %actual, read = s.read, size, "a local archive file does not match its index checksum; transfer aborted");
                        let e: BoxError =
                            format!("{label}: the file kept here does not match the index").into();
                        return Some((Err(e), None));
                    }
                    Ok(n) => {
                        buf.truncate(n);
                        s.read += n as u64;
                        if s.read > size {
                            let e: BoxError = format!("{label}: the file grew while read").into();
                            return Some((Err(e), None));
                        }
                        s.hasher.update(&buf);
                        if let Some(previous) = s.pending.replace(buf.freeze()) {
                            return Some((Ok(Frame::data(previous)), Some(s)));
                        }
                    }
                    Err(e) => return Some((Err(Box::new(e) as BoxError), None)),
                }
            }
        }
    });
    StreamBody::new(chunks).boxed_unsync()
}
