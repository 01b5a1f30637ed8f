//! Giving freed memory back to the kernel after a burst. The egress scheduler holds
//! up to its memory budget while a sender outruns the link; once that drains, the
//! allocator keeps the freed pages (glibc's per-thread arenas), and a sidecar would
//! sit on hundreds of MB until the next burst. So at a one-second tick, if the queue
//! is empty, nothing was queued since the previous tick, and at least [`AFTER_BYTES`]
//! went through it since the last time, `malloc_trim` returns the free pages, on a
//! blocking thread.

mod blocks;

use std::sync::atomic::{AtomicU64, Ordering};

pub use blocks::{class_of, Allocator, BlockCache, BlockStats, BLOCKS};
use std::time::Duration;

/// Bytes queued since the last return before an empty queue triggers one.
pub(crate) const AFTER_BYTES: u64 = 64 << 20;
/// How often an idle queue is checked.
pub(crate) const TICK: Duration = Duration::from_secs(1);

/// Counts what went through the queue since memory was last given back.
#[derive(Debug, Default)]
pub(crate) struct MemoryReturn {
    queued_since: AtomicU64,
    /// `queued_since` at the previous tick: equal now means a whole quiet tick.
    at_last_tick: AtomicU64,
}

impl MemoryReturn {
    /// `bytes` were queued.
    pub(crate) fn queued(&self, bytes: u64) {
        self.queued_since.fetch_add(bytes, Ordering::Relaxed);
    }

    /// At a tick, the queue holds `used` bytes: whether to give memory back now. Only
    /// after a burst: the queue is empty, nothing was queued for a whole tick (so not
    /// between the iterations of a running job), and enough went through since the
    /// last time.
    pub(crate) fn due(&self, used: u64) -> bool {
        let now = self.queued_since.load(Ordering::Relaxed);
        let quiet = self.at_last_tick.swap(now, Ordering::Relaxed) == now;
        if used != 0 || !quiet || now < AFTER_BYTES {
            return false;
        }
        // What arrives meanwhile counts towards the next time.
        let rest = self.queued_since.fetch_sub(now, Ordering::Relaxed) - now;
        self.at_last_tick.store(rest, Ordering::Relaxed);
        true
    }
}

/// At a tick: whether big blocks stopped coming and going while the cache holds some
/// (a same-host relay never queues in the egress, so its bursts end here).
pub(crate) fn blocks_idle() -> bool {
    BLOCKS.drain_if_idle()
}

/// Returns the cached big blocks and the allocator's free pages to the kernel.
pub(crate) fn trim() {
    BLOCKS.drain();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_after_a_burst_once_a_whole_tick_was_quiet() {
        let m = MemoryReturn::default();
        m.queued(AFTER_BYTES - 1);
        assert!(!m.due(0), "bytes were queued during this tick");
        assert!(!m.due(0), "not enough went through");
        m.queued(1);
        assert!(!m.due(0), "bytes were queued during this tick");
        m.queued(10);
        assert!(!m.due(0), "still flowing (a job between iterations)");
        assert!(!m.due(5), "the queue still holds bytes");
        assert!(m.due(0), "a quiet tick after the burst");
        assert!(!m.due(0), "counted afresh after a return");
    }
}
