//! What a disk may hold after its server is killed: a per-sector model of acknowledged and
//! unacknowledged writes, and self-describing sector contents that say which write they
//! came from.
//!
//! Every 512-byte sector a test writes is [`Contents::sector`] of a [`Version`]: the base's
//! bytes, zeros, or the bytes of one numbered write, which start with the write's number and
//! the sector's own number. So a whole image read back after a crash tells, sector by
//! sector, which write each sector holds ([`Contents::identify`]), and a sector moved to the
//! wrong place or torn inside is caught too.
//!
//! [`CrashModel`] keeps, per sector, what must be there and what may be there, as the NBD
//! spec's durability rules say:
//! - a write acknowledged with FUA is durable at once;
//! - a write acknowledged without FUA is durable once a FLUSH *sent after* that
//!   acknowledgement is acknowledged; until then the sector may hold it or anything older
//!   that was not yet durable;
//! - a write in flight when the server died may have landed or not, per sector.
//!
//! Writes and reads in flight claim their sectors ([`CrashModel::try_claim`]) so that no two
//! overlap: the order of overlapping requests in flight is undefined, and the model does
//! not guess it. A read of claimed sectors therefore has exactly one right answer,
//! [`CrashModel::latest`].
//!
//! ```
//! use qedstream_tests::crash::{Contents, CrashModel, Version};
//! let contents = Contents::new(7, vec![]);
//! let mut model = CrashModel::new(8);
//! assert!(model.try_claim(0, 2));
//! let v = model.begin_write(0, 2);
//! model.acknowledged(0, 2, v, false); // a plain write: not durable yet
//! model.release(0, 2);
//! let mark = model.flush_sent();
//! model.flush_acknowledged(mark);
//! let mut image = vec![0u8; 8 * 512];
//! for s in 0..8 {
//!     let v = model.latest(s);
//!     image[s as usize * 512..][..512].copy_from_slice(&contents.sector(v, s));
//! }
//! assert!(model.verify(&contents, &image).mismatches.is_empty());
//! assert_eq!(model.latest(1), v);
//! assert_ne!(v, Version::Base);
//! ```

use crate::XorShift;

/// Bytes per sector: the unit of the model.
pub const SECTOR: u64 = 512;

/// What a sector holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    /// The base's bytes (zeros inside its holes).
    Base,
    /// Zeros, from a WRITE_ZEROES.
    Zero,
    /// The bytes of write number `n` (from 1).
    Write(u32),
}

/// The bytes every [`Version`] of every sector has: the base's data outside its holes, and
/// each write's, both derived from a seed.
#[derive(Clone, Debug)]
pub struct Contents {
    seed: u64,
    /// Sector ranges `[start, end)` where the base is a hole (zeros).
    base_holes: Vec<(u64, u64)>,
}

impl Contents {
    /// Contents from `seed`, with the base reading zeros over the sector ranges `base_holes`.
    pub fn new(seed: u64, base_holes: Vec<(u64, u64)>) -> Contents {
        Contents { seed, base_holes }
    }

    /// Whether the base is a hole at `sector`.
    pub fn base_is_hole(&self, sector: u64) -> bool {
        self.base_holes
            .iter()
            .any(|&(a, b)| (a..b).contains(&sector))
    }

    /// The 512 bytes of `version` at `sector`.
    pub fn sector(&self, version: Version, sector: u64) -> [u8; SECTOR as usize] {
        let mut out = [0u8; SECTOR as usize];
        let id = match version {
            Version::Zero => return out,
            Version::Base if self.base_is_hole(sector) => return out,
            Version::Base => 0,
            Version::Write(n) => u64::from(n),
        };
        out[..8].copy_from_slice(&id.to_le_bytes());
        out[8..16].copy_from_slice(&sector.to_le_bytes());
        let mix = self.seed ^ id.rotate_left(40) ^ sector.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        XorShift::new(mix).fill(&mut out[16..]);
        out
    }

    /// `sectors` sectors of `version` from `first`, one after the other.
    pub fn run(&self, version: Version, first: u64, sectors: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity((sectors * SECTOR) as usize);
        for s in first..first + sectors {
            out.extend_from_slice(&self.sector(version, s));
        }
        out
    }

    /// Which version `bytes` are at `sector`: `Zero` for zeros (also the base's holes),
    /// `None` for bytes no version has there (a sector torn, moved or invented).
    pub fn identify(&self, sector: u64, bytes: &[u8]) -> Option<Version> {
        if bytes.iter().all(|&b| b == 0) {
            return Some(Version::Zero);
        }
        let id = u64::from_le_bytes(bytes[..8].try_into().ok()?);
        let version = match id {
            0 => Version::Base,
            n => Version::Write(u32::try_from(n).ok()?),
        };
        (self.sector(version, sector)[..] == *bytes).then_some(version)
    }

    /// Whether `a` and `b` have the same bytes at `sector` (zeros and a base hole do).
    pub fn same(&self, a: Version, b: Version, sector: u64) -> bool {
        let zero = |v| v == Version::Zero || (v == Version::Base && self.base_is_hole(sector));
        a == b || (zero(a) && zero(b))
    }
}

/// One sector of the model.
#[derive(Clone, Debug)]
struct SectorState {
    /// What it must hold at least: the last durable version.
    durable: Version,
    /// Acknowledged since, not yet durable, with their acknowledgement numbers, oldest first.
    acknowledged: Vec<(Version, u64)>,
    /// A write in flight over it.
    in_flight: Option<Version>,
    /// Claimed by a request in flight.
    claimed: bool,
}

/// One sector that holds what it may not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// The sector.
    pub sector: u64,
    /// What it holds (`None`: bytes of no version).
    pub found: Option<Version>,
    /// What it may hold, the durable version first.
    pub allowed: Vec<Version>,
}

/// What a crash left, compared with the model ([`CrashModel::verify`]).
#[derive(Clone, Debug, Default)]
pub struct CrashReport {
    /// Sectors that hold what they may not.
    pub mismatches: Vec<Mismatch>,
    /// What each sector holds (its durable version where it holds bytes of no version).
    pub found: Vec<Version>,
    /// Sectors a write in flight covered.
    pub in_flight_sectors: u64,
    /// Of those, the ones holding the write's bytes.
    pub in_flight_landed: u64,
    /// Sectors whose latest acknowledged (not yet durable) write was not found.
    pub acknowledged_not_found: u64,
}

/// Per-sector durability model of a disk under writes, flushes and crashes.
#[derive(Clone, Debug)]
pub struct CrashModel {
    sectors: Vec<SectorState>,
    next_write: u32,
    /// Acknowledgements so far (each write's number in that order).
    acks: u64,
}

impl CrashModel {
    /// A disk of `sectors` sectors, all holding the base.
    pub fn new(sectors: u64) -> CrashModel {
        let s = SectorState {
            durable: Version::Base,
            acknowledged: Vec::new(),
            in_flight: None,
            claimed: false,
        };
        CrashModel {
            sectors: vec![s; sectors as usize],
            next_write: 1,
            acks: 0,
        }
    }

    /// Sectors of the disk.
    pub fn len(&self) -> u64 {
        self.sectors.len() as u64
    }

    /// Whether the disk has no sectors.
    pub fn is_empty(&self) -> bool {
        self.sectors.is_empty()
    }

    fn range(&mut self, first: u64, count: u64) -> &mut [SectorState] {
        &mut self.sectors[first as usize..(first + count) as usize]
    }

    /// Claims `count` sectors from `first` for one request, unless one is claimed already.
    pub fn try_claim(&mut self, first: u64, count: u64) -> bool {
        let r = self.range(first, count);
        if r.iter().any(|s| s.claimed) {
            return false;
        }
        r.iter_mut().for_each(|s| s.claimed = true);
        true
    }

    /// Releases a claim.
    pub fn release(&mut self, first: u64, count: u64) {
        self.range(first, count)
            .iter_mut()
            .for_each(|s| s.claimed = false);
    }

    /// A new write over claimed sectors, in flight from now: its version.
    pub fn begin_write(&mut self, first: u64, count: u64) -> Version {
        let v = Version::Write(self.next_write);
        self.next_write += 1;
        self.begin(first, count, v);
        v
    }

    /// A WRITE_ZEROES over claimed sectors, in flight from now: [`Version::Zero`].
    pub fn begin_zeroes(&mut self, first: u64, count: u64) -> Version {
        self.begin(first, count, Version::Zero);
        Version::Zero
    }

    fn begin(&mut self, first: u64, count: u64, v: Version) {
        for s in self.range(first, count) {
            debug_assert!(s.claimed, "a write over unclaimed sectors");
            s.in_flight = Some(v);
        }
    }

    /// The write `v` over `count` sectors from `first` was acknowledged; with `fua` it is
    /// durable.
    pub fn acknowledged(&mut self, first: u64, count: u64, v: Version, fua: bool) {
        let ack = self.acks;
        self.acks += 1;
        for s in self.range(first, count) {
            s.in_flight = None;
            if fua {
                s.durable = v;
                s.acknowledged.clear();
            } else {
                s.acknowledged.push((v, ack));
            }
        }
    }

    /// A FLUSH is being sent: the mark to pass to [`CrashModel::flush_acknowledged`] once it
    /// is acknowledged (it covers the writes acknowledged before now).
    pub fn flush_sent(&self) -> u64 {
        self.acks
    }

    /// The FLUSH sent at `mark` was acknowledged: every write acknowledged before it was
    /// sent is durable.
    pub fn flush_acknowledged(&mut self, mark: u64) {
        for s in &mut self.sectors {
            if let Some(i) = s.acknowledged.iter().rposition(|&(_, a)| a < mark) {
                s.durable = s.acknowledged[i].0;
                s.acknowledged.drain(..=i);
            }
        }
    }

    /// What a read of `sector` must return while nothing is in flight over it: its latest
    /// acknowledged version.
    pub fn latest(&self, sector: u64) -> Version {
        let s = &self.sectors[sector as usize];
        s.acknowledged.last().map_or(s.durable, |&(v, _)| v)
    }

    /// What `sector` may hold after a crash: its durable version, the acknowledged ones since
    /// and the one in flight.
    pub fn allowed(&self, sector: u64) -> Vec<Version> {
        let s = &self.sectors[sector as usize];
        let mut v = vec![s.durable];
        v.extend(s.acknowledged.iter().map(|&(v, _)| v));
        v.extend(s.in_flight);
        v
    }

    /// Compares a whole image read back after a crash (`image`: every sector's bytes) with
    /// the model.
    pub fn verify(&self, contents: &Contents, image: &[u8]) -> CrashReport {
        let mut report = CrashReport::default();
        for (i, bytes) in image.chunks(SECTOR as usize).enumerate() {
            let sector = i as u64;
            let state = &self.sectors[i];
            let found = contents.identify(sector, bytes);
            let allowed = self.allowed(sector);
            let matched = found.and_then(|f| {
                allowed
                    .iter()
                    .copied()
                    .find(|&a| contents.same(a, f, sector))
            });
            let holds = |v: Version| found.is_some_and(|f| contents.same(f, v, sector));
            let landed = state.in_flight.is_some_and(holds);
            if state.in_flight.is_some() {
                report.in_flight_sectors += 1;
                report.in_flight_landed += u64::from(landed);
            }
            if let Some(&(latest, _)) = state.acknowledged.last() {
                if !holds(latest) && !landed {
                    report.acknowledged_not_found += 1;
                }
            }
            report.found.push(matched.unwrap_or(state.durable));
            if matched.is_none() {
                report.mismatches.push(Mismatch {
                    sector,
                    found,
                    allowed,
                });
            }
        }
        report
    }

    /// After a crash and its check: each sector holds `found` (from
    /// [`CrashReport::found`]), durably; nothing is in flight or claimed.
    pub fn restart_from(&mut self, found: &[Version]) {
        for (s, &f) in self.sectors.iter_mut().zip(found) {
            *s = SectorState {
                durable: f,
                acknowledged: Vec::new(),
                in_flight: None,
                claimed: false,
            };
        }
    }

    /// The image every acknowledged write makes (what a clean stop must leave).
    pub fn expected_image(&self, contents: &Contents) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.sectors.len() * SECTOR as usize);
        for s in 0..self.len() {
            out.extend_from_slice(&contents.sector(self.latest(s), s));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_of(contents: &Contents, versions: &[Version]) -> Vec<u8> {
        let mut out = Vec::new();
        for (s, &v) in versions.iter().enumerate() {
            out.extend_from_slice(&contents.sector(v, s as u64));
        }
        out
    }

    #[test]
    fn sectors_identify_themselves_and_catch_moves_and_tears() {
        let c = Contents::new(3, vec![(2, 4)]);
        let w = Version::Write(9);
        assert_eq!(c.identify(5, &c.sector(w, 5)), Some(w));
        assert_eq!(
            c.identify(5, &c.sector(Version::Base, 5)),
            Some(Version::Base)
        );
        assert_eq!(
            c.identify(2, &c.sector(Version::Base, 2)),
            Some(Version::Zero)
        );
        assert_eq!(c.identify(6, &c.sector(w, 5)), None, "moved");
        let mut torn = c.sector(w, 5);
        torn[300] ^= 1;
        assert_eq!(c.identify(5, &torn), None, "torn");
        assert!(c.same(Version::Base, Version::Zero, 3));
        assert!(!c.same(Version::Base, Version::Zero, 5));
    }

    #[test]
    fn a_plain_write_is_durable_only_after_a_flush_sent_after_its_acknowledgement() {
        let c = Contents::new(1, vec![]);
        let mut m = CrashModel::new(2);
        let early = m.flush_sent();
        assert!(m.try_claim(0, 1));
        let v = m.begin_write(0, 1);
        m.acknowledged(0, 1, v, false);
        m.release(0, 1);
        m.flush_acknowledged(early);
        // Not durable: the old content is still allowed, and the new one too.
        assert_eq!(m.allowed(0), vec![Version::Base, v]);
        let old = image_of(&c, &[Version::Base, Version::Base]);
        let r = m.verify(&c, &old);
        assert!(r.mismatches.is_empty());
        assert_eq!(r.acknowledged_not_found, 1);
        let mark = m.flush_sent();
        m.flush_acknowledged(mark);
        assert_eq!(m.allowed(0), vec![v]);
        assert_eq!(
            m.verify(&c, &old).mismatches.len(),
            1,
            "a flushed write lost"
        );
    }

    #[test]
    fn an_acknowledged_write_found_is_found_whatever_older_version_has_its_bytes() {
        // The base is a hole at sector 0: zeros there are the base and a WRITE_ZEROES alike.
        let c = Contents::new(1, vec![(0, 1)]);
        let mut m = CrashModel::new(1);
        assert!(m.try_claim(0, 1));
        let z = m.begin_zeroes(0, 1);
        m.acknowledged(0, 1, z, false);
        let r = m.verify(&c, &image_of(&c, &[z]));
        assert!(r.mismatches.is_empty());
        assert_eq!(r.acknowledged_not_found, 0);
    }

    #[test]
    fn fua_is_durable_at_once_and_in_flight_may_land_or_not_per_sector() {
        let c = Contents::new(1, vec![]);
        let mut m = CrashModel::new(4);
        assert!(m.try_claim(0, 2));
        assert!(!m.try_claim(1, 2), "overlapping claims");
        let f = m.begin_write(0, 2);
        m.acknowledged(0, 2, f, true);
        m.release(0, 2);
        assert!(m.try_claim(1, 3));
        let g = m.begin_write(1, 3);
        let torn_write = image_of(&c, &[f, g, Version::Base, Version::Base]);
        let r = m.verify(&c, &torn_write);
        assert!(r.mismatches.is_empty(), "{:?}", r.mismatches);
        assert_eq!((r.in_flight_sectors, r.in_flight_landed), (3, 1));
        let lost_fua = image_of(&c, &[Version::Base, g, g, g]);
        let r = m.verify(&c, &lost_fua);
        assert_eq!(r.mismatches.len(), 1);
        assert_eq!(r.mismatches[0].sector, 0);
        m.restart_from(&r.found);
        assert_eq!(m.allowed(3), vec![g]);
        assert!(m.try_claim(0, 4), "a restart releases every claim");
    }
}
