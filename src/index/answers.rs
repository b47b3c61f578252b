//! Answers of the index's git kept in memory, keyed by the repository's refs and
//! the request: every `git clone --depth 1` of the same tip asks the same three
//! questions (the ref advertisement, `ls-refs`, the fetch of the tip), and git's
//! answer to the same request on the same refs is the same bytes. A kept answer
//! is replayed without a git process (which is what a clone costs the server:
//! three `http-backend` and `upload-pack` runs and a pack); a refresh, merge or
//! publish changes the refs and so the key, and an answer is never replayed for
//! refs it was not computed from.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use sha2::{Digest, Sha256};

use crate::body::{self, GatewayBody};

/// Memory all kept answers may take together.
const BUDGET: u64 = 64 << 20;
/// A larger answer (a full clone of a big index) is streamed but not kept.
pub const ANSWER_MAX: usize = 16 << 20;
/// Request headers git's answer depends on (the rest of the request is the
/// method, the path and query, and the body).
const KEYED_HEADERS: [&str; 3] = ["content-type", "git-protocol", "content-encoding"];

/// One answer as git gave it.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

/// The kept answers (a weighted LRU).
#[derive(Clone)]
pub struct Answers {
    kept: moka::sync::Cache<[u8; 32], Arc<Answer>>,
}

/// A request about a repository in a given state: the key of its answer.
pub struct Question {
    repo: PathBuf,
    refs: [u8; 32],
    key: [u8; 32],
}

impl Default for Answers {
    fn default() -> Answers {
        Answers::new(BUDGET)
    }
}

impl Answers {
    pub fn new(budget: u64) -> Answers {
        let kept = moka::sync::Cache::builder()
            .max_capacity(budget)
            .weigher(|_: &[u8; 32], a: &Arc<Answer>| {
                u32::try_from(a.body.len() + 512).unwrap_or(u32::MAX)
            })
            .build();
        Answers { kept }
    }

    /// The question `method rest` with `headers` and `body` asks of `repo` as its
    /// refs stand now; `None` if they cannot be read (the request then runs git).
    pub async fn question(
        repo: &Path,
        method: &Method,
        rest: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Option<Question> {
        let refs = ref_state(repo.to_path_buf()).await?;
        let mut h = Sha256::new();
        for part in [
            repo.as_os_str().as_encoded_bytes(),
            &refs,
            method.as_str().as_bytes(),
            rest.as_bytes(),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        for name in KEYED_HEADERS {
            let value = headers.get(name).map_or(&b""[..], HeaderValue::as_bytes);
            h.update((value.len() as u64).to_le_bytes());
            h.update(value);
        }
        h.update(body);
        Some(Question {
            repo: repo.to_path_buf(),
            refs,
            key: h.finalize().into(),
        })
    }

    /// The kept answer to `question`, as a response, if there is one.
    pub fn replay(&self, question: &Question) -> Option<Response<GatewayBody>> {
        let answer = self.kept.get(&question.key)?;
        let mut resp = Response::new(body::full(answer.body.clone()));
        *resp.status_mut() = answer.status;
        *resp.headers_mut() = answer.headers.clone();
        Some(resp)
    }

    /// Keep git's complete answer to `question`, if the repository's refs are still
    /// those it was asked about (a refresh during the answer could have changed it).
    pub async fn keep(
        &self,
        question: Question,
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    ) {
        if status != StatusCode::OK || body.len() > ANSWER_MAX {
            return;
        }
        if ref_state(question.repo.clone()).await != Some(question.refs) {
            return;
        }
        let answer = Answer {
            status,
            headers,
            body,
        };
        self.kept.insert(question.key, Arc::new(answer));
    }
}

/// What git's answers depend on besides the objects: `HEAD`, `packed-refs`,
/// `shallow` and every loose ref, hashed. Objects named by refs are immutable, so
/// equal refs mean equal answers.
async fn ref_state(repo: PathBuf) -> Option<[u8; 32]> {
    tokio::task::spawn_blocking(move || {
        let mut h = Sha256::new();
        for file in ["HEAD", "packed-refs", "shallow"] {
            let content = std::fs::read(repo.join(file)).unwrap_or_default();
            h.update(file.as_bytes());
            h.update((content.len() as u64).to_le_bytes());
            h.update(&content);
        }
        loose_refs(&repo, &repo.join("refs"), &mut h).ok()?;
        Some(h.finalize().into())
    })
    .await
    .ok()
    .flatten()
}

/// Hash every file under `dir` (its path below `repo` and its content), in name order.
fn loose_refs(repo: &Path, dir: &Path, h: &mut Sha256) -> std::io::Result<()> {
    let mut entries: Vec<_> = match std::fs::read_dir(dir) {
        Ok(entries) => entries.collect::<Result<_, _>>()?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            loose_refs(repo, &path, h)?;
        } else {
            let name = path.strip_prefix(repo).unwrap_or(&path);
            let content = std::fs::read(&path)?;
            h.update(name.as_os_str().as_encoded_bytes());
            h.update([0]);
            h.update((content.len() as u64).to_le_bytes());
            h.update(&content);
        }
    }
    Ok(())
}

/// Collects an answer as it streams, up to [`ANSWER_MAX`] (past that it gives up).
pub struct Recording {
    pub question: Question,
    pub status: StatusCode,
    pub headers: HeaderMap,
    bytes: Option<BytesMut>,
}

impl Recording {
    pub fn new(question: Question, status: StatusCode, headers: HeaderMap) -> Recording {
        Recording {
            question,
            status,
            headers,
            bytes: Some(BytesMut::new()),
        }
    }

    pub fn add(&mut self, chunk: &[u8]) {
        if let Some(bytes) = &mut self.bytes {
            if bytes.len() + chunk.len() > ANSWER_MAX {
                self.bytes = None;
            } else {
                bytes.extend_from_slice(chunk);
            }
        }
    }

    /// Keep the whole answer, once git ended well (unless it grew too large).
    pub async fn finish(self, answers: &Answers) {
        if let Some(bytes) = self.bytes {
            answers
                .keep(self.question, self.status, self.headers, bytes.freeze())
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn repo() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("HEAD"), "ref: refs/heads/main\n").unwrap();
        std::fs::create_dir_all(dir.path().join("refs/heads")).unwrap();
        std::fs::write(dir.path().join("refs/heads/main"), "a".repeat(40)).unwrap();
        dir
    }

    async fn ask(repo: &Path, body: &str) -> Question {
        let mut headers = HeaderMap::new();
        headers.insert("git-protocol", HeaderValue::from_static("version=2"));
        Answers::question(
            repo,
            &Method::POST,
            "git-upload-pack",
            &headers,
            body.as_bytes(),
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn an_answer_is_replayed_for_the_same_request_on_the_same_refs_only() {
        let dir = repo();
        let answers = Answers::default();
        let q = ask(dir.path(), "want x\ndeepen 1\n").await;
        assert!(answers.replay(&q).is_none());
        let mut headers = HeaderMap::new();
        headers.insert(
            "content-type",
            HeaderValue::from_static("application/x-git-upload-pack-result"),
        );
        answers
            .keep(q, StatusCode::OK, headers, Bytes::from_static(b"PACK"))
            .await;
        let resp = answers
            .replay(&ask(dir.path(), "want x\ndeepen 1\n").await)
            .unwrap();
        assert_eq!(
            resp.headers()["content-type"],
            "application/x-git-upload-pack-result"
        );
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "PACK");
        // Another request, or the same one once the refs moved: git is asked.
        assert!(answers.replay(&ask(dir.path(), "want y\n").await).is_none());
        std::fs::write(dir.path().join("refs/heads/main"), "b".repeat(40)).unwrap();
        assert!(answers
            .replay(&ask(dir.path(), "want x\ndeepen 1\n").await)
            .is_none());
    }

    #[tokio::test]
    async fn answers_computed_while_the_refs_moved_are_not_kept() {
        let dir = repo();
        let answers = Answers::default();
        let q = ask(dir.path(), "want x\n").await;
        std::fs::write(dir.path().join("packed-refs"), "moved").unwrap();
        answers
            .keep(
                q,
                StatusCode::OK,
                HeaderMap::new(),
                Bytes::from_static(b"PACK"),
            )
            .await;
        assert!(answers.replay(&ask(dir.path(), "want x\n").await).is_none());
        let q = ask(dir.path(), "want x\n").await;
        answers
            .keep(q, StatusCode::NOT_FOUND, HeaderMap::new(), Bytes::new())
            .await;
        assert!(
            answers.replay(&ask(dir.path(), "want x\n").await).is_none(),
            "only 200s are kept"
        );
    }
}
