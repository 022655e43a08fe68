//! Parking: an idle socket waits for readiness in a worker-owned epoll set instead of holding
//! an armed io_uring receive.
//!
//! Why: an armed multishot receive on a socket with nothing to read pins a request
//! (`io_kiocb`, 256 B) and its async message header (a `kmalloc-512` object) in the kernel
//! for as long as it waits; two sockets per relayed connection make that ~1.5 KB of kernel
//! memory that an epoll-based proxy does not spend. An epoll registration costs an `epitem`
//! (128 B) and one wait-queue entry (~72 B) instead. A connection that has been silent for a
//! while therefore trades its receives for registrations here, and gets its receives back
//! the moment a socket becomes readable. Busy connections never park, so the data path is
//! untouched.
//!
//! The ring learns of readiness through one multishot `POLL_ADD` on the epoll descriptor
//! (the worker arms it); the worker then drains the set with non-blocking `epoll_wait`.
//!
//! What must always hold:
//! - a descriptor is in the set only while its flow is parked: registrations are
//!   `EPOLLONESHOT` (the first event disables them) and the worker removes a descriptor with
//!   [`Parking::unpark`] before it arms a receive on it again;
//! - a descriptor closed while parked leaves the set by itself (the kernel drops an epoll
//!   item when its file is released), so freeing a session needs no call here;
//! - the event's data is the token the worker chose; a stale one (slot reused) is recognised
//!   by its generation, as for ring completions.

use std::io;
use std::os::fd::RawFd;

/// Most events taken from the set per `epoll_wait` call.
const BATCH: usize = 256;

/// One worker's epoll set of parked sockets.
pub struct Parking {
    epfd: RawFd,
    events: Vec<libc::epoll_event>,
}

impl Parking {
    pub fn new() -> io::Result<Parking> {
        // SAFETY: plain syscall; the result is checked.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Parking {
            epfd,
            events: Vec::with_capacity(BATCH),
        })
    }

    /// The epoll descriptor, for the ring's readiness poll.
    pub fn fd(&self) -> RawFd {
        self.epfd
    }

    /// Waits for `fd` to become readable (or to hang up or fail); `token` comes back from
    /// [`Parking::ready`] once it does.
    pub fn park(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
            u64: token,
        };
        // SAFETY: `ev` is a live epoll_event for the duration of the call; `fd` is a socket
        // the caller owns.
        let rc = unsafe { libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Takes `fd` out of the set (before its receive is armed again).
    pub fn unpark(&self, fd: RawFd) {
        // SAFETY: plain syscall on descriptors the caller owns; a null event is allowed for
        // EPOLL_CTL_DEL. ENOENT (already gone) needs no handling.
        unsafe { libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
    }

    /// Appends the tokens of every parked socket that became ready (each at most once: the
    /// registration is one-shot).
    pub fn ready(&mut self, out: &mut Vec<u64>) {
        loop {
            self.events.clear();
            // SAFETY: the vector has room for BATCH events; the kernel writes at most that
            // many and returns how many it wrote.
            let n = unsafe {
                libc::epoll_wait(self.epfd, self.events.as_mut_ptr(), BATCH as libc::c_int, 0)
            };
            if n <= 0 {
                return;
            }
            // SAFETY: the kernel initialised the first `n` (<= BATCH <= capacity) entries.
            unsafe { self.events.set_len(n as usize) };
            out.extend(self.events.iter().map(|e| e.u64));
            if (n as usize) < BATCH {
                return;
            }
        }
    }
}

impl Drop for Parking {
    fn drop(&mut self) {
        // SAFETY: the epoll descriptor is owned by this value and closed once.
        unsafe { libc::close(self.epfd) };
    }
}
