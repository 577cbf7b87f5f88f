//! The command's output on stdout, with failures returned instead of panics.
//!
//! `println!` panics when stdout cannot be written: a full disk (`> /dev/full`, ENOSPC) or a
//! reader that went away (`| head`; Rust ignores SIGPIPE, so the write fails with EPIPE).
//! Everything `qedstream` prints on stdout goes through [`outln!`] or [`print()`],
//! which return [`Error::Stdout`], and the command ends with [`flush`]. An error on stdout
//! therefore ends the command like any other error: one line on stderr and exit 1 (silently on
//! EPIPE, see [`Error::is_broken_pipe`]).

use std::fmt;
use std::io::Write;

use crate::error::{Error, Result};

/// Writes `args` to stdout (line-buffered: a complete line is written at once).
pub fn print(args: fmt::Arguments<'_>) -> Result<()> {
    std::io::stdout()
        .lock()
        .write_fmt(args)
        .map_err(Error::Stdout)
}

/// Writes `bytes` to stdout.
pub fn write_all(bytes: &[u8]) -> Result<()> {
    std::io::stdout()
        .lock()
        .write_all(bytes)
        .map_err(Error::Stdout)
}

/// Writes out whatever stdout still buffers; the last step of every command.
pub fn flush() -> Result<()> {
    std::io::stdout().lock().flush().map_err(Error::Stdout)
}

/// `println!` that returns [`Result`] instead of panicking when stdout fails.
macro_rules! outln {
    () => {
        $crate::out::print(::std::format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::out::print(::std::format_args!("{}\n", ::std::format_args!($($arg)*)))
    };
}
pub(crate) use outln;
