//! relay-bench: echo origin, load generator and cross-check client for relay benchmarks.
//! Loopback only: `load` and `check` refuse any target outside 127.0.0.0/8 and ::1.

#![forbid(unsafe_code)]

mod check;
#[cfg(test)]
mod e2e_tests;
mod handshakes;
mod load;
mod net;
mod origin;
mod report;
mod rooms;
mod tls;
mod ws;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "relay-bench",
    version,
    about = "WebSocket echo origin and load generators for relay benchmarks (loopback only)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// WebSocket echo server built for many idle connections (SO_REUSEPORT, mio).
    EchoOrigin(OriginOpts),
    /// mio-based load generator: hold many idle connections, or closed-loop throughput.
    Load(LoadOpts),
    /// Independent tokio-tungstenite throughput client, to cross-check `load`.
    Check(CheckOpts),
    /// Fan-out benchmark for relay's pub/sub rooms: publish latency or member chatter.
    Rooms(RoomsOpts),
    /// Combines the JSON files of the `rooms` processes that held one room.
    RoomsMerge(RoomsMergeOpts),
    /// Connection-rate benchmark: connect + TLS handshake (full or resumed) + upgrade +
    /// one echo + close, in a loop per slot.
    Handshakes(HandshakesOpts),
}

/// TLS client options (`load`, `handshakes`).
#[derive(Args, Debug, Clone)]
struct TlsArgs {
    /// Speak TLS to the target (wss://): rustls 0.23, aws-lc-rs provider.
    #[arg(long)]
    tls: bool,
    /// Verify the server's certificate against the CA certificate(s) in this PEM file.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    ca: Option<String>,
    /// BENCHMARK ONLY: accept any certificate and handshake signature without checking, so
    /// the client's verification cost cannot limit the run (loopback targets only).
    #[arg(long)]
    insecure: bool,
    /// Server name for SNI (and, with --ca, the name the certificate must carry); default:
    /// the host part of --target.
    #[arg(long, value_name = "NAME")]
    sni: Option<String>,
    /// Key exchange groups offered: x25519 (default; what OpenSSL 3.0 and rustls servers
    /// both pick), p256, x25519mlkem768, default (rustls's list, post-quantum hybrid first).
    #[arg(long, default_value = "x25519")]
    kx: String,
    /// TLS versions offered: 1.2, 1.3 or any.
    #[arg(long, default_value = "any")]
    tls_version: String,
}

impl TlsArgs {
    /// None without --tls; refuses TLS-only flags given without it.
    fn opts(&self, target: &str, resume: bool) -> Result<Option<tls::TlsOpts>> {
        if !self.tls {
            if self.ca.is_some() || self.insecure || self.sni.is_some() {
                bail!("--ca / --insecure / --sni need --tls");
            }
            return Ok(None);
        }
        let verify = match (&self.ca, self.insecure) {
            (Some(ca), false) => tls::Verify::Ca(ca.clone()),
            (None, true) => tls::Verify::Insecure,
            _ => bail!("--tls needs --ca FILE (verify) or --insecure (benchmark-only: accept any certificate)"),
        };
        let o = tls::TlsOpts {
            verify,
            sni: self.sni.clone().unwrap_or_else(|| tls::default_sni(target)),
            kx: tls::Kx::parse(&self.kx)?,
            version: tls::Version::parse(&self.tls_version)?,
            resume,
        };
        o.server_name()?;
        Ok(Some(o))
    }
}

#[derive(Args, Debug)]
struct HandshakesOpts {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    tls: TlsArgs,
    /// Resume sessions: each slot offers the ticket its previous connection received.
    #[arg(long, conflicts_with = "full")]
    resume: bool,
    /// Full handshakes only (resumption disabled in the client). The default.
    #[arg(long)]
    full: bool,
    /// Connections in progress at once (slots).
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Measurement window in seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of connections before the window (not counted; lets every slot get a ticket).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Payload bytes of the one echoed message.
    #[arg(long, default_value_t = 32)]
    size: usize,
    /// Event-loop threads.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// Source addresses: an IPv4 range A-B (e.g. 127.0.1.1-127.0.1.254) or a list A,B,...
    #[arg(long)]
    sources: Option<String>,
    /// A connection not through all its steps after this many seconds is a failure.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
    /// Server process IDs (comma-separated) whose utime+stime is sampled over the window.
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Write the JSON result to FILE ("-" = stdout).
    #[arg(long, value_name = "FILE")]
    json: Option<String>,
    /// Hard cap on the whole run in seconds.
    #[arg(long, default_value_t = 600)]
    max_seconds: u64,
}

#[derive(Args, Debug)]
struct OriginOpts {
    /// Address to listen on (port 0 picks a free port; see the `ready` line).
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Event-loop threads, each with its own SO_REUSEPORT listener.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// listen(2) backlog per listener.
    #[arg(long, default_value_t = 4096)]
    backlog: i32,
    /// Print a stats line to stderr every N seconds (0 = never).
    #[arg(long, default_value_t = 0)]
    stats_interval: u64,
    /// Exit by itself after N seconds (0 = run until killed).
    #[arg(long, default_value_t = 0)]
    max_seconds: u64,
}

#[derive(Args, Debug, Clone)]
struct Target {
    /// Where to connect: HOST:PORT, loopback only (127.0.0.0/8 or [::1]).
    #[arg(long)]
    target: String,
    /// Request path of the upgrade.
    #[arg(long, default_value = "/")]
    path: String,
    /// Host header value (default: the --target text).
    #[arg(long)]
    host: Option<String>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum ModeOpt {
    Hold,
    Throughput,
}

#[derive(Args, Debug)]
struct LoadOpts {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    tls: TlsArgs,
    /// --tls: resume sessions (one shared client session store); default: full handshakes.
    #[arg(long)]
    resume: bool,
    /// hold: open and keep idle connections; throughput: closed-loop echo traffic.
    #[arg(long, value_enum, default_value_t = ModeOpt::Throughput)]
    mode: ModeOpt,
    /// Connections to open (in total, over all threads).
    #[arg(long, default_value_t = 1)]
    connections: u64,
    /// New connections per second during the ramp (0 = as fast as --max-pending allows).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Connection attempts (connect + upgrade) in progress at once, over all threads.
    #[arg(long, default_value_t = 1024)]
    max_pending: u64,
    /// Give up on a connection whose connect + upgrade takes longer (seconds).
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
    /// Bind source addresses round-robin over this IPv4 range, e.g. 127.0.0.2-127.0.255.254.
    #[arg(long)]
    source_range: Option<String>,
    /// Bind source addresses round-robin over this list, e.g. 127.0.0.2,127.0.0.3.
    #[arg(long)]
    sources: Option<String>,
    /// hold: seconds to keep the connections open once the ramp is done.
    #[arg(long, default_value_t = 10.0)]
    hold: f64,
    /// hold: each connection sends one --size message every SECS seconds and times the echo.
    #[arg(long)]
    trickle: Option<f64>,
    /// Message payload size in bytes.
    #[arg(long, default_value_t = 32)]
    size: usize,
    /// throughput: messages in flight per connection.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=65536))]
    inflight: u32,
    /// throughput: measurement window in seconds (after all connections are open).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Event-loop threads.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// Write the JSON result to FILE ("-" = stdout).
    #[arg(long, value_name = "FILE")]
    json: Option<String>,
    /// Hard cap on the whole run in seconds; the run stops by itself then.
    #[arg(long, default_value_t = 600)]
    max_seconds: u64,
}

#[derive(Args, Debug)]
struct CheckOpts {
    #[command(flatten)]
    target: Target,
    /// Connections.
    #[arg(long, default_value_t = 10)]
    connections: u64,
    /// Messages in flight per connection.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=65536))]
    inflight: u32,
    /// Message payload size in bytes.
    #[arg(long, default_value_t = 32)]
    size: usize,
    /// Measurement window in seconds (after all connections are open).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// tokio worker threads.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// Write the JSON result to FILE ("-" = stdout).
    #[arg(long, value_name = "FILE")]
    json: Option<String>,
    /// Hard cap on the whole run in seconds.
    #[arg(long, default_value_t = 600)]
    max_seconds: u64,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum RoomsModeOpt {
    Publish,
    Chatter,
}

#[derive(Args, Debug)]
struct RoomsOpts {
    /// relay's WebSocket listener: HOST:PORT, loopback only.
    #[arg(long)]
    target: String,
    /// Host header value (default: the --target text).
    #[arg(long)]
    host: Option<String>,
    /// Room name; members upgrade to --path-prefix + NAME.
    #[arg(long)]
    room: String,
    /// Path prefix of the rooms route.
    #[arg(long, default_value = "/rooms/")]
    path_prefix: String,
    /// relay's admin listener (publish API, GET /v1/rooms): HOST:PORT, loopback only.
    #[arg(long)]
    admin: String,
    /// Bearer token of the publish API (apps.publish_token).
    #[arg(long)]
    token: String,
    /// publish: timed POSTs to the admin API; chatter: members publish continuously.
    #[arg(long, value_enum)]
    mode: RoomsModeOpt,
    /// Members this process opens.
    #[arg(long)]
    members: u64,
    /// Members of the room over all loader processes (default: --members).
    #[arg(long)]
    room_members: Option<u64>,
    /// Global number of this process's first member (default 0; give each process its own).
    #[arg(long, default_value_t = 0)]
    first_member: u64,
    /// Not the leader: do not publish, do not start the chatter window, follow the leader.
    #[arg(long)]
    follower: bool,
    /// publish: number of publishes.
    #[arg(long, default_value_t = 20)]
    count: u32,
    /// publish: milliseconds between publishes.
    #[arg(long, default_value_t = 250.0)]
    interval: f64,
    /// chatter: window in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// chatter: messages per second over the whole room, spread round-robin over members.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Payload bytes of every message (at least 24, the stamp).
    #[arg(long, default_value_t = 32)]
    size: usize,
    /// Event-loop threads.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// Source addresses: an IPv4 range A-B (e.g. 127.1.0.1-127.1.0.254) or a list A,B,...
    #[arg(long)]
    sources: Option<String>,
    /// New connections per second while opening members (0 = as fast as --max-pending allows).
    #[arg(long, default_value_t = 0.0)]
    connect_rate: f64,
    /// Connection attempts in progress at once.
    #[arg(long, default_value_t = 1024)]
    max_pending: u64,
    /// A member not upgraded after this many seconds is a failure.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
    /// Leader: seconds to wait for GET /v1/rooms to show --room-members.
    #[arg(long, default_value_t = 60.0)]
    room_wait: f64,
    /// Seconds to wait for stragglers after the last publish / the chatter window.
    #[arg(long, default_value_t = 10.0)]
    settle: f64,
    /// Leader: relay's PID, to sample its CPU time (/proc/PID/stat) and RSS.
    #[arg(long)]
    relay_pid: Option<u32>,
    /// Write the JSON result to FILE ("-" = stdout).
    #[arg(long, value_name = "FILE")]
    json: Option<String>,
    /// Hard cap on the whole run in seconds.
    #[arg(long, default_value_t = 600)]
    max_seconds: u64,
}

#[derive(Args, Debug)]
struct RoomsMergeOpts {
    /// JSON files written by `rooms --json`, one per process.
    #[arg(required = true)]
    files: Vec<String>,
    /// Write the merged JSON to FILE ("-" = stdout).
    #[arg(long, value_name = "FILE")]
    json: Option<String>,
}

/// Largest message accepted by `load`/`check` (they build each message in memory).
const MAX_SIZE: usize = 64 << 20;

fn secs(name: &str, v: f64) -> Result<Duration> {
    if !v.is_finite() || !(0.0..=1e7).contains(&v) {
        bail!("--{name} {v}: expected a number of seconds >= 0");
    }
    Ok(Duration::from_secs_f64(v))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("relay-bench: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::EchoOrigin(o) => {
            origin::run(origin::OriginArgs {
                listen: o.listen,
                threads: o.threads as usize,
                backlog: o.backlog,
                stats_interval: o.stats_interval,
                max_seconds: o.max_seconds,
            })?;
            Ok(0)
        }
        Cmd::Load(o) => {
            let target = net::loopback_target(&o.target.target)?;
            let sources =
                net::Sources::parse(o.source_range.as_deref(), o.sources.as_deref(), target)?;
            if o.size > MAX_SIZE {
                bail!("--size {}: at most {MAX_SIZE} bytes", o.size);
            }
            if !o.rate.is_finite() || o.rate < 0.0 {
                bail!("--rate must be >= 0");
            }
            let trickle = match o.trickle {
                None => None,
                Some(t) if t > 0.0 => Some(secs("trickle", t)?),
                Some(_) => bail!("--trickle must be > 0 seconds"),
            };
            if trickle.is_some() && o.mode != ModeOpt::Hold {
                bail!("--trickle only applies to --mode hold");
            }
            if o.resume && !o.tls.tls {
                bail!("--resume needs --tls");
            }
            let tls = match o.tls.opts(&o.target.target, o.resume)? {
                None => None,
                Some(t) => Some(load::TlsClient {
                    config: std::sync::Arc::new(tls::client_config(&t, 256)?),
                    name: t.server_name()?,
                    opts: t,
                }),
            };
            let args = load::LoadArgs {
                host: o
                    .target
                    .host
                    .clone()
                    .unwrap_or_else(|| o.target.target.clone()),
                path: o.target.path.clone(),
                target,
                target_str: o.target.target.clone(),
                mode: match o.mode {
                    ModeOpt::Hold => load::Mode::Hold,
                    ModeOpt::Throughput => load::Mode::Throughput,
                },
                connections: o.connections,
                rate: o.rate,
                max_pending: o.max_pending.max(1),
                connect_timeout: secs("connect-timeout", o.connect_timeout)?,
                sources,
                hold: secs("hold", o.hold)?,
                trickle,
                size: o.size,
                inflight: o.inflight,
                duration: secs("duration", o.duration)?,
                threads: o.threads as usize,
                max_seconds: o.max_seconds,
                tls,
            };
            let r = load::run(args)?;
            r.emit(o.json.as_deref())?;
            Ok(report::exit_code(&r))
        }
        Cmd::Check(o) => {
            let target = net::loopback_target(&o.target.target)?;
            if o.size > MAX_SIZE {
                bail!("--size {}: at most {MAX_SIZE} bytes", o.size);
            }
            let args = check::CheckArgs {
                host: o
                    .target
                    .host
                    .clone()
                    .unwrap_or_else(|| o.target.target.clone()),
                path: o.target.path.clone(),
                target,
                target_str: o.target.target.clone(),
                connections: o.connections,
                inflight: o.inflight,
                size: o.size,
                duration: secs("duration", o.duration)?,
                threads: o.threads as usize,
                max_seconds: o.max_seconds,
            };
            let r = check::run(args)?;
            r.emit(o.json.as_deref())?;
            Ok(report::exit_code(&r))
        }
        Cmd::Rooms(o) => {
            let r = rooms::run(rooms_args(&o)?)?;
            r.emit(o.json.as_deref())?;
            Ok(r.exit_code())
        }
        Cmd::RoomsMerge(o) => {
            let r = rooms::merge(&o.files)?;
            r.emit(o.json.as_deref())?;
            Ok(r.exit_code())
        }
        Cmd::Handshakes(o) => {
            let target = net::loopback_target(&o.target.target)?;
            if o.resume && !o.tls.tls {
                bail!("--resume needs --tls");
            }
            if o.size > MAX_SIZE {
                bail!("--size {}: at most {MAX_SIZE} bytes", o.size);
            }
            let sources = match o.sources.as_deref() {
                Some(s) if s.contains('-') => net::Sources::parse(Some(s), None, target)?,
                Some(s) => net::Sources::parse(None, Some(s), target)?,
                None => net::Sources::parse(None, None, target)?,
            };
            let r = handshakes::run(handshakes::HsArgs {
                host: o
                    .target
                    .host
                    .clone()
                    .unwrap_or_else(|| o.target.target.clone()),
                path: o.target.path.clone(),
                target,
                target_str: o.target.target.clone(),
                tls: o.tls.opts(&o.target.target, o.resume)?,
                concurrency: o.concurrency,
                warmup: secs("warmup", o.warmup)?,
                duration: secs("duration", o.duration)?,
                size: o.size,
                threads: o.threads as usize,
                sources,
                connect_timeout: secs("connect-timeout", o.connect_timeout)?,
                server_pids: o.server_pid.clone(),
                max_seconds: o.max_seconds,
            })?;
            r.emit(o.json.as_deref())?;
            Ok(r.exit_code())
        }
    }
}

fn rooms_args(o: &RoomsOpts) -> Result<rooms::RoomsArgs> {
    let target = net::loopback_target(&o.target)?;
    let admin = net::loopback_target(&o.admin).map_err(|e| anyhow::anyhow!("--admin: {e}"))?;
    let room_ok = |c: char| c.is_ascii_alphanumeric() || "._~-".contains(c);
    if o.room.is_empty() || o.room.len() > 128 || !o.room.chars().all(room_ok) {
        bail!(
            "--room {:?}: 1 to 128 characters of A-Z a-z 0-9 . _ ~ -",
            o.room
        );
    }
    if !o.path_prefix.starts_with('/') {
        bail!("--path-prefix must start with /");
    }
    let sources = match o.sources.as_deref() {
        Some(s) if s.contains('-') => net::Sources::parse(Some(s), None, target)?,
        Some(s) => net::Sources::parse(None, Some(s), target)?,
        None => net::Sources::parse(None, None, target)?,
    };
    if o.size > MAX_SIZE {
        bail!("--size {}: at most {MAX_SIZE} bytes", o.size);
    }
    if !o.connect_rate.is_finite() || o.connect_rate < 0.0 {
        bail!("--connect-rate must be >= 0");
    }
    let mode = match o.mode {
        RoomsModeOpt::Publish => {
            if o.count == 0 {
                bail!("--count must be >= 1");
            }
            rooms::Mode::Publish {
                count: o.count,
                interval: Duration::from_secs_f64(
                    secs("interval", o.interval)?.as_secs_f64() / 1e3,
                ),
            }
        }
        RoomsModeOpt::Chatter => {
            if !o.rate.is_finite() || o.rate <= 0.0 {
                bail!("--rate must be > 0 messages per second");
            }
            let duration = secs("duration", o.duration)?;
            if duration.is_zero() {
                bail!("--duration must be > 0");
            }
            rooms::Mode::Chatter {
                duration,
                rate: o.rate,
            }
        }
    };
    Ok(rooms::RoomsArgs {
        target,
        target_str: o.target.clone(),
        host: o.host.clone().unwrap_or_else(|| o.target.clone()),
        path: format!("{}{}", o.path_prefix, o.room),
        room: o.room.clone(),
        admin,
        token: o.token.clone(),
        members: o.members,
        room_members: o.room_members.unwrap_or(o.members),
        first_member: o.first_member,
        follower: o.follower,
        mode,
        size: o.size,
        threads: o.threads as usize,
        sources,
        rate: o.connect_rate,
        max_pending: o.max_pending.max(1),
        connect_timeout: secs("connect-timeout", o.connect_timeout)?,
        room_wait: secs("room-wait", o.room_wait)?,
        settle: secs("settle", o.settle)?,
        relay_pid: o.relay_pid,
        max_seconds: o.max_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_examples() {
        Cli::try_parse_from([
            "relay-bench",
            "echo-origin",
            "--listen",
            "127.0.0.1:0",
            "--threads",
            "2",
        ])
        .unwrap();
        Cli::try_parse_from([
            "relay-bench",
            "load",
            "--mode",
            "hold",
            "--target",
            "127.0.0.1:9000",
            "--connections",
            "10000",
            "--rate",
            "5000",
            "--source-range",
            "127.0.0.2-127.0.255.254",
            "--hold",
            "30",
            "--trickle",
            "5",
        ])
        .unwrap();
        Cli::try_parse_from([
            "relay-bench",
            "rooms",
            "--target",
            "127.0.0.1:8080",
            "--room",
            "bench",
            "--admin",
            "127.0.0.1:9090",
            "--token",
            "t",
            "--mode",
            "chatter",
            "--members",
            "9000",
            "--room-members",
            "18000",
            "--follower",
            "--sources",
            "127.1.0.1-127.1.0.254",
        ])
        .unwrap();
        Cli::try_parse_from([
            "relay-bench",
            "rooms-merge",
            "a.json",
            "b.json",
            "--json",
            "-",
        ])
        .unwrap();
        Cli::try_parse_from([
            "relay-bench",
            "check",
            "--target",
            "127.0.0.1:9000",
            "--json",
            "-",
        ])
        .unwrap();
    }

    #[test]
    fn tls_flags() {
        let cli = Cli::try_parse_from([
            "relay-bench",
            "handshakes",
            "--target",
            "127.0.0.1:8443",
            "--tls",
            "--insecure",
            "--resume",
            "--concurrency",
            "8",
            "--server-pid",
            "12,34",
        ])
        .unwrap();
        let Cmd::Handshakes(o) = cli.cmd else {
            panic!("not handshakes")
        };
        assert_eq!(o.server_pid, [12, 34]);
        let t = o.tls.opts("127.0.0.1:8443", o.resume).unwrap().unwrap();
        assert!(t.resume);
        assert_eq!(t.sni, "127.0.0.1");
        assert_eq!(t.verify, tls::Verify::Insecure);
        // --resume and --full exclude each other; --ca and --insecure too.
        assert!(Cli::try_parse_from([
            "relay-bench",
            "handshakes",
            "--target",
            "127.0.0.1:1",
            "--resume",
            "--full"
        ])
        .is_err());
        assert!(Cli::try_parse_from([
            "relay-bench",
            "load",
            "--target",
            "127.0.0.1:1",
            "--tls",
            "--ca",
            "a.pem",
            "--insecure"
        ])
        .is_err());
        // --tls without a verification choice, and TLS flags without --tls, are refused.
        let cli = Cli::try_parse_from(["relay-bench", "load", "--target", "127.0.0.1:1", "--tls"])
            .unwrap();
        let e = run(cli).unwrap_err().to_string();
        assert!(e.contains("--ca FILE") && e.contains("--insecure"), "{e}");
        let cli = Cli::try_parse_from([
            "relay-bench",
            "load",
            "--target",
            "127.0.0.1:1",
            "--sni",
            "relay.test",
        ])
        .unwrap();
        assert!(run(cli).unwrap_err().to_string().contains("need --tls"));
        let cli = Cli::try_parse_from([
            "relay-bench",
            "load",
            "--target",
            "127.0.0.1:1",
            "--tls",
            "--insecure",
            "--kx",
            "ffdhe",
        ])
        .unwrap();
        assert!(run(cli).unwrap_err().to_string().contains("--kx"));
    }

    #[test]
    fn load_refuses_non_loopback() {
        let cli = Cli::try_parse_from(["relay-bench", "load", "--target", "192.0.2.1:80"]).unwrap();
        let e = run(cli).unwrap_err().to_string();
        assert!(e.contains("not a loopback"), "{e}");
        let cli = Cli::try_parse_from(["relay-bench", "check", "--target", "10.1.1.1:80"]).unwrap();
        assert!(run(cli).is_err());
    }
}
