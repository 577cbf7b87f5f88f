//! The qcow2 header, parsed by us from the first cluster of the file: what the gate needs to
//! decide about an image before `imago` reads its tables (the backing name and format, an
//! external data file, encryption, the compression type, whether the L1 table can cover the
//! virtual size). Field offsets and meanings are those of QEMU's `docs/interop/qcow2.txt`;
//! every number is big-endian. Nothing here allocates more than the bytes it is given.

/// The first four bytes of every qcow2 image.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// The bytes a version 2 header has (version 3 adds 32 and a header length).
pub const V2_HEADER_BYTES: usize = 72;
/// The shortest version 3 header.
pub const V3_HEADER_BYTES: usize = 104;
/// The most L1 entries QEMU accepts (`QCOW_MAX_L1_SIZE`, 32 MiB of table).
pub const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;
/// The smallest and largest cluster sizes, as powers of two (512 B to 2 MiB).
pub const CLUSTER_BITS: std::ops::RangeInclusive<u32> = 9..=21;
/// The longest backing file name QEMU writes or reads.
pub const MAX_BACKING_NAME: u32 = 1023;

/// Header extension: the backing file's format name.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: the external data file's name.
const EXT_DATA_FILE: u32 = 0x4441_5441;
/// Header extension: the feature name table, entries of [`FEATURE_NAME_ENTRY`] bytes.
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
/// The size of one feature name table entry (type, bit, a 46-byte name).
const FEATURE_NAME_ENTRY: usize = 48;

/// Incompatible feature bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: the compression type field is not zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;

/// Why a qcow2 header is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The file does not start with the qcow2 magic.
    #[error("not a qcow2 image (no QFI\\xfb magic)")]
    NotQcow2,
    /// The file ends inside the header.
    #[error("the qcow2 header is cut short ({0} bytes)")]
    Truncated(usize),
    /// A version other than 2 or 3.
    #[error("qcow2 version {0} is not supported (only 2 and 3)")]
    Version(u32),
    /// The cluster size is outside 512 B to 2 MiB.
    #[error("invalid qcow2 cluster size 2^{0}")]
    ClusterBits(u32),
    /// The version 3 header length is shorter than the fixed fields or longer than a cluster.
    #[error("invalid qcow2 header length {0}")]
    HeaderLength(u32),
    /// The backing file name lies outside the first cluster, is too long, or is not UTF-8.
    #[error("invalid qcow2 backing file name ({0})")]
    BackingName(&'static str),
    /// A header extension runs past the first cluster or names nothing readable.
    #[error("invalid qcow2 header extension {kind:#x} ({why})")]
    Extension {
        /// The extension's type.
        kind: u32,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The image is encrypted (`crypt_method` 1: AES, 2: LUKS).
    #[error("the image is encrypted ({0}); encrypted qcow2 images are not supported")]
    Encrypted(&'static str),
    /// The compressed clusters use zstd.
    #[error("the image's compressed clusters use zstd, which is not supported (only zlib)")]
    Zstd,
    /// The compressed clusters use a compression type that does not exist.
    #[error("unknown qcow2 compression type {0}")]
    UnknownCompression(u8),
    /// The L1 table is larger than QEMU allows.
    #[error("the qcow2 L1 table has {0} entries, more than the {MAX_L1_ENTRIES} allowed")]
    L1TooBig(u32),
    /// The L1 table cannot map the whole virtual size (QEMU: "L1 table is too small").
    #[error(
        "the qcow2 L1 table ({l1_entries} entries) is too small for a virtual size of {size} bytes"
    )]
    L1TooSmall {
        /// The virtual size the header claims.
        size: u64,
        /// Entries in the L1 table.
        l1_entries: u32,
    },
    /// The image needs an external data file but does not name one.
    #[error("the image needs an external data file but its header names none")]
    DataFileUnnamed,
}

/// What a qcow2 header says, as far as we use it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// The backing file name, if any.
    pub backing_name: Option<String>,
    /// The backing format recorded in the header extension (`raw`, `qcow2`, ...), if any.
    pub backing_format: Option<String>,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// The virtual size in bytes.
    pub size: u64,
    /// 0: none, 1: AES, 2: LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_entries: u32,
    /// Incompatible feature bits (0 for version 2).
    pub incompatible: u64,
    /// log2 of the refcount width in bits (4 for version 2).
    pub refcount_order: u32,
    /// 0: zlib, 1: zstd (version 3 with a header of at least 105 bytes).
    pub compression_type: u8,
    /// The external data file named in the header extension, if any.
    pub data_file: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(v)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(v)
}

impl Header {
    /// Parses the header from the first bytes of the file (at least its first cluster when
    /// the file is that long; what lies past `bytes` counts as absent).
    pub fn parse(bytes: &[u8]) -> Result<Header, HeaderError> {
        if bytes.len() < 4 || bytes[..4] != MAGIC {
            return Err(HeaderError::NotQcow2);
        }
        if bytes.len() < V2_HEADER_BYTES {
            return Err(HeaderError::Truncated(bytes.len()));
        }
        let version = be32(bytes, 4);
        if version != 2 && version != 3 {
            return Err(HeaderError::Version(version));
        }
        let cluster_bits = be32(bytes, 20);
        if !CLUSTER_BITS.contains(&cluster_bits) {
            return Err(HeaderError::ClusterBits(cluster_bits));
        }
        let cluster = 1usize << cluster_bits;
        // Only the first cluster holds the header, its extensions and the backing name.
        let first = &bytes[..bytes.len().min(cluster)];
        let mut header = Header {
            version,
            backing_name: None,
            backing_format: None,
            cluster_bits,
            size: be64(bytes, 24),
            crypt_method: be32(bytes, 32),
            l1_entries: be32(bytes, 36),
            incompatible: 0,
            refcount_order: 4,
            compression_type: 0,
            data_file: None,
        };
        let extensions_at = if version == 3 {
            if first.len() < V3_HEADER_BYTES {
                return Err(HeaderError::Truncated(first.len()));
            }
            header.incompatible = be64(first, 72);
            header.refcount_order = be32(first, 96);
            let length = be32(first, 100);
            if (length as usize) < V3_HEADER_BYTES || length as usize > cluster {
                return Err(HeaderError::HeaderLength(length));
            }
            if length as usize > V3_HEADER_BYTES {
                header.compression_type = first.get(104).copied().unwrap_or(0);
            }
            length as usize
        } else {
            V2_HEADER_BYTES
        };
        header.backing_name = backing_name(first, be64(bytes, 8), be32(bytes, 16))?;
        header.read_extensions(first, extensions_at)?;
        Ok(header)
    }

    /// Reads the header extensions from `at` to their end marker (or the end of `first`).
    fn read_extensions(&mut self, first: &[u8], mut at: usize) -> Result<(), HeaderError> {
        while at + 8 <= first.len() {
            let kind = be32(first, at);
            let length = be32(first, at + 4) as usize;
            if kind == 0 {
                break;
            }
            let data = first
                .get(at + 8..)
                .and_then(|rest| rest.get(..length))
                .ok_or(HeaderError::Extension {
                    kind,
                    why: "runs past the first cluster",
                })?;
            let text = || {
                std::str::from_utf8(data)
                    .map(|s| s.trim_end_matches('\0').to_string())
                    .map_err(|_| HeaderError::Extension {
                        kind,
                        why: "not UTF-8",
                    })
            };
            match kind {
                EXT_BACKING_FORMAT => self.backing_format = Some(text()?),
                EXT_DATA_FILE => self.data_file = Some(text()?),
                // QEMU writes whole entries; a ragged table made the qcow2 crate index past
                // its last entry (the qcow2_image fuzz target's first finding).
                EXT_FEATURE_NAMES if length % FEATURE_NAME_ENTRY != 0 => {
                    return Err(HeaderError::Extension {
                        kind,
                        why: "a feature name table that is not whole 48-byte entries",
                    })
                }
                _ => {}
            }
            at = at + 8 + length.div_ceil(8) * 8;
        }
        Ok(())
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether guest data lives in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.incompatible & INCOMPAT_DATA_FILE != 0
    }

    /// The bytes one L1 entry maps (one L2 table's worth of clusters).
    pub fn l1_entry_span(&self) -> u64 {
        (self.cluster_size() / 8) * self.cluster_size()
    }

    /// Refuses what we do not read: encryption, zstd or unknown compression, an L1 table that
    /// is larger than QEMU allows or cannot map the virtual size, a data file without a name.
    pub fn check_readable(&self) -> Result<(), HeaderError> {
        match self.crypt_method {
            0 => {}
            1 => return Err(HeaderError::Encrypted("AES")),
            2 => return Err(HeaderError::Encrypted("LUKS")),
            _ => return Err(HeaderError::Encrypted("unknown method")),
        }
        if self.incompatible & INCOMPAT_COMPRESSION != 0 || self.compression_type != 0 {
            return Err(match self.compression_type {
                1 => HeaderError::Zstd,
                0 => HeaderError::UnknownCompression(0),
                other => HeaderError::UnknownCompression(other),
            });
        }
        if u64::from(self.l1_entries) > MAX_L1_ENTRIES {
            return Err(HeaderError::L1TooBig(self.l1_entries));
        }
        let covered = u128::from(self.l1_entries) * u128::from(self.l1_entry_span());
        if u128::from(self.size) > covered {
            return Err(HeaderError::L1TooSmall {
                size: self.size,
                l1_entries: self.l1_entries,
            });
        }
        if self.has_data_file() && self.data_file.is_none() {
            return Err(HeaderError::DataFileUnnamed);
        }
        Ok(())
    }
}

/// The backing name at `offset` (`length` bytes), which must lie in the first cluster.
fn backing_name(first: &[u8], offset: u64, length: u32) -> Result<Option<String>, HeaderError> {
    if offset == 0 || length == 0 {
        return Ok(None);
    }
    if length > MAX_BACKING_NAME {
        return Err(HeaderError::BackingName("longer than 1023 bytes"));
    }
    let bytes = usize::try_from(offset)
        .ok()
        .and_then(|o| first.get(o..)?.get(..length as usize))
        .ok_or(HeaderError::BackingName("outside the first cluster"))?;
    std::str::from_utf8(bytes)
        .map(|s| Some(s.to_string()))
        .map_err(|_| HeaderError::BackingName("not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version 3 header of 112 bytes in a 64 KiB cluster, 1 GiB, 2 L1 entries.
    fn v3() -> Vec<u8> {
        let mut b = vec![0u8; 65536];
        b[..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        b[36..40].copy_from_slice(&2u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        b
    }

    #[test]
    fn a_plain_header_parses_and_is_readable() {
        let h = Header::parse(&v3()).unwrap();
        assert_eq!((h.version, h.size, h.cluster_size()), (3, 1 << 30, 65536));
        h.check_readable().unwrap();
    }

    #[test]
    fn each_refusal_names_its_cause() {
        let mut b = v3();
        b[32..36].copy_from_slice(&2u32.to_be_bytes());
        let e = Header::parse(&b).unwrap().check_readable().unwrap_err();
        assert!(e.to_string().contains("encrypted"), "{e}");
        let mut b = v3();
        b[72..80].copy_from_slice(&INCOMPAT_COMPRESSION.to_be_bytes());
        b[104] = 1;
        let e = Header::parse(&b).unwrap().check_readable().unwrap_err();
        assert!(e.to_string().contains("zstd"), "{e}");
        let mut b = v3();
        b[24..32].copy_from_slice(&(1u64 << 62).to_be_bytes());
        let e = Header::parse(&b).unwrap().check_readable().unwrap_err();
        assert!(matches!(e, HeaderError::L1TooSmall { .. }), "{e}");
        let mut b = v3();
        b[8..16].copy_from_slice(&65530u64.to_be_bytes());
        b[16..20].copy_from_slice(&100u32.to_be_bytes());
        assert!(matches!(
            Header::parse(&b),
            Err(HeaderError::BackingName(_))
        ));
        let mut b = v3();
        b[112..116].copy_from_slice(&EXT_DATA_FILE.to_be_bytes());
        b[116..120].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            Header::parse(&b),
            Err(HeaderError::Extension { .. })
        ));
    }

    #[test]
    fn a_feature_name_table_of_whole_entries_only() {
        let with_table = |len: usize| {
            let mut b = v3();
            b.resize(4096, 0);
            b[112..116].copy_from_slice(&EXT_FEATURE_NAMES.to_be_bytes());
            b[116..120].copy_from_slice(&(len as u32).to_be_bytes());
            Header::parse(&b)
        };
        with_table(96).unwrap();
        for ragged in [1, 47, 49, 97] {
            let e = with_table(ragged).unwrap_err();
            assert!(e.to_string().contains("48-byte entries"), "{ragged}: {e}");
        }
    }

    #[test]
    fn short_or_foreign_input_is_refused_without_panicking() {
        for n in 0..V3_HEADER_BYTES + 8 {
            let _ = Header::parse(&v3()[..n]);
        }
        assert_eq!(Header::parse(b"QED\0"), Err(HeaderError::NotQcow2));
    }
}
