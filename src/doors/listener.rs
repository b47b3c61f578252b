//! The main listener (registry endpoint and forward proxy, HTTP/1.1 and h2) and,
//! when configured, the transparent TLS listener beside it. Shuts down gracefully on SIGINT/SIGTERM, letting transfers in
//! progress finish for a bounded time.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{keep_alive, transparent, Doors};
use crate::app::Services;

/// How long shutdown waits for open transfers.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve `app` through every configured door until a shutdown signal.
pub async fn serve(app: Arc<Services>) -> anyhow::Result<()> {
    app.start().await;
    let config = &app.config;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("could not listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let transparent = match config.transparent_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("could not listen on {addr} (transparent)"))?,
        ),
        None => None,
    };
    let mut listening = vec![addr];
    listening.extend(transparent.as_ref().and_then(|l| l.local_addr().ok()));
    let doors = Arc::new(Doors::open(app.clone(), listening)?);
    tracing::info!(%addr, data_dir = %config.data_dir.display(), offline = config.offline, "moonbit-registry listening");
    for s in &app.sources {
        tracing::info!(
            source = %s.name, registry = %s.registry, index = %s.index,
            archive = %s.archive, symbols = %s.symbols, "upstream source"
        );
    }
    if let Some(ca) = &config.upstream_ca {
        tracing::info!(ca = %ca.display(), "trusting an extra CA for upstream TLS");
    }

    if let Some(listener) = transparent {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "transparent TLS gateway listening");
        }
        tokio::spawn(transparent::accept(listener, doors.clone()));
    }

    let (connections, stop) = (TaskTracker::new(), CancellationToken::new());
    let main = keep_alive::Connections::new(doors.clone(), connections.clone(), stop.clone());
    let mut shutdown = std::pin::pin!(shutdown_signal());
    loop {
        // Past server.max_connections, new clients wait in the accept queue.
        let permit = tokio::select! {
            permit = doors.connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
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
                main.accept(stream, peer, permit);
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down; waiting for open transfers");
    stop.cancel();
    connections.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, connections.wait())
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
