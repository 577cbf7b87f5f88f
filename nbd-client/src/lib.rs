//! `nbd-client`: an async (tokio) client for the Network Block Device protocol, built to fetch
//! the backing of a copy-on-read image from another host (an image repository, or the source of a
//! post-copy migration served by `qemu-nbd`).
//!
//! What it speaks: fixed newstyle only (oldstyle and plain newstyle are refused with
//! [`Error::UnsupportedServer`]); extended headers, else structured replies, else simple
//! replies; the `base:allocation` meta context set right before `NBD_OPT_GO` (with
//! `NBD_INFO_BLOCK_SIZE`), falling back to `NBD_OPT_EXPORT_NAME` only when GO is unsupported;
//! `NBD_OPT_LIST` ([`list_exports`]); READ, WRITE, FLUSH, TRIM, WRITE_ZEROES (with FAST_ZERO),
//! BLOCK_STATUS and CACHE, each refused locally ([`Error::Refused`]) unless the server allows it.
//!
//! How it behaves:
//! - Many requests in flight per connection, matched by cookie, replies in any order; big
//!   requests are split to [`ClientConfig::max_request_bytes`] (default 256 KiB, never above the
//!   server's maximum or 32 MiB); 2 to 4 connections when the server sets CAN_MULTI_CONN.
//! - Strict: every byte of a read is accounted for (overlaps, gaps and data outside the request
//!   are [`Violation`]s); magics, cookies and lengths are checked before anything the server's
//!   numbers size is allocated. A violation kills the connection; an error the server reports
//!   fails only its request ([`Error::Server`]).
//! - Timeouts for connect, handshake and each request; reconnect like QEMU's `reconnect-delay`
//!   after a socket error or EOF (never after a violation), re-checking the export and re-sending
//!   reads in flight. [`Client::state`] / [`Client::subscribe_state`] expose
//!   [`ConnectionState`] so an embedder can pause a guest while the server is away.
//! - Dropping a request future is safe: the request's slot owns its buffer and its chunks are
//!   still consumed.
//!
//! Main types: [`Uri`] (parses `nbd://`, `nbd+unix://`, legacy `nbd:` and QEMU `json:` backing
//! strings), [`ClientConfig`], [`Client`], [`Extent`], [`Error`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), nbd_client::Error> {
//! use nbd_client::{Client, ClientConfig, Uri};
//! let uri = Uri::parse("nbd+unix:///disk?socket=/run/src.sock")?;
//! let client = Client::connect(&uri, ClientConfig::default()).await?;
//! for extent in client.block_status(0, client.size().min(1 << 30)).await? {
//!     if !extent.zero {
//!         let data = client.read(extent.offset, extent.length).await?;
//!         // ... store `data` ...
//!         # let _ = data;
//!     }
//! }
//! client.close().await;
//! # Ok(()) }
//! ```

mod client;
mod connection;
pub mod error;
mod handshake;
pub mod protocol;
pub mod uri;

pub use client::{list_exports, Client, ClientConfig, ConnectionState, Extent, ZeroFlags};
pub use error::{Errno, Error, Refusal, Violation};
pub use handshake::{BlockSize, ExportEntry, ExportInfo, TransmissionFlags};
pub use protocol::{Command, HeaderMode};
pub use uri::{Address, Uri};

/// Support for the cargo-fuzz target (not part of the stable API).
#[doc(hidden)]
pub mod fuzzing {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::{Client, ClientConfig, ZeroFlags};

    /// Configuration for replays: small requests, short timeouts, no reconnect.
    pub fn replay_config() -> ClientConfig {
        ClientConfig {
            connect_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(2),
            request_timeout: Some(Duration::from_secs(2)),
            reconnect_delay: Duration::ZERO,
            max_request_bytes: 64 * 1024,
            connections: 1,
            max_in_flight: 4,
            max_bytes_in_flight: 1 << 20,
            resend_writes: false,
        }
    }

    /// Play `server_side` as everything the server sends on an in-memory socket (then EOF), while
    /// the client negotiates export "" and issues, one after another: READ 0+4096, BLOCK_STATUS
    /// 0+65536, READ 4096+128 KiB (two pieces), WRITE 0+512, WRITE_ZEROES, TRIM, CACHE, FLUSH
    /// (each only if allowed), then closes. Cookies are numbered from 1 in that order, so a
    /// transcript can answer them. Must never panic or hang.
    pub async fn replay_server_bytes(server_side: &[u8]) {
        let (client_end, server_end) = tokio::io::duplex(1 << 16);
        let data = server_side.to_vec();
        let server = tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(server_end);
            let drain = async move {
                let mut sink = vec![0u8; 1 << 16];
                while let Ok(n) = r.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            let write = async move {
                let _ = w.write_all(&data).await;
                let _ = w.shutdown().await;
            };
            tokio::join!(drain, write);
        });
        let run = async {
            let Ok(client) = Client::from_stream(client_end, "", replay_config()).await else {
                return;
            };
            let size = client.size();
            let fits = |o: u64, l: u64| o + l <= size;
            if fits(0, 4096) {
                let _ = client.read(0, 4096).await;
            }
            if client.has_block_status() && size > 0 {
                let _ = client.block_status(0, 65536).await;
            }
            if fits(4096, 128 * 1024) {
                let _ = client.read(4096, 128 * 1024).await;
            }
            if client.can_write() && fits(0, 512) {
                let _ = client.write(0, &[0xa5; 512]).await;
                if client.can_zero() {
                    let _ = client.write_zeroes(0, 512, ZeroFlags::default()).await;
                }
                if client.can_trim() {
                    let _ = client.trim(0, 512).await;
                }
            }
            if client.can_cache() && fits(0, 4096) {
                let _ = client.cache(0, 4096).await;
            }
            if client.can_flush() && client.can_write() {
                let _ = client.flush().await;
            }
            client.close().await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), run).await;
        server.abort();
    }

    /// Synchronous wrapper for the fuzz target: a fresh current-thread runtime per input.
    pub fn replay_server_bytes_blocking(server_side: &[u8]) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(replay_server_bytes(server_side));
    }
}
