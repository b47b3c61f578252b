//! The `moonbit-registry` command line: `serve` runs the gateway.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use moonbit_registry::config::{Config, Overrides};
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
    /// Serve the registry endpoint (point MOONCAKES_REGISTRY at it).
    Serve(ServeArgs),
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
    };
    let config = Config::load(args.config.as_deref(), overrides)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(moonbit_registry::server::serve(config))
}
