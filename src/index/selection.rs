//! Which module versions `warm` and `export` act on, chosen from the index:
//! patterns (`alice/*`, `alice/json`, `alice/json@0.3.1`, `alice/json@^0.3`),
//! `--latest`, and the dependency closure of a `moon.mod.json`, resolved by
//! minimal version selection as `moon` does (every module reachable from the
//! root's requirements, at the highest version any of them requires).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use semver::{Version, VersionReq};

use super::checksums::{build_list, compare_versions, registry_deps};
use super::{Expectation, Index};
use crate::archive::ArchiveKey;

/// A `moon.mod.json` larger than this is not a manifest.
const MOD_JSON_MAX: u64 = 1 << 20;
/// Bound on the closure of one `--from` (the whole public index has ~7k versions).
const CLOSURE_MAX: usize = 100_000;

/// `(user/module, version)`.
type NameVersion = (String, String);
/// The selected `(name, version)`s, and `(name@version, reason)` for what is missing.
type ManifestClosure = (Vec<NameVersion>, Vec<(String, String)>);

/// What the operator asked for on the command line.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub patterns: Vec<Pattern>,
    /// Keep only the newest selected version of each module.
    pub latest: bool,
    /// A `moon.mod.json` whose dependency closure is selected.
    pub from: Option<PathBuf>,
}

/// One `user/module[@version]` pattern.
#[derive(Debug, Clone, PartialEq)]
pub struct Pattern {
    /// A module name, or a prefix when `prefix` is set (`alice/*` -> `alice/`).
    pub name: String,
    pub prefix: bool,
    pub version: VersionMatch,
}

/// The version part of a pattern.
#[derive(Debug, Clone, PartialEq)]
pub enum VersionMatch {
    /// No `@`: every version.
    Any,
    /// `@0.3.1` (also `@0.2.0+build7`): exactly that version string.
    Exact(String),
    /// `@^0.3`, `@>=1, <2`: a semver requirement.
    Req(VersionReq),
}

impl Pattern {
    pub fn parse(raw: &str) -> anyhow::Result<Pattern> {
        let (name, version) = match raw.split_once('@') {
            Some((n, v)) => (n, Some(v.trim())),
            None => (raw, None),
        };
        let version = match version {
            None => VersionMatch::Any,
            Some(v) if Version::parse(v).is_ok() => VersionMatch::Exact(v.to_string()),
            Some(v) => VersionMatch::Req(VersionReq::parse(v).with_context(|| {
                format!("`{raw}`: `{v}` is neither a version nor a version requirement")
            })?),
        };
        let (name, prefix) = match name.strip_suffix('*') {
            Some(p) => (p, true),
            None => (name, false),
        };
        if name.contains('*') || (!prefix && !name.contains('/')) || name.is_empty() {
            bail!("`{raw}` is not a pattern like alice/*, alice/json, alice/json@0.3.1 or alice/json@^0.3");
        }
        Ok(Pattern {
            name: name.to_string(),
            prefix,
            version,
        })
    }

    fn matches_name(&self, name: &str) -> bool {
        if self.prefix {
            name.starts_with(&self.name)
        } else {
            name == self.name
        }
    }

    fn matches_version(&self, version: &str) -> bool {
        match &self.version {
            VersionMatch::Any => true,
            VersionMatch::Exact(v) => v == version,
            VersionMatch::Req(req) => Version::parse(version).is_ok_and(|v| req.matches(&v)),
        }
    }
}

/// The outcome of a selection: what to act on, and what was asked for but is not
/// in the index.
#[derive(Debug, Default)]
pub struct Chosen {
    pub archives: Vec<(ArchiveKey, Expectation)>,
    /// `name@version` (or a pattern) with the reason, e.g. a dependency missing from the index.
    pub missing: Vec<(String, String)>,
}

impl Index {
    /// Resolve `selection` against the current mirrors (no refresh here).
    pub fn select(&self, selection: &Selection) -> anyhow::Result<Chosen> {
        let mut picked: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut missing = Vec::new();
        for pattern in &selection.patterns {
            let mut matched = false;
            for m in &self.mirrors {
                let snapshot = m.snapshot();
                for name in snapshot.checksums.names() {
                    if !pattern.matches_name(name) {
                        continue;
                    }
                    for (version, _) in snapshot.checksums.versions(name) {
                        if pattern.matches_version(version) {
                            matched = true;
                            picked
                                .entry(name.to_string())
                                .or_default()
                                .insert(version.to_string());
                        }
                    }
                }
            }
            if !matched {
                missing.push((
                    pattern_text(pattern),
                    "no such module or version in the index".into(),
                ));
            }
        }
        if let Some(path) = &selection.from {
            let (closure, absent) = self.closure_of_manifest(path)?;
            for (name, version) in closure {
                picked.entry(name).or_default().insert(version);
            }
            missing.extend(absent);
        }
        if selection.latest {
            for versions in picked.values_mut() {
                if let Some(newest) = versions
                    .iter()
                    .max_by(|a, b| compare_versions(a, b))
                    .cloned()
                {
                    *versions = BTreeSet::from([newest]);
                }
            }
        }
        let mut archives = Vec::new();
        for (name, versions) in picked {
            let Some((user, module)) = name.split_once('/') else {
                continue;
            };
            for version in versions {
                let key = ArchiveKey {
                    user: user.to_string(),
                    module: module.to_string(),
                    version,
                };
                match self.lookup(&key) {
                    Some(expectation) => archives.push((key, expectation)),
                    None => missing.push((
                        format!("{}@{}", key.name(), key.version),
                        "not in the index".into(),
                    )),
                }
            }
        }
        Ok(Chosen { archives, missing })
    }

    /// The dependencies of the module described by `path`, transitively, with
    /// minimal version selection; and the requirements the index cannot satisfy.
    fn closure_of_manifest(&self, path: &Path) -> anyhow::Result<ManifestClosure> {
        let size = std::fs::metadata(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .len();
        if size > MOD_JSON_MAX {
            bail!(
                "{} is larger than {MOD_JSON_MAX} bytes; not a moon.mod.json",
                path.display()
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let manifest: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let deps = match manifest.get("deps") {
            None | Some(serde_json::Value::Null) => serde_json::Map::new(),
            Some(serde_json::Value::Object(o)) => o.clone(),
            Some(_) => bail!("{}: `deps` is not an object", path.display()),
        };
        let list = build_list(
            registry_deps(deps),
            |name, version| self.release(name, version).map(|r| r.deps),
            CLOSURE_MAX,
        );
        if !list.complete {
            bail!(
                "the dependency graph of {} has more than {CLOSURE_MAX} versions",
                path.display()
            );
        }
        let missing = list
            .missing
            .into_iter()
            .map(|(name, version)| {
                (
                    format!("{name}@{version}"),
                    "dependency not in the index".into(),
                )
            })
            .collect();
        let mut modules = list.modules;
        modules.sort();
        Ok((modules, missing))
    }

    /// The release `name@version` from the source that provides the module.
    pub(super) fn release(&self, name: &str, version: &str) -> Option<super::checksums::Release> {
        let source = self.provider(name)?;
        self.mirrors[source]
            .snapshot()
            .checksums
            .get(name, version)
            .cloned()
    }
}

fn pattern_text(p: &Pattern) -> String {
    let star = if p.prefix { "*" } else { "" };
    match &p.version {
        VersionMatch::Any => format!("{}{star}", p.name),
        VersionMatch::Exact(v) => format!("{}{star}@{v}", p.name),
        VersionMatch::Req(r) => format!("{}{star}@{r}", p.name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_parse() {
        let p = Pattern::parse("alice/*").unwrap();
        assert!(p.prefix && p.matches_name("alice/json") && !p.matches_name("bob/x"));
        let p = Pattern::parse("alice/json@0.3.1").unwrap();
        assert_eq!(p.version, VersionMatch::Exact("0.3.1".into()));
        assert!(p.matches_version("0.3.1") && !p.matches_version("0.3.2"));
        let p = Pattern::parse("alice/json@^0.3").unwrap();
        assert!(p.matches_version("0.3.9") && !p.matches_version("0.4.0"));
        let p = Pattern::parse("bob/lex/runtime@0.2.0+build7").unwrap();
        assert!(p.matches_version("0.2.0+build7"));
        for bad in ["alice", "a*b/c", "alice/json@not a version", "*"] {
            assert!(Pattern::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn semver_order() {
        assert!(compare_versions("0.10.0", "0.9.0").is_gt());
        assert!(compare_versions("1.0.0", "1.0.0-rc.1").is_gt());
    }
}
