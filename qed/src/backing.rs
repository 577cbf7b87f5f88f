//! Backing images: what the clusters an image lacks are read from, and the gate every backing
//! open goes through.
//!
//! A QED header names its backing by a string (a path, or a protocol URI the `qed` crate does
//! not handle itself) and says either "raw, never probe" or nothing, in which case QEMU probes
//! the format. Probing an untrusted image's backing is dangerous: a guest that can write a QED
//! header into a raw backing file could make the host open any file it names. The
//! [`FileGate`] therefore decides whether probing is allowed, confines names to a directory if
//! asked, and bounds the chain depth.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::chain::Chain;
use crate::error::{Error, Result};
use crate::image::{Image, OpenOptions};
pub use crate::layer::{BackingDescription, BackingFormat, BackingOpener, BackingRead};
use crate::layout::{MAGIC, SECTOR};
use crate::storage::Storage;

/// A raw backing file: its bytes are the virtual disk. Its length is rounded up to 512 bytes,
/// as QEMU's block layer does.
#[derive(Debug)]
pub struct RawBacking {
    storage: Box<dyn Storage>,
    size: u64,
    name: String,
}

impl RawBacking {
    /// Wraps storage as a raw backing named `name`.
    pub fn new(storage: Box<dyn Storage>, name: String) -> Result<RawBacking> {
        let len = storage.len().map_err(Error::io("sizing raw backing", 0))?;
        Ok(RawBacking {
            storage,
            size: len.div_ceil(SECTOR) * SECTOR,
            name,
        })
    }
}

impl BackingRead for RawBacking {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.storage
            .read_at(buf, offset)
            .map_err(Error::io("reading raw backing", offset))
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn next_data(&self, offset: u64) -> Result<Option<u64>> {
        self.storage
            .next_data(offset)
            .map_err(Error::io("seeking data in raw backing", offset))
    }

    fn describe(&self) -> BackingDescription {
        BackingDescription {
            filename: self.name.clone(),
            format: "raw".into(),
            virtual_size: self.size,
            backing: None,
            backing_filename: None,
            cluster_size: None,
        }
    }
}

/// A QED image used as a backing: reads go through its own mapping and backing chain (a
/// [`Chain`]: the image itself never reads its backing), and past its virtual size read as
/// zeros.
#[derive(Debug)]
pub struct QedBacking {
    image: Chain,
    name: String,
}

impl QedBacking {
    /// Wraps an opened image (over the backing it opened).
    pub fn new(image: Image, name: String) -> QedBacking {
        QedBacking {
            image: Chain::new(image),
            name,
        }
    }
}

impl BackingRead for QedBacking {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.image.size();
        let inside = if offset >= size {
            0
        } else {
            (size - offset).min(buf.len() as u64) as usize
        };
        // Past the backing's end there is nothing to ask the image for (and an empty read
        // there would be out of range): those bytes are zeros.
        if inside > 0 {
            self.image.read_at(&mut buf[..inside], offset)?;
        }
        buf[inside..].fill(0);
        Ok(())
    }

    fn size(&self) -> u64 {
        self.image.size()
    }

    fn describe(&self) -> BackingDescription {
        BackingDescription {
            filename: self.name.clone(),
            format: "qed".into(),
            virtual_size: self.image.size(),
            backing: self.image.backing().map(|b| Box::new(b.describe())),
            backing_filename: self.image.backing_name(),
            cluster_size: Some(self.image.geometry().cluster_size()),
        }
    }
}

/// The default gate for backing files on the local file system.
#[derive(Clone, Debug)]
pub struct FileGate {
    /// Allow probing (QED or raw) when the header records no format. Default: true, as QEMU.
    pub allow_probe: bool,
    /// If set, every backing path must resolve inside this directory.
    pub confine_to: Option<PathBuf>,
    /// The deepest chain accepted (the top image is depth 0). Default [`DEFAULT_MAX_DEPTH`].
    pub max_depth: u32,
    /// Open backing files with [`Access::SharedRead`] (`-U`) instead of
    /// [`Access::ReadOnly`], which keeps writers and resizers out of them.
    pub force_share: bool,
}

/// The default bound on backing chain depth: deeper than QEMU users meet (QEMU itself has no
/// fixed limit), while still stopping a runaway or hostile chain.
pub const DEFAULT_MAX_DEPTH: u32 = 1024;

impl Default for FileGate {
    fn default() -> FileGate {
        FileGate {
            allow_probe: true,
            confine_to: None,
            max_depth: DEFAULT_MAX_DEPTH,
            force_share: false,
        }
    }
}

/// The default options open the backing through a default [`FileGate`] (defined here, so that
/// the image does not depend on the gate).
impl Default for OpenOptions {
    fn default() -> OpenOptions {
        OpenOptions::with_opener(Arc::new(FileGate::default()))
    }
}

/// Resolves a backing name against the directory of the image that names it.
pub fn resolve_backing_path(name: &str, image_path: Option<&Path>) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match image_path.and_then(Path::parent) {
        Some(dir) => dir.join(p),
        None => p.to_path_buf(),
    }
}

/// Lexically normalises a path (no symlink resolution): drops `.`, folds `..`.
pub fn normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// True when `name` is a protocol string (URI or `json:`) rather than a path.
pub fn is_protocol_name(name: &str) -> bool {
    name.starts_with("json:") || name.contains("://") || name.starts_with("nbd:")
}

/// How many leading bytes [`probe_format`] looks at.
pub const PROBE_BYTES: usize = 64;

/// What the first bytes of a file say its format is. Bytes past the end of a short file count
/// as zeros, as in QEMU's probe buffer: a QED image cut short (even to its 4-byte magic) is
/// still QED, so opening it reports the damage instead of reading it as raw.
pub fn probe_format(head: &[u8]) -> &'static str {
    let mut buf = [0u8; 8];
    let n = head.len().min(buf.len());
    buf[..n].copy_from_slice(&head[..n]);
    if n == 0 {
        "raw"
    } else if buf[0..4] == MAGIC.to_le_bytes() {
        "qed"
    } else if &buf[0..4] == b"QFI\xfb" {
        "qcow2"
    } else if &buf[0..4] == b"KDMV" {
        "vmdk"
    } else if &buf[0..8] == b"conectix" {
        "vpc"
    } else {
        "raw"
    }
}

/// Probes the format of `storage` from its first [`PROBE_BYTES`] bytes (see [`probe_format`]).
pub fn probe_storage(storage: &dyn Storage) -> std::io::Result<&'static str> {
    let len = storage.len()?;
    let mut head = [0u8; PROBE_BYTES];
    let head = &mut head[..len.min(PROBE_BYTES as u64) as usize];
    storage.read_at(head, 0)?;
    Ok(probe_format(head))
}

impl FileGate {
    /// The admission rules this gate applies ([`crate::gate::Rules::admit_file`]).
    pub fn rules(&self) -> crate::gate::Rules {
        crate::gate::Rules {
            allow_probe: self.allow_probe,
            confine_to: self.confine_to.clone(),
            max_depth: self.max_depth,
            force_share: self.force_share,
        }
    }
}

impl BackingOpener for FileGate {
    fn open(
        &self,
        name: &str,
        format: BackingFormat,
        image_path: Option<&Path>,
        depth: u32,
        seen: &[crate::file::FileId],
    ) -> Result<Arc<dyn BackingRead>> {
        let wrap = |e: Error| Error::Backing {
            name: name.to_string(),
            source: Box::new(e),
        };
        let admitted = self
            .rules()
            .admit_file(name, image_path, depth, seen, format)
            .map_err(wrap)?;
        let display = admitted.path.display().to_string();
        match admitted.format {
            "qed" => {
                let mut above = seen.to_vec();
                above.push(admitted.id);
                let options = OpenOptions {
                    read_only: true,
                    force_share: self.force_share,
                    path: Some(admitted.path.clone()),
                    depth,
                    above,
                    ..OpenOptions::with_opener(Arc::new(self.clone()))
                };
                let image = Image::open(Box::new(admitted.file), options)?;
                Ok(Arc::new(QedBacking::new(image, display)))
            }
            "raw" => Ok(Arc::new(RawBacking::new(Box::new(admitted.file), display)?)),
            other => Err(wrap(Error::Refused(
                crate::gate::Refusal::UnsupportedFormat(other),
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_names_resolve_against_the_image_folder() {
        assert_eq!(
            resolve_backing_path("base.raw", Some(Path::new("/a/b/top.qed"))),
            PathBuf::from("/a/b/base.raw")
        );
        assert_eq!(
            resolve_backing_path("/x/base.raw", Some(Path::new("/a/b/top.qed"))),
            PathBuf::from("/x/base.raw")
        );
    }

    #[test]
    fn the_file_gate_applies_the_rules() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("base.raw"), b"data").unwrap();
        let gate = FileGate {
            confine_to: Some(dir.path().to_path_buf()),
            ..FileGate::default()
        };
        let top = dir.path().join("top.qed");
        let open =
            |name: &str, depth: u32| gate.open(name, BackingFormat::Raw, Some(&top), depth, &[]);
        assert!(open("../../etc/passwd", 1).is_err());
        assert!(open("/etc/passwd", 1).is_err());
        assert!(open("base.raw", 1).is_ok());
        assert!(open("nbd://127.0.0.1/x", 1).is_err());
        assert!(open("base.raw", DEFAULT_MAX_DEPTH).is_ok());
        assert!(open("base.raw", DEFAULT_MAX_DEPTH + 1).is_err());
    }

    #[test]
    fn probing_knows_formats() {
        let mut qed = vec![0u8; 64];
        qed[0..4].copy_from_slice(b"QED\0");
        assert_eq!(probe_format(&qed), "qed");
        assert_eq!(probe_format(b"QFI\xfbxxxx"), "qcow2");
        assert_eq!(probe_format(b"hello"), "raw");
        assert_eq!(probe_format(b""), "raw");
        // A QED image cut short is still QED (its header parse reports the damage), as in
        // QEMU, whose probe buffer reads zeros past the end of the file.
        assert_eq!(probe_format(b"QED\0"), "qed");
        assert_eq!(probe_format(b"QED\0\0\0\x01\0\0\0"), "qed");
        assert_eq!(probe_format(b"QED"), "qed");
        assert_eq!(probe_format(b"QEE\0"), "raw");
    }
}
