//! [`AlignedBuf`]: owned heap memory at an aligned address, the memory an O_DIRECT transfer
//! can use as it is (no bounce copy), with a length that can shrink and grow again within
//! the capacity it was made with, so that a buffer is made once and reused.

use std::alloc::Layout;
use std::io;
use std::ptr::NonNull;

/// Owned, zero-initialised bytes at an address aligned to [`AlignedBuf::align`]: `len` of
/// them in use, room for [`AlignedBuf::capacity`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
    /// What was allocated: `capacity` bytes, at least one.
    layout: Layout,
}

// SAFETY: the buffer is plain owned memory (no shared state, nothing tied to a thread); `&`
// gives only shared reads of its bytes and `&mut` is needed to change them.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above: a `&AlignedBuf` only reads.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `capacity` zeroed bytes (all in use) at an address aligned to `align`, a power of two
    /// (rounded up to one). Fails (`InvalidInput`) for a size or alignment no allocation can
    /// have, and (`OutOfMemory`) when the allocator has no memory.
    pub fn zeroed(capacity: usize, align: usize) -> io::Result<AlignedBuf> {
        let align = align.max(1).checked_next_power_of_two().unwrap_or(0);
        let layout = Layout::from_size_align(capacity.max(1), align)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or(io::ErrorKind::OutOfMemory)?;
        Ok(AlignedBuf {
            ptr,
            len: capacity,
            capacity,
            layout,
        })
    }

    /// The bytes in use.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no bytes are in use.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most bytes the buffer can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The alignment of the buffer's address.
    pub fn align(&self) -> usize {
        self.layout.align()
    }

    /// Keeps the first `len` bytes in use (no change when `len` is not shorter).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Sets the bytes in use to `len`, at most the capacity (a longer `len` stops there);
    /// bytes that come into use read as zeros.
    pub fn resize_zeroed(&mut self, len: usize) {
        let len = len.min(self.capacity);
        if len > self.len {
            let old = self.len;
            self.len = len;
            self.as_mut_slice()[old..].fill(0);
        } else {
            self.len = len;
        }
    }

    /// Sets the bytes in use to `len`, at most the capacity (a longer `len` stops there),
    /// without zeroing: bytes that come into use hold what they last held (zeros if they were
    /// never written), for a buffer whose user fills it before reading it.
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.capacity);
    }

    /// The bytes in use.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points at `capacity` initialised bytes owned by `self` (zeroed when
        // made, written only through `&mut` slices since), and `len <= capacity`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes in use, to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with this very layout and is freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .field("align", &self.layout.align())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_resized_within_its_capacity() {
        let mut b = AlignedBuf::zeroed(3 * 4096, 4096).unwrap();
        assert_eq!(b.as_ptr() as usize % 4096, 0);
        assert_eq!(
            (b.len(), b.capacity(), b.align()),
            (3 * 4096, 3 * 4096, 4096)
        );
        assert!(b.iter().all(|&x| x == 0));
        b.fill(7);
        b.truncate(100);
        assert_eq!(b.len(), 100);
        b.resize_zeroed(200);
        assert_eq!(&b[..100], &[7u8; 100][..]);
        assert!(
            b[100..].iter().all(|&x| x == 0),
            "regrown bytes kept old data"
        );
        b.resize_zeroed(1 << 30);
        assert_eq!(b.len(), 3 * 4096, "grew past its capacity");
        assert!(b[200..].iter().all(|&x| x == 0));
        b.fill(9);
        b.set_len(1);
        b.set_len(1 << 30);
        assert_eq!(b.len(), 3 * 4096, "grew past its capacity");
        assert!(b.iter().all(|&x| x == 9), "set_len zeroed");
    }

    #[test]
    fn impossible_layouts_are_errors() {
        assert!(AlignedBuf::zeroed(usize::MAX, 4096).is_err());
        let odd = AlignedBuf::zeroed(10, 3).unwrap();
        assert_eq!(odd.align(), 4);
        let mut empty = AlignedBuf::zeroed(0, 512).unwrap();
        empty.resize_zeroed(1);
        assert!(empty.is_empty() && empty.capacity() == 0);
    }
}
