//! A global allocator that counts allocations, for "allocates nothing" tests and benches.
//!
//! Install it in the test or bench binary:
//! `#[global_allocator] static GLOBAL: CountingAllocator = CountingAllocator;`
//! then compare [`allocations`] before and after the code under test. Counts are per
//! thread: the test harness's own threads allocate while a test runs (more so on a busy
//! machine), and must not count against the code under test.
#![allow(unsafe_code)] // a GlobalAlloc has to be `unsafe impl`

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    // Const-initialised and without Drop: touching it never allocates (no lazy
    // registration), so the allocator can use it.
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn count() {
    // try_with: the slot may already be gone while a thread exits.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

/// The system allocator, counting every allocation and reallocation of each thread.
pub struct CountingAllocator;

// SAFETY: every call is passed unchanged to the system allocator; only a counter is added.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Allocations so far on this thread (when [`CountingAllocator`] is the global allocator).
pub fn allocations() -> usize {
    ALLOCATIONS.with(Cell::get)
}
