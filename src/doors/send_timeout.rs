//! A send-progress timeout for client connections: a client that takes no bytes
//! for `server.send_timeout` (a reader at 1 byte/s keeps the socket's buffer full)
//! is disconnected, like nginx's `send_timeout`. hyper has no write timeout of its
//! own, so the connection's IO carries one.

use std::future::Future;
use std::io;
use std::os::fd::BorrowedFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// `IO` whose writes fail with `TimedOut` once one has waited `limit` without progress.
pub struct SendTimeout<IO> {
    io: IO,
    limit: Duration,
    /// Started when a write first had to wait; cleared by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<IO> SendTimeout<IO> {
    pub fn new(io: IO, limit: Duration) -> SendTimeout<IO> {
        SendTimeout {
            io,
            limit,
            stalled: None,
        }
    }

    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    pub fn into_inner(self) -> IO {
        self.io
    }

    /// After the inner write was not ready: fail once the wait has lasted `limit`.
    fn waited(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client took no data for {limit:?}"),
            )),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progressed<T>(
        &mut self,
        result: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match result {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.waited(cx).map(Err),
        }
    }
}

impl SendTimeout<TcpStream> {
    /// Write `bufs` telling the kernel more follows at once (`MSG_MORE`): a
    /// response head sent just before its body by `sendfile` then leaves in the
    /// body's first segment rather than one of its own.
    pub fn poll_write_more(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            if self.io.poll_write_ready(cx)?.is_pending() {
                return self.progressed(Poll::Pending, cx);
            }
            let sent = self.io.try_io(Interest::WRITABLE, || {
                rustix::net::sendmsg(
                    &self.io,
                    bufs,
                    &mut rustix::net::SendAncillaryBuffer::default(),
                    rustix::net::SendFlags::MORE | rustix::net::SendFlags::NOSIGNAL,
                )
                .map_err(io::Error::from)
            });
            match sent {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                sent => return self.progressed(Poll::Ready(sent), cx),
            }
        }
    }

    /// Send `len` bytes of `file` from `offset` with `sendfile`, under the same
    /// progress bound as a write.
    pub fn poll_sendfile(
        &mut self,
        cx: &mut Context<'_>,
        file: BorrowedFd<'_>,
        offset: u64,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        loop {
            if self.io.poll_write_ready(cx)?.is_pending() {
                return self.progressed(Poll::Pending, cx);
            }
            let sent = self.io.try_io(Interest::WRITABLE, || {
                let mut at = offset;
                rustix::fs::sendfile(&self.io, file, Some(&mut at), len).map_err(io::Error::from)
            });
            match sent {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                sent => return self.progressed(Poll::Ready(sent), cx),
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for SendTimeout<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for SendTimeout<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write(cx, buf);
        self.progressed(result, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.progressed(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.io).poll_flush(cx);
        self.progressed(result, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_reader_that_takes_nothing_is_dropped_and_one_that_reads_is_not() {
        // A small pipe: the writer fills it quickly, then waits on the reader.
        let (writer, mut reader) = tokio::io::duplex(1024);
        let mut slow = SendTimeout::new(writer, Duration::from_millis(200));
        let started = std::time::Instant::now();
        let err = slow.write_all(&vec![0u8; 64 * 1024]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(2));

        let (writer, mut reader2) = tokio::io::duplex(1024);
        let drain = tokio::spawn(async move {
            let mut sink = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut reader2, &mut sink)
                .await
                .unwrap();
            sink.len()
        });
        let mut fine = SendTimeout::new(writer, Duration::from_millis(200));
        fine.write_all(&vec![0u8; 64 * 1024]).await.unwrap();
        fine.shutdown().await.unwrap();
        drop(fine);
        assert_eq!(drain.await.unwrap(), 64 * 1024);
        let _ = tokio::io::AsyncReadExt::read(&mut reader, &mut [0u8; 1]).await;
    }
}
