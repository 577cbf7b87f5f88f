//! # nbd-server: serve any block device over NBD
//!
//! A tokio server for the Network Block Device protocol that real clients accept (QEMU's
//! `nbd` driver, `qemu-io`, `qemu-img`, libnbd's `nbdinfo` and `nbdcopy`, and our own
//! `nbd-client`), serving any [`copy_on_read::BlockDevice`]: a raw file, or the copy-on-read
//! device a VM runs on while its image streams.
//!
//! What it speaks: fixed newstyle only; with [`ServerConfig::tls`], TLS is required
//! (`OPT_STARTTLS`, then everything inside TLS; before it every other option is refused with
//! `NBD_REP_ERR_TLS_REQD`, and the clients turned away are reported by [`Server::refusals`]);
//! `OPT_GO`, `OPT_INFO` (export, name, description, block
//! size), `OPT_EXPORT_NAME`, `OPT_LIST`, `OPT_ABORT`, `OPT_STRUCTURED_REPLY`,
//! `OPT_EXTENDED_HEADERS`, and `OPT_SET_META_CONTEXT` / `OPT_LIST_META_CONTEXT` for
//! `base:allocation` and, when the export has layers ([`Export::with_layers`]) or an
//! [`AllocationDepth`], `qemu:allocation-depth`; READ (holes as OFFSET_HOLE chunks unless DF), WRITE (FUA), FLUSH,
//! TRIM, WRITE_ZEROES (NO_HOLE, FAST_ZERO), CACHE (populates the local layer), BLOCK_STATUS
//! (REQ_ONE) and DISC.
//!
//! How it behaves: many requests in flight per connection, replies written whole by one
//! writer; bounded everywhere (connections, options, request size, requests and bytes in
//! flight per connection, handshake time); strict validation with the spec's error values
//! (EINVAL, EPERM, ENOSPC, ENOTSUP, EIO, ESHUTDOWN). A client that breaks the framing is
//! disconnected; the server keeps serving everyone else.
//!
//! Modules: [`addr`] (where to listen), [`export`] (what is served), [`depth`]
//! (`qemu:allocation-depth` answers), `handshake` (option
//! negotiation, STARTTLS included), [`refusal`] (the clients a TLS-only server turned away), `transmission` (one connection's requests), `server` ([`Server`], its
//! configuration, statistics and shutdown), [`error`]. The wire format is `nbd-proto`'s.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use copy_on_read::{CorDevice, CorOptions};
//! use nbd_server::{Export, ListenAddr, Server, ServerConfig};
//!
//! let disk = Arc::new(CorDevice::open("vm.qed".as_ref(), CorOptions::default()).await?);
//! let export = Export::new("", disk.clone()).with_layers(disk.clone());
//! let server = Server::new(vec![export], ServerConfig::default());
//! let listener = server.bind(&"unix:/run/vm.sock".parse::<ListenAddr>()?).await?;
//! println!("serving {}", listener.addr().uri(""));
//! // ... later:
//! server.shutdown().await?;
//! # Ok(()) }
//! ```

pub mod addr;
pub mod depth;
pub mod error;
pub mod export;
#[doc(hidden)]
pub mod fuzzing;
mod handshake;
pub mod refusal;
mod server;
mod transmission;

pub use addr::ListenAddr;
pub use depth::{AllocationDepth, DepthRun};
pub use error::{Error, Result};
pub use export::Export;
pub use handshake::MAX_OPTION_DATA;
pub use refusal::{HandshakeFailure, Refused, TlsRefusal};
pub use server::{Listener, Server, ServerConfig, ServerStats};
