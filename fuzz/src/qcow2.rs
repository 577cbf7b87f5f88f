//! The `qcow2_image` target: any byte string, opened as a qcow2 image the way the gate opens
//! a backing (our header checks, then `imago` on a file descriptor), mapped and read at the
//! start, across the first cluster, in the middle and at the end, and its block status taken
//! from the start. The input lives in a memory file (`memfd`); when the header asks for an
//! external data file, the same bytes serve as one. Errors are fine; panics, hangs and
//! unbounded allocations are the bugs.

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::path::Path;

use copy_on_read::qcow2::{read_header, Qcow2, Qcow2Error};

/// Block-status answers taken per input (each covers at most a bounded number of table
/// lookups): enough to cross many L2 tables, bounded so a huge disk is not walked to its end.
const STATUS_CALLS: usize = 4;

/// What [`fuzz_qcow2_image`] saw of an input.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Qcow2Seen {
    /// The image opened (header accepted, tables loaded).
    pub opened: bool,
    /// Why it was refused, when it was.
    pub refused: Option<String>,
    /// Bytes read without an error.
    pub read: u64,
    /// Bytes of block status answered.
    pub statused: u64,
}

/// A memory file holding `data`, or `None` when the kernel refuses one.
fn memory_file(data: &[u8]) -> Option<File> {
    // SAFETY: memfd_create takes a NUL-terminated name (a literal here) and flags; it returns
    // a new descriptor owned by nobody else, or -1.
    let fd = unsafe { libc::memfd_create(c"qcow2-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a fresh descriptor we own; the File takes that ownership.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(data).ok()?;
    Some(file)
}

/// Opens `data` as a qcow2 image and exercises it (see the module documentation).
pub fn fuzz_qcow2_image(data: &[u8]) -> Qcow2Seen {
    let mut seen = Qcow2Seen::default();
    let Some(file) = memory_file(data) else {
        return seen;
    };
    match open(file, data) {
        Ok(image) => {
            seen.opened = true;
            exercise(&image, &mut seen);
        }
        Err(e) => seen.refused = Some(e.to_string()),
    }
    seen
}

fn open(file: File, data: &[u8]) -> Result<Qcow2, Qcow2Error> {
    let header = read_header(&file)?;
    header.check_readable()?;
    let data_file = if header.has_data_file() {
        memory_file(data).map(|f| (f, Path::new("data").to_path_buf()))
    } else {
        None
    };
    Qcow2::open(file, Path::new("fuzz.qcow2"), header, data_file)
}

fn exercise(image: &Qcow2, seen: &mut Qcow2Seen) {
    let size = image.size();
    let cluster = image.header().cluster_size();
    let mut buf = vec![0u8; 8192];
    for (offset, len) in [
        (0, 8192),
        (cluster.saturating_sub(100), 200),
        (size / 2, 4096),
        (size.saturating_sub(8192), 8192),
    ] {
        let len = len.min(size.saturating_sub(offset)) as usize;
        if len == 0 {
            continue;
        }
        let _ = image.mapping_at(offset, len as u64);
        if let Ok(missing) = image.read_local(&mut buf[..len], offset) {
            seen.read += len as u64;
            for (at, n) in missing {
                assert!(
                    at >= offset && at + n <= offset + len as u64,
                    "unallocated range outside the read"
                );
            }
        }
    }
    let mut pos = 0;
    for _ in 0..STATUS_CALLS {
        if pos >= size {
            break;
        }
        let Ok(runs) = image.status_local(pos, size - pos) else {
            break;
        };
        let Some(&(start, _, _)) = runs.first() else {
            panic!("block status answered nothing at {pos:#x}");
        };
        assert_eq!(start, pos, "block status does not start where asked");
        for (at, n, _) in &runs {
            assert!(*n > 0 && at + n <= size, "bad run {at:#x}+{n:#x}");
        }
        let end = runs.last().map(|(at, n, _)| at + n).unwrap_or(pos);
        seen.statused += end - pos;
        pos = end;
    }
}
