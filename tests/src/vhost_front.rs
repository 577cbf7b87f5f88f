//! A vhost-user-blk front end in a test process: it plays the VM's part (the guest memory, the
//! split virtqueues, the virtio-blk driver) against any vhost-user-blk server on a unix socket,
//! `qedstream serve --vhost-user-blk` or qemu-storage-daemon's `--export type=vhost-user-blk`,
//! so the device can be read, written and measured without booting a guest.
//!
//! Guest memory is one shared file (in `/dev/shm`) mapped here and handed to the server with
//! `SET_MEM_TABLE`. Each queue has its descriptor table, available and used rings at fixed
//! places, and `depth` request slots; slot `s` owns descriptors `3s..3s+3` (header, data,
//! status), its header, its status byte and `max_len` bytes of data. Features negotiated:
//! VERSION_1, FLUSH, MQ (with more than one queue) and the vhost-user protocol features CONFIG
//! and MQ; no EVENT_IDX and no indirect descriptors, so the server signals every completion.
//!
//! ```no_run
//! use qedstream_tests::vhost_front::{BlkRequest, VhostFront};
//! let mut front = VhostFront::connect("/run/vm1/blk.sock".as_ref(), 1, 16, 1 << 20).unwrap();
//! let first = front.read_at(0, 0, 4096).unwrap();
//! front.write_at(0, 4096, &first).unwrap();
//! front.flush(0).unwrap();
//! # let _ = BlkRequest::Flush;
//! ```

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Descriptors per queue (a power of two, at most the server's queue size).
const QUEUE_SIZE: u16 = 128;
/// Bytes of guest memory each queue's rings take (descriptor table, available, used).
const RING_AREA: u64 = 0x4000;
/// Where the request slots' headers and status bytes begin.
const SLOT_AREA: u64 = 0x10_0000;
/// Bytes of header and status per slot.
const SLOT_META: u64 = 32;
/// Where the data buffers begin.
const DATA_AREA: u64 = 0x20_0000;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// How long a request may take before the driver calls it hung.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(60);

/// One virtio-blk request, as a slot carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkRequest {
    /// VIRTIO_BLK_T_IN: read `len` bytes at byte `offset` (a multiple of 512).
    Read {
        /// Byte offset on the disk.
        offset: u64,
        /// Bytes to read (at most the slot's `max_len`).
        len: u32,
    },
    /// VIRTIO_BLK_T_OUT: write the slot's first `len` data bytes at byte `offset`.
    Write {
        /// Byte offset on the disk.
        offset: u64,
        /// Bytes to write.
        len: u32,
    },
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
}

/// A finished request: its slot, the status byte the device wrote (0 = OK) and the used
/// length it reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The slot the request was in.
    pub slot: u16,
    /// VIRTIO_BLK_S_OK (0), IOERR (1) or UNSUPP (2); 0xff if the device did not write it.
    pub status: u8,
    /// Bytes the device says it wrote into the chain.
    pub used_len: u32,
}

#[derive(Debug)]
struct Queue {
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    next_avail: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
}

/// A connected front end with its guest memory and queues. The server's thread for this front
/// end ends when this is dropped (the socket closes).
pub struct VhostFront {
    frontend: Frontend,
    memory: GuestMemoryMmap<()>,
    queues: Vec<Queue>,
    depth: u16,
    max_len: u32,
    capacity: u64,
    /// Keeps the shared memory file open for as long as the mapping is used.
    _file: std::fs::File,
}

impl std::fmt::Debug for VhostFront {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostFront")
            .field("queues", &self.queues.len())
            .field("depth", &self.depth)
            .field("max_len", &self.max_len)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

fn other(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

impl VhostFront {
    /// Connects to the server on `socket`, negotiates, and sets up `queues` queues, each with
    /// `depth` request slots of `max_len` data bytes.
    pub fn connect(socket: &Path, queues: u16, depth: u16, max_len: u32) -> io::Result<Self> {
        if queues == 0 || depth == 0 || u32::from(depth) * 3 > u32::from(QUEUE_SIZE) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "queues {queues} and depth {depth} (at most {})",
                    QUEUE_SIZE / 3
                ),
            ));
        }
        let slots = u64::from(queues) * u64::from(depth);
        let size = DATA_AREA + slots * u64::from(max_len);
        if u64::from(queues) * RING_AREA > SLOT_AREA || slots * SLOT_META > DATA_AREA - SLOT_AREA {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many slots",
            ));
        }
        let file = tempfile::tempfile_in("/dev/shm")?;
        file.set_len(size)?;
        let len = usize::try_from(size).map_err(|e| other("memory size", e))?;
        let offset = FileOffset::new(file.try_clone()?, 0);
        let memory =
            GuestMemoryMmap::<()>::from_ranges_with_files([(GuestAddress(0), len, Some(offset))])
                .map_err(|e| other("mapping guest memory", e))?;

        let mut frontend =
            Frontend::connect(socket, u64::from(queues)).map_err(|e| other("connecting", e))?;
        negotiate(&mut frontend, queues)?;
        let mut front = VhostFront {
            frontend,
            memory,
            queues: Vec::new(),
            depth,
            max_len,
            capacity: 0,
            _file: file,
        };
        front.set_mem_table()?;
        for q in 0..queues {
            front.start_queue(q)?;
        }
        front.capacity = front.read_capacity()?;
        Ok(front)
    }

    /// The disk's size in bytes, from the device's configuration space.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Request slots per queue.
    pub fn depth(&self) -> u16 {
        self.depth
    }

    fn set_mem_table(&mut self) -> io::Result<()> {
        let region = self
            .memory
            .iter()
            .next()
            .ok_or_else(|| io::Error::other("no guest memory region"))?;
        let info = VhostUserMemoryRegionInfo::from_guest_region(region)
            .map_err(|e| other("memory region", e))?;
        self.frontend
            .set_mem_table(&[info])
            .map_err(|e| other("SET_MEM_TABLE", e))
    }

    /// The front end's own address of guest address `addr` (vring addresses are given so).
    fn host_address(&self, addr: GuestAddress) -> io::Result<u64> {
        self.memory
            .get_host_address(addr)
            .map(|p| p as u64)
            .map_err(|e| other("guest address", e))
    }

    fn start_queue(&mut self, q: u16) -> io::Result<()> {
        let base = u64::from(q) * RING_AREA;
        let queue = Queue {
            desc: GuestAddress(base),
            avail: GuestAddress(base + 0x1000),
            used: GuestAddress(base + 0x2000),
            next_avail: 0,
            last_used: 0,
            kick: EventFd::new(0).map_err(|e| other("eventfd", e))?,
            call: EventFd::new(0).map_err(|e| other("eventfd", e))?,
        };
        let config = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: self.host_address(queue.desc)?,
            used_ring_addr: self.host_address(queue.used)?,
            avail_ring_addr: self.host_address(queue.avail)?,
            log_addr: None,
        };
        let i = usize::from(q);
        let fe = &mut self.frontend;
        let step = |what: &'static str, r: vhost::Result<()>| r.map_err(|e| other(what, e));
        step("SET_VRING_NUM", fe.set_vring_num(i, QUEUE_SIZE))?;
        step("SET_VRING_ADDR", fe.set_vring_addr(i, &config))?;
        step("SET_VRING_BASE", fe.set_vring_base(i, 0))?;
        step("SET_VRING_CALL", fe.set_vring_call(i, &queue.call))?;
        step("SET_VRING_KICK", fe.set_vring_kick(i, &queue.kick))?;
        step("SET_VRING_ENABLE", fe.set_vring_enable(i, true))?;
        self.queues.push(queue);
        Ok(())
    }

    fn read_capacity(&mut self) -> io::Result<u64> {
        let (_, payload) = self
            .frontend
            .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
            .map_err(|e| other("GET_CONFIG", e))?;
        let sectors: [u8; 8] = payload[..8]
            .try_into()
            .map_err(|_| io::Error::other("short config"))?;
        Ok(u64::from_le_bytes(sectors) * 512)
    }

    fn slot_index(&self, q: u16, slot: u16) -> io::Result<u64> {
        if usize::from(q) >= self.queues.len() || slot >= self.depth {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("queue {q} slot {slot}"),
            ));
        }
        Ok(u64::from(q) * u64::from(self.depth) + u64::from(slot))
    }

    /// The guest address of slot `slot`'s data buffer on queue `q`.
    fn data_addr(&self, q: u16, slot: u16) -> io::Result<GuestAddress> {
        let i = self.slot_index(q, slot)?;
        Ok(GuestAddress(DATA_AREA + i * u64::from(self.max_len)))
    }

    fn meta_addr(&self, q: u16, slot: u16) -> io::Result<GuestAddress> {
        let i = self.slot_index(q, slot)?;
        Ok(GuestAddress(SLOT_AREA + i * SLOT_META))
    }

    /// Copies `bytes` into the data buffer of a slot (before a write request).
    pub fn fill_slot(&self, q: u16, slot: u16, bytes: &[u8]) -> io::Result<()> {
        if bytes.len() > self.max_len as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "longer than a slot",
            ));
        }
        let at = self.data_addr(q, slot)?;
        self.memory
            .write_slice(bytes, at)
            .map_err(|e| other("guest memory", e))
    }

    /// The first `len` bytes of a slot's data buffer (after a read request).
    pub fn slot_data(&self, q: u16, slot: u16, len: u32) -> io::Result<Vec<u8>> {
        let mut out = vec![0u8; len.min(self.max_len) as usize];
        let at = self.data_addr(q, slot)?;
        self.memory
            .read_slice(&mut out, at)
            .map_err(|e| other("guest memory", e))?;
        Ok(out)
    }

    /// Puts `request` in slot `slot` of queue `q` on the available ring and kicks the server.
    pub fn submit(&mut self, q: u16, slot: u16, request: BlkRequest) -> io::Result<()> {
        let (kind, sector, len, device_writes) = match request {
            BlkRequest::Read { offset, len } => (0u32, offset / 512, len, true),
            BlkRequest::Write { offset, len } => (1u32, offset / 512, len, false),
            BlkRequest::Flush => (4u32, 0, 0, false),
        };
        if len > self.max_len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "longer than a slot",
            ));
        }
        let meta = self.meta_addr(q, slot)?;
        let data = self.data_addr(q, slot)?;
        let status = meta.unchecked_add(16);
        let mem = &self.memory;
        let w =
            |r: Result<(), vm_memory::GuestMemoryError>| r.map_err(|e| other("guest memory", e));
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        w(mem.write_slice(&header, meta))?;
        w(mem.write_obj(0xffu8, status))?;

        let queue = &self.queues[usize::from(q)];
        let first = slot * 3;
        let mut chain: Vec<(GuestAddress, u32, u16)> = vec![(meta, 16, 0)];
        if len > 0 {
            chain.push((
                data,
                len,
                if device_writes { VRING_DESC_F_WRITE } else { 0 },
            ));
        }
        chain.push((status, 1, VRING_DESC_F_WRITE));
        let count = chain.len();
        for (i, (addr, dlen, flags)) in chain.into_iter().enumerate() {
            let index = first + i as u16;
            let next = if i + 1 < count { VRING_DESC_F_NEXT } else { 0 };
            let mut desc = [0u8; 16];
            desc[..8].copy_from_slice(&addr.0.to_le_bytes());
            desc[8..12].copy_from_slice(&dlen.to_le_bytes());
            desc[12..14].copy_from_slice(&(flags | next).to_le_bytes());
            desc[14..].copy_from_slice(&(index + 1).to_le_bytes());
            w(mem.write_slice(&desc, queue.desc.unchecked_add(u64::from(index) * 16)))?;
        }
        let ring_slot = u64::from(queue.next_avail % QUEUE_SIZE);
        w(mem.write_obj(first, queue.avail.unchecked_add(4 + 2 * ring_slot)))?;
        let next_avail = queue.next_avail.wrapping_add(1);
        w(mem.store(next_avail, queue.avail.unchecked_add(2), Ordering::Release))?;
        self.queues[usize::from(q)].next_avail = next_avail;
        self.queues[usize::from(q)]
            .kick
            .write(1)
            .map_err(|e| other("kick", e))
    }

    /// Waits for at least one completion on queue `q` and returns every one there is.
    pub fn wait(&mut self, q: u16) -> io::Result<Vec<Completion>> {
        loop {
            let done = self.reap(q)?;
            if !done.is_empty() {
                return Ok(done);
            }
            wait_readable(&self.queues[usize::from(q)].call, REQUEST_DEADLINE)?;
        }
    }

    /// The completions on queue `q`'s used ring since the last look (none is not an error).
    pub fn reap(&mut self, q: u16) -> io::Result<Vec<Completion>> {
        let queue = self
            .queues
            .get(usize::from(q))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no such queue"))?;
        let mem = &self.memory;
        let r = |e: vm_memory::GuestMemoryError| other("guest memory", e);
        let used_idx: u16 = mem
            .load(queue.used.unchecked_add(2), Ordering::Acquire)
            .map_err(r)?;
        let mut out = Vec::new();
        let mut last = queue.last_used;
        while last != used_idx {
            let at = queue
                .used
                .unchecked_add(4 + 8 * u64::from(last % QUEUE_SIZE));
            let id: u32 = mem.read_obj(at).map_err(r)?;
            let used_len: u32 = mem.read_obj(at.unchecked_add(4)).map_err(r)?;
            let slot = u16::try_from(id / 3)
                .ok()
                .filter(|s| *s < self.depth && id % 3 == 0)
                .ok_or_else(|| io::Error::other(format!("the device used head {id}")))?;
            let status: u8 = mem
                .read_obj(self.meta_addr(q, slot)?.unchecked_add(16))
                .map_err(r)?;
            out.push(Completion {
                slot,
                status,
                used_len,
            });
            last = last.wrapping_add(1);
        }
        self.queues[usize::from(q)].last_used = last;
        Ok(out)
    }

    /// One request on queue `q`, slot 0, waited for; fails unless its status is OK.
    fn one(&mut self, q: u16, request: BlkRequest) -> io::Result<Completion> {
        self.submit(q, 0, request)?;
        let done = self.wait(q)?;
        match done.as_slice() {
            [c] if c.status == 0 => Ok(*c),
            [c] => Err(io::Error::other(format!(
                "{request:?}: status {} from the device",
                c.status
            ))),
            other => Err(io::Error::other(format!(
                "{request:?}: {} completions",
                other.len()
            ))),
        }
    }

    /// Reads `len` bytes at `offset` through queue `q` (one request, waited for).
    pub fn read_at(&mut self, q: u16, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        self.one(q, BlkRequest::Read { offset, len })?;
        self.slot_data(q, 0, len)
    }

    /// Writes `bytes` at `offset` through queue `q` (one request, waited for).
    pub fn write_at(&mut self, q: u16, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let len = u32::try_from(bytes.len()).map_err(|e| other("length", e))?;
        self.fill_slot(q, 0, bytes)?;
        self.one(q, BlkRequest::Write { offset, len }).map(drop)
    }

    /// A FLUSH through queue `q`, waited for.
    pub fn flush(&mut self, q: u16) -> io::Result<()> {
        self.one(q, BlkRequest::Flush).map(drop)
    }
}

/// SET_OWNER, the feature bits and the protocol features, as QEMU's vhost-user-blk sends them.
fn negotiate(frontend: &mut Frontend, queues: u16) -> io::Result<()> {
    frontend.set_owner().map_err(|e| other("SET_OWNER", e))?;
    let offered = frontend
        .get_features()
        .map_err(|e| other("GET_FEATURES", e))?;
    let mut wanted = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | VIRTIO_BLK_F_FLUSH;
    if queues > 1 {
        wanted |= VIRTIO_BLK_F_MQ;
    }
    if offered & wanted != wanted {
        return Err(io::Error::other(format!(
            "the device offers {offered:#x}, the driver needs {wanted:#x}"
        )));
    }
    frontend
        .set_features(wanted)
        .map_err(|e| other("SET_FEATURES", e))?;
    let protocol = frontend
        .get_protocol_features()
        .map_err(|e| other("GET_PROTOCOL_FEATURES", e))?;
    let needed = VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ;
    if !protocol.contains(needed) {
        return Err(io::Error::other(format!(
            "the device lacks protocol features {needed:?}"
        )));
    }
    frontend
        .set_protocol_features(needed)
        .map_err(|e| other("SET_PROTOCOL_FEATURES", e))?;
    let max = frontend
        .get_queue_num()
        .map_err(|e| other("GET_QUEUE_NUM", e))?;
    if u64::from(queues) > max {
        return Err(io::Error::other(format!(
            "{queues} queues asked, the device has {max}"
        )));
    }
    Ok(())
}

/// Blocks until `fd` is readable (and reads it), or fails after `deadline`: a hang is an
/// error, never a pass.
fn wait_readable(fd: &EventFd, deadline: Duration) -> io::Result<()> {
    let mut poll = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(deadline.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `poll` points at one valid pollfd for the duration of the call, and the count
    // passed is 1.
    let n = unsafe { libc::poll(&mut poll, 1, ms) };
    match n {
        0 => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no completion within {deadline:?}"),
        )),
        n if n < 0 => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            }
        }
        _ => fd.read().map(drop).map_err(|e| other("call eventfd", e)),
    }
}
