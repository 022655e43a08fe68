//! `echo-origin`: a WebSocket echo server built to hold many idle connections cheaply.
//!
//! One mio event loop per thread, each with its own SO_REUSEPORT listener. A connection
//! owns no buffer while idle: reads land in a per-thread scratch buffer, frames are echoed
//! as they stream through (the decoder keeps at most a partial 14-byte header), and only
//! a partial upgrade head or unsent output is kept, boxed, while it exists.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::net;
use crate::ws::{self, op, Decoder, Event, Flow};

/// Read size per syscall (shared by all connections of a thread).
const SCRATCH: usize = 256 * 1024;
/// Stop reading from a connection whose unsent output exceeds this (the peer is not
/// reading); resume below half. Large enough that a client which writes a whole 16 MiB
/// message before reading its echo never deadlocks against us.
const PAUSE_AT: usize = 64 << 20;
/// Reads per readiness event before yielding to other connections.
const READS_PER_TURN: usize = 8;
/// After our close frame (or an error answer) is sent we half-close and wait this long
/// for the peer's FIN before dropping the socket.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
const LISTENER: Token = Token(usize::MAX);

#[derive(Debug, Clone)]
pub struct OriginArgs {
    pub listen: SocketAddr,
    pub threads: usize,
    pub backlog: i32,
    pub stats_interval: u64,
    pub max_seconds: u64,
}

/// Per-thread counters, written only by their thread.
#[derive(Default)]
struct Stats {
    accepted: AtomicU64,
    open: AtomicU64,
    upgraded: AtomicU64,
    refused: AtomicU64,
    protocol_errors: AtomicU64,
    frames: AtomicU64,
    messages: AtomicU64,
    bytes: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the upgrade request.
    Handshake,
    /// Echoing frames.
    Open,
    /// A final answer (close frame or HTTP error) is queued; half-close once flushed.
    Closing,
    /// Write side shut; discarding input until the peer's FIN or a timeout.
    Draining,
}

/// Rarely needed per-connection state, allocated only while it holds something.
#[derive(Default)]
struct Extra {
    head: Vec<u8>,
    pend: Vec<u8>,
    pend_pos: usize,
}

struct Conn {
    stream: TcpStream,
    serial: u32,
    phase: Phase,
    paused: bool,
    dec: Decoder,
    extra: Option<Box<Extra>>,
}

impl Conn {
    fn pending(&self) -> usize {
        self.extra.as_ref().map_or(0, |e| e.pend.len() - e.pend_pos)
    }

    fn trim_extra(&mut self) {
        if self
            .extra
            .as_ref()
            .is_some_and(|e| e.head.is_empty() && e.pend_pos == e.pend.len())
        {
            self.extra = None;
        }
    }
}

/// What to do with a connection after handling it.
#[derive(Debug, PartialEq, Eq)]
enum After {
    Keep,
    Drop,
}

struct Worker {
    poll: Poll,
    listener: TcpListener,
    conns: Slab<Conn>,
    scratch: Vec<u8>,
    out: Vec<u8>,
    again: Vec<(usize, u32)>,
    draining: VecDeque<(Instant, usize, u32)>,
    serial: u32,
    accept_retry_at: Option<Instant>,
    last_exhaustion_warning: Option<Instant>,
    stats: Arc<Stats>,
}

/// Running worker threads of an origin.
pub struct Running {
    pub addr: SocketAddr,
    handles: Vec<std::thread::JoinHandle<Result<()>>>,
    stats: Vec<Arc<Stats>>,
}

/// Binds one SO_REUSEPORT listener per thread (all on the same address, also when the
/// port was 0) and starts the workers.
pub fn start(args: &OriginArgs) -> Result<Running> {
    let first = net::reuseport_listener(args.listen, args.backlog)
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..args.threads.max(1) {
        listeners.push(
            net::reuseport_listener(addr, args.backlog)
                .with_context(|| format!("binding {addr}"))?,
        );
    }
    let mut stats = Vec::new();
    let mut handles = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let st = Arc::new(Stats::default());
        stats.push(st.clone());
        let listener = TcpListener::from_std(l);
        let h = std::thread::Builder::new()
            .name(format!("origin-{i}"))
            .spawn(move || {
                let mut w = Worker::new(listener, st)?;
                w.run()
            })?;
        handles.push(h);
    }
    Ok(Running {
        addr,
        handles,
        stats,
    })
}

pub fn run(args: OriginArgs) -> Result<()> {
    let limit = net::raise_nofile();
    let Running {
        addr,
        mut handles,
        stats: all_stats,
    } = start(&args)?;
    if let Some(l) = limit {
        eprintln!(
            "echo-origin: {} thread(s), fd limit {l}",
            args.threads.max(1)
        );
    }
    {
        let mut so = io::stdout().lock();
        writeln!(so, "ready {addr}")?;
        so.flush()?;
    }
    let start = Instant::now();
    let mut last_stats = Instant::now();
    let mut prev_msgs = 0u64;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        if let Some(pos) = handles.iter().position(|h| h.is_finished()) {
            // Workers only return on a fatal error.
            return match handles.swap_remove(pos).join() {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.context("echo-origin worker failed")),
                Err(_) => anyhow::bail!("echo-origin worker panicked"),
            };
        }
        if args.stats_interval > 0
            && last_stats.elapsed() >= Duration::from_secs(args.stats_interval)
        {
            let sum = |f: fn(&Stats) -> &AtomicU64| {
                all_stats.iter().map(|s| f(s).load(Relaxed)).sum::<u64>()
            };
            let msgs = sum(|s| &s.messages);
            let dt = last_stats.elapsed().as_secs_f64();
            eprintln!(
                "[{:7.1}s] open={} accepted={} upgraded={} refused={} proto_err={} msgs={} ({:.0}/s) bytes={} rss={}KiB",
                start.elapsed().as_secs_f64(),
                sum(|s| &s.open),
                sum(|s| &s.accepted),
                sum(|s| &s.upgraded),
                sum(|s| &s.refused),
                sum(|s| &s.protocol_errors),
                msgs,
                (msgs - prev_msgs) as f64 / dt,
                sum(|s| &s.bytes),
                net::self_rss_kib().unwrap_or(0),
            );
            prev_msgs = msgs;
            last_stats = Instant::now();
        }
        if args.max_seconds > 0 && start.elapsed() >= Duration::from_secs(args.max_seconds) {
            eprintln!(
                "echo-origin: --max-seconds {} reached, exiting",
                args.max_seconds
            );
            return Ok(());
        }
    }
}

impl Worker {
    fn new(mut listener: TcpListener, stats: Arc<Stats>) -> Result<Worker> {
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(Worker {
            poll,
            listener,
            conns: Slab::new(),
            scratch: vec![0; SCRATCH],
            out: Vec::with_capacity(SCRATCH + 64),
            again: Vec::new(),
            draining: VecDeque::new(),
            serial: 0,
            accept_retry_at: None,
            last_exhaustion_warning: None,
            stats,
        })
    }

    fn run(&mut self) -> Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = if self.again.is_empty() {
                Duration::from_millis(100)
            } else {
                Duration::ZERO
            };
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
            for ev in events.iter() {
                if ev.token() == LISTENER {
                    self.accept_all();
                    continue;
                }
                let idx = ev.token().0;
                if ev.is_writable() && self.conns.contains(idx) {
                    self.on_writable(idx);
                }
                if (ev.is_readable() || ev.is_read_closed() || ev.is_error())
                    && self.conns.contains(idx)
                {
                    self.on_readable(idx);
                }
            }
            for (idx, serial) in std::mem::take(&mut self.again) {
                if self.conns.get(idx).is_some_and(|c| c.serial == serial) {
                    self.on_readable(idx);
                }
            }
            let now = Instant::now();
            while let Some(&(deadline, idx, serial)) = self.draining.front() {
                if deadline > now {
                    break;
                }
                self.draining.pop_front();
                if self
                    .conns
                    .get(idx)
                    .is_some_and(|c| c.serial == serial && c.phase == Phase::Draining)
                {
                    self.close(idx);
                }
            }
            if self.accept_retry_at.is_some_and(|t| t <= now) {
                self.accept_retry_at = None;
                self.accept_all();
            }
        }
    }

    fn accept_all(&mut self) {
        if self.accept_retry_at.is_some() {
            return;
        }
        loop {
            match self.listener.accept() {
                Ok((mut stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    let entry = self.conns.vacant_entry();
                    let idx = entry.key();
                    if let Err(e) = self.poll.registry().register(
                        &mut stream,
                        Token(idx),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        eprintln!("echo-origin: register failed: {e}");
                        continue;
                    }
                    self.serial = self.serial.wrapping_add(1);
                    entry.insert(Conn {
                        stream,
                        serial: self.serial,
                        phase: Phase::Handshake,
                        paused: false,
                        dec: Decoder::new(true),
                        extra: None,
                    });
                    self.stats.accepted.fetch_add(1, Relaxed);
                    self.stats.open.fetch_add(1, Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if net::is_resource_exhaustion(&e) => {
                    let now = Instant::now();
                    if self
                        .last_exhaustion_warning
                        .is_none_or(|t| now.duration_since(t) > Duration::from_secs(1))
                    {
                        eprintln!(
                            "echo-origin: accept: {e} ({} connections on this thread); retrying in 100 ms",
                            self.conns.len()
                        );
                        self.last_exhaustion_warning = Some(now);
                    }
                    self.accept_retry_at = Some(now + Duration::from_millis(100));
                    return;
                }
                Err(_) => continue, // ECONNABORTED and friends: the next one may be fine.
            }
        }
    }

    fn close(&mut self, idx: usize) {
        let mut c = self.conns.remove(idx);
        let _ = self.poll.registry().deregister(&mut c.stream);
        self.stats.open.fetch_sub(1, Relaxed);
    }

    fn on_readable(&mut self, idx: usize) {
        for _ in 0..READS_PER_TURN {
            let conn = &mut self.conns[idx];
            if conn.paused || conn.phase == Phase::Closing {
                return;
            }
            let n = match conn.stream.read(&mut self.scratch) {
                Ok(0) => {
                    // Peer closed its side.
                    if conn.phase == Phase::Open && conn.pending() > 0 {
                        conn.phase = Phase::Closing;
                    } else {
                        self.close(idx);
                    }
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.close(idx);
                    return;
                }
            };
            if conn.phase == Phase::Draining {
                continue;
            }
            let after = handle_input(conn, &mut self.scratch[..n], &mut self.out, &self.stats);
            if after == After::Drop || self.flush(idx) == After::Drop {
                self.close(idx);
                return;
            }
        }
        let c = &self.conns[idx];
        self.again.push((idx, c.serial));
    }

    fn on_writable(&mut self, idx: usize) {
        if self.flush(idx) == After::Drop {
            self.close(idx);
        }
    }

    /// Sends `self.out` (then clears it) after any older pending output, keeps what the
    /// socket does not take, applies backpressure and finishes closing connections.
    fn flush(&mut self, idx: usize) -> After {
        let conn = &mut self.conns[idx];
        let out = &mut self.out;
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
                    Err(_) => {
                        out.clear();
                        return After::Drop;
                    }
                }
            }
            out.clear();
        } else if let Some(e) = conn.extra.as_mut().filter(|e| e.pend_pos < e.pend.len()) {
            match write_some(&mut conn.stream, &e.pend[e.pend_pos..]) {
                Ok(n) => {
                    e.pend_pos += n;
                    if e.pend_pos == e.pend.len() {
                        // Free the buffer outright: it may have grown large.
                        e.pend = Vec::new();
                        e.pend_pos = 0;
                    } else if e.pend_pos > e.pend.len() / 2 {
                        e.pend.drain(..e.pend_pos);
                        e.pend_pos = 0;
                    }
                }
                Err(_) => return After::Drop,
            }
        }
        conn.trim_extra();
        let pending = conn.pending();
        if pending > PAUSE_AT {
            conn.paused = true;
        } else if conn.paused && pending < PAUSE_AT / 2 {
            conn.paused = false;
            // Data may be waiting in the socket with no new edge to announce it.
            self.again.push((idx, conn.serial));
        }
        if conn.phase == Phase::Closing && pending == 0 {
            let _ = conn.stream.shutdown(Shutdown::Write);
            conn.phase = Phase::Draining;
            self.draining
                .push_back((Instant::now() + DRAIN_TIMEOUT, idx, conn.serial));
            // Anything already queued in the socket must be read to see the FIN.
            self.again.push((idx, conn.serial));
        }
        After::Keep
    }
}

/// Writes as much of `buf` as the socket takes now.
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

/// Handles freshly read bytes, appending anything to send to `out`.
fn handle_input(conn: &mut Conn, data: &mut [u8], out: &mut Vec<u8>, stats: &Stats) -> After {
    if conn.phase == Phase::Handshake {
        let mut extra = conn.extra.take();
        let partial = extra.as_mut().filter(|e| !e.head.is_empty());
        let result = match partial {
            Some(e) => {
                e.head.extend_from_slice(data);
                ws::parse_upgrade_request(&e.head)
            }
            None => ws::parse_upgrade_request(data),
        };
        match result {
            Ok(None) => {
                let e = extra.get_or_insert_with(Default::default);
                if e.head.is_empty() {
                    e.head.extend_from_slice(data);
                }
                conn.extra = extra;
                return After::Keep;
            }
            Err(refusal) => {
                conn.extra = extra;
                if let Some(e) = conn.extra.as_mut() {
                    e.head = Vec::new();
                }
                stats.refused.fetch_add(1, Relaxed);
                out.extend_from_slice(&refusal.response());
                conn.phase = Phase::Closing;
                return After::Keep;
            }
            Ok(Some((head_len, accept))) => {
                stats.upgraded.fetch_add(1, Relaxed);
                out.extend_from_slice(&ws::upgrade_response(&accept));
                conn.phase = Phase::Open;
                match extra {
                    Some(mut e) if !e.head.is_empty() => {
                        let mut head = std::mem::take(&mut e.head);
                        conn.extra = Some(e);
                        conn.trim_extra();
                        return echo(conn, &mut head[head_len..], out, stats);
                    }
                    other => {
                        conn.extra = other;
                        conn.trim_extra();
                        return echo(conn, &mut data[head_len..], out, stats);
                    }
                }
            }
        }
    }
    echo(conn, data, out, stats)
}

/// Echoes frames as they stream through: each frame's header is re-encoded unmasked
/// (pings become pongs, pongs are swallowed, a close is answered with its code) and its
/// payload bytes are copied out as soon as they are unmasked.
fn echo(conn: &mut Conn, data: &mut [u8], out: &mut Vec<u8>, stats: &Stats) -> After {
    if conn.phase != Phase::Open || data.is_empty() {
        return After::Keep;
    }
    let mut close_seen = false;
    let (mut frames, mut messages, mut bytes) = (0u64, 0u64, 0u64);
    let res = conn.dec.feed(data, &mut |ev| {
        match ev {
            Event::Header(h) => match h.opcode {
                op::PONG => {}
                op::PING => ws::encode_header(out, true, op::PONG, None, h.len),
                op::CLOSE => ws::encode_header(out, true, op::CLOSE, None, h.len.min(2)),
                _ => ws::encode_header(out, h.fin, h.opcode, None, h.len),
            },
            Event::Payload {
                opcode,
                offset,
                data,
            } => match opcode {
                op::PONG => {}
                op::CLOSE => {
                    if offset < 2 {
                        let n = (2 - offset as usize).min(data.len());
                        out.extend_from_slice(&data[..n]);
                    }
                }
                _ => {
                    bytes += data.len() as u64;
                    out.extend_from_slice(data);
                }
            },
            Event::End {
                opcode,
                message_end,
                ..
            } => {
                frames += 1;
                if message_end {
                    messages += 1;
                }
                if opcode == op::CLOSE {
                    close_seen = true;
                    return Flow::Stop;
                }
            }
        }
        Flow::Continue
    });
    stats.frames.fetch_add(frames, Relaxed);
    stats.messages.fetch_add(messages, Relaxed);
    stats.bytes.fetch_add(bytes, Relaxed);
    match res {
        Ok(_) if close_seen => {
            conn.phase = Phase::Closing;
            After::Keep
        }
        Ok(_) => After::Keep,
        Err(_) => {
            stats.protocol_errors.fetch_add(1, Relaxed);
            ws::encode_frame(
                out,
                true,
                op::CLOSE,
                None,
                &ws::CLOSE_PROTOCOL_ERROR.to_be_bytes(),
            );
            conn.phase = Phase::Closing;
            After::Keep
        }
    }
}
