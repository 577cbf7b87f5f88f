//! One conformance suite for every file backend × cache mode (pread/pwrite and io_uring, each
//! through the page cache and with O_DIRECT), on a real file of the machine's disk: unaligned
//! reads and writes at sector edges agree with an in-memory model byte for byte, concurrent
//! writers to neighbouring bytes of one sector lose nothing, reads past the end give zeros,
//! `set_len` and extending writes leave the exact length, and `flush` works. O_DIRECT is also
//! checked to be really set on the descriptor.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use qed::storage::direct::{Alignment, DirectFile};
use qed::storage::UringFile;
use qed::{Aio, CacheMode, IoConfig, Storage};

/// Every configuration under test, with its name.
fn configs() -> Vec<(&'static str, IoConfig)> {
    let mut out = Vec::new();
    for (aio_name, aio) in [("threads", Aio::Threads), ("io_uring", Aio::IoUring)] {
        for (cache_name, cache) in [
            ("writeback", CacheMode::Writeback),
            ("none", CacheMode::None),
        ] {
            let name = Box::leak(format!("{aio_name}/{cache_name}").into_boxed_str());
            out.push((&*name, IoConfig { cache, aio }));
        }
    }
    out
}

/// A fresh file on the test's own disk (not tmpfs: there O_DIRECT alignment is not enforced).
fn scratch(dir: &tempfile::TempDir, name: &str) -> File {
    File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.path().join(name.replace('/', "-")))
        .expect("creating a scratch file")
}

fn scratch_dir() -> tempfile::TempDir {
    let base = std::env::var_os("CARGO_TARGET_TMPDIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    tempfile::tempdir_in(base).expect("a scratch folder")
}

fn open(config: IoConfig, dir: &tempfile::TempDir, name: &str) -> Box<dyn Storage> {
    config
        .storage(scratch(dir, name))
        .expect("opening the storage")
}

/// A small deterministic generator (no dependency, same sequence every run).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Reads `len` bytes at `offset` into a buffer that starts one byte past an allocation's
/// start, so its address is never page-aligned.
fn read_misaligned(s: &dyn Storage, offset: u64, len: usize) -> Vec<u8> {
    let mut backing = vec![0xAAu8; len + 1];
    s.read_at(&mut backing[1..], offset).expect("reading");
    backing.remove(0);
    backing
}

fn model_read(model: &[u8], offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| model.get((offset + i) as usize).copied().unwrap_or(0))
        .collect()
}

#[test]
fn unaligned_writes_and_reads_match_a_model() {
    let dir = scratch_dir();
    for (name, config) in configs() {
        let s = open(config, &dir, name);
        let mut model: Vec<u8> = Vec::new();
        let mut rng = Lcg(7);
        for round in 0..400u64 {
            // Offsets near 4 KiB and 512-byte edges, lengths from 1 byte to 3 sectors.
            let edge = rng.below(48) * 512;
            let offset = (edge + rng.below(1100)).saturating_sub(550);
            let len = 1 + rng.below(3 * 4096 + 7) as usize;
            let data: Vec<u8> = (0..len).map(|i| (round as usize * 31 + i) as u8).collect();
            // Half the writes from a misaligned address.
            let mut holder = vec![0u8; len + 1];
            holder[1..].copy_from_slice(&data);
            let src = if round % 2 == 0 {
                &data[..]
            } else {
                &holder[1..]
            };
            s.write_at(src, offset).expect("writing");
            let end = offset as usize + len;
            if model.len() < end {
                model.resize(end, 0);
            }
            model[offset as usize..end].copy_from_slice(&data);
            let (roff, rlen) = (rng.below(model.len() as u64 + 9000), 1 + rng.below(9000));
            assert_eq!(
                read_misaligned(&*s, roff, rlen as usize),
                model_read(&model, roff, rlen as usize),
                "{name}: read of {rlen} at {roff} after round {round}"
            );
        }
        assert_eq!(
            s.len().unwrap(),
            model.len() as u64,
            "{name}: file length after unaligned extending writes"
        );
        let mut whole = vec![0u8; model.len()];
        s.read_at(&mut whole, 0).unwrap();
        assert!(
            whole == model,
            "{name}: the whole file differs from the model"
        );
        s.flush().expect("flushing");
        drop(s);
        let on_disk = std::fs::read(dir.path().join(name.replace('/', "-"))).unwrap();
        assert!(
            on_disk == model,
            "{name}: the file read back by name differs"
        );
    }
}

#[test]
fn concurrent_writers_to_neighbouring_bytes_lose_nothing() {
    let dir = scratch_dir();
    const THREADS: usize = 8;
    const SPAN: usize = 8192; // two 4 KiB sectors (16 of 512 bytes)
    for (name, config) in configs() {
        let s: Arc<dyn Storage> = Arc::from(open(config, &dir, name));
        s.set_len(SPAN as u64).unwrap();
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let s = Arc::clone(&s);
                scope.spawn(move || {
                    // Thread t owns every byte whose index is t modulo THREADS and writes
                    // them one at a time: every sector is shared by all the threads.
                    for pass in 0..3u8 {
                        for i in (t..SPAN).step_by(THREADS) {
                            let value = [(t as u8 + 1) * 16 + pass];
                            s.write_at(&value, i as u64).expect("writing one byte");
                        }
                    }
                });
            }
        });
        let mut got = vec![0u8; SPAN];
        s.read_at(&mut got, 0).unwrap();
        let lost: Vec<usize> = (0..SPAN)
            .filter(|&i| got[i] != ((i % THREADS) as u8 + 1) * 16 + 2)
            .collect();
        assert!(
            lost.is_empty(),
            "{name}: {} of {SPAN} bytes lost their last write (first at {:?})",
            lost.len(),
            lost.first()
        );
    }
}

#[test]
fn reads_past_the_end_give_zeros() {
    let dir = scratch_dir();
    for (name, config) in configs() {
        let s = open(config, &dir, name);
        s.write_at(&[0x5A; 5000], 0).unwrap();
        let mut expect = vec![0x5Au8; 5000];
        expect.resize(12288, 0);
        assert_eq!(read_misaligned(&*s, 0, 12288), expect, "{name}: across EOF");
        let mut aligned = vec![0xFFu8; 8192];
        s.read_at(&mut aligned, 4096).unwrap();
        assert_eq!(aligned[..904], [0x5A; 904], "{name}: the tail sector");
        assert!(aligned[904..].iter().all(|&b| b == 0), "{name}: past EOF");
        assert!(
            read_misaligned(&*s, 1 << 30, 777).iter().all(|&b| b == 0),
            "{name}: far past EOF"
        );
        assert_eq!(s.len().unwrap(), 5000, "{name}: reads do not grow the file");
    }
}

#[test]
fn set_len_truncates_and_extends() {
    let dir = scratch_dir();
    for (name, config) in configs() {
        let s = open(config, &dir, name);
        s.write_at(&[1; 10000], 0).unwrap();
        s.set_len(4097).unwrap();
        assert_eq!(s.len().unwrap(), 4097, "{name}");
        let got = read_misaligned(&*s, 4000, 200);
        assert_eq!(got[..97], [1; 97], "{name}: kept bytes");
        assert!(got[97..].iter().all(|&b| b == 0), "{name}: cut bytes");
        s.set_len(20000).unwrap();
        assert_eq!(s.len().unwrap(), 20000, "{name}");
        assert!(
            read_misaligned(&*s, 4097, 15903).iter().all(|&b| b == 0),
            "{name}: extension reads as zeros"
        );
        // An unaligned write past the end leaves the file exactly as long as it reached.
        s.write_at(&[2; 10], 30001).unwrap();
        assert_eq!(s.len().unwrap(), 30011, "{name}: extending unaligned write");
        s.flush().expect("flushing");
    }
}

#[test]
fn cache_none_sets_o_direct_and_writeback_does_not() {
    let dir = scratch_dir();
    for (name, config) in configs() {
        let file = scratch(&dir, name);
        let fd = file.as_raw_fd();
        let s = config.storage(file).unwrap();
        // SAFETY: F_GETFL reads the flags of a descriptor `s` keeps open; no memory involved.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        assert_eq!(
            flags & libc::O_DIRECT != 0,
            config.cache == CacheMode::None,
            "{name}: O_DIRECT flag"
        );
        drop(s);
    }
}

#[test]
fn auto_picks_io_uring_where_it_works() {
    let dir = scratch_dir();
    UringFile::new(scratch(&dir, "ring")).expect("io_uring on this machine");
    let auto = IoConfig {
        aio: qed::Aio::Auto,
        ..IoConfig::default()
    };
    assert_eq!(
        auto.backend().unwrap(),
        qed::Backend::IoUring,
        "auto picks io_uring where it works"
    );
    assert_eq!(
        IoConfig::default().backend().unwrap(),
        qed::Backend::Threads,
        "the default is threads, the faster in the runners"
    );
}

#[test]
fn a_coarser_alignment_than_the_file_systems_still_conforms() {
    // 64 KiB sectors: every small write is a read-modify-write, many share a sector.
    let dir = scratch_dir();
    let file = scratch(&dir, "coarse");
    qed::storage::direct::set_direct(&file).unwrap();
    let align = Alignment {
        offset: 65536,
        memory: 4096,
    };
    let s: Arc<dyn Storage> = Arc::new(DirectFile::with_alignment(
        UringFile::new(file).unwrap(),
        align,
    ));
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let s = Arc::clone(&s);
            scope.spawn(move || {
                for i in 0..200u64 {
                    s.write_at(&[t as u8 + 1; 100], (i * 4 + t) * 100).unwrap();
                }
            });
        }
    });
    let mut got = vec![0u8; 80000];
    s.read_at(&mut got, 0).unwrap();
    for (i, chunk) in got.chunks(100).enumerate() {
        assert!(
            chunk.iter().all(|&b| b == (i % 4) as u8 + 1),
            "run {i} lost its write"
        );
    }
    assert_eq!(s.len().unwrap(), 80000);
}
