//! Thin, safe wrappers over the few socket and process syscalls the workers make outside the
//! ring: creating listeners and origin sockets, peer addresses, shutdown, close, pipes,
//! resource limits and signal dispositions. Descriptors are plain `RawFd`s owned by the
//! session table; whoever frees a session slot closes its descriptors exactly once.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd, RawFd};

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A listening TCP socket with `SO_REUSEPORT`, so that every worker (and every relay process
/// started with the same config) binds the same address and the kernel spreads accepts.
pub fn listen_reuseport(addr: SocketAddr, backlog: i32) -> io::Result<RawFd> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.set_cloexec(true)?;
    s.bind(&addr.into())?;
    s.listen(backlog)?;
    Ok(s.into_raw_fd())
}

/// A non-blocking TCP socket for an origin connection, bound to `source` (port chosen at
/// connect time with `IP_BIND_ADDRESS_NO_PORT`, so many source addresses each get their own
/// 64k ports towards one origin).
pub fn origin_socket(origin: SocketAddr, source: Option<IpAddr>) -> io::Result<RawFd> {
    let s = Socket::new(
        Domain::for_address(origin),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    s.set_nonblocking(true)?;
    s.set_cloexec(true)?;
    s.set_nodelay(true)?;
    if let Some(ip) = source {
        let one: libc::c_int = 1;
        // SAFETY: a valid socket descriptor and a pointer to a live c_int of the given size.
        check(unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        })?;
        s.bind(&SocketAddr::new(ip, 0).into())?;
    }
    Ok(s.into_raw_fd())
}

/// Peer address of a connected socket.
pub fn peer_addr(fd: RawFd) -> io::Result<SocketAddr> {
    // SAFETY: the descriptor is owned by a live session for the duration of this call.
    let b = unsafe { BorrowedFd::borrow_raw(fd) };
    let s = SockRef::from(&b);
    s.peer_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an IP socket"))
}

/// `TCP_NODELAY`: a relay forwards frames as they come; Nagle would only add latency.
pub fn set_nodelay(fd: RawFd) -> io::Result<()> {
    // SAFETY: the descriptor is owned by a live session for the duration of this call.
    let b = unsafe { BorrowedFd::borrow_raw(fd) };
    SockRef::from(&b).set_nodelay(true)
}

/// `shutdown(2)`; errors (the peer already gone) are of no use to the caller and ignored.
pub fn shutdown_write(fd: RawFd) {
    // SAFETY: plain syscall on a descriptor the caller owns.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}

/// `close(2)` of a descriptor this process owns. Called exactly once per descriptor, when its
/// session slot is freed (no ring operation references it any more).
pub fn close(fd: RawFd) {
    // SAFETY: the caller owns `fd` and drops every other use of it.
    unsafe { libc::close(fd) };
}

/// Sets `SO_LINGER {on, 0}` so that the next close sends RST (used when aborting a
/// connection whose peer reset the other side).
pub fn set_linger_zero(fd: RawFd) {
    // SAFETY: the descriptor is owned by a live session for the duration of this call.
    let b = unsafe { BorrowedFd::borrow_raw(fd) };
    let _ = SockRef::from(&b).set_linger(Some(std::time::Duration::ZERO));
}

/// A non-blocking pipe for the splice path, sized to `size` bytes where the kernel allows.
pub fn pipe(size: usize) -> io::Result<(RawFd, RawFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) })?;
    // SAFETY: plain fcntl on the descriptor just created; failure leaves the default size.
    unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, size as libc::c_int) };
    Ok((fds[0], fds[1]))
}

/// Soft and hard `RLIMIT_NOFILE`, after raising the soft limit to the hard one.
pub fn raise_nofile() -> (u64, u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid out-parameter.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return (0, 0);
    }
    if r.rlim_cur < r.rlim_max {
        let want = libc::rlimit {
            rlim_cur: r.rlim_max,
            rlim_max: r.rlim_max,
        };
        // SAFETY: `want` is a valid in-parameter; failure keeps the old soft limit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            r.rlim_cur = r.rlim_max;
        }
    }
    (r.rlim_cur, r.rlim_max)
}

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`), unless the
/// operator set `MIMALLOC_ALLOW_THP=1`. mimalloc marks its arena `MADV_HUGEPAGE`, so every
/// 2 MiB region the heap touches would become resident whole: a step of up to 2 MiB per
/// worker's worth of sessions, which at tens of thousands of idle connections per process
/// is several hundred bytes per connection. Returns whether THP is now off.
pub fn disable_thp() -> bool {
    if std::env::var("MIMALLOC_ALLOW_THP").is_ok_and(|v| v.trim() == "1") {
        return false;
    }
    // SAFETY: PR_SET_THP_DISABLE takes plain integer arguments and has no memory effects.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0 }
}

/// Hands the free pages of the calling thread's allocator heap back to the kernel.
///
/// mimalloc keeps pages whose blocks were all freed for reuse, and purges them only when
/// later allocations on the same heap get around to it. A worker that ramped thousands of
/// connections holds a peak of handshake state (request heads, the rewritten head for the
/// origin) that is freed once they are upgraded; if it then sits idle, nothing allocates and
/// that peak stays resident: about 1 MB per worker after a fast ramp, which at 5,000 idle
/// connections per process is 200 bytes per connection. Called by the worker once a second
/// when connections came or went (`session/worker.rs`, `on_tick`), not per operation.
pub fn trim_heap() {
    // SAFETY: `mi_collect` takes no pointers and has no preconditions: it frees and purges
    // pages of the calling thread's own heap (and expired purges of mimalloc's arenas, which
    // it synchronises itself). Memory that mimalloc does not manage (the buffer ring, when
    // the library runs under another global allocator) is not touched.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Ignore `SIGPIPE`: a peer that vanished shows up as `EPIPE` on the send instead.
pub fn ignore_sigpipe() {
    // SAFETY: installing SIG_IGN for SIGPIPE has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

/// Raw socket address bytes for a connect SQE.
pub fn sockaddr(addr: SocketAddr) -> SockAddr {
    addr.into()
}

/// Number of open descriptors of this process (from `/proc/self/fd`), for diagnostics.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A non-blocking eventfd, used to wake a worker's ring from another thread.
pub fn eventfd() -> io::Result<RawFd> {
    // SAFETY: plain syscall; the result is checked.
    check(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })
}

/// Adds one to an eventfd (wakes whoever polls it).
pub fn eventfd_signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to a descriptor the caller owns.
    unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
}

/// Resets an eventfd to zero (non-blocking; nothing to read is fine).
pub fn eventfd_drain(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live u64.
    unsafe { libc::read(fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
}
