//! `rooms`: fan-out benchmark for relay's pub/sub rooms (`app = "rooms"` routes).
//!
//! One process opens `--members` WebSocket members in one room, on a few mio event-loop
//! threads with the same compact per-connection records as `load` (no buffer per idle
//! member: reads go to a per-thread scratch buffer, frames stream through the decoder and
//! only the first [`HEAD`] bytes of each message are kept). Then:
//!
//! - `publish`: the leader POSTs `--count` messages to the admin publish API, one every
//!   `--interval`; every member records how long each one took to reach it.
//! - `chatter`: members send `--rate` messages per second in all (round-robin over the
//!   members) for `--duration` seconds; every member receives every other member's
//!   messages; deliveries per second and their delay are recorded.
//!
//! A room bigger than one process's descriptor limit is held by several processes: all
//! get the same `--room-members` (the room's total), the first one leads (waits for the
//! relay's `GET /v1/rooms` to show the whole room, publishes, starts the chatter window
//! with a "go" message through the room itself, samples the relay's CPU and RSS), the
//! others get `--follower`. `rooms-merge` combines their JSON files.
//!
//! Every message carries a 24-byte stamp: magic, kind, sender, sequence number and the
//! send time on a clock all loader processes on this machine share ([`Clock`]).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream as StdStream};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde::{Deserialize, Serialize};
use slab::Slab;

use crate::net::{self, Sources};
use crate::report::{self, Rtt as HdrRtt};
use crate::ws::{self, op, Decoder, Event, Flow};

const SCRATCH: usize = 256 * 1024;
const READS_PER_TURN: usize = 8;
const CONNECTS_PER_TURN: u64 = 256;
const LOG_LIMIT: u32 = 3;

/// Stamp at the front of every message the benchmark sends.
pub const HEAD: usize = 24;
const MAGIC: [u8; 4] = *b"RBR1";
const KIND_PUBLISH: u8 = 1;
const KIND_CHATTER: u8 = 2;
/// Chatter start signal from the leader: `t_ns` = window start, `seq` = window length (ms).
const KIND_GO: u8 = 3;
/// Lead time between the "go" message and the start of the chatter window, so that every
/// loader process has it before the window opens.
const GO_LEAD: Duration = Duration::from_millis(1000);
/// Chatter: the drain after the window ends once no delivery arrived for this long.
const QUIET: Duration = Duration::from_secs(2);
/// Linux's USER_HZ (the unit of utime/stime in /proc/PID/stat) on every architecture
/// relay runs on.
const USER_HZ: f64 = 100.0;

// ---------------------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Publish {
        count: u32,
        interval: Duration,
    },
    Chatter {
        duration: Duration,
        /// Messages per second over the whole room (all processes).
        rate: f64,
    },
}

impl Mode {
    fn name(&self) -> &'static str {
        match self {
            Mode::Publish { .. } => "publish",
            Mode::Chatter { .. } => "chatter",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RoomsArgs {
    pub target: SocketAddr,
    pub target_str: String,
    pub host: String,
    /// Upgrade path, e.g. `/rooms/bench`.
    pub path: String,
    pub room: String,
    pub admin: SocketAddr,
    pub token: String,
    /// Members this process opens.
    pub members: u64,
    /// Members of the room over all loader processes.
    pub room_members: u64,
    /// Global number of this process's first member (sender ids, source addresses).
    pub first_member: u64,
    pub follower: bool,
    pub mode: Mode,
    /// Payload bytes of every message (at least [`HEAD`]).
    pub size: usize,
    pub threads: usize,
    pub sources: Sources,
    pub rate: f64,
    pub max_pending: u64,
    pub connect_timeout: Duration,
    /// How long the leader waits for `GET /v1/rooms` to show the whole room.
    pub room_wait: Duration,
    /// After the last publish (or the chatter window): longest wait for stragglers.
    pub settle: Duration,
    pub relay_pid: Option<u32>,
    pub max_seconds: u64,
}

// ---------------------------------------------------------------------------------------
// Stamps and the shared clock
// ---------------------------------------------------------------------------------------

/// A clock every loader process on one machine reads alike: CLOCK_REALTIME read once at
/// start, advanced by CLOCK_MONOTONIC (`Instant`) from then on. Two processes agree to
/// within whatever step the realtime clock took between their starts (none in practice;
/// NTP slewing moves both clocks alike), and a step during the run changes nothing.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
    anchor_ns: u64,
}

impl Clock {
    pub fn new() -> Clock {
        let anchor_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Clock {
            base: Instant::now(),
            anchor_ns,
        }
    }
    pub fn now_ns(&self) -> u64 {
        self.anchor_ns + self.base.elapsed().as_nanos() as u64
    }
    /// The `Instant` at which this clock reads `ns`.
    fn instant_at(&self, ns: u64) -> Instant {
        self.base + Duration::from_nanos(ns.saturating_sub(self.anchor_ns))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub kind: u8,
    pub sender: u32,
    pub seq: u32,
    pub t_ns: u64,
}

/// Appends a payload of `size` bytes (at least [`HEAD`]) starting with the stamp.
pub fn encode_stamp(out: &mut Vec<u8>, s: &Stamp, size: usize) {
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[s.kind, 0, 0, 0]);
    out.extend_from_slice(&s.sender.to_le_bytes());
    out.extend_from_slice(&s.seq.to_le_bytes());
    out.extend_from_slice(&s.t_ns.to_le_bytes());
    out.resize(out.len() + size.saturating_sub(HEAD), b'.');
}

pub fn decode_stamp(b: &[u8]) -> Option<Stamp> {
    if b.len() < HEAD || b[..4] != MAGIC {
        return None;
    }
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let mut t = [0u8; 8];
    t.copy_from_slice(&b[16..24]);
    Some(Stamp {
        kind: b[4],
        sender: u32_at(8),
        seq: u32_at(12),
        t_ns: u64::from_le_bytes(t),
    })
}

// ---------------------------------------------------------------------------------------
// Admin API and /proc
// ---------------------------------------------------------------------------------------

/// One HTTP/1.1 exchange with `Connection: close`: returns the status and the body.
fn http(admin: SocketAddr, req: &[u8]) -> io::Result<(u16, Vec<u8>)> {
    let mut s = StdStream::connect_timeout(&admin, Duration::from_secs(2))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(req)?;
    let mut buf = Vec::with_capacity(512);
    s.read_to_end(&mut buf)?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&buf) {
        Ok(httparse::Status::Complete(n)) => Ok((resp.code.unwrap_or(0), buf[n..].to_vec())),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "malformed HTTP answer from the admin listener",
        )),
    }
}

/// `POST /v1/rooms/{room}/messages` with a binary body.
pub fn publish(admin: SocketAddr, token: &str, room: &str, body: &[u8]) -> io::Result<u16> {
    let mut req = format!(
        "POST /v1/rooms/{room}/messages HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    http(admin, &req).map(|(code, _)| code)
}

/// Members of `room` as `GET /v1/rooms` shows them (0 if the room is not listed).
pub fn room_members(admin: SocketAddr, token: &str, room: &str) -> Result<u64> {
    let req = format!(
        "GET /v1/rooms HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    let (code, body) = http(admin, req.as_bytes()).context("GET /v1/rooms")?;
    if code != 200 {
        bail!("GET /v1/rooms answered {code}");
    }
    let v: serde_json::Value = serde_json::from_slice(&body).context("GET /v1/rooms: JSON")?;
    Ok(v["rooms"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"].as_str() == Some(room))
        .and_then(|r| r["members"].as_u64())
        .unwrap_or(0))
}

/// utime + stime of a process (all its threads), in seconds.
pub fn proc_cpu_s(pid: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ut: u64 = f.get(11)?.parse().ok()?;
    let st: u64 = f.get(12)?.parse().ok()?;
    Some((ut + st) as f64 / USER_HZ)
}

/// Time a process's threads spent runnable but waiting for a CPU, in seconds (sum of the
/// second field of /proc/PID/task/*/schedstat): how much other work disturbed it.
pub fn proc_runq_wait_s(pid: &str) -> Option<f64> {
    let mut ns = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let s = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        ns += s
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(ns as f64 / 1e9)
}

/// Machine-wide CPU time from the first line of /proc/stat, in seconds:
/// (busy excluding softirq, softirq, idle + iowait).
pub fn machine_cpu_s() -> Option<(f64, f64, f64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = s
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let g = |i: usize| f.get(i).copied().unwrap_or(0) as f64 / USER_HZ;
    Some((g(0) + g(1) + g(2) + g(5) + g(7), g(6), g(3) + g(4)))
}

/// utime+stime of the kernel's ksoftirqd threads (softirq work deferred out of the
/// context that raised it, e.g. loopback TCP under load), in seconds.
pub fn ksoftirqd_cpu_s() -> Option<f64> {
    let mut total = 0.0;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.starts_with("ksoftirqd/") {
            total += proc_cpu_s(pid).unwrap_or(0.0);
        }
    }
    Some(total)
}

/// Machine-wide CPU over a measured phase.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct MachineSample {
    /// user + nice + system + irq + steal, all CPUs.
    pub busy_s: f64,
    /// softirq. With tick-based CPU accounting (CONFIG_IRQ_TIME_ACCOUNTING off) a tick
    /// that lands in softirq is also charged to the current task's stime, so this
    /// overlaps the processes' utime+stime.
    pub softirq_s: f64,
    pub idle_s: f64,
    /// ksoftirqd threads' utime+stime (softirq work of ours deferred to them).
    pub ksoftirqd_s: f64,
}

type MachineRaw = (Option<(f64, f64, f64)>, Option<f64>);

fn machine_now() -> MachineRaw {
    (machine_cpu_s(), ksoftirqd_cpu_s())
}

fn machine_delta(a: MachineRaw, b: MachineRaw) -> Option<MachineSample> {
    let (a0, b0) = (a.0?, b.0?);
    Some(MachineSample {
        busy_s: round3(b0.0 - a0.0),
        softirq_s: round3(b0.1 - a0.1),
        idle_s: round3(b0.2 - a0.2),
        ksoftirqd_s: round3(b.1.unwrap_or(0.0) - a.1.unwrap_or(0.0)),
    })
}

// ---------------------------------------------------------------------------------------
// Result records
// ---------------------------------------------------------------------------------------

/// The relay process as the leader saw it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RelaySample {
    pub pid: u32,
    /// VmRSS when this (leader) process started, before it connected.
    pub rss_kib_start: Option<u64>,
    /// VmRSS once the whole room was open (idle members).
    pub rss_kib_open: Option<u64>,
    /// VmRSS and VmHWM at the end of the run.
    pub rss_kib_end: Option<u64>,
    pub hwm_kib_end: Option<u64>,
    /// utime+stime over the measured phase (publish: first POST to the end of the
    /// settle; chatter: the window).
    pub cpu_s: Option<f64>,
    /// Time the relay's threads waited for a CPU over the same phase.
    pub runq_wait_s: Option<f64>,
    pub phase_s: f64,
    /// The whole machine over the same phase.
    pub machine: Option<MachineSample>,
}

/// What one loader process measured; `rooms-merge` adds these up.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Raw {
    pub leader: bool,
    pub first_member: u64,
    pub threads: u64,
    pub members_requested: u64,
    /// Members open when the measured phase began.
    pub members_open: u64,
    pub connect_failures: u64,
    pub handshake_failures: u64,
    /// Open members lost (server close, reset, protocol error).
    pub errors: u64,
    /// Close frames from the relay, by close code.
    pub closes: BTreeMap<String, u64>,
    pub ramp_seconds: f64,
    /// Benchmark messages received by members (publish: distinct; chatter: all).
    pub deliveries: u64,
    /// Chatter: deliveries received inside the window.
    pub deliveries_in_window: u64,
    pub duplicates: u64,
    /// Chatter: a member received its own message.
    pub self_deliveries: u64,
    /// Messages without our stamp or with an unknown sequence number.
    pub foreign_messages: u64,
    /// Deliveries stamped later than they arrived (a clock problem); counted as 1 ns.
    pub clock_anomalies: u64,
    /// Chatter messages sent by this process's members.
    pub sent: u64,
    /// Per member, publish: distinct publishes received; chatter: received + sent.
    /// Value -> number of members (JSON keys are strings).
    pub member_totals: BTreeMap<String, u64>,
    /// Publish: per sequence number, the latest arrival over this process's members (ns)
    /// and how many of them got it.
    pub per_publish_max_ns: Vec<u64>,
    pub per_publish_members: Vec<u64>,
    /// Delivery delays (ns) as (value, count) pairs of an HDR histogram.
    pub delay_hist_ns: Vec<(u64, u64)>,
    // ---- leader only
    pub room_members_seen: u64,
    pub published: u64,
    pub publish_failures: u64,
    pub post_rtt_hist_ns: Vec<(u64, u64)>,
    pub window_s: f64,
    pub drain_s: f64,
    pub relay: Option<RelaySample>,
    // ---- this process
    pub loader_rss_kib_start: Option<u64>,
    pub loader_rss_kib_open: Option<u64>,
    /// This process's utime+stime over the measured phase (publish: from the first
    /// publish it saw, or posted; chatter: the window).
    pub loader_cpu_s: Option<f64>,
    pub stopped_by_max_seconds: bool,
}

/// Publish-mode figures over the whole room.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PublishFigures {
    pub count: u64,
    pub interval_ms: f64,
    /// POSTs answered 2xx.
    pub published: u64,
    pub publish_failures: u64,
    /// Per publish: the time until every member had it (the latest member), over the
    /// publishes every member got.
    pub all_members_us: Rtt,
    /// Per delivery: the time until one member had it.
    pub per_member_us: Rtt,
    /// POST round trip (connect, request, 202) seen by the publisher.
    pub post_rtt_us: Rtt,
    pub deliveries: u64,
    pub expected_deliveries: u64,
    pub missing: u64,
    pub duplicates: u64,
    /// Publishes that did not reach every member.
    pub incomplete_publishes: u64,
    /// Per publish, in order: the latest member's delay (µs) and members reached.
    pub per_publish_all_us: Vec<f64>,
    pub per_publish_members: Vec<u64>,
}

/// Chatter-mode figures over the whole room.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChatterFigures {
    /// Offered: messages per second over the room.
    pub rate: f64,
    pub window_s: f64,
    pub drain_s: f64,
    pub sent: u64,
    pub deliveries: u64,
    pub deliveries_in_window: u64,
    /// deliveries_in_window / window_s: frames received by all members per second.
    pub deliveries_per_s: f64,
    /// sent x (members - 1).
    pub expected_deliveries: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub self_deliveries: u64,
    pub delay_us: Rtt,
}

/// Relay cost figures (from the leader's samples).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RelayFigures {
    pub pid: u32,
    pub cpu_s: Option<f64>,
    /// Time the relay's threads were runnable but waited for a CPU (other work: the
    /// loaders, or anything else on the machine).
    pub runq_wait_s: Option<f64>,
    /// cpu_s / phase length: cores the relay kept busy.
    pub cores_busy: Option<f64>,
    /// Relay CPU per delivered message (µs).
    pub cpu_us_per_delivery: Option<f64>,
    /// Deliveries per relay CPU-second ("per core").
    pub deliveries_per_core_s: Option<f64>,
    pub rss_kib_start: Option<u64>,
    pub rss_kib_open: Option<u64>,
    pub rss_kib_end: Option<u64>,
    pub hwm_kib_end: Option<u64>,
    /// (rss_kib_open - rss_kib_start) / members: relay memory per idle member (bytes).
    /// Only meaningful when the leader started before any member connected.
    pub rss_bytes_per_member: Option<f64>,
    /// Machine-wide CPU over the phase.
    pub machine: Option<MachineSample>,
    /// Machine busy time (softirq included) not spent by the relay, the loaders or
    /// ksoftirqd, as a share of all CPUs over the phase: other work that disturbed the run.
    pub other_cpu_share: Option<f64>,
}

/// The JSON `rooms` and `rooms-merge` print: figures over every process in `raw`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoomsReport {
    pub mode: String,
    pub room: String,
    pub target: String,
    pub client: String,
    pub size: u64,
    pub processes: u64,
    pub threads: u64,
    pub room_members_expected: u64,
    /// What GET /v1/rooms showed before the measured phase (leader).
    pub room_members_seen: u64,
    pub members_requested: u64,
    pub members_open: u64,
    /// True when `raw` covers the whole room (every process, one leader); missing and
    /// duplicate counts are only computed then.
    pub complete: bool,
    pub connect_failures: u64,
    pub handshake_failures: u64,
    pub errors: u64,
    pub closes: BTreeMap<String, u64>,
    pub foreign_messages: u64,
    pub clock_anomalies: u64,
    pub ramp_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish: Option<PublishFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chatter: Option<ChatterFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayFigures>,
    /// Loader memory per member, (RSS open - RSS start) / members, averaged over processes.
    pub loader_rss_bytes_per_member: Option<f64>,
    /// Loader processes' utime+stime over the measured phase, summed.
    pub loader_cpu_s: Option<f64>,
    pub stopped_by_max_seconds: bool,
    // Settings echoed for merging.
    pub count: u64,
    pub interval_ms: f64,
    pub rate: f64,
    pub raw: Vec<Raw>,
}

/// Percentiles in µs (the same fields as `load`'s `rtt_us`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Rtt {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Rtt {
    fn from_ns(h: &Histogram<u64>) -> Rtt {
        let r = HdrRtt::from_ns(h);
        Rtt {
            p50: r.p50,
            p90: r.p90,
            p99: r.p99,
            p999: r.p999,
            max: r.max,
        }
    }
}

fn hist_pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

fn hist_from_pairs<'a>(it: impl Iterator<Item = &'a (u64, u64)>) -> Histogram<u64> {
    let mut h = report::new_histogram();
    for &(v, c) in it {
        let _ = h.record_n(v.max(1), c);
    }
    h
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Nearest-rank percentile of an already sorted list.
fn pct(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Exact percentiles of a small list of nanosecond values, in µs.
fn rtt_of_list(ns: &[u64]) -> Rtt {
    let mut v = ns.to_vec();
    v.sort_unstable();
    let us = |x: u64| (x as f64 / 100.0).round() / 10.0;
    Rtt {
        p50: us(pct(&v, 0.50)),
        p90: us(pct(&v, 0.90)),
        p99: us(pct(&v, 0.99)),
        p999: us(pct(&v, 0.999)),
        max: us(v.last().copied().unwrap_or(0)),
    }
}

impl RoomsReport {
    /// Computes the room-wide figures from per-process records (`template` gives the
    /// settings: mode, room, target, size, count, interval, rate, room_members_expected).
    pub fn finalize(template: &RoomsReport, raws: Vec<Raw>) -> RoomsReport {
        let mut r = RoomsReport {
            mode: template.mode.clone(),
            room: template.room.clone(),
            target: template.target.clone(),
            client: "relay-bench rooms (mio)".into(),
            size: template.size,
            count: template.count,
            interval_ms: template.interval_ms,
            rate: template.rate,
            room_members_expected: template.room_members_expected,
            processes: raws.len() as u64,
            ..Default::default()
        };
        let leaders: Vec<&Raw> = raws.iter().filter(|x| x.leader).collect();
        let leader = leaders.first().copied();
        let mut cpu = 0.0;
        let mut cpu_n = 0;
        let (mut rss_per, mut rss_n) = (0.0, 0);
        for x in &raws {
            r.threads += x.threads;
            r.members_requested += x.members_requested;
            r.members_open += x.members_open;
            r.connect_failures += x.connect_failures;
            r.handshake_failures += x.handshake_failures;
            r.errors += x.errors;
            for (k, v) in &x.closes {
                *r.closes.entry(k.clone()).or_default() += v;
            }
            r.foreign_messages += x.foreign_messages;
            r.clock_anomalies += x.clock_anomalies;
            r.ramp_seconds = r.ramp_seconds.max(x.ramp_seconds);
            r.stopped_by_max_seconds |= x.stopped_by_max_seconds;
            if let Some(c) = x.loader_cpu_s {
                cpu += c;
                cpu_n += 1;
            }
            if let (Some(a), Some(b)) = (x.loader_rss_kib_start, x.loader_rss_kib_open) {
                if x.members_open > 0 {
                    rss_per += (b as f64 - a as f64) * 1024.0 / x.members_open as f64;
                    rss_n += 1;
                }
            }
        }
        r.loader_cpu_s = (cpu_n > 0).then(|| round3(cpu));
        r.loader_rss_bytes_per_member = (rss_n > 0).then(|| round3(rss_per / rss_n as f64));
        r.room_members_seen = leader.map_or(0, |l| l.room_members_seen);
        r.complete = leaders.len() == 1 && r.members_requested == r.room_members_expected;
        let delays = hist_from_pairs(raws.iter().flat_map(|x| x.delay_hist_ns.iter()));
        let totals = |published: u64| {
            let (mut missing, mut extra) = (0u64, 0u64);
            for x in &raws {
                for (k, c) in &x.member_totals {
                    let v: u64 = k.parse().unwrap_or(0);
                    missing += published.saturating_sub(v) * c;
                    extra += v.saturating_sub(published) * c;
                }
            }
            (missing, extra)
        };
        let deliveries: u64 = raws.iter().map(|x| x.deliveries).sum();
        let mut relay_deliveries = deliveries;
        if r.mode == "publish" {
            let k = raws
                .iter()
                .map(|x| x.per_publish_max_ns.len())
                .max()
                .unwrap_or(0);
            let mut all = vec![0u64; k];
            let mut reached = vec![0u64; k];
            for x in &raws {
                for (i, (&m, &n)) in x
                    .per_publish_max_ns
                    .iter()
                    .zip(&x.per_publish_members)
                    .enumerate()
                {
                    all[i] = all[i].max(m);
                    reached[i] += n;
                }
            }
            let published = leader.map_or(0, |l| l.published);
            let complete_all: Vec<u64> = all
                .iter()
                .zip(&reached)
                .filter(|(_, &n)| n > 0 && n >= r.members_open)
                .map(|(&m, _)| m)
                .collect();
            let duplicates: u64 = raws.iter().map(|x| x.duplicates).sum();
            let (missing, extra) = if r.complete {
                totals(published)
            } else {
                (0, 0)
            };
            r.publish = Some(PublishFigures {
                count: r.count,
                interval_ms: r.interval_ms,
                published,
                publish_failures: leader.map_or(0, |l| l.publish_failures),
                all_members_us: rtt_of_list(&complete_all),
                per_member_us: Rtt::from_ns(&delays),
                post_rtt_us: Rtt::from_ns(&hist_from_pairs(
                    leader.iter().flat_map(|l| l.post_rtt_hist_ns.iter()),
                )),
                deliveries,
                expected_deliveries: published * r.members_open,
                missing,
                duplicates: duplicates + extra,
                incomplete_publishes: reached
                    .iter()
                    .take(published as usize)
                    .filter(|&&n| n < r.members_open)
                    .count() as u64,
                per_publish_all_us: all
                    .iter()
                    .map(|&m| (m as f64 / 100.0).round() / 10.0)
                    .collect(),
                per_publish_members: reached,
            });
        } else {
            let sent: u64 = raws.iter().map(|x| x.sent).sum();
            let in_window: u64 = raws.iter().map(|x| x.deliveries_in_window).sum();
            relay_deliveries = in_window;
            let window_s = leader.map_or(0.0, |l| l.window_s);
            let (missing, extra) = if r.complete { totals(sent) } else { (0, 0) };
            r.chatter = Some(ChatterFigures {
                rate: r.rate,
                window_s: round3(window_s),
                drain_s: round3(leader.map_or(0.0, |l| l.drain_s)),
                sent,
                deliveries,
                deliveries_in_window: in_window,
                deliveries_per_s: if window_s > 0.0 {
                    round3(in_window as f64 / window_s)
                } else {
                    0.0
                },
                expected_deliveries: sent * r.members_open.saturating_sub(1),
                missing,
                duplicates: extra,
                self_deliveries: raws.iter().map(|x| x.self_deliveries).sum(),
                delay_us: Rtt::from_ns(&delays),
            });
        }
        if let Some(rs) = leader.and_then(|l| l.relay.as_ref()) {
            let cpu = rs.cpu_s;
            r.relay = Some(RelayFigures {
                pid: rs.pid,
                cpu_s: cpu.map(round3),
                runq_wait_s: rs.runq_wait_s.map(round3),
                cores_busy: cpu
                    .filter(|_| rs.phase_s > 0.0)
                    .map(|c| round3(c / rs.phase_s)),
                cpu_us_per_delivery: cpu
                    .filter(|_| relay_deliveries > 0)
                    .map(|c| round3(c * 1e6 / relay_deliveries as f64)),
                deliveries_per_core_s: cpu
                    .filter(|&c| c > 0.0)
                    .map(|c| round3(relay_deliveries as f64 / c)),
                rss_kib_start: rs.rss_kib_start,
                rss_kib_open: rs.rss_kib_open,
                rss_kib_end: rs.rss_kib_end,
                hwm_kib_end: rs.hwm_kib_end,
                rss_bytes_per_member: match (rs.rss_kib_start, rs.rss_kib_open) {
                    (Some(a), Some(b)) if r.members_open > 0 => Some(round3(
                        (b as f64 - a as f64) * 1024.0 / r.members_open as f64,
                    )),
                    _ => None,
                },
                machine: rs.machine,
                other_cpu_share: match (rs.machine, cpu) {
                    (Some(m), Some(c)) if rs.phase_s > 0.0 => {
                        let cpus = (m.busy_s + m.softirq_s + m.idle_s) / rs.phase_s;
                        let other = m.busy_s + m.softirq_s
                            - c
                            - r.loader_cpu_s.unwrap_or(0.0)
                            - m.ksoftirqd_s;
                        Some(round3((other / (rs.phase_s * cpus.max(1.0))).max(0.0)))
                    }
                    _ => None,
                },
            });
        }
        r.raw = raws;
        r
    }

    /// Human summary for stderr.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "== {} {} room {:?} -> {} ({} process(es), {} thread(s))\n",
            self.client, self.mode, self.room, self.target, self.processes, self.threads
        );
        s += &format!(
            "members: requested {}  open {}  room expected {}  seen {}  connect failures {}  \
             handshake failures {}  ramp {:.2} s\n",
            self.members_requested,
            self.members_open,
            self.room_members_expected,
            self.room_members_seen,
            self.connect_failures,
            self.handshake_failures,
            self.ramp_seconds
        );
        if let Some(p) = &self.publish {
            s += &format!(
                "publishes: {}/{} posted ({} failed), every {} ms; deliveries {} of {}  \
                 missing {}  duplicates {}  incomplete publishes {}\n",
                p.published,
                p.count,
                p.publish_failures,
                p.interval_ms,
                p.deliveries,
                p.expected_deliveries,
                p.missing,
                p.duplicates,
                p.incomplete_publishes
            );
            let a = &p.all_members_us;
            let m = &p.per_member_us;
            s += &format!(
                "until every member had it, us: p50 {}  p99 {}  max {}\n",
                a.p50, a.p99, a.max
            );
            s += &format!(
                "per member delivery, us:      p50 {}  p99 {}  max {}\n",
                m.p50, m.p99, m.max
            );
            s += &format!("POST round trip, us: p50 {}\n", p.post_rtt_us.p50);
        }
        if let Some(c) = &self.chatter {
            s += &format!(
                "chatter: {} msg/s offered, window {:.2} s (+{:.2} s drain): sent {}  \
                 deliveries {} ({} in window = {:.0}/s)  expected {}  missing {}  \
                 duplicates {}  own echoes {}\n",
                c.rate,
                c.window_s,
                c.drain_s,
                c.sent,
                c.deliveries,
                c.deliveries_in_window,
                c.deliveries_per_s,
                c.expected_deliveries,
                c.missing,
                c.duplicates,
                c.self_deliveries
            );
            let d = &c.delay_us;
            s += &format!(
                "delivery delay, us: p50 {}  p99 {}  max {}\n",
                d.p50, d.p99, d.max
            );
        }
        if let Some(r) = &self.relay {
            s += &format!(
                "relay pid {}: cpu {} s ({} cores busy, waited {} s for a CPU), {} us per \
                 delivery, {} deliveries per core-second\n",
                r.pid,
                opt(r.cpu_s),
                opt(r.cores_busy),
                opt(r.runq_wait_s),
                opt(r.cpu_us_per_delivery),
                opt(r.deliveries_per_core_s.map(f64::round)),
            );
            s += &format!(
                "relay VmRSS KiB: start {}  room open {}  end {}  peak {}  ({} B per member)\n",
                opt(r.rss_kib_start),
                opt(r.rss_kib_open),
                opt(r.rss_kib_end),
                opt(r.hwm_kib_end),
                opt(r.rss_bytes_per_member.map(f64::round)),
            );
            if let Some(m) = r.machine {
                s += &format!(
                    "machine CPU over the phase: busy {} s, softirq {} s, idle {} s, ksoftirqd {} s; \
                     other work {}\n",
                    m.busy_s,
                    m.softirq_s,
                    m.idle_s,
                    m.ksoftirqd_s,
                    r.other_cpu_share
                        .map_or("-".into(), |o| format!("{:.1} % of the CPUs", o * 100.0)),
                );
            }
        }
        s += &format!(
            "errors {}  closes {:?}  foreign messages {}  clock anomalies {}  loader cpu {} s  \
             loader RSS per member {} B{}{}\n",
            self.errors,
            self.closes,
            self.foreign_messages,
            self.clock_anomalies,
            opt(self.loader_cpu_s),
            opt(self.loader_rss_bytes_per_member.map(f64::round)),
            if self.complete {
                ""
            } else {
                "  (partial: one process of a bigger room; merge with rooms-merge)"
            },
            if self.stopped_by_max_seconds {
                "  (stopped by --max-seconds)"
            } else {
                ""
            }
        );
        s
    }

    pub fn emit(&self, json: Option<&str>) -> Result<()> {
        eprint!("{}", self.summary());
        if let Some(path) = json {
            let text = serde_json::to_string_pretty(self)? + "\n";
            if path == "-" {
                let mut out = std::io::stdout().lock();
                out.write_all(text.as_bytes())?;
                out.flush()?;
            } else {
                std::fs::write(path, text).with_context(|| format!("writing --json {path}"))?;
            }
        }
        Ok(())
    }

    /// 0 ok; 1 missing, duplicate, foreign or own deliveries, or a failed publish;
    /// 3 nothing opened.
    pub fn exit_code(&self) -> i32 {
        if self.members_requested > 0 && self.members_open == 0 {
            return 3;
        }
        let bad_pub = self
            .publish
            .as_ref()
            .is_some_and(|p| p.missing > 0 || p.duplicates > 0 || p.publish_failures > 0);
        let bad_chat = self
            .chatter
            .as_ref()
            .is_some_and(|c| c.missing > 0 || c.duplicates > 0 || c.self_deliveries > 0);
        i32::from(bad_pub || bad_chat || self.foreign_messages > 0)
    }
}

/// `rooms-merge`: combines the JSON of the processes that held one room.
pub fn merge(files: &[String]) -> Result<RoomsReport> {
    let mut raws = Vec::new();
    let mut template: Option<RoomsReport> = None;
    for f in files {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {f}"))?;
        let mut r: RoomsReport =
            serde_json::from_str(&text).with_context(|| format!("{f}: not a rooms report"))?;
        if let Some(t) = &template {
            if t.mode != r.mode || t.room != r.room {
                bail!(
                    "{f}: a {} run of room {:?}, not {} {:?}",
                    r.mode,
                    r.room,
                    t.mode,
                    t.room
                );
            }
        }
        let has_leader = r.raw.iter().any(|x| x.leader);
        raws.append(&mut r.raw);
        if template.is_none() || has_leader {
            template = Some(r);
        }
    }
    let t = template.ok_or_else(|| anyhow!("no input files"))?;
    Ok(RoomsReport::finalize(&t, raws))
}

// ---------------------------------------------------------------------------------------
// The event loop
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    go_ramp: AtomicBool,
    inited: AtomicUsize,
    ramped: AtomicUsize,
    open: AtomicI64,
    opened: AtomicU64,
    attempted: AtomicU64,
    connect_failures: AtomicU64,
    handshake_failures: AtomicU64,
    errors: AtomicU64,
    /// Chatter window on the shared clock (0 = not known yet).
    window_start: AtomicU64,
    window_end: AtomicU64,
    /// Clock time of the first publish any member here saw (0 = none yet).
    first_publish: AtomicU64,
    /// Members that have received the last publish.
    complete: AtomicU64,
    deliveries: AtomicU64,
    sent: AtomicU64,
}

impl Shared {
    fn set_window(&self, start: u64, len_ms: u64) {
        if self
            .window_start
            .compare_exchange(0, start, Relaxed, Relaxed)
            .is_ok()
        {
            self.window_end.store(start + len_ms * 1_000_000, Relaxed);
        }
    }
    fn window(&self) -> Option<(u64, u64)> {
        let s = self.window_start.load(Relaxed);
        let e = self.window_end.load(Relaxed);
        (s != 0 && e != 0).then_some((s, e))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Handshaking,
    Open,
}

/// Boxed state that exists only while needed.
#[derive(Default)]
struct Extra {
    accept: Vec<u8>,
    head: Vec<u8>,
    pend: Vec<u8>,
    pend_pos: usize,
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

/// One member: 128 bytes, no buffer while idle.
struct Member {
    stream: TcpStream,
    serial: u32,
    /// Global member number (sender id in chatter stamps).
    gid: u32,
    phase: Phase,
    since_ms: u32,
    dec: Decoder,
    /// The first bytes of the message being received (its stamp).
    head: [u8; HEAD],
    head_len: u8,
    /// Publish: next sequence number expected.
    next_seq: u32,
    /// Publish: distinct publishes received; chatter: messages received.
    received: u32,
    /// Chatter: messages sent.
    sent: u32,
    extra: Option<Box<Extra>>,
}

impl Member {
    fn pending(&self) -> usize {
        self.extra.as_ref().map_or(0, |e| e.pend.len() - e.pend_pos)
    }
    fn trim_extra(&mut self) {
        if self.extra.as_ref().is_some_and(|e| e.is_empty()) {
            self.extra = None;
        }
    }
    /// The per-member figure `member_totals` counts.
    fn total(&self, chatter: bool) -> u64 {
        if chatter {
            self.received as u64 + self.sent as u64
        } else {
            self.received as u64
        }
    }
}

/// Per-thread counters and histograms, apart from the slab so both can be borrowed.
struct Ctx {
    out: Vec<u8>,
    rng: fastrand::Rng,
    clock: Clock,
    epoch: Instant,
    chatter: bool,
    count: u32,
    window: Option<(u64, u64)>,
    hist: Histogram<u64>,
    per_max: Vec<u64>,
    per_n: Vec<u64>,
    deliveries: u64,
    in_window: u64,
    duplicates: u64,
    self_deliveries: u64,
    foreign: u64,
    anomalies: u64,
    complete: u64,
    sent: u64,
    /// A "go" message seen: (window start, length in ms).
    go: Option<(u64, u64)>,
    first_publish: Option<u64>,
    closes: BTreeMap<String, u64>,
    totals: BTreeMap<u64, u64>,
}

impl Ctx {
    fn now_ms(&self) -> u32 {
        self.epoch.elapsed().as_millis() as u32
    }
}

#[derive(Debug, PartialEq, Eq)]
enum After {
    Keep,
    DropError,
}

struct ThreadResult {
    hist: Histogram<u64>,
    per_max: Vec<u64>,
    per_n: Vec<u64>,
    deliveries: u64,
    in_window: u64,
    duplicates: u64,
    self_deliveries: u64,
    foreign: u64,
    anomalies: u64,
    sent: u64,
    open_at_start: u64,
    closes: BTreeMap<String, u64>,
    totals: BTreeMap<u64, u64>,
    ramp_secs: f64,
}

struct Worker {
    a: Arc<RoomsArgs>,
    sh: Arc<Shared>,
    tid: usize,
    nthreads: usize,
    poll: Poll,
    conns: Slab<Member>,
    scratch: Vec<u8>,
    ctx: Ctx,
    quota: u64,
    attempted: u64,
    resolving: u64,
    max_pending: u64,
    again: Vec<(usize, u32)>,
    serial: u32,
    shutting_down: bool,
    /// Chatter: senders, round-robin, and this thread's share of the rate.
    senders: Vec<(usize, u32)>,
    rr: usize,
    thread_rate: f64,
    sending_done: bool,
    open_at_start: Option<u64>,
    logged: [u32; 3],
    flushed: [u64; 3],
}

pub fn run(a: RoomsArgs) -> Result<RoomsReport> {
    if a.size < HEAD {
        bail!("--size {}: at least {HEAD} bytes (the stamp)", a.size);
    }
    if a.members == 0 || a.room_members < a.members {
        bail!("--room-members must be >= --members >= 1");
    }
    let limit = net::raise_nofile().unwrap_or(1024);
    let need = a.members + 64;
    if need > limit {
        bail!(
            "--members {} needs about {need} file descriptors but this process may hold {limit} \
             (RLIMIT_NOFILE); split the room over several processes (--room-members, --follower)",
            a.members
        );
    }
    let clock = Clock::new();
    let relay_pid = a.relay_pid.map(|p| p.to_string());
    let mut relay = relay_pid.as_ref().map(|p| RelaySample {
        pid: a.relay_pid.unwrap_or(0),
        rss_kib_start: net::proc_status_kib(p, "VmRSS"),
        ..Default::default()
    });
    let a = Arc::new(a);
    let sh = Arc::new(Shared::default());
    let nthreads = a.threads.max(1);
    let mut handles = Vec::new();
    for tid in 0..nthreads {
        let (a2, sh2) = (a.clone(), sh.clone());
        handles.push(
            std::thread::Builder::new()
                .name(format!("rooms-{tid}"))
                .spawn(move || -> Result<ThreadResult> {
                    match Worker::new(a2, sh2.clone(), tid, nthreads, clock) {
                        Ok(w) => w.run(),
                        Err(e) => {
                            sh2.inited.fetch_add(1, Relaxed);
                            sh2.ramped.fetch_add(1, Relaxed);
                            Err(e)
                        }
                    }
                })?,
        );
    }
    let mut m = Main {
        a: a.clone(),
        sh: sh.clone(),
        t0: Instant::now(),
        cap: Duration::from_secs(a.max_seconds.max(1)),
        stopped_by_cap: false,
        last_print: Instant::now(),
        prev: 0,
        nthreads,
    };
    while sh.inited.load(Relaxed) < nthreads && !m.capped() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let rss_start = net::self_rss_kib();
    let mut self_cpu0 = None;
    sh.go_ramp.store(true, Relaxed);
    m.wait(|| sh.ramped.load(Relaxed) >= nthreads, None);
    let rss_open = net::self_rss_kib();
    let open = sh.open.load(Relaxed).max(0) as u64;
    if open < a.members {
        eprintln!("rooms: only {open} of {} members opened", a.members);
    }

    let mut raw = Raw {
        leader: !a.follower,
        first_member: a.first_member,
        threads: nthreads as u64,
        members_requested: a.members,
        loader_rss_kib_start: rss_start,
        loader_rss_kib_open: rss_open,
        ..Default::default()
    };
    let mut post_rtt = report::new_histogram();
    if !a.follower && !m.capped() {
        // Wait for the relay's tick to show the whole room.
        let deadline = Instant::now() + a.room_wait;
        let mut seen = 0;
        let mut last_err = None;
        while Instant::now() < deadline && !m.capped() {
            match room_members(a.admin, &a.token, &a.room) {
                Ok(n) => {
                    seen = n;
                    if n >= a.room_members {
                        break;
                    }
                }
                Err(e) => last_err = Some(e),
            }
            m.progress();
            std::thread::sleep(Duration::from_millis(50));
        }
        raw.room_members_seen = seen;
        if seen < a.room_members {
            eprintln!(
                "rooms: GET /v1/rooms shows {seen} members in {:?}, expected {}{}",
                a.room,
                a.room_members,
                last_err.map_or(String::new(), |e| format!(" (last error: {e:#})"))
            );
        }
        if let (Some(r), Some(p)) = (relay.as_mut(), relay_pid.as_ref()) {
            r.rss_kib_open = net::proc_status_kib(p, "VmRSS");
        }
    }
    let relay_cpu = || relay_pid.as_deref().and_then(proc_cpu_s);
    let relay_wait = || relay_pid.as_deref().and_then(proc_runq_wait_s);
    match a.mode {
        Mode::Publish { count, interval } => {
            if !a.follower && !m.capped() {
                let (cpu0, wait0, mach0) = (relay_cpu(), relay_wait(), machine_now());
                self_cpu0 = proc_cpu_s("self");
                let start = Instant::now() + Duration::from_millis(100);
                let t_start = Instant::now();
                let mut body = Vec::with_capacity(a.size);
                let mut logged = 0;
                for seq in 0..count {
                    let due = start + interval * seq;
                    m.wait(|| Instant::now() >= due, Some(due));
                    if m.capped() {
                        break;
                    }
                    body.clear();
                    let t = clock.now_ns();
                    let st = Stamp {
                        kind: KIND_PUBLISH,
                        sender: u32::MAX,
                        seq,
                        t_ns: t,
                    };
                    encode_stamp(&mut body, &st, a.size);
                    match publish(a.admin, &a.token, &a.room, &body) {
                        Ok(code) if (200..300).contains(&code) => {
                            raw.published += 1;
                            let _ = post_rtt.record(clock.now_ns().saturating_sub(t).max(1));
                        }
                        other => {
                            raw.publish_failures += 1;
                            if logged < LOG_LIMIT {
                                logged += 1;
                                eprintln!("rooms: publish {seq} failed: {other:?}");
                            }
                        }
                    }
                }
                let settle_until = Instant::now() + a.settle;
                m.wait(
                    || sh.complete.load(Relaxed) >= sh.open.load(Relaxed).max(0) as u64,
                    Some(settle_until),
                );
                if let (Some(r), Some(c0), Some(c1)) = (relay.as_mut(), cpu0, relay_cpu()) {
                    r.cpu_s = Some(c1 - c0);
                    r.runq_wait_s = wait0.zip(relay_wait()).map(|(a, b)| b - a);
                    r.phase_s = t_start.elapsed().as_secs_f64();
                    r.machine = machine_delta(mach0, machine_now());
                }
            } else {
                // Follower: wait for the first publish, then for everything or the deadline.
                m.wait(|| sh.first_publish.load(Relaxed) != 0, None);
                self_cpu0 = proc_cpu_s("self");
                let first = sh.first_publish.load(Relaxed);
                let deadline = clock.instant_at(first) + interval * count + a.settle;
                m.wait(
                    || sh.complete.load(Relaxed) >= sh.open.load(Relaxed).max(0) as u64,
                    Some(deadline),
                );
            }
        }
        Mode::Chatter { duration, .. } => {
            if !a.follower && !m.capped() {
                let ws = clock.now_ns() + GO_LEAD.as_nanos() as u64;
                let len_ms = duration.as_millis() as u64;
                let mut body = Vec::with_capacity(a.size);
                encode_stamp(
                    &mut body,
                    &Stamp {
                        kind: KIND_GO,
                        sender: u32::MAX,
                        seq: len_ms as u32,
                        t_ns: ws,
                    },
                    a.size,
                );
                match publish(a.admin, &a.token, &a.room, &body) {
                    Ok(c) if (200..300).contains(&c) => {}
                    other => eprintln!(
                        "rooms: publishing the chatter start failed ({other:?}); followers will \
                         not start"
                    ),
                }
                sh.set_window(ws, len_ms);
            } else {
                m.wait(|| sh.window().is_some(), None);
            }
            if let Some((ws, we)) = sh.window() {
                let (t_ws, t_we) = (clock.instant_at(ws), clock.instant_at(we));
                m.wait(|| Instant::now() >= t_ws, Some(t_ws));
                let (cpu0, wait0, mach0) = (relay_cpu(), relay_wait(), machine_now());
                self_cpu0 = proc_cpu_s("self");
                m.wait(|| Instant::now() >= t_we, Some(t_we));
                let (cpu1, wait1, mach1) = (relay_cpu(), relay_wait(), machine_now());
                raw.loader_cpu_s = self_cpu0
                    .zip(proc_cpu_s("self"))
                    .map(|(a, b)| round3(b - a));
                raw.window_s = (we - ws) as f64 / 1e9;
                if let (Some(r), Some(c0), Some(c1)) = (relay.as_mut(), cpu0, cpu1) {
                    r.cpu_s = Some(c1 - c0);
                    r.runq_wait_s = wait0.zip(wait1).map(|(a, b)| b - a);
                    r.phase_s = raw.window_s;
                    r.machine = machine_delta(mach0, mach1);
                }
                // Drain: until nothing arrived for QUIET, at most --settle.
                let settle_until = Instant::now() + a.settle;
                let mut last = sh.deliveries.load(Relaxed);
                let mut last_change = Instant::now();
                m.wait(
                    || {
                        let d = sh.deliveries.load(Relaxed);
                        if d != last {
                            last = d;
                            last_change = Instant::now();
                        }
                        last_change.elapsed() >= QUIET
                    },
                    Some(settle_until),
                );
                raw.drain_s = t_we.elapsed().as_secs_f64();
            }
        }
    }
    if let (Some(r), Some(p)) = (relay.as_mut(), relay_pid.as_ref()) {
        r.rss_kib_end = net::proc_status_kib(p, "VmRSS");
        r.hwm_kib_end = net::proc_status_kib(p, "VmHWM");
    }
    if raw.loader_cpu_s.is_none() {
        raw.loader_cpu_s = self_cpu0
            .zip(proc_cpu_s("self"))
            .map(|(a, b)| round3(b - a));
    }
    sh.stop.store(true, Relaxed);
    let mut hist = report::new_histogram();
    let mut totals: BTreeMap<u64, u64> = BTreeMap::new();
    for h in handles {
        let t = match h.join() {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err(e.context("rooms thread failed")),
            Err(_) => bail!("rooms thread panicked"),
        };
        hist.add(&t.hist).ok();
        if raw.per_publish_max_ns.len() < t.per_max.len() {
            raw.per_publish_max_ns.resize(t.per_max.len(), 0);
            raw.per_publish_members.resize(t.per_n.len(), 0);
        }
        for (i, (&mx, &n)) in t.per_max.iter().zip(&t.per_n).enumerate() {
            raw.per_publish_max_ns[i] = raw.per_publish_max_ns[i].max(mx);
            raw.per_publish_members[i] += n;
        }
        raw.deliveries += t.deliveries;
        raw.deliveries_in_window += t.in_window;
        raw.duplicates += t.duplicates;
        raw.self_deliveries += t.self_deliveries;
        raw.foreign_messages += t.foreign;
        raw.clock_anomalies += t.anomalies;
        raw.sent += t.sent;
        raw.members_open += t.open_at_start;
        raw.ramp_seconds = raw.ramp_seconds.max(round3(t.ramp_secs));
        for (k, v) in t.closes {
            *raw.closes.entry(k).or_default() += v;
        }
        for (k, v) in t.totals {
            *totals.entry(k).or_default() += v;
        }
    }
    raw.member_totals = totals
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    raw.delay_hist_ns = hist_pairs(&hist);
    raw.post_rtt_hist_ns = hist_pairs(&post_rtt);
    raw.connect_failures = sh.connect_failures.load(Relaxed);
    raw.handshake_failures = sh.handshake_failures.load(Relaxed);
    raw.errors = sh.errors.load(Relaxed);
    raw.relay = relay;
    raw.stopped_by_max_seconds = m.stopped_by_cap;
    let (count, interval_ms, rate) = match a.mode {
        Mode::Publish { count, interval } => (count as u64, interval.as_secs_f64() * 1e3, 0.0),
        Mode::Chatter { rate, .. } => (0, 0.0, rate),
    };
    let template = RoomsReport {
        mode: a.mode.name().into(),
        room: a.room.clone(),
        target: a.target_str.clone(),
        size: a.size as u64,
        count,
        interval_ms,
        rate,
        room_members_expected: a.room_members,
        ..Default::default()
    };
    Ok(RoomsReport::finalize(&template, vec![raw]))
}

/// The main thread's waiting and progress lines.
struct Main {
    a: Arc<RoomsArgs>,
    sh: Arc<Shared>,
    t0: Instant,
    cap: Duration,
    stopped_by_cap: bool,
    last_print: Instant,
    prev: u64,
    nthreads: usize,
}

impl Main {
    fn capped(&mut self) -> bool {
        if !self.stopped_by_cap && self.t0.elapsed() >= self.cap {
            eprintln!(
                "rooms: --max-seconds {} reached, stopping",
                self.a.max_seconds
            );
            self.sh.stop.store(true, Relaxed);
            self.stopped_by_cap = true;
        }
        self.stopped_by_cap
    }

    /// Sleeps until `done()` or `until` (or the cap), printing progress once a second.
    fn wait(&mut self, mut done: impl FnMut() -> bool, until: Option<Instant>) {
        loop {
            if done() || self.capped() || until.is_some_and(|u| Instant::now() >= u) {
                return;
            }
            self.progress();
            let mut nap = Duration::from_millis(5);
            if let Some(u) = until {
                nap = nap.min(u.saturating_duration_since(Instant::now()));
            }
            std::thread::sleep(nap);
        }
    }

    fn progress(&mut self) {
        if self.last_print.elapsed() < Duration::from_secs(1) {
            return;
        }
        let dt = self.last_print.elapsed().as_secs_f64();
        self.last_print = Instant::now();
        let sh = &self.sh;
        let d = sh.deliveries.load(Relaxed);
        let ramping = sh.ramped.load(Relaxed) < self.nthreads;
        eprintln!(
            "[{:7.1}s] rooms {} open {}/{}  attempted {}  connect_fail {}  hs_fail {}  errors {}  \
             deliveries {} ({:.0}/s)  sent {}",
            self.t0.elapsed().as_secs_f64(),
            if ramping { "ramp" } else { "run " },
            sh.open.load(Relaxed),
            self.a.members,
            sh.attempted.load(Relaxed),
            sh.connect_failures.load(Relaxed),
            sh.handshake_failures.load(Relaxed),
            sh.errors.load(Relaxed),
            d,
            (d - self.prev) as f64 / dt,
            sh.sent.load(Relaxed),
        );
        self.prev = d;
    }
}

impl Worker {
    fn new(
        a: Arc<RoomsArgs>,
        sh: Arc<Shared>,
        tid: usize,
        nthreads: usize,
        clock: Clock,
    ) -> Result<Worker> {
        let n = nthreads as u64;
        let quota = a.members / n + u64::from((tid as u64) < a.members % n);
        let (chatter, count) = match a.mode {
            Mode::Publish { count, .. } => (false, count),
            Mode::Chatter { .. } => (true, 0),
        };
        Ok(Worker {
            poll: Poll::new()?,
            conns: Slab::with_capacity(quota.min(1 << 16) as usize),
            scratch: vec![0; SCRATCH],
            ctx: Ctx {
                out: Vec::with_capacity(64 * 1024),
                rng: fastrand::Rng::new(),
                clock,
                epoch: Instant::now(),
                chatter,
                count,
                window: None,
                hist: report::new_histogram(),
                per_max: vec![0; count as usize],
                per_n: vec![0; count as usize],
                deliveries: 0,
                in_window: 0,
                duplicates: 0,
                self_deliveries: 0,
                foreign: 0,
                anomalies: 0,
                complete: 0,
                sent: 0,
                go: None,
                first_publish: None,
                closes: BTreeMap::new(),
                totals: BTreeMap::new(),
            },
            quota,
            attempted: 0,
            resolving: 0,
            max_pending: (a.max_pending / n).max(1),
            again: Vec::new(),
            serial: 0,
            shutting_down: false,
            senders: Vec::new(),
            rr: 0,
            thread_rate: 0.0,
            sending_done: false,
            open_at_start: None,
            logged: [0; 3],
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
        let mut last_sweep = Instant::now();
        let mut last_flush = Instant::now();
        loop {
            if self.sh.stop.load(Relaxed) {
                break;
            }
            let now = Instant::now();
            let mut timeout = Duration::from_millis(20);
            if ramp_secs.is_none() {
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
            } else if self.open_at_start.is_none() {
                self.open_at_start = Some(self.open_count());
            }
            if self.ctx.chatter {
                if let Some((ws, len_ms)) = self.ctx.go.take() {
                    self.sh.set_window(ws, len_ms);
                }
                if self.ctx.window.is_none() {
                    self.ctx.window = self.sh.window();
                }
                if ramp_secs.is_some() {
                    if let Some(t) = self.chatter_send() {
                        timeout = timeout.min(t);
                    }
                }
            } else if let Some(t) = self.ctx.first_publish.take() {
                let _ = self
                    .sh
                    .first_publish
                    .compare_exchange(0, t, Relaxed, Relaxed);
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
                if c.phase == Phase::Connecting {
                    if ev.is_writable() || ev.is_error() || ev.is_read_closed() {
                        self.check_connected(idx);
                    }
                    continue;
                }
                if ev.is_writable() {
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
            if last_flush.elapsed() >= Duration::from_millis(20) {
                last_flush = Instant::now();
                self.flush_counters();
            }
        }
        if ramp_secs.is_none() {
            ramp_secs = Some(ramp_start.elapsed().as_secs_f64());
            self.sh.ramped.fetch_add(1, Relaxed);
        }
        self.shutting_down = true;
        self.flush_counters();
        let chatter = self.ctx.chatter;
        let mut open = 0;
        for (_, c) in self.conns.iter() {
            if c.phase == Phase::Open {
                open += 1;
                *self.ctx.totals.entry(c.total(chatter)).or_default() += 1;
            }
        }
        self.sh.open.fetch_sub(open, Relaxed);
        self.conns.clear();
        let open_at_start = self.open_at_start.unwrap_or(0);
        let c = self.ctx;
        Ok(ThreadResult {
            hist: c.hist,
            per_max: c.per_max,
            per_n: c.per_n,
            deliveries: c.deliveries,
            in_window: c.in_window,
            duplicates: c.duplicates,
            self_deliveries: c.self_deliveries,
            foreign: c.foreign,
            anomalies: c.anomalies,
            sent: c.sent,
            open_at_start,
            closes: c.closes,
            totals: c.totals,
            ramp_secs: ramp_secs.unwrap_or(0.0),
        })
    }

    fn open_count(&self) -> u64 {
        self.conns
            .iter()
            .filter(|(_, c)| c.phase == Phase::Open)
            .count() as u64
    }

    /// Chatter: sends what is due by now; returns how long until the next thing to do.
    fn chatter_send(&mut self) -> Option<Duration> {
        let (ws, we) = self.ctx.window?;
        if self.sending_done {
            return None;
        }
        let now = self.ctx.clock.now_ns();
        if now < ws {
            return Some(Duration::from_nanos(ws - now));
        }
        if self.senders.is_empty() {
            self.senders = self
                .conns
                .iter()
                .filter(|(_, c)| c.phase == Phase::Open)
                .map(|(i, c)| (i, c.serial))
                .collect();
            let Mode::Chatter { rate, .. } = self.a.mode else {
                return None;
            };
            self.thread_rate = rate * self.senders.len() as f64 / self.a.room_members as f64;
            if self.senders.is_empty() {
                self.sending_done = true;
                return None;
            }
        }
        let until = now.min(we);
        let due = ((until - ws) as f64 * self.thread_rate / 1e9) as u64;
        let mut batch = 0;
        while self.ctx.sent < due && batch < 1024 {
            batch += 1;
            let (idx, serial) = self.senders[self.rr % self.senders.len()];
            self.rr += 1;
            let Some(c) = self.conns.get_mut(idx).filter(|c| c.serial == serial) else {
                continue;
            };
            let st = Stamp {
                kind: KIND_CHATTER,
                sender: c.gid,
                seq: c.sent,
                t_ns: self.ctx.clock.now_ns(),
            };
            c.sent += 1;
            self.ctx.sent += 1;
            let mut body = Vec::with_capacity(self.a.size);
            encode_stamp(&mut body, &st, self.a.size);
            let mask = self.ctx.rng.u32(..).to_ne_bytes();
            ws::encode_frame(&mut self.ctx.out, true, op::BINARY, Some(mask), &body);
            if self.flush(idx) != After::Keep {
                self.drop_conn(idx, true, format_args!("write failed"));
            }
        }
        if now >= we {
            self.sending_done = true;
            return None;
        }
        if self.ctx.sent < due {
            return Some(Duration::ZERO);
        }
        // Next message due at:
        let next_ns = ws + ((self.ctx.sent + 1) as f64 * 1e9 / self.thread_rate.max(1e-9)) as u64;
        Some(Duration::from_nanos(next_ns.saturating_sub(now)).min(Duration::from_millis(20)))
    }

    fn flush_counters(&mut self) {
        let now = [self.ctx.deliveries, self.ctx.sent, self.ctx.complete];
        self.sh
            .deliveries
            .fetch_add(now[0] - self.flushed[0], Relaxed);
        self.sh.sent.fetch_add(now[1] - self.flushed[1], Relaxed);
        self.sh
            .complete
            .fetch_add(now[2] - self.flushed[2], Relaxed);
        self.flushed = now;
    }

    fn log(&mut self, kind: usize, what: &str, msg: std::fmt::Arguments<'_>) {
        if self.logged[kind] < LOG_LIMIT {
            self.logged[kind] += 1;
            eprintln!("rooms[{}]: {what}: {msg}", self.tid);
        }
    }

    fn start_connect(&mut self) {
        let local = self.tid as u64 + self.attempted * self.nthreads as u64;
        let gid = self.a.first_member + local;
        self.attempted += 1;
        self.sh.attempted.fetch_add(1, Relaxed);
        let src = self.a.sources.pick(gid);
        let stream = match net::start_connect(self.a.target, src) {
            Ok(s) => s,
            Err(e) => {
                self.sh.connect_failures.fetch_add(1, Relaxed);
                self.log(0, "connect failure", format_args!("from {src:?}: {e}"));
                return;
            }
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
            self.log(0, "connect failure", format_args!("register: {e}"));
            return;
        }
        self.serial = self.serial.wrapping_add(1);
        entry.insert(Member {
            stream,
            serial: self.serial,
            gid: gid as u32,
            phase: Phase::Connecting,
            since_ms: self.ctx.now_ms(),
            dec: Decoder::new(false),
            head: [0; HEAD],
            head_len: 0,
            next_seq: 0,
            received: 0,
            sent: 0,
            extra: None,
        });
        self.resolving += 1;
    }

    /// Fails a member that has not reached Open.
    fn fail(&mut self, idx: usize, why: std::fmt::Arguments<'_>) {
        self.ctx.out.clear();
        let mut c = self.conns.remove(idx);
        let _ = self.poll.registry().deregister(&mut c.stream);
        self.resolving -= 1;
        if c.phase == Phase::Connecting {
            self.sh.connect_failures.fetch_add(1, Relaxed);
            self.log(0, "connect failure", why);
        } else {
            self.sh.handshake_failures.fetch_add(1, Relaxed);
            self.log(1, "handshake failure", why);
        }
    }

    /// Removes an open member (its figures still count in `member_totals`).
    fn drop_conn(&mut self, idx: usize, error: bool, why: std::fmt::Arguments<'_>) {
        self.ctx.out.clear();
        let mut c = self.conns.remove(idx);
        let _ = self.poll.registry().deregister(&mut c.stream);
        if c.phase == Phase::Open {
            self.sh.open.fetch_sub(1, Relaxed);
            if self.open_at_start.is_some() {
                *self
                    .ctx
                    .totals
                    .entry(c.total(self.ctx.chatter))
                    .or_default() += 1;
            }
        } else {
            self.resolving -= 1;
        }
        if error && !self.shutting_down {
            self.sh.errors.fetch_add(1, Relaxed);
            self.log(2, "member lost", why);
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
        if self.flush(idx) != After::Keep {
            self.fail(idx, format_args!("writing the upgrade request failed"));
        }
    }

    fn on_writable(&mut self, idx: usize) {
        if self.flush(idx) != After::Keep {
            self.drop_conn(idx, true, format_args!("write failed"));
        }
    }

    fn on_readable(&mut self, idx: usize) {
        for _ in 0..READS_PER_TURN {
            let conn = &mut self.conns[idx];
            let n = match conn.stream.read(&mut self.scratch) {
                Ok(0) => {
                    if conn.phase == Phase::Handshaking {
                        self.fail(idx, format_args!("connection closed before the 101 answer"));
                    } else {
                        self.drop_conn(idx, true, format_args!("connection closed by the relay"));
                    }
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if conn.phase == Phase::Handshaking {
                        self.fail(idx, format_args!("{e}"));
                    } else {
                        self.drop_conn(idx, true, format_args!("{e}"));
                    }
                    return;
                }
            };
            let after = if conn.phase == Phase::Handshaking {
                match self.handshake_input(idx, n) {
                    Some(a) => a,
                    None => return,
                }
            } else {
                on_frames(conn, &mut self.scratch[..n], &mut self.ctx)
            };
            let flushed = self.flush(idx);
            match (after, flushed) {
                (After::Keep, After::Keep) => {}
                (After::Keep, _) => {
                    return self.drop_conn(idx, true, format_args!("write failed"));
                }
                (After::DropError, _) => {
                    return self.drop_conn(
                        idx,
                        true,
                        format_args!("the relay closed the member or broke the protocol"),
                    );
                }
            }
        }
        let c = &self.conns[idx];
        self.again.push((idx, c.serial));
    }

    /// Bytes read while waiting for the 101. None if the member failed (and was removed).
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
                extra.accept = Vec::new();
                let mut head = std::mem::take(&mut extra.head);
                conn.extra = Some(extra);
                conn.trim_extra();
                conn.phase = Phase::Open;
                conn.since_ms = self.ctx.now_ms();
                self.resolving -= 1;
                self.sh.open.fetch_add(1, Relaxed);
                self.sh.opened.fetch_add(1, Relaxed);
                let rest: &mut [u8] = if head.is_empty() {
                    &mut self.scratch[head_len..n]
                } else {
                    &mut head[head_len..]
                };
                Some(on_frames(conn, rest, &mut self.ctx))
            }
        }
    }

    /// Sends `ctx.out` (then clears it) after any older pending output.
    fn flush(&mut self, idx: usize) -> After {
        let conn = &mut self.conns[idx];
        let out = &mut self.ctx.out;
        let mut result = After::Keep;
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

/// Walks the relay's frames for one member: keeps each message's stamp, records its delay
/// and sequence, answers pings and the relay's close.
fn on_frames(conn: &mut Member, data: &mut [u8], ctx: &mut Ctx) -> After {
    if data.is_empty() {
        return After::Keep;
    }
    let now = ctx.clock.now_ns();
    let Member {
        dec,
        gid,
        head,
        head_len,
        next_seq,
        received,
        extra,
        ..
    } = conn;
    let gid = *gid;
    let mut close_seen = false;
    let res = dec.feed(data, &mut |ev| {
        match ev {
            Event::Header(h) => {
                if h.opcode == op::PING || h.opcode == op::CLOSE {
                    extra.get_or_insert_with(Default::default).ctl.clear();
                }
            }
            Event::Payload { opcode, data, .. } => match opcode {
                op::PING | op::CLOSE => {
                    extra
                        .get_or_insert_with(Default::default)
                        .ctl
                        .extend_from_slice(data);
                }
                op::PONG => {}
                _ => {
                    let have = *head_len as usize;
                    if have < HEAD {
                        let take = (HEAD - have).min(data.len());
                        head[have..have + take].copy_from_slice(&data[..take]);
                        *head_len = (have + take) as u8;
                    }
                }
            },
            Event::End {
                opcode,
                message_end,
            } => {
                if message_end {
                    on_message(
                        decode_stamp(&head[..*head_len as usize]),
                        now,
                        gid,
                        next_seq,
                        received,
                        ctx,
                    );
                    *head_len = 0;
                } else if opcode == op::PING {
                    let ctl = extra
                        .as_mut()
                        .map(|e| std::mem::take(&mut e.ctl))
                        .unwrap_or_default();
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
            eprintln!("rooms: protocol error from the relay on member {gid}: {e}");
            let mask = ctx.rng.u32(..).to_ne_bytes();
            ws::encode_frame(
                &mut ctx.out,
                true,
                op::CLOSE,
                Some(mask),
                &ws::CLOSE_PROTOCOL_ERROR.to_be_bytes(),
            );
            *ctx.closes.entry("protocol error".into()).or_default() += 1;
            After::DropError
        }
        Ok(_) if close_seen => {
            let code = extra
                .as_ref()
                .and_then(|e| e.ctl.get(..2).map(|c| c.to_vec()))
                .unwrap_or_default();
            let name = match code.as_slice() {
                [a, b] => u16::from_be_bytes([*a, *b]).to_string(),
                _ => "none".into(),
            };
            *ctx.closes.entry(name).or_default() += 1;
            let mask = ctx.rng.u32(..).to_ne_bytes();
            ws::encode_frame(&mut ctx.out, true, op::CLOSE, Some(mask), &code);
            if let Some(e) = extra.as_mut() {
                e.ctl.clear();
            }
            After::DropError
        }
        Ok(_) => {
            conn.trim_extra();
            After::Keep
        }
    }
}

/// One whole data message arrived at a member.
fn on_message(
    st: Option<Stamp>,
    now: u64,
    gid: u32,
    next_seq: &mut u32,
    received: &mut u32,
    ctx: &mut Ctx,
) {
    let Some(st) = st else {
        ctx.foreign += 1;
        return;
    };
    // Only data messages are timed (a "go" message is stamped with a future time).
    let delay = |anomalies: &mut u64| {
        if now < st.t_ns {
            *anomalies += 1;
            1
        } else {
            (now - st.t_ns).max(1)
        }
    };
    match st.kind {
        KIND_PUBLISH if !ctx.chatter && st.seq < ctx.count => {
            if ctx.first_publish.is_none() && *received == 0 {
                ctx.first_publish = Some(st.t_ns);
            }
            if st.seq < *next_seq {
                ctx.duplicates += 1;
                return;
            }
            *next_seq = st.seq + 1;
            *received += 1;
            ctx.deliveries += 1;
            let delay = delay(&mut ctx.anomalies);
            ctx.hist.saturating_record(delay);
            let i = st.seq as usize;
            ctx.per_max[i] = ctx.per_max[i].max(delay);
            ctx.per_n[i] += 1;
            if st.seq + 1 == ctx.count {
                ctx.complete += 1;
            }
        }
        KIND_CHATTER if ctx.chatter => {
            *received += 1;
            ctx.deliveries += 1;
            let delay = delay(&mut ctx.anomalies);
            ctx.hist.saturating_record(delay);
            if st.sender == gid {
                ctx.self_deliveries += 1;
            }
            if ctx.window.is_some_and(|(ws, we)| now >= ws && now <= we) {
                ctx.in_window += 1;
            }
        }
        KIND_GO if ctx.chatter => {
            if ctx.window.is_none() && ctx.go.is_none() {
                ctx.go = Some((st.t_ns, st.seq as u64));
            }
        }
        _ => ctx.foreign += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_roundtrip() {
        let st = Stamp {
            kind: KIND_CHATTER,
            sender: 17,
            seq: 99,
            t_ns: 1_700_000_000_123_456_789,
        };
        let mut v = Vec::new();
        encode_stamp(&mut v, &st, 32);
        assert_eq!(v.len(), 32);
        assert_eq!(decode_stamp(&v), Some(st));
        assert_eq!(decode_stamp(&v[..HEAD - 1]), None);
        v[0] = b'X';
        assert_eq!(decode_stamp(&v), None);
    }

    #[test]
    fn clock_is_shared_and_monotonic() {
        let a = Clock::new();
        let b = Clock::new();
        let (x, y) = (a.now_ns(), b.now_ns());
        assert!(x.abs_diff(y) < 50_000_000, "{x} {y}");
        let z = a.now_ns();
        assert!(z >= x);
        let i = a.instant_at(z + 1_000_000);
        assert!(i > Instant::now());
    }

    #[test]
    fn a_member_is_small() {
        // No buffer per idle member: the slab entry is all (plus the kernel's socket).
        let n = std::mem::size_of::<Member>();
        assert!(n <= 128, "Member is {n} bytes");
    }

    #[test]
    fn proc_cpu_reads_self() {
        assert!(proc_cpu_s("self").is_some());
    }

    #[test]
    fn percentiles_of_small_lists() {
        let v: Vec<u64> = (1..=20).map(|x| x * 1000).collect();
        let r = rtt_of_list(&v);
        assert_eq!(r.p50, 10.0);
        assert_eq!(r.p99, 20.0);
        assert_eq!(r.max, 20.0);
        assert_eq!(rtt_of_list(&[]).max, 0.0);
    }

    fn raw(leader: bool, members: u64, totals: &[(u64, u64)]) -> Raw {
        Raw {
            leader,
            threads: 1,
            members_requested: members,
            members_open: members,
            member_totals: totals.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn merge_counts_missing_and_duplicates() {
        let t = RoomsReport {
            mode: "publish".into(),
            count: 3,
            room_members_expected: 4,
            ..Default::default()
        };
        let mut a = raw(true, 2, &[(3, 2)]);
        a.published = 3;
        a.per_publish_max_ns = vec![1000, 2000, 3000];
        a.per_publish_members = vec![2, 2, 2];
        a.deliveries = 6;
        let mut b = raw(false, 2, &[(3, 1), (2, 1)]);
        b.per_publish_max_ns = vec![5000, 1000, 0];
        b.per_publish_members = vec![2, 2, 1];
        b.deliveries = 5;
        let r = RoomsReport::finalize(&t, vec![a.clone(), b]);
        assert!(r.complete);
        let p = r.publish.unwrap();
        assert_eq!(p.expected_deliveries, 12);
        assert_eq!(p.missing, 1);
        assert_eq!(p.duplicates, 0);
        assert_eq!(p.incomplete_publishes, 1);
        assert_eq!(p.per_publish_all_us, vec![5.0, 2.0, 3.0]);
        assert_eq!(p.all_members_us.max, 5.0);
        // One process alone is partial: no missing count.
        let r = RoomsReport::finalize(&t, vec![a]);
        assert!(!r.complete);
        assert_eq!(r.publish.unwrap().missing, 0);
    }

    /// A tiny stand-in for relay's rooms app and admin API over real sockets: every data
    /// frame a member sends goes to every other member; POST publishes to all; GET
    /// /v1/rooms lists the one room. Threads and blocking sockets; tests only.
    fn fake_relay(room: &'static str) -> (SocketAddr, SocketAddr) {
        use std::net::TcpListener;
        use std::sync::Mutex;
        type Members = Arc<Mutex<Vec<(usize, StdStream)>>>;
        let members: Members = Arc::new(Mutex::new(Vec::new()));
        let broadcast = |m: &Members, skip: Option<usize>, payload: &[u8]| {
            let mut f = Vec::new();
            ws::encode_frame(&mut f, true, op::BINARY, None, payload);
            for (id, s) in m.lock().unwrap().iter_mut() {
                if Some(*id) != skip {
                    let _ = s.write_all(&f);
                }
            }
        };
        let ws_l = TcpListener::bind("127.0.0.1:0").unwrap();
        let admin_l = TcpListener::bind("127.0.0.1:0").unwrap();
        let (ws_addr, admin_addr) = (ws_l.local_addr().unwrap(), admin_l.local_addr().unwrap());
        let m = members.clone();
        std::thread::spawn(move || {
            for (id, c) in ws_l.incoming().enumerate() {
                let Ok(mut c) = c else { continue };
                let m = m.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 65536];
                    let mut have = 0;
                    let (head, key) = loop {
                        let n = c.read(&mut buf[have..]).unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        have += n;
                        if let Ok(Some(x)) = ws::parse_upgrade_request(&buf[..have]) {
                            break x;
                        }
                    };
                    c.write_all(&ws::upgrade_response(&key)).unwrap();
                    m.lock().unwrap().push((id, c.try_clone().unwrap()));
                    let mut dec = Decoder::new(true);
                    let mut msg = Vec::new();
                    let mut pending = buf[head..have].to_vec();
                    loop {
                        let mut done = Vec::new();
                        let r = dec.feed(&mut pending, &mut |e| {
                            match e {
                                Event::Payload { opcode, data, .. } if !op::is_control(opcode) => {
                                    msg.extend_from_slice(data)
                                }
                                Event::End {
                                    message_end: true, ..
                                } => done.push(std::mem::take(&mut msg)),
                                _ => {}
                            }
                            Flow::Continue
                        });
                        if r.is_err() {
                            return;
                        }
                        for d in done {
                            broadcast(&m, Some(id), &d);
                        }
                        let n = c.read(&mut buf).unwrap_or(0);
                        if n == 0 {
                            m.lock().unwrap().retain(|(i, _)| *i != id);
                            return;
                        }
                        pending = buf[..n].to_vec();
                    }
                });
            }
        });
        std::thread::spawn(move || {
            for c in admin_l.incoming() {
                let Ok(mut c) = c else { continue };
                let mut buf = vec![0u8; 8192];
                let mut have = 0;
                let (head, len, post) = loop {
                    let n = c.read(&mut buf[have..]).unwrap_or(0);
                    if n == 0 {
                        break (0, 0, false);
                    }
                    have += n;
                    let mut h = [httparse::EMPTY_HEADER; 16];
                    let mut req = httparse::Request::new(&mut h);
                    if let Ok(httparse::Status::Complete(n)) = req.parse(&buf[..have]) {
                        let len = req
                            .headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                            .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                            .unwrap_or(0usize);
                        break (n, len, req.method == Some("POST"));
                    }
                };
                while have < head + len {
                    let n = c.read(&mut buf[have..]).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    have += n;
                }
                let body = if post {
                    broadcast(&members, None, &buf[head..head + len]);
                    "{}".to_string()
                } else {
                    let n = members.lock().unwrap().len();
                    format!("{{\"rooms\":[{{\"name\":\"{room}\",\"members\":{n}}}]}}")
                };
                let code = if post { "202 Accepted" } else { "200 OK" };
                let _ = c.write_all(
                    format!(
                        "HTTP/1.1 {code}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            }
        });
        (ws_addr, admin_addr)
    }

    fn args(ws: SocketAddr, admin: SocketAddr, room: &str, mode: Mode) -> RoomsArgs {
        RoomsArgs {
            target: ws,
            target_str: ws.to_string(),
            host: ws.to_string(),
            path: format!("/rooms/{room}"),
            room: room.into(),
            admin,
            token: "t".into(),
            members: 12,
            room_members: 12,
            first_member: 0,
            follower: false,
            mode,
            size: 40,
            threads: 2,
            sources: Sources::Any,
            rate: 0.0,
            max_pending: 64,
            connect_timeout: Duration::from_secs(5),
            room_wait: Duration::from_secs(10),
            settle: Duration::from_secs(3),
            relay_pid: Some(std::process::id()),
            max_seconds: 60,
        }
    }

    #[test]
    fn publish_reaches_every_member() {
        let (ws, admin) = fake_relay("p");
        let a = args(
            ws,
            admin,
            "p",
            Mode::Publish {
                count: 5,
                interval: Duration::from_millis(20),
            },
        );
        let r = run(a).unwrap();
        assert!(r.complete, "{}", r.summary());
        let p = r.publish.clone().unwrap();
        assert_eq!((p.published, p.deliveries), (5, 60), "{}", r.summary());
        assert_eq!((p.missing, p.duplicates, p.incomplete_publishes), (0, 0, 0));
        assert!(p.all_members_us.max >= p.per_member_us.p50);
        assert_eq!(r.room_members_seen, 12);
        assert_eq!(r.exit_code(), 0);
        assert!(r.relay.as_ref().unwrap().cpu_s.is_some());
        // The JSON round-trips through rooms-merge to the same figures.
        let f = std::env::temp_dir().join(format!("rooms-pub-{}.json", std::process::id()));
        std::fs::write(&f, serde_json::to_string(&r).unwrap()).unwrap();
        let m = merge(&[f.to_string_lossy().into_owned()]).unwrap();
        let _ = std::fs::remove_file(&f);
        assert_eq!(m.publish.unwrap().all_members_us, p.all_members_us);
    }

    #[test]
    fn chatter_over_two_processes() {
        let (ws, admin) = fake_relay("c");
        let mode = Mode::Chatter {
            duration: Duration::from_millis(600),
            rate: 200.0,
        };
        let mut lead = args(ws, admin, "c", mode);
        lead.members = 6;
        let mut follow = lead.clone();
        follow.follower = true;
        follow.first_member = 6;
        follow.relay_pid = None;
        let f = std::thread::spawn(move || run(follow).unwrap());
        let l = run(lead).unwrap();
        let f = f.join().unwrap();
        assert!(!l.complete && !f.complete);
        let dir = std::env::temp_dir();
        let names: Vec<String> = [("l", &l), ("f", &f)]
            .iter()
            .map(|(n, r)| {
                let p = dir.join(format!("rooms-chat-{n}-{}.json", std::process::id()));
                std::fs::write(&p, serde_json::to_string(r).unwrap()).unwrap();
                p.to_string_lossy().into_owned()
            })
            .collect();
        let m = merge(&names).unwrap();
        for n in &names {
            let _ = std::fs::remove_file(n);
        }
        assert!(m.complete, "{}", m.summary());
        let c = m.chatter.clone().unwrap();
        assert!(c.sent >= 100, "{}", m.summary());
        assert_eq!(c.deliveries, c.expected_deliveries, "{}", m.summary());
        assert_eq!((c.missing, c.duplicates, c.self_deliveries), (0, 0, 0));
        assert_eq!(c.expected_deliveries, c.sent * 11);
        assert!(c.deliveries_per_s > 0.0);
        assert_eq!(m.clock_anomalies, 0);
        assert_eq!(m.exit_code(), 0);
    }

    #[test]
    fn merge_chatter_totals() {
        let t = RoomsReport {
            mode: "chatter".into(),
            rate: 10.0,
            room_members_expected: 3,
            ..Default::default()
        };
        // 5 messages sent in all; every member's received + sent must be 5.
        let mut a = raw(true, 2, &[(5, 1), (6, 1)]);
        a.sent = 3;
        a.window_s = 2.0;
        a.deliveries_in_window = 8;
        let mut b = raw(false, 1, &[(4, 1)]);
        b.sent = 2;
        let r = RoomsReport::finalize(&t, vec![a, b]);
        let c = r.chatter.unwrap();
        assert_eq!(c.sent, 5);
        assert_eq!(c.expected_deliveries, 10);
        assert_eq!(c.missing, 1);
        assert_eq!(c.duplicates, 1);
        assert_eq!(c.deliveries_per_s, 4.0);
    }
}
