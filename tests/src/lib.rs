//! # qedstream-tests: the `qed` crate graded by QEMU
//!
//! Shared helpers for the interop tests in `tests/tests/`:
//!
//! - [`qemu`]: run `qemu-img` and `qemu-io` (the oracle). A missing tool, or a QEMU built
//!   without QED, **fails the test with a clear message**: these tests never skip silently.
//! - [`XorShift`]: a tiny seeded RNG, so every failure replays.
//! - [`Model`] and [`Op`]: a byte model of a virtual disk and the operations the tests apply to
//!   it, to QEMU (as `qemu-io` commands) and to our images alike ([`Disk`]: a QED image over
//!   its backing chain, driven synchronously through `copy-on-read`'s [`SyncDevice`]).
//! - [`GEOMETRIES`]: the cluster and table sizes QEMU can handle, with a test image size each.
//! - [`tools`], [`nbd_server`], [`qsd`]: external tools for the other crates' tests: run a
//!   tool in a directory (failing loudly when it is missing), commands and refusals of the
//!   command line, QEMU fixtures, an NBD server on a unix socket killed on drop, and
//!   qemu-storage-daemon's block-stream over QMP.
//! - [`runtime`]: the tokio runtime async tests drive devices on.
//! - [`poison`]: a scripted NBD server that dies on one request every time (and accepts the
//!   reconnect every time): the one misbehaviour no real server produces on demand.
//! - [`served`]: a running `qedstream serve --output=json`, its JSON lines and signals.
//! - [`vhost_front`]: a vhost-user-blk front end that plays the VM (guest memory, split
//!   virtqueues, the virtio-blk driver) against a server, with no guest to boot.
//! - [`vm_serve`]: what the real-VM tests of `serve` share: the stream job on its control
//!   socket, the guest boot, and the grading of the image left behind.
//! - [`qmp`]: a raw QMP client (greeting, commands, events) with a deadline on every read.
//! - [`tmpfs`]: a small tmpfs mounted for one test (a real file system that fills up, ENOSPC
//!   and all), filled on demand and unmounted on drop.
//! - [`guest`]: a real Linux guest booted under `qemu-system-x86_64` (TCG) from an NBD export,
//!   reporting the sha256 of its whole disk (after an optional write).
//! - [`power`]: a storage with a volatile write cache ([`power::VolatileStorage`]) and the
//!   disk states a power loss can leave (any subset of the unflushed sectors), enumerated or
//!   sampled.
//! - [`image_store`]: a central image store: files over HTTP with byte ranges (a Python
//!   server, optionally slow) and nbdkit's curl plugin with its cache filter exporting one.
//! - [`crash`]: what a disk may hold after its server is killed: a per-sector model of
//!   acknowledged, flushed and in-flight writes, and sectors that say which write they are.
//! - [`flushes`]: an in-memory overlay whose flushes are counted and slow, for tests of how
//!   many `fdatasync` calls a piece of work shares.
//! - [`tls`]: X.509 credentials directories (QEMU's `tls-creds-x509` layout) made by
//!   `certtool`: a CA, servers and clients it signs, current or expired.
//! - [`chain`]: a per-unit view of a backing chain's allocation, from `qemu-img map` and from
//!   our [`qed::Image::map`], so the two can be compared exactly.
//!
//! ```no_run
//! use qedstream_tests::{qemu, XorShift};
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("x.qed");
//! qemu::img(&["create", "-f", "qed", path.to_str().unwrap(), "1M"]);
//! let (code, json) = qemu::check_json(&path);
//! assert_eq!(code, 0, "{json}");
//! let mut rng = XorShift::new(7);
//! assert!(rng.below(10) < 10);
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use copy_on_read::{BlockDevice, CorDevice, CorOptions, RawFile, SyncDevice};
use qed::{Image, OpenOptions};

/// A QED image over its backing chain, read and written from synchronous test code: the
/// copy-on-read device (copy-on-read off unless a test turns it on), driven by
/// [`SyncDevice`]. The image itself never reads its backing; this is what does.
pub type Disk = SyncDevice<CorDevice>;

pub mod chain;
pub mod crash;
pub mod flushes;
pub mod guest;
pub mod hooked;
pub mod image_store;
pub mod io_addresses;
pub mod nbd_server;
pub mod poison;
pub mod power;
pub mod qemu;
pub mod qmp;
pub mod qsd;
pub mod runtime;
pub mod seccomp;
pub mod served;
pub mod tls;
pub mod tmpfs;
pub mod tools;
pub mod vhost_front;
pub mod vm_serve;

/// A geometry under test and the virtual size its images get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestGeometry {
    /// Bytes per cluster.
    pub cluster_size: u32,
    /// Clusters per table.
    pub table_size: u32,
    /// Virtual size of the test images (a multiple of 8 MiB, so of every cluster size).
    pub size: u64,
    /// Most operations a scenario applies.
    pub ops: usize,
    /// Longest single operation, in bytes.
    pub max_len: u64,
}

impl std::fmt::Display for TestGeometry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cluster {}K, table {}, size {}M",
            self.cluster_size >> 10,
            self.table_size,
            self.size >> 20
        )
    }
}

const fn geo(
    cluster_size: u32,
    table_size: u32,
    size_mib: u64,
    ops: usize,
    max_len: u64,
) -> TestGeometry {
    TestGeometry {
        cluster_size,
        table_size,
        size: size_mib << 20,
        ops,
        max_len,
    }
}

/// Every geometry QEMU 10 can handle among 4K/64K/1M/4M clusters and tables of 2, 4 and 16
/// (4M with tables of 4 or 16 overflows QEMU's maximum-size computation). 4K images stay
/// well under 16 MiB of file, where QEMU's check starts reporting spurious leaks, and single
/// writes stay far below the sizes that trigger QEMU's cluster-count bug.
pub const GEOMETRIES: [TestGeometry; 10] = [
    geo(4096, 2, 8, 24, 96 << 10),
    geo(4096, 4, 8, 24, 96 << 10),
    geo(4096, 16, 8, 24, 96 << 10),
    geo(65536, 2, 16, 24, 400 << 10),
    geo(65536, 4, 16, 24, 400 << 10),
    geo(65536, 16, 16, 24, 400 << 10),
    geo(1 << 20, 2, 32, 10, 3 << 20),
    geo(1 << 20, 4, 32, 10, 3 << 20),
    geo(1 << 20, 16, 32, 10, 3 << 20),
    geo(4 << 20, 2, 64, 6, 9 << 20),
];

/// A seeded xorshift64* generator: deterministic, dependency-free.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from a seed (0 is replaced by a fixed non-zero value).
    pub fn new(seed: u64) -> XorShift {
        XorShift(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `[0, n)` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability 1/`n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// One operation on a virtual disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Write `len` bytes of `pattern` at `offset` (`qemu-io write -P`).
    Write {
        /// Guest offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// The byte written.
        pattern: u8,
    },
    /// Write zeros (`qemu-io write -z`, [`Image::write_zeroes`]).
    Zero {
        /// Guest offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

impl Op {
    /// The `qemu-io -c` command for this operation.
    pub fn qemu_io_command(&self) -> String {
        match *self {
            Op::Write {
                offset,
                len,
                pattern,
            } => format!("write -P {pattern:#x} {offset} {len}"),
            Op::Zero { offset, len } => format!("write -z {offset} {len}"),
        }
    }

    /// Applies the operation to our image.
    pub fn apply<D: BlockDevice + ?Sized>(
        &self,
        image: &SyncDevice<D>,
    ) -> copy_on_read::Result<()> {
        match *self {
            Op::Write {
                offset,
                len,
                pattern,
            } => image.write_at(&vec![pattern; len as usize], offset),
            Op::Zero { offset, len } => image.write_zeroes(offset, len),
        }
    }
}

/// What a guest cluster holds, as far as allocation goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterState {
    /// Nothing here (L2 entry 0).
    Unallocated,
    /// A zero cluster (L2 entry 1).
    Zero,
    /// A data cluster.
    Data,
}

/// The bytes a virtual disk should hold, and the allocation state each cluster should have.
#[derive(Clone, Debug)]
pub struct Model {
    /// The guest-visible bytes.
    pub bytes: Vec<u8>,
    /// Per-cluster allocation state in the top image.
    pub clusters: Vec<ClusterState>,
    /// The cluster size the states are kept at.
    pub cluster_size: u64,
}

impl Model {
    /// A disk of `initial` bytes (the backing's view, already cut or padded to size) with no
    /// clusters allocated.
    pub fn new(initial: Vec<u8>, cluster_size: u64) -> Model {
        let n = (initial.len() as u64).div_ceil(cluster_size) as usize;
        Model {
            bytes: initial,
            clusters: vec![ClusterState::Unallocated; n],
            cluster_size,
        }
    }

    /// Applies an operation the way the spec says: data writes allocate every cluster they
    /// touch; zero writes turn whole unallocated clusters into zero clusters, write zeros in
    /// place into data clusters, and write the unaligned head and tail as data.
    pub fn apply(&mut self, op: &Op) {
        let cs = self.cluster_size;
        match *op {
            Op::Write {
                offset,
                len,
                pattern,
            } => {
                self.bytes[offset as usize..(offset + len) as usize].fill(pattern);
                self.mark_data(offset, len);
            }
            Op::Zero { offset, len } => {
                self.bytes[offset as usize..(offset + len) as usize].fill(0);
                let end = offset + len;
                let a = offset.next_multiple_of(cs);
                let b = end / cs * cs;
                if a >= b {
                    self.mark_data(offset, len);
                    return;
                }
                if offset < a {
                    self.mark_data(offset, a - offset);
                }
                for c in a / cs..b / cs {
                    let s = &mut self.clusters[c as usize];
                    if *s == ClusterState::Unallocated {
                        *s = ClusterState::Zero;
                    }
                }
                if b < end {
                    self.mark_data(b, end - b);
                }
            }
        }
    }

    fn mark_data(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let cs = self.cluster_size;
        for c in offset / cs..=(offset + len - 1) / cs {
            self.clusters[c as usize] = ClusterState::Data;
        }
    }

    /// True when `op` writes part of a cluster that is a zero cluster: the sequence QEMU
    /// gets wrong over a backing file (it fills the rest from the backing, not with zeros).
    pub fn partially_writes_zero_cluster(&self, op: &Op) -> bool {
        let cs = self.cluster_size;
        let partial = |offset: u64, len: u64| -> bool {
            if len == 0 {
                return false;
            }
            (offset / cs..=(offset + len - 1) / cs).any(|c| {
                let start = c * cs;
                let covered = offset <= start && offset + len >= start + cs;
                !covered && self.clusters[c as usize] == ClusterState::Zero
            })
        };
        match *op {
            Op::Write { offset, len, .. } => partial(offset, len),
            Op::Zero { offset, len } => {
                let end = offset + len;
                let a = offset.next_multiple_of(cs);
                let b = end / cs * cs;
                if a >= b {
                    partial(offset, len)
                } else {
                    partial(offset, a - offset) || partial(b, end - b)
                }
            }
        }
    }
}

/// Random operations over a disk of `size` bytes. About a third are cluster aligned, about a
/// quarter are zero writes. With `avoid_qemu_zero_cluster_bug`, operations that would write
/// part of a zero cluster are not generated (QEMU fills such clusters from the backing).
pub fn random_ops(
    rng: &mut XorShift,
    model: &Model,
    count: usize,
    max_len: u64,
    avoid_qemu_zero_cluster_bug: bool,
) -> Vec<Op> {
    let size = model.bytes.len() as u64;
    let cs = model.cluster_size;
    let mut model = model.clone();
    let mut ops = Vec::with_capacity(count);
    let mut attempts = 0;
    while ops.len() < count && attempts < count * 50 {
        attempts += 1;
        let (offset, len) = if rng.one_in(3) {
            let clusters = (max_len / cs).max(1);
            let n = 1 + rng.below(clusters);
            let len = (n * cs).min(size);
            let offset = rng.below((size - len) / cs + 1) * cs;
            (offset, len)
        } else {
            let len = 1 + rng.below(max_len.min(size));
            let offset = rng.below(size - len + 1);
            (offset, len)
        };
        let op = if rng.one_in(4) {
            Op::Zero { offset, len }
        } else {
            Op::Write {
                offset,
                len,
                pattern: 1 + rng.below(255) as u8,
            }
        };
        if avoid_qemu_zero_cluster_bug && model.partially_writes_zero_cluster(&op) {
            continue;
        }
        model.apply(&op);
        ops.push(op);
    }
    ops
}

/// Opens an image read-only with the default gate (backings opened as their headers say),
/// read through the copy-on-read device (copy-on-read off: the image itself never reads its
/// backing).
pub fn open_ro(path: &Path) -> Disk {
    let options = CorOptions {
        read_only: true,
        copy_on_read: false,
        ..CorOptions::default()
    };
    SyncDevice::open(path, options)
        .unwrap_or_else(|e| panic!("opening {} read-only: {e}", path.display()))
}

/// Opens an image read-only, alone (its backing is named, not opened).
pub fn open_ro_image(path: &Path) -> Image {
    Image::open_path(
        path,
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("opening {} read-only: {e}", path.display()))
}

/// Opens an image read-write with the default gate, read and written through the
/// copy-on-read device (copy-on-read off: reads of the backing are not stored).
pub fn open_rw(path: &Path) -> Disk {
    let options = CorOptions {
        copy_on_read: false,
        ..CorOptions::default()
    };
    SyncDevice::open(path, options)
        .unwrap_or_else(|e| panic!("opening {} read-write: {e}", path.display()))
}

/// An image opened from memory (or any storage) over `backing`, read and written through the
/// copy-on-read device with copy-on-read off.
pub fn disk_over(image: Image, backing: Option<Arc<dyn BlockDevice>>) -> Disk {
    let device = CorDevice::new(image, "memory".into(), backing);
    device.set_copy_on_read(false);
    SyncDevice::new(device).expect("starting the I/O runtime")
}

/// A raw backing device holding `bytes` (an unlinked temporary file, so in-memory tests need
/// no folder). Its size is rounded up to 512 bytes, as QEMU sees a raw file.
pub fn raw_backing(bytes: &[u8]) -> Arc<dyn BlockDevice> {
    Arc::new(raw_file(bytes))
}

/// A read-only raw file holding `bytes` (unlinked, as [`raw_backing`]).
pub fn raw_file(bytes: &[u8]) -> RawFile {
    use std::io::Write;
    let mut file = tempfile::tempfile().expect("a temporary file");
    file.write_all(bytes).expect("writing the raw backing");
    RawFile::from_file(file, "memory.raw".into(), false).expect("a raw backing")
}

/// Reads a whole image through our implementation.
pub fn read_all<D: BlockDevice + ?Sized>(image: &SyncDevice<D>) -> Vec<u8> {
    let mut buf = vec![0u8; image.size() as usize];
    image.read_at(&mut buf, 0).expect("reading the whole image");
    buf
}

/// Asserts two disks are equal, reporting the first differing byte rather than megabytes.
#[track_caller]
pub fn assert_same_bytes(ours: &[u8], expected: &[u8], what: &str) {
    assert_eq!(ours.len(), expected.len(), "{what}: lengths differ");
    if let Some(i) = ours.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i:#x}: ours {:#04x}, expected {:#04x}",
            ours[i], expected[i]
        );
    }
}

/// The kinds of backing a scenario uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingKind {
    /// No backing file.
    None,
    /// A raw file shorter than the image, with a length that is not a multiple of 512.
    RawShort,
    /// A QED image (64K clusters) written by QEMU, smaller than the image.
    Qed,
}

/// A backing made for a scenario: its name (relative, next to the image), format flag for
/// `qemu-img create -F`, and the guest view of its bytes cut or zero-padded to `size`.
#[derive(Debug)]
pub struct MadeBacking {
    /// The file name, relative to the image's directory.
    pub name: Option<String>,
    /// `raw` or `qed`.
    pub format: Option<&'static str>,
    /// What the image reads where nothing is allocated.
    pub view: Vec<u8>,
}

/// Creates the backing for a scenario in `dir`, for an image of `size` bytes.
pub fn make_backing(dir: &Path, kind: BackingKind, size: u64, rng: &mut XorShift) -> MadeBacking {
    match kind {
        BackingKind::None => MadeBacking {
            name: None,
            format: None,
            view: vec![0u8; size as usize],
        },
        BackingKind::RawShort => {
            // Shorter than the image and not a multiple of 512: reads past its end are zeros.
            let len = size / 2 + 777;
            let mut bytes = vec![0u8; len as usize];
            rng.fill(&mut bytes);
            // A hole of zeros in the middle, so zero detection has something to find.
            let hole = (len / 3) as usize;
            bytes[hole..hole + 70_000].fill(0);
            std::fs::write(dir.join("base.raw"), &bytes).unwrap();
            let mut view = bytes;
            view.resize(size as usize, 0);
            MadeBacking {
                name: Some("base.raw".into()),
                format: Some("raw"),
                view,
            }
        }
        BackingKind::Qed => {
            let base = dir.join("base.qed");
            let base_size = size / 2;
            qemu::img(&[
                "create",
                "-f",
                "qed",
                "-o",
                "cluster_size=65536,table_size=4",
                path_str(&base),
                &base_size.to_string(),
            ]);
            let mut model = Model::new(vec![0u8; base_size as usize], 65536);
            let ops = random_ops(rng, &model, 12, base_size / 8, false);
            qemu::io("qed", &base, &ops);
            for op in &ops {
                model.apply(op);
            }
            let mut view = model.bytes;
            view.resize(size as usize, 0);
            MadeBacking {
                name: Some("base.qed".into()),
                format: Some("qed"),
                view,
            }
        }
    }
}

/// `path` as `&str` (test paths are UTF-8).
pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// A fresh temporary directory.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("qedtest")
        .tempdir()
        .expect("creating a temporary directory")
}

/// Writes a little-endian u64 at `offset` of a file (the reference's `poke`).
pub fn poke_u64(path: &Path, offset: u64, value: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&value.to_le_bytes(), offset).unwrap();
}

/// Reads a little-endian u64 at `offset` of a file.
pub fn peek_u64(path: &Path, offset: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, offset).unwrap();
    u64::from_le_bytes(b)
}

/// The `features` field of a QED file (byte 16), read straight from disk.
pub fn features_on_disk(path: &Path) -> u64 {
    peek_u64(path, 16)
}

/// The file a scenario's image lives in.
pub fn image_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// `PROPTEST_CASES` if set, else `default`.
pub fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Opens `path` read-only, alone (check and map need no backing; the image never opens it).
pub fn open_detached(path: &Path) -> qed::Result<Image> {
    Image::open_path(
        path,
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
}

/// Runs our check (no repair) and `qemu-img check --output=json` on the same image and
/// asserts every counter and the exit code agree. Returns our report.
#[track_caller]
pub fn assert_check_agrees(path: &Path) -> qed::CheckReport {
    let image = open_detached(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let ours = image.check(qed::Repair::None).expect("our check");
    drop(image);
    let (code, json) = qemu::check_json(path);
    let theirs = (
        qemu::json_count(&json, "total-clusters"),
        qemu::json_count(&json, "allocated-clusters"),
        qemu::json_count(&json, "fragmented-clusters"),
        qemu::json_count(&json, "leaks"),
        qemu::json_count(&json, "corruptions"),
        qemu::json_count(&json, "check-errors"),
        code,
    );
    let mine = (
        ours.total_clusters,
        ours.allocated_clusters,
        ours.fragmented_clusters,
        ours.leaks,
        ours.corruptions,
        ours.check_errors,
        ours.exit_code(),
    );
    assert_eq!(
        mine, theirs,
        "check disagrees on {} (total, allocated, fragmented, leaks, corruptions, errors, exit):\nours {ours:?}\nqemu {json:#}",
        path.display()
    );
    ours
}
