//! Big buffers reused instead of mapped afresh. A message's body (up to tens of MB) is
//! received into one allocation and freed once written on; glibc serves anything above
//! its mmap threshold (at most 32 MB, often less) with a fresh mapping, so every byte of
//! such a message costs a page fault and a page cleared by the kernel, and the munmap
//! after it. [`BlockCache`] keeps freed big blocks (up to [`CACHE_MAX`] bytes, by size
//! class) and hands them out again; below [`BIG`] everything goes to the system
//! allocator unchanged. The one-second memory tick returns the cache to the system
//! once big blocks stopped coming and going ([`BlockCache::drain_if_idle`]).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// Allocations from this size on are big: their blocks are kept when freed (a
/// tunnel's read chunks, 256 KiB, among them; glibc's own threshold starts at 128 KiB).
pub(super) const BIG: usize = 128 * 1024;
/// Freed blocks kept at most, in bytes.
pub(super) const CACHE_MAX: usize = 256 << 20;
/// Largest alignment a cached block serves: malloc's own, so that a block can grow
/// with `realloc` (glibc moves a mapped block with `mremap`, copying nothing).
const MAX_ALIGN: usize = 16;
/// Blocks kept at most, in number (a 40 MB message reassembled from 256 KiB chunks
/// frees about 160 of them at once).
const SLOTS: usize = 256;

/// The block size a big request gets: rounded up to an eighth of its power of two,
/// so that requests of nearly the same size (one message after another, each reserved
/// from a slightly different point) share a class, for at most 12.5% more address
/// space (untouched pages cost no memory).
pub fn class_of(size: usize) -> usize {
    let step = (size.next_power_of_two() >> 4).max(1);
    size.div_ceil(step) * step
}

/// A cached block of `have` bytes serves a request of class `want` if it is no
/// more than a quarter larger.
fn fits(have: usize, want: usize) -> bool {
    have >= want && have - want <= want / 4
}

/// The bytes a `System` block really has (glibc's `malloc_usable_size`).
fn usable_size(ptr: *mut u8) -> usize {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `ptr` is a live block of the system allocator.
    unsafe {
        libc::malloc_usable_size(ptr.cast())
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = ptr;
        0
    }
}

/// Gives a cached block back to the system.
fn release(b: &Slot) {
    let layout = Layout::from_size_align(b.size, MAX_ALIGN).expect("a block layout");
    // SAFETY: the block came from `System` (alignment MAX_ALIGN, malloc's own, so its
    // release is `free`, which reads the block's size from the block itself) and left
    // the cache.
    unsafe { System.dealloc(b.ptr as *mut u8, layout) };
}

#[derive(Clone, Copy)]
struct Slot {
    size: usize,
    ptr: usize,
}

const EMPTY: Slot = Slot { size: 0, ptr: 0 };

/// Counts, for tests and the benchmark's reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockStats {
    /// Big allocations served from the cache.
    pub hits: u64,
    /// Big allocations that went to the system.
    pub misses: u64,
    /// Bytes held in the cache now.
    pub cached: usize,
}

/// A cache of freed big blocks in front of the system allocator.
pub struct BlockCache {
    lock: AtomicBool,
    slots: UnsafeCell<[Slot; SLOTS]>,
    cached: AtomicUsize,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Big allocations and frees so far; unchanged over a tick means idle.
    ops: AtomicU64,
    ops_at_tick: AtomicU64,
}

// SAFETY: `slots` is only touched while `lock` is held.
unsafe impl Sync for BlockCache {}

impl BlockCache {
    /// An empty cache.
    pub const fn new() -> BlockCache {
        BlockCache {
            lock: AtomicBool::new(false),
            slots: UnsafeCell::new([EMPTY; SLOTS]),
            cached: AtomicUsize::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            ops: AtomicU64::new(0),
            ops_at_tick: AtomicU64::new(0),
        }
    }

    /// Runs `f` on the slots under the lock (a spin lock: the allocator cannot block
    /// on anything that might allocate, and the sections are a few loads and stores).
    fn with_slots<R>(&self, f: impl FnOnce(&mut [Slot; SLOTS]) -> R) -> R {
        while self
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        // SAFETY: the lock is held until the release below.
        let r = f(unsafe { &mut *self.slots.get() });
        self.lock.store(false, Ordering::Release);
        r
    }

    fn is_big(layout: &Layout) -> bool {
        layout.size() >= BIG && layout.align() <= MAX_ALIGN
    }

    fn block_layout(layout: &Layout) -> Layout {
        Layout::from_size_align(class_of(layout.size()), MAX_ALIGN).expect("a valid block layout")
    }

    /// A cached block of at least `size` bytes and at most a quarter more (the
    /// smallest such), if any.
    fn take(&self, size: usize) -> Option<*mut u8> {
        let got = self.with_slots(|slots| {
            let slot = slots
                .iter_mut()
                .filter(|s| fits(s.size, size))
                .min_by_key(|s| s.size)?;
            let ptr = slot.ptr;
            self.cached.fetch_sub(slot.size, Ordering::Relaxed);
            *slot = EMPTY;
            Some(ptr)
        })?;
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(got as *mut u8)
    }

    /// Keeps a freed block; returns whether it did. It is kept with its real size
    /// (a block that grew in place, or was handed out for a smaller class, is larger
    /// than its last layout says). When the cache is full, blocks that would not serve
    /// its class make room (what a job sends changed: 160 KB messages, then 40 MB
    /// ones), in bytes and in slots; blocks that would do not (the cache already holds
    /// enough of those).
    fn keep(&self, ptr: *mut u8, class: usize) -> bool {
        let size = usable_size(ptr).max(class);
        if size > CACHE_MAX {
            return false;
        }
        // Evicted blocks are given back after the lock is let go (no allocation here).
        let mut evicted = [EMPTY; SLOTS];
        let kept = self.with_slots(|slots| {
            let mut cached = self.cached.load(Ordering::Relaxed);
            for (slot, out) in slots.iter_mut().zip(evicted.iter_mut()) {
                if cached + size <= CACHE_MAX {
                    break;
                }
                if slot.size != 0 && !fits(slot.size, class) {
                    cached -= slot.size;
                    *out = std::mem::replace(slot, EMPTY);
                }
            }
            let mut kept = false;
            if cached + size <= CACHE_MAX {
                // A free slot, or else one whose block would not serve this class.
                let free = match slots.iter().position(|s| s.size == 0) {
                    Some(i) => Some(i),
                    None => slots
                        .iter()
                        .position(|s| !fits(s.size, class))
                        .inspect(|&i| {
                            cached -= slots[i].size;
                            evicted[i] = slots[i];
                        }),
                };
                if let Some(i) = free {
                    slots[i] = Slot {
                        size,
                        ptr: ptr as usize,
                    };
                    cached += size;
                    kept = true;
                }
            }
            self.cached.store(cached, Ordering::Relaxed);
            kept
        });
        for b in evicted.iter().filter(|b| b.size != 0) {
            release(b);
        }
        kept
    }

    /// Hits, misses and bytes held.
    pub fn stats(&self) -> BlockStats {
        BlockStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            cached: self.cached.load(Ordering::Relaxed),
        }
    }

    /// Returns every cached block to the system.
    pub fn drain(&self) {
        let blocks = self.with_slots(|slots| {
            self.cached.store(0, Ordering::Relaxed);
            std::mem::replace(slots, [EMPTY; SLOTS])
        });
        for b in blocks.iter().filter(|b| b.size != 0) {
            release(b);
        }
    }

    /// At a tick: drains the cache if no big block was allocated or freed since the
    /// previous tick. Returns whether it did.
    pub fn drain_if_idle(&self) -> bool {
        let ops = self.ops.load(Ordering::Relaxed);
        let idle = self.ops_at_tick.swap(ops, Ordering::Relaxed) == ops;
        if idle && self.cached.load(Ordering::Relaxed) > 0 {
            self.drain();
            return true;
        }
        false
    }
}

impl Default for BlockCache {
    fn default() -> BlockCache {
        BlockCache::new()
    }
}

// SAFETY: big blocks are always `System` blocks of their class's layout, whether they
// come from the cache or not, and go back either to the cache or to `System` with that
// same layout; everything else is `System`'s own.
unsafe impl GlobalAlloc for BlockCache {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !Self::is_big(&layout) {
            return System.alloc(layout);
        }
        self.ops.fetch_add(1, Ordering::Relaxed);
        let block = Self::block_layout(&layout);
        if let Some(ptr) = self.take(block.size()) {
            return ptr;
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        System.alloc(block)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !Self::is_big(&layout) {
            return System.alloc_zeroed(layout);
        }
        self.ops.fetch_add(1, Ordering::Relaxed);
        let block = Self::block_layout(&layout);
        if let Some(ptr) = self.take(block.size()) {
            ptr.write_bytes(0, layout.size());
            return ptr;
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        System.alloc_zeroed(block)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !Self::is_big(&layout) {
            return System.dealloc(ptr, layout);
        }
        self.ops.fetch_add(1, Ordering::Relaxed);
        let block = Self::block_layout(&layout);
        if !self.keep(ptr, block.size()) {
            System.dealloc(ptr, block);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = Layout::from_size_align_unchecked(new_size, layout.align());
        match (Self::is_big(&layout), Self::is_big(&new)) {
            (false, false) => System.realloc(ptr, layout, new_size),
            // Growing or shrinking within its class: the block already has the room.
            (true, true) if class_of(layout.size()) == class_of(new_size) => ptr,
            // From one class to another: the system moves the block (for a mapped
            // one, by remapping its pages: nothing copied, nothing faulted in again).
            (true, true) => {
                self.ops.fetch_add(1, Ordering::Relaxed);
                self.misses.fetch_add(1, Ordering::Relaxed);
                System.realloc(ptr, Self::block_layout(&layout), class_of(new_size))
            }
            _ => {
                let out = self.alloc(new);
                if !out.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, out, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                out
            }
        }
    }
}

/// The proxy's global allocator: [`BLOCKS`], installed by the binary.
pub struct Allocator;

/// The cache behind [`Allocator`].
pub static BLOCKS: BlockCache = BlockCache::new();

// SAFETY: forwards to `BLOCKS`.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        BLOCKS.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        BLOCKS.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        BLOCKS.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        BLOCKS.realloc(ptr, layout, new_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 8).unwrap()
    }

    /// Allocates `n` blocks of `size` bytes, all live at once, then frees them.
    unsafe fn alloc_then_free(cache: &BlockCache, n: usize, size: usize) {
        let blocks: Vec<*mut u8> = (0..n).map(|_| cache.alloc(layout(size))).collect();
        for b in blocks {
            cache.dealloc(b, layout(size));
        }
    }

    #[test]
    fn classes_round_up_by_at_most_an_eighth_and_group_near_sizes() {
        for size in [
            BIG,
            BIG + 1,
            300_000,
            3 << 20,
            40_016_384,
            40_100_000,
            (64 << 20) - 1,
        ] {
            let c = class_of(size);
            assert!(c >= size && c - size <= size / 8, "{size} -> {c}");
            assert_eq!(c % 4096, 0, "{size} -> {c}: whole pages");
        }
        assert_eq!(class_of(40_016_384), class_of(40_100_000));
        assert_eq!(class_of(40_100_000), 40 << 20);
    }

    #[test]
    fn a_freed_big_block_is_handed_out_again_with_its_bytes_writable() {
        let cache = BlockCache::new();
        unsafe {
            let a = cache.alloc(layout(40_000_000));
            a.write_bytes(0xab, 40_000_000);
            cache.dealloc(a, layout(40_000_000));
            // Kept with its real size: the class, and the allocator's page of bookkeeping.
            let kept = cache.stats().cached;
            assert!((40 << 20..(40 << 20) + 4096).contains(&kept), "{kept}");
            // A slightly different size of the same class: the same block.
            let b = cache.alloc(layout(40_065_536));
            assert_eq!(a, b);
            b.add(40_065_535).write(1);
            assert_eq!(
                cache.stats(),
                BlockStats {
                    hits: 1,
                    misses: 1,
                    cached: 0
                }
            );
            // Zeroed means zeroed, also from the cache.
            cache.dealloc(b, layout(40_065_536));
            let z = cache.alloc_zeroed(layout(40_000_000));
            assert_eq!(z, a);
            assert!(std::slice::from_raw_parts(z, 40_000_000)
                .iter()
                .all(|&x| x == 0));
            cache.dealloc(z, layout(40_000_000));
        }
        cache.drain();
        assert_eq!(cache.stats().cached, 0);
    }

    #[test]
    fn small_and_overaligned_requests_are_the_system_s() {
        let cache = BlockCache::new();
        unsafe {
            let s = cache.alloc(layout(BIG - 1));
            cache.dealloc(s, layout(BIG - 1));
            let over = Layout::from_size_align(BIG, 4096).unwrap();
            let o = cache.alloc(over);
            assert_eq!(o as usize % 4096, 0);
            cache.dealloc(o, over);
            let aligned = Layout::from_size_align(BIG, MAX_ALIGN).unwrap();
            let p = cache.alloc(aligned);
            assert_eq!(p as usize % MAX_ALIGN, 0);
            cache.dealloc(p, aligned);
        }
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses), (0, 1));
        assert!(
            stats.cached >= class_of(BIG) && fits(stats.cached, class_of(BIG)),
            "{stats:?}"
        );
        cache.drain();
    }

    #[test]
    fn realloc_within_a_class_stays_put_and_across_classes_keeps_the_bytes() {
        let cache = BlockCache::new();
        unsafe {
            let small = cache.alloc(layout(1000));
            small.write_bytes(7, 1000);
            let a = cache.realloc(small, layout(1000), (2 << 20) + 1000);
            assert!(std::slice::from_raw_parts(a, 1000).iter().all(|&x| x == 7));
            let same = cache.realloc(a, layout((2 << 20) + 1000), (2 << 20) + 200_000);
            assert_eq!(same, a, "the class has room");
            let bigger = cache.realloc(same, layout((2 << 20) + 200_000), 8 << 20);
            assert!(std::slice::from_raw_parts(bigger, 1000)
                .iter()
                .all(|&x| x == 7));
            bigger.add((8 << 20) - 1).write(9);
            assert_eq!(cache.stats().cached, 0, "the block moved, nothing to keep");
            let back = cache.realloc(bigger, layout(8 << 20), 500);
            assert!(std::slice::from_raw_parts(back, 500)
                .iter()
                .all(|&x| x == 7));
            cache.dealloc(back, layout(500));
        }
        cache.drain();
    }

    #[test]
    fn a_block_that_grew_serves_its_smaller_class_again() {
        // A message buffer reserved for 40 MB, grown a little past its class before it
        // was freed: the next 40 MB buffer is the same block, not fresh pages.
        let cache = BlockCache::new();
        unsafe {
            let a = cache.alloc(layout(40_000_000));
            let grown = cache.realloc(a, layout(40_000_000), 43_000_000);
            cache.dealloc(grown, layout(43_000_000));
            let b = cache.alloc(layout(40_010_000));
            assert_eq!(b, grown);
            b.add(43_000_000 - 1).write(1);
            cache.dealloc(b, layout(40_010_000));
            // Nor is a block far larger than asked handed out.
            let small = cache.alloc(layout(20_000_000));
            assert_ne!(small, grown);
            cache.dealloc(small, layout(20_000_000));
        }
        cache.drain();
    }

    #[test]
    fn a_new_size_takes_a_slot_when_every_slot_holds_small_blocks() {
        let cache = BlockCache::new();
        let small = 180_000;
        unsafe {
            alloc_then_free(&cache, SLOTS, small);
            let a = cache.alloc(layout(40_000_000));
            cache.dealloc(a, layout(40_000_000));
            let b = cache.alloc(layout(40_000_000));
            assert_eq!(a, b, "the 40 MB block was kept in a small block's slot");
            cache.dealloc(b, layout(40_000_000));
        }
        cache.drain();
    }

    #[test]
    fn a_new_size_evicts_the_old_ones_when_the_cache_is_full() {
        let cache = BlockCache::new();
        let small = 4 << 20;
        let big = 40 << 20;
        unsafe {
            alloc_then_free(&cache, CACHE_MAX / small, small);
            let full = cache.stats().cached;
            assert!(full > CACHE_MAX - 2 * small, "full of 4 MB blocks: {full}");
            let a = cache.alloc(layout(big));
            cache.dealloc(a, layout(big));
            let after = cache.stats().cached;
            assert!(
                after <= CACHE_MAX && after > CACHE_MAX - big - 2 * small,
                "4 MB blocks made room: {after}"
            );
            let b = cache.alloc(layout(big));
            assert_eq!(a, b, "the 40 MB block is handed out again");
            cache.dealloc(b, layout(big));
        }
        cache.drain();
        assert_eq!(cache.stats().cached, 0);
    }

    #[test]
    fn the_cache_holds_at_most_its_bound_and_drains_when_idle() {
        let cache = BlockCache::new();
        let size = 48 << 20;
        unsafe { alloc_then_free(&cache, 8, size) };
        let held = cache.stats().cached;
        assert!(
            held <= CACHE_MAX && held >= (CACHE_MAX / size - 1) * size,
            "{held}"
        );
        assert!(
            !cache.drain_if_idle(),
            "blocks came and went since the last tick"
        );
        assert!(cache.drain_if_idle(), "a whole tick without big blocks");
        assert_eq!(cache.stats().cached, 0);
    }
}
