//! The fuzz target's logic (`fuzz/fuzz_targets/vhost_blk_chain.rs`), here so that its seeds
//! also run as ordinary tests on stable.
//!
//! An input is a descriptor table, a head index and guest memory contents: [`run_input`]
//! writes them into a fake guest memory (two regions, so chains can cross a gap), makes a
//! split queue whose available ring offers the head, and runs the parser and the executor on
//! an in-memory disk ([`MemDisk`]). Malformed chains must end in a rejection, never a panic,
//! hang or unbounded allocation. [`encode_input`] builds inputs (the seed generator uses it).
//!
//! Layout of an input: byte 0 is the head index (mod 16); then 16 descriptors of 16 bytes
//! each (`addr: le64, len: le32, flags: le16, next: le16`, as in the split ring), then bytes
//! copied into guest memory at [`DATA_AT`] (up to the first region's end).

use std::sync::{Arc, Mutex};

use copy_on_read::{BlockDevice, Capabilities, Error, IoBufs, IoFuture, StatusExtent, WriteFlags};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::execute::{complete, execute, rejected};
use crate::request::{parse, Limits};

/// Descriptors in the fuzzed table (the queue size).
pub const TABLE: u16 = 16;
/// The first region: 64 KiB at 0 (table at 0, avail ring at 0x100, used ring at 0x200).
pub const REGION0: u64 = 0x1_0000;
/// The second region: 64 KiB at 1 MiB (a gap between).
pub const REGION1: u64 = 0x10_0000;
/// Where the input's memory bytes go.
pub const DATA_AT: u64 = 0x400;
/// The in-memory disk's size.
pub const DISK: u64 = 1 << 20;

const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;

/// A writable in-memory disk that can discard (it zeroes).
#[derive(Debug)]
pub struct MemDisk(Mutex<Vec<u8>>);

impl MemDisk {
    /// A disk of `size` zero bytes.
    pub fn new(size: usize) -> MemDisk {
        MemDisk(Mutex::new(vec![0; size]))
    }

    fn range(&self, offset: u64, len: u64) -> copy_on_read::Result<std::ops::Range<usize>> {
        copy_on_read::device::check_range(offset, len, self.size())?;
        Ok(offset as usize..(offset + len) as usize)
    }

    fn fill(&self, offset: u64, length: u64) -> copy_on_read::Result<()> {
        let r = self.range(offset, length)?;
        self.0.lock().map_err(|_| Error::Closed)?[r].fill(0);
        Ok(())
    }
}

impl BlockDevice for MemDisk {
    fn size(&self) -> u64 {
        self.0.lock().map_or(0, |d| d.len() as u64)
    }
    fn readv(&self, offset: u64, mut bufs: IoBufs) -> IoFuture<'_, IoBufs> {
        Box::pin(async move {
            let r = self.range(offset, bufs.len() as u64)?;
            bufs.copy_in(0, &self.0.lock().map_err(|_| Error::Closed)?[r]);
            Ok(bufs)
        })
    }
    fn writev(&self, offset: u64, bufs: IoBufs, _flags: WriteFlags) -> IoFuture<'_, IoBufs> {
        Box::pin(async move {
            let r = self.range(offset, bufs.len() as u64)?;
            bufs.copy_out(0, &mut self.0.lock().map_err(|_| Error::Closed)?[r]);
            Ok(bufs)
        })
    }
    fn write_zeroes(&self, offset: u64, length: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { self.fill(offset, length) })
    }
    fn discard(&self, offset: u64, length: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { self.fill(offset, length) })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn block_status(&self, _offset: u64, _length: u64) -> IoFuture<'_, Vec<StatusExtent>> {
        Box::pin(async { Err(Error::Unsupported("block status")) })
    }
    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::default();
        caps.writable = true;
        caps.discard = true;
        caps
    }
    fn describe(&self) -> String {
        "memory".into()
    }
    fn close(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// What one input did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainOutcome {
    /// The status byte written, if one was.
    pub status: Option<u8>,
    /// The used length reported to the driver.
    pub used: u32,
}

/// Builds an input: the head, up to [`TABLE`] descriptors `(addr, len, flags, next)`, and
/// guest memory bytes for [`DATA_AT`].
pub fn encode_input(head: u16, descs: &[(u64, u32, u16, u16)], memory: &[u8]) -> Vec<u8> {
    let mut out = vec![head as u8];
    for i in 0..usize::from(TABLE) {
        let (addr, len, flags, next) = descs.get(i).copied().unwrap_or_default();
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&next.to_le_bytes());
    }
    out.extend_from_slice(memory);
    out
}

/// Runs one fuzz input; `None` when it is too short to hold a table.
pub fn run_input(data: &[u8]) -> Option<ChainOutcome> {
    let table_len = usize::from(TABLE) * 16;
    if data.len() < 1 + table_len {
        return None;
    }
    let mem = Arc::new(
        GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), REGION0 as usize),
            (GuestAddress(REGION1), REGION0 as usize),
        ])
        .ok()?,
    );
    mem.write_slice(&data[1..1 + table_len], GuestAddress(0))
        .ok()?;
    let extra = &data[1 + table_len..];
    let extra = &extra[..extra.len().min((REGION0 - DATA_AT) as usize)];
    mem.write_slice(extra, GuestAddress(DATA_AT)).ok()?;
    let head = u16::from(data[0]) % TABLE;
    mem.write_obj(1u16.to_le(), GuestAddress(AVAIL + 2)).ok()?;
    mem.write_obj(head.to_le(), GuestAddress(AVAIL + 4)).ok()?;
    let mut queue = Queue::new(TABLE).ok()?;
    queue.set_desc_table_address(Some(0), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_ready(true);
    let chain = queue.iter(mem.as_ref()).ok()?.next()?;
    let limits = Limits {
        capacity_sectors: DISK / 512,
        read_only: false,
        discard: true,
    };
    let (status, outcome) = match parse(mem.as_ref(), chain, &limits) {
        Ok(req) => {
            let disk = MemDisk::new(DISK as usize);
            (
                Some(req.status),
                block_on(execute(&disk, &mem, &req, b"fuzz")),
            )
        }
        Err(r) => (r.status, rejected(&r)),
    };
    let used = complete(&mem, status, outcome);
    Some(ChainOutcome {
        status: status.map(|_| outcome.status),
        used,
    })
}

/// Runs a future to completion on a small current-thread runtime.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime");
    }
    RT.with(|rt| rt.block_on(f))
}
