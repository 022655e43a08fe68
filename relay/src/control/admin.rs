//! The admin listener: plain HTTP on its own address (never on the data path).
//!
//! `GET /metrics` (Prometheus text format, version 0.0.4), `GET /healthz` (process alive),
//! `GET /readyz` (every worker has its ring and listeners), `GET /v1/stats` (JSON). One thread
//! serves requests one at a time with short socket timeouts; a scrape reads each worker's
//! published counters, it never stops a worker.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::stats::{CloseCause, Counters, WorkerStats};
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
                    let _ = serve(&mut c, &stats, &cfg);
                }
            }
        })?;
    Ok(Admin { stop, addr, thread })
}

fn serve(c: &mut TcpStream, stats: &[Arc<WorkerStats>], cfg: &Config) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(2)))?;
    c.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 4096];
    let mut n = 0;
    let path = loop {
        let k = c.read(&mut buf[n..])?;
        if k == 0 {
            return Ok(());
        }
        n += k;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..n]) {
            Ok(httparse::Status::Complete(_)) => {
                if req.method != Some("GET") && req.method != Some("HEAD") {
                    return respond(c, 405, "text/plain", b"only GET\n");
                }
                break req.path.unwrap_or("/").to_string();
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
        "/healthz" => respond(c, 200, "text/plain", b"ok\n"),
        "/readyz" => {
            if stats.iter().all(|s| s.ready.load(Ordering::Acquire)) {
                respond(c, 200, "text/plain", b"ready\n")
            } else {
                respond(c, 503, "text/plain", b"not ready\n")
            }
        }
        "/v1/stats" => {
            let body = json(stats);
            respond(c, 200, "application/json", body.as_bytes())
        }
        _ => respond(c, 404, "text/plain", b"not found\n"),
    }
}

fn respond(c: &mut TcpStream, code: u16, ctype: &str, body: &[u8]) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes())?;
    c.write_all(body)
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
        "relay_splices_total",
        "counter",
        "Splice operations (splice data path).",
        &|c| c.splices,
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
    o
}

/// `/v1/stats`: totals and per-worker figures.
pub fn json(stats: &[Arc<WorkerStats>]) -> String {
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
            "cq_overflows": c.cq_overflows,
        })
    };
    let workers: Vec<_> = stats.iter().map(|s| worker(&s.snapshot())).collect();
    let t = total(stats);
    serde_json::json!({
        "total": worker(&t),
        "workers": workers,
        "open_fds": sys::open_fds(),
    })
    .to_string()
}
