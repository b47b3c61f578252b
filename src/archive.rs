//! Archive requests: `/user/<form-urlencoded "user/module/version">.zip`, parsed into
//! an [`ArchiveKey`] (the one identity an archive has in the store, in flights and
//! upstream), and the wasm asset paths that are cached the same way.

use std::fmt;

use percent_encoding::percent_decode_str;

/// Longest decoded `user/module/version` or asset path accepted; real ones are < 200 bytes.
const MAX_PATH: usize = 1024;

/// `user/module/version` of one published archive. The module part may hold `/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ArchiveKey {
    pub user: String,
    pub module: String,
    pub version: String,
}

/// Why a request path is not an archive or asset the gateway will handle.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum PathError {
    #[error("not percent-encoded UTF-8")]
    Encoding,
    #[error("longer than {MAX_PATH} bytes")]
    TooLong,
    #[error("expected user/module/version")]
    Shape,
    #[error("empty, `.` or `..` path segment")]
    Segment,
    #[error("control character or backslash in path")]
    Character,
    #[error("version `{0}` is not a semantic version")]
    Version(String),
}

impl ArchiveKey {
    /// Parse what follows `/user/` in the raw request path: either moon's single
    /// form-urlencoded segment or the slash form the web site links, ending in `.zip`.
    pub fn parse(raw: &str) -> Result<ArchiveKey, PathError> {
        let raw = raw.strip_suffix(".zip").ok_or(PathError::Shape)?;
        // Percent-decoding only: in a path `+` is a literal plus (semver build metadata).
        let decoded = decode(raw)?;
        // user / module (which may hold `/`) / version: at least three segments.
        let (rest, version) = decoded.rsplit_once('/').ok_or(PathError::Shape)?;
        let (user, module) = rest.split_once('/').ok_or(PathError::Shape)?;
        if !is_semver_text(version) {
            return Err(PathError::Version(version.to_string()));
        }
        Ok(ArchiveKey {
            user: user.to_string(),
            module: module.to_string(),
            version: version.to_string(),
        })
    }

    /// `user/module`, as the index names it.
    pub fn name(&self) -> String {
        format!("{}/{}", self.user, self.module)
    }

    /// `user/module@version`, as people write it (messages, progress lines).
    pub fn label(&self) -> String {
        format!("{}@{}", self.name(), self.version)
    }

    /// The key in the store.
    pub fn store_key(&self) -> String {
        format!("archive/{self}")
    }

    /// The path under an archive base, encoded exactly as `moon` encodes it.
    pub fn upstream_path(&self) -> String {
        let joined = self.to_string();
        let encoded: String = url::form_urlencoded::byte_serialize(joined.as_bytes()).collect();
        format!("/{encoded}.zip")
    }
}

impl fmt::Display for ArchiveKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.user, self.module, self.version)
    }
}

/// A prebuilt wasm asset or its `.sha256`, `/assets/<user>/<module>@<version>/...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetPath {
    /// Decoded path below `/assets/`.
    pub decoded: String,
    /// The path below `/assets/` as the client sent it, reused upstream.
    pub raw: String,
}

impl AssetPath {
    pub fn parse(raw: &str) -> Result<AssetPath, PathError> {
        let decoded = decode(raw)?;
        if decoded.split('/').count() < 2 {
            return Err(PathError::Shape);
        }
        Ok(AssetPath {
            decoded,
            raw: raw.to_string(),
        })
    }

    pub fn store_key(&self) -> String {
        format!("asset/{}", self.decoded)
    }

    pub fn content_type(&self) -> &'static str {
        if self.decoded.ends_with(".wasm") {
            "application/wasm"
        } else {
            "text/plain; charset=utf-8"
        }
    }
}

/// Percent-decode and reject anything that could name another file than meant.
fn decode(raw: &str) -> Result<String, PathError> {
    if raw.len() > MAX_PATH * 3 {
        return Err(PathError::TooLong);
    }
    let decoded = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| PathError::Encoding)?
        .into_owned();
    if decoded.len() > MAX_PATH {
        return Err(PathError::TooLong);
    }
    if decoded.chars().any(|c| c.is_control() || c == '\\') {
        return Err(PathError::Character);
    }
    if decoded
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(PathError::Segment);
    }
    Ok(decoded)
}

/// Loose semver check: digits and dots first, then optional `-pre` / `+build` made of
/// `[0-9A-Za-z.-]`. The index decides what exists; this only keeps junk out of keys.
fn is_semver_text(v: &str) -> bool {
    let core_end = v.find(['-', '+']).unwrap_or(v.len());
    let (core, rest) = v.split_at(core_end);
    let numbers: Vec<&str> = core.split('.').collect();
    numbers.len() == 3
        && numbers
            .iter()
            .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_moons_encoding() {
        let k = ArchiveKey::parse("moonbitlang%2Fcore%2F0.1.20260213%2B3382e0600.zip").unwrap();
        assert_eq!(k.user, "moonbitlang");
        assert_eq!(k.module, "core");
        assert_eq!(k.version, "0.1.20260213+3382e0600");
        assert_eq!(
            k.upstream_path(),
            "/moonbitlang%2Fcore%2F0.1.20260213%2B3382e0600.zip"
        );
    }

    #[test]
    fn module_names_may_hold_slashes_and_emoji() {
        let k = ArchiveKey::parse("moonbitlang%2Flex%2Fruntime%2F0.1.1.zip").unwrap();
        assert_eq!(k.name(), "moonbitlang/lex/runtime");
        let k = ArchiveKey::parse("illusory0x0%2F%F0%9F%90%AB%2F0.1.0.zip").unwrap();
        assert_eq!(k.module, "🐫");
        assert_eq!(k.upstream_path(), "/illusory0x0%2F%F0%9F%90%AB%2F0.1.0.zip");
    }

    #[test]
    fn slash_form_is_the_same_key() {
        let a = ArchiveKey::parse("alice/json/0.1.0.zip").unwrap();
        let b = ArchiveKey::parse("alice%2Fjson%2F0.1.0.zip").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.store_key(), "archive/alice/json/0.1.0");
    }

    #[test]
    fn path_tricks_are_refused() {
        for bad in [
            "..%2F..%2Fetc%2F0.1.0.zip",
            "alice%2F..%2F0.1.0.zip",
            "alice%2F%2F0.1.0.zip",
            "alice%2Fjson%5C%2F0.1.0.zip",
            "alice%2Fjson%00%2F0.1.0.zip",
            "alice%2Fjson%2F0.1.0",
            "alice%2F0.1.0.zip",
            "alice%2Fjson%2Flatest.zip",
            "alice%2Fjson%2F%FF.zip",
        ] {
            assert!(ArchiveKey::parse(bad).is_err(), "{bad} was accepted");
        }
        assert_eq!(
            ArchiveKey::parse(&format!("{}.zip", "a".repeat(5000))),
            Err(PathError::TooLong)
        );
    }

    #[test]
    fn assets_keep_the_raw_path_for_upstream() {
        let a = AssetPath::parse("moonbitlang/parser@0.3.3/cmd/moonfmt/moonfmt.wasm").unwrap();
        assert_eq!(
            a.store_key(),
            "asset/moonbitlang/parser@0.3.3/cmd/moonfmt/moonfmt.wasm"
        );
        assert_eq!(a.content_type(), "application/wasm");
        assert!(AssetPath::parse("a/../../x.wasm").is_err());
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn any_archive_path_is_a_safe_key_or_an_error(raw in "(\\PC|%[0-9a-fA-F]{2}|/|\\.){0,120}") {
                if let Ok(key) = ArchiveKey::parse(&raw) {
                    let store_key = key.store_key();
                    for part in store_key.split('/') {
                        prop_assert!(!part.is_empty() && part != "." && part != "..", "{store_key}");
                    }
                    prop_assert!(!store_key.contains(['\\', '\0']));
                    // One encoded segment under the archive base: it cannot climb out.
                    prop_assert!(!key.upstream_path()[1..].contains('/'), "{}", key.upstream_path());
                }
                let _ = AssetPath::parse(&raw);
            }
        }
    }
}
