//! `convert`: copies a virtual disk into a raw file (holes where zero) or a new QED image
//! (zero ranges left unallocated, never stored as data).
//!
//! The copy is a pipeline: the source's block status says where data may be; chunks of it are
//! read asynchronously with several in flight (so an NBD source keeps many requests on the
//! wire), and each chunk's non-zero blocks are written on tokio's blocking pool (`pread`/
//! `pwrite` and `qed::Image` are synchronous) while the next chunks are being read. The output
//! is flushed to stable storage before `convert` returns.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use copy_on_read::{BlockDevice, IoBufs};
use qed::{CreateOptions, Image, OpenOptions, Storage};

use crate::direct::{BufPool, DirectStorage, PooledBuf};
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
    /// Of those, bytes written past the page cache (`O_DIRECT`, see [`crate::direct`]).
    pub direct_bytes: u64,
}

/// Bytes read per chunk: the NBD client's default request size, so a chunk is one request
/// read straight into a recycled buffer.
const NBD_CHUNK: u64 = 256 << 10;
/// Bytes read per chunk from local files: fewer hops to the blocking pool, and direct writes
/// as large as a virtio disk takes in one request (`max_sectors_kb` 4096). 2, 4 and 8 MiB
/// measured alike on the loaded development machine.
const FILE_CHUNK: u64 = 4 << 20;
/// Chunks in flight at most.
const IN_FLIGHT: usize = 16;
/// Bytes of chunk buffers in flight at most, whatever the chunk (a cluster may be 64 MiB).
const IN_FLIGHT_BYTES: u64 = 32 << 20;

/// Where converted bytes go: both write whole aligned blocks past the page cache
/// ([`DirectStorage`]).
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

    /// Makes the output durable (a QED flush also clears NEED_CHECK, so the image is clean
    /// when the last reference drops).
    fn finish(&self, dst: &Path) -> Result<()> {
        match self {
            Sink::Raw(out) => out
                .flush()
                .map_err(Error::io(format!("finishing {}", dst.display()))),
            Sink::Qed(image) => {
                // Back from `presize`'s bound to what was allocated, then one flush.
                image
                    .storage()
                    .set_len(image.file_end())
                    .map_err(Error::io(format!("sizing {}", dst.display())))?;
                image.flush().map_err(|e| Error::image(dst, e))
            }
        }
    }
}

/// Bytes [`DirectStorage`] has written past the page cache.
type DirectCount = Arc<std::sync::atomic::AtomicU64>;

/// The output's storage: with `--cache none`, the configured backend with O_DIRECT for every
/// write; otherwise whole aligned data blocks past the page cache through a second O_DIRECT
/// description ([`DirectStorage`], whose byte count comes back) and the rest buffered.
fn output_storage(
    file: std::fs::File,
    dst: &Path,
    io: qed::IoConfig,
) -> Result<(Box<dyn Storage>, Option<DirectCount>)> {
    if io.cache == qed::CacheMode::None {
        let storage = io.storage(file).map_err(|e| Error::open(dst, e))?;
        return Ok((storage, None));
    }
    let storage = DirectStorage::new(file);
    let direct = storage.direct_bytes();
    Ok((Box::new(storage), Some(direct)))
}

/// Grows the new image's file (sparse) to the most a conversion of `size` bytes can allocate:
/// every data cluster and every L2 table. Direct writes inside the file's length do not
/// extend it, and ext4 runs such writes concurrently, where writes that extend the file wait
/// for each other (measured: with other writers on the disk, the extending writes made
/// `convert` slower than `qemu-img`). [`Sink::finish`] cuts the file back to what was
/// allocated. Only a speed-up: a refusal is logged and ignored.
fn presize(image: &Image, size: u64) {
    let g = image.geometry();
    let tables = size.div_ceil(g.l2_span()) * u64::from(g.table_size()) * g.cluster_size();
    let bound = image
        .file_end()
        .saturating_add(g.round_up_to_cluster(size))
        .saturating_add(tables);
    if let Err(e) = image.storage().set_len(bound) {
        tracing::info!(error = %e, "could not presize the output; its writes extend it");
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
    let direct_bytes;
    let (sink, block) = match target {
        Target::Raw => {
            // Refuses an input (by device and inode) and a file another process holds before
            // anything is truncated.
            let out = qed::file::create(dst, &source.files()).map_err(|e| Error::image(dst, e))?;
            out.set_len(0)
                .and_then(|()| out.set_len(size))
                .map_err(Error::io(format!("sizing {}", dst.display())))?;
            let (out, direct) = output_storage(out, dst, io)?;
            direct_bytes = direct;
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
            let (storage, direct) = output_storage(file, dst, io)?;
            direct_bytes = direct;
            let image = Image::open(storage, options).map_err(|e| Error::image(dst, e))?;
            presize(&image, size);
            let cs = image.geometry().cluster_size();
            (Sink::Qed(Box::new(image)), cs)
        }
    };
    let sink = Arc::new(sink);
    let data_bytes = copy_nonzero(source, block, &sink, dst)?;
    // Every task has finished: one flush makes data and tables durable.
    sink.finish(dst)?;
    Ok(ConvertStats {
        virtual_size: size,
        data_bytes,
        // With `--cache none` every write went past the page cache.
        direct_bytes: direct_bytes
            .map_or(data_bytes, |n| n.load(std::sync::atomic::Ordering::Relaxed)),
    })
}

/// True when every byte of `block` is zero: the first bytes alone decide for most data, and
/// the rest is compared a word at a time.
fn is_zero(block: &[u8]) -> bool {
    let (head, rest) = block.split_at(block.len().min(16));
    if head.iter().any(|&b| b != 0) {
        return false;
    }
    let mut words = rest.chunks_exact(64);
    let words_zero = words
        .by_ref()
        .all(|w| w.iter().fold(0u8, |acc, &b| acc | b) == 0);
    words_zero && words.remainder().iter().all(|&b| b == 0)
}

/// Writes the runs of non-zero `block`-sized blocks of `buf` (at guest offset `at`); returns
/// the bytes written.
fn write_nonzero(sink: &Sink, buf: &[u8], at: u64, block: usize, dst: &Path) -> Result<u64> {
    let mut written = 0u64;
    let mut run_start: Option<usize> = None;
    let mut i = 0usize;
    while i < buf.len() {
        let e = (i + block).min(buf.len());
        let zero = is_zero(&buf[i..e]);
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

/// Where a chunk's bytes go: the output and its name (for errors), and the blocks zero
/// detection works in.
#[derive(Clone, Debug)]
struct Output {
    sink: Arc<Sink>,
    dst: PathBuf,
    block: u64,
}

/// Reads `n` bytes at `pos` into a buffer of `pool` and writes their non-zero blocks on the
/// blocking pool; the buffer goes back to the pool when the write is done.
async fn copy_chunk(
    device: Arc<dyn BlockDevice>,
    pool: BufPool,
    (pos, n): (u64, u64),
    out: Output,
) -> Result<u64> {
    let mut bufs = IoBufs::new();
    bufs.push(PooledBuf::take(&pool, n as usize));
    let bufs = device.readv(pos, bufs).await.map_err(Error::device)?;
    tokio::task::spawn_blocking(move || {
        let data = bufs.segments().next().map_or(&[][..], |(_, b)| b);
        write_nonzero(&out.sink, data, pos, out.block as usize, &out.dst)
    })
    .await
    .map_err(Error::task("convert"))?
}

/// The pipeline: skip what block status says is zero, read chunks with up to [`IN_FLIGHT`]
/// (and [`IN_FLIGHT_BYTES`]) in flight into recycled aligned buffers, write their non-zero
/// blocks on the blocking pool.
fn copy_nonzero(source: &Source, block: u64, sink: &Arc<Sink>, dst: &Path) -> Result<u64> {
    let size = source.size();
    let chunk = match source.kind() {
        crate::source::SourceKind::Nbd => NBD_CHUNK,
        _ => FILE_CHUNK,
    }
    .max(block);
    let in_flight = usize::try_from(IN_FLIGHT_BYTES / chunk)
        .unwrap_or(IN_FLIGHT)
        .clamp(1, IN_FLIGHT);
    let pool = BufPool::default();
    let out = Output {
        sink: Arc::clone(sink),
        dst: dst.to_path_buf(),
        block,
    };
    source.runtime().block_on(async {
        let mut tasks: tokio::task::JoinSet<Result<u64>> = tokio::task::JoinSet::new();
        let mut total = 0u64;
        let mut pos = 0u64;
        while pos < size {
            let mut data_end = u64::MAX;
            if let Some((next, end)) = source.next_data_run_async(pos).await {
                data_end = end;
                if next > pos {
                    // Skip the zeros, staying block aligned.
                    pos = (next.min(size) / block) * block;
                    if pos >= size {
                        break;
                    }
                }
            }
            // Up to a chunk, and no further than the data goes (rounded up to a block).
            let n = chunk.min(size - pos).min(
                data_end
                    .saturating_sub(pos)
                    .div_ceil(block)
                    .saturating_mul(block)
                    .max(block),
            );
            while tasks.len() >= in_flight {
                if let Some(done) = tasks.join_next().await {
                    total += done.map_err(Error::task("convert"))??;
                }
            }
            tasks.spawn(copy_chunk(
                Arc::clone(source.device()),
                pool.clone(),
                (pos, n),
                out.clone(),
            ));
            pos += n;
        }
        while let Some(done) = tasks.join_next().await {
            total += done.map_err(Error::task("convert"))??;
        }
        Ok(total)
    })
}
