//! A real file system that fills up: a small tmpfs mounted for one test (`mount -t tmpfs -o
//! size=N`, which needs root, as CI has), a filler file that takes all or most of its free
//! space, and an unmount when the guard drops (also when the test fails). A mount that fails
//! fails the test with the reason: a full-disk test never passes without a full disk.
//!
//! ```no_run
//! let disk = qedstream_tests::tmpfs::Tmpfs::mount(16 << 20);
//! let filler = disk.fill_leaving(0);
//! assert_eq!(disk.free(), 0);
//! std::fs::remove_file(filler).unwrap();
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

/// A tmpfs mounted on a fresh temporary folder; unmounted (lazily if still busy) on drop.
#[derive(Debug)]
pub struct Tmpfs {
    mount_point: TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `bytes` (a multiple of the page size). Panics, saying why, when it
    /// cannot (not root, no tmpfs, `mount` missing).
    pub fn mount(bytes: u64) -> Tmpfs {
        let mount_point = tempfile::Builder::new()
            .prefix("qedstream-tmpfs-")
            .tempdir()
            .expect("a folder to mount a tmpfs on");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes},mode=0700")])
            .arg("tmpfs")
            .arg(mount_point.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount (a full-disk test needs it): {e}"));
        assert!(
            out.status.success(),
            "mount -t tmpfs -o size={bytes} failed ({}): {}; a full-disk test needs a real \
             small file system, which takes root (CI runs as root)",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Tmpfs { mount_point }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.mount_point.path()
    }

    /// Bytes an unprivileged write could still take (`f_bavail` blocks).
    pub fn free(&self) -> u64 {
        let path = std::ffi::CString::new(self.path().as_os_str().as_encoded_bytes())
            .expect("a path without NUL");
        // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is a NUL-terminated string and `st` a valid, writable statvfs, both
        // alive for the call.
        let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
        assert_eq!(rc, 0, "statvfs: {}", std::io::Error::last_os_error());
        st.f_bavail as u64 * st.f_frsize as u64
    }

    /// Writes a filler file (`filler`, or `filler-N` when taken) that leaves about `leave`
    /// bytes free (0: until the file system refuses another byte); returns its path.
    pub fn fill_leaving(&self, leave: u64) -> PathBuf {
        let mut path = self.path().join("filler");
        let mut n = 0;
        while path.exists() {
            n += 1;
            path = self.path().join(format!("filler-{n}"));
        }
        let mut file = std::fs::File::create_new(&path).expect("creating the filler");
        let chunk = vec![0xa5u8; 64 << 10];
        loop {
            let free = self.free();
            if free <= leave {
                break;
            }
            let n = (free - leave).min(chunk.len() as u64) as usize;
            match file.write(&chunk[..n]) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("writing the filler: {e}"),
            }
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(self.path())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy (a child not reaped yet): detach it now, freed when the last user goes.
            let _ = Command::new("umount")
                .arg("--lazy")
                .arg(self.path())
                .status();
        }
    }
}
