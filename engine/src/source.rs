//! What `convert` and `read` copy from: a QED image read through its backing chain, or a raw
//! file.

use std::fs::File;
use std::path::{Path, PathBuf};

use qed::backing::probe_format;
use qed::{FileGate, Image, OpenOptions, Storage};

use crate::error::{Error, Result};

/// A readable virtual disk.
#[derive(Debug)]
pub enum Source {
    /// A QED image with its backing chain opened.
    Qed {
        /// The image.
        image: Box<Image>,
        /// Its path.
        path: PathBuf,
    },
    /// A raw file.
    Raw {
        /// The file.
        file: File,
        /// Its path.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
}

impl Source {
    /// Opens `path` as `format` (`"qed"`, `"raw"`, or probed when `None`), read-only.
    pub fn open(path: &Path, format: Option<&str>) -> Result<Source> {
        let file = File::open(path).map_err(|e| Error::open(path, e))?;
        let len = Storage::len(&file).map_err(|e| Error::open(path, e))?;
        let mut head = [0u8; 64];
        Storage::read_at(&file, &mut head, 0).map_err(|e| Error::open(path, e))?;
        let detected = probe_format(&head[..len.min(64) as usize]);
        let format = match format {
            Some(f) => f,
            None if detected == "qed" || detected == "raw" => detected,
            None => {
                return Err(Error::Usage(format!(
                    "{}: format {detected} is not supported",
                    path.display()
                )))
            }
        };
        match format {
            "raw" => Ok(Source::Raw {
                file,
                path: path.to_path_buf(),
                size: len,
            }),
            "qed" => {
                let options = OpenOptions {
                    read_only: true,
                    path: Some(path.to_path_buf()),
                    ..OpenOptions::with_opener(std::sync::Arc::new(FileGate::default()))
                };
                let image =
                    Image::open(Box::new(file), options).map_err(|e| Error::image(path, e))?;
                Ok(Source::Qed {
                    image: Box::new(image),
                    path: path.to_path_buf(),
                })
            }
            other => Err(Error::Usage(format!("unknown format {other:?}"))),
        }
    }

    /// The virtual size.
    pub fn size(&self) -> u64 {
        match self {
            Source::Qed { image, .. } => image.size(),
            Source::Raw { size, .. } => *size,
        }
    }

    /// Reads `buf.len()` bytes at `offset` (zeros past the end of a raw file).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match self {
            Source::Qed { image, path } => image
                .read_at(buf, offset)
                .map_err(|e| Error::image(path, e)),
            Source::Raw { file, path, .. } => {
                Storage::read_at(file, buf, offset).map_err(|e| Error::open(path, e))
            }
        }
    }

    /// The next offset at or after `offset` that may hold non-zero data (`None`: unknown).
    pub fn next_data(&self, offset: u64) -> Option<u64> {
        match self {
            Source::Qed { .. } => None,
            Source::Raw { file, .. } => file.next_data(offset).ok().flatten(),
        }
    }
}
