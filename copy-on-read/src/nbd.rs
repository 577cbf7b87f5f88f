//! An NBD export as a block device, through `nbd-client`. Block status uses the server's
//! `base:allocation` context when it offers one; the connection state is exposed through the
//! [`Reconnect`] capability.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;

use nbd_client::{Client, ConnectionState};

use crate::device::{
    check_range, push_extent, BlockDevice, Capabilities, Closed, Geometry, IoBufs, IoFuture,
    LinkState, Reconnect, Status, StatusExtent, WriteFlags,
};
use crate::error::{Error, Result};

/// An NBD export.
#[derive(Debug)]
pub struct NbdExport {
    client: Client,
    uri: String,
    link: Arc<LinkWatch>,
    closed: Closed,
    _forward: tokio::task::JoinHandle<()>,
}

/// The connection state of an export, watched (the [`Reconnect`] capability).
#[derive(Debug)]
struct LinkWatch {
    rx: watch::Receiver<LinkState>,
}

impl Reconnect for LinkWatch {
    fn state(&self) -> LinkState {
        *self.rx.borrow()
    }

    fn changed(&self, seen: LinkState) -> Pin<Box<dyn Future<Output = LinkState> + Send + '_>> {
        let mut rx = self.rx.clone();
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
}

fn link_state(s: ConnectionState) -> LinkState {
    match s {
        ConnectionState::Connected => LinkState::Connected,
        ConnectionState::Reconnecting => LinkState::Reconnecting,
        _ => LinkState::Failed,
    }
}

impl NbdExport {
    /// Wraps a connected client; `uri` is the name shown in messages.
    pub fn new(client: Client, uri: String) -> NbdExport {
        let mut rx = client.subscribe_state();
        let (tx, state) = watch::channel(link_state(*rx.borrow()));
        let forward = tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let s = link_state(*rx.borrow_and_update());
                if tx.send(s).is_err() {
                    break;
                }
            }
        });
        NbdExport {
            client,
            uri,
            link: Arc::new(LinkWatch { rx: state }),
            closed: Closed::default(),
            _forward: forward,
        }
    }

    /// Connects to `uri` (any form `nbd_client::Uri::parse` takes).
    pub async fn connect(uri: &str, config: nbd_client::ClientConfig) -> Result<NbdExport> {
        let err = |source| Error::Nbd {
            uri: uri.to_string(),
            source,
        };
        let parsed = nbd_client::Uri::parse(uri).map_err(err)?;
        let client = Client::connect(&parsed, config).await.map_err(err)?;
        Ok(NbdExport::new(client, uri.to_string()))
    }

    /// The client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn err(&self) -> impl FnOnce(nbd_client::Error) -> Error + '_ {
        move |source| {
            // A request that failed because the client gave up carries the reason.
            let source = match (&source, self.client.failure()) {
                (nbd_client::Error::Closed, Some(f)) => f,
                _ => source,
            };
            Error::Nbd {
                uri: self.uri.clone(),
                source,
            }
        }
    }
}

impl Drop for NbdExport {
    fn drop(&mut self) {
        self._forward.abort();
    }
}

impl BlockDevice for NbdExport {
    fn size(&self) -> u64 {
        self.client.size()
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            request_alignment: self.client.export().block_size.minimum.max(1),
            ..Geometry::BYTES
        }
    }

    fn readv(&self, offset: u64, mut bufs: IoBufs) -> IoFuture<'_, IoBufs> {
        Box::pin(async move {
            self.closed.check()?;
            check_range(offset, bufs.len() as u64, self.size())?;
            for (at, seg) in bufs.segments_mut() {
                if !seg.is_empty() {
                    self.client
                        .read_into(offset + at as u64, seg)
                        .await
                        .map_err(self.err())?;
                }
            }
            Ok(bufs)
        })
    }

    fn writev(&self, offset: u64, bufs: IoBufs, flags: WriteFlags) -> IoFuture<'_, IoBufs> {
        Box::pin(async move {
            self.closed.check()?;
            if !self.client.can_write() {
                return Err(Error::ReadOnly);
            }
            for (at, seg) in bufs.segments() {
                let at = offset + at as u64;
                let done = if flags.fua {
                    self.client.write_fua(at, seg).await
                } else {
                    self.client.write(at, seg).await
                };
                done.map_err(self.err())?;
            }
            Ok(bufs)
        })
    }

    fn write_zeroes(&self, offset: u64, length: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.closed.check()?;
            if !self.client.can_write() {
                return Err(Error::ReadOnly);
            }
            if self.client.can_zero() {
                return self
                    .client
                    .write_zeroes(offset, length, nbd_client::ZeroFlags::default())
                    .await
                    .map_err(self.err());
            }
            let mut done = 0;
            while done < length {
                let n = (length - done).min(1 << 20);
                self.client
                    .write(offset + done, &vec![0u8; n as usize])
                    .await
                    .map_err(self.err())?;
                done += n;
            }
            Ok(())
        })
    }

    fn discard(&self, offset: u64, length: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.closed.check()?;
            if self.client.can_trim() {
                self.client.trim(offset, length).await.map_err(self.err())
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
            if self.client.can_flush() && self.client.can_write() {
                self.client.flush().await.map_err(self.err())
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
            if !self.client.has_block_status() {
                return Err(Error::Unsupported(
                    "block status: the NBD server offers no base:allocation context",
                ));
            }
            let extents = self
                .client
                .block_status(offset, length)
                .await
                .map_err(self.err())?;
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
        Capabilities {
            writable: self.client.can_write(),
            block_status: self.client.has_block_status(),
            discard: self.client.can_trim(),
            fua: self.client.can_write(),
            reconnect: true,
        }
    }

    fn reconnect(&self) -> Option<Arc<dyn Reconnect>> {
        Some(self.link.clone())
    }

    fn describe(&self) -> String {
        format!("nbd {}", self.uri)
    }

    fn close(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.closed.close() {
                self.client.close().await;
            }
            Ok(())
        })
    }
}
