//! `check`: an independent closed-loop throughput client on tokio + tokio-tungstenite, so
//! the numbers of the hand-written `load` client can be cross-checked on a small run. It
//! shares nothing with `load` but the payload pattern and the report format.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::{FutureExt, SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{client_async, WebSocketStream};

use crate::report::{self, Report, Rtt};
use crate::ws;

#[derive(Debug, Clone)]
pub struct CheckArgs {
    pub target: SocketAddr,
    pub target_str: String,
    pub host: String,
    pub path: String,
    pub connections: u64,
    pub inflight: u32,
    pub size: usize,
    pub duration: Duration,
    pub threads: usize,
    pub max_seconds: u64,
}

#[derive(Default)]
struct ConnResult {
    messages: u64,
    bytes: u64,
    errors: u64,
    verify_failures: u64,
}

enum ConnectError {
    Tcp,
    Handshake,
}

pub fn run(a: CheckArgs) -> Result<Report> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.threads.max(1))
        .enable_all()
        .build()?;
    let cap = Duration::from_secs(a.max_seconds.max(1));
    let a = Arc::new(a);
    let r = rt.block_on(async {
        match tokio::time::timeout(cap, run_async(a.clone())).await {
            Ok(r) => r,
            Err(_) => {
                eprintln!("check: --max-seconds {} reached, stopping", a.max_seconds);
                let mut r = base_report(&a);
                r.stopped_by_max_seconds = true;
                Ok(r)
            }
        }
    })?;
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(r)
}

fn base_report(a: &CheckArgs) -> Report {
    Report {
        mode: "throughput".into(),
        connections_requested: a.connections,
        client: "relay-bench check (tokio-tungstenite)".into(),
        target: a.target_str.clone(),
        threads: a.threads.max(1) as u64,
        size: a.size as u64,
        inflight: a.inflight as u64,
        ..Default::default()
    }
}

async fn connect(a: &CheckArgs) -> Result<WebSocketStream<TcpStream>, ConnectError> {
    let tcp = TcpStream::connect(a.target)
        .await
        .map_err(|_| ConnectError::Tcp)?;
    let _ = tcp.set_nodelay(true);
    let url = format!("ws://{}{}", a.target, a.path);
    let mut req = url
        .into_client_request()
        .map_err(|_| ConnectError::Handshake)?;
    if let Ok(h) = HeaderValue::from_str(&a.host) {
        req.headers_mut().insert("Host", h);
    }
    // tungstenite checks the 101 and the Sec-WebSocket-Accept value.
    let (ws, _resp) = client_async(req, tcp)
        .await
        .map_err(|_| ConnectError::Handshake)?;
    Ok(ws)
}

async fn run_async(a: Arc<CheckArgs>) -> Result<Report> {
    let mut r = base_report(&a);

    // Connect everything first.
    let ramp_start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.connections {
        let a = a.clone();
        tasks.push(tokio::spawn(async move { connect(&a).await }));
    }
    let mut conns = Vec::new();
    for t in tasks {
        match t.await.context("connect task")? {
            Ok(ws) => conns.push(ws),
            Err(ConnectError::Tcp) => r.connect_failures += 1,
            Err(ConnectError::Handshake) => r.handshake_failures += 1,
        }
    }
    let ramp = ramp_start.elapsed().as_secs_f64();
    r.ramp_seconds = round3(ramp);
    r.connections_open_peak = conns.len() as u64;
    r.connect_rate_per_s = if ramp > 0.0 {
        round3(conns.len() as f64 / ramp)
    } else {
        0.0
    };
    if r.connect_failures + r.handshake_failures > 0 {
        eprintln!(
            "check: {} connect failures, {} handshake failures",
            r.connect_failures, r.handshake_failures
        );
    }

    // Then run the closed loop on all of them for the same window.
    let start = Instant::now();
    let deadline = start + a.duration;
    let mut tasks = Vec::new();
    for (uid, ws) in conns.into_iter().enumerate() {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            drive(ws, uid as u64, &a, deadline).await
        }));
    }
    let mut hist = report::new_histogram();
    for t in tasks {
        let (c, h) = t.await.context("connection task")?;
        r.messages += c.messages;
        r.bytes += c.bytes;
        r.errors += c.errors;
        r.verify_failures += c.verify_failures;
        hist.add(&h).ok();
    }
    let window = a.duration.as_secs_f64().min(start.elapsed().as_secs_f64());
    r.duration_s = round3(window);
    r.msgs_per_s = if window > 0.0 {
        round3(r.messages as f64 / window)
    } else {
        0.0
    };
    r.rtt_us = Rtt::from_ns(&hist);
    Ok(r)
}

fn payload(uid: u64, seq: u64, size: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(size);
    ws::fill_pattern(&mut v, ws::pattern_seed(uid, seq), size);
    v
}

/// Per-connection bookkeeping of the closed loop.
struct Loop {
    uid: u64,
    size: usize,
    send_seq: u64,
    recv_seq: u64,
    sent_at: VecDeque<Instant>,
    res: ConnResult,
    hist: Histogram<u64>,
}

impl Loop {
    /// Accounts for one received message; returns Err(()) if the connection is over.
    fn on_message(&mut self, msg: Message) -> Result<bool, ()> {
        let data = match msg {
            Message::Binary(d) => d,
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Ok(false),
            Message::Text(_) => {
                self.res.verify_failures += 1;
                return Ok(false);
            }
            Message::Close(_) => return Err(()),
        };
        let now = Instant::now();
        let seed = ws::pattern_seed(self.uid, self.recv_seq);
        let ok = data.len() == self.size && ws::check_pattern(&data, seed, 0);
        match self.sent_at.pop_front() {
            Some(t) => {
                self.hist
                    .saturating_record((now - t).as_nanos().max(1) as u64);
            }
            None => self.res.verify_failures += 1,
        }
        if !ok {
            self.res.verify_failures += 1;
            if self.res.verify_failures <= 3 {
                eprintln!(
                    "check: verify failure on connection {}, message {} ({} bytes)",
                    self.uid,
                    self.recv_seq,
                    data.len()
                );
            }
        }
        self.res.messages += 1;
        self.res.bytes += data.len() as u64;
        self.recv_seq += 1;
        Ok(true)
    }

    fn next_payload(&mut self) -> Message {
        self.sent_at.push_back(Instant::now());
        let p = payload(self.uid, self.send_seq, self.size);
        self.send_seq += 1;
        Message::Binary(p)
    }
}

/// One connection's closed loop: `inflight` messages out, each echo sends the next.
/// Like `load`, it batches: every echo already received is answered before one flush,
/// so both clients make comparable numbers of syscalls per message.
async fn drive(
    mut ws: WebSocketStream<TcpStream>,
    uid: u64,
    a: &CheckArgs,
    deadline: Instant,
) -> (ConnResult, Histogram<u64>) {
    let mut l = Loop {
        uid,
        size: a.size,
        send_seq: 0,
        recv_seq: 0,
        sent_at: VecDeque::new(),
        res: ConnResult::default(),
        hist: report::new_histogram(),
    };
    let ok = 'run: {
        for _ in 0..a.inflight {
            let m = l.next_payload();
            if ws.feed(m).await.is_err() {
                break 'run false;
            }
        }
        if ws.flush().await.is_err() {
            break 'run false;
        }
        loop {
            let mut msg = match tokio::time::timeout_at(deadline, ws.next()).await {
                Err(_) => break 'run true, // the window is over
                Ok(Some(Ok(m))) => m,
                Ok(_) => break 'run false,
            };
            loop {
                match l.on_message(msg) {
                    Err(()) => break 'run false,
                    Ok(true) if Instant::now() < deadline => {
                        let m = l.next_payload();
                        if ws.feed(m).await.is_err() {
                            break 'run false;
                        }
                    }
                    Ok(_) => {}
                }
                // Take whatever else is already there without waiting.
                msg = match ws.next().now_or_never() {
                    None => break,
                    Some(Some(Ok(m))) => m,
                    Some(_) => break 'run false,
                };
            }
            if ws.flush().await.is_err() {
                break 'run false;
            }
        }
    };
    if !ok {
        l.res.errors += 1;
        return (l.res, l.hist);
    }
    // Close politely (exercises the origin's close handling); not timed.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = ws.close(None).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    (l.res, l.hist)
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}
