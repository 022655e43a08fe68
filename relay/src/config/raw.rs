//! The TOML file as written: strings and numbers, before validation.

use serde::Deserialize;

/// An integer or a string such as `"auto"`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Count {
    N(u64),
    Auto(String),
}

/// A size given as an integer (bytes) or a string (`"16KiB"`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    pub fn to_string_value(&self) -> String {
        match self {
            Size::Bytes(n) => n.to_string(),
            Size::Text(s) => s.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub data_path: String,
    pub workers: RawWorkers,
    #[serde(rename = "listener")]
    pub listeners: Vec<RawListener>,
    pub admin: RawAdmin,
    pub timeouts: RawTimeouts,
    pub limits: RawLimits,
    pub buffers: RawBuffers,
    pub access_log: RawAccessLog,
    pub apps: RawApps,
    #[serde(rename = "pool")]
    pub pools: Vec<RawPool>,
    #[serde(rename = "route")]
    pub routes: Vec<RawRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawWorkers {
    pub count: Count,
    pub pin: bool,
    pub busy_poll: String,
    pub coalesce: String,
    pub coalesce_events: u32,
}

impl Default for RawWorkers {
    fn default() -> Self {
        RawWorkers {
            count: Count::Auto("auto".into()),
            pin: true,
            busy_poll: "off".into(),
            coalesce: "off".into(),
            coalesce_events: 16,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawListener {
    pub address: String,
    pub backlog: u32,
    pub tls: Option<RawListenerTls>,
}

impl Default for RawListener {
    fn default() -> Self {
        RawListener {
            address: String::new(),
            backlog: 4096,
            tls: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawListenerTls {
    #[serde(rename = "certificate")]
    pub certificates: Vec<RawCertificate>,
    pub min_version: String,
    pub session_cache: u64,
    pub tickets: bool,
}

impl Default for RawListenerTls {
    fn default() -> Self {
        RawListenerTls {
            certificates: Vec::new(),
            min_version: "1.2".into(),
            session_cache: 1024,
            tickets: true,
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawCertificate {
    pub cert: String,
    pub key: String,
    pub names: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    pub address: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            address: "off".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTimeouts {
    pub handshake: String,
    pub origin_connect: String,
    pub origin_handshake: String,
    pub idle: String,
    pub half_closed: String,
    pub drain: String,
    pub park_idle: String,
}

impl Default for RawTimeouts {
    fn default() -> Self {
        RawTimeouts {
            handshake: "10s".into(),
            origin_connect: "5s".into(),
            origin_handshake: "10s".into(),
            idle: "10m".into(),
            half_closed: "30s".into(),
            drain: "30s".into(),
            park_idle: "1s".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    pub max_connections: Count,
    pub max_head_bytes: Size,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_connections: Count::Auto("auto".into()),
            max_head_bytes: Size::Bytes(16384),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBuffers {
    pub size: Size,
    pub count: u32,
}

impl Default for RawBuffers {
    fn default() -> Self {
        RawBuffers {
            size: Size::Bytes(16384),
            count: 4096,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawApps {
    pub max_message_size: Size,
    pub ping_interval: String,
    pub pong_timeout: String,
    pub room_queue: u32,
    pub slow_member: String,
    pub publish_token: String,
}

impl Default for RawApps {
    fn default() -> Self {
        RawApps {
            max_message_size: Size::Bytes(1 << 20),
            ping_interval: "30s".into(),
            pong_timeout: "10s".into(),
            room_queue: 1024,
            slow_member: "close".into(),
            publish_token: String::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAccessLog {
    pub path: String,
    pub max_size: Size,
}

impl Default for RawAccessLog {
    fn default() -> Self {
        RawAccessLog {
            path: "off".into(),
            max_size: Size::Bytes(0),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPool {
    pub name: String,
    pub origins: Vec<String>,
    pub balance: String,
    pub source_addresses: Vec<String>,
    pub down_time: String,
    pub tls: bool,
    pub tls_ca: String,
    pub tls_server_name: String,
    pub tls_client_cert: String,
    pub tls_client_key: String,
}

impl Default for RawPool {
    fn default() -> Self {
        RawPool {
            name: String::new(),
            origins: Vec::new(),
            balance: "round-robin".into(),
            source_addresses: Vec::new(),
            down_time: "2s".into(),
            tls: false,
            tls_ca: String::new(),
            tls_server_name: String::new(),
            tls_client_cert: String::new(),
            tls_client_key: String::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRoute {
    pub name: String,
    pub host: String,
    pub path: String,
    pub pool: String,
    pub app: String,
}

impl Default for RawRoute {
    fn default() -> Self {
        RawRoute {
            name: String::new(),
            host: "*".into(),
            path: "/".into(),
            pool: String::new(),
            app: String::new(),
        }
    }
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            data_path: "copy".into(),
            workers: RawWorkers::default(),
            listeners: Vec::new(),
            admin: RawAdmin::default(),
            timeouts: RawTimeouts::default(),
            limits: RawLimits::default(),
            buffers: RawBuffers::default(),
            access_log: RawAccessLog::default(),
            apps: RawApps::default(),
            pools: Vec::new(),
            routes: Vec::new(),
        }
    }
}
