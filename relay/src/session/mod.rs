//! Per-connection state machines and the worker loop that drives them.
//!
//! A session is one client connection and, once routed, its origin connection. It lives in
//! the worker's slab; its slot index and generation form the tokens of every operation it
//! submits. Life cycle (see `docs/architecture.md` for the walk-through):
//!
//! ```text
//! accept ─▶ ClientHead ─(valid upgrade, route)─▶ Connecting ─▶ OriginHead ─(101)─▶ Relay
//!              │ (bad request, no route)            │ (refused/timeout)  │ (other status)
//!              ▼                                    ▼                    ▼
//!          Responding ─▶ Lingering ─────────────▶ Closing ◀──────── Passthrough
//! ```
//!
//! What must always hold:
//! - `inflight` counts the session's submitted operations whose final completion has not been
//!   seen (a multishot op counts once). The slot is freed only in `Closing` with
//!   `inflight == 0`, so no completion can arrive for a freed slot; the generation check
//!   on every completion is a second guard.
//! - A provided buffer is owned by exactly one place: a flow's queue (until its send
//!   completes and it is recycled) or the code handling its completion (which recycles it
//!   before returning). Freeing a slot recycles whatever its queues still hold.
//! - Each descriptor is closed exactly once, by `Worker::free`.
//! - At most one send per direction is in flight, so bytes leave in the order they came.
//! - A flow is `RecvState::Parked` exactly while its source socket's registration in the
//!   worker's epoll set (`reactor/park.rs`) is armed: it then has no receive in flight, and
//!   `inflight` does not count it. The registration is one-shot: the readiness that wakes the
//!   flow disables it before a receive is armed, and it stays in the set, disabled
//!   (`Flow::registered`), until the flow parks again and re-arms it. `free` closing the
//!   socket removes it.

pub mod pool;
mod worker;

pub use worker::{run_worker, WorkerHandle, WorkerInit};

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::Instant;

use crate::control::stats::CloseCause;
use crate::reactor::token::Op;

/// `Session::route` before the request is routed.
pub const NO_ROUTE: u16 = u16::MAX;

/// Where a session is in its life cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Reading the client's request head.
    ClientHead,
    /// Connecting to an origin.
    Connecting,
    /// Head sent (or being sent) to the origin; reading its answer.
    OriginHead,
    /// Upgraded: bytes move both ways.
    Relay,
    /// The origin answered with a status other than 101; relaying that answer, then closing.
    Passthrough,
    /// Sending relay's own error answer.
    Responding,
    /// Answer sent and write side shut; reading and discarding until the client closes, so
    /// that closing does not reset the connection before the client read the answer.
    Lingering,
    /// An edge app connection: relay answered the upgrade and speaks WebSocket itself.
    App,
    /// An edge app connection after relay sent (or answered) a close frame: sending what is
    /// queued, then waiting for the client to close.
    AppClosing,
    /// Operations cancelled; waiting for their completions before the slot is freed.
    Closing,
}

/// The state of a flow's receive operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecvState {
    Idle,
    Armed,
    /// A cancel was submitted (backpressure, or parking); the final completion has not
    /// arrived yet.
    Cancelling,
    /// No receive: the socket waits in the worker's epoll set until it is readable
    /// (`timeouts.park_idle`, reactor/park.rs).
    Parked,
}

/// Where a spliced flow is (splice data path): poll the source, splice socket → pipe,
/// splice pipe → socket (waiting for the destination to be writable when it is full).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpliceStage {
    Idle,
    PollIn,
    In,
    Out,
    PollOut,
}

/// Bytes of a provided buffer waiting to be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Chunk {
    pub bid: u16,
    pub off: u16,
    pub len: u16,
}

const INLINE: usize = 8;

/// A FIFO of chunks, inline for the common case (a few buffers in flight), spilling to the
/// heap only if a burst of completions outruns the cancel that applies backpressure.
#[derive(Debug, Default)]
pub struct ChunkQueue {
    inline: [Chunk; INLINE],
    head: u8,
    len: u8,
    // Boxed on purpose: 8 bytes instead of 32 in every idle session.
    #[allow(clippy::box_collection)]
    spill: Option<Box<std::collections::VecDeque<Chunk>>>,
}

impl ChunkQueue {
    fn spilled(&self) -> usize {
        self.spill.as_ref().map_or(0, |v| v.len())
    }

    pub fn len(&self) -> usize {
        self.len as usize + self.spilled()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn push(&mut self, c: Chunk) {
        if (self.len as usize) < INLINE && self.spilled() == 0 {
            let i = (self.head as usize + self.len as usize) % INLINE;
            self.inline[i] = c;
            self.len += 1;
        } else {
            self.spill.get_or_insert_with(Default::default).push_back(c);
        }
    }

    /// The first `n` chunks (at most the inline ones), oldest first.
    pub fn first(&self, n: usize) -> impl Iterator<Item = &Chunk> {
        (0..n.min(self.len as usize)).map(move |k| &self.inline[(self.head as usize + k) % INLINE])
    }

    pub fn front_mut(&mut self) -> Option<&mut Chunk> {
        if self.len > 0 {
            Some(&mut self.inline[self.head as usize])
        } else {
            None
        }
    }

    pub fn pop(&mut self) -> Option<Chunk> {
        if self.len == 0 {
            return None;
        }
        let c = self.inline[self.head as usize];
        self.head = ((self.head as usize + 1) % INLINE) as u8;
        self.len -= 1;
        // Refill the inline ring from the spill, keeping order; free the spill once empty.
        if let Some(spill) = self.spill.as_mut() {
            if let Some(next) = spill.pop_front() {
                let i = (self.head as usize + self.len as usize) % INLINE;
                self.inline[i] = next;
                self.len += 1;
            }
            if spill.is_empty() {
                self.spill = None;
            }
        }
        Some(c)
    }
}

/// One direction of a relayed connection: bytes received from one socket, sent to the other.
#[derive(Debug)]
pub struct Flow {
    pub recv: RecvState,
    /// The pending cancel of this flow's receive is for parking (the flow was silent).
    pub park: bool,
    /// The source socket has an item in the worker's epoll set (armed while `Parked`,
    /// disabled by its one-shot event otherwise): parking again re-arms it in place.
    pub registered: bool,
    /// The source sent FIN.
    pub eof: bool,
    /// We shut down the destination's write side (after forwarding everything).
    pub shut: bool,
    /// A send to the destination is in flight.
    pub sending: bool,
    pub queue: ChunkQueue,
    /// This flow moves bytes by splice instead of recv/send.
    pub spliced: bool,
    pub splice: SpliceStage,
    /// Consecutive receives that filled a whole buffer (`data_path = "auto"` switches a flow
    /// to splice after a run of them: that is bulk data, not WebSocket chatter).
    pub full_reads: u8,
    /// Bytes waiting in the flow's pipe.
    pub in_pipe: u32,
    /// The pipe (read end, write end) lent by the worker's pool while data moves; -1 if none.
    pub pipe: (RawFd, RawFd),
}

impl Flow {
    fn new() -> Flow {
        Flow {
            recv: RecvState::Idle,
            park: false,
            registered: false,
            eof: false,
            shut: false,
            sending: false,
            queue: ChunkQueue::default(),
            spliced: false,
            splice: SpliceStage::Idle,
            full_reads: 0,
            in_pipe: 0,
            pipe: (-1, -1),
        }
    }

    /// Nothing is moving in this direction right now.
    pub fn quiet(&self) -> bool {
        !self.sending && self.queue.is_empty() && self.splice == SpliceStage::Idle
    }

    /// The flow's receive could be traded for a parked registration: an armed receive and
    /// nothing moving.
    pub fn parkable(&self) -> bool {
        self.recv == RecvState::Armed && !self.park && !self.spliced && !self.eof && self.quiet()
    }

    /// Nothing left to forward in this direction and its end has been passed on.
    pub fn finished(&self) -> bool {
        self.eof && self.shut && self.quiet()
    }
}

/// Which way bytes go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Client → origin.
    Up = 0,
    /// Origin → client.
    Down = 1,
}

impl Dir {
    /// The receive op of this direction's source socket.
    pub fn recv_op(self) -> Op {
        match self {
            Dir::Up => Op::ClientRecv,
            Dir::Down => Op::OriginRecv,
        }
    }

    /// The send op of this direction's destination socket.
    pub fn send_op(self) -> Op {
        match self {
            Dir::Up => Op::OriginSend,
            Dir::Down => Op::ClientSend,
        }
    }

    pub fn splice_op(self) -> Op {
        match self {
            Dir::Up => Op::SpliceUp,
            Dir::Down => Op::SpliceDown,
        }
    }

    pub fn poll_op(self) -> Op {
        match self {
            Dir::Up => Op::PollUp,
            Dir::Down => Op::PollDown,
        }
    }

    /// Why the session ends when this direction's source fails.
    pub fn src_failed(self) -> CloseCause {
        match self {
            Dir::Up => CloseCause::ClientReset,
            Dir::Down => CloseCause::OriginReset,
        }
    }

    /// Why the session ends when this direction's destination fails.
    pub fn dst_failed(self) -> CloseCause {
        match self {
            Dir::Up => CloseCause::OriginReset,
            Dir::Down => CloseCause::ClientReset,
        }
    }
}

/// State that exists only while the handshake runs (boxed, dropped once relaying starts).
#[derive(Debug, Default)]
pub struct Handshake {
    /// Head bytes received so far when they did not arrive in one buffer.
    pub buf: Vec<u8>,
    /// The `Sec-WebSocket-Accept` the origin must answer with.
    pub accept: String,
    /// The rewritten head, waiting for the origin connection.
    pub origin_head: Option<Vec<u8>>,
    pub tried: pool::Tried,
    /// The connect was cancelled by its timeout.
    pub connect_timed_out: bool,
    /// Passthrough: body bytes still to forward (`None` = until the origin closes).
    pub remaining: Option<u64>,
    /// When the current origin connect was submitted.
    pub connect_started: Option<Instant>,
}

/// What metering and the billing record need beyond the data path.
#[derive(Debug)]
pub struct Meta {
    /// When the connection was accepted (wall-clock start = now − elapsed, at record time).
    pub accepted: Instant,
    /// Host and path, boxed and kept only when billing records are written.
    pub names: Option<Box<(Box<str>, Box<str>)>>,
    /// 101, relay's refusal status, or the origin's non-101 status; 0 if none yet.
    pub status: u16,
    pub cause: Option<CloseCause>,
}

impl Meta {
    /// Starts the clock of a connection just accepted.
    pub fn start() -> Meta {
        Meta {
            accepted: Instant::now(),
            names: None,
            status: 0,
            cause: None,
        }
    }
}

/// A frame on its way to an app client.
#[derive(Debug)]
pub enum Frame {
    /// The `101 Switching Protocols` answer: queued like a frame, not counted as one.
    Head(Vec<u8>),
    Owned(Vec<u8>),
    /// Framed once, sent to many (a room message).
    Shared(std::sync::Arc<[u8]>),
}

/// State of an edge app connection (boxed; only app sessions have one).
#[derive(Debug)]
pub struct AppConn {
    pub kind: crate::config::AppKind,
    pub decoder: crate::proto::ws::Decoder,
    /// Frames waiting to be sent (the one in flight is held by the reactor).
    pub out: std::collections::VecDeque<Frame>,
    /// Bytes of the in-flight shared frame already sent (short writes).
    pub shared_off: usize,
    /// The room and this member's index in the worker's member list.
    pub room: Option<(std::sync::Arc<str>, usize)>,
    /// The client asked (`?events=1`) for JSON join/leave events with member counts.
    pub events: bool,
    pub close_sent: bool,
    /// A ping went out and its pong has not come back.
    pub ping_out: bool,
}

/// One client connection and its origin connection.
#[derive(Debug)]
pub struct Session {
    pub gen: u32,
    pub phase: Phase,
    pub client: RawFd,
    /// `-1` until an origin socket exists.
    pub origin: RawFd,
    pub inflight: u32,
    /// Tick of this session's live timer-wheel entry.
    pub timer_at: u32,
    /// Tick at which the current phase began.
    pub phase_since: u32,
    pub last_active: u32,
    pub opened: u32,
    /// Index into the config's routes, or [`NO_ROUTE`].
    pub route: u16,
    /// Index of the origin in its pool, once connected (`u16::MAX` before).
    pub origin_idx: u16,
    pub up: Flow,
    pub down: Flow,
    pub hs: Option<Box<Handshake>>,
    pub peer: SocketAddr,
    /// The direction that ended first (for the close cause).
    pub first_end: Option<Dir>,
    /// Bytes relayed client → origin and origin → client (after the heads).
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub meta: Meta,
    pub app: Option<Box<AppConn>>,
    /// TLS with the client and/or the origin; `None` for plaintext sessions.
    pub tls: Option<Box<SessionTls>>,
}

/// TLS state of a session. A session with TLS on either side moves its bytes through owned
/// buffers (`pend`) instead of ring-buffer chunks: what arrives is decrypted and/or
/// encrypted into the buffer of the direction it goes, and one send per direction carries it.
#[derive(Debug, Default)]
pub struct SessionTls {
    /// Server side of the client's TLS (TLS listener).
    pub client: Option<crate::tls::TlsConn>,
    /// Client side of the origin's TLS (TLS pool).
    pub origin: Option<Box<crate::tls::TlsConn>>,
    /// Bytes ready for the origin (`[0]`, up) and the client (`[1]`, down), not yet handed to
    /// a send.
    pub pend: [Vec<u8>; 2],
}

impl SessionTls {
    pub fn pend(&mut self, d: Dir) -> &mut Vec<u8> {
        &mut self.pend[d as usize]
    }

    /// The TLS of the socket a direction writes to.
    pub fn dst(&mut self, d: Dir) -> Option<&mut crate::tls::TlsConn> {
        match d {
            Dir::Up => self.origin.as_deref_mut(),
            Dir::Down => self.client.as_mut(),
        }
    }

    /// The TLS of the socket a direction reads from.
    pub fn src(&mut self, d: Dir) -> Option<&mut crate::tls::TlsConn> {
        match d {
            Dir::Up => self.client.as_mut(),
            Dir::Down => self.origin.as_deref_mut(),
        }
    }
}

impl Session {
    pub fn flow(&self, d: Dir) -> &Flow {
        match d {
            Dir::Up => &self.up,
            Dir::Down => &self.down,
        }
    }

    pub fn flow_mut(&mut self, d: Dir) -> &mut Flow {
        match d {
            Dir::Up => &mut self.up,
            Dir::Down => &mut self.down,
        }
    }

    /// The socket a direction reads from.
    pub fn src(&self, d: Dir) -> RawFd {
        match d {
            Dir::Up => self.client,
            Dir::Down => self.origin,
        }
    }

    /// The socket a direction writes to.
    pub fn dst(&self, d: Dir) -> RawFd {
        match d {
            Dir::Up => self.origin,
            Dir::Down => self.client,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(bid: u16) -> Chunk {
        Chunk {
            bid,
            off: 0,
            len: 1,
        }
    }

    #[test]
    fn queue_keeps_order_through_spill() {
        let mut q = ChunkQueue::default();
        for i in 0..20 {
            q.push(c(i));
        }
        assert_eq!(q.len(), 20);
        let mut out = Vec::new();
        for i in 20..25 {
            out.push(q.pop().unwrap().bid);
            q.push(c(i));
        }
        while let Some(x) = q.pop() {
            out.push(x.bid);
        }
        assert_eq!(out, (0..25).collect::<Vec<_>>());
        assert!(q.is_empty());
    }

    #[test]
    fn session_stays_small() {
        // An idle relayed connection's user-space cost is this struct plus its slab slot.
        assert!(
            std::mem::size_of::<Session>() <= 320,
            "{}",
            std::mem::size_of::<Session>()
        );
    }
}
