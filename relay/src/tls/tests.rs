//! TlsConn against rustls's own buffered client, in memory: handshakes, records cut at every
//! byte, SNI selection, resumption, close_notify and bad input.

use std::io::{Read, Write};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use super::certs::{CertSet, CertSpec};
use super::*;
use crate::config::{ListenerTls as Cfg, TlsVersion};

struct Pki {
    ca: CertificateDer<'static>,
    dir: std::path::PathBuf,
}

/// A CA and leaves signed by it, written to a temp dir as PEM files.
fn pki(tag: &str, leaves: &[(&str, &[&str])]) -> Pki {
    let dir = std::env::temp_dir().join(format!("relay-tls-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    for (file, names) in leaves {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
    }
    Pki {
        ca: ca.der().clone(),
        dir,
    }
}

impl Pki {
    fn spec(&self, file: &str) -> CertSpec {
        CertSpec {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}.key")),
            names: Vec::new(),
        }
    }

    fn client(&self, versions: &[&'static rustls::SupportedProtocolVersion]) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        let mut c = ClientConfig::builder_with_provider(setup::provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(c)
    }
}

fn server(pki: &Pki, specs: Vec<CertSpec>) -> ServerTls {
    let cfg = Cfg {
        certificates: specs,
        min_version: TlsVersion::V1_2,
        session_cache: 16,
        tickets: true,
    };
    let _ = pki;
    setup::ListenerTls::new(&cfg, "listener[0].tls")
        .unwrap()
        .for_worker()
        .unwrap()
}

/// Moves bytes between a rustls client and a TlsConn, feeding the server `chunk` bytes at a
/// time, until neither side has anything to say. Returns the plaintext the server got.
fn pump(client: &mut ClientConnection, srv: &mut TlsConn, chunk: usize) -> Vec<u8> {
    let mut plain = Vec::new();
    for _ in 0..64 {
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        let mut out = Vec::new();
        for piece in wire.chunks(chunk.max(1)) {
            let mut piece = piece.to_vec();
            srv.receive(&mut piece, &mut plain, &mut out).unwrap();
        }
        if wire.is_empty() && out.is_empty() {
            break;
        }
        let mut rd = &out[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).unwrap();
            client.process_new_packets().unwrap();
        }
    }
    plain
}

fn connect(cfg: &Arc<ClientConfig>, name: &str) -> ClientConnection {
    ClientConnection::new(cfg.clone(), ServerName::try_from(name.to_string()).unwrap()).unwrap()
}

fn leaf_names(client: &ClientConnection) -> Vec<u8> {
    client.peer_certificates().unwrap()[0].as_ref().to_vec()
}

#[test]
fn data_both_ways_with_records_cut_anywhere() {
    let pki = pki("data", &[("a", &["a.test"])]);
    let srv_cfg = server(&pki, vec![pki.spec("a")]);
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        for chunk in [1, 7, 100, 100_000] {
            let mut client = connect(&pki.client(&[version]), "a.test");
            let mut srv = TlsConn::server(&srv_cfg).unwrap();
            pump(&mut client, &mut srv, chunk);
            assert!(!client.is_handshaking(), "chunk {chunk}");
            assert!(srv.established());
            let msg: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
            client.writer().write_all(&msg).unwrap();
            let got = pump(&mut client, &mut srv, chunk);
            assert_eq!(got, msg, "client → server, chunk {chunk}");
            assert_eq!(srv.carried(), 0);
            // Server → client, larger than one record.
            let mut out = Vec::new();
            srv.send(&msg, &mut out).unwrap();
            let mut rd = &out[..];
            let mut back = Vec::new();
            while !rd.is_empty() {
                client.read_tls(&mut rd).unwrap();
                client.process_new_packets().unwrap();
                let mut buf = [0u8; 65536];
                while let Ok(n) = client.reader().read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    back.extend_from_slice(&buf[..n]);
                }
            }
            assert_eq!(back, msg, "server → client, chunk {chunk}");
        }
    }
}

#[test]
fn sni_picks_exact_then_wildcard_then_default() {
    let pki = pki("sni", &[("a", &["a.test"]), ("b", &["*.b.test"])]);
    let srv_cfg = server(&pki, vec![pki.spec("a"), pki.spec("b")]);
    let a = std::fs::read(pki.dir.join("a.pem")).unwrap();
    let b = std::fs::read(pki.dir.join("b.pem")).unwrap();
    let der = |pem: &[u8]| {
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(pem)
            .unwrap()
            .as_ref()
            .to_vec()
    };
    let cfg = pki.client(&[&rustls::version::TLS13]);
    let mut seen = Vec::new();
    for name in ["a.test", "x.b.test"] {
        let mut client = connect(&cfg, name);
        let mut srv = TlsConn::server(&srv_cfg).unwrap();
        pump(&mut client, &mut srv, 1000);
        seen.push(leaf_names(&client));
    }
    assert_eq!(seen[0], der(&a));
    assert_eq!(seen[1], der(&b));
    // Names no certificate covers get the default (the client then refuses it).
    let set = CertSet::load(
        &[pki.spec("a"), pki.spec("b")],
        &setup::provider(),
        "listener[0].tls",
    )
    .unwrap();
    let default = set.pick(None);
    for other in ["b.test", "y.x.b.test", "c.test"] {
        assert!(Arc::ptr_eq(&set.pick(Some(other)), &default), "{other}");
    }
    assert!(!Arc::ptr_eq(&set.pick(Some("X.B.TEST.")), &default));
}

#[test]
fn second_connection_resumes() {
    let pki = pki("resume", &[("a", &["a.test"])]);
    let srv_cfg = server(&pki, vec![pki.spec("a")]);
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let cfg = pki.client(&[version]);
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let mut client = connect(&cfg, "a.test");
            let mut srv = TlsConn::server(&srv_cfg).unwrap();
            pump(&mut client, &mut srv, 4096);
            kinds.push((srv.resumed(), client.handshake_kind()));
        }
        assert!(!kinds[0].0);
        assert!(kinds[1].0, "{version:?}: {kinds:?}");
        assert_eq!(kinds[1].1, Some(rustls::HandshakeKind::Resumed));
    }
}

#[test]
fn close_notify_both_ways() {
    let pki = pki("close", &[("a", &["a.test"])]);
    let srv_cfg = server(&pki, vec![pki.spec("a")]);
    let mut client = connect(&pki.client(&[&rustls::version::TLS13]), "a.test");
    let mut srv = TlsConn::server(&srv_cfg).unwrap();
    pump(&mut client, &mut srv, 4096);
    client.send_close_notify();
    let mut wire = Vec::new();
    client.write_tls(&mut wire).unwrap();
    let (mut plain, mut out) = (Vec::new(), Vec::new());
    let p = srv.receive(&mut wire, &mut plain, &mut out).unwrap();
    assert!(p.peer_closed && srv.peer_closed());
    srv.close(&mut out).unwrap();
    let mut rd = &out[..];
    client.read_tls(&mut rd).unwrap();
    let st = client.process_new_packets().unwrap();
    assert!(st.peer_has_closed());
}

#[test]
fn garbage_hello_fails_with_an_alert() {
    let pki = pki("bad", &[("a", &["a.test"])]);
    let srv_cfg = server(&pki, vec![pki.spec("a")]);
    let mut srv = TlsConn::server(&srv_cfg).unwrap();
    // A ClientHello whose body is junk: a decode_error alert.
    let mut junk = vec![0x16, 0x03, 0x01, 0x00, 0x10, 0x01, 0x00, 0x00, 0x0c];
    junk.extend_from_slice(&[0xAB; 12]);
    let (mut plain, mut out) = (Vec::new(), Vec::new());
    assert!(srv.receive(&mut junk, &mut plain, &mut out).is_err());
    assert_eq!(out.first(), Some(&0x15), "an alert record: {out:?}");
    // A handshake message claiming 11 MB: refused outright.
    let mut srv = TlsConn::server(&srv_cfg).unwrap();
    let mut huge = vec![0x16, 0x03, 0x01, 0x00, 0x10];
    huge.extend_from_slice(&[0xAB; 16]);
    assert!(srv.receive(&mut huge, &mut plain, &mut Vec::new()).is_err());
    // A TLS 1.3-only server refuses a TLS 1.2-only client.
    let cfg = Cfg {
        certificates: vec![pki.spec("a")],
        min_version: TlsVersion::V1_3,
        session_cache: 0,
        tickets: false,
    };
    let only13 = setup::ListenerTls::new(&cfg, "t")
        .unwrap()
        .for_worker()
        .unwrap();
    let mut client = connect(&pki.client(&[&rustls::version::TLS12]), "a.test");
    let mut srv = TlsConn::server(&only13).unwrap();
    let mut wire = Vec::new();
    client.write_tls(&mut wire).unwrap();
    let mut out = Vec::new();
    assert!(srv.receive(&mut wire, &mut plain, &mut out).is_err());
    assert!(!out.is_empty());
}

#[test]
fn plaintext_http_is_recognised() {
    assert!(looks_like_http(b"GET / HTTP/1.1\r\n"));
    assert!(!looks_like_http(&[0x16, 0x03, 0x01]));
    assert!(!looks_like_http(b""));
}

#[test]
fn client_side_talks_to_server_side() {
    let pki = pki("client", &[("o", &["origin.test"])]);
    let srv_cfg = server(&pki, vec![pki.spec("o")]);
    let ptls = crate::config::PoolTls {
        ca: Some(pki.dir.join("ca.pem")),
        server_name: None,
        client_cert: None,
    };
    let ctls = ClientTls::new(&ptls, "origin.test", "pool[0]").unwrap();
    let mut cli = TlsConn::client(&ctls).unwrap();
    let mut srv = TlsConn::server(&srv_cfg).unwrap();
    let mut to_srv = Vec::new();
    cli.start(&mut to_srv).unwrap();
    let (mut p1, mut p2) = (Vec::new(), Vec::new());
    for _ in 0..8 {
        let mut to_cli = Vec::new();
        if !to_srv.is_empty() {
            srv.receive(&mut to_srv, &mut p1, &mut to_cli).unwrap();
        }
        to_srv = Vec::new();
        if !to_cli.is_empty() {
            cli.receive(&mut to_cli, &mut p2, &mut to_srv).unwrap();
        }
    }
    assert!(cli.established() && srv.established());
    let mut wire = Vec::new();
    cli.send(b"GET / HTTP/1.1\r\n\r\n", &mut wire).unwrap();
    srv.receive(&mut wire, &mut p1, &mut Vec::new()).unwrap();
    assert_eq!(p1, b"GET / HTTP/1.1\r\n\r\n");
    // A name the certificate does not cover fails verification.
    let wrong = crate::config::PoolTls {
        server_name: Some("other.test".into()),
        ..ptls
    };
    let ctls = ClientTls::new(&wrong, "origin.test", "pool[0]").unwrap();
    let mut cli = TlsConn::client(&ctls).unwrap();
    let mut srv = TlsConn::server(&srv_cfg).unwrap();
    let mut to_srv = Vec::new();
    cli.start(&mut to_srv).unwrap();
    let mut to_cli = Vec::new();
    srv.receive(&mut to_srv, &mut p1, &mut to_cli).unwrap();
    assert!(cli.receive(&mut to_cli, &mut p2, &mut Vec::new()).is_err());
}

#[test]
fn idle_connection_state_is_small() {
    // The unbuffered connection holds keys and state only; the driver adds no buffers
    // (relay/tests/memory.rs measures the whole per-connection cost, heap included).
    assert!(
        std::mem::size_of::<TlsConn>() <= 1152,
        "{}",
        std::mem::size_of::<TlsConn>()
    );
}

// Regressions from the tls_server fuzz target (relay/fuzz/artifacts/tls_server/).

#[test]
fn a_bad_record_fails_once_and_every_later_call_fails_cleanly() {
    let pki = pki("badrec", &[("a", &["a.test"])]);
    let srv_cfg = server(&pki, vec![pki.spec("a")]);
    // Content type 0 (invalid): one fatal alert (a second one would trip rustls's debug
    // assertion), an error, and from then on errors without touching rustls's state.
    let mut srv = TlsConn::server(&srv_cfg).unwrap();
    let mut rec = vec![0x00, 0x03, 0x03, 0x00, 0x01, 0x00];
    let (mut plain, mut out) = (Vec::new(), Vec::new());
    assert!(srv.receive(&mut rec, &mut plain, &mut out).is_err());
    assert!(out.len() < 64, "one alert at most: {out:?}");
    assert!(srv
        .receive(&mut [0x16, 0x03], &mut plain, &mut out)
        .is_err());
    assert!(srv.send(b"x", &mut out).is_err());
    assert!(srv.close(&mut out).is_ok());
    // Half a ClientHello (its 4-byte header, kept by rustls's reassembly), then a bad record
    // in the same input, then a send: no stale offsets into dropped input.
    let mut srv = TlsConn::server(&srv_cfg).unwrap();
    let mut input = vec![0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x00, 0x00, 0x10];
    input.extend_from_slice(&[0x00, 0x00, 0x00, 0x00, 0x00]);
    let _ = srv.receive(&mut input, &mut plain, &mut Vec::new());
    let _ = srv.send(b"after", &mut Vec::new());
    let _ = srv.receive(&mut [0x16], &mut plain, &mut Vec::new());
    // The same bad record after a completed handshake.
    let mut client = connect(&pki.client(&[&rustls::version::TLS13]), "a.test");
    let mut srv = TlsConn::server(&srv_cfg).unwrap();
    pump(&mut client, &mut srv, 4096);
    let mut rec = vec![0x00, 0x03, 0x03, 0x00, 0x01, 0x00];
    assert!(srv.receive(&mut rec, &mut plain, &mut Vec::new()).is_err());
    assert!(srv.send(b"x", &mut Vec::new()).is_err());
}

#[test]
fn input_after_close_notify_is_dropped() {
    let pki = pki("afterclose", &[("a", &["a.test"])]);
    let srv_cfg = server(&pki, vec![pki.spec("a")]);
    let mut client = connect(&pki.client(&[&rustls::version::TLS13]), "a.test");
    let mut srv = TlsConn::server(&srv_cfg).unwrap();
    pump(&mut client, &mut srv, 4096);
    client.send_close_notify();
    let mut wire = Vec::new();
    client.write_tls(&mut wire).unwrap();
    wire.extend_from_slice(&[0x17; 40_000]);
    let (mut plain, mut out) = (Vec::new(), Vec::new());
    assert!(
        srv.receive(&mut wire, &mut plain, &mut out)
            .unwrap()
            .peer_closed
    );
    assert_eq!(srv.carried(), 0);
    for _ in 0..10 {
        let mut more = vec![0x17; 20_000];
        srv.receive(&mut more, &mut plain, &mut out).unwrap();
        assert_eq!(srv.carried(), 0);
    }
    assert!(plain.is_empty());
    srv.close(&mut out).unwrap();
}

#[test]
fn input_that_never_completes_a_record_is_bounded() {
    let pki = pki("bounded", &[("a", &["a.test"])]);
    let srv_cfg = server(&pki, vec![pki.spec("a")]);
    let mut srv = TlsConn::server(&srv_cfg).unwrap();
    // A handshake record header announcing a 64 KiB ClientHello, delivered in 1-byte
    // records: rustls keeps collecting; the driver gives up past MAX_CARRY.
    let mut first = vec![0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x00, 0xff, 0xff];
    let (mut plain, mut out) = (Vec::new(), Vec::new());
    srv.receive(&mut first, &mut plain, &mut out).unwrap();
    let mut failed = false;
    for _ in 0..100_000 {
        let mut rec = vec![0x16, 0x03, 0x01, 0x00, 0x01, 0xAB];
        if srv.receive(&mut rec, &mut plain, &mut out).is_err() {
            failed = true;
            break;
        }
        assert!(srv.carried() <= MAX_CARRY);
    }
    assert!(failed || srv.carried() <= MAX_CARRY);
}

#[test]
fn an_h2_only_client_hears_no_application_protocol() {
    let pki = pki("alpn", &[("a", &["a.test"])]);
    let srv_cfg = server(&pki, vec![pki.spec("a")]);
    let mut cfg = (*pki.client(&[&rustls::version::TLS13])).clone();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let mut client = connect(&Arc::new(cfg), "a.test");
    let mut srv = TlsConn::server(&srv_cfg).unwrap();
    let mut wire = Vec::new();
    client.write_tls(&mut wire).unwrap();
    let (mut plain, mut out) = (Vec::new(), Vec::new());
    let e = srv.receive(&mut wire, &mut plain, &mut out).unwrap_err();
    assert_eq!(e, rustls::Error::NoApplicationProtocol);
    let mut rd = &out[..];
    client.read_tls(&mut rd).unwrap();
    let got = client.process_new_packets().unwrap_err();
    assert_eq!(
        got,
        rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol)
    );
}

#[test]
fn a_bad_record_after_our_close_notify_ends_the_connection() {
    // relay sends close_notify (the origin finished) and keeps reading the client (TLS
    // half-close); a bad record then is an error, not a panic. rustls 0.23 debug-asserts
    // here (close_notify sets its "fatal alert sent" flag), which is why the workspace
    // builds rustls without debug assertions (Cargo.toml, fuzz finding 4).
    let pki = pki("ourclose", &[("a", &["a.test"])]);
    let srv_cfg = server(&pki, vec![pki.spec("a")]);
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let mut client = connect(&pki.client(&[version]), "a.test");
        let mut srv = TlsConn::server(&srv_cfg).unwrap();
        pump(&mut client, &mut srv, 4096);
        let mut out = Vec::new();
        srv.close(&mut out).unwrap();
        assert!(!out.is_empty());
        // Valid data from the client still arrives after our close_notify.
        client.writer().write_all(b"still here").unwrap();
        let mut wire = Vec::new();
        client.write_tls(&mut wire).unwrap();
        let mut plain = Vec::new();
        srv.receive(&mut wire, &mut plain, &mut Vec::new()).unwrap();
        assert_eq!(plain, b"still here");
        let mut ccs = vec![0x14, 0x03, 0x03, 0x00, 0x00];
        assert!(srv.receive(&mut ccs, &mut plain, &mut Vec::new()).is_err());
    }
}
