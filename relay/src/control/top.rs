//! `relay top`: a terminal view of a running relay, polled from its admin listener.
//!
//! Every interval it fetches `GET /v1/stats` (plain HTTP/1.1 over `std::net`) and shows the
//! totals, one row per worker (connections, accepts/s, bytes/s each way) and one row per
//! route, with rates taken from the difference between two polls. On a terminal the frame is
//! redrawn in place (cursor home, erase to end of line and of screen); otherwise frames are
//! printed one after another. `--once` polls twice, one interval apart, prints a single frame
//! without escape codes and exits: the form scripts and tests use.

use std::fmt::Write as _;
use std::io::{IsTerminal, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde_json::Value;

/// What `relay top` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// Admin listener, `HOST:PORT` (an `http://` prefix and a trailing `/` are accepted).
    pub admin: String,
    pub interval: Duration,
    pub once: bool,
}

/// The shortest and longest polling interval accepted.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);

const IO_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BODY: u64 = 64 << 20;

/// Parses `--interval` (seconds, fractions allowed).
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    let d = Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is out of range"))?;
    if d < MIN_INTERVAL || d > MAX_INTERVAL {
        return Err(format!(
            "{s} s is outside {} s to {} s",
            MIN_INTERVAL.as_secs_f64(),
            MAX_INTERVAL.as_secs()
        ));
    }
    Ok(d)
}

fn host_port(admin: &str) -> &str {
    let a = admin.trim();
    let a = a.strip_prefix("http://").unwrap_or(a);
    a.trim_end_matches('/')
}

/// One `GET /v1/stats` from the admin listener at `admin`.
pub fn fetch_stats(admin: &str) -> Result<Value, String> {
    let hp = host_port(admin);
    let addr = hp
        .to_socket_addrs()
        .map_err(|e| format!("{hp}: {e}"))?
        .next()
        .ok_or_else(|| format!("{hp}: no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| format!("{hp}: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|_| s.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| format!("{hp}: {e}"))?;
    let req = format!(
        "GET /v1/stats HTTP/1.1\r\nHost: {hp}\r\nAccept: application/json\r\nUser-Agent: relay-top\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .map_err(|e| format!("{hp}: {e}"))?;
    let mut raw = Vec::new();
    s.take(MAX_BODY)
        .read_to_end(&mut raw)
        .map_err(|e| format!("{hp}: reading the answer: {e}"))?;
    parse_answer(&raw).map_err(|e| format!("{hp}: {e}"))
}

/// Checks an HTTP answer to `GET /v1/stats` and parses its JSON body.
pub fn parse_answer(raw: &[u8]) -> Result<Value, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(raw) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Err("the answer ended inside its head".into()),
        Err(e) => {
            return Err(format!(
                "not an HTTP answer ({e}); is this the admin address?"
            ))
        }
    };
    if resp.code != Some(200) {
        return Err(format!(
            "/v1/stats answered {} {}",
            resp.code.unwrap_or(0),
            resp.reason.unwrap_or("")
        ));
    }
    let mut body = &raw[len..];
    if let Some(cl) = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        })
    {
        if body.len() < cl {
            return Err(format!(
                "the answer ended after {} of {cl} body bytes",
                body.len()
            ));
        }
        body = &body[..cl];
    }
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("/v1/stats is not JSON: {e}"))?;
    if !v.get("workers").is_some_and(Value::is_array) {
        return Err("/v1/stats has no \"workers\" array".into());
    }
    Ok(v)
}

fn u(v: &Value, key: &str) -> u64 {
    match v.get(key) {
        Some(Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_f64().map(|f| f.max(0.0) as u64))
            .unwrap_or(0),
        _ => 0,
    }
}

fn f(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(0.0)
}

fn sum_map(v: &Value, key: &str) -> u64 {
    v.get(key)
        .and_then(Value::as_object)
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0)
}

/// Per-second rate of counter `key` between two samples `dt` seconds apart; `None` when
/// there is no earlier sample. A counter that went down (relay restarted) gives 0.
fn rate(cur: &Value, prev: Option<&Value>, key: &str, dt: f64) -> Option<f64> {
    let p = prev?;
    if dt <= 0.0 {
        return None;
    }
    Some(u(cur, key).saturating_sub(u(p, key)) as f64 / dt)
}

/// `1234567` → `1,234,567`.
pub fn fmt_int(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `200 MiB`.
pub fn fmt_bytes(n: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n.max(0.0);
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} B")
    } else if v >= 100.0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

fn fmt_rate_count(r: Option<f64>) -> String {
    match r {
        None => "-".into(),
        Some(r) if r >= 100.0 => fmt_int(r.round() as u64),
        Some(r) => format!("{r:.1}"),
    }
}

fn fmt_rate_bytes(r: Option<f64>) -> String {
    r.map(|r| format!("{}/s", fmt_bytes(r)))
        .unwrap_or_else(|| "-".into())
}

/// `p50/p99` of a latency summary (`{"count", "p50_us", "p99_us", ...}`), `-` when empty.
fn latency(h: Option<&Value>) -> String {
    let ms = |us: u64| {
        let m = us as f64 / 1000.0;
        if m < 1.0 {
            format!("{m:.2}")
        } else if m < 10.0 {
            format!("{m:.1}")
        } else {
            format!("{m:.0}")
        }
    };
    match h {
        Some(h) if u(h, "count") > 0 => {
            format!("{}/{} ms", ms(u(h, "p50_us")), ms(u(h, "p99_us")))
        }
        _ => "-".into(),
    }
}

/// One frame: `cur` is the newest `/v1/stats`, `prev` the one `dt` seconds before it (rates
/// show `-` without it). Lines end with `\n` and carry no escape codes.
pub fn render(admin: &str, cur: &Value, prev: Option<&Value>, dt: f64) -> String {
    let empty = Value::Null;
    let workers = cur
        .get("workers")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let pworkers = prev
        .and_then(|p| p.get("workers"))
        .and_then(Value::as_array);
    let total = cur.get("total").unwrap_or(&empty);
    let ptotal = prev.and_then(|p| p.get("total"));
    let mut o = String::with_capacity(4096);

    let _ = writeln!(
        o,
        "relay top - {} - {} workers - every {:.1} s - open fds {}",
        host_port(admin),
        workers.len(),
        dt.max(0.0),
        fmt_int(u(cur, "open_fds"))
    );
    let _ = writeln!(
        o,
        "active {}  accepted {} ({}/s)  upgraded {}  refused {}  c->o {}  o->c {}",
        fmt_int(u(total, "active")),
        fmt_int(u(total, "accepted")),
        fmt_rate_count(rate(total, ptotal, "accepted", dt)),
        fmt_int(u(total, "upgraded")),
        fmt_int(sum_map(total, "refused")),
        fmt_rate_bytes(rate(total, ptotal, "bytes_client_to_origin", dt)),
        fmt_rate_bytes(rate(total, ptotal, "bytes_origin_to_client", dt)),
    );
    if let Some(lat) = cur.get("latency").filter(|l| l.is_object()) {
        let _ = writeln!(
            o,
            "handshake p50/p99 {}  origin connect p50/p99 {}",
            latency(lat.get("handshake")),
            latency(lat.get("origin_connect"))
        );
    }
    o.push('\n');

    let _ = writeln!(
        o,
        "{:<7} {:>10} {:>12} {:>9} {:>12} {:>12} {:>10} {:>8} {:>8} {:>7}",
        "WORKER",
        "ACTIVE",
        "ACCEPTED",
        "ACCEPT/S",
        "C->O/S",
        "O->C/S",
        "UPGRADED",
        "REFUSED",
        "ENOBUFS",
        "CQ-OVF"
    );
    let row = |o: &mut String, name: &str, w: &Value, p: Option<&Value>| {
        let _ = writeln!(
            o,
            "{:<7} {:>10} {:>12} {:>9} {:>12} {:>12} {:>10} {:>8} {:>8} {:>7}",
            name,
            fmt_int(u(w, "active")),
            fmt_int(u(w, "accepted")),
            fmt_rate_count(rate(w, p, "accepted", dt)),
            fmt_rate_bytes(rate(w, p, "bytes_client_to_origin", dt)),
            fmt_rate_bytes(rate(w, p, "bytes_origin_to_client", dt)),
            fmt_int(u(w, "upgraded")),
            fmt_int(sum_map(w, "refused")),
            fmt_int(u(w, "enobufs")),
            fmt_int(u(w, "cq_overflows")),
        );
    };
    for (i, w) in workers.iter().enumerate() {
        row(&mut o, &i.to_string(), w, pworkers.and_then(|p| p.get(i)));
    }
    row(&mut o, "total", total, ptotal);
    o.push('\n');

    match cur.get("routes").and_then(Value::as_array) {
        None => o.push_str("(per-route figures are not reported by this relay build)\n"),
        Some(routes) => {
            let _ = writeln!(
                o,
                "{:<20} {:>10} {:>12} {:>8} {:>11} {:>11} {:>12} {:>12} {:>10} {:>8}",
                "ROUTE",
                "ACTIVE",
                "OPENED",
                "OPEN/S",
                "C->O",
                "O->C",
                "C->O/S",
                "O->C/S",
                "CONN-S",
                "REFUSED"
            );
            let proutes = prev.and_then(|p| p.get("routes")).and_then(Value::as_array);
            if routes.is_empty() {
                o.push_str("(no routes)\n");
            }
            for r in routes {
                let name = r.get("name").and_then(Value::as_str).unwrap_or("");
                let p = proutes.and_then(|ps| {
                    ps.iter()
                        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
                });
                let shown: String = if name.is_empty() {
                    "(unnamed)".into()
                } else if name.chars().count() > 20 {
                    name.chars().take(19).chain(['~']).collect()
                } else {
                    name.into()
                };
                let _ = writeln!(
                    o,
                    "{:<20} {:>10} {:>12} {:>8} {:>11} {:>11} {:>12} {:>12} {:>10} {:>8}",
                    shown,
                    fmt_int(u(r, "active")),
                    fmt_int(u(r, "opened")),
                    fmt_rate_count(rate(r, p, "opened", dt)),
                    fmt_bytes(u(r, "bytes_client_to_origin") as f64),
                    fmt_bytes(u(r, "bytes_origin_to_client") as f64),
                    fmt_rate_bytes(rate(r, p, "bytes_client_to_origin", dt)),
                    fmt_rate_bytes(rate(r, p, "bytes_origin_to_client", dt)),
                    format!("{:.1}", f(r, "connection_seconds")),
                    fmt_int(sum_map(r, "refused")),
                );
            }
        }
    }
    o
}

/// Redraws `frame` in place: cursor home, each line followed by erase-to-end-of-line, then
/// erase below.
fn in_place(frame: &str, first: bool) -> String {
    let mut out = String::with_capacity(frame.len() + 256);
    if first {
        out.push_str("\x1b[2J");
    }
    out.push_str("\x1b[H");
    for line in frame.lines() {
        out.push_str(line);
        out.push_str("\x1b[K\n");
    }
    out.push_str("\x1b[J");
    out
}

/// Runs `relay top` until interrupted (or for one frame with `--once`).
pub fn run(opts: &Options) -> Result<(), String> {
    let admin = opts.admin.as_str();
    let cannot = |e: String| format!("cannot read /v1/stats from the admin listener at {e}");
    if opts.once {
        let first = fetch_stats(admin).map_err(cannot)?;
        let t0 = Instant::now();
        std::thread::sleep(opts.interval);
        let second = fetch_stats(admin).map_err(cannot)?;
        let dt = t0.elapsed().as_secs_f64();
        print!("{}", render(admin, &second, Some(&first), dt));
        return std::io::stdout().flush().map_err(|e| e.to_string());
    }

    let tty = std::io::stdout().is_terminal();
    let mut prev: Option<(Value, Instant)> = None;
    let mut first = true;
    loop {
        let started = Instant::now();
        let frame = match fetch_stats(admin) {
            Ok(cur) => {
                let now = Instant::now();
                let f = match &prev {
                    Some((p, t)) => render(admin, &cur, Some(p), (now - *t).as_secs_f64()),
                    None => render(admin, &cur, None, opts.interval.as_secs_f64()),
                };
                prev = Some((cur, now));
                f
            }
            Err(e) => {
                prev = None;
                format!(
                    "relay top - {}\n\n{} - retrying every {:.1} s\n",
                    host_port(admin),
                    cannot(e),
                    opts.interval.as_secs_f64()
                )
            }
        };
        let text = if tty {
            in_place(&frame, first)
        } else if first {
            frame
        } else {
            format!("\n{frame}")
        };
        first = false;
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())
            .and_then(|_| out.flush())
            .map_err(|e| format!("stdout: {e}"))?;
        drop(out);
        std::thread::sleep(opts.interval.saturating_sub(started.elapsed()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn worker(accepted: u64, active: u64, c2o: u64, o2c: u64) -> Value {
        json!({
            "accepted": accepted, "active": active, "upgraded": accepted,
            "bytes_client_to_origin": c2o, "bytes_origin_to_client": o2c,
            "connection_seconds": 1.5, "refused": {"404": 1, "503": 0},
            "closed": {"client_close": 0}, "enobufs": 0, "cq_overflows": 0
        })
    }

    fn stats(scale: u64, routes: bool) -> Value {
        let w0 = worker(10 * scale, 7, 1000 * scale, 2048 * scale);
        let w1 = worker(20 * scale, 9, 3000 * scale, 1024 * scale);
        let mut v = json!({
            "total": worker(30 * scale, 16, 4000 * scale, 3072 * scale),
            "workers": [w0, w1],
            "open_fds": 77,
        });
        v["latency"] = json!({
            "handshake": {"count": 3, "p50_us": 450, "p99_us": 12_500, "max_us": 20_000},
            "origin_connect": {"count": 0, "p50_us": 0, "p99_us": 0, "max_us": 0},
        });
        if routes {
            v["routes"] = json!([
                {"name": "chat", "opened": 25 * scale, "active": 12,
                 "bytes_client_to_origin": 3000 * scale, "bytes_origin_to_client": 2000 * scale,
                 "connection_seconds": 4.25, "refused": {"404": 2}},
                {"name": "", "opened": 5 * scale, "active": 4,
                 "bytes_client_to_origin": 1000 * scale, "bytes_origin_to_client": 1072 * scale,
                 "connection_seconds": 0.0, "refused": {}}
            ]);
        }
        v
    }

    #[test]
    fn frame_has_worker_rows_rates_and_routes() {
        let a = stats(1, true);
        let b = stats(3, true);
        let f = render("http://127.0.0.1:9090/", &b, Some(&a), 2.0);
        assert!(
            f.starts_with("relay top - 127.0.0.1:9090 - 2 workers"),
            "{f}"
        );
        assert!(!f.contains('\x1b'));
        let line = |start: &str| {
            f.lines()
                .find(|l| l.starts_with(start))
                .unwrap_or_else(|| panic!("no {start:?} line in\n{f}"))
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        // worker 0: accepted 10 -> 30 in 2 s = 10/s; c->o 1000 -> 3000 B = 1000 B/s.
        assert_eq!(line("0 ")[..6], ["0", "7", "30", "10.0", "1000", "B/s"]);
        assert_eq!(line("1 ")[1..4], ["9", "60", "20.0"]);
        assert_eq!(line("total")[1..4], ["16", "90", "30.0"]);
        assert!(f.contains("o->c 3.0 KiB/s"), "{f}");
        let chat = line("chat");
        assert_eq!(chat[1..4], ["12", "75", "25.0"]);
        assert_eq!(*chat.last().unwrap(), "2");
        assert!(f.contains("4.2") || f.contains("4.3"));
        assert!(line("(unnamed)").len() > 5);
        assert!(
            f.contains("handshake p50/p99 0.45/12 ms  origin connect p50/p99 -"),
            "{f}"
        );
    }

    #[test]
    fn first_frame_and_missing_routes() {
        let f = render("127.0.0.1:9090", &stats(1, false), None, 1.0);
        assert!(f.contains("per-route figures are not reported"), "{f}");
        assert_eq!(
            f.lines()
                .find(|l| l.starts_with("0 "))
                .unwrap()
                .split_whitespace()
                .nth(3),
            Some("-")
        );
    }

    #[test]
    fn counter_reset_is_not_a_negative_rate() {
        let f = render("x:1", &stats(1, true), Some(&stats(5, true)), 1.0);
        assert!(
            f.lines()
                .any(|l| l.starts_with("total") && l.contains(" 0.0 ")),
            "{f}"
        );
    }

    #[test]
    fn answers_are_checked() {
        let body = stats(1, true).to_string();
        let ok = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(parse_answer(ok.as_bytes()).unwrap()["open_fds"], 77);
        let e = parse_answer(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n").unwrap_err();
        assert!(e.contains("404"), "{e}");
        assert!(parse_answer(b"SSH-2.0-OpenSSH\r\n").is_err());
        let short = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len() + 1
        );
        assert!(parse_answer(short.as_bytes())
            .unwrap_err()
            .contains("ended"));
        let nojson = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        assert!(parse_answer(nojson.as_bytes())
            .unwrap_err()
            .contains("workers"));
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_int(0), "0");
        assert_eq!(fmt_int(999), "999");
        assert_eq!(fmt_int(1000), "1,000");
        assert_eq!(fmt_int(1_234_567), "1,234,567");
        assert_eq!(fmt_bytes(512.0), "512 B");
        assert_eq!(fmt_bytes(1536.0), "1.5 KiB");
        assert_eq!(fmt_bytes(200.0 * 1048576.0), "200 MiB");
        assert_eq!(parse_interval("1").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_interval("0.25").unwrap(), Duration::from_millis(250));
        assert!(parse_interval("0").is_err());
        assert!(parse_interval("-1").is_err());
        assert!(parse_interval("soon").is_err());
        let p = in_place("a\nb\n", true);
        assert_eq!(p, "\x1b[2J\x1b[Ha\x1b[K\nb\x1b[K\n\x1b[J");
    }
}
