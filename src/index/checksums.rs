//! What the index says about each published archive: its sha256 and its
//! dependencies, read from the JSON lines of `user/<name>.index` files.
//!
//! Parsing follows `moon`: each line on its own, a malformed line skipped with a
//! warning (never fatal), and for a version listed twice the last line wins.
//!
//! The parsed index of one commit can be saved as text and restored
//! ([`Checksums::save`], [`Checksums::restore`]): reading thousands of index
//! files through git and parsing their JSON is most of a process's start (and of
//! a `warm` before its first download), and a commit's index never changes.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use serde::Deserialize;

/// One published version.
#[derive(Debug, Clone, PartialEq)]
pub struct Release {
    /// Lowercase hex sha256 of the archive.
    pub checksum: String,
    /// `(module name, version)` of each registry dependency.
    pub deps: Vec<(String, String)>,
}

/// Every module and version of one index.
#[derive(Debug, Default, PartialEq)]
pub struct Checksums {
    modules: HashMap<String, BTreeMap<String, Release>>,
    /// Lines skipped as malformed, for logs and health.
    pub skipped: usize,
}

#[derive(Deserialize)]
struct Line {
    version: String,
    checksum: String,
    #[serde(default)]
    deps: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Checksums {
    /// Add the lines of the index file of module `name` (e.g. `alice/json`).
    pub fn add_file(&mut self, source: &str, name: &str, text: &str) {
        // The file counts even with no valid line: it decides which source
        // provides the module (see `merge::provider`).
        self.modules.entry(name.to_string()).or_default();
        for (n, raw) in text.lines().enumerate() {
            if raw.trim().is_empty() {
                continue;
            }
            match parse_line(raw) {
                Ok((version, release)) => {
                    self.modules
                        .entry(name.to_string())
                        .or_default()
                        .insert(version, release);
                }
                Err(reason) => {
                    self.skipped += 1;
                    tracing::warn!(source, module = name, line = n + 1, %reason, "skipping malformed index line");
                }
            }
        }
    }

    /// Whether this index has a file for module `name`.
    pub fn has_module(&self, name: &str) -> bool {
        self.modules.contains_key(name)
    }

    pub fn get(&self, name: &str, version: &str) -> Option<&Release> {
        self.modules.get(name)?.get(version)
    }

    /// Every module name, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.modules.keys().map(String::as_str)
    }

    /// Every published version of `name`.
    pub fn versions(&self, name: &str) -> impl Iterator<Item = (&str, &Release)> {
        self.modules
            .get(name)
            .into_iter()
            .flat_map(|m| m.iter().map(|(v, r)| (v.as_str(), r)))
    }

    pub fn modules(&self) -> usize {
        self.modules.len()
    }

    pub fn releases(&self) -> usize {
        self.modules.values().map(BTreeMap::len).sum()
    }

    /// This index, parsed from `commit`, as text for [`Checksums::restore`]: a
    /// header, then per module its name on a line and a tab-led line per release
    /// (version, checksum, then dependency and version pairs), then a trailer
    /// with the counts. `None` when a name or version holds a tab or a line
    /// break, which could not be read back unambiguously (the index is then
    /// always read from git).
    pub fn save(&self, commit: &str) -> Option<String> {
        let clean = |s: &str| !s.contains(['\t', '\n', '\r']);
        let mut out = format!("{SAVED_HEADER} {commit} {}\n", self.skipped);
        for (name, releases) in &self.modules {
            if !clean(name) || name.is_empty() {
                return None;
            }
            out.push_str(name);
            out.push('\n');
            for (version, release) in releases {
                let deps = release.deps.iter().flat_map(|(d, v)| [d, v]);
                for field in std::iter::once(version).chain(deps) {
                    if !clean(field) {
                        return None;
                    }
                }
                out.push('\t');
                out.push_str(version);
                out.push('\t');
                out.push_str(&release.checksum);
                for (dep, dep_version) in &release.deps {
                    out.push('\t');
                    out.push_str(dep);
                    out.push('\t');
                    out.push_str(dep_version);
                }
                out.push('\n');
            }
        }
        out.push_str(&format!("end\t{}\t{}\n", self.modules(), self.releases()));
        Some(out)
    }

    /// The index [`Checksums::save`] wrote for `commit`; `None` for anything
    /// else: another commit or format, a cut or damaged text (counts that
    /// disagree, a checksum that is not 64 lowercase hex digits).
    pub fn restore(text: &str, commit: &str) -> Option<Checksums> {
        let (header, body) = text.split_once('\n')?;
        let (for_commit, skipped) = header
            .strip_prefix(SAVED_HEADER)?
            .strip_prefix(' ')?
            .split_once(' ')?;
        if for_commit != commit {
            return None;
        }
        let mut checksums = Checksums {
            skipped: skipped.parse().ok()?,
            ..Checksums::default()
        };
        let mut module: Option<&mut BTreeMap<String, Release>> = None;
        let mut counts = None;
        for line in body.lines() {
            if counts.is_some() {
                return None;
            }
            if let Some(release) = line.strip_prefix('\t') {
                let mut fields = release.split('\t');
                let (version, checksum) = (fields.next()?, fields.next()?);
                if !is_checksum(checksum) {
                    return None;
                }
                let mut deps = Vec::new();
                while let Some(dep) = fields.next() {
                    deps.push((dep.to_string(), fields.next()?.to_string()));
                }
                let release = Release {
                    checksum: checksum.to_string(),
                    deps,
                };
                module.as_mut()?.insert(version.to_string(), release);
            } else if let Some(trailer) = line.strip_prefix("end\t") {
                counts = Some(trailer);
            } else {
                module = Some(checksums.modules.entry(line.to_string()).or_default());
            }
        }
        let (modules, releases) = counts?.split_once('\t')?;
        (modules.parse() == Ok(checksums.modules()) && releases.parse() == Ok(checksums.releases()))
            .then_some(checksums)
    }
}

/// The first line of a saved index; the version changes with the format or
/// with the parsing rules (a saved index must read as parsing would).
const SAVED_HEADER: &str = "moonbit-registry parsed index v1";

fn is_checksum(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The modules a set of requirements resolves to, by minimal version selection
/// as `moon` (like Go) does it: every `(module, version)` reachable from the
/// roots through any required version, then per module the highest of them.
#[derive(Debug, Default, PartialEq)]
pub struct BuildList {
    /// `(module, version)`, in the order modules were first reached.
    pub modules: Vec<(String, String)>,
    /// Requirements no release answers for.
    pub missing: Vec<(String, String)>,
    /// False when more than the allowed number of versions was reachable; the
    /// rest was not visited.
    pub complete: bool,
}

/// Resolve `roots`: `deps_of(name, version)` gives a release's requirements, or
/// `None` if no index lists it. At most `max_versions` versions are visited.
pub fn build_list(
    roots: Vec<(String, String)>,
    deps_of: impl Fn(&str, &str) -> Option<Vec<(String, String)>>,
    max_versions: usize,
) -> BuildList {
    let mut seen: HashSet<(String, String)> = HashSet::new();
    let mut queue: VecDeque<(String, String)> = roots.into();
    let mut list = BuildList::default();
    let mut position: HashMap<String, usize> = HashMap::new();
    while let Some(requirement) = queue.pop_front() {
        if seen.contains(&requirement) {
            continue;
        }
        if seen.len() >= max_versions {
            return list;
        }
        seen.insert(requirement.clone());
        let (name, version) = requirement;
        let Some(deps) = deps_of(&name, &version) else {
            list.missing.push((name, version));
            continue;
        };
        match position.get(&name) {
            Some(&i) => {
                if compare_versions(&version, &list.modules[i].1).is_gt() {
                    list.modules[i].1 = version;
                }
            }
            None => {
                position.insert(name.clone(), list.modules.len());
                list.modules.push((name, version));
            }
        }
        queue.extend(deps);
    }
    list.complete = true;
    list
}

/// Semver order; strings that are not semver sort before those that are.
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    match (semver::Version::parse(a), semver::Version::parse(b)) {
        (Ok(a), Ok(b)) => a.cmp(&b),
        (Ok(_), Err(_)) => std::cmp::Ordering::Greater,
        (Err(_), Ok(_)) => std::cmp::Ordering::Less,
        (Err(_), Err(_)) => a.cmp(b),
    }
}

fn parse_line(raw: &str) -> Result<(String, Release), String> {
    let line: Line = serde_json::from_str(raw).map_err(|e| e.to_string())?;
    let checksum = line.checksum;
    if !is_checksum(&checksum) {
        return Err(format!(
            "checksum `{checksum}` is not 64 lowercase hex digits"
        ));
    }
    let deps = registry_deps(line.deps.unwrap_or_default());
    Ok((line.version, Release { checksum, deps }))
}

/// The registry dependencies of a `deps` object (an index line's or a
/// `moon.mod.json`'s): a bare version or `{"version": ...}`; path and git
/// dependencies are not registry downloads.
pub fn registry_deps(deps: serde_json::Map<String, serde_json::Value>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (dep, spec) in deps {
        let version = match &spec {
            serde_json::Value::String(v) => Some(v.clone()),
            serde_json::Value::Object(o) if !o.contains_key("path") && !o.contains_key("git") => o
                .get("version")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            _ => None,
        };
        if let Some(version) = version {
            out.push((dep, version));
        }
    }
    out
}

/// The module name of an index file path: `user/bob/lex/runtime.index` -> `bob/lex/runtime`.
pub fn module_of_path(path: &str) -> Option<&str> {
    let name = path.strip_prefix("user/")?.strip_suffix(".index")?;
    (name.contains('/') && !name.starts_with('/')).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn last_line_wins_and_bad_lines_are_skipped() {
        let mut c = Checksums::default();
        let text = format!(
            "{{\"name\":\"alice/json\",\"version\":\"0.1.0\",\"checksum\":\"{A}\"}}\n\
             not json at all\n\
             {{\"version\":\"0.2.0\",\"checksum\":\"ABC\"}}\n\
             {{\"version\":\"0.1.0\",\"checksum\":\"{B}\",\"deps\":{{\"alice/core\":\"0.1.0\",\"x/y\":{{\"path\":\"../y\"}},\"z/w\":{{\"version\":\"1.0.0\"}}}}}}\n"
        );
        c.add_file("test", "alice/json", &text);
        let r = c.get("alice/json", "0.1.0").unwrap();
        assert_eq!(r.checksum, B);
        assert_eq!(
            r.deps,
            vec![
                ("alice/core".to_string(), "0.1.0".to_string()),
                ("z/w".to_string(), "1.0.0".to_string())
            ]
        );
        assert_eq!(c.skipped, 2);
        assert!(c.get("alice/json", "0.2.0").is_none());
    }

    #[test]
    fn a_saved_index_restores_equal_for_its_commit_only() {
        let mut c = Checksums::default();
        let line = |v: &str, sum: &str, deps: &str| {
            format!("{{\"version\":\"{v}\",\"checksum\":\"{sum}\",\"deps\":{{{deps}}}}}\n")
        };
        let json = line("0.1.0", A, "")
            + &line("0.2.0", B, "\"alice/core\":\"0.1.0\",\"z/w\":\"1.0.0\"")
            + "junk\n";
        c.add_file("test", "alice/json", &json);
        c.add_file("test", "alice/core", &line("0.1.0", B, ""));
        c.add_file("test", "alice/empty", "");
        let text = c.save("c0ffee").expect("saved");
        assert_eq!(Checksums::restore(&text, "c0ffee").as_ref(), Some(&c));
        assert_eq!(Checksums::restore(&text, "c0ffee").unwrap().skipped, 1);
        // Another commit, a cut file, a damaged checksum, another format: not restored.
        assert!(Checksums::restore(&text, "beef").is_none());
        let cut = &text[..text.rfind("end").unwrap()];
        assert!(Checksums::restore(cut, "c0ffee").is_none());
        assert!(Checksums::restore(&text[..text.len() / 2], "c0ffee").is_none());
        assert!(Checksums::restore(&text.replacen(B, &"B".repeat(64), 1), "c0ffee").is_none());
        let other = text.replacen("v1", "v0", 1);
        assert!(Checksums::restore(&other, "c0ffee").is_none());
        // A version with a tab could not be read back: nothing is saved.
        let mut odd = Checksums::default();
        odd.add_file("test", "alice/odd", &line("1.0\\t0", A, ""));
        assert_eq!(odd.releases(), 1);
        assert!(odd.save("c0ffee").is_none());
    }

    /// A test index: `(module, version, deps)` lines.
    fn index(releases: &[(&str, &str, &str)]) -> Checksums {
        let mut c = Checksums::default();
        for (module, version, deps) in releases {
            let line =
                format!("{{\"version\":\"{version}\",\"checksum\":\"{A}\",\"deps\":{{{deps}}}}}\n");
            c.add_file("t", module, &line);
        }
        c
    }

    fn resolve(c: &Checksums, module: &str, version: &str, max: usize) -> BuildList {
        let roots = c.get(module, version).unwrap().deps.clone();
        build_list(roots, |n, v| c.get(n, v).map(|r| r.deps.clone()), max)
    }

    #[test]
    fn build_list_is_transitive_and_bounded() {
        let c = index(&[
            ("a/app", "1.0.0", "\"a/json\":\"0.1.0\",\"a/lex\":\"0.2.0\""),
            ("a/json", "0.1.0", "\"a/core\":\"0.1.0\""),
            (
                "a/lex",
                "0.2.0",
                "\"a/core\":\"0.1.0\",\"a/gone\":\"9.9.9\"",
            ),
            ("a/core", "0.1.0", "\"a/app\":\"1.0.0\""),
        ]);
        let all = resolve(&c, "a/app", "1.0.0", 100);
        let names: Vec<&str> = all.modules.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a/json", "a/lex", "a/core", "a/app"]);
        assert_eq!(all.missing, [("a/gone".to_string(), "9.9.9".to_string())]);
        assert!(all.complete);
        let bounded = resolve(&c, "a/app", "1.0.0", 1);
        assert_eq!(bounded.modules.len(), 1);
        assert!(!bounded.complete);
    }

    #[test]
    fn build_list_selects_the_highest_required_version_of_each_module() {
        // app needs x 0.4.37 directly and, through json, x 0.4.40; x 0.4.37 needs
        // old (only reachable through it, so still part of the build list, as in MVS).
        let c = index(&[
            ("a/app", "1.0.0", "\"a/x\":\"0.4.37\",\"a/json\":\"0.1.0\""),
            ("a/json", "0.1.0", "\"a/x\":\"0.4.40\""),
            ("a/x", "0.4.37", "\"a/old\":\"1.0.0\""),
            ("a/x", "0.4.38", ""),
            ("a/x", "0.4.40", ""),
            ("a/old", "1.0.0", ""),
        ]);
        assert_eq!(
            resolve(&c, "a/app", "1.0.0", 100).modules,
            [
                ("a/json".to_string(), "0.1.0".to_string()),
                ("a/x".to_string(), "0.4.40".to_string()),
                ("a/old".to_string(), "1.0.0".to_string()),
            ]
        );
    }

    #[test]
    fn module_names_from_paths() {
        assert_eq!(
            module_of_path("user/bob/lex/runtime.index"),
            Some("bob/lex/runtime")
        );
        assert_eq!(module_of_path("user/alice/json.index"), Some("alice/json"));
        assert_eq!(module_of_path("stats.json"), None);
        assert_eq!(module_of_path("user/x.index"), None);
    }
}
