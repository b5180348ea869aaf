//! A stream that reports every byte it reads: what crossed a link towards this host, for
//! a figure (the fabric's exchange, a migration's link bytes). Writes pass through.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `inner`, with `count(n)` called for each read of `n > 0` bytes.
pub struct CountedReads<T, F> {
    inner: T,
    count: F,
}

impl<T, F: Fn(usize)> CountedReads<T, F> {
    pub fn new(inner: T, count: F) -> Self {
        CountedReads { inner, count }
    }
}

impl<T: AsyncRead + Unpin, F: Fn(usize) + Unpin> AsyncRead for CountedReads<T, F> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            (self.count)(n);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin, F: Unpin> AsyncWrite for CountedReads<T, F> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
