//! The `moonbit-registry` command line: `serve` runs the gateway.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use moonbit_registry::config::{Config, Overrides};
use moonbit_registry::server::load_ca;
use moonbit_registry::trust::write_ca_bundle;
use tracing_subscriber::EnvFilter;

/// A caching gateway for the MoonBit package registry (mooncakes.io).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the registry endpoint (MOONCAKES_REGISTRY=http://ADDR) and the forward
    /// proxy (HTTPS_PROXY=http://ADDR) on one listener.
    Serve(ServeArgs),
    /// Print the path of the interception CA certificate (creating the CA if needed).
    Ca {
        /// Print the certificate itself (PEM) instead of its path.
        #[arg(long)]
        pem: bool,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Print shell exports that make a CI job use the gateway as its proxy:
    /// eval "$(moonbit-registry env)"
    Env {
        /// Proxy URL to export [default: from the listen address]
        #[arg(long, value_name = "URL")]
        proxy: Option<String>,
        #[command(flatten)]
        common: CommonArgs,
    },
}

/// Options every subcommand that reads the configuration takes.
#[derive(clap::Args)]
struct CommonArgs {
    /// Where the store and the CA live [default: the platform cache dir; env MOONBIT_REGISTRY_DATA_DIR]
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// TOML config file [default: ./moonbit-registry.toml if present]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address the gateway listens on [default: 127.0.0.1:8080; env MOONBIT_REGISTRY_LISTEN]
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
}

impl CommonArgs {
    fn load(self) -> anyhow::Result<Config> {
        let overrides = Overrides {
            listen: self.listen,
            data_dir: self.data_dir,
            ..Overrides::default()
        };
        Config::load(self.config.as_deref(), overrides)
    }
}

#[derive(clap::Args)]
struct ServeArgs {
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
    /// Also accept TLS redirected by the network (transparent gateway) on ADDR
    #[arg(long, value_name = "ADDR")]
    transparent_listen: Option<SocketAddr>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("moonbit_registry=info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Ca { pem, common } => ca(pem, common),
        Command::Env { proxy, common } => env(proxy, common),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
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
        transparent_listen: args.transparent_listen,
    };
    let config = Config::load(args.config.as_deref(), overrides)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(moonbit_registry::server::serve(config))
}

fn ca(pem: bool, common: CommonArgs) -> anyhow::Result<()> {
    let config = common.load()?;
    let ca = load_ca(&config, &config.sources()?, true)?;
    if pem {
        print!("{}", ca.cert_pem);
    } else {
        println!("{}", ca.files.cert.display());
    }
    Ok(())
}

fn env(proxy: Option<String>, common: CommonArgs) -> anyhow::Result<()> {
    let config = common.load()?;
    let ca = load_ca(&config, &config.sources()?, true)?;
    let bundle = config.data_dir.join("ca").join("bundle.pem");
    write_ca_bundle(&ca.files.cert, &bundle)?;
    let proxy = match proxy {
        Some(url) => url,
        None => {
            // A wildcard listen address is reachable on loopback from this machine.
            let mut addr = config.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            match &config.proxy.auth {
                Some(auth) => {
                    let (user, pass) = auth.split_once(':').unwrap_or((auth, ""));
                    let enc = |s: &str| {
                        url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
                    };
                    format!("http://{}:{}@{addr}", enc(user), enc(pass))
                }
                None => format!("http://{addr}"),
            }
        }
    };
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

/// Single-quote for POSIX shells.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}
