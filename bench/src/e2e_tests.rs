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
        tls: None,
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
    // The hold alone: 40 connections x one message per 200 ms = 200 msgs/s open loop.
    let held = r.hold_messages.expect("hold_messages with a trickle");
    assert!(held > 0 && held <= r.messages, "{r:?}");
    let rate = r.hold_msgs_per_s.expect("hold_msgs_per_s with a trickle");
    assert!((100.0..=300.0).contains(&rate), "hold rate {rate}: {r:?}");
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

// ---------------------------------------------------------------------------------------
// TLS: a minimal rustls terminator in front of echo-origin (one thread per connection,
// non-blocking sockets polled every 200 us; enough for tests), and the wss clients.
// ---------------------------------------------------------------------------------------

const TEST_CA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/test-ca.pem");
const TEST_CERT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/test-leaf.pem");
const TEST_KEY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/test-leaf.key");

fn start_tls_terminator(origin: SocketAddr) -> SocketAddr {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(TEST_CERT)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(TEST_KEY).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    cfg.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().unwrap();
    let cfg = std::sync::Arc::new(cfg);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { continue };
            let cfg = cfg.clone();
            std::thread::spawn(move || terminate(c, origin, cfg));
        }
    });
    addr
}

fn terminate(mut c: TcpStream, origin: SocketAddr, cfg: std::sync::Arc<rustls::ServerConfig>) {
    use std::io::ErrorKind::WouldBlock;
    let Ok(mut o) = TcpStream::connect(origin) else {
        return;
    };
    let mut tls = rustls::ServerConnection::new(cfg).unwrap();
    c.set_nonblocking(true).unwrap();
    o.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut busy = false;
        match tls.read_tls(&mut c) {
            Ok(0) => return,
            Ok(_) => {
                busy = true;
                if tls.process_new_packets().is_err() {
                    let _ = tls.write_tls(&mut c);
                    return;
                }
            }
            Err(e) if e.kind() == WouldBlock => {}
            Err(_) => return,
        }
        loop {
            match tls.reader().read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    o.set_nonblocking(false).unwrap();
                    if o.write_all(&buf[..n]).is_err() {
                        return;
                    }
                    o.set_nonblocking(true).unwrap();
                }
                Err(_) => break,
            }
        }
        match o.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                busy = true;
                tls.writer().write_all(&buf[..n]).unwrap();
            }
            Err(e) if e.kind() == WouldBlock => {}
            Err(_) => return,
        }
        while tls.wants_write() {
            match tls.write_tls(&mut c) {
                Ok(_) => {}
                Err(e) if e.kind() == WouldBlock => {
                    std::thread::sleep(Duration::from_micros(50));
                }
                Err(_) => return,
            }
        }
        if !busy {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

fn tls_opts(verify: crate::tls::Verify, resume: bool) -> crate::tls::TlsOpts {
    crate::tls::TlsOpts {
        verify,
        sni: "relay.test".into(),
        kx: crate::tls::Kx::X25519,
        version: crate::tls::Version::Any,
        resume,
    }
}

fn tls_client(o: crate::tls::TlsOpts) -> load::TlsClient {
    load::TlsClient {
        config: std::sync::Arc::new(crate::tls::client_config(&o, 64).unwrap()),
        name: o.server_name().unwrap(),
        opts: o,
    }
}

#[test]
fn load_wss_throughput_verified_against_ca() {
    let proxy = start_tls_terminator(start_origin(1));
    let mut a = load_args(proxy);
    a.size = 5000; // more than one TLS record's worth of reads per echo at times
    a.tls = Some(tls_client(tls_opts(
        crate::tls::Verify::Ca(TEST_CA.into()),
        false,
    )));
    let r = load::run(a).unwrap();
    assert_eq!(r.connections_open_peak, 3, "{r:?}");
    assert!(r.messages > 20, "{r:?}");
    assert_eq!((r.errors, r.verify_failures), (0, 0), "{r:?}");
    let t = r.tls.unwrap();
    assert_eq!((t.handshakes_full, t.handshakes_resumed), (3, 0));
    let n = t.negotiated.unwrap();
    assert!(n.starts_with("TLSv1_3") && n.contains("X25519"), "{n}");
}

#[test]
fn load_wss_refuses_wrong_name_and_hold_works_insecure() {
    let proxy = start_tls_terminator(start_origin(1));
    // The certificate is for relay.test / 127.0.0.1, not other.test: every handshake fails.
    let mut o = tls_opts(crate::tls::Verify::Ca(TEST_CA.into()), false);
    o.sni = "other.test".into();
    let mut a = load_args(proxy);
    a.tls = Some(tls_client(o));
    let r = load::run(a).unwrap();
    assert_eq!(
        (r.connections_open_peak, r.handshake_failures),
        (0, 3),
        "{r:?}"
    );
    // --insecure accepts it; hold mode keeps them open.
    let mut o = tls_opts(crate::tls::Verify::Insecure, false);
    o.sni = "other.test".into();
    let mut a = load_args(proxy);
    a.mode = load::Mode::Hold;
    a.connections = 20;
    a.tls = Some(tls_client(o));
    let r = load::run(a).unwrap();
    assert_eq!((r.connections_open_peak, r.errors), (20, 0), "{r:?}");
}

fn hs_args(target: SocketAddr, tls: Option<crate::tls::TlsOpts>) -> crate::handshakes::HsArgs {
    crate::handshakes::HsArgs {
        target,
        target_str: target.to_string(),
        host: "relay.test".into(),
        path: "/".into(),
        tls,
        concurrency: 3,
        warmup: Duration::from_millis(300),
        duration: Duration::from_millis(700),
        size: 32,
        threads: 1,
        sources: Sources::Any,
        connect_timeout: Duration::from_secs(5),
        server_pids: vec![std::process::id()],
        max_seconds: 30,
    }
}

#[test]
fn handshakes_full_resumed_and_plain() {
    let origin = start_origin(1);
    let proxy = start_tls_terminator(origin);
    let full = crate::handshakes::run(hs_args(
        proxy,
        Some(tls_opts(crate::tls::Verify::Ca(TEST_CA.into()), false)),
    ))
    .unwrap();
    assert!(full.completed > 5, "{full:?}");
    assert_eq!(full.handshakes_resumed, 0, "{full:?}");
    assert_eq!(full.handshakes_full, full.completed);
    assert_eq!((full.failures_total, full.exit_code()), (0, 0), "{full:?}");
    assert!(full.latency_us.tls_handshake_us.p50 > 0.0);
    assert!(full.server.as_ref().unwrap().cpu_s >= 0.0);

    // Resumed: after the warm-up every slot offers a ticket, and the server takes it.
    let res = crate::handshakes::run(hs_args(
        proxy,
        Some(tls_opts(crate::tls::Verify::Insecure, true)),
    ))
    .unwrap();
    assert!(res.completed > 5, "{res:?}");
    assert_eq!(res.handshakes_resumed, res.completed, "{res:?}");
    assert_eq!(res.exit_code(), 0);
    assert!(
        res.negotiated.as_deref().unwrap().ends_with("Resumed"),
        "{res:?}"
    );

    // Plain ws straight to the origin: no TLS step, no TLS figures.
    let plain = crate::handshakes::run(hs_args(origin, None)).unwrap();
    assert!(
        plain.completed > 5 && plain.failures_total == 0,
        "{plain:?}"
    );
    assert!(!plain.failures.contains_key("tls"));
    assert_eq!(plain.resumed_share, None);
}
