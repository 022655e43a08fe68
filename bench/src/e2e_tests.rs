//! In-process end-to-end tests over real loopback sockets: echo-origin against both
//! clients, the origin's control-frame and refusal answers, and `load` catching a server
//! that corrupts an echo.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use crate::net::Sources;
use crate::ws::{self, op, Decoder, Event, Flow};
use crate::{check, load, origin};

fn start_origin(threads: usize) -> SocketAddr {
    let r = origin::start(&origin::OriginArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        threads,
        backlog: 1024,
        stats_interval: 0,
        max_seconds: 0,
    })
    .unwrap();
    // Workers live for the rest of the test process.
    let addr = r.addr;
    std::mem::forget(r);
    addr
}

fn load_args(target: SocketAddr) -> load::LoadArgs {
    load::LoadArgs {
        target,
        target_str: target.to_string(),
        host: target.to_string(),
        path: "/".into(),
        mode: load::Mode::Throughput,
        connections: 3,
        rate: 0.0,
        max_pending: 64,
        connect_timeout: Duration::from_secs(5),
        sources: Sources::Any,
        hold: Duration::from_secs(1),
        trickle: None,
        size: 100,
        inflight: 4,
        duration: Duration::from_millis(500),
        threads: 2,
        max_seconds: 30,
    }
}

fn check_args(target: SocketAddr) -> check::CheckArgs {
    check::CheckArgs {
        target,
        target_str: target.to_string(),
        host: "example.test".into(),
        path: "/chat".into(),
        connections: 3,
        inflight: 4,
        size: 100,
        duration: Duration::from_millis(500),
        threads: 1,
        max_seconds: 30,
    }
}

#[test]
fn load_throughput_against_origin() {
    let addr = start_origin(2);
    let r = load::run(load_args(addr)).unwrap();
    assert_eq!(r.connections_open_peak, 3);
    assert!(r.messages > 100, "{r:?}");
    assert_eq!(r.bytes, r.messages * 100);
    assert_eq!(
        (r.errors, r.verify_failures, r.handshake_failures),
        (0, 0, 0),
        "{r:?}"
    );
    assert!(r.rtt_us.p50 > 0.0 && r.rtt_us.max >= r.rtt_us.p99);
}

#[test]
fn check_throughput_against_origin() {
    let addr = start_origin(1);
    let r = check::run(check_args(addr)).unwrap();
    assert_eq!(r.connections_open_peak, 3);
    assert!(r.messages > 100, "{r:?}");
    assert_eq!((r.errors, r.verify_failures), (0, 0), "{r:?}");
}

#[test]
fn sixteen_mib_messages_both_clients() {
    let addr = start_origin(1);
    let mut a = load_args(addr);
    a.connections = 1;
    a.threads = 1;
    a.inflight = 2;
    a.size = 16 << 20;
    a.duration = Duration::from_millis(1500);
    let r = load::run(a).unwrap();
    assert!(r.messages >= 1, "{r:?}");
    assert_eq!((r.errors, r.verify_failures), (0, 0), "{r:?}");

    let mut c = check_args(addr);
    c.connections = 1;
    c.inflight = 1;
    c.size = 16 << 20;
    c.duration = Duration::from_millis(1500);
    let r = check::run(c).unwrap();
    assert!(r.messages >= 1, "{r:?}");
    assert_eq!((r.errors, r.verify_failures), (0, 0), "{r:?}");
}

#[test]
fn hold_with_trickle_and_source_range() {
    let addr = start_origin(1);
    let mut a = load_args(addr);
    a.mode = load::Mode::Hold;
    a.connections = 40;
    a.rate = 200.0;
    a.sources = Sources::parse(Some("127.0.0.2-127.0.0.5"), None, addr).unwrap();
    a.hold = Duration::from_millis(800);
    a.trickle = Some(Duration::from_millis(200));
    a.size = 16;
    let r = load::run(a).unwrap();
    assert_eq!(r.connections_open_peak, 40, "{r:?}");
    assert_eq!(
        (r.connect_failures, r.handshake_failures, r.errors),
        (0, 0, 0)
    );
    assert!(r.ramp_seconds >= 0.15, "rate limit not applied: {r:?}");
    assert!(r.messages >= 40, "{r:?}");
    assert_eq!(r.verify_failures, 0);
    assert!(r.loader_rss_kib_open.is_some());
}

fn raw_upgrade(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    s.write_all(&ws::upgrade_request("x", "/", key)).unwrap();
    let mut buf = Vec::new();
    let mut b = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut b).unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&b[..n]);
    }
    let n = ws::parse_upgrade_response(&buf, ws::accept_key(key).as_bytes())
        .unwrap()
        .unwrap();
    assert_eq!(n, buf.len());
    s
}

/// Reads server frames until `want` complete frames arrived: (opcode, fin, payload).
fn read_frames(s: &mut TcpStream, want: usize) -> Vec<(u8, bool, Vec<u8>)> {
    let mut dec = Decoder::new(false);
    let mut frames = Vec::new();
    let mut cur: Option<(u8, bool, Vec<u8>)> = None;
    let mut b = vec![0u8; 65536];
    while frames.len() < want {
        let n = s.read(&mut b).unwrap();
        if n == 0 {
            break;
        }
        dec.feed(&mut b[..n], &mut |e| {
            match e {
                Event::Header(h) => cur = Some((h.opcode, h.fin, Vec::new())),
                Event::Payload { data, .. } => cur.as_mut().unwrap().2.extend_from_slice(data),
                Event::End { .. } => frames.push(cur.take().unwrap()),
            }
            Flow::Continue
        })
        .unwrap();
    }
    frames
}

#[test]
fn origin_control_frames_and_fragments() {
    let addr = start_origin(1);
    let mut s = raw_upgrade(addr);
    let mut out = Vec::new();
    let m = Some([1, 2, 3, 4]);
    ws::encode_frame(&mut out, false, op::TEXT, m, b"Hel");
    ws::encode_frame(&mut out, true, op::PING, m, b"are you there");
    ws::encode_frame(&mut out, true, op::CONT, m, b"lo");
    ws::encode_frame(&mut out, true, op::PONG, m, b"ignored");
    ws::encode_frame(&mut out, true, op::BINARY, m, &[0u8; 70000]);
    // Send byte by byte for the first part to exercise partial headers.
    for b in &out[..20] {
        s.write_all(&[*b]).unwrap();
    }
    s.write_all(&out[20..]).unwrap();
    let f = read_frames(&mut s, 4);
    assert_eq!(f[0], (op::TEXT, false, b"Hel".to_vec()));
    assert_eq!(f[1], (op::PONG, true, b"are you there".to_vec()));
    assert_eq!(f[2], (op::CONT, true, b"lo".to_vec()));
    assert_eq!(f[3], (op::BINARY, true, vec![0u8; 70000]));
    // Close with code + reason: answered with the code, then the server closes.
    out.clear();
    let mut payload = 4001u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye");
    ws::encode_frame(&mut out, true, op::CLOSE, m, &payload);
    s.write_all(&out).unwrap();
    let f = read_frames(&mut s, 1);
    assert_eq!(f[0], (op::CLOSE, true, 4001u16.to_be_bytes().to_vec()));
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn origin_protocol_error_and_refusals() {
    let addr = start_origin(1);
    // Unmasked client frame: close 1002.
    let mut s = raw_upgrade(addr);
    let mut out = Vec::new();
    ws::encode_frame(&mut out, true, op::TEXT, None, b"x");
    s.write_all(&out).unwrap();
    let f = read_frames(&mut s, 1);
    assert_eq!(f[0], (op::CLOSE, true, 1002u16.to_be_bytes().to_vec()));
    // Not an upgrade: 426 with a reason.
    for (req, want) in [
        ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", "HTTP/1.1 426 "),
        ("BREW / HTTP/1.1\r\nHost: a\r\n\r\n", "HTTP/1.1 405 "),
        ("\x01\x02garbage\r\n\r\n", "HTTP/1.1 400 "),
    ] {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with(want), "{req:?} -> {resp:?}");
    }
}

/// A server that answers the upgrade correctly, then flips one byte in its third echo.
fn corrupting_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = Vec::new();
        let mut b = vec![0u8; 65536];
        let head_len = loop {
            let n = s.read(&mut b).unwrap();
            buf.extend_from_slice(&b[..n]);
            if let Some((n, accept)) = ws::parse_upgrade_request(&buf).unwrap() {
                s.write_all(&ws::upgrade_response(&accept)).unwrap();
                break n;
            }
        };
        let mut dec = Decoder::new(true);
        let mut pending = buf[head_len..].to_vec();
        let mut msg = Vec::new();
        let mut count = 0;
        loop {
            let mut out = Vec::new();
            dec.feed(&mut pending, &mut |e| {
                match e {
                    Event::Payload { data, .. } => msg.extend_from_slice(data),
                    Event::End {
                        message_end: true, ..
                    } => {
                        count += 1;
                        if count == 3 {
                            msg[0] ^= 0xFF;
                        }
                        ws::encode_frame(&mut out, true, op::BINARY, None, &msg);
                        msg.clear();
                    }
                    _ => {}
                }
                Flow::Continue
            })
            .unwrap();
            if s.write_all(&out).is_err() {
                return;
            }
            match s.read(&mut b) {
                Ok(0) | Err(_) => return,
                Ok(n) => pending = b[..n].to_vec(),
            }
        }
    });
    addr
}

#[test]
fn load_detects_a_corrupted_echo() {
    let addr = corrupting_server();
    let mut a = load_args(addr);
    a.connections = 1;
    a.threads = 1;
    a.inflight = 1;
    let r = load::run(a).unwrap();
    assert!(r.messages > 3, "{r:?}");
    assert_eq!(r.verify_failures, 1, "{r:?}");
    assert_eq!(crate::report::exit_code(&r), 1);
}

#[test]
fn check_detects_a_corrupted_echo() {
    let addr = corrupting_server();
    let mut c = check_args(addr);
    c.connections = 1;
    c.inflight = 1;
    let r = check::run(c).unwrap();
    assert!(r.messages > 3, "{r:?}");
    assert_eq!(r.verify_failures, 1, "{r:?}");
}

#[test]
fn nothing_to_connect_to() {
    // A port with no listener: every attempt fails, the run still ends by itself.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut a = load_args(port);
    a.duration = Duration::from_millis(100);
    let r = load::run(a).unwrap();
    assert_eq!(r.connect_failures, 3, "{r:?}");
    assert_eq!(crate::report::exit_code(&r), 3);
}
