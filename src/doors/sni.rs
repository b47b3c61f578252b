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
        match parse_client_hello(&buf[..n]) {
            Ok(Hello::Named(name)) => return Ok(name),
            Ok(Hello::Incomplete) if n < HELLO_MAX => {
                // Only part of the hello has arrived; peek again shortly.
                if Instant::now() >= deadline {
                    return Err("incomplete TLS ClientHello".into());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(Hello::Incomplete) => return Err("TLS ClientHello too large".into()),
            Err(e) => return Err(e),
        }
    }
}

/// What the first bytes of a connection say.
#[derive(Debug, PartialEq)]
pub enum Hello {
    /// A whole ClientHello, naming this server (or none).
    Named(Option<String>),
    /// A ClientHello has begun; more bytes are needed.
    Incomplete,
}

/// Parse the start of a TLS connection (hostile bytes: any input is an answer or
/// an error, never a panic).
pub fn parse_client_hello(bytes: &[u8]) -> Result<Hello, String> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut reader = bytes;
    // One read_tls takes at most 4 KiB; large ClientHellos need several.
    while !reader.is_empty() {
        if acceptor.read_tls(&mut reader).map_err(|e| e.to_string())? == 0 {
            break;
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Ok(Hello::Named(
            accepted.client_hello().server_name().map(str::to_string),
        )),
        Ok(None) => Ok(Hello::Incomplete),
        Err((e, _)) => Err(format!("not a TLS ClientHello: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    /// The first flight of a real rustls client asking for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let server = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn a_real_hello_names_its_server() {
        let hello = client_hello("mooncakes.io");
        assert_eq!(
            parse_client_hello(&hello),
            Ok(Hello::Named(Some("mooncakes.io".into())))
        );
        assert_eq!(parse_client_hello(&hello[..20]), Ok(Hello::Incomplete));
    }

    proptest! {
        #[test]
        fn any_bytes_are_an_answer_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..6000)) {
            let _ = parse_client_hello(&bytes);
        }

        #[test]
        fn a_hello_cut_or_damaged_anywhere_never_panics(
            name in "[a-z]([a-z0-9-]{0,18}[a-z0-9])?(\\.[a-z]([a-z0-9-]{0,18}[a-z0-9])?){0,3}",
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut hello = client_hello(&name);
            prop_assert_eq!(parse_client_hello(&hello), Ok(Hello::Named(Some(name.clone()))));
            let at = flip.index(hello.len());
            hello[at] = byte;
            let _ = parse_client_hello(&hello);
            let _ = parse_client_hello(&hello[..cut.index(hello.len())]);
        }
    }
}
