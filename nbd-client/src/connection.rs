//! One NBD connection in the transmission phase.
//!
//! A writer task owns the socket's write half and sends requests queued on a channel, so a request
//! is either not sent at all or sent whole, whatever happens to the future that asked for it. A
//! reader task owns the read half and demultiplexes replies by cookie into per-request slots. A
//! slot owns its read buffer: OFFSET_DATA payloads are read straight into it, and a dropped request
//! future leaves its slot in place so its chunks are still consumed (no desynchronisation).
//!
//! Every chunk is validated before anything the server's numbers chose is allocated; a framing or
//! protocol error kills the connection (all its requests fail with [`Error::Protocol`]), an error
//! the server reports fails only its request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

use crate::error::{Errno, Error, Violation};
use crate::handshake::ExportInfo;
use crate::protocol::*;

/// Most disjoint pieces a single read may be assembled from before we call it hostile.
const MAX_READ_FRAGMENTS: usize = 65536;
/// Largest error chunk payload: errno, length, a 4096-byte message and an offset.
const MAX_ERROR_CHUNK: u64 = 4 + 2 + MAX_ERROR_MESSAGE as u64 + 8;

/// Limits of one connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_in_flight: usize,
    pub max_bytes_in_flight: usize,
    pub request_timeout: Option<Duration>,
}

/// What a request carries in and gets back.
#[derive(Debug)]
pub(crate) enum Body {
    /// A read into a buffer of exactly the request length.
    Read(Vec<u8>),
    /// A write with its payload.
    Write(Vec<u8>),
    /// Block status.
    BlockStatus,
    /// Anything without data.
    Empty,
}

/// A completed request.
#[derive(Debug)]
pub(crate) enum Completion {
    Read(Vec<u8>),
    BlockStatus(Vec<RawExtent>),
    Done,
}

/// Called once when a connection dies, with the reason.
pub(crate) type DeathHook = Arc<dyn Fn(&Error) + Send + Sync>;

/// The byte ranges of one read that have arrived, relative to the request offset, sorted and
/// merged.
#[derive(Debug, Default)]
struct Coverage {
    ranges: Vec<(u64, u64)>,
}

impl Coverage {
    /// Record `[start, end)`, refusing any overlap with what arrived before.
    fn insert(&mut self, start: u64, end: u64) -> Result<(), Violation> {
        let i = self.ranges.partition_point(|r| r.1 <= start);
        if let Some(&(s, _)) = self.ranges.get(i) {
            if s < end {
                return Err(Violation::ChunkOverlap {
                    offset: start,
                    length: end - start,
                });
            }
        }
        let merge_prev = i > 0 && self.ranges[i - 1].1 == start;
        let merge_next = self.ranges.get(i).is_some_and(|r| r.0 == end);
        match (merge_prev, merge_next) {
            (true, true) => {
                self.ranges[i - 1].1 = self.ranges[i].1;
                self.ranges.remove(i);
            }
            (true, false) => self.ranges[i - 1].1 = end,
            (false, true) => self.ranges[i].0 = start,
            (false, false) => {
                if self.ranges.len() >= MAX_READ_FRAGMENTS {
                    return Err(Violation::TooFragmented);
                }
                self.ranges.insert(i, (start, end));
            }
        }
        Ok(())
    }

    fn received(&self) -> u64 {
        self.ranges.iter().map(|r| r.1 - r.0).sum()
    }

    fn is_complete(&self, len: u64) -> bool {
        self.ranges.len() == 1 && self.ranges[0] == (0, len)
    }
}

#[derive(Debug)]
enum SlotBody {
    Read {
        buf: Option<Vec<u8>>,
        covered: Coverage,
    },
    BlockStatus {
        extents: Vec<RawExtent>,
        seen: bool,
    },
    Other,
}

#[derive(Debug)]
struct Slot {
    command: Command,
    offset: u64,
    length: u64,
    body: SlotBody,
    error: Option<Error>,
    reply: oneshot::Sender<Result<Completion, Error>>,
    _permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
}

#[derive(Debug, Default)]
struct Inflight {
    next_cookie: u64,
    slots: HashMap<u64, Slot>,
    dead: Option<Error>,
}

enum Outgoing {
    Request {
        header: [u8; 32],
        header_len: usize,
        payload: Option<Vec<u8>>,
    },
    Disconnect {
        header: [u8; 32],
        header_len: usize,
    },
}

struct Shared {
    export: Arc<ExportInfo>,
    inflight: Mutex<Inflight>,
    /// Becomes true when the connection is dead; tasks stop on it.
    dead_tx: watch::Sender<bool>,
    /// Signalled whenever the in-flight table becomes empty.
    drained: tokio::sync::Notify,
    /// Set before a deliberate disconnect, so the server's EOF is not a loss.
    closing: std::sync::atomic::AtomicBool,
    on_death: DeathHook,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("export", &self.export)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inflight> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Declare the connection dead: fail every request in flight with `err`. Idempotent.
    fn kill(&self, err: Error) {
        let slots = {
            let mut g = self.lock();
            if g.dead.is_some() {
                return;
            }
            g.dead = Some(err.clone());
            std::mem::take(&mut g.slots)
        };
        self.dead_tx.send_replace(true);
        if !matches!(err, Error::Closed) {
            tracing::debug!(error = %err, "NBD connection died");
        }
        // Tell the owner first, so that requests woken below see the new state.
        (self.on_death)(&err);
        for (_, slot) in slots {
            let _ = slot.reply.send(Err(err.clone()));
        }
        self.drained.notify_waiters();
    }

    fn is_dead(&self) -> bool {
        self.lock().dead.is_some()
    }
}

/// A live connection: submit requests, close it.
#[derive(Debug)]
pub(crate) struct Connection {
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Outgoing>,
    count: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    limits: Limits,
}

impl Connection {
    /// Start the reader and writer tasks on the two halves of a negotiated stream.
    pub(crate) fn start<R, W>(
        reader: R,
        writer: W,
        export: Arc<ExportInfo>,
        limits: Limits,
        on_death: DeathHook,
    ) -> Connection
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (dead_tx, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            export,
            inflight: Mutex::new(Inflight {
                next_cookie: 1,
                ..Default::default()
            }),
            dead_tx,
            drained: tokio::sync::Notify::new(),
            closing: std::sync::atomic::AtomicBool::new(false),
            on_death,
        });
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(writer, rx, shared.clone()));
        tokio::spawn(read_loop(reader, shared.clone()));
        Connection {
            shared,
            tx,
            count: Arc::new(Semaphore::new(limits.max_in_flight.max(1))),
            bytes: Arc::new(Semaphore::new(
                limits.max_bytes_in_flight.max(MAX_REQUEST_PAYLOAD as usize),
            )),
            limits,
        }
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.shared.is_dead()
    }

    /// What the handshake of this connection established.
    pub(crate) fn export(&self) -> &ExportInfo {
        &self.shared.export
    }

    /// Kill the connection (e.g. on client shutdown or when reconnecting the whole pool).
    pub(crate) fn kill(&self, err: Error) {
        self.shared.kill(err);
    }

    /// Send one request and wait for its completion. The caller has validated it.
    pub(crate) async fn submit(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u64,
        body: Body,
    ) -> Result<Completion, Error> {
        let permits = self.acquire_permits(&body, length).await?;
        let (reply_tx, reply_rx) = oneshot::channel();
        let (slot_body, payload) = slot_body(body);
        let slot = Slot {
            command,
            offset,
            length,
            body: slot_body,
            error: None,
            reply: reply_tx,
            _permits: permits,
        };
        self.enqueue(flags, slot, payload)?;
        self.wait_reply(reply_rx).await
    }

    /// Take a request slot and, for a read or write, its share of the bytes-in-flight budget.
    async fn acquire_permits(
        &self,
        body: &Body,
        length: u64,
    ) -> Result<(OwnedSemaphorePermit, Option<OwnedSemaphorePermit>), Error> {
        let count = self
            .count
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Closed)?;
        let data_bytes = match body {
            Body::Read(_) | Body::Write(_) => length.min(u64::from(MAX_REQUEST_PAYLOAD)) as u32,
            _ => 0,
        };
        let bytes = if data_bytes > 0 {
            Some(
                self.bytes
                    .clone()
                    .acquire_many_owned(data_bytes)
                    .await
                    .map_err(|_| Error::Closed)?,
            )
        } else {
            None
        };
        Ok((count, bytes))
    }

    /// Give `slot` a cookie, register it and queue its request for the writer. On failure the
    /// slot (and its permits) is dropped again.
    fn enqueue(&self, flags: u16, slot: Slot, payload: Option<Vec<u8>>) -> Result<(), Error> {
        let mut header = [0u8; 32];
        let mut g = self.shared.lock();
        if let Some(e) = &g.dead {
            return Err(e.clone());
        }
        let cookie = g.next_cookie;
        g.next_cookie = g.next_cookie.wrapping_add(1).max(1);
        let h = RequestHeader {
            flags,
            command: slot.command,
            cookie,
            offset: slot.offset,
            length: slot.length,
        };
        let header_len = encode_request(&h, self.shared.export.mode, &mut header);
        g.slots.insert(cookie, slot);
        // Queue while holding the lock: a kill cannot slip between insert and send.
        if self
            .tx
            .send(Outgoing::Request {
                header,
                header_len,
                payload,
            })
            .is_err()
        {
            g.slots.remove(&cookie);
            return Err(g.dead.clone().unwrap_or_else(Error::eof));
        }
        Ok(())
    }

    /// Wait for the reader task to complete a request, within the request timeout if any.
    async fn wait_reply(
        &self,
        reply_rx: oneshot::Receiver<Result<Completion, Error>>,
    ) -> Result<Completion, Error> {
        let wait = async { reply_rx.await.unwrap_or_else(|_| Err(Error::eof())) };
        match self.limits.request_timeout {
            None => wait.await,
            Some(t) => match tokio::time::timeout(t, wait).await {
                Ok(r) => r,
                Err(_) => {
                    // The server stopped answering this request: the stream can no longer be
                    // trusted to make progress. Kill the connection (reconnect may follow).
                    // Other requests see a lost connection (and are re-sent after a reconnect).
                    let lost = std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "a request timed out; connection dropped",
                    );
                    self.shared.kill(Error::io(lost));
                    Err(Error::Timeout {
                        what: "request",
                        after: t,
                    })
                }
            },
        }
    }

    /// Wait for requests in flight to finish, send NBD_CMD_DISC, and wait (briefly) for the server
    /// to close its side.
    pub(crate) async fn close(&self) {
        self.shared
            .closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let drain = async {
            loop {
                let notified = self.shared.drained.notified();
                {
                    let g = self.shared.lock();
                    if g.slots.is_empty() || g.dead.is_some() {
                        break;
                    }
                }
                notified.await;
            }
        };
        // Requests have their own deadline; without one, do not wait for ever either.
        let limit = self
            .limits
            .request_timeout
            .unwrap_or(Duration::from_secs(30));
        if tokio::time::timeout(limit, drain).await.is_err() {
            tracing::warn!(
                "NBD close: requests still in flight after {limit:?}; disconnecting anyway"
            );
        }
        let mut dead_rx = self.shared.dead_tx.subscribe();
        if !self.is_dead() {
            let mut header = [0u8; 32];
            let h = RequestHeader {
                flags: 0,
                command: Command::Disconnect,
                cookie: 0,
                offset: 0,
                length: 0,
            };
            let header_len = encode_request(&h, self.shared.export.mode, &mut header);
            let _ = self.tx.send(Outgoing::Disconnect { header, header_len });
            let _ = tokio::time::timeout(Duration::from_secs(2), dead_rx.wait_for(|d| *d)).await;
        }
        self.shared.kill(Error::Closed);
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // No async drop: send NBD_CMD_DISC if still alive (queued after any pending request) so the
        // server sees a clean exit; the tasks then finish on their own.
        if !self.is_dead() {
            tracing::warn!("NBD connection dropped without Client::close(); sending NBD_CMD_DISC");
            self.shared
                .closing
                .store(true, std::sync::atomic::Ordering::SeqCst);
            let mut header = [0u8; 32];
            let h = RequestHeader {
                flags: 0,
                command: Command::Disconnect,
                cookie: 0,
                offset: 0,
                length: 0,
            };
            let header_len = encode_request(&h, self.shared.export.mode, &mut header);
            let _ = self.tx.send(Outgoing::Disconnect { header, header_len });
        }
    }
}

/// The slot side of a request body, and the payload to send (for a write).
fn slot_body(body: Body) -> (SlotBody, Option<Vec<u8>>) {
    match body {
        Body::Read(buf) => (
            SlotBody::Read {
                buf: Some(buf),
                covered: Coverage::default(),
            },
            None,
        ),
        Body::Write(p) => (SlotBody::Other, Some(p)),
        Body::BlockStatus => (
            SlotBody::BlockStatus {
                extents: Vec::new(),
                seen: false,
            },
            None,
        ),
        Body::Empty => (SlotBody::Other, None),
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    writer: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    shared: Arc<Shared>,
) {
    let mut w = BufWriter::with_capacity(64 * 1024, writer);
    let mut dead = shared.dead_tx.subscribe();
    let result: std::io::Result<()> = async {
        loop {
            let msg = tokio::select! {
                m = rx.recv() => m,
                _ = dead.wait_for(|d| *d) => return Ok(()),
            };
            let mut next = msg;
            loop {
                match next {
                    None => {
                        w.flush().await?;
                        return w.shutdown().await;
                    }
                    Some(Outgoing::Request {
                        header,
                        header_len,
                        payload,
                    }) => {
                        w.write_all(&header[..header_len]).await?;
                        if let Some(p) = payload {
                            w.write_all(&p).await?;
                        }
                    }
                    Some(Outgoing::Disconnect { header, header_len }) => {
                        w.write_all(&header[..header_len]).await?;
                        w.flush().await?;
                        return w.shutdown().await;
                    }
                }
                match rx.try_recv() {
                    Ok(m) => next = Some(m),
                    Err(_) => break,
                }
            }
            w.flush().await?;
        }
    }
    .await;
    if let Err(e) = result {
        shared.kill(Error::io(e));
    }
}

async fn read_loop<R: AsyncRead + Unpin>(reader: R, shared: Arc<Shared>) {
    // A small buffer merges the header reads of a chunk into one syscall; payloads larger than
    // it still go straight from the socket into the request's buffer.
    let mut reader = tokio::io::BufReader::with_capacity(4096, reader);
    let mut dead = shared.dead_tx.subscribe();
    let result = tokio::select! {
        r = read_replies(&mut reader, &shared) => r,
        _ = dead.wait_for(|d| *d) => return,
    };
    let err = match result {
        Ok(()) => return,
        Err(Error::ConnectionLost(_))
            if shared.closing.load(std::sync::atomic::Ordering::SeqCst) =>
        {
            Error::Closed
        }
        Err(e) => e,
    };
    shared.kill(err);
}

fn io_err(e: std::io::Error) -> Error {
    Error::io(e)
}

/// Read replies until an error (EOF included).
async fn read_replies<R: AsyncRead + Unpin>(r: &mut R, shared: &Shared) -> Result<(), Error> {
    let mode = shared.export.mode;
    let mut start = [0u8; 16];
    loop {
        r.read_exact(&mut start).await.map_err(io_err)?;
        match decode_reply_start(&start, mode)? {
            ReplyStart::Simple { error, cookie } => simple_reply(r, shared, error, cookie).await?,
            ReplyStart::Structured {
                flags,
                chunk_type,
                cookie,
            } => {
                let mut l = [0u8; 4];
                r.read_exact(&mut l).await.map_err(io_err)?;
                chunk(
                    r,
                    shared,
                    flags,
                    chunk_type,
                    cookie,
                    None,
                    u64::from(u32::from_be_bytes(l)),
                )
                .await?;
            }
            ReplyStart::Extended {
                flags,
                chunk_type,
                cookie,
            } => {
                let mut l = [0u8; 16];
                r.read_exact(&mut l).await.map_err(io_err)?;
                chunk(
                    r,
                    shared,
                    flags,
                    chunk_type,
                    cookie,
                    Some(be64(&l, 0)),
                    be64(&l, 8),
                )
                .await?;
            }
        }
    }
}

fn server_error(slot: &Slot, errno: u32, message: String, error_offset: Option<u64>) -> Error {
    Error::Server {
        command: slot.command,
        offset: slot.offset,
        length: slot.length,
        errno: Errno(errno),
        message,
        error_offset,
    }
}

/// Finish a slot and hand its result to the waiter (if still there).
fn complete(shared: &Shared, g: &mut Inflight, cookie: u64, result: Result<Completion, Error>) {
    if let Some(slot) = g.slots.remove(&cookie) {
        let _ = slot.reply.send(result);
    }
    if g.slots.is_empty() {
        shared.drained.notify_waiters();
    }
}

/// The connection died under us (kill from another task): stop reading.
fn gone(g: &Inflight) -> Error {
    g.dead.clone().unwrap_or(Error::Closed)
}

async fn simple_reply<R: AsyncRead + Unpin>(
    r: &mut R,
    shared: &Shared,
    error: u32,
    cookie: u64,
) -> Result<(), Error> {
    let mode = shared.export.mode;
    let mut buf = {
        let mut g = shared.lock();
        let slot = g
            .slots
            .get_mut(&cookie)
            .ok_or(Violation::UnknownCookie(cookie))?;
        if error != 0 {
            let e = server_error(slot, error, String::new(), None);
            complete(shared, &mut g, cookie, Err(e));
            return Ok(());
        }
        match (&mut slot.body, mode) {
            (SlotBody::Read { .. }, HeaderMode::Structured | HeaderMode::Extended) => {
                return Err(Violation::SimpleReplyToRead.into())
            }
            (SlotBody::Read { buf, .. }, HeaderMode::Simple) => {
                buf.take().ok_or(Violation::SimpleReplyToRead)?
            }
            (SlotBody::BlockStatus { .. }, _) => return Err(Violation::NoExtents.into()),
            (SlotBody::Other, _) => {
                complete(shared, &mut g, cookie, Ok(Completion::Done));
                return Ok(());
            }
        }
    };
    // Simple-reply mode: the read data follows, exactly the request length.
    r.read_exact(&mut buf).await.map_err(io_err)?;
    let mut g = shared.lock();
    if !g.slots.contains_key(&cookie) {
        return Err(gone(&g));
    }
    complete(shared, &mut g, cookie, Ok(Completion::Read(buf)));
    Ok(())
}

async fn read_payload<R: AsyncRead + Unpin>(r: &mut R, len: u64) -> Result<Vec<u8>, Error> {
    // `len` is bounded by the caller before this allocation.
    let mut p = vec![0u8; len as usize];
    r.read_exact(&mut p).await.map_err(io_err)?;
    Ok(p)
}

/// Check that `[off, off+len)` lies inside the request and record it; returns the position
/// relative to the request.
fn claim(slot: &mut Slot, off: u64, len: u64) -> Result<usize, Violation> {
    let rel = off.checked_sub(slot.offset);
    let end = rel.and_then(|r| r.checked_add(len));
    match (rel, end) {
        (Some(rel), Some(end)) if end <= slot.length => {
            let SlotBody::Read { covered, .. } = &mut slot.body else {
                unreachable!("claim is only called for reads")
            };
            covered.insert(rel, end)?;
            Ok(rel as usize)
        }
        _ => Err(Violation::ChunkOutOfRange {
            offset: off,
            length: len,
            req_offset: slot.offset,
            req_length: slot.length,
        }),
    }
}

/// A structured or extended reply chunk's header, with what its request asked for.
#[derive(Debug, Clone, Copy)]
struct ChunkHeader {
    chunk_type: u16,
    cookie: u64,
    /// Payload length.
    len: u64,
    command: Command,
    req_offset: u64,
    req_length: u64,
}

impl ChunkHeader {
    fn bad_length(&self) -> Violation {
        Violation::BadChunkLength {
            chunk_type: self.chunk_type,
            length: self.len,
        }
    }

    fn unexpected(&self) -> Violation {
        Violation::UnexpectedChunk {
            chunk_type: self.chunk_type,
            command: self.command,
        }
    }
}

/// What a chunk turned out to be once its type, command and length were checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkKind {
    None,
    OffsetData,
    OffsetHole,
    BlockStatus,
    Error,
}

#[allow(clippy::too_many_arguments)]
async fn chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    shared: &Shared,
    flags: u16,
    chunk_type: u16,
    cookie: u64,
    ext_offset: Option<u64>,
    len: u64,
) -> Result<(), Error> {
    let done = flags & REPLY_FLAG_DONE != 0;
    let c = chunk_header(shared, chunk_type, cookie, ext_offset, len)?;
    match classify_chunk(&c, shared.export.mode, done)? {
        ChunkKind::None => {}
        ChunkKind::OffsetData => offset_data_chunk(r, shared, &c).await?,
        ChunkKind::OffsetHole => offset_hole_chunk(r, shared, &c).await?,
        ChunkKind::BlockStatus => block_status_chunk(r, shared, &c).await?,
        ChunkKind::Error => error_chunk(r, shared, &c).await?,
    }
    if done {
        complete_chunked(shared, cookie)?;
    }
    Ok(())
}

/// Look up the request a chunk answers, and check the offset an extended header echoes.
fn chunk_header(
    shared: &Shared,
    chunk_type: u16,
    cookie: u64,
    ext_offset: Option<u64>,
    len: u64,
) -> Result<ChunkHeader, Violation> {
    let (command, req_offset, req_length) = {
        let g = shared.lock();
        let slot = g
            .slots
            .get(&cookie)
            .ok_or(Violation::UnknownCookie(cookie))?;
        (slot.command, slot.offset, slot.length)
    };
    if let Some(o) = ext_offset {
        if o != req_offset {
            return Err(Violation::OffsetNotEchoed {
                expected: req_offset,
                found: o,
            });
        }
    }
    Ok(ChunkHeader {
        chunk_type,
        cookie,
        len,
        command,
        req_offset,
        req_length,
    })
}

/// Check that a chunk of this type may answer the request and that its length fits the type,
/// before any of its payload is read.
fn classify_chunk(c: &ChunkHeader, mode: HeaderMode, done: bool) -> Result<ChunkKind, Violation> {
    let len = c.len;
    match c.chunk_type {
        CHUNK_NONE => {
            if len != 0 || !done {
                return Err(Violation::BadNoneChunk);
            }
            Ok(ChunkKind::None)
        }
        CHUNK_OFFSET_DATA => {
            if c.command != Command::Read {
                return Err(c.unexpected());
            }
            if len < 9 || len - 8 > c.req_length {
                return Err(c.bad_length());
            }
            Ok(ChunkKind::OffsetData)
        }
        CHUNK_OFFSET_HOLE => {
            if c.command != Command::Read {
                return Err(c.unexpected());
            }
            if len != 12 {
                return Err(c.bad_length());
            }
            Ok(ChunkKind::OffsetHole)
        }
        CHUNK_BLOCK_STATUS | CHUNK_BLOCK_STATUS_EXT => {
            let right_kind = (c.chunk_type == CHUNK_BLOCK_STATUS) == (mode != HeaderMode::Extended);
            if c.command != Command::BlockStatus || !right_kind {
                return Err(c.unexpected());
            }
            if len > MAX_METADATA_CHUNK {
                return Err(c.bad_length());
            }
            Ok(ChunkKind::BlockStatus)
        }
        t if t & CHUNK_FLAG_ERROR != 0 => {
            if len > MAX_ERROR_CHUNK {
                return Err(c.bad_length());
            }
            Ok(ChunkKind::Error)
        }
        _ => Err(c.unexpected()),
    }
}

/// OFFSET_DATA (length checked): read the data straight into the request's buffer.
async fn offset_data_chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    shared: &Shared,
    c: &ChunkHeader,
) -> Result<(), Error> {
    let mut o = [0u8; 8];
    r.read_exact(&mut o).await.map_err(io_err)?;
    let off = u64::from_be_bytes(o);
    let data_len = c.len - 8;
    let (pos, mut buf) = {
        let mut g = shared.lock();
        let Some(slot) = g.slots.get_mut(&c.cookie) else {
            return Err(gone(&g));
        };
        let pos = claim(slot, off, data_len)?;
        let SlotBody::Read { buf, .. } = &mut slot.body else {
            unreachable!("checked command")
        };
        (pos, buf.take().ok_or(Violation::SimpleReplyToRead)?)
    };
    let res = r.read_exact(&mut buf[pos..pos + data_len as usize]).await;
    let mut g = shared.lock();
    let Some(slot) = g.slots.get_mut(&c.cookie) else {
        return Err(gone(&g));
    };
    if let SlotBody::Read { buf: b, .. } = &mut slot.body {
        *b = Some(buf);
    }
    res.map_err(io_err)?;
    Ok(())
}

/// OFFSET_HOLE (length checked): zero the range in the request's buffer.
async fn offset_hole_chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    shared: &Shared,
    c: &ChunkHeader,
) -> Result<(), Error> {
    let mut p = [0u8; 12];
    r.read_exact(&mut p).await.map_err(io_err)?;
    let (off, hole_len) = (be64(&p, 0), u64::from(be32(&p, 8)));
    if hole_len == 0 {
        return Err(Violation::BadChunkLength {
            chunk_type: c.chunk_type,
            length: 0,
        }
        .into());
    }
    let mut g = shared.lock();
    let Some(slot) = g.slots.get_mut(&c.cookie) else {
        return Err(gone(&g));
    };
    let pos = claim(slot, off, hole_len)?;
    if let SlotBody::Read { buf: Some(b), .. } = &mut slot.body {
        b[pos..pos + hole_len as usize].fill(0);
    }
    Ok(())
}

/// BLOCK_STATUS or BLOCK_STATUS_EXT (kind and length checked): keep the extents of
/// `base:allocation`, once.
async fn block_status_chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    shared: &Shared,
    c: &ChunkHeader,
) -> Result<(), Error> {
    let p = read_payload(r, c.len).await?;
    let mut extents = Vec::new();
    let id = if c.chunk_type == CHUNK_BLOCK_STATUS {
        decode_block_status(&p, &mut extents)?
    } else {
        decode_block_status_ext(&p, &mut extents)?
    };
    let mut g = shared.lock();
    let Some(slot) = g.slots.get_mut(&c.cookie) else {
        return Err(gone(&g));
    };
    if Some(id) == shared.export.base_allocation {
        let SlotBody::BlockStatus { extents: e, seen } = &mut slot.body else {
            unreachable!("checked command")
        };
        if *seen {
            return Err(Violation::DuplicateBlockStatus.into());
        }
        *seen = true;
        *e = extents;
    }
    Ok(())
}

/// An error chunk (length checked): remember the first error the server reports for the request.
async fn error_chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    shared: &Shared,
    c: &ChunkHeader,
) -> Result<(), Error> {
    let p = read_payload(r, c.len).await?;
    let known = if c.chunk_type == CHUNK_ERROR_OFFSET {
        CHUNK_ERROR_OFFSET
    } else {
        CHUNK_ERROR
    };
    let ec = decode_error_chunk(known, &p)?;
    if let Some(o) = ec.offset {
        if o < c.req_offset || o - c.req_offset >= c.req_length.max(1) {
            return Err(Violation::ErrorOffsetOutOfRange(o).into());
        }
    }
    let mut g = shared.lock();
    let Some(slot) = g.slots.get_mut(&c.cookie) else {
        return Err(gone(&g));
    };
    if slot.error.is_none() {
        slot.error = Some(server_error(slot, ec.errno, ec.message, ec.offset));
    }
    Ok(())
}

/// The DONE chunk arrived: finish the request with its error or its checked result.
fn complete_chunked(shared: &Shared, cookie: u64) -> Result<(), Error> {
    let mut g = shared.lock();
    let Some(slot) = g.slots.get_mut(&cookie) else {
        return Err(gone(&g));
    };
    let result = match slot.error.take() {
        Some(e) => Err(e),
        None => Ok(take_completion(slot)?),
    };
    complete(shared, &mut g, cookie, result);
    Ok(())
}

/// The result of a request whose chunks are all in: a read must be covered entirely, a block
/// status request must have had its extents.
fn take_completion(slot: &mut Slot) -> Result<Completion, Violation> {
    match &mut slot.body {
        SlotBody::Read { buf, covered } => {
            if !covered.is_complete(slot.length) {
                return Err(Violation::ReadIncomplete {
                    req_offset: slot.offset,
                    req_length: slot.length,
                    received: covered.received(),
                });
            }
            Ok(Completion::Read(buf.take().unwrap_or_default()))
        }
        SlotBody::BlockStatus { extents, seen } => {
            if !*seen {
                return Err(Violation::NoExtents);
            }
            Ok(Completion::BlockStatus(std::mem::take(extents)))
        }
        SlotBody::Other => Ok(Completion::Done),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_rejects_overlap_and_tracks_gaps() {
        let mut c = Coverage::default();
        c.insert(0, 10).unwrap();
        c.insert(20, 30).unwrap();
        assert!(!c.is_complete(30));
        assert_eq!(c.received(), 20);
        assert!(c.insert(5, 15).is_err());
        assert!(c.insert(15, 25).is_err());
        assert!(c.insert(0, 10).is_err(), "exact duplicate");
        c.insert(10, 20).unwrap();
        assert!(c.is_complete(30));
        assert_eq!(c.ranges, vec![(0, 30)]);
    }

    #[test]
    fn coverage_out_of_order() {
        let mut c = Coverage::default();
        c.insert(8, 12).unwrap();
        c.insert(0, 4).unwrap();
        c.insert(4, 8).unwrap();
        assert!(c.is_complete(12));
    }
}
