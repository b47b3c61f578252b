//! The listener: accepts connections, speaks HTTP/1.1 and h2 (prior knowledge) on
//! them, hands every request to the [`Gateway`], and shuts down gracefully on
//! SIGINT/SIGTERM, letting transfers in progress finish for a bounded time.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::index::mirror::MirrorSettings;
use crate::index::Index;
use crate::router::Gateway;
use crate::store::{Limits, Store};
use crate::upstream::{write_ca_bundle, Upstream};

/// How long a client may take to send a request head; bounds slow-loris connections.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for open transfers.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Build the gateway from `config` and serve until a shutdown signal.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let sources = config.sources()?;
    let upstream = Upstream::new(config.upstream_ca.as_deref(), config.timeouts.clone())?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("could not create data dir {}", config.data_dir.display()))?;
    let limits = Limits {
        archive_max: config.storage.archive_max.as_u64(),
        bad_archive_ttl: config.index.bad_archive_ttl,
        prefetch_jobs: config.index.prefetch_jobs,
    };
    let store = Store::open(&config.data_dir, &config.storage, limits, upstream.clone())?;
    let ca_bundle = match &config.upstream_ca {
        Some(ca) => {
            let bundle = config.data_dir.join("upstream-ca-bundle.pem");
            write_ca_bundle(ca, &bundle)?;
            Some(bundle)
        }
        None => None,
    };
    let settings = MirrorSettings {
        max_age: config.index.max_age,
        retry_after: config.index.retry_after,
        fetch_timeout: config.index.fetch_timeout,
        ca_bundle,
    };
    let index = Arc::new(Index::new(
        config.data_dir.join("index"),
        &sources,
        settings,
    ));
    if config.offline {
        index.start_offline().await;
    } else {
        index.start().await;
    }
    let store = Arc::new(store);
    if let Some(max) = config.storage.max_size {
        store.keep_within(max.as_u64(), config.storage.gc_interval);
    }
    let gateway = Arc::new(Gateway {
        sources,
        upstream,
        store,
        index,
        prefetch: config.prefetch,
        offline: config.offline,
    });
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("could not listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, data_dir = %config.data_dir.display(), offline = config.offline, "moonbit-registry listening");
    for s in &gateway.sources {
        tracing::info!(
            source = %s.name, registry = %s.registry, index = %s.index,
            archive = %s.archive, symbols = %s.symbols, "upstream source"
        );
    }
    if let Some(ca) = &config.upstream_ca {
        tracing::info!(ca = %ca.display(), "trusting an extra CA for upstream TLS");
    }

    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    http.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown_signal());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // e.g. EMFILE: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let gateway = gateway.clone();
                let service = service_fn(move |req| gateway.clone().handle(req));
                let conn = http.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down; waiting for open transfers");
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("open transfers did not finish within {DRAIN_TIMEOUT:?}; closing them");
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
