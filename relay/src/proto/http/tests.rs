use super::*;

fn fwd() -> Forwarding {
    Forwarding {
        peer: "192.0.2.7:5555".parse().unwrap(),
        proto: "http",
    }
}

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn req(extra: &str) -> String {
    format!(
        "GET /chat?x=1 HTTP/1.1\r\nHost: Example.COM:8080\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

fn parse(s: &str) -> Result<Option<Upgrade>, Reject> {
    parse_upgrade(s.as_bytes(), 16384, fwd())
}

fn status(s: &str) -> u16 {
    parse(s).unwrap_err().status.code()
}

#[test]
fn rfc6455_accept_example() {
    assert_eq!(accept_key(KEY.as_bytes()), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}

#[test]
fn valid_upgrade_is_rewritten() {
    let u = parse(&req("X-Forwarded-For: 10.0.0.1\r\nKeep-Alive: 5\r\nX-Forwarded-Proto: https\r\nOrigin: http://example.com\r\n")).unwrap().unwrap();
    assert_eq!(u.host, "example.com");
    assert_eq!(u.path, "/chat?x=1");
    assert_eq!(u.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    let head = String::from_utf8(u.origin_head).unwrap();
    assert!(head.starts_with("GET /chat?x=1 HTTP/1.1\r\n"), "{head}");
    assert!(head.contains("Host: Example.COM:8080\r\n"), "{head}");
    assert!(head.contains("Origin: http://example.com\r\n"));
    assert!(head.contains("Connection: Upgrade\r\nUpgrade: websocket\r\n"));
    assert!(
        head.contains("X-Forwarded-For: 10.0.0.1, 192.0.2.7\r\n"),
        "{head}"
    );
    assert!(head.contains("X-Forwarded-Proto: http\r\n"));
    assert!(!head.contains("https"));
    assert!(
        head.contains("Forwarded: for=192.0.2.7;proto=http;host=\"Example.COM:8080\"\r\n"),
        "{head}"
    );
    assert!(!head.to_ascii_lowercase().contains("keep-alive"), "{head}");
    assert!(head.ends_with("\r\n\r\n"));
    assert_eq!(head.matches("Connection:").count(), 1);
}

#[test]
fn bytes_after_the_head_are_kept() {
    let mut s = req("");
    s.push_str("\u{81}\u{85}frame");
    let u = parse(&s).unwrap().unwrap();
    assert!(u.origin_head.ends_with("\u{81}\u{85}frame".as_bytes()));
    assert_eq!(u.early, "\u{81}\u{85}frame".len());
}

#[test]
fn ipv6_peer_in_forwarded() {
    let f = Forwarding {
        peer: "[2001:db8::1]:1".parse().unwrap(),
        proto: "https",
    };
    let u = parse_upgrade(req("").as_bytes(), 16384, f)
        .unwrap()
        .unwrap();
    let head = String::from_utf8(u.origin_head).unwrap();
    assert!(
        head.contains("Forwarded: for=\"[2001:db8::1]\";proto=https;"),
        "{head}"
    );
    assert!(head.contains("X-Forwarded-For: 2001:db8::1\r\n"), "{head}");
}

#[test]
fn partial_head_asks_for_more() {
    let full = req("");
    for cut in [0, 1, 10, full.len() - 1] {
        assert_eq!(parse(&full[..cut]), Ok(None), "cut at {cut}");
    }
}

#[test]
fn rejections() {
    assert_eq!(status("BLAH\r\n\r\n"), 400);
    assert_eq!(status(&req("").replace("GET", "POST")), 405);
    assert_eq!(status(&req("").replace("HTTP/1.1", "HTTP/1.0")), 426);
    assert_eq!(status(&req("").replace("Upgrade: websocket\r\n", "")), 426);
    assert_eq!(
        status(&req("").replace("Upgrade: websocket", "Upgrade: h2c")),
        426
    );
    assert_eq!(
        status(&req("").replace("keep-alive, Upgrade", "keep-alive")),
        426
    );
    assert_eq!(status(&req("").replace("Version: 13", "Version: 8")), 426);
    assert_eq!(
        status(&req("").replace(&format!("Sec-WebSocket-Key: {KEY}\r\n"), "")),
        400
    );
    assert_eq!(status(&req("").replace(KEY, "c2hvcnQ=")), 400);
    assert_eq!(
        status(&req("").replace("Host: Example.COM:8080\r\n", "")),
        400
    );
    assert_eq!(status(&req("Host: other\r\n")), 400);
    assert_eq!(status(&req("Transfer-Encoding: chunked\r\n")), 400);
    assert_eq!(status(&req("Content-Length: 5\r\n")), 400);
    assert_eq!(status(&req("").replace("/chat?x=1", "http://x/chat")), 400);
    assert_eq!(
        status(&req("").replace("Host: Example.COM:8080", "Host: a b")),
        400
    );
}

#[test]
fn too_large_head() {
    let big = req(&format!("X-Pad: {}\r\n", "a".repeat(20000)));
    assert_eq!(status(&big), 431);
    // Incomplete but already over the limit.
    assert_eq!(status(&big[..17000]), 431);
    let many: String = (0..200).map(|i| format!("X-{i}: v\r\n")).collect();
    assert_eq!(status(&req(&many)), 431);
}

#[test]
fn error_responses_carry_reason_and_close() {
    let r = error_response(Reject {
        status: Status::UpgradeRequired,
        reason: "nope",
    });
    let s = String::from_utf8(r).unwrap();
    assert!(s.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
    assert!(s.contains("Connection: close\r\n"));
    assert!(s.contains("Sec-WebSocket-Version: 13\r\n"));
    let body = s.split("\r\n\r\n").nth(1).unwrap();
    assert_eq!(body, "426 Upgrade Required: nope\n");
    assert!(s.contains(&format!("Content-Length: {}\r\n", body.len())));
}

const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

#[test]
fn answer_101() {
    let a = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {ACCEPT}\r\n\r\n\u{81}\u{2}hi");
    let h = parse_answer(a.as_bytes(), 16384, ACCEPT).unwrap().unwrap();
    assert_eq!(h.answer, Answer::Switching);
    assert_eq!(&a.as_bytes()[h.head_len..], "\u{81}\u{2}hi".as_bytes());
    assert_eq!(parse_answer(&a.as_bytes()[..20], 16384, ACCEPT), Ok(None));
}

#[test]
fn answer_101_with_wrong_accept_is_502() {
    let a = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAA\r\n\r\n";
    assert_eq!(
        parse_answer(a.as_bytes(), 16384, ACCEPT)
            .unwrap_err()
            .status,
        Status::BadGateway
    );
    let a = format!("HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: {ACCEPT}\r\n\r\n");
    assert_eq!(
        parse_answer(a.as_bytes(), 16384, ACCEPT)
            .unwrap_err()
            .status,
        Status::BadGateway
    );
    assert_eq!(
        parse_answer(b"garbage\r\n\r\n", 16384, ACCEPT)
            .unwrap_err()
            .status,
        Status::BadGateway
    );
}

#[test]
fn answer_other_status() {
    let a = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\n\r\nforbidden";
    let h = parse_answer(a, 16384, ACCEPT).unwrap().unwrap();
    assert_eq!(
        h.answer,
        Answer::Other {
            status: 403,
            body_len: Some(9)
        }
    );
    let a = b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n";
    let h = parse_answer(a, 16384, ACCEPT).unwrap().unwrap();
    assert_eq!(
        h.answer,
        Answer::Other {
            status: 401,
            body_len: None
        }
    );
    let a = b"HTTP/1.1 400 Bad\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
    assert!(parse_answer(a, 16384, ACCEPT).is_err());
}

#[test]
fn never_panics_on_arbitrary_prefixes() {
    let full = req("X-A: b\r\n");
    let bytes = full.as_bytes();
    for i in 0..bytes.len() {
        for j in i..bytes.len().min(i + 40) {
            let mut v = bytes.to_vec();
            v[j] ^= 0x5a;
            let _ = parse_upgrade(&v[..i.max(1)], 16384, fwd());
            let _ = parse_answer(&v, 16384, ACCEPT);
        }
    }
}

/// Random and mutated heads: the parsers answer or refuse, they never panic.
#[test]
fn random_input_never_panics() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let seed = req("X-Forwarded-For: 1.2.3.4\r\nForwarded: for=a\r\n");
    let answer = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {ACCEPT}\r\nContent-Length: 3\r\n\r\n");
    let alphabet = b"GET HTTP/1.1\r\n:;,= \"[]*/0123456789abcdefxyzUpgradeConnectionHostSec-WebSocket-\x00\xff\x7f\t";
    for round in 0..20_000 {
        let base = if round % 2 == 0 {
            seed.as_bytes()
        } else {
            answer.as_bytes()
        };
        let mut v = base.to_vec();
        let edits = 1 + (next() % 8) as usize;
        for _ in 0..edits {
            let pos = (next() as usize) % (v.len() + 1);
            match next() % 3 {
                0 if pos < v.len() => v[pos] = alphabet[(next() as usize) % alphabet.len()],
                1 => v.insert(pos, alphabet[(next() as usize) % alphabet.len()]),
                _ if pos < v.len() => {
                    v.remove(pos);
                }
                _ => {}
            }
        }
        let cut = (next() as usize) % (v.len() + 1);
        let _ = parse_upgrade(&v[..cut], 16384, fwd());
        let _ = parse_upgrade(&v, 1024, fwd());
        let _ = parse_answer(&v[..cut], 16384, ACCEPT);
        let _ = parse_answer(&v, 16384, ACCEPT);
    }
}

#[test]
fn oversized_complete_answer_head_is_502() {
    let a = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {ACCEPT}\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(3000)
    );
    let e = parse_answer(a.as_bytes(), 1024, ACCEPT).unwrap_err();
    assert_eq!(e.status, Status::BadGateway);
}
