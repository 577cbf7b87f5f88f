//! What `convert` and `read` copy from: a QED or qcow2 image read through its backing chain
//! (files or NBD), a raw file, or an NBD export named by a URI (`nbd://`, `nbd+unix://`, `json:`).
//!
//! A source is a `copy_on_read` block device (opened read-only, copy-on-read off) driven from
//! synchronous code through a [`SyncDevice`] on a small tokio runtime of its own.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use copy_on_read::{
    BlockDevice, CorDevice, CorOptions, Gate, NbdExport, RawFile, Status, SyncDevice,
};
use qed::backing::{is_protocol_name, probe_storage};

use crate::error::{Error, Result};

/// What kind of source was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// A QED image with its backing chain.
    Qed,
    /// A raw file.
    Raw,
    /// A qcow2 image with its backing chain (read-only).
    Qcow2,
    /// An NBD export.
    Nbd,
}

/// A readable virtual disk.
#[derive(Debug)]
pub struct Source {
    disk: SyncDevice,
    kind: SourceKind,
    name: PathBuf,
    size: u64,
    /// The last block-status answer, so a sequential copy asks once per window.
    status: parking_lot::Mutex<Vec<copy_on_read::StatusExtent>>,
}

/// True when `name` is an NBD URI or QEMU `json:` string rather than a file path.
pub fn is_nbd_name(name: &Path) -> bool {
    name.to_str().is_some_and(is_protocol_name)
}

impl Source {
    /// Opens `name` as `format` (`"qed"`, `"qcow2"`, `"raw"`, or probed when `None`), read-only. An NBD
    /// URI is always raw.
    pub fn open(name: &Path, format: Option<&str>) -> Result<Source> {
        Source::open_with(name, format, Gate::default())
    }

    /// As [`Source::open`], with backings opened through `gate`.
    pub fn open_with(name: &Path, format: Option<&str>, gate: Gate) -> Result<Source> {
        let runtime = crate::io_runtime()?;
        let (device, kind): (Arc<dyn BlockDevice>, SourceKind) = if is_nbd_name(name) {
            if format.is_some_and(|f| f != "raw") {
                return Err(Error::UnsupportedFormat {
                    path: Some(name.to_path_buf()),
                    format: format.unwrap_or_default().to_string(),
                    supported: "an NBD export is read as raw",
                });
            }
            let uri = name.to_string_lossy().into_owned();
            let export = runtime
                .block_on(NbdExport::connect(&uri, gate.nbd.clone()))
                .map_err(Error::device)?;
            (Arc::new(export), SourceKind::Nbd)
        } else {
            // Only files (never a FIFO or a device that blocks), with the image locks.
            let file =
                qed::file::open(name, gate.read_access()).map_err(|e| Error::image(name, e))?;
            let format = match format {
                Some(f) => f.to_string(),
                None => probe_storage(&file)
                    .map_err(|e| Error::open(name, e))?
                    .to_string(),
            };
            match format.as_str() {
                "raw" => (
                    Arc::new(
                        RawFile::from_file_with(file, name.to_path_buf(), false, gate.io)
                            .map_err(Error::device)?,
                    ),
                    SourceKind::Raw,
                ),
                "qed" => {
                    let options = CorOptions {
                        gate,
                        copy_on_read: false,
                        read_only: true,
                    };
                    let dev = runtime
                        .block_on(CorDevice::open_file(file, name, options))
                        .map_err(Error::device)?;
                    (Arc::new(dev), SourceKind::Qed)
                }
                "qcow2" => {
                    let dev = runtime
                        .block_on(gate.open_qcow2_device(file, name))
                        .map_err(Error::device)?;
                    (dev, SourceKind::Qcow2)
                }
                other => {
                    return Err(Error::UnsupportedFormat {
                        path: Some(name.to_path_buf()),
                        format: other.to_string(),
                        supported: "qed, qcow2 or raw",
                    })
                }
            }
        };
        let size = device.size();
        Ok(Source {
            disk: SyncDevice::with_runtime(runtime, device),
            kind,
            name: name.to_path_buf(),
            size,
            status: parking_lot::Mutex::new(Vec::new()),
        })
    }

    /// What was opened.
    pub fn kind(&self) -> SourceKind {
        self.kind
    }

    /// The virtual size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The name it was opened by.
    pub fn name(&self) -> &Path {
        &self.name
    }

    /// The runtime the device's I/O runs on.
    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        self.disk.runtime()
    }

    /// The local files the source reads (its own and its backing chain's).
    pub fn files(&self) -> Vec<qed::FileId> {
        self.disk.files()
    }

    /// The device underneath.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        self.disk.device()
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.disk.read_at(buf, offset).map_err(Error::device)
    }

    /// The next offset at or after `offset` that may hold non-zero data, from the device's
    /// block status (`None`: unknown). Asks for everything up to the end; the device answers
    /// for as much as it can at once.
    pub fn next_data(&self, offset: u64) -> Option<u64> {
        self.disk.block_on(self.next_data_async(offset))
    }

    /// [`Source::next_data`] for async callers (on this source's runtime).
    pub async fn next_data_async(&self, offset: u64) -> Option<u64> {
        self.next_data_run_async(offset)
            .await
            .map(|(start, _)| start)
    }

    /// The next run of data at or after `offset`: where it starts and where the data the
    /// device reported ends (`u64::MAX` when nothing is known past it), so a copy reads no
    /// zeros it was told of. `None`: block status is unknown. A start past the disk means no
    /// data is left.
    pub async fn next_data_run_async(&self, offset: u64) -> Option<(u64, u64)> {
        if offset >= self.size {
            return Some((u64::MAX, u64::MAX));
        }
        let covered = {
            let cache = self.status.lock();
            cache.first().is_some_and(|f| f.offset <= offset)
                && cache.last().is_some_and(|l| l.offset + l.length > offset)
        };
        if !covered {
            let window = self.size - offset;
            let extents = self.disk.block_status(offset, window).await.ok()?;
            *self.status.lock() = extents;
        }
        let cache = self.status.lock();
        let mut end = offset;
        let mut run: Option<(u64, u64)> = None;
        for e in cache.iter().filter(|e| e.offset + e.length > offset) {
            match (e.status == Status::Data, run) {
                (true, None) => run = Some((e.offset.max(offset), e.offset + e.length)),
                (true, Some((start, _))) => run = Some((start, e.offset + e.length)),
                (false, Some(r)) => return Some(r),
                (false, None) => {}
            }
            end = e.offset + e.length;
        }
        match run {
            // Data to the end of what was reported: what lies past it is not known.
            Some((start, _)) => Some((start, u64::MAX)),
            // Everything reported was zero; nothing is known past it.
            None => (end > offset).then_some((end, u64::MAX)),
        }
    }

    /// Closes the device (and its NBD connections).
    pub fn close(self) -> Result<()> {
        self.disk.close().map_err(Error::device)
    }
}
