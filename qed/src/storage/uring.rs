//! The io_uring backend: one ring for the process, a reaper thread, callers that block on
//! their own completion.
//!
//! `qed` is synchronous, and the async block devices above it run every call on tokio's
//! blocking pool, so many threads call one [`Storage`] at once. Each call here pushes one
//! request (a read, a write or an `IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC`) onto the
//! shared submission queue and parks on its own waiter; the reaper thread waits in
//! `io_uring_enter` for completions and wakes the thread each one belongs to. So as many
//! requests are in flight as threads are calling, with one system call per request and one
//! for the reaper's batch of completions.
//!
//! Files are not registered with the ring: a registered file is referenced by the ring, and
//! after a SIGKILL the kernel drops those references only when its asynchronous ring teardown
//! runs, so the image's locks outlived the process and a `qemu-img check` run right after
//! the kill found the image locked (`engine/tests/stream.rs`,
//! `sigkill_mid_stream_then_resume_gives_the_same_content`, failed with registered files).
//! Buffers are not registered either: the callers' buffers are theirs (any address, any
//! length), and a registered pool would add a copy.
//!
//! **Memory safety.** The kernel writes into (or reads from) the caller's buffer until the
//! request's completion is posted. Every function that submits waits for that completion
//! before it returns, on every path: there is no timeout, no early return after the push, and
//! nothing between the push and the wait can panic. The buffer is borrowed for the whole call,
//! so it outlives the kernel's use of it; a thread that is being unwound cannot be inside the
//! call. The waiter itself is reference-counted and one reference travels with the request
//! (its `user_data`), so the reaper never touches freed memory either.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, OnceLock};

use io_uring::{opcode, squeue, types, IoUring};
use parking_lot::{Condvar, Mutex};

use super::{FileIo, Storage};

/// Submission queue entries of the process's ring (completions: twice as many; the kernel
/// keeps overflowing completions rather than dropping them).
const RING_ENTRIES: u32 = 256;

/// The largest single transfer handed to the kernel (lengths are `u32` in an SQE); longer
/// requests are completed by the resubmission loops above.
const MAX_TRANSFER: usize = 1 << 30;

/// Where one request's result is delivered.
#[derive(Debug, Default)]
struct Waiter {
    result: Mutex<Option<i32>>,
    done: Condvar,
}

impl Waiter {
    fn complete(&self, result: i32) {
        *self.result.lock() = Some(result);
        self.done.notify_one();
    }

    fn wait(&self) -> i32 {
        let mut result = self.result.lock();
        loop {
            if let Some(r) = *result {
                return r;
            }
            self.done.wait(&mut result);
        }
    }
}

/// The process's ring: the submission queue behind a lock, the completion queue read by
/// the reaper thread alone.
pub(crate) struct Ring {
    uring: IoUring,
    submit_lock: Mutex<()>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").finish_non_exhaustive()
    }
}

static RING: OnceLock<Result<Arc<Ring>, i32>> = OnceLock::new();

impl Ring {
    /// The process's ring, set up on first use; the `io_uring_setup` error (ENOSYS on an old
    /// kernel, EPERM under seccomp or `kernel.io_uring_disabled`) when there is none.
    pub(crate) fn global() -> io::Result<Arc<Ring>> {
        RING.get_or_init(|| Ring::start().map_err(|e| e.raw_os_error().unwrap_or(libc::EIO)))
            .clone()
            .map_err(io::Error::from_raw_os_error)
    }

    fn start() -> io::Result<Arc<Ring>> {
        let uring = IoUring::new(RING_ENTRIES)?;
        let ring = Arc::new(Ring {
            uring,
            submit_lock: Mutex::new(()),
        });
        let reaper = Arc::clone(&ring);
        std::thread::Builder::new()
            .name("qed-uring".into())
            .spawn(move || reaper.reap())?;
        Ok(ring)
    }

    /// The reaper: waits for completions and hands each to its waiter. Runs for the life of
    /// the process (the ring is never torn down while a file may still use it).
    fn reap(&self) {
        loop {
            match self.uring.submitter().submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if is_transient(&e) => {}
                Err(e) => {
                    tracing::error!("io_uring_enter failed in the reaper: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            // SAFETY: this thread is the only one that ever reads the completion queue.
            let completions = unsafe { self.uring.completion_shared() };
            for cqe in completions {
                let waiter = cqe.user_data() as *const Waiter;
                // SAFETY: every submitted entry's user_data is a pointer made by
                // `Arc::into_raw` in `Ring::run`, and each completion is seen exactly once,
                // so this takes back the one reference the request carried.
                let waiter = unsafe { Arc::from_raw(waiter) };
                waiter.complete(cqe.result());
            }
        }
    }

    /// Pushes `entry` and waits for its completion; returns the kernel's result (a byte
    /// count, or a negative errno).
    ///
    /// # Safety
    ///
    /// Every buffer `entry` points at must stay valid (and unaliased, for a read) until this
    /// function returns: it returns only once the kernel has completed the request.
    unsafe fn run(&self, entry: squeue::Entry) -> i32 {
        let waiter = Arc::new(Waiter::default());
        let entry = entry.user_data(Arc::into_raw(Arc::clone(&waiter)) as u64);
        self.push(&entry);
        // Always wait: the kernel may use the buffer until the completion is posted.
        waiter.wait()
    }

    /// Puts `entry` on the submission queue and submits it (retrying while the kernel is
    /// busy: an entry left on the queue is submitted by the next `io_uring_enter`).
    fn push(&self, entry: &squeue::Entry) {
        let _guard = self.submit_lock.lock();
        loop {
            // SAFETY: `submit_lock` is held, so no other thread touches the submission queue.
            let mut queue = unsafe { self.uring.submission_shared() };
            // SAFETY: the entry's buffers stay valid until its completion (`Ring::run`'s
            // contract), and its user_data is a live `Arc<Waiter>` reference.
            if unsafe { queue.push(entry) }.is_ok() {
                break;
            }
            drop(queue);
            self.submit_pending();
        }
        self.submit_pending();
    }

    /// `io_uring_enter` for what is queued, retried while the kernel says busy.
    fn submit_pending(&self) {
        loop {
            match self.uring.submitter().submit() {
                Ok(_) => return,
                Err(e) if is_transient(&e) => std::thread::yield_now(),
                Err(e) => {
                    // The entries stay queued; the reaper's next enter submits them.
                    tracing::error!("io_uring_enter failed: {e}");
                    return;
                }
            }
        }
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
    )
}

/// A file read and written through the process's io_uring (page cache or O_DIRECT, as the
/// file was opened). As a [`Storage`] it is the buffered backend; wrapped in
/// [`super::direct::DirectFile`] it serves O_DIRECT.
#[derive(Debug)]
pub struct UringFile {
    file: File,
    ring: Arc<Ring>,
}

impl UringFile {
    /// Puts `file` on the process's ring (set up on first use); fails with the
    /// `io_uring_setup` error when io_uring is unavailable.
    pub fn new(file: File) -> io::Result<UringFile> {
        let ring = Ring::global()?;
        Ok(UringFile { file, ring })
    }

    fn target(&self) -> types::Fd {
        types::Fd(self.file.as_raw_fd())
    }
}

fn errno_result(r: i32) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::from_raw_os_error(-r))
    } else {
        Ok(r as usize)
    }
}

impl FileIo for UringFile {
    fn file(&self) -> &File {
        &self.file
    }

    fn read_once(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let len = buf.len().min(MAX_TRANSFER) as u32;
        let ptr = buf.as_mut_ptr();
        let entry = opcode::Read::new(self.target(), ptr, len)
            .offset(offset)
            .build();
        // SAFETY: `buf` is mutably borrowed for this whole call and `run` returns only after
        // the kernel has completed the read, so the kernel writes into live, unaliased memory.
        errno_result(unsafe { self.ring.run(entry) })
    }

    fn write_once(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        let len = buf.len().min(MAX_TRANSFER) as u32;
        let ptr = buf.as_ptr();
        let entry = opcode::Write::new(self.target(), ptr, len)
            .offset(offset)
            .build();
        // SAFETY: `buf` is borrowed for this whole call and `run` returns only after the
        // kernel has completed the write, so the kernel reads live memory.
        errno_result(unsafe { self.ring.run(entry) })
    }

    fn sync_data(&self) -> io::Result<()> {
        let flags = types::FsyncFlags::DATASYNC;
        let entry = opcode::Fsync::new(self.target()).flags(flags).build();
        // SAFETY: an fsync names no memory; `run` waits for its completion.
        errno_result(unsafe { self.ring.run(entry) }).map(drop)
    }
}

impl Storage for UringFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        super::read_full(self, buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        super::write_full(self, buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        super::seek_data(&self.file, offset)
    }

    fn file_id(&self) -> Option<crate::file::FileId> {
        crate::file::FileId::of(&self.file).ok()
    }
}
