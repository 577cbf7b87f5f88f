//! The device API from a plain synchronous caller, the way a simple VMM drives a disk: one OS
//! thread per virtqueue, each in a loop of "take a request, do it, complete it", with the
//! request's memory handed to the device and handed back. The caller owns a small runtime
//! for the device's I/O and enters it with `Handle::block_on`; no async code of its own.
//!
//! Four queue threads write and read their own regions (and share one) while copy-on-read
//! fills the image from its backing; at the end the image is what QEMU reads from the same
//! writes applied to the same overlay, and `qemu-img check` is clean.

use std::sync::Arc;

use copy_on_read::{BlockDevice, CorDevice, CorOptions, IoBufs, WriteFlags};
use qedstream_tests::tools::{flatten, ok, qemu_check, qemu_io};

/// A request as a virtqueue would carry it: guest memory segments and what to do.
enum Request {
    Read {
        offset: u64,
        segments: Vec<usize>,
    },
    Write {
        offset: u64,
        fill: u8,
        segments: Vec<usize>,
        fua: bool,
    },
    Flush,
}

fn queue_requests(queue: u64) -> Vec<Request> {
    let base = queue << 20;
    vec![
        Request::Read {
            offset: base + 4096,
            segments: vec![4096, 512, 8192],
        },
        Request::Write {
            offset: base + 100_000,
            fill: 0x10 + queue as u8,
            segments: vec![3000, 40_000],
            fua: queue % 2 == 0,
        },
        Request::Read {
            offset: base + 99_000,
            segments: vec![50_000],
        },
        Request::Flush,
        Request::Write {
            offset: (4 << 20) + queue * 65_536,
            fill: 0x20 + queue as u8,
            segments: vec![65_536],
            fua: false,
        },
    ]
}

#[test]
fn a_thread_per_queue_drives_the_device_synchronously() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-f", "raw", "base.raw", "8M"]);
    qemu_io(dir, "raw", "base.raw", &["write -P 0x5a 0 8M"]);
    ok(
        dir,
        "qemu-img",
        &[
            "create", "-f", "qed", "-b", "base.raw", "-F", "raw", "top.qed",
        ],
    );
    std::fs::copy(dir.join("top.qed"), dir.join("oracle.qed")).unwrap();

    // The embedder's runtime for the device's I/O; its own threads stay synchronous.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dev = Arc::new(
        runtime
            .block_on(CorDevice::open(&dir.join("top.qed"), CorOptions::default()))
            .unwrap(),
    );
    let queues: Vec<_> = (0..4u64)
        .map(|q| {
            let dev = Arc::clone(&dev);
            let io = runtime.handle().clone();
            std::thread::spawn(move || {
                let mut completed = 0;
                for req in queue_requests(q) {
                    match req {
                        Request::Read { offset, segments } => {
                            let mut bufs = IoBufs::new();
                            for n in &segments {
                                bufs.push(vec![0u8; *n].into_boxed_slice());
                            }
                            let bufs = io.block_on(dev.readv(offset, bufs)).unwrap();
                            assert_eq!(bufs.len(), segments.iter().sum::<usize>());
                        }
                        Request::Write {
                            offset,
                            fill,
                            segments,
                            fua,
                        } => {
                            let mut bufs = IoBufs::new();
                            for n in &segments {
                                bufs.push(vec![fill; *n].into_boxed_slice());
                            }
                            let flags = if fua {
                                WriteFlags::FUA
                            } else {
                                WriteFlags::default()
                            };
                            io.block_on(dev.writev(offset, bufs, flags)).unwrap();
                        }
                        Request::Flush => io.block_on(dev.flush()).unwrap(),
                    }
                    completed += 1;
                }
                completed
            })
        })
        .collect();
    let done: usize = queues.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(done, 20);
    runtime.block_on(dev.close()).unwrap();
    // The last reference goes: the file and its image locks with it.
    drop(dev);

    // The same writes through QEMU onto the untouched copy of the overlay.
    let mut cmds = Vec::new();
    for q in 0..4u64 {
        for req in queue_requests(q) {
            if let Request::Write {
                offset,
                fill,
                segments,
                ..
            } = req
            {
                let len: usize = segments.iter().sum();
                cmds.push(format!("write -P {fill} {offset} {len}"));
            }
        }
    }
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(dir, "qed", "oracle.qed", &cmds);
    assert!(flatten(dir, "top.qed", "qed") == flatten(dir, "oracle.qed", "qed"));
    assert_eq!(qemu_check(dir, "top.qed"), 0);
}
