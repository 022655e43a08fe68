//! Test harness: the real `relay` binary, real origins and clients, loopback only.
#![allow(dead_code)]
// tungstenite's handshake callback type fixes the size of its error variant.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// A loopback port reserved for the relay under test. The port stays bound (with
/// `SO_REUSEPORT`, never listening) for the life of the test process, so the kernel cannot
/// hand it out as the ephemeral source port of some other connection before relay binds it;
/// relay binds it with `SO_REUSEPORT` too, and only listening sockets receive connections.
pub fn free_port() -> u16 {
    static HELD: Mutex<Vec<socket2::Socket>> = Mutex::new(Vec::new());
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_reuse_port(true).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let port = s.local_addr().unwrap().as_socket().unwrap().port();
    HELD.lock().unwrap().push(s);
    port
}

/// A free loopback port for a socket bound without `SO_REUSEPORT` (the admin listener):
/// bound, then released. Taken below the ephemeral range (32768+), so that a connection
/// another test opens meanwhile cannot get it as its source port before relay binds it;
/// each test process starts at its own offset.
pub fn free_plain_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = 12000 + (std::process::id() % 400) * 40;
    for _ in 0..20000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 12000 + (base - 12000 + n) % 20000;
        if StdListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free port below the ephemeral range")
}

pub struct Relay {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub log: Arc<Mutex<String>>,
}

impl Relay {
    /// Starts relay in quick mode in front of `origin`, with extra flags.
    pub fn quick(origin: SocketAddr, extra: &[&str]) -> Relay {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut args: Vec<String> = vec![
            "--listen".into(),
            addr.to_string(),
            "--origin".into(),
            origin.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Relay::start_with(addr, args)
    }

    /// Starts a second relay on the same address (SO_REUSEPORT).
    pub fn quick_on(addr: SocketAddr, origin: SocketAddr, extra: &[&str]) -> Relay {
        let mut args: Vec<String> = vec![
            "--listen".into(),
            addr.to_string(),
            "--origin".into(),
            origin.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Relay::start_with(addr, args)
    }

    /// Starts relay with a config file; `{LISTEN}` and `{ADMIN}` in the text are filled in.
    pub fn with_config(text: &str, extra: &[&str]) -> Relay {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let text = text.replace("{LISTEN}", &addr.to_string());
        let path =
            std::env::temp_dir().join(format!("relay-test-{}-{port}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let mut args = vec!["--config".to_string(), path.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Relay::start_with(addr, args)
    }

    fn start_with(addr: SocketAddr, mut args: Vec<String>) -> Relay {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_plain_port()).parse().unwrap();
        // The whole suite can run on another data path: RELAY_TEST_DATA_PATH=splice. A test
        // that names its data path (a copy-path feature's test) keeps it.
        let named = args.iter().any(|a| a == "--data-path");
        match std::env::var("RELAY_TEST_DATA_PATH") {
            Ok(dp) if !named => {
                args.push("--data-path".into());
                args.push(dp);
            }
            _ => {}
        }
        if !args.iter().any(|a| a == "--admin") {
            args.push("--admin".into());
            args.push(admin.to_string());
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_relay"))
            .args(&args)
            .env(
                "RELAY_LOG",
                std::env::var("RELAY_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start relay");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut ready_sent = false;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                log2.lock().unwrap().push_str(&line);
                log2.lock().unwrap().push('\n');
                if !ready_sent && line.contains("relay ready") {
                    ready_sent = true;
                    let _ = tx.send(true);
                }
            }
            if !ready_sent {
                let _ = tx.send(false);
            }
        });
        let ok = rx.recv_timeout(Duration::from_secs(20)).unwrap_or(false);
        assert!(ok, "relay did not become ready:\n{}", log.lock().unwrap());
        Relay {
            child,
            addr,
            admin,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// `GET path` on the admin listener: (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        let mut s = StdStream::connect(self.admin).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let status = out[9..12].parse().unwrap();
        let body = out
            .split_once("\r\n\r\n")
            .map(|x| x.1)
            .unwrap_or("")
            .to_string();
        (status, body)
    }

    /// Every sample of `/metrics`, keyed by name with labels.
    pub fn metrics(&self) -> HashMap<String, f64> {
        let (status, body) = self.admin_get("/metrics");
        assert_eq!(status, 200);
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    /// Sum of a metric over all label sets whose key contains every `filter`.
    pub fn metric_sum(&self, name: &str, filters: &[&str]) -> f64 {
        self.metrics()
            .iter()
            .filter(|(k, _)| {
                (k.as_str() == name || k.starts_with(&format!("{name}{{")))
                    && filters.iter().all(|f| k.contains(f))
            })
            .map(|(_, v)| v)
            .sum()
    }

    pub fn active(&self) -> f64 {
        self.metric_sum("relay_connections_active", &[])
    }

    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    pub fn rss_bytes(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: u64 = s
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        kb * 1024
    }

    /// Waits (polling the relay's own gauge) until `f` holds, failing after `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, f: impl Fn(&Relay) -> bool) {
        let start = Instant::now();
        while !f(self) {
            assert!(
                start.elapsed() < timeout,
                "timed out waiting for {what}; relay log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asserts that no connection is left: active gauge zero and descriptors back to `fds`.
    pub fn assert_no_leak(&self, baseline_fds: usize) {
        self.wait_for(
            "active connections to reach 0",
            Duration::from_secs(10),
            |r| r.active() == 0.0,
        );
        self.wait_for(
            "descriptors back to baseline",
            Duration::from_secs(10),
            |r| r.open_fds() <= baseline_fds,
        );
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "relay did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the test origin does with a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OriginMode {
    /// Echo every message.
    Echo,
    /// Echo, but on a text message "die" drop the TCP connection without a close frame.
    EchoOrDie,
}

/// A WebSocket echo origin (tokio-tungstenite) on its own runtime thread. Records close
/// frames it receives and counts connections that ended.
pub struct Origin {
    pub addr: SocketAddr,
    pub closes: Arc<Mutex<Vec<(u16, String)>>>,
    pub ended: Arc<std::sync::atomic::AtomicUsize>,
    pub headers: Arc<Mutex<Vec<String>>>,
}

pub fn ws_origin(mode: OriginMode) -> Origin {
    let std_listener = StdListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    let closes = Arc::new(Mutex::new(Vec::new()));
    let ended = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let headers = Arc::new(Mutex::new(Vec::new()));
    let (c2, e2, h2) = (closes.clone(), ended.clone(), headers.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = TcpListener::from_std(std_listener).unwrap();
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let (c3, e3, h3) = (c2.clone(), e2.clone(), h2.clone());
                tokio::spawn(async move {
                    let cb = |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
                              resp| {
                        let mut text = String::new();
                        for (k, v) in req.headers() {
                            text.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("")));
                        }
                        h3.lock().unwrap().push(text);
                        Ok(resp)
                    };
                    let cfg = tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
                        max_message_size: None,
                        max_frame_size: None,
                        ..Default::default()
                    };
                    let ws =
                        tokio_tungstenite::accept_hdr_async_with_config(s, cb, Some(cfg)).await;
                    if let Ok(mut ws) = ws {
                        while let Some(Ok(m)) = ws.next().await {
                            match m {
                                Message::Text(t) if mode == OriginMode::EchoOrDie && t == "die" => {
                                    // Vanish: drop the socket without a close frame.
                                    drop(ws);
                                    e3.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                    return;
                                }
                                Message::Text(t) if t.starts_with("close-me:") => {
                                    let code: u16 = t[9..].parse().unwrap();
                                    let _ = ws
                                        .send(Message::Close(Some(
                                            tokio_tungstenite::tungstenite::protocol::CloseFrame {
                                                code: code.into(),
                                                reason: "origin says bye".into(),
                                            },
                                        )))
                                        .await;
                                }
                                Message::Close(f) => {
                                    if let Some(f) = f {
                                        c3.lock()
                                            .unwrap()
                                            .push((f.code.into(), f.reason.to_string()));
                                    }
                                }
                                Message::Ping(_) | Message::Pong(_) => {}
                                m => {
                                    if ws.send(m).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    e3.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
        });
    });
    Origin {
        addr,
        closes,
        ended,
        headers,
    }
}

/// A raw TCP "origin" that answers every connection with `answer` (then holds it open).
pub fn raw_origin(answer: &'static [u8]) -> SocketAddr {
    let l = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let _ = s.write_all(answer);
                // Hold the connection until the peer goes.
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A raw origin that answers a correct 101 for the request's key, followed by `after`.
pub fn raw_101_origin(after: &'static [u8]) -> SocketAddr {
    let l = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let head = read_head(&mut s);
                let key = header(&head, "sec-websocket-key").unwrap_or_default();
                let accept = relay::proto::http::accept_key(key.as_bytes());
                let mut out = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                )
                .into_bytes();
                out.extend_from_slice(after);
                let _ = s.write_all(&out);
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    addr
}

pub fn read_head(s: &mut impl Read) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

pub fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

pub fn upgrade_request(host: &str, path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Sends raw bytes, returns everything the relay answered until it closed.
pub fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = StdStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

pub fn status_of(answer: &str) -> u16 {
    answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// A masked client frame.
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut f = vec![0x80 | opcode];
    let n = payload.len();
    if n < 126 {
        f.push(0x80 | n as u8);
    } else if n < 65536 {
        f.push(0x80 | 126);
        f.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        f.push(0x80 | 127);
        f.extend_from_slice(&(n as u64).to_be_bytes());
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads one unmasked server frame with a short payload: (opcode, payload).
pub async fn read_server_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).await.unwrap();
    let mut len = (h[1] & 0x7f) as usize;
    if len == 126 {
        let mut l = [0u8; 2];
        s.read_exact(&mut l).await.unwrap();
        len = u16::from_be_bytes(l) as usize;
    } else if len == 127 {
        let mut l = [0u8; 8];
        s.read_exact(&mut l).await.unwrap();
        len = u64::from_be_bytes(l) as usize;
    }
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).await.unwrap();
    (h[0] & 0x0f, p)
}

/// Opens a raw upgraded connection (tokio), returning the stream after the 101 head.
pub async fn raw_upgrade(addr: SocketAddr, path: &str) -> TcpStream {
    raw_upgrade_host(addr, "test.local", path).await
}

/// Like [`raw_upgrade`], with a chosen Host header.
pub async fn raw_upgrade_host(addr: SocketAddr, host: &str, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(upgrade_request(host, path).as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// A minimal hand-written WebSocket echo origin that accepts bytes glued to the request head
/// (tungstenite's server refuses those as "junk after request"): answers 101, then echoes
/// each client frame unmasked.
pub fn raw_echo_origin() -> SocketAddr {
    let l = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let head = read_head(&mut s);
                let key = header(&head, "sec-websocket-key").unwrap_or_default();
                let accept = relay::proto::http::accept_key(key.as_bytes());
                let answer = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                );
                if s.write_all(answer.as_bytes()).is_err() {
                    return;
                }
                loop {
                    let mut h = [0u8; 2];
                    if s.read_exact(&mut h).is_err() {
                        return;
                    }
                    let mut len = (h[1] & 0x7f) as u64;
                    if len == 126 {
                        let mut l = [0u8; 2];
                        s.read_exact(&mut l).unwrap();
                        len = u16::from_be_bytes(l) as u64;
                    } else if len == 127 {
                        let mut l = [0u8; 8];
                        s.read_exact(&mut l).unwrap();
                        len = u64::from_be_bytes(l);
                    }
                    let mut mask = [0u8; 4];
                    s.read_exact(&mut mask).unwrap();
                    let mut p = vec![0u8; len as usize];
                    s.read_exact(&mut p).unwrap();
                    for (i, b) in p.iter_mut().enumerate() {
                        *b ^= mask[i % 4];
                    }
                    let mut out = vec![h[0]];
                    if p.len() < 126 {
                        out.push(p.len() as u8);
                    } else {
                        out.push(126);
                        out.extend_from_slice(&(p.len() as u16).to_be_bytes());
                    }
                    out.extend_from_slice(&p);
                    if s.write_all(&out).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A client WebSocket as `connect_async` returns it.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Sends `m` and checks that it comes back within 5 s.
pub async fn echo(ws: &mut Ws, m: String) {
    ws.send(Message::Text(m.clone())).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("an echo within 5 s")
        .expect("open")
        .expect("a message");
    assert_eq!(got, Message::Text(m));
}
