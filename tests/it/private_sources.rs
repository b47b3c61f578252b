//! One registry from several sources (issue 12): a private source whose
//! credential (`auth = { bearer_env | basic_env }`) goes with the gateway's own
//! requests to it and to nothing else (its index clone and fetches, archives,
//! symbols), never into the log or the data dir; a refused credential shown
//! clearly in the log and `/-/health` while public sources keep working; and
//! `symbols.zip` merged from every source. End to end for the credential paths of
//! `src/upstream.rs`, `src/index/mirror.rs` and `src/git.rs`, and `src/symbols.rs`.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::upstream::registry::zip_of;
use crate::upstream::scenario::{
    fetch_miss_then_hit, moon, moon_bin, moon_project, ok, setup_two_sources, TwoSourcesGateway,
};
use crate::upstream::{Fault, Gateway, Published};

const TOKEN: &str = "s3cr3t-internal-token-4f1d";

use crate::upstream::scenario::curl_get as get;

fn health(gw: &Gateway) -> serde_json::Value {
    let (_, _, body) = get(gw, "/-/health", &[]);
    serde_json::from_slice(&body).expect("health is JSON")
}

/// The entry named `name` in `health[list]` (`index` entries name a `source`).
fn entry<'a>(health: &'a serde_json::Value, list: &str, name: &str) -> &'a serde_json::Value {
    let key = if list == "index" { "source" } else { "name" };
    health[list]
        .as_array()
        .and_then(|a| a.iter().find(|e| e[key] == name))
        .unwrap_or_else(|| panic!("no {list} entry `{name}` in {health}"))
}

/// Wait (up to 30 s) until `/-/health` satisfies `done`; returns it.
async fn health_until(
    gw: &Gateway,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h = health(gw);
        if done(&h) {
            return h;
        }
        assert!(Instant::now() < deadline, "never {what}: {h}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Both mirrors cloned.
async fn both_mirrors(gw: &Gateway) {
    health_until(gw, "cloned both mirrors", |h| {
        ["internal", "public"]
            .iter()
            .all(|s| entry(h, "index", s)["commit"].is_string())
    })
    .await;
}

/// Every file under `dir` (recursively) whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    crate::upstream::admin::tree(dir)
        .into_iter()
        .filter(|(rel, _)| !rel.ends_with('/'))
        .map(|(rel, _)| dir.join(rel))
        .filter(|path| {
            let bytes = std::fs::read(path).unwrap_or_default();
            bytes.windows(needle.len()).any(|w| w == needle)
        })
        .map(|path| path.display().to_string())
        .collect()
}

fn publish_both(
    internal: &crate::upstream::Registry,
    public: &crate::upstream::Registry,
) -> (Published, Published) {
    (
        internal.publish("acme/secret", "1.0.0", &[]),
        public.publish("alice/pub", "1.0.0", &[]),
    )
}

#[tokio::test]
async fn a_private_source_gets_its_token_and_no_one_else_does() {
    let requires = format!("Bearer {TOKEN}");
    let (s, (secret, public)) = setup_two_sources(
        "",
        "auth = { bearer_env = \"INTERNAL_TOKEN\" }",
        Some(&requires),
        &[("INTERNAL_TOKEN", TOKEN)],
        publish_both,
    )
    .await;
    both_mirrors(&s.gateway).await;

    // The internal index was cloned with the token: git sent it on every request.
    let git_auth: Vec<_> = s
        .internal
        .authorizations()
        .into_iter()
        .filter(|(path, _)| path.starts_with("/git/"))
        .collect();
    assert!(!git_auth.is_empty(), "the internal index was never fetched");
    for (path, auth) in &git_auth {
        assert_eq!(auth.as_deref(), Some(requires.as_str()), "{path}");
    }

    // Only the internal source lists acme/secret: fetched with the token, verified.
    fetch_miss_then_hit(&s.gateway, &secret, "internal archive");
    fetch_miss_then_hit(&s.gateway, &public, "public archive");
    let archive_auth: Vec<_> = s
        .internal
        .authorizations()
        .into_iter()
        .filter(|(path, _)| path.starts_with("/user/"))
        .collect();
    assert_eq!(archive_auth.len(), 1, "{archive_auth:?}");
    assert_eq!(archive_auth[0].1.as_deref(), Some(requires.as_str()));

    // A client's own request passed through carries no credential of the gateway's:
    // the internal registry (the endpoint's first source) refuses it.
    let (status, _, _) = get(&s.gateway, "/api/v0/whoami", &[]);
    assert_eq!(status, "401");
    let api: Vec<_> = s
        .internal
        .authorizations()
        .into_iter()
        .filter(|(path, _)| path.starts_with("/api/"))
        .collect();
    assert_eq!(api, vec![("/api/v0/whoami".to_string(), None)]);

    // The public source never saw an Authorization header at all.
    let public_seen = s.public.authorizations();
    assert!(!public_seen.is_empty());
    assert!(
        public_seen.iter().all(|(_, auth)| auth.is_none()),
        "{public_seen:?}"
    );

    // The token is nowhere: not in the log, not in any file of the data dir (the
    // mirror's git config included), not in /-/health.
    assert!(!s.gateway.log().contains(TOKEN), "the log holds the token");
    let leaked = files_containing(&s.gateway.data_dir, TOKEN.as_bytes());
    assert!(leaked.is_empty(), "the token was written to {leaked:?}");
    let h = health(&s.gateway);
    assert!(!h.to_string().contains(TOKEN));
    assert!(
        entry(&h, "sources", "internal")["auth_error"].is_null(),
        "{h}"
    );
}

#[tokio::test]
async fn a_refused_credential_is_a_clear_error_and_public_sources_still_work() {
    use base64::Engine;
    let right = base64::engine::general_purpose::STANDARD.encode("ci:right-password");
    let requires = format!("Basic {right}");
    let (s, (secret, public)) = setup_two_sources(
        "",
        "auth = { basic_env = \"INTERNAL_AUTH\" }",
        Some(&requires),
        &[("INTERNAL_AUTH", "ci:wrong-password")],
        publish_both,
    )
    .await;

    // The clone is refused: /-/health names the source, the variable and the 401,
    // and the index entry shows the failed refresh; the source is not "down".
    let h = health_until(&s.gateway, "reported the refused clone", |h| {
        entry(h, "sources", "internal")["auth_error"].is_string()
            && entry(h, "index", "public")["commit"].is_string()
    })
    .await;
    let internal = entry(&h, "sources", "internal");
    let auth_error = internal["auth_error"].as_str().unwrap();
    assert!(
        auth_error.contains("source `internal` refused the gateway's credentials ($INTERNAL_AUTH)"),
        "{auth_error}"
    );
    assert_eq!(internal["state"], "up", "{h}");
    let index = entry(&h, "index", "internal");
    assert!(index["commit"].is_null(), "{h}");
    assert!(index["last_error"].is_string(), "{h}");
    assert!(
        entry(&h, "sources", "public")["auth_error"].is_null(),
        "{h}"
    );

    // The log says it the same way.
    let log = s.gateway.log();
    assert!(
        log.contains("source `internal` refused the gateway's credentials ($INTERNAL_AUTH)"),
        "{log}"
    );

    // Public archives still work.
    fetch_miss_then_hit(&s.gateway, &public, "public archive");

    // An archive from the internal source is refused by it: an HTTP refusal, and
    // the source's auth error is the archive's 401 now.
    let (status, _, _) = get(&s.gateway, &format!("/user/{}.zip", secret.segment), &[]);
    assert_ne!(status, "200");
    let h = health(&s.gateway);
    let auth_error = entry(&h, "sources", "internal")["auth_error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(auth_error.contains("401"), "{auth_error}");

    // Nothing of either password reached the log or the data dir.
    for secret in [
        "wrong-password",
        &base64::engine::general_purpose::STANDARD.encode("ci:wrong-password"),
    ] {
        assert!(!s.gateway.log().contains(secret), "the log holds {secret}");
        let leaked = files_containing(&s.gateway.data_dir, secret.as_bytes());
        assert!(leaked.is_empty(), "{secret} was written to {leaked:?}");
    }
}

/// A gateway in front of two sources, each with a symbols.zip of its own.
async fn two_symbol_sources(extra_toml: &str) -> TwoSourcesGateway {
    let requires = format!("Bearer {TOKEN}");
    let (s, ()) = setup_two_sources(
        extra_toml,
        "auth = { bearer_env = \"INTERNAL_TOKEN\" }",
        Some(&requires),
        &[("INTERNAL_TOKEN", TOKEN)],
        |internal, public| {
            internal.publish("acme/secret", "1.0.0", &[]);
            public.publish("alice/pub", "1.0.0", &[]);
            internal.set_symbols(zip_of(&[
                ("acme/secret.json", b"internal symbols v1".as_slice()),
                ("shared.json", b"from internal".as_slice()),
            ]));
            public.set_symbols(zip_of(&[
                ("alice/pub.json", b"public symbols v1".as_slice()),
                ("shared.json", b"from public".as_slice()),
                ("dir/", b"".as_slice()),
            ]));
        },
    )
    .await;
    s
}

/// The entries of a zip: (name, contents).
fn entries(zip: &[u8]) -> Vec<(String, Vec<u8>)> {
    use std::io::Read;
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(zip.to_vec())).expect("a zip");
    (0..archive.len())
        .map(|i| {
            let mut f = archive.by_index(i).unwrap();
            let mut out = Vec::new();
            f.read_to_end(&mut out).unwrap();
            (f.name().to_string(), out)
        })
        .collect()
}

fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        (n.trim() == name).then(|| v.trim().to_string())
    })
}

#[tokio::test]
async fn symbols_zip_is_merged_from_every_source() {
    let mut s = two_symbol_sources("").await;
    let (status, head, body) = get(&s.gateway, "/symbols.zip", &[]);
    assert_eq!(status, "200", "{head}");
    let mut got = entries(&body);
    got.sort();
    assert_eq!(
        got,
        vec![
            (
                "acme/secret.json".to_string(),
                b"internal symbols v1".to_vec()
            ),
            ("alice/pub.json".to_string(), b"public symbols v1".to_vec()),
            ("dir/".to_string(), Vec::new()),
            // The first source wins on a shared path.
            ("shared.json".to_string(), b"from internal".to_vec()),
        ]
    );
    let etag = header(&head, "etag").expect("an ETag");
    assert!(
        etag.starts_with('"') && etag.ends_with('"'),
        "strong: {etag}"
    );
    // The internal part was fetched with the token, the public one without.
    let symbols_auth = |up: &crate::upstream::Upstream| -> Vec<Option<String>> {
        up.authorizations()
            .into_iter()
            .filter(|(p, _)| p == "/symbols.zip")
            .map(|(_, a)| a)
            .collect()
    };
    assert_eq!(
        symbols_auth(&s.internal),
        vec![Some(format!("Bearer {TOKEN}"))]
    );
    assert_eq!(symbols_auth(&s.public), vec![None]);

    // Stable, and a 304 for it.
    let (status, again, body2) = get(&s.gateway, "/symbols.zip", &[]);
    assert_eq!(status, "200");
    assert_eq!(header(&again, "etag").as_deref(), Some(etag.as_str()));
    assert_eq!(body2, body, "the same parts give the same bytes");
    let (status, _, body) = get(
        &s.gateway,
        "/symbols.zip",
        &[&format!("If-None-Match: {etag}")],
    );
    assert_eq!(status, "304");
    assert!(body.is_empty());

    // One part changes: a new combined zip, a new ETag.
    s.public.registry.set_symbols(zip_of(&[
        ("alice/pub.json", b"public symbols v2".as_slice()),
        ("alice/more.json", b"new".as_slice()),
    ]));
    let (status, head, body) = get(
        &s.gateway,
        "/symbols.zip",
        &[&format!("If-None-Match: {etag}")],
    );
    assert_eq!(status, "200", "{head}");
    let etag2 = header(&head, "etag").unwrap();
    assert_ne!(etag2, etag);
    let mut got = entries(&body);
    got.sort();
    let names: Vec<_> = got.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "acme/secret.json",
            "alice/more.json",
            "alice/pub.json",
            "shared.json"
        ]
    );
    assert!(got.contains(&("alice/pub.json".to_string(), b"public symbols v2".to_vec())));
    assert!(got.contains(&("shared.json".to_string(), b"from internal".to_vec())));

    // One source failing: its stored part stands in, and a change of the other
    // still shows.
    s.internal.set_fault(Fault::Status(503));
    s.public.registry.set_symbols(zip_of(&[(
        "alice/pub.json",
        b"public symbols v3".as_slice(),
    )]));
    let (status, head, v3) = get(&s.gateway, "/symbols.zip", &[]);
    assert_eq!(status, "200", "{head}");
    assert_eq!(header(&head, "x-cache").as_deref(), Some("stale"), "{head}");
    let mut got = entries(&v3);
    got.sort();
    assert_eq!(
        got,
        vec![
            (
                "acme/secret.json".to_string(),
                b"internal symbols v1".to_vec()
            ),
            ("alice/pub.json".to_string(), b"public symbols v3".to_vec()),
            ("shared.json".to_string(), b"from internal".to_vec()),
        ]
    );
    let etag3 = header(&head, "etag").unwrap();
    assert_ne!(etag3, etag2);
    // Back to the v2 parts for what follows.
    s.internal.set_fault(Fault::None);
    s.public.registry.set_symbols(zip_of(&[
        ("alice/pub.json", b"public symbols v2".as_slice()),
        ("alice/more.json", b"new".as_slice()),
    ]));
    let (_, head, _) = get(&s.gateway, "/symbols.zip", &[]);
    assert_eq!(header(&head, "etag").as_deref(), Some(etag2.as_str()));

    // Both upstreams gone: the stored parts still make the same zip.
    s.internal.stop().await;
    s.public.stop().await;
    let (status, head, stale) = get(&s.gateway, "/symbols.zip", &[]);
    assert_eq!(status, "200", "{head}");
    assert_eq!(header(&head, "etag").as_deref(), Some(etag2.as_str()));
    assert_eq!(stale, body);

    // And after a restart, with both still gone.
    s.gateway.kill();
    s.restart_gateway().await;
    let (status, head, again) = get(&s.gateway, "/symbols.zip", &[]);
    assert_eq!(status, "200", "{head} {}", String::from_utf8_lossy(&again));
    assert_eq!(header(&head, "etag").as_deref(), Some(etag2.as_str()));
    assert_eq!(again, body);
    let (status, _, _) = get(
        &s.gateway,
        "/symbols.zip",
        &[&format!("If-None-Match: {etag2}")],
    );
    assert_eq!(status, "304");
}

#[tokio::test]
async fn the_last_merged_zip_is_served_when_no_part_is() {
    let s = two_symbol_sources("[mutable]\nstale_if_error = \"1s\"").await;
    let (status, head, body) = get(&s.gateway, "/symbols.zip", &[]);
    assert_eq!(status, "200", "{head}");
    let etag = header(&head, "etag").unwrap();
    // Both sources gone, and their stored parts too old to stand in for them.
    s.internal.stop().await;
    s.public.stop().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, head, again) = get(&s.gateway, "/symbols.zip", &[]);
    assert_eq!(status, "200", "{head}");
    assert_eq!(header(&head, "etag").as_deref(), Some(etag.as_str()));
    assert_eq!(header(&head, "x-cache").as_deref(), Some("stale"));
    assert!(
        header(&head, "warning").is_some_and(|w| w.starts_with("111")),
        "{head}"
    );
    assert_eq!(again, body);
    let (status, _, _) = get(
        &s.gateway,
        "/symbols.zip",
        &[&format!("If-None-Match: {etag}")],
    );
    assert_eq!(status, "304");
}

#[tokio::test]
async fn a_source_without_symbols_contributes_nothing() {
    // The internal source's symbols URL is one its registry answers 404 for.
    let requires = format!("Bearer {TOKEN}");
    let (s, ()) = setup_two_sources(
        "",
        "auth = { bearer_env = \"INTERNAL_TOKEN\" }\nsymbols = \"{internal}/no-symbols.zip\"",
        Some(&requires),
        &[("INTERNAL_TOKEN", TOKEN)],
        |_, public| {
            public.set_symbols(zip_of(&[("alice/pub.json", b"public".as_slice())]));
        },
    )
    .await;
    let (status, head, body) = get(&s.gateway, "/symbols.zip", &[]);
    assert_eq!(status, "200", "{head}");
    assert_eq!(
        entries(&body),
        vec![("alice/pub.json".to_string(), b"public".to_vec())]
    );
    let etag = header(&head, "etag").expect("an ETag");
    let (status, _, _) = get(
        &s.gateway,
        "/symbols.zip",
        &[&format!("If-None-Match: {etag}")],
    );
    assert_eq!(status, "304");
    // It was asked, with the internal source's token.
    let asked: Vec<_> = s
        .internal
        .authorizations()
        .into_iter()
        .filter(|(p, _)| p == "/no-symbols.zip")
        .collect();
    assert!(!asked.is_empty());
    assert!(asked
        .iter()
        .all(|(_, a)| a.as_deref() == Some(requires.as_str())));
}

#[tokio::test]
async fn moon_update_succeeds_with_two_sources() {
    let Some(bin) = moon_bin() else {
        eprintln!("skipped: no moon client (set MOON_BIN)");
        return;
    };
    let s = two_symbol_sources("").await;
    both_mirrors(&s.gateway).await;
    let work = tempfile::tempdir().unwrap();
    let home = work.path().join("moon-home");
    let cwd = work.path().join("work");
    let gw = s.gateway.url();
    let proj = moon_project(&bin, &home, &cwd, &gw);
    let update = moon(&bin, &home, &proj, &gw, &["update"]);
    ok(&update, "moon update");
    let stderr = String::from_utf8_lossy(&update.stderr);
    assert!(!stderr.contains("failed to update symbols"), "{stderr}");
    // moon unpacked the merged zip: entries of both sources.
    let symbols = home.join("registry").join("symbols");
    assert!(
        symbols.join("acme/secret.json").is_file(),
        "{}",
        symbols.display()
    );
    assert!(symbols.join("alice/pub.json").is_file());
    assert_eq!(
        std::fs::read(symbols.join("shared.json")).unwrap(),
        b"from internal"
    );
}
