//! Tether's global allocator: mimalloc, asked the way C code asks it.
//!
//! The `mimalloc` crate hands every allocation to `mi_malloc_aligned`
//! with the alignment Rust passes, even 1 or 8. mimalloc 3 serves that
//! call quickly only when a free block of the size happens to sit at the
//! alignment; otherwise it takes a generic path that over-allocates
//! unless the size rounds to a power of two (a 48-byte or a 1.5 KiB
//! request). In the proxy that was 19 of a request's 74 allocations, at
//! about 185 instructions each against some 40 (callgrind, with
//! `loadtest/profile.sh`).
//!
//! Every block `mi_malloc` returns is aligned as C's `malloc` must be: to
//! 16 bytes (`max_align_t`) when it is 16 bytes or more, and below that to
//! any power of two up to its size (its size classes are multiples of 8,
//! and of 16 from 16 bytes up, and a page's first block is 16-aligned).
//! A layout within that goes to the plain functions, as Rust's `System`
//! allocator does with libc's; any other keeps the aligned ones.

use core::alloc::{GlobalAlloc, Layout};
use core::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment of every block `mi_malloc` returns of at least this size.
const MALLOC_ALIGN: usize = 16;

/// mimalloc as the global allocator:
///
/// ```
/// #[global_allocator]
/// static ALLOCATOR: tether_alloc::Mimalloc = tether_alloc::Mimalloc;
///
/// fn main() {
///     let path: String = "/v1/repos/tether/issues".into();
///     assert_eq!(path.len(), 23);
/// }
/// ```
pub struct Mimalloc;

/// Whether a block of `size` bytes from the plain functions already has
/// `align`.
#[inline]
fn plain(align: usize, size: usize) -> bool {
    align <= MALLOC_ALIGN && align <= size
}

/// A new block for `layout` from `unaligned` (`mi_malloc` or `mi_zalloc`)
/// when its alignment suffices, else from `aligned`, its `_aligned` twin.
///
/// # Safety
///
/// The two functions must be such a pair.
#[inline]
unsafe fn new_block(
    layout: Layout,
    unaligned: unsafe extern "C" fn(usize) -> *mut c_void,
    aligned: unsafe extern "C" fn(usize, usize) -> *mut c_void,
) -> *mut u8 {
    let (size, align) = (layout.size(), layout.align());
    // SAFETY: C allocation calls, each given what it asks for.
    unsafe {
        if plain(align, size) {
            unaligned(size).cast()
        } else {
            aligned(size, align).cast()
        }
    }
}

// SAFETY: every method returns a block from mimalloc of at least the
// layout's size at the layout's alignment (the plain functions only where
// `plain` says theirs suffices), or null; `dealloc` and `realloc` take
// only blocks this allocator returned, as `GlobalAlloc`'s contract says,
// and `mi_free` and `mi_realloc*` accept any mimalloc block.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's allocating pair.
        unsafe { new_block(layout, mi::mi_malloc, mi::mi_malloc_aligned) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's zeroing pair.
        unsafe { new_block(layout, mi::mi_zalloc, mi::mi_zalloc_aligned) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        // SAFETY: `ptr` came from this allocator with `layout`; the new
        // block keeps `align` by the same rule as `alloc`.
        unsafe {
            if plain(align, new_size) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, align).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes around every small size class, mimalloc's medium and large
    /// blocks, and a huge one.
    fn sizes() -> impl Iterator<Item = usize> {
        (1..=300).chain((1000..=1100).step_by(4)).chain([
            1500,
            4095,
            4096,
            4097,
            10_000,
            70_000,
            300_000,
            1 << 20,
            (4 << 20) + 3,
        ])
    }

    const ALIGNS: [usize; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 4096];

    fn fill(ptr: *mut u8, len: usize, seed: usize) {
        for i in 0..len {
            // SAFETY: `ptr` holds at least `len` bytes.
            unsafe { ptr.add(i).write((i ^ seed) as u8) }
        }
    }

    fn holds(ptr: *const u8, len: usize, seed: usize) -> bool {
        // SAFETY: `ptr` holds at least `len` initialized bytes.
        (0..len).all(|i| unsafe { ptr.add(i).read() } == (i ^ seed) as u8)
    }

    #[test]
    fn every_block_has_its_layouts_alignment_and_size() {
        // Several blocks of each layout live at once, so they come from
        // different places in a page, not the same slot reused.
        for align in ALIGNS {
            for size in sizes() {
                let layout = Layout::from_size_align(size, align).expect("layout");
                let blocks: Vec<*mut u8> = (0..4)
                    .map(|seed| {
                        // SAFETY: a layout of non-zero size.
                        let ptr = unsafe { Mimalloc.alloc(layout) };
                        assert!(!ptr.is_null(), "{size} bytes at {align}");
                        assert_eq!(ptr as usize % align, 0, "{size} bytes at {align}");
                        fill(ptr, size, seed);
                        ptr
                    })
                    .collect();
                for (seed, ptr) in blocks.into_iter().enumerate() {
                    assert!(holds(ptr, size, seed), "{size} bytes at {align} overlap");
                    // SAFETY: allocated above with `layout`.
                    unsafe { Mimalloc.dealloc(ptr, layout) };
                }
            }
        }
    }

    #[test]
    fn zeroed_blocks_are_zero_and_aligned() {
        for align in ALIGNS {
            for size in sizes() {
                let layout = Layout::from_size_align(size, align).expect("layout");
                // A block written and freed first, so a reused one must be
                // cleared, not merely fresh from the OS.
                // SAFETY: a layout of non-zero size, freed with it.
                unsafe {
                    let dirty = Mimalloc.alloc(layout);
                    fill(dirty, size, 0xff);
                    Mimalloc.dealloc(dirty, layout);
                }
                // SAFETY: as above.
                let ptr = unsafe { Mimalloc.alloc_zeroed(layout) };
                assert!(!ptr.is_null());
                assert_eq!(ptr as usize % align, 0, "{size} bytes at {align}");
                // SAFETY: `ptr` holds `size` bytes.
                let zero = (0..size).all(|i| unsafe { ptr.add(i).read() } == 0);
                assert!(zero, "{size} bytes at {align}");
                // SAFETY: allocated above with `layout`.
                unsafe { Mimalloc.dealloc(ptr, layout) };
            }
        }
    }

    #[test]
    fn realloc_keeps_the_contents_and_the_alignment() {
        for align in ALIGNS {
            for size in sizes().step_by(7) {
                let layout = Layout::from_size_align(size, align).expect("layout");
                for new_size in [1, size / 2 + 1, size, size + 1, size * 3, size + 70_000] {
                    // SAFETY: a layout of non-zero size; the block is
                    // reallocated with it and freed with its new size.
                    unsafe {
                        let ptr = Mimalloc.alloc(layout);
                        fill(ptr, size, size);
                        let grown = Mimalloc.realloc(ptr, layout, new_size);
                        assert!(!grown.is_null());
                        assert_eq!(grown as usize % align, 0, "{size} -> {new_size} at {align}");
                        assert!(
                            holds(grown, size.min(new_size), size),
                            "{size} -> {new_size} at {align}"
                        );
                        fill(grown, new_size, 1);
                        Mimalloc.dealloc(
                            grown,
                            Layout::from_size_align(new_size, align).expect("layout"),
                        );
                    }
                }
            }
        }
    }
}
