//! Newtypes for offsets that must not be mixed up. The likeliest bug in a format driver is a
//! guest offset used as a position in the image file: a mapping therefore hands out file
//! positions as [`HostOffset`], never as a bare `u64`.

use std::fmt;
use std::ops::Add;

/// A byte offset in the image file (as opposed to an offset in the guest's virtual disk).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostOffset(pub u64);

impl Add<u64> for HostOffset {
    type Output = HostOffset;

    fn add(self, bytes: u64) -> HostOffset {
        HostOffset(self.0 + bytes)
    }
}

impl fmt::Display for HostOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "file offset {:#x}", self.0)
    }
}
