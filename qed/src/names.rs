//! Backing names and formats: how a name stored in a header resolves to a path, which names
//! are protocols rather than files, what a file's first bytes say its format is, and the
//! default bound on chain depth. Pure helpers with no I/O policy; every opener uses them.

use std::path::{Component, Path, PathBuf};

use crate::layout::MAGIC;
use crate::storage::Storage;

/// The default bound on backing chain depth: deeper than QEMU users meet (QEMU itself has no
/// fixed limit), while still stopping a runaway or hostile chain.
pub const DEFAULT_MAX_DEPTH: u32 = 1024;

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
