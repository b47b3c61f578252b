//! The benchmark's HTTP clients: a timed GET (response head, first body byte, last
//! byte) on a fresh connection, as `moon` downloads an archive, and idle keep-alive
//! connections held open on raw sockets.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Milliseconds from sending the request to each point of one transfer.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub head_ms: f64,
    pub first_byte_ms: f64,
    pub total_ms: f64,
}

/// A client that trusts the test upstream's CA, never uses a proxy and keeps no
/// idle connections (every request opens its own, like `moon`'s downloads).
pub fn fresh_client(ca_pem: &Path) -> reqwest::Client {
    let pem = std::fs::read(ca_pem).expect("read the test CA");
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("CA PEM"))
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .expect("reqwest client")
}

/// GET `url`, reading the whole body; panics on anything but a complete 200 of
/// `expect_len` bytes, so a failure never passes for a fast answer.
pub async fn timed_get(client: &reqwest::Client, url: &str, expect_len: u64) -> Timing {
    let started = Instant::now();
    let ms = |t: Instant| t.duration_since(started).as_secs_f64() * 1000.0;
    let mut resp = client
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let head = Instant::now();
    assert_eq!(resp.status(), 200, "GET {url}");
    let mut first = None;
    let mut bytes = 0u64;
    while let Some(chunk) = resp
        .chunk()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: body: {e}"))
    {
        if first.is_none() && !chunk.is_empty() {
            first = Some(Instant::now());
        }
        bytes += chunk.len() as u64;
    }
    let end = Instant::now();
    assert_eq!(bytes, expect_len, "GET {url}: body length");
    Timing {
        head_ms: ms(head),
        first_byte_ms: ms(first.unwrap_or(end)),
        total_ms: ms(end),
    }
}

/// An HTTP/1.1 keep-alive connection that has made one request and now sits idle.
pub struct IdleConnection {
    stream: TcpStream,
    request: String,
}

impl IdleConnection {
    /// Connect, GET `path` once, read the whole answer, keep the socket.
    pub async fn open(addr: SocketAddr, path: &str) -> std::io::Result<IdleConnection> {
        let stream = TcpStream::connect(addr).await?;
        // As every other client and server here: no Nagle delay on small writes.
        stream.set_nodelay(true)?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: bench\r\n\r\n");
        let mut conn = IdleConnection { stream, request };
        conn.request_once().await?;
        Ok(conn)
    }

    /// Send the request again on the same connection: Ok if it is still open and answers 200.
    pub async fn request_once(&mut self) -> std::io::Result<()> {
        self.stream.write_all(self.request.as_bytes()).await?;
        let mut buf = Vec::with_capacity(8192);
        let mut chunk = [0u8; 8192];
        let (head_end, len) = loop {
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                if !head.starts_with("http/1.1 200") {
                    return Err(std::io::Error::other(format!("answered {head}")));
                }
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .ok_or_else(|| std::io::Error::other("no content-length"))?;
                break (end + 4, len);
            }
            if buf.len() > 64 * 1024 {
                return Err(std::io::Error::other("response head too long"));
            }
        };
        let mut have = buf.len() - head_end;
        while have < len {
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            have += n;
        }
        Ok(())
    }
}
