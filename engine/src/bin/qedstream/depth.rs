//! `qemu:allocation-depth` for a served QED image over a QED backing chain, exact at every
//! depth, as `qemu-nbd -A` reports it: 1 where the served image has the range, 2 where its
//! backing does, 3 below that, ...; a raw file or NBD export at the bottom counts as
//! allocated everywhere (as QEMU counts it); 0 where no layer has the range.
//!
//! Depth 1 comes from the copy-on-read device's own map ([`Populate::local_map`]), live, so
//! what the guest and the stream copy in shows at once; nothing reads the served image's
//! metadata behind the device's back. The layers below come from the backing chain's maps,
//! read once when `serve` starts: `serve` never writes a backing, and while it runs its
//! locks keep every other writer out of them. Once the stream drops the backing link, what
//! is not local is 0.
//!
//! Over a raw or NBD backing the `nbd-server` crate's default (1, 2, 0) is already exact, so
//! this is only built for a QED backing.

use std::path::Path;
use std::sync::Arc;

use copy_on_read::gate::OpenedLayer;
use copy_on_read::{Gate, IoFuture, Populate};
use nbd_server::{AllocationDepth, DepthRun};
use qed::{BackingFormat, GuestOffset, Image, Mapping};

use crate::error::{Error, Result};

/// Where one layer below the served image has data or zeros.
#[derive(Debug)]
struct LayerRuns {
    /// Its allocation depth (2: the served image's backing).
    depth: u32,
    /// `[start, end)`, sorted, disjoint, adjacent runs merged.
    runs: Vec<(u64, u64)>,
}

impl LayerRuns {
    /// The layer's runs from its own map.
    fn of(image: &Image, depth: u32) -> qed::Result<LayerRuns> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for e in image.map(GuestOffset(0), image.size())? {
            if e.mapping == Mapping::Unallocated || e.length == 0 {
                continue;
            }
            let (start, end) = (e.offset.0, e.offset.0.saturating_add(e.length));
            match runs.last_mut() {
                Some(last) if last.1 == start => last.1 = end,
                _ => runs.push((start, end)),
            }
        }
        Ok(LayerRuns { depth, runs })
    }

    /// `Ok(end)` of the run holding `pos`, or `Err(start)` of the next run (`u64::MAX`: none).
    fn at(&self, pos: u64) -> std::result::Result<u64, u64> {
        let i = self.runs.partition_point(|&(_, end)| end <= pos);
        match self.runs.get(i) {
            Some(&(start, end)) if start <= pos => Ok(end),
            Some(&(start, _)) => Err(start),
            None => Err(u64::MAX),
        }
    }
}

/// The exact allocation depth of a served QED image over a QED backing chain.
#[derive(Debug)]
pub struct ChainDepth {
    top: Arc<dyn Populate>,
    /// The QED layers below the served image, shallowest first.
    below: Vec<LayerRuns>,
    /// The depth where no QED layer below has a range: a raw file or NBD export at the
    /// bottom, or 0.
    bottom: u32,
}

impl ChainDepth {
    /// For `top` (the served device over `image` at `path`): `None` when its backing is not
    /// QED (raw, an NBD export, none), where the default answer is exact. Opens the backing
    /// chain through `gate` (read-only), reads each QED layer's map, and closes it again.
    pub async fn open(
        top: Arc<dyn Populate>,
        image: &Image,
        path: &Path,
        gate: &Gate,
    ) -> Result<Option<ChainDepth>> {
        let name = image.backing_name().unwrap_or_default();
        let probe = image.backing_format() == Some(BackingFormat::Probe);
        if !probe || name.starts_with("nbd") || name.starts_with("json:") {
            return Ok(None);
        }
        let layers = gate
            .open_chain(image, path, 0)
            .await
            .map_err(Error::device)?;
        if !matches!(layers.first(), Some(OpenedLayer::Qed { .. })) {
            return Ok(None);
        }
        // Reading L2 tables blocks: off the runtime's async workers.
        tokio::task::block_in_place(|| ChainDepth::of_layers(top, &layers))
            .map(Some)
            .map_err(|e| Error::image(path, e))
    }

    fn of_layers(top: Arc<dyn Populate>, layers: &[OpenedLayer]) -> qed::Result<ChainDepth> {
        let mut below = Vec::new();
        let mut bottom = 0;
        for (depth, layer) in (2u32..).zip(layers) {
            match layer {
                OpenedLayer::Qed { image, .. } => below.push(LayerRuns::of(image, depth)?),
                // A qcow2 layer counts as allocated everywhere from here down (its own map is
                // not read for the depth).
                OpenedLayer::Raw { .. } | OpenedLayer::Nbd { .. } | OpenedLayer::Qcow2 { .. } => {
                    bottom = depth;
                    break;
                }
            }
        }
        Ok(ChainDepth { top, below, bottom })
    }

    /// Appends the runs of `[pos, end)` where the served image does not have the range.
    fn below_runs(&self, mut pos: u64, end: u64, runs: &mut Vec<DepthRun>) {
        while pos < end {
            let mut limit = end;
            let mut depth = self.bottom;
            for layer in &self.below {
                match layer.at(pos) {
                    Ok(run_end) => {
                        depth = layer.depth;
                        limit = limit.min(run_end);
                        break;
                    }
                    Err(next) => limit = limit.min(next),
                }
            }
            push(runs, limit - pos, depth);
            pos = limit;
        }
    }
}

/// Appends a run, merged with the last one when they have the same depth.
fn push(runs: &mut Vec<DepthRun>, length: u64, depth: u32) {
    match runs.last_mut() {
        Some(last) if last.depth == depth => last.length += length,
        _ => runs.push(DepthRun { length, depth }),
    }
}

impl AllocationDepth for ChainDepth {
    fn allocation_depth(&self, offset: u64, length: u64) -> IoFuture<'_, Vec<DepthRun>> {
        Box::pin(async move {
            let linked = self.top.backing().is_some();
            let end = offset.saturating_add(length);
            let mut pos = offset;
            let mut runs = Vec::new();
            for e in self.top.local_map(offset, length).await? {
                let (from, to) = (
                    e.offset.max(pos),
                    e.offset.saturating_add(e.length).min(end),
                );
                if from != pos || to <= from {
                    break; // Not contiguous: answer the prefix.
                }
                match (e.local, linked) {
                    (true, _) => push(&mut runs, to - from, 1),
                    (false, false) => push(&mut runs, to - from, 0),
                    (false, true) => self.below_runs(from, to, &mut runs),
                }
                pos = to;
            }
            Ok(runs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_answers_the_run_it_is_in_or_the_next_start() {
        let layer = LayerRuns {
            depth: 2,
            runs: vec![(10, 20), (30, 40)],
        };
        assert_eq!(layer.at(0), Err(10));
        assert_eq!(layer.at(10), Ok(20));
        assert_eq!(layer.at(19), Ok(20));
        assert_eq!(layer.at(20), Err(30));
        assert_eq!(layer.at(39), Ok(40));
        assert_eq!(layer.at(40), Err(u64::MAX));
    }
}
