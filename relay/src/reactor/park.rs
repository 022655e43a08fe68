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
//! - a registration is armed only while its flow is parked: registrations are `EPOLLONESHOT`,
//!   so the event that wakes a flow disables its registration before the worker arms a
//!   receive. The disabled item stays in the set and the next [`Parking::park`] of that
//!   descriptor re-arms it (`EPOLL_CTL_MOD`) instead of removing and adding it again: each
//!   removal and insertion takes the socket's wait-queue lock with interrupts off and frees
//!   or allocates an item, which made `epoll_ctl` a fifth of a trickling relay's CPU;
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
    /// [`Parking::ready`] once it does. `registered`: `fd` already has a (disabled) item in
    /// the set from an earlier park, which is re-armed; otherwise one is added.
    pub fn park(&self, fd: RawFd, token: u64, registered: bool) -> io::Result<()> {
        if registered {
            match self.ctl(libc::EPOLL_CTL_MOD, fd, token) {
                // Not there after all (cannot happen while the caller tracks it): add it.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                r => return r,
            }
        }
        self.ctl(libc::EPOLL_CTL_ADD, fd, token)
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
            u64: token,
        };
        // SAFETY: `ev` is a live epoll_event for the duration of the call; `fd` is a socket
        // the caller owns.
        let rc = unsafe { libc::epoll_ctl(self.epfd, op, fd, &mut ev) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
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
