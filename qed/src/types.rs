//! Newtypes for offsets and indices that must not be mixed up. The likeliest bug in a format
//! driver is a guest offset used as a position in the image file: mappings, allocation, L2
//! updates and range locks therefore speak in these types, never in bare `u64`s.
//!
//! - [`GuestOffset`]: a byte of the virtual disk.
//! - [`GuestCluster`]: a cluster of the virtual disk (its index), the unit of mapping.
//! - [`L1Index`]: which L2 table covers a guest cluster, the unit of table locking.
//! - [`HostOffset`]: a byte of the image file.
//! - [`HostCluster`]: a cluster of the image file (its index), the unit of the check's bitmap.

use std::fmt;
use std::ops::{Add, Sub};

use crate::layout::Geometry;

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

impl HostOffset {
    /// The file cluster holding this byte.
    pub fn cluster(self, g: Geometry) -> HostCluster {
        HostCluster(self.0 >> g.cluster_bits())
    }
}

/// A byte offset in the guest's virtual disk.
///
/// A file offset is not a guest offset; mixing them up does not compile:
///
/// ```compile_fail
/// use qed::{HostOffset, Image};
///
/// fn lookup(image: &Image, host: HostOffset) {
///     let _ = image.mapping_at(host, 512); // expected `GuestOffset`, found `HostOffset`
/// }
/// ```
///
/// ```
/// use qed::{GuestOffset, Image};
///
/// fn lookup(image: &Image, guest: GuestOffset) {
///     let _ = image.mapping_at(guest, 512);
/// }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestOffset(pub u64);

impl Add<u64> for GuestOffset {
    type Output = GuestOffset;

    fn add(self, bytes: u64) -> GuestOffset {
        GuestOffset(self.0 + bytes)
    }
}

impl Sub for GuestOffset {
    type Output = u64;

    /// The distance in bytes from `earlier` to `self` (`self >= earlier`).
    fn sub(self, earlier: GuestOffset) -> u64 {
        self.0 - earlier.0
    }
}

impl fmt::Display for GuestOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest offset {:#x}", self.0)
    }
}

impl GuestOffset {
    /// The guest cluster holding this byte.
    pub fn cluster(self, g: Geometry) -> GuestCluster {
        GuestCluster(self.0 >> g.cluster_bits())
    }

    /// The L2 table covering this byte.
    pub fn table(self, g: Geometry) -> L1Index {
        L1Index(g.l1_index(self.0))
    }
}

/// The index of a cluster of the guest's virtual disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestCluster(pub u64);

impl GuestCluster {
    /// The guest offset of the cluster's first byte.
    pub fn start(self, g: Geometry) -> GuestOffset {
        GuestOffset(self.0 << g.cluster_bits())
    }

    /// The L2 table that maps this cluster.
    pub fn table(self, g: Geometry) -> L1Index {
        L1Index(self.0 / g.table_entries())
    }

    /// The cluster's entry in its L2 table.
    pub fn slot(self, g: Geometry) -> usize {
        (self.0 % g.table_entries()) as usize
    }

    /// The next cluster.
    pub fn next(self) -> GuestCluster {
        GuestCluster(self.0 + 1)
    }
}

/// The index of an entry in the L1 table, that is, of the L2 table covering
/// [`Geometry::l2_span`] bytes of the guest's disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct L1Index(pub u64);

/// The index of a cluster of the image file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostCluster(pub u64);

impl HostCluster {
    /// The file offset of the cluster's first byte.
    pub fn start(self, g: Geometry) -> HostOffset {
        HostOffset(self.0 << g.cluster_bits())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_follow_the_geometry() {
        let g = Geometry::new(65536, 4, 1).unwrap();
        let per_table = g.table_entries();
        assert_eq!(GuestOffset(65536 * 3 + 7).cluster(g), GuestCluster(3));
        assert_eq!(GuestCluster(3).start(g), GuestOffset(65536 * 3));
        assert_eq!(GuestOffset(65536 * 3 + 7) - GuestCluster(3).start(g), 7);
        assert_eq!(GuestCluster(per_table + 5).table(g), L1Index(1));
        assert_eq!(GuestCluster(per_table + 5).slot(g), 5);
        assert_eq!(GuestOffset(g.l2_span() * 2).table(g), L1Index(2));
        assert_eq!(HostOffset(65536 * 9 + 1).cluster(g), HostCluster(9));
        assert_eq!(HostCluster(9).start(g), HostOffset(65536 * 9));
    }
}
