//! Terminating TLS for an intercepted host (a leaf minted by the gateway's CA) and
//! serving the decrypted HTTP/1.1 or h2 (by ALPN) through the router, as if it had
//! come to the registry endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::LazyConfigAcceptor;

use super::{with_causes, Doors};
use crate::ops::jobs::JobId;

/// Bound on the TLS handshake with the client.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Accept TLS on `io` for an intercepted host and serve it. `expected` is the host
/// the client asked for (the CONNECT target); a ClientHello naming another host is
/// only accepted if that host is intercepted too.
/// `job` is the CI job the proxy client named, carried by every request inside.
pub async fn terminate<IO>(
    doors: Arc<Doors>,
    io: IO,
    expected: Option<String>,
    peer: SocketAddr,
    job: Option<JobId>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(interceptor) = doors.interceptor.clone() else {
        return;
    };
    let handshake = async {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let sni = start
            .client_hello()
            .server_name()
            .map(str::to_ascii_lowercase);
        let host = sni.or(expected).ok_or("TLS: the client named no host")?;
        let source = interceptor
            .source_for(&host)
            .ok_or_else(|| format!("TLS: {host} is not an intercepted host"))?;
        let config = interceptor
            .mint()
            .server_config(&host)
            .map_err(|e| e.to_string())?;
        let stream = start
            .into_stream(config)
            .await
            .map_err(|e| format!("TLS with {host}: {e}"))?;
        Ok::<_, String>((stream, host, source))
    };
    let (stream, host, source) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(e)) => {
            tracing::info!(error = %e, "interception handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!("interception handshake timed out");
            return;
        }
    };
    tracing::debug!(%host, "intercepted TLS connection");
    let http = doors.http.clone();
    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        if let Some(job) = &job {
            req.extensions_mut().insert(job.clone());
        }
        doors.clone().intercepted(req, source, peer)
    });
    if let Err(e) = http.serve_connection(TokioIo::new(stream), service).await {
        tracing::debug!(%host, error = %with_causes(&*e), "intercepted connection ended with an error");
    }
}
