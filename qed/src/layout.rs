//! The QED on-disk layout, in one place: the 64-byte header, the feature bits, the geometry
//! rules and the table entries. Everything here is pure: bytes in, values out (and back).
//!
//! All integers are little-endian. The words in the field docs follow QEMU's
//! `docs/interop/qed_spec.txt`.

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::error::{Error, HeaderField};

/// `"QED\0"` read as a little-endian u32.
pub const MAGIC: u32 = 0x0044_4551;
/// The size of the fixed header struct at file offset 0.
pub const HEADER_SIZE_BYTES: usize = 64;
/// Smallest cluster size the spec allows (4 KiB).
pub const MIN_CLUSTER_SIZE: u32 = 4096;
/// Largest cluster size the spec allows (64 MiB).
pub const MAX_CLUSTER_SIZE: u32 = 1 << 26;
/// Largest table size the spec allows, in clusters.
pub const MAX_TABLE_SIZE: u32 = 16;
/// QEMU's defaults for `qemu-img create -f qed`.
pub const DEFAULT_CLUSTER_SIZE: u32 = 65536;
/// QEMU's default table size, in clusters.
pub const DEFAULT_TABLE_SIZE: u32 = 4;
/// The longest backing file name QEMU reads (its buffer is `PATH_MAX`, the name must be shorter).
pub const MAX_BACKING_NAME: u32 = 4096;
/// The largest virtual disk QEMU's block layer addresses (`BDRV_MAX_LENGTH`: `INT64_MAX`
/// aligned down to 1 GiB). Larger sizes are refused in headers, at create and at resize.
pub const MAX_VIRTUAL_SIZE: u64 = (i64::MAX as u64) & !((1 << 30) - 1);
/// Table writes are done in units of this many bytes (a sector): the unit QEMU assumes atomic.
pub const SECTOR: u64 = 512;

/// Feature bit: the image has a backing file, named at (offset, size).
pub const F_BACKING_FILE: u64 = 0x01;
/// Feature bit: the image may be inconsistent and must be checked before read-write use.
pub const F_NEED_CHECK: u64 = 0x02;
/// Feature bit: the backing file is raw; never probe its format.
pub const F_BACKING_FORMAT_NO_PROBE: u64 = 0x04;
/// Every feature bit this implementation knows.
pub const KNOWN_FEATURES: u64 = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE;

/// L1/L2 entry meaning "nothing here": the backing file (or zeros) shows through.
pub const ENTRY_UNALLOCATED: u64 = 0;
/// L2 entry meaning "this cluster reads as zeros" (no storage, no backing fall-through).
pub const ENTRY_ZERO: u64 = 1;

/// The 64-byte header exactly as it is on disk, field by field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Must be [`MAGIC`].
    pub magic: u32,
    /// Bytes per cluster: a power of two in [4 KiB, 64 MiB].
    pub cluster_size: u32,
    /// Clusters per table (L1 and every L2): a power of two in [1, 16].
    pub table_size: u32,
    /// Clusters taken by the header (QEMU writes 1).
    pub header_size: u32,
    /// Features an implementation must understand to open the image.
    pub features: u64,
    /// Features an implementation may ignore.
    pub compat_features: u64,
    /// Features an implementation clears when it opens the image read-write without knowing them.
    pub autoclear_features: u64,
    /// File offset of the L1 table.
    pub l1_table_offset: u64,
    /// Virtual disk size in bytes (a multiple of 512).
    pub image_size: u64,
    /// File offset of the backing file name (only meaningful with [`F_BACKING_FILE`]).
    pub backing_filename_offset: u32,
    /// Length of the backing file name in bytes, no terminator.
    pub backing_filename_size: u32,
}

impl Header {
    /// Decodes the first 64 bytes of an image. Checks nothing but the length: see
    /// [`Geometry::from_header`] and [`Header::validate`] for the rules.
    pub fn decode(bytes: &[u8]) -> Result<Header, Error> {
        if bytes.len() < HEADER_SIZE_BYTES {
            return Err(Error::Truncated {
                what: "header",
                needed: HEADER_SIZE_BYTES as u64,
                found: bytes.len() as u64,
            });
        }
        Ok(Header {
            magic: LE::read_u32(&bytes[0..4]),
            cluster_size: LE::read_u32(&bytes[4..8]),
            table_size: LE::read_u32(&bytes[8..12]),
            header_size: LE::read_u32(&bytes[12..16]),
            features: LE::read_u64(&bytes[16..24]),
            compat_features: LE::read_u64(&bytes[24..32]),
            autoclear_features: LE::read_u64(&bytes[32..40]),
            l1_table_offset: LE::read_u64(&bytes[40..48]),
            image_size: LE::read_u64(&bytes[48..56]),
            backing_filename_offset: LE::read_u32(&bytes[56..60]),
            backing_filename_size: LE::read_u32(&bytes[60..64]),
        })
    }

    /// Encodes the header into its 64 on-disk bytes.
    pub fn encode(&self) -> [u8; HEADER_SIZE_BYTES] {
        let mut b = [0u8; HEADER_SIZE_BYTES];
        LE::write_u32(&mut b[0..4], self.magic);
        LE::write_u32(&mut b[4..8], self.cluster_size);
        LE::write_u32(&mut b[8..12], self.table_size);
        LE::write_u32(&mut b[12..16], self.header_size);
        LE::write_u64(&mut b[16..24], self.features);
        LE::write_u64(&mut b[24..32], self.compat_features);
        LE::write_u64(&mut b[32..40], self.autoclear_features);
        LE::write_u64(&mut b[40..48], self.l1_table_offset);
        LE::write_u64(&mut b[48..56], self.image_size);
        LE::write_u32(&mut b[56..60], self.backing_filename_offset);
        LE::write_u32(&mut b[60..64], self.backing_filename_size);
        b
    }

    /// Applies QEMU's open-time rules in QEMU's order (magic, features, cluster size, table
    /// size, image size, L1 offset, header size, backing name bounds), given the file length.
    /// Returns the geometry on success.
    pub fn validate(&self, file_len: u64) -> Result<Geometry, Error> {
        if self.magic != MAGIC {
            return Err(Error::NotQed);
        }
        if self.features & !KNOWN_FEATURES != 0 {
            return Err(Error::UnsupportedFeatures(self.features & !KNOWN_FEATURES));
        }
        let geometry = Geometry::from_header(self)?;
        if self.image_size > MAX_VIRTUAL_SIZE {
            return Err(Error::InvalidHeader {
                field: HeaderField::ImageSize,
                value: self.image_size,
                reason: "larger than QEMU's maximum disk size (2^63 - 2^30 bytes)",
            });
        }
        if self.image_size % SECTOR != 0 || self.image_size > geometry.max_image_size() {
            return Err(Error::InvalidHeader {
                field: HeaderField::ImageSize,
                value: self.image_size,
                reason: "must be a multiple of 512 and at most the geometry's maximum size",
            });
        }
        let file_size = geometry.round_down_to_cluster(file_len);
        if !geometry.is_valid_table_offset(self.l1_table_offset, file_size) {
            return Err(Error::InvalidHeader {
                field: HeaderField::L1TableOffset,
                value: self.l1_table_offset,
                reason:
                    "the L1 table must be cluster aligned, after the header and inside the file",
            });
        }
        if self.features & F_BACKING_FILE != 0 {
            let end =
                u64::from(self.backing_filename_offset) + u64::from(self.backing_filename_size);
            if end > geometry.header_bytes() {
                return Err(Error::InvalidHeader {
                    field: HeaderField::BackingFilename,
                    value: end,
                    reason: "the backing file name runs past the header clusters",
                });
            }
            if self.backing_filename_size >= MAX_BACKING_NAME {
                return Err(Error::InvalidHeader {
                    field: HeaderField::BackingFilename,
                    value: u64::from(self.backing_filename_size),
                    reason: "the backing file name is longer than 4095 bytes",
                });
            }
        }
        Ok(geometry)
    }

    /// True when the header names a backing file.
    pub fn has_backing_file(&self) -> bool {
        self.features & F_BACKING_FILE != 0
    }
}

/// The shape of an image: cluster size, table size, header size and what follows from them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    cluster_size: u32,
    table_size: u32,
    header_size: u32,
    cluster_bits: u32,
    /// log2 of the number of entries per table.
    table_bits: u32,
}

impl Geometry {
    /// Checks cluster size, table size and header size as QEMU does at open, in that order.
    pub fn from_header(h: &Header) -> Result<Geometry, Error> {
        Self::new(h.cluster_size, h.table_size, h.header_size)
    }

    /// A geometry from its three numbers, checked against the spec.
    pub fn new(cluster_size: u32, table_size: u32, header_size: u32) -> Result<Geometry, Error> {
        if !cluster_size.is_power_of_two()
            || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cluster_size)
        {
            return Err(Error::InvalidHeader {
                field: HeaderField::ClusterSize,
                value: u64::from(cluster_size),
                reason: "must be a power of two from 4 KiB to 64 MiB",
            });
        }
        if !table_size.is_power_of_two() || table_size > MAX_TABLE_SIZE {
            return Err(Error::InvalidHeader {
                field: HeaderField::TableSize,
                value: u64::from(table_size),
                reason: "must be a power of two from 1 to 16",
            });
        }
        if header_size == 0 || u64::from(header_size) > u64::from(u32::MAX / cluster_size) {
            return Err(Error::InvalidHeader {
                field: HeaderField::HeaderSize,
                value: u64::from(header_size),
                reason: "must be at least 1 cluster and at most 4 GiB in bytes",
            });
        }
        let cluster_bits = cluster_size.trailing_zeros();
        let table_bits = table_size.trailing_zeros() + cluster_bits - 3;
        Ok(Geometry {
            cluster_size,
            table_size,
            header_size,
            cluster_bits,
            table_bits,
        })
    }

    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        u64::from(self.cluster_size)
    }

    /// Clusters per table.
    pub fn table_size(&self) -> u32 {
        self.table_size
    }

    /// Clusters in the header.
    pub fn header_size(&self) -> u32 {
        self.header_size
    }

    /// log2 of the cluster size.
    pub fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }

    /// Entries per table (L1 and L2 alike).
    pub fn table_entries(&self) -> u64 {
        1 << self.table_bits
    }

    /// Bytes per table.
    pub fn table_bytes(&self) -> u64 {
        u64::from(self.table_size) * self.cluster_size()
    }

    /// Bytes of the header clusters.
    pub fn header_bytes(&self) -> u64 {
        u64::from(self.header_size) * self.cluster_size()
    }

    /// Guest bytes covered by one L2 table.
    pub fn l2_span(&self) -> u64 {
        1 << (self.cluster_bits + self.table_bits)
    }

    /// The largest virtual size the tables can address: entries² · cluster size, computed
    /// without overflow (saturating at `u64::MAX`).
    pub fn max_image_size(&self) -> u64 {
        let bits = 2 * self.table_bits + self.cluster_bits;
        if bits >= 64 {
            u64::MAX
        } else {
            1u64 << bits
        }
    }

    /// The maximum size as QEMU 10 computes it: in 64 bits with wrap-around, so geometries
    /// with 2·log2(entries) + log2(cluster) ≥ 64 give 0 and every non-zero size is refused.
    pub fn qemu_max_image_size(&self) -> u64 {
        let bits = 2 * self.table_bits + self.cluster_bits;
        if bits >= 64 {
            0
        } else {
            1u64 << bits
        }
    }

    /// Index into the L1 table for a guest offset.
    pub fn l1_index(&self, guest: u64) -> u64 {
        guest >> (self.cluster_bits + self.table_bits)
    }

    /// Index into an L2 table for a guest offset.
    pub fn l2_index(&self, guest: u64) -> u64 {
        (guest >> self.cluster_bits) & (self.table_entries() - 1)
    }

    /// Offset of a byte within its cluster.
    pub fn offset_in_cluster(&self, offset: u64) -> u64 {
        offset & (self.cluster_size() - 1)
    }

    /// Rounds down to a whole cluster.
    pub fn round_down_to_cluster(&self, offset: u64) -> u64 {
        offset & !(self.cluster_size() - 1)
    }

    /// Rounds up to a whole cluster (saturating).
    pub fn round_up_to_cluster(&self, offset: u64) -> u64 {
        let mask = !(self.cluster_size() - 1);
        offset
            .checked_add(self.cluster_size() - 1)
            .map_or(mask, |v| v & mask)
    }

    /// Number of clusters needed for `bytes` bytes.
    pub fn clusters_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size())
    }

    /// QEMU's test for a data cluster offset: cluster aligned, past the header, inside the file.
    pub fn is_valid_cluster_offset(&self, offset: u64, file_size: u64) -> bool {
        self.offset_in_cluster(offset) == 0 && offset >= self.header_bytes() && offset < file_size
    }

    /// QEMU's test for a table offset: the first and the last cluster of the table are valid
    /// cluster offsets. (Unlike QEMU, a table of one cluster is accepted, as the spec allows.)
    pub fn is_valid_table_offset(&self, offset: u64, file_size: u64) -> bool {
        let Some(last) = offset.checked_add(u64::from(self.table_size - 1) * self.cluster_size())
        else {
            return false;
        };
        self.is_valid_cluster_offset(offset, file_size)
            && self.is_valid_cluster_offset(last, file_size)
    }
}

/// What an L2 entry says about one guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Entry {
    /// Entry 0: the backing file (or zeros without one) shows through.
    Unallocated,
    /// Entry 1: the cluster reads as zeros.
    Zero,
    /// Any other value: the file offset of the cluster's data (validity not yet checked).
    Data(u64),
}

impl L2Entry {
    /// Interprets a raw entry.
    pub fn from_raw(raw: u64) -> L2Entry {
        match raw {
            ENTRY_UNALLOCATED => L2Entry::Unallocated,
            ENTRY_ZERO => L2Entry::Zero,
            offset => L2Entry::Data(offset),
        }
    }

    /// The raw on-disk value.
    pub fn to_raw(self) -> u64 {
        match self {
            L2Entry::Unallocated => ENTRY_UNALLOCATED,
            L2Entry::Zero => ENTRY_ZERO,
            L2Entry::Data(offset) => offset,
        }
    }
}

/// Decodes a table's bytes into entries. `bytes.len()` must be a multiple of 8.
pub fn decode_table(bytes: &[u8]) -> Vec<u64> {
    bytes.chunks_exact(8).map(LE::read_u64).collect()
}

/// Encodes entries into table bytes.
pub fn encode_table(entries: &[u64]) -> Vec<u8> {
    let mut out = vec![0u8; entries.len() * 8];
    LE::write_u64_into(entries, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn qemu_default_header() -> Header {
        Header {
            magic: MAGIC,
            cluster_size: 65536,
            table_size: 4,
            header_size: 1,
            features: F_BACKING_FILE | F_BACKING_FORMAT_NO_PROBE,
            compat_features: 0,
            autoclear_features: 0,
            l1_table_offset: 0x10000,
            image_size: 0x800000,
            backing_filename_offset: 0x40,
            backing_filename_size: 8,
        }
    }

    #[test]
    fn encodes_the_annotated_qemu_header() {
        // qed-format.md §1.4: `qemu-img create -f qed -b base.raw -F raw b.qed 8M`.
        let expected: [u8; 64] = [
            0x51, 0x45, 0x44, 0x00, 0x00, 0x00, 0x01, 0x00, 0x04, 0x00, 0x00, 0x00, 0x01, 0x00,
            0x00, 0x00, 0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x40, 0x00, 0x00, 0x00, 0x08, 0x00, 0x00, 0x00,
        ];
        assert_eq!(qemu_default_header().encode(), expected);
        assert_eq!(Header::decode(&expected).unwrap(), qemu_default_header());
    }

    #[test]
    fn default_geometry_matches_qemu() {
        let g = Geometry::new(65536, 4, 1).unwrap();
        assert_eq!(g.table_entries(), 32768);
        assert_eq!(g.l2_span(), 2 << 30);
        assert_eq!(g.max_image_size(), 64 << 40);
        assert_eq!(
            Geometry::new(4096, 4, 1).unwrap().max_image_size(),
            16 << 30
        );
        assert_eq!(
            Geometry::new(4096, 16, 1).unwrap().max_image_size(),
            256 << 30
        );
    }

    #[test]
    fn qemu_overflowing_geometries_are_detected() {
        // 2M/ts16 and 4M/ts4 wrap to 0 in QEMU; 4M/ts2 works.
        assert_eq!(
            Geometry::new(2 << 20, 16, 1).unwrap().qemu_max_image_size(),
            0
        );
        assert_eq!(
            Geometry::new(4 << 20, 4, 1).unwrap().qemu_max_image_size(),
            0
        );
        assert_ne!(
            Geometry::new(4 << 20, 2, 1).unwrap().qemu_max_image_size(),
            0
        );
    }

    #[test]
    fn bad_geometry_is_refused() {
        assert!(Geometry::new(2048, 4, 1).is_err());
        assert!(Geometry::new(65537, 4, 1).is_err());
        assert!(Geometry::new(1 << 27, 4, 1).is_err());
        assert!(Geometry::new(65536, 3, 1).is_err());
        assert!(Geometry::new(65536, 32, 1).is_err());
        assert!(Geometry::new(65536, 0, 1).is_err());
        assert!(Geometry::new(65536, 4, 0).is_err());
        assert!(Geometry::new(65536, 4, 65536).is_err());
    }

    #[test]
    fn table_size_one_is_valid_for_reading() {
        let g = Geometry::new(4096, 1, 1).unwrap();
        assert!(g.is_valid_table_offset(4096, 8192));
        assert!(!g.is_valid_table_offset(8192, 8192));
    }

    proptest! {
        #[test]
        fn header_round_trips(
            cluster_size in any::<u32>(), table_size in any::<u32>(), header_size in any::<u32>(),
            features in any::<u64>(), compat in any::<u64>(), autoclear in any::<u64>(),
            l1 in any::<u64>(), size in any::<u64>(), bfo in any::<u32>(), bfs in any::<u32>(),
        ) {
            let h = Header {
                magic: MAGIC, cluster_size, table_size, header_size, features,
                compat_features: compat, autoclear_features: autoclear, l1_table_offset: l1,
                image_size: size, backing_filename_offset: bfo, backing_filename_size: bfs,
            };
            prop_assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        }

        #[test]
        fn table_round_trips(entries in proptest::collection::vec(any::<u64>(), 0..64)) {
            prop_assert_eq!(decode_table(&encode_table(&entries)), entries);
        }

        #[test]
        fn index_math_is_consistent(cb in 12u32..=26, tb in 0u32..=4, guest in any::<u64>()) {
            let g = Geometry::new(1 << cb, 1 << tb, 1).unwrap();
            let guest = guest % g.max_image_size().max(1);
            let rebuilt = (g.l1_index(guest) * g.l2_span())
                + (g.l2_index(guest) << g.cluster_bits())
                + g.offset_in_cluster(guest);
            prop_assert_eq!(rebuilt, guest);
        }
    }
}
