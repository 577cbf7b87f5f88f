//! The stream job: makes a copy-on-read image local, while a guest uses it or before it boots,
//! then drops its backing link.
//!
//! Full mode ([`StreamJob::start`]) walks the image in windows, skips what is already local
//! (data or zero clusters) and what the backing reports as holes or zeros (NBD block status,
//! `SEEK_DATA`/`SEEK_HOLE` on raw files, the map of a QED chain) or lies past the backing's end,
//! and copies the rest in cluster-aligned requests of up to [`StreamOptions::request_bytes`],
//! [`StreamOptions::in_flight`] at a time, through [`Populate::populate_range`]: the same
//! per-cluster-range lock as guest writes and copy-on-read, and behind any guest read that
//! waits on the backing. When a pass finds nothing left, the job flushes, drops the backing
//! link (flags cleared, name offset 64 and size 0, as QEMU's block-stream leaves it) and
//! flushes. On error or cancel the link stays; a later stream resumes from the allocation
//! state (also after SIGKILL: a cluster is visible only once its data is on disk).
//!
//! Single-step mode ([`step`]) copies one unit and returns the offset to continue from.
//!
//! A range that still fails after [`StreamOptions::retries`] is handled by the job's
//! [`OnError`] policy ([`StreamOptions::on_error`]): `report` fails the job, `stop` pauses it
//! (I/O status `nospace` when the image's file system is full, `failed` otherwise) until a
//! resume retries the range, `ignore` skips the range, reports
//! it in [`StreamOutcome::ignored`] and keeps the backing link. Every such failure, every
//! state change and the end are [`JobEvent`]s, received through [`StreamHandle::subscribe`]
//! (or [`StreamJob::start_watched`], subscribed before the job starts).
//!
//! The [`StreamHandle`] gives [`Progress`] at any time and takes a new rate limit
//! ([`StreamHandle::set_rate`]), pause, resume and cancel. Cancel aborts the requests in flight
//! (an NBD read waiting on a dead server is simply dropped), so it takes effect at once; image
//! I/O already started finishes in the background under its range lock, and
//! [`copy_on_read::BlockDevice::close`] waits for it.

use std::collections::VecDeque;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinSet;
// tokio's clock, so the rate limit, the rate and the elapsed time follow a paused test clock.
use tokio::time::Instant;

use copy_on_read::{
    status_padded, BufferPool, Fetched, LinkState, PoolStats, Populate, Reconnect, Status,
};

use crate::error::{Error, Result};
use crate::job::{EventSender, IoStatus, JobEvent, JobEvents, OnError, Operation, RangeError};

/// The default [`StreamOptions::buffer_budget`].
pub const DEFAULT_BUFFER_BUDGET: u64 = 16 << 20;

/// The copy buffers' size over an NBD backing: what one NBD read request carries by default
/// (and a whole number of clusters).
const NBD_CHUNK_BYTES: u64 = 256 << 10;

/// The copy buffers' size over local files: each store writes a buffer at a time, and with
/// `--cache none` ext4 runs the direct writes that extend the image one after the other, so
/// larger ones go faster (the 1 GiB local stream of `stream-compare` with `--cache none`:
/// 1.00-1.06 s with 256 KiB buffers, 0.82-0.92 s with 1 MiB; buffered alike). Over NBD,
/// 1 MiB buffers measured no faster and cost more CPU.
const FILE_CHUNK_BYTES: u64 = 1 << 20;

/// How a stream runs.
#[derive(Clone, Debug)]
pub struct StreamOptions {
    /// Bytes per second copied from the backing; `None` is unlimited.
    pub rate: Option<NonZeroU64>,
    /// Leave the backing link in place at the end.
    pub keep_backing: bool,
    /// Largest copy request (rounded to clusters, and to at most half the buffer budget).
    /// Default 4 MiB.
    pub request_bytes: u64,
    /// Copy requests in flight (fetching from the backing, or waiting for their batch to be
    /// stored). Default 16. Memory is bounded by [`StreamOptions::buffer_budget`] whatever
    /// this says: a request waits for buffers before it starts.
    pub in_flight: usize,
    /// Bytes of copy buffers the job may hold at once (recycled, never allocated again):
    /// the bound on its memory. Default 16 MiB ([`DEFAULT_BUFFER_BUDGET`]).
    pub buffer_budget: u64,
    /// How many times one request is retried after a retryable backing error (a lost NBD
    /// connection that `nbd-client` could not ride out by itself). Default 3.
    pub retries: u32,
    /// What the job does when a range still fails after the retries (default: report, the
    /// job fails).
    pub on_error: OnError,
}

impl Default for StreamOptions {
    fn default() -> StreamOptions {
        StreamOptions {
            rate: None,
            keep_backing: false,
            request_bytes: 4 << 20,
            in_flight: 16,
            buffer_budget: DEFAULT_BUFFER_BUDGET,
            retries: 3,
            on_error: OnError::Report,
        }
    }
}

/// Where a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Copying.
    Running,
    /// Paused by [`StreamHandle::pause`].
    Paused,
    /// The backing connection is down; requests wait for it to come back.
    WaitingForBacking,
    /// Everything is local (and the link dropped unless kept).
    Completed,
    /// Cancelled; the link stays.
    Cancelled,
    /// Failed; the link stays.
    Failed,
}

/// A snapshot of a job's progress.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Progress {
    /// The image being streamed.
    pub image: String,
    /// Everything below this offset is done.
    pub offset: u64,
    /// The virtual size.
    pub total: u64,
    /// Bytes copied from the backing into new data clusters.
    pub copied: u64,
    /// Bytes skipped without copying: holes and zeros in the backing, past its end, and
    /// ranges that read as zeros in copied requests (stored as zero clusters).
    pub skipped: u64,
    /// Bytes that were already local.
    pub local: u64,
    /// Copy rate over the last few seconds, bytes per second.
    pub rate: u64,
    /// The rate limit, bytes per second (0: none).
    pub rate_limit: u64,
    /// The job's state.
    pub state: JobState,
    /// The state of the job's I/O: `failed` while stopped on an error.
    pub io_status: IoStatus,
}

/// What a finished stream did.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamOutcome {
    /// The last progress snapshot.
    pub progress: Progress,
    /// Whether the backing link was dropped.
    pub unlinked: bool,
    /// Wall time.
    pub elapsed: Duration,
    /// Ranges skipped under [`OnError::Ignore`] (`(offset, length)`, in the order they
    /// failed); the link is kept when there are any.
    pub ignored: Vec<(u64, u64)>,
    /// What the job's buffer pool did: its budget, the bytes it allocated and the most it
    /// handed out at once (both within the budget).
    pub buffers: PoolStats,
    /// Batches stored (each with one flush before its L2 updates).
    pub batches: u64,
}

#[derive(Debug)]
struct Shared {
    image: String,
    total: u64,
    offset: AtomicU64,
    copied: AtomicU64,
    skipped: AtomicU64,
    local: AtomicU64,
    rate_limit: AtomicU64,
    rate_epoch: AtomicU64,
    paused: watch::Sender<bool>,
    cancelled: AtomicBool,
    cancel: Notify,
    state: Mutex<JobState>,
    samples: Mutex<VecDeque<(Instant, u64)>>,
    next_slot: Mutex<Instant>,
    backing_state: Option<Arc<dyn Reconnect>>,
    on_error: OnError,
    io_status: Mutex<IoStatus>,
    ignored: Mutex<Vec<(u64, u64)>>,
    events: EventSender,
    pool: BufferPool,
    batches: AtomicU64,
}

/// Controls a running [`StreamJob`]; cheap to clone.
#[derive(Clone, Debug)]
pub struct StreamHandle {
    shared: Arc<Shared>,
}

impl StreamHandle {
    /// A snapshot of the progress.
    pub fn progress(&self) -> Progress {
        let s = &self.shared;
        let mut state = *s.state.lock();
        if state == JobState::Running {
            if let Some(link) = &s.backing_state {
                if link.state() != LinkState::Connected {
                    state = JobState::WaitingForBacking;
                }
            }
        }
        Progress {
            image: s.image.clone(),
            offset: s.offset.load(Ordering::Acquire),
            total: s.total,
            copied: s.copied.load(Ordering::Acquire),
            skipped: s.skipped.load(Ordering::Acquire),
            local: s.local.load(Ordering::Acquire),
            rate: self.rate(),
            rate_limit: s.rate_limit.load(Ordering::Acquire),
            state,
            io_status: *s.io_status.lock(),
        }
    }

    fn rate(&self) -> u64 {
        let samples = self.shared.samples.lock();
        let (Some(first), Some(last)) = (samples.front(), samples.back()) else {
            return 0;
        };
        let dt = Instant::now().duration_since(first.0).as_secs_f64();
        if dt <= 0.05 {
            return 0;
        }
        ((last.1 - first.1) as f64 / dt) as u64
    }

    /// Sets (or removes, with `None`) the rate limit in bytes per second, effective at once.
    pub fn set_rate(&self, rate: Option<NonZeroU64>) {
        let s = &self.shared;
        s.rate_limit
            .store(rate.map_or(0, NonZeroU64::get), Ordering::Release);
        *s.next_slot.lock() = Instant::now();
        s.rate_epoch.fetch_add(1, Ordering::AcqRel);
        s.cancel.notify_waiters();
    }

    /// Stops issuing new copies (those in flight finish).
    pub fn pause(&self) {
        self.shared.paused.send_replace(true);
        self.transition(JobState::Running, JobState::Paused);
    }

    /// Resumes after [`StreamHandle::pause`] (or after the job stopped on an error under
    /// [`OnError::Stop`]: the failed range is tried again).
    pub fn resume(&self) {
        // As QEMU's resume: the error the job stopped on is cleared with it.
        *self.shared.io_status.lock() = IoStatus::Ok;
        // Running before the job is let go: once unpaused it may reach its end at once, and
        // its subscribers must hear Running before Completed.
        self.transition(JobState::Paused, JobState::Running);
        self.shared.paused.send_replace(false);
    }

    /// Whether the job is paused (by [`StreamHandle::pause`] or by an error it stopped on).
    pub fn is_paused(&self) -> bool {
        *self.shared.paused.borrow()
    }

    /// Moves the state from `from` to `to` (and tells subscribers); nothing if it is not
    /// `from`.
    fn transition(&self, from: JobState, to: JobState) {
        let mut st = self.shared.state.lock();
        if *st == from {
            *st = to;
            self.shared.events.send(JobEvent::State(to));
        }
    }

    /// The job's events from now on (see [`crate::job`]).
    pub fn subscribe(&self) -> JobEvents {
        self.shared.events.subscribe()
    }

    /// The policy the job applies to a range that fails.
    pub fn on_error(&self) -> OnError {
        self.shared.on_error
    }

    /// The link state of the backing the job copies from, if it rides on a connection.
    pub fn backing_link(&self) -> Option<Arc<dyn Reconnect>> {
        self.shared.backing_state.clone()
    }

    /// Cancels the job: requests in flight are abandoned, the backing link stays.
    pub fn cancel(&self) {
        self.shared.cancelled.store(true, Ordering::Release);
        self.shared.cancel.notify_waiters();
        self.shared.paused.send_replace(false);
    }

    /// True once [`StreamHandle::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.shared.cancelled.load(Ordering::Acquire)
    }

    /// The error of a job cancelled with everything below `offset` done.
    fn cancelled_at(&self, offset: u64) -> Error {
        Error::Cancelled {
            offset,
            total: self.shared.total,
        }
    }

    fn set_state(&self, state: JobState) {
        let mut st = self.shared.state.lock();
        if *st != state {
            *st = state;
            self.shared.events.send(JobEvent::State(state));
        }
    }

    /// Records the end of the job: its final state, and the final event.
    fn finish(&self, r: Result<StreamOutcome>) -> Result<StreamOutcome> {
        let state = match &r {
            Ok(_) => JobState::Completed,
            Err(Error::Cancelled { .. }) => JobState::Cancelled,
            Err(_) => JobState::Failed,
        };
        self.set_state(state);
        let mut progress = self.progress();
        let event = match &r {
            Ok(outcome) => {
                progress = StreamOutcome::clone(outcome).progress;
                progress.state = state;
                JobEvent::Completed {
                    progress,
                    unlinked: outcome.unlinked,
                    ignored: outcome.ignored.clone(),
                }
            }
            Err(Error::Cancelled { .. }) => JobEvent::Cancelled { progress },
            Err(e) => JobEvent::Failed {
                progress,
                error: e.to_string(),
            },
        };
        self.shared.events.send(event);
        r.map(|mut outcome| {
            outcome.progress.state = state;
            outcome
        })
    }

    /// Waits until cancel is called (or the rate changes). Returns true on cancel.
    async fn cancelled_or_nudged(&self) -> bool {
        let n = self.shared.cancel.notified();
        tokio::pin!(n);
        n.as_mut().enable();
        if self.is_cancelled() {
            return true;
        }
        n.await;
        self.is_cancelled()
    }

    /// Sleeps for `d`, returning early (true) on cancel.
    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => self.is_cancelled(),
            c = self.cancelled_or_nudged_until_cancel() => c,
        }
    }

    async fn cancelled_or_nudged_until_cancel(&self) -> bool {
        loop {
            if self.cancelled_or_nudged().await {
                return true;
            }
        }
    }

    /// Charges `n` bytes against the rate limit, sleeping as needed. Returns true on cancel.
    async fn charge(&self, n: u64) -> bool {
        let s = &self.shared;
        loop {
            let rate = s.rate_limit.load(Ordering::Acquire);
            if rate == 0 {
                return self.is_cancelled();
            }
            let epoch = s.rate_epoch.load(Ordering::Acquire);
            let start = {
                let mut next = s.next_slot.lock();
                let now = Instant::now();
                // A bounded burst: at most 100 ms of credit accumulates.
                let start = (*next).max(now.checked_sub(Duration::from_millis(100)).unwrap_or(now));
                *next = start + Duration::from_secs_f64(n as f64 / rate as f64);
                start
            };
            let until = start;
            loop {
                let now = Instant::now();
                if now >= until {
                    return self.is_cancelled();
                }
                tokio::select! {
                    _ = tokio::time::sleep((until - now).min(Duration::from_millis(100))) => {}
                    c = self.cancelled_or_nudged() => if c { return true; },
                }
                if self.is_cancelled() {
                    return true;
                }
                if s.rate_epoch.load(Ordering::Acquire) != epoch {
                    break; // the limit changed: charge again under the new one
                }
            }
        }
    }

    /// Waits while paused. Returns true on cancel.
    async fn wait_unpaused(&self) -> bool {
        let mut rx = self.shared.paused.subscribe();
        loop {
            if self.is_cancelled() {
                return true;
            }
            if !*rx.borrow_and_update() {
                return false;
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return self.is_cancelled(); },
                c = self.cancelled_or_nudged() => if c { return true; },
            }
        }
    }

    fn record_copy(&self, copied: u64, zeroed: u64, local: u64) {
        let s = &self.shared;
        let total = s.copied.fetch_add(copied, Ordering::AcqRel) + copied;
        s.skipped.fetch_add(zeroed, Ordering::AcqRel);
        s.local.fetch_add(local, Ordering::AcqRel);
        let now = Instant::now();
        let mut samples = s.samples.lock();
        samples.push_back((now, total));
        while samples.len() > 2
            && samples
                .front()
                .is_some_and(|f| now.duration_since(f.0) > Duration::from_secs(3))
        {
            samples.pop_front();
        }
    }
}

/// A running stream.
#[derive(Debug)]
pub struct StreamJob {
    handle: StreamHandle,
    task: tokio::task::JoinHandle<Result<StreamOutcome>>,
}

/// Ranges to copy in a window, and what the window skips.
#[derive(Debug, Default)]
struct Plan {
    copy: Vec<(u64, u64)>,
    skipped: u64,
    local: u64,
    /// Where the plan stops: the window's end, or earlier once the copy budget is reached
    /// (cluster aligned, or the disk's end).
    end: u64,
}

/// How far one plan looks ahead: holes in the backing are skipped a window at a time, with as
/// few block-status requests as the backing allows per window.
const PLAN_WINDOW: u64 = 64 << 30;
/// How much data one plan hands to the copiers before the next plan.
const PLAN_BUDGET: u64 = 256 << 20;

/// Looks at `[from, to)` (cluster aligned `from`): what is local, what the backing reports as
/// zeros (or lacks), and the cluster-aligned ranges left to copy. Stops early, at a cluster
/// boundary, once `budget` bytes are planned for copying.
async fn plan(dev: &dyn Populate, from: u64, to: u64, budget: u64) -> Result<Plan> {
    let mut out = Plan {
        end: to,
        ..Plan::default()
    };
    let cs = dev.cluster_size();
    let size = dev.size();
    let extents = dev
        .local_map(from, to - from)
        .await
        .map_err(Error::device)?;
    let Some(backing) = dev.backing() else {
        for e in extents {
            if !e.local {
                out.skipped += e.length;
            } else {
                out.local += e.length;
            }
        }
        return Ok(out);
    };
    let mut planned = 0;
    for e in extents {
        if e.local {
            out.local += e.length;
            continue;
        }
        let end = e.offset + e.length;
        let mut pos = e.offset;
        let mut data_bytes = 0;
        while pos < end {
            let status = status_padded(&*backing, pos, end - pos)
                .await
                .map_err(Error::device)?;
            for s in status {
                let s_end = (s.offset + s.length).min(end);
                if s_end <= pos {
                    continue;
                }
                let mut stop = s_end;
                if s.status == Status::Data {
                    let a = pos / cs * cs;
                    let b = s_end.div_ceil(cs).saturating_mul(cs).min(size).min(end);
                    stop = b.max(s_end);
                    match out.copy.last_mut() {
                        Some(last) if last.0 + last.1 >= a => {
                            let new_end = (last.0 + last.1).max(b);
                            data_bytes += new_end - (last.0 + last.1);
                            last.1 = new_end - last.0;
                        }
                        _ => {
                            data_bytes += b - a;
                            out.copy.push((a, b - a));
                        }
                    }
                }
                pos = stop;
                if planned + data_bytes >= budget && pos < end {
                    // Enough for one round of copies: stop here, after the last copy range.
                    out.skipped += (pos - e.offset) - data_bytes.min(pos - e.offset);
                    out.end = pos;
                    return Ok(out);
                }
                if pos >= end {
                    break;
                }
            }
        }
        planned += data_bytes;
        out.skipped += e.length - data_bytes.min(e.length);
    }
    Ok(out)
}

/// Splits ranges into requests of at most `max` bytes.
fn requests(ranges: &[(u64, u64)], max: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(a, l) in ranges {
        let mut p = a;
        while p < a + l {
            let n = (a + l - p).min(max);
            out.push((p, n));
            p += n;
        }
    }
    out
}

/// The copy buffers of a stream of `dev` under `budget` bytes. When an NBD connection is
/// anywhere below `dev` (it has a [`Reconnect`] capability): chunks of [`NBD_CHUNK_BYTES`],
/// `Vec`s the NBD client reads into as they are. Else chunks of [`FILE_CHUNK_BYTES`] at
/// page-aligned addresses, which files opened with O_DIRECT (`--cache none`) read into and
/// write from with no bounce copy. A chunk is one cluster when clusters are larger.
fn copy_buffers(dev: &dyn Populate, budget: u64) -> BufferPool {
    let cs = dev.cluster_size().max(1);
    let over_nbd = dev.backing().is_some_and(|b| b.reconnect().is_some());
    let chunk = |bytes: u64| (bytes.max(cs) / cs * cs) as usize;
    if over_nbd {
        BufferPool::new(budget, chunk(NBD_CHUNK_BYTES))
    } else {
        BufferPool::page_aligned(budget, chunk(FILE_CHUNK_BYTES))
    }
}

/// Aborts a task when dropped (the committer of a window that ends or is cancelled: a store
/// it started finishes in the background, under its units' range locks).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A fetched unit on its way to the committer, and where to say whether it was stored.
type Commit = (Fetched, oneshot::Sender<bool>);

/// Batches stored at once. Each batch's `fdatasync` makes the disk write back its data while
/// the next batches are written into the page cache: with one at a time, writing and flushing
/// took turns (0.59 s for the 1 GiB local stream of `stream-compare`, against 0.48 s with three).
const STORES_IN_FLIGHT: usize = 3;

/// Stores fetched units in batches: whatever is queued when a store may start, up to
/// `batch_bytes` of data, with one [`Populate::store_fetched`] (one flush before the batch's
/// L2 updates), [`STORES_IN_FLIGHT`] batches at a time. A batch that fails tells its units
/// so; each then copies itself alone, under the job's error policy ([`copy_one`]). A store
/// runs to its end even when the committer is aborted, under its units' range locks.
async fn committer(
    dev: Arc<dyn Populate>,
    h: StreamHandle,
    mut queue: mpsc::UnboundedReceiver<Commit>,
    batch_bytes: u64,
) {
    let stores = Arc::new(tokio::sync::Semaphore::new(STORES_IN_FLIGHT));
    while let Some(first) = queue.recv().await {
        let Ok(permit) = Arc::clone(&stores).acquire_owned().await else {
            return;
        };
        let mut bytes = first.0.fetched_bytes();
        let mut batch = vec![first];
        while bytes < batch_bytes {
            let Ok(next) = queue.try_recv() else { break };
            bytes += next.0.fetched_bytes();
            batch.push(next);
        }
        let (dev, h) = (Arc::clone(&dev), h.clone());
        tokio::spawn(async move {
            store_batch(dev.as_ref(), &h, batch).await;
            drop(permit);
        });
    }
}

/// Stores one batch and tells each of its units whether it was stored.
async fn store_batch(dev: &dyn Populate, h: &StreamHandle, batch: Vec<Commit>) {
    let (units, replies): (Vec<Fetched>, Vec<oneshot::Sender<bool>>) = batch.into_iter().unzip();
    let stored = dev.store_fetched(units).await;
    h.shared.batches.fetch_add(1, Ordering::AcqRel);
    let ok = match stored {
        Ok(s) => {
            h.record_copy(s.copied, s.zeroed, s.local);
            true
        }
        Err(e) => {
            tracing::debug!(error = %e, "a stream batch failed; its units are copied alone");
            false
        }
    };
    for r in replies {
        let _ = r.send(ok);
    }
}

/// Copies one request: fetched into the job's buffers and stored in a batch by the
/// committer; when the fetch or the batch fails, copied alone by [`copy_one`] (its retries and
/// the job's error policy).
async fn copy_unit(
    dev: Arc<dyn Populate>,
    handle: StreamHandle,
    commits: mpsc::UnboundedSender<Commit>,
    (offset, len): (u64, u64),
    chunks: Option<copy_on_read::Chunks>,
    retries: u32,
) -> Result<()> {
    // Without buffers (a request larger than the whole budget) it is copied alone.
    let Some(chunks) = chunks else {
        return copy_one(dev, handle, offset, len, retries).await;
    };
    match dev.fetch_range(offset, len, chunks).await {
        Ok(unit) => {
            let (tx, rx) = oneshot::channel();
            if commits.send((unit, tx)).is_ok() && rx.await == Ok(true) {
                return Ok(());
            }
        }
        // A failure the backing would give again (a request its server dies on, after the
        // client's own bounded resends): sending it once more alone would only multiply it,
        // so the job's error policy decides at once. Buffers that do not fit the request
        // (never from the window's own requests) leave it to be copied alone.
        Err(e)
            if !e.is_retryable() && !matches!(e, copy_on_read::Error::BuffersMismatch { .. }) =>
        {
            match after_error(&handle, offset, len, Error::device(e)).await? {
                AfterError::Retry => {}
                AfterError::Skip => return Ok(()),
            }
        }
        Err(_) => {}
    }
    copy_one(dev, handle, offset, len, retries).await
}

/// Copies one request, retrying retryable backing errors while the backing is not gone.
async fn copy_one(
    dev: Arc<dyn Populate>,
    handle: StreamHandle,
    offset: u64,
    len: u64,
    retries: u32,
) -> Result<()> {
    let mut attempt = 0;
    loop {
        match dev.populate_range(offset, len).await {
            Ok(s) => {
                handle.record_copy(s.copied, s.zeroed, s.local);
                return Ok(());
            }
            Err(e) if e.is_retryable() && attempt < retries => {
                attempt += 1;
                tracing::warn!(offset, len, attempt, error = %e, "backing read failed; retrying");
                if handle.sleep(Duration::from_millis(500)).await {
                    return Err(Error::Cancelled {
                        offset,
                        total: dev.size(),
                    });
                }
            }
            Err(e) => match after_error(&handle, offset, len, Error::device(e)).await? {
                AfterError::Retry => attempt = 0,
                AfterError::Skip => return Ok(()),
            },
        }
    }
}

/// What the job does next about a range that failed for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AfterError {
    /// Try the range again (after a resume, under [`OnError::Stop`]).
    Retry,
    /// Leave the range to the backing and go on (under [`OnError::Ignore`]).
    Skip,
}

/// Applies the job's [`OnError`] policy to `e`, the final failure of
/// `[offset, offset + length)`: one [`JobEvent::Error`], then fail (report), stop until a
/// resume (stop), or record the range as skipped (ignore). A cancel is never an error to act
/// on.
async fn after_error(h: &StreamHandle, offset: u64, length: u64, e: Error) -> Result<AfterError> {
    if matches!(e, Error::Cancelled { .. }) || h.is_cancelled() {
        return Err(h.cancelled_at(offset));
    }
    let action = h.shared.on_error;
    let nospace = e.is_nospace();
    let operation = match &e {
        Error::BackingUnavailable(_) | Error::Device(copy_on_read::Error::Nbd { .. }) => {
            Operation::Read
        }
        _ if nospace => Operation::Write,
        _ => Operation::Read,
    };
    tracing::warn!(offset, length, action = action.as_str(), error = %e, "a stream range failed");
    h.shared.events.send(JobEvent::Error(RangeError {
        offset,
        length,
        action,
        operation,
        reason: e.to_string(),
        nospace,
    }));
    match action {
        OnError::Report => Err(e),
        OnError::Ignore => {
            h.shared.ignored.lock().push((offset, length));
            Ok(AfterError::Skip)
        }
        OnError::Stop => {
            *h.shared.io_status.lock() = if nospace {
                IoStatus::Nospace
            } else {
                IoStatus::Failed
            };
            h.pause();
            let cancelled = h.wait_unpaused().await;
            *h.shared.io_status.lock() = IoStatus::Ok;
            if cancelled {
                Err(h.cancelled_at(offset))
            } else {
                Ok(AfterError::Retry)
            }
        }
    }
}

impl StreamJob {
    /// Starts streaming `dev` (any device that can [`Populate`] itself from its backing, such
    /// as a [`copy_on_read::CorDevice`]) on the current tokio runtime.
    pub fn start<D: Populate + 'static>(dev: Arc<D>, options: StreamOptions) -> StreamJob {
        StreamJob::start_dyn(dev, options)
    }

    /// [`StreamJob::start`] for a device behind a trait object.
    pub fn start_dyn(dev: Arc<dyn Populate>, options: StreamOptions) -> StreamJob {
        StreamJob::start_watched(dev, options).0
    }

    /// [`StreamJob::start_dyn`], with a subscription to the job's events taken before the job
    /// starts (so that not even its first or, for a job with nothing to do, its last event can
    /// be missed).
    pub fn start_watched(dev: Arc<dyn Populate>, options: StreamOptions) -> (StreamJob, JobEvents) {
        let (paused, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            image: dev.name().to_string(),
            total: dev.size(),
            offset: AtomicU64::new(0),
            copied: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            local: AtomicU64::new(0),
            rate_limit: AtomicU64::new(options.rate.map_or(0, NonZeroU64::get)),
            rate_epoch: AtomicU64::new(0),
            paused,
            cancelled: AtomicBool::new(false),
            cancel: Notify::new(),
            state: Mutex::new(JobState::Running),
            samples: Mutex::new(VecDeque::new()),
            next_slot: Mutex::new(Instant::now()),
            backing_state: dev.reconnect(),
            on_error: options.on_error,
            io_status: Mutex::new(IoStatus::Ok),
            ignored: Mutex::new(Vec::new()),
            events: EventSender::new(),
            pool: copy_buffers(dev.as_ref(), options.buffer_budget),
            batches: AtomicU64::new(0),
        });
        let handle = StreamHandle { shared };
        let events = handle.subscribe();
        let h = handle.clone();
        let task = tokio::spawn(async move {
            let start = Instant::now();
            // Cancel wins over whatever the job awaits (a block-status query or a read from a
            // dead server included): dropping `run` drops its JoinSet, which aborts the copies.
            let r = tokio::select! {
                r = run(&dev, &h, &options) => r,
                _ = h.cancelled_or_nudged_until_cancel() => Err(Error::Cancelled {
                    offset: h.shared.offset.load(Ordering::Acquire),
                    total: h.shared.total,
                }),
            };
            let r = r.map(|()| StreamOutcome {
                progress: h.progress(),
                unlinked: dev.backing().is_none(),
                elapsed: start.elapsed(),
                ignored: h.shared.ignored.lock().clone(),
                buffers: h.shared.pool.stats(),
                batches: h.shared.batches.load(Ordering::Acquire),
            });
            h.finish(r)
        });
        (StreamJob { handle, task }, events)
    }

    /// The job's handle.
    pub fn handle(&self) -> StreamHandle {
        self.handle.clone()
    }

    /// Waits for the job to end.
    pub async fn wait(self) -> Result<StreamOutcome> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(Error::task("stream")(e)),
        }
    }
}

/// The body of a full stream: a first pass over the whole disk, then passes over only what
/// the previous pass copied (the backing does not change, so what it reported as holes or
/// zeros, and what was local, stays so), until a pass finds nothing left to copy.
async fn run(dev: &Arc<dyn Populate>, h: &StreamHandle, options: &StreamOptions) -> Result<()> {
    let size = dev.size();
    let mut pass = 0;
    // None: the whole disk.
    let mut scope: Option<Vec<(u64, u64)>> = None;
    loop {
        pass += 1;
        let mut copied = CopiedRanges::default();
        let ranges = scope.take().unwrap_or_else(|| vec![(0, size)]);
        for (start, end) in ranges {
            // Counters describe the first pass; later passes only mop up.
            stream_range(dev, h, options, (start, end), pass == 1, &mut copied).await?;
        }
        if !h.shared.ignored.lock().is_empty() {
            // Skipped ranges come from the backing still: one pass, and the link stays.
            dev.flush().await.map_err(Error::device)?;
            return Ok(());
        }
        let found_work = copied.found_work();
        if !found_work || pass >= 3 {
            if found_work {
                return Err(Error::Incomplete { passes: pass });
            }
            break;
        }
        scope = copied.into_ranges();
    }
    // The last pass may have looked at a few ranges only: the whole disk is done.
    h.shared.offset.store(size, Ordering::Release);
    if h.is_cancelled() {
        return Err(h.cancelled_at(size));
    }
    if !options.keep_backing && dev.backing().is_some() {
        dev.drop_backing_link().await.map_err(Error::device)?;
    } else {
        dev.flush().await.map_err(Error::device)?;
    }
    Ok(())
}

/// The ranges a pass copied, merged, for the next pass to check; past [`MAX_TRACKED`]
/// ranges the next pass walks the whole disk again instead.
#[derive(Debug, Default)]
struct CopiedRanges {
    ranges: Vec<(u64, u64)>,
    overflowed: bool,
}

/// The most ranges [`CopiedRanges`] keeps (16 bytes each).
const MAX_TRACKED: usize = 1 << 16;

impl CopiedRanges {
    fn add(&mut self, reqs: &[(u64, u64)]) {
        for &(o, l) in reqs {
            let full = self.ranges.len() >= MAX_TRACKED;
            match self.ranges.last_mut() {
                Some(last) if last.1 == o => last.1 = o + l,
                _ if self.overflowed => {}
                _ if full => self.overflowed = true,
                _ => self.ranges.push((o, o + l)),
            }
        }
    }

    fn found_work(&self) -> bool {
        self.overflowed || !self.ranges.is_empty()
    }

    /// The next pass's scope: these ranges, or `None` (the whole disk).
    fn into_ranges(self) -> Option<Vec<(u64, u64)>> {
        (!self.overflowed).then_some(self.ranges)
    }
}

/// One pass over `[start, end)`: plans windows and copies what they need, adding what it
/// copied to `copied`. `count` adds what is skipped and local to the job's counters.
async fn stream_range(
    dev: &Arc<dyn Populate>,
    h: &StreamHandle,
    options: &StreamOptions,
    (start, end): (u64, u64),
    count: bool,
    copied: &mut CopiedRanges,
) -> Result<()> {
    let cs = dev.cluster_size();
    let mut pos = start;
    while pos < end {
        if h.wait_unpaused().await {
            return Err(h.cancelled_at(h.shared.offset.load(Ordering::Acquire)));
        }
        let limit = h.shared.rate_limit.load(Ordering::Acquire);
        let max = request_max(options, cs, h.shared.pool.chunk_bytes() as u64, limit);
        let Some(p) = plan_or_skip(dev, h, pos, end, max).await? else {
            // The plan failed and the policy skipped a request's worth from `pos`.
            pos = (pos + max).min(end);
            h.shared.offset.store(pos, Ordering::Release);
            continue;
        };
        if count {
            h.shared.skipped.fetch_add(p.skipped, Ordering::AcqRel);
            h.shared.local.fetch_add(p.local, Ordering::AcqRel);
        }
        let reqs = requests(&p.copy, max);
        copied.add(&reqs);
        copy_window(dev, h, options, &reqs, pos, p.end).await?;
        pos = p.end;
        h.shared.offset.store(pos, Ordering::Release);
    }
    Ok(())
}

/// Plans the window from `pos`, applying the job's policy when the plan fails: `None` when a
/// request's worth from `pos` (`skip` bytes) is to be skipped.
async fn plan_or_skip(
    dev: &Arc<dyn Populate>,
    h: &StreamHandle,
    pos: u64,
    end: u64,
    skip: u64,
) -> Result<Option<Plan>> {
    let size = end;
    loop {
        match plan(
            &**dev,
            pos,
            pos.saturating_add(PLAN_WINDOW).min(end),
            PLAN_BUDGET,
        )
        .await
        {
            Ok(p) => return Ok(Some(p)),
            Err(e) => {
                let length = skip.min(size - pos);
                match after_error(h, pos, length, e).await? {
                    AfterError::Retry => continue,
                    AfterError::Skip => return Ok(None),
                }
            }
        }
    }
}

/// The largest copy request: the configured size in whole clusters, and no more than a quarter
/// second's worth under a rate limit (so the limit is smooth).
fn request_max(options: &StreamOptions, cs: u64, chunk: u64, limit: u64) -> u64 {
    // Two requests fit the budget at least (one storing while the next one fetches).
    let half_budget = (options.buffer_budget / 2 / chunk).max(1) * chunk;
    let mut max = options.request_bytes.min(half_budget).max(cs) / cs * cs;
    if limit > 0 {
        max = max.min((limit / 4).max(cs) / cs * cs);
    }
    max
}

/// Copies the requests of one planned window `[pos, to)`, [`StreamOptions::in_flight`] at a
/// time, keeping the progress offset at the lowest request still in flight. Each request's
/// buffers are taken here, in request order, before it starts ([`take_in_order`]). The first
/// failure (the job's error policy has already decided to fail) and a cancel abort the
/// requests still in flight and return at once: waiting for them could take the backing's
/// whole timeouts (behind nbdkit's curl plugin with its web server down, a minute). What they
/// fetched is not stored; a store already started finishes in the background, under its range
/// locks.
async fn copy_window(
    dev: &Arc<dyn Populate>,
    h: &StreamHandle,
    options: &StreamOptions,
    reqs: &[(u64, u64)],
    pos: u64,
    to: u64,
) -> Result<()> {
    let (commits, queue) = mpsc::unbounded_channel();
    let _committer = AbortOnDrop(tokio::spawn(committer(
        Arc::clone(dev),
        h.clone(),
        queue,
        h.shared.pool.budget() / 4,
    )));
    let mut f = InFlight {
        set: JoinSet::new(),
        offsets: Default::default(),
        h,
    };
    let mut next = 0;
    let start_of = |next: usize| reqs.get(next).map_or(to, |r| r.0);
    while next < reqs.len() || !f.set.is_empty() {
        while next < reqs.len() && f.set.len() < options.in_flight.max(1) {
            let (o, l) = reqs[next];
            if h.wait_unpaused().await || h.charge(l).await {
                return Err(f.cancelled(o));
            }
            let chunks = take_in_order(&mut f, l, o).await?;
            f.offsets.insert(o);
            h.shared
                .offset
                .store(f.offsets.first().copied().unwrap_or(o), Ordering::Release);
            let (d, hh, retries) = (Arc::clone(dev), h.clone(), options.retries);
            let tx = commits.clone();
            f.set
                .spawn(async move { (o, copy_unit(d, hh, tx, (o, l), chunks, retries).await) });
            next += 1;
        }
        if f.set.is_empty() {
            break;
        }
        tokio::select! {
            Some(j) = f.set.join_next() => f.reap(j, start_of(next))?,
            c = h.cancelled_or_nudged() => {
                if c {
                    return Err(f.cancelled(pos));
                }
            }
        }
    }
    Ok(())
}

/// The requests of one window in flight (each returns its offset), and their offsets.
struct InFlight<'a> {
    set: JoinSet<(u64, Result<()>)>,
    offsets: std::collections::BTreeSet<u64>,
    h: &'a StreamHandle,
}

impl InFlight<'_> {
    /// Takes in a request that ended: its error aborts the others and comes back; otherwise
    /// the progress offset moves to the lowest request still in flight (`next_start`, the next
    /// request's start, when none is).
    fn reap(
        &mut self,
        joined: std::result::Result<(u64, Result<()>), tokio::task::JoinError>,
        next_start: u64,
    ) -> Result<()> {
        let failed = match joined {
            Ok((o, Ok(()))) => {
                self.offsets.remove(&o);
                let frontier = self.offsets.first().copied().unwrap_or(next_start);
                self.h.shared.offset.store(frontier, Ordering::Release);
                return Ok(());
            }
            Ok((_, Err(e))) => e,
            Err(e) if e.is_cancelled() => return Ok(()),
            Err(e) => Error::task("stream copy")(e),
        };
        self.set.abort_all();
        Err(failed)
    }

    /// Aborts every request and says where the job stopped: the lowest request in flight, or
    /// `fallback`.
    fn cancelled(&mut self, fallback: u64) -> Error {
        self.set.abort_all();
        self.h
            .cancelled_at(self.offsets.first().copied().unwrap_or(fallback))
    }
}

/// The buffers for the next request, `len` bytes at `offset`, taken by the window in request
/// order rather than by each request as it starts: a request never waits for buffers that
/// later ones hold. (Taken by the requests, whichever ran first took them; behind a backing
/// that fails the first request at once and never answers the others, the first could find
/// every buffer held by requests that would never end, and the job hung instead of failing.)
/// Requests that end meanwhile are taken in, and a cancel returns. `None` when the pool
/// refuses (a request over the whole budget): the request is then copied alone.
async fn take_in_order(
    f: &mut InFlight<'_>,
    len: u64,
    offset: u64,
) -> Result<Option<copy_on_read::Chunks>> {
    let pool = f.h.shared.pool.clone();
    loop {
        tokio::select! {
            chunks = pool.take(len) => return Ok(chunks.ok()),
            Some(j) = f.set.join_next(), if !f.set.is_empty() => f.reap(j, offset)?,
            c = f.h.cancelled_or_nudged() => {
                if c {
                    return Err(f.cancelled(offset));
                }
            }
        }
    }
}

/// What [`step`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepOutcome {
    /// Bytes copied into new data clusters.
    pub copied: u64,
    /// Where to continue from, or `None` when nothing is left from the given offset on.
    pub next: Option<u64>,
}

/// Finds the first range at or after `from` that still needs copying.
async fn next_work(dev: &dyn Populate, from: u64) -> Result<Option<u64>> {
    let size = dev.size();
    let cs = dev.cluster_size();
    let mut pos = from / cs * cs;
    while pos < size {
        let p = plan(dev, pos, (pos + PLAN_WINDOW).min(size), 1).await?;
        if let Some(&(a, _)) = p.copy.first() {
            return Ok(Some(a));
        }
        pos = p.end;
    }
    Ok(None)
}

/// Single-step mode: copies the unit of `length` bytes (rounded to clusters) that starts at
/// the first range needing a copy at or after `offset`, and says where to continue from
/// (`None`: nothing is left from `offset` to the end). Never drops the backing link.
pub async fn step(dev: &dyn Populate, offset: u64, length: u64) -> Result<StepOutcome> {
    let size = dev.size();
    let cs = dev.cluster_size();
    // Never more than the disk: a huge length must not overflow the arithmetic below.
    let length = length.clamp(1, size.max(1)).div_ceil(cs) * cs;
    let Some(start) = next_work(dev, offset.min(size)).await? else {
        return Ok(StepOutcome {
            copied: 0,
            next: None,
        });
    };
    let end = (start + length).min(size);
    let p = plan(dev, start, end, u64::MAX).await?;
    let mut copied = 0;
    for (a, l) in p.copy {
        copied += dev
            .populate_range(a, l)
            .await
            .map_err(Error::device)?
            .copied;
    }
    dev.flush().await.map_err(Error::device)?;
    let next = if end >= size {
        None
    } else {
        next_work(dev, end).await?
    };
    Ok(StepOutcome { copied, next })
}
