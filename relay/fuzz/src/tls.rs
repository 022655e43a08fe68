//! What the `tls_server` target checks: relay's server-side [`TlsConn`] (the sans-IO driver
//! over rustls's unbuffered API) fed hostile bytes in arbitrary chunkings.
//!
//! The first input byte picks the mode (bit 0):
//!
//! * **raw** (bit 0 clear): the rest of the input goes to a fresh server connection, cut
//!   into chunks whose sizes come from the input ([`check_raw`]).
//! * **session** (bit 0 set): a real rustls `ClientConnection` first completes a handshake
//!   with a server `TlsConn` (TLS 1.2 or 1.3, records cut at sizes from the input, optionally
//!   a resumed second handshake), then the input is a list of operations: the client sends
//!   application data, raw bytes or validly framed records carrying input bytes are slipped
//!   into the client's stream, a client record is corrupted, the server sends, either side
//!   closes, the client updates its keys, and what is queued is delivered ([`check_session`]).
//!
//! Invariants: no call panics; once a call returned an error every later receive and send
//! fails and close succeeds, all without output; after the peer's close_notify a receive
//! succeeds and drops its input; `carried()` never exceeds `MAX_CARRY` (128 KiB), one record
//! once established, nothing after close_notify; raw bytes never complete a handshake or
//! yield plaintext; in a session, the server's plaintext is always a prefix of
//! what the client wrote and equal to it when nothing was slipped in and nothing failed;
//! while the server has had no error and has not closed, `send` succeeds, writes records,
//! and the real client decrypts exactly the bytes sent.

use std::io::{ErrorKind, Read, Write};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use relay::config::{ListenerTls as ListenerCfg, TlsVersion};
use relay::tls::certs::CertSpec;
use relay::tls::setup::{provider, ListenerTls};
use relay::tls::{ServerTls, TlsConn};
use rustls::client::Resumption;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use crate::chunks;

/// The name the test certificate is for.
pub const NAME: &str = "relay.test";
/// Largest TLS record on the wire rustls accepts: 2^14 + 2048 payload, 5 header bytes
/// (`MAX_WIRE_SIZE` in rustls's `msgs/message`). Any longer header is refused outright.
pub const MAX_WIRE: usize = 16384 + 2048 + 5;
/// Largest handshake message rustls reassembles: 0xffff body + 4 header bytes.
pub const MAX_HANDSHAKE: usize = 0xffff + 4;

/// The most unprocessed input `TlsConn` keeps (its private `MAX_CARRY`): past it the receive
/// fails.
pub const MAX_CARRY: usize = 128 * 1024;

/// What `carried()` may hold. Once established, only a record cut by the end of a receive
/// (plaintext handshake fragments are no longer accepted). Before, rustls reassembles a
/// handshake message in place and keeps every record that carries a piece of it until the
/// message is whole (at worst each piece one byte behind a 5-byte header, plus a record
/// still arriving: 6 × `MAX_HANDSHAKE` + `MAX_WIRE`), which `TlsConn` cuts at `MAX_CARRY`.
pub fn carry_bound(established: bool) -> usize {
    if established {
        MAX_WIRE
    } else {
        MAX_CARRY.min(6 * MAX_HANDSHAKE + MAX_WIRE)
    }
}

struct Pki {
    ca: CertificateDer<'static>,
    /// TLS 1.2 and 1.3.
    both: ServerTls,
    /// TLS 1.3 only.
    only13: ServerTls,
    /// Clients without resumption (so every run does the same full handshake).
    client12: Arc<ClientConfig>,
    client13: Arc<ClientConfig>,
}

static PKI: OnceLock<Pki> = OnceLock::new();

/// A CA and a leaf for [`NAME`] made with rcgen, loaded through relay's own config path
/// (`ListenerTls::new(..).for_worker()`), once per process.
fn pki() -> &'static Pki {
    PKI.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("relay-fuzz-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec![NAME.to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let spec = CertSpec {
            cert: dir.join("leaf.pem"),
            key: dir.join("leaf.key"),
            names: Vec::new(),
        };
        std::fs::write(&spec.cert, leaf.pem()).unwrap();
        std::fs::write(&spec.key, key.serialize_pem()).unwrap();
        let server = |min_version| {
            let cfg = ListenerCfg {
                certificates: vec![spec.clone()],
                min_version,
                session_cache: 16,
                tickets: true,
            };
            ListenerTls::new(&cfg, "listener[0].tls")
                .unwrap()
                .for_worker()
                .unwrap()
        };
        let both = server(TlsVersion::V1_2);
        let only13 = server(TlsVersion::V1_3);
        let _ = std::fs::remove_dir_all(&dir);
        let ca = ca.der().clone();
        Pki {
            client12: client_config(&ca, &rustls::version::TLS12, false),
            client13: client_config(&ca, &rustls::version::TLS13, false),
            ca,
            both,
            only13,
        }
    })
}

fn client_config(
    ca: &CertificateDer<'static>,
    version: &'static rustls::SupportedProtocolVersion,
    resume: bool,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut c = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    c.resumption = if resume {
        Resumption::in_memory_sessions(4)
    } else {
        Resumption::disabled()
    };
    Arc::new(c)
}

fn connect(cfg: &Arc<ClientConfig>) -> ClientConnection {
    ClientConnection::new(cfg.clone(), ServerName::try_from(NAME).unwrap()).unwrap()
}

/// Largest chunk a receive gets, picked by 3 knob bits.
fn max_chunk(bits: u8) -> usize {
    [1, 2, 5, 17, 64, 300, 1500, 1 << 20][bits as usize & 7]
}

/// `RELAY_FUZZ_TLS_WORKER_ONLY=1`: make only the calls relay's worker makes, that is
/// nothing more on a connection after its first error and no more input after the peer's
/// close_notify. Off by default (every call sequence is fair, and checked: see
/// [`poke_after_error`] and [`receive`]).
pub fn worker_only() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("RELAY_FUZZ_TLS_WORKER_ONLY").is_ok_and(|v| v == "1"))
}

/// `RELAY_FUZZ_TLS_CLEAN_AFTER_CLOSE=1`: once the server has sent close_notify, no more
/// input reaches it if bytes the client did not write were slipped into its stream. rustls
/// marks its own close_notify as a fatal alert sent, so any bad record after it trips
/// rustls's `debug_assert!(!self.sent_fatal_alert)` under `-a` (docs/fuzzing.md, finding 4);
/// this lets an `-a` campaign look past that for anything else, all other call sequences
/// staying fair.
pub fn clean_after_close() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("RELAY_FUZZ_TLS_CLEAN_AFTER_CLOSE").is_ok_and(|v| v == "1"))
}

/// Whether calls go on after the server's first error (receive of further input, send,
/// close).
pub fn after_error() -> bool {
    !worker_only()
}

/// Calls made once the connection has failed (the worker closes it, but the driver must
/// stay sound whatever its caller does next): every receive and send fails, close succeeds,
/// none of them writes anything, decrypts anything or grows the carry.
fn poke_after_error(srv: &mut TlsConn) {
    if !after_error() {
        return;
    }
    let mut sink = Vec::new();
    let mut plain = Vec::new();
    let carried = srv.carried();
    let r = srv.send(b"after an error", &mut sink);
    assert!(r.is_err(), "send after an error succeeded");
    let r = srv.close(&mut sink);
    assert!(r.is_ok(), "close after an error: {r:?}");
    let r = srv.receive(&mut [], &mut plain, &mut sink);
    assert!(r.is_err(), "an empty receive after an error: {r:?}");
    let mut rec = [0x17, 3, 3, 0, 1, 0];
    let r = srv.receive(&mut rec, &mut plain, &mut sink);
    assert!(r.is_err(), "a receive after an error: {r:?}");
    let r = srv.send(b"and again", &mut sink);
    assert!(r.is_err(), "send after an error succeeded");
    assert!(sink.is_empty(), "{} bytes after an error", sink.len());
    assert!(plain.is_empty(), "plaintext after an error");
    assert!(srv.carried() <= carried, "the carry grew after an error");
    assert!(srv.carried() <= MAX_CARRY);
}

/// The server's receive, with what the call's state says it must do: on a failed
/// connection fail without output; after the peer's close_notify succeed, drop the input
/// and do nothing else.
fn receive(
    srv: &mut TlsConn,
    failed: bool,
    data: &mut [u8],
    plain: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Result<relay::tls::Progress, rustls::Error> {
    let closed = srv.peer_closed();
    let (plain_len, out_len) = (plain.len(), out.len());
    let r = srv.receive(data, plain, out);
    if failed {
        assert!(r.is_err(), "a receive after an error: {r:?}");
        assert_eq!(out.len(), out_len, "a receive after an error wrote");
        assert_eq!(plain.len(), plain_len, "a receive after an error decrypted");
    } else if closed {
        assert_eq!(
            r,
            Ok(relay::tls::Progress::default()),
            "a receive after close_notify"
        );
        assert_eq!(out.len(), out_len, "a receive after close_notify wrote");
        assert_eq!(plain.len(), plain_len, "plaintext after close_notify");
    }
    r
}

/// `carried()` never exceeds what was received, `MAX_CARRY`, one record once established,
/// and is nothing once the peer has said close_notify (what followed it is dropped).
fn check_carry(srv: &TlsConn, fed: usize) {
    let c = srv.carried();
    assert!(c <= fed, "carrying {c} bytes of {fed} received");
    assert!(c <= MAX_CARRY, "carrying {c} bytes, more than MAX_CARRY");
    let bound = carry_bound(srv.established());
    assert!(
        c <= bound,
        "carrying {c} bytes (established: {}, peer closed: {}, bound {bound})",
        srv.established(),
        srv.peer_closed()
    );
    if srv.peer_closed() {
        assert_eq!(c, 0, "carrying {c} bytes after close_notify");
    }
}

/// Mode (a): `knob` bits 1–3 pick the largest chunk, bit 4 a TLS 1.3-only server, bit 5
/// calls `send` between receives; `seed` cuts `stream`.
pub fn check_raw(knob: u8, seed: u16, stream: &[u8]) {
    let pki = pki();
    let cfg = if knob & 0x10 != 0 { &pki.only13 } else { &pki.both };
    let mut srv = TlsConn::server(cfg).unwrap();
    let (mut plain, mut out) = (Vec::new(), Vec::new());
    let mut fed = 0;
    let mut failed = false;
    for (i, piece) in chunks(stream, u64::from(seed), max_chunk(knob >> 1))
        .into_iter()
        .enumerate()
    {
        let mut buf = piece.to_vec();
        fed += buf.len();
        let r = receive(&mut srv, failed, &mut buf, &mut plain, &mut out);
        check_carry(&srv, fed);
        match r {
            Err(_) => {
                failed = true;
                poke_after_error(&mut srv);
                if !after_error() {
                    break;
                }
            }
            Ok(p) => {
                assert!(!failed, "a receive succeeded after an error");
                assert!(!p.established, "a handshake from raw bytes");
                if srv.peer_closed() && worker_only() {
                    break;
                }
            }
        }
        if knob & 0x20 != 0 && i % 3 == 0 {
            let before = out.len();
            let r = srv.send(b"before the handshake", &mut out);
            assert!(r.is_err(), "send before the handshake succeeded");
            assert_eq!(
                out.len(),
                before,
                "send before the handshake wrote {} bytes",
                out.len() - before
            );
            // An error like any other: the connection is finished.
            failed = true;
            poke_after_error(&mut srv);
            if !after_error() {
                break;
            }
        }
    }
    assert!(!srv.established(), "a handshake from raw bytes");
    assert!(plain.is_empty(), "plaintext from raw bytes: {plain:?}");
    if failed {
        poke_after_error(&mut srv);
    }
}

/// Reads knob and operation bytes off the input.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from(self.byte()) << 8 | u16::from(self.byte())
    }

    /// `n` bytes: up to `n` from the input, repeated to length `n` (zeros if none left).
    fn fill(&mut self, n: usize) -> Vec<u8> {
        let k = n.min(self.0.len());
        let (head, rest) = self.0.split_at(k);
        self.0 = rest;
        if head.is_empty() {
            return vec![0; n];
        }
        head.iter().copied().cycle().take(n).collect()
    }

    /// A payload: a length byte, then that many input bytes; `big` multiplies the length by
    /// 128 and takes only as many input bytes as the next byte says, repeated.
    fn payload(&mut self, big: bool) -> Vec<u8> {
        let len = self.byte() as usize;
        if !big {
            return self.fill(len);
        }
        let k = self.byte() as usize;
        let mut src = self.fill(k.min(self.0.len()));
        if src.is_empty() {
            src.push(0);
        }
        src.iter().copied().cycle().take(len * 128).collect()
    }
}

/// A real client and a server `TlsConn` with the bytes in flight between them.
struct Session {
    srv: TlsConn,
    cli: ClientConnection,
    /// Client → server, not delivered yet.
    wire: Vec<u8>,
    /// Server → client, not delivered yet.
    back: Vec<u8>,
    fed: usize,
    srv_plain: Vec<u8>,
    cli_wrote: Vec<u8>,
    cli_plain: Vec<u8>,
    srv_sent: Vec<u8>,
    srv_failed: bool,
    cli_failed: bool,
    srv_closed: bool,
    cli_closed: bool,
    /// Bytes the client did not write were slipped into its stream.
    tainted: bool,
}

impl Session {
    fn new(srv_cfg: &ServerTls, cli_cfg: &Arc<ClientConfig>) -> Session {
        Session {
            srv: TlsConn::server(srv_cfg).unwrap(),
            cli: connect(cli_cfg),
            wire: Vec::new(),
            back: Vec::new(),
            fed: 0,
            srv_plain: Vec::new(),
            cli_wrote: Vec::new(),
            cli_plain: Vec::new(),
            srv_sent: Vec::new(),
            srv_failed: false,
            cli_failed: false,
            srv_closed: false,
            cli_closed: false,
            tainted: false,
        }
    }

    fn client_flush(&mut self) {
        while self.cli.wants_write() {
            if self.cli.write_tls(&mut self.wire).is_err() {
                break;
            }
        }
    }

    /// Delivers the client's stream to the server, cut by `seed`.
    fn to_server(&mut self, seed: u64, max: usize) {
        self.client_flush();
        let wire = std::mem::take(&mut self.wire);
        for piece in chunks(&wire, seed, max) {
            if (self.srv_failed || self.srv.peer_closed()) && worker_only() {
                return;
            }
            if self.srv_closed && self.tainted && clean_after_close() {
                return;
            }
            let mut buf = piece.to_vec();
            self.fed += buf.len();
            let r = receive(
                &mut self.srv,
                self.srv_failed,
                &mut buf,
                &mut self.srv_plain,
                &mut self.back,
            );
            check_carry(&self.srv, self.fed);
            if r.is_err() {
                self.srv_failed = true;
                poke_after_error(&mut self.srv);
            }
            assert!(
                self.cli_wrote.starts_with(&self.srv_plain),
                "the server decrypted bytes the client never wrote"
            );
        }
    }

    /// Delivers the server's output to the client.
    fn to_client(&mut self) {
        let back = std::mem::take(&mut self.back);
        if self.cli_failed {
            return;
        }
        let mut rd = &back[..];
        while !rd.is_empty() {
            match self.cli.read_tls(&mut rd) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    assert!(self.srv_failed, "client cannot take server output: {e}");
                    self.cli_failed = true;
                    return;
                }
            }
            if let Err(e) = self.cli.process_new_packets() {
                assert!(
                    self.srv_failed,
                    "the client refused what a healthy server sent: {e}"
                );
                self.cli_failed = true;
                return;
            }
            let mut buf = [0u8; 4096];
            loop {
                match self.cli.reader().read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => self.cli_plain.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => break,
                }
            }
        }
        assert!(
            self.srv_sent.starts_with(&self.cli_plain),
            "the client got bytes the server never sent"
        );
        self.client_flush();
    }

    /// Runs both sides until the handshake is done, server input cut by `seed`/`max`.
    fn handshake(&mut self, seed: u64, max: usize) {
        for round in 0..32u64 {
            self.to_server(seed.wrapping_add(round), max);
            assert!(!self.srv_failed, "handshake failed on the server side");
            self.to_client();
            assert!(!self.cli_failed);
            if !self.cli.is_handshaking() && self.srv.established() && self.wire.is_empty() {
                break;
            }
        }
        assert!(!self.cli.is_handshaking(), "client still handshaking");
        assert!(self.srv.established(), "server not established");
        assert!(!self.srv.is_handshaking());
    }

    /// Both sides say all they have, then the exact-delivery checks.
    fn settle(&mut self, seed: u64, max: usize) {
        for _ in 0..4 {
            self.to_server(seed, max);
            self.to_client();
        }
        if !self.srv_failed && !self.tainted {
            assert_eq!(
                self.srv_plain.len(),
                self.cli_wrote.len(),
                "the server lost client data"
            );
        }
        if !self.srv_failed && !self.cli_failed {
            assert_eq!(
                self.cli_plain.len(),
                self.srv_sent.len(),
                "the client lost server data"
            );
        }
    }
}

/// Mode (b): knob bit 1 picks TLS 1.3 (else 1.2), bits 2–4 the handshake chunking, bit 5 a
/// resumed handshake (a full one first); then operations.
pub fn check_session(knob: u8, ops: &[u8]) {
    let pki = pki();
    let v13 = knob & 2 != 0;
    let mut input = Input(ops);
    let hs_seed = u64::from(input.byte());
    let hs_max = max_chunk(knob >> 2);
    let cli_cfg = match (v13, knob & 0x20 != 0) {
        (true, false) => pki.client13.clone(),
        (false, false) => pki.client12.clone(),
        (true, true) => client_config(&pki.ca, &rustls::version::TLS13, true),
        (false, true) => client_config(&pki.ca, &rustls::version::TLS12, true),
    };
    if knob & 0x20 != 0 {
        let mut first = Session::new(&pki.both, &cli_cfg);
        first.handshake(hs_seed, hs_max);
        first.settle(hs_seed, hs_max);
    }
    let mut s = Session::new(&pki.both, &cli_cfg);
    s.handshake(hs_seed, hs_max);
    if knob & 0x20 != 0 {
        assert!(s.srv.resumed(), "the second handshake did not resume");
    }
    s.settle(hs_seed, hs_max);

    let mut steps = 0;
    while !input.0.is_empty() && steps < 64 {
        steps += 1;
        let op = input.byte();
        let big = op & 0x80 != 0;
        match op & 0x0f {
            // The client sends application data (up to 255 bytes, or 255 × 128 in records
            // of 16 KiB): see `Input::payload`.
            0 | 9 => {
                let data = input.payload(big);
                if !s.cli_closed && !s.cli_failed && !data.is_empty() {
                    s.cli.writer().write_all(&data).unwrap();
                    s.cli_wrote.extend_from_slice(&data);
                    s.client_flush();
                }
            }
            // Raw input bytes slipped into the client's stream.
            1 => {
                let len = input.byte() as usize;
                let data = input.fill(len);
                s.wire.extend_from_slice(&data);
                s.tainted |= !data.is_empty();
            }
            // A validly framed record (any content type and version) around input bytes;
            // `big` declares up to 65535 bytes (zero-padded) to test the length limits.
            2 | 10 => {
                s.client_flush();
                let typ = input.byte();
                let typ = if op & 0x40 != 0 {
                    typ
                } else {
                    [20, 21, 22, 23][typ as usize & 3]
                };
                let version = match (op >> 4) & 3 {
                    0 => [3, 3],
                    1 => [3, 1],
                    2 => [3, 4],
                    _ => [input.byte(), input.byte()],
                };
                // Big: the declared length is a u16, the body that many bytes of which
                // the next byte says how many come from the input (the rest are zeros).
                let (len, body) = if big {
                    let len = input.u16() as usize;
                    (len, len.min(input.byte() as usize))
                } else {
                    let len = input.byte() as usize;
                    (len, len)
                };
                let mut rec = vec![typ, version[0], version[1]];
                rec.extend_from_slice(&(len as u16).to_be_bytes());
                let take = body.min(input.0.len());
                rec.extend_from_slice(&input.fill(take));
                rec.resize(5 + len, 0);
                s.wire.extend_from_slice(&rec);
                s.tainted = true;
            }
            // The server sends.
            3 | 11 => {
                let mut data = input.payload(big);
                if data.is_empty() {
                    data.push(b'!');
                }
                if s.srv_failed && !after_error() {
                } else if s.srv_failed {
                    let mut sink = Vec::new();
                    let r = s.srv.send(&data, &mut sink);
                    assert!(r.is_err(), "send after an error succeeded");
                    assert!(sink.is_empty(), "send after an error wrote");
                } else if s.srv_closed {
                    // After its own close_notify: anything but a panic, and an error is final.
                    if s.srv.send(&data, &mut Vec::new()).is_err() {
                        s.srv_failed = true;
                        poke_after_error(&mut s.srv);
                    }
                } else {
                    let before = s.back.len();
                    let r = s.srv.send(&data, &mut s.back);
                    assert!(r.is_ok(), "send on a healthy connection: {r:?}");
                    assert!(s.back.len() > before, "send wrote nothing");
                    s.srv_sent.extend_from_slice(&data);
                }
            }
            // The client says close_notify.
            4 => {
                if !s.cli_failed && !s.cli_closed {
                    s.cli.send_close_notify();
                    s.cli_closed = true;
                    s.client_flush();
                }
            }
            // The server says close_notify.
            5 if s.srv_failed && !after_error() => {}
            5 => {
                let before = s.back.len();
                let r = s.srv.close(&mut s.back);
                if s.srv_failed {
                    assert!(r.is_ok(), "close after an error: {r:?}");
                    assert_eq!(s.back.len(), before, "close after an error wrote");
                } else {
                    assert!(r.is_ok(), "close on a healthy connection: {r:?}");
                }
                s.srv_closed = true;
            }
            // TLS 1.3 key update from the client (the server must answer with its own).
            6 => {
                if v13 && !s.cli_failed && !s.cli_closed {
                    s.cli.refresh_traffic_keys().unwrap();
                    s.client_flush();
                }
            }
            // A client record with one byte changed.
            7 => {
                let len = input.byte() as usize + 1;
                let data = input.fill(len);
                let at = input.u16() as usize;
                let mask = input.byte() | 1;
                if !s.cli_closed && !s.cli_failed {
                    s.client_flush();
                    let start = s.wire.len();
                    s.cli.writer().write_all(&data).unwrap();
                    s.cli_wrote.extend_from_slice(&data);
                    s.client_flush();
                    let n = s.wire.len() - start;
                    if n > 0 {
                        s.wire[start + at % n] ^= mask;
                        s.tainted = true;
                    }
                }
            }
            // Deliver: the client's stream cut by an input seed, then the server's output.
            8 | 12 => {
                let seed = u64::from(input.u16());
                let max = max_chunk(op >> 4);
                s.to_server(seed, max);
                s.to_client();
            }
            // Deliver to the server only.
            13 => {
                let seed = u64::from(input.u16());
                s.to_server(seed, max_chunk(op >> 4));
            }
            // Deliver to the client only.
            14 => s.to_client(),
            // The server's receive with nothing new (an empty read).
            _ if (s.srv_failed || s.srv.peer_closed()) && worker_only() => {}
            _ if s.srv_closed && s.tainted && clean_after_close() => {}
            _ => {
                let r = receive(
                    &mut s.srv,
                    s.srv_failed,
                    &mut [],
                    &mut s.srv_plain,
                    &mut s.back,
                );
                check_carry(&s.srv, s.fed);
                if r.is_err() {
                    s.srv_failed = true;
                    poke_after_error(&mut s.srv);
                }
            }
        }
    }
    s.settle(1, 1 << 20);
    if s.srv_failed {
        poke_after_error(&mut s.srv);
    }
}

/// One fuzz input.
pub fn check_tls(data: &[u8]) {
    let Some((&knob, rest)) = data.split_first() else {
        return;
    };
    if knob & 1 == 0 {
        let mut input = Input(rest);
        let seed = input.u16();
        check_raw(knob, seed, input.0);
    } else {
        check_session(knob, rest);
    }
}

/// The first flight of a rustls client (ClientHello) for `version` (None = 1.2 and 1.3).
pub fn client_hello(version: Option<&'static rustls::SupportedProtocolVersion>) -> Vec<u8> {
    let pki = pki();
    let cfg = match version {
        Some(v) => client_config(&pki.ca, v, false),
        None => {
            let mut roots = RootCertStore::empty();
            roots.add(pki.ca.clone()).unwrap();
            let mut c = ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(c)
        }
    };
    let mut cli = connect(&cfg);
    let mut out = Vec::new();
    while cli.wants_write() {
        cli.write_tls(&mut out).unwrap();
    }
    out
}

/// Writes the seed corpus (real ClientHellos for the raw mode, operation lists for the
/// session mode) into `dir`.
pub fn write_seeds(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let hellos = [
        ("tls13", client_hello(Some(&rustls::version::TLS13))),
        ("tls12", client_hello(Some(&rustls::version::TLS12))),
        ("both", client_hello(None)),
    ];
    for (name, hello) in &hellos {
        // Whole, and cut into chunks of at most 5 and 300 bytes.
        for (tag, knob) in [("whole", 7 << 1), ("cut5", 2 << 1), ("cut300", 5 << 1)] {
            let mut seed = vec![knob, 0x5a, 0xc3];
            seed.extend_from_slice(hello);
            std::fs::write(dir.join(format!("raw-hello-{name}-{tag}")), seed).unwrap();
        }
    }
    // Session mode: data both ways, a key update, garbage and framed records, close.
    let data_both_ways: &[u8] = &[
        0, 14, b'G', b'E', b'T', b' ', b'/', b' ', b'H', b'T', b'T', b'P', b'/', b'1', b'.', b'1',
        8, 0, 7, // deliver
        3, 5, b'h', b'e', b'l', b'l', b'o', // the server sends
        14, // to the client
        0x80, 3, 2, 1, 2, // 384 bytes from the client
        0x38, 1, 2, // deliver in chunks of at most 17 bytes
        6, // key update
        12, 0, 9, // deliver
        0, 2, b'h', b'i', 8, 0, 1, // more data
        0x8b, 200, 3, 7, 7, 7, 8, 0, 1, // the server sends 25,600 bytes
        4, 8, 0, 1, 5, 14, // both close
    ];
    let garbage: &[u8] = &[
        0, 4, b'p', b'i', b'n', b'g', // data
        1, 7, 0x17, 3, 3, 0, 2, 0xab, 0xcd, // a raw record that does not decrypt
        8, 0x12, 0x34, 3, 1, b'x', 14, 0, 2, b'o', b'k', 8, 0, 0,
    ];
    let framed: &[u8] = &[
        2, 3, 2, b'h', b'i', 8, 0, 1, // a 2-byte application data record
        0x82, 2, 0x48, 0x00, 3, 1, 2, 3, 8, 0, 3, // an 18,432-byte handshake record
        0x82, 2, 0x48, 0x01, 0, 8, 0, 3, // one byte too long
        0x42, 0xff, 5, 1, 2, 3, 4, 5, 8, 0, 2, // content type 0xff
    ];
    let mangled: &[u8] = &[
        7, 9, b'0', b'1', b'2', b'3', b'4', b'5', b'6', b'7', b'8', b'9', 0, 3, 0x40, // a flipped byte
        8, 0, 4, 3, 1, b'y', 14,
    ];
    let closes: &[u8] = &[
        4, 8, 0, 5, // the client closes
        3, 3, b'b', b'y', b'e', 14, // the server still sends
        5, 14, 15, // and closes
        3, 1, b'z', // send after close
    ];
    for (name, ops) in [
        ("data", data_both_ways),
        ("garbage", garbage),
        ("framed", framed),
        ("mangled", mangled),
        ("closes", closes),
    ] {
        // TLS 1.3 and 1.2, handshake whole or cut into 17-byte pieces, resumed or not.
        for (tag, knob) in [
            ("13", 1 | 2 | 7 << 2),
            ("12", 1 | 7 << 2),
            ("13-cut17", 1 | 2 | 3 << 2),
            ("12-resumed", 1 | 7 << 2 | 0x20),
            ("13-resumed", 1 | 2 | 7 << 2 | 0x20),
        ] {
            let mut seed = vec![knob, 0x11];
            seed.extend_from_slice(ops);
            std::fs::write(dir.join(format!("session-{name}-{tag}")), seed).unwrap();
        }
    }
}
