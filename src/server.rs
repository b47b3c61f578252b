//! The doors: the main listener (registry endpoint and forward proxy, HTTP/1.1 and
//! h2) and the optional transparent TLS listener; every request goes to the
//! [`Gateway`]. Shuts down gracefully on SIGINT/SIGTERM, letting transfers in
//! progress finish for a bounded time.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::breaker::Breakers;
use crate::ca_bundle::write_ca_bundle;
use crate::config::{Config, Source};
use crate::index::mirror::MirrorSettings;
use crate::index::Index;
use crate::intercept::ca::{Ca, CaFiles};
use crate::intercept::Interceptor;
use crate::intercept::{sni, tls};
use crate::mutable_cache::MutableCache;
use crate::router::Gateway;
use crate::store::{Limits, Store};
use crate::tunnel;
use crate::tunnel::TunnelPolicy;
use crate::upstream::Upstream;

/// How long a client may take to send a request head; bounds slow-loris connections.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a redirected client may take to send its TLS ClientHello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for open transfers.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Build the gateway from `config` and serve until a shutdown signal.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let sources = config.sources()?;
    let health = Arc::new(Breakers::new(&sources, &config.health));
    let upstream = Upstream::new(config.upstream_ca.as_deref(), config.timeouts.clone())?
        .with_health(health.clone());
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("could not create data dir {}", config.data_dir.display()))?;
    let limits = Limits::from_config(&config);
    let store = Store::open(&config.data_dir, &config.storage, limits, upstream.clone())?;
    let ca_bundle = match &config.upstream_ca {
        Some(ca) => {
            let bundle = config.data_dir.join("upstream-ca-bundle.pem");
            write_ca_bundle(ca, &bundle)?;
            Some(bundle)
        }
        None => None,
    };
    let settings = MirrorSettings::from_config(&config, ca_bundle, health);
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
    match config.storage.max_size {
        // Offline, nothing evicted could be fetched again.
        Some(_) if config.offline => {
            tracing::warn!("storage.max_size is not enforced while offline")
        }
        Some(max) => store.keep_within(max.as_u64(), config.storage.gc_interval),
        None => {}
    }
    let interceptor = if Interceptor::all_hosts(&sources).is_empty() {
        tracing::info!(
            "no source names a host to intercept; CONNECTs are tunnelled by policy only"
        );
        None
    } else {
        let ca = load_ca(&config, &sources, true)?;
        Some(Arc::new(Interceptor::new(ca, &sources)))
    };
    let loopback_only = config.listen.ip().is_loopback()
        && config
            .transparent_listen
            .is_none_or(|a| a.ip().is_loopback());
    let tunnel = TunnelPolicy::from_setting(&config.proxy.tunnel, loopback_only)
        .map_err(|e| anyhow::anyhow!("proxy.tunnel: {e}"))?;
    if matches!(tunnel, TunnelPolicy::Deny) {
        tracing::info!("tunnelling of non-registry hosts is off (set proxy.tunnel to allow some)");
    }
    let mutable = Arc::new(MutableCache::open(
        &config.data_dir.join("mutable"),
        upstream.clone(),
        config.freshness.clone(),
    )?);
    let gateway = Arc::new(Gateway {
        sources,
        upstream,
        store,
        index,
        prefetch: config.prefetch,
        interceptor,
        tunnel,
        proxy_auth: config.proxy.auth.clone(),
        mutable,
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

    if let Some(addr) = config.transparent_listen {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("could not listen on {addr} (transparent)"))?;
        tracing::info!(%addr, "transparent TLS gateway listening");
        tokio::spawn(transparent(listener, gateway.clone()));
    }

    let http = http_builder();
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

/// The HTTP/1.1 + h2 connection settings every door uses.
pub fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    http.http2().timer(TokioTimer::new());
    http
}

/// The interception CA: the configured files, or the one in the data dir
/// (created on first use when `create`).
pub fn load_ca(config: &Config, sources: &[Source], create: bool) -> anyhow::Result<Ca> {
    let hosts = Interceptor::all_hosts(sources);
    match (&config.proxy.ca_cert, &config.proxy.ca_key) {
        (Some(cert), Some(key)) => {
            let files = CaFiles {
                cert: cert.clone(),
                key: key.clone(),
            };
            Ca::load_or_create(&files, &hosts, false)
        }
        (None, None) => Ca::load_or_create(&CaFiles::in_data_dir(&config.data_dir), &hosts, create),
        _ => anyhow::bail!("set both proxy.ca_cert and proxy.ca_key, or neither"),
    }
}

/// Raw TLS redirected by the network: the ClientHello's server name decides
/// between interception and a tunnel to that name on port 443.
async fn transparent(listener: TcpListener, gateway: Arc<Gateway>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed (transparent)");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let gateway = gateway.clone();
        tokio::spawn(async move {
            let name = match sni::peek_server_name(&stream, HELLO_TIMEOUT).await {
                Ok(Some(name)) => name.to_ascii_lowercase(),
                Ok(None) => {
                    return tracing::info!(%peer, "transparent connection without SNI closed")
                }
                Err(e) => return tracing::info!(%peer, error = %e, "transparent connection closed"),
            };
            let intercepted = gateway
                .interceptor
                .as_ref()
                .and_then(|i| i.source_for(&name))
                .is_some();
            if intercepted {
                return tls::terminate(gateway, stream, Some(name)).await;
            }
            let addrs = match gateway.tunnel.admit(&name, 443).await {
                Ok(addrs) => addrs,
                Err(reason) => {
                    return tracing::info!(%peer, host = %name, %reason, "transparent tunnel refused")
                }
            };
            match tunnel::connect(&addrs).await {
                Ok(server) => tunnel::splice(stream, server, &format!("{name}:443")).await,
                Err(e) => tracing::info!(host = %name, error = %e, "transparent tunnel failed"),
            }
        });
    }
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
