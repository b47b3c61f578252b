//! Reading the server name from a redirected connection's TLS ClientHello without
//! consuming it, so the connection can still be intercepted or tunnelled intact.

use std::time::{Duration, Instant};

use tokio::net::TcpStream;

/// A ClientHello larger than this is not one we will wait for.
const HELLO_MAX: usize = 16 * 1024;

/// The SNI of the ClientHello waiting on `stream` (`None`: the client sent none).
pub async fn peek_server_name(
    stream: &TcpStream,
    timeout: Duration,
) -> Result<Option<String>, String> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; HELLO_MAX];
    loop {
        let n = tokio::time::timeout_at(deadline.into(), stream.peek(&mut buf))
            .await
            .map_err(|_| "no TLS ClientHello in time".to_string())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before a ClientHello".into());
        }
        // rustls parses a copy; the socket still holds every byte.
        let mut acceptor = rustls::server::Acceptor::default();
        let mut reader = &buf[..n];
        // One read_tls takes at most 4 KiB; large ClientHellos need several.
        while !reader.is_empty() {
            if acceptor.read_tls(&mut reader).map_err(|e| e.to_string())? == 0 {
                break;
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                return Ok(accepted.client_hello().server_name().map(str::to_string))
            }
            Ok(None) if n < HELLO_MAX => {
                // Only part of the hello has arrived; peek again shortly.
                if Instant::now() >= deadline {
                    return Err("incomplete TLS ClientHello".into());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(None) => return Err("TLS ClientHello too large".into()),
            Err((e, _)) => return Err(format!("not a TLS ClientHello: {e}")),
        }
    }
}
