//! Support for the cargo-fuzz targets of the server (not part of the stable API):
//!
//! - `nbd_server_replay` ([`replay_client_bytes`]): any bytes, played as everything a client
//!   sends on an in-memory socket (then EOF), against a server exporting a small in-memory
//!   disk: handshake and transmission together.
//! - `nbd_server_options` ([`options::negotiate_client_bytes`]): the option haggling alone,
//!   run directly on in-memory streams, its replies checked against the protocol.
//! - `nbd_server_requests` ([`requests::serve_request_bytes`]): the transmission phase alone
//!   in the mode a selector byte picks, every request's reply checked.

pub mod options;
pub mod requests;
pub mod script;

pub use options::{negotiate_client_bytes, Negotiation, NegotiationEnd};
pub use requests::{serve_request_bytes, Transmission};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use copy_on_read::{BlockDevice, Capabilities, IoBufs, IoFuture, Status, StatusExtent, WriteFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{AllocationDepth, DepthRun, Export, Server, ServerConfig, ServerStats};

/// How long a replay may take before it counts as hung: the client's bytes are in memory and
/// end in EOF, so a replay still running then never ends by itself.
pub const REPLAY_LIMIT: Duration = Duration::from_secs(10);

/// What no replay may end in besides a panic.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayFailure {
    /// The server did not close the connection within [`REPLAY_LIMIT`] after the client's
    /// bytes ended.
    #[error("the replay hung: no end within {0:?}")]
    Hung(Duration),
    /// A negotiation over always-ready in-memory streams waited for something: nothing would
    /// ever wake it.
    #[error("the negotiation waited on streams that are always ready")]
    Stalled,
    /// The server sent something the protocol does not allow.
    #[error("the server's replies are wrong: {0}")]
    BadReply(String),
}

/// What a replay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayOutcome {
    /// Bytes the server sent.
    pub sent: usize,
    /// The server's counters afterwards.
    pub stats: ServerStats,
}

/// A disk in memory: 1 MiB, the first 64 KiB 0x5a, the rest zeros (so reads have a hole).
#[derive(Debug)]
pub struct MemDevice {
    bytes: Mutex<Vec<u8>>,
}

impl Default for MemDevice {
    fn default() -> MemDevice {
        let mut bytes = vec![0u8; 1 << 20];
        bytes[..65536].fill(0x5a);
        MemDevice {
            bytes: Mutex::new(bytes),
        }
    }
}

impl MemDevice {
    fn check(&self, offset: u64, length: u64) -> copy_on_read::Result<(usize, usize)> {
        copy_on_read::device::check_range(offset, length, self.size())?;
        Ok((offset as usize, (offset + length) as usize))
    }
    fn with<T>(&self, f: impl FnOnce(&mut Vec<u8>) -> T) -> T {
        f(&mut self.bytes.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.with(|b| b.len() as u64)
    }
    fn readv(&self, offset: u64, mut bufs: IoBufs) -> IoFuture<'_, IoBufs> {
        Box::pin(async move {
            let (from, to) = self.check(offset, bufs.len() as u64)?;
            self.with(|b| bufs.copy_in(0, &b[from..to]));
            Ok(bufs)
        })
    }
    fn writev(&self, offset: u64, bufs: IoBufs, _: WriteFlags) -> IoFuture<'_, IoBufs> {
        Box::pin(async move {
            let (from, to) = self.check(offset, bufs.len() as u64)?;
            self.with(|b| bufs.copy_out(0, &mut b[from..to]));
            Ok(bufs)
        })
    }
    fn write_zeroes(&self, offset: u64, length: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let (from, to) = self.check(offset, length)?;
            self.with(|b| b[from..to].fill(0));
            Ok(())
        })
    }
    fn discard(&self, offset: u64, length: u64) -> IoFuture<'_, ()> {
        self.write_zeroes(offset, length)
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    /// Zero where a whole 4 KiB block is zero.
    fn block_status(&self, offset: u64, length: u64) -> IoFuture<'_, Vec<StatusExtent>> {
        Box::pin(async move {
            let (from, to) = self.check(offset, length)?;
            let mut out: Vec<StatusExtent> = Vec::new();
            self.with(|b| {
                let mut pos = from;
                while pos < to {
                    let end = ((pos / 4096 + 1) * 4096).min(to);
                    let zero = b[pos / 4096 * 4096..((pos / 4096 + 1) * 4096).min(b.len())]
                        .iter()
                        .all(|&x| x == 0);
                    let status = if zero { Status::Zero } else { Status::Data };
                    match out.last_mut() {
                        Some(l) if l.status == status => l.length += (end - pos) as u64,
                        _ => out.push(StatusExtent {
                            offset: pos as u64,
                            length: (end - pos) as u64,
                            status,
                        }),
                    }
                    pos = end;
                }
            });
            Ok(out)
        })
    }
    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::default();
        c.writable = true;
        c.block_status = true;
        c.discard = true;
        c.fua = true;
        c
    }
    fn describe(&self) -> String {
        "memory".into()
    }
    fn close(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// `qemu:allocation-depth` of a [`MemDevice`]: depth 1 (the top image) for its first 64 KiB
/// of data, 2 (the backing) after.
#[derive(Debug)]
pub struct MemDepth;

impl AllocationDepth for MemDepth {
    fn allocation_depth(&self, offset: u64, length: u64) -> IoFuture<'_, Vec<DepthRun>> {
        Box::pin(async move {
            let top = (65536u64.saturating_sub(offset)).min(length);
            let mut runs = Vec::new();
            if top > 0 {
                runs.push(DepthRun {
                    length: top,
                    depth: 1,
                });
            }
            if length > top {
                runs.push(DepthRun {
                    length: length - top,
                    depth: 2,
                });
            }
            Ok(runs)
        })
    }
}

/// The exports every target serves: a [`MemDevice`] as "" (writable, with a description and
/// [`MemDepth`]) and the same device as "ro" (read-only).
pub fn fuzz_exports() -> Vec<Export> {
    let device: Arc<dyn BlockDevice> = Arc::new(MemDevice::default());
    vec![
        Export::new("", Arc::clone(&device))
            .with_description("a disk in memory")
            .with_allocation_depth(Arc::new(MemDepth)),
        Export::new("ro", device).read_only(true),
    ]
}

/// Configuration for replays: small bounds so no input makes a replay big.
pub fn replay_config() -> ServerConfig {
    ServerConfig {
        max_connections: 1,
        handshake_timeout: Duration::from_secs(5),
        max_request_bytes: 256 * 1024,
        max_in_flight: 8,
        max_buffered_bytes: 1 << 20,
        max_options: 32,
        shutdown_grace: Duration::from_secs(1),
        tls: None,
    }
}

/// Plays `client_side` as everything a client sends (then EOF) to a server exporting a
/// [`MemDevice`] as "" (also as "ro", read-only), reading everything the server sends until
/// it closes. Must never panic or hang.
pub async fn replay_client_bytes(client_side: &[u8]) -> Result<ReplayOutcome, ReplayFailure> {
    let server = Server::new(fuzz_exports(), replay_config());
    let (client_end, server_end) = tokio::io::duplex(1 << 16);
    let serving = tokio::spawn(Arc::clone(&server).serve_stream(Box::new(server_end)));
    let (mut r, mut w) = tokio::io::split(client_end);
    let data = client_side.to_vec();
    let write = async move {
        let _ = w.write_all(&data).await;
        let _ = w.shutdown().await;
    };
    let read = async move {
        let mut sent = 0;
        let mut sink = vec![0u8; 1 << 16];
        while let Ok(n) = r.read(&mut sink).await {
            if n == 0 {
                break;
            }
            sent += n;
        }
        sent
    };
    let run = async {
        let ((), sent) = tokio::join!(write, read);
        let _ = serving.await;
        sent
    };
    let sent = tokio::time::timeout(REPLAY_LIMIT, run)
        .await
        .map_err(|_| ReplayFailure::Hung(REPLAY_LIMIT))?;
    Ok(ReplayOutcome {
        sent,
        stats: server.stats(),
    })
}

/// [`replay_client_bytes`] on a runtime of its own.
pub fn replay_client_bytes_blocking(client_side: &[u8]) -> Result<ReplayOutcome, ReplayFailure> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(replay_client_bytes(client_side))
}
