//! Running one parsed [`Request`] against a [`BlockDevice`], with guest memory as the
//! request's buffers.
//!
//! READ and WRITE hand the device the guest's own pages ([`GuestBuf`] segments in an
//! [`IoBufs`]): data already in the image moves between the file and guest memory with no
//! copy of ours. The one copy that remains is the copy-on-read device's own, for data that
//! crosses its copy-on-read path (fetched from the backing or merged into a partial cluster):
//! it must store what it read, and guest memory can change under it. The 16-byte range of a
//! DISCARD / WRITE_ZEROES and the 20-byte GET_ID answer are copied (they are tiny).

use std::sync::Arc;

use copy_on_read::{BlockDevice, Error as DeviceError, IoBuf, IoBufs, WriteFlags};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use crate::config::{MAX_RANGE_SECTORS, SECTOR_SIZE};
use crate::request::{
    Operation, Rejection, Request, Segment, RANGE_LEN, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP,
};

/// The guest memory this crate serves (no dirty-page bitmap).
pub type GuestRam = GuestMemoryMmap<()>;

/// A run of guest memory lent to a device request. It holds the memory map it points into,
/// so the mapping outlives the request even if the front end replaces the memory table.
pub struct GuestBuf {
    _mem: Arc<GuestRam>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the pointer is into a shared mapping kept alive by `_mem`; the type has no
// thread-affine state.
unsafe impl Send for GuestBuf {}
// SAFETY: as for Send; `&GuestBuf` only gives out `&[u8]`.
unsafe impl Sync for GuestBuf {}

impl IoBuf for GuestBuf {
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: `ptr..ptr + len` lies inside one mapped region of `_mem` (checked in
        // `GuestBuf::split`), which lives as long as `self`. The guest may change the bytes
        // concurrently (it owns them, as with any DMA); the device only copies them.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_bytes`; `&mut self` makes this the only slice of ours.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl std::fmt::Debug for GuestBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestBuf").field("len", &self.len).finish()
    }
}

impl GuestBuf {
    /// The segment as buffers, one per memory region it touches; `None` when part of it is
    /// not mapped.
    fn split(mem: &Arc<GuestRam>, seg: Segment, out: &mut IoBufs) -> Option<()> {
        let mut addr = seg.addr;
        let mut left = u64::from(seg.len);
        while left > 0 {
            let (region, at) = mem.to_region_addr(addr)?;
            let take = (region.len() - at.raw_value()).min(left);
            let ptr = host_pointer(region, at, take)?;
            out.push(GuestBuf {
                _mem: mem.clone(),
                ptr,
                len: take as usize,
            });
            addr = addr.checked_add(take)?;
            left -= take;
        }
        Some(())
    }
}

/// The host address of `len` bytes at `at` in `region`.
fn host_pointer<R: GuestMemoryRegion>(
    region: &R,
    at: MemoryRegionAddress,
    len: u64,
) -> Option<*mut u8> {
    let slice = region.get_slice(at, usize::try_from(len).ok()?).ok()?;
    Some(slice.ptr_guard_mut().as_ptr())
}

/// The request's data segments as device buffers over guest memory.
fn guest_bufs(mem: &Arc<GuestRam>, data: &[Segment]) -> Option<IoBufs> {
    let mut bufs = IoBufs::new();
    for seg in data {
        GuestBuf::split(mem, *seg, &mut bufs)?;
    }
    Some(bufs)
}

/// How a request ended: the status byte and the bytes the device wrote into the data
/// segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// [`STATUS_OK`], [`STATUS_IOERR`] or [`STATUS_UNSUPP`].
    pub status: u8,
    /// Data bytes written to guest memory (READ, GET_ID).
    pub written: u32,
}

impl Outcome {
    const fn status(status: u8) -> Outcome {
        Outcome { status, written: 0 }
    }
}

/// Runs `req` on `device`; `id` is the GET_ID answer.
pub async fn execute(
    device: &dyn BlockDevice,
    mem: &Arc<GuestRam>,
    req: &Request,
    id: &[u8],
) -> Outcome {
    let offset = req.sector.saturating_mul(SECTOR_SIZE);
    let done = |r: Result<(), DeviceError>| match r {
        Ok(()) => Outcome::status(STATUS_OK),
        Err(e) => failed(&e),
    };
    match req.op {
        Operation::Read => {
            let Some(bufs) = guest_bufs(mem, &req.data) else {
                return Outcome::status(STATUS_IOERR);
            };
            match device.readv(offset, bufs).await {
                Ok(_) => Outcome {
                    status: STATUS_OK,
                    written: u32::try_from(req.data_len).unwrap_or(u32::MAX),
                },
                Err(e) => failed(&e),
            }
        }
        Operation::Write => {
            let Some(bufs) = guest_bufs(mem, &req.data) else {
                return Outcome::status(STATUS_IOERR);
            };
            done(
                device
                    .writev(offset, bufs, WriteFlags::default())
                    .await
                    .map(drop),
            )
        }
        Operation::Flush => done(device.flush().await),
        Operation::GetId => write_id(mem.as_ref(), &req.data, id),
        Operation::Discard | Operation::WriteZeroes => ranges(device, mem.as_ref(), req).await,
    }
}

/// Runs a READ on the calling thread, when the device can answer it from its own storage
/// ([`BlockDevice::read_blocking`]): straight from the file into guest memory with no hop to
/// another thread. `None` when it cannot (a range the backing must fill, or not a READ): the
/// caller runs [`execute`].
pub fn read_now(device: &dyn BlockDevice, mem: &Arc<GuestRam>, req: &Request) -> Option<Outcome> {
    if req.op != Operation::Read {
        return None;
    }
    let offset = req.sector.saturating_mul(SECTOR_SIZE);
    let Some(bufs) = guest_bufs(mem, &req.data) else {
        return Some(Outcome::status(STATUS_IOERR));
    };
    match device.read_blocking(offset, bufs) {
        Ok(Ok(_)) => Some(Outcome {
            status: STATUS_OK,
            written: u32::try_from(req.data_len).unwrap_or(u32::MAX),
        }),
        Ok(Err(_)) => None,
        Err(e) => Some(failed(&e)),
    }
}

/// The status for a device error.
fn failed(e: &DeviceError) -> Outcome {
    tracing::debug!(error = %e, "virtio-blk request failed");
    match e {
        DeviceError::Unsupported(_) => Outcome::status(STATUS_UNSUPP),
        _ => Outcome::status(STATUS_IOERR),
    }
}

/// GET_ID: the id, NUL-padded to 20 bytes, cut to the buffer.
fn write_id(mem: &GuestRam, data: &[Segment], id: &[u8]) -> Outcome {
    let mut answer = [0u8; VIRTIO_BLK_ID_BYTES as usize];
    let n = id.len().min(answer.len());
    answer[..n].copy_from_slice(&id[..n]);
    let mut at = 0usize;
    for seg in data {
        if at == answer.len() {
            break;
        }
        let take = (seg.len as usize).min(answer.len() - at);
        if mem.write_slice(&answer[at..at + take], seg.addr).is_err() {
            return Outcome::status(STATUS_IOERR);
        }
        at += take;
    }
    Outcome {
        status: STATUS_OK,
        written: at as u32,
    }
}

/// One DISCARD / WRITE_ZEROES range as the guest wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Range {
    sector: u64,
    sectors: u32,
    flags: u32,
}

/// Reads the ranges of a DISCARD or WRITE_ZEROES (the parser bounded their count) and runs
/// them.
async fn ranges(device: &dyn BlockDevice, mem: &GuestRam, req: &Request) -> Outcome {
    let Some(bytes) = gather(mem, &req.data) else {
        return Outcome::status(STATUS_IOERR);
    };
    let size = device.size();
    for raw in bytes.chunks_exact(RANGE_LEN as usize) {
        let r = Range {
            sector: u64::from_le_bytes(raw[0..8].try_into().unwrap_or([0; 8])),
            sectors: u32::from_le_bytes(raw[8..12].try_into().unwrap_or([0; 4])),
            flags: u32::from_le_bytes(raw[12..16].try_into().unwrap_or([0; 4])),
        };
        let allowed = match req.op {
            Operation::WriteZeroes => VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
            _ => 0,
        };
        if r.flags & !allowed != 0 {
            return Outcome::status(STATUS_UNSUPP);
        }
        let offset = r.sector.checked_mul(SECTOR_SIZE);
        let length = u64::from(r.sectors) * SECTOR_SIZE;
        let inside = offset
            .and_then(|o| o.checked_add(length))
            .is_some_and(|end| end <= size / SECTOR_SIZE * SECTOR_SIZE);
        if !inside || r.sectors > MAX_RANGE_SECTORS {
            return Outcome::status(STATUS_IOERR);
        }
        let offset = r.sector * SECTOR_SIZE;
        let result = match req.op {
            Operation::Discard => device.discard(offset, length).await,
            _ => device.write_zeroes(offset, length).await,
        };
        if let Err(e) = result {
            return failed(&e);
        }
    }
    Outcome::status(STATUS_OK)
}

/// Copies the (small, bounded by the parser) data segments into one buffer.
fn gather(mem: &GuestRam, data: &[Segment]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for seg in data {
        let at = out.len();
        out.resize(at + seg.len as usize, 0);
        mem.read_slice(&mut out[at..], seg.addr).ok()?;
    }
    Some(out)
}

/// Writes the status byte of a finished or rejected request; gives the used length to put
/// in the used ring (data written plus the status byte; 0 when no status could be written).
pub fn complete(mem: &GuestRam, status: Option<GuestAddress>, outcome: Outcome) -> u32 {
    match status {
        Some(addr) if mem.write_obj(outcome.status, addr).is_ok() => {
            outcome.written.saturating_add(1)
        }
        _ => 0,
    }
}

/// The outcome of a rejected chain.
pub fn rejected(r: &Rejection) -> Outcome {
    Outcome::status(r.code)
}
