//! The virtio-blk device model without a front end: descriptor chains hand-built in a fake
//! guest memory (`GuestMemoryMmap` on anonymous memory, `virtio-queue`'s mock split queue),
//! parsed and run against a real copy-on-read device (a QED overlay made by `qemu-img` on a raw
//! base). Proves every request type, multi-segment requests, the sector range, a read-only
//! device, and that every malformed chain (outside guest memory, too short, looping, wrong
//! direction, no status byte) gets IOERR or UNSUPP, where a status can be written, and no
//! panic; plus the configuration space and feature bits.

use std::path::Path;
use std::sync::Arc;

use copy_on_read::{BlockDevice, CorDevice, CorOptions};
use qedstream_tests::{tempdir, tools, XorShift};
use vhost_user_blk::config::DeviceConfig;
use vhost_user_blk::execute::{complete, execute, rejected, GuestRam};
use vhost_user_blk::request::{parse, Limits, Operation, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Descriptor, Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MIB: u64 = 1 << 20;
/// Guest memory: 4 MiB from 0; the queue lives at 0, buffers from 1 MiB.
const RAM: usize = 4 << 20;
const HDR: u64 = 0x10_0000;
const BUF: u64 = 0x20_0000;
const STATUS: u64 = 0x3F_F000;
const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;
/// The overlay's size (the base is 2 MiB smaller: the rest reads as zeros).
const DISK: u64 = 8 * MIB;

fn ram() -> Arc<GuestRam> {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap())
}

/// A copy-on-read device over `top.qed` (8 MiB) on `base.raw` (6 MiB random); returns the
/// base's bytes.
struct Fixture {
    _dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    dev: Arc<CorDevice>,
    base: Vec<u8>,
}

fn fixture(read_only: bool) -> Fixture {
    let dir = tempdir();
    let d = dir.path();
    let mut base = vec![0u8; 6 * MIB as usize];
    XorShift::new(0x7B1C).fill(&mut base);
    std::fs::write(d.join("base.raw"), &base).unwrap();
    tools::create_overlay(d, "base.raw", "raw", "top.qed", Some("8M"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dev = rt.block_on(open(&d.join("top.qed"), read_only));
    Fixture {
        _dir: dir,
        rt,
        dev: Arc::new(dev),
        base,
    }
}

async fn open(path: &Path, read_only: bool) -> CorDevice {
    let options = CorOptions {
        read_only,
        ..CorOptions::default()
    };
    CorDevice::open(path, options).await.unwrap()
}

fn limits(read_only: bool) -> Limits {
    Limits {
        capacity_sectors: DISK / 512,
        read_only,
        discard: true,
    }
}

fn header(mem: &GuestRam, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
}

/// The descriptors as a chain, NEXT flags and indices set in order.
fn desc(addr: u64, len: u32, flags: u16) -> Descriptor {
    Descriptor::new(addr, len, flags, 0)
}

/// Parses and runs the chain of `descs` (linked in order); returns the status byte as the
/// guest reads it (0xff if none was written) and the used length.
fn run(f: &Fixture, mem: &Arc<GuestRam>, descs: &[Descriptor], l: Limits) -> (u8, u32) {
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let q = MockSplitQueue::new(mem.as_ref(), 16);
    let chain = q.build_desc_chain(descs).unwrap();
    run_chain(f, mem, chain, l)
}

fn run_chain<I: IntoIterator<Item = Descriptor>>(
    f: &Fixture,
    mem: &Arc<GuestRam>,
    chain: I,
    l: Limits,
) -> (u8, u32) {
    let used = match parse(mem.as_ref(), chain, &l) {
        Ok(req) => {
            let out =
                f.rt.block_on(execute(&*f.dev, mem, &req, b"qedstream-test"));
            complete(mem, Some(req.status), out)
        }
        Err(r) => complete(mem, r.status, rejected(&r)),
    };
    (mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), used)
}

/// The raw descriptor table `descs` (flags and next as given), head at index 0.
fn run_raw(f: &Fixture, mem: &Arc<GuestRam>, descs: &[Descriptor]) -> (u8, u32) {
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let q = MockSplitQueue::new(mem.as_ref(), 16);
    q.add_desc_chains(descs, 0).unwrap();
    let mut queue: Queue = q.create_queue().unwrap();
    let chain = queue.iter(mem.as_ref()).unwrap().next().unwrap();
    run_chain(f, mem, chain, limits(false))
}

fn read_guest(mem: &GuestRam, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

#[test]
fn a_read_of_a_missing_cluster_returns_the_base_bytes_in_three_segments() {
    let f = fixture(false);
    let mem = ram();
    header(&mem, VIRTIO_BLK_T_IN, 2048); // 1 MiB
    let descs = [
        desc(HDR, 16, R),
        desc(BUF, 4096, W),
        desc(BUF + 0x10000, 512, W),
        desc(BUF + 0x20000, 3584, W),
        desc(STATUS, 1, W),
    ];
    assert_eq!(run(&f, &mem, &descs, limits(false)), (STATUS_OK, 8193));
    let want = &f.base[MIB as usize..MIB as usize + 8192];
    assert_eq!(read_guest(&mem, BUF, 4096), want[..4096]);
    assert_eq!(read_guest(&mem, BUF + 0x10000, 512), want[4096..4608]);
    assert_eq!(read_guest(&mem, BUF + 0x20000, 3584), want[4608..]);
}

#[test]
fn a_multi_segment_write_reads_back_and_past_the_base_reads_zeros() {
    let f = fixture(false);
    let mem = ram();
    mem.write_slice(&[0x5a; 1024], GuestAddress(BUF)).unwrap();
    mem.write_slice(&[0xa5; 512], GuestAddress(BUF + 0x8000))
        .unwrap();
    header(&mem, VIRTIO_BLK_T_OUT, 7);
    let out = [
        desc(HDR, 16, R),
        desc(BUF, 1024, R),
        desc(BUF + 0x8000, 512, R),
        desc(STATUS, 1, W),
    ];
    assert_eq!(run(&f, &mem, &out, limits(false)), (STATUS_OK, 1));
    let back =
        f.rt.block_on(f.dev.read_at(7 * 512, vec![0; 1536]))
            .unwrap();
    assert_eq!(back[..1024], [0x5a; 1024]);
    assert_eq!(back[1024..], [0xa5; 512]);
    // The last sector: past the 6 MiB base, zeros.
    header(&mem, VIRTIO_BLK_T_IN, DISK / 512 - 1);
    mem.write_slice(&[0xee; 512], GuestAddress(BUF)).unwrap();
    let last = [desc(HDR, 16, R), desc(BUF, 512, W), desc(STATUS, 1, W)];
    assert_eq!(run(&f, &mem, &last, limits(false)), (STATUS_OK, 513));
    assert_eq!(read_guest(&mem, BUF, 512), [0u8; 512]);
}

#[test]
fn flush_get_id_discard_and_write_zeroes() {
    let f = fixture(false);
    let mem = ram();
    header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    let flush = [desc(HDR, 16, R), desc(STATUS, 1, W)];
    assert_eq!(run(&f, &mem, &flush, limits(false)), (STATUS_OK, 1));

    header(&mem, VIRTIO_BLK_T_GET_ID, 0);
    let id = [desc(HDR, 16, R), desc(BUF, 20, W), desc(STATUS, 1, W)];
    assert_eq!(run(&f, &mem, &id, limits(false)), (STATUS_OK, 21));
    assert_eq!(read_guest(&mem, BUF, 20), b"qedstream-test\0\0\0\0\0\0");

    // WRITE_ZEROES over base data: reads as zeros afterwards.
    let range = |sector: u64, sectors: u32, flags: u32| {
        let mut r = [0u8; 16];
        r[0..8].copy_from_slice(&sector.to_le_bytes());
        r[8..12].copy_from_slice(&sectors.to_le_bytes());
        r[12..16].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&r, GuestAddress(BUF)).unwrap();
    };
    header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    range(100, 16, 0);
    let wz = [desc(HDR, 16, R), desc(BUF, 16, R), desc(STATUS, 1, W)];
    assert_eq!(run(&f, &mem, &wz, limits(false)), (STATUS_OK, 1));
    let z =
        f.rt.block_on(f.dev.read_at(100 * 512, vec![1; 8192]))
            .unwrap();
    assert_eq!(z, vec![0u8; 8192]);
    // An unknown flag: UNSUPP; a range past the end: IOERR.
    range(100, 16, 2);
    assert_eq!(run(&f, &mem, &wz, limits(false)).0, STATUS_UNSUPP);
    range(DISK / 512 - 1, 2, 0);
    assert_eq!(run(&f, &mem, &wz, limits(false)).0, STATUS_IOERR);

    // DISCARD: whatever the device does, the status is OK or UNSUPP (if it cannot), never a
    // crash; a device that cannot discard is not offered DISCARD at all.
    header(&mem, VIRTIO_BLK_T_DISCARD, 0);
    range(0, 8, 0);
    let expected = if f.dev.capabilities().discard {
        STATUS_OK
    } else {
        STATUS_UNSUPP
    };
    assert_eq!(run(&f, &mem, &wz, limits(false)).0, expected);
    let no_discard = Limits {
        discard: false,
        ..limits(false)
    };
    assert_eq!(run(&f, &mem, &wz, no_discard).0, STATUS_UNSUPP);
}

#[test]
fn sectors_past_the_end_and_partial_sectors_are_ioerr() {
    let f = fixture(false);
    let mem = ram();
    for (sector, len) in [
        (DISK / 512, 512),
        (DISK / 512 - 1, 1024),
        (u64::MAX, 512),
        (0, 100),
    ] {
        header(&mem, VIRTIO_BLK_T_IN, sector);
        let d = [desc(HDR, 16, R), desc(BUF, len, W), desc(STATUS, 1, W)];
        // Refused by the parser itself, before the device (which would refuse too).
        let refused = parse(mem.as_ref(), d, &limits(false)).unwrap_err();
        assert_eq!(refused.code, STATUS_IOERR, "{sector} {len}");
        assert_eq!(
            run(&f, &mem, &d, limits(false)),
            (STATUS_IOERR, 1),
            "{sector} {len}"
        );
    }
}

#[test]
fn a_read_only_device_refuses_writes_and_serves_reads() {
    // The parser refuses, even on a device that could write: nothing changes.
    let f = fixture(false);
    let mem = ram();
    mem.write_slice(&[0x77; 512], GuestAddress(BUF)).unwrap();
    let mut range = [0u8; 16];
    range[8..12].copy_from_slice(&1u32.to_le_bytes());
    mem.write_slice(&range, GuestAddress(BUF + 512)).unwrap();
    for (kind, data) in [
        (VIRTIO_BLK_T_OUT, desc(BUF, 512, R)),
        (VIRTIO_BLK_T_WRITE_ZEROES, desc(BUF + 512, 16, R)),
        (VIRTIO_BLK_T_DISCARD, desc(BUF + 512, 16, R)),
    ] {
        header(&mem, kind, 0);
        let d = [desc(HDR, 16, R), data, desc(STATUS, 1, W)];
        assert_eq!(
            run(&f, &mem, &d, limits(true)),
            (STATUS_IOERR, 1),
            "type {kind}"
        );
    }
    let first = f.rt.block_on(f.dev.read_at(0, vec![0; 512])).unwrap();
    assert_eq!(first, f.base[..512], "a refused request changed the disk");
    // A device opened read-only refuses too, if the parser were told otherwise.
    let f = fixture(true);
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let d = [desc(HDR, 16, R), desc(BUF, 512, R), desc(STATUS, 1, W)];
    assert_eq!(run(&f, &mem, &d, limits(false)).0, STATUS_IOERR);
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let d = [desc(HDR, 16, R), desc(BUF, 512, W), desc(STATUS, 1, W)];
    assert_eq!(run(&f, &mem, &d, limits(true)), (STATUS_OK, 513));
    assert_eq!(read_guest(&mem, BUF, 512), f.base[..512]);
    let config = DeviceConfig {
        size: DISK,
        block_size: 512,
        num_queues: 1,
        read_only: true,
        discard: false,
    };
    assert_ne!(config.features() & 1 << VIRTIO_BLK_F_RO, 0);
    assert_eq!(config.features() & 1 << VIRTIO_BLK_F_WRITE_ZEROES, 0);
}

#[test]
fn an_unknown_request_type_is_unsupp() {
    let f = fixture(false);
    let mem = ram();
    for kind in [
        VIRTIO_BLK_T_SCSI_CMD,
        VIRTIO_BLK_T_SECURE_ERASE,
        0xdead_beef,
    ] {
        header(&mem, kind, 0);
        let d = [desc(HDR, 16, R), desc(STATUS, 1, W)];
        assert_eq!(
            run(&f, &mem, &d, limits(false)),
            (STATUS_UNSUPP, 1),
            "type {kind:#x}"
        );
    }
}

#[test]
fn malformed_chains_get_ioerr_where_a_status_can_be_written() {
    let f = fixture(false);
    let mem = ram();
    let far = RAM as u64 + 0x1000;
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let cases: &[(&str, Vec<Descriptor>)] = &[
        (
            "data outside guest memory",
            vec![desc(HDR, 16, R), desc(far, 512, W), desc(STATUS, 1, W)],
        ),
        (
            "data running off the end",
            vec![
                desc(HDR, 16, R),
                desc(RAM as u64 - 256, 512, W),
                desc(STATUS, 1, W),
            ],
        ),
        (
            "header outside guest memory",
            vec![desc(far, 16, R), desc(BUF, 512, W), desc(STATUS, 1, W)],
        ),
        (
            "short header",
            vec![desc(HDR, 8, R), desc(BUF, 512, W), desc(STATUS, 1, W)],
        ),
        (
            "writable header",
            vec![desc(HDR, 16, W), desc(BUF, 512, W), desc(STATUS, 1, W)],
        ),
        (
            "readable data for IN",
            vec![desc(HDR, 16, R), desc(BUF, 512, R), desc(STATUS, 1, W)],
        ),
    ];
    for (what, d) in cases {
        assert_eq!(run(&f, &mem, d, limits(false)), (STATUS_IOERR, 1), "{what}");
    }
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let d = [desc(HDR, 16, R), desc(BUF, 512, W), desc(STATUS, 1, W)];
    assert_eq!(
        run(&f, &mem, &d, limits(false)),
        (STATUS_IOERR, 1),
        "writable data for OUT"
    );
}

#[test]
fn chains_without_a_status_byte_are_dropped_with_used_length_zero() {
    let f = fixture(false);
    let mem = ram();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let far = RAM as u64 + 0x1000;
    let cases: &[(&str, Vec<Descriptor>)] = &[
        ("header only", vec![desc(HDR, 16, R)]),
        (
            "readable last",
            vec![desc(HDR, 16, R), desc(BUF, 512, W), desc(STATUS, 1, R)],
        ),
        (
            "empty status",
            vec![desc(HDR, 16, R), desc(BUF, 512, W), desc(STATUS, 0, W)],
        ),
        (
            "status outside memory",
            vec![desc(HDR, 16, R), desc(BUF, 512, W), desc(far, 1, W)],
        ),
    ];
    for (what, d) in cases {
        assert_eq!(run(&f, &mem, d, limits(false)), (0xff, 0), "{what}");
    }
}

#[test]
fn a_looping_chain_or_a_next_outside_the_table_is_dropped() {
    let f = fixture(false);
    let mem = ram();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let next = VRING_DESC_F_NEXT as u16;
    // 0 -> 1 -> 2 -> 1 -> ...: the iterator stops at the queue size, still on NEXT.
    let looping = [
        Descriptor::new(HDR, 16, next, 1),
        Descriptor::new(BUF, 512, W | next, 2),
        Descriptor::new(STATUS, 1, W | next, 1),
    ];
    assert_eq!(run_raw(&f, &mem, &looping), (0xff, 0), "loop");
    let outside = [
        Descriptor::new(HDR, 16, next, 1),
        Descriptor::new(BUF, 512, W | next, 999),
    ];
    assert_eq!(
        run_raw(&f, &mem, &outside),
        (0xff, 0),
        "next outside the table"
    );
    let fine = [
        Descriptor::new(HDR, 16, next, 2),
        Descriptor::new(0, 0, 0, 0),
        Descriptor::new(BUF, 512, W | next, 3),
        Descriptor::new(STATUS, 1, W, 0),
    ];
    assert_eq!(
        run_raw(&f, &mem, &fine),
        (STATUS_OK, 513),
        "out of order but fine"
    );
}

#[test]
fn a_status_descriptor_longer_than_one_byte_holds_data_before_the_status() {
    let f = fixture(false);
    let mem = ram();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let d = [desc(HDR, 16, R), desc(STATUS - 512, 513, W)];
    assert_eq!(run(&f, &mem, &d, limits(false)), (STATUS_OK, 513));
    assert_eq!(read_guest(&mem, STATUS - 512, 512), f.base[..512]);
    let parsed = parse(
        mem.as_ref(),
        [desc(HDR, 16, R), desc(STATUS, 1, W)],
        &limits(false),
    );
    assert_eq!(parsed.unwrap().op, Operation::Read);
}

#[test]
fn the_config_space_says_capacity_blk_size_seg_max_and_queues() {
    let config = DeviceConfig {
        size: DISK + 100,
        block_size: 512,
        num_queues: 3,
        read_only: false,
        discard: true,
    };
    let c = config.read(0, 60);
    assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), DISK / 512);
    assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 254);
    assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
    assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 3);
    assert_eq!(config.read(34, 2), vec![3, 0]);
    assert_eq!(config.read(100, 4), vec![0; 4]);
    assert!(config.read(u32::MAX, 8).is_empty());
    let f = config.features();
    for bit in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_SEG_MAX,
        29, // EVENT_IDX
        32, // VERSION_1
    ] {
        assert_ne!(f & 1 << bit, 0, "bit {bit}");
    }
    assert_eq!(f & 1 << VIRTIO_BLK_F_RO, 0);
}
