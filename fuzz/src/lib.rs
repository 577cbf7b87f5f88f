//! # qedstream-fuzz: fuzz targets for the qedstream crates
//!
//! Each target is a plain function here, so the seed corpus can also run as an ordinary test
//! (`cargo test -p qedstream-fuzz`) on stable, and every crash becomes a named regression test.
//!
//! - [`fuzz_qed_image`]: any byte string, opened as a QED image in memory (read-only and
//!   read-write, backing detached), read, mapped, checked, repaired and written to. Errors are
//!   fine; panics, hangs and unbounded allocations are the bugs. It returns what the checks
//!   found ([`Exercised`]), so a regression test asserts on the verdict, not only on the
//!   absence of a panic.
//!
//! ```
//! let seen = qedstream_fuzz::fuzz_qed_image(b"QED\0 not really an image");
//! assert_eq!(seen.check, None, "refused: not an image");
//! ```
//!
//! Run it with cargo-fuzz: `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run qed_image`.

use qed::{CheckReport, Image, MemStorage, OpenOptions, Repair};

/// The most a fuzzed image's storage may grow past its input: allocations beyond fail with
/// ENOSPC, so a header promising huge tables cannot make the fuzzer allocate gigabytes.
const GROWTH_LIMIT: u64 = 8 << 20;

/// What [`fuzz_qed_image`] saw of an input: the verdicts of its checks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exercised {
    /// `check` without repair on the read-only open; `None` when the input was refused (on
    /// open, or by the check itself).
    pub check: Option<CheckReport>,
    /// `check -r all` on the read-write open (what it found and fixed); `None` when refused.
    pub repair: Option<CheckReport>,
}

/// Opens `data` as a QED image in memory, read-only and then read-write (with the backing
/// detached), and exercises reads, `map`, `mapping_at`, `check` (no repair, then repair all),
/// a few small writes and zero writes, a flush and a close. Never panics on any input; every
/// failure must be a `qed::Error`. Returns the checks' verdicts.
pub fn fuzz_qed_image(data: &[u8]) -> Exercised {
    let mut seen = Exercised::default();
    for read_only in [true, false] {
        let limit = data.len() as u64 + GROWTH_LIMIT;
        let storage = MemStorage::with_limit(data.to_vec(), limit);
        let options = OpenOptions {
            read_only,
            l2_cache_tables: 4,
            ..OpenOptions::default()
        };
        let Ok(image) = Image::open(Box::new(storage), options) else {
            continue;
        };
        let report = exercise(&image, read_only);
        if read_only {
            seen.check = report;
        } else {
            seen.repair = report;
        }
        let _ = image.close();
    }
    seen
}

/// Exercises `image`; the report of its first check (no repair read-only, repair all
/// read-write).
fn exercise(image: &Image, read_only: bool) -> Option<CheckReport> {
    let size = image.size();
    let cluster = image.geometry().cluster_size();
    let mut buf = vec![0u8; 8192];
    // Reads at the start, across the first cluster boundary, and at the end.
    for (offset, len) in [
        (0, 4096),
        (cluster.saturating_sub(100), 200),
        (size.saturating_sub(8192), 8192),
    ] {
        let len = len.min(size.saturating_sub(offset)) as usize;
        let _ = image.read_at(&mut buf[..len], qed::GuestOffset(offset));
    }
    // A read past the end must be refused, not served.
    assert!(
        image
            .read_at(&mut buf[..1], qed::GuestOffset(size))
            .is_err(),
        "read past the disk's end succeeded"
    );
    let _ = image.map(qed::GuestOffset(0), size);
    if size > 0 {
        let _ = image.mapping_at(qed::GuestOffset(size / 2), size);
    }
    let checked = image.check(Repair::None).ok();
    if read_only {
        assert!(
            image.write_at(&[1], qed::GuestOffset(0)).is_err(),
            "write to a read-only image succeeded"
        );
        return checked;
    }
    let repaired = image.check(Repair::All).ok();
    if size > 0 {
        let _ = image.write_at(
            &[0x5a; 700],
            qed::GuestOffset(size.saturating_sub(700).min(cluster - 1)),
        );
        let _ = image.write_zeroes(qed::GuestOffset(0), cluster.min(size));
        let _ = image.write_at(&[0xa5; 3], qed::GuestOffset(size.saturating_sub(3)));
        let _ = image.read_at(&mut buf[..size.min(4096) as usize], qed::GuestOffset(0));
    }
    let _ = image.resize(size.saturating_add(512));
    let _ = image.flush();
    let _ = image.check(Repair::None);
    repaired
}
