//! # engine: qedstream's image operations (the library of the `qedstream` command)
//!
//! The engine sits on top of the `qed` and `copy-on-read` crates and turns images into
//! operations an operator or a hypervisor backend asks for:
//!
//! - [`chain`]: a backing chain opened layer by layer for inspection ([`chain::Chain`]), with
//!   `qemu-img`-compatible `map` extents ([`chain::MapEntry`]) and `info` JSON.
//! - [`source`]: something to copy from (a QED chain or a raw file), read through its chain.
//! - [`control`]: the control plane of a served image: one block node, its stream job, and a
//!   QMP server on a unix socket speaking QEMU's block-job commands and events
//!   ([`control::Control`]).
//! - [`convert`]: copies a source into a raw file (holes where zero) or a new QED image (zero
//!   data never stored).
//! - [`direct`]: a new output written past the page cache ([`direct::DirectStorage`]: whole
//!   aligned blocks with `O_DIRECT`, the rest buffered) from recycled aligned buffers.
//! - [`error`]: the one error type, [`Error`], with a stable [`ErrorKind`] to match on.
//! - [`size`]: sizes as operators type them (`64K`, `2G`).
//! - [`stream`]: the stream job ([`stream::StreamJob`]) that makes a copy-on-read image local
//!   and drops its backing link, with progress, a live rate limit, pause, resume and cancel,
//!   and the single-step mode ([`stream::step`]).
//! - [`job`]: the job model around a stream: the on-error policy ([`job::OnError`]:
//!   report, stop, ignore), the I/O status, and the events a job reports ([`job::JobEvent`],
//!   by subscription on its handle).
//!
//! The library has no command-line parts: the `qedstream` binary (`src/bin/qedstream/`, behind
//! the default `cli` feature) adds the argument parsing, the progress bar, stdout handling,
//! signal handling and the demo. Embed the library with `default-features = false` and it
//! pulls in neither clap nor indicatif; it never installs signal handlers, writes to stdout or
//! exits the process.
//!
//! ```no_run
//! use engine::chain::Chain;
//! use copy_on_read::Gate;
//!
//! let chain = Chain::open("top.qed".as_ref(), None, &Gate::default()).unwrap();
//! for extent in chain.map().unwrap() {
//!     println!("{}", extent.to_json());
//! }
//! ```

/// Stack size of the threads that open and read backing chains (the command's main thread and
/// the I/O runtimes' workers). Opening and reading a chain recurses once per layer, so a chain
/// as deep as [`qed::backing::DEFAULT_MAX_DEPTH`] needs more than the usual 2 MiB (the memory
/// is reserved, and only touched as deep as a chain goes).
pub const STACK_SIZE: usize = 256 << 20;

/// A runtime for block I/O: two workers with [`STACK_SIZE`] stacks, I/O and timers on. What
/// the command and the synchronous sources drive their devices on.
pub fn io_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_stack_size(STACK_SIZE)
        .enable_all()
        .build()
        .map_err(Error::io("starting the I/O runtime"))
}

pub mod chain;
pub mod control;
pub mod convert;
pub mod direct;
pub mod error;
pub mod job;
pub mod size;
pub mod source;
pub mod stream;

pub use error::{Error, ErrorKind, Result};
