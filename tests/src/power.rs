//! Power loss beyond prefixes: a storage that keeps every write since the last flush in a
//! volatile buffer, and the disk states a power loss can leave behind.
//!
//! A disk with a volatile write cache promises nothing about writes that were not flushed:
//! after a power loss, each 512-byte sector written since the last flush holds either what it
//! held at that flush or any one of the versions written since (in any combination across
//! sectors), and the file's length is its length at the flush or after any of the length
//! changes since. A flush makes everything before it durable.
//!
//! - [`VolatileStorage`]: a [`Storage`] that serves reads from the latest bytes, logs every
//!   [`Event`] (write, flush, resize) for replay, and answers [`VolatileStorage::power_loss`].
//! - [`Volatile`]: the state itself (durable bytes, pending sector versions, pending lengths),
//!   replayable event by event, so a test can cut the log at any point.
//! - [`CrashSpace`] and [`Choice`]: which version each pending sector keeps and which length
//!   the file keeps; [`CrashSpace::states`] enumerates every choice when there are few, and
//!   otherwise samples them (seeded) with several strategies: uniform per sector, most sectors
//!   lost, most sectors kept, whole writes kept or lost (with the file's length following
//!   them, or chosen on its own), and the writes up to a point with holes.
//!
//! ```
//! use qed::Storage;
//! use qedstream_tests::power::VolatileStorage;
//!
//! let disk = VolatileStorage::new(vec![0u8; 1024]);
//! disk.write_at(&[1u8; 512], 0).unwrap();
//! disk.flush().unwrap();
//! disk.write_at(&[2u8; 1024], 0).unwrap(); // two sectors pending
//! let space = disk.space();
//! assert_eq!(space.count(), Some(4));
//! let states: Vec<Vec<u8>> = space.states(100, 0, 1).map(|c| disk.power_loss(&c)).collect();
//! assert!(states.iter().all(|s| s[0] == 1 || s[0] == 2)); // the flushed write survives
//! ```

use std::collections::BTreeMap;
use std::io;

use parking_lot::Mutex;
use qed::Storage;

use crate::XorShift;

/// The unit a disk writes atomically.
pub const SECTOR: u64 = 512;

/// One operation on a [`VolatileStorage`], in the order it happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// `data` written at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Everything before is durable.
    Flush,
    /// The file truncated or extended to this length.
    SetLen(u64),
}

/// One version of a sector written since the last flush.
#[derive(Clone, Debug)]
struct Version {
    /// The index of the event that wrote it.
    event: usize,
    /// The whole sector after that write (zeros past the file's end).
    bytes: Box<[u8]>,
}

/// A file length set since the last flush.
#[derive(Clone, Copy, Debug)]
struct PendingLength {
    event: usize,
    len: u64,
}

/// Durable bytes plus what was written since the last flush: the states a power loss chooses
/// from. Built live by [`VolatileStorage`] or by replaying its events.
#[derive(Clone, Debug)]
pub struct Volatile {
    current: Vec<u8>,
    durable: Vec<u8>,
    /// Sector index to its versions since the last flush, oldest first.
    pending: BTreeMap<u64, Vec<Version>>,
    /// Length changes since the last flush, oldest first.
    lengths: Vec<PendingLength>,
    /// Events applied so far.
    applied: usize,
}

impl Volatile {
    /// A disk holding `bytes`, all durable.
    pub fn new(bytes: Vec<u8>) -> Volatile {
        Volatile {
            current: bytes.clone(),
            durable: bytes,
            pending: BTreeMap::new(),
            lengths: Vec::new(),
            applied: 0,
        }
    }

    /// The bytes a reader sees now (every write applied).
    pub fn current(&self) -> &[u8] {
        &self.current
    }

    /// How many events were applied.
    pub fn applied(&self) -> usize {
        self.applied
    }

    /// How many sectors have versions not yet flushed.
    pub fn pending_sectors(&self) -> usize {
        self.pending.len()
    }

    /// Applies one event, as the disk sees it.
    pub fn apply(&mut self, event: &Event) {
        let index = self.applied;
        self.applied += 1;
        match event {
            Event::Write { offset, data } => self.write(index, *offset, data),
            Event::Flush => {
                self.durable.clone_from(&self.current);
                self.pending.clear();
                self.lengths.clear();
            }
            Event::SetLen(len) => {
                self.current.resize(to_usize(*len), 0);
                self.lengths.push(PendingLength {
                    event: index,
                    len: *len,
                });
            }
        }
    }

    fn write(&mut self, index: usize, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let end = offset + data.len() as u64;
        if end > self.current.len() as u64 {
            self.current.resize(to_usize(end), 0);
            self.lengths.push(PendingLength {
                event: index,
                len: end,
            });
        }
        self.current[to_usize(offset)..to_usize(end)].copy_from_slice(data);
        for sector in offset / SECTOR..end.div_ceil(SECTOR) {
            let bytes = self.sector_now(sector);
            self.pending.entry(sector).or_default().push(Version {
                event: index,
                bytes,
            });
        }
    }

    /// Sector `sector` of the current bytes, zero-padded past the end.
    fn sector_now(&self, sector: u64) -> Box<[u8]> {
        let mut out = vec![0u8; SECTOR as usize];
        let start = to_usize(sector * SECTOR).min(self.current.len());
        let end = (start + SECTOR as usize).min(self.current.len());
        out[..end - start].copy_from_slice(&self.current[start..end]);
        out.into_boxed_slice()
    }

    /// The choices a power loss has now.
    pub fn space(&self) -> CrashSpace {
        let mut writes: Vec<usize> = self
            .pending
            .values()
            .flat_map(|v| v.iter().map(|x| x.event))
            .collect();
        writes.sort_unstable();
        writes.dedup();
        CrashSpace {
            sectors: self
                .pending
                .values()
                .map(|v| v.iter().map(|x| x.event).collect())
                .collect(),
            lengths: self.lengths.iter().map(|l| l.event).collect(),
            writes,
        }
    }

    /// The disk after a power loss that made `choice`: the durable bytes, cut or extended to
    /// the chosen length (a shrink chosen along the way drops the bytes past it), with each
    /// pending sector replaced by its chosen version.
    pub fn power_loss(&self, choice: &Choice) -> Vec<u8> {
        let chosen = &self.lengths[..choice.length.min(self.lengths.len())];
        let len = chosen.last().map_or(self.durable.len() as u64, |l| l.len);
        let floor = chosen
            .iter()
            .map(|l| l.len)
            .fold(self.durable.len() as u64, u64::min);
        let mut out = self.durable.clone();
        out.truncate(to_usize(floor));
        out.resize(to_usize(len), 0);
        for ((&sector, versions), &pick) in self.pending.iter().zip(&choice.versions) {
            let Some(version) = pick.checked_sub(1).and_then(|i| versions.get(i)) else {
                continue;
            };
            let start = sector * SECTOR;
            if start >= len {
                continue;
            }
            let n = (len - start).min(SECTOR) as usize;
            out[to_usize(start)..to_usize(start) + n].copy_from_slice(&version.bytes[..n]);
        }
        out
    }
}

fn to_usize(v: u64) -> usize {
    usize::try_from(v).expect("test images fit in memory")
}

/// What a power loss keeps: per pending sector (in sector order) 0 for its durable bytes or
/// `i` for its `i`-th version since the flush; and how many of the pending length changes
/// took effect.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Choice {
    /// Per pending sector: 0 durable, `i` the `i`-th pending version.
    pub versions: Vec<usize>,
    /// How many pending length changes took effect (0: the durable length).
    pub length: usize,
}

/// The shape of the choices at one cut: the versions of each pending sector (by the event
/// that wrote them) and the pending length changes.
#[derive(Clone, Debug)]
pub struct CrashSpace {
    /// Per pending sector, the event index of each version, oldest first.
    sectors: Vec<Vec<usize>>,
    /// The event index of each pending length change, oldest first.
    lengths: Vec<usize>,
    /// Every pending write's event index, in order.
    writes: Vec<usize>,
}

impl CrashSpace {
    /// How many distinct choices there are (`None` past `u64`).
    pub fn count(&self) -> Option<u64> {
        self.sectors
            .iter()
            .map(|v| v.len() as u64 + 1)
            .chain(std::iter::once(self.lengths.len() as u64 + 1))
            .try_fold(1u64, u64::checked_mul)
    }

    /// How many sectors are pending.
    pub fn sectors(&self) -> usize {
        self.sectors.len()
    }

    /// Every choice when there are at most `exhaustive` of them; otherwise `samples` choices
    /// drawn with `seed` (the two extremes, nothing kept and everything kept, come first).
    pub fn states(
        &self,
        exhaustive: u64,
        samples: usize,
        seed: u64,
    ) -> Box<dyn Iterator<Item = Choice> + '_> {
        match self.count() {
            Some(n) if n <= exhaustive => Box::new(self.all(n)),
            _ => Box::new(self.sampled(samples, seed)),
        }
    }

    /// Every choice, in mixed-radix order.
    fn all(&self, n: u64) -> impl Iterator<Item = Choice> + '_ {
        (0..n).map(move |mut i| {
            let mut versions = Vec::with_capacity(self.sectors.len());
            for v in &self.sectors {
                let radix = v.len() as u64 + 1;
                versions.push((i % radix) as usize);
                i /= radix;
            }
            Choice {
                versions,
                length: i as usize,
            }
        })
    }

    /// `samples` choices: both extremes, then strategies in turn.
    fn sampled(&self, samples: usize, seed: u64) -> impl Iterator<Item = Choice> + '_ {
        let mut rng = XorShift::new(seed);
        (0..samples).map(move |i| match i {
            0 => self.keeping(|_| false),
            1 => self.keeping(|_| true),
            _ => match i % 6 {
                0 => self.uniform(&mut rng),
                1 => self.per_sector(&mut rng, 8, false),
                2 => self.per_sector(&mut rng, 8, true),
                3 => {
                    let keep: Vec<bool> = self.writes.iter().map(|_| rng.one_in(2)).collect();
                    self.keeping(|w| keep[w])
                }
                4 => {
                    // Whole writes kept or lost, the file's length on its own (the metadata
                    // reached the disk, the extension of the file did not, or the reverse).
                    let keep: Vec<bool> = self.writes.iter().map(|_| rng.one_in(2)).collect();
                    let mut choice = self.keeping(|w| keep[w]);
                    choice.length = rng.below(self.lengths.len() as u64 + 1) as usize;
                    choice
                }
                _ => {
                    let cut = rng.below(self.writes.len() as u64 + 1) as usize;
                    let keep: Vec<bool> = (0..self.writes.len())
                        .map(|w| w < cut && !rng.one_in(8))
                        .collect();
                    self.keeping(|w| keep[w])
                }
            },
        })
    }

    /// Each sector and the length uniformly at random.
    fn uniform(&self, rng: &mut XorShift) -> Choice {
        Choice {
            versions: self
                .sectors
                .iter()
                .map(|v| rng.below(v.len() as u64 + 1) as usize)
                .collect(),
            length: rng.below(self.lengths.len() as u64 + 1) as usize,
        }
    }

    /// Each sector keeps its latest version, except one in `odds` that keeps a random older
    /// one or its durable bytes (`mostly_kept`); or the reverse: durable bytes except one in
    /// `odds` that keeps a random version.
    fn per_sector(&self, rng: &mut XorShift, odds: u64, mostly_kept: bool) -> Choice {
        let versions = self
            .sectors
            .iter()
            .map(|v| {
                let n = v.len();
                match (mostly_kept, rng.one_in(odds)) {
                    (true, false) => n,
                    (true, true) => rng.below(n as u64) as usize,
                    (false, false) => 0,
                    (false, true) => 1 + rng.below(n as u64) as usize,
                }
            })
            .collect();
        let length = if mostly_kept {
            self.lengths.len()
        } else {
            rng.below(self.lengths.len() as u64 + 1) as usize
        };
        Choice { versions, length }
    }

    /// The state where exactly the pending writes `kept(i)` (by their rank among pending
    /// writes) reached the disk: each sector holds the latest kept version, and the file the
    /// last length change made by a kept write or a resize before the last kept write.
    fn keeping(&self, kept: impl Fn(usize) -> bool) -> Choice {
        let rank = |event: usize| self.writes.binary_search(&event).unwrap_or(0);
        let versions = self
            .sectors
            .iter()
            .map(|v| v.iter().rposition(|&e| kept(rank(e))).map_or(0, |i| i + 1))
            .collect();
        let last_kept = (0..self.writes.len())
            .rev()
            .find(|&w| kept(w))
            .map(|w| self.writes[w]);
        let length = match last_kept {
            Some(last) => self.lengths.iter().take_while(|&&e| e <= last).count(),
            None => 0,
        };
        Choice { versions, length }
    }
}

/// A [`Storage`] with a volatile write cache: reads see every write, [`Storage::flush`] makes
/// them durable, and [`VolatileStorage::power_loss`] gives the bytes a power loss could leave.
/// Every operation is logged ([`VolatileStorage::events`]) for replay at other cut points.
#[derive(Debug)]
pub struct VolatileStorage {
    state: Mutex<(Volatile, Vec<Event>)>,
}

impl VolatileStorage {
    /// A disk holding `bytes`, all durable.
    pub fn new(bytes: Vec<u8>) -> VolatileStorage {
        VolatileStorage {
            state: Mutex::new((Volatile::new(bytes), Vec::new())),
        }
    }

    /// The events so far.
    pub fn events(&self) -> Vec<Event> {
        self.state.lock().1.clone()
    }

    /// The choices a power loss has now.
    pub fn space(&self) -> CrashSpace {
        self.state.lock().0.space()
    }

    /// The bytes a power loss now, making `choice`, would leave.
    pub fn power_loss(&self, choice: &Choice) -> Vec<u8> {
        self.state.lock().0.power_loss(choice)
    }

    /// The bytes readers see now.
    pub fn current(&self) -> Vec<u8> {
        self.state.lock().0.current().to_vec()
    }

    fn record(&self, event: Event) {
        let mut state = self.state.lock();
        state.0.apply(&event);
        state.1.push(event);
    }
}

impl Storage for VolatileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let state = self.state.lock();
        qed::storage::read_from_bytes(state.0.current(), buf, offset);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        self.record(Event::Write {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.record(Event::Flush);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().0.current().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.record(Event::SetLen(len));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sector(b: u8) -> Vec<u8> {
        vec![b; SECTOR as usize]
    }

    #[test]
    fn every_subset_of_versions_is_enumerated_and_flushed_data_survives() {
        let disk = VolatileStorage::new(sector(0));
        disk.write_at(&sector(1), 0).unwrap();
        disk.flush().unwrap();
        disk.write_at(&sector(2), 0).unwrap();
        disk.write_at(&sector(3), 0).unwrap();
        disk.write_at(&sector(4), SECTOR).unwrap(); // extends the file
        let space = disk.space();
        // Sector 0: durable, 2 or 3; sector 1: durable (absent) or 4; two lengths.
        assert_eq!(space.count(), Some(3 * 2 * 2));
        let mut seen: Vec<(u8, Option<u8>)> = space
            .states(100, 0, 1)
            .map(|c| {
                let s = disk.power_loss(&c);
                (s[0], s.get(SECTOR as usize).copied())
            })
            .collect();
        seen.sort_unstable();
        seen.dedup();
        let expected = vec![
            (1, None),
            (1, Some(0)),
            (1, Some(4)),
            (2, None),
            (2, Some(0)),
            (2, Some(4)),
            (3, None),
            (3, Some(0)),
            (3, Some(4)),
        ];
        assert_eq!(seen, expected);
    }

    #[test]
    fn samples_include_both_extremes_and_partial_writes() {
        let disk = VolatileStorage::new(Vec::new());
        disk.write_at(&vec![7u8; 64 * SECTOR as usize], 0).unwrap();
        let states: Vec<Vec<u8>> = disk
            .space()
            .states(16, 50, 9)
            .map(|c| disk.power_loss(&c))
            .collect();
        assert_eq!(states.len(), 50);
        assert!(states[0].is_empty(), "nothing kept");
        assert!(
            states[1] == vec![7u8; 64 * SECTOR as usize],
            "everything kept"
        );
        assert!(
            states
                .iter()
                .any(|s| s.len() == 64 * SECTOR as usize && s.contains(&0) && s.contains(&7)),
            "some state keeps part of the write"
        );
    }

    #[test]
    fn a_shrink_that_took_effect_drops_the_bytes_past_it() {
        let disk = VolatileStorage::new(sector(5).repeat(2));
        disk.set_len(SECTOR).unwrap();
        disk.set_len(2 * SECTOR).unwrap();
        let space = disk.space();
        let lens: Vec<(usize, u8)> = space
            .states(100, 0, 1)
            .map(|c| {
                let s = disk.power_loss(&c);
                (s.len(), s[s.len() - 1])
            })
            .collect();
        assert_eq!(lens, vec![(1024, 5), (512, 5), (1024, 0)]);
    }
}
