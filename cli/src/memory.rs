//! Giving memory back to the system after the state changes.
//!
//! A new snapshot is built beside the one in force, and the old one is freed once the
//! last request holding it ends. glibc keeps freed memory in its heaps; with a large
//! state (100k VMs) the resident set then stays at the peak of the last rebuild. A
//! `malloc_trim` shortly after each change hands the free pages back.

use std::sync::Arc;
use std::time::Duration;

use vmedge_registry::{watch, Snapshot};

/// How long after a change the trim waits: the old snapshot is freed only when the
/// requests that hold it end, and changes that come close together get one trim.
const SETTLE: Duration = Duration::from_secs(2);

/// Trims the heap after every change `changes` sees, on a thread of its own, for as long
/// as the registry lives.
pub fn trim_after_changes(mut changes: watch::Receiver<Arc<Snapshot>>) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    std::thread::Builder::new()
        .name("vmedge-trim".into())
        .spawn(move || {
            runtime.block_on(async {
                // The first load's parse left its garbage too.
                release_free_memory();
                while changes.changed().await.is_ok() {
                    tokio::time::sleep(SETTLE).await;
                    changes.mark_unchanged();
                    release_free_memory();
                }
            })
        })?;
    Ok(())
}

/// How often [`trim_after_work`] looks.
pub const TRIM_PERIOD: Duration = Duration::from_secs(5);

/// Trims the heap every [`TRIM_PERIOD`] in which `work` (a count that only grows) moved,
/// on a thread of its own: the edge frees a request's machinery when it ends, and after a
/// burst of requests glibc would keep the peak resident (10k requests at once left ~3 kB
/// per connection that stayed open: bench/RESULTS.md).
pub fn trim_after_work(work: impl Fn() -> u64 + Send + 'static) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("vmedge-trim".into())
        .spawn(move || {
            let mut seen = work();
            loop {
                std::thread::sleep(TRIM_PERIOD);
                let now = work();
                if now != seen {
                    seen = now;
                    release_free_memory();
                }
            }
        })?;
    Ok(())
}

/// Returns the allocator's free pages to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_free_memory() {
    // SAFETY: malloc_trim only walks glibc's own heaps (under their locks) and returns
    // free pages with madvise; it touches no memory that is in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Returns the allocator's free pages to the system (nothing to do here).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() {}
