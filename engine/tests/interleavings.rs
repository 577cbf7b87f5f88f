//! Guest I/O, copy-on-read and the stream racing on the same clusters, checked against a byte
//! model: no guest write is ever lost or overwritten by older backing data, and a read never
//! sees a half-written cluster. A stress test with many concurrent tasks, and a proptest over
//! interleavings. Both run in memory (a `MemStorage` image over an in-memory backing with
//! random delays), so they explore many schedules quickly.

use qedstream_tests::runtime::two_workers;
use std::sync::Arc;
use std::time::Duration;

use copy_on_read::{
    BlockDevice, Capabilities, CorDevice, IoBufs, IoFuture, Status, StatusExtent, WriteFlags,
};
use engine::stream::{step, StreamJob, StreamOptions};
use proptest::prelude::*;
use qed::{BackingFormat, CreateOptions, Image, MemStorage, OpenOptions, Repair};

/// A read-only in-memory backing whose reads take a random little while.
#[derive(Debug)]
struct SlowMem {
    bytes: Vec<u8>,
    seed: std::sync::atomic::AtomicU64,
    delay: bool,
}

impl SlowMem {
    fn jitter(&self) -> Duration {
        let s = self
            .seed
            .fetch_add(0x9e37_79b9_7f4a_7c15, std::sync::atomic::Ordering::Relaxed);
        Duration::from_micros((s >> 40) % 300)
    }
}

impl BlockDevice for SlowMem {
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn readv(&self, offset: u64, mut bufs: IoBufs) -> IoFuture<'_, IoBufs> {
        Box::pin(async move {
            if self.delay {
                tokio::time::sleep(self.jitter()).await;
            }
            let o = offset as usize;
            let n = bufs.len();
            bufs.copy_in(0, &self.bytes[o..o + n]);
            Ok(bufs)
        })
    }
    fn writev(&self, _: u64, _: IoBufs, _: WriteFlags) -> IoFuture<'_, IoBufs> {
        Box::pin(async { Err(copy_on_read::Error::ReadOnly) })
    }
    fn close(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn write_zeroes(&self, _: u64, _: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Err(copy_on_read::Error::ReadOnly) })
    }
    fn discard(&self, _: u64, _: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Err(copy_on_read::Error::Unsupported("discard")) })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn block_status(&self, offset: u64, length: u64) -> IoFuture<'_, Vec<StatusExtent>> {
        // Whole 4 KiB blocks of zeros are reported as zero, the rest as data.
        Box::pin(async move {
            let end = (offset + length).min(self.size());
            let mut out: Vec<StatusExtent> = Vec::new();
            let mut p = offset;
            while p < end {
                let b = ((p / 4096 + 1) * 4096).min(end);
                let zero = self.bytes[p as usize..b as usize].iter().all(|&x| x == 0);
                let status = if zero { Status::Zero } else { Status::Data };
                match out.last_mut() {
                    Some(l) if l.status == status => l.length += b - p,
                    _ => out.push(StatusExtent {
                        offset: p,
                        length: b - p,
                        status,
                    }),
                }
                p = b;
            }
            Ok(out)
        })
    }
    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::default();
        c.block_status = true;
        c
    }
    fn describe(&self) -> String {
        "mem".into()
    }
}

const CS: u32 = 4096;

/// A backing of `size` bytes: values 200..=255 in most 4K blocks, zeros in every fifth.
fn backing_bytes(size: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; size];
    let mut s = seed | 1;
    for (i, b) in v.iter_mut().enumerate() {
        if (i / 4096) % 5 == 3 {
            continue;
        }
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        *b = 200 + (s % 56) as u8;
    }
    v
}

/// A CorDevice on an in-memory QED image (4 KiB clusters) over `backing`.
fn device(backing: Vec<u8>, size: u64, delay: bool) -> Arc<CorDevice> {
    let storage = MemStorage::new();
    let options = CreateOptions {
        cluster_size: CS,
        table_size: 4,
        backing: Some(("mem".into(), BackingFormat::Raw)),
        ..CreateOptions::new(size)
    };
    Image::create(&storage, &options).unwrap();
    let image = Image::open(
        Box::new(storage),
        OpenOptions {
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let backing = Arc::new(SlowMem {
        bytes: backing,
        seed: std::sync::atomic::AtomicU64::new(7),
        delay,
    });
    Arc::new(CorDevice::new(image, "mem.qed".into(), Some(backing)))
}

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
fn concurrent_guest_writes_cor_reads_and_stream_lose_nothing() {
    const SIZE: u64 = 2 << 20;
    const WRITERS: u64 = 4;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .unwrap();
    let backing = backing_bytes(SIZE as usize, 99);
    let dev = device(backing.clone(), SIZE, true);
    // Writer k owns the 512-byte sectors s with s % WRITERS == k and writes values in
    // k*50+1..=k*50+50, so every byte's possible values are known.
    let owner = |b: u64| (b / 512) % WRITERS;
    let finals = rt.block_on(async {
        let mut tasks = Vec::new();
        for k in 0..WRITERS {
            let dev = Arc::clone(&dev);
            tasks.push(tokio::spawn(async move {
                let mut model: Vec<Option<u8>> = vec![None; SIZE as usize];
                let mut seed = 1000 + k;
                for i in 0..300u64 {
                    let sector = (rng(&mut seed) % (SIZE / 512 / WRITERS)) * WRITERS + k;
                    let start = sector * 512 + rng(&mut seed) % 256;
                    let len = 1 + rng(&mut seed) % (sector * 512 + 512 - start);
                    let val = (k * 50 + 1 + i % 50) as u8;
                    dev.write_at(start, vec![val; len as usize]).await.unwrap();
                    for b in start..start + len {
                        model[b as usize] = Some(val);
                    }
                }
                model
            }));
        }
        let mut readers = Vec::new();
        for r in 0..2u64 {
            let dev = Arc::clone(&dev);
            let backing = backing.clone();
            readers.push(tokio::spawn(async move {
                let mut seed = 77 + r;
                for _ in 0..200 {
                    let start = rng(&mut seed) % SIZE;
                    let len = 1 + rng(&mut seed) % (SIZE - start).min(20_000);
                    let got = dev.read_at(start, vec![0u8; len as usize]).await.unwrap();
                    for (i, &v) in got.iter().enumerate() {
                        let b = start + i as u64;
                        let k = owner(b);
                        let theirs = v as u64 > k * 50 && v as u64 <= k * 50 + 50;
                        assert!(
                            v == backing[b as usize] || theirs,
                            "byte {b} read {v}: neither backing ({}) nor a write of its owner",
                            backing[b as usize]
                        );
                    }
                }
            }));
        }
        let streamer = {
            let dev = Arc::clone(&dev);
            tokio::spawn(async move {
                let mut seed = 5;
                for _ in 0..150 {
                    let start = rng(&mut seed) % SIZE;
                    let len = 1 + rng(&mut seed) % (SIZE - start).min(64 << 10);
                    dev.populate_range(start, len).await.unwrap();
                }
            })
        };
        let mut finals = Vec::new();
        for t in tasks {
            finals.push(t.await.unwrap());
        }
        for r in readers {
            r.await.unwrap();
        }
        streamer.await.unwrap();
        finals
    });
    let mut expect = backing.clone();
    for model in &finals {
        for (b, v) in model.iter().enumerate() {
            if let Some(v) = v {
                expect[b] = *v;
            }
        }
    }
    rt.block_on(async {
        let got = dev.read_at(0, vec![0u8; SIZE as usize]).await.unwrap();
        assert!(got == expect, "a guest write was lost");
        let job = StreamJob::start(Arc::clone(&dev), StreamOptions::default());
        let outcome = job.wait().await.unwrap();
        assert!(outcome.unlinked);
        let got = dev.read_at(0, vec![0u8; SIZE as usize]).await.unwrap();
        assert!(got == expect, "the stream changed the content");
        let report = dev.image().check(Repair::None).unwrap();
        assert_eq!(report.exit_code(), 0, "{report:?}");
        dev.close().await.unwrap();
    });
}

#[derive(Clone, Debug)]
enum Op {
    Write { at: u64, len: u64, val: u8 },
    Zero { at: u64, len: u64 },
    Read { at: u64, len: u64 },
    Step { at: u64, len: u64 },
}

const PSIZE: u64 = 256 << 10;

fn op() -> impl Strategy<Value = Op> {
    let range = (0..PSIZE).prop_flat_map(|at| (Just(at), 1..=(PSIZE - at).min(40_000)));
    prop_oneof![
        (range.clone(), 1u8..=199).prop_map(|((at, len), val)| Op::Write { at, len, val }),
        range.clone().prop_map(|(at, len)| Op::Zero { at, len }),
        range.clone().prop_map(|(at, len)| Op::Read { at, len }),
        range.prop_map(|(at, len)| Op::Step { at, len }),
    ]
}

impl Op {
    fn mutates(&self) -> bool {
        matches!(self, Op::Write { .. } | Op::Zero { .. })
    }

    fn apply(&self, model: &mut [u8]) {
        match *self {
            Op::Write { at, len, val } => model[at as usize..(at + len) as usize].fill(val),
            Op::Zero { at, len } => model[at as usize..(at + len) as usize].fill(0),
            _ => {}
        }
    }
}

/// Runs `op`; a read checks each byte against the model before or after `concurrent`.
async fn run_op(dev: &CorDevice, op: &Op, before: &[u8], after: &[u8]) {
    match *op {
        Op::Write { at, len, val } => dev.write_at(at, vec![val; len as usize]).await.unwrap(),
        Op::Zero { at, len } => dev.write_zeroes(at, len).await.unwrap(),
        Op::Read { at, len } => {
            let got = dev.read_at(at, vec![0u8; len as usize]).await.unwrap();
            for (i, &v) in got.iter().enumerate() {
                let b = at as usize + i;
                assert!(
                    v == before[b] || v == after[b],
                    "byte {b}: {v}, model {} / {}",
                    before[b],
                    after[b]
                );
            }
        }
        Op::Step { at, len } => {
            step(dev, at, len).await.unwrap();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Ops run in pairs, concurrently (at most one of a pair changes content): the device
    /// always matches the model, and a final stream leaves the same content, unlinked.
    #[test]
    fn interleavings_of_guest_io_copy_on_read_and_stream_steps(ops in proptest::collection::vec(op(), 1..24)) {
        let rt = two_workers();
        let backing = backing_bytes(PSIZE as usize - 8192, 3); // shorter than the image
        let mut model = backing.clone();
        model.resize(PSIZE as usize, 0);
        let dev = device(backing, PSIZE, true);
        rt.block_on(async {
            let mut i = 0;
            while i < ops.len() {
                let a = &ops[i];
                let b = ops.get(i + 1).filter(|b| !(a.mutates() && b.mutates()));
                let before = model.clone();
                a.apply(&mut model);
                if let Some(b) = b {
                    b.apply(&mut model);
                    let after = model.clone();
                    tokio::join!(
                        run_op(&dev, a, &before, &after),
                        run_op(&dev, b, &before, &after)
                    );
                    i += 2;
                } else {
                    let after = model.clone();
                    run_op(&dev, a, &before, &after).await;
                    i += 1;
                }
                let got = dev.read_at(0, vec![0u8; PSIZE as usize]).await.unwrap();
                assert!(got == model, "content differs from the model after op {i}");
            }
            let outcome = StreamJob::start(Arc::clone(&dev), StreamOptions::default()).wait().await.unwrap();
            assert!(outcome.unlinked);
            let got = dev.read_at(0, vec![0u8; PSIZE as usize]).await.unwrap();
            assert!(got == model, "content differs after the stream");
            assert_eq!(dev.image().check(Repair::None).unwrap().exit_code(), 0);
            dev.close().await.unwrap();
        });
    }
}

/// A current-thread runtime whose clock is paused: it moves only when every task waits on a
/// timer, and never while a blocking call (the image's I/O) runs. Copying takes no time on it;
/// only the rate limit's waits do, so what a job did by a given instant is deterministic.
fn paused_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

#[test]
fn rate_pause_resume_and_live_rate_change() {
    const SIZE: u64 = 2 << 20;
    const RATE: u64 = 256 << 10;
    let rt = paused_rt();
    let backing = backing_bytes(SIZE as usize, 11);
    let dev = device(backing.clone(), SIZE, false);
    rt.block_on(async {
        let options = StreamOptions {
            rate: std::num::NonZeroU64::new(RATE),
            ..StreamOptions::default()
        };
        let job = StreamJob::start(Arc::clone(&dev), options);
        let h = job.handle();
        tokio::time::sleep(Duration::from_millis(600)).await;
        // 0.6 s at 256 KiB/s is 153.6 KiB; a request (at most RATE / 4) is charged before it
        // is issued, so the count is within one request of that.
        let p = h.progress();
        let allowed = RATE * 6 / 10;
        assert!(
            p.copied + RATE / 4 >= allowed && p.copied <= allowed + RATE / 4,
            "the limit did not hold: {} bytes in 0.6 s at {RATE} B/s ({p:?})",
            p.copied
        );
        h.pause();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let paused = h.progress();
        assert_eq!(paused.state, engine::stream::JobState::Paused);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(h.progress().copied, paused.copied, "copied while paused");
        // Down to 1 KiB/s while running: within a second the job is waiting for its next
        // request's slot (a request is at most 64 KiB: up to a minute away).
        h.resume();
        h.set_rate(std::num::NonZeroU64::new(1024));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let slow = h.progress();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            h.progress().copied,
            slow.copied,
            "the lower limit did not take effect"
        );
        // Lifted while that wait is under way: it ends at once, and nothing waits any more:
        // the rest (about 1.9 MiB) is copied without the clock moving.
        h.set_rate(None);
        let t = tokio::time::Instant::now();
        let outcome = job.wait().await.unwrap();
        assert_eq!(
            t.elapsed(),
            Duration::ZERO,
            "lifting the limit did not take effect"
        );
        assert_eq!(outcome.progress.state, engine::stream::JobState::Completed);
        assert_eq!(outcome.progress.offset, SIZE);
        assert!(outcome.unlinked);
        let got = dev.read_at(0, vec![0u8; SIZE as usize]).await.unwrap();
        assert!(got == backing);
        dev.close().await.unwrap();
    });
}

#[test]
fn cancel_keeps_the_link_and_a_new_job_resumes() {
    const SIZE: u64 = 2 << 20;
    let rt = paused_rt();
    let backing = backing_bytes(SIZE as usize, 12);
    let dev = device(backing.clone(), SIZE, false);
    rt.block_on(async {
        let options = StreamOptions {
            rate: std::num::NonZeroU64::new(512 << 10),
            ..StreamOptions::default()
        };
        let job = StreamJob::start(Arc::clone(&dev), options);
        // 0.4 s at 512 KiB/s: about a tenth of the disk is local when the cancel comes.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let before = job.handle().progress();
        assert!(before.copied > 0 && before.copied < SIZE / 2, "{before:?}");
        job.handle().cancel();
        let err = job.wait().await.unwrap_err();
        assert!(matches!(err, engine::Error::Cancelled { .. }), "{err}");
        assert!(dev.backing().is_some(), "cancel dropped the link");
        let first = dev.local_map(0, SIZE).await.unwrap();
        assert!(first.iter().any(|e| e.mapping != qed::Mapping::Unallocated));
        let outcome = StreamJob::start(Arc::clone(&dev), StreamOptions::default())
            .wait()
            .await
            .unwrap();
        assert!(
            outcome.progress.local >= before.copied,
            "the second job did not resume: {outcome:?}"
        );
        assert!(outcome.unlinked);
        let got = dev.read_at(0, vec![0u8; SIZE as usize]).await.unwrap();
        assert!(got == backing);
        dev.close().await.unwrap();
    });
}
