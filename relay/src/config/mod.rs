//! Configuration: the TOML schema, its validation, and the embedded default.
//!
//! Parsing happens in two steps: serde reads the file into `raw` structs that mirror the
//! TOML (unknown keys are refused), then [`Config::from_raw`] checks every value and
//! produces the resolved [`Config`] the workers use. Every error names the key it is about,
//! e.g. `route[1].pool: no pool named "chat" (pools: "api")`.

mod raw;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Serialize;

pub use raw::RawConfig;

/// The configuration `relay` runs with when started without `--config` or `--origin`.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");

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

    /// Quick mode: one listener, every upgrade to one pool.
    pub fn quick(
        listen: &[String],
        origins: &[String],
        admin: Option<&str>,
    ) -> Result<Config, ConfigError> {
        let mut raw = RawConfig::default();
        raw.listeners = listen
            .iter()
            .map(|a| raw::RawListener {
                address: a.clone(),
                ..Default::default()
            })
            .collect();
        raw.pools = vec![raw::RawPool {
            name: "origin".into(),
            origins: origins.to_vec(),
            ..Default::default()
        }];
        raw.routes = vec![raw::RawRoute {
            pool: "origin".into(),
            ..Default::default()
        }];
        if let Some(a) = admin {
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
            listeners.push(Listener {
                address,
                backlog: l.backlog,
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
        };
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
            for (j, o) in p.origins.iter().enumerate() {
                origins.push(parse_addr(&format!("pool[{i}].origins[{j}]"), o)?);
            }
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
