//! An NBD export as a block device, through `nbd-client`. Block status uses the server's
//! `base:allocation` context when it offers one; the connection state is exposed through the
//! [`Reconnect`] capability.
//!
//! The export can be repointed at another server while in use ([`Reconnect::repoint`],
//! [`NbdExport::repoint`]): the answer to "the server died". Restart it, or start a copy
//! elsewhere, and repoint: the new export must have the same size (else nothing changes), and
//! then the client is swapped. A request waiting on the old server (reconnecting, or hanging)
//! is abandoned and sent again to the new one, so a copy-on-read read or a stream copy in
//! flight completes from the new server. Only the live connection changes: the QED header
//! that named the old server is not rewritten. A header is the image's record of where its
//! data comes from, and a repoint is often a stop-gap (a copy on a rescue host); rewriting it
//! is `qemu-img rebase -u` (or `qedstream rebase -u`), done on purpose by whoever knows the
//! new address is permanent.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use tokio::sync::watch;

use nbd_client::{Client, ClientConfig, ConnectionState};

use crate::device::{
    check_range, push_extent, BlockDevice, Capabilities, Closed, Geometry, IoBufs, IoFuture,
    LinkState, Reconnect, Status, StatusExtent, WriteFlags,
};
use crate::error::{Error, Result};

/// An NBD export.
#[derive(Debug)]
pub struct NbdExport {
    link: Arc<Link>,
    closed: Closed,
    _forward: tokio::task::JoinHandle<()>,
}

/// The server an export talks to now.
#[derive(Clone, Debug)]
struct Current {
    client: Client,
    uri: String,
}

/// The connection of an export: the client in use (swapped by a repoint), and its state,
/// watched (the [`Reconnect`] capability).
#[derive(Debug)]
struct Link {
    current: RwLock<Current>,
    config: ClientConfig,
    /// Bumped by every repoint: requests waiting on the old client start over.
    generation: watch::Sender<u64>,
    state: watch::Sender<LinkState>,
    /// One repoint at a time.
    repointing: tokio::sync::Mutex<()>,
}

impl Link {
    fn current(&self) -> Current {
        self.current.read().clone()
    }

    fn client(&self) -> Client {
        self.current.read().client.clone()
    }

    /// Connects to `uri`, checks its size against the export's, and swaps it in.
    async fn repoint(&self, uri: &str) -> Result<()> {
        let _one = self.repointing.lock().await;
        let new = connect_client(uri, self.config.clone()).await?;
        let expected = self.client().size();
        if new.size() != expected {
            let found = new.size();
            new.close().await;
            return Err(Error::RepointSizeMismatch {
                uri: uri.to_string(),
                expected,
                found,
            });
        }
        let old = std::mem::replace(
            &mut *self.current.write(),
            Current {
                client: new,
                uri: uri.to_string(),
            },
        );
        self.generation.send_modify(|g| *g += 1);
        tracing::info!(from = %old.uri, to = %uri, "NBD backing repointed");
        // Let the old connection go in the background: a dead server must not hold this up.
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(2), old.client.close()).await;
        });
        Ok(())
    }
}

impl Reconnect for Link {
    fn state(&self) -> LinkState {
        *self.state.borrow()
    }

    fn changed(&self, seen: LinkState) -> Pin<Box<dyn Future<Output = LinkState> + Send + '_>> {
        let mut rx = self.state.subscribe();
        Box::pin(async move {
            loop {
                let now = *rx.borrow_and_update();
                if now != seen {
                    return now;
                }
                if rx.changed().await.is_err() {
                    // The export is gone: its last state stands.
                    return *rx.borrow();
                }
            }
        })
    }

    fn address(&self) -> String {
        self.current.read().uri.clone()
    }

    fn repoint<'a>(&'a self, uri: &'a str) -> IoFuture<'a, ()> {
        Box::pin(Link::repoint(self, uri))
    }
}

fn link_state(s: ConnectionState) -> LinkState {
    match s {
        ConnectionState::Connected => LinkState::Connected,
        ConnectionState::Reconnecting => LinkState::Reconnecting,
        ConnectionState::Offline => LinkState::Offline,
        _ => LinkState::Failed,
    }
}

/// Mirrors the state of the client in use into the link's state, following repoints.
async fn forward_state(link: Arc<Link>) {
    let mut generation = link.generation.subscribe();
    loop {
        generation.borrow_and_update();
        let mut rx = link.client().subscribe_state();
        let mut open = true;
        loop {
            if open {
                link.state.send_replace(link_state(*rx.borrow_and_update()));
            }
            tokio::select! {
                r = rx.changed(), if open => open = r.is_ok(),
                r = generation.changed() => {
                    if r.is_err() {
                        return;
                    }
                    break;
                }
            }
        }
    }
}

async fn connect_client(uri: &str, config: ClientConfig) -> Result<Client> {
    let err = |source| Error::Nbd {
        uri: uri.to_string(),
        source,
    };
    let parsed = nbd_client::Uri::parse(uri).map_err(err)?;
    Client::connect(&parsed, config).await.map_err(err)
}

impl NbdExport {
    /// Wraps a connected client; `uri` is the name shown in messages. A repoint connects
    /// with the default [`ClientConfig`].
    pub fn new(client: Client, uri: String) -> NbdExport {
        NbdExport::with_config(client, uri, ClientConfig::default())
    }

    fn with_config(client: Client, uri: String, config: ClientConfig) -> NbdExport {
        let state = link_state(client.state());
        let link = Arc::new(Link {
            current: RwLock::new(Current { client, uri }),
            config,
            generation: watch::channel(0).0,
            state: watch::channel(state).0,
            repointing: tokio::sync::Mutex::new(()),
        });
        NbdExport {
            _forward: tokio::spawn(forward_state(Arc::clone(&link))),
            link,
            closed: Closed::default(),
        }
    }

    /// Connects to `uri` (any form `nbd_client::Uri::parse` takes); a repoint connects with
    /// the same `config`.
    pub async fn connect(uri: &str, config: ClientConfig) -> Result<NbdExport> {
        let client = connect_client(uri, config.clone()).await?;
        Ok(NbdExport::with_config(client, uri.to_string(), config))
    }

    /// The client in use (a repoint swaps it).
    pub fn client(&self) -> Client {
        self.link.client()
    }

    /// The URI in use.
    pub fn uri(&self) -> String {
        self.link.address()
    }

    /// Points the export at another server (see the module documentation).
    pub async fn repoint(&self, uri: &str) -> Result<()> {
        self.closed.check()?;
        self.link.repoint(uri).await
    }

    /// Runs `request` on the client in use (see [`Link::request`]).
    async fn request<T, F, Fut>(&self, request: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, nbd_client::Error>>,
    {
        self.link.request(request).await
    }

    /// Reads `bufs` (each at most the client's request size) from `offset` on, all at once,
    /// each straight into its own buffer (no copy): the stream's chunks.
    async fn read_vecs(&self, offset: u64, bufs: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        let mut set = tokio::task::JoinSet::new();
        let mut at = offset;
        let n = bufs.len();
        for (i, buf) in bufs.into_iter().enumerate() {
            let (link, len) = (Arc::clone(&self.link), buf.len() as u64);
            set.spawn(async move { (i, link.read_owned(at, buf).await) });
            at += len;
        }
        let mut out: Vec<Option<Vec<u8>>> = (0..n).map(|_| None).collect();
        while let Some(joined) = set.join_next().await {
            let (i, r) = joined.map_err(Error::Task)?;
            out[i] = Some(r?);
        }
        Ok(out.into_iter().flatten().collect())
    }
}

impl Link {
    /// Runs `request` on the client in use. A request that the client in use cannot finish
    /// because a repoint replaced it (still waiting, or failed with a lost connection after
    /// the swap) is sent again to the new client.
    async fn request<T, F, Fut>(&self, request: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, nbd_client::Error>>,
    {
        let mut generation = self.generation.subscribe();
        loop {
            let seen = *generation.borrow_and_update();
            let Current { client, uri } = self.current();
            tokio::select! {
                r = request(client.clone()) => match r {
                    Ok(v) => return Ok(v),
                    // The old client may also have been closed under the request by the
                    // repoint (its `close` runs in the background): `Closed` then means
                    // "ask the new one", not that this export is closed.
                    Err(e)
                        if (e.is_retryable() || matches!(e, nbd_client::Error::Closed))
                            && *self.generation.borrow() != seen => {}
                    Err(e) => return Err(nbd_error(&client, uri, e)),
                },
                r = generation.changed() => {
                    if r.is_err() {
                        return Err(Error::Closed);
                    }
                }
            }
        }
    }

    /// Reads into `buf` itself (the client owns it while the request is out); a request sent
    /// again after a repoint reads into a fresh buffer.
    async fn read_owned(&self, offset: u64, buf: Vec<u8>) -> Result<Vec<u8>> {
        let len = buf.len();
        let first = parking_lot::Mutex::new(Some(buf));
        self.request(|c| {
            let buf = first.lock().take().unwrap_or_else(|| vec![0u8; len]);
            async move { c.read_buf(offset, buf).await }
        })
        .await
    }
}

/// The error of a request on `client`: one that failed because the client gave up carries the
/// reason.
fn nbd_error(client: &Client, uri: String, source: nbd_client::Error) -> Error {
    let source = match (&source, client.failure()) {
        (nbd_client::Error::Closed, Some(f)) => f,
        _ => source,
    };
    Error::Nbd { uri, source }
}

impl Drop for NbdExport {
    fn drop(&mut self) {
        self._forward.abort();
    }
}

impl BlockDevice for NbdExport {
    fn size(&self) -> u64 {
        self.link.client().size()
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            request_alignment: self.link.client().export().block_size.minimum.max(1),
            ..Geometry::BYTES
        }
    }

    fn readv(&self, offset: u64, mut bufs: IoBufs) -> IoFuture<'_, IoBufs> {
        Box::pin(async move {
            self.closed.check()?;
            check_range(offset, bufs.len() as u64, self.size())?;
            let piece = self.link.client().max_request_bytes() as usize;
            if bufs.all_vecs() && bufs.segments().all(|(_, s)| s.len() <= piece) {
                let vecs = self.read_vecs(offset, bufs.into_vecs()).await?;
                return Ok(IoBufs::from_vecs(vecs));
            }
            for (at, seg) in bufs.segments_mut() {
                if !seg.is_empty() {
                    let (at, len) = (offset + at as u64, seg.len() as u64);
                    let data = self
                        .request(|c| async move { c.read(at, len).await })
                        .await?;
                    seg.copy_from_slice(&data);
                }
            }
            Ok(bufs)
        })
    }

    fn writev(&self, offset: u64, bufs: IoBufs, flags: WriteFlags) -> IoFuture<'_, IoBufs> {
        Box::pin(async move {
            self.closed.check()?;
            if !self.link.client().can_write() {
                return Err(Error::ReadOnly);
            }
            for (at, seg) in bufs.segments() {
                let at = offset + at as u64;
                self.request(|c| async move {
                    if flags.fua {
                        c.write_fua(at, seg).await
                    } else {
                        c.write(at, seg).await
                    }
                })
                .await?;
            }
            Ok(bufs)
        })
    }

    fn write_zeroes(&self, offset: u64, length: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.closed.check()?;
            let client = self.link.client();
            if !client.can_write() {
                return Err(Error::ReadOnly);
            }
            if client.can_zero() {
                return self
                    .request(|c| async move {
                        c.write_zeroes(offset, length, nbd_client::ZeroFlags::default())
                            .await
                    })
                    .await;
            }
            let zeros = vec![0u8; length.min(1 << 20) as usize];
            let mut done = 0;
            while done < length {
                let n = (length - done).min(1 << 20) as usize;
                let (at, chunk) = (offset + done, &zeros[..n]);
                self.request(|c| async move { c.write(at, chunk).await })
                    .await?;
                done += n as u64;
            }
            Ok(())
        })
    }

    fn discard(&self, offset: u64, length: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.closed.check()?;
            if self.link.client().can_trim() {
                self.request(|c| async move { c.trim(offset, length).await })
                    .await
            } else {
                Err(Error::Unsupported(
                    "discard: the NBD server does not offer TRIM",
                ))
            }
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.closed.check()?;
            let client = self.link.client();
            if client.can_flush() && client.can_write() {
                self.request(|c| async move { c.flush().await }).await
            } else {
                Ok(())
            }
        })
    }

    fn block_status(&self, offset: u64, length: u64) -> IoFuture<'_, Vec<StatusExtent>> {
        Box::pin(async move {
            let size = self.size();
            if offset >= size || length == 0 {
                return Err(Error::OutOfRange {
                    offset,
                    length,
                    size,
                });
            }
            self.closed.check()?;
            let length = length.min(size - offset);
            if !self.link.client().has_block_status() {
                return Err(Error::Unsupported(
                    "block status: the NBD server offers no base:allocation context",
                ));
            }
            let extents = self
                .request(|c| async move { c.block_status(offset, length).await })
                .await?;
            let mut out = Vec::new();
            for e in extents {
                push_extent(
                    &mut out,
                    StatusExtent {
                        offset: e.offset,
                        length: e.length,
                        status: if e.zero { Status::Zero } else { Status::Data },
                    },
                );
            }
            if out.is_empty() {
                out.push(StatusExtent {
                    offset,
                    length,
                    status: Status::Data,
                });
            }
            Ok(out)
        })
    }

    fn capabilities(&self) -> Capabilities {
        let client = self.link.client();
        Capabilities {
            writable: client.can_write(),
            block_status: client.has_block_status(),
            discard: client.can_trim(),
            fua: client.can_write(),
            reconnect: true,
        }
    }

    fn reconnect(&self) -> Option<Arc<dyn Reconnect>> {
        Some(self.link.clone())
    }

    fn describe(&self) -> String {
        format!("nbd {}", self.link.address())
    }

    fn close(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.closed.close() {
                self.link.client().close().await;
            }
            Ok(())
        })
    }
}
