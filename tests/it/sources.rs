//! One registry made of several sources (issue 12): the merged index (internal
//! first, claims), its deterministic history, a source that goes down, and the
//! pinned view `/at/<time>/`, driven by real `git`, `curl` and `moon`.

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::upstream::clients::sha256_hex;
use crate::upstream::registry::zip_of;
use crate::upstream::scenario::{
    curl, gateway_env, git, inside_loopback_namespace, moon_bin, moon_through_proxy,
    moon_update_and_add, ok, TwoSources,
};
use crate::upstream::{admin, Gateway};

/// Internal first (private: it wants a bearer token), claiming `acme/*`; the
/// public registry second.
const TWO: &str = r#"
[[sources]]
name = "internal"
registry = "{internal}"
claims = ["acme/*"]
intercept_hosts = []
auth = { bearer_env = "INTERNAL_TOKEN" }

[[sources]]
name = "public"
registry = "{public}"
intercept_hosts = ["mooncakes.io", "download.mooncakes.io"]

[proxy]
tunnel = "deny"
"#;

/// `acme/app` (internal) needs `acme/json` (internal, also published publicly
/// with another version) and `bob/util` (public); the public `acme/evil` is
/// what claims keep out.
async fn acme() -> TwoSources {
    let env = [("INTERNAL_TOKEN", TOKEN)];
    let (sources, ()) = TwoSources::start(TWO, &env, |internal, public| {
        internal.publish("acme/json", "0.1.0", &[]);
        internal.publish(
            "acme/app",
            "0.1.0",
            &[("acme/json", "0.1.0"), ("bob/util", "0.1.0")],
        );
        public.publish("bob/util", "0.1.0", &[]);
        public.publish("acme/json", "0.1.0", &[]);
        public.publish("acme/json", "0.2.0", &[]);
        public.publish("acme/evil", "0.1.0", &[]);
        internal.set_symbols(zip_of(&[("acme.json", b"internal".as_slice())]));
        public.set_symbols(zip_of(&[("bob.json", b"public".as_slice())]));
    })
    .await;
    sources
        .internal
        .require_authorization(Some(&format!("Bearer {TOKEN}")));
    sources
}

const TOKEN: &str = "internal-t0ken";

/// The merged index's `main` as the gateway advertises it.
fn ls_remote(url: &str) -> String {
    let out = git(None, &["ls-remote", url, "refs/heads/main"]);
    ok(&out, "git ls-remote");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn refresh(gw: &Gateway) {
    let out = curl(&[
        "-fsS",
        "-X",
        "POST",
        &format!("{}/-/index/refresh", gw.url()),
    ]);
    ok(&out, "POST /-/index/refresh");
}

fn installed(proj: &Path, dir: &str) -> String {
    std::fs::read_to_string(proj.join(".mooncakes").join(dir).join("moon.mod.json"))
        .unwrap_or_else(|e| panic!("{dir} missing from .mooncakes: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_index_internal_first_and_claims_keep_public_modules_out() {
    let s = acme().await;
    let gw = s.gateway().await;
    let tmp = tempfile::tempdir().unwrap();
    let clone = tmp.path().join("index");
    let url = format!("{}/git/index", gw.url());
    ok(
        &git(
            None,
            &["clone", "--depth", "1", &url, clone.to_str().unwrap()],
        ),
        "git clone --depth 1 of the merged index",
    );
    let file = |name: &str| std::fs::read_to_string(clone.join(format!("user/{name}.index"))).ok();
    // The internal file whole: the public 0.2.0 line of acme/json is not there.
    assert_eq!(
        file("acme/json"),
        s.internal.registry.index_file("acme/json")
    );
    assert_eq!(file("acme/app"), s.internal.registry.index_file("acme/app"));
    assert_eq!(file("bob/util"), s.public.registry.index_file("bob/util"));
    assert_eq!(file("acme/evil"), None, "a claimed name came from public");

    // Claimed modules are fetched from the claimant only, never from public.
    for key in ["acme%2Fevil%2F0.1.0", "acme%2Fjson%2F0.2.0"] {
        let out = curl(&[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("{}/user/{key}.zip", gw.url()),
        ]);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "404", "{key}");
    }
    assert_eq!(
        s.public.count("GET", "/user/acme"),
        0,
        "public asked for acme/*"
    );

    let Some(bin) = moon_bin() else {
        eprintln!("SKIPPED the moon part of one_index_internal_first_and_claims_keep_public_modules_out: set MOON_BIN to the moon client");
        return;
    };
    let proj = moon_update_and_add(&bin, tmp.path(), &gw.url(), "acme/app");
    for dir in ["acme/app", "acme/json", "bob/util"] {
        installed(&proj, dir);
    }
    // moon checked each archive against the index it cloned; each came from
    // the source that provides its module.
    assert_eq!(
        s.internal.count("GET", "/user/acme%2Fapp"),
        1,
        "{:?}",
        s.internal.requests()
    );
    assert_eq!(s.internal.count("GET", "/user/acme%2Fjson%2F0.1.0"), 1);
    assert_eq!(s.public.count("GET", "/user/bob%2Futil"), 1);
    assert_eq!(s.public.count("GET", "/user/acme"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateways_build_the_same_history_and_pulls_fast_forward() {
    let s = acme().await;
    let (a, b) = (s.gateway().await, s.gateway().await);
    let (url_a, url_b) = (
        format!("{}/git/index", a.url()),
        format!("{}/git/index", b.url()),
    );
    let first = ls_remote(&url_a);
    assert_eq!(first.len(), 40);
    assert_eq!(ls_remote(&url_b), first, "two gateways, two merged commits");
    let health: serde_json::Value =
        serde_json::from_slice(&curl(&["-fsS", &format!("{}/-/health", a.url())]).stdout).unwrap();
    assert_eq!(health["merged_index"]["commit"], first.as_str());
    assert_eq!(
        health["merged_index"]["sources"][1]["commit"],
        s.public.registry.head().as_str()
    );

    let tmp = tempfile::tempdir().unwrap();
    let clone = tmp.path().join("index");
    ok(
        &git(
            None,
            &["clone", "--depth", "1", &url_a, clone.to_str().unwrap()],
        ),
        "git clone",
    );
    s.public.registry.publish("bob/util", "0.2.0", &[]);
    refresh(&a);
    refresh(&b);
    let second = ls_remote(&url_a);
    assert_ne!(
        second, first,
        "a publish upstream made no new merged commit"
    );
    assert_eq!(ls_remote(&url_b), second);
    let dir = clone.to_str().unwrap();
    let out = git(None, &["-C", dir, "pull", "--ff-only", "origin", "main"]);
    ok(&out, "git pull --ff-only");
    let head = git(None, &["-C", dir, "rev-parse", "HEAD"]);
    assert_eq!(String::from_utf8_lossy(&head.stdout).trim(), second);
    let parent = git(None, &["-C", dir, "rev-parse", "HEAD^"]);
    assert_eq!(
        String::from_utf8_lossy(&parent.stdout).trim(),
        first,
        "the new merged commit's parent is the previous one"
    );
    assert_eq!(
        std::fs::read_to_string(clone.join("user/bob/util.index")).ok(),
        s.public.registry.index_file("bob/util")
    );
    // A restart changes nothing, and a gateway that starts only now builds the
    // same history: it is made from the sources' histories, not from when a
    // gateway looked.
    let b = s.restart(b).await;
    assert_eq!(ls_remote(&format!("{}/git/index", b.url())), second);
    let late = s.gateway().await;
    assert_eq!(ls_remote(&format!("{}/git/index", late.url())), second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moon_still_installs_with_the_internal_source_down() {
    let Some(bin) = moon_bin() else {
        eprintln!("SKIPPED moon_still_installs_with_the_internal_source_down: set MOON_BIN to the moon client");
        return;
    };
    let s = acme().await;
    let gw = s.gateway().await;
    let tmp = tempfile::tempdir().unwrap();
    for round in ["both up", "internal down"] {
        let proj = moon_update_and_add(&bin, &tmp.path().join(round), &gw.url(), "acme/app");
        for dir in ["acme/app", "acme/json", "bob/util"] {
            installed(&proj, dir);
        }
        s.internal.stop().await;
    }
    let health =
        String::from_utf8_lossy(&curl(&["-fsS", &format!("{}/-/health", gw.url())]).stdout)
            .to_string();
    assert!(health.contains("\"internal\""), "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_pinned_view_serves_the_index_as_it_stood() {
    let s = acme().await;
    let gw = s.gateway().await;
    // Commit times have one-second resolution: keep the pin between two of them.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = s.public.registry.index_file("bob/util");
    s.public.registry.publish("bob/util", "0.2.0", &[]);
    refresh(&gw);

    let tmp = tempfile::tempdir().unwrap();
    let pinned = format!("{}/at/{at}", gw.url());
    for (view, expect) in [
        (pinned.clone(), before.clone()),
        (gw.url(), s.public.registry.index_file("bob/util")),
    ] {
        let clone = tmp.path().join(sha256_hex(view.as_bytes()));
        let url = format!("{view}/git/index");
        ok(
            &git(
                None,
                &["clone", "--depth", "1", &url, clone.to_str().unwrap()],
            ),
            &format!("git clone {url}"),
        );
        assert_eq!(
            std::fs::read_to_string(clone.join("user/bob/util.index")).ok(),
            expect,
            "{view}"
        );
        // The other source's part is there too.
        assert!(clone.join("user/acme/app.index").is_file());
    }
    let bad = curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!(
            "{}/at/yesterday/git/index/info/refs?service=git-upload-pack",
            gw.url()
        ),
    ]);
    assert_eq!(String::from_utf8_lossy(&bad.stdout), "400");

    let Some(bin) = moon_bin() else {
        eprintln!("SKIPPED the moon part of the_pinned_view_serves_the_index_as_it_stood: set MOON_BIN to the moon client");
        return;
    };
    let proj = moon_update_and_add(&bin, tmp.path(), &pinned, "bob/util");
    let util = installed(&proj, "bob/util");
    assert!(util.contains("\"0.1.0\""), "pinned view installed {util}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moon_through_https_proxy_resolves_internal_modules() {
    let Some(bin) = moon_bin() else {
        eprintln!("SKIPPED moon_through_https_proxy_resolves_internal_modules: set MOON_BIN to the moon client");
        return;
    };
    if !inside_loopback_namespace(
        module_path!(),
        "moon_through_https_proxy_resolves_internal_modules",
    ) {
        return;
    }
    let s = acme().await;
    let gw = s.gateway().await;
    let env = gateway_env(&gw);
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let cwd = tmp.path().join("work");
    std::fs::create_dir_all(&cwd).unwrap();
    let moon = |dir: &Path, args: &[&str]| moon_through_proxy(&bin, &home, dir, &env, args);
    for (what, out) in [
        ("moon update", moon(&cwd, &["update"])),
        ("moon new", moon(&cwd, &["new", "proj", "--user", "tester"])),
        ("moon add", moon(&cwd.join("proj"), &["add", "acme/app"])),
    ] {
        ok(&out, what);
    }
    let proj = cwd.join("proj");
    for dir in ["acme/app", "acme/json", "bob/util"] {
        installed(&proj, dir);
    }
    assert_eq!(s.internal.count("GET", "/user/acme%2Fapp"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bundle_carries_every_source_and_offline_serves_the_same_merged_index() {
    let s = acme().await;
    let online = s.gateway().await;
    let work = tempfile::tempdir().unwrap();
    let from = work.path().join("moon.mod.json");
    std::fs::write(
        &from,
        r#"{"name":"tester/proj","version":"0.1.0","deps":{"acme/app":"0.1.0"}}"#,
    )
    .unwrap();
    let bundle = work.path().join("bundle.tar");
    let (config, ca) = (s.config.to_str().unwrap(), s.ca_bundle.to_str().unwrap());
    let with_sources = |args: &[&str], data: &Path| {
        let mut all = args.to_vec();
        all.extend(["--config", config, "--upstream-ca", ca]);
        admin::command(&all, Some(data), None)
            .env("INTERNAL_TOKEN", TOKEN)
            .output()
            .expect("run moonbit-registry")
    };
    let exported = with_sources(
        &[
            "export",
            "--from",
            from.to_str().unwrap(),
            "--out",
            bundle.to_str().unwrap(),
        ],
        &work.path().join("export-data"),
    );
    ok(&exported, "export");
    assert!(
        admin::stdout(&exported).contains("3 archives"),
        "{}",
        admin::stdout(&exported)
    );

    let data = work.path().join("offline-data");
    let imported = with_sources(&["import", bundle.to_str().unwrap()], &data);
    ok(&imported, "import");
    let note = admin::stdout(&imported);
    assert!(
        note.contains("3 archives added") && note.contains("`public`"),
        "{note}"
    );

    s.internal.stop().await;
    s.public.stop().await;
    let offline = Gateway::start_with_data_dir_env(
        "",
        &s.ca_bundle,
        &data,
        &["--config", config, "--offline"],
        &[("INTERNAL_TOKEN", TOKEN)],
    )
    .await;
    assert_eq!(
        ls_remote(&format!("{}/git/index", offline.url())),
        ls_remote(&format!("{}/git/index", online.url())),
        "offline, the bundle's sources merge into the same history"
    );
    // The merged symbols.zip travelled too.
    let symbols = work.path().join("symbols.zip");
    let out = curl(&[
        "-fsS",
        "-o",
        symbols.to_str().unwrap(),
        &format!("{}/symbols.zip", offline.url()),
    ]);
    ok(&out, "GET /symbols.zip offline");
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&symbols).unwrap()).unwrap();
    let mut names: Vec<String> = (0..zip.len())
        .map(|i| zip.by_index(i).unwrap().name().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["acme.json", "bob.json"]);
    let Some(bin) = moon_bin() else {
        eprintln!("SKIPPED the moon part of a_bundle_carries_every_source_and_offline_serves_the_same_merged_index: set MOON_BIN to the moon client");
        return;
    };
    let proj = moon_update_and_add(&bin, work.path(), &offline.url(), "acme/app");
    for dir in ["acme/app", "acme/json", "bob/util"] {
        installed(&proj, dir);
    }
}
