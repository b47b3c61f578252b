//! What the index says about each published archive: its sha256 and its
//! dependencies, read from the JSON lines of `user/<name>.index` files.
//!
//! Parsing follows `moon`: each line on its own, a malformed line skipped with a
//! warning (never fatal), and for a version listed twice the last line wins.

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
#[derive(Debug, Default)]
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

    /// The transitive dependencies of `name@version` (not itself) as `moon` selects
    /// them: minimal version selection, every module reachable from its
    /// requirements at the highest version any of them requires, in the order first
    /// reached; at most `limit` requirements are followed. Unknown dependencies are
    /// skipped: `moon` would fail on them anyway, and prefetching is only a guess at
    /// what comes next.
    pub fn closure(&self, name: &str, version: &str, limit: usize) -> Vec<(String, String)> {
        let mut selected: Vec<(String, String)> = Vec::new();
        for (dep, dep_version) in self.requirements(name, version, limit) {
            if dep == name {
                continue;
            }
            match selected.iter_mut().find(|(n, _)| *n == dep) {
                Some((_, chosen)) => {
                    if compare_versions(&dep_version, chosen).is_gt() {
                        *chosen = dep_version;
                    }
                }
                None => selected.push((dep, dep_version)),
            }
        }
        selected
    }

    /// Every `(module, version)` reachable from `name@version`'s requirements,
    /// breadth first, at most `limit` of them.
    fn requirements(&self, name: &str, version: &str, limit: usize) -> Vec<(String, String)> {
        let mut seen: HashSet<(String, String)> = HashSet::new();
        let mut queue: VecDeque<(String, String)> = VecDeque::new();
        let mut out = Vec::new();
        queue.push_back((name.to_string(), version.to_string()));
        seen.insert((name.to_string(), version.to_string()));
        while let Some((n, v)) = queue.pop_front() {
            let Some(release) = self.get(&n, &v) else {
                continue;
            };
            for dep in &release.deps {
                if out.len() >= limit {
                    return out;
                }
                if seen.insert(dep.clone()) && self.get(&dep.0, &dep.1).is_some() {
                    out.push(dep.clone());
                    queue.push_back(dep.clone());
                }
            }
        }
        out
    }
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
    if checksum.len() != 64
        || !checksum
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
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
    fn closure_is_transitive_and_bounded() {
        let mut c = Checksums::default();
        let line = |v: &str, deps: &str| {
            format!("{{\"version\":\"{v}\",\"checksum\":\"{A}\",\"deps\":{{{deps}}}}}\n")
        };
        c.add_file(
            "t",
            "a/app",
            &line("1.0.0", "\"a/json\":\"0.1.0\",\"a/lex\":\"0.2.0\""),
        );
        c.add_file("t", "a/json", &line("0.1.0", "\"a/core\":\"0.1.0\""));
        c.add_file(
            "t",
            "a/lex",
            &line("0.2.0", "\"a/core\":\"0.1.0\",\"a/gone\":\"9.9.9\""),
        );
        c.add_file("t", "a/core", &line("0.1.0", "\"a/app\":\"1.0.0\""));
        let all = c.closure("a/app", "1.0.0", 100);
        let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a/json", "a/lex", "a/core"]);
        assert_eq!(c.closure("a/app", "1.0.0", 1).len(), 1);
    }

    #[test]
    fn closure_selects_the_highest_required_version_of_each_module() {
        let mut c = Checksums::default();
        let line = |v: &str, deps: &str| {
            format!("{{\"version\":\"{v}\",\"checksum\":\"{A}\",\"deps\":{{{deps}}}}}\n")
        };
        // app needs x 0.4.37 directly and, through json, x 0.4.40; x 0.4.37 needs
        // old (only reachable through it, so still part of the build list, as in MVS).
        c.add_file(
            "t",
            "a/app",
            &line("1.0.0", "\"a/x\":\"0.4.37\",\"a/json\":\"0.1.0\""),
        );
        c.add_file("t", "a/json", &line("0.1.0", "\"a/x\":\"0.4.40\""));
        c.add_file(
            "t",
            "a/x",
            &(line("0.4.37", "\"a/old\":\"1.0.0\"") + &line("0.4.38", "") + &line("0.4.40", "")),
        );
        c.add_file("t", "a/old", &line("1.0.0", ""));
        let chosen = c.closure("a/app", "1.0.0", 100);
        assert_eq!(
            chosen,
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
