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

use crate::layout::{Geometry, ENTRY_UNALLOCATED, ENTRY_ZERO};
use crate::tables::Tables;
use crate::types::{HostCluster, HostOffset};

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
    fn mark(&mut self, first: HostCluster, n: u64) -> u64 {
        let mut dups = 0;
        for c in first.0..first.0 + n {
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

/// A check in progress: the bitmap, the counters, and whether to repair.
struct Walk<'a> {
    tables: &'a Tables,
    g: Geometry,
    file_end: HostOffset,
    fix: bool,
    used: Used,
    report: CheckReport,
}

/// Checks (and with `repair`, repairs) the tables of an image whose virtual disk is `size`
/// bytes. The caller holds [`Tables::lock_all`] and keeps allocations out for the duration,
/// and clears NEED_CHECK afterwards when the report allows it.
pub(crate) fn run(tables: &Tables, size: u64, repair: Repair) -> CheckReport {
    let g = tables.geometry();
    let file_end = tables.file_end();
    let mut walk = Walk {
        tables,
        g,
        file_end,
        fix: repair != Repair::None,
        used: Used::new(file_end.cluster(g).0),
        report: CheckReport {
            total_clusters: size.div_ceil(g.cluster_size()),
            ..CheckReport::default()
        },
    };
    let ts = u64::from(g.table_size());
    walk.report.corruptions += walk.used.mark(tables.l1_offset().cluster(g), ts);
    walk.l1();
    if walk.fix {
        tables.invalidate_cache();
    }
    if walk.report.check_errors == 0 {
        walk.leaks();
    }
    walk.report
}

impl Walk<'_> {
    /// Walks the L1 table and each L2 table it names; zeroes invalid L1 entries when fixing.
    fn l1(&mut self) {
        let mut l1 = self.tables.l1_entries();
        let mut l1_fixed = false;
        for entry in l1.iter_mut() {
            if *entry == ENTRY_UNALLOCATED {
                continue;
            }
            if !self.g.is_valid_table_offset(*entry, self.file_end.0) {
                if self.fix {
                    *entry = ENTRY_UNALLOCATED;
                    l1_fixed = true;
                    self.report.corruptions_fixed += 1;
                } else {
                    self.report.corruptions += 1;
                }
                continue;
            }
            let table = HostOffset(*entry);
            let dups = self
                .used
                .mark(table.cluster(self.g), u64::from(self.g.table_size()));
            if dups > 0 {
                self.report.corruptions += dups;
                continue;
            }
            self.l2(table);
        }
        if l1_fixed && self.tables.replace_l1(l1).is_err() {
            self.report.check_errors += 1;
        }
    }

    /// Walks one L2 table; zeroes invalid entries (and rewrites the table) when fixing.
    fn l2(&mut self, offset: HostOffset) {
        let Ok(mut table) = self.tables.read_l2(offset) else {
            self.report.check_errors += 1;
            return;
        };
        let cs = self.g.cluster_size();
        let mut table_fixed = false;
        let mut last = 0u64;
        for e in table.iter_mut() {
            if *e == ENTRY_UNALLOCATED || *e == ENTRY_ZERO {
                continue;
            }
            self.report.allocated_clusters += 1;
            // QEMU compares in wrapping u64 arithmetic; an entry near u64::MAX (corrupt
            // anyway) must not overflow here.
            if last != 0 && last.wrapping_add(cs) != *e {
                self.report.fragmented_clusters += 1;
            }
            last = *e;
            if !self.g.is_valid_cluster_offset(*e, self.file_end.0) {
                if self.fix {
                    *e = ENTRY_UNALLOCATED;
                    table_fixed = true;
                    self.report.corruptions_fixed += 1;
                } else {
                    self.report.corruptions += 1;
                }
                continue;
            }
            self.report.corruptions += self.used.mark(HostOffset(*e).cluster(self.g), 1);
        }
        if table_fixed && self.tables.write_l2(offset, &table).is_err() {
            self.report.check_errors += 1;
        }
    }

    /// Counts unreferenced clusters after the header; when fixing, reclaims those at the end
    /// of the file by truncating it.
    fn leaks(&mut self) {
        let nclusters = self.used.clusters;
        let first = u64::from(self.g.header_size());
        let mut leaks = (first..nclusters)
            .filter(|&c| !self.used.is_marked(c))
            .count() as u64;
        if self.fix && leaks > 0 {
            let mut new_end = nclusters;
            while new_end > first && !self.used.is_marked(new_end - 1) {
                new_end -= 1;
            }
            if new_end < nclusters {
                match self.tables.truncate(HostCluster(new_end).start(self.g)) {
                    Ok(()) => {
                        let reclaimed = nclusters - new_end;
                        self.report.leaks_fixed = reclaimed;
                        leaks -= reclaimed;
                    }
                    Err(_) => self.report.check_errors += 1,
                }
            }
        }
        self.report.leaks = leaks;
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
