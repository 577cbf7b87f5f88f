//! Power-loss crash states beyond prefixes: every write since the last flush sits in a
//! volatile cache ([`VolatileStorage`]), and a power loss keeps any subset of it, per 512-byte
//! sector (any one of a sector's unflushed versions, or its durable bytes), and any of the
//! file lengths since the flush.
//!
//! Each scenario runs the real code over an in-memory image on that storage (the copy-on-read
//! device, and the stream job itself, run over any `qed::Storage`), records every write,
//! flush and resize, then cuts the log at every event (every flush boundary and every point
//! between writes) and at each cut enumerates every crash state when there are at most 4096,
//! or samples them (seeded: both extremes, uniform per sector, most sectors lost, most kept,
//! whole writes kept or lost with the file's length following them or chosen on its own, the
//! writes up to a point with holes) otherwise: 40 states at a cut between writes, 400 at a
//! flush or the end. Every state must:
//!
//! - when its header does not say NEED_CHECK, check clean as it is (QEMU would not repair it);
//! - open with [`qed::Image::open`] (which repairs NEED_CHECK as QEMU does) and then check
//!   without corruption. Leaks are allowed: data and new L2 tables are appended and written
//!   before anything points at them, so a crash before the pointer is durable leaves clusters
//!   nothing references (QEMU's check calls them leaks, harmless, and `-r` reclaims them);
//! - read, with the backing merged while the header still names it, every write flushed
//!   before the cut, and in every sector written since either the old or a new content;
//! - after the backing drop: either still link the backing with the content right, or stand
//!   alone with every cluster that the backing holds data for allocated;
//! - name the backing (or none) that the header named at the last flush or since, never a
//!   mix.
//!
//! A uniform sample of each scenario's states (20) is also graded by QEMU: `qemu-img check`
//! of the crash state itself (repaired first by `qemu-img check -r all` when it says
//! NEED_CHECK, as QEMU's open would) and of the state as our open repaired it finds no
//! corruption, and `qemu-img convert` reads the same guest content as we do.
//!
//! Scenarios: (1) allocating guest writes without a backing (NEED_CHECK set, flushed, cleared
//! by a flush), (2) allocating guest writes over a backing (data, flush, L2, flush, L1), (3)
//! copy-on-read of clusters from a backing longer than the disk (the partial last cluster
//! too), (4) the stream job's populate batches and its final flush, (5) a whole stream ending
//! in the backing drop (header rewrite), (6) guest writes, zero writes and copy-on-read reads
//! interleaved with populates in a fixed order, then the drop and writes after it, (7) the
//! repair QEMU would make at open, of a crash state with an L2 entry past the end of the
//! file and leaked clusters at its end, and the writes after it, (8) guest writes racing the
//! real stream job (two requests in flight, on a runtime of its own), then its drop, (9) the
//! stream with its own defaults (4 MiB requests, sixteen in flight, batched commits) over QEMU's default 64K
//! clusters, to its drop, (10) `rebase -u` to backing names longer than the first sector
//! holds (the header must then name the old or the new backing, never a mix: it did, before
//! `set_backing` wrote such a name apart from the header first), (11) the stream's batched
//! commit: units fetched under their locks into a buffer pool, then stored together with one
//! flush before all their L2 updates (across an existing L2 table and a new one).
//!
//! States checked at the default sample sizes (`POWER_LOSS_SAMPLES`, a percentage, scales
//! them), as each test prints them; leaks: states with leaked clusters; unlinked: states past
//! the backing drop. Scenarios 8 and 9 vary from run to run with the order of their
//! concurrent writes.
//!
//! | scenario | cuts | cuts enumerated whole | states | NEED_CHECK | leaks | unlinked | most pending sectors | `qemu-img` |
//! |---|---|---|---|---|---|---|---|---|
//! | 1 no backing, 4K clusters | 34 | 19 | 5004 | 4999 | 87 | 0 | 49 | 20 |
//! | 2 backing, 64K clusters | 22 | 15 | 2478 | 0 | 1919 | 0 | 512 | 20 |
//! | 3 copy-on-read, 4K | 30 | 22 | 5913 | 0 | 4382 | 0 | 289 | 20 |
//! | 4 stream batches, 4K | 104 | 54 | 14161 | 0 | 12267 | 0 | 114 | 20 |
//! | 5 stream and drop, 4K | 54 | 24 | 6529 | 0 | 5794 | 3 | 218 | 20 |
//! | 6 mixed, 4K | 73 | 44 | 14405 | 2561 | 7760 | 4612 | 1081 | 20 |
//! | 7 repair at open, 4K | 20 | 14 | 3023 | 3017 | 0 | 0 | 26 | 20 |
//! | 8 racing the stream, 4K | ~143 | ~96 | ~31000-37000 | ~1700 | ~22000-25000 | ~1500-2000 | ~130 | 20 |
//! | 9 default stream, 64K | 36 | 9 | 1812 | 0 | 1661 | 3 | 6656 | 20 |
//! | 10 rebase -u, 4K | 17 | 17 | 1056 | 0 | 522 | 0 | 8 | 20 |
//! | 11 batched commits, 4K | 26 | 7 | 1856 | 0 | 1712 | 0 | 440 | 20 |
//!
//! About 88,000 states in all: 110 s of CPU, 4 minutes on two cores shared with other builds.

use std::sync::Arc;

use copy_on_read::CorDevice;
use engine::stream::{StreamJob, StreamOptions};
use qed::layout::{Header, F_NEED_CHECK};
use qed::{BackingFormat, CreateOptions, GuestOffset, Image, Mapping, MemStorage, OpenOptions};
use qedstream_tests::power::{Choice, Event, Volatile, VolatileStorage, SECTOR};
use qedstream_tests::{disk_over, qemu, raw_backing, Disk, XorShift};

/// At most this many states at a cut are all enumerated (12 sectors with one version each).
const EXHAUSTIVE: u64 = 4096;
/// States sampled at a cut between writes, and at a flush or the end of the run.
const SAMPLES_BETWEEN: usize = 40;
const SAMPLES_AT_FLUSH: usize = 400;
/// States per scenario that the real `qemu-img check` grades.
const QEMU_SAMPLE: usize = 20;

/// The sample sizes, scaled by `POWER_LOSS_SAMPLES` (a percentage, default 100).
fn samples(at_flush: bool) -> usize {
    let percent: usize = std::env::var("POWER_LOSS_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let base = if at_flush {
        SAMPLES_AT_FLUSH
    } else {
        SAMPLES_BETWEEN
    };
    (base * percent / 100).max(2)
}

/// One guest-level operation of a run: its span of storage events.
#[derive(Debug)]
struct Span {
    what: String,
    start: usize,
    /// The index of its last write or resize, if it made any.
    last_write: Option<usize>,
}

/// A recorded run: the image file before it, every storage event, and the guest-visible
/// content after each operation.
#[derive(Debug)]
struct Run {
    name: &'static str,
    initial: Vec<u8>,
    events: Vec<Event>,
    /// The backing file's bytes (None: the image has no backing).
    backing_file: Option<Vec<u8>>,
    /// What an unallocated range reads while the link stands: the backing cut or
    /// zero-padded to the disk's size.
    backing_view: Vec<u8>,
    spans: Vec<Span>,
    /// Guest content: `[0]` before any operation, `[j + 1]` after operation `j`.
    snapshots: Vec<Vec<u8>>,
}

impl Run {
    /// The snapshots a crash at cut `k` (events `..k` issued) may show, per sector: those of
    /// the operations durable by then (a flush after their last write) up to every operation
    /// that had begun.
    fn allowed(&self, k: usize) -> (usize, usize) {
        let last_flush = self.events[..k]
            .iter()
            .rposition(|e| matches!(e, Event::Flush));
        let durable = self
            .spans
            .iter()
            .take_while(|s| match (s.last_write, last_flush) {
                (None, _) => true,
                (Some(w), Some(f)) => f > w,
                (Some(_), None) => false,
            })
            .count();
        let begun = self.spans.iter().filter(|s| s.start < k).count();
        (durable, begun.max(durable))
    }
}

/// Records a run: the image on a [`VolatileStorage`], driven through the copy-on-read device.
struct Recorder {
    name: &'static str,
    storage: Arc<VolatileStorage>,
    disk: Disk,
    initial: Vec<u8>,
    backing_file: Option<Vec<u8>>,
    backing_view: Vec<u8>,
    spans: Vec<Span>,
    snapshots: Vec<Vec<u8>>,
}

/// The image a scenario starts from: created with `cluster_size` and table size 2 (4 for
/// 64 KiB clusters, QEMU's default), linked to `base.raw` when `backing` is given, then
/// prepared by `prepare` through the copy-on-read device and closed (durable).
fn start(
    name: &'static str,
    cluster_size: u32,
    size: u64,
    backing: Option<Vec<u8>>,
    prepare: impl FnOnce(&Disk),
) -> Recorder {
    start_named(name, cluster_size, size, backing, "base.raw", prepare)
}

/// [`start`], the backing named `backing_name` (a path to `base.raw`).
fn start_named(
    name: &'static str,
    cluster_size: u32,
    size: u64,
    backing: Option<Vec<u8>>,
    backing_name: &str,
    prepare: impl FnOnce(&Disk),
) -> Recorder {
    let mut create = CreateOptions::new(size);
    create.cluster_size = cluster_size;
    create.table_size = if cluster_size == 65536 { 4 } else { 2 };
    if backing.is_some() {
        create.backing = Some((backing_name.into(), BackingFormat::Raw));
    }
    let mem = Arc::new(MemStorage::new());
    Image::create(&*mem, &create).unwrap();
    let device = |storage: Box<dyn qed::Storage>| {
        let image = Image::open(storage, OpenOptions::default()).unwrap();
        disk_over(image, backing.as_deref().map(raw_backing))
    };
    let pre = device(Box::new(Arc::clone(&mem)));
    prepare(&pre);
    pre.close().unwrap();
    let initial = mem.to_bytes();
    let storage = Arc::new(VolatileStorage::new(initial.clone()));
    let disk = device(Box::new(Arc::clone(&storage)));
    let mut backing_view = backing.clone().unwrap_or_default();
    backing_view.resize(size as usize, 0);
    let mut recorder = Recorder {
        name,
        storage,
        disk,
        initial,
        backing_file: backing,
        backing_view,
        spans: Vec::new(),
        snapshots: Vec::new(),
    };
    let now = recorder.guest_view();
    recorder.snapshots.push(now);
    recorder
}

/// A run that starts by opening `bytes` (a crash state) read-write: the repair QEMU would
/// make at open is the first operation, and must leave the content it finds.
fn resume(name: &'static str, bytes: Vec<u8>) -> Recorder {
    let storage = Arc::new(VolatileStorage::new(bytes.clone()));
    let image = Image::open(Box::new(Arc::clone(&storage)), OpenOptions::default()).unwrap();
    let disk = disk_over(image, None);
    let size = disk.image().size() as usize;
    let mut recorder = Recorder {
        name,
        storage,
        disk,
        initial: bytes,
        backing_file: None,
        backing_view: vec![0u8; size],
        spans: Vec::new(),
        snapshots: Vec::new(),
    };
    let repaired = recorder.guest_view();
    let events = recorder.storage.events();
    recorder.spans.push(Span {
        what: "open (repair)".into(),
        start: 0,
        last_write: (0..events.len())
            .rev()
            .find(|&i| !matches!(events[i], Event::Flush)),
    });
    recorder.snapshots = vec![repaired.clone(), repaired];
    recorder
}

impl Recorder {
    /// Runs one operation, recording its events; `model` turns the previous guest content
    /// into the expected one. The live image must then read exactly that.
    fn op(&mut self, what: &str, run: impl FnOnce(&Disk), model: impl FnOnce(&mut Vec<u8>)) {
        let start = self.storage.events().len();
        run(&self.disk);
        let events = self.storage.events();
        let last_write = (start..events.len())
            .rev()
            .find(|&i| !matches!(events[i], Event::Flush));
        self.spans.push(Span {
            what: what.to_string(),
            start,
            last_write,
        });
        let mut expected = self.snapshots.last().unwrap().clone();
        model(&mut expected);
        let got = self.guest_view();
        if let Some(i) = got.iter().zip(&expected).position(|(a, b)| a != b) {
            panic!("{}: after {what} the live image differs from the model at byte {i:#x}: {:#04x} vs {:#04x}", self.name, got[i], expected[i]);
        }
        self.snapshots.push(expected);
    }

    /// A guest write through the copy-on-read device.
    fn write(&mut self, offset: u64, len: usize, byte: u8) {
        let data = vec![byte; len];
        self.op(
            &format!("write {offset:#x}+{len:#x}"),
            |d| d.write_at(&data, offset).unwrap(),
            |m| m[offset as usize..offset as usize + len].fill(byte),
        );
    }

    /// A guest write of zeros.
    fn zero(&mut self, offset: u64, len: u64) {
        self.op(
            &format!("write_zeroes {offset:#x}+{len:#x}"),
            |d| d.write_zeroes(offset, len).unwrap(),
            |m| m[offset as usize..(offset + len) as usize].fill(0),
        );
    }

    /// A guest flush.
    fn flush(&mut self) {
        self.op("flush", |d| d.flush().unwrap(), |_| {});
    }

    /// A copy-on-read read (its copy-in stored before the operation ends).
    fn read(&mut self, offset: u64, len: usize) {
        let backing = self.snapshots.last().unwrap().clone();
        self.op(
            &format!("read {offset:#x}+{len:#x}"),
            |d| {
                let mut buf = vec![0u8; len];
                d.read_at(&mut buf, offset).unwrap();
                assert_eq!(buf, backing[offset as usize..offset as usize + len]);
                d.block_on(d.settle_copy_ins());
            },
            |_| {},
        );
    }

    /// The stream's populate of `[offset, offset + len)`.
    fn populate(&mut self, offset: u64, len: u64) {
        self.op(
            &format!("populate {offset:#x}+{len:#x}"),
            |d| {
                d.block_on(d.populate_range(offset, len)).unwrap();
            },
            |_| {},
        );
    }

    /// The stream's batched commit: `units` fetched one by one into a buffer pool (each under
    /// its range lock), then stored together with one flush before all their L2 updates, as
    /// the stream's committer stores them.
    fn batch(&mut self, units: &[(u64, u64)]) {
        self.op(
            &format!("batch of {} units", units.len()),
            |d| {
                let pool = copy_on_read::BufferPool::new(8 << 20, 64 << 10);
                let dev = d.device();
                let stats = d.block_on(async {
                    let mut fetched = Vec::new();
                    for &(o, l) in units {
                        let chunks = pool.take(l).await.unwrap();
                        fetched.push(dev.fetch_range(o, l, chunks).await.unwrap());
                    }
                    // Stored in another order than fetched: the batch sorts them.
                    fetched.reverse();
                    dev.store_fetched(fetched).await.unwrap()
                });
                assert!(stats.copied > 0, "the batch stored nothing: {stats:?}");
            },
            |_| {},
        );
    }

    /// The stream job itself, to its end (one request of `request` bytes at a time).
    fn stream(&mut self, request: u64, keep_backing: bool) {
        let options = StreamOptions {
            request_bytes: request,
            in_flight: 1,
            keep_backing,
            ..StreamOptions::default()
        };
        self.stream_with(options);
    }

    /// The stream job with `options`, to its end.
    fn stream_with(&mut self, options: StreamOptions) {
        let keep_backing = options.keep_backing;
        self.op(
            "stream",
            |d| {
                let dev: Arc<CorDevice> = Arc::clone(d.device());
                let job = async { StreamJob::start(dev, options).wait().await };
                let outcome = d.block_on(job).unwrap();
                assert_eq!(outcome.unlinked, !keep_backing);
            },
            |_| {},
        );
    }

    /// The stream job on a runtime of its own (two workers, `rate` bytes per second), while
    /// this thread makes `writes` through the copy-on-read device: write `i` waits until the
    /// stream has reached `i / writes.len()` of the disk (or ended), so writes land behind,
    /// in and ahead of it whatever the machine's speed. The stream changes no content, so
    /// its events need no span of their own; a guest write's span may include some of the
    /// stream's events, which only makes its durability point later (weaker, still right).
    fn race_stream(&mut self, rate: u64, writes: &[(u64, usize, u8)]) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let options = StreamOptions {
            request_bytes: 64 << 10,
            in_flight: 2,
            rate: std::num::NonZeroU64::new(rate),
            ..StreamOptions::default()
        };
        let dev: Arc<CorDevice> = Arc::clone(self.disk.device());
        let job = runtime.block_on(async { StreamJob::start(dev, options) });
        let handle = job.handle();
        let size = self.disk.image().size();
        let mut during = 0;
        for (i, &(offset, len, byte)) in writes.iter().enumerate() {
            let reach = size * i as u64 / writes.len() as u64;
            while handle.progress().offset < reach && !job_ended(&handle) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            during += usize::from(!job_ended(&handle));
            self.write(offset, len, byte);
        }
        let outcome = runtime.block_on(job.wait()).unwrap();
        assert!(outcome.unlinked, "the stream dropped the link");
        println!(
            "{}: {during} of {} writes began while the stream ran",
            self.name,
            writes.len()
        );
    }

    /// `rebase -u` to `name`: the same backing data under another name.
    fn rebase(&mut self, name: &str) {
        self.op(
            &format!("rebase -u ({} bytes)", name.len()),
            |d| {
                d.image()
                    .set_backing(Some((name, BackingFormat::Raw)))
                    .unwrap()
            },
            |_| {},
        );
    }

    /// The copy-on-read device's backing drop.
    fn drop_backing(&mut self) {
        self.op(
            "drop backing link",
            |d| d.block_on(d.drop_backing_link()).unwrap(),
            |_| {},
        );
    }

    /// What the guest sees now, read from the image alone (nothing is written).
    fn guest_view(&self) -> Vec<u8> {
        let linked = self.disk.backing().is_some();
        guest_view(self.disk.image(), linked.then_some(&self.backing_view[..]))
    }

    /// Ends the run without closing (the last cut is a crash after the last operation).
    fn finish(self) -> Run {
        let events = self.storage.events();
        drop(self.disk);
        Run {
            name: self.name,
            initial: self.initial,
            events,
            backing_file: self.backing_file,
            backing_view: self.backing_view,
            spans: self.spans,
            snapshots: self.snapshots,
        }
    }
}

/// True once a stream job has ended.
fn job_ended(handle: &engine::stream::StreamHandle) -> bool {
    use engine::stream::JobState;
    matches!(
        handle.progress().state,
        JobState::Completed | JobState::Cancelled | JobState::Failed
    )
}

/// The guest's view of `image`: its own clusters, and `backing` (None: zeros) where it has
/// none.
fn guest_view(image: &Image, backing: Option<&[u8]>) -> Vec<u8> {
    let mut buf = vec![0u8; image.size() as usize];
    let holes = image.read_allocated(&mut buf, GuestOffset(0)).unwrap();
    for (at, len) in holes {
        let range = at.0 as usize..(at.0 + len) as usize;
        match backing {
            Some(b) => buf[range.clone()].copy_from_slice(&b[range]),
            None => buf[range].fill(0),
        }
    }
    buf
}

/// What one crash state was.
#[derive(Debug)]
struct Verdict {
    need_check: bool,
    leaks: bool,
    unlinked: bool,
    /// The state as our open left it (repaired when it said NEED_CHECK).
    opened: Arc<MemStorage>,
    /// What the guest reads from it.
    view: Vec<u8>,
}

/// Checks one crash state against the run at cut `k`; an error says what is wrong.
fn verify(run: &Run, k: usize, names: &[Option<String>], bytes: &[u8]) -> Result<Verdict, String> {
    let header =
        Header::decode(&bytes[..bytes.len().min(64)]).map_err(|e| format!("header: {e}"))?;
    let need_check = header.features & F_NEED_CHECK != 0;
    // Without NEED_CHECK the open repairs nothing: the check below sees the state as it is.
    let opened = Arc::new(MemStorage::from_bytes(bytes.to_vec()));
    let image = Image::open(Box::new(Arc::clone(&opened)), OpenOptions::default())
        .map_err(|e| format!("open: {e}"))?;
    let report = image.check(qed::Repair::None).map_err(|e| e.to_string())?;
    if report.corruptions != 0 || report.check_errors != 0 {
        let when = if need_check {
            "after the repair at open"
        } else {
            "not marked NEED_CHECK, yet"
        };
        return Err(format!("{when}: {report:?}"));
    }
    check_name(names, image.backing_name())?;
    let linked = image.backing_name().is_some();
    let got = guest_view(&image, linked.then_some(&run.backing_view[..]));
    check_content(run, k, &got).map_err(|e| {
        let link = if linked { "linked" } else { "no backing link" };
        format!("{e} ({link})")
    })?;
    let unlinked = run.backing_file.is_some() && !linked;
    if unlinked {
        check_standalone(run, &image)?;
    }
    Ok(Verdict {
        need_check,
        leaks: report.leaks > 0,
        unlinked,
        opened,
        view: got,
    })
}

/// The header names a backing (or none) that it named at the last flush or since (`names`).
fn check_name(names: &[Option<String>], name: Option<String>) -> Result<(), String> {
    if names.contains(&name) {
        return Ok(());
    }
    let show = |n: &Option<String>| match n {
        Some(n) if n.len() > 48 => {
            format!("{} bytes, bytes 424..472 {:?}", n.len(), n.get(424..472))
        }
        other => format!("{other:?}"),
    };
    let allowed: Vec<String> = names.iter().map(show).collect();
    Err(format!(
        "the header names backing {}, neither the durable one nor one set since: {allowed:?}",
        show(&name)
    ))
}

/// The backing name the header in `bytes` records (None: no backing).
fn header_name(bytes: &[u8]) -> Option<String> {
    let header = Header::decode(&bytes[..64]).expect("a header");
    if !header.has_backing_file() {
        return None;
    }
    let at = header.backing_filename_offset as usize;
    let name = &bytes[at..at + header.backing_filename_size as usize];
    Some(String::from_utf8_lossy(name).into_owned())
}

/// Every sector holds one of the contents the run allows at cut `k`.
fn check_content(run: &Run, k: usize, got: &[u8]) -> Result<(), String> {
    let (durable, begun) = run.allowed(k);
    let options = &run.snapshots[durable..=begun];
    for (s, sector) in got.chunks(SECTOR as usize).enumerate() {
        let range = s * SECTOR as usize..s * SECTOR as usize + sector.len();
        if !options.iter().any(|o| o[range.clone()] == *sector) {
            let names: Vec<&str> = run.spans[durable..begun]
                .iter()
                .map(|s| s.what.as_str())
                .collect();
            return Err(format!(
                "guest sector {s} (byte {:#x}) holds neither the durable content (after {durable} operations) nor that of a later one begun by then {names:?}",
                range.start
            ));
        }
    }
    Ok(())
}

/// An image whose link is gone holds every cluster the backing has data for.
fn check_standalone(run: &Run, image: &Image) -> Result<(), String> {
    let cs = image.geometry().cluster_size();
    for (c, chunk) in run.backing_view.chunks(cs as usize).enumerate() {
        if chunk.iter().all(|&b| b == 0) {
            continue;
        }
        let at = GuestOffset(c as u64 * cs);
        let (mapping, _) = image.mapping_at(at, 1).map_err(|e| e.to_string())?;
        if mapping == Mapping::Unallocated {
            return Err(format!(
                "unlinked, yet cluster {c} (backing data) is unallocated"
            ));
        }
    }
    Ok(())
}

/// Counts of one scenario's checked states.
#[derive(Debug, Default)]
struct Counts {
    cuts: usize,
    exhaustive_cuts: usize,
    states: usize,
    need_check: usize,
    leaks: usize,
    unlinked: usize,
    max_pending_sectors: usize,
    qemu: usize,
}

/// A crash state kept for `qemu-img check`.
struct Sampled {
    what: String,
    bytes: Vec<u8>,
    need_check: bool,
    repaired: Vec<u8>,
    view: Vec<u8>,
}

/// Cuts `run` at every event, checks every (or a sample of the) crash states at each cut,
/// grades a uniform sample with `qemu-img check`, prints the counts and returns them.
fn check_run(run: &Run) -> Counts {
    let mut counts = Counts::default();
    let mut volatile = Volatile::new(run.initial.clone());
    let mut rng = XorShift::new(0x9e37 ^ run.events.len() as u64);
    let mut reservoir: Vec<Sampled> = Vec::new();
    // The names the header held since the last flush, the durable one first.
    let mut names = vec![header_name(volatile.current())];
    for k in 0..=run.events.len() {
        if k > 0 {
            volatile.apply(&run.events[k - 1]);
            let now = header_name(volatile.current());
            if run.events[k - 1] == Event::Flush {
                names = vec![now];
            } else if names.last() != Some(&now) {
                names.push(now);
            }
        }
        let at_flush = k == run.events.len() || run.events[k] == Event::Flush;
        let space = volatile.space();
        counts.cuts += 1;
        counts.max_pending_sectors = counts.max_pending_sectors.max(space.sectors());
        if space.count().is_some_and(|n| n <= EXHAUSTIVE) {
            counts.exhaustive_cuts += 1;
        }
        for choice in space.states(EXHAUSTIVE, samples(at_flush), k as u64 + 1) {
            let bytes = volatile.power_loss(&choice);
            let verdict = verify(run, k, &names, &bytes).unwrap_or_else(|e| {
                panic!(
                    "{}: crash at event {k} of {} ({}), keeping {}: {e}",
                    run.name,
                    run.events.len(),
                    where_in(run, k),
                    describe(&choice)
                )
            });
            counts.states += 1;
            counts.need_check += usize::from(verdict.need_check);
            counts.leaks += usize::from(verdict.leaks);
            counts.unlinked += usize::from(verdict.unlinked);
            let slot = if reservoir.len() < QEMU_SAMPLE {
                Some(reservoir.len())
            } else {
                let r = rng.below(counts.states as u64) as usize;
                (r < QEMU_SAMPLE).then_some(r)
            };
            if let Some(slot) = slot {
                let sampled = Sampled {
                    what: format!("crash at event {k}, keeping {}", describe(&choice)),
                    bytes,
                    need_check: verdict.need_check,
                    repaired: verdict.opened.to_bytes(),
                    view: verdict.view,
                };
                if slot == reservoir.len() {
                    reservoir.push(sampled);
                } else {
                    reservoir[slot] = sampled;
                }
            }
        }
    }
    for sampled in &reservoir {
        qemu_grades(run, sampled);
        counts.qemu += 1;
    }
    println!("{}: {counts:?}", run.name);
    counts
}

/// Which operation the cut falls in.
fn where_in(run: &Run, k: usize) -> String {
    match run.spans.iter().rposition(|s| s.start < k) {
        Some(i) => format!("during or after {}", run.spans[i].what),
        None => "before the first operation".into(),
    }
}

/// A short description of a choice: the sectors that kept a version.
fn describe(choice: &Choice) -> String {
    let kept: Vec<String> = choice
        .versions
        .iter()
        .enumerate()
        .filter(|(_, &v)| v > 0)
        .map(|(i, v)| format!("#{i}:v{v}"))
        .collect();
    let shown = kept.iter().take(16).cloned().collect::<Vec<_>>().join(" ");
    format!(
        "{} of {} pending sectors [{shown}{}], {} length changes",
        kept.len(),
        choice.versions.len(),
        if kept.len() > 16 { " ..." } else { "" },
        choice.length
    )
}

/// `qemu-img check` of a crash state (repaired by `qemu-img check -r all` first when it says
/// NEED_CHECK, as QEMU's open would) and of the same state as our open repaired it: no
/// corruption (exit 0, or 3 for leaks only); and QEMU reads the crash state (`qemu-img
/// convert`, through the backing while the header names it) as we do.
fn qemu_grades(run: &Run, sampled: &Sampled) {
    let dir = qedstream_tests::tempdir();
    if let Some(b) = &run.backing_file {
        std::fs::write(dir.path().join("base.raw"), b).unwrap();
    }
    let crash = dir.path().join("crash.qed");
    std::fs::write(&crash, &sampled.bytes).unwrap();
    let path = qedstream_tests::path_str(&crash);
    if sampled.need_check {
        let (code, out, err) = qemu::img_status(&["check", "-r", "all", "-f", "qed", path]);
        assert!(
            code == 0 || code == 3,
            "{}: {}: qemu-img check -r all exited {code}:\n{out}\n{err}",
            run.name,
            sampled.what
        );
    }
    let (code, json) = qemu::check_json(&crash);
    assert!(
        (code == 0 || code == 3) && qemu::json_count(&json, "corruptions") == 0,
        "{}: {}: qemu-img check: exit {code}: {json:#}",
        run.name,
        sampled.what
    );
    let theirs = qemu::convert_to_raw(&crash);
    let what = format!("{}: {}: qemu-img convert", run.name, sampled.what);
    qedstream_tests::assert_same_bytes(&theirs, &sampled.view, &what);
    let repaired = dir.path().join("repaired.qed");
    std::fs::write(&repaired, &sampled.repaired).unwrap();
    let (code, json) = qemu::check_json(&repaired);
    assert!(
        (code == 0 || code == 3) && qemu::json_count(&json, "corruptions") == 0,
        "{}: {} (as our open repaired it): qemu-img check: exit {code}: {json:#}",
        run.name,
        sampled.what
    );
}

/// Random bytes with runs of zeros (whole clusters of them, for zero clusters and skips).
fn backing_bytes(len: usize, seed: u64, cluster: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    XorShift::new(seed).fill(&mut b);
    for start in (3 * cluster..len).step_by(11 * cluster) {
        let end = (start + 2 * cluster).min(len);
        b[start..end].fill(0);
    }
    b
}

const K4: u64 = 4096;
const K64: u64 = 65536;

/// Scenario 1's run: allocating writes without a backing.
fn without_a_backing() -> Run {
    let mut r = start("no backing, 4K clusters", 4096, 12 << 20, None, |_| {});
    r.write(5000, 1000, 0x11); // a new L2 table (NEED_CHECK set and flushed first)
    r.write((4 << 20) + 100, 3 * K4 as usize, 0x22); // the second table
    r.write((8 << 20) - 2000, 4000, 0x2a); // the second table and a new third one
    r.write(5200, 600, 0x33); // in place, two sectors
    r.zero(16 * K4, 4 * K4); // zero clusters
    r.write(6 * K4, 100, 0x3c); // data past the durable end, one L2 sector
    r.flush(); // clears NEED_CHECK
    r.write(3 * K4, 2 * K4 as usize, 0x44); // NEED_CHECK again
    r.write(17 * K4 + 10, 100, 0x55); // into a zero cluster
    r.write(70 * K4, K4 as usize, 0x66); // another sector of the table
    r.finish()
}

#[test]
fn allocating_writes_without_a_backing() {
    check_run(&without_a_backing());
}

/// A crash state of scenario 1 that QEMU would repair at open: an L2 entry past the end of
/// the file (a corruption) and leaked clusters at its end.
fn state_needing_repair() -> Vec<u8> {
    let run = without_a_backing();
    let mut volatile = Volatile::new(run.initial.clone());
    for e in &run.events {
        volatile.apply(e);
    }
    let read_only = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    volatile
        .space()
        .states(EXHAUSTIVE, 20_000, 7)
        .map(|choice| volatile.power_loss(&choice))
        .find(|bytes| {
            let image = Image::open(
                Box::new(MemStorage::from_bytes(bytes.clone())),
                read_only.clone(),
            )
            .unwrap();
            let report = image.check(qed::Repair::None).unwrap();
            report.corruptions > 0 && report.leaks > 0
        })
        .expect("a crash state with a corruption and leaks")
}

#[test]
fn the_repair_at_open_and_the_writes_after_it() {
    let mut r = resume("repair at open, 4K clusters", state_needing_repair());
    assert!(
        r.storage
            .events()
            .iter()
            .any(|e| matches!(e, Event::SetLen(_))),
        "the repair reclaimed the leaked clusters"
    );
    r.write(80 * K4 + 5, 2 * K4 as usize, 0x71); // into the reclaimed space
    r.write(5000, 10, 0x72); // in place
    r.flush();
    r.write(90 * K4, 3000, 0x73);
    check_run(&r.finish());
}

#[test]
fn allocating_writes_over_a_backing() {
    let size = 8u64 << 20;
    let base = backing_bytes(size as usize, 2, K64 as usize);
    let mut r = start("backing, 64K clusters", 65536, size, Some(base), |_| {});
    r.write(100 << 10, 4096, 0xab); // partial: filled from the backing, a new L2 table
    r.write(300 << 10, 100, 0xcd); // one L2 sector
    r.write(2 * K64, 2 * K64 as usize, 0x12); // whole clusters
    r.write((100 << 10) + 10, 1000, 0x34); // in place
    r.zero(8 * K64, 2 * K64); // zero clusters
    r.flush();
    r.write(9 * K64 - 50, 100, 0x56); // a zero cluster and an unallocated one
    r.write(size - 700, 700, 0x78); // the last cluster
    check_run(&r.finish());
}

#[test]
fn copy_on_read_populates_whole_clusters_and_the_partial_last_one() {
    // The disk ends 1536 bytes into a cluster; the backing runs on past it.
    let size = (2 << 20) + 3 * K4 + 1536;
    let base = backing_bytes(size as usize + 3000, 3, K4 as usize);
    let mut r = start("copy-on-read, 4K clusters", 4096, size, Some(base), |d| {
        d.write_at(&[9u8; 100], 50 * K4).unwrap()
    });
    r.disk.set_copy_on_read(true);
    r.read(10_000, 100);
    r.read(300 << 10, 20 << 10);
    r.read(48 * K4, 4 * K4 as usize); // around the cluster written before
    r.read(size - 1000, 1000); // the partial last cluster
    r.read(0, 256 << 10); // 64 clusters, zero runs among them
    check_run(&r.finish());
}

#[test]
fn the_stream_batches_and_their_flush() {
    let size = 2u64 << 20;
    let base = backing_bytes((3 << 19) + 777, 4, K4 as usize);
    let mut r = start("stream batches, 4K clusters", 4096, size, Some(base), |d| {
        d.write_at(&[7u8; 5000], 20 * K4 + 300).unwrap();
        d.write_zeroes(100 * K4, 8 * K4).unwrap();
    });
    r.stream(64 << 10, true);
    check_run(&r.finish());
}

#[test]
fn batched_commits_share_one_flush() {
    // 6 MiB of 4K clusters, tables of 1024 clusters (4 MiB): a batch across an existing table
    // and a new one, with units that are partly local, zeros in the backing, and the disk's
    // short last cluster.
    let size = (6 << 20) + 1024;
    let base = backing_bytes(size as usize + 3000, 9, K4 as usize);
    let mut r = start("batched commits, 4K", 4096, size, Some(base), |d| {
        d.write_at(&[9u8; 6000], 40 * K4 + 100).unwrap();
        d.write_zeroes(3 * K4, K4).unwrap();
    });
    r.batch(&[(0, 16 * K4), (32 * K4, 16 * K4), (1000 * K4, 40 * K4)]);
    r.batch(&[(16 * K4, 16 * K4), (size - 20 * K4 - 1024, 20 * K4 + 1024)]);
    let counts = check_run(&r.finish());
    assert!(
        counts.leaks > 0,
        "no state with the batch's data unlinked: {counts:?}"
    );
}

#[test]
fn the_stream_with_its_default_options_over_64k_clusters() {
    // QEMU's default geometry and the stream's own defaults: 4 MiB requests, sixteen in flight.
    let size = 8u64 << 20;
    let base = backing_bytes((6 << 20) + 5000, 7, K64 as usize);
    let mut r = start(
        "default stream, 64K clusters",
        65536,
        size,
        Some(base),
        |d| {
            d.write_at(&[5u8; 70_000], (5 << 20) + 1000).unwrap();
        },
    );
    r.stream_with(StreamOptions::default());
    let counts = check_run(&r.finish());
    assert!(counts.unlinked > 0, "no state after the drop: {counts:?}");
}

#[test]
fn the_stream_ends_with_the_backing_drop() {
    let size = (1 << 20) + 2 * K4 + 512;
    let base = backing_bytes(size as usize + 100, 5, K4 as usize);
    let mut r = start(
        "stream and drop, 4K clusters",
        4096,
        size,
        Some(base),
        |d| {
            d.write_at(&[3u8; 3000], 7 * K4 + 10).unwrap();
        },
    );
    r.stream(128 << 10, false);
    let run = r.finish();
    let counts = check_run(&run);
    assert!(counts.unlinked > 0, "no state after the drop: {counts:?}");
}

#[test]
fn guest_writes_interleaved_with_populates_then_the_drop() {
    let size = (1 << 20) + 1024;
    let base = backing_bytes(size as usize, 6, K4 as usize);
    let mut r = start("mixed, 4K clusters", 4096, size, Some(base), |_| {});
    r.disk.set_copy_on_read(true);
    r.populate(0, 16 * K4);
    r.write(20 * K4 + 100, 300, 0x21); // filled from the backing
    r.read(30 * K4 + 5, 4 * K4 as usize); // copy-on-read of five clusters
    r.populate(16 * K4, 32 * K4); // skips 20 and 30..35
    r.zero(60 * K4, 4 * K4); // zero clusters
    r.populate(56 * K4, 16 * K4); // skips them
    r.write(2 * K4 + 4000, 200, 0x43); // in place, across a cluster boundary
    r.flush();
    r.write(90 * K4 + 1, 10, 0x65);
    r.populate(0, size);
    r.drop_backing();
    r.write(100 * K4 + 7, 5000, 0x87); // no backing now: NEED_CHECK set
    r.write(size - 10, 10, 0x98);
    check_run(&r.finish());
}

#[test]
fn guest_writes_racing_the_stream() {
    let size = 1u64 << 20;
    let base = backing_bytes(size as usize, 8, K4 as usize);
    let mut r = start(
        "racing the stream, 4K clusters",
        4096,
        size,
        Some(base),
        |_| {},
    );
    let mut rng = XorShift::new(8);
    let writes: Vec<(u64, usize, u8)> = (0..12)
        .map(|i| {
            let len = 1 + rng.below(3 * K4) as usize;
            let offset = rng.below(size - len as u64);
            (offset, len, 0x10 + i as u8)
        })
        .collect();
    r.race_stream(4 << 20, &writes);
    r.write(3 * K4 + 3, 100, 0xee); // a zero cluster after the drop: NEED_CHECK
    check_run(&r.finish());
}

#[test]
fn rebase_to_a_long_name() {
    // Two names of base.raw, 608 bytes each: header and name span two sectors.
    let old = format!("{}base.raw", "./".repeat(300));
    let new = format!("{}base.raw", ".//".repeat(200));
    let short = "./base.raw";
    let size = 1u64 << 20;
    let base = backing_bytes(size as usize, 9, K4 as usize);
    let mut r = start_named("rebase, 4K clusters", 4096, size, Some(base), &old, |d| {
        d.write_at(&[1u8; 100], 3 * K4).unwrap();
    });
    r.write(10 * K4 + 5, 100, 0x31);
    r.rebase(&new);
    r.write(20 * K4 + 5, 100, 0x32);
    r.rebase(short);
    r.rebase(&old);
    check_run(&r.finish());
}
