//! A backing chain's allocation, one status per unit of the virtual disk, built either from
//! `qemu-img map --output=json` or from our [`Image::map`] of each layer. Comparing per unit
//! makes the comparison independent of how each side merges extents.

use serde_json::Value;

use qed::{Image, Mapping};

/// What one unit of the top image's virtual disk resolves to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnitStatus {
    /// No layer has it (reads as zeros): `"present": false`.
    Absent,
    /// A zero cluster in the layer at `depth` (0 = top).
    Zero {
        /// The layer.
        depth: u64,
    },
    /// Data in the layer at `depth`, at `offset` of that layer's file.
    Data {
        /// The layer.
        depth: u64,
        /// File offset of the unit's first byte.
        offset: u64,
    },
}

/// Units from `qemu-img map --output=json` of an image of `size` bytes.
pub fn from_qemu(map: &[Value], size: u64, unit: u64) -> Vec<UnitStatus> {
    let mut out = vec![None; (size / unit) as usize];
    for e in map {
        let start = e["start"].as_u64().expect("start");
        let length = e["length"].as_u64().expect("length");
        assert!(
            start % unit == 0 && length % unit == 0,
            "qemu-img map extent {e} is not aligned to {unit}"
        );
        let present = e["present"].as_bool().expect("present");
        let zero = e["zero"].as_bool().expect("zero");
        let data = e["data"].as_bool().expect("data");
        let depth = e["depth"].as_u64().expect("depth");
        for u in start / unit..(start + length) / unit {
            let s = if !present {
                assert!(zero && !data, "absent extent that is not zero: {e}");
                UnitStatus::Absent
            } else if data {
                assert!(!zero, "data extent flagged zero: {e}");
                let offset = e["offset"].as_u64().expect("data extent without offset");
                UnitStatus::Data {
                    depth,
                    offset: offset + (u * unit - start),
                }
            } else {
                assert!(zero, "present extent that is neither data nor zero: {e}");
                UnitStatus::Zero { depth }
            };
            assert!(
                out[u as usize].is_none(),
                "qemu-img map extents overlap at {e}"
            );
            out[u as usize] = Some(s);
        }
    }
    out.into_iter()
        .enumerate()
        .map(|(i, s)| s.unwrap_or_else(|| panic!("qemu-img map leaves unit {i} uncovered")))
        .collect()
}

/// Units from our mapping of each layer (`layers[0]` is the top image, each next one its
/// backing). Past a layer's virtual size nothing is present, as in QEMU.
pub fn from_ours(layers: &[&Image], unit: u64) -> Vec<UnitStatus> {
    let size = layers[0].size();
    let maps: Vec<Vec<qed::Extent>> = layers
        .iter()
        .map(|l| {
            l.map(qed::GuestOffset(0), l.size())
                .expect("mapping a layer")
        })
        .collect();
    // Coverage check: our extents tile each layer exactly.
    for (l, m) in layers.iter().zip(&maps) {
        let mut pos = 0;
        for e in m {
            assert_eq!(e.offset.0, pos, "our map has a gap or overlap: {m:?}");
            assert!(e.length > 0, "our map has an empty extent: {m:?}");
            pos += e.length;
        }
        assert_eq!(pos, l.size(), "our map does not cover the layer");
    }
    let lookup = |layer: usize, guest: u64| -> Option<Mapping> {
        if guest >= layers[layer].size() {
            return None;
        }
        let m = &maps[layer];
        let i = m.partition_point(|e| e.end().0 <= guest);
        let e = &m[i];
        Some(match e.mapping {
            Mapping::Data(h) => Mapping::Data(h + (guest - e.offset.0)),
            other => other,
        })
    };
    (0..size / unit)
        .map(|u| {
            let guest = u * unit;
            for depth in 0..layers.len() {
                match lookup(depth, guest) {
                    None => return UnitStatus::Absent,
                    Some(Mapping::Data(offset)) => {
                        return UnitStatus::Data {
                            depth: depth as u64,
                            offset: offset.0,
                        }
                    }
                    Some(Mapping::Zero) => {
                        return UnitStatus::Zero {
                            depth: depth as u64,
                        }
                    }
                    Some(Mapping::Unallocated) => {}
                }
            }
            UnitStatus::Absent
        })
        .collect()
}

/// Panics at the first unit where the two views differ.
#[track_caller]
pub fn assert_same(ours: &[UnitStatus], qemu: &[UnitStatus], unit: u64, what: &str) {
    assert_eq!(ours.len(), qemu.len(), "{what}: sizes differ");
    if let Some(i) = ours.iter().zip(qemu).position(|(a, b)| a != b) {
        panic!(
            "{what}: at guest offset {:#x}: ours {:?}, qemu-img map {:?}",
            i as u64 * unit,
            ours[i],
            qemu[i]
        );
    }
}
