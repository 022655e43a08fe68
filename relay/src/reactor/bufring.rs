//! The per-worker provided-buffer ring (`IORING_REGISTER_PBUF_RING`).
//!
//! Receives pick a buffer from this ring only when data arrives, so an idle connection holds
//! no user-space buffer. A buffer picked by the kernel is *checked out*: the session that got
//! its completion owns it until it calls [`BufRing::recycle`], which it does only after the
//! last send that reads from it has completed. The memory itself lives as long as the ring
//! (it is unmapped only after the io_uring instance is gone), so a pointer into it is always
//! valid; the check-out discipline is what keeps its *contents* from being overwritten while
//! a send still reads them.
//!
//! Buffers are handed to the kernel on demand: the ring starts with a small set and grows
//! (up to the configured count) while more than three quarters of the provided buffers are
//! checked out. Because the kernel takes buffers in ring order, the memory a worker touches
//! follows its peak in-flight data, not the configured maximum; and since after a burst every
//! provided buffer has been written once, an idle worker hands their pages back
//! ([`BufRing::release_pages`], only when nothing is checked out and the kernel cannot be
//! filling a buffer: see `Reactor::release_buffer_pages`).

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

/// How many buffers to provide at start and per growth step.
pub const GROWTH_STEP: u16 = 64;

/// Pure accounting: how many more buffers to provide, given how many are checked out.
/// Kernel-free so it can be unit-tested.
pub fn growth(out: u16, provided: u16, max: u16) -> u16 {
    if provided >= max {
        return 0;
    }
    // Grow while at least three quarters of what was provided is in user space.
    if (out as u32) * 4 >= (provided as u32) * 3 {
        GROWTH_STEP.min(max - provided)
    } else {
        0
    }
}

pub struct BufRing {
    entries: *mut BufRingEntry,
    ring_bytes: usize,
    mask: u16,
    tail: u16,
    bufs: *mut u8,
    bufs_bytes: usize,
    buf_size: u32,
    bgid: u16,
    /// Buffer ids `0..provided` have been handed to the kernel at least once.
    provided: u16,
    max: u16,
    /// Buffers currently in user space (between a completion and `recycle`).
    out: u16,
}

fn mmap_anon(len: usize) -> io::Result<*mut u8> {
    // SAFETY: an anonymous private mapping with no address hint has no preconditions; the
    // result is checked for MAP_FAILED before use.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p as *mut u8)
}

impl BufRing {
    /// Maps and registers a ring of `count` buffers of `buf_size` bytes as group `bgid`.
    /// `count` must be a power of two no larger than 32768.
    pub fn new(ring: &IoUring, bgid: u16, count: u16, buf_size: u32) -> io::Result<BufRing> {
        assert!(count.is_power_of_two() && count <= 32768);
        let ring_bytes = count as usize * std::mem::size_of::<BufRingEntry>();
        let bufs_bytes = count as usize * buf_size as usize;
        let entries = mmap_anon(ring_bytes)? as *mut BufRingEntry;
        let bufs = match mmap_anon(bufs_bytes) {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: `entries` was mapped above with exactly `ring_bytes` and is unused.
                unsafe { libc::munmap(entries as *mut libc::c_void, ring_bytes) };
                return Err(e);
            }
        };
        let mut br = BufRing {
            entries,
            ring_bytes,
            mask: count - 1,
            tail: 0,
            bufs,
            bufs_bytes,
            buf_size,
            bgid,
            provided: 0,
            max: count,
            out: 0,
        };
        // SAFETY: the ring memory is page aligned (mmap), sized for `count` entries, and stays
        // mapped until `Drop`, which runs after the io_uring instance is closed (the reactor
        // declares its ring before its buffer ring).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(entries as u64, count, bgid, 0)?;
        }
        br.provide_more(GROWTH_STEP.min(count));
        Ok(br)
    }

    pub fn bgid(&self) -> u16 {
        self.bgid
    }

    pub fn buf_size(&self) -> u32 {
        self.buf_size
    }

    pub fn provided(&self) -> u16 {
        self.provided
    }

    pub fn checked_out(&self) -> u16 {
        self.out
    }

    /// Buffers the kernel can pick right now.
    pub fn available(&self) -> u16 {
        self.provided - self.out
    }

    /// Bytes of buffer memory handed to the kernel so far (an upper bound on what is touched).
    pub fn provided_bytes(&self) -> usize {
        self.provided as usize * self.buf_size as usize
    }

    fn push(&mut self, bid: u16) {
        let idx = (self.tail & self.mask) as usize;
        // SAFETY: `idx <= mask < count`, so the entry lies inside the mapped ring; the kernel
        // only reads entries between its head and our published tail, and this one is past it.
        let e = unsafe { &mut *self.entries.add(idx) };
        e.set_addr(self.addr_of(bid) as u64);
        e.set_len(self.buf_size);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        // SAFETY: the tail field overlays the first entry's reserved word, inside the mapping;
        // the kernel reads it with acquire semantics, so a release store publishes the entries.
        unsafe {
            let tail = BufRingEntry::tail(self.entries) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    fn provide_more(&mut self, n: u16) {
        for _ in 0..n {
            let bid = self.provided;
            self.push(bid);
            self.provided += 1;
        }
        self.publish();
    }

    fn addr_of(&self, bid: u16) -> *mut u8 {
        debug_assert!(bid < self.max);
        // SAFETY: `bid < max` so the offset stays inside the `bufs` mapping.
        unsafe { self.bufs.add(bid as usize * self.buf_size as usize) }
    }

    /// Records that the kernel handed buffer `bid` to user space, and grows the ring if most
    /// of it is in use.
    pub fn checked_out_by_kernel(&mut self, bid: u16) {
        debug_assert!(bid < self.provided);
        self.out += 1;
        let n = growth(self.out, self.provided, self.max);
        if n > 0 {
            self.provide_more(n);
        }
    }

    /// The kernel found the ring empty (`ENOBUFS`): double what is provided, up to the
    /// configured count. Returns how many buffers were added.
    pub fn exhausted(&mut self) -> u16 {
        // Several receives can report the same exhaustion in one batch: grow once.
        if self.available() > 0 {
            return 0;
        }
        let n = self.provided.min(self.max - self.provided);
        if n > 0 {
            self.provide_more(n);
        }
        n
    }

    /// Hands the pages of every buffer back to the kernel, if none is checked out; returns
    /// whether it did. Buffers stay provided: the next receive into one faults in a zeroed
    /// page. Touching the pages is what made them resident: the kernel takes buffers in ring
    /// order, so after a burst every provided buffer has been written once.
    ///
    /// The caller must know that the kernel is not filling any provided buffer and has
    /// posted the completion of every buffer it filled (see [`super::Reactor::release_buffer_pages`]).
    pub(crate) fn release_pages(&mut self) -> bool {
        if self.out != 0 {
            return false;
        }
        let len = self.provided as usize * self.buf_size as usize;
        // SAFETY: `bufs .. bufs + len` lies inside the buffer mapping (provided <= max). No
        // Rust reference into it is alive (nothing is checked out, and slices borrow `self`),
        // and the caller guarantees that the kernel is not writing into it; MADV_DONTNEED on
        // a private anonymous mapping only replaces its pages with zero-fill-on-demand ones.
        unsafe { libc::madvise(self.bufs as *mut libc::c_void, len, libc::MADV_DONTNEED) == 0 }
    }

    /// The first `len` bytes of buffer `bid`.
    pub fn slice(&self, bid: u16, len: usize) -> &[u8] {
        assert!(bid < self.provided && len <= self.buf_size as usize);
        // SAFETY: in bounds (checked above); the buffer is checked out, so the kernel does not
        // write it while this shared borrow lives.
        unsafe { std::slice::from_raw_parts(self.addr_of(bid), len) }
    }

    /// The first `len` bytes of buffer `bid`, writable (TLS hands records to rustls, which may
    /// rewrite them in place).
    pub fn slice_mut(&mut self, bid: u16, len: usize) -> &mut [u8] {
        assert!(bid < self.provided && len <= self.buf_size as usize);
        // SAFETY: in bounds (checked above); the buffer is checked out, so the kernel does not
        // touch it, and `&mut self` keeps any other borrow of the ring's memory from living
        // alongside this one.
        unsafe { std::slice::from_raw_parts_mut(self.addr_of(bid), len) }
    }

    /// Raw address of `bid` at `off`, for a send SQE. See the module comment for why the
    /// pointer stays valid until the completion.
    pub(crate) fn ptr(&self, bid: u16, off: usize) -> *const u8 {
        assert!(bid < self.provided && off <= self.buf_size as usize);
        // SAFETY: in bounds (checked above).
        unsafe { self.addr_of(bid).add(off) }
    }

    /// Gives buffer `bid` back to the kernel.
    pub fn recycle(&mut self, bid: u16) {
        debug_assert!(self.out > 0);
        self.out -= 1;
        self.push(bid);
        self.publish();
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: both regions were mapped in `new` with these lengths; the io_uring instance
        // that could write into them has been closed before (field order in `Reactor`).
        unsafe {
            libc::munmap(self.bufs as *mut libc::c_void, self.bufs_bytes);
            libc::munmap(self.entries as *mut libc::c_void, self.ring_bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::growth;

    #[test]
    fn grows_only_when_mostly_checked_out() {
        assert_eq!(growth(0, 64, 1024), 0);
        assert_eq!(growth(47, 64, 1024), 0);
        assert_eq!(growth(48, 64, 1024), 64);
        assert_eq!(growth(100, 128, 1024), 64);
    }

    #[test]
    fn never_grows_past_max() {
        assert_eq!(growth(64, 64, 64), 0);
        assert_eq!(growth(1000, 1000, 1024), 24);
    }
}
