//! What a server offers: [`Export`], a named block device, and what its transmission flags
//! and block sizes say about it.

use std::sync::Arc;

use copy_on_read::{BlockDevice, Populate, RecycledBufs};
use nbd_proto::*;

use crate::depth::{AllocationDepth, LayersDepth};

/// One export: a name, a device, and optionally the device's layered view.
///
/// With layers (the same device seen as [`Populate`], e.g. a `CorDevice`), CACHE populates the
/// local layer (without, CACHE is a read whose data is thrown away) and the export offers the
/// `qemu:allocation-depth` meta context, answered from the layers or, more exactly, by an
/// [`AllocationDepth`] given with [`Export::with_allocation_depth`].
#[derive(Clone)]
pub struct Export {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) device: Arc<dyn BlockDevice>,
    pub(crate) layers: Option<Arc<dyn Populate>>,
    pub(crate) read_only: bool,
    pub(crate) depth: Option<Arc<dyn AllocationDepth>>,
    /// Whether `depth` was given explicitly (then layers do not replace it).
    depth_given: bool,
    /// Read buffers shared by the export's connections (page-aligned, so that an O_DIRECT
    /// image reads into them with no bounce copy), at most [`READ_BUFFER_BYTES`] held.
    pub(crate) pool: Arc<RecycledBufs>,
}

/// The most bytes of read buffers one export keeps for reuse.
pub(crate) const READ_BUFFER_BYTES: usize = 32 << 20;

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("device", &self.device.describe())
            .field("layers", &self.layers.is_some())
            .field("read_only", &self.is_read_only())
            .finish()
    }
}

impl Export {
    /// Export `device` as `name` (the empty name is the default export, as with qemu-nbd).
    pub fn new(name: impl Into<String>, device: Arc<dyn BlockDevice>) -> Export {
        Export {
            name: name.into(),
            description: String::new(),
            device,
            layers: None,
            read_only: false,
            depth: None,
            depth_given: false,
            pool: Arc::new(RecycledBufs::new(READ_BUFFER_BYTES)),
        }
    }

    /// The same device as a layered one (`layers` must be the device this export serves).
    pub fn with_layers(mut self, layers: Arc<dyn Populate>) -> Export {
        if !self.depth_given {
            self.depth = Some(Arc::new(LayersDepth(Arc::clone(&layers))));
        }
        self.layers = Some(layers);
        self
    }

    /// Answers `qemu:allocation-depth` with `depth` (e.g. from the whole backing chain's
    /// maps), whatever the layers say.
    pub fn with_allocation_depth(mut self, depth: Arc<dyn AllocationDepth>) -> Export {
        self.depth = Some(depth);
        self.depth_given = true;
        self
    }

    /// A description for NBD_OPT_LIST and NBD_INFO_DESCRIPTION.
    pub fn with_description(mut self, description: impl Into<String>) -> Export {
        self.description = description.into();
        self
    }

    /// Refuses writes, trims and zeroes with EPERM (a device that cannot write is read-only
    /// whatever this says).
    pub fn read_only(mut self, read_only: bool) -> Export {
        self.read_only = read_only;
        self
    }

    /// The export's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device served.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }

    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.read_only || !self.device.capabilities().writable
    }

    /// The transmission flags for a connection in `mode`.
    ///
    /// CAN_MULTI_CONN is set for every export: all connections share one device, so a FLUSH
    /// on any connection flushes every write any connection has completed, which is what the
    /// flag promises (and reads see every completed write, whichever connection made it).
    pub fn transmission_flags(&self, mode: HeaderMode) -> u16 {
        let mut flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_CACHE | TF_CAN_MULTI_CONN;
        if mode.structured() {
            flags |= TF_SEND_DF;
        }
        if self.is_read_only() {
            flags |= TF_READ_ONLY;
        } else {
            flags |= TF_SEND_FUA | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
            if self.device.capabilities().discard {
                flags |= TF_SEND_TRIM;
            }
        }
        flags
    }

    /// NBD_INFO_BLOCK_SIZE: minimum 1, preferred the device's cluster size (a power of two
    /// from 512 up to `max_request_bytes`) or 4096, maximum `max_request_bytes`.
    pub fn block_size(&self, max_request_bytes: u32) -> (u32, u32, u32) {
        let preferred = self
            .device
            .geometry()
            .cluster_size
            .filter(|c| c.is_power_of_two() && *c >= 512 && *c <= u64::from(max_request_bytes))
            .map_or(4096, |c| c as u32)
            .min(max_request_bytes);
        (1, preferred, max_request_bytes)
    }

    /// The meta contexts this export offers, with their ids.
    pub(crate) fn contexts(&self) -> Vec<(u32, &'static str)> {
        let mut v = vec![(BASE_ALLOCATION_ID, BASE_ALLOCATION)];
        if self.depth.is_some() {
            v.push((ALLOCATION_DEPTH_ID, QEMU_ALLOCATION_DEPTH));
        }
        v
    }
}

/// The id of `base:allocation` (ids are per server; qemu-nbd uses the same two).
pub(crate) const BASE_ALLOCATION_ID: u32 = 0;
/// The id of `qemu:allocation-depth`.
pub(crate) const ALLOCATION_DEPTH_ID: u32 = 1;
