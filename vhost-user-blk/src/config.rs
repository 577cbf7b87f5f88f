//! The virtio-blk device's face to the driver: feature bits and the configuration space.
//!
//! Numbers are those of the virtio 1.2 specification, section 5.2 (`virtio-bindings` names
//! them); the configuration space is encoded by hand, little-endian, at the specification's
//! offsets, so no `repr(C)` struct of ours has to match the driver's layout.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// The sector of virtio-blk requests: 512 bytes, whatever `blk_size` says.
pub const SECTOR_SIZE: u64 = 512;

/// The number of descriptors of every queue the device offers (QEMU's default for
/// vhost-user-blk-pci).
pub const QUEUE_SIZE: u16 = 256;

/// The largest number of data segments in one request (`seg_max`): the queue size less the
/// header and the status descriptor, as QEMU's virtio-blk.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

/// The largest number of ranges in one DISCARD or WRITE_ZEROES request.
pub const MAX_RANGES: u32 = 1;

/// The largest number of sectors one DISCARD or WRITE_ZEROES range may name (32 MiB).
pub const MAX_RANGE_SECTORS: u32 = 65536;

/// The size of the configuration space this device fills (up to `write_zeroes_may_unmap`
/// and its padding); bytes past it read as zeros.
pub const CONFIG_LEN: usize = 60;

/// What the device looks like to a driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// The device size in bytes (capacity is its whole 512-byte sectors).
    pub size: u64,
    /// The logical block size the driver should use (`blk_size`).
    pub block_size: u32,
    /// The number of request queues (`num_queues`, at least 1).
    pub num_queues: u16,
    /// Writes are refused (feature RO).
    pub read_only: bool,
    /// DISCARD is offered (the device frees space).
    pub discard: bool,
}

impl DeviceConfig {
    /// The capacity in 512-byte sectors (a trailing partial sector is not visible).
    pub fn capacity_sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// The virtio feature bits the device offers.
    pub fn features(&self) -> u64 {
        let mut bits = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_MQ,
        ]
        .iter()
        .fold(0u64, |acc, b| acc | 1 << b);
        if self.read_only {
            bits |= 1 << VIRTIO_BLK_F_RO;
        } else {
            bits |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
            if self.discard {
                bits |= 1 << VIRTIO_BLK_F_DISCARD;
            }
        }
        bits
    }

    /// The configuration space, [`CONFIG_LEN`] bytes.
    pub fn encode(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let sectors_per_block = (self.block_size as u64 / SECTOR_SIZE).max(1) as u32;
        put(&mut c, 0, &self.capacity_sectors().to_le_bytes());
        put(&mut c, 12, &SEG_MAX.to_le_bytes());
        put(&mut c, 20, &self.block_size.to_le_bytes());
        put(&mut c, 34, &self.num_queues.to_le_bytes());
        put(&mut c, 36, &MAX_RANGE_SECTORS.to_le_bytes());
        put(&mut c, 40, &MAX_RANGES.to_le_bytes());
        put(&mut c, 44, &sectors_per_block.to_le_bytes());
        put(&mut c, 48, &MAX_RANGE_SECTORS.to_le_bytes());
        put(&mut c, 52, &MAX_RANGES.to_le_bytes());
        c[56] = u8::from(self.discard);
        c
    }

    /// `size` bytes of the configuration space from `offset` (zeros past what the device
    /// fills; nothing when the window is absurd).
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        const LIMIT: u32 = 4096;
        if size > LIMIT || offset > LIMIT {
            return Vec::new();
        }
        let space = self.encode();
        (offset..offset + size)
            .map(|i| space.get(i as usize).copied().unwrap_or(0))
            .collect()
    }
}

fn put(space: &mut [u8], at: usize, bytes: &[u8]) {
    space[at..at + bytes.len()].copy_from_slice(bytes);
}
