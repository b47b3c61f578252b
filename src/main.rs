//! The `moonbit-registry` command line: `serve` runs the gateway; `warm`,
//! `export`, `import`, `keygen` and `cache` prepare and look after its store;
//! `publish` adds a module version to a local source (each command's logic lives
//! in its own module).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use bytesize::ByteSize;
use clap::{Parser, Subcommand};
use moonbit_registry::app::{Mode, Services};
use moonbit_registry::ca_bundle::write_ca_bundle;
use moonbit_registry::config::{Config, LogFormat, Overrides};
use moonbit_registry::index::selection::{Pattern, Selection};
use moonbit_registry::intercept::load_ca;
use moonbit_registry::ops::jobs::JobId;

/// jemalloc: size-class slabs, so the buffers of a connection that went idle
/// (see `doors::keep_alive`) free whole pages, which glibc's heap keeps as holes.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read at start: freed pages go back to the system within
/// about a second, by a background thread, not only on the next allocation.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] =
    b"background_thread:true,max_background_threads:1,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// Called as a worker thread goes idle: hand memory back, at most once a second.
/// jemalloc trims a thread's cache only as the thread allocates, and its
/// background thread leaves a few MiB of freed pages unpurged when there are few
/// of them. So after a burst (1,000 connections served, then idle) the freed
/// buffers would stay resident, 1.5 KiB per connection gone, for as long as the
/// gateway stays idle. Purging costs a few madvise calls a second at most.
fn return_idle_memory() {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(1);
    thread_local!(static LAST: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) });
    let now = std::time::Instant::now();
    if LAST.get().is_some_and(|last| now - last < EVERY) {
        return;
    }
    LAST.set(Some(now));
    for control in [c"thread.tcache.flush", c"arena.4096.purge"] {
        // SAFETY: documented jemalloc controls that take and return nothing
        // (4096 is MALLCTL_ARENAS_ALL).
        unsafe {
            tikv_jemalloc_sys::mallctl(
                control.as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            );
        }
    }
}

/// A caching gateway for the MoonBit package registry (mooncakes.io).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the registry endpoint (point MOONCAKES_REGISTRY at it).
    Serve(ServeArgs),
    /// Refresh the index and download selected archives ahead of time.
    Warm(WarmArgs),
    /// Write the index and selected archives to one file for an air-gapped machine.
    Export(ExportArgs),
    /// Verify a bundle written by `export` and add it to the store and index mirror.
    Import(ImportArgs),
    /// Make an ed25519 key pair for signing bundles (FILE and FILE.pub).
    Keygen {
        /// Private key file to create (mode 0600); the public key goes to FILE.pub
        #[arg(value_name = "FILE")]
        out: PathBuf,
    },
    /// Look after the store: list, verify, collect garbage.
    Cache(CacheArgs),
    /// Publish a module version to a local source (`local = true`): PATH is a
    /// module directory (with moon.mod.json) or a zip made by `moon package`.
    Publish {
        /// Module directory or zip
        #[arg(value_name = "PATH")]
        path: PathBuf,
        /// Local source to publish to [default: the first local source]
        #[arg(long, value_name = "NAME")]
        source: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Print the path of the interception CA certificate (creating the CA if needed).
    Ca {
        /// Print the certificate itself (PEM) instead of its path.
        #[arg(long)]
        pem: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Print shell exports that make a CI job use the gateway as its proxy:
    /// eval "$(moonbit-registry env)"
    Env {
        /// Proxy URL to export [default: from the listen address]
        #[arg(long, value_name = "URL")]
        proxy: Option<String>,
        /// Address the gateway listens on [default: 127.0.0.1:8080; env MOONBIT_REGISTRY_LISTEN]
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// Export MOONCAKES_REGISTRY (the registry endpoint, with server.auth
        /// credentials if set) instead of the proxy variables
        #[arg(long)]
        registry: bool,
        /// CI job id the exports carry (registry path `/job/ID/`, proxy user name)
        /// [default: from GITHUB_RUN_ID+GITHUB_JOB, CI_JOB_ID or BUILDKITE_JOB_ID]
        #[arg(long, value_name = "ID")]
        job: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Print what the running gateway did for one CI job (GET /-/jobs/ID).
    Report {
        /// The job [default: MOONBIT_CI_JOB, set by `env`, or the CI variables]
        #[arg(long, value_name = "ID")]
        job: Option<String>,
        /// Address the gateway listens on [default: 127.0.0.1:8080; env MOONBIT_REGISTRY_LISTEN]
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// Print the gateway's JSON as it is
        #[arg(long, conflicts_with = "markdown")]
        json: bool,
        /// Print a Markdown table (for $GITHUB_STEP_SUMMARY)
        #[arg(long)]
        markdown: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Internal: git's uploadpack.packObjectsHook, run by the index mirror.
    #[command(name = "pack-objects-cache", hide = true)]
    PackObjectsCache {
        dir: PathBuf,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
}

/// Where the data dir and the upstream are, for every command but `keygen`.
#[derive(clap::Args)]
struct Common {
    /// Where the store lives [default: the platform cache dir; env MOONBIT_REGISTRY_DATA_DIR]
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// TOML config file [default: ./moonbit-registry.toml if present]
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Registry base URL of the default source [default: https://mooncakes.io]
    #[arg(long, global = true, value_name = "URL")]
    upstream: Option<String>,
    /// Extra CA certificate (PEM) to trust for upstream TLS, on top of the system roots
    #[arg(long, global = true, value_name = "FILE")]
    upstream_ca: Option<PathBuf>,
}

impl Common {
    fn load(self) -> anyhow::Result<Config> {
        let overrides = Overrides {
            data_dir: self.data_dir,
            upstream: self.upstream,
            upstream_ca: self.upstream_ca,
            ..Overrides::default()
        };
        Config::load(self.config.as_deref(), overrides)
    }
}

/// Which module versions to act on.
#[derive(clap::Args)]
struct SelectArgs {
    /// alice/*, alice/json, alice/json@0.3.1, alice/json@^0.3
    #[arg(value_name = "PATTERN")]
    patterns: Vec<String>,
    /// Only the newest selected version of each module
    #[arg(long)]
    latest: bool,
    /// The dependencies of this moon.mod.json, transitively
    #[arg(long, value_name = "FILE")]
    from: Option<PathBuf>,
    /// Downloads at once
    #[arg(long, value_name = "N", default_value_t = moonbit_registry::warm::DEFAULT_JOBS)]
    jobs: usize,
}

impl SelectArgs {
    fn selection(&self) -> anyhow::Result<Selection> {
        Ok(Selection {
            patterns: self
                .patterns
                .iter()
                .map(|p| Pattern::parse(p))
                .collect::<anyhow::Result<_>>()?,
            latest: self.latest,
            from: self
                .from
                .as_deref()
                .map(moonbit_registry::warm::check_from)
                .transpose()?,
        })
    }
}

#[derive(clap::Args)]
struct WarmArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    select: SelectArgs,
    /// List what would be fetched, and its size if known; download nothing
    #[arg(long)]
    dry_run: bool,
}

#[derive(clap::Args)]
struct ExportArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    select: SelectArgs,
    /// The bundle file to write
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Sign the bundle with this ed25519 private key (from `keygen`)
    #[arg(long, value_name = "KEY")]
    sign_key: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ImportArgs {
    #[command(flatten)]
    common: Common,
    /// The bundle written by `export`
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Accept only bundles signed by this ed25519 public key (KEY.pub from `keygen`)
    #[arg(long, value_name = "PUBKEY")]
    trust_key: Option<PathBuf>,
}

#[derive(clap::Args)]
struct CacheArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    action: CacheAction,
}

#[derive(Subcommand)]
enum CacheAction {
    /// Module, version, size and last use of every stored entry
    List {
        #[arg(long)]
        json: bool,
        /// List the shared tier (`[storage.shared]`) instead of the local store
        #[arg(long)]
        shared: bool,
    },
    /// Re-hash every entry; corrupt ones are reported and removed (exit status 1)
    Verify {
        /// Verify the shared tier (`[storage.shared]`) instead of the local store
        #[arg(long)]
        shared: bool,
    },
    /// Evict least recently used entries until the store fits in SIZE
    Gc {
        /// e.g. "2 GiB", "500MB"
        #[arg(long, value_name = "SIZE")]
        max_size: ByteSize,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Log lines as `text` or `json` (one object per line) [default: log.format, text]
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    /// Address to listen on [default: 127.0.0.1:8080; env MOONBIT_REGISTRY_LISTEN]
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Where the store lives [default: the platform cache dir; env MOONBIT_REGISTRY_DATA_DIR]
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// TOML config file [default: ./moonbit-registry.toml if present]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Registry base URL of the default source [default: https://mooncakes.io]
    #[arg(long, value_name = "URL")]
    upstream: Option<String>,
    /// Extra CA certificate (PEM) to trust for upstream TLS, on top of the system roots
    #[arg(long, value_name = "FILE")]
    upstream_ca: Option<PathBuf>,
    /// Never contact an upstream: index from the mirror, archives from the store
    #[arg(long)]
    offline: bool,
    /// Also accept TLS redirected by the network (transparent gateway) on ADDR
    #[arg(long, value_name = "ADDR")]
    transparent_listen: Option<SocketAddr>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `serve` reads its log format from its config, so it starts the log itself.
    let _log_guard = match &cli.command {
        Command::Serve(_) => None,
        _ => Some(moonbit_registry::ops::log::init(LogFormat::Text)),
    };
    let result = match cli.command {
        Command::PackObjectsCache { dir, command } => {
            return moonbit_registry::index::pack_cache::run(&dir, &command)
        }
        Command::Serve(args) => serve(args).map(|()| true),
        Command::Warm(args) => warm(args),
        Command::Export(args) => export(args),
        Command::Import(args) => import(args),
        Command::Keygen { out } => keygen(&out),
        Command::Cache(args) => cache(args),
        Command::Publish {
            path,
            source,
            common,
        } => publish(&path, source.as_deref(), common),
        Command::Ca { pem, common } => ca(pem, common).map(|()| true),
        Command::Env {
            proxy,
            listen,
            registry,
            job,
            common,
        } => env(proxy, listen, registry, job, common).map(|()| true),
        Command::Report {
            job,
            listen,
            json,
            markdown,
            common,
        } => report(job, listen, json, markdown, common).map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        // The command printed what failed.
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            // One line, with every cause, e.g. "could not listen on ...: Address in use".
            eprintln!("moonbit-registry: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        listen: args.listen,
        data_dir: args.data_dir,
        upstream: args.upstream,
        upstream_ca: args.upstream_ca,
        offline: args.offline.then_some(true),
        transparent_listen: args.transparent_listen,
    };
    let mut config = Config::load(args.config.as_deref(), overrides)?;
    if let Some(format) = args.log_format {
        config.log.format = format;
    }
    let _log_guard = moonbit_registry::ops::log::init(config.log.format);
    let mode = if config.offline {
        Mode::Offline
    } else {
        Mode::Serve
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(return_idle_memory)
        .build()?;
    runtime.block_on(async {
        let app = Services::open(&config, mode)?;
        moonbit_registry::doors::listener::serve(std::sync::Arc::new(app)).await
    })
}

/// Run a command to its end, or stop it on Ctrl-C / SIGTERM: what was committed
/// stays, what was in flight is dropped (nothing half-written becomes visible).
fn interruptible(
    work: impl std::future::Future<Output = anyhow::Result<bool>>,
) -> anyhow::Result<bool> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = work => r,
            _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; completed downloads are kept, run it again to resume"),
            _ = term.recv() => anyhow::bail!("terminated; completed downloads are kept, run it again to resume"),
        }
    })
}

fn warm(args: WarmArgs) -> anyhow::Result<bool> {
    let selection = args.select.selection()?;
    let config = args.common.load()?;
    interruptible(moonbit_registry::warm::run(
        config,
        selection,
        args.select.jobs,
        args.dry_run,
    ))
}

fn export(args: ExportArgs) -> anyhow::Result<bool> {
    let selection = args.select.selection()?;
    let out = moonbit_registry::bundle::export::check_out(&args.out)?;
    let config = args.common.load()?;
    interruptible(moonbit_registry::bundle::export::run(
        config,
        selection,
        args.select.jobs,
        &out,
        args.sign_key.as_deref(),
    ))
}

fn import(args: ImportArgs) -> anyhow::Result<bool> {
    let config = args.common.load()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(moonbit_registry::bundle::import::run(
        config,
        &args.file,
        args.trust_key.as_deref(),
    ))?;
    Ok(true)
}

fn keygen(out: &std::path::Path) -> anyhow::Result<bool> {
    let public = moonbit_registry::bundle::signing::keygen(out)?;
    println!("private key: {} (keep it secret)", out.display());
    println!(
        "public key:  {} (give it to importers: --trust-key)",
        public.display()
    );
    Ok(true)
}

fn publish(path: &std::path::Path, source: Option<&str>, common: Common) -> anyhow::Result<bool> {
    let config = common.load()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let published = runtime.block_on(async {
        let app = Services::open(&config, Mode::Command)?;
        moonbit_registry::publish::run(&app, path, source).await
    })?;
    println!("{}", serde_json::to_string(&published)?);
    Ok(true)
}

fn cache(args: CacheArgs) -> anyhow::Result<bool> {
    let config = args.common.load()?;
    let store_dir = config.data_dir.join("store");
    if !store_dir.is_dir() {
        anyhow::bail!("no store at {}", store_dir.display());
    }
    // Opened like every command's, though only the store's directory is used.
    let runtime = tokio::runtime::Runtime::new()?;
    let _guard = runtime.enter();
    let app = Services::open(&config, Mode::Command)?;
    let store_dir = app.store.disk().dir().to_path_buf();
    let shared = || {
        app.store
            .shared()
            .cloned()
            .context("--shared needs a shared tier: set [storage.shared] url")
    };
    Ok(match args.action {
        CacheAction::List { json, shared: true } => {
            runtime.block_on(moonbit_registry::cache_admin::list_shared(
                &*shared()?,
                json,
            ))?;
            true
        }
        CacheAction::List { json, .. } => {
            moonbit_registry::cache_admin::list(&store_dir, json);
            true
        }
        CacheAction::Verify { shared: true } => {
            runtime.block_on(moonbit_registry::cache_admin::verify_shared(&*shared()?))? == 0
        }
        CacheAction::Verify { .. } => moonbit_registry::cache_admin::verify(&store_dir) == 0,
        CacheAction::Gc { max_size } => {
            moonbit_registry::cache_admin::gc(&store_dir, max_size.as_u64());
            true
        }
    })
}

fn ca(pem: bool, common: Common) -> anyhow::Result<()> {
    let config = common.load()?;
    let ca = load_ca(&config, &config.sources()?, true)?;
    if pem {
        print!("{}", ca.cert_pem);
    } else {
        println!("{}", ca.files.cert.display());
    }
    Ok(())
}

/// The job id of the CI job this runs in, from the variables CI systems set.
fn ci_job() -> Option<String> {
    let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
    match (var("GITHUB_RUN_ID"), var("GITHUB_JOB")) {
        (Some(run), Some(job)) => return Some(format!("{run}-{job}")),
        (Some(run), None) => return Some(run),
        _ => {}
    }
    var("CI_JOB_ID").or_else(|| var("BUILDKITE_JOB_ID"))
}

/// The address clients on this machine reach the gateway at.
fn local_addr(config: &mut Config, listen: Option<SocketAddr>) -> SocketAddr {
    if let Some(listen) = listen {
        config.listen = listen;
    }
    // A wildcard listen address is reachable on loopback from this machine.
    let mut addr = config.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    addr
}

fn env(
    proxy: Option<String>,
    listen: Option<SocketAddr>,
    registry: bool,
    job: Option<String>,
    common: Common,
) -> anyhow::Result<()> {
    let mut config = common.load()?;
    let addr = local_addr(&mut config, listen);
    let job = match job.or_else(ci_job) {
        Some(raw) => Some(
            JobId::parse(&raw)
                .map_err(|e| anyhow::anyhow!("--job: {e}"))?
                .as_str()
                .to_string(),
        ),
        None => None,
    };
    if let Some(job) = &job {
        // `report` finds the job here. Not a MOONBIT_REGISTRY_* name: those are
        // configuration keys, and an unknown one stops every command.
        println!("export MOONBIT_CI_JOB={}", shell_quote(job));
    }
    if registry {
        let mut url = with_credentials(config.server.auth.as_deref(), addr);
        if let Some(job) = &job {
            url = format!("{url}/job/{job}");
        }
        println!("export MOONCAKES_REGISTRY={}", shell_quote(&url));
        return Ok(());
    }
    let ca = load_ca(&config, &config.sources()?, true)?;
    let bundle = config.data_dir.join("ca").join("bundle.pem");
    write_ca_bundle(&ca.files.cert, &bundle)?;
    let proxy = proxy.unwrap_or_else(|| match (&config.proxy.auth, &job) {
        // The proxy user name carries the job when the gateway wants no credentials.
        // The empty password matters: given a user name alone, git asks for one
        // (and fails without a terminal).
        (None, Some(job)) => format!("http://{job}:@{addr}"),
        (auth, _) => with_credentials(auth.as_deref(), addr),
    });
    if config.proxy.auth.is_some() && job.is_some() {
        eprintln!("moonbit-registry env: proxy.auth is set, so the proxy URL cannot carry the job; use --registry for a per-job report");
    }
    let bundle = bundle.display().to_string();
    // moon and curl read the upper-case proxy variables, git the lower-case ones.
    for (name, value) in [
        ("HTTPS_PROXY", &proxy),
        ("https_proxy", &proxy),
        ("HTTP_PROXY", &proxy),
        ("http_proxy", &proxy),
        ("SSL_CERT_FILE", &bundle),
        ("GIT_SSL_CAINFO", &bundle),
    ] {
        println!("export {name}={}", shell_quote(value));
    }
    Ok(())
}

/// `report`: ask the running gateway for a job's counters and print them.
fn report(
    job: Option<String>,
    listen: Option<SocketAddr>,
    json: bool,
    markdown: bool,
    common: Common,
) -> anyhow::Result<()> {
    let mut config = common.load()?;
    let addr = local_addr(&mut config, listen);
    let raw = job
        .or_else(|| std::env::var("MOONBIT_CI_JOB").ok())
        .or_else(ci_job)
        .context(
            "no job: give --job ID (or run in CI, or after `eval \"$(moonbit-registry env)\"`)",
        )?;
    let job = JobId::parse(&raw).map_err(|e| anyhow::anyhow!("--job: {e}"))?;
    let token = match &config.admin.token_env {
        Some(var) => Some(
            std::env::var(var)
                .with_context(|| format!("admin.token_env names `{var}`, which is not set"))?,
        ),
        None => None,
    };
    let url = format!("http://{addr}/-/jobs/{}", job.as_str());
    let runtime = tokio::runtime::Runtime::new()?;
    let (status, body) = runtime.block_on(async {
        let upstream = moonbit_registry::upstream::Upstream::new(None, config.timeouts.clone())?;
        let mut req = http::Request::get(&url);
        if let Some(token) = token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req.body(moonbit_registry::body::empty())?;
        let resp = upstream
            .send(req)
            .await
            .with_context(|| format!("could not ask the gateway at {addr}"))?;
        let status = resp.status();
        let body = moonbit_registry::upstream::collect_limited(
            resp.into_body(),
            64 * 1024,
            std::time::Duration::from_secs(10),
        )
        .await;
        anyhow::Ok((status, body))
    })?;
    let text = String::from_utf8_lossy(&body);
    if !status.is_success() {
        anyhow::bail!("{url}: {status}: {}", text.trim());
    }
    if json {
        println!("{}", text.trim());
        return Ok(());
    }
    let v: serde_json::Value =
        serde_json::from_str(&text).context("the gateway's report is not JSON")?;
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    let upstream_bytes = ByteSize(n("bytes_from_upstream"))
        .display()
        .iec()
        .to_string();
    let served = ByteSize(n("bytes_served")).display().iec().to_string();
    let wait = v["upstream_wait_seconds"].as_f64().unwrap_or(0.0);
    if markdown {
        println!("### moonbit-registry: job `{}`\n", job.as_str());
        println!("| | |\n| --- | --- |");
        println!("| archives | {} |", n("archives"));
        println!("| archives from cache | {} |", n("archives_from_cache"));
        println!("| modules fetched cold | {} |", n("modules_fetched_cold"));
        println!(
            "| requests | {} ({} hits, {} misses, {} errors) |",
            n("requests"),
            n("hits"),
            n("misses"),
            n("errors")
        );
        println!("| from the upstream | {upstream_bytes} |");
        println!("| served | {served} |");
        println!("| waiting on the upstream | {wait:.1} s |");
    } else {
        println!(
            "this job: {} archives, {} from cache, {upstream_bytes} from the upstream, {} cold; {} requests, {served} served, {wait:.1} s waiting on the upstream, {} errors",
            n("archives"),
            n("archives_from_cache"),
            n("modules_fetched_cold"),
            n("requests"),
            n("errors"),
        );
    }
    Ok(())
}

/// `http://[user:password@]addr`, the credentials (`user:password`) URL-encoded.
fn with_credentials(auth: Option<&str>, addr: SocketAddr) -> String {
    match auth {
        Some(auth) => {
            let (user, pass) = auth.split_once(':').unwrap_or((auth, ""));
            let enc =
                |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            format!("http://{}:{}@{addr}", enc(user), enc(pass))
        }
        None => format!("http://{addr}"),
    }
}

/// Single-quote for POSIX shells.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}
