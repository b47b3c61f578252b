//! The transparent door: raw TLS redirected to the gateway by the network
//! (iptables/nftables REDIRECT, a sidecar's init container). The ClientHello's
//! server name, read without consuming it, decides between interception and a
//! tunnel to that name on port 443.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use super::send_timeout::SendTimeout;
use super::{sni, tls, tunnel, Carrying, Doors, TunnelRefused};
use crate::ops::metrics::DoorName;

/// How long a redirected client may take to send its TLS ClientHello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Raw TLS redirected by the network: the ClientHello's server name decides
/// between interception and a tunnel to that name on port 443.
pub async fn accept(listener: TcpListener, doors: Arc<Doors>) {
    loop {
        // The same bound on open connections as the main listener's.
        let Ok(permit) = doors.connections.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed (transparent)");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let doors = doors.clone();
        let open = doors.app.metrics.connection(DoorName::Transparent);
        tokio::spawn(async move {
            let _open = open;
            let name = match sni::peek_server_name(&stream, HELLO_TIMEOUT).await {
                Ok(Some(name)) => name.to_ascii_lowercase(),
                Ok(None) => {
                    return tracing::info!(%peer, "transparent connection without SNI closed")
                }
                Err(e) => return tracing::info!(%peer, error = %e, "transparent connection closed"),
            };
            let _permit = permit;
            let stream = SendTimeout::new(stream, doors.send_timeout);
            if doors.intercepted_source(&name).is_some() {
                return tls::terminate(doors, stream, Some(name), peer, None).await;
            }
            match doors.open_tunnel(&name, 443, Carrying::Transparent).await {
                Ok(server) => tunnel::splice(stream, server, &format!("{name}:443")).await,
                Err(TunnelRefused::Forbidden(reason)) => {
                    tracing::info!(%peer, host = %name, %reason, "transparent tunnel refused")
                }
                Err(TunnelRefused::Unreachable(e)) => {
                    tracing::info!(host = %name, error = %e, "transparent tunnel failed")
                }
            }
        });
    }
}
