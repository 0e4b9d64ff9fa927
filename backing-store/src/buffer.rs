//! Buffers aligned for O_DIRECT. A read's buffer becomes the returned `Bytes` without a copy
//! (`Bytes::from_owner`); a write's data is copied into one only when O_DIRECT needs it.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

use crate::constants::BUFFER_ALIGNMENT_BYTES;

/// A zero-initialised heap buffer aligned to `BUFFER_ALIGNMENT_BYTES`. Its address never
/// changes while it lives, so the kernel may own it for the duration of an io_uring request.
pub(crate) struct AlignedBuffer {
    pointer: NonNull<u8>,
    len: usize,
    /// Allocated size: `len` rounded up to the alignment (at least one alignment unit, so a
    /// zero-length buffer still has a valid allocation).
    capacity: usize,
}

// SAFETY: the buffer owns its allocation exclusively, like a Vec<u8>; no interior mutability.
unsafe impl Send for AlignedBuffer {}
// SAFETY: shared references only give out `&[u8]`, like a Vec<u8>.
unsafe impl Sync for AlignedBuffer {}

impl AlignedBuffer {
    pub(crate) fn zeroed(len: usize) -> AlignedBuffer {
        let capacity = len.max(1).next_multiple_of(BUFFER_ALIGNMENT_BYTES);
        let layout = Self::layout(capacity);
        // SAFETY: the layout has a non-zero size (capacity >= BUFFER_ALIGNMENT_BYTES).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(pointer) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        AlignedBuffer { pointer, len, capacity }
    }

    pub(crate) fn copy_from(data: &[u8]) -> AlignedBuffer {
        let mut buffer = AlignedBuffer::zeroed(data.len());
        buffer.as_mut_slice().copy_from_slice(data);
        buffer
    }

    fn layout(capacity: usize) -> Layout {
        match Layout::from_size_align(capacity, BUFFER_ALIGNMENT_BYTES) {
            Ok(layout) => layout,
            Err(error) => panic!("invalid buffer layout for {capacity} bytes: {error}"),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.pointer.as_ptr()
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the allocation holds `capacity >= len` initialised (zeroed) bytes, and the
        // exclusive borrow of self guarantees no other reference exists.
        unsafe { std::slice::from_raw_parts_mut(self.pointer.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuffer {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the allocation holds `capacity >= len` initialised bytes and lives as long as
        // self; only shared access is handed out here.
        unsafe { std::slice::from_raw_parts(self.pointer.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with exactly this layout and freed only here.
        unsafe { alloc::dealloc(self.pointer.as_ptr(), Self::layout(self.capacity)) };
    }
}

/// True when `pointer` is aligned to `alignment` (a power of two).
pub(crate) fn is_aligned(pointer: *const u8, alignment: usize) -> bool {
    assert!(alignment.is_power_of_two());
    (pointer as usize).is_multiple_of(alignment)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for len in [0, 1, 511, 4096, 4097, 1 << 20] {
            let mut buffer = AlignedBuffer::zeroed(len);
            assert!(is_aligned(buffer.as_mut_ptr(), BUFFER_ALIGNMENT_BYTES));
            assert_eq!(buffer.as_ref().len(), len);
            assert!(buffer.as_ref().iter().all(|byte| *byte == 0));
        }
        let buffer = AlignedBuffer::copy_from(b"hello");
        assert_eq!(buffer.as_ref(), b"hello");
    }
}
