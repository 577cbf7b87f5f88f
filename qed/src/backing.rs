//! What an image header says about its backing: the recorded format ([`BackingFormat`]), and
//! the helpers for backing names and probes (from [`crate::names`], re-exported here).
//!
//! `qed` never opens a backing. An image records the name and format its header holds
//! ([`crate::Image::backing_name`], [`crate::Image::backing_format`]); whoever reads the
//! backing opens it through the admission rules in [`crate::gate`] (the `copy-on-read`
//! crate's gate is that one opener).

pub use crate::names::{
    is_protocol_name, normalise, probe_format, probe_storage, resolve_backing_path,
    DEFAULT_MAX_DEPTH, PROBE_BYTES,
};

/// The backing format an image header records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingFormat {
    /// `F_BACKING_FORMAT_NO_PROBE`: raw, never probe.
    Raw,
    /// No format recorded: probe (QED or raw here).
    Probe,
}
