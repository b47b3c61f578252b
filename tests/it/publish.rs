//! Publishing to a source the gateway hosts (`local = true`): `moonbit-registry
//! publish` beside a running gateway and `POST /-/publish`, then the real `moon`
//! (or `git` and `curl` without it) sees the new version through the gateway at
//! once; refusals (an existing version, names outside the claims, a bad
//! `moon.mod.json`, unknown dependencies, zip path tricks, no or a wrong token,
//! too large) leave the source exactly as it was.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::upstream::admin::{self, stderr, stdout, tree};
use crate::upstream::clients::{sha256_file, sha256_hex};
use crate::upstream::registry::zip_of;
use crate::upstream::scenario::{
    clone_index, curl, git, moon_bin, moon_update_and_add, ok, refresh_index, setup_sources, Setup,
};

const TOKEN_VAR: &str = "MBR_TEST_PUBLISH_TOKEN";
const TOKEN: &str = "publish-s3cret";

/// A local source first, the test upstream second: one merged index.
fn config(publish_token: bool) -> String {
    let mut toml = String::from(
        "[[sources]]\nname = \"local\"\nlocal = true\nclaims = [\"acme/*\"]\n\n\
         [[sources]]\nname = \"public\"\nregistry = \"{upstream}\"\n\n\
         [storage]\narchive_max = \"1MiB\"\n",
    );
    if publish_token {
        toml.push_str(&format!("\n[publish]\ntoken_env = \"{TOKEN_VAR}\"\n"));
    }
    toml
}

async fn gateway(publish_token: bool) -> Setup {
    let env: &[(&str, &str)] = if publish_token {
        &[(TOKEN_VAR, TOKEN)]
    } else {
        &[]
    };
    let (s, _) = setup_sources(&config(publish_token), env, |r| {
        r.publish("alice/core", "0.1.0", &[]);
    })
    .await;
    // The public source's mirror exists before anything depends on it.
    refresh_index(&s.gateway);
    s
}

fn local_dir(s: &Setup) -> PathBuf {
    s.gateway.data_dir.join("local").join("local")
}

/// `main` of the local source's index, or empty before the first publish.
fn tip(s: &Setup) -> String {
    let repo = local_dir(s).join("index.git");
    let out = git(
        None,
        &[
            "--git-dir",
            repo.to_str().unwrap(),
            "rev-parse",
            "--verify",
            "--quiet",
            "refs/heads/main",
        ],
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The archives kept by the local source, for "nothing changed" checks.
fn archives(s: &Setup) -> Vec<(String, u64)> {
    tree(&local_dir(s).join("archives"))
}

fn cli_publish(s: &Setup, path: &Path) -> Output {
    admin::run(
        &[
            "publish",
            path.to_str().unwrap(),
            "--config",
            s.config.to_str().unwrap(),
        ],
        Some(s.gateway.data_dir.path()),
        None,
    )
}

/// A module directory with `moon.mod.json` (`manifest`), a package, and build
/// output and git metadata that must not be published.
fn module_dir(root: &Path, manifest: &str) -> PathBuf {
    let dir = root.join("module");
    let _ = std::fs::remove_dir_all(&dir);
    for sub in ["src/lib", "_build/wasm", ".git", ".mooncakes/x"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    std::fs::write(dir.join("moon.mod.json"), manifest).unwrap();
    std::fs::write(dir.join("src/lib/moon.pkg.json"), "{}\n").unwrap();
    std::fs::write(
        dir.join("src/lib/hello.mbt"),
        "///|\npub fn hello() -> String {\n  \"hello\"\n}\n",
    )
    .unwrap();
    std::fs::write(dir.join("_build/wasm/out.wasm"), "build output").unwrap();
    std::fs::write(dir.join(".git/HEAD"), "ref: refs/heads/main\n").unwrap();
    std::fs::write(dir.join(".mooncakes/x/y"), "a dependency").unwrap();
    dir
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", stdout(out), stderr(out)))
}

/// The index line the gateway serves for `name`, through a real `git clone`.
fn served_index(s: &Setup, name: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("index");
    ok(
        &clone_index(&s.gateway, &dir, "2", &["--depth", "1"]),
        "git clone of the gateway's index",
    );
    std::fs::read_to_string(dir.join(format!("user/{name}.index"))).unwrap_or_default()
}

/// `moon update` and `moon add name` in a fresh project through the gateway;
/// returns the project, or `None` (with a message) without the client.
fn moon_adds(s: &Setup, name: &str, test: &str) -> Option<PathBuf> {
    let Some(bin) = moon_bin() else {
        eprintln!("SKIPPED the moon part of {test}: set MOON_BIN to the moon client (CI sets it to ../shared/tools/moon)");
        return None;
    };
    let work = tempfile::tempdir().unwrap().keep();
    let proj = moon_update_and_add(&bin, &work, &s.gateway.url(), name);
    Some(proj)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_module_published_with_the_command_is_added_by_moon() {
    let s = gateway(false).await;
    let work = tempfile::tempdir().unwrap();
    let manifest = r#"{"name":"acme/hello","version":"0.1.0","description":"says hello","license":"Apache-2.0","keywords":["greeting"],"deps":{}}"#;
    let dir = module_dir(work.path(), manifest);

    // Published while the gateway runs, by another process.
    let out = cli_publish(&s, &dir);
    ok(&out, "moonbit-registry publish");
    let published = json(&out);
    assert_eq!(published["name"], "acme/hello");
    assert_eq!(published["version"], "0.1.0");
    assert_eq!(published["source"], "local");
    let checksum = published["checksum"].as_str().unwrap().to_string();
    let file = local_dir(&s).join("archives/acme/hello/0.1.0.zip");
    assert_eq!(sha256_file(&file), checksum);

    // The index line: moon.mod.json's fields, the checksum, created_at; one line.
    let served = served_index(&s, "acme/hello");
    assert_eq!(served.lines().count(), 1, "{served}");
    let line: serde_json::Value = serde_json::from_str(served.trim()).unwrap();
    assert_eq!(line["checksum"], checksum.as_str());
    assert_eq!(line["description"], "says hello");
    assert_eq!(line["keywords"][0], "greeting");
    let created = line["created_at"].as_str().unwrap();
    assert!(
        created.ends_with("+00:00") && created.len() == 32,
        "{created}"
    );

    // Served from its file, verified, with HEAD answered too.
    let url = format!("{}/user/acme%2Fhello%2F0.1.0.zip", s.gateway.url());
    let got = work.path().join("got.zip");
    ok(
        &curl(&["-f", "-o", got.to_str().unwrap(), &url]),
        "GET the archive",
    );
    assert_eq!(sha256_file(&got), checksum);
    let head = curl(&["-f", "-I", &url]);
    ok(&head, "HEAD the archive");
    let size = std::fs::metadata(&file).unwrap().len();
    assert!(
        String::from_utf8_lossy(&head.stdout)
            .to_lowercase()
            .contains(&format!("content-length: {size}")),
        "{}",
        stdout(&head)
    );
    assert_eq!(
        s.upstream.count("GET", "/user/acme"),
        0,
        "a local archive was asked of the upstream"
    );

    if let Some(proj) = moon_adds(
        &s,
        "acme/hello",
        "a_module_published_with_the_command_is_added_by_moon",
    ) {
        let root = proj.join(".mooncakes/acme/hello");
        assert!(root.join("moon.mod.json").is_file());
        assert!(root.join("src/lib/hello.mbt").is_file());
        assert!(root.join("src/lib/moon.pkg.json").is_file());
        for junk in ["_build", ".git", ".mooncakes"] {
            assert!(!root.join(junk).exists(), "{junk} was published");
        }
    }

    // Publishing the same version again is refused; nothing changes.
    let (tip_before, archives_before) = (tip(&s), archives(&s));
    std::fs::write(dir.join("src/lib/hello.mbt"), "changed").unwrap();
    let out = cli_publish(&s, &dir);
    assert!(!out.status.success(), "republished: {}", stdout(&out));
    assert!(
        stderr(&out).contains("already published"),
        "{}",
        stderr(&out)
    );
    assert_eq!(tip(&s), tip_before);
    assert_eq!(archives(&s), archives_before);
    assert_eq!(sha256_file(&file), checksum);

    // Dependencies: one the public source's index lists is fine, an unknown one is not.
    let dir = module_dir(
        work.path(),
        r#"{"name":"acme/uses-core","version":"1.0.0","deps":{"alice/core":"0.1.0","acme/hello":{"version":"0.1.0"},"acme/near":{"path":"../near"}}}"#,
    );
    ok(&cli_publish(&s, &dir), "publish with known dependencies");
    let (tip_before, archives_before) = (tip(&s), archives(&s));
    let dir = module_dir(
        work.path(),
        r#"{"name":"acme/uses-nothing","version":"1.0.0","deps":{"nobody/missing":"0.1.0"}}"#,
    );
    let out = cli_publish(&s, &dir);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("nobody/missing"), "{}", stderr(&out));

    // Names outside the source's claims.
    let dir = module_dir(work.path(), r#"{"name":"other/thing","version":"0.1.0"}"#);
    let out = cli_publish(&s, &dir);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("claims"), "{}", stderr(&out));

    // Bad or missing moon.mod.json.
    for (manifest, expect) in [
        (r#"{"name":"acme/x"}"#, "version"),
        (r#"{"name":"acme/x","version":"1.0"}"#, "semantic version"),
        (r#"{"name":"acme","version":"1.0.0"}"#, "user/module"),
        (r#"{"name":"acme/../x","version":"1.0.0"}"#, "user/module"),
        (r#"{"name":"acme/x","version":"1.0.0","deps":[1]}"#, "deps"),
        ("{not json", "not valid JSON"),
    ] {
        let dir = module_dir(work.path(), manifest);
        let out = cli_publish(&s, &dir);
        assert!(!out.status.success(), "{manifest} was published");
        assert!(
            stderr(&out).contains(expect),
            "{manifest}: {}",
            stderr(&out)
        );
    }
    let dir = module_dir(work.path(), "{}");
    std::fs::remove_file(dir.join("moon.mod.json")).unwrap();
    let out = cli_publish(&s, &dir);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("moon.mod.json"), "{}", stderr(&out));

    // A zip as `moon package` makes it is published as it is; one with an entry
    // outside the module root is refused.
    let zip = zip_of(&[
        (
            "moon.mod.json",
            br#"{"name":"acme/zipped","version":"0.2.0"}"#.as_slice(),
        ),
        ("src/lib/moon.pkg.json", b"{}".as_slice()),
    ]);
    let zip_path = work.path().join("zipped.zip");
    std::fs::write(&zip_path, &zip).unwrap();
    let evil = zip_of(&[
        (
            "moon.mod.json",
            br#"{"name":"acme/evil","version":"0.1.0"}"#.as_slice(),
        ),
        ("../evil", b"outside".as_slice()),
    ]);
    let evil_path = work.path().join("evil.zip");
    std::fs::write(&evil_path, &evil).unwrap();
    let out = cli_publish(&s, &evil_path);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("../evil"), "{}", stderr(&out));
    assert_eq!(tip(&s), tip_before, "a refused publish committed");
    assert_eq!(archives(&s), archives_before, "a refused publish wrote");

    let out = cli_publish(&s, &zip_path);
    ok(&out, "publish a zip");
    assert_eq!(json(&out)["checksum"], sha256_hex(&zip).as_str());
    assert!(served_index(&s, "acme/zipped").contains(&sha256_hex(&zip)));
}

/// `POST /-/publish` with curl; `Some(token)` sends it. Returns (status, body).
fn post(s: &Setup, zip: &[u8], token: Option<&str>, query: &str) -> (u16, String) {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("upload.zip");
    std::fs::write(&file, zip).unwrap();
    let url = format!("{}/-/publish{query}", s.gateway.url());
    let auth = token.map(|t| format!("Authorization: Bearer {t}"));
    let data = format!("@{}", file.display());
    let mut args = vec![
        "-X",
        "POST",
        "-H",
        "Content-Type: application/zip",
        "--data-binary",
        &data,
        "-w",
        "\n%{http_code}",
    ];
    if let Some(auth) = &auth {
        args.extend(["-H", auth.as_str()]);
    }
    args.push(&url);
    let out = curl(&args);
    let text = stdout(&out);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publishing_over_http_needs_the_token_and_is_seen_at_once() {
    let s = gateway(true).await;
    let zip = zip_of(&[
        (
            "moon.mod.json",
            // A local module needing a public one: moon resolves both through
            // the merged index.
            br#"{"name":"acme/web","version":"0.1.0","deps":{"alice/core":"0.1.0"}}"#.as_slice(),
        ),
        ("src/lib/moon.pkg.json", b"{}".as_slice()),
        (
            "src/lib/web.mbt",
            b"///|\npub fn web() -> Int { 1 }\n".as_slice(),
        ),
    ]);
    let (tip_before, archives_before) = (tip(&s), archives(&s));
    for token in [None, Some("wrong")] {
        let (status, body) = post(&s, &zip, token, "");
        assert_eq!(status, 401, "{token:?}: {body}");
    }
    assert_eq!(
        (tip(&s), archives(&s)),
        (tip_before.clone(), archives_before.clone())
    );

    let (status, body) = post(&s, &zip, Some(TOKEN), "");
    assert_eq!(status, 201, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["name"], "acme/web");
    assert_eq!(answer["version"], "0.1.0");
    assert_eq!(answer["source"], "local");
    assert_eq!(answer["checksum"], sha256_hex(&zip).as_str());
    assert!(served_index(&s, "acme/web").contains(&sha256_hex(&zip)));

    // The same version again: 409, nothing changes.
    let (tip_before, archives_before) = (tip(&s), archives(&s));
    let (status, body) = post(&s, &zip, Some(TOKEN), "?source=local");
    assert_eq!(status, 409, "{body}");

    let refused: [(Vec<u8>, &str, u16, &str); 6] = [
        (
            zip_of(&[
                (
                    "moon.mod.json",
                    br#"{"name":"acme/evil","version":"0.1.0"}"#.as_slice(),
                ),
                ("../evil", b"outside".as_slice()),
            ])
            .to_vec(),
            "",
            400,
            "../evil",
        ),
        (
            zip_of(&[("moon.mod.json", br#"{"name":"acme/bad"}"#.as_slice())]).to_vec(),
            "",
            422,
            "version",
        ),
        (
            zip_of(&[(
                "moon.mod.json",
                br#"{"name":"bob/x","version":"0.1.0"}"#.as_slice(),
            )])
            .to_vec(),
            "",
            403,
            "claims",
        ),
        (b"not a zip".to_vec(), "", 400, "zip"),
        (zip.to_vec(), "?source=public", 404, "not hosted here"),
        (vec![7u8; 2 * 1024 * 1024], "", 413, "archive_max"),
    ];
    for (body, query, expected, reason) in refused {
        let (status, answer) = post(&s, &body, Some(TOKEN), query);
        assert_eq!(status, expected, "{reason}: {answer}");
        assert!(answer.contains(reason), "{reason}: {answer}");
    }
    assert_eq!(tip(&s), tip_before, "a refused publish committed");
    assert_eq!(archives(&s), archives_before, "a refused publish wrote");

    if let Some(proj) = moon_adds(
        &s,
        "acme/web",
        "publishing_over_http_needs_the_token_and_is_seen_at_once",
    ) {
        assert!(proj.join(".mooncakes/acme/web/src/lib/web.mbt").is_file());
        assert!(proj.join(".mooncakes/alice/core/moon.mod.json").is_file());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publishing_over_http_is_off_without_a_token_env() {
    let s = gateway(false).await;
    let zip = zip_of(&[(
        "moon.mod.json",
        br#"{"name":"acme/web","version":"0.1.0"}"#.as_slice(),
    )]);
    let (status, body) = post(&s, &zip, Some(TOKEN), "");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("token_env"), "{body}");
    assert_eq!(tip(&s), "", "something was published");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_publish_token_variable_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!("[[sources]]\nname = \"local\"\nlocal = true\n\n[publish]\ntoken_env = \"{TOKEN_VAR}_UNSET\"\n"),
    )
    .unwrap();
    let out = admin::command(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--config",
            config.to_str().unwrap(),
        ],
        Some(&dir.path().join("data")),
        None,
    )
    .env_remove(format!("{TOKEN_VAR}_UNSET"))
    .output()
    .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("token_env"), "{}", stderr(&out));
}

/// A local archive file changed on disk after it was published is never served
/// as a complete archive: a small one (read whole) is refused, a large one
/// (streamed) ends in an error instead of a clean end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_local_archive_is_never_served_as_complete() {
    let toml =
        "[[sources]]\nname = \"local\"\nlocal = true\n\n[storage]\nmemory_item_max = \"4KiB\"\n";
    let (s, _) = setup_sources(toml, &[], |_| ()).await;
    let work = tempfile::tempdir().unwrap();
    // Bytes deflate cannot shrink, so the large archive stays above memory_item_max.
    let mut noise = Vec::with_capacity(64 * 1024);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while noise.len() < 64 * 1024 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        noise.extend_from_slice(&x.to_le_bytes());
    }
    for (name, payload) in [("acme/small", &b"tiny"[..]), ("acme/large", &noise[..])] {
        let manifest = format!(r#"{{"name":"{name}","version":"0.1.0"}}"#);
        let zip = zip_of(&[
            ("moon.mod.json", manifest.as_bytes()),
            ("payload.bin", payload),
        ]);
        let path = work.path().join("m.zip");
        std::fs::write(&path, &zip).unwrap();
        ok(&cli_publish(&s, &path), "publish");
        let file = local_dir(&s).join(format!("archives/{name}/0.1.0.zip"));
        admin::flip_byte(&file, zip.len() / 2);
        let url = format!(
            "{}/user/{}%2F0.1.0.zip",
            s.gateway.url(),
            name.replace('/', "%2F")
        );
        let got = work.path().join("got.zip");
        let out = curl(&["-o", got.to_str().unwrap(), "-w", "%{http_code}", &url]);
        let served = std::fs::read(&got).unwrap_or_default();
        assert_ne!(
            sha256_hex(&served),
            sha256_file(&file),
            "{name}: the damaged file was served"
        );
        if payload.len() < 4096 {
            assert_eq!(stdout(&out), "500", "{name}: {}", stderr(&out));
        } else {
            // Headers went out before the end was checked: the transfer must fail.
            assert!(!out.status.success(), "{name}: the transfer ended cleanly");
            assert!(served.len() < zip.len(), "{name}: every byte was served");
        }
    }
}

/// Publishes racing each other (command-line processes and `POST /-/publish`,
/// all at once) are serialised by the source's lock: every one is in the index,
/// none overwrote another, and the history is one line of commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishes_are_all_kept() {
    let s = std::sync::Arc::new(gateway(true).await);
    let work = tempfile::tempdir().unwrap();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let (cli, dir) = (s.clone(), work.path().join(format!("cli{i}")));
        tasks.push(std::thread::spawn(move || {
            let manifest = format!(r#"{{"name":"acme/cli{i}","version":"0.1.0"}}"#);
            let dir = module_dir(&dir, &manifest);
            let out = cli_publish(&cli, &dir);
            ok(&out, "concurrent publish");
        }));
        let s = s.clone();
        tasks.push(std::thread::spawn(move || {
            let manifest = format!(r#"{{"name":"acme/http{i}","version":"0.1.0"}}"#);
            let zip = zip_of(&[("moon.mod.json", manifest.as_bytes())]);
            let (status, body) = post(&s, &zip, Some(TOKEN), "");
            assert_eq!(status, 201, "{body}");
        }));
    }
    for t in tasks {
        t.join().unwrap();
    }
    let repo = local_dir(&s).join("index.git");
    let log = git(
        None,
        &[
            "--git-dir",
            repo.to_str().unwrap(),
            "rev-list",
            "--count",
            "--first-parent",
            "main",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&log.stdout).trim(), "8");
    for i in 0..4 {
        for name in [format!("acme/cli{i}"), format!("acme/http{i}")] {
            assert_eq!(served_index(&s, &name).lines().count(), 1, "{name}");
        }
    }
}

/// `serve --offline` fetches nothing, but a local source is its own: a version
/// published beside it is in the index and served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_offline_gateway_serves_what_is_published_to_it() {
    let toml = "offline = true\n\n[[sources]]\nname = \"local\"\nlocal = true\n";
    let (s, _) = setup_sources(toml, &[], |_| ()).await;
    let work = tempfile::tempdir().unwrap();
    let dir = module_dir(work.path(), r#"{"name":"acme/offline","version":"1.2.3"}"#);
    let out = cli_publish(&s, &dir);
    ok(&out, "publish beside an offline gateway");
    let checksum = json(&out)["checksum"].as_str().unwrap().to_string();
    // Asked for before any client saw the new index (a client with an index of
    // its own), then after a clone.
    let got = work.path().join("got.zip");
    let url = format!("{}/user/acme%2Foffline%2F1.2.3.zip", s.gateway.url());
    ok(
        &curl(&["-f", "-o", got.to_str().unwrap(), &url]),
        "GET the archive offline",
    );
    assert_eq!(sha256_file(&got), checksum);
    assert!(served_index(&s, "acme/offline").contains(&checksum));
    assert_eq!(
        s.upstream.count("GET", "/"),
        0,
        "an offline gateway fetched"
    );
}
