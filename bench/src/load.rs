//! `load`: a mio-based WebSocket load generator with a hand-written minimal client.
//!
//! Each thread runs one event loop over a slab of compact connection records. A
//! connection owns no buffer while idle: reads go to a per-thread scratch buffer and
//! echoes are verified as they stream through the decoder; a boxed `Extra` exists only
//! while a handshake, an unsent write or a control-frame payload is in progress.
//!
//! With `--tls` every connection also owns a boxed rustls `ClientConnection`: TCP bytes go
//! through `read_tls` / `process_new_packets`, the plaintext is then read into the same
//! scratch buffer and handled exactly like a plaintext connection's bytes; output is
//! written into the connection's `writer()` and leaves through `write_tls`, so rustls's
//! own send buffer replaces `Extra::pend`. An idle TLS connection keeps rustls's state
//! (about 4 KiB of it is the receive buffer rustls keeps once it has read anything).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use rustls::{ClientConfig, ClientConnection, HandshakeKind};
use slab::Slab;

use crate::net::{self, Sources};
use crate::report::{self, Report, Rtt};
use crate::ws::{self, op, Decoder, Event, Flow};

const SCRATCH: usize = 256 * 1024;
const READS_PER_TURN: usize = 8;
/// Connection attempts started per loop turn at most (so events keep being served).
const CONNECTS_PER_TURN: u64 = 256;
/// Errors of one kind printed per thread before going quiet.
const LOG_LIMIT: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Hold,
    Throughput,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Hold => "hold",
            Mode::Throughput => "throughput",
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoadArgs {
    pub target: SocketAddr,
    pub target_str: String,
    pub host: String,
    pub path: String,
    pub mode: Mode,
    pub connections: u64,
    /// Connections per second during the ramp; 0 = as fast as `max_pending` allows.
    pub rate: f64,
    pub max_pending: u64,
    pub connect_timeout: Duration,
    pub sources: Sources,
    pub hold: Duration,
    pub trickle: Option<Duration>,
    pub size: usize,
    pub inflight: u32,
    pub duration: Duration,
    pub threads: usize,
    pub max_seconds: u64,
    /// wss: every connection does a TLS handshake first.
    pub tls: Option<TlsClient>,
}

/// The TLS side of a `load` run: one shared client config (and so one session store).
#[derive(Debug, Clone)]
pub struct TlsClient {
    pub config: Arc<ClientConfig>,
    pub name: rustls::pki_types::ServerName<'static>,
    pub opts: crate::tls::TlsOpts,
}

/// Counters shared by all threads (connection events) and per-thread flushes (messages).
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    go_ramp: AtomicBool,
    go_main: AtomicBool,
    inited: AtomicUsize,
    ramped: AtomicUsize,
    open: AtomicI64,
    open_peak: AtomicI64,
    opened: AtomicU64,
    attempted: AtomicU64,
    connect_failures: AtomicU64,
    handshake_failures: AtomicU64,
    errors: AtomicU64,
    verify_failures: AtomicU64,
    messages: AtomicU64,
    bytes: AtomicU64,
    tls_full: AtomicU64,
    tls_resumed: AtomicU64,
    tls_negotiated: std::sync::Mutex<Option<String>>,
}

impl Shared {
    fn opened_one(&self) {
        let now = self.open.fetch_add(1, Relaxed) + 1;
        self.open_peak.fetch_max(now, Relaxed);
        self.opened.fetch_add(1, Relaxed);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Handshaking,
    Open,
}

/// State that exists only while needed (boxed, so an idle connection carries 8 bytes).
#[derive(Default)]
struct Extra {
    /// Expected Sec-WebSocket-Accept, during the handshake.
    accept: Vec<u8>,
    /// Partial response head.
    head: Vec<u8>,
    /// Output the socket has not taken yet.
    pend: Vec<u8>,
    pend_pos: usize,
    /// Payload of a ping/close frame being received.
    ctl: Vec<u8>,
}

impl Extra {
    fn is_empty(&self) -> bool {
        self.accept.is_empty()
            && self.head.is_empty()
            && self.pend_pos == self.pend.len()
            && self.ctl.is_empty()
    }
}

struct Conn {
    stream: TcpStream,
    serial: u32,
    /// Global connection number: picks the source address and seeds payloads.
    uid: u32,
    phase: Phase,
    msg_bad: bool,
    /// Milliseconds since the thread epoch when the current phase began.
    since_ms: u32,
    dec: Decoder,
    send_seq: u64,
    recv_seq: u64,
    /// Bytes received so far of the current incoming message.
    msg_len: u64,
    /// Send times (ns since the thread epoch) of messages whose echo is outstanding.
    sent_at: VecDeque<u64>,
    extra: Option<Box<Extra>>,
    /// wss only: the TLS session (its send buffer holds what the socket has not taken).
    tls: Option<Box<ClientConnection>>,
}

impl Conn {
    fn pending(&self) -> usize {
        if let Some(t) = &self.tls {
            return usize::from(t.wants_write());
        }
        self.extra.as_ref().map_or(0, |e| e.pend.len() - e.pend_pos)
    }
    fn trim_extra(&mut self) {
        if self.extra.as_ref().is_some_and(|e| e.is_empty()) {
            self.extra = None;
        }
    }
}

/// Per-thread mutable context, kept apart from the slab so both can be borrowed at once.
struct Ctx {
    out: Vec<u8>,
    rng: fastrand::Rng,
    epoch: Instant,
    hist: Histogram<u64>,
    size: u64,
    messages: u64,
    bytes: u64,
    verify_failures: u64,
    verify_logged: u32,
}

impl Ctx {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
    fn now_ms(&self) -> u32 {
        self.epoch.elapsed().as_millis() as u32
    }

    /// Queues the connection's next message (masked binary frame of pattern bytes).
    fn push_message(&mut self, conn: &mut Conn) {
        let seed = ws::pattern_seed(conn.uid as u64, conn.send_seq);
        conn.send_seq += 1;
        let mask = self.rng.u32(..).to_ne_bytes();
        ws::encode_header(&mut self.out, true, op::BINARY, Some(mask), self.size);
        let start = self.out.len();
        ws::fill_pattern(&mut self.out, seed, self.size as usize);
        ws::apply_mask(&mut self.out[start..], mask, 0);
        let now = self.now_ns();
        conn.sent_at.push_back(now);
    }
}

#[derive(Debug, PartialEq, Eq)]
enum After {
    Keep,
    /// Drop the connection; it was open and ended unexpectedly (counts as an error).
    DropError,
}

struct ThreadResult {
    hist: Histogram<u64>,
    ramp_secs: f64,
    window_secs: f64,
}

struct Loader {
    a: Arc<LoadArgs>,
    sh: Arc<Shared>,
    tid: usize,
    nthreads: usize,
    poll: Poll,
    conns: Slab<Conn>,
    scratch: Vec<u8>,
    /// wss: TCP bytes read from a socket before rustls takes them (empty without --tls).
    tls_in: Vec<u8>,
    ctx: Ctx,
    quota: u64,
    attempted: u64,
    resolving: u64,
    max_pending: u64,
    /// Throughput mode, measuring: each echo triggers the next send.
    sending: bool,
    shutting_down: bool,
    timers: BinaryHeap<Reverse<(u64, u32, u32)>>,
    again: Vec<(usize, u32)>,
    serial: u32,
    logged_connect: u32,
    logged_handshake: u32,
    logged_error: u32,
    flushed: [u64; 3],
}

pub fn run(a: LoadArgs) -> Result<Report> {
    let limit = net::raise_nofile().unwrap_or(1024);
    let need = a.connections + 64;
    if need > limit {
        bail!(
            "--connections {} needs about {need} file descriptors but this process may hold {limit} \
             (RLIMIT_NOFILE); run several relay-bench processes with fewer connections each",
            a.connections
        );
    }
    if let Some(ports) = ephemeral_ports() {
        let addrs = a.sources.count().unwrap_or(1);
        if a.connections > ports.saturating_mul(addrs) {
            bail!(
                "--connections {} exceeds {ports} ephemeral ports x {addrs} source address(es); \
                 give a wider --source-range (e.g. 127.0.0.2-127.0.255.254) or more --sources",
                a.connections
            );
        }
    }
    let a = Arc::new(a);
    let sh = Arc::new(Shared::default());
    let nthreads = a.threads.max(1);
    let mut handles = Vec::new();
    for tid in 0..nthreads {
        let (a2, sh2) = (a.clone(), sh.clone());
        handles.push(
            std::thread::Builder::new()
                .name(format!("load-{tid}"))
                .spawn(move || -> Result<ThreadResult> {
                    let l = Loader::new(a2, sh2.clone(), tid, nthreads);
                    match l {
                        Ok(l) => l.run(),
                        Err(e) => {
                            sh2.inited.fetch_add(1, Relaxed);
                            sh2.ramped.fetch_add(1, Relaxed);
                            Err(e)
                        }
                    }
                })?,
        );
    }

    // SIGUSR1 ends the hold (or the throughput window, or the ramp) now: the connections are
    // closed and the report written as at the end of --hold.
    let usr1 = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, usr1.clone())?;
    let mut stopped_by_signal = false;

    let t0 = Instant::now();
    let cap = Duration::from_secs(a.max_seconds.max(1));
    let mut stopped_by_cap = false;
    while sh.inited.load(Relaxed) < nthreads && t0.elapsed() < cap {
        std::thread::sleep(Duration::from_millis(1));
    }
    let rss_start = net::self_rss_kib();
    let ramp_start = Instant::now();
    sh.go_ramp.store(true, Relaxed);

    let mut rss_open = None;
    let mut open_at_sample = 0i64;
    let mut main_phase_started = false;
    // (when the hold began, messages then); then the messages at its end.
    let mut hold_from = None::<(Instant, u64)>;
    let mut hold_msgs = None::<(u64, f64)>;
    let mut last_print = Instant::now();
    let (mut prev_opened, mut prev_msgs) = (0u64, 0u64);
    loop {
        std::thread::sleep(Duration::from_millis(20));
        if !main_phase_started && sh.ramped.load(Relaxed) >= nthreads {
            rss_open = net::self_rss_kib();
            open_at_sample = sh.open.load(Relaxed);
            sh.go_main.store(true, Relaxed);
            main_phase_started = true;
            if a.mode == Mode::Hold {
                // Markers a script can wait for to measure the hold alone (the proxy's CPU
                // without the upgrades and the closes).
                hold_from = Some((Instant::now(), sh.messages.load(Relaxed)));
                eprintln!("load: holding");
            }
        }
        if let (Some((from, m0)), None) = (hold_from, hold_msgs) {
            if from.elapsed() >= a.hold || sh.stop.load(Relaxed) {
                let secs = from.elapsed().as_secs_f64();
                hold_msgs = Some((sh.messages.load(Relaxed) - m0, secs));
                eprintln!("load: hold over");
            }
        }
        if handles.iter().all(|h| h.is_finished()) {
            break;
        }
        if !stopped_by_cap && t0.elapsed() >= cap {
            eprintln!("load: --max-seconds {} reached, stopping", a.max_seconds);
            sh.stop.store(true, Relaxed);
            stopped_by_cap = true;
        }
        if !stopped_by_signal && usr1.load(Relaxed) {
            eprintln!(
                "load: SIGUSR1, ending the {} now",
                if main_phase_started { "hold" } else { "ramp" }
            );
            sh.stop.store(true, Relaxed);
            stopped_by_signal = true;
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            let dt = last_print.elapsed().as_secs_f64();
            last_print = Instant::now();
            let opened = sh.opened.load(Relaxed);
            let msgs = sh.messages.load(Relaxed);
            let phase = if !main_phase_started {
                "ramp"
            } else if a.mode == Mode::Hold {
                "hold"
            } else {
                "run"
            };
            eprintln!(
                "[{:7.1}s] {phase:<4} open {}/{}  +{:.0}/s  attempted {}  connect_fail {}  hs_fail {}  errors {}  msgs {} ({:.0}/s)  verify_fail {}",
                ramp_start.elapsed().as_secs_f64(),
                sh.open.load(Relaxed),
                a.connections,
                (opened - prev_opened) as f64 / dt,
                sh.attempted.load(Relaxed),
                sh.connect_failures.load(Relaxed),
                sh.handshake_failures.load(Relaxed),
                sh.errors.load(Relaxed),
                msgs,
                (msgs - prev_msgs) as f64 / dt,
                sh.verify_failures.load(Relaxed),
            );
            prev_opened = opened;
            prev_msgs = msgs;
        }
    }
    let wall = ramp_start.elapsed().as_secs_f64();

    let mut hist = report::new_histogram();
    let (mut ramp_secs, mut window_secs) = (0f64, 0f64);
    for h in handles {
        match h.join() {
            Ok(Ok(r)) => {
                hist.add(&r.hist).ok();
                ramp_secs = ramp_secs.max(r.ramp_secs);
                window_secs = window_secs.max(r.window_secs);
            }
            Ok(Err(e)) => return Err(e.context("load thread failed")),
            Err(_) => bail!("load thread panicked"),
        }
    }

    let messages = sh.messages.load(Relaxed);
    let duration_s = match a.mode {
        Mode::Throughput => window_secs,
        Mode::Hold => wall,
    };
    let opened = sh.opened.load(Relaxed);
    let r = Report {
        mode: a.mode.name().into(),
        connections_requested: a.connections,
        connections_open_peak: sh.open_peak.load(Relaxed).max(0) as u64,
        connect_failures: sh.connect_failures.load(Relaxed),
        handshake_failures: sh.handshake_failures.load(Relaxed),
        messages,
        bytes: sh.bytes.load(Relaxed),
        errors: sh.errors.load(Relaxed),
        verify_failures: sh.verify_failures.load(Relaxed),
        duration_s: round3(duration_s),
        msgs_per_s: if duration_s > 0.0 {
            round3(messages as f64 / duration_s)
        } else {
            0.0
        },
        rtt_us: Rtt::from_ns(&hist),
        connect_rate_per_s: if ramp_secs > 0.0 {
            round3(opened as f64 / ramp_secs)
        } else {
            0.0
        },
        ramp_seconds: round3(ramp_secs),
        client: "relay-bench load (mio)".into(),
        target: a.target_str.clone(),
        threads: nthreads as u64,
        size: a.size as u64,
        inflight: if a.mode == Mode::Throughput {
            a.inflight as u64
        } else {
            1
        },
        hold_s: (a.mode == Mode::Hold).then(|| a.hold.as_secs_f64()),
        trickle_s: if a.mode == Mode::Hold {
            a.trickle.map(|t| t.as_secs_f64())
        } else {
            None
        },
        hold_messages: hold_msgs.filter(|_| a.trickle.is_some()).map(|(m, _)| m),
        hold_msgs_per_s: hold_msgs
            .filter(|&(_, secs)| a.trickle.is_some() && secs > 0.0)
            .map(|(m, secs)| round3(m as f64 / secs)),
        loader_rss_kib_start: rss_start,
        loader_rss_kib_open: rss_open,
        loader_rss_bytes_per_conn: match (rss_start, rss_open) {
            (Some(s), Some(o)) if open_at_sample > 0 => Some(round3(
                (o as f64 - s as f64) * 1024.0 / open_at_sample as f64,
            )),
            _ => None,
        },
        stopped_by_max_seconds: stopped_by_cap,
        stopped_by_signal,
        tls: a.tls.as_ref().map(|t| report::TlsFigures {
            sni: t.opts.sni.clone(),
            verify: match &t.opts.verify {
                crate::tls::Verify::Ca(p) => format!("ca {p}"),
                crate::tls::Verify::Insecure => "insecure (benchmark-only verifier)".into(),
            },
            resume: t.opts.resume,
            negotiated: sh
                .tls_negotiated
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            handshakes_full: sh.tls_full.load(Relaxed),
            handshakes_resumed: sh.tls_resumed.load(Relaxed),
        }),
    };
    Ok(r)
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Size of the kernel's ephemeral port range.
fn ephemeral_ports() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = s.split_whitespace().map(|v| v.parse::<u64>());
    let (lo, hi) = (it.next()?.ok()?, it.next()?.ok()?);
    Some(hi.saturating_sub(lo) + 1)
}

impl Loader {
    fn new(a: Arc<LoadArgs>, sh: Arc<Shared>, tid: usize, nthreads: usize) -> Result<Loader> {
        let n = nthreads as u64;
        let quota = a.connections / n + u64::from((tid as u64) < a.connections % n);
        let max_pending = (a.max_pending / n).max(1);
        Ok(Loader {
            poll: Poll::new()?,
            conns: Slab::with_capacity(quota.min(1 << 16) as usize),
            scratch: vec![0x5a; SCRATCH],
            tls_in: if a.tls.is_some() {
                vec![0; SCRATCH]
            } else {
                Vec::new()
            },
            ctx: Ctx {
                out: Vec::with_capacity(64 * 1024),
                rng: fastrand::Rng::new(),
                epoch: Instant::now(),
                hist: report::new_histogram(),
                size: a.size as u64,
                messages: 0,
                bytes: 0,
                verify_failures: 0,
                verify_logged: 0,
            },
            quota,
            attempted: 0,
            resolving: 0,
            max_pending,
            sending: false,
            shutting_down: false,
            timers: BinaryHeap::new(),
            again: Vec::new(),
            serial: 0,
            logged_connect: 0,
            logged_handshake: 0,
            logged_error: 0,
            flushed: [0; 3],
            a,
            sh,
            tid,
            nthreads,
        })
    }

    fn run(mut self) -> Result<ThreadResult> {
        self.sh.inited.fetch_add(1, Relaxed);
        while !self.sh.go_ramp.load(Relaxed) && !self.sh.stop.load(Relaxed) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut events = Events::with_capacity(1024);
        let ramp_start = Instant::now();
        let rate = self.a.rate / self.nthreads as f64;
        let mut ramp_secs = None::<f64>;
        let mut main_start = None::<Instant>;
        let mut end_at = None::<Instant>;
        let mut last_sweep = Instant::now();
        let mut last_flush = Instant::now();
        loop {
            if self.sh.stop.load(Relaxed) {
                break;
            }
            let now = Instant::now();
            let mut timeout = Duration::from_millis(50);
            if ramp_secs.is_none() {
                // Start connections as the rate and the pending cap allow.
                let elapsed = now.duration_since(ramp_start).as_secs_f64();
                let allowed = if rate > 0.0 {
                    ((rate * elapsed) as u64 + 1).min(self.quota)
                } else {
                    self.quota
                };
                let mut batch = 0;
                while self.attempted < allowed
                    && self.resolving < self.max_pending
                    && batch < CONNECTS_PER_TURN
                {
                    self.start_connect();
                    batch += 1;
                }
                if self.attempted < self.quota {
                    timeout = if batch == CONNECTS_PER_TURN {
                        Duration::ZERO
                    } else {
                        Duration::from_millis(1)
                    };
                } else if self.resolving == 0 {
                    ramp_secs = Some(now.duration_since(ramp_start).as_secs_f64());
                    self.sh.ramped.fetch_add(1, Relaxed);
                }
                if last_sweep.elapsed() >= Duration::from_millis(250) {
                    last_sweep = Instant::now();
                    self.sweep_timeouts();
                }
            } else if main_start.is_none() {
                if self.sh.go_main.load(Relaxed) {
                    main_start = Some(now);
                    let len = match self.a.mode {
                        Mode::Hold => self.a.hold,
                        Mode::Throughput => self.a.duration,
                    };
                    end_at = Some(now + len);
                    if self.a.mode == Mode::Throughput {
                        self.start_sending();
                    }
                } else {
                    timeout = Duration::from_millis(1);
                }
            }
            if let Some(end) = end_at {
                if now >= end {
                    break;
                }
                timeout = timeout.min(end - now);
            }
            if let Some(Reverse((due, _, _))) = self.timers.peek() {
                let now_ns = self.ctx.now_ns();
                timeout = timeout.min(Duration::from_nanos(due.saturating_sub(now_ns)));
            }
            if !self.again.is_empty() {
                timeout = Duration::ZERO;
            }
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
            for ev in events.iter() {
                let idx = ev.token().0;
                let Some(c) = self.conns.get(idx) else {
                    continue;
                };
                match c.phase {
                    Phase::Connecting => {
                        if ev.is_writable()
                            || ev.is_error()
                            || ev.is_read_closed()
                            || ev.is_write_closed()
                        {
                            self.check_connected(idx);
                        }
                    }
                    _ => {
                        if ev.is_writable() {
                            self.on_writable(idx);
                        }
                        if (ev.is_readable() || ev.is_read_closed() || ev.is_error())
                            && self.conns.contains(idx)
                        {
                            self.on_readable(idx);
                        }
                    }
                }
            }
            for (idx, serial) in std::mem::take(&mut self.again) {
                if self.conns.get(idx).is_some_and(|c| c.serial == serial) {
                    self.on_readable(idx);
                }
            }
            self.run_timers();
            if last_flush.elapsed() >= Duration::from_millis(50) {
                last_flush = Instant::now();
                self.flush_counters();
            }
        }
        let window_secs = main_start.map_or(0.0, |t| t.elapsed().as_secs_f64());
        if ramp_secs.is_none() {
            // Stopped during the ramp: still report how far it got.
            ramp_secs = Some(ramp_start.elapsed().as_secs_f64());
            self.sh.ramped.fetch_add(1, Relaxed);
        }
        self.shutting_down = true;
        self.flush_counters();
        let open = self
            .conns
            .iter()
            .filter(|(_, c)| c.phase == Phase::Open)
            .count() as i64;
        self.sh.open.fetch_sub(open, Relaxed);
        self.conns.clear();
        Ok(ThreadResult {
            hist: self.ctx.hist,
            ramp_secs: ramp_secs.unwrap_or(0.0),
            window_secs,
        })
    }

    fn flush_counters(&mut self) {
        let now = [self.ctx.messages, self.ctx.bytes, self.ctx.verify_failures];
        self.sh
            .messages
            .fetch_add(now[0] - self.flushed[0], Relaxed);
        self.sh.bytes.fetch_add(now[1] - self.flushed[1], Relaxed);
        self.sh
            .verify_failures
            .fetch_add(now[2] - self.flushed[2], Relaxed);
        self.flushed = now;
    }

    fn start_connect(&mut self) {
        let uid = self.tid as u64 + self.attempted * self.nthreads as u64;
        self.attempted += 1;
        self.sh.attempted.fetch_add(1, Relaxed);
        let src = self.a.sources.pick(uid);
        let stream = match net::start_connect(self.a.target, src) {
            Ok(s) => s,
            Err(e) => {
                self.sh.connect_failures.fetch_add(1, Relaxed);
                self.log_connect(format_args!("connect from {src:?}: {e}"));
                return;
            }
        };
        let tls = match &self.a.tls {
            None => None,
            Some(t) => match crate::tls::connect(&t.config, &t.name) {
                Ok(c) => Some(Box::new(c)),
                Err(e) => {
                    self.sh.connect_failures.fetch_add(1, Relaxed);
                    self.log_connect(format_args!("TLS client set-up: {e}"));
                    return;
                }
            },
        };
        let mut stream = TcpStream::from_std(stream);
        let entry = self.conns.vacant_entry();
        let idx = entry.key();
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(idx),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.sh.connect_failures.fetch_add(1, Relaxed);
            self.log_connect(format_args!("register: {e}"));
            return;
        }
        self.serial = self.serial.wrapping_add(1);
        entry.insert(Conn {
            stream,
            serial: self.serial,
            uid: uid as u32,
            phase: Phase::Connecting,
            msg_bad: false,
            since_ms: self.ctx.now_ms(),
            dec: Decoder::new(false),
            send_seq: 0,
            recv_seq: 0,
            msg_len: 0,
            sent_at: VecDeque::new(),
            extra: None,
            tls,
        });
        self.resolving += 1;
    }

    fn log_connect(&mut self, msg: std::fmt::Arguments<'_>) {
        if self.logged_connect < LOG_LIMIT {
            self.logged_connect += 1;
            eprintln!("load[{}]: connect failure: {msg}", self.tid);
        }
    }

    fn log_handshake(&mut self, msg: std::fmt::Arguments<'_>) {
        if self.logged_handshake < LOG_LIMIT {
            self.logged_handshake += 1;
            eprintln!("load[{}]: handshake failure: {msg}", self.tid);
        }
    }

    /// Fails a connection that has not reached Open.
    fn fail(&mut self, idx: usize, why: std::fmt::Arguments<'_>) {
        self.ctx.out.clear();
        let mut c = self.conns.remove(idx);
        let _ = self.poll.registry().deregister(&mut c.stream);
        self.resolving -= 1;
        if c.phase == Phase::Connecting {
            self.sh.connect_failures.fetch_add(1, Relaxed);
            self.log_connect(why);
        } else {
            self.sh.handshake_failures.fetch_add(1, Relaxed);
            self.log_handshake(why);
        }
    }

    fn sweep_timeouts(&mut self) {
        let now = self.ctx.now_ms();
        let limit = self.a.connect_timeout.as_millis() as u32;
        let late: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.phase != Phase::Open && now.wrapping_sub(c.since_ms) > limit)
            .map(|(i, _)| i)
            .collect();
        for idx in late {
            let t = self.a.connect_timeout;
            self.fail(idx, format_args!("timed out after {t:?}"));
        }
    }

    fn check_connected(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        match c.stream.take_error() {
            Ok(None) => {}
            Ok(Some(e)) | Err(e) => return self.fail(idx, format_args!("{e}")),
        }
        match c.stream.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
            Err(e) => return self.fail(idx, format_args!("{e}")),
        }
        // Connected: send the upgrade request with a fresh random key.
        let key = ws::random_key(&mut self.ctx.rng);
        let accept = ws::accept_key(&key);
        let req = ws::upgrade_request(&self.a.host, &self.a.path, &key);
        self.ctx.out.extend_from_slice(&req);
        c.extra = Some(Box::new(Extra {
            accept: accept.into_bytes(),
            ..Default::default()
        }));
        c.phase = Phase::Handshaking;
        c.since_ms = self.ctx.now_ms();
        match self.flush(idx) {
            After::Keep => {}
            _ => self.fail(idx, format_args!("writing the upgrade request failed")),
        }
    }

    fn on_writable(&mut self, idx: usize) {
        match self.flush(idx) {
            After::Keep => {}
            _ => self.drop_conn(idx, true, format_args!("write failed")),
        }
    }

    fn on_readable(&mut self, idx: usize) {
        if self.conns[idx].tls.is_some() {
            return self.on_readable_tls(idx);
        }
        for _ in 0..READS_PER_TURN {
            let conn = &mut self.conns[idx];
            let n = match conn.stream.read(&mut self.scratch) {
                Ok(0) => return self.lost(idx, format_args!("connection closed by peer")),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.lost(idx, format_args!("{e}")),
            };
            if !self.consume(idx, n) {
                return;
            }
        }
        let c = &self.conns[idx];
        self.again.push((idx, c.serial));
    }

    /// wss: reads TCP bytes into `tls_in`, feeds them to rustls record by record, and
    /// hands the plaintext (read into `scratch`) to `consume`, as `on_readable` does.
    fn on_readable_tls(&mut self, idx: usize) {
        for _ in 0..READS_PER_TURN {
            let conn = &mut self.conns[idx];
            let n = match conn.stream.read(&mut self.tls_in) {
                Ok(0) => return self.lost(idx, format_args!("connection closed by peer")),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.lost(idx, format_args!("{e}")),
            };
            let mut off = 0;
            while off < n {
                let conn = &mut self.conns[idx];
                let Conn { stream, tls, .. } = conn;
                let tls = tls.as_mut().expect("TLS connection");
                match tls.read_tls(&mut &self.tls_in[off..n]) {
                    Ok(0) => return self.lost(idx, format_args!("TLS: read_tls took nothing")),
                    Ok(k) => off += k,
                    Err(e) => return self.lost(idx, format_args!("TLS: {e}")),
                }
                if let Err(e) = tls.process_new_packets() {
                    // Best effort: rustls has queued an alert for the server.
                    let _ = tls.write_tls(stream);
                    return self.lost(idx, format_args!("TLS: {e}"));
                }
                loop {
                    let tls = self.conns[idx].tls.as_mut().expect("TLS connection");
                    match tls.reader().read(&mut self.scratch) {
                        Ok(0) => {
                            return self.lost(idx, format_args!("server sent TLS close_notify"))
                        }
                        Ok(m) => {
                            if !self.consume(idx, m) {
                                return;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return self.lost(idx, format_args!("TLS: {e}")),
                    }
                }
            }
            // Handshake records (the client Finished) go out even when no plaintext came.
            if self.flush(idx) != After::Keep {
                return self.drop_conn(idx, true, format_args!("write failed"));
            }
        }
        let c = &self.conns[idx];
        self.again.push((idx, c.serial));
    }

    /// The connection ended unexpectedly: a handshake failure before the 101, else an error.
    fn lost(&mut self, idx: usize, why: std::fmt::Arguments<'_>) {
        if self.conns[idx].phase == Phase::Open {
            self.drop_conn(idx, true, why);
        } else {
            self.fail(idx, why);
        }
    }

    /// Handles `n` plaintext bytes in `scratch` (the upgrade answer or frames), then
    /// flushes. Returns false if the connection was removed.
    fn consume(&mut self, idx: usize, n: usize) -> bool {
        let conn = &mut self.conns[idx];
        let after = if conn.phase == Phase::Handshaking {
            match self.handshake_input(idx, n) {
                Some(a) => a,
                None => return false, // failed and removed
            }
        } else {
            let data = &mut self.scratch[..n];
            handle_frames(conn, data, &mut self.ctx, self.sending)
        };
        // Flush in every case: a close frame may be queued on the way out.
        let flushed = self.flush(idx);
        match (after, flushed) {
            (After::Keep, After::Keep) => true,
            (After::Keep, _) => {
                self.drop_conn(idx, true, format_args!("write failed"));
                false
            }
            (After::DropError, _) => {
                self.drop_conn(
                    idx,
                    true,
                    format_args!("server sent close or broke the protocol"),
                );
                false
            }
        }
    }

    /// Handles bytes read while waiting for the 101. Returns None if the connection
    /// failed (and was removed).
    fn handshake_input(&mut self, idx: usize, n: usize) -> Option<After> {
        let conn = &mut self.conns[idx];
        let mut extra = conn.extra.take().unwrap_or_default();
        let data = &mut self.scratch[..n];
        let result = if extra.head.is_empty() {
            ws::parse_upgrade_response(data, &extra.accept)
        } else {
            extra.head.extend_from_slice(data);
            ws::parse_upgrade_response(&extra.head, &extra.accept)
        };
        match result {
            Ok(None) => {
                if extra.head.is_empty() {
                    extra.head.extend_from_slice(data);
                }
                conn.extra = Some(extra);
                Some(After::Keep)
            }
            Err(e) => {
                conn.extra = Some(extra);
                self.fail(idx, format_args!("{e}"));
                None
            }
            Ok(Some(head_len)) => {
                if let Some(t) = conn.tls.as_deref() {
                    match t.handshake_kind() {
                        Some(HandshakeKind::Resumed) => &self.sh.tls_resumed,
                        _ => &self.sh.tls_full,
                    }
                    .fetch_add(1, Relaxed);
                    let mut first = self
                        .sh
                        .tls_negotiated
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    if first.is_none() {
                        *first = Some(crate::tls::describe(t));
                    }
                }
                extra.accept = Vec::new();
                let mut head = std::mem::take(&mut extra.head);
                conn.extra = Some(extra);
                conn.trim_extra();
                conn.phase = Phase::Open;
                conn.since_ms = self.ctx.now_ms();
                self.resolving -= 1;
                self.sh.opened_one();
                if self.sending {
                    for _ in 0..self.a.inflight {
                        self.ctx.push_message(conn);
                    }
                } else if let (Mode::Hold, Some(p)) = (self.a.mode, self.a.trickle) {
                    // First message at a random point within the period, so a fast ramp
                    // does not turn into synchronised bursts.
                    let p = p.as_nanos() as u64;
                    let due = self.ctx.now_ns() + self.ctx.rng.u64(0..p.max(1));
                    self.timers.push(Reverse((due, idx as u32, conn.serial)));
                }
                let rest: &mut [u8] = if head.is_empty() {
                    &mut self.scratch[head_len..n]
                } else {
                    &mut head[head_len..]
                };
                Some(handle_frames(conn, rest, &mut self.ctx, self.sending))
            }
        }
    }

    /// Throughput mode: the measurement starts; every open connection sends `inflight`.
    fn start_sending(&mut self) {
        self.sending = true;
        let idxs: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.phase == Phase::Open)
            .map(|(i, _)| i)
            .collect();
        for idx in idxs {
            let conn = &mut self.conns[idx];
            for _ in 0..self.a.inflight {
                self.ctx.push_message(conn);
            }
            if self.flush(idx) != After::Keep {
                self.drop_conn(idx, true, format_args!("write failed"));
            }
        }
    }

    fn run_timers(&mut self) {
        let Some(period) = self.a.trickle else { return };
        let period = period.as_nanos() as u64;
        let now = self.ctx.now_ns();
        let mut fired = 0;
        while let Some(&Reverse((due, idx, serial))) = self.timers.peek() {
            if due > now || fired >= 4096 {
                break;
            }
            self.timers.pop();
            fired += 1;
            let idx = idx as usize;
            let Some(conn) = self.conns.get_mut(idx).filter(|c| c.serial == serial) else {
                continue;
            };
            self.ctx.push_message(conn);
            self.timers
                .push(Reverse((due + period, idx as u32, serial)));
            if self.flush(idx) != After::Keep {
                self.drop_conn(idx, true, format_args!("write failed"));
            }
        }
    }

    /// Removes an open connection; `error` counts it in `errors` (unless shutting down).
    fn drop_conn(&mut self, idx: usize, error: bool, why: std::fmt::Arguments<'_>) {
        self.ctx.out.clear();
        let mut c = self.conns.remove(idx);
        let _ = self.poll.registry().deregister(&mut c.stream);
        if c.phase == Phase::Open {
            self.sh.open.fetch_sub(1, Relaxed);
        } else {
            self.resolving -= 1;
        }
        if error && !self.shutting_down {
            self.sh.errors.fetch_add(1, Relaxed);
            if self.logged_error < LOG_LIMIT {
                self.logged_error += 1;
                eprintln!("load[{}]: connection lost: {why}", self.tid);
            }
        }
    }

    /// Sends `ctx.out` (then clears it) after any older pending output.
    fn flush(&mut self, idx: usize) -> After {
        let conn = &mut self.conns[idx];
        let out = &mut self.ctx.out;
        let mut result = After::Keep;
        if let Some(tls) = conn.tls.as_mut() {
            // rustls encrypts into its own send buffer (unbounded, see tls::connect; before
            // the handshake is done it keeps the plaintext); the socket takes what it can.
            if !out.is_empty() {
                if tls.writer().write_all(out).is_err() {
                    result = After::DropError;
                }
                out.clear();
            }
            while result == After::Keep && tls.wants_write() {
                match tls.write_tls(&mut conn.stream) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => result = After::DropError,
                }
            }
            conn.trim_extra();
            return result;
        }
        if !out.is_empty() {
            if conn.pending() > 0 {
                conn.extra
                    .get_or_insert_with(Default::default)
                    .pend
                    .extend_from_slice(out);
            } else {
                match write_some(&mut conn.stream, out) {
                    Ok(n) if n == out.len() => {}
                    Ok(n) => {
                        let e = conn.extra.get_or_insert_with(Default::default);
                        e.pend.clear();
                        e.pend_pos = 0;
                        e.pend.extend_from_slice(&out[n..]);
                    }
                    Err(_) => result = After::DropError,
                }
            }
            out.clear();
        } else if let Some(e) = conn.extra.as_mut().filter(|e| e.pend_pos < e.pend.len()) {
            match write_some(&mut conn.stream, &e.pend[e.pend_pos..]) {
                Ok(n) => {
                    e.pend_pos += n;
                    if e.pend_pos == e.pend.len() {
                        e.pend = Vec::new();
                        e.pend_pos = 0;
                    } else if e.pend_pos > e.pend.len() / 2 {
                        e.pend.drain(..e.pend_pos);
                        e.pend_pos = 0;
                    }
                }
                Err(_) => result = After::DropError,
            }
        }
        conn.trim_extra();
        result
    }
}

fn write_some(s: &mut TcpStream, buf: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match s.write(&buf[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Walks server frames: verifies echoed data against the pattern as it streams through,
/// times each completed message, answers pings, and handles the server's close.
fn handle_frames(conn: &mut Conn, data: &mut [u8], ctx: &mut Ctx, sending: bool) -> After {
    if data.is_empty() {
        return After::Keep;
    }
    let now = ctx.now_ns();
    let Conn {
        dec,
        uid,
        recv_seq,
        msg_len,
        msg_bad,
        sent_at,
        extra,
        ..
    } = conn;
    let uid = *uid as u64;
    let mut completed = 0u32;
    let mut close_seen = false;
    let mut seed = ws::pattern_seed(uid, *recv_seq);
    let res = dec.feed(data, &mut |ev| {
        match ev {
            Event::Header(h) => {
                if h.opcode == op::PING || h.opcode == op::CLOSE {
                    extra.get_or_insert_with(Default::default).ctl.clear();
                }
            }
            Event::Payload { opcode, data, .. } => match opcode {
                op::PING | op::CLOSE => {
                    extra.get_or_insert_with(Default::default).ctl.extend_from_slice(data);
                }
                op::PONG => {}
                _ => {
                    if !*msg_bad && !ws::check_pattern(data, seed, *msg_len) {
                        *msg_bad = true;
                    }
                    *msg_len += data.len() as u64;
                }
            },
            Event::End { opcode, message_end, .. } => {
                if message_end {
                    let mut why = None;
                    if *msg_bad {
                        why = Some("content differs from what was sent");
                    } else if *msg_len != ctx.size {
                        why = Some("length differs from what was sent");
                    }
                    match sent_at.pop_front() {
                        Some(t) => {
                            ctx.hist.saturating_record(now.saturating_sub(t).max(1));
                        }
                        None => why = Some("echo of a message never sent"),
                    }
                    if let Some(why) = why {
                        ctx.verify_failures += 1;
                        if ctx.verify_logged < LOG_LIMIT {
                            ctx.verify_logged += 1;
                            eprintln!(
                                "load: verify failure on connection {uid}, message {}: {why} ({} bytes)",
                                *recv_seq, *msg_len
                            );
                        }
                    }
                    ctx.messages += 1;
                    ctx.bytes += *msg_len;
                    *recv_seq += 1;
                    *msg_len = 0;
                    *msg_bad = false;
                    seed = ws::pattern_seed(uid, *recv_seq);
                    completed += 1;
                } else if opcode == op::PING {
                    let ctl = extra.as_mut().map(|e| std::mem::take(&mut e.ctl)).unwrap_or_default();
                    let mask = ctx.rng.u32(..).to_ne_bytes();
                    ws::encode_frame(&mut ctx.out, true, op::PONG, Some(mask), &ctl);
                } else if opcode == op::CLOSE {
                    close_seen = true;
                    return Flow::Stop;
                }
            }
        }
        Flow::Continue
    });
    match res {
        Err(e) => {
            if let Some(x) = extra.as_mut() {
                x.ctl.clear();
            }
            eprintln!("load: protocol error from server on connection {uid}: {e}");
            let mask = ctx.rng.u32(..).to_ne_bytes();
            ws::encode_frame(
                &mut ctx.out,
                true,
                op::CLOSE,
                Some(mask),
                &ws::CLOSE_PROTOCOL_ERROR.to_be_bytes(),
            );
            After::DropError
        }
        Ok(_) if close_seen => {
            // Answer with the server's code, then go.
            let code = extra
                .as_ref()
                .and_then(|e| e.ctl.get(..2).map(|c| c.to_vec()))
                .unwrap_or_default();
            let mask = ctx.rng.u32(..).to_ne_bytes();
            ws::encode_frame(&mut ctx.out, true, op::CLOSE, Some(mask), &code);
            if let Some(e) = extra.as_mut() {
                e.ctl.clear();
            }
            After::DropError
        }
        Ok(_) => {
            if sending {
                for _ in 0..completed {
                    ctx.push_message(conn);
                }
            }
            conn.trim_extra();
            After::Keep
        }
    }
}
