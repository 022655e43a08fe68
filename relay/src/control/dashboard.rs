//! The live dashboard on the admin listener.
//!
//! `GET /` answers [`PAGE`], a self-contained HTML page (inline CSS and JS, charts drawn on
//! `<canvas>`, no external URL). The page opens a WebSocket to `GET /v1/live`, which
//! [`serve_live`] answers: an RFC 6455 server handshake, then the `/v1/stats` JSON as one text
//! frame every [`PUSH_INTERVAL`] until the client closes. Each live client runs on its own
//! thread (at most [`MAX_LIVE_CLIENTS`] at once; 503 past that), so the admin thread that
//! accepted it goes straight back to serving scrapes.
//!
//! Frames go through the sans-IO codec of [`crate::proto::ws`]: unmasked text frames out;
//! client frames in, of which close (answered, then the connection ends) and ping (answered
//! with a pong) matter. Data the client sends is read and dropped without being buffered; a
//! client that breaks the protocol gets the close code the decoder names.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;

use super::admin::Ending;
use crate::proto::http::accept_key;
use crate::proto::ws::{write_message, DataKind, Decoder, DecoderConfig, Delivery, Event};

/// The dashboard page served at `GET /`.
pub const PAGE: &str = include_str!("dashboard.html");

/// How often a live client gets a fresh snapshot.
pub const PUSH_INTERVAL: Duration = Duration::from_millis(500);

/// Live clients served at once; the next one is answered 503.
pub const MAX_LIVE_CLIENTS: usize = 32;

/// The largest message a live client may send (the page sends none).
const MAX_CLIENT_MESSAGE: u64 = 64 * 1024;

/// A live client whose socket takes no bytes for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

static LIVE_CLIENTS: AtomicUsize = AtomicUsize::new(0);

/// Live clients being served now.
pub fn live_clients() -> usize {
    LIVE_CLIENTS.load(Ordering::Relaxed)
}

/// Why a `/v1/live` request was not upgraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeError {
    /// 400: malformed head, not HTTP/1.1, missing or bad key.
    BadRequest(&'static str),
    /// 403: a browser page from another origin (cross-site WebSocket hijacking).
    ForeignOrigin,
    /// 405: not GET.
    NotGet,
    /// 426: not an upgrade to websocket, or a version other than 13.
    UpgradeRequired(&'static str),
}

impl HandshakeError {
    /// The full HTTP answer for this refusal.
    pub fn response(self) -> Vec<u8> {
        let (code, reason, why, extra) = match self {
            HandshakeError::BadRequest(why) => (400, "Bad Request", why, ""),
            HandshakeError::ForeignOrigin => (
                403,
                "Forbidden",
                "Origin does not match Host: the live feed serves only this dashboard",
                "",
            ),
            HandshakeError::NotGet => (405, "Method Not Allowed", "only GET", "Allow: GET\r\n"),
            HandshakeError::UpgradeRequired(why) => (
                426,
                "Upgrade Required",
                why,
                "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
            ),
        };
        plain(code, reason, extra, why)
    }
}

fn plain(code: u16, reason: &str, extra: &str, why: &str) -> Vec<u8> {
    let body = format!("{why}\n");
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn has_token(value: &[u8], token: &str) -> bool {
    std::str::from_utf8(value)
        .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        .unwrap_or(false)
}

/// Validates a WebSocket upgrade request head (RFC 6455 §4.2.1) and returns the `101`
/// answer plus the length of the head within `head` (bytes past it are the client's first
/// frames).
pub fn handshake(head: &[u8]) -> Result<(Vec<u8>, usize), HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(head) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Err(HandshakeError::BadRequest("incomplete head")),
        Err(_) => return Err(HandshakeError::BadRequest("malformed head")),
    };
    if req.method != Some("GET") {
        return Err(HandshakeError::NotGet);
    }
    if req.version != Some(1) {
        return Err(HandshakeError::BadRequest(
            "a WebSocket upgrade needs HTTP/1.1",
        ));
    }
    let get = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    if !get("upgrade").is_some_and(|v| has_token(v, "websocket")) {
        return Err(HandshakeError::UpgradeRequired(
            "this is a WebSocket endpoint: send Upgrade: websocket",
        ));
    }
    if !get("connection").is_some_and(|v| has_token(v, "upgrade")) {
        return Err(HandshakeError::UpgradeRequired(
            "Connection: upgrade is missing",
        ));
    }
    if get("sec-websocket-version").map(|v| v.trim_ascii()) != Some(b"13".as_slice()) {
        return Err(HandshakeError::UpgradeRequired(
            "Sec-WebSocket-Version must be 13",
        ));
    }
    let key = get("sec-websocket-key")
        .map(|k| k.trim_ascii())
        .ok_or(HandshakeError::BadRequest("Sec-WebSocket-Key is missing"))?;
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(k) if k.len() == 16 => {}
        _ => {
            return Err(HandshakeError::BadRequest(
                "Sec-WebSocket-Key is not 16 bytes in base64",
            ))
        }
    }
    // Browsers send Origin; the feed is for this listener's own page only. Clients that are
    // not browsers send none and are let in.
    if let Some(origin) = get("origin") {
        let host = get("host").unwrap_or_default();
        let same = std::str::from_utf8(origin).ok().and_then(|o| {
            o.strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"))
        });
        if same.map(str::as_bytes) != Some(host) {
            return Err(HandshakeError::ForeignOrigin);
        }
    }
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(key)
    );
    Ok((answer.into_bytes(), len))
}

/// Holds one of the [`MAX_LIVE_CLIENTS`] places until dropped.
struct Place;

impl Place {
    fn take() -> Option<Place> {
        LIVE_CLIENTS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_LIVE_CLIENTS).then_some(n + 1)
            })
            .ok()
            .map(|_| Place)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        LIVE_CLIENTS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Answers `GET /v1/live`: `head` is everything the admin listener has read from `c` (the
/// request head, perhaps followed by the client's first frames). On a valid handshake the
/// connection moves to a thread of its own that pushes `snapshot()` every
/// [`PUSH_INTERVAL`]; this returns at once, with [`Ending::HandedOff`] ([`Ending::Close`]
/// after an error answer, which the admin listener then closes).
pub(super) fn serve_live<F>(c: &mut TcpStream, head: &[u8], snapshot: F) -> std::io::Result<Ending>
where
    F: Fn() -> String + Send + 'static,
{
    let (answer, len) = match handshake(head) {
        Ok(a) => a,
        Err(e) => return c.write_all(&e.response()).map(|()| Ending::Close),
    };
    let Some(place) = Place::take() else {
        return c
            .write_all(&plain(
                503,
                "Service Unavailable",
                "Retry-After: 5\r\n",
                &format!("too many live dashboard clients (at most {MAX_LIVE_CLIENTS})"),
            ))
            .map(|()| Ending::Close);
    };
    let stream = c.try_clone()?;
    let pending = head[len..].to_vec();
    std::thread::Builder::new()
        .name("relay-live".into())
        .spawn(move || {
            let _place = place;
            if let Err(e) = live(stream, &answer, pending, snapshot) {
                tracing::debug!("live dashboard client ended: {e}");
            }
        })?;
    Ok(Ending::HandedOff)
}

/// What the client's frames ask of us.
#[derive(Default)]
struct Replies {
    /// Pongs and the closing handshake, to send now.
    out: Vec<u8>,
    /// The client sent close (or broke the protocol): send `out`, then end.
    done: bool,
}

/// Reads the client's bytes, collecting what must be answered.
fn client_bytes(decoder: &mut Decoder, input: &[u8], r: &mut Replies) {
    let fed = decoder.feed(input, |ev| match ev {
        Event::Ping(p) => r.out.extend_from_slice(p.pong().as_bytes()),
        Event::Close(c) => {
            r.out.extend_from_slice(c.reply().as_bytes());
            r.done = true;
        }
        // Pongs and data (never buffered: Delivery::Fragments) need no answer.
        _ => {}
    });
    if let Err(e) = fed {
        tracing::debug!("live dashboard client: {e}");
        r.out.extend_from_slice(e.close_frame().as_bytes());
        r.done = true;
    }
}

fn live<F: Fn() -> String>(
    mut s: TcpStream,
    answer: &[u8],
    pending: Vec<u8>,
    snapshot: F,
) -> std::io::Result<()> {
    s.set_write_timeout(Some(WRITE_TIMEOUT))?;
    s.set_nodelay(true)?;
    s.write_all(answer)?;
    let mut decoder = Decoder::new(DecoderConfig {
        max_message_size: MAX_CLIENT_MESSAGE,
        delivery: Delivery::Fragments,
    });
    let mut replies = Replies::default();
    client_bytes(&mut decoder, &pending, &mut replies);
    let mut next = Instant::now();
    let mut frame = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if !replies.out.is_empty() {
            s.write_all(&replies.out)?;
            replies.out.clear();
        }
        if replies.done {
            let _ = s.shutdown(Shutdown::Both);
            return Ok(());
        }
        let now = Instant::now();
        if now >= next {
            frame.clear();
            write_message(&mut frame, DataKind::Text, snapshot().as_bytes());
            s.write_all(&frame)?;
            next += PUSH_INTERVAL;
            if next < now {
                next = now + PUSH_INTERVAL;
            }
            continue;
        }
        let wait = next.saturating_duration_since(now);
        s.set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => client_bytes(&mut decoder, &buf[..n], &mut replies),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn req(extra: &str) -> String {
        format!(
            "GET /v1/live HTTP/1.1\r\nHost: 127.0.0.1:9090\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{extra}\r\n"
        )
    }

    #[test]
    fn handshake_answers_rfc_example() {
        let r = req("");
        let (answer, len) = handshake(r.as_bytes()).unwrap();
        assert_eq!(len, r.len());
        let a = String::from_utf8(answer).unwrap();
        assert!(a.starts_with("HTTP/1.1 101 "));
        // RFC 6455 §1.3's worked example.
        assert!(a.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    }

    #[test]
    fn handshake_keeps_bytes_after_head() {
        let r = format!("{}\u{81}\u{80}", req(""));
        let (_, len) = handshake(r.as_bytes()).unwrap();
        assert_eq!(&r.as_bytes()[len..], "\u{81}\u{80}".as_bytes());
    }

    #[test]
    fn handshake_refusals() {
        let bad = |r: &str| handshake(r.as_bytes()).unwrap_err();
        assert_eq!(bad(&req("").replace("GET", "POST")), HandshakeError::NotGet);
        assert!(matches!(
            bad(&req("").replace("HTTP/1.1", "HTTP/1.0")),
            HandshakeError::BadRequest(_)
        ));
        assert!(matches!(
            bad(&req("").replace("Upgrade: websocket\r\n", "")),
            HandshakeError::UpgradeRequired(_)
        ));
        assert!(matches!(
            bad(&req("").replace("keep-alive, Upgrade", "keep-alive")),
            HandshakeError::UpgradeRequired(_)
        ));
        assert!(matches!(
            bad(&req("").replace("Version: 13", "Version: 8")),
            HandshakeError::UpgradeRequired(_)
        ));
        assert!(matches!(
            bad(&req("").replace(KEY, "c2hvcnQ=")),
            HandshakeError::BadRequest(_)
        ));
        assert!(matches!(
            bad(&req("").replace(&format!("Sec-WebSocket-Key: {KEY}\r\n"), "")),
            HandshakeError::BadRequest(_)
        ));
        assert_eq!(
            bad(&req("Origin: http://evil.example\r\n")),
            HandshakeError::ForeignOrigin
        );
        assert!(handshake(req("Origin: http://127.0.0.1:9090\r\n").as_bytes()).is_ok());
        let a = String::from_utf8(HandshakeError::UpgradeRequired("x").response()).unwrap();
        assert!(a.starts_with("HTTP/1.1 426 "));
        assert!(a.contains("Sec-WebSocket-Version: 13\r\n"));
    }

    fn masked(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut out = vec![b0];
        if payload.len() < 126 {
            out.push(0x80 | payload.len() as u8);
        } else if payload.len() <= u16::MAX as usize {
            out.push(0x80 | 126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn decoder() -> Decoder {
        Decoder::new(DecoderConfig {
            max_message_size: MAX_CLIENT_MESSAGE,
            delivery: Delivery::Fragments,
        })
    }

    #[test]
    fn pings_are_answered_data_dropped_close_echoed() {
        let mut wire = masked(0x89, b"ping!");
        wire.extend(masked(0x81, &[b'a'; 200]));
        wire.extend(masked(0x88, &[0x03, 0xE8, b'b', b'y', b'e']));
        wire.extend(masked(0x89, b"after close"));
        let mut d = decoder();
        let mut r = Replies::default();
        // One byte at a time: answers do not depend on how the bytes arrive.
        for b in &wire {
            client_bytes(&mut d, std::slice::from_ref(b), &mut r);
        }
        assert!(r.done);
        assert_eq!(r.out, b"\x8a\x05ping!\x88\x02\x03\xe8");
        assert_eq!(d.buffered_capacity(), 0);
    }

    #[test]
    fn protocol_errors_close_with_their_code() {
        let mut r = Replies::default();
        client_bytes(&mut decoder(), b"\x81\x02hi", &mut r); // unmasked
        assert!(r.done);
        assert_eq!(&r.out[..4], &[0x88, r.out[1], 0x03, 0xEA]); // 1002
        let mut r = Replies::default();
        client_bytes(&mut decoder(), &masked(0x82, &[0; 65 * 1024]), &mut r);
        assert!(r.done);
        assert_eq!(&r.out[2..4], &[0x03, 0xF1]); // 1009
    }

    #[test]
    fn pushed_frames_are_unmasked_text() {
        let mut f = Vec::new();
        write_message(&mut f, DataKind::Text, br#"{"total":{}}"#);
        assert_eq!(&f[..2], &[0x81, 12]);
    }

    #[test]
    fn page_is_self_contained() {
        assert!(PAGE.starts_with("<!doctype html>"));
        for id in ["total-active", "total-accepted", "routes", "chart-active"] {
            assert!(PAGE.contains(&format!("id=\"{id}\"")), "{id}");
        }
        // No external fetches: every URL the page uses is relative to the admin listener.
        for bad in ["http://", "https://", "src=\"//", "href=\"//", "@import"] {
            assert!(!PAGE.contains(bad), "{bad}");
        }
    }

    #[test]
    fn live_places_are_capped() {
        // No other unit test takes places, so all of them are free here.
        let places: Vec<_> = std::iter::from_fn(Place::take).take(100).collect();
        assert_eq!(places.len(), MAX_LIVE_CLIENTS);
        assert_eq!(live_clients(), MAX_LIVE_CLIENTS);
        assert!(Place::take().is_none());
        drop(places);
        assert!(Place::take().is_some());
    }
}
