//! Caller-provided memory for requests: [`IoBufs`], a vectored buffer whose segments the
//! request owns for its whole life.
//!
//! A hypervisor serves guest memory: a virtio request names several guest pages, and copying
//! them through a buffer of ours would cost a copy per request. So reads and writes take the
//! caller's segments ([`IoBuf`]) and give them back when they complete. Ownership is what makes
//! this safe under cancellation: if the future of a request is dropped, the segments are still
//! owned by the request's I/O (on the blocking pool, say) until it has finished, and only then
//! dropped; no I/O ever writes into memory its caller has taken back. A VMM implements
//! [`IoBuf`] for a handle to a guest memory region that keeps the mapping alive (its own
//! `unsafe`, where it turns the region into a slice).
//!
//! Data already in the image is read into, and written from, these segments directly. Only
//! data that crosses the copy-on-read path (fetched from a backing, merged with a partial
//! cluster) goes through buffers of the device's own, because guest memory may change under
//! the device while it stores what it read.

use crate::pool::PoolBuf;

/// Memory one request reads into or writes from, owned by the request until it completes.
pub trait IoBuf: Send + Sync + 'static {
    /// The bytes.
    fn as_bytes(&self) -> &[u8];
    /// The bytes, to fill.
    fn as_bytes_mut(&mut self) -> &mut [u8];
}

impl IoBuf for Vec<u8> {
    fn as_bytes(&self) -> &[u8] {
        self
    }
    fn as_bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl IoBuf for qed::storage::AlignedBuf {
    fn as_bytes(&self) -> &[u8] {
        self
    }
    fn as_bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl IoBuf for Box<[u8]> {
    fn as_bytes(&self) -> &[u8] {
        self
    }
    fn as_bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

enum Segment {
    Vec(Vec<u8>),
    /// A copy buffer at an aligned address (see [`crate::pool`]): an O_DIRECT file reads
    /// into it and writes from it with no bounce copy.
    Aligned(qed::storage::AlignedBuf),
    Other(Box<dyn IoBuf>),
}

impl Segment {
    fn bytes(&self) -> &[u8] {
        match self {
            Segment::Vec(v) => v,
            Segment::Aligned(a) => a,
            Segment::Other(b) => b.as_bytes(),
        }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Segment::Vec(v) => v,
            Segment::Aligned(a) => a,
            Segment::Other(b) => b.as_bytes_mut(),
        }
    }
}

/// The segments of one request, in order: byte `i` of the request is found by walking them.
#[derive(Default)]
pub struct IoBufs {
    segments: Vec<Segment>,
    len: usize,
}

impl std::fmt::Debug for IoBufs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBufs")
            .field("segments", &self.segments.len())
            .field("len", &self.len)
            .finish()
    }
}

impl From<Vec<u8>> for IoBufs {
    fn from(v: Vec<u8>) -> IoBufs {
        let len = v.len();
        IoBufs {
            segments: vec![Segment::Vec(v)],
            len,
        }
    }
}

impl IoBufs {
    /// No segments yet.
    pub fn new() -> IoBufs {
        IoBufs::default()
    }

    /// Appends a segment (guest memory, a recycled buffer, ...).
    pub fn push(&mut self, buf: impl IoBuf) {
        self.len += buf.as_bytes().len();
        self.segments.push(Segment::Other(Box::new(buf)));
    }

    /// Appends a `Vec` segment.
    pub fn push_vec(&mut self, buf: Vec<u8>) {
        self.len += buf.len();
        self.segments.push(Segment::Vec(buf));
    }

    /// Total bytes over all segments.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Each segment with its position in the request, to read into.
    pub fn segments_mut(&mut self) -> impl Iterator<Item = (usize, &mut [u8])> {
        let mut at = 0;
        self.segments.iter_mut().map(move |s| {
            let b = s.bytes_mut();
            let here = at;
            at += b.len();
            (here, b)
        })
    }

    /// Each segment with its position in the request, to write from.
    pub fn segments(&self) -> impl Iterator<Item = (usize, &[u8])> {
        let mut at = 0;
        self.segments.iter().map(move |s| {
            let b = s.bytes();
            let here = at;
            at += b.len();
            (here, b)
        })
    }

    /// Copies `src` into the request's bytes from position `at`.
    pub fn copy_in(&mut self, at: usize, src: &[u8]) {
        let end = at + src.len();
        for (pos, seg) in self.segments_mut() {
            let seg_end = pos + seg.len();
            if seg_end <= at || pos >= end {
                continue;
            }
            let from = at.max(pos);
            let to = end.min(seg_end);
            seg[from - pos..to - pos].copy_from_slice(&src[from - at..to - at]);
        }
    }

    /// Fills `len` bytes from position `at` with zeros.
    pub fn zero(&mut self, at: usize, len: usize) {
        let end = at + len;
        for (pos, seg) in self.segments_mut() {
            let seg_end = pos + seg.len();
            if seg_end <= at || pos >= end {
                continue;
            }
            let (from, to) = (at.max(pos), end.min(seg_end));
            seg[from - pos..to - pos].fill(0);
        }
    }

    /// Copies `len` bytes from position `at` out of the request.
    pub fn copy_out(&self, at: usize, dst: &mut [u8]) {
        let end = at + dst.len();
        for (pos, seg) in self.segments() {
            let seg_end = pos + seg.len();
            if seg_end <= at || pos >= end {
                continue;
            }
            let (from, to) = (at.max(pos), end.min(seg_end));
            dst[from - at..to - at].copy_from_slice(&seg[from - pos..to - pos]);
        }
    }

    /// The bytes as one `Vec`: the segment itself when there is one `Vec` segment, otherwise
    /// a copy of them all.
    pub fn into_vec(mut self) -> Vec<u8> {
        if self.segments.len() == 1 {
            if let Some(Segment::Vec(_)) = self.segments.first() {
                if let Some(Segment::Vec(v)) = self.segments.pop() {
                    return v;
                }
            }
        }
        let mut out = vec![0u8; self.len];
        self.copy_out(0, &mut out);
        out
    }

    /// A request over `vecs`, in order.
    pub fn from_vecs(vecs: Vec<Vec<u8>>) -> IoBufs {
        let mut b = IoBufs::new();
        for v in vecs {
            b.push_vec(v);
        }
        b
    }

    /// The segments as `Vec`s: `Vec` segments as they are (no copy), any other copied.
    pub fn into_vecs(self) -> Vec<Vec<u8>> {
        self.segments
            .into_iter()
            .map(|s| match s {
                Segment::Vec(v) => v,
                Segment::Aligned(a) => a.to_vec(),
                Segment::Other(b) => b.as_bytes().to_vec(),
            })
            .collect()
    }

    /// A request over a pool's copy buffers, in order.
    pub fn from_pool_bufs(bufs: Vec<PoolBuf>) -> IoBufs {
        let mut b = IoBufs::new();
        for buf in bufs {
            b.len += buf.len();
            b.segments.push(match buf {
                PoolBuf::Vec(v) => Segment::Vec(v),
                PoolBuf::Aligned(a) => Segment::Aligned(a),
            });
        }
        b
    }

    /// The segments as a pool's copy buffers: those made by [`IoBufs::from_pool_bufs`] as
    /// they are (no copy), any other copied.
    pub fn into_pool_bufs(self) -> Vec<PoolBuf> {
        self.segments
            .into_iter()
            .map(|s| match s {
                Segment::Vec(v) => PoolBuf::Vec(v),
                Segment::Aligned(a) => PoolBuf::Aligned(a),
                Segment::Other(b) => PoolBuf::Vec(b.as_bytes().to_vec()),
            })
            .collect()
    }

    /// True when every segment is a `Vec` (then [`IoBufs::into_vecs`] copies nothing).
    pub fn all_vecs(&self) -> bool {
        self.segments.iter().all(|s| matches!(s, Segment::Vec(_)))
    }

    /// The segments, given back to their owner.
    pub fn into_segments(self) -> Vec<Box<dyn IoBuf>> {
        self.segments
            .into_iter()
            .map(|s| match s {
                Segment::Vec(v) => Box::new(v) as Box<dyn IoBuf>,
                Segment::Aligned(a) => Box::new(a),
                Segment::Other(b) => b,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> IoBufs {
        let mut b = IoBufs::new();
        b.push_vec(vec![0u8; 3]);
        b.push(vec![0u8; 0].into_boxed_slice());
        b.push(vec![0u8; 5]);
        b
    }

    #[test]
    fn positions_span_segments() {
        let mut b = three();
        assert_eq!(b.len(), 8);
        b.copy_in(2, &[1, 2, 3, 4]);
        let mut out = [9u8; 8];
        b.copy_out(0, &mut out);
        assert_eq!(out, [0, 0, 1, 2, 3, 4, 0, 0]);
        b.zero(3, 2);
        assert_eq!(b.into_vec(), vec![0, 0, 1, 0, 0, 4, 0, 0]);
    }

    #[test]
    fn one_vec_comes_back_as_itself() {
        let v = vec![7u8; 4096];
        let p = v.as_ptr();
        let back = IoBufs::from(v).into_vec();
        assert_eq!(back.as_ptr(), p, "copied instead of handed back");
        assert_eq!(three().into_segments().len(), 3);
    }
}
