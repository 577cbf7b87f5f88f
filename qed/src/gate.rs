//! The rules every backing file is admitted by, in one place.
//!
//! A QED header names its backing by a string. Probing an untrusted image's backing is
//! dangerous: a guest that wrote a QED header into its raw disk could make the host open any
//! file that header names. So every backing *file* is admitted by [`Rules::admit_file`]. `qed`
//! itself never opens a backing; the one opener is the `copy-on-read` crate's gate, which
//! every path that opens a chain goes through (the copy-on-read device, the chain walk of
//! `qedstream info` and `map`, `convert`'s sources, the synchronous device tests and tools
//! use). The steps:
//!
//! 1. the depth bound is checked;
//! 2. the name is resolved against the naming image's folder and opened **once** (non-blocking,
//!    regular files and block devices only, with QEMU's image locks: [`crate::file`]);
//! 3. confinement is checked on the path of the **opened descriptor** (`/proc/self/fd`), so a
//!    file swapped for a symlink between any check and the open gains nothing: what is checked
//!    is what was opened;
//! 4. a file already in the chain (same device and inode, whatever its name) is a loop; only
//!    then are the image locks taken;
//! 5. the format is probed from that same descriptor, when the header records none and
//!    probing is allowed.
//!
//! The caller then uses the returned descriptor; nothing is opened by name again.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::backing::BackingFormat;
pub use crate::error::Refusal;
use crate::error::{Error, Result};
use crate::file::{Access, FileId};
use crate::names::{normalise, probe_storage, resolve_backing_path};

/// What a gate admits.
#[derive(Clone, Debug)]
pub struct Rules {
    /// Probe the format when the header records none (QED or raw). Default true, as QEMU.
    pub allow_probe: bool,
    /// If set, every backing file must lie inside this directory (checked on the opened file).
    pub confine_to: Option<PathBuf>,
    /// The deepest layer accepted (the top image is depth 0).
    pub max_depth: u32,
    /// Open backing files with [`Access::SharedRead`] (`-U`) instead of [`Access::ReadOnly`],
    /// which keeps writers and resizers out of them.
    pub force_share: bool,
}

impl Default for Rules {
    fn default() -> Rules {
        Rules {
            allow_probe: true,
            confine_to: None,
            max_depth: crate::names::DEFAULT_MAX_DEPTH,
            force_share: false,
        }
    }
}

/// A backing file the gate opened and admitted: use `file`, never `path`, from here on.
#[derive(Debug)]
pub struct Admitted {
    /// The open, locked descriptor.
    pub file: File,
    /// The path the name resolved to (for messages and for resolving names below it).
    pub path: PathBuf,
    /// Its identity, for loop detection below it.
    pub id: FileId,
    /// `"raw"` (recorded, or probed as raw) or the probed format (`"qed"`, `"qcow2"`, ...).
    pub format: &'static str,
}

impl Rules {
    /// How files below the top are opened.
    pub fn access(&self) -> Access {
        if self.force_share {
            Access::SharedRead
        } else {
            Access::ReadOnly
        }
    }

    /// Refuses a layer deeper than the bound.
    pub fn check_depth(&self, depth: u32) -> std::result::Result<(), Refusal> {
        if depth > self.max_depth {
            Err(Refusal::TooDeep(self.max_depth))
        } else {
            Ok(())
        }
    }

    /// Admits the backing file `name`, as stored in the header of the image at `image_path`,
    /// `depth` layers below the top, with the `recorded` format; `seen` holds the files of the
    /// layers above. See the module documentation for the steps.
    pub fn admit_file(
        &self,
        name: &str,
        image_path: Option<&Path>,
        depth: u32,
        seen: &[FileId],
        recorded: BackingFormat,
    ) -> Result<Admitted> {
        self.check_depth(depth).map_err(Error::Refused)?;
        if crate::names::is_protocol_name(name) {
            return Err(Error::Refused(Refusal::Protocol(name.to_string())));
        }
        let path = resolve_backing_path(name, image_path);
        let file = crate::file::open_unlocked(&path, self.access())?;
        if let Some(root) = &self.confine_to {
            let real = opened_path(&file, &path);
            if !real.starts_with(canonical(root)) {
                return Err(Error::Refused(Refusal::OutsideConfinement(path)));
            }
        }
        let id = FileId::of(&file).map_err(Error::io("identifying backing file", 0))?;
        if seen.contains(&id) {
            return Err(Error::Refused(Refusal::Loop(path)));
        }
        crate::file::lock(&file, self.access())?;
        let format = match recorded {
            BackingFormat::Raw => "raw",
            BackingFormat::Probe if !self.allow_probe => {
                return Err(Error::Refused(Refusal::ProbeForbidden))
            }
            BackingFormat::Probe => {
                probe_storage(&file).map_err(Error::io("probing backing format", 0))?
            }
        };
        Ok(Admitted {
            file,
            path,
            id,
            format,
        })
    }
}

/// The absolute path of what `file` is (the kernel's name for the descriptor); `fallback`,
/// made absolute and canonical, when `/proc` cannot say.
fn opened_path(file: &File, fallback: &Path) -> PathBuf {
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .unwrap_or_else(|_| canonical(fallback))
}

/// `path` made absolute, with symlinks resolved where it exists.
fn canonical(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    abs.canonicalize().unwrap_or_else(|_| normalise(&abs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules_in(dir: &Path) -> Rules {
        Rules {
            confine_to: Some(dir.to_path_buf()),
            ..Rules::default()
        }
    }

    #[test]
    fn each_rule_refuses_on_its_own() {
        let root = tempfile::tempdir().unwrap();
        let inside = root.path().join("in");
        std::fs::create_dir(&inside).unwrap();
        std::fs::write(inside.join("base.raw"), b"data").unwrap();
        std::fs::write(root.path().join("outside.raw"), b"secret").unwrap();
        std::os::unix::fs::symlink(root.path().join("outside.raw"), inside.join("link.raw"))
            .unwrap();
        let top = inside.join("top.qed");
        let rules = rules_in(&inside);
        let admit = |name: &str, depth: u32, seen: &[FileId], f: BackingFormat| {
            rules.admit_file(name, Some(&top), depth, seen, f)
        };
        let refusal = |r: Result<Admitted>| match r {
            Err(Error::Refused(r)) => r,
            other => panic!("expected a refusal, got {other:?}"),
        };
        let ok = admit("base.raw", 1, &[], BackingFormat::Raw).unwrap();
        assert_eq!(ok.format, "raw");
        assert!(matches!(
            refusal(admit(
                "base.raw",
                rules.max_depth + 1,
                &[],
                BackingFormat::Raw
            )),
            Refusal::TooDeep(_)
        ));
        assert!(matches!(
            refusal(admit("../outside.raw", 1, &[], BackingFormat::Raw)),
            Refusal::OutsideConfinement(_)
        ));
        assert!(matches!(
            refusal(admit("link.raw", 1, &[], BackingFormat::Raw)),
            Refusal::OutsideConfinement(_)
        ));
        assert!(matches!(
            refusal(admit("base.raw", 1, &[ok.id], BackingFormat::Raw)),
            Refusal::Loop(_)
        ));
        assert!(matches!(
            refusal(admit("nbd://127.0.0.1/x", 1, &[], BackingFormat::Raw)),
            Refusal::Protocol(_)
        ));
        let no_probe = Rules {
            allow_probe: false,
            ..rules.clone()
        };
        assert!(matches!(
            refusal(no_probe.admit_file("base.raw", Some(&top), 1, &[], BackingFormat::Probe)),
            Refusal::ProbeForbidden
        ));
        assert_eq!(
            admit("base.raw", 1, &[], BackingFormat::Probe)
                .unwrap()
                .format,
            "raw"
        );
    }

    #[test]
    fn a_file_swapped_for_a_symlink_is_judged_by_what_was_opened() {
        // A thread keeps swapping `swap.raw` between a file inside the confinement and a
        // symlink to a file outside it, while the gate admits it again and again. Whatever
        // the timing, an admitted descriptor is never the outside file.
        let root = tempfile::tempdir().unwrap();
        let inside = root.path().join("in");
        std::fs::create_dir(&inside).unwrap();
        std::fs::write(root.path().join("outside.raw"), b"OUTSIDE!").unwrap();
        std::fs::write(inside.join("good.raw"), b"inside..").unwrap();
        let top = inside.join("top.qed");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swapper = {
            let stop = stop.clone();
            let inside = inside.clone();
            let outside = root.path().join("outside.raw");
            std::thread::spawn(move || {
                let target = inside.join("swap.raw");
                let tmp_link = inside.join("tmp.link");
                let tmp_file = inside.join("tmp.file");
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = std::fs::remove_file(&tmp_link);
                    std::os::unix::fs::symlink(&outside, &tmp_link).unwrap();
                    std::fs::rename(&tmp_link, &target).unwrap();
                    std::fs::copy(inside.join("good.raw"), &tmp_file).unwrap();
                    std::fs::rename(&tmp_file, &target).unwrap();
                }
            })
        };
        let rules = rules_in(&inside);
        let (mut admitted, mut refused) = (0, 0);
        // Until both outcomes have been seen many times (bounded, so a broken swapper fails
        // the test rather than hanging it).
        let mut tries = 0;
        while (admitted < 200 || refused < 200) && tries < 200_000 {
            tries += 1;
            match rules.admit_file("swap.raw", Some(&top), 1, &[], BackingFormat::Raw) {
                Ok(a) => {
                    let mut buf = [0u8; 8];
                    std::os::unix::fs::FileExt::read_exact_at(&a.file, &mut buf, 0).unwrap();
                    assert_eq!(&buf, b"inside..", "admitted the file outside");
                    admitted += 1;
                }
                Err(Error::Refused(Refusal::OutsideConfinement(_))) => refused += 1,
                // The name may be missing for an instant between the renames.
                Err(Error::Io { .. }) => {}
                Err(e) => panic!("unexpected: {e}"),
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        swapper.join().unwrap();
        assert!(
            admitted > 0 && refused > 0,
            "{admitted} admitted, {refused} refused"
        );
    }
}
