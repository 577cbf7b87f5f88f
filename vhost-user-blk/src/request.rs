//! Parsing one virtio-blk descriptor chain into a [`Request`], defensively.
//!
//! [`parse`] is a pure function of the guest memory and the chain's descriptors: it reads
//! the 16-byte header, checks every descriptor against guest memory and its direction against
//! the request type, and checks the sector range against the device. What it cannot accept
//! becomes a [`Rejection`] carrying the status to write, when a status byte can be written at
//! all. Nothing here panics or allocates more than one entry per descriptor, whatever the
//! chain says.
//!
//! The layout (virtio 1.2, 5.2.6): a device-readable header (`type: le32, reserved: le32,
//! sector: le64`), data descriptors (device-writable for IN and GET_ID, device-readable for
//! OUT, DISCARD, WRITE_ZEROES; none for FLUSH), and a device-writable status byte, the last
//! byte of the chain. As QEMU does, a header descriptor longer than 16 bytes carries data
//! after the header, and a status descriptor longer than one byte carries data before it.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use crate::config::{MAX_RANGES, SECTOR_SIZE, SEG_MAX};

/// The size of the request header.
pub const HEADER_LEN: u32 = 16;

/// The size of one DISCARD / WRITE_ZEROES range (`sector: le64, num_sectors: le32, flags:
/// le32`).
pub const RANGE_LEN: u64 = 16;

/// A status byte: success.
pub const STATUS_OK: u8 = 0;
/// A status byte: the request failed (malformed, out of range, or an I/O error).
pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// A status byte: the request type is not supported.
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Read sectors into the data segments.
    Read,
    /// Write the data segments to sectors.
    Write,
    /// Make completed writes durable.
    Flush,
    /// Write the device id (up to 20 bytes) into the data segments.
    GetId,
    /// Free the ranges listed in the data segments.
    Discard,
    /// Zero the ranges listed in the data segments.
    WriteZeroes,
}

impl Operation {
    /// Whether the data segments are written by the device.
    fn device_writes(self) -> bool {
        matches!(self, Operation::Read | Operation::GetId)
    }

    /// Whether the request changes the device.
    fn modifies(self) -> bool {
        matches!(
            self,
            Operation::Write | Operation::Discard | Operation::WriteZeroes
        )
    }
}

/// One run of guest memory, already checked to lie inside guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Its guest-physical address.
    pub addr: GuestAddress,
    /// Its length in bytes (never zero).
    pub len: u32,
}

/// A well-formed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// What it asks for.
    pub op: Operation,
    /// The first sector (READ, WRITE; zero otherwise).
    pub sector: u64,
    /// The data segments, in order.
    pub data: Vec<Segment>,
    /// Their total length in bytes.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// A chain that cannot be served: the status to report, and where, if anywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// [`STATUS_IOERR`] or [`STATUS_UNSUPP`].
    pub code: u8,
    /// The status byte's address, when the chain ends in a writable byte inside guest memory.
    pub status: Option<GuestAddress>,
    /// Why, for logs.
    pub reason: &'static str,
}

/// What the parser needs to know about the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Writes, discards and write-zeroes are refused.
    pub read_only: bool,
    /// DISCARD is offered.
    pub discard: bool,
}

/// Parses the descriptors of one chain (as `virtio_queue::DescriptorChain` yields them) into
/// a request, or says why not.
pub fn parse<M: GuestMemory + ?Sized>(
    mem: &M,
    chain: impl IntoIterator<Item = Descriptor>,
    limits: &Limits,
) -> Result<Request, Rejection> {
    let descs = collect(chain)?;
    let (status, tail) = status_of(mem, &descs)?;
    let reject = |code, reason| Rejection {
        code,
        status: Some(status),
        reason,
    };
    let head = descs[0];
    if head.is_write_only() || head.len() < HEADER_LEN || !in_memory(mem, &head) {
        return Err(reject(STATUS_IOERR, "the header is not 16 readable bytes"));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut header, head.addr())
        .map_err(|_| reject(STATUS_IOERR, "the header cannot be read"))?;
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
    let op = operation(kind, limits).map_err(|reason| reject(STATUS_UNSUPP, reason))?;
    if op.modifies() && limits.read_only {
        return Err(reject(STATUS_IOERR, "the device is read-only"));
    }
    let data = data_segments(mem, &descs, tail, op).map_err(|r| reject(STATUS_IOERR, r))?;
    let data_len = data.iter().map(|s| u64::from(s.len)).sum::<u64>();
    let sector = check_shape(op, sector, data.len(), data_len, limits)
        .map_err(|r| reject(STATUS_IOERR, r))?;
    Ok(Request {
        op,
        sector,
        data,
        data_len,
        status,
    })
}

/// The descriptors, or a rejection without status when the chain is empty or was cut short
/// (a loop, a `next` outside the table, an unreadable table: the iterator stops while the
/// last descriptor it gave still says NEXT).
fn collect(chain: impl IntoIterator<Item = Descriptor>) -> Result<Vec<Descriptor>, Rejection> {
    let cut = |reason| Rejection {
        code: STATUS_IOERR,
        status: None,
        reason,
    };
    let mut descs = Vec::new();
    for d in chain {
        if descs.len() > usize::from(u16::MAX) {
            return Err(cut("the chain is longer than any queue"));
        }
        descs.push(d);
    }
    match descs.last() {
        None => Err(cut("the chain is empty")),
        Some(last) if last.has_next() => Err(cut("the chain loops or leaves its table")),
        Some(_) => Ok(descs),
    }
}

/// The status byte's address (the last byte of the last descriptor, which must be writable
/// and inside guest memory), and how many bytes of that descriptor come before it.
fn status_of<M: GuestMemory + ?Sized>(
    mem: &M,
    descs: &[Descriptor],
) -> Result<(GuestAddress, u32), Rejection> {
    let last = descs[descs.len() - 1];
    let no_status = |reason| Rejection {
        code: STATUS_IOERR,
        status: None,
        reason,
    };
    if descs.len() < 2 {
        return Err(no_status(
            "the chain is too short for a header and a status",
        ));
    }
    if !last.is_write_only() || last.len() == 0 {
        return Err(no_status(
            "the chain does not end in a writable status byte",
        ));
    }
    if !in_memory(mem, &last) {
        return Err(no_status("the status byte is outside guest memory"));
    }
    let tail = last.len() - 1;
    Ok((last.addr().unchecked_add(u64::from(tail)), tail))
}

/// The request type, if the device serves it.
fn operation(kind: u32, limits: &Limits) -> Result<Operation, &'static str> {
    match kind {
        VIRTIO_BLK_T_IN => Ok(Operation::Read),
        VIRTIO_BLK_T_OUT => Ok(Operation::Write),
        VIRTIO_BLK_T_FLUSH => Ok(Operation::Flush),
        VIRTIO_BLK_T_GET_ID => Ok(Operation::GetId),
        VIRTIO_BLK_T_DISCARD if limits.discard => Ok(Operation::Discard),
        VIRTIO_BLK_T_WRITE_ZEROES => Ok(Operation::WriteZeroes),
        _ => Err("the request type is not supported"),
    }
}

/// The data segments between the header and the status byte, each inside guest memory and
/// in the direction `op` needs.
fn data_segments<M: GuestMemory + ?Sized>(
    mem: &M,
    descs: &[Descriptor],
    tail: u32,
    op: Operation,
) -> Result<Vec<Segment>, &'static str> {
    let last = descs.len() - 1;
    let mut runs = Vec::with_capacity(descs.len());
    let head = descs[0];
    if head.len() > HEADER_LEN {
        let addr = head.addr().unchecked_add(u64::from(HEADER_LEN));
        runs.push((addr, head.len() - HEADER_LEN, false));
    }
    runs.extend(
        descs[1..last]
            .iter()
            .map(|d| (d.addr(), d.len(), d.is_write_only())),
    );
    if tail > 0 {
        runs.push((descs[last].addr(), tail, true));
    }
    let mut data = Vec::with_capacity(runs.len());
    for (addr, len, writable) in runs {
        if writable != op.device_writes() {
            return Err("a data descriptor has the wrong direction");
        }
        if len == 0 {
            continue;
        }
        if !mem.check_range(addr, len as usize) {
            return Err("a data descriptor is outside guest memory");
        }
        data.push(Segment { addr, len });
    }
    if data.len() > SEG_MAX as usize {
        return Err("more data segments than seg_max");
    }
    Ok(data)
}

/// Checks the request's size and range against the device; gives the sector to use.
fn check_shape(
    op: Operation,
    sector: u64,
    segments: usize,
    data_len: u64,
    limits: &Limits,
) -> Result<u64, &'static str> {
    match op {
        Operation::Read | Operation::Write => {
            if data_len % SECTOR_SIZE != 0 {
                return Err("the data is not a whole number of sectors");
            }
            let end = sector.checked_add(data_len / SECTOR_SIZE);
            match end {
                Some(end) if end <= limits.capacity_sectors => Ok(sector),
                _ => Err("the sectors lie past the end of the device"),
            }
        }
        Operation::Flush | Operation::GetId => {
            if op == Operation::GetId && segments == 0 {
                return Err("GET_ID without a data buffer");
            }
            Ok(0)
        }
        Operation::Discard | Operation::WriteZeroes => {
            if data_len == 0 || data_len % RANGE_LEN != 0 {
                return Err("the range list is not a whole number of 16-byte ranges");
            }
            if data_len / RANGE_LEN > u64::from(MAX_RANGES) {
                return Err("more ranges than max_discard_seg");
            }
            Ok(0)
        }
    }
}

/// Whether a descriptor's whole buffer lies inside guest memory.
fn in_memory<M: GuestMemory + ?Sized>(mem: &M, d: &Descriptor) -> bool {
    mem.check_range(d.addr(), d.len() as usize)
}
