//! Configuration: the TOML schema, its validation, and the embedded default.
//!
//! Parsing happens in two steps: serde reads the file into `raw` structs that mirror the
//! TOML (unknown keys are refused), then [`Config::from_raw`] checks every value and
//! produces the resolved [`Config`] the workers use. Every error names the key it is about,
//! e.g. `route[1].pool: no pool named "chat" (pools: "api")`.

mod raw;

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

pub use crate::reactor::{BusyPoll, Coalesce};

pub use raw::RawConfig;

/// The configuration `relay` runs with when started without `--config` or `--origin`.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");
/// Longest `workers.busy_poll` accepted: past a millisecond the spin costs more than any
/// wake-up it saves.
const MAX_BUSY_POLL: Duration = Duration::from_millis(1);
/// The longest spin of `workers.busy_poll = "auto"`. Measured on a 2-vCPU KVM guest
/// (docs/benchmarks.md) while the relay's core was the limit: 5 µs changed nothing, 20 µs
/// bought 3-18 % msgs/s.
pub const AUTO_BUSY_POLL: Duration = Duration::from_micros(20);
/// Longest `workers.coalesce` accepted: it is added to a message's latency at worst.
const MAX_COALESCE: Duration = Duration::from_millis(1);
/// The delay of `workers.coalesce = "auto"`: the one measured on the 2-vCPU EPYC guest
/// (docs/benchmarks.md, 2026-12-07), where it beat 20 µs on CPU per message.
pub const AUTO_COALESCE: Duration = Duration::from_micros(50);
/// Most completions `workers.coalesce_events` may wait for (a quarter of the CQ ring).
pub const MAX_COALESCE_EVENTS: u32 = 4096;

/// A configuration error that names the offending key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// How relayed bytes move between the two sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPath {
    /// recv into the provided-buffer ring, send from the same buffer.
    Copy,
    /// splice socket → pipe → socket through a per-worker pipe pool.
    Splice,
    /// copy for WebSocket-sized traffic; splice once a flow moves bulk data.
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    RoundRobin,
    LeastConnections,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listener {
    pub address: SocketAddr,
    pub backlog: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTls>,
}

/// Lowest TLS version a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "1.3")]
    V1_3,
}

/// `[listener.tls]`: certificates (files are read when relay starts and on SIGHUP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenerTls {
    #[serde(rename = "certificate")]
    pub certificates: Vec<crate::tls::certs::CertSpec>,
    pub min_version: TlsVersion,
    /// Server-side session cache entries per worker (0 = none).
    pub session_cache: usize,
    pub tickets: bool,
}

/// A pool's TLS toward its origins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolTls {
    /// CA certificates to verify origins with; `None` = the system roots.
    pub ca: Option<PathBuf>,
    /// Name sent as SNI and verified; `None` = the origin's host.
    pub server_name: Option<String>,
    /// Client certificate chain and key (mTLS to the origin).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pool {
    pub name: String,
    pub origins: Vec<SocketAddr>,
    pub balance: Balance,
    pub source_addresses: Vec<IpAddr>,
    /// How long an origin that refused a connection is skipped (passive health).
    #[serde(serialize_with = "ser_duration")]
    pub down_time: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<PoolTls>,
    /// The host the origins were named by (`wss://name:port`), for SNI and verification.
    #[serde(skip)]
    pub host: Option<String>,
}

/// Which hosts a route matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Any,
    /// Lower-case host without port.
    Exact(String),
    /// `*.example.com`: the suffix `.example.com`, matching any subdomain (not the apex).
    Wildcard(String),
}

impl HostMatch {
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Any => true,
            HostMatch::Exact(h) => h == host,
            HostMatch::Wildcard(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        }
    }
}

impl Serialize for HostMatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            HostMatch::Any => s.serialize_str("*"),
            HostMatch::Exact(h) => s.serialize_str(h),
            HostMatch::Wildcard(suffix) => s.serialize_str(&format!("*{suffix}")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    pub name: String,
    pub host: HostMatch,
    pub path: String,
    /// Where the upgrade goes.
    #[serde(skip)]
    pub target: Target,
    #[serde(rename = "pool", skip_serializing_if = "Option::is_none")]
    pub pool_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app: Option<AppKind>,
}

/// What a route sends its requests to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// An origin pool (index into [`Config::pools`]).
    Pool(usize),
    /// An edge app that relay runs itself.
    App(AppKind),
}

/// The origin-less edge apps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AppKind {
    /// Sends every message back.
    Echo,
    /// Pub/sub: the path below the route's prefix names the room.
    Rooms,
    /// The demo page (HTML, plain GET); not a WebSocket endpoint.
    Demo,
}

/// Settings of the edge apps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Apps {
    /// Largest message an app accepts (close 1009 past it).
    pub max_message_size: u64,
    /// Ping an app connection that has been quiet this long; `None` = never.
    #[serde(serialize_with = "ser_opt_duration")]
    pub ping_interval: Option<Duration>,
    /// Close a connection whose pong has not come within this.
    #[serde(serialize_with = "ser_duration")]
    pub pong_timeout: Duration,
    /// Messages a room member may have waiting before it counts as slow.
    pub room_queue: u32,
    /// What happens to a slow member: close it (1008) or drop its messages (counted).
    pub slow_member: SlowMember,
    /// Bearer token of the publish API (`POST /v1/rooms/{name}/messages`); empty = disabled.
    pub publish_token: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SlowMember {
    Close,
    Drop,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Timeouts {
    #[serde(serialize_with = "ser_duration")]
    pub handshake: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub origin_connect: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub origin_handshake: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub idle: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub half_closed: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub drain: Duration,
    /// An upgraded connection silent this long parks its sockets in epoll (no armed
    /// receives); `None` ("off") keeps receives armed.
    #[serde(serialize_with = "ser_opt_duration")]
    pub park_idle: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// Per worker; `None` = derived from `RLIMIT_NOFILE` at start.
    #[serde(serialize_with = "ser_auto")]
    pub max_connections: Option<u32>,
    pub max_head_bytes: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Buffers {
    pub size: u32,
    pub count: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workers {
    /// `None` = one per allowed CPU.
    #[serde(serialize_with = "ser_auto")]
    pub count: Option<usize>,
    pub pin: bool,
    /// Before sleeping on an empty ring, keep polling it: never ("off"), for a set time on
    /// every pause, or ("auto") while recent pauses were short. Spends CPU to avoid the
    /// wake-up latency of an idle CPU (a halted vCPU in a VM).
    #[serde(serialize_with = "ser_busy_poll")]
    pub busy_poll: BusyPoll,
    /// Hold a sleeping worker's wake-up until `coalesce_events` completions are ready or a
    /// delay has passed: never ("off": wake on the first), on every sleep (a duration), or
    /// ("auto") for 50 µs while the completion rate says others will come meanwhile. Trades
    /// up to the delay in latency for fewer wake-ups, which the CPU sending into the relay
    /// pays for.
    #[serde(serialize_with = "ser_coalesce")]
    pub coalesce: CoalesceMode,
    pub coalesce_events: u32,
}

/// `workers.coalesce` as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoalesceMode {
    Off,
    /// Hold for [`AUTO_COALESCE`] while the reactor's gate is open.
    Auto,
    /// Hold for this long on every sleep.
    Always(Duration),
}

impl Workers {
    /// The reactor's coalescing setting, if any.
    pub fn coalesce(&self) -> Option<Coalesce> {
        let (delay, adaptive) = match self.coalesce {
            CoalesceMode::Off => return None,
            CoalesceMode::Auto => (AUTO_COALESCE, true),
            CoalesceMode::Always(d) => (d, false),
        };
        Some(Coalesce {
            events: self.coalesce_events,
            delay,
            adaptive,
        })
    }
}

/// Where billing records go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccessLog {
    pub path: std::path::PathBuf,
    /// Rotate (rename to `<path>.<unix ms>`) at this size; 0 = never (SIGUSR1 reopens).
    pub max_size: u64,
}

/// The resolved configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    pub data_path: DataPath,
    pub workers: Workers,
    #[serde(rename = "listener")]
    pub listeners: Vec<Listener>,
    #[serde(serialize_with = "ser_admin")]
    pub admin: Option<SocketAddr>,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub buffers: Buffers,
    pub access_log: Option<AccessLog>,
    pub apps: Apps,
    #[serde(rename = "pool")]
    pub pools: Vec<Pool>,
    #[serde(rename = "route")]
    pub routes: Vec<Route>,
}

/// `[admin] address = "…"` (or `"off"`), as the file spells it.
fn ser_admin<S: serde::Serializer>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeStruct;
    let mut t = s.serialize_struct("admin", 1)?;
    match v {
        Some(a) => t.serialize_field("address", &a.to_string())?,
        None => t.serialize_field("address", "off")?,
    }
    t.end()
}

fn ser_opt_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration(d, s),
        None => s.serialize_str("off"),
    }
}

fn ser_busy_poll<S: serde::Serializer>(b: &BusyPoll, s: S) -> Result<S::Ok, S::Error> {
    match b {
        BusyPoll::Off => s.serialize_str("off"),
        BusyPoll::Adaptive(_) => s.serialize_str("auto"),
        BusyPoll::Always(d) => ser_duration(d, s),
    }
}

fn ser_coalesce<S: serde::Serializer>(c: &CoalesceMode, s: S) -> Result<S::Ok, S::Error> {
    match c {
        CoalesceMode::Off => s.serialize_str("off"),
        CoalesceMode::Auto => s.serialize_str("auto"),
        CoalesceMode::Always(d) => ser_duration(d, s),
    }
}

fn ser_auto<S: serde::Serializer, T: Serialize>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(n) => n.serialize(s),
        None => s.serialize_str("auto"),
    }
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

/// Parses `"10s"`, `"1m 30s"`, `"250ms"`.
pub fn parse_duration(key: &str, v: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(v.trim()).map_err(|e| {
        ConfigError::new(
            key,
            format!("{v:?} is not a duration ({e}); write e.g. \"10s\", \"250ms\", \"5m\""),
        )
    })
}

/// A setting spelled `"auto"`, `"off"` or a duration (a zero duration is off).
enum AutoOffDuration {
    Off,
    Auto,
    For(Duration),
}

/// Parses an [`AutoOffDuration`] no longer than `max`; `example` is a duration to suggest,
/// `too_long` says what a longer one would cost. `key` names the setting in the error.
fn parse_auto_off_duration(
    key: &str,
    v: &str,
    max: Duration,
    example: &str,
    too_long: &str,
) -> Result<AutoOffDuration, ConfigError> {
    match v.trim() {
        "auto" => return Ok(AutoOffDuration::Auto),
        "off" => return Ok(AutoOffDuration::Off),
        _ => {}
    }
    let d = humantime::parse_duration(v.trim()).map_err(|e| {
        ConfigError::new(
            key,
            format!(
                "{v:?} is neither \"auto\", \"off\" nor a duration ({e}); \
                 write e.g. \"auto\" or \"{example}\""
            ),
        )
    })?;
    if d.is_zero() {
        return Ok(AutoOffDuration::Off);
    }
    if d > max {
        return Err(ConfigError::new(
            key,
            format!("{v:?} is longer than {max:?}: {too_long}"),
        ));
    }
    Ok(AutoOffDuration::For(d))
}

/// Parses a busy-poll setting (`workers.busy_poll`, `--busy-poll`): `"auto"` (spin up to
/// [`AUTO_BUSY_POLL`] while recent spins paid), `"off"`, a zero duration (also off), or a
/// duration up to 1 ms spun on every pause. `key` names the setting in the error.
pub fn parse_busy_poll(key: &str, v: &str) -> Result<BusyPoll, ConfigError> {
    let too_long = "a worker spins this long each time its ring runs empty; \
                    use e.g. \"auto\", \"50us\" or \"off\"";
    Ok(
        match parse_auto_off_duration(key, v, MAX_BUSY_POLL, "20us", too_long)? {
            AutoOffDuration::Off => BusyPoll::Off,
            AutoOffDuration::Auto => BusyPoll::Adaptive(AUTO_BUSY_POLL),
            AutoOffDuration::For(d) => BusyPoll::Always(d),
        },
    )
}

/// Parses a coalescing setting (`workers.coalesce`, `--coalesce`): `"off"`, `"auto"`, a zero
/// duration (also off), or a whole number of microseconds up to 1 ms held on every sleep.
/// `key` names the setting.
pub fn parse_coalesce(key: &str, v: &str) -> Result<CoalesceMode, ConfigError> {
    let too_long = "a message may wait this long for a worker to wake; \
                    use e.g. \"50us\" or \"off\"";
    match parse_auto_off_duration(key, v, MAX_COALESCE, "50us", too_long)? {
        AutoOffDuration::Off => Ok(CoalesceMode::Off),
        AutoOffDuration::Auto => Ok(CoalesceMode::Auto),
        AutoOffDuration::For(d) if d.subsec_nanos() % 1000 != 0 => Err(ConfigError::new(
            key,
            format!("{v:?} is not a whole number of microseconds (the kernel's unit)"),
        )),
        AutoOffDuration::For(d) => Ok(CoalesceMode::Always(d)),
    }
}

/// Checks `workers.coalesce_events` (`--coalesce-events`): 2 up to [`MAX_COALESCE_EVENTS`].
pub fn check_coalesce_events(key: &str, n: u32) -> Result<u32, ConfigError> {
    if (2..=MAX_COALESCE_EVENTS).contains(&n) {
        Ok(n)
    } else {
        Err(ConfigError::new(
            key,
            format!(
                "{n} is outside 2..={MAX_COALESCE_EVENTS}: a worker is woken once this many \
                 completions are ready (1 would be no coalescing; use coalesce = \"off\")"
            ),
        ))
    }
}

/// Parses a byte size: an integer, or `"16KiB"`, `"1MiB"`, `"64k"`.
pub fn parse_size(key: &str, v: &str) -> Result<u64, ConfigError> {
    let t = v.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        ConfigError::new(
            key,
            format!("{v:?} is not a size; write e.g. 16384 or \"16KiB\""),
        )
    })?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        other => {
            return Err(ConfigError::new(
                key,
                format!("unknown size unit {other:?} in {v:?}; use B, KiB or MiB"),
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| ConfigError::new(key, format!("{v:?} is too large")))
}

fn parse_addr(key: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse().map_err(|_| {
        ConfigError::new(
            key,
            format!(
                "{v:?} is not an IP address with a port, e.g. \"127.0.0.1:8080\" or \"[::1]:8080\""
            ),
        )
    })
}

/// Quick-mode command-line settings (see [`Config::quick`]).
#[derive(Debug, Default)]
pub struct Quick<'a> {
    pub listen: &'a [String],
    pub listen_tls: &'a [String],
    /// Certificate chain and key files for the TLS listeners.
    pub cert_key: Option<(&'a str, &'a str)>,
    pub origins: &'a [String],
    pub admin: Option<&'a str>,
}

/// An origin: `IP:PORT`, `ws://HOST:PORT` or `wss://HOST:PORT` (a host name is resolved
/// once, at start-up). Returns the address, whether it is TLS, and the host name if one was
/// given.
fn parse_origin(key: &str, v: &str) -> Result<(SocketAddr, bool, Option<String>), ConfigError> {
    let (secure, rest) = if let Some(r) = v.strip_prefix("wss://") {
        (true, r)
    } else if let Some(r) = v.strip_prefix("ws://") {
        (false, r)
    } else {
        return Ok((parse_addr(key, v)?, false, None));
    };
    let rest = rest.trim_end_matches('/');
    if let Ok(a) = rest.parse::<SocketAddr>() {
        return Ok((a, secure, None));
    }
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(ConfigError::new(
            key,
            format!("{v:?} needs a port, e.g. \"wss://origin.example:443\""),
        ));
    };
    let port: u16 = port
        .parse()
        .map_err(|_| ConfigError::new(key, format!("{port:?} is not a port number")))?;
    let addr = (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ConfigError::new(key, format!("cannot resolve host {host:?}")))?;
    Ok((addr, secure, Some(host.to_ascii_lowercase())))
}

/// Validates `[listener.tls]` (file contents are checked when relay starts).
fn listener_tls(key: &str, t: &raw::RawListenerTls) -> Result<ListenerTls, ConfigError> {
    if t.certificates.is_empty() {
        return Err(ConfigError::new(
            format!("{key}.certificate"),
            "a TLS listener needs at least one [[listener.tls.certificate]] with cert and key",
        ));
    }
    let mut certificates = Vec::new();
    for (j, c) in t.certificates.iter().enumerate() {
        let k = |f: &str| format!("{key}.certificate[{j}].{f}");
        if c.cert.is_empty() {
            return Err(ConfigError::new(
                k("cert"),
                "missing: the PEM certificate chain file",
            ));
        }
        if c.key.is_empty() {
            return Err(ConfigError::new(
                k("key"),
                "missing: the PEM private key file",
            ));
        }
        for n in &c.names {
            let bare = n.strip_prefix("*.").unwrap_or(n);
            if bare.is_empty() || bare.contains('*') || bare.contains(' ') {
                return Err(ConfigError::new(
                    k("names"),
                    format!("{n:?} is not a host name or a \"*.example.com\" wildcard"),
                ));
            }
        }
        certificates.push(crate::tls::certs::CertSpec {
            cert: PathBuf::from(&c.cert),
            key: PathBuf::from(&c.key),
            names: c.names.clone(),
        });
    }
    let min_version = match t.min_version.as_str() {
        "1.2" => TlsVersion::V1_2,
        "1.3" => TlsVersion::V1_3,
        other => {
            return Err(ConfigError::new(
                format!("{key}.min_version"),
                format!("{other:?} is not \"1.2\" or \"1.3\""),
            ))
        }
    };
    if t.session_cache > 1 << 24 {
        return Err(ConfigError::new(
            format!("{key}.session_cache"),
            format!("{} is more than 16777216 entries", t.session_cache),
        ));
    }
    Ok(ListenerTls {
        certificates,
        min_version,
        session_cache: t.session_cache as usize,
        tickets: t.tickets,
    })
}

impl Config {
    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| ConfigError::new("", e.to_string().trim_end().to_string()))?;
        Config::from_raw(raw)
    }

    /// The embedded default.
    pub fn embedded() -> Config {
        Config::from_toml(EMBEDDED_DEFAULT).expect("embedded default config is valid")
    }

    /// Quick mode: plaintext and TLS listeners relaying every upgrade to one pool, or (no
    /// origins) serving the embedded default's edge apps.
    pub fn quick(q: &Quick<'_>) -> Result<Config, ConfigError> {
        let mut raw = if q.origins.is_empty() {
            toml::from_str::<RawConfig>(EMBEDDED_DEFAULT).expect("embedded default parses")
        } else {
            let mut raw = RawConfig::default();
            raw.pools = vec![raw::RawPool {
                name: "origin".into(),
                origins: q.origins.to_vec(),
                ..Default::default()
            }];
            raw.routes = vec![raw::RawRoute {
                pool: "origin".into(),
                ..Default::default()
            }];
            raw
        };
        raw.listeners = q
            .listen
            .iter()
            .map(|a| raw::RawListener {
                address: a.clone(),
                ..Default::default()
            })
            .collect();
        if !q.listen_tls.is_empty() {
            let (cert, key) = q.cert_key.ok_or_else(|| {
                ConfigError::new("--listen-tls", "needs --cert FILE and --key FILE")
            })?;
            for a in q.listen_tls {
                raw.listeners.push(raw::RawListener {
                    address: a.clone(),
                    tls: Some(raw::RawListenerTls {
                        certificates: vec![raw::RawCertificate {
                            cert: cert.to_string(),
                            key: key.to_string(),
                            names: Vec::new(),
                        }],
                        ..Default::default()
                    }),
                    ..Default::default()
                });
            }
        }
        if let Some(a) = q.admin {
            raw.admin.address = a.to_string();
        }
        Config::from_raw(raw)
    }

    /// Validates raw values; every error names its key.
    pub fn from_raw(raw: RawConfig) -> Result<Config, ConfigError> {
        let data_path = match raw.data_path.as_str() {
            "copy" => DataPath::Copy,
            "splice" => DataPath::Splice,
            "auto" => DataPath::Auto,
            other => {
                return Err(ConfigError::new(
                    "data_path",
                    format!("{other:?} is not one of \"copy\", \"splice\", \"auto\""),
                ))
            }
        };
        let workers = Workers {
            count: match &raw.workers.count {
                raw::Count::Auto(s) if s == "auto" => None,
                raw::Count::Auto(s) => {
                    return Err(ConfigError::new(
                        "workers.count",
                        format!("{s:?} is neither \"auto\" nor a number"),
                    ))
                }
                raw::Count::N(0) => {
                    return Err(ConfigError::new("workers.count", "must be at least 1"))
                }
                raw::Count::N(n) if *n > 1024 => {
                    return Err(ConfigError::new(
                        "workers.count",
                        format!("{n} workers is more than 1024"),
                    ))
                }
                raw::Count::N(n) => Some(*n as usize),
            },
            pin: raw.workers.pin,
            busy_poll: parse_busy_poll("workers.busy_poll", &raw.workers.busy_poll)?,
            coalesce: parse_coalesce("workers.coalesce", &raw.workers.coalesce)?,
            coalesce_events: check_coalesce_events(
                "workers.coalesce_events",
                raw.workers.coalesce_events,
            )?,
        };
        if raw.listeners.is_empty() {
            return Err(ConfigError::new(
                "listener",
                "no listener configured; add [[listener]] with address = \"127.0.0.1:8080\"",
            ));
        }
        let mut listeners = Vec::new();
        for (i, l) in raw.listeners.iter().enumerate() {
            let key = format!("listener[{i}].address");
            let address = parse_addr(&key, &l.address)?;
            if listeners.iter().any(|x: &Listener| x.address == address) {
                return Err(ConfigError::new(key, format!("{address} is listed twice")));
            }
            if l.backlog == 0 || l.backlog > 1 << 20 {
                return Err(ConfigError::new(
                    format!("listener[{i}].backlog"),
                    format!("{} is outside 1..=1048576", l.backlog),
                ));
            }
            let tls = match &l.tls {
                None => None,
                Some(t) => Some(listener_tls(&format!("listener[{i}].tls"), t)?),
            };
            listeners.push(Listener {
                address,
                backlog: l.backlog,
                tls,
            });
        }
        let admin = match raw.admin.address.as_str() {
            "" | "off" => None,
            a => Some(parse_addr("admin.address", a)?),
        };
        if let Some(a) = admin {
            if listeners.iter().any(|l| l.address == a) {
                return Err(ConfigError::new(
                    "admin.address",
                    format!("{a} is also a listener address"),
                ));
            }
        }

        let t = &raw.timeouts;
        let timeouts = Timeouts {
            handshake: parse_duration("timeouts.handshake", &t.handshake)?,
            origin_connect: parse_duration("timeouts.origin_connect", &t.origin_connect)?,
            origin_handshake: parse_duration("timeouts.origin_handshake", &t.origin_handshake)?,
            idle: parse_duration("timeouts.idle", &t.idle)?,
            half_closed: parse_duration("timeouts.half_closed", &t.half_closed)?,
            drain: parse_duration("timeouts.drain", &t.drain)?,
            park_idle: match t.park_idle.trim() {
                "off" => None,
                v => Some(parse_duration("timeouts.park_idle", v)?),
            },
        };
        if let Some(d) = timeouts.park_idle {
            if d < Duration::from_millis(100) {
                return Err(ConfigError::new(
                    "timeouts.park_idle",
                    "must be at least 100ms (the timer resolution), or \"off\"",
                ));
            }
        }
        for (k, d) in [
            ("timeouts.handshake", timeouts.handshake),
            ("timeouts.origin_connect", timeouts.origin_connect),
            ("timeouts.origin_handshake", timeouts.origin_handshake),
            ("timeouts.idle", timeouts.idle),
            ("timeouts.half_closed", timeouts.half_closed),
        ] {
            if d < Duration::from_millis(100) {
                return Err(ConfigError::new(
                    k,
                    "must be at least 100ms (the timer resolution)",
                ));
            }
            if d > Duration::from_secs(7 * 24 * 3600) {
                return Err(ConfigError::new(k, "must be at most 7 days"));
            }
        }

        let max_connections = match &raw.limits.max_connections {
            raw::Count::Auto(s) if s == "auto" => None,
            raw::Count::Auto(s) => {
                return Err(ConfigError::new(
                    "limits.max_connections",
                    format!("{s:?} is neither \"auto\" nor a number"),
                ))
            }
            raw::Count::N(0) => {
                return Err(ConfigError::new(
                    "limits.max_connections",
                    "must be at least 1",
                ))
            }
            raw::Count::N(n) if *n > 1 << 24 => {
                return Err(ConfigError::new(
                    "limits.max_connections",
                    "must be at most 16777216 per worker",
                ))
            }
            raw::Count::N(n) => Some(*n as u32),
        };
        let max_head = parse_size(
            "limits.max_head_bytes",
            &raw.limits.max_head_bytes.to_string_value(),
        )?;
        if !(1024..=65536).contains(&max_head) {
            return Err(ConfigError::new(
                "limits.max_head_bytes",
                format!("{max_head} is outside 1024..=65536"),
            ));
        }
        let limits = Limits {
            max_connections,
            max_head_bytes: max_head as u32,
        };

        let size = parse_size("buffers.size", &raw.buffers.size.to_string_value())?;
        if !(1024..=32768).contains(&size) {
            return Err(ConfigError::new(
                "buffers.size",
                format!("{size} is outside 1KiB..=32KiB"),
            ));
        }
        let count = raw.buffers.count;
        if !(64..=32768).contains(&count) || !count.is_power_of_two() {
            return Err(ConfigError::new(
                "buffers.count",
                format!("{count} must be a power of two between 64 and 32768"),
            ));
        }
        let buffers = Buffers {
            size: size as u32,
            count: count as u16,
        };

        let access_log = match raw.access_log.path.as_str() {
            "" | "off" => None,
            p => Some(AccessLog {
                path: p.into(),
                max_size: parse_size(
                    "access_log.max_size",
                    &raw.access_log.max_size.to_string_value(),
                )?,
            }),
        };

        let a = &raw.apps;
        let apps = Apps {
            max_message_size: parse_size(
                "apps.max_message_size",
                &a.max_message_size.to_string_value(),
            )?,
            ping_interval: match a.ping_interval.as_str() {
                "off" | "" => None,
                v => Some(parse_duration("apps.ping_interval", v)?),
            },
            pong_timeout: parse_duration("apps.pong_timeout", &a.pong_timeout)?,
            room_queue: a.room_queue,
            slow_member: match a.slow_member.as_str() {
                "close" => SlowMember::Close,
                "drop" => SlowMember::Drop,
                other => {
                    return Err(ConfigError::new(
                        "apps.slow_member",
                        format!("{other:?} is not \"close\" or \"drop\""),
                    ))
                }
            },
            publish_token: a.publish_token.clone(),
        };
        if apps.room_queue == 0 {
            return Err(ConfigError::new("apps.room_queue", "must be at least 1"));
        }
        if apps.max_message_size == 0 {
            return Err(ConfigError::new(
                "apps.max_message_size",
                "must be at least 1",
            ));
        }

        let mut pools: Vec<Pool> = Vec::new();
        for (i, p) in raw.pools.iter().enumerate() {
            let k = |f: &str| format!("pool[{i}].{f}");
            if p.name.is_empty() {
                return Err(ConfigError::new(k("name"), "a pool needs a name"));
            }
            if pools.iter().any(|x| x.name == p.name) {
                return Err(ConfigError::new(
                    k("name"),
                    format!("pool {:?} is defined twice", p.name),
                ));
            }
            if p.origins.is_empty() {
                return Err(ConfigError::new(
                    k("origins"),
                    "a pool needs at least one origin address",
                ));
            }
            let mut origins = Vec::new();
            let mut tls = p.tls;
            let mut host = None;
            let mut first_secure = false;
            for (j, o) in p.origins.iter().enumerate() {
                let key = format!("pool[{i}].origins[{j}]");
                let (addr, secure, name) = parse_origin(&key, o)?;
                if j == 0 {
                    first_secure = secure;
                } else if secure != first_secure {
                    return Err(ConfigError::new(
                        key,
                        "a pool's origins must be all wss:// or all plain (tls = true makes plain \
                         addresses TLS)",
                    ));
                }
                tls |= secure;
                if host.is_none() {
                    host = name;
                }
                origins.push(addr);
            }
            let tls = if tls {
                let opt = |v: &str| (!v.is_empty()).then(|| v.to_string());
                let client_cert = match (opt(&p.tls_client_cert), opt(&p.tls_client_key)) {
                    (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
                    (None, None) => None,
                    (Some(_), None) => {
                        return Err(ConfigError::new(
                            k("tls_client_key"),
                            "tls_client_cert needs tls_client_key",
                        ))
                    }
                    (None, Some(_)) => {
                        return Err(ConfigError::new(
                            k("tls_client_cert"),
                            "tls_client_key needs tls_client_cert",
                        ))
                    }
                };
                Some(PoolTls {
                    ca: opt(&p.tls_ca).map(PathBuf::from),
                    server_name: opt(&p.tls_server_name),
                    client_cert,
                })
            } else {
                for (f, v) in [
                    ("tls_ca", &p.tls_ca),
                    ("tls_server_name", &p.tls_server_name),
                    ("tls_client_cert", &p.tls_client_cert),
                    ("tls_client_key", &p.tls_client_key),
                ] {
                    if !v.is_empty() {
                        return Err(ConfigError::new(
                            k(f),
                            "only applies to a TLS pool (set tls = true or use wss:// origins)",
                        ));
                    }
                }
                None
            };
            let balance = match p.balance.as_str() {
                "round-robin" => Balance::RoundRobin,
                "least-connections" => Balance::LeastConnections,
                other => {
                    return Err(ConfigError::new(
                        k("balance"),
                        format!("{other:?} is not \"round-robin\" or \"least-connections\""),
                    ))
                }
            };
            let mut source_addresses = Vec::new();
            for (j, s) in p.source_addresses.iter().enumerate() {
                let ip: IpAddr = s.parse().map_err(|_| {
                    ConfigError::new(
                        format!("pool[{i}].source_addresses[{j}]"),
                        format!("{s:?} is not an IP address"),
                    )
                })?;
                if origins.iter().any(|o| o.is_ipv4() != ip.is_ipv4()) {
                    return Err(ConfigError::new(
                        format!("pool[{i}].source_addresses[{j}]"),
                        format!(
                            "{ip} is not of the same address family as every origin of the pool"
                        ),
                    ));
                }
                source_addresses.push(ip);
            }
            pools.push(Pool {
                name: p.name.clone(),
                origins,
                balance,
                source_addresses,
                down_time: parse_duration(&k("down_time"), &p.down_time)?,
                tls,
                host,
            });
        }

        if raw.routes.is_empty() {
            return Err(ConfigError::new(
                "route",
                "no route configured; add [[route]] with pool = \"…\" (and optionally host and path)",
            ));
        }
        let mut routes = Vec::new();
        for (i, r) in raw.routes.iter().enumerate() {
            let k = |f: &str| format!("route[{i}].{f}");
            let host = parse_host(&k("host"), &r.host)?;
            if !r.path.starts_with('/') {
                return Err(ConfigError::new(
                    k("path"),
                    format!("{:?} must start with '/'", r.path),
                ));
            }
            let app = match r.app.as_str() {
                "" => None,
                "echo" => Some(AppKind::Echo),
                "rooms" => Some(AppKind::Rooms),
                "demo" => Some(AppKind::Demo),
                other => {
                    return Err(ConfigError::new(
                        k("app"),
                        format!("{other:?} is not an app; use \"echo\", \"rooms\" or \"demo\""),
                    ))
                }
            };
            if let Some(app) = app {
                if !r.pool.is_empty() {
                    return Err(ConfigError::new(
                        k("app"),
                        "a route sends to a pool or to an app, not both",
                    ));
                }
                let name = if r.name.is_empty() {
                    format!("route{i}")
                } else {
                    r.name.clone()
                };
                routes.push(Route {
                    name,
                    host,
                    path: r.path.clone(),
                    target: Target::App(app),
                    pool_name: None,
                    app: Some(app),
                });
                continue;
            }
            if r.pool.is_empty() {
                return Err(ConfigError::new(
                    k("pool"),
                    "a route needs pool = \"<name>\" or app = \"echo\" | \"rooms\" | \"demo\"",
                ));
            }
            let pool = pools.iter().position(|p| p.name == r.pool).ok_or_else(|| {
                let names: Vec<String> = pools.iter().map(|p| format!("{:?}", p.name)).collect();
                ConfigError::new(
                    k("pool"),
                    format!(
                        "no pool named {:?} (pools: {})",
                        r.pool,
                        if names.is_empty() {
                            "none".into()
                        } else {
                            names.join(", ")
                        }
                    ),
                )
            })?;
            let name = if r.name.is_empty() {
                format!("route{i}")
            } else {
                r.name.clone()
            };
            routes.push(Route {
                name,
                host,
                path: r.path.clone(),
                target: Target::Pool(pool),
                pool_name: Some(r.pool.clone()),
                app: None,
            });
        }

        Ok(Config {
            data_path,
            workers,
            listeners,
            admin,
            timeouts,
            limits,
            buffers,
            access_log,
            apps,
            pools,
            routes,
        })
    }

    /// The resolved configuration as TOML, for `relay check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// First route whose host and path prefix match.
    pub fn route(&self, host: &str, path: &str) -> Option<usize> {
        self.routes
            .iter()
            .position(|r| r.host.matches(host) && path.starts_with(&r.path))
    }
}

fn parse_host(key: &str, v: &str) -> Result<HostMatch, ConfigError> {
    let h = v.trim().to_ascii_lowercase();
    if h.is_empty() || h == "*" {
        return Ok(HostMatch::Any);
    }
    let valid = |s: &str| {
        !s.is_empty()
            && s.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            })
    };
    if let Some(rest) = h.strip_prefix("*.") {
        if valid(rest) {
            return Ok(HostMatch::Wildcard(format!(".{rest}")));
        }
    } else if valid(&h) && !h.contains('*') {
        return Ok(HostMatch::Exact(h));
    }
    Err(ConfigError::new(
        key,
        format!("{v:?} is not a host name; write \"example.com\", \"*.example.com\" or \"*\""),
    ))
}

#[cfg(test)]
mod tests;
