//! Opening image files the way QEMU's `file-posix` driver does: only regular files and block
//! devices, never blocking on a FIFO, and with QEMU's image locks.
//!
//! # Image locks
//!
//! QEMU coordinates every process that opens an image (QEMU itself, `qemu-img`, `qemu-io`,
//! `qemu-nbd`, `qemu-storage-daemon`) with open-file-description byte-range locks
//! (`F_OFD_SETLK`), all of them shared (read) locks on single bytes:
//!
//! - byte `100 + i` is held by an opener that *uses* permission `i`;
//! - byte `200 + i` is held by an opener that *refuses to share* permission `i`.
//!
//! The permissions are QEMU's `BLK_PERM_*` bits: consistent read (0), write (1), write
//! unchanged (2) and resize (3). An opener first takes its locks, then tests
//! (`F_OFD_GETLK`) that nobody else refuses to share a permission it uses (byte `200 + i`)
//! and that nobody else uses a permission it refuses to share (byte `100 + i`). Locks held by
//! the same open file description never conflict with themselves; two opens of one file in the
//! same process do conflict, as they do in QEMU. The locks vanish when the file is closed.
//!
//! [`Access`] names the four ways we open an image, with the bytes QEMU takes for each
//! (checked against `/proc/locks` with QEMU 10):
//!
//! | access | uses | refuses to share | bytes locked |
//! |---|---|---|---|
//! | [`Access::ReadWrite`] | read, write, resize | write, resize | 100, 101, 103, 201, 203 |
//! | [`Access::ReadOnly`] (also backing files) | read | write, resize | 100, 201, 203 |
//! | [`Access::SharedRead`] (`-U`) | read | nothing | 100 |
//! | [`Access::Create`] | write, resize | resize | 101, 103, 203 |
//!
//! So a writer keeps out every other writer, resizer and (non-`-U`) reader; readers keep out
//! writers and resizers but not each other; `-U` inspects an image in use.
//!
//! # Identity
//!
//! [`FileId`] (device and inode) tells whether two names are one file, through symlinks, hard
//! links and `..`; commands use it to refuse an output that is one of their inputs.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, Result};
pub use crate::error::{LockConflict, Perm};

/// A set of QEMU's block permissions (`BLK_PERM_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Perms(u8);

impl Perms {
    /// No permission.
    pub const NONE: Perms = Perms(0);
    /// `BLK_PERM_CONSISTENT_READ`: the data read is what was last written.
    pub const CONSISTENT_READ: Perms = Perms(1 << 0);
    /// `BLK_PERM_WRITE`: the visible data may change.
    pub const WRITE: Perms = Perms(1 << 1);
    /// `BLK_PERM_WRITE_UNCHANGED`: writes that leave the visible data as it was.
    pub const WRITE_UNCHANGED: Perms = Perms(1 << 2);
    /// `BLK_PERM_RESIZE`: the size may change.
    pub const RESIZE: Perms = Perms(1 << 3);
    /// Every permission.
    pub const ALL: Perms = Perms(0b1111);

    /// The permissions of both sets.
    pub const fn union(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }

    /// True when every permission of `other` is in `self`.
    pub const fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }

    /// The permissions not in `self`.
    pub const fn complement(self) -> Perms {
        Perms(!self.0 & Perms::ALL.0)
    }

    /// Each single permission in the set, lowest bit first, with its bit index.
    fn each(self) -> impl Iterator<Item = (u32, Perm)> {
        (0..4u32)
            .filter(move |i| self.0 & (1 << i) != 0)
            .map(|i| (i, Perm::from_bit(i)))
    }
}

/// The first byte of the "uses permission i" locks.
pub const LOCK_PERM_BASE: i64 = 100;
/// The first byte of the "refuses to share permission i" locks.
pub const LOCK_SHARED_BASE: i64 = 200;

/// How a file is opened, and so which image locks it takes (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// Read and write, alone: QEMU's read-write open.
    ReadWrite,
    /// Read, keeping writers and resizers out: QEMU's read-only open, and every backing file.
    ReadOnly,
    /// Read an image that may be in use (`-U`, QEMU's `force-share`): locks only "read".
    SharedRead,
    /// Create (truncate and size) a file: QEMU's `raw_co_create` permissions.
    Create,
}

impl Access {
    /// The permissions used and the permissions shared.
    pub fn perms(self) -> (Perms, Perms) {
        let read_shared = Perms::CONSISTENT_READ.union(Perms::WRITE_UNCHANGED);
        match self {
            Access::ReadWrite => (
                Perms::CONSISTENT_READ
                    .union(Perms::WRITE)
                    .union(Perms::RESIZE),
                read_shared,
            ),
            Access::ReadOnly => (Perms::CONSISTENT_READ, read_shared),
            Access::SharedRead => (Perms::CONSISTENT_READ, Perms::ALL),
            Access::Create => (
                Perms::WRITE.union(Perms::RESIZE),
                Perms::RESIZE.complement(),
            ),
        }
    }

    /// True when the file is opened for writing.
    pub fn writes(self) -> bool {
        matches!(self, Access::ReadWrite | Access::Create)
    }
}

fn flock(kind: libc::c_int, byte: i64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers (and, on some targets, padding); the
    // all-zero bit pattern is a valid value for every field.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl
}

/// Takes a shared OFD lock on one byte (`F_OFD_SETLK`, `F_RDLCK`).
fn lock_byte(file: &File, byte: i64) -> io::Result<()> {
    let fl = flock(libc::F_RDLCK, byte);
    // SAFETY: fcntl with F_OFD_SETLK reads the `flock` we pass by pointer, which lives for the
    // whole call; the descriptor is owned by `file` and stays open during the call.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// True when some other open file description holds a lock on `byte` (`F_OFD_GETLK` with
/// `F_WRLCK`, which any lock conflicts with).
fn byte_is_locked(file: &File, byte: i64) -> io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK, byte);
    // SAFETY: fcntl with F_OFD_GETLK reads and overwrites the `flock` we pass by pointer,
    // which is a valid, exclusively borrowed value for the whole call; the descriptor is owned
    // by `file`.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Takes QEMU's image locks for `access` on `file`, then checks that nobody holds a lock that
/// conflicts (QEMU's `raw_apply_lock_bytes` then `raw_check_lock_bytes`). On a conflict the
/// locks taken stay until the file is closed, as in QEMU; callers drop the file.
pub fn lock(file: &File, access: Access) -> Result<()> {
    let (used, shared) = access.perms();
    let bytes = used
        .each()
        .map(|(i, _)| LOCK_PERM_BASE + i64::from(i))
        .chain(
            shared
                .complement()
                .each()
                .map(|(i, _)| LOCK_SHARED_BASE + i64::from(i)),
        );
    for byte in bytes {
        lock_byte(file, byte).map_err(Error::io("taking image lock", byte as u64))?;
    }
    // A conflict can be transient: a process that forks keeps every open file description
    // of its parent, locks included, until the child execs and closes them (close-on-exec). A
    // thread of ours (or of the process holding the image) that starts a helper program while
    // an image is being closed makes the image look held for that moment. So a conflict is
    // tested again for a short while before it is reported; a real holder is refused within
    // about 50 ms.
    let mut conflict = find_conflict(file, used, shared)?;
    for _ in 0..5 {
        if conflict.is_none() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        conflict = find_conflict(file, used, shared)?;
    }
    match conflict {
        Some(c) => Err(Error::Locked(c)),
        None => Ok(()),
    }
}

/// QEMU's `raw_check_lock_bytes`: the first permission we use that somebody refuses to share,
/// or that somebody uses while we refuse to share it.
fn find_conflict(file: &File, used: Perms, shared: Perms) -> Result<Option<LockConflict>> {
    for (i, perm) in used.each() {
        if byte_is_locked(file, LOCK_SHARED_BASE + i64::from(i))
            .map_err(Error::io("testing image lock", 0))?
        {
            return Ok(Some(LockConflict {
                perm,
                shared: false,
            }));
        }
    }
    for (i, perm) in shared.complement().each() {
        if byte_is_locked(file, LOCK_PERM_BASE + i64::from(i))
            .map_err(Error::io("testing image lock", 0))?
        {
            return Ok(Some(LockConflict { perm, shared: true }));
        }
    }
    Ok(None)
}

/// What kind of file a path names, for a refusal.
fn file_kind(ft: std::fs::FileType) -> &'static str {
    if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// Opens an existing image file for `access` (never [`Access::Create`]: see [`create`]):
/// refuses anything but a regular file or a block device without blocking on it (a FIFO is
/// opened non-blocking, then refused), and takes the image locks.
pub fn open(path: &Path, access: Access) -> Result<File> {
    let file = open_unlocked(path, access)?;
    lock(&file, access)?;
    Ok(file)
}

/// As [`open`], without taking the image locks yet: for a caller that must look at the file
/// (its identity) before it [`lock`]s it.
pub fn open_unlocked(path: &Path, access: Access) -> Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(access.writes())
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(Error::io("opening image file", 0))?;
    usable(&file)?;
    Ok(file)
}

/// Opens `path` for creating an image: makes the file when it does not exist, takes the
/// [`Access::Create`] locks, and only then truncates it, so a file another process holds is
/// refused untouched. `keep_out` lists files that must not be the output (the inputs of a
/// command and their backing chains): naming one of them is refused before anything changes.
pub fn create(path: &Path, keep_out: &[FileId]) -> Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(Error::io("creating image file", 0))?;
    usable(&file)?;
    let id = FileId::of(&file).map_err(Error::io("creating image file", 0))?;
    if keep_out.contains(&id) {
        return Err(Error::OutputIsInput);
    }
    lock(&file, Access::Create)?;
    Ok(file)
}

/// Refuses a file that is not a regular file or a block device, and clears `O_NONBLOCK`.
fn usable(file: &File) -> Result<()> {
    let meta = file
        .metadata()
        .map_err(Error::io("opening image file", 0))?;
    let ft = meta.file_type();
    if !(ft.is_file() || ft.is_block_device()) {
        return Err(Error::NotAnImageFile(file_kind(ft)));
    }
    // SAFETY: F_GETFL/F_SETFL only read and set the status flags of a descriptor `file` owns;
    // no memory is passed.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags != -1 {
        // SAFETY: as above.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) };
    }
    Ok(())
}

/// The identity of a file: its device and inode numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    /// `st_dev`
    pub dev: u64,
    /// `st_ino`
    pub ino: u64,
}

impl FileId {
    /// The identity of an open file.
    pub fn of(file: &File) -> io::Result<FileId> {
        let m = file.metadata()?;
        Ok(FileId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// The identity of the file `path` names (following symlinks), or `None` when there is
    /// no such file.
    pub fn of_path(path: &Path) -> io::Result<Option<FileId>> {
        match std::fs::metadata(path) {
            Ok(m) => Ok(Some(FileId {
                dev: m.dev(),
                ino: m.ino(),
            })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(path: &Path) -> Vec<i64> {
        // The bytes some open file of this process holds, read back through F_OFD_GETLK from
        // a fresh descriptor (which sees every other description's locks).
        let probe = File::open(path).unwrap();
        (100..104)
            .chain(200..204)
            .filter(|&b| byte_is_locked(&probe, b).unwrap())
            .collect()
    }

    #[test]
    fn each_access_locks_qemus_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, b"x").unwrap();
        for (access, bytes) in [
            (Access::ReadWrite, vec![100, 101, 103, 201, 203]),
            (Access::ReadOnly, vec![100, 201, 203]),
            (Access::SharedRead, vec![100]),
        ] {
            let f = open(&path, access).unwrap();
            assert_eq!(held(&path), bytes, "{access:?}");
            drop(f);
            assert!(held(&path).is_empty());
        }
        let f = create(&path, &[]).unwrap();
        assert_eq!(held(&path), vec![101, 103, 203]);
        drop(f);
    }

    #[test]
    fn conflicts_follow_qemus_rules() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, b"x").unwrap();
        let ok = |a: Access, b: Access| {
            let first = open(&path, a).unwrap();
            let second = open(&path, b);
            drop(first);
            second.is_ok()
        };
        use Access::*;
        assert!(!ok(ReadWrite, ReadWrite));
        assert!(!ok(ReadWrite, ReadOnly));
        assert!(ok(ReadWrite, SharedRead));
        assert!(!ok(ReadOnly, ReadWrite));
        assert!(ok(ReadOnly, ReadOnly));
        assert!(ok(ReadOnly, SharedRead));
        assert!(ok(SharedRead, ReadWrite));
        let reader = open(&path, ReadOnly).unwrap();
        assert!(matches!(
            create(&path, &[]),
            Err(Error::Locked(LockConflict {
                perm: Perm::Write,
                shared: false
            }))
        ));
        drop(reader);
        let writer = open(&path, ReadWrite).unwrap();
        assert!(matches!(
            open(&path, ReadOnly),
            Err(Error::Locked(LockConflict {
                perm: Perm::Write,
                shared: true
            }))
        ));
        drop(writer);
    }

    #[test]
    fn fifos_and_directories_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path for the duration of the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            open(&fifo, Access::ReadOnly),
            Err(Error::NotAnImageFile("a FIFO"))
        ));
        assert!(matches!(
            open(dir.path(), Access::ReadOnly),
            Err(Error::NotAnImageFile(_)) | Err(Error::Io { .. })
        ));
    }

    #[test]
    fn create_refuses_an_input_through_a_symlink_before_truncating() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in");
        std::fs::write(&path, b"precious").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let id = FileId::of_path(&path).unwrap().unwrap();
        assert!(matches!(create(&link, &[id]), Err(Error::OutputIsInput)));
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }
}
