//! `convert`: copies a virtual disk into a raw file (holes where zero) or a new QED image
//! (zero ranges left unallocated, never stored as data).

use std::fs::OpenOptions as FsOpenOptions;
use std::path::Path;

use qed::{CreateOptions, Image, OpenOptions, Storage};

use crate::error::{Error, Result};
use crate::source::Source;

/// The output format of a conversion.
#[derive(Clone, Debug)]
pub enum Target {
    /// A raw file; zero ranges become holes.
    Raw,
    /// A new QED image with these geometry options (size is taken from the source).
    Qed {
        /// Cluster size.
        cluster_size: u32,
        /// Table size.
        table_size: u32,
    },
}

/// What a conversion did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConvertStats {
    /// Bytes of the virtual disk.
    pub virtual_size: u64,
    /// Bytes written as data.
    pub data_bytes: u64,
}

/// Bytes read per step.
const CHUNK: u64 = 2 << 20;

/// Copies `source` into `dst` as `target`.
pub fn convert(source: &Source, dst: &Path, target: &Target) -> Result<ConvertStats> {
    let size = source.size();
    let mut stats = ConvertStats {
        virtual_size: size,
        data_bytes: 0,
    };
    match target {
        Target::Raw => {
            let out = FsOpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dst)
                .map_err(|e| Error::open(dst, e))?;
            copy_nonzero(source, 64 << 10, |buf, at| {
                stats.data_bytes += buf.len() as u64;
                Storage::write_at(&out, buf, at)
                    .map_err(Error::io(format!("writing {}", dst.display())))
            })?;
            out.set_len(size)
                .and_then(|()| out.sync_all())
                .map_err(Error::io(format!("finishing {}", dst.display())))?;
        }
        Target::Qed {
            cluster_size,
            table_size,
        } => {
            let options = CreateOptions {
                size,
                cluster_size: *cluster_size,
                table_size: *table_size,
                backing: None,
            };
            Image::create_path(dst, &options).map_err(|e| Error::image(dst, e))?;
            let image =
                Image::open_path(dst, OpenOptions::default()).map_err(|e| Error::image(dst, e))?;
            let cs = image.geometry().cluster_size();
            copy_nonzero(source, cs, |buf, at| {
                stats.data_bytes += buf.len() as u64;
                image.write_at(buf, at).map_err(|e| Error::image(dst, e))
            })?;
            image.close().map_err(|e| Error::image(dst, e))?;
        }
    }
    Ok(stats)
}

/// Reads `source` in chunks and calls `write` for each run of non-zero blocks of `block`
/// bytes (the last block may be short at the end of the disk).
fn copy_nonzero(
    source: &Source,
    block: u64,
    mut write: impl FnMut(&[u8], u64) -> Result<()>,
) -> Result<()> {
    let size = source.size();
    let chunk = CHUNK.max(block);
    let mut buf = vec![0u8; chunk as usize];
    let mut pos = 0u64;
    while pos < size {
        if let Some(next) = source.next_data(pos) {
            if next > pos {
                // Skip the hole, staying block aligned.
                pos = (next.min(size) / block) * block;
                if pos >= size {
                    break;
                }
            }
        }
        let n = chunk.min(size - pos) as usize;
        let buf = &mut buf[..n];
        source.read_at(buf, pos)?;
        let mut run_start: Option<usize> = None;
        let mut i = 0usize;
        while i < n {
            let e = (i + block as usize).min(n);
            let zero = buf[i..e].iter().all(|&b| b == 0);
            match (zero, run_start) {
                (false, None) => run_start = Some(i),
                (true, Some(s)) => {
                    write(&buf[s..i], pos + s as u64)?;
                    run_start = None;
                }
                _ => {}
            }
            i = e;
        }
        if let Some(s) = run_start {
            write(&buf[s..n], pos + s as u64)?;
        }
        pos += n as u64;
    }
    Ok(())
}
