//! `convert`: copies a virtual disk into a raw file (holes where zero) or a new QED image
//! (zero ranges left unallocated, never stored as data).
//!
//! The copy is a pipeline: the source's block status says where data may be; chunks of it are
//! read asynchronously with several in flight (so an NBD source keeps many requests on the
//! wire), and each chunk's non-zero blocks are written on tokio's blocking pool (`pread`/
//! `pwrite` and `qed::Image` are synchronous) while the next chunks are being read. The output
//! is flushed to stable storage before `convert` returns.

use std::path::Path;
use std::sync::Arc;

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

/// Bytes read per chunk: the NBD client's default request size, so a chunk is one request
/// read straight into a recycled buffer.
const NBD_CHUNK: u64 = 256 << 10;
/// Bytes read per chunk from local files (fewer hops to the blocking pool).
const FILE_CHUNK: u64 = 2 << 20;
/// Chunks in flight.
const IN_FLIGHT: usize = 16;

/// Where converted bytes go.
#[derive(Debug)]
enum Sink {
    Raw(Box<dyn Storage>),
    Qed(Box<Image>),
}

impl Sink {
    fn write(&self, buf: &[u8], at: u64, dst: &Path) -> Result<()> {
        match self {
            Sink::Raw(f) => f
                .write_at(buf, at)
                .map_err(Error::io(format!("writing {}", dst.display()))),
            Sink::Qed(image) => image
                .write_at(buf, qed::GuestOffset(at))
                .map_err(|e| Error::image(dst, e)),
        }
    }
}

/// Copies `source` into `dst` as `target`, with the default [`qed::IoConfig`].
pub fn convert(source: &Source, dst: &Path, target: &Target) -> Result<ConvertStats> {
    convert_with(source, dst, target, qed::IoConfig::default())
}

/// Copies `source` into `dst` as `target`, writing `dst` as `io` says (`--cache`, `--aio`).
pub fn convert_with(
    source: &Source,
    dst: &Path,
    target: &Target,
    io: qed::IoConfig,
) -> Result<ConvertStats> {
    let size = source.size();
    let (sink, block) = match target {
        Target::Raw => {
            // Refuses an input (by device and inode) and a file another process holds before
            // anything is truncated.
            let out = qed::file::create(dst, &source.files()).map_err(|e| Error::image(dst, e))?;
            out.set_len(0)
                .and_then(|()| out.set_len(size))
                .map_err(Error::io(format!("sizing {}", dst.display())))?;
            let out = io.storage(out).map_err(|e| Error::open(dst, e))?;
            (Sink::Raw(out), 64 << 10)
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
            let file = Image::create_file(dst, &options, &source.files())
                .map_err(|e| Error::image(dst, e))?;
            let options = OpenOptions {
                path: Some(dst.to_path_buf()),
                ..OpenOptions::default()
            };
            let storage = io.storage(file).map_err(|e| Error::open(dst, e))?;
            let image = Image::open(storage, options).map_err(|e| Error::image(dst, e))?;
            let cs = image.geometry().cluster_size();
            (Sink::Qed(Box::new(image)), cs)
        }
    };
    let sink = Arc::new(sink);
    let data_bytes = copy_nonzero(source, block, &sink, dst)?;
    // Every task has finished; make the output durable (a QED flush also clears NEED_CHECK,
    // so the image is clean when the last reference drops).
    match &*sink {
        Sink::Raw(out) => out
            .flush()
            .map_err(Error::io(format!("finishing {}", dst.display())))?,
        Sink::Qed(image) => image.flush().map_err(|e| Error::image(dst, e))?,
    }
    Ok(ConvertStats {
        virtual_size: size,
        data_bytes,
    })
}

/// Writes the runs of non-zero `block`-sized blocks of `buf` (at guest offset `at`); returns
/// the bytes written.
fn write_nonzero(sink: &Sink, buf: &[u8], at: u64, block: usize, dst: &Path) -> Result<u64> {
    let mut written = 0u64;
    let mut run_start: Option<usize> = None;
    let mut i = 0usize;
    while i < buf.len() {
        let e = (i + block).min(buf.len());
        let zero = buf[i..e].iter().all(|&b| b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(i),
            (true, Some(s)) => {
                sink.write(&buf[s..i], at + s as u64, dst)?;
                written += (i - s) as u64;
                run_start = None;
            }
            _ => {}
        }
        i = e;
    }
    if let Some(s) = run_start {
        sink.write(&buf[s..], at + s as u64, dst)?;
        written += (buf.len() - s) as u64;
    }
    Ok(written)
}

/// The pipeline: skip what block status says is zero, read chunks with [`IN_FLIGHT`] in
/// flight, write their non-zero blocks on the blocking pool.
fn copy_nonzero(source: &Source, block: u64, sink: &Arc<Sink>, dst: &Path) -> Result<u64> {
    let size = source.size();
    let chunk = match source.kind() {
        crate::source::SourceKind::Nbd => NBD_CHUNK,
        _ => FILE_CHUNK,
    }
    .max(block);
    // Chunk buffers are recycled: a fresh 2 MiB allocation per chunk costs a page fault per
    // 4 KiB on first touch.
    let pool: Arc<parking_lot::Mutex<Vec<Vec<u8>>>> = Arc::default();
    source.runtime().block_on(async {
        let mut tasks: tokio::task::JoinSet<Result<u64>> = tokio::task::JoinSet::new();
        let mut total = 0u64;
        let mut pos = 0u64;
        while pos < size {
            if let Some(next) = source.next_data_async(pos).await {
                if next > pos {
                    // Skip the zeros, staying block aligned.
                    pos = (next.min(size) / block) * block;
                    if pos >= size {
                        break;
                    }
                }
            }
            let n = chunk.min(size - pos);
            while tasks.len() >= IN_FLIGHT {
                if let Some(done) = tasks.join_next().await {
                    total += done.map_err(Error::task("convert"))??;
                }
            }
            let device = Arc::clone(source.device());
            let sink = Arc::clone(sink);
            let dst = dst.to_path_buf();
            let pool = Arc::clone(&pool);
            tasks.spawn(async move {
                let mut buf = pool.lock().pop().unwrap_or_default();
                buf.resize(n as usize, 0);
                let buf = device.read_at(pos, buf).await.map_err(Error::device)?;
                tokio::task::spawn_blocking(move || {
                    let written = write_nonzero(&sink, &buf, pos, block as usize, &dst);
                    pool.lock().push(buf);
                    written
                })
                .await
                .map_err(Error::task("convert"))?
            });
            pos += n;
        }
        while let Some(done) = tasks.join_next().await {
            total += done.map_err(Error::task("convert"))??;
        }
        Ok(total)
    })
}
