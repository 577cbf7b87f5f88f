//! One layer of a backing chain, as an image sees it: what unallocated clusters are read from
//! ([`BackingRead`]), how the backing an image names is opened ([`BackingOpener`]), and the
//! format a header records ([`BackingFormat`]).
//!
//! These are the only backing items the image depends on. Their implementations (raw files,
//! QED images, the file gate) live in the `backing` module, which depends on the image
//! and not the other way round.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use crate::error::Result;

/// The backing format an image header records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingFormat {
    /// `F_BACKING_FORMAT_NO_PROBE`: raw, never probe.
    Raw,
    /// No format recorded: probe (QED or raw here).
    Probe,
}

/// Where unallocated clusters come from: a read-only view of the backing's virtual disk.
pub trait BackingRead: Send + Sync + fmt::Debug {
    /// Fills `buf` with the backing's bytes at `offset`; bytes past its end read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// The backing's virtual size in bytes.
    fn size(&self) -> u64;
    /// Where the next possibly-non-zero data is at or after `offset`, if known; `None` means
    /// "assume data". `Some(u64::MAX)` means nothing but zeros from `offset` on.
    fn next_data(&self, _offset: u64) -> Result<Option<u64>> {
        Ok(None)
    }
    /// A short description (format and name) for `info` and error messages.
    fn describe(&self) -> BackingDescription;
}

/// What `info` shows about one backing layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingDescription {
    /// The name as opened (path or URI).
    pub filename: String,
    /// `"qed"`, `"raw"` or a protocol (`"nbd"`).
    pub format: String,
    /// Virtual size.
    pub virtual_size: u64,
    /// The next layer, for a chain.
    pub backing: Option<Box<BackingDescription>>,
    /// The backing's own backing name as stored, if any.
    pub backing_filename: Option<String>,
    /// Cluster size, for QED layers.
    pub cluster_size: Option<u64>,
}

/// Opens the backing an image header names. Implementations decide what names may be opened.
pub trait BackingOpener: Send + Sync + fmt::Debug {
    /// Opens `name` (as stored in the header of the image at `image_path`, if known) with the
    /// recorded `format`, `depth` layers below the top image; `seen` holds the files of the
    /// layers above (the naming image's last), so that a loop can be refused.
    fn open(
        &self,
        name: &str,
        format: BackingFormat,
        image_path: Option<&Path>,
        depth: u32,
        seen: &[crate::file::FileId],
    ) -> Result<Arc<dyn BackingRead>>;
}
