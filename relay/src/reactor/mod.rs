//! The reactor: one io_uring instance per worker thread, and the only home of `unsafe`.
//!
//! What it owns:
//! - the ring (`SINGLE_ISSUER | DEFER_TASKRUN`, falling back to `COOP_TASKRUN`), created on
//!   the worker thread that submits to it;
//! - the provided-buffer ring that every receive draws from ([`bufring`]);
//! - side storage for operations whose memory must outlive the submission: heap bytes being
//!   sent and socket addresses being connected to. An op with side storage carries
//!   [`KEEP_BIT`] in its `user_data`; its storage is released when its final completion is
//!   reaped, and handed back to the caller (for a send: the bytes, so a short write can be
//!   resumed).
//!
//! What must always hold:
//! - every pointer placed in an SQE stays valid until that SQE's final completion: ring
//!   buffers live as long as the reactor; heap bytes and addresses live in side storage;
//! - the ring is dropped before the buffer ring (field order), so the kernel never writes into
//!   unmapped buffer memory;
//! - completions are reported exactly once, with the `user_data` the caller chose (minus
//!   [`KEEP_BIT`]).
//!
//! The reactor knows nothing of sessions: the session layer decides what to submit and
//! interprets completions through [`token::Token`].

pub mod bufring;
pub mod park;
pub mod sys;
pub mod timer;
pub mod token;

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, EnterFlags, IoUring};

use bufring::BufRing;

/// Set in a `user_data` whose operation has side storage in the reactor.
pub const KEEP_BIT: u64 = 1 << 63;

/// Why the ring could not be created, in words an operator can act on.
#[derive(Debug)]
pub enum SetupError {
    /// `EPERM`: io_uring is disabled for this process.
    Disabled(io::Error),
    /// `ENOSYS`: the kernel has no io_uring.
    NotSupported(io::Error),
    /// Anything else (memory, limits, a missing feature).
    Other(io::Error),
}

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SetupError::Disabled(e) => write!(
                f,
                "io_uring is not permitted for this process ({e}). Either the sysctl \
                 kernel.io_uring_disabled is set (1 allows only members of \
                 kernel.io_uring_group, 2 disables it for everyone: run \
                 `sysctl -w kernel.io_uring_disabled=0`), or a seccomp filter (container \
                 runtime default profile, systemd SystemCallFilter=) blocks io_uring_setup: \
                 allow io_uring_setup, io_uring_enter and io_uring_register"
            ),
            SetupError::NotSupported(e) => write!(
                f,
                "this kernel has no io_uring ({e}): relay needs Linux 6.1 or newer built \
                 with CONFIG_IO_URING=y"
            ),
            SetupError::Other(e) => write!(f, "io_uring setup failed: {e}"),
        }
    }
}

impl std::error::Error for SetupError {}

fn classify(e: io::Error) -> SetupError {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => SetupError::Disabled(e),
        Some(libc::ENOSYS) => SetupError::NotSupported(e),
        _ => SetupError::Other(e),
    }
}

/// How the ring was set up, for the start-up log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingMode {
    DeferTaskrun,
    CoopTaskrun,
    Plain,
}

/// Counters the worker exports.
#[derive(Default, Clone, Copy, Debug)]
pub struct RingStats {
    pub submitted: u64,
    pub completed: u64,
    /// Times the kernel reported completion-queue overflow.
    pub cq_overflows: u64,
    /// Waits that `busy_poll` answered: a completion came while spinning, no sleep.
    pub busy_poll_hits: u64,
    /// Spins that ran their whole budget and then slept anyway (CPU spent on nothing).
    pub busy_poll_misses: u64,
    /// Enters that waited for completions (the ring was empty when the worker paused).
    /// Completions per wait is the batch a wake-up delivers; `workers.coalesce` raises it.
    pub waits: u64,
    /// Of those, the waits that coalesced their wake-up (`workers.coalesce`).
    pub coalesced_waits: u64,
}

/// Wake-up coalescing (`workers.coalesce`): a worker that goes to sleep is woken when
/// `events` completions are ready, or `delay` after it went to sleep if at least one is;
/// with none by then it wakes on the first (io_uring's minimum wait timeout, Linux 6.12+).
/// On a deferred-taskrun ring each socket wake-up below the count only queues work, so the
/// CPU that sends into the relay stops paying for waking it on every segment. The price:
/// a completion that arrives early in a pause waits up to `delay`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Coalesce {
    pub events: u32,
    pub delay: Duration,
    /// Hold wake-ups only while the recent completion rate says others will come during
    /// the delay and recent holds filled (see [`CoalesceGate`]); otherwise on every sleep.
    pub adaptive: bool,
}

/// The gate of adaptive coalescing. Holding a wake-up pays only when completions arrive
/// meanwhile on their own (many independent connections) and enough of them to batch; a
/// worker whose next completion waits on its own answer (one connection, one message in
/// flight), or whose completions come steadily but sparsely (an open-loop stream of a few
/// messages per delay), only loses the delay. So two tests, both needed:
/// - the rate: measured over windows of at least [`CoalesceGate::WINDOW`], open while one
///   delay's worth of it reaches `events /` [`CoalesceGate::OPEN_DIVISOR`]; once open it
///   shuts only below half of that. An idle worker's long sleeps make windows with a low
///   rate, so it starts shut;
/// - the fill: a [`TrialGate`] over the held waits, a hit when the wait came back with at
///   least half of `events` ready. It starts shut too, so a worker whose rate passes holds
///   one sleep in 16 until those holds show they fill.
#[derive(Clone, Copy, Debug, Default)]
struct CoalesceGate {
    rate_open: bool,
    /// Start of the current window, and the completion count then.
    since: Option<Instant>,
    base: u64,
    fill: TrialGate,
}

impl CoalesceGate {
    const WINDOW: Duration = Duration::from_millis(2);
    const OPEN_DIVISOR: u128 = 4;

    /// Whether this sleep is held; `completed` is the ring's completion count so far.
    fn admit(&mut self, now: Instant, completed: u64, c: &Coalesce) -> bool {
        let since = *self.since.get_or_insert(now);
        let window = now.saturating_duration_since(since);
        if window >= Self::WINDOW {
            // Completions one delay gathers at this window's rate, against the bar, both
            // multiplied by the window's length (integers, no division).
            let per_delay = u128::from(completed - self.base) * c.delay.as_nanos();
            let bar = u128::from(c.events) * window.as_nanos() / Self::OPEN_DIVISOR;
            self.rate_open = if self.rate_open {
                per_delay * 2 >= bar
            } else {
                per_delay >= bar
            };
            self.since = Some(now);
            self.base = completed;
        }
        self.rate_open && self.fill.admit()
    }

    /// A held wait came back with `ready` completions.
    fn held(&mut self, ready: usize, c: &Coalesce) {
        self.fill.record(2 * ready >= c.events as usize);
    }
}

/// What a worker does when its ring runs empty (`workers.busy_poll`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusyPoll {
    /// Sleep at once.
    Off,
    /// Poll the ring for up to this long on every pause, then sleep.
    Always(Duration),
    /// Poll for up to this long while recent pauses were short enough for a spin to end
    /// them; sleep at once while they were not (see [`TrialGate`]).
    Adaptive(Duration),
}

/// A gate that lets a trial through while recent trials paid off: a moving average of how
/// often one did. The gate of [`BusyPoll::Adaptive`] (a trial is a spin; it pays off when a
/// completion comes while spinning) and the fill test of [`CoalesceGate`] (a trial is a held
/// wait; it pays off when the wait gathers half a batch). Only a trial measures that exactly
/// (a plain sleep's length includes the wake-up a spin would have saved, a plain wait's
/// count the completions a hold would have gathered), so while the gate is shut one chance
/// in [`TrialGate::PROBE_EVERY`] is tried anyway as a probe. An idle or trickling worker thus
/// tries on one pause in 16, a busy one on nearly every pause.
#[derive(Clone, Copy, Debug, Default)]
struct TrialGate {
    /// Hit rate scaled to 0..=1024, an exponential average over about the last 8 trials.
    score: u16,
    /// Chances since the last trial while the gate was shut.
    skipped: u8,
}

impl TrialGate {
    const OPEN_AT: u16 = 512;
    const PROBE_EVERY: u8 = 16;

    /// Whether this chance is tried.
    fn admit(&mut self) -> bool {
        if self.score >= Self::OPEN_AT {
            return true;
        }
        self.skipped += 1;
        if self.skipped >= Self::PROBE_EVERY {
            self.skipped = 0;
            return true;
        }
        false
    }

    fn record(&mut self, hit: bool) {
        self.score = self.score - self.score / 8 + if hit { 128 } else { 0 };
    }
}

/// One completion, as the session layer sees it.
#[derive(Debug)]
pub struct Completion {
    pub user_data: u64,
    pub result: i32,
    pub flags: u32,
    /// For a send of heap bytes: the bytes, handed back.
    pub bytes: Option<Vec<u8>>,
    /// For a send of shared bytes: the shared buffer, handed back.
    pub shared: Option<Arc<[u8]>>,
}

impl Completion {
    /// More completions will follow for this (multishot) operation.
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }

    /// The provided buffer this completion filled, if any.
    pub fn buffer(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }
}

/// Most buffers one gathered send carries.
pub const MAX_IOV: usize = 8;

/// A `msghdr` and its iovecs, kept in one box while a gathered send is in flight.
struct Gather {
    hdr: libc::msghdr,
    iov: [libc::iovec; MAX_IOV],
}

enum Kept {
    Bytes(Vec<u8>),
    /// A frame many connections send (a room broadcast): framed once, sent by reference.
    Shared(Arc<[u8]>),
    /// Read by the kernel until the completion; never touched by user space meanwhile.
    Gather(#[allow(dead_code)] Box<Gather>),
    /// Read by the kernel during submission; held until the completion.
    Addr(#[allow(dead_code)] Box<socket2::SockAddr>),
}

pub struct Reactor {
    // Field order matters: `ring` is dropped before `bufs` (see module comment).
    ring: IoUring,
    bufs: BufRing,
    kept: HashMap<u64, Kept>,
    pub mode: RingMode,
    pub stats: RingStats,
    /// See [`Reactor::set_busy_poll`].
    busy_poll: BusyPoll,
    spin_gate: TrialGate,
    /// See [`Reactor::set_coalesce`].
    coalesce: Option<Coalesce>,
    coalesce_gate: CoalesceGate,
    /// The ring was set up with `IORING_SETUP_TASKRUN_FLAG` (what `busy_poll` needs).
    taskrun_flag: bool,
    /// Flags of the sleeping enter: `NO_IOWAIT` where the kernel has it (6.15+). Without
    /// it a worker waiting with receives armed counts as iowait, so an idle relay core
    /// shows up as `wa` in top and `iowait` in node_exporter rather than as idle.
    wait_flags: EnterFlags,
}

/// Ring sizing and buffer configuration.
pub struct ReactorConfig {
    pub sq_entries: u32,
    pub cq_entries: u32,
    pub buf_count: u16,
    pub buf_size: u32,
    /// Cap on io-wq workers (bounded, unbounded); 0 leaves the kernel default.
    pub iowq_max: [u32; 2],
}

const BGID: u16 = 0;

impl Reactor {
    /// Creates the ring on the calling thread (it becomes the single issuer).
    pub fn new(cfg: &ReactorConfig) -> Result<Reactor, SetupError> {
        type Setup = fn(&mut io_uring::Builder);
        let attempts: [(RingMode, Setup); 4] = [
            // The taskrun flag tells user space that deferred completions are pending, so a
            // busy-polling worker needs no system call to find out (6.1+ with defer).
            (RingMode::DeferTaskrun, |b| {
                b.setup_single_issuer()
                    .setup_defer_taskrun()
                    .setup_taskrun_flag();
            }),
            (RingMode::DeferTaskrun, |b| {
                b.setup_single_issuer().setup_defer_taskrun();
            }),
            (RingMode::CoopTaskrun, |b| {
                b.setup_coop_taskrun().setup_taskrun_flag();
            }),
            (RingMode::Plain, |_| {}),
        ];
        let mut last = None;
        for (i, (mode, setup)) in attempts.into_iter().enumerate() {
            let mut b = IoUring::builder();
            b.setup_cqsize(cfg.cq_entries).setup_submit_all();
            setup(&mut b);
            match b.build(cfg.sq_entries) {
                Ok(ring) => {
                    if cfg.iowq_max != [0, 0] {
                        let mut m = cfg.iowq_max;
                        // Best effort: older kernels lack it and keep their default.
                        let _ = ring.submitter().register_iowq_max_workers(&mut m);
                    }
                    let bufs = BufRing::new(&ring, BGID, cfg.buf_count, cfg.buf_size)
                        .map_err(SetupError::Other)?;
                    let wait_flags = if ring.params().is_feature_no_iowait() {
                        EnterFlags::NO_IOWAIT
                    } else {
                        EnterFlags::empty()
                    };
                    return Ok(Reactor {
                        ring,
                        bufs,
                        kept: HashMap::new(),
                        mode,
                        stats: RingStats::default(),
                        busy_poll: BusyPoll::Off,
                        spin_gate: TrialGate::default(),
                        coalesce: None,
                        coalesce_gate: CoalesceGate::default(),
                        // The first attempt is the only one with the flag.
                        taskrun_flag: i == 0,
                        wait_flags,
                    });
                }
                Err(e) => {
                    let fatal = matches!(
                        e.raw_os_error(),
                        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::ENOSYS)
                    );
                    last = Some(e);
                    if fatal {
                        break;
                    }
                }
            }
        }
        Err(classify(last.expect("at least one attempt")))
    }

    pub fn bufs(&self) -> &BufRing {
        &self.bufs
    }

    pub fn bufs_mut(&mut self) -> &mut BufRing {
        &mut self.bufs
    }

    /// Bytes of a checked-out provided buffer.
    pub fn buf(&self, bid: u16, len: usize) -> &[u8] {
        self.bufs.slice(bid, len)
    }

    /// A received buffer, writable.
    pub fn buf_mut(&mut self, bid: u16, len: usize) -> &mut [u8] {
        self.bufs.slice_mut(bid, len)
    }

    /// Records a completion's buffer as checked out (call once per completion carrying one).
    pub fn take_buffer(&mut self, bid: u16) {
        self.bufs.checked_out_by_kernel(bid);
    }

    pub fn recycle(&mut self, bid: u16) {
        self.bufs.recycle(bid);
    }

    /// A receive found the buffer ring empty: grow it (see [`BufRing::exhausted`]).
    pub fn buffers_exhausted(&mut self) -> u16 {
        self.bufs.exhausted()
    }

    /// Returns the provided buffers' pages to the kernel if no buffer is in use (an idle
    /// worker); returns whether it did.
    ///
    /// Safe only while the kernel cannot be filling a buffer whose completion we have not
    /// seen. With `DEFER_TASKRUN` a receive fills its buffer either inline in our own
    /// `io_uring_enter` or in task work that runs only inside it, and posts its completion in
    /// the same call; no other thread enters this ring. So, between calls, an empty
    /// completion queue with no overflow and no buffer checked out means every provided
    /// buffer is free. The other ring modes run task work on any return to user space, so
    /// they never release.
    pub fn release_buffer_pages(&mut self) -> bool {
        if self.mode != RingMode::DeferTaskrun
            || !self.ring.completion().is_empty()
            || self.ring.submission().cq_overflow()
        {
            return false;
        }
        self.bufs.release_pages()
    }

    /// In-flight operations that hold side storage (for leak checks).
    pub fn kept_len(&self) -> usize {
        self.kept.len()
    }

    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every entry is built by a method below whose memory rules are stated
            // there and in the module comment.
            let pushed = unsafe { self.ring.submission().push(&entry).is_ok() };
            if pushed {
                return;
            }
            // Submission queue full: hand what we have to the kernel and try again.
            match self.ring.submit() {
                Ok(n) => self.stats.submitted += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // Completion queue backed up; the caller reaps after the next wait.
                    self.stats.cq_overflows += 1;
                    return self.push_after_busy(entry);
                }
                Err(_) => {}
            }
        }
    }

    fn push_after_busy(&mut self, entry: squeue::Entry) {
        // Keep the entry rather than dropping it: wait until the SQ has room.
        loop {
            let _ = self.ring.submit_and_wait(0);
            // SAFETY: as in `push`.
            if unsafe { self.ring.submission().push(&entry).is_ok() } {
                return;
            }
        }
    }

    fn keep(&mut self, user_data: u64, k: Kept) -> u64 {
        let ud = user_data | KEEP_BIT;
        let prev = self.kept.insert(ud, k);
        debug_assert!(prev.is_none(), "two in-flight ops with one user_data");
        ud
    }

    /// Multishot accept on a listening socket.
    pub fn accept_multi(&mut self, fd: RawFd, user_data: u64) {
        let e = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data);
        self.push(e);
    }

    /// Multishot receive into the provided-buffer ring.
    pub fn recv_multi(&mut self, fd: RawFd, user_data: u64) {
        let e = opcode::RecvMulti::new(types::Fd(fd), BGID)
            .build()
            .user_data(user_data);
        self.push(e);
    }

    /// One receive into a buffer picked from the provided-buffer ring.
    pub fn recv_once(&mut self, fd: RawFd, user_data: u64) {
        let e = opcode::Recv::new(types::Fd(fd), std::ptr::null_mut(), self.bufs.buf_size())
            .buf_group(BGID)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(user_data);
        self.push(e);
    }

    /// Sends `len` bytes of provided buffer `bid` from offset `off`.
    pub fn send_buf(&mut self, fd: RawFd, bid: u16, off: usize, len: usize, user_data: u64) {
        assert!(off + len <= self.bufs.buf_size() as usize);
        // The buffer memory lives as long as the reactor (see bufring's module comment).
        let p = self.bufs.ptr(bid, off);
        let e = opcode::Send::new(types::Fd(fd), p, len as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data);
        self.push(e);
    }

    /// Sends several provided-buffer ranges `(bid, off, len)` in order with one `sendmsg`
    /// (fewer TCP transmits when a flow has queued data).
    pub fn send_bufs(&mut self, fd: RawFd, ranges: &[(u16, usize, usize)], user_data: u64) {
        assert!(!ranges.is_empty() && ranges.len() <= MAX_IOV);
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
        let hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        let mut g = Box::new(Gather {
            hdr,
            iov: [empty; MAX_IOV],
        });
        for (i, &(bid, off, len)) in ranges.iter().enumerate() {
            assert!(off + len <= self.bufs.buf_size() as usize);
            g.iov[i] = libc::iovec {
                iov_base: self.bufs.ptr(bid, off) as *mut libc::c_void,
                iov_len: len,
            };
        }
        g.hdr.msg_iov = g.iov.as_mut_ptr();
        g.hdr.msg_iovlen = ranges.len();
        // The box's heap block (header and iovecs) does not move when the box is moved into
        // side storage; the iovecs point into ring buffers, which live as long as the reactor.
        let hdr_ptr: *const libc::msghdr = &g.hdr;
        let ud = self.keep(user_data, Kept::Gather(g));
        let e = opcode::SendMsg::new(types::Fd(fd), hdr_ptr)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(ud);
        self.push(e);
    }

    /// Sends `data[off..]`; the bytes come back in the completion.
    pub fn send_bytes(&mut self, fd: RawFd, data: Vec<u8>, off: usize, user_data: u64) {
        assert!(off <= data.len());
        let p = data[off..].as_ptr();
        let len = (data.len() - off) as u32;
        // The Vec's heap block does not move when the Vec is moved into side storage.
        let ud = self.keep(user_data, Kept::Bytes(data));
        let e = opcode::Send::new(types::Fd(fd), p, len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud);
        self.push(e);
    }

    /// Sends `data[off..]` of a shared buffer; the reference comes back in the completion.
    pub fn send_shared(&mut self, fd: RawFd, data: Arc<[u8]>, off: usize, user_data: u64) {
        assert!(off <= data.len());
        let p = data[off..].as_ptr();
        let len = (data.len() - off) as u32;
        // The Arc keeps the allocation alive (and unmoved) until the final completion.
        let ud = self.keep(user_data, Kept::Shared(data));
        let e = opcode::Send::new(types::Fd(fd), p, len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud);
        self.push(e);
    }

    /// Connects `fd` to `addr`.
    pub fn connect(&mut self, fd: RawFd, addr: std::net::SocketAddr, user_data: u64) {
        let sa = Box::new(sys::sockaddr(addr));
        let (p, len) = (sa.as_ptr(), sa.len());
        let ud = self.keep(user_data, Kept::Addr(sa));
        let e = opcode::Connect::new(types::Fd(fd), p, len)
            .build()
            .user_data(ud);
        self.push(e);
    }

    /// Cancels every in-flight operation on `fd`.
    pub fn cancel_fd(&mut self, fd: RawFd, user_data: u64) {
        let e = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
            .build()
            .user_data(user_data);
        self.push(e);
    }

    /// Cancels the in-flight operation submitted with `target` (as passed by the caller).
    pub fn cancel_op(&mut self, target: u64, user_data: u64) {
        // An op with side storage was submitted with KEEP_BIT set; match what the kernel has.
        let target = if self.kept.contains_key(&(target | KEEP_BIT)) {
            target | KEEP_BIT
        } else {
            target
        };
        let e = opcode::AsyncCancel2::new(types::CancelBuilder::user_data(target))
            .build()
            .user_data(user_data);
        self.push(e);
    }

    /// One-shot readiness poll (`POLLIN`/`POLLOUT`).
    pub fn poll(&mut self, fd: RawFd, events: u32, user_data: u64) {
        let e = opcode::PollAdd::new(types::Fd(fd), events)
            .build()
            .user_data(user_data);
        self.push(e);
    }

    /// Multishot readiness poll: a completion each time `fd` signals `events`, until it ends
    /// without `F_MORE`.
    pub fn poll_multi(&mut self, fd: RawFd, events: u32, user_data: u64) {
        let e = opcode::PollAdd::new(types::Fd(fd), events)
            .multi(true)
            .build()
            .user_data(user_data);
        self.push(e);
    }

    /// Non-blocking splice between a socket and a pipe.
    pub fn splice(&mut self, fd_in: RawFd, fd_out: RawFd, len: u32, user_data: u64) {
        let e = opcode::Splice::new(types::Fd(fd_in), -1, types::Fd(fd_out), -1, len)
            .flags(libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE)
            .build()
            .user_data(user_data);
        self.push(e);
    }

    /// Before [`Reactor::wait`] sleeps on an empty ring, poll it for a while (see
    /// [`BusyPoll`]). Spinning costs CPU; it saves the wake-up of an idle CPU, which on a VM
    /// whose vCPU halts when idle is a trip through the hypervisor. Only a ring with the
    /// taskrun flag can spin without a system call per pass; on others this refuses (false)
    /// and the ring keeps sleeping at once.
    pub fn set_busy_poll(&mut self, mode: BusyPoll) -> bool {
        if mode != BusyPoll::Off && !self.taskrun_flag {
            return false;
        }
        self.busy_poll = mode;
        self.spin_gate = TrialGate::default();
        true
    }

    /// Sets wake-up coalescing (see [`Coalesce`]); `None` wakes on the first completion.
    /// Refuses (false) on a kernel without io_uring's minimum wait timeout, which keeps
    /// waking on the first completion.
    pub fn set_coalesce(&mut self, c: Option<Coalesce>) -> bool {
        if c.is_some() && !self.ring.params().is_feature_min_timeout() {
            return false;
        }
        self.coalesce = c;
        self.coalesce_gate = CoalesceGate::default();
        true
    }

    /// The spin this pause gets, if any.
    fn spin_budget(&mut self, timeout: Duration) -> Option<Duration> {
        let spin = match self.busy_poll {
            BusyPoll::Off => return None,
            BusyPoll::Always(s) => s,
            BusyPoll::Adaptive(s) if self.spin_gate.admit() => s,
            BusyPoll::Adaptive(_) => return None,
        };
        (spin < timeout).then_some(spin)
    }

    /// Submits queued entries and waits for at least one completion or `timeout`.
    pub fn wait(&mut self, mut timeout: Duration) -> io::Result<()> {
        if !self.ring.completion().is_empty() {
            return self.submit();
        }
        if let Some(spin) = self.spin_budget(timeout) {
            let hit = self.spin(spin)?;
            self.spin_gate.record(hit);
            if hit {
                self.stats.busy_poll_hits += 1;
                return Ok(());
            }
            self.stats.busy_poll_misses += 1;
            timeout -= spin;
        }
        let ts = types::Timespec::from(timeout);
        let mut args = types::SubmitArgs::new().timespec(&ts);
        let mut want = 1;
        let mut gated = None;
        if let Some(c) = self.coalesce {
            if !c.adaptive
                || self
                    .coalesce_gate
                    .admit(Instant::now(), self.stats.completed, &c)
            {
                want = c.events as usize;
                args = args.min_wait_usec(c.delay.as_micros().min(u32::MAX as u128) as u32);
                self.stats.coalesced_waits += 1;
                gated = c.adaptive.then_some(c);
            }
        }
        self.stats.waits += 1;
        let r = self
            .ring
            .submitter()
            .submit_with_args_and_flags(want, &args, self.wait_flags);
        if let Some(c) = gated {
            let ready = self.ring.completion().len();
            self.coalesce_gate.held(ready, &c);
        }
        match r {
            Ok(n) => {
                self.stats.submitted += n as u64;
                Ok(())
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::ETIME) | Some(libc::EINTR) => Ok(()),
                Some(libc::EBUSY) => {
                    self.stats.cq_overflows += 1;
                    Ok(())
                }
                _ => Err(e),
            },
        }
    }

    /// Submits what is queued, then polls for a completion for up to `spin`; true if one came.
    /// Deferred completions are posted only by an enter with GETEVENTS; the taskrun flag says
    /// when some are pending (`submit` then enters with GETEVENTS), so the spin itself makes
    /// no system call (`set_busy_poll` accepts only rings with the flag).
    fn spin(&mut self, spin: Duration) -> io::Result<bool> {
        let t0 = Instant::now();
        self.submit()?;
        loop {
            if self.ring.submission().taskrun() {
                self.submit()?;
            }
            if !self.ring.completion().is_empty() {
                return Ok(true);
            }
            if t0.elapsed() >= spin {
                return Ok(false);
            }
            std::hint::spin_loop();
        }
    }

    /// Submits queued entries without waiting.
    pub fn submit(&mut self) -> io::Result<()> {
        match self.ring.submit() {
            Ok(n) => {
                self.stats.submitted += n as u64;
                Ok(())
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR) | Some(libc::EAGAIN) => Ok(()),
                Some(libc::EBUSY) => {
                    self.stats.cq_overflows += 1;
                    Ok(())
                }
                _ => Err(e),
            },
        }
    }

    /// Moves every available completion into `out` (cleared first).
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        out.clear();
        loop {
            {
                let mut cq = self.ring.completion();
                for cqe in &mut cq {
                    let mut ud = cqe.user_data();
                    let flags = cqe.flags();
                    let mut bytes = None;
                    let mut shared = None;
                    if ud & KEEP_BIT != 0 {
                        // Side storage is released with the final completion only.
                        if !cqueue::more(flags) {
                            match self.kept.remove(&ud) {
                                Some(Kept::Bytes(b)) => bytes = Some(b),
                                Some(Kept::Shared(b)) => shared = Some(b),
                                _ => {}
                            }
                        }
                        ud &= !KEEP_BIT;
                    }
                    out.push(Completion {
                        user_data: ud,
                        result: cqe.result(),
                        flags,
                        bytes,
                        shared,
                    });
                }
            }
            // With IORING_FEAT_NODROP the kernel holds overflowed completions and sets this
            // flag; entering the kernel flushes them into the queue we just emptied.
            if self.ring.submission().cq_overflow() {
                self.stats.cq_overflows += 1;
                let _ = self.submit();
                continue;
            }
            break;
        }
        self.stats.completed += out.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    /// Receives one message through the ring and returns (buffer id, its bytes).
    fn recv_one(r: &mut Reactor, fd: RawFd) -> (u16, Vec<u8>) {
        r.recv_once(fd, 7);
        let mut cqes = Vec::new();
        while cqes.is_empty() {
            r.wait(Duration::from_secs(1)).unwrap();
            r.reap(&mut cqes);
        }
        let c = &cqes[0];
        assert!(c.result > 0, "receive failed: {}", c.result);
        let bid = c.buffer().expect("a provided buffer");
        r.take_buffer(bid);
        (bid, r.buf(bid, c.result as usize).to_vec())
    }

    #[test]
    fn spin_gate_opens_on_answered_spins_and_shuts_on_misses() {
        let mut g = TrialGate::default();
        // Shut at first: only every 16th pause probes.
        let admitted = (0..64).filter(|_| g.admit()).count();
        assert_eq!(admitted, 4);
        // Answered probes open it; then every pause spins.
        let mut probes = 0;
        while g.score < TrialGate::OPEN_AT {
            if g.admit() {
                probes += 1;
                g.record(true);
            }
        }
        assert_eq!(probes, 6, "six answered spins in a row open the gate");
        assert!((0..100).all(|_| g.admit()));
        // Steady traffic keeps it open; after that, misses shut it within a handful of
        // pauses, but not at the first one.
        (0..100).for_each(|_| g.record(true));
        let mut misses = 0;
        while g.admit() {
            g.record(false);
            misses += 1;
            assert!(misses < 10, "the gate stays open on misses");
        }
        assert!(misses >= 2, "one miss shut an open gate");
        // Mostly misses with an occasional hit (one pause in 4 answered) keeps it shut.
        let mut g = TrialGate::default();
        let mut spins = 0;
        for i in 0..16_000 {
            if g.admit() {
                spins += 1;
                g.record(i % 4 == 0);
            }
        }
        assert!(spins <= 16_000 / 16 + 16, "{spins} spins in 16,000 pauses");
    }

    #[test]
    fn coalesce_gate_needs_the_rate_and_holds_that_fill() {
        let c = Coalesce {
            events: 16,
            delay: Duration::from_micros(50),
            adaptive: true,
        };
        let t0 = Instant::now();
        // 2 ms windows; 4 completions per 50 us is the bar, i.e. 160 per window.
        let mut g = CoalesceGate::default();
        let mut completed = 0;
        let mut held = 0;
        // Below the rate (100 per window): never held, probes included.
        for i in 1..=400u32 {
            completed += 1;
            held += g.admit(t0 + Duration::from_micros(20 * i as u64), completed, &c) as u32;
        }
        assert_eq!(held, 0);
        // Above it (1000 per window) with holds that fill: probes first, then every sleep.
        let mut t = t0 + Duration::from_millis(8);
        let mut sleeps = 0;
        let mut first_held = 0;
        while sleeps < 2000 {
            sleeps += 1;
            completed += 2;
            t += Duration::from_micros(4);
            if g.admit(t, completed, &c) {
                g.held(20, &c);
                if first_held == 0 {
                    first_held = sleeps;
                }
                held += 1;
            }
        }
        // The rate opens at the first window's end (500 sleeps), the first probe follows
        // within 16, six filled probes open the fill test.
        assert!(
            (500..=525).contains(&first_held),
            "first hold at sleep {first_held}"
        );
        assert!(held > 1350, "{held} of 2000 busy sleeps held");
        // Same rate, holds that gather 4 of 16 (a sparse open-loop stream): it shuts and
        // then holds only the probes.
        let mut late = 0;
        for i in 0..1600 {
            completed += 2;
            t += Duration::from_micros(4);
            if g.admit(t, completed, &c) {
                g.held(4, &c);
                if i >= 800 {
                    late += 1;
                }
            }
        }
        assert!(late <= 800 / 16 + 1, "{late} of 800 sparse sleeps held");
    }

    #[test]
    fn released_buffer_pages_read_as_zero_and_take_new_data() {
        let cfg = ReactorConfig {
            sq_entries: 8,
            cq_entries: 16,
            buf_count: 64,
            buf_size: 4096,
            iowq_max: [0, 0],
        };
        let mut r = Reactor::new(&cfg).expect("io_uring");
        let (mut tx, rx) = UnixStream::pair().unwrap();
        tx.write_all(b"first message").unwrap();
        let (bid, got) = recv_one(&mut r, rx.as_raw_fd());
        assert_eq!(got, b"first message");

        // Checked out: nothing is released.
        assert!(!r.release_buffer_pages());
        assert_eq!(r.buf(bid, 5), b"first");
        r.recycle(bid);
        if r.mode != RingMode::DeferTaskrun {
            // Other modes may fill buffers behind our back: they never release.
            assert!(!r.release_buffer_pages());
            return;
        }
        assert!(r.release_buffer_pages());
        // The page is gone (zero-fill on demand). `buf` is meant for checked-out buffers and
        // this one belongs to the ring again, so look through the raw pointer instead.
        // SAFETY: test-only read of a buffer no one has checked out; the kernel is not
        // filling it (no receive is armed).
        let stale = unsafe { std::slice::from_raw_parts(r.bufs().ptr(bid, 0), 13) };
        assert!(stale.iter().all(|&b| b == 0), "{stale:?}");

        // The kernel still fills released buffers.
        for n in 0..100 {
            let msg = format!("message {n}");
            tx.write_all(msg.as_bytes()).unwrap();
            let (bid, got) = recv_one(&mut r, rx.as_raw_fd());
            assert_eq!(got, msg.as_bytes());
            r.recycle(bid);
            if n % 10 == 0 {
                assert!(r.release_buffer_pages());
            }
        }
    }
}
