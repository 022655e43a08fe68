//! `handshakes`: connection-rate benchmark. Each of `--concurrency` slots loops: TCP
//! connect, TLS handshake (full, or resumed from the slot's previous session), WebSocket
//! upgrade, one `--size`-byte echo (verified), a close handshake (close 1000 both ways),
//! TLS close_notify, close. Reported: completed connections per second inside the
//! measurement window, latency percentiles of each step (HDR histograms), failures by
//! step, and how many handshakes were full and how many resumed (from rustls's
//! `handshake_kind()`, so resumption is proven, not assumed).
//!
//! Resumption: every slot owns a client config with its own session store, so slot *k*'s
//! next connection offers the ticket its previous connection received. (One shared store
//! would hold at most 8 TLS 1.3 tickets per server name in rustls, and with more slots
//! than that some connections would start without a ticket and do a full handshake.)
//! The first connection of each slot is necessarily full; `--warmup` keeps those out of
//! the window.
//!
//! With `--server-pid`, the server's utime+stime and run-queue wait are sampled at the
//! window's start and end, giving its CPU per completed connection.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, HandshakeKind};
use serde::Serialize;
use slab::Slab;

use crate::net::{self, Sources};
use crate::report::{self, Rtt};
use crate::tls::{self, TlsOpts};
use crate::ws::{self, op, Decoder, Event, Flow};

const LOG_LIMIT: u32 = 3;
const BUF: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct HsArgs {
    pub target: SocketAddr,
    pub target_str: String,
    pub host: String,
    pub path: String,
    /// None: plain ws (a baseline for the TCP + upgrade part).
    pub tls: Option<TlsOpts>,
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub size: usize,
    pub threads: usize,
    pub sources: Sources,
    pub connect_timeout: Duration,
    pub server_pids: Vec<u32>,
    pub max_seconds: u64,
}

/// The step a connection is in; also the step a failure is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Connect,
    Tls,
    Upgrade,
    Echo,
    Close,
}

impl Step {
    const ALL: [Step; 5] = [
        Step::Connect,
        Step::Tls,
        Step::Upgrade,
        Step::Echo,
        Step::Close,
    ];
    fn name(self) -> &'static str {
        match self {
            Step::Connect => "connect",
            Step::Tls => "tls",
            Step::Upgrade => "upgrade",
            Step::Echo => "echo",
            Step::Close => "close",
        }
    }
}

struct Conn {
    stream: TcpStream,
    slot: usize,
    uid: u64,
    step: Step,
    tls: Option<Box<ClientConnection>>,
    t_start: Instant,
    t_tcp: Option<Instant>,
    t_tls: Option<Instant>,
    t_upgraded: Option<Instant>,
    accept: String,
    head: Vec<u8>,
    dec: Decoder,
    echo_len: u64,
    echo_bad: bool,
    ctl: Vec<u8>,
    resumed: bool,
}

/// Figures of one thread (summed over threads at the end).
struct Tally {
    completed: u64,
    resumed: u64,
    full: u64,
    unclean_closes: u64,
    failures: [u64; 5],
    completed_outside: u64,
    tcp: Histogram<u64>,
    tls: Histogram<u64>,
    upgrade: Histogram<u64>,
    total: Histogram<u64>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            completed: 0,
            resumed: 0,
            full: 0,
            unclean_closes: 0,
            failures: [0; 5],
            completed_outside: 0,
            tcp: report::new_histogram(),
            tls: report::new_histogram(),
            upgrade: report::new_histogram(),
            total: report::new_histogram(),
        }
    }
    fn add(&mut self, o: &Tally) {
        self.completed += o.completed;
        self.resumed += o.resumed;
        self.full += o.full;
        self.unclean_closes += o.unclean_closes;
        self.completed_outside += o.completed_outside;
        for i in 0..5 {
            self.failures[i] += o.failures[i];
        }
        self.tcp.add(&o.tcp).ok();
        self.tls.add(&o.tls).ok();
        self.upgrade.add(&o.upgrade).ok();
        self.total.add(&o.total).ok();
    }
}

struct Shared {
    stop: AtomicBool,
    started: AtomicUsize,
    /// (seen inside the window, description) of the handshake that describes the run.
    negotiated: Mutex<Option<(bool, String)>>,
}

struct Worker {
    a: Arc<HsArgs>,
    sh: Arc<Shared>,
    tid: usize,
    poll: Poll,
    conns: Slab<Conn>,
    /// Per slot: the client config (with resumption, each slot has its own session store).
    configs: Vec<Arc<ClientConfig>>,
    name: Option<ServerName<'static>>,
    /// Slots waiting for their next connection to start (failed starts retry here).
    pending: Vec<usize>,
    win_start: Instant,
    win_end: Instant,
    buf: Vec<u8>,
    plain: Vec<u8>,
    out: Vec<u8>,
    rng: fastrand::Rng,
    next_uid: u64,
    t: Tally,
    logged: [u32; 5],
}

#[derive(Debug, Serialize)]
pub struct HsLatency {
    pub tcp_connect_us: Rtt,
    /// TCP connected -> the client has the server's Finished (client view, one round trip).
    pub tls_handshake_us: Rtt,
    /// TLS done (or TCP connected for plain ws) -> 101 received.
    pub upgrade_us: Rtt,
    /// connect() -> echo verified: what a client waits before its first message is back.
    pub connect_to_echo_us: Rtt,
}

#[derive(Debug, Serialize)]
pub struct ServerCpu {
    pub pids: Vec<u32>,
    pub cpu_s: f64,
    pub cpu_us_per_conn: Option<f64>,
    /// Share of one CPU the server used during the window, in %.
    pub cpu_pct: f64,
    /// Time the server was runnable but waited for a CPU, in % of the window.
    pub runq_wait_pct: f64,
}

#[derive(Debug, Serialize)]
pub struct HsReport {
    pub mode: String,
    pub target: String,
    pub tls: bool,
    pub resume: bool,
    pub concurrency: usize,
    pub threads: usize,
    pub size: usize,
    pub warmup_s: f64,
    pub duration_s: f64,
    /// Connections that finished every step inside the window.
    pub completed: u64,
    pub conns_per_s: f64,
    pub handshakes_full: u64,
    pub handshakes_resumed: u64,
    /// resumed / completed (None for plain ws or when nothing completed).
    pub resumed_share: Option<f64>,
    /// Failures by step over the whole run (warm-up included).
    pub failures: std::collections::BTreeMap<String, u64>,
    pub failures_total: u64,
    /// Server closed TCP (or sent close_notify) before its WebSocket close frame.
    pub unclean_closes: u64,
    pub negotiated: Option<String>,
    pub latency_us: HsLatency,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerCpu>,
    pub client: String,
    pub loader_cpu_s: Option<f64>,
    pub stopped_by_max_seconds: bool,
}

impl HsReport {
    pub fn summary(&self) -> String {
        let r = |x: &Rtt| format!("p50 {}  p90 {}  p99 {}  max {}", x.p50, x.p90, x.p99, x.max);
        let mut s = format!(
            "== relay-bench handshakes -> {} ({}{}, {} slots, {} thread(s), window {:.1} s after {:.1} s warm-up)\n",
            self.target,
            if self.tls { "wss" } else { "ws" },
            if !self.tls {
                ""
            } else if self.resume {
                ", resumed sessions"
            } else {
                ", full handshakes"
            },
            self.concurrency,
            self.threads,
            self.duration_s,
            self.warmup_s,
        );
        s += &format!(
            "completed {}  = {:.0} conn/s  (full {}, resumed {}{})\n",
            self.completed,
            self.conns_per_s,
            self.handshakes_full,
            self.handshakes_resumed,
            self.resumed_share
                .map(|x| format!(", {:.1} % resumed", x * 100.0))
                .unwrap_or_default()
        );
        if let Some(n) = &self.negotiated {
            s += &format!("negotiated: {n}\n");
        }
        s += &format!("tcp connect us:   {}\n", r(&self.latency_us.tcp_connect_us));
        if self.tls {
            s += &format!(
                "tls handshake us: {}\n",
                r(&self.latency_us.tls_handshake_us)
            );
        }
        s += &format!("upgrade us:       {}\n", r(&self.latency_us.upgrade_us));
        s += &format!(
            "connect->echo us: {}\n",
            r(&self.latency_us.connect_to_echo_us)
        );
        if let Some(c) = &self.server {
            s += &format!(
                "server {:?}: {:.2} CPU-s, {} us per connection, {:.1} % of a CPU (waited {:.1} %)\n",
                c.pids,
                c.cpu_s,
                c.cpu_us_per_conn.map_or("-".into(), |v| format!("{v:.1}")),
                c.cpu_pct,
                c.runq_wait_pct
            );
        }
        s += &format!(
            "failures: {}  {:?}  unclean closes {}{}\n",
            self.failures_total,
            self.failures,
            self.unclean_closes,
            if self.stopped_by_max_seconds {
                "  (stopped by --max-seconds)"
            } else {
                ""
            }
        );
        s
    }

    /// 0 ok; 1 if resumption was asked for but fewer than 99 % of the window's
    /// handshakes resumed, or a full run resumed any; 3 if nothing completed.
    pub fn exit_code(&self) -> i32 {
        if self.completed == 0 {
            3
        } else if self.tls
            && ((self.resume && self.resumed_share.unwrap_or(0.0) < 0.99)
                || (!self.resume && self.handshakes_resumed > 0))
        {
            1
        } else {
            0
        }
    }

    pub fn emit(&self, json: Option<&str>) -> Result<()> {
        eprint!("{}", self.summary());
        if let Some(path) = json {
            let text = serde_json::to_string_pretty(self)? + "\n";
            if path == "-" {
                let mut out = io::stdout().lock();
                out.write_all(text.as_bytes())?;
                out.flush()?;
            } else {
                std::fs::write(path, text)
                    .map_err(|e| anyhow::anyhow!("writing --json {path}: {e}"))?;
            }
        }
        Ok(())
    }
}

/// Spreads `n` slots over `threads`: the first `n % threads` threads get one more.
pub fn split(n: usize, threads: usize, tid: usize) -> usize {
    n / threads + usize::from(tid < n % threads)
}

fn cpu_of(pids: &[u32]) -> (f64, f64) {
    let mut cpu = 0.0;
    let mut wait = 0.0;
    for p in pids {
        cpu += crate::rooms::proc_cpu_s(&p.to_string()).unwrap_or(0.0);
        wait += crate::rooms::proc_runq_wait_s(&p.to_string()).unwrap_or(0.0);
    }
    (cpu, wait)
}

fn round(v: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (v * m).round() / m
}

pub fn run(a: HsArgs) -> Result<HsReport> {
    if a.concurrency == 0 {
        bail!("--concurrency must be >= 1");
    }
    if a.duration.is_zero() {
        bail!("--duration must be > 0");
    }
    let limit = net::raise_nofile().unwrap_or(1024);
    if a.concurrency as u64 + 64 > limit {
        bail!(
            "--concurrency {} needs more descriptors than RLIMIT_NOFILE {limit}",
            a.concurrency
        );
    }
    let base = match &a.tls {
        Some(t) => Some((tls::client_config(t, 4)?, t.server_name()?)),
        None => None,
    };
    let threads = a.threads.clamp(1, a.concurrency);
    let a = Arc::new(a);
    let sh = Arc::new(Shared {
        stop: AtomicBool::new(false),
        started: AtomicUsize::new(0),
        negotiated: Mutex::new(None),
    });
    let t0 = Instant::now();
    let win_start = t0 + a.warmup;
    let win_end = win_start + a.duration;
    let mut handles = Vec::new();
    for tid in 0..threads {
        let n = split(a.concurrency, threads, tid);
        let configs: Vec<Arc<ClientConfig>> = match &base {
            // Each slot's own config: a clone with a fresh session store.
            Some((cfg, _)) => (0..n)
                .map(|_| Arc::new(tls::with_own_session_store(cfg, a.tls.as_ref())))
                .collect(),
            None => Vec::new(),
        };
        let w = Worker {
            a: a.clone(),
            sh: sh.clone(),
            tid,
            poll: Poll::new()?,
            conns: Slab::with_capacity(n),
            configs,
            name: base.as_ref().map(|(_, n)| n.clone()),
            pending: (0..n).collect(),
            win_start,
            win_end,
            buf: vec![0; BUF],
            plain: vec![0; BUF],
            out: Vec::with_capacity(4096),
            rng: fastrand::Rng::new(),
            next_uid: tid as u64,
            t: Tally::new(),
            logged: [0; 5],
        };
        handles.push(
            std::thread::Builder::new()
                .name(format!("hs-{tid}"))
                .spawn(move || w.run(threads))?,
        );
    }
    // Sample the server at the window's edges.
    let cap = t0 + Duration::from_secs(a.max_seconds.max(1));
    let mut stopped_by_cap = false;
    let sleep_until = |t: Instant| {
        while Instant::now() < t && Instant::now() < cap {
            std::thread::sleep((t - Instant::now()).min(Duration::from_millis(20)));
        }
    };
    sleep_until(win_start);
    let self_cpu0 = crate::rooms::proc_cpu_s("self");
    let s0 = cpu_of(&a.server_pids);
    let w0 = Instant::now();
    sleep_until(win_end);
    let s1 = cpu_of(&a.server_pids);
    let self_cpu1 = crate::rooms::proc_cpu_s("self");
    let wall = w0.elapsed().as_secs_f64();
    if Instant::now() >= cap {
        stopped_by_cap = true;
        eprintln!(
            "handshakes: --max-seconds {} reached, stopping",
            a.max_seconds
        );
    }
    sh.stop.store(true, Relaxed);
    let mut t = Tally::new();
    for h in handles {
        match h.join() {
            Ok(Ok(x)) => t.add(&x),
            Ok(Err(e)) => return Err(e.context("handshakes thread failed")),
            Err(_) => bail!("handshakes thread panicked"),
        }
    }
    let dur = a.duration.as_secs_f64();
    let failures: std::collections::BTreeMap<String, u64> = Step::ALL
        .iter()
        .map(|s| (s.name().to_string(), t.failures[*s as usize]))
        .filter(|(k, _)| a.tls.is_some() || k != "tls")
        .collect();
    let server = (!a.server_pids.is_empty()).then(|| {
        let cpu = s1.0 - s0.0;
        ServerCpu {
            pids: a.server_pids.clone(),
            cpu_s: round(cpu, 3),
            cpu_us_per_conn: (t.completed > 0).then(|| round(cpu * 1e6 / t.completed as f64, 2)),
            cpu_pct: round(cpu / wall.max(1e-9) * 100.0, 1),
            runq_wait_pct: round((s1.1 - s0.1) / wall.max(1e-9) * 100.0, 1),
        }
    });
    let negotiated = sh
        .negotiated
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .map(|(_, d)| d);
    let resume = a.tls.as_ref().is_some_and(|t| t.resume);
    Ok(HsReport {
        mode: "handshakes".into(),
        target: a.target_str.clone(),
        tls: a.tls.is_some(),
        resume,
        concurrency: a.concurrency,
        threads,
        size: a.size,
        warmup_s: a.warmup.as_secs_f64(),
        duration_s: dur,
        completed: t.completed,
        conns_per_s: round(t.completed as f64 / dur, 1),
        handshakes_full: t.full,
        handshakes_resumed: t.resumed,
        resumed_share: (a.tls.is_some() && t.completed > 0)
            .then(|| round(t.resumed as f64 / t.completed as f64, 4)),
        failures_total: t.failures.iter().sum(),
        failures,
        unclean_closes: t.unclean_closes,
        negotiated,
        latency_us: HsLatency {
            tcp_connect_us: Rtt::from_ns(&t.tcp),
            tls_handshake_us: Rtt::from_ns(&t.tls),
            upgrade_us: Rtt::from_ns(&t.upgrade),
            connect_to_echo_us: Rtt::from_ns(&t.total),
        },
        server,
        client: "relay-bench handshakes (mio + rustls)".into(),
        loader_cpu_s: match (self_cpu0, self_cpu1) {
            (Some(x), Some(y)) => Some(round(y - x, 3)),
            _ => None,
        },
        stopped_by_max_seconds: stopped_by_cap,
    })
}

fn ns(d: Duration) -> u64 {
    (d.as_nanos() as u64).max(1)
}

impl Worker {
    fn run(mut self, _threads: usize) -> Result<Tally> {
        self.sh.started.fetch_add(1, Relaxed);
        let mut events = Events::with_capacity(1024);
        let mut last_sweep = Instant::now();
        while !self.sh.stop.load(Relaxed) && Instant::now() < self.win_end {
            for slot in std::mem::take(&mut self.pending) {
                self.start(slot);
            }
            // A slot whose start failed (e.g. EADDRNOTAVAIL) retries after a short pause.
            let wait = if self.pending.is_empty() { 20 } else { 1 };
            match self
                .poll
                .poll(&mut events, Some(Duration::from_millis(wait)))
            {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
            for ev in events.iter() {
                let idx = ev.token().0;
                let Some(c) = self.conns.get(idx) else {
                    continue;
                };
                if c.step == Step::Connect {
                    if ev.is_writable() || ev.is_error() || ev.is_read_closed() {
                        self.connected(idx);
                    }
                    continue;
                }
                if ev.is_writable() && !self.flush(idx) {
                    self.fail(idx, format_args!("write failed"));
                    continue;
                }
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    self.readable(idx);
                }
            }
            if last_sweep.elapsed() >= Duration::from_millis(100) {
                last_sweep = Instant::now();
                let now = Instant::now();
                let late: Vec<usize> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| now - c.t_start > self.a.connect_timeout)
                    .map(|(i, _)| i)
                    .collect();
                for idx in late {
                    let t = self.a.connect_timeout;
                    self.fail(idx, format_args!("timed out after {t:?}"));
                }
            }
        }
        self.conns.clear();
        Ok(self.t)
    }

    fn log(&mut self, step: Step, why: std::fmt::Arguments<'_>) {
        let i = step as usize;
        if self.logged[i] < LOG_LIMIT {
            self.logged[i] += 1;
            eprintln!("handshakes[{}]: {} failure: {why}", self.tid, step.name());
        }
    }

    /// Starts the slot's next connection.
    fn start(&mut self, slot: usize) {
        if self.sh.stop.load(Relaxed) {
            return;
        }
        let uid = self.next_uid;
        self.next_uid += self.a.threads.max(1) as u64;
        let src = self.a.sources.pick(uid);
        let t_start = Instant::now();
        let stream = match net::start_connect(self.a.target, src) {
            Ok(s) => s,
            Err(e) => {
                self.t.failures[Step::Connect as usize] += 1;
                self.log(Step::Connect, format_args!("{e}"));
                return self.pending.push(slot);
            }
        };
        let tls = match (&self.name, self.configs.get(slot)) {
            (Some(name), Some(cfg)) => match tls::connect(cfg, name) {
                Ok(c) => Some(Box::new(c)),
                Err(e) => {
                    self.t.failures[Step::Tls as usize] += 1;
                    self.log(Step::Tls, format_args!("client set-up: {e}"));
                    return self.pending.push(slot);
                }
            },
            _ => None,
        };
        let mut stream = TcpStream::from_std(stream);
        let entry = self.conns.vacant_entry();
        let idx = entry.key();
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(idx),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.t.failures[Step::Connect as usize] += 1;
            self.log(Step::Connect, format_args!("register: {e}"));
            return self.pending.push(slot);
        }
        entry.insert(Conn {
            stream,
            slot,
            uid,
            step: Step::Connect,
            tls,
            t_start,
            t_tcp: None,
            t_tls: None,
            t_upgraded: None,
            accept: String::new(),
            head: Vec::new(),
            dec: Decoder::new(false),
            echo_len: 0,
            echo_bad: false,
            ctl: Vec::new(),
            resumed: false,
        });
    }

    /// Removes a connection that failed at its current step, and restarts its slot.
    fn fail(&mut self, idx: usize, why: std::fmt::Arguments<'_>) {
        let mut c = self.conns.remove(idx);
        let _ = self.poll.registry().deregister(&mut c.stream);
        self.t.failures[c.step as usize] += 1;
        self.log(c.step, why);
        self.start(c.slot);
    }

    fn connected(&mut self, idx: usize) {
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
        let now = Instant::now();
        c.t_tcp = Some(now);
        if c.tls.is_some() {
            c.step = Step::Tls;
        } else {
            self.send_upgrade(idx);
        }
        if !self.flush(idx) {
            self.fail(idx, format_args!("write failed"));
        }
    }

    fn send_upgrade(&mut self, idx: usize) {
        let key = ws::random_key(&mut self.rng);
        let c = &mut self.conns[idx];
        c.accept = ws::accept_key(&key);
        c.step = Step::Upgrade;
        self.out
            .extend_from_slice(&ws::upgrade_request(&self.a.host, &self.a.path, &key));
    }

    /// Writes `out` (through TLS when there is a session) and whatever is pending.
    /// False if the socket failed.
    fn flush(&mut self, idx: usize) -> bool {
        let c = &mut self.conns[idx];
        let out = &mut self.out;
        match c.tls.as_mut() {
            Some(tls) => {
                if !out.is_empty() {
                    let ok = tls.writer().write_all(out).is_ok();
                    out.clear();
                    if !ok {
                        return false;
                    }
                }
                while tls.wants_write() {
                    match tls.write_tls(&mut c.stream) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return false,
                    }
                }
                true
            }
            None => {
                // Small writes on a fresh socket: the kernel takes them whole.
                let ok = out.is_empty() || matches!(c.stream.write(out), Ok(n) if n == out.len());
                out.clear();
                ok
            }
        }
    }

    fn readable(&mut self, idx: usize) {
        loop {
            let c = &mut self.conns[idx];
            let n = match c.stream.read(&mut self.buf) {
                Ok(0) => return self.eof(idx, "connection closed by the server"),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.fail(idx, format_args!("{e}")),
            };
            if self.conns[idx].tls.is_none() {
                let mut data = std::mem::take(&mut self.buf);
                let alive = self.plaintext(idx, &mut data[..n]);
                self.buf = data;
                if !alive {
                    return;
                }
                continue;
            }
            let mut off = 0;
            while off < n {
                let c = &mut self.conns[idx];
                let Conn { stream, tls, .. } = c;
                let tls = tls.as_mut().expect("TLS connection");
                match tls.read_tls(&mut &self.buf[off..n]) {
                    Ok(0) => return self.fail(idx, format_args!("read_tls took nothing")),
                    Ok(k) => off += k,
                    Err(e) => return self.fail(idx, format_args!("{e}")),
                }
                if let Err(e) = tls.process_new_packets() {
                    let _ = tls.write_tls(stream);
                    return self.fail(idx, format_args!("{e}"));
                }
                if c.step == Step::Tls && !tls.is_handshaking() {
                    let now = Instant::now();
                    c.t_tls = Some(now);
                    c.resumed = tls.handshake_kind() == Some(HandshakeKind::Resumed);
                    // The first handshake of the window describes the run (in a resumed run
                    // the warm-up's first ones are full); the first of all if none is.
                    let in_window = now >= self.win_start;
                    let mut first = self.sh.negotiated.lock().unwrap_or_else(|e| e.into_inner());
                    if first.as_ref().is_none_or(|(w, _)| !*w && in_window) {
                        *first = Some((in_window, tls::describe(tls)));
                    }
                    drop(first);
                    self.send_upgrade(idx);
                }
                loop {
                    let tls = self.conns[idx].tls.as_mut().expect("TLS connection");
                    let m = match tls.reader().read(&mut self.plain) {
                        Ok(0) => return self.eof(idx, "server sent close_notify"),
                        Ok(m) => m,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return self.fail(idx, format_args!("{e}")),
                    };
                    let mut data = std::mem::take(&mut self.plain);
                    let alive = self.plaintext(idx, &mut data[..m]);
                    self.plain = data;
                    if !alive {
                        return;
                    }
                }
                if !self.flush(idx) {
                    return self.fail(idx, format_args!("write failed"));
                }
            }
        }
    }

    /// The server ended the stream: the normal end while closing, a failure before.
    fn eof(&mut self, idx: usize, why: &str) {
        if self.conns[idx].step == Step::Close {
            self.t.unclean_closes += 1;
            self.done(idx);
        } else {
            self.fail(idx, format_args!("{why}"));
        }
    }

    /// Plaintext from the server. False if the connection is gone (done or failed).
    fn plaintext(&mut self, idx: usize, data: &mut [u8]) -> bool {
        let c = &mut self.conns[idx];
        let mut data = data;
        if c.step == Step::Upgrade {
            c.head.extend_from_slice(data);
            match ws::parse_upgrade_response(&c.head, c.accept.as_bytes()) {
                Ok(None) => return true,
                Err(e) => {
                    self.fail(idx, format_args!("{e}"));
                    return false;
                }
                Ok(Some(len)) => {
                    c.t_upgraded = Some(Instant::now());
                    c.step = Step::Echo;
                    // The rest of this read is already frames.
                    let used = len - (c.head.len() - data.len());
                    c.head = Vec::new();
                    data = &mut data[used..];
                    let seed = ws::pattern_seed(c.uid, 0);
                    let mask = self.rng.u32(..).to_ne_bytes();
                    ws::encode_header(
                        &mut self.out,
                        true,
                        op::BINARY,
                        Some(mask),
                        self.a.size as u64,
                    );
                    let start = self.out.len();
                    ws::fill_pattern(&mut self.out, seed, self.a.size);
                    ws::apply_mask(&mut self.out[start..], mask, 0);
                    if !self.flush(idx) {
                        self.fail(idx, format_args!("write failed"));
                        return false;
                    }
                }
            }
        }
        if data.is_empty() {
            return true;
        }
        let c = &mut self.conns[idx];
        let size = self.a.size as u64;
        let seed = ws::pattern_seed(c.uid, 0);
        let Conn {
            dec,
            step,
            echo_len,
            echo_bad,
            ctl,
            ..
        } = c;
        let mut echoed = false;
        let mut closed = false;
        let mut bad: Option<String> = None;
        let res = dec.feed(data, &mut |ev| {
            match ev {
                Event::Header(h) if h.opcode == op::CLOSE || h.opcode == op::PING => ctl.clear(),
                Event::Header(_) => {}
                Event::Payload { opcode, data, .. } => match opcode {
                    op::CLOSE | op::PING => ctl.extend_from_slice(data),
                    op::PONG => {}
                    _ => {
                        if *step != Step::Echo {
                            bad = Some("data after the echo".into());
                            return Flow::Stop;
                        }
                        if !*echo_bad && !ws::check_pattern(data, seed, *echo_len) {
                            *echo_bad = true;
                        }
                        *echo_len += data.len() as u64;
                    }
                },
                Event::End {
                    opcode,
                    message_end,
                } => {
                    if message_end {
                        if *echo_bad || *echo_len != size {
                            bad = Some(format!(
                                "echo differs from what was sent ({} bytes)",
                                *echo_len
                            ));
                            return Flow::Stop;
                        }
                        echoed = true;
                    } else if opcode == op::CLOSE {
                        if *step == Step::Echo {
                            bad = Some(format!("server closed before the echo ({ctl:?})"));
                        }
                        closed = true;
                        return Flow::Stop;
                    }
                }
            }
            Flow::Continue
        });
        if let Err(e) = res {
            self.fail(idx, format_args!("protocol error from the server: {e}"));
            return false;
        }
        if let Some(why) = bad {
            self.fail(idx, format_args!("{why}"));
            return false;
        }
        if echoed {
            let now = Instant::now();
            let c = &mut self.conns[idx];
            c.step = Step::Close;
            if let (Some(tcp), Some(up)) = (c.t_tcp, c.t_upgraded) {
                if self.win_start <= now && now < self.win_end {
                    self.t.tcp.saturating_record(ns(tcp - c.t_start));
                    let hs_end = c.t_tls.unwrap_or(tcp);
                    if let Some(tls) = c.t_tls {
                        self.t.tls.saturating_record(ns(tls - tcp));
                    }
                    self.t.upgrade.saturating_record(ns(up - hs_end));
                    self.t.total.saturating_record(ns(now - c.t_start));
                }
            }
            let mask = self.rng.u32(..).to_ne_bytes();
            ws::encode_frame(
                &mut self.out,
                true,
                op::CLOSE,
                Some(mask),
                &1000u16.to_be_bytes(),
            );
            if !self.flush(idx) {
                self.fail(idx, format_args!("write failed"));
                return false;
            }
        }
        if closed {
            self.done(idx);
            return false;
        }
        true
    }

    /// The connection went through every step: count it, close it, start the next one.
    fn done(&mut self, idx: usize) {
        let mut c = self.conns.remove(idx);
        if let Some(tls) = c.tls.as_mut() {
            tls.send_close_notify();
            let _ = tls.write_tls(&mut c.stream);
        }
        let _ = self.poll.registry().deregister(&mut c.stream);
        let now = Instant::now();
        if self.win_start <= now && now < self.win_end {
            self.t.completed += 1;
            if c.tls.is_some() {
                if c.resumed {
                    self.t.resumed += 1;
                } else {
                    self.t.full += 1;
                }
            }
        } else {
            self.t.completed_outside += 1;
        }
        let slot = c.slot;
        drop(c);
        self.start(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_split_over_threads() {
        assert_eq!(
            (0..3).map(|t| split(10, 3, t)).collect::<Vec<_>>(),
            [4, 3, 3]
        );
        assert_eq!((0..4).map(|t| split(2, 4, t)).sum::<usize>(), 2);
    }

    #[test]
    fn exit_codes() {
        let mut r = HsReport {
            mode: "handshakes".into(),
            target: "t".into(),
            tls: true,
            resume: true,
            concurrency: 1,
            threads: 1,
            size: 32,
            warmup_s: 0.0,
            duration_s: 1.0,
            completed: 100,
            conns_per_s: 100.0,
            handshakes_full: 0,
            handshakes_resumed: 100,
            resumed_share: Some(1.0),
            failures: Default::default(),
            failures_total: 0,
            unclean_closes: 0,
            negotiated: None,
            latency_us: HsLatency {
                tcp_connect_us: Rtt::default(),
                tls_handshake_us: Rtt::default(),
                upgrade_us: Rtt::default(),
                connect_to_echo_us: Rtt::default(),
            },
            server: None,
            client: String::new(),
            loader_cpu_s: None,
            stopped_by_max_seconds: false,
        };
        assert_eq!(r.exit_code(), 0);
        r.resumed_share = Some(0.5);
        assert_eq!(r.exit_code(), 1, "asked to resume, half were full");
        r.resume = false;
        r.handshakes_resumed = 1;
        assert_eq!(r.exit_code(), 1, "full run that resumed");
        r.completed = 0;
        assert_eq!(r.exit_code(), 3);
        assert!(r.summary().contains("handshakes"));
    }
}
