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
//!   reads in flight. Bounded: a request is sent again at most [`ClientConfig::max_resends`]
//!   times and waits at most the window from its own first failure (a server that dies on one
//!   request gets [`Error::ResendsExhausted`], not an endless loop); after the window the client
//!   is [`ConnectionState::Offline`], failing requests at once while it keeps reconnecting in the
//!   background with backoff, so a server that comes back later is used again without a
//!   restart. [`Client::state`] / [`Client::subscribe_state`] expose [`ConnectionState`] so an
//!   embedder can pause a guest while the server is away.
//! - Dropping a request future is safe: the request's slot owns its buffer and its chunks are
//!   still consumed.
//! - TLS (X.509, on rustls through `nbd-tls`) when the location asks for it ([`Uri::tls`]:
//!   `nbds://`, `nbds+unix://`, `tls-certificates=`, a `json:` `tls-creds`): `NBD_OPT_STARTTLS`
//!   right after the client flags, the TLS handshake with the credentials of
//!   [`ClientConfig::tls_creds`] (or the URI's own), the rest of the haggling and every request
//!   inside TLS; every reconnection runs TLS again. A client that asked for TLS never goes on in
//!   plain text ([`Error::TlsRefused`]); certificate failures are [`Error::TlsHandshake`], a
//!   server that requires TLS of a plain location [`Error::TlsRequired`].
//!
//! Main types: [`Uri`] (parses `nbd://`, `nbd+unix://`, `nbds://`, `nbds+unix://`, legacy
//! `nbd:` and QEMU `json:` backing strings), [`ClientConfig`], [`Client`], [`Extent`], [`Error`].
//!
//! Modules: [`uri`] (locations and QEMU backing strings), [`protocol`] (pure encode/decode of the
//! wire structures, no I/O), `handshake` (option negotiation), `connection` (one socket: a writer
//! task and a reader task that demultiplexes replies by cookie), `client` (validation, splitting,
//! the connection pool, reconnection), [`error`].
//!
//! For a tool that takes "a file or an NBD URI" (as a QED backing name may be either):
//! [`Uri::is_nbd_string`] tells which; [`ClientConfig::with_uri_options`] applies the
//! `reconnect-delay` / `open-timeout` a QEMU `json:` string carried; [`Uri::to_qemu_string`] is
//! what to store as a backing file name.
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
pub mod uri;

/// The wire format, shared with the server: the `nbd-proto` crate under its old path.
pub use nbd_proto as protocol;

/// The largest export accepted: QEMU's `BDRV_MAX_LENGTH` (`INT64_MAX` aligned down to 1 GiB).
/// A larger export is refused at connect with [`Error::ExportTooLarge`].
pub const MAX_EXPORT_SIZE: u64 = (i64::MAX as u64) & !((1 << 30) - 1);

pub use client::{list_exports, Client, ClientConfig, ConnectionState, Extent, ZeroFlags};
pub use error::{Errno, Error, Refusal, Violation};
pub use handshake::{BlockSize, ExportEntry, ExportInfo, TransmissionFlags};
pub use protocol::{Command, HeaderMode};
pub use uri::{Address, Uri, UriTls};

/// Support for the cargo-fuzz target (not part of the stable API).
#[doc(hidden)]
pub mod fuzzing {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::{Client, ClientConfig, Error, ZeroFlags};

    /// How long a replay may take before it counts as hung. Everything the server says is in
    /// memory and ends in EOF, and every deadline of [`replay_config`] is shorter, so a replay
    /// that is still running by then never ends by itself.
    pub const REPLAY_LIMIT: Duration = Duration::from_secs(10);

    /// Configuration for replays: small requests, short timeouts, no reconnect.
    pub fn replay_config() -> ClientConfig {
        ClientConfig {
            connect_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(2),
            request_timeout: Some(Duration::from_secs(2)),
            reconnect_delay: Duration::ZERO,
            max_resends: 0,
            reconnect_backoff_max: Duration::ZERO,
            max_request_bytes: 64 * 1024,
            connections: 1,
            max_in_flight: 16,
            max_bytes_in_flight: 1 << 20,
            resend_writes: false,
            open_timeout: Duration::ZERO,
            tls_creds: None,
        }
    }

    /// What no replay may end in: the bugs the fuzz target looks for besides panics.
    #[derive(Debug, Clone, thiserror::Error)]
    #[non_exhaustive]
    pub enum ReplayFailure {
        /// The replay did not end within [`REPLAY_LIMIT`].
        #[error("the replay hung: no end within {0:?}")]
        Hung(Duration),
        /// The handshake or a command ended in an error a transcript followed by EOF cannot
        /// explain: a timeout (the client waited for an answer although the server had hung
        /// up), or a kind of error that has nothing to do with what the server said.
        #[error("{stage} ended in an error no transcript explains: {error}")]
        Unexpected {
            /// The handshake, or the command (`READ 0+4096`).
            stage: &'static str,
            /// The error.
            error: Error,
        },
    }

    /// Whether a handshake may end in `e` when the server's side is a transcript then EOF.
    /// A server's ERR_TLS_REQD to any option is [`Error::TlsRequired`].
    fn explained_at_handshake(e: &Error) -> bool {
        matches!(
            e,
            Error::Protocol(_)
                | Error::HandshakeFailed(_)
                | Error::UnsupportedServer(_)
                | Error::OptionRefused { .. }
                | Error::ExportTooLarge { .. }
                | Error::TlsRequired { .. }
        )
    }

    /// Whether a command may end in `e` then: the server answered it (an error, a protocol
    /// violation), hung up before answering, or the client refused it without sending.
    fn explained_for_command(e: &Error) -> bool {
        matches!(
            e,
            Error::Protocol(_)
                | Error::ConnectionLost(_)
                | Error::Server { .. }
                | Error::Refused(_)
        )
    }

    /// Play `server_side` as everything the server sends on an in-memory socket (then EOF), while
    /// the client negotiates export "" and issues, all at once: READ 0+4096, BLOCK_STATUS
    /// 0+65536, READ 4096+65536, READ 69632+65536, WRITE 0+512, WRITE_ZEROES 0+512, TRIM 0+512,
    /// CACHE 0+4096, FLUSH (each only if allowed), then closes. Cookies are numbered from 1 in
    /// that order, so a transcript can answer them.
    ///
    /// Must never panic, and never fails otherwise: a replay that hangs (runs past
    /// [`REPLAY_LIMIT`]) or ends in an error the transcript cannot explain (see
    /// [`ReplayFailure`]) is an error.
    pub async fn replay_server_bytes(server_side: &[u8]) -> Result<ReplayOutcome, ReplayFailure> {
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
            let client = match Client::from_stream(client_end, "", replay_config()).await {
                Ok(client) => client,
                Err(error) if explained_at_handshake(&error) => {
                    return Ok(ReplayOutcome::default());
                }
                Err(error) => {
                    return Err(ReplayFailure::Unexpected {
                        stage: "the handshake",
                        error,
                    })
                }
            };
            let size = client.size();
            let fits = |o: u64, l: u64| o.checked_add(l).is_some_and(|e| e <= size);
            let c = &client;
            // All commands are polled once, in this order, before the reader task runs: cookies
            // are assigned 1, 2, ... in this order (skipping commands not issued), whatever the
            // transcript answers.
            let results = tokio::join!(
                async { fits(0, 4096).then_some(c.read(0, 4096).await.map(drop)) },
                async {
                    (c.has_block_status() && size > 0)
                        .then_some(c.block_status(0, 65536).await.map(drop))
                },
                async { fits(4096, 65536).then_some(c.read(4096, 65536).await.map(drop)) },
                async { fits(69632, 65536).then_some(c.read(69632, 65536).await.map(drop)) },
                async { (c.can_write() && fits(0, 512)).then_some(c.write(0, &[0xa5; 512]).await) },
                async {
                    (c.can_zero() && fits(0, 512))
                        .then_some(c.write_zeroes(0, 512, ZeroFlags::default()).await)
                },
                async { (c.can_trim() && fits(0, 512)).then_some(c.trim(0, 512).await) },
                async { (c.can_cache() && fits(0, 4096)).then_some(c.cache(0, 4096).await) },
                async { (c.can_flush() && c.can_write()).then_some(c.flush().await) },
            );
            client.close().await;
            let all = [
                ("READ 0+4096", results.0),
                ("BLOCK_STATUS 0+65536", results.1),
                ("READ 4096+65536", results.2),
                ("READ 69632+65536", results.3),
                ("WRITE 0+512", results.4),
                ("WRITE_ZEROES 0+512", results.5),
                ("TRIM 0+512", results.6),
                ("CACHE 0+4096", results.7),
                ("FLUSH", results.8),
            ];
            let mut outcome = ReplayOutcome {
                connected: true,
                succeeded: 0,
            };
            for (stage, result) in all {
                match result {
                    None => {}
                    Some(Ok(())) => outcome.succeeded += 1,
                    Some(Err(error)) if explained_for_command(&error) => {}
                    Some(Err(error)) => return Err(ReplayFailure::Unexpected { stage, error }),
                }
            }
            Ok(outcome)
        };
        let r = tokio::time::timeout(REPLAY_LIMIT, run).await;
        server.abort();
        r.unwrap_or(Err(ReplayFailure::Hung(REPLAY_LIMIT)))
    }

    /// What a replay achieved (for tests of the seed corpus).
    #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
    pub struct ReplayOutcome {
        /// The handshake succeeded.
        pub connected: bool,
        /// Commands that succeeded.
        pub succeeded: usize,
    }

    /// Synchronous wrapper for the fuzz target: a fresh current-thread runtime per input.
    pub fn replay_server_bytes_blocking(
        server_side: &[u8],
    ) -> Result<ReplayOutcome, ReplayFailure> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(replay_server_bytes(server_side))
    }
}
