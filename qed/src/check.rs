//! Consistency check and repair, with the meaning of `qemu-img check`.
//!
//! The check walks the L1 table and every L2 table, marks each referenced cluster, and counts:
//! - corruptions: entries pointing outside the file, misaligned, into the header, or at a
//!   cluster already referenced (a duplicate; a table over other metadata counts once per
//!   overlapping cluster and is not scanned);
//! - leaks: clusters after the header that nothing references.
//!
//! Unlike QEMU, cluster numbers are computed with the real cluster size, so large files do not
//! get spurious leaks. Repair zeroes invalid entries (their data becomes unallocated, as in
//! QEMU), and, unlike QEMU, reclaims leaked clusters at the end of the file by truncating it.
//! Duplicates cannot be repaired safely and are left alone.

use crate::error::{Error, Result};
use crate::image::Image;
use crate::layout::{self, ENTRY_UNALLOCATED, ENTRY_ZERO};

/// What a check may repair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repair {
    /// Only look.
    None,
    /// Reclaim leaked clusters (and, as in QEMU, any `-r` also zeroes invalid entries).
    Leaks,
    /// Zero invalid entries and reclaim leaks.
    All,
}

/// The result of a check, with `qemu-img check`'s counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Clusters of the virtual disk (`ceil(size / cluster_size)`).
    pub total_clusters: u64,
    /// L2 entries that point at data.
    pub allocated_clusters: u64,
    /// Data entries not directly after the previous data entry of the same table.
    pub fragmented_clusters: u64,
    /// Unreferenced clusters (after any reclaim).
    pub leaks: u64,
    /// Leaked clusters reclaimed by the repair.
    pub leaks_fixed: u64,
    /// Corruptions found and not fixed.
    pub corruptions: u64,
    /// Corruptions fixed by the repair.
    pub corruptions_fixed: u64,
    /// Tables that could not be read or written.
    pub check_errors: u64,
}

impl CheckReport {
    /// `qemu-img check`'s exit code: 0 clean, 1 check errors, 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

/// A bitmap of the file's clusters.
struct Used {
    bits: Vec<u64>,
    clusters: u64,
}

impl Used {
    fn new(clusters: u64) -> Used {
        Used {
            bits: vec![0; clusters.div_ceil(64) as usize],
            clusters,
        }
    }

    /// Marks `n` clusters from `first`; returns how many were already marked.
    fn mark(&mut self, first: u64, n: u64) -> u64 {
        let mut dups = 0;
        for c in first..first + n {
            if c >= self.clusters {
                continue;
            }
            let (w, b) = ((c / 64) as usize, c % 64);
            if self.bits[w] & (1 << b) != 0 {
                dups += 1;
            }
            self.bits[w] |= 1 << b;
        }
        dups
    }

    fn is_marked(&self, c: u64) -> bool {
        self.bits[(c / 64) as usize] & (1 << (c % 64)) != 0
    }
}

impl Image {
    /// Checks the image; with a repair mode other than [`Repair::None`], also repairs what it
    /// can and clears NEED_CHECK when nothing is left. Takes every lock of the image for the
    /// duration, so it can run on an image in use (writes wait).
    pub fn check(&self, repair: Repair) -> Result<CheckReport> {
        let fix = repair != Repair::None;
        if fix && self.is_read_only() {
            return Err(Error::ReadOnly);
        }
        let _locks = self.lock_all();
        let g = self.geometry();
        let cs = g.cluster_size();
        let file_end = self.file_end();
        let nclusters = file_end / cs;
        let mut used = Used::new(nclusters);
        let mut report = CheckReport {
            total_clusters: self.size().div_ceil(cs),
            ..CheckReport::default()
        };
        let header = self.header();
        let ts = u64::from(g.table_size());
        report.corruptions += used.mark(header.l1_table_offset / cs, ts);

        let mut l1 = self.l1_snapshot();
        let mut l1_fixed = false;
        for entry in l1.iter_mut() {
            if *entry == ENTRY_UNALLOCATED {
                continue;
            }
            if !g.is_valid_table_offset(*entry, file_end) {
                if fix {
                    *entry = 0;
                    l1_fixed = true;
                    report.corruptions_fixed += 1;
                } else {
                    report.corruptions += 1;
                }
                continue;
            }
            let dups = used.mark(*entry / cs, ts);
            if dups > 0 {
                report.corruptions += dups;
                continue;
            }
            let mut bytes = vec![0u8; g.table_bytes() as usize];
            if self.storage().read_at(&mut bytes, *entry).is_err() {
                report.check_errors += 1;
                continue;
            }
            let mut table = layout::decode_table(&bytes);
            let mut table_fixed = false;
            let mut last = 0u64;
            for e in table.iter_mut() {
                if *e == ENTRY_UNALLOCATED || *e == ENTRY_ZERO {
                    continue;
                }
                report.allocated_clusters += 1;
                // QEMU compares in wrapping u64 arithmetic; an entry near u64::MAX (corrupt
                // anyway) must not overflow here.
                if last != 0 && last.wrapping_add(cs) != *e {
                    report.fragmented_clusters += 1;
                }
                last = *e;
                if !g.is_valid_cluster_offset(*e, file_end) {
                    if fix {
                        *e = 0;
                        table_fixed = true;
                        report.corruptions_fixed += 1;
                    } else {
                        report.corruptions += 1;
                    }
                    continue;
                }
                report.corruptions += used.mark(*e / cs, 1);
            }
            if table_fixed {
                let at = *entry;
                if self
                    .storage()
                    .write_at(&layout::encode_table(&table), at)
                    .is_err()
                {
                    report.check_errors += 1;
                }
            }
        }
        if l1_fixed {
            if self.write_l1_table(&l1).is_err() {
                report.check_errors += 1;
            }
            self.replace_l1(l1);
        }
        if fix {
            self.invalidate_cache();
        }
        if report.check_errors > 0 {
            return Ok(report);
        }
        let first = u64::from(g.header_size());
        let mut leaks: u64 = (first..nclusters).filter(|&c| !used.is_marked(c)).count() as u64;
        if fix && leaks > 0 {
            // Reclaim the leaked clusters at the end of the file.
            let mut new_end = nclusters;
            while new_end > first && !used.is_marked(new_end - 1) {
                new_end -= 1;
            }
            if new_end < nclusters {
                let bytes = new_end * cs;
                match self.storage().set_len(bytes) {
                    Ok(()) => {
                        self.set_file_end(bytes);
                        let reclaimed = nclusters - new_end;
                        report.leaks_fixed = reclaimed;
                        leaks -= reclaimed;
                    }
                    Err(_) => report.check_errors += 1,
                }
            }
        }
        report.leaks = leaks;
        if fix && report.corruptions == 0 && report.check_errors == 0 {
            self.mark_clean()?;
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_qemu_img() {
        let mut r = CheckReport::default();
        assert_eq!(r.exit_code(), 0);
        r.leaks = 1;
        assert_eq!(r.exit_code(), 3);
        r.corruptions = 1;
        assert_eq!(r.exit_code(), 2);
        r.check_errors = 1;
        assert_eq!(r.exit_code(), 1);
    }
}
