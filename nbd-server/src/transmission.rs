//! The transmission phase of one connection: one reader, many requests in flight, one writer.
//!
//! The reader decodes a header, reads a WRITE's payload (never more than `max_request_bytes`
//! into memory: a longer one is skipped in small pieces and refused), validates the request
//! as the spec says, and runs it as a task of its own. Each task composes its whole reply
//! (every chunk) and hands it to the writer, which writes replies whole and in the order they
//! come, so the chunks of two replies never interleave: the replies waiting at one time go out
//! in one vectored write (no copy into a buffer of ours). Two semaphores bound a connection: requests in flight, and
//! bytes held for payloads and read data; a permit is released once its reply is written.
//!
//! A READ asks the device for data and status in one step where the device can give both
//! ([`BlockDevice::read_mapped`]: a fully local QED range is one blocking-pool hop), else for
//! block status then the data; either way the data lands in one page-aligned buffer, taken
//! from the export's [`RecycledBufs`](copy_on_read::RecycledBufs) (the writer gives it back),
//! and only ranges that read as zeros become OFFSET_HOLE chunks.
//!
//! Every request that was read gets an answer (unless the client goes away first); requests
//! already running when the client vanishes or disconnects still complete, so a write the
//! client saw acknowledged is in the device.

use std::io::IoSlice;
use std::ops::Range;
use std::sync::Arc;

use copy_on_read::{read_into, status_padded, BlockDevice, IoBufs, PoolBuf, Status, WriteFlags};
use nbd_proto::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::error::Disconnect;
use crate::export::Export;
use crate::handshake::Negotiated;
use crate::server::Counters;

/// The most extents one BLOCK_STATUS chunk carries (the spec allows 2^20).
const MAX_EXTENTS: usize = 1 << 16;
/// The most one BLOCK_STATUS request looks at: a longer request is answered for a prefix of
/// this length (the spec lets a server cover less than asked), so no request costs more than
/// a bounded walk of the device's map.
const MAX_STATUS_SPAN: u64 = 1 << 31;
/// A WRITE payload above the maximum is skipped (and refused) up to this size; above it the
/// client is disconnected, as its request cannot be meant.
const MAX_SKIPPED_PAYLOAD: u64 = u32::MAX as u64;
/// The most replies the writer sends in one vectored write.
const MAX_BATCH: usize = 64;
/// The most slices one `writev` is given (below every system's IOV_MAX).
const MAX_IOV: usize = 512;
/// A reply's bytes: chunk headers and small payloads in `head`, read data in `data`; each
/// frame is a range of `head` followed by a range of `data`.
#[derive(Debug, Default)]
struct Frames {
    head: Vec<u8>,
    data: PoolBuf,
    frames: Vec<(Range<usize>, Range<usize>)>,
}

impl Frames {
    /// A reply with no read data: the parts in order.
    fn from_parts(parts: Vec<Vec<u8>>) -> Frames {
        let head = parts.concat();
        let frames = vec![(0..head.len(), 0..0)];
        Frames {
            head,
            data: PoolBuf::default(),
            frames,
        }
    }

    /// Appends `head` and then `data[range]` (already in `self.data`).
    fn push(&mut self, head: &[u8], data: Range<usize>) {
        let start = self.head.len();
        self.head.extend_from_slice(head);
        self.frames.push((start..self.head.len(), data));
    }

    /// The slices to write, in order.
    fn slices(&self) -> impl Iterator<Item = &[u8]> {
        self.frames
            .iter()
            .flat_map(|(h, d)| [&self.head[h.clone()], &self.data[d.clone()]])
            .filter(|s| !s.is_empty())
    }
}

/// Per-connection bounds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_request_bytes: u32,
    pub max_in_flight: usize,
    pub max_buffered_bytes: usize,
}

/// One negotiated connection's shared state.
pub(crate) struct Connection {
    export: Arc<Export>,
    mode: HeaderMode,
    base_allocation: Option<u32>,
    allocation_depth: Option<u32>,
    limits: Limits,
    counters: Arc<Counters>,
}

/// A complete reply: its bytes, and the permits it holds until written.
struct Reply {
    frames: Frames,
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// What the reader decided about one request.
enum Admission {
    /// Answer at once with this error.
    Refuse(Request, Errno, String),
    /// Run it.
    Run(Work),
    /// NBD_CMD_DISC.
    Disconnect,
}

/// A validated request, with its payload and the byte permit that covers it.
struct Work {
    request: Request,
    command: Command,
    payload: Vec<u8>,
    bytes: Option<OwnedSemaphorePermit>,
}

/// Serves requests from `reader` until the client disconnects, breaks the framing, goes
/// away, or `shutdown` turns true; then waits for the requests in flight and their replies.
pub(crate) async fn serve<R, W>(
    negotiated: Negotiated,
    limits: Limits,
    counters: Arc<Counters>,
    mut reader: R,
    writer: W,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Disconnect>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(Connection {
        export: negotiated.export,
        mode: negotiated.mode,
        base_allocation: negotiated.base_allocation,
        allocation_depth: negotiated.allocation_depth,
        limits,
        counters,
    });
    let (tx, rx) = mpsc::unbounded_channel();
    let writer_task = tokio::spawn(write_replies(writer, rx, Arc::clone(&conn.export.pool)));
    let slots = Arc::new(Semaphore::new(limits.max_in_flight.max(1)));
    let bytes = Arc::new(Semaphore::new(
        limits
            .max_buffered_bytes
            .max(limits.max_request_bytes as usize),
    ));
    let header_len = request_header_len(conn.mode);
    let ended = loop {
        let mut h = [0u8; 32];
        let read = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => break Ok(()),
            r = reader.read_exact(&mut h[..header_len]) => r,
        };
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e.into()),
        }
        let request = match decode_request(&h[..header_len], conn.mode) {
            Ok(r) => r,
            Err(v) => break Err(v.into()),
        };
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            break Ok(());
        };
        conn.counters.request();
        match conn.admit(&mut reader, request, &bytes).await {
            Ok(Admission::Disconnect) => break Ok(()),
            Ok(Admission::Refuse(request, errno, message)) => {
                conn.counters.error();
                let frames = Frames::from_parts(conn.error_reply(&request, errno, &message));
                let _ = tx.send(Reply {
                    frames,
                    _slot: slot,
                    _bytes: None,
                });
            }
            Ok(Admission::Run(work)) => {
                let conn = Arc::clone(&conn);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let (frames, bytes) = conn.run(work).await;
                    let _ = tx.send(Reply {
                        frames,
                        _slot: slot,
                        _bytes: bytes,
                    });
                });
            }
            Err(d) => break Err(d),
        }
    };
    drop(tx);
    // The writer ends once every running request has sent its reply.
    let _ = writer_task.await;
    ended
}

/// Writes replies in the order they come, each whole: those waiting at one time (up to
/// [`MAX_BATCH`]) in one vectored write; gives their read buffers back to `pool`. After a
/// write fails (the client is gone) it still takes every reply, so that no task waits.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    pool: Arc<copy_on_read::RecycledBufs>,
) {
    let mut failed = false;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(reply) = rx.recv().await {
        batch.push(reply);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(reply) => batch.push(reply),
                Err(_) => break,
            }
        }
        if !failed && write_batch(&mut w, &batch).await.is_err() {
            failed = true;
        }
        // The permits go with the replies, once written.
        for reply in batch.drain(..) {
            pool.give(reply.frames.data);
        }
    }
    if !failed {
        let _ = w.flush().await;
        let _ = w.shutdown().await;
    }
}

/// Writes every byte of `batch` with as few `writev` calls as the socket allows.
async fn write_batch<W: AsyncWrite + Unpin>(w: &mut W, batch: &[Reply]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = batch
        .iter()
        .flat_map(|r| r.frames.slices())
        .map(IoSlice::new)
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = rest.len().min(MAX_IOV);
        let written = w.write_vectored(&rest[..n]).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, written);
    }
    w.flush().await
}

/// Reads and throws away `n` bytes, 64 KiB at a time.
async fn skip<R: AsyncRead + Unpin>(reader: &mut R, mut n: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    while n > 0 {
        let step = n.min(buf.len() as u64) as usize;
        reader.read_exact(&mut buf[..step]).await?;
        n -= step as u64;
    }
    Ok(())
}

/// The copy-on-read error as an NBD error value.
pub(crate) fn errno_of(e: &copy_on_read::Error) -> Errno {
    use copy_on_read::Error as E;
    match e {
        E::OutOfRange { .. } => return Errno::EINVAL,
        E::ReadOnly => return Errno::EPERM,
        E::Unsupported(_) => return Errno::ENOTSUP,
        E::Closed => return Errno::ESHUTDOWN,
        _ => {}
    }
    // A full disk anywhere in the chain of causes is ENOSPC.
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
                || io.kind() == std::io::ErrorKind::StorageFull
            {
                return Errno::ENOSPC;
            }
        }
        cause = c.source();
    }
    Errno::EIO
}

impl Connection {
    fn device(&self) -> &dyn BlockDevice {
        &*self.export.device
    }

    /// Reads the request's payload (bounded) and validates it.
    async fn admit<R: AsyncRead + Unpin>(
        &self,
        reader: &mut R,
        request: Request,
        bytes: &Arc<Semaphore>,
    ) -> Result<Admission, Disconnect> {
        let payload_length = request.payload_length(self.mode);
        let max = u64::from(self.limits.max_request_bytes);
        if payload_length > max {
            if payload_length > MAX_SKIPPED_PAYLOAD {
                return Err(Disconnect::Limit("request payload beyond any bound"));
            }
            skip(reader, payload_length).await?;
            let message = format!("payload of {payload_length} bytes exceeds the maximum {max}");
            return Ok(Admission::Refuse(request, Errno::EINVAL, message));
        }
        let mut held = None;
        let mut payload = Vec::new();
        if payload_length > 0 {
            let permit = Arc::clone(bytes)
                .acquire_many_owned(payload_length as u32)
                .await
                .map_err(|_| Disconnect::Limit("connection closing"))?;
            held = Some(permit);
            payload = vec![0u8; payload_length as usize];
            reader.read_exact(&mut payload).await?;
        }
        let command = match self.validate(&request) {
            Ok(c) => c,
            Err((errno, message)) => return Ok(Admission::Refuse(request, errno, message)),
        };
        if command == Command::Disconnect {
            return Ok(Admission::Disconnect);
        }
        if command == Command::Read && request.length > 0 {
            let permit = Arc::clone(bytes)
                .acquire_many_owned(request.length as u32)
                .await
                .map_err(|_| Disconnect::Limit("connection closing"))?;
            held = Some(permit);
        }
        Ok(Admission::Run(Work {
            request,
            command,
            payload,
            bytes: held,
        }))
    }

    /// The spec's checks, in qemu-nbd's order: command, flags, permission, range, size.
    fn validate(&self, r: &Request) -> Result<Command, (Errno, String)> {
        let einval = |m: String| Err((Errno::EINVAL, m));
        let Some(command) = Command::from_u16(r.command) else {
            return einval(format!("unknown command {}", r.command));
        };
        let mut allowed = CMD_FLAG_FUA;
        match command {
            Command::Read if self.mode.structured() => allowed |= CMD_FLAG_DF,
            Command::Write if self.mode == HeaderMode::Extended => allowed |= CMD_FLAG_PAYLOAD_LEN,
            Command::WriteZeroes => allowed |= CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            Command::BlockStatus => allowed |= CMD_FLAG_REQ_ONE,
            _ => {}
        }
        if r.flags & !allowed != 0 {
            return einval(format!(
                "unsupported flags for command {command} (got {:#x})",
                r.flags
            ));
        }
        let writes = matches!(
            command,
            Command::Write | Command::Trim | Command::WriteZeroes
        );
        if writes && self.export.is_read_only() {
            return Err((Errno::EPERM, "the export is read-only".into()));
        }
        let ranged = !matches!(command, Command::Disconnect | Command::Flush);
        let size = self.device().size();
        if ranged && r.offset.checked_add(r.length).is_none_or(|end| end > size) {
            let errno = if matches!(command, Command::Write | Command::WriteZeroes) {
                Errno::ENOSPC
            } else {
                Errno::EINVAL
            };
            let m = format!("{}+{} is past the end ({size})", r.offset, r.length);
            return Err((errno, m));
        }
        if command == Command::Read && r.length > u64::from(self.limits.max_request_bytes) {
            let max = self.limits.max_request_bytes;
            return einval(format!("read of {} exceeds the maximum {max}", r.length));
        }
        if command == Command::BlockStatus {
            if self.base_allocation.is_none() && self.allocation_depth.is_none() {
                return einval("no meta context negotiated".into());
            }
            if r.length == 0 {
                return einval("block status of length 0".into());
            }
        }
        Ok(command)
    }

    /// Runs a validated request; its reply, and the byte permit to hold until it is written.
    async fn run(&self, work: Work) -> (Frames, Option<OwnedSemaphorePermit>) {
        let r = &work.request;
        let result = match work.command {
            Command::Read => return (self.read_or_error(r).await, work.bytes),
            Command::Write => self.write(r, work.payload).await,
            Command::Flush => self.device().flush().await.map(|_| self.ok_reply(r)),
            Command::Trim => self.trim(r).await,
            Command::WriteZeroes => self.write_zeroes(r).await,
            Command::Cache => self.cache(r).await,
            Command::BlockStatus => self.block_status(r).await,
            Command::Disconnect => Ok(self.ok_reply(r)),
        };
        let parts = match result {
            Ok(parts) => parts,
            Err(e) => self.failed(r, work.command, &e),
        };
        (Frames::from_parts(parts), work.bytes)
    }

    /// Counts and logs a failed request; its error reply.
    fn failed(&self, r: &Request, command: Command, e: &copy_on_read::Error) -> Vec<Vec<u8>> {
        self.counters.error();
        tracing::debug!("{command} {}+{}: {e}", r.offset, r.length);
        self.error_reply(r, errno_of(e), &e.to_string())
    }

    async fn read_or_error(&self, r: &Request) -> Frames {
        match self.read(r).await {
            Ok(frames) => frames,
            Err(e) => Frames::from_parts(self.failed(r, Command::Read, &e)),
        }
    }

    fn chunk(&self, r: &Request, flags: u16, chunk_type: u16, payload_length: u64) -> Vec<u8> {
        let c = Chunk {
            flags,
            chunk_type,
            cookie: r.cookie,
            offset: r.offset,
            payload_length,
        };
        encode_chunk_header(&c, self.mode).as_bytes().to_vec()
    }

    /// Success of a command without data: a simple reply, or a NONE chunk with extended
    /// headers (which forbid simple replies).
    fn ok_reply(&self, r: &Request) -> Vec<Vec<u8>> {
        match self.mode {
            HeaderMode::Extended => vec![self.chunk(r, REPLY_FLAG_DONE, CHUNK_NONE, 0)],
            _ => vec![encode_simple_reply(0, r.cookie).to_vec()],
        }
    }

    /// An error: a simple reply, or an ERROR chunk with its message.
    fn error_reply(&self, r: &Request, errno: Errno, message: &str) -> Vec<Vec<u8>> {
        if !self.mode.structured() {
            return vec![encode_simple_reply(errno.0, r.cookie).to_vec()];
        }
        let payload = encode_error_chunk(errno, message);
        let header = self.chunk(r, REPLY_FLAG_DONE, CHUNK_ERROR, payload.len() as u64);
        vec![header, payload]
    }

    async fn write(&self, r: &Request, payload: Vec<u8>) -> copy_on_read::Result<Vec<Vec<u8>>> {
        let fua = r.flags & CMD_FLAG_FUA != 0;
        let flags = if fua {
            WriteFlags::FUA
        } else {
            WriteFlags::default()
        };
        let n = payload.len() as u64;
        self.device()
            .writev(r.offset, IoBufs::from(payload), flags)
            .await?;
        if fua && !self.device().capabilities().fua {
            self.device().flush().await?;
        }
        self.counters.written(n);
        Ok(self.ok_reply(r))
    }

    async fn flush_if_fua(&self, r: &Request) -> copy_on_read::Result<()> {
        if r.flags & CMD_FLAG_FUA != 0 {
            self.device().flush().await?;
        }
        Ok(())
    }

    async fn trim(&self, r: &Request) -> copy_on_read::Result<Vec<Vec<u8>>> {
        self.device().discard(r.offset, r.length).await?;
        self.flush_if_fua(r).await?;
        Ok(self.ok_reply(r))
    }

    /// WRITE_ZEROES. NO_HOLE needs nothing: neither a QED image (zero clusters stay in the
    /// image's own table) nor a raw file (zeros are written) deallocates. FAST_ZERO fails
    /// with ENOTSUP unless the device zeroes without writing data: a clustered device, over
    /// whole clusters.
    async fn write_zeroes(&self, r: &Request) -> copy_on_read::Result<Vec<Vec<u8>>> {
        if r.flags & CMD_FLAG_FAST_ZERO != 0 && !self.zeroes_fast(r.offset, r.length) {
            return Err(copy_on_read::Error::Unsupported(
                "fast zero: this range would be zeroed by writing data",
            ));
        }
        self.device().write_zeroes(r.offset, r.length).await?;
        self.flush_if_fua(r).await?;
        Ok(self.ok_reply(r))
    }

    fn zeroes_fast(&self, offset: u64, length: u64) -> bool {
        let Some(cs) = self.device().geometry().cluster_size.filter(|&c| c > 0) else {
            return false;
        };
        let end = offset + length;
        offset % cs == 0 && (end % cs == 0 || end == self.device().size())
    }

    /// CACHE: populate the local layer over the range (whole clusters) when the export has
    /// layers, otherwise read the range and throw the data away.
    async fn cache(&self, r: &Request) -> copy_on_read::Result<Vec<Vec<u8>>> {
        if let Some(layers) = &self.export.layers {
            match layers.populate_range(r.offset, r.length).await {
                Ok(_) => return Ok(self.ok_reply(r)),
                // A read-only image cannot be populated: warm by reading instead.
                Err(copy_on_read::Error::ReadOnly) => {}
                Err(e) => return Err(e),
            }
        }
        let step = u64::from(self.limits.max_request_bytes).clamp(4096, 1 << 20);
        let mut pos = r.offset;
        let end = r.offset + r.length;
        while pos < end {
            let n = (end - pos).min(step);
            self.device().read_at(pos, vec![0u8; n as usize]).await?;
            pos += n;
        }
        Ok(self.ok_reply(r))
    }

    /// What `[offset, offset + length)` reads as, covering the whole range (a device that
    /// cannot tell says data); at most [`MAX_EXTENTS`] runs, the rest said to be data.
    async fn status(&self, offset: u64, length: u64) -> copy_on_read::Result<Vec<(u64, Status)>> {
        let end = offset + length;
        let mut out: Vec<(u64, Status)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            if out.len() >= MAX_EXTENTS {
                out.push((end - pos, Status::Data));
                break;
            }
            let extents = status_padded(self.device(), pos, end - pos).await?;
            let before = pos;
            for e in extents {
                let from = e.offset.max(pos);
                let to = e.offset.saturating_add(e.length).min(end);
                if from != pos || to <= from {
                    break;
                }
                match out.last_mut() {
                    Some(last) if last.1 == e.status => last.0 += to - from,
                    _ => out.push((to - from, e.status)),
                }
                pos = to;
            }
            if pos == before {
                // No progress: say data for the rest rather than loop.
                out.push((end - pos, Status::Data));
                break;
            }
        }
        Ok(out)
    }
}

impl Connection {
    /// READ: the data in one buffer; with structured replies, ranges that read as zeros as
    /// OFFSET_HOLE chunks and the rest as OFFSET_DATA chunks (one data chunk with DF, or when
    /// the device cannot tell); simple replies carry the data after the header.
    async fn read(&self, r: &Request) -> copy_on_read::Result<Frames> {
        // Validated: at most max_request_bytes.
        let length = r.length as usize;
        let buf = self.export.pool.take(length);
        if !self.mode.structured() {
            let data = read_into(self.device(), r.offset, buf).await?;
            self.counters.read(r.length);
            let mut frames = Frames {
                data,
                ..Frames::default()
            };
            frames.push(&encode_simple_reply(0, r.cookie), 0..length);
            return Ok(frames);
        }
        if length == 0 {
            return Ok(Frames::from_parts(vec![self.chunk(
                r,
                REPLY_FLAG_DONE,
                CHUNK_NONE,
                0,
            )]));
        }
        let whole = r.flags & CMD_FLAG_DF != 0 || !self.device().capabilities().block_status;
        let (data, runs) = if whole {
            let data = read_into(self.device(), r.offset, buf).await?;
            (data, vec![(r.length, Status::Data)])
        } else {
            match self.device().read_mapped(r.offset, buf).await? {
                Ok((data, extents)) => (data, runs_of(r.offset, r.length, &extents)),
                Err(buf) => self.read_by_status(r.offset, buf).await?,
            }
        };
        self.counters.read(r.length);
        Ok(self.read_reply(r, data, &runs))
    }

    /// Block status of `[offset, offset + buf.len())`, then its data runs read into `buf`
    /// (what reads as zeros is left as it was: it is sent as a hole).
    async fn read_by_status(
        &self,
        offset: u64,
        mut buf: PoolBuf,
    ) -> copy_on_read::Result<(PoolBuf, Vec<(u64, Status)>)> {
        let runs = self.status(offset, buf.len() as u64).await?;
        if let [(_, Status::Data)] = runs[..] {
            return Ok((read_into(self.device(), offset, buf).await?, runs));
        }
        let mut at = 0usize;
        for &(run, status) in &runs {
            let n = run as usize;
            if status == Status::Data {
                let piece = self.export.pool.take(n);
                let piece = read_into(self.device(), offset + at as u64, piece).await?;
                buf[at..at + n].copy_from_slice(&piece);
                self.export.pool.give(piece);
            }
            at += n;
        }
        Ok((buf, runs))
    }

    /// The chunks of a structured READ reply over `data`, one per run, the last DONE.
    fn read_reply(&self, r: &Request, data: PoolBuf, runs: &[(u64, Status)]) -> Frames {
        let mut frames = Frames {
            data,
            ..Frames::default()
        };
        let last = runs.len().saturating_sub(1);
        let mut at = 0usize;
        for (i, &(run, status)) in runs.iter().enumerate() {
            let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
            let offset = r.offset + at as u64;
            let n = run as usize;
            match status {
                Status::Zero => {
                    let mut head = self.chunk(r, flags, CHUNK_OFFSET_HOLE, 12);
                    head.extend_from_slice(&encode_offset_hole(offset, n as u32));
                    frames.push(&head, 0..0);
                }
                Status::Data => {
                    let mut head = self.chunk(r, flags, CHUNK_OFFSET_DATA, 8 + run);
                    head.extend_from_slice(&offset.to_be_bytes());
                    frames.push(&head, at..at + n);
                }
            }
            at += n;
        }
        frames
    }

    /// BLOCK_STATUS: one chunk per selected context (`base:allocation`, then
    /// `qemu:allocation-depth`), the last marked DONE; with REQ_ONE one extent each, never
    /// past the request.
    async fn block_status(&self, r: &Request) -> copy_on_read::Result<Vec<Vec<u8>>> {
        let span = r.length.min(MAX_STATUS_SPAN);
        let mut chunks = Vec::new();
        if let Some(id) = self.base_allocation {
            let runs = self.status(r.offset, span).await?;
            let extents = runs
                .into_iter()
                .map(|(length, status)| RawExtent {
                    length,
                    flags: match status {
                        Status::Zero => u64::from(STATE_HOLE | STATE_ZERO),
                        Status::Data => 0,
                    },
                })
                .collect();
            chunks.push((id, extents));
        }
        if let Some(id) = self.allocation_depth {
            chunks.push((id, self.allocation_depth(r.offset, span).await?));
        }
        let mut parts = Vec::new();
        let last = chunks.len() - 1;
        for (i, (id, mut extents)) in chunks.into_iter().enumerate() {
            if r.flags & CMD_FLAG_REQ_ONE != 0 {
                extents.truncate(1);
            }
            extents.truncate(MAX_EXTENTS);
            let (payload, chunk_type) = if self.mode == HeaderMode::Extended {
                (
                    encode_block_status_ext(id, &extents),
                    CHUNK_BLOCK_STATUS_EXT,
                )
            } else {
                (encode_block_status(id, &extents), CHUNK_BLOCK_STATUS)
            };
            let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
            parts.push(self.chunk(r, flags, chunk_type, payload.len() as u64));
            parts.push(payload);
        }
        Ok(parts)
    }

    /// `qemu:allocation-depth` from the export's [`crate::AllocationDepth`], clamped to the
    /// range, adjacent runs of one depth merged.
    async fn allocation_depth(
        &self,
        offset: u64,
        length: u64,
    ) -> copy_on_read::Result<Vec<RawExtent>> {
        let Some(depth) = &self.export.depth else {
            return Ok(Vec::new());
        };
        let end = offset + length;
        let mut out: Vec<RawExtent> = Vec::new();
        let mut pos = offset;
        for run in depth.allocation_depth(offset, length).await? {
            let to = pos.saturating_add(run.length).min(end);
            let (length, flags) = (to - pos, u64::from(run.depth));
            match out.last_mut() {
                _ if length == 0 => {}
                Some(last) if last.flags == flags => last.length += length,
                _ => out.push(RawExtent { length, flags }),
            }
            pos = to;
            if pos >= end {
                break;
            }
        }
        if out.is_empty() {
            return Err(copy_on_read::Error::Unsupported(
                "allocation depth: empty map",
            ));
        }
        Ok(out)
    }
}

/// Status extents as runs covering exactly `[offset, offset + length)`, adjacent runs of one
/// status merged; whatever the extents leave uncovered is said to be data (it was read).
fn runs_of(offset: u64, length: u64, extents: &[copy_on_read::StatusExtent]) -> Vec<(u64, Status)> {
    let end = offset + length;
    let mut out: Vec<(u64, Status)> = Vec::new();
    let push = |out: &mut Vec<(u64, Status)>, n: u64, status: Status| match out.last_mut() {
        Some(last) if last.1 == status => last.0 += n,
        _ => out.push((n, status)),
    };
    let mut pos = offset;
    for e in extents {
        let from = e.offset.max(pos);
        let to = e.offset.saturating_add(e.length).min(end);
        if from != pos || to <= from {
            break;
        }
        push(&mut out, to - from, e.status);
        pos = to;
    }
    if pos < end {
        push(&mut out, end - pos, Status::Data);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_errors_map_to_nbd_errno_values() {
        use copy_on_read::Error as E;
        let io = |code| E::Io {
            op: "writing",
            offset: 0,
            source: std::io::Error::from_raw_os_error(code),
        };
        assert_eq!(errno_of(&io(libc::ENOSPC)), Errno::ENOSPC);
        assert_eq!(errno_of(&io(libc::EDQUOT)), Errno::ENOSPC);
        assert_eq!(errno_of(&io(libc::EIO)), Errno::EIO);
        let qed_full = E::Qed {
            path: "x.qed".into(),
            source: qed::Error::Io {
                op: "allocating",
                offset: 0,
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            },
        };
        assert_eq!(errno_of(&qed_full), Errno::ENOSPC, "{qed_full}");
        assert_eq!(errno_of(&E::ReadOnly), Errno::EPERM);
        assert_eq!(errno_of(&E::Unsupported("x")), Errno::ENOTSUP);
        assert_eq!(errno_of(&E::Closed), Errno::ESHUTDOWN);
        let range = E::OutOfRange {
            offset: 1,
            length: 2,
            size: 2,
        };
        assert_eq!(errno_of(&range), Errno::EINVAL);
    }
}
