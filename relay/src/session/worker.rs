//! The worker: one thread, one ring, one slab of sessions, one timer wheel.
//!
//! `run_worker` sets the thread up (CPU pinning, ring, `SO_REUSEPORT` listeners), reports
//! readiness, then loops: wait for completions (or the next 100 ms tick), dispatch each to
//! its session by token, fire due timers, re-arm receives that ran out of buffers, publish
//! counters. Every handler below is a step of the life cycle described in `session/mod.rs`.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;

use super::pool::PoolState;
use super::{
    AppConn, Chunk, Dir, Flow, Frame, Meta, Phase, RecvState, Session, SpliceStage, NO_ROUTE,
};
use crate::apps::{self, EdgeApp, Member, Replies, RoomHub, RoomMsg, RoomTable};
use crate::config::{AppKind, Config, DataPath, SlowMember, Target};
use crate::control::access_log::{self, Batch, Record};
use crate::control::stats::{CloseCause, Counters, Latencies, RouteCounters, WorkerStats};
use crate::control::Control;
use crate::proto::http::{self, Answer, Forwarding, Reject, Status};
use crate::proto::ws::{CloseCode, ControlFrame, DataKind, Decoder, DecoderConfig, Event};
use crate::reactor::park::Parking;
use crate::reactor::timer::{TimerEntry, TimerWheel};
use crate::reactor::token::{Op, Token, GEN_MASK};
use crate::reactor::{sys, Completion, Reactor, ReactorConfig, MAX_IOV};
use crate::tls::{ClientTls, ServerTls};

mod tls;

/// `Op::Wake` slot of the poll on this worker's room-inbox eventfd.
const WAKE_INBOX: u32 = 1;
/// `Op::Wake` slot of the multishot poll on this worker's epoll set of parked sockets.
const WAKE_PARKED: u32 = 2;
/// Timer resolution.
pub const TICK: Duration = Duration::from_millis(100);
/// Ticks between memory trims (heap, receive-buffer pages): once a second.
const TRIM_EVERY: u32 = 10;
/// Longest a quiet worker sleeps without a due timer: one minute. (A wake-up costs about
/// 40 µs of CPU on the 2-core test guests; bench-million's hundred idle relay processes would
/// otherwise pay ten a second each.)
const QUIET_MAX_TICKS: u32 = 600;
/// How long relay keeps reading (and discarding) after its own error answer.
const LINGER_TICKS: u32 = 20;
/// A flow stops receiving once this many buffers wait to be sent (backpressure).
const HIGH_WATER: usize = 4;
/// Bytes one splice moves at most (the default pipe capacity).
const SPLICE_LEN: u32 = 64 * 1024;
/// `data_path = "auto"`: full-buffer receives in a row after which a flow switches to splice.
const AUTO_BULK_READS: u8 = 8;
/// Idle pipes kept per worker between ticks.
const PIPE_POOL_MAX: usize = 64;

/// Counts relayed bytes for the worker, the session's route and the session's record.
#[cfg(not(feature = "metering"))]
#[inline(always)]
fn count_bytes(_: &mut Counters, _: &mut [RouteCounters], _: &mut Session, _: Dir, _: u64) {}

/// Counts relayed bytes for the worker, the session's route and the session's record.
#[cfg(feature = "metering")]
#[inline(always)]
fn count_bytes(c: &mut Counters, routes: &mut [RouteCounters], s: &mut Session, dir: Dir, n: u64) {
    let r = &mut routes[s.route as usize];
    match dir {
        Dir::Up => {
            c.bytes_client_to_origin += n;
            r.bytes_client_to_origin += n;
            s.bytes_up += n;
        }
        Dir::Down => {
            c.bytes_origin_to_client += n;
            r.bytes_origin_to_client += n;
            s.bytes_down += n;
        }
    }
}

/// What an app client sent, decoded: owned events, and the decoder's verdict.
enum In {
    Message(DataKind, Vec<u8>),
    Ping(ControlFrame),
    Pong,
    Close(ControlFrame),
}

type Decoded = (Vec<In>, Result<(), crate::proto::ws::ProtocolError>);

/// Feeds client bytes to a connection's decoder. Borrows only the connection's state, so
/// the bytes can come straight from a ring buffer.
fn decode_app(app: &mut AppConn, data: &[u8]) -> Decoded {
    let mut events = Vec::new();
    let result = app.decoder.feed(data, |e| match e {
        Event::Message(m) => events.push(In::Message(m.kind(), m.take())),
        Event::Ping(p) => events.push(In::Ping(p.pong())),
        Event::Pong(_) => events.push(In::Pong),
        Event::Close(c) => events.push(In::Close(c.reply())),
        Event::Fragment(_) => {}
    });
    (events, result)
}

fn app_impl(kind: AppKind) -> &'static dyn EdgeApp {
    match kind {
        AppKind::Echo | AppKind::Demo => &apps::Echo,
        AppKind::Rooms => &apps::Rooms,
    }
}

fn ticks(d: Duration) -> u32 {
    d.as_millis().div_ceil(TICK.as_millis()).max(1) as u32
}

/// What a worker thread needs to start.
pub struct WorkerInit {
    pub id: usize,
    pub cpu: Option<core_affinity::CoreId>,
    pub config: Arc<Config>,
    pub stats: Arc<WorkerStats>,
    pub control: Arc<Control>,
    pub max_connections: usize,
    /// Where billing records go, if enabled.
    pub access_log: Option<crossbeam_channel::Sender<Batch>>,
    /// Rooms across workers, and this worker's inbox of room messages from the others.
    pub hub: Arc<RoomHub>,
    pub inbox: crossbeam_channel::Receiver<RoomMsg>,
    /// Per listener (same order as the config): this worker's TLS server config, if TLS.
    pub listener_tls: Vec<Option<ServerTls>>,
    /// Per pool: TLS toward its origins, if any.
    pub pool_tls: Vec<Option<ClientTls>>,
}

/// What the main thread keeps of a worker.
pub struct WorkerHandle {
    pub id: usize,
    pub thread: std::thread::JoinHandle<()>,
}

struct Worker {
    id: usize,
    cfg: Arc<Config>,
    reactor: Reactor,
    sessions: Slab<Session>,
    next_gen: u32,
    listeners: Vec<RawFd>,
    accept_retry: Option<u32>,
    wheel: TimerWheel,
    pools: Vec<PoolState>,
    counters: Counters,
    routes: Vec<RouteCounters>,
    latencies: Latencies,
    /// Billing records waiting for the next tick's hand-off to the writer thread.
    records: Vec<Record>,
    access_log: Option<crossbeam_channel::Sender<Batch>>,
    hub: Arc<RoomHub>,
    inbox: crossbeam_channel::Receiver<RoomMsg>,
    rooms: RoomTable,
    stats: Arc<WorkerStats>,
    control: Arc<Control>,
    epoch: Instant,
    /// Ticks since `epoch`, read after every wait.
    now: u32,
    /// The tick whose timers and duties (`on_tick`) ran last.
    ticked: u32,
    /// `reactor.stats.completed` when `on_tick` last ran: unchanged means nothing happened.
    completed_at_tick: u64,
    /// The tick at or after which the next memory trim runs.
    next_trim: u32,
    starved: Vec<(u32, u32, Dir)>,
    max_connections: usize,
    draining: Option<u32>,
    data_path: DataPath,
    /// Empty pipes ready to lend to a spliced flow; closed when unused for a tick.
    pipes: Vec<(RawFd, RawFd)>,
    pipes_lent_this_tick: bool,
    t_handshake: u32,
    t_connect: u32,
    t_origin: u32,
    t_idle: u32,
    t_half: u32,
    t_ping: Option<u32>,
    t_pong: u32,
    /// `timeouts.park_idle` in ticks; `None` = never park.
    t_park: Option<u32>,
    /// Idle sockets waiting for readiness without an armed receive.
    parking: Parking,
    /// Tokens of parked sockets that became ready (reused).
    woken: Vec<u64>,
    park_failures: u64,
    listener_tls: Vec<Option<ServerTls>>,
    pool_tls: Vec<Option<ClientTls>>,
    /// Plaintext a TLS receive decrypted, before it moves on (reused).
    scratch: Vec<u8>,
    /// Connections accepted, upgraded and closed when the heap was last trimmed
    /// (`sys::trim_heap`).
    trimmed_at_churn: u64,
    /// Completions reaped when the receive buffers' pages were last released (or that was
    /// last tried).
    released_at_completed: u64,
}

/// Runs a worker on the calling thread until it has drained. Sends `Ok(description)` once
/// listening, or `Err(reason)` if setup failed.
pub fn run_worker(init: WorkerInit, ready: crossbeam_channel::Sender<Result<String, String>>) {
    let mut pinned = None;
    if let Some(core) = init.cpu {
        if core_affinity::set_for_current(core) {
            pinned = Some(core.id);
        }
    }
    let cfg = init.config.clone();
    let rc = ReactorConfig {
        sq_entries: 4096,
        cq_entries: 16384,
        buf_count: cfg.buffers.count,
        buf_size: cfg.buffers.size,
        iowq_max: [2, 2],
    };
    let mut reactor = match Reactor::new(&rc) {
        Ok(r) => r,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    if !reactor.set_busy_poll(cfg.workers.busy_poll) && init.id == 0 {
        tracing::warn!(
            "workers.busy_poll ignored: this kernel's io_uring lacks the taskrun flag with \
             deferred task running (Linux 6.1+); workers sleep when idle"
        );
    }
    if !reactor.set_coalesce(cfg.workers.coalesce()) && init.id == 0 {
        tracing::warn!(
            "workers.coalesce ignored: this kernel's io_uring lacks the minimum wait timeout \
             (Linux 6.12+); workers wake on the first completion"
        );
    }
    let parking = match Parking::new() {
        Ok(p) => p,
        Err(e) => {
            let _ = ready.send(Err(format!(
                "cannot create the epoll set for idle sockets: {e}"
            )));
            return;
        }
    };
    let mut listeners = Vec::new();
    for l in &cfg.listeners {
        match sys::listen_reuseport(l.address, l.backlog as i32) {
            Ok(fd) => listeners.push(fd),
            Err(e) => {
                for fd in listeners {
                    sys::close(fd);
                }
                let _ = ready.send(Err(format!("cannot listen on {}: {e}", l.address)));
                return;
            }
        }
    }
    let t = &cfg.timeouts;
    let mut w = Worker {
        id: init.id,
        reactor,
        sessions: Slab::with_capacity(init.max_connections.min(1 << 20)),
        next_gen: 1,
        listeners,
        accept_retry: None,
        wheel: TimerWheel::new(1024, 0),
        pools: cfg.pools.iter().map(PoolState::new).collect(),
        counters: Counters::default(),
        routes: vec![RouteCounters::default(); cfg.routes.len()],
        latencies: Latencies::default(),
        records: Vec::new(),
        access_log: init.access_log,
        hub: init.hub,
        inbox: init.inbox,
        rooms: RoomTable::default(),
        stats: init.stats,
        control: init.control,
        epoch: Instant::now(),
        now: 0,
        ticked: 0,
        completed_at_tick: 0,
        next_trim: TRIM_EVERY,
        starved: Vec::new(),
        max_connections: init.max_connections,
        draining: None,
        data_path: cfg.data_path,
        pipes: Vec::new(),
        pipes_lent_this_tick: false,
        t_handshake: ticks(t.handshake),
        t_connect: ticks(t.origin_connect),
        t_origin: ticks(t.origin_handshake),
        t_idle: ticks(t.idle),
        t_half: ticks(t.half_closed),
        t_ping: cfg.apps.ping_interval.map(ticks),
        t_pong: ticks(cfg.apps.pong_timeout),
        t_park: t.park_idle.map(ticks),
        parking,
        woken: Vec::new(),
        park_failures: 0,
        listener_tls: init.listener_tls,
        pool_tls: init.pool_tls,
        scratch: Vec::new(),
        trimmed_at_churn: 0,
        released_at_completed: 0,
        cfg,
    };
    for i in 0..w.listeners.len() {
        w.arm_accept(i);
    }
    w.arm_inbox();
    w.arm_parked_poll();
    let addrs: Vec<String> = w
        .cfg
        .listeners
        .iter()
        .map(|l| l.address.to_string())
        .collect();
    let desc = format!(
        "worker {} on cpu {} listening on {} (ring {:?}, {} x {} B receive buffers, max {} connections)",
        w.id,
        pinned.map(|c| c.to_string()).unwrap_or_else(|| "any".into()),
        addrs.join(", "),
        w.reactor.mode,
        w.cfg.buffers.count,
        w.cfg.buffers.size,
        w.max_connections
    );
    w.stats.ready.store(true, Ordering::Release);
    let _ = ready.send(Ok(desc));
    w.run();
}

impl Worker {
    fn tok(&self, op: Op, slot: usize) -> u64 {
        Token::new(op, slot as u32, self.sessions[slot].gen).encode()
    }

    fn arm_accept(&mut self, i: usize) {
        let ud = Token::new(Op::Accept, i as u32, 0).encode();
        self.reactor.accept_multi(self.listeners[i], ud);
    }

    fn run(&mut self) {
        let mut cqes = Vec::with_capacity(4096);
        let mut due: Vec<TimerEntry> = Vec::new();
        loop {
            let next = TICK * self.next_wake();
            let wait = next
                .saturating_sub(self.epoch.elapsed())
                .max(Duration::from_micros(100));
            if let Err(e) = self.reactor.wait(wait) {
                tracing::error!(worker = self.id, "io_uring_enter failed: {e}");
                break;
            }
            // The clock first: a quiet worker may have slept for many ticks, and the
            // completions below arm deadlines and stamp activity from `now`.
            self.now = (self.epoch.elapsed().as_millis() / TICK.as_millis()) as u32;
            self.reactor.reap(&mut cqes);
            for c in cqes.drain(..) {
                self.on_completion(c);
            }
            if self.now != self.ticked {
                self.ticked = self.now;
                self.wheel.advance(self.now, &mut due);
                for e in due.drain(..) {
                    self.on_timer(e);
                }
                self.on_tick();
            }
            self.check_control();
            self.rearm_starved();
            self.publish();
            if self.draining.is_some() && self.sessions.is_empty() {
                break;
            }
        }
        self.teardown();
    }

    fn publish(&mut self) {
        let c = &mut self.counters;
        c.submitted = self.reactor.stats.submitted;
        c.completed = self.reactor.stats.completed;
        c.cq_overflows = self.reactor.stats.cq_overflows;
        c.busy_poll_hits = self.reactor.stats.busy_poll_hits;
        c.busy_poll_misses = self.reactor.stats.busy_poll_misses;
        c.waits = self.reactor.stats.waits;
        c.coalesced_waits = self.reactor.stats.coalesced_waits;
        c.bufs_provided = self.reactor.bufs().provided() as u64;
        c.bufs_checked_out = self.reactor.bufs().checked_out() as u64;
        c.active = self.sessions.len() as u64;
        self.stats.publish(c);
    }

    /// Per-route counters, histograms and billing records leave the worker once per tick.
    fn publish_slow(&mut self) {
        self.rooms.publish(&self.hub.counts[self.id]);
        if let Ok(mut r) = self.stats.routes.lock() {
            r.clone_from(&self.routes);
        }
        if let Ok(mut l) = self.stats.latencies.lock() {
            l.clone_from(&self.latencies);
        }
        if !self.records.is_empty() {
            if let Some(tx) = &self.access_log {
                let _ = tx.send(std::mem::take(&mut self.records));
            } else {
                self.records.clear();
            }
        }
    }

    /// The tick to wake at unless a completion comes first. The next tick while a tick duty
    /// is pending (a receive waiting for buffers, an idle pipe to close, an accept back-off,
    /// a drain, access records to hand over) or something happened since the last tick (its
    /// counters and records get published on the next one). Otherwise the worker is quiet:
    /// it sleeps until the wheel's next due entry or, if connections came or went or bytes
    /// moved since the last trim, the next trim. Completions wake the ring at any time, and
    /// the main thread's drain and stop signal the room-inbox eventfd.
    fn next_wake(&self) -> u32 {
        let next = self.now + 1;
        let done = self.reactor.stats.completed;
        if done != self.completed_at_tick
            || !self.starved.is_empty()
            || !self.pipes.is_empty()
            || self.accept_retry.is_some()
            || self.draining.is_some()
            || !self.records.is_empty()
        {
            return next;
        }
        // The wheel sees one lap ahead; never sleep past what it can see.
        let mut horizon = self.wheel.cursor() + QUIET_MAX_TICKS.min(self.wheel.lap() - 1);
        if done != self.released_at_completed || self.churn() != self.trimmed_at_churn {
            horizon = horizon.min(self.next_trim);
        }
        self.wheel.next_due(horizon).unwrap_or(horizon).max(next)
    }

    /// Connections accepted, upgraded and closed so far.
    fn churn(&self) -> u64 {
        let c = &self.counters;
        c.accepted + c.upgraded + c.closed.iter().sum::<u64>()
    }

    fn on_tick(&mut self) {
        self.publish_slow();
        // Once a second, memory that a burst touched goes back to the kernel instead of
        // staying resident at the burst's peak: the heap pages that handshakes allocated and
        // freed (if connections came, were upgraded or went), and the receive buffers' pages
        // (if the ring was used; released only if no buffer is in use now).
        if self.now >= self.next_trim {
            self.next_trim = self.now + TRIM_EVERY;
            let churn = self.churn();
            if churn != self.trimmed_at_churn {
                self.trimmed_at_churn = churn;
                sys::trim_heap();
            }
            let done = self.reactor.stats.completed;
            if done != self.released_at_completed {
                self.released_at_completed = done;
                self.reactor.release_buffer_pages();
            }
        }
        // Idle costs nothing: pipes nobody borrowed during the last tick are closed.
        if !self.pipes_lent_this_tick {
            for (r, w) in self.pipes.drain(..) {
                sys::close(r);
                sys::close(w);
            }
        }
        self.pipes_lent_this_tick = false;
        if let Some(at) = self.accept_retry {
            if at <= self.now && self.draining.is_none() {
                self.accept_retry = None;
                for i in 0..self.listeners.len() {
                    self.arm_accept(i);
                }
            }
        }
        self.check_control();
        let stop_now = self.control.stop.load(Ordering::Acquire);
        if let Some(deadline) = self.draining {
            if stop_now || self.now >= deadline {
                let slots: Vec<usize> = self.sessions.iter().map(|(k, _)| k).collect();
                for slot in slots {
                    self.begin_close(slot, CloseCause::Drain);
                    self.maybe_free(slot);
                }
            }
        }
        self.completed_at_tick = self.reactor.stats.completed;
    }

    /// Starts the drain once the main thread asks for it. Read after every wake-up: the main
    /// thread signals the inbox eventfd when it raises the flag, so a quiet worker hears it
    /// at once. (While draining the worker ticks, and `on_tick` handles the stop flag and the
    /// deadline.)
    fn check_control(&mut self) {
        if self.draining.is_none() && self.control.drain.load(Ordering::Acquire) {
            self.start_drain();
        }
    }

    fn start_drain(&mut self) {
        self.draining = Some(self.now + ticks(self.cfg.timeouts.drain));
        tracing::info!(
            worker = self.id,
            active = self.sessions.len(),
            "draining: listeners closed, waiting for live connections"
        );
        for &fd in &self.listeners {
            self.reactor
                .cancel_fd(fd, Token::new(Op::Wake, 0, 0).encode());
        }
        // Edge-app clients hear "going away" before their socket closes.
        let apps: Vec<usize> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.phase == Phase::App)
            .map(|(k, _)| k)
            .collect();
        for slot in apps {
            self.app_close(slot, CloseCode::GOING_AWAY, "relay is shutting down");
        }
        let _ = self.reactor.submit();
        for fd in std::mem::take(&mut self.listeners) {
            sys::close(fd);
        }
    }

    fn teardown(&mut self) {
        for (r, w) in self.pipes.drain(..) {
            sys::close(r);
            sys::close(w);
        }
        for fd in std::mem::take(&mut self.listeners) {
            sys::close(fd);
        }
        let slots: Vec<usize> = self.sessions.iter().map(|(k, _)| k).collect();
        for slot in slots {
            self.free(slot);
        }
        self.publish();
        self.publish_slow();
        tracing::info!(worker = self.id, "worker stopped");
    }

    // ---- completions -------------------------------------------------------------------

    fn on_completion(&mut self, c: Completion) {
        let Some(tok) = Token::decode(c.user_data) else {
            return;
        };
        if let Some(bid) = c.buffer() {
            self.reactor.take_buffer(bid);
        }
        match tok.op {
            Op::Accept => self.on_accept(tok.slot as usize, &c),
            Op::Wake if tok.slot == WAKE_INBOX => self.on_inbox(),
            Op::Wake if tok.slot == WAKE_PARKED => self.on_parked_ready(&c),
            Op::Wake => {}
            op => {
                let slot = tok.slot as usize;
                match self.sessions.get_mut(slot) {
                    Some(s) if s.gen == tok.gen => {
                        if !c.more() {
                            s.inflight -= 1;
                        }
                    }
                    _ => {
                        // A completion for a slot that has moved on: only its buffer matters.
                        if let Some(bid) = c.buffer() {
                            self.reactor.recycle(bid);
                        }
                        return;
                    }
                }
                match op {
                    Op::ClientRecv => self.on_recv(slot, Dir::Up, &c),
                    Op::OriginRecv => self.on_recv(slot, Dir::Down, &c),
                    Op::OriginSend => self.on_sent(slot, Dir::Up, c),
                    Op::ClientSend => self.on_sent(slot, Dir::Down, c),
                    Op::Connect => self.on_connect(slot, &c),
                    Op::SpliceUp => self.on_splice(slot, Dir::Up, &c),
                    Op::SpliceDown => self.on_splice(slot, Dir::Down, &c),
                    Op::PollUp => self.on_poll(slot, Dir::Up, &c),
                    Op::PollDown => self.on_poll(slot, Dir::Down, &c),
                    _ => {}
                }
                self.maybe_free(slot);
            }
        }
    }

    fn on_accept(&mut self, li: usize, c: &Completion) {
        if !c.more() && self.draining.is_none() && li < self.listeners.len() {
            if matches!(
                -c.result,
                libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
            ) {
                // Out of descriptors or memory: try again next tick rather than spin.
                self.accept_retry = Some(self.now + 1);
            } else if c.result != -libc::ECANCELED {
                self.arm_accept(li);
            }
        }
        if c.result < 0 {
            if c.result != -libc::ECANCELED {
                self.counters.accept_errors += 1;
                if self.counters.accept_errors.is_power_of_two() {
                    tracing::warn!(
                        worker = self.id,
                        errors = self.counters.accept_errors,
                        "accept failed: {}",
                        std::io::Error::from_raw_os_error(-c.result)
                    );
                }
            }
            return;
        }
        let fd = c.result;
        if self.draining.is_some() {
            sys::close(fd);
            return;
        }
        self.counters.accepted += 1;
        let peer = sys::peer_addr(fd)
            .unwrap_or(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)));
        let _ = sys::set_nodelay(fd);
        let gen = self.next_gen;
        self.next_gen = (self.next_gen + 1) & GEN_MASK;
        let slot = self.sessions.insert(Session {
            gen,
            phase: Phase::ClientHead,
            client: fd,
            origin: -1,
            inflight: 0,
            timer_at: 0,
            phase_since: self.now,
            last_active: self.now,
            opened: self.now,
            route: NO_ROUTE,
            origin_idx: u16::MAX,
            up: Flow::new(),
            down: Flow::new(),
            hs: None,
            peer,
            first_end: None,
            bytes_up: 0,
            bytes_down: 0,
            meta: Meta::start(),
            app: None,
            tls: None,
        });
        tracing::trace!(worker = self.id, slot, fd, %peer, "accepted");
        if let Some(Some(t)) = self.listener_tls.get(li) {
            match crate::tls::TlsConn::server(t) {
                Ok(conn) => {
                    self.sessions[slot].tls = Some(Box::new(super::SessionTls {
                        client: Some(conn),
                        ..Default::default()
                    }))
                }
                Err(e) => {
                    tracing::warn!(worker = self.id, "cannot start a TLS session: {e}");
                    self.begin_close(slot, CloseCause::Refused);
                    self.maybe_free(slot);
                    return;
                }
            }
        }
        if self.sessions.len() > self.max_connections {
            self.respond(
                slot,
                Reject {
                    status: Status::ServiceUnavailable,
                    reason: "relay is at its connection limit",
                },
            );
            return;
        }
        self.arm_recv_once(slot, Dir::Up);
        self.arm_timer(slot);
    }

    fn arm_recv_once(&mut self, slot: usize, dir: Dir) {
        let ud = self.tok(dir.recv_op(), slot);
        let s = &mut self.sessions[slot];
        self.reactor.recv_once(s.src(dir), ud);
        s.flow_mut(dir).recv = RecvState::Armed;
        s.inflight += 1;
    }

    fn arm_recv_multi(&mut self, slot: usize, dir: Dir) {
        let ud = self.tok(dir.recv_op(), slot);
        let s = &mut self.sessions[slot];
        self.reactor.recv_multi(s.src(dir), ud);
        s.flow_mut(dir).recv = RecvState::Armed;
        s.inflight += 1;
    }

    fn on_recv(&mut self, slot: usize, dir: Dir, c: &Completion) {
        let more = c.more();
        let s = &mut self.sessions[slot];
        let phase = s.phase;
        let f = s.flow_mut(dir);
        if c.result > 0 {
            // Bytes came after all: this flow is not idle, whatever the timer thought.
            f.park = false;
        }
        if !more {
            f.recv = RecvState::Idle;
            let park = std::mem::take(&mut f.park);
            if park && c.result == -libc::ECANCELED && matches!(phase, Phase::Relay | Phase::App) {
                self.park(slot, dir);
                return;
            }
        }
        let bid = c.buffer();
        let tls = s.tls.is_some();
        match (phase, dir) {
            (Phase::ClientHead, Dir::Up) => self.client_head(slot, c.result, bid),
            (Phase::OriginHead, Dir::Down) if tls => self.tls_origin_head(slot, c.result, bid),
            (Phase::OriginHead, Dir::Down) => self.origin_head(slot, c.result, bid),
            (Phase::Relay, _) | (Phase::Passthrough, Dir::Down) if tls => {
                self.tls_flow_recv(slot, dir, c.result, bid, more)
            }
            (Phase::Relay, _) | (Phase::Passthrough, Dir::Down) => {
                self.flow_recv(slot, dir, c.result, bid, more)
            }
            (Phase::App | Phase::AppClosing, Dir::Up) => self.app_recv(slot, c.result, bid, more),
            (Phase::Lingering, Dir::Up) => {
                if let Some(b) = bid {
                    self.reactor.recycle(b);
                }
                if c.result > 0 {
                    if !more {
                        self.arm_recv_multi(slot, Dir::Up);
                    }
                } else if !more {
                    self.begin_close(slot, CloseCause::Refused);
                }
            }
            _ => {
                if let Some(b) = bid {
                    self.reactor.recycle(b);
                }
                // The client left while relay was still talking to the origin.
                if c.result == 0 && dir == Dir::Up && phase != Phase::Closing {
                    self.begin_close(slot, CloseCause::ClientClosed);
                }
            }
        }
    }

    fn starve(&mut self, slot: usize, dir: Dir) {
        self.counters.enobufs += 1;
        self.reactor.buffers_exhausted();
        let gen = self.sessions[slot].gen;
        self.starved.push((slot as u32, gen, dir));
    }

    fn rearm_starved(&mut self) {
        if self.starved.is_empty() || self.reactor.bufs().available() == 0 {
            return;
        }
        for (slot, gen, dir) in std::mem::take(&mut self.starved) {
            let slot = slot as usize;
            let Some(s) = self.sessions.get(slot) else {
                continue;
            };
            if s.gen != gen || s.flow(dir).recv != RecvState::Idle {
                continue;
            }
            match s.phase {
                Phase::ClientHead | Phase::OriginHead => self.arm_recv_once(slot, dir),
                Phase::Relay
                | Phase::Passthrough
                | Phase::Lingering
                | Phase::App
                | Phase::AppClosing
                    if !s.flow(dir).eof =>
                {
                    self.arm_recv_multi(slot, dir)
                }
                _ => {}
            }
        }
    }

    fn client_head(&mut self, slot: usize, res: i32, bid: Option<u16>) {
        if res <= 0 {
            if let Some(b) = bid {
                self.reactor.recycle(b);
            }
            if res == -libc::ENOBUFS {
                self.starve(slot, Dir::Up);
            } else {
                // Closed or reset before a complete head: nothing to answer.
                if self.tls_handshaking(slot) {
                    self.counters.tls_fail_closed += 1;
                }
                self.begin_close(slot, CloseCause::ClientClosed);
            }
            return;
        }
        let bid = bid.expect("a receive with data carries a buffer");
        if self.client_tls(slot) {
            self.tls_client_head(slot, res as usize, bid);
            return;
        }
        let max = self.cfg.limits.max_head_bytes as usize;
        let s = &mut self.sessions[slot];
        let fwd = Forwarding {
            peer: s.peer,
            proto: "http",
        };
        let hs = s.hs.get_or_insert_with(Box::default);
        let data = self.reactor.buf(bid, res as usize);
        // Parse straight from the ring buffer when the head arrived in one piece.
        let parsed = if hs.buf.is_empty() {
            match http::parse_upgrade(data, max, fwd) {
                Ok(None) => {
                    hs.buf.extend_from_slice(data);
                    Ok(None)
                }
                r => r,
            }
        } else {
            hs.buf.extend_from_slice(data);
            http::parse_upgrade(&hs.buf, max, fwd)
        };
        // Not an upgrade: maybe a plain GET for a page relay serves itself.
        let plain = match &parsed {
            Err(r) if r.status == Status::UpgradeRequired => {
                http::plain_get(if hs.buf.is_empty() { data } else { &hs.buf })
            }
            _ => None,
        };
        self.reactor.recycle(bid);
        self.head_parsed(slot, parsed, plain);
    }

    /// Acts on a parsed (or incomplete, or refused) request head.
    fn head_parsed(
        &mut self,
        slot: usize,
        parsed: Result<Option<http::Upgrade>, Reject>,
        plain: Option<(String, String)>,
    ) {
        match parsed {
            Ok(None) => self.arm_recv_once(slot, Dir::Up),
            Err(r) => match plain.and_then(|(h, p)| self.cfg.route(&h, &p)) {
                Some(route) if self.cfg.routes[route].target == Target::App(AppKind::Demo) => {
                    self.serve_page(slot, route)
                }
                _ => self.respond(slot, r),
            },
            Ok(Some(up)) => {
                let route = self.cfg.route(&up.host, &up.path);
                let s = &mut self.sessions[slot];
                // Host and path only matter to the billing record.
                if self.access_log.is_some() {
                    let names = (
                        up.host.clone().into_boxed_str(),
                        up.path.clone().into_boxed_str(),
                    );
                    s.meta.names = Some(Box::new(names));
                }
                match route {
                    None => self.respond(
                        slot,
                        Reject {
                            status: Status::NotFound,
                            reason: "no route for this host and path",
                        },
                    ),
                    Some(r) if matches!(self.cfg.routes[r].target, Target::App(_)) => {
                        s.route = r as u16;
                        self.routes[r].opened += 1;
                        self.routes[r].active += 1;
                        self.start_app(slot, r, up);
                    }
                    Some(r) => {
                        s.route = r as u16;
                        self.routes[r].opened += 1;
                        self.routes[r].active += 1;
                        // Client bytes that came behind the head go to the origin with it.
                        let early = up.early as u64;
                        count_bytes(&mut self.counters, &mut self.routes, s, Dir::Up, early);
                        let hs = s.hs.as_mut().expect("handshake state");
                        hs.accept = up.accept;
                        hs.origin_head = Some(up.origin_head);
                        hs.buf = Vec::new();
                        self.connect_next(slot);
                    }
                }
            }
        }
    }

    fn connect_next(&mut self, slot: usize) {
        let cfg = self.cfg.clone();
        let now = self.now;
        let s = &mut self.sessions[slot];
        let Target::Pool(pool_idx) = cfg.routes[s.route as usize].target else {
            unreachable!("only pool routes connect to origins")
        };
        let pool = &cfg.pools[pool_idx];
        let ps = &mut self.pools[pool_idx];
        let hs = s.hs.as_mut().expect("handshake state");
        let Some(i) = ps.pick(pool, now, hs.tried) else {
            let r = if hs.tried.count() == 0 {
                Reject {
                    status: Status::ServiceUnavailable,
                    reason: "no healthy origin for this route",
                }
            } else {
                Reject {
                    status: Status::BadGateway,
                    reason: "origin refused the connection",
                }
            };
            self.respond(slot, r);
            return;
        };
        hs.tried.add(i);
        let addr = pool.origins[i];
        match sys::origin_socket(addr, ps.source(pool)) {
            Err(e) => {
                tracing::warn!(worker = self.id, %addr, "cannot open origin socket: {e}");
                self.respond(
                    slot,
                    Reject {
                        status: Status::ServiceUnavailable,
                        reason: "relay cannot open a connection to the origin",
                    },
                );
            }
            Ok(fd) => {
                ps.acquire(i);
                s.origin = fd;
                s.down.registered = false;
                s.origin_idx = i as u16;
                s.phase = Phase::Connecting;
                s.phase_since = now;
                s.inflight += 1;
                hs.connect_started = Some(std::time::Instant::now());
                let ud = self.tok(Op::Connect, slot);
                self.reactor.connect(fd, addr, ud);
                self.arm_timer(slot);
            }
        }
    }

    fn on_connect(&mut self, slot: usize, c: &Completion) {
        let now = self.now;
        let send_ud = self.tok(Op::OriginSend, slot);
        let s = &mut self.sessions[slot];
        if s.phase != Phase::Connecting {
            return;
        }
        if c.result == 0 {
            let hs = s.hs.as_mut().expect("handshake state");
            if let Some(t) = hs.connect_started.take() {
                let us = t.elapsed().as_micros() as u64;
                self.latencies.origin_connect.saturating_record(us.max(1));
            }
            if self.pool_tls_of(slot).is_some() {
                self.tls_origin_start(slot);
                return;
            }
            let s = &mut self.sessions[slot];
            let hs = s.hs.as_mut().expect("handshake state");
            let head = hs
                .origin_head
                .take()
                .expect("origin head waits for the connection");
            s.phase = Phase::OriginHead;
            s.phase_since = now;
            s.up.sending = true;
            s.inflight += 1;
            self.reactor.send_bytes(s.origin, head, 0, send_ud);
            self.arm_recv_once(slot, Dir::Down);
            self.arm_timer(slot);
            return;
        }
        // This origin failed: close its socket and try the next one.
        self.counters.origin_connect_failures += 1;
        let Target::Pool(pool_idx) = self.cfg.routes[s.route as usize].target else {
            unreachable!("only pool routes connect to origins")
        };
        let i = s.origin_idx as usize;
        sys::close(s.origin);
        s.origin = -1;
        s.origin_idx = u16::MAX;
        self.pools[pool_idx].release(i);
        let timed_out = s.hs.as_ref().is_some_and(|h| h.connect_timed_out);
        if timed_out {
            self.respond(
                slot,
                Reject {
                    status: Status::GatewayTimeout,
                    reason: "origin did not accept the connection in time",
                },
            );
            return;
        }
        let down = ticks(self.cfg.pools[pool_idx].down_time);
        self.pools[pool_idx].mark_down(i, now + down);
        tracing::debug!(
            worker = self.id,
            origin = %self.cfg.pools[pool_idx].origins[i],
            "origin connect failed: {}",
            std::io::Error::from_raw_os_error(-c.result)
        );
        self.connect_next(slot);
    }

    fn origin_head(&mut self, slot: usize, res: i32, bid: Option<u16>) {
        if res <= 0 {
            if let Some(b) = bid {
                self.reactor.recycle(b);
            }
            if res == -libc::ENOBUFS {
                self.starve(slot, Dir::Down);
            } else {
                self.respond(
                    slot,
                    Reject {
                        status: Status::BadGateway,
                        reason: "origin closed the connection without answering",
                    },
                );
            }
            return;
        }
        let bid = bid.expect("a receive with data carries a buffer");
        let n = res as usize;
        let max = self.cfg.limits.max_head_bytes as usize;
        let s = &mut self.sessions[slot];
        let hs = s.hs.as_mut().expect("handshake state");
        let data = self.reactor.buf(bid, n);
        let in_place = hs.buf.is_empty();
        let parsed = if in_place {
            http::parse_answer(data, max, &hs.accept)
        } else {
            hs.buf.extend_from_slice(data);
            http::parse_answer(&hs.buf, max, &hs.accept)
        };
        let head = match parsed {
            Ok(Some(h)) => h,
            Ok(None) => {
                if in_place {
                    hs.buf.extend_from_slice(data);
                }
                self.reactor.recycle(bid);
                self.arm_recv_once(slot, Dir::Down);
                return;
            }
            Err(r) => {
                self.reactor.recycle(bid);
                self.respond(slot, r);
                return;
            }
        };
        // Bytes to forward: the head, plus whatever followed it (a first frame, or body).
        let total = if in_place { n } else { hs.buf.len() };
        let send_len = self.origin_answered(slot, &head, total);
        let s = &mut self.sessions[slot];
        let hs = s.hs.as_mut().expect("handshake state");
        let owned = (!in_place).then(|| {
            let mut bytes = std::mem::take(&mut hs.buf);
            bytes.truncate(send_len);
            bytes
        });
        let client_send = Token::new(Op::ClientSend, slot as u32, s.gen).encode();
        if in_place {
            // Zero copy: the 101 (and any frame behind it) goes out of the ring buffer.
            s.down.queue.push(Chunk {
                bid,
                off: 0,
                len: send_len as u16,
            });
            self.start_send(slot, Dir::Down);
        } else if let Some(bytes) = owned {
            self.reactor.recycle(bid);
            s.down.sending = true;
            s.inflight += 1;
            self.reactor.send_bytes(s.client, bytes, 0, client_send);
        }
        let s = &mut self.sessions[slot];
        if s.phase == Phase::Relay {
            s.hs = None;
            let spliced = self.data_path == DataPath::Splice;
            s.up.spliced = spliced;
            s.down.spliced = spliced;
            self.await_bytes(slot, Dir::Up);
            self.await_bytes(slot, Dir::Down);
        } else if !s.down.eof {
            self.arm_recv_multi(slot, Dir::Down);
        }
        self.arm_timer(slot);
    }

    /// The origin answered: moves the session to Relay (101) or Passthrough (any other
    /// status), counts, and returns how many of the `total` bytes received so far go to the
    /// client.
    fn origin_answered(&mut self, slot: usize, head: &http::AnswerHead, total: usize) -> usize {
        let s = &mut self.sessions[slot];
        let hs = s.hs.as_mut().expect("handshake state");
        let mut send_len = total;
        match head.answer {
            Answer::Switching => {
                self.counters.upgraded += 1;
                s.phase = Phase::Relay;
                s.meta.status = 101;
                let us = s.meta.accepted.elapsed().as_micros() as u64;
                self.latencies.handshake.saturating_record(us.max(1));
            }
            Answer::Other { body_len, status } => {
                s.meta.status = status;
                let body = (total - head.head_len) as u64;
                if let Some(len) = body_len {
                    send_len = head.head_len + body.min(len) as usize;
                }
                let remaining = body_len.map(|l| l.saturating_sub(body));
                hs.remaining = remaining;
                s.phase = Phase::Passthrough;
                if remaining == Some(0) {
                    s.down.eof = true;
                }
            }
        }
        s.phase_since = self.now;
        s.last_active = self.now;
        let body = (send_len - head.head_len) as u64;
        count_bytes(&mut self.counters, &mut self.routes, s, Dir::Down, body);
        send_len
    }

    fn flow_recv(&mut self, slot: usize, dir: Dir, res: i32, bid: Option<u16>, more: bool) {
        let now = self.now;
        let s = &mut self.sessions[slot];
        if res > 0 {
            let bid = bid.expect("a receive with data carries a buffer");
            let mut n = res as u64;
            if s.phase == Phase::Passthrough {
                let hs = s.hs.as_mut().expect("passthrough keeps its state");
                if let Some(r) = hs.remaining {
                    n = n.min(r);
                    hs.remaining = Some(r - n);
                    if r == n {
                        s.down.eof = true;
                    }
                }
            }
            if self.data_path == DataPath::Auto && s.phase == Phase::Relay {
                let f = s.flow_mut(dir);
                if res as u32 == self.cfg.buffers.size {
                    f.full_reads = f.full_reads.saturating_add(1);
                } else {
                    f.full_reads = 0;
                }
                if f.full_reads >= AUTO_BULK_READS && !f.spliced {
                    // Bulk data: finish what is queued by copy, then move by splice.
                    f.spliced = true;
                }
            }
            if n == 0 {
                self.reactor.recycle(bid);
            } else {
                s.last_active = now;
                count_bytes(&mut self.counters, &mut self.routes, s, dir, n);
                let f = s.flow_mut(dir);
                f.queue.push(Chunk {
                    bid,
                    off: 0,
                    len: n as u16,
                });
                if !f.sending {
                    self.start_send(slot, dir);
                }
            }
            let f = self.sessions[slot].flow(dir);
            let queued = f.queue.len();
            let spliced = f.spliced;
            self.pace_recv(
                slot,
                dir,
                queued >= HIGH_WATER || spliced,
                queued < HIGH_WATER,
                more,
            );
            let s = &self.sessions[slot];
            if s.phase == Phase::Passthrough
                && s.down.eof
                && !s.down.sending
                && s.down.queue.is_empty()
            {
                self.finish_passthrough(slot);
            }
        } else if res == 0 {
            if s.first_end.is_none() {
                s.first_end = Some(dir);
            }
            let f = s.flow_mut(dir);
            f.eof = true;
            if s.phase == Phase::Passthrough {
                if !s.down.sending && s.down.queue.is_empty() {
                    self.finish_passthrough(slot);
                }
                return;
            }
            self.pass_eof(slot, dir);
        } else {
            match -res {
                libc::ENOBUFS => {
                    if !more {
                        self.starve(slot, dir);
                    }
                }
                libc::ECANCELED => {
                    if s.flow(dir).queue.len() < HIGH_WATER / 2 {
                        self.start_reading(slot, dir);
                    }
                }
                _ => {
                    let cause = dir.src_failed();
                    self.abort(slot, cause);
                }
            }
        }
    }

    /// After a receive on a flow: with `pause`, cancel the armed receive (backpressure: the
    /// destination is slower than the source; the kernel's receive window then pushes back
    /// on the sender); else, with `resume`, read again once a single-shot or ended multishot
    /// receive is done.
    fn pace_recv(&mut self, slot: usize, dir: Dir, pause: bool, resume: bool, more: bool) {
        let target = self.tok(dir.recv_op(), slot);
        let cancel = self.tok(Op::Cancel, slot);
        let s = &mut self.sessions[slot];
        let f = s.flow_mut(dir);
        if f.recv == RecvState::Armed && pause {
            f.recv = RecvState::Cancelling;
            s.inflight += 1;
            self.reactor.cancel_op(target, cancel);
        } else if !more && resume {
            self.start_reading(slot, dir);
        }
    }

    /// Forwards the end of a direction once its bytes are all sent; closes the session when
    /// both directions have ended.
    fn pass_eof(&mut self, slot: usize, dir: Dir) {
        let s = &mut self.sessions[slot];
        let dst = s.dst(dir);
        let pending = s.tls.as_mut().is_some_and(|t| !t.pend(dir).is_empty());
        let f = s.flow_mut(dir);
        if f.eof && !f.shut && f.quiet() && !pending {
            sys::shutdown_write(dst);
            f.shut = true;
        }
        if s.up.finished() && s.down.finished() {
            // Both sides said goodbye; the first one to do so is the cause.
            let cause = match s.first_end {
                Some(Dir::Down) => CloseCause::OriginClosed,
                _ => CloseCause::ClientClosed,
            };
            self.begin_close(slot, cause);
        } else {
            // Half-closed: the shorter half-closed timeout applies from now on.
            self.arm_timer(slot);
        }
    }

    fn start_send(&mut self, slot: usize, dir: Dir) {
        let ud = self.tok(dir.send_op(), slot);
        let s = &mut self.sessions[slot];
        let dst = s.dst(dir);
        let f = s.flow_mut(dir);
        match f.queue.len() {
            0 => {}
            1 => {
                let ch = f.queue.front_mut().expect("one chunk");
                let (bid, off, len) = (ch.bid, ch.off as usize, ch.len as usize);
                f.sending = true;
                s.inflight += 1;
                self.reactor.send_buf(dst, bid, off, len, ud);
            }
            n => {
                // Several buffers wait: one gathered send carries them all.
                let mut ranges = [(0u16, 0usize, 0usize); MAX_IOV];
                let mut k = 0;
                for ch in f.queue.first(n.min(MAX_IOV)) {
                    ranges[k] = (ch.bid, ch.off as usize, ch.len as usize);
                    k += 1;
                }
                f.sending = true;
                s.inflight += 1;
                self.reactor.send_bufs(dst, &ranges[..k], ud);
            }
        }
    }

    fn on_sent(&mut self, slot: usize, dir: Dir, c: Completion) {
        let s = &mut self.sessions[slot];
        s.flow_mut(dir).sending = false;
        if s.tls.is_some() {
            self.tls_sent(slot, dir, c);
            return;
        }
        let phase = s.phase;
        if matches!(phase, Phase::App | Phase::AppClosing) {
            self.app_sent(slot, c);
            return;
        }
        // Once relay answers the client itself, the origin side is only being torn down.
        let refusing = matches!(phase, Phase::Responding | Phase::Lingering);
        if phase == Phase::Closing || (refusing && dir == Dir::Up) {
            return;
        }
        if c.result < 0 {
            if refusing {
                self.begin_close(slot, CloseCause::Refused);
            } else {
                let cause = dir.dst_failed();
                self.abort(slot, cause);
            }
            return;
        }
        let n = c.result as usize;
        if let Some(mut bytes) = c.bytes {
            if n < bytes.len() {
                // Short write: send the rest.
                bytes.drain(..n);
                let ud = self.tok(dir.send_op(), slot);
                let s = &mut self.sessions[slot];
                s.flow_mut(dir).sending = true;
                s.inflight += 1;
                self.reactor.send_bytes(s.dst(dir), bytes, 0, ud);
                return;
            }
            if phase == Phase::Responding {
                self.start_lingering(slot);
                return;
            }
        } else {
            // A ring send (single or gathered): retire what went out, oldest chunk first.
            let f = s.flow_mut(dir);
            let mut left = n;
            while left > 0 {
                let ch = f
                    .queue
                    .front_mut()
                    .expect("sent bytes come from queued chunks");
                let take = left.min(ch.len as usize);
                ch.off += take as u16;
                ch.len -= take as u16;
                left -= take;
                if ch.len == 0 {
                    let done = f.queue.pop().expect("front exists");
                    self.reactor.recycle(done.bid);
                }
            }
        }
        let s = &mut self.sessions[slot];
        let f = s.flow(dir);
        if !f.queue.is_empty() {
            self.start_send(slot, dir);
        } else if f.eof {
            if phase == Phase::Passthrough {
                self.finish_passthrough(slot);
                return;
            }
            self.pass_eof(slot, dir);
            return;
        }
        // Backpressure released: read the source again.
        let reading = phase == Phase::Relay || (phase == Phase::Passthrough && dir == Dir::Down);
        if reading && self.sessions[slot].flow(dir).queue.len() < HIGH_WATER / 2 {
            self.start_reading(slot, dir);
        }
    }

    fn finish_passthrough(&mut self, slot: usize) {
        let s = &mut self.sessions[slot];
        if s.down.recv == RecvState::Armed {
            let target = Token::new(Op::OriginRecv, slot as u32, s.gen).encode();
            let ud = Token::new(Op::Cancel, slot as u32, s.gen).encode();
            s.down.recv = RecvState::Cancelling;
            s.inflight += 1;
            self.reactor.cancel_op(target, ud);
        }
        // A TLS client hears close_notify first; its send completion comes back here.
        if self.tls_flush_close(slot, Dir::Down) {
            return;
        }
        self.start_lingering(slot);
    }

    // ---- refusals and closing ------------------------------------------------------------

    /// Answers the client with relay's own error status, then lingers and closes.
    fn respond(&mut self, slot: usize, r: Reject) {
        self.counters.refused[r.status.index()] += 1;
        let route = self.sessions[slot].route;
        if route != NO_ROUTE {
            self.routes[route as usize].refused[r.status.index()] += 1;
        }
        self.sessions[slot].meta.status = r.status.code();
        tracing::debug!(
            worker = self.id,
            status = r.status.code(),
            reason = r.reason,
            "refused"
        );
        let ud = self.tok(Op::ClientSend, slot);
        let now = self.now;
        let s = &mut self.sessions[slot];
        if s.origin >= 0 {
            // Whatever the origin still has in flight ends with this.
            let cancel = Token::new(Op::Cancel, slot as u32, s.gen).encode();
            s.inflight += 1;
            self.reactor.cancel_fd(s.origin, cancel);
        }
        s.phase = Phase::Responding;
        s.phase_since = now;
        if self.client_tls(slot) {
            self.tls_answer(slot, &http::error_response(r));
            self.arm_timer(slot);
            return;
        }
        let s = &mut self.sessions[slot];
        s.down.sending = true;
        s.inflight += 1;
        self.reactor
            .send_bytes(s.client, http::error_response(r), 0, ud);
        self.arm_timer(slot);
    }

    fn start_lingering(&mut self, slot: usize) {
        let s = &mut self.sessions[slot];
        sys::shutdown_write(s.client);
        s.phase = Phase::Lingering;
        s.phase_since = self.now;
        let idle = s.up.recv == RecvState::Idle;
        if idle {
            self.arm_recv_multi(slot, Dir::Up);
        }
        self.arm_timer(slot);
    }

    /// Ends a session because one side failed: the other side is reset too.
    fn abort(&mut self, slot: usize, cause: CloseCause) {
        let s = &self.sessions[slot];
        match cause {
            CloseCause::ClientReset if s.origin >= 0 => sys::set_linger_zero(s.origin),
            CloseCause::OriginReset => sys::set_linger_zero(s.client),
            _ => {}
        }
        self.begin_close(slot, cause);
    }

    fn begin_close(&mut self, slot: usize, cause: CloseCause) {
        let s = &mut self.sessions[slot];
        if s.phase == Phase::Closing {
            return;
        }
        let was_relaying = matches!(s.phase, Phase::Relay);
        s.phase = Phase::Closing;
        s.meta.cause = Some(cause);
        self.counters.closed[cause.index()] += 1;
        let route = (s.route != NO_ROUTE).then(|| &mut self.routes[s.route as usize]);
        let ms = if was_relaying {
            s.meta.accepted.elapsed().as_millis() as u64
        } else {
            0
        };
        self.counters.connection_ms += ms;
        if let Some(r) = route {
            r.closed[cause.index()] += 1;
            r.connection_ms += ms;
        }
        if s.inflight > 0 {
            let ud = Token::new(Op::Cancel, slot as u32, s.gen).encode();
            for fd in [s.client, s.origin] {
                if fd >= 0 {
                    s.inflight += 1;
                    self.reactor.cancel_fd(fd, ud);
                }
            }
        }
    }

    fn maybe_free(&mut self, slot: usize) {
        if let Some(s) = self.sessions.get(slot) {
            if s.phase == Phase::Closing && s.inflight == 0 {
                self.free(slot);
            }
        }
    }

    /// Frees a slot: closes its descriptors and recycles every buffer it still holds.
    fn free(&mut self, slot: usize) {
        let mut s = self.sessions.remove(slot);
        if let Some(app) = s.app.take() {
            if let Some((room, idx)) = &app.room {
                let moved = self.rooms.leave(room, *idx);
                self.room_event(room.clone(), "leave");
                if let Some(moved) = moved {
                    if let Some(m) = self.sessions.get_mut(moved.slot as usize) {
                        if let Some(a) = m.app.as_mut() {
                            if let Some(r) = a.room.as_mut() {
                                r.1 = *idx;
                            }
                        }
                    }
                }
            }
            app_impl(app.kind).on_close();
        }
        tracing::trace!(
            worker = self.id,
            slot,
            client = s.client,
            origin = s.origin,
            "session freed"
        );
        sys::close(s.client);
        if s.origin >= 0 {
            sys::close(s.origin);
        }
        for f in [&mut s.up, &mut s.down] {
            if f.recv == RecvState::Parked {
                // Closing the socket took it out of the epoll set.
                self.counters.parked -= 1;
            }
            while let Some(ch) = f.queue.pop() {
                self.reactor.recycle(ch.bid);
            }
            if f.pipe.0 >= 0 {
                // It may still hold bytes: never lend it again.
                sys::close(f.pipe.0);
                sys::close(f.pipe.1);
            }
        }
        let mut origin = String::new();
        if s.origin_idx != u16::MAX {
            let Target::Pool(pool) = self.cfg.routes[s.route as usize].target else {
                unreachable!("an origin index implies a pool route")
            };
            self.pools[pool].release(s.origin_idx as usize);
            origin = self.cfg.pools[pool].origins[s.origin_idx as usize].to_string();
        }
        let route = if s.route != NO_ROUTE {
            self.routes[s.route as usize].active -= 1;
            self.cfg.routes[s.route as usize].name.clone()
        } else {
            String::new()
        };
        if self.access_log.is_some() {
            let m = s.meta;
            let (host, path) = m.names.map(|n| *n).unwrap_or_default();
            let end = std::time::SystemTime::now();
            let lived = m.accepted.elapsed();
            self.records.push(Record {
                start: access_log::rfc3339(end - lived),
                end: access_log::rfc3339(end),
                duration_ms: lived.as_millis() as u64,
                client: s.peer.to_string(),
                host: host.into(),
                path: path.into(),
                route,
                origin,
                status: m.status,
                bytes_client_to_origin: s.bytes_up,
                bytes_origin_to_client: s.bytes_down,
                cause: m.cause.unwrap_or(CloseCause::Drain).label(),
                worker: self.id,
            });
        }
    }

    // ---- reading and the splice path -----------------------------------------------------

    /// Reads the source of a relayed flow again, by receive or (spliced flow) by readiness
    /// poll, unless it ended or a read is already pending.
    fn start_reading(&mut self, slot: usize, dir: Dir) {
        let f = self.sessions[slot].flow(dir);
        if f.eof || f.recv != RecvState::Idle {
            return;
        }
        if !f.spliced {
            self.arm_recv_multi(slot, dir);
        } else if f.quiet() {
            self.arm_poll(slot, dir, SpliceStage::PollIn);
        }
    }

    // ---- parking idle sockets (see reactor/park.rs) ----------------------------------------

    /// When a session's silent sockets park, if any can.
    fn park_at(&self, s: &Session) -> Option<u32> {
        let t = self.t_park?;
        let can =
            matches!(s.phase, Phase::Relay | Phase::App) && (s.up.parkable() || s.down.parkable());
        can.then_some(s.last_active + t)
    }

    /// The first read of a flow just upgraded: parked until its socket is readable when
    /// parking is on (the peer may stay silent for hours, and a receive armed meanwhile
    /// costs kernel memory; the ring's request cache also keeps the peak number of requests
    /// ever armed), else an armed receive.
    fn await_bytes(&mut self, slot: usize, dir: Dir) {
        let f = self.sessions[slot].flow(dir);
        if self.t_park.is_some() && f.recv == RecvState::Idle && !f.spliced && !f.eof {
            self.park(slot, dir);
        } else {
            self.start_reading(slot, dir);
        }
    }

    /// Cancels the armed receives of a silent session; each flow parks when its receive's
    /// final completion arrives (`on_recv`), unless bytes came first.
    fn park_idle(&mut self, slot: usize) {
        let cancel = self.tok(Op::Cancel, slot);
        for dir in [Dir::Up, Dir::Down] {
            let target = self.tok(dir.recv_op(), slot);
            let s = &mut self.sessions[slot];
            let f = s.flow_mut(dir);
            if f.parkable() {
                f.park = true;
                f.recv = RecvState::Cancelling;
                s.inflight += 1;
                self.reactor.cancel_op(target, cancel);
            }
        }
    }

    /// A flow's receive ended for parking: its socket waits in the epoll set.
    fn park(&mut self, slot: usize, dir: Dir) {
        let token = self.tok(dir.recv_op(), slot);
        let s = &mut self.sessions[slot];
        let registered = s.flow(dir).registered;
        match self.parking.park(s.src(dir), token, registered) {
            Ok(()) => {
                let f = s.flow_mut(dir);
                f.recv = RecvState::Parked;
                f.registered = true;
                self.counters.parked += 1;
                self.counters.parks += 1;
            }
            Err(e) => {
                // ENOMEM, or fs.epoll.max_user_watches reached: keep the receive instead.
                self.park_failures += 1;
                if self.park_failures.is_power_of_two() {
                    tracing::warn!(
                        worker = self.id,
                        failures = self.park_failures,
                        "cannot park an idle socket in epoll ({e}); its receive stays armed \
                         (raise fs.epoll.max_user_watches)"
                    );
                }
                self.start_reading(slot, dir);
            }
        }
    }

    fn arm_parked_poll(&mut self) {
        let ud = Token::new(Op::Wake, WAKE_PARKED, 0).encode();
        self.reactor
            .poll_multi(self.parking.fd(), libc::POLLIN as u32, ud);
    }

    /// Parked sockets became readable (bytes, FIN or an error): take them out of the set and
    /// arm their receives again.
    fn on_parked_ready(&mut self, c: &Completion) {
        if !c.more() && c.result != -libc::ECANCELED {
            self.arm_parked_poll();
        }
        let mut woken = std::mem::take(&mut self.woken);
        self.parking.ready(&mut woken);
        for ud in woken.drain(..) {
            let Some(tok) = Token::decode(ud) else {
                continue;
            };
            let dir = match tok.op {
                Op::ClientRecv => Dir::Up,
                Op::OriginRecv => Dir::Down,
                _ => continue,
            };
            let slot = tok.slot as usize;
            let now = self.now;
            let Some(s) = self.sessions.get_mut(slot) else {
                continue;
            };
            if s.gen != tok.gen || s.flow(dir).recv != RecvState::Parked {
                continue;
            }
            // The one-shot event disabled the registration; it stays for the next park.
            s.flow_mut(dir).recv = RecvState::Idle;
            s.last_active = now;
            self.counters.parked -= 1;
            self.start_reading(slot, dir);
            self.arm_timer(slot);
        }
        self.woken = woken;
    }

    fn arm_poll(&mut self, slot: usize, dir: Dir, stage: SpliceStage) {
        let ud = self.tok(dir.poll_op(), slot);
        let s = &mut self.sessions[slot];
        let (fd, events) = match stage {
            SpliceStage::PollIn => (s.src(dir), libc::POLLIN as u32),
            _ => (s.dst(dir), libc::POLLOUT as u32),
        };
        s.flow_mut(dir).splice = stage;
        s.inflight += 1;
        self.reactor.poll(fd, events, ud);
    }

    fn splice_op(&mut self, slot: usize, dir: Dir, fd_in: RawFd, fd_out: RawFd, len: u32) {
        let ud = self.tok(dir.splice_op(), slot);
        self.sessions[slot].inflight += 1;
        self.counters.splices += 1;
        self.reactor.splice(fd_in, fd_out, len, ud);
    }

    fn lend_pipe(&mut self) -> std::io::Result<(RawFd, RawFd)> {
        self.pipes_lent_this_tick = true;
        match self.pipes.pop() {
            Some(p) => Ok(p),
            None => sys::pipe(SPLICE_LEN as usize),
        }
    }

    fn return_pipe(&mut self, slot: usize, dir: Dir) {
        let f = self.sessions[slot].flow_mut(dir);
        let p = std::mem::replace(&mut f.pipe, (-1, -1));
        if p.0 < 0 {
            return;
        }
        if f.in_pipe == 0 && self.pipes.len() < PIPE_POOL_MAX {
            self.pipes.push(p);
        } else {
            sys::close(p.0);
            sys::close(p.1);
        }
    }

    fn on_poll(&mut self, slot: usize, dir: Dir, c: &Completion) {
        let s = &mut self.sessions[slot];
        let stage = s.flow(dir).splice;
        s.flow_mut(dir).splice = SpliceStage::Idle;
        if s.phase != Phase::Relay {
            return;
        }
        if c.result < 0 {
            if c.result != -libc::ECANCELED {
                let cause = dir.src_failed();
                self.abort(slot, cause);
            }
            return;
        }
        match stage {
            SpliceStage::PollIn => {
                let pipe = match self.lend_pipe() {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(worker = self.id, "cannot create a pipe for splice: {e}");
                        self.abort(slot, CloseCause::ClientReset);
                        return;
                    }
                };
                let s = &mut self.sessions[slot];
                let src = s.src(dir);
                let f = s.flow_mut(dir);
                f.pipe = pipe;
                f.splice = SpliceStage::In;
                self.splice_op(slot, dir, src, pipe.1, SPLICE_LEN);
            }
            SpliceStage::PollOut => {
                let s = &mut self.sessions[slot];
                let dst = s.dst(dir);
                let f = s.flow_mut(dir);
                f.splice = SpliceStage::Out;
                let (r, len) = (f.pipe.0, f.in_pipe);
                self.splice_op(slot, dir, r, dst, len);
            }
            _ => {}
        }
    }

    fn on_splice(&mut self, slot: usize, dir: Dir, c: &Completion) {
        let now = self.now;
        let s = &mut self.sessions[slot];
        let stage = s.flow(dir).splice;
        if s.phase != Phase::Relay {
            s.flow_mut(dir).splice = SpliceStage::Idle;
            return;
        }
        let res = c.result;
        let cause = dir.src_failed();
        match stage {
            SpliceStage::In if res > 0 => {
                let n = res as u32;
                s.last_active = now;
                count_bytes(&mut self.counters, &mut self.routes, s, dir, n as u64);
                let dst = s.dst(dir);
                let f = s.flow_mut(dir);
                f.in_pipe = n;
                f.splice = SpliceStage::Out;
                let r = f.pipe.0;
                self.splice_op(slot, dir, r, dst, n);
            }
            SpliceStage::In if res == 0 || res == -libc::EAGAIN => {
                s.flow_mut(dir).splice = SpliceStage::Idle;
                self.return_pipe(slot, dir);
                if res == 0 {
                    let s = &mut self.sessions[slot];
                    if s.first_end.is_none() {
                        s.first_end = Some(dir);
                    }
                    s.flow_mut(dir).eof = true;
                    self.pass_eof(slot, dir);
                } else {
                    self.start_reading(slot, dir);
                }
            }
            SpliceStage::Out if res > 0 => {
                let f = s.flow_mut(dir);
                f.in_pipe -= (res as u32).min(f.in_pipe);
                if f.in_pipe > 0 {
                    let (r, left) = (f.pipe.0, f.in_pipe);
                    let dst = s.dst(dir);
                    self.splice_op(slot, dir, r, dst, left);
                } else {
                    f.splice = SpliceStage::Idle;
                    self.return_pipe(slot, dir);
                    self.start_reading(slot, dir);
                }
            }
            SpliceStage::Out if res == -libc::EAGAIN => {
                // The destination is full: wait until it can take more (backpressure).
                self.arm_poll(slot, dir, SpliceStage::PollOut);
            }
            _ => {
                s.flow_mut(dir).splice = SpliceStage::Idle;
                if res != -libc::ECANCELED {
                    self.abort(slot, cause);
                }
            }
        }
    }

    // ---- edge apps ---------------------------------------------------------------------------

    /// Answers the upgrade itself and starts the app (the route targets an app).
    fn start_app(&mut self, slot: usize, route: usize, up: http::Upgrade) {
        let Target::App(kind) = self.cfg.routes[route].target else {
            unreachable!("called for app routes")
        };
        let room = match kind {
            AppKind::Demo => {
                return self.respond(
                    slot,
                    Reject {
                        status: Status::NotFound,
                        reason: "this path serves a page, not a WebSocket endpoint",
                    },
                )
            }
            AppKind::Rooms => {
                let name = apps::room_name(&up.path, &self.cfg.routes[route].path);
                if name.is_empty() || name.len() > 128 {
                    return self.respond(
                        slot,
                        Reject {
                            status: Status::NotFound,
                            reason: "a room path needs a room name (at most 128 bytes)",
                        },
                    );
                }
                Some(name.to_string())
            }
            AppKind::Echo => None,
        };
        self.counters.upgraded += 1;
        let gen = self.sessions[slot].gen;
        let joined = room.map(|r| {
            self.rooms.join(
                &r,
                Member {
                    slot: slot as u32,
                    gen,
                },
            )
        });
        let s = &mut self.sessions[slot];
        s.hs = None;
        s.meta.status = 101;
        let us = s.meta.accepted.elapsed().as_micros() as u64;
        self.latencies.handshake.saturating_record(us.max(1));
        s.phase = Phase::App;
        s.phase_since = self.now;
        s.last_active = self.now;
        let mut out = std::collections::VecDeque::new();
        out.push_back(Frame::Head(http::switching_response(&up.accept)));
        s.app = Some(Box::new(AppConn {
            kind,
            decoder: Decoder::new(DecoderConfig {
                max_message_size: self.cfg.apps.max_message_size,
                ..DecoderConfig::default()
            }),
            out,
            shared_off: 0,
            room: joined.clone(),
            events: apps::wants_events(&up.path),
            close_sent: false,
            ping_out: false,
        }));
        if let Some((room, _)) = joined {
            self.room_event(room, "join");
        }
        // Frames that came right behind the request head.
        let early = &up.origin_head[up.origin_head.len() - up.early..];
        if !early.is_empty() {
            let app = self.sessions[slot].app.as_mut().expect("app just set");
            let decoded = decode_app(app, early);
            self.app_input(slot, decoded);
        }
        self.app_kick(slot);
        self.await_bytes(slot, Dir::Up);
        self.arm_timer(slot);
    }

    /// A plain GET on a `demo` route: the demo page, then close.
    fn serve_page(&mut self, slot: usize, route: usize) {
        let s = &mut self.sessions[slot];
        s.route = route as u16;
        s.meta.status = 200;
        self.routes[route].opened += 1;
        self.routes[route].active += 1;
        let ud = Token::new(Op::ClientSend, slot as u32, s.gen).encode();
        s.phase = Phase::Responding;
        s.phase_since = self.now;
        let page = http::page_response("text/html; charset=utf-8", apps::DEMO_PAGE.as_bytes());
        if self.client_tls(slot) {
            self.tls_answer(slot, &page);
            self.arm_timer(slot);
            return;
        }
        let s = &mut self.sessions[slot];
        s.down.sending = true;
        s.inflight += 1;
        self.reactor.send_bytes(s.client, page, 0, ud);
        self.arm_timer(slot);
    }

    fn app_recv(&mut self, slot: usize, res: i32, bid: Option<u16>, more: bool) {
        if res <= 0 {
            if let Some(b) = bid {
                self.reactor.recycle(b);
            }
            match -res {
                libc::ENOBUFS if !more => self.starve(slot, Dir::Up),
                libc::ENOBUFS | libc::ECANCELED => {}
                0 => self.begin_close(slot, CloseCause::ClientClosed),
                _ => self.abort(slot, CloseCause::ClientReset),
            }
            return;
        }
        let bid = bid.expect("a receive with data carries a buffer");
        let n = res as usize;
        if self.client_tls(slot) {
            self.tls_app_recv(slot, n, bid, more);
            return;
        }
        let s = &mut self.sessions[slot];
        s.last_active = self.now;
        count_bytes(&mut self.counters, &mut self.routes, s, Dir::Up, n as u64);
        // Decode straight from the ring buffer (the decoder copies only what it keeps), then
        // give the buffer back before acting on the events.
        let decoded = match self.sessions[slot].app.as_mut() {
            Some(app) => decode_app(app, self.reactor.buf(bid, n)),
            None => (Vec::new(), Ok(())),
        };
        self.reactor.recycle(bid);
        self.app_input(slot, decoded);
        self.app_kick(slot);
        let rearm = self
            .sessions
            .get(slot)
            .is_some_and(|s| s.up.recv == RecvState::Idle && s.phase != Phase::Closing);
        if !more && rearm {
            self.arm_recv_multi(slot, Dir::Up);
        }
    }

    /// Feeds client bytes to the session's decoder and acts on what it finds.
    /// Acts on what the decoder found in a client's bytes (see [`decode_app`]).
    fn app_input(&mut self, slot: usize, decoded: Decoded) {
        let (events, result) = decoded;
        let Some(kind) = self.sessions[slot].app.as_ref().map(|a| a.kind) else {
            return;
        };
        for ev in events {
            match ev {
                In::Message(k, payload) => {
                    self.counters.app_messages_in += 1;
                    let mut r = Replies::default();
                    app_impl(kind).on_message(k, payload, &mut r);
                    for (k, p) in r.to_sender {
                        let mut f = Vec::with_capacity(p.len() + 10);
                        crate::proto::ws::write_message(&mut f, k, &p);
                        self.app_push(slot, Frame::Owned(f));
                    }
                    for (k, p) in r.to_room {
                        self.room_send(slot, k, &p);
                    }
                }
                In::Ping(pong) => self.app_push(slot, Frame::Owned(pong.as_bytes().to_vec())),
                In::Pong => {
                    if let Some(a) = self.sessions[slot].app.as_mut() {
                        a.ping_out = false;
                    }
                    self.arm_timer(slot);
                }
                In::Close(reply) => self.app_close_with(slot, reply),
            }
        }
        // A spent decoder keeps answering with its error; count and answer it once.
        let first = self.sessions[slot]
            .app
            .as_ref()
            .is_some_and(|a| !a.close_sent);
        if let (Err(e), true) = (result, first) {
            match e.close_code().as_u16() {
                1007 => self.counters.ws_close_1007 += 1,
                1009 => self.counters.ws_close_1009 += 1,
                _ => self.counters.ws_close_1002 += 1,
            }
            tracing::debug!(worker = self.id, "closing app client: {e}");
            self.app_close_with(slot, e.close_frame());
        }
    }

    /// Queues a frame for an app client (its own replies: no slow-member policy).
    fn app_push(&mut self, slot: usize, f: Frame) {
        if let Some(a) = self.sessions[slot].app.as_mut() {
            if !a.close_sent {
                a.out.push_back(f);
            }
        }
    }

    /// Sends a close frame (once), then waits for the client to close.
    fn app_close(&mut self, slot: usize, code: CloseCode, reason: &str) {
        self.app_close_with(slot, ControlFrame::close(code, reason));
        self.app_kick(slot);
    }

    fn app_close_with(&mut self, slot: usize, frame: ControlFrame) {
        let now = self.now;
        let s = &mut self.sessions[slot];
        let Some(a) = s.app.as_mut() else {
            return;
        };
        if !a.close_sent {
            a.close_sent = true;
            a.out.push_back(Frame::Owned(frame.as_bytes().to_vec()));
        }
        if s.phase == Phase::App {
            s.phase = Phase::AppClosing;
            s.phase_since = now;
            self.arm_timer(slot);
        }
    }

    /// Frames a member's message once and sends it to every other member of its room, on
    /// this worker and (through the hub) on the others.
    fn room_send(&mut self, slot: usize, kind: DataKind, payload: &[u8]) {
        let room = self.sessions[slot]
            .app
            .as_ref()
            .and_then(|a| a.room.as_ref().map(|r| r.0.clone()));
        let Some(room) = room else {
            return;
        };
        let mut f = Vec::with_capacity(payload.len() + 10);
        crate::proto::ws::write_message(&mut f, kind, payload);
        let frame: Arc<[u8]> = Arc::from(f);
        self.deliver_local(&room, &frame, Some(slot), false);
        self.hub.broadcast(
            RoomMsg {
                room,
                frame,
                events_only: false,
            },
            Some(self.id),
        );
    }

    /// Tells the members that asked for events (on every worker) that someone joined or
    /// left, with the room's member count (exact for this worker, as last published for the
    /// others: at most a tick old).
    fn room_event(&mut self, room: Arc<str>, kind: &str) {
        let members =
            self.rooms.members(&room).len() as u32 + self.hub.members_elsewhere(&room, self.id);
        let json = apps::event_json(kind, &room, members);
        let mut f = Vec::with_capacity(json.len() + 4);
        crate::proto::ws::write_message(&mut f, DataKind::Text, json.as_bytes());
        let frame: Arc<[u8]> = Arc::from(f);
        self.deliver_local(&room, &frame, None, true);
        self.hub.broadcast(
            RoomMsg {
                room,
                frame,
                events_only: true,
            },
            Some(self.id),
        );
    }

    /// Queues a room frame for every local member of `room` (but `skip`), applying the
    /// slow-member policy.
    fn deliver_local(&mut self, room: &str, frame: &Arc<[u8]>, skip: Option<usize>, events: bool) {
        let members: Vec<Member> = self.rooms.members(room).to_vec();
        let limit = self.cfg.apps.room_queue as usize;
        for m in members {
            let slot = m.slot as usize;
            if Some(slot) == skip {
                continue;
            }
            let Some(s) = self.sessions.get_mut(slot) else {
                continue;
            };
            if s.gen != m.gen || s.phase != Phase::App {
                continue;
            }
            let a = s.app.as_mut().expect("room member is an app session");
            if events && !a.events {
                continue;
            }
            if a.out.len() >= limit {
                match self.cfg.apps.slow_member {
                    SlowMember::Drop => {
                        self.counters.room_dropped += 1;
                        continue;
                    }
                    SlowMember::Close => {
                        self.counters.room_slow_closed += 1;
                        a.out.clear();
                        self.app_close(
                            slot,
                            CloseCode::POLICY_VIOLATION,
                            "too slow: room queue full",
                        );
                        continue;
                    }
                }
            }
            a.out.push_back(Frame::Shared(frame.clone()));
            self.app_kick(slot);
        }
    }

    fn arm_inbox(&mut self) {
        let ud = Token::new(Op::Wake, WAKE_INBOX, 0).encode();
        self.reactor
            .poll(self.hub.waker(self.id), libc::POLLIN as u32, ud);
    }

    /// Room messages from other workers (and from the publish API).
    fn on_inbox(&mut self) {
        sys::eventfd_drain(self.hub.waker(self.id));
        while let Ok(msg) = self.inbox.try_recv() {
            self.deliver_local(&msg.room, &msg.frame, None, msg.events_only);
        }
        if self.draining.is_none() || !self.sessions.is_empty() {
            self.arm_inbox();
        }
    }

    /// Starts the next send to an app client if none is in flight.
    fn app_kick(&mut self, slot: usize) {
        if self.client_tls(slot) {
            self.tls_app_kick(slot);
            return;
        }
        let ud = self.tok(Op::ClientSend, slot);
        let s = &mut self.sessions[slot];
        if s.down.sending || s.phase == Phase::Closing {
            return;
        }
        let Some(a) = s.app.as_mut() else {
            return;
        };
        let Some(f) = a.out.pop_front() else {
            if s.phase == Phase::AppClosing && a.close_sent {
                // Everything, the close frame last, is out: let the client close.
                sys::shutdown_write(s.client);
            }
            return;
        };
        s.down.sending = true;
        s.inflight += 1;
        match f {
            Frame::Head(v) => self.reactor.send_bytes(s.client, v, 0, ud),
            Frame::Owned(v) => {
                self.counters.app_frames_out += 1;
                self.reactor.send_bytes(s.client, v, 0, ud)
            }
            Frame::Shared(b) => {
                self.counters.app_frames_out += 1;
                a.shared_off = 0;
                self.reactor.send_shared(s.client, b, 0, ud);
            }
        }
    }

    fn app_sent(&mut self, slot: usize, c: Completion) {
        if c.result < 0 {
            self.abort(slot, CloseCause::ClientReset);
            return;
        }
        let n = c.result as usize;
        let ud = self.tok(Op::ClientSend, slot);
        let s = &mut self.sessions[slot];
        count_bytes(&mut self.counters, &mut self.routes, s, Dir::Down, n as u64);
        if let Some(mut v) = c.bytes {
            if n < v.len() {
                v.drain(..n);
                s.down.sending = true;
                s.inflight += 1;
                self.reactor.send_bytes(s.client, v, 0, ud);
                return;
            }
        } else if let Some(b) = c.shared {
            let a = s.app.as_mut().expect("app session");
            a.shared_off += n;
            if a.shared_off < b.len() {
                let off = a.shared_off;
                s.down.sending = true;
                s.inflight += 1;
                self.reactor.send_shared(s.client, b, off, ud);
                return;
            }
        }
        self.app_kick(slot);
    }

    /// The ping timer of an app connection fired: ping, or give up on a missing pong.
    fn app_timer(&mut self, slot: usize) {
        if self.t_ping.is_none() {
            self.begin_close(slot, CloseCause::IdleTimeout);
            return;
        }
        let s = &mut self.sessions[slot];
        let Some(a) = s.app.as_mut() else {
            return;
        };
        if a.ping_out {
            // No pong: the peer is gone. Close without a close frame (a client that is
            // still there sees 1006).
            self.counters.pong_timeouts += 1;
            self.abort(slot, CloseCause::IdleTimeout);
            return;
        }
        a.ping_out = true;
        s.phase_since = self.now;
        self.counters.pings_sent += 1;
        if let Some(p) = ControlFrame::ping(b"relay") {
            self.app_push(slot, Frame::Owned(p.as_bytes().to_vec()));
        }
        self.app_kick(slot);
        self.arm_timer(slot);
    }

    // ---- timers --------------------------------------------------------------------------

    /// The tick at which the session's timer must act: its phase's expiry, or parking its
    /// idle sockets if that comes first.
    fn deadline(&self, s: &Session) -> u32 {
        let at = self.expiry(s);
        self.park_at(s).map_or(at, |p| p.min(at))
    }

    /// When the session's current phase times out (`u32::MAX`: never).
    fn expiry(&self, s: &Session) -> u32 {
        match s.phase {
            Phase::ClientHead => s.phase_since + self.t_handshake,
            Phase::Connecting => s.phase_since + self.t_connect,
            Phase::OriginHead => s.phase_since + self.t_origin,
            Phase::Relay | Phase::Passthrough => {
                let t = if s.up.eof || s.down.eof {
                    self.t_half
                } else {
                    self.t_idle
                };
                s.last_active + t
            }
            Phase::Responding | Phase::Lingering | Phase::AppClosing => {
                s.phase_since + LINGER_TICKS
            }
            Phase::App => {
                let ping_out = s.app.as_ref().is_some_and(|a| a.ping_out);
                match (self.t_ping, ping_out) {
                    (Some(_), true) => s.phase_since + self.t_pong,
                    (Some(p), false) => s.last_active + p,
                    (None, _) => s.last_active + self.t_idle,
                }
            }
            Phase::Closing => u32::MAX,
        }
    }

    fn arm_timer(&mut self, slot: usize) {
        let s = &self.sessions[slot];
        let at = self.deadline(s);
        if at == u32::MAX {
            return;
        }
        let gen = s.gen;
        self.sessions[slot].timer_at = at;
        self.wheel.arm(slot as u32, gen, at);
    }

    fn on_timer(&mut self, e: TimerEntry) {
        let slot = e.slot as usize;
        let Some(s) = self.sessions.get(slot) else {
            return;
        };
        if s.gen != e.gen || s.timer_at != e.at {
            return;
        }
        let at = self.deadline(s);
        if at > self.now {
            if at != u32::MAX {
                self.sessions[slot].timer_at = at;
                self.wheel.arm(e.slot, e.gen, at);
            }
            return;
        }
        if self.park_at(s).is_some_and(|p| p <= self.now) {
            self.park_idle(slot);
            self.arm_timer(slot);
            return;
        }
        match s.phase {
            Phase::ClientHead if self.tls_handshaking(slot) => {
                // No TLS yet, so no HTTP answer either: just close.
                self.counters.tls_fail_timeout += 1;
                self.begin_close(slot, CloseCause::Refused);
            }
            Phase::ClientHead => self.respond(
                slot,
                Reject {
                    status: Status::RequestTimeout,
                    reason: "request head not complete before the handshake timeout",
                },
            ),
            Phase::Connecting => {
                let target = self.tok(Op::Connect, slot);
                let ud = self.tok(Op::Cancel, slot);
                let s = &mut self.sessions[slot];
                if let Some(hs) = s.hs.as_mut() {
                    hs.connect_timed_out = true;
                }
                s.inflight += 1;
                self.reactor.cancel_op(target, ud);
            }
            Phase::OriginHead => self.respond(
                slot,
                Reject {
                    status: Status::GatewayTimeout,
                    reason: "origin did not answer the upgrade in time",
                },
            ),
            Phase::Relay | Phase::Passthrough => self.begin_close(slot, CloseCause::IdleTimeout),
            Phase::Responding | Phase::Lingering => self.begin_close(slot, CloseCause::Refused),
            Phase::AppClosing => self.begin_close(slot, CloseCause::ClientClosed),
            Phase::App => self.app_timer(slot),
            Phase::Closing => {}
        }
        self.maybe_free(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_up_to_ticks() {
        assert_eq!(ticks(Duration::from_millis(1)), 1);
        assert_eq!(ticks(Duration::from_millis(100)), 1);
        assert_eq!(ticks(Duration::from_millis(101)), 2);
        assert_eq!(ticks(Duration::from_secs(10)), 100);
    }

    #[test]
    fn chunk_lengths_fit_buffers() {
        // Chunk offsets and lengths are u16: buffers are at most 32 KiB (config enforces).
        assert!(32768 <= u16::MAX as usize);
        let _ = super::super::Handshake::default();
    }
}
