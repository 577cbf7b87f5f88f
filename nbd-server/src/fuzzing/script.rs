//! In-memory streams for the focused targets: a client's bytes served in pieces of a chosen
//! size (then EOF), and a sink that keeps what the server sends up to a bound. Both are
//! always ready, so a negotiation over them never waits: one poll runs it to its end.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Everything a client sends, handed out at most `piece` bytes per read, then EOF.
#[derive(Debug)]
pub struct Script {
    bytes: Vec<u8>,
    at: usize,
    piece: usize,
}

impl Script {
    /// `bytes` in pieces of at most `piece` bytes (at least 1).
    pub fn new(bytes: &[u8], piece: usize) -> Script {
        Script {
            bytes: bytes.to_vec(),
            at: 0,
            piece: piece.max(1),
        }
    }

    /// Bytes not read yet.
    pub fn unread(&self) -> usize {
        self.bytes.len() - self.at
    }
}

impl AsyncRead for Script {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.unread().min(self.piece).min(buf.remaining());
        let at = self.at;
        buf.put_slice(&self.bytes[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

/// What the server sent: the first `keep` bytes, and how many there were in all.
#[derive(Debug, Default)]
pub struct Sent {
    pub bytes: Vec<u8>,
    pub total: usize,
}

/// A writer that keeps the first `keep` bytes written to it (and counts the rest); clones
/// share the record.
#[derive(Debug, Clone)]
pub struct Sink {
    sent: Arc<Mutex<Sent>>,
    keep: usize,
}

impl Sink {
    /// A sink keeping up to `keep` bytes.
    pub fn new(keep: usize) -> Sink {
        Sink {
            sent: Arc::default(),
            keep,
        }
    }

    /// What was sent so far.
    pub fn take(&self) -> Sent {
        std::mem::take(&mut *self.sent.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl AsyncWrite for Sink {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        let room = self.keep.saturating_sub(sent.bytes.len()).min(buf.len());
        sent.bytes.extend_from_slice(&buf[..room]);
        sent.total += buf.len();
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A client's script and the server's sink as one stream (for the handshake).
#[derive(Debug)]
pub struct Duplex {
    pub script: Script,
    pub sink: Sink,
}

impl AsyncRead for Duplex {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.script).poll_read(cx, buf)
    }
}

impl AsyncWrite for Duplex {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.sink).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.sink).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.sink).poll_shutdown(cx)
    }
}

/// Runs `f` to its end with one poll: over always-ready streams nothing may wait. `None` if
/// it did (it would never be woken: a hang).
pub fn run_ready<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    match f
        .as_mut()
        .poll(&mut Context::from_waker(std::task::Waker::noop()))
    {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}
