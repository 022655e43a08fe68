//! The admin listener: plain HTTP on its own address (never on the data path).
//!
//! `GET /metrics` (Prometheus text format, version 0.0.4), `GET /healthz` (process alive),
//! `GET /readyz` (every worker has its ring and listeners), `GET /v1/stats` (JSON). One thread
//! serves requests one at a time with short socket timeouts; a scrape reads each worker's
//! published counters, it never stops a worker.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::stats::{CloseCause, Counters, Latencies, RouteCounters, WorkerStats};
use crate::apps::{RoomHub, RoomMsg};
use crate::config::Config;
use crate::proto::Status;
use crate::reactor::sys;

pub struct Admin {
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
    thread: std::thread::JoinHandle<()>,
}

impl Admin {
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        let _ = self.thread.join();
    }
}

pub fn start(
    addr: SocketAddr,
    stats: Vec<Arc<WorkerStats>>,
    cfg: Arc<Config>,
    hub: Arc<RoomHub>,
) -> std::io::Result<Admin> {
    let listener = TcpListener::bind(addr)?;
    let addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("relay-admin".into())
        .spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::Acquire) {
                    break;
                }
                if let Ok(mut c) = conn {
                    match serve(&mut c, &stats, &cfg, &hub) {
                        Ok(Ending::HandedOff) => {}
                        Ok(Ending::Close) | Err(_) => linger_close(c),
                    }
                }
            }
        })?;
    Ok(Admin { stop, addr, thread })
}

/// What becomes of an admin connection once its request is answered.
pub(super) enum Ending {
    /// Answered: lingering close.
    Close,
    /// Another thread owns it now (the dashboard's live feed).
    HandedOff,
}

/// The longest a finished connection is drained before it is closed anyway.
const LINGER: Duration = Duration::from_secs(1);

/// Ends a connection whose request may still be arriving, as HTTP/1.1 servers must (RFC 9112
/// section 9.6, nginx's `lingering_close`): FIN after the response, then read and discard
/// until the client closes, for at most [`LINGER`]. Closing with unread bytes makes the kernel
/// answer with RST, and a client still sending (a refused publish's body) then fails in its
/// send or loses the response it has not read yet, instead of seeing the 401 or 413.
fn linger_close(mut c: TcpStream) {
    if c.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let until = Instant::now() + LINGER;
    let mut sink = [0u8; 16 * 1024];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || c.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match c.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn serve(
    c: &mut TcpStream,
    stats: &[Arc<WorkerStats>],
    cfg: &Config,
    hub: &RoomHub,
) -> std::io::Result<Ending> {
    c.set_read_timeout(Some(Duration::from_secs(2)))?;
    c.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 4096];
    let mut n = 0;
    let path = loop {
        let k = c.read(&mut buf[n..])?;
        if k == 0 {
            return Ok(Ending::Close);
        }
        n += k;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..n]) {
            Ok(httparse::Status::Complete(head_len)) => {
                let path = req.path.unwrap_or("/").to_string();
                if req.method == Some("POST") {
                    return publish(c, &req, &buf[head_len..n], &path, cfg, hub);
                }
                if req.method != Some("GET") && req.method != Some("HEAD") {
                    return respond(
                        c,
                        405,
                        "text/plain",
                        b"only GET, and POST to /v1/rooms/{name}/messages\n",
                    );
                }
                break path;
            }
            Ok(httparse::Status::Partial) if n < buf.len() => continue,
            _ => return respond(c, 400, "text/plain", b"bad request\n"),
        }
    };
    let path = path.split('?').next().unwrap_or("/");
    match path {
        "/metrics" => {
            let body = prometheus(stats, cfg);
            respond(
                c,
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                body.as_bytes(),
            )
        }
        "/" => respond(
            c,
            200,
            "text/html; charset=utf-8",
            super::dashboard::PAGE.as_bytes(),
        ),
        "/v1/live" => {
            let (stats, cfg) = (stats.to_vec(), cfg.clone());
            super::dashboard::serve_live(c, &buf[..n], move || json(&stats, &cfg))
        }
        "/healthz" => respond(c, 200, "text/plain", b"ok\n"),
        "/v1/rooms" => {
            let mut rooms: Vec<(String, u32)> = hub
                .members()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            rooms.sort();
            let list: Vec<_> = rooms
                .iter()
                .map(|(name, members)| serde_json::json!({"name": name, "members": members}))
                .collect();
            let body = serde_json::json!({ "rooms": list }).to_string();
            respond(c, 200, "application/json", body.as_bytes())
        }
        "/readyz" => {
            if stats.iter().all(|s| s.ready.load(Ordering::Acquire)) {
                respond(c, 200, "text/plain", b"ready\n")
            } else {
                respond(c, 503, "text/plain", b"not ready\n")
            }
        }
        "/v1/stats" => {
            let body = json(stats, cfg);
            respond(c, 200, "application/json", body.as_bytes())
        }
        _ => respond(c, 404, "text/plain", b"not found\n"),
    }
}

/// `POST /v1/rooms/{name}/messages`: the body is one message to every member of the room,
/// on every worker. Text when the content type is `text/*` or JSON, binary otherwise.
fn publish(
    c: &mut TcpStream,
    req: &httparse::Request<'_, '_>,
    first: &[u8],
    path: &str,
    cfg: &Config,
    hub: &RoomHub,
) -> std::io::Result<Ending> {
    let path = path.split('?').next().unwrap_or("");
    let Some(room) = path
        .strip_prefix("/v1/rooms/")
        .and_then(|r| r.strip_suffix("/messages"))
        .filter(|r| !r.is_empty() && !r.contains('/') && r.len() <= 128)
    else {
        return respond(c, 404, "text/plain", b"POST /v1/rooms/{name}/messages\n");
    };
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    let token = &cfg.apps.publish_token;
    if token.is_empty() {
        return respond(
            c,
            403,
            "text/plain",
            b"publish API disabled: set apps.publish_token\n",
        );
    }
    let expected = format!("Bearer {token}");
    if header("authorization").as_deref() != Some(expected.as_str()) {
        return respond(c, 401, "text/plain", b"missing or wrong bearer token\n");
    }
    let Some(len) = header("content-length").and_then(|v| v.parse::<u64>().ok()) else {
        return respond(c, 411, "text/plain", b"Content-Length required\n");
    };
    if len > cfg.apps.max_message_size {
        return respond(
            c,
            413,
            "text/plain",
            b"message larger than apps.max_message_size\n",
        );
    }
    let mut body = first[..first.len().min(len as usize)].to_vec();
    body.resize(len as usize, 0);
    let have = first.len().min(len as usize);
    c.read_exact(&mut body[have..])?;
    let ctype = header("content-type")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let text = ctype.starts_with("text/") || ctype.starts_with("application/json");
    if text && simdutf8::basic::from_utf8(&body).is_err() {
        return respond(c, 400, "text/plain", b"text body is not UTF-8\n");
    }
    let kind = if text {
        crate::proto::ws::DataKind::Text
    } else {
        crate::proto::ws::DataKind::Binary
    };
    let mut frame = Vec::with_capacity(body.len() + 10);
    crate::proto::ws::write_message(&mut frame, kind, &body);
    let members = hub.members().get(room).copied().unwrap_or(0);
    hub.broadcast(
        RoomMsg {
            room: Arc::from(room),
            frame: Arc::from(frame),
            events_only: false,
        },
        None,
    );
    let answer =
        serde_json::json!({"room": room, "members": members, "bytes": body.len()}).to_string();
    respond(c, 202, "application/json", answer.as_bytes())
}

fn respond(c: &mut TcpStream, code: u16, ctype: &str, body: &[u8]) -> std::io::Result<Ending> {
    let reason = match code {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Content Too Large",
        _ => "Service Unavailable",
    };
    let auth = if code == 401 {
        "WWW-Authenticate: Bearer\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\n{auth}Content-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    // One write: head and body leave in one segment rather than waiting on Nagle.
    let mut out = Vec::with_capacity(head.len() + body.len());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
    c.write_all(&out)?;
    Ok(Ending::Close)
}

/// Aggregated counters over every worker.
pub fn total(stats: &[Arc<WorkerStats>]) -> Counters {
    let mut t = Counters::default();
    for s in stats {
        let c = s.snapshot();
        t.accepted += c.accepted;
        t.active += c.active;
        t.upgraded += c.upgraded;
        t.bytes_client_to_origin += c.bytes_client_to_origin;
        t.bytes_origin_to_client += c.bytes_origin_to_client;
        t.connection_ms += c.connection_ms;
        t.origin_connect_failures += c.origin_connect_failures;
        t.accept_errors += c.accept_errors;
        t.enobufs += c.enobufs;
        t.tls_full += c.tls_full;
        t.tls_resumed += c.tls_resumed;
        t.tls_fail_plain_http += c.tls_fail_plain_http;
        t.tls_fail_timeout += c.tls_fail_timeout;
        t.tls_fail_protocol += c.tls_fail_protocol;
        t.tls_fail_closed += c.tls_fail_closed;
        t.origin_tls_failures += c.origin_tls_failures;
        for i in 0..t.refused.len() {
            t.refused[i] += c.refused[i];
        }
        for i in 0..t.closed.len() {
            t.closed[i] += c.closed[i];
        }
    }
    t
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Per-route counters summed over workers, in config order.
pub fn route_totals(stats: &[Arc<WorkerStats>], cfg: &Config) -> Vec<RouteCounters> {
    let mut t = vec![RouteCounters::default(); cfg.routes.len()];
    for s in stats {
        if let Ok(r) = s.routes.lock() {
            for (a, b) in t.iter_mut().zip(r.iter()) {
                a.add(b);
            }
        }
    }
    t
}

/// Latency histograms merged over workers.
pub fn latency_totals(stats: &[Arc<WorkerStats>]) -> Latencies {
    let mut t = Latencies::default();
    for s in stats {
        if let Ok(l) = s.latencies.lock() {
            t.add(&l);
        }
    }
    t
}

/// Histogram bucket bounds, in seconds.
const BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

fn histogram(o: &mut String, name: &str, help: &str, h: &hdrhistogram::Histogram<u64>) {
    metric(o, name, "histogram", help);
    let mut sum = 0.0;
    for v in h.iter_recorded() {
        sum += v.value_iterated_to() as f64 * v.count_at_value() as f64;
    }
    for le in BUCKETS {
        let us = (le * 1e6) as u64;
        let n = if h.is_empty() {
            0
        } else {
            h.count_between(0, us)
        };
        let _ = writeln!(o, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {}", h.len());
    let _ = writeln!(o, "{name}_sum {:.6}", sum / 1e6);
    let _ = writeln!(o, "{name}_count {}", h.len());
}

/// Prometheus text exposition, one sample per worker.
pub fn prometheus(stats: &[Arc<WorkerStats>], cfg: &Config) -> String {
    let snaps: Vec<Counters> = stats.iter().map(|s| s.snapshot()).collect();
    let mut o = String::with_capacity(8192);
    let per_worker =
        |o: &mut String, name: &str, kind: &str, help: &str, f: &dyn Fn(&Counters) -> u64| {
            metric(o, name, kind, help);
            for (w, c) in snaps.iter().enumerate() {
                let _ = writeln!(o, "{name}{{worker=\"{w}\"}} {}", f(c));
            }
        };
    per_worker(
        &mut o,
        "relay_connections_accepted_total",
        "counter",
        "Client connections accepted.",
        &|c| c.accepted,
    );
    per_worker(
        &mut o,
        "relay_connections_active",
        "gauge",
        "Client connections open now (any phase).",
        &|c| c.active,
    );
    per_worker(
        &mut o,
        "relay_connections_upgraded_total",
        "counter",
        "Connections the origin upgraded to WebSocket.",
        &|c| c.upgraded,
    );
    metric(
        &mut o,
        "relay_requests_refused_total",
        "counter",
        "Requests relay answered with an error status, by status.",
    );
    for (w, c) in snaps.iter().enumerate() {
        for s in Status::ALL {
            let _ = writeln!(
                o,
                "relay_requests_refused_total{{worker=\"{w}\",status=\"{}\"}} {}",
                s.code(),
                c.refused[s.index()]
            );
        }
    }
    metric(
        &mut o,
        "relay_connections_closed_total",
        "counter",
        "Connections closed, by cause.",
    );
    for (w, c) in snaps.iter().enumerate() {
        for cause in CloseCause::ALL {
            let _ = writeln!(
                o,
                "relay_connections_closed_total{{worker=\"{w}\",cause=\"{}\"}} {}",
                cause.label(),
                c.closed[cause.index()]
            );
        }
    }
    metric(
        &mut o,
        "relay_bytes_total",
        "counter",
        "Bytes relayed, by direction.",
    );
    for (w, c) in snaps.iter().enumerate() {
        let _ = writeln!(
            o,
            "relay_bytes_total{{worker=\"{w}\",direction=\"client_to_origin\"}} {}",
            c.bytes_client_to_origin
        );
        let _ = writeln!(
            o,
            "relay_bytes_total{{worker=\"{w}\",direction=\"origin_to_client\"}} {}",
            c.bytes_origin_to_client
        );
    }
    metric(
        &mut o,
        "relay_connection_seconds_total",
        "counter",
        "Lifetime of closed upgraded connections, summed.",
    );
    for (w, c) in snaps.iter().enumerate() {
        let _ = writeln!(
            o,
            "relay_connection_seconds_total{{worker=\"{w}\"}} {:.1}",
            c.connection_ms as f64 / 1000.0
        );
    }
    per_worker(
        &mut o,
        "relay_origin_connect_failures_total",
        "counter",
        "Origin connections refused or timed out.",
        &|c| c.origin_connect_failures,
    );
    per_worker(
        &mut o,
        "relay_accept_errors_total",
        "counter",
        "Failed accepts (EMFILE and the like).",
        &|c| c.accept_errors,
    );
    per_worker(
        &mut o,
        "relay_ring_submissions_total",
        "counter",
        "io_uring submissions.",
        &|c| c.submitted,
    );
    per_worker(
        &mut o,
        "relay_ring_completions_total",
        "counter",
        "io_uring completions.",
        &|c| c.completed,
    );
    per_worker(
        &mut o,
        "relay_ring_cq_overflows_total",
        "counter",
        "Times the completion queue overflowed.",
        &|c| c.cq_overflows,
    );
    per_worker(
        &mut o,
        "relay_ring_waits_total",
        "counter",
        "Times a worker entered the kernel to wait for completions; completions per wait rise with workers.coalesce.",
        &|c| c.waits,
    );
    per_worker(
        &mut o,
        "relay_ring_coalesced_waits_total",
        "counter",
        "Waits that held their wake-up for workers.coalesce_events completions or the delay (workers.coalesce).",
        &|c| c.coalesced_waits,
    );
    per_worker(
        &mut o,
        "relay_busy_poll_hits_total",
        "counter",
        "Waits that workers.busy_poll answered by spinning (a completion came before the worker slept).",
        &|c| c.busy_poll_hits,
    );
    per_worker(
        &mut o,
        "relay_busy_poll_misses_total",
        "counter",
        "Spins of workers.busy_poll that ended with no completion; the worker then slept.",
        &|c| c.busy_poll_misses,
    );
    per_worker(
        &mut o,
        "relay_bufring_enobufs_total",
        "counter",
        "Receives that found the buffer ring empty.",
        &|c| c.enobufs,
    );
    per_worker(
        &mut o,
        "relay_bufring_provided",
        "gauge",
        "Receive buffers handed to the kernel so far.",
        &|c| c.bufs_provided,
    );
    per_worker(
        &mut o,
        "relay_bufring_checked_out",
        "gauge",
        "Receive buffers in user space now.",
        &|c| c.bufs_checked_out,
    );
    per_worker(
        &mut o,
        "relay_parked_sockets",
        "gauge",
        "Idle sockets parked in the worker's epoll set (no armed receive; see timeouts.park_idle).",
        &|c| c.parked,
    );
    per_worker(
        &mut o,
        "relay_parks_total",
        "counter",
        "Times an idle socket was parked.",
        &|c| c.parks,
    );
    per_worker(
        &mut o,
        "relay_splices_total",
        "counter",
        "Splice operations (splice data path).",
        &|c| c.splices,
    );
    for (name, help, f) in [
        (
            "relay_app_messages_received_total",
            "Edge apps: messages received from clients.",
            (|c: &Counters| c.app_messages_in) as fn(&Counters) -> u64,
        ),
        (
            "relay_app_frames_sent_total",
            "Edge apps: frames sent to clients.",
            |c| c.app_frames_out,
        ),
        (
            "relay_room_messages_dropped_total",
            "Room messages dropped for slow members (slow_member = drop).",
            |c| c.room_dropped,
        ),
        (
            "relay_room_slow_members_closed_total",
            "Slow room members closed with 1008 (slow_member = close).",
            |c| c.room_slow_closed,
        ),
        (
            "relay_app_pings_sent_total",
            "Keep-alive pings sent to edge-app clients.",
            |c| c.pings_sent,
        ),
        (
            "relay_app_pong_timeouts_total",
            "Edge-app clients closed for not answering a ping.",
            |c| c.pong_timeouts,
        ),
    ] {
        per_worker(&mut o, name, "counter", help, &f);
    }
    metric(
        &mut o,
        "relay_tls_handshakes_total",
        "counter",
        "TLS handshakes with clients completed, full or resumed.",
    );
    for (w, c) in snaps.iter().enumerate() {
        for (kind, n) in [("full", c.tls_full), ("resumed", c.tls_resumed)] {
            let _ = writeln!(
                o,
                "relay_tls_handshakes_total{{worker=\"{w}\",kind=\"{kind}\"}} {n}"
            );
        }
    }
    metric(
        &mut o,
        "relay_tls_handshake_failures_total",
        "counter",
        "TLS client connections that ended before the handshake completed, by reason.",
    );
    for (w, c) in snaps.iter().enumerate() {
        for (reason, n) in tls_failures(c) {
            let _ = writeln!(
                o,
                "relay_tls_handshake_failures_total{{worker=\"{w}\",reason=\"{reason}\"}} {n}"
            );
        }
    }
    per_worker(
        &mut o,
        "relay_origin_tls_failures_total",
        "counter",
        "TLS handshakes with origins that failed (verification or protocol).",
        &|c| c.origin_tls_failures,
    );
    metric(
        &mut o,
        "relay_app_protocol_closes_total",
        "counter",
        "Edge-app clients closed for breaking RFC 6455, by the close code relay sent.",
    );
    for (w, c) in snaps.iter().enumerate() {
        for (code, n) in [
            (1002, c.ws_close_1002),
            (1007, c.ws_close_1007),
            (1009, c.ws_close_1009),
        ] {
            let _ = writeln!(
                o,
                "relay_app_protocol_closes_total{{worker=\"{w}\",code=\"{code}\"}} {n}"
            );
        }
    }
    let routes = route_totals(stats, cfg);
    let rl = |i: usize| {
        cfg.routes[i]
            .name
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
    };
    metric(
        &mut o,
        "relay_route_connections_opened_total",
        "counter",
        "Upgrade requests routed, by route.",
    );
    for (i, r) in routes.iter().enumerate() {
        let _ = writeln!(
            o,
            "relay_route_connections_opened_total{{route=\"{}\"}} {}",
            rl(i),
            r.opened
        );
    }
    metric(
        &mut o,
        "relay_route_connections_active",
        "gauge",
        "Routed connections open now, by route.",
    );
    for (i, r) in routes.iter().enumerate() {
        let _ = writeln!(
            o,
            "relay_route_connections_active{{route=\"{}\"}} {}",
            rl(i),
            r.active
        );
    }
    metric(
        &mut o,
        "relay_route_requests_refused_total",
        "counter",
        "Routed requests relay refused, by route and status.",
    );
    for (i, r) in routes.iter().enumerate() {
        for st in Status::ALL {
            let n = r.refused[st.index()];
            if n > 0 {
                let _ = writeln!(
                    o,
                    "relay_route_requests_refused_total{{route=\"{}\",status=\"{}\"}} {n}",
                    rl(i),
                    st.code()
                );
            }
        }
    }
    metric(
        &mut o,
        "relay_route_connections_closed_total",
        "counter",
        "Routed connections closed, by route and cause.",
    );
    for (i, r) in routes.iter().enumerate() {
        for c in CloseCause::ALL {
            let _ = writeln!(
                o,
                "relay_route_connections_closed_total{{route=\"{}\",cause=\"{}\"}} {}",
                rl(i),
                c.label(),
                r.closed[c.index()]
            );
        }
    }
    metric(
        &mut o,
        "relay_route_bytes_total",
        "counter",
        "Bytes relayed, by route and direction.",
    );
    for (i, r) in routes.iter().enumerate() {
        let _ = writeln!(
            o,
            "relay_route_bytes_total{{route=\"{}\",direction=\"client_to_origin\"}} {}",
            rl(i),
            r.bytes_client_to_origin
        );
        let _ = writeln!(
            o,
            "relay_route_bytes_total{{route=\"{}\",direction=\"origin_to_client\"}} {}",
            rl(i),
            r.bytes_origin_to_client
        );
    }
    metric(
        &mut o,
        "relay_route_connection_seconds_total",
        "counter",
        "Lifetime of closed upgraded connections, by route.",
    );
    for (i, r) in routes.iter().enumerate() {
        let _ = writeln!(
            o,
            "relay_route_connection_seconds_total{{route=\"{}\"}} {:.3}",
            rl(i),
            r.connection_ms as f64 / 1000.0
        );
    }
    let lat = latency_totals(stats);
    histogram(
        &mut o,
        "relay_handshake_seconds",
        "Accept to the origin's 101 forwarded to the client.",
        &lat.handshake,
    );
    histogram(
        &mut o,
        "relay_origin_connect_seconds",
        "Origin TCP connect time.",
        &lat.origin_connect,
    );
    metric(&mut o, "relay_workers", "gauge", "Worker threads.");
    let _ = writeln!(o, "relay_workers {}", stats.len());
    metric(&mut o, "relay_routes", "gauge", "Configured routes.");
    let _ = writeln!(o, "relay_routes {}", cfg.routes.len());
    metric(
        &mut o,
        "relay_open_fds",
        "gauge",
        "Open descriptors of the process.",
    );
    let _ = writeln!(o, "relay_open_fds {}", sys::open_fds());
    metric(
        &mut o,
        "relay_iowq_workers",
        "gauge",
        "io_uring io-wq worker threads of the process (splices run there; capped per ring).",
    );
    let _ = writeln!(o, "relay_iowq_workers {}", iowq_workers());
    o
}

/// io-wq worker threads (named `iou-wrk-<tid>`) in this process right now.
fn iowq_workers() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.starts_with("iou-wrk"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// TLS handshake failures by reason label.
fn tls_failures(c: &Counters) -> [(&'static str, u64); 4] {
    [
        ("plain_http", c.tls_fail_plain_http),
        ("timeout", c.tls_fail_timeout),
        ("protocol", c.tls_fail_protocol),
        ("closed", c.tls_fail_closed),
    ]
}

/// `/v1/stats`: totals, per-worker and per-route figures.
pub fn json(stats: &[Arc<WorkerStats>], cfg: &Config) -> String {
    let worker = |c: &Counters| {
        serde_json::json!({
            "accepted": c.accepted,
            "active": c.active,
            "upgraded": c.upgraded,
            "bytes_client_to_origin": c.bytes_client_to_origin,
            "bytes_origin_to_client": c.bytes_origin_to_client,
            "connection_seconds": c.connection_ms as f64 / 1000.0,
            "refused": Status::ALL.iter().map(|s| (s.code().to_string(), c.refused[s.index()])).collect::<std::collections::BTreeMap<_, _>>(),
            "closed": CloseCause::ALL.iter().map(|k| (k.label(), c.closed[k.index()])).collect::<std::collections::BTreeMap<_, _>>(),
            "enobufs": c.enobufs,
            "parked": c.parked,
            "parks": c.parks,
            "cq_overflows": c.cq_overflows,
            "tls": {
                "handshakes_full": c.tls_full,
                "handshakes_resumed": c.tls_resumed,
                "failures": tls_failures(c).into_iter().collect::<std::collections::BTreeMap<_, _>>(),
                "origin_failures": c.origin_tls_failures,
            },
        })
    };
    let workers: Vec<_> = stats.iter().map(|s| worker(&s.snapshot())).collect();
    let t = total(stats);
    let routes: Vec<_> = route_totals(stats, cfg)
        .iter()
        .enumerate()
        .map(|(i, r)| {
            serde_json::json!({
                "name": cfg.routes[i].name,
                "opened": r.opened,
                "active": r.active,
                "bytes_client_to_origin": r.bytes_client_to_origin,
                "bytes_origin_to_client": r.bytes_origin_to_client,
                "connection_seconds": r.connection_ms as f64 / 1000.0,
                "refused": Status::ALL.iter().map(|s| (s.code().to_string(), r.refused[s.index()])).collect::<std::collections::BTreeMap<_, _>>(),
                "closed": CloseCause::ALL.iter().map(|k| (k.label(), r.closed[k.index()])).collect::<std::collections::BTreeMap<_, _>>(),
            })
        })
        .collect();
    let lat = latency_totals(stats);
    let pct = |h: &hdrhistogram::Histogram<u64>| {
        serde_json::json!({
            "count": h.len(),
            "p50_us": h.value_at_quantile(0.5),
            "p99_us": h.value_at_quantile(0.99),
            "max_us": h.max(),
        })
    };
    serde_json::json!({
        "total": worker(&t),
        "workers": workers,
        "routes": routes,
        "latency": {"handshake": pct(&lat.handshake), "origin_connect": pct(&lat.origin_connect)},
        "open_fds": sys::open_fds(),
    })
    .to_string()
}
