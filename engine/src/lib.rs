//! # engine: qedstream's image operations and the `qedstream` command
//!
//! The engine sits on top of the `qed` crate and turns images into operations an operator or a
//! hypervisor backend asks for:
//!
//! - [`chain`]: a backing chain opened layer by layer for inspection ([`chain::Chain`]), with
//!   `qemu-img`-compatible `map` extents ([`chain::MapEntry`]) and `info` JSON.
//! - [`source`]: something to copy from (a QED chain or a raw file), read through its chain.
//! - [`child`]: helper processes (`qemu-nbd`) that die with the command, on signals too.
//! - [`convert`]: copies a source into a raw file (holes where zero) or a new QED image (zero
//!   data never stored).
//! - [`demo`]: `qedstream demo`, the quick start end to end.
//! - [`out`]: the command's stdout, with write errors returned ([`outln!`]), never a panic.
//! - [`progress`]: the `qedstream stream` command: a progress bar or JSON lines, SIGINT.
//! - [`size`]: sizes as operators type them (`64K`, `2G`).
//! - [`stream`]: the stream job ([`stream::StreamJob`]) that makes a copy-on-read image local
//!   and drops its backing link, with progress, a live rate limit, pause, resume and cancel,
//!   and the single-step mode ([`stream::step`]).
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

pub mod chain;
pub mod child;
pub mod convert;
pub mod demo;
pub mod error;
pub mod out;
pub mod progress;
pub mod size;
pub mod source;
pub mod stream;

pub use error::{Error, Result};
