//! Crash safety of the write path, seen through a `Storage` that records every write and
//! flush:
//!
//! - the order QEMU relies on (qed-format.md §3.2, §9): with a backing file, data clusters are
//!   written whole, then flushed, then the L2 table (a new one whole, then flushed), then the
//!   L1 sector; without a backing file, NEED_CHECK is set before the first allocation and a
//!   clean close clears it after a flush;
//! - replaying every prefix of the recorded writes (a crash at each point, writes reaching the
//!   disk in order), and every such crash with one write lost since the last flush, gives an
//!   image that opens, repairs to clean, and shows, in every cluster, either the data from
//!   before the interrupted operation or from after it.

use std::sync::Arc;

use parking_lot::Mutex;
use qed::{CreateOptions, Image, MemStorage, OpenOptions, Repair, Storage};
use qedstream_tests::hooked::{Hooked, StorageHooks};
use qedstream_tests::{disk_over, random_ops, raw_backing, Model, XorShift};

#[derive(Clone, Debug)]
enum Event {
    Write { offset: u64, data: Vec<u8> },
    Flush,
    SetLen(u64),
}

/// Hooks that log every write (with its bytes), flush and resize, in order.
#[derive(Debug, Clone, Default)]
struct Log(Arc<Mutex<Vec<Event>>>);

impl Log {
    /// The events so far, leaving the log empty.
    fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.0.lock())
    }
}

impl StorageHooks for Log {
    fn write(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.lock().push(Event::Write {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.lock().push(Event::Flush);
        Ok(())
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.lock().push(Event::SetLen(len));
        Ok(())
    }
}

/// Memory holding `bytes` whose writes, flushes and resizes are logged (clones share both).
fn recording(bytes: Vec<u8>) -> Hooked<Arc<MemStorage>, Log> {
    Hooked {
        inner: Arc::new(MemStorage::from_bytes(bytes)),
        hooks: Log::default(),
    }
}

const CS: u64 = 65536;

fn fresh(backing: bool) -> Vec<u8> {
    let s = MemStorage::new();
    let mut o = CreateOptions::new(8 << 20);
    if backing {
        o.backing = Some(("base.raw".into(), qed::BackingFormat::Raw));
    }
    Image::create(&s, &o).unwrap();
    s.to_bytes()
}

fn base_bytes() -> Vec<u8> {
    let mut b = vec![0u8; 3 << 20];
    XorShift::new(99).fill(&mut b);
    b
}

/// Index of the first event matching `f`.
fn position(log: &[Event], f: impl Fn(&Event) -> bool) -> usize {
    log.iter()
        .position(f)
        .unwrap_or_else(|| panic!("event not found in {:#?}", summary(log)))
}

fn summary(log: &[Event]) -> Vec<String> {
    log.iter()
        .map(|e| match e {
            Event::Write { offset, data } => format!("write {offset:#x}+{:#x}", data.len()),
            Event::Flush => "flush".into(),
            Event::SetLen(l) => format!("set_len {l:#x}"),
        })
        .collect()
}

#[test]
fn allocating_write_with_backing_orders_data_flush_l2_flush_l1() {
    let rec = recording(fresh(true));
    let image = disk_over(
        Image::open(Box::new(rec.clone()), OpenOptions::default()).unwrap(),
        Some(raw_backing(&base_bytes())),
    );
    let l1 = image.image().header().l1_table_offset;
    let end0 = image.image().file_end();
    rec.hooks.take();
    // Partial write into a fresh cluster: COW from the backing, a new L2 table.
    image.write_at(&[0xab; 4096], 100 << 10).unwrap();
    let log = rec.hooks.take();
    let s = summary(&log);
    let is_data = |e: &Event| matches!(e, Event::Write { offset, .. } if *offset >= end0 && *offset < end0 + CS);
    let last_data = log.iter().rposition(is_data).expect("data written");
    let data_bytes: usize = log
        .iter()
        .filter(|e| is_data(e))
        .map(|e| match e {
            Event::Write { data, .. } => data.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(
        data_bytes as u64, CS,
        "the new cluster is written whole: {s:?}"
    );
    let l2_write = position(
        &log,
        |e| matches!(e, Event::Write { offset, data } if *offset == end0 + CS && data.len() as u64 == 4 * CS),
    );
    let l1_write = position(
        &log,
        |e| matches!(e, Event::Write { offset, data } if *offset == l1 && data.len() == 512),
    );
    let flush_after_data = position(&log, |e| matches!(e, Event::Flush));
    assert!(
        last_data < flush_after_data && flush_after_data < l2_write,
        "data, flush, L2: {s:?}"
    );
    assert!(
        log[l2_write + 1..l1_write]
            .iter()
            .any(|e| matches!(e, Event::Flush)),
        "new L2 flushed before the L1 points at it: {s:?}"
    );
    assert!(
        !log.iter()
            .any(|e| matches!(e, Event::Write { offset: 0, .. })),
        "no header write with a backing: {s:?}"
    );

    // A second allocation in the same table: data, flush, one L2 sector, no L1.
    let end1 = image.image().file_end();
    image.write_at(&[0xcd; 100], 300 << 10).unwrap();
    let log = rec.hooks.take();
    let s = summary(&log);
    let data = position(
        &log,
        |e| matches!(e, Event::Write { offset, .. } if *offset == end1),
    );
    let flush = position(&log, |e| matches!(e, Event::Flush));
    let l2 = position(
        &log,
        |e| matches!(e, Event::Write { offset, data } if *offset == end0 + CS && data.len() == 512),
    );
    assert!(data < flush && flush < l2, "data, flush, L2 sector: {s:?}");
    assert!(
        !log.iter()
            .any(|e| matches!(e, Event::Write { offset, .. } if *offset == l1)),
        "{s:?}"
    );
    image.close().unwrap();
}

#[test]
fn allocating_write_without_backing_sets_need_check_first_and_close_clears_it() {
    let rec = recording(fresh(false));
    let image = Image::open(Box::new(rec.clone()), OpenOptions::default()).unwrap();
    rec.hooks.take();
    image.write_at(&[0x22; 65536], qed::GuestOffset(0)).unwrap();
    let log = rec.hooks.take();
    let s = summary(&log);
    match &log[0] {
        Event::Write { offset: 0, data } => {
            assert_eq!(data[16] & 0x02, 0x02, "first write sets NEED_CHECK: {s:?}")
        }
        _ => panic!("the header write must come first: {s:?}"),
    }
    assert!(
        !log.iter()
            .skip(1)
            .any(|e| matches!(e, Event::Write { offset: 0, .. })),
        "NEED_CHECK is set once: {s:?}"
    );
    // Stricter than QEMU: the bit is flushed before any data or table write, so a lost header
    // write cannot leave an entry past EOF in an image that does not say it needs a check.
    assert!(
        matches!(log[1], Event::Flush),
        "NEED_CHECK flushed first: {s:?}"
    );
    // A second allocation does not touch the header again.
    image
        .write_at(&[0x23; 10], qed::GuestOffset(1 << 20))
        .unwrap();
    let log = rec.hooks.take();
    assert!(!log
        .iter()
        .any(|e| matches!(e, Event::Write { offset: 0, .. })));
    image.close().unwrap();
    let log = rec.hooks.take();
    let s = summary(&log);
    let header = position(
        &log,
        |e| matches!(e, Event::Write { offset: 0, data } if data[16] & 0x02 == 0),
    );
    assert!(
        matches!(log[..header].first(), Some(Event::Flush)),
        "flush before clearing: {s:?}"
    );
    assert!(
        matches!(log.last(), Some(Event::Flush)),
        "flush after clearing: {s:?}"
    );
    assert_eq!(rec.inner.to_bytes()[16] & 0x02, 0);
}

/// (events persisted up to, indices of the events kept, disk before the op, disk after it)
type CrashCase<'a> = (usize, Vec<usize>, &'a Vec<u8>, &'a Vec<u8>);

/// Replays every prefix of the writes of `ops` and checks each crash image.
fn replay_every_crash_point(backing: bool, seed: u64) {
    let base = base_bytes();
    let initial = fresh(backing);
    let size = 8u64 << 20;
    let view = {
        let mut v = if backing { base.clone() } else { Vec::new() };
        v.resize(size as usize, 0);
        v
    };
    // The image over the backing (when it has one), read and written through the
    // copy-on-read device.
    let open = |storage: Box<dyn Storage>| {
        Image::open(storage, OpenOptions::default())
            .map(|image| disk_over(image, backing.then(|| raw_backing(&base))))
    };
    let rec = recording(initial.clone());
    let image = open(Box::new(rec.clone())).unwrap();
    let mut rng = XorShift::new(seed);
    let mut model = Model::new(view, CS);
    let ops = random_ops(&mut rng, &model, 12, 300 << 10, false);
    // (events so far, model before, model after) per op.
    let mut steps = Vec::new();
    let mut log = Vec::new();
    rec.hooks.take();
    for op in &ops {
        let before = model.bytes.clone();
        op.apply(&image).unwrap();
        model.apply(op);
        let start = log.len();
        log.extend(rec.hooks.take());
        steps.push((start, log.len(), before, model.bytes.clone()));
    }
    // No close: a crash after the last op is one of the cases.
    drop(image);
    // Crash points: every prefix (writes reach the disk in order), and, within each span of
    // writes between two flushes, that span with any one write lost (the disk reordered it).
    let mut cases: Vec<CrashCase> = Vec::new();
    for (start, end, before, after) in &steps {
        for k in *start..=*end {
            cases.push((k, (0..k).collect(), before, after));
        }
        let mut epoch_start = *start;
        for i in *start..=*end {
            if i == *end || matches!(log.get(i), Some(Event::Flush)) {
                for lost in epoch_start..i {
                    let kept = (0..i).filter(|&j| j != lost).collect();
                    cases.push((i, kept, before, after));
                }
                epoch_start = i + 1;
            }
        }
    }
    for (k, kept, before, after) in cases {
        let disk = MemStorage::from_bytes(initial.clone());
        for &j in &kept {
            match &log[j] {
                Event::Write { offset, data } => disk.write_at(data, *offset).unwrap(),
                Event::Flush => {}
                Event::SetLen(l) => disk.set_len(*l).unwrap(),
            }
        }
        let what = format!(
            "crash at event {k} keeping {} of them (backing {backing})",
            kept.len()
        );
        let crashed = open(Box::new(disk)).unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
        let report = crashed.image().check(Repair::All).unwrap();
        assert_eq!(report.exit_code(), 0, "{what}: {report:?}");
        let mut got = vec![0u8; size as usize];
        crashed.read_at(&mut got, 0).unwrap();
        // Each cluster is updated atomically (an operation may span several).
        for (c, chunk) in got.chunks(CS as usize).enumerate() {
            let lo = c * CS as usize;
            let hi = lo + chunk.len();
            assert!(
                chunk == &before[lo..hi] || chunk == &after[lo..hi],
                "{what}: cluster {c} holds neither the old nor the new data"
            );
        }
        crashed.close().unwrap();
    }
}

#[test]
fn every_crash_point_with_backing_shows_old_or_new_data() {
    replay_every_crash_point(true, 5);
}

#[test]
fn every_crash_point_without_backing_shows_old_or_new_data() {
    replay_every_crash_point(false, 6);
}
