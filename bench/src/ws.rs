//! Minimal sans-IO WebSocket (RFC 6455) pieces shared by `echo-origin` and `load`:
//! accept-key computation, upgrade request/response heads, a frame header encoder and a
//! streaming frame decoder that never buffers payloads (only up to 14 header bytes).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use sha1::{Digest, Sha1};

/// The GUID appended to the client's key (RFC 6455 §1.3).
pub const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Frame opcodes.
pub mod op {
    pub const CONT: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;

    pub fn is_control(op: u8) -> bool {
        op & 0x8 != 0
    }
}

/// Longest possible frame header: 2 + 8 (64-bit length) + 4 (mask key).
pub const MAX_HEADER: usize = 14;

/// Largest request/response head accepted during the upgrade.
pub const MAX_HEAD: usize = 8192;

/// `Sec-WebSocket-Accept` for a given `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.trim().as_bytes());
    h.update(GUID.as_bytes());
    B64.encode(h.finalize())
}

/// A fresh random `Sec-WebSocket-Key` (16 random bytes, base64).
pub fn random_key(rng: &mut fastrand::Rng) -> String {
    let mut raw = [0u8; 16];
    rng.fill(&mut raw);
    B64.encode(raw)
}

// ---------------------------------------------------------------------------------------
// Upgrade heads
// ---------------------------------------------------------------------------------------

/// The client's upgrade request head.
pub fn upgrade_request(host: &str, path: &str, key: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// Why an upgrade request was refused: the HTTP status and a one-line reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
}

impl Refusal {
    /// A complete HTTP/1.1 answer carrying the refusal (connection closes afterwards).
    pub fn response(&self) -> Vec<u8> {
        let phrase = match self.status {
            400 => "Bad Request",
            405 => "Method Not Allowed",
            426 => "Upgrade Required",
            431 => "Request Header Fields Too Large",
            _ => "Error",
        };
        let body = format!("{}\n", self.reason);
        let extra = if self.status == 426 {
            "Sec-WebSocket-Version: 13\r\nUpgrade: websocket\r\n"
        } else {
            ""
        };
        format!(
            "HTTP/1.1 {} {}\r\n{extra}Content-Type: text/plain\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            self.status,
            phrase,
            body.len()
        )
        .into_bytes()
    }
}

fn refuse(status: u16, reason: &'static str) -> Refusal {
    Refusal { status, reason }
}

fn header_has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Parses and validates a client upgrade request head.
///
/// `Ok(None)`: incomplete, read more. `Ok(Some((head_len, accept)))`: valid; `head_len`
/// bytes were the head (anything after is already frame data) and `accept` is the
/// `Sec-WebSocket-Accept` value to answer with.
pub fn parse_upgrade_request(buf: &[u8]) -> Result<Option<(usize, String)>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD {
                return Err(refuse(431, "request head too large"));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(refuse(431, "too many headers")),
        Err(_) => return Err(refuse(400, "malformed request head")),
    };
    if head_len > MAX_HEAD {
        return Err(refuse(431, "request head too large"));
    }
    if req.method != Some("GET") {
        return Err(refuse(405, "WebSocket upgrade needs GET"));
    }
    if req.version != Some(1) {
        return Err(refuse(400, "WebSocket upgrade needs HTTP/1.1"));
    }
    let (mut upgrade, mut connection, mut version, mut key, mut host) =
        (false, false, None, None, false);
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade |= header_has_token(h.value, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection |= header_has_token(h.value, "upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            version = Some(h.value);
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            key = Some(h.value);
        } else if name.eq_ignore_ascii_case("host") {
            host = true;
        }
    }
    if !host {
        return Err(refuse(400, "missing Host header"));
    }
    if !upgrade || !connection {
        return Err(refuse(426, "not a WebSocket upgrade"));
    }
    if version.map(|v| v.trim_ascii()) != Some(b"13".as_slice()) {
        return Err(refuse(426, "unsupported Sec-WebSocket-Version (need 13)"));
    }
    let key = key.ok_or_else(|| refuse(400, "missing Sec-WebSocket-Key"))?;
    let key = std::str::from_utf8(key)
        .map_err(|_| refuse(400, "bad Sec-WebSocket-Key"))?
        .trim();
    match B64.decode(key) {
        Ok(raw) if raw.len() == 16 => {}
        _ => return Err(refuse(400, "bad Sec-WebSocket-Key")),
    }
    Ok(Some((head_len, accept_key(key))))
}

/// The server's 101 answer.
pub fn upgrade_response(accept: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

/// Parses the server's answer to our upgrade request and checks it.
///
/// `Ok(None)`: incomplete. `Ok(Some(head_len))`: a valid 101 with the expected accept.
pub fn parse_upgrade_response(buf: &[u8], expected_accept: &[u8]) -> Result<Option<usize>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD {
                return Err("response head too large".into());
            }
            return Ok(None);
        }
        Err(e) => return Err(format!("malformed response head: {e}")),
    };
    if resp.code != Some(101) {
        return Err(format!(
            "status {} {}",
            resp.code.unwrap_or(0),
            resp.reason.unwrap_or("")
        ));
    }
    let (mut upgrade, mut connection, mut accept_ok) = (false, false, false);
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade |= header_has_token(h.value, "websocket");
        } else if h.name.eq_ignore_ascii_case("connection") {
            connection |= header_has_token(h.value, "upgrade");
        } else if h.name.eq_ignore_ascii_case("sec-websocket-accept") {
            accept_ok = h.value.trim_ascii() == expected_accept;
        }
    }
    if !upgrade || !connection {
        return Err("101 without Upgrade: websocket / Connection: upgrade".into());
    }
    if !accept_ok {
        return Err("wrong or missing Sec-WebSocket-Accept".into());
    }
    Ok(Some(head_len))
}

// ---------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub len: u64,
}

/// Protocol violations found while decoding (all map to close code 1002).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtoError {
    ReservedBits,
    BadOpcode(u8),
    ControlTooLong,
    ControlFragmented,
    /// Client frames must be masked, server frames must not be.
    Masking,
    LengthOverflow,
    UnexpectedContinuation,
    ExpectedContinuation,
    BadClosePayload,
}

impl std::fmt::Display for ProtoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProtoError::ReservedBits => write!(f, "reserved bits set"),
            ProtoError::BadOpcode(o) => write!(f, "unknown opcode {o:#x}"),
            ProtoError::ControlTooLong => write!(f, "control frame longer than 125 bytes"),
            ProtoError::ControlFragmented => write!(f, "fragmented control frame"),
            ProtoError::Masking => write!(f, "wrong masking for this direction"),
            ProtoError::LengthOverflow => write!(f, "64-bit length with the top bit set"),
            ProtoError::UnexpectedContinuation => write!(f, "continuation without a message"),
            ProtoError::ExpectedContinuation => write!(f, "new message inside a fragmented one"),
            ProtoError::BadClosePayload => write!(f, "close frame with a 1-byte payload"),
        }
    }
}

/// Close code for protocol errors.
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;

/// Writes a frame header. `mask` must be `Some` for client-to-server frames.
pub fn encode_header(out: &mut Vec<u8>, fin: bool, opcode: u8, mask: Option<[u8; 4]>, len: u64) {
    let b0 = (if fin { 0x80 } else { 0 }) | (opcode & 0x0F);
    let mbit = if mask.is_some() { 0x80 } else { 0 };
    out.push(b0);
    if len < 126 {
        out.push(mbit | len as u8);
    } else if len <= u16::MAX as u64 {
        out.push(mbit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mbit | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    if let Some(m) = mask {
        out.extend_from_slice(&m);
    }
}

/// Writes a whole frame, masking the payload when `mask` is given.
pub fn encode_frame(
    out: &mut Vec<u8>,
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    payload: &[u8],
) {
    encode_header(out, fin, opcode, mask, payload.len() as u64);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(m) = mask {
        apply_mask(&mut out[start..], m, 0);
    }
}

/// XORs `buf` with the masking key, `offset` being the position of `buf[0]` within the
/// frame payload (so a payload can be unmasked piecewise).
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], offset: u64) {
    let r = (offset % 4) as usize;
    let m = [
        mask[r],
        mask[(r + 1) % 4],
        mask[(r + 2) % 4],
        mask[(r + 3) % 4],
    ];
    let m64 = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(w) ^ m64).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i % 4];
    }
}

/// Parses one frame header from the front of `buf`, checking it against the direction
/// (`expect_masked`: true on the server side). `Ok(None)` if more bytes are needed.
pub fn parse_header(
    buf: &[u8],
    expect_masked: bool,
) -> Result<Option<(FrameHeader, usize)>, ProtoError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(ProtoError::ReservedBits);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    match opcode {
        op::CONT | op::TEXT | op::BINARY | op::CLOSE | op::PING | op::PONG => {}
        o => return Err(ProtoError::BadOpcode(o)),
    }
    let masked = b1 & 0x80 != 0;
    if masked != expect_masked {
        return Err(ProtoError::Masking);
    }
    let len7 = b1 & 0x7F;
    if op::is_control(opcode) {
        if !fin {
            return Err(ProtoError::ControlFragmented);
        }
        if len7 > 125 {
            return Err(ProtoError::ControlTooLong);
        }
    }
    let mut pos = 2;
    let len = match len7 {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            pos = 4;
            u16::from_be_bytes([buf[2], buf[3]]) as u64
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            pos = 10;
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let l = u64::from_be_bytes(b);
            if l >> 63 != 0 {
                return Err(ProtoError::LengthOverflow);
            }
            l
        }
        l => l as u64,
    };
    let mask = if masked {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        let m = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
        pos += 4;
        Some(m)
    } else {
        None
    };
    if opcode == op::CLOSE && len == 1 {
        return Err(ProtoError::BadClosePayload);
    }
    Ok(Some((
        FrameHeader {
            fin,
            opcode,
            mask,
            len,
        },
        pos,
    )))
}

/// What the decoder reports while walking the input.
#[derive(Debug)]
pub enum Event<'a> {
    /// A frame starts.
    Header(FrameHeader),
    /// Some of the current frame's payload, already unmasked. `offset` is its position
    /// within the frame payload.
    Payload {
        opcode: u8,
        offset: u64,
        data: &'a mut [u8],
    },
    /// The current frame ended. `message_end` is true when it was the last frame of a
    /// data message (fin set on a text/binary/continuation frame).
    End { opcode: u8, message_end: bool },
}

/// Whether the decoder should go on after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// Streaming frame decoder: keeps at most a partial header (14 bytes) between calls and
/// hands payload bytes to the caller in place, so a connection never needs a buffer for
/// the frame in flight, however large the frame is.
#[derive(Debug, Clone)]
pub struct Decoder {
    hdr: [u8; MAX_HEADER],
    hdr_len: u8,
    expect_masked: bool,
    in_frame: bool,
    in_message: bool,
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    masked: bool,
    len: u64,
    pos: u64,
}

impl Decoder {
    /// `expect_masked`: true when decoding client frames (server side).
    pub fn new(expect_masked: bool) -> Self {
        Decoder {
            hdr: [0; MAX_HEADER],
            hdr_len: 0,
            expect_masked,
            in_frame: false,
            in_message: false,
            fin: false,
            opcode: 0,
            mask: [0; 4],
            masked: false,
            len: 0,
            pos: 0,
        }
    }

    /// True when no partial frame is pending (between frames).
    #[cfg(test)]
    pub fn is_idle(&self) -> bool {
        !self.in_frame && self.hdr_len == 0
    }

    /// Consumes `input`, calling `f` for each event. Returns how many bytes were consumed:
    /// all of them unless `f` returned [`Flow::Stop`].
    pub fn feed(
        &mut self,
        input: &mut [u8],
        f: &mut impl FnMut(Event<'_>) -> Flow,
    ) -> Result<usize, ProtoError> {
        let total = input.len();
        let mut rest: &mut [u8] = input;
        loop {
            if !self.in_frame {
                if rest.is_empty() {
                    return Ok(total);
                }
                // Assemble the header in the small inline buffer.
                let have = self.hdr_len as usize;
                let take = (MAX_HEADER - have).min(rest.len());
                self.hdr[have..have + take].copy_from_slice(&rest[..take]);
                let parsed = parse_header(&self.hdr[..have + take], self.expect_masked)?;
                let Some((h, hlen)) = parsed else {
                    self.hdr_len = (have + take) as u8;
                    return Ok(total);
                };
                let used = hlen - have;
                self.hdr_len = 0;
                rest = &mut std::mem::take(&mut rest)[used..];
                // Message sequencing.
                if !op::is_control(h.opcode) {
                    if h.opcode == op::CONT && !self.in_message {
                        return Err(ProtoError::UnexpectedContinuation);
                    }
                    if h.opcode != op::CONT && self.in_message {
                        return Err(ProtoError::ExpectedContinuation);
                    }
                    self.in_message = !h.fin;
                }
                self.fin = h.fin;
                self.opcode = h.opcode;
                self.masked = h.mask.is_some();
                self.mask = h.mask.unwrap_or([0; 4]);
                self.len = h.len;
                self.pos = 0;
                self.in_frame = true;
                if f(Event::Header(h)) == Flow::Stop {
                    return Ok(total - rest.len());
                }
            }
            if self.pos < self.len {
                if rest.is_empty() {
                    return Ok(total);
                }
                let n = (self.len - self.pos).min(rest.len() as u64) as usize;
                let (chunk, tail) = std::mem::take(&mut rest).split_at_mut(n);
                rest = tail;
                if self.masked {
                    apply_mask(chunk, self.mask, self.pos);
                }
                let offset = self.pos;
                self.pos += n as u64;
                let flow = f(Event::Payload {
                    opcode: self.opcode,
                    offset,
                    data: chunk,
                });
                if flow == Flow::Stop {
                    return Ok(total - rest.len());
                }
            }
            if self.pos == self.len {
                self.in_frame = false;
                let message_end = self.fin && !op::is_control(self.opcode);
                let ev = Event::End {
                    opcode: self.opcode,
                    message_end,
                };
                if f(ev) == Flow::Stop {
                    return Ok(total - rest.len());
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Payload pattern used by `load` and `check`
// ---------------------------------------------------------------------------------------

/// splitmix64 finaliser.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Seed of message number `seq` on connection `conn`.
pub fn pattern_seed(conn: u64, seq: u64) -> u64 {
    mix64(mix64(conn) ^ seq)
}

/// Byte `i` of the payload with the given seed. Two messages with different seeds differ
/// in every 8-byte block; a shifted or truncated payload differs too.
#[inline]
pub fn pattern_byte(seed: u64, i: u64) -> u8 {
    (seed >> ((i & 7) * 8)) as u8 ^ (i >> 3) as u8
}

/// The 8-byte block number `block` of the pattern for `seed`, as a little-endian word:
/// byte `8 * block + k` is `pattern_byte(seed, 8 * block + k)`.
#[inline]
fn pattern_word(seed: u64, block: u64) -> u64 {
    seed ^ (block & 0xff).wrapping_mul(0x0101_0101_0101_0101)
}

/// Appends `len` pattern bytes for `seed`. Word at a time: the load generator shares its CPU
/// with the echo origin in `bench-compare`, and a byte loop over every 4 KiB message was its
/// largest user-space cost.
pub fn fill_pattern(out: &mut Vec<u8>, seed: u64, len: usize) {
    out.reserve(len);
    let words = (len / 8) as u64;
    for block in 0..words {
        out.extend_from_slice(&pattern_word(seed, block).to_le_bytes());
    }
    out.extend((words * 8..len as u64).map(|i| pattern_byte(seed, i)));
}

/// True if `data`, found at `offset` within a payload with `seed`, matches the pattern.
pub fn check_pattern(data: &[u8], seed: u64, offset: u64) -> bool {
    let bytes_ok = |part: &[u8], at: u64| {
        part.iter()
            .enumerate()
            .all(|(i, &b)| b == pattern_byte(seed, at + i as u64))
    };
    // Bytes up to the next 8-byte block boundary of the payload, then whole blocks (their
    // differences ORed together, a loop without branches), then the tail.
    let head = (offset.wrapping_neg() % 8).min(data.len() as u64) as usize;
    let (head_bytes, rest) = data.split_at(head);
    if !bytes_ok(head_bytes, offset) {
        return false;
    }
    let first_block = (offset + head as u64) / 8;
    let chunks = rest.chunks_exact(8);
    let tail = chunks.remainder();
    let diff = chunks.enumerate().fold(0u64, |acc, (k, c)| {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        acc | (u64::from_le_bytes(w) ^ pattern_word(seed, first_block + k as u64))
    });
    diff == 0 && bytes_ok(tail, offset + (data.len() - tail.len()) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_rfc_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn random_key_is_16_bytes() {
        let mut rng = fastrand::Rng::with_seed(7);
        let k = random_key(&mut rng);
        assert_eq!(B64.decode(&k).unwrap().len(), 16);
        assert_ne!(k, random_key(&mut rng));
    }

    #[test]
    fn upgrade_roundtrip() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let mut req = upgrade_request("example.com", "/chat", key);
        req.extend_from_slice(b"\x81\x80abcd"); // a frame right behind the head
        let (n, accept) = parse_upgrade_request(&req).unwrap().unwrap();
        assert_eq!(&req[n..], b"\x81\x80abcd");
        assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let resp = upgrade_response(&accept);
        assert_eq!(
            parse_upgrade_response(&resp, accept.as_bytes()).unwrap(),
            Some(resp.len())
        );
        assert!(parse_upgrade_response(&resp, b"wrong").is_err());
        assert_eq!(parse_upgrade_response(&resp[..10], b"x").unwrap(), None);
        assert_eq!(parse_upgrade_request(&req[..20]).unwrap(), None);
    }

    #[test]
    fn upgrade_refusals() {
        let bad = |s: &str| parse_upgrade_request(s.as_bytes()).unwrap_err().status;
        assert_eq!(bad("POST / HTTP/1.1\r\nHost: a\r\n\r\n"), 405);
        assert_eq!(bad("GET / HTTP/1.1\r\nHost: a\r\n\r\n"), 426);
        assert_eq!(
            bad("GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"),
            426
        );
        assert_eq!(
            bad("GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: c2hvcnQ=\r\n\r\n"),
            400
        );
        assert_eq!(bad("GET / HTTP/1.0\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(bad("garbage\r\n\r\n"), 400);
        let huge = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD));
        assert_eq!(bad(&huge), 431);
        // Token lists and odd case are fine.
        let ok = "GET / HTTP/1.1\r\nhost: a\r\nupgrade: WebSocket\r\nconnection: keep-alive, upgrade\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        assert!(parse_upgrade_request(ok.as_bytes()).unwrap().is_some());
        let r = Refusal {
            status: 426,
            reason: "x",
        }
        .response();
        assert!(r.starts_with(b"HTTP/1.1 426 Upgrade Required\r\n"));
    }

    #[test]
    fn header_encoding_lengths() {
        for (len, hlen) in [
            (0u64, 2usize),
            (125, 2),
            (126, 4),
            (65535, 4),
            (65536, 10),
            (16 << 20, 10),
        ] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let mut out = Vec::new();
                encode_header(&mut out, true, op::BINARY, mask, len);
                let extra = if mask.is_some() { 4 } else { 0 };
                assert_eq!(out.len(), hlen + extra, "len {len}");
                let (h, n) = parse_header(&out, mask.is_some()).unwrap().unwrap();
                assert_eq!(n, out.len());
                assert_eq!(
                    h,
                    FrameHeader {
                        fin: true,
                        opcode: op::BINARY,
                        mask,
                        len
                    }
                );
                // Every strict prefix is incomplete, not an error.
                for cut in 0..out.len() {
                    assert_eq!(parse_header(&out[..cut], mask.is_some()).unwrap(), None);
                }
            }
        }
    }

    #[test]
    fn rfc_examples() {
        // RFC 6455 §5.7: unmasked "Hello" and masked "Hello".
        let mut out = Vec::new();
        encode_frame(&mut out, true, op::TEXT, None, b"Hello");
        assert_eq!(out, [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        out.clear();
        encode_frame(
            &mut out,
            true,
            op::TEXT,
            Some([0x37, 0xfa, 0x21, 0x3d]),
            b"Hello",
        );
        assert_eq!(
            out,
            [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]
        );
        // Fragmented unmasked text: "Hel" + "lo".
        let mut frames = vec![0x01, 0x03, 0x48, 0x65, 0x6c, 0x80, 0x02, 0x6c, 0x6f];
        let evs = collect(&mut Decoder::new(false), &mut frames).unwrap();
        assert_eq!(
            evs,
            vec![
                Ev::H(false, op::TEXT, 3),
                Ev::P(op::TEXT, 0, b"Hel".to_vec()),
                Ev::E(op::TEXT, false),
                Ev::H(true, op::CONT, 2),
                Ev::P(op::CONT, 0, b"lo".to_vec()),
                Ev::E(op::CONT, true),
            ]
        );
    }

    #[test]
    fn header_errors() {
        assert_eq!(
            parse_header(&[0xC1, 0x80, 0, 0, 0, 0], true),
            Err(ProtoError::ReservedBits)
        );
        assert_eq!(
            parse_header(&[0x83, 0x80], true),
            Err(ProtoError::BadOpcode(3))
        );
        assert_eq!(parse_header(&[0x81, 0x00], true), Err(ProtoError::Masking));
        assert_eq!(parse_header(&[0x81, 0x80], false), Err(ProtoError::Masking));
        assert_eq!(
            parse_header(&[0x09, 0x80], true),
            Err(ProtoError::ControlFragmented)
        );
        assert_eq!(
            parse_header(&[0x89, 0xFE], true),
            Err(ProtoError::ControlTooLong)
        );
        assert_eq!(
            parse_header(&[0x88, 0x01], false),
            Err(ProtoError::BadClosePayload)
        );
        let mut long = vec![0x82, 0x7F];
        long.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert_eq!(parse_header(&long, false), Err(ProtoError::LengthOverflow));
        let mut d = Decoder::new(false);
        assert_eq!(
            collect(&mut d, &mut [0x80, 0x00]),
            Err(ProtoError::UnexpectedContinuation)
        );
        let mut d = Decoder::new(false);
        assert_eq!(
            collect(&mut d, &mut [0x01, 0x00, 0x81, 0x00]),
            Err(ProtoError::ExpectedContinuation)
        );
        // Control frames may sit between fragments.
        let mut d = Decoder::new(false);
        assert!(collect(&mut d, &mut [0x01, 0x00, 0x89, 0x00, 0x80, 0x00]).is_ok());
    }

    #[test]
    fn mask_offsets() {
        let mask = [0xA1, 0xB2, 0xC3, 0xD4];
        let plain: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let mut whole = plain.clone();
        apply_mask(&mut whole, mask, 0);
        for (i, b) in whole.iter().enumerate() {
            assert_eq!(*b, plain[i] ^ mask[i % 4]);
        }
        // Piecewise at odd splits gives the same result.
        let mut pieces = plain.clone();
        let mut off = 0;
        for len in [1usize, 3, 7, 8, 13, 100, 868] {
            apply_mask(&mut pieces[off..off + len], mask, off as u64);
            off += len;
        }
        assert_eq!(pieces, whole);
    }

    #[derive(Debug, PartialEq)]
    enum Ev {
        H(bool, u8, u64),
        P(u8, u64, Vec<u8>),
        E(u8, bool),
    }

    fn collect(d: &mut Decoder, input: &mut [u8]) -> Result<Vec<Ev>, ProtoError> {
        let mut evs = Vec::new();
        d.feed(input, &mut |e| {
            evs.push(match e {
                Event::Header(h) => Ev::H(h.fin, h.opcode, h.len),
                Event::Payload {
                    opcode,
                    offset,
                    data,
                } => Ev::P(opcode, offset, data.to_vec()),
                Event::End {
                    opcode,
                    message_end,
                    ..
                } => Ev::E(opcode, message_end),
            });
            Flow::Continue
        })?;
        Ok(evs)
    }

    /// Reassembles payloads per frame from events (merging Payload pieces).
    fn frames(evs: &[Ev]) -> Vec<(u8, bool, Vec<u8>)> {
        let mut out = Vec::new();
        let mut cur: Option<(u8, bool, Vec<u8>)> = None;
        for e in evs {
            match e {
                Ev::H(fin, op, _) => cur = Some((*op, *fin, Vec::new())),
                Ev::P(_, off, d) => {
                    let c = cur.as_mut().unwrap();
                    assert_eq!(*off as usize, c.2.len());
                    c.2.extend_from_slice(d);
                }
                Ev::E(..) => out.push(cur.take().unwrap()),
            }
        }
        out
    }

    #[test]
    fn streaming_decode_any_split() {
        let mut rng = fastrand::Rng::with_seed(42);
        let payloads: Vec<Vec<u8>> = [0usize, 1, 5, 125, 126, 300, 65535, 65536, 70000]
            .iter()
            .map(|&n| (0..n).map(|_| rng.u8(..)).collect())
            .collect();
        let mut wire = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            let mask = [rng.u8(..), rng.u8(..), rng.u8(..), rng.u8(..)];
            encode_frame(&mut wire, true, op::BINARY, Some(mask), p);
            if i == 3 {
                encode_frame(&mut wire, true, op::PING, Some(mask), b"ping!");
            }
        }
        // Feed in chunks of several sizes, including one byte at a time.
        for chunk in [1usize, 2, 3, 13, 14, 1000, 1 << 20] {
            let mut d = Decoder::new(true);
            let mut evs = Vec::new();
            let mut data = wire.clone();
            for piece in data.chunks_mut(chunk) {
                evs.extend(collect(&mut d, piece).unwrap());
            }
            assert!(d.is_idle());
            let fr = frames(&evs);
            assert_eq!(fr.len(), payloads.len() + 1);
            let data_frames: Vec<_> = fr.iter().filter(|f| f.0 == op::BINARY).collect();
            for (got, want) in data_frames.iter().zip(&payloads) {
                assert_eq!(&got.2, want);
            }
            assert!(fr.iter().any(|f| f.0 == op::PING && f.2 == b"ping!"));
        }
    }

    #[test]
    fn decode_stop_resumes() {
        let mut wire = Vec::new();
        encode_frame(&mut wire, true, op::TEXT, None, b"one");
        encode_frame(&mut wire, true, op::CLOSE, None, &1000u16.to_be_bytes());
        encode_frame(&mut wire, true, op::TEXT, None, b"after");
        let mut d = Decoder::new(false);
        let mut seen = Vec::new();
        let n = d
            .feed(&mut wire.clone(), &mut |e| {
                if let Event::End { opcode, .. } = e {
                    seen.push(opcode);
                    if opcode == op::CLOSE {
                        return Flow::Stop;
                    }
                }
                Flow::Continue
            })
            .unwrap();
        assert_eq!(seen, vec![op::TEXT, op::CLOSE]);
        assert_eq!(&wire[n..], &wire[wire.len() - 7..]);
    }

    #[test]
    fn sixteen_mib_frame() {
        let payload: Vec<u8> = (0..16u32 << 20).map(|i| (i * 7) as u8).collect();
        let mut wire = Vec::new();
        encode_frame(&mut wire, true, op::BINARY, Some([9, 8, 7, 6]), &payload);
        let mut d = Decoder::new(true);
        let mut got = Vec::with_capacity(payload.len());
        let mut ends = 0;
        for piece in wire.chunks_mut(256 * 1024) {
            d.feed(piece, &mut |e| {
                match e {
                    Event::Payload { data, .. } => got.extend_from_slice(data),
                    Event::End { message_end, .. } => ends += message_end as usize,
                    _ => {}
                }
                Flow::Continue
            })
            .unwrap();
        }
        assert_eq!(ends, 1);
        assert!(got == payload);
    }

    #[test]
    fn pattern_words_match_the_byte_definition() {
        for seed in [0u64, 1, 0xdead_beef_0123_4567, u64::MAX] {
            for len in [0usize, 1, 7, 8, 9, 31, 32, 33, 4096, 4099, 2100 * 8 + 5] {
                let mut v = Vec::new();
                fill_pattern(&mut v, seed, len);
                let want: Vec<u8> = (0..len as u64).map(|i| pattern_byte(seed, i)).collect();
                assert_eq!(v, want, "seed {seed:#x} len {len}");
                for off in [0usize, 1, 3, 7, 8, 13] {
                    let off = off.min(len);
                    for end in [len, len.saturating_sub(1).max(off), (off + 9).min(len)] {
                        assert!(check_pattern(&v[off..end], seed, off as u64));
                        if end > off {
                            // Any one flipped bit anywhere in the slice is caught.
                            for pos in [off, (off + end) / 2, end - 1] {
                                let mut bad = v[off..end].to_vec();
                                bad[pos - off] ^= 0x10;
                                assert!(!check_pattern(&bad, seed, off as u64));
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn pattern_detects_mixups() {
        let a = pattern_seed(1, 0);
        let b = pattern_seed(1, 1);
        let mut pa = Vec::new();
        fill_pattern(&mut pa, a, 64);
        assert!(check_pattern(&pa, a, 0));
        assert!(check_pattern(&pa[10..], a, 10));
        assert!(!check_pattern(&pa, b, 0));
        assert!(!check_pattern(&pa[1..], a, 0));
        assert_ne!(pattern_seed(2, 0), a);
    }
}
