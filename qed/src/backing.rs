//! Backing images read through `qed` itself: a raw file ([`RawBacking`]) or a QED image
//! ([`QedBacking`]) as what the clusters an image lacks are read from, for chains opened with
//! `BackingPolicy::Open` (the gate that opens them is [`crate::gate::FileGate`]). The helpers
//! for backing names and probes live in [`crate::names`] and are re-exported here.

use crate::chain::Chain;
use crate::error::{Error, Result};
use crate::image::Image;
pub use crate::layer::{BackingDescription, BackingFormat, BackingOpener, BackingRead};
use crate::layout::SECTOR;
pub use crate::names::{
    is_protocol_name, normalise, probe_format, probe_storage, resolve_backing_path,
    DEFAULT_MAX_DEPTH, PROBE_BYTES,
};
use crate::storage::Storage;

/// A raw backing file: its bytes are the virtual disk. Its length is rounded up to 512 bytes,
/// as QEMU's block layer does.
#[derive(Debug)]
pub struct RawBacking {
    storage: Box<dyn Storage>,
    size: u64,
    name: String,
}

impl RawBacking {
    /// Wraps storage as a raw backing named `name`.
    pub fn new(storage: Box<dyn Storage>, name: String) -> Result<RawBacking> {
        let len = storage.len().map_err(Error::io("sizing raw backing", 0))?;
        Ok(RawBacking {
            storage,
            size: len.div_ceil(SECTOR) * SECTOR,
            name,
        })
    }
}

impl BackingRead for RawBacking {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.storage
            .read_at(buf, offset)
            .map_err(Error::io("reading raw backing", offset))
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn next_data(&self, offset: u64) -> Result<Option<u64>> {
        self.storage
            .next_data(offset)
            .map_err(Error::io("seeking data in raw backing", offset))
    }

    fn describe(&self) -> BackingDescription {
        BackingDescription {
            filename: self.name.clone(),
            format: "raw".into(),
            virtual_size: self.size,
            backing: None,
            backing_filename: None,
            cluster_size: None,
        }
    }
}

/// A QED image used as a backing: reads go through its own mapping and backing chain (a
/// [`Chain`]: the image itself never reads its backing), and past its virtual size read as
/// zeros.
#[derive(Debug)]
pub struct QedBacking {
    image: Chain,
    name: String,
}

impl QedBacking {
    /// Wraps an opened image (over the backing it opened).
    pub fn new(image: Image, name: String) -> QedBacking {
        QedBacking {
            image: Chain::new(image),
            name,
        }
    }
}

impl BackingRead for QedBacking {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.image.size();
        let inside = if offset >= size {
            0
        } else {
            (size - offset).min(buf.len() as u64) as usize
        };
        // Past the backing's end there is nothing to ask the image for (and an empty read
        // there would be out of range): those bytes are zeros.
        if inside > 0 {
            self.image.read_at(&mut buf[..inside], offset)?;
        }
        buf[inside..].fill(0);
        Ok(())
    }

    fn size(&self) -> u64 {
        self.image.size()
    }

    fn describe(&self) -> BackingDescription {
        BackingDescription {
            filename: self.name.clone(),
            format: "qed".into(),
            virtual_size: self.image.size(),
            backing: self.image.backing().map(|b| Box::new(b.describe())),
            backing_filename: self.image.backing_name(),
            cluster_size: Some(self.image.geometry().cluster_size()),
        }
    }
}
