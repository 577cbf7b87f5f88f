//! `qemu:allocation-depth`: how deep in a backing chain each range is allocated (1: the top
//! image, 2: its backing, ...; 0: no layer has it), behind a small trait so that whoever knows
//! the whole chain can answer exactly.

use std::fmt;
use std::sync::Arc;

use copy_on_read::{IoFuture, Populate};

/// A run of one allocation depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DepthRun {
    /// Bytes.
    pub length: u64,
    /// 0: unallocated in every layer; 1: the top image; 2: its backing; ...
    pub depth: u32,
}

/// What answers `qemu:allocation-depth` for an export.
pub trait AllocationDepth: Send + Sync + fmt::Debug {
    /// Runs covering a non-empty prefix of `[offset, offset + length)`, in order.
    fn allocation_depth(&self, offset: u64, length: u64) -> IoFuture<'_, Vec<DepthRun>>;
}

/// The answer a layered device gives by itself: 1 where its own image has the range (data or
/// zero clusters), 2 where the backing shows through, 0 without a backing. This is what
/// qemu-nbd reports for one image over a raw file or an NBD export (QEMU counts such a
/// backing as allocated everywhere, past its end too). Below a QED backing it cannot tell the
/// layers apart (it says 2 where QEMU says 3 or 0): give such an export an exact
/// [`AllocationDepth`] ([`crate::Export::with_allocation_depth`]).
#[derive(Debug)]
pub(crate) struct LayersDepth(pub Arc<dyn Populate>);

impl AllocationDepth for LayersDepth {
    fn allocation_depth(&self, offset: u64, length: u64) -> IoFuture<'_, Vec<DepthRun>> {
        Box::pin(async move {
            let below = if self.0.backing().is_some() { 2 } else { 0 };
            let end = offset.saturating_add(length);
            let mut pos = offset;
            let mut runs = Vec::new();
            for e in self.0.local_map(offset, length).await? {
                let (from, to) = (
                    e.offset.max(pos),
                    e.offset.saturating_add(e.length).min(end),
                );
                if from != pos || to <= from {
                    break; // Not contiguous: answer the prefix.
                }
                let depth = if e.local { 1 } else { below };
                runs.push(DepthRun {
                    length: to - from,
                    depth,
                });
                pos = to;
            }
            Ok(runs)
        })
    }
}
