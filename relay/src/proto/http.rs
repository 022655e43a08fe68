//! HTTP/1.1 Upgrade handling (RFC 9110, RFC 9112, RFC 6455 §4).
//!
//! [`parse_upgrade`] reads a client's request head straight from the bytes received so far
//! and either asks for more, rejects it with the status a client should see, or returns the
//! routing facts plus the head rewritten for the origin (hop-by-hop headers dropped per
//! RFC 9110 §7.6.1, `X-Forwarded-For` / `X-Forwarded-Proto` / `Forwarded` added, any bytes
//! that followed the head appended unchanged). [`parse_answer`] does the same for the
//! origin's response.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use sha1::{Digest, Sha1};

const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const MAX_HEADERS: usize = 96;

/// The statuses relay answers with itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    BadRequest,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    UpgradeRequired,
    HeaderFieldsTooLarge,
    BadGateway,
    ServiceUnavailable,
    GatewayTimeout,
}

impl Status {
    pub fn code(self) -> u16 {
        match self {
            Status::BadRequest => 400,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::RequestTimeout => 408,
            Status::UpgradeRequired => 426,
            Status::HeaderFieldsTooLarge => 431,
            Status::BadGateway => 502,
            Status::ServiceUnavailable => 503,
            Status::GatewayTimeout => 504,
        }
    }

    pub fn text(self) -> &'static str {
        match self {
            Status::BadRequest => "Bad Request",
            Status::NotFound => "Not Found",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::RequestTimeout => "Request Timeout",
            Status::UpgradeRequired => "Upgrade Required",
            Status::HeaderFieldsTooLarge => "Request Header Fields Too Large",
            Status::BadGateway => "Bad Gateway",
            Status::ServiceUnavailable => "Service Unavailable",
            Status::GatewayTimeout => "Gateway Timeout",
        }
    }

    /// All statuses, for metrics labels.
    pub const ALL: [Status; 9] = [
        Status::BadRequest,
        Status::NotFound,
        Status::MethodNotAllowed,
        Status::RequestTimeout,
        Status::UpgradeRequired,
        Status::HeaderFieldsTooLarge,
        Status::BadGateway,
        Status::ServiceUnavailable,
        Status::GatewayTimeout,
    ];

    pub fn index(self) -> usize {
        Status::ALL.iter().position(|s| *s == self).unwrap_or(0)
    }
}

/// A refused request: the status and a short reason for the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reject {
    pub status: Status,
    pub reason: &'static str,
}

const fn reject(status: Status, reason: &'static str) -> Reject {
    Reject { status, reason }
}

/// The full HTTP answer for a refusal: status line, `Connection: close`, a plain-text body
/// with the reason, and the extra headers the status calls for.
pub fn error_response(r: Reject) -> Vec<u8> {
    let body = format!("{} {}: {}\n", r.status.code(), r.status.text(), r.reason);
    let mut out = String::with_capacity(160 + body.len());
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\nServer: relay\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
        r.status.code(),
        r.status.text(),
        body.len()
    );
    match r.status {
        Status::UpgradeRequired => {
            out.push_str("Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n");
        }
        Status::MethodNotAllowed => out.push_str("Allow: GET\r\n"),
        Status::ServiceUnavailable => out.push_str("Retry-After: 1\r\n"),
        _ => {}
    }
    out.push_str("\r\n");
    out.push_str(&body);
    out.into_bytes()
}

/// `Sec-WebSocket-Accept` for a key (RFC 6455 §4.2.2).
pub fn accept_key(key: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(key);
    h.update(WS_GUID.as_bytes());
    B64.encode(h.finalize())
}

/// What a valid upgrade request tells relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// Lower-case host from the `Host` header, without port.
    pub host: String,
    pub path: String,
    /// The `Sec-WebSocket-Accept` a correct origin must answer with.
    pub accept: String,
    /// The head rewritten for the origin, followed by any bytes that came after the head.
    pub origin_head: Vec<u8>,
    /// How many bytes came after the head (client data relayed with the head).
    pub early: usize,
}

/// How the connection reached relay, for the forwarding headers.
#[derive(Debug, Clone, Copy)]
pub struct Forwarding {
    pub peer: SocketAddr,
    /// `"http"` or `"https"`.
    pub proto: &'static str,
}

fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

fn is_hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

/// `Host` without port, lower-cased; `None` if it is not a plausible authority.
fn host_of(v: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(v).ok()?.trim();
    if s.is_empty()
        || s.bytes()
            .any(|b| b <= b' ' || b == b'/' || b == b'@' || b >= 0x7f)
    {
        return None;
    }
    let host = if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']')?;
        let after = &rest[end + 1..];
        if !(after.is_empty()
            || (after.starts_with(':') && after[1..].bytes().all(|b| b.is_ascii_digit())))
        {
            return None;
        }
        &s[..end + 2]
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            Some(_) => return None,
            None => s,
        }
    };
    if host.is_empty() {
        return None;
    }
    Some(host.to_ascii_lowercase())
}

fn quote_if_needed(v: &str) -> String {
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if !v.is_empty() && v.chars().all(tchar) {
        v.to_string()
    } else {
        format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// Parses and validates a client's upgrade request from `buf` (all bytes received so far).
///
/// `Ok(None)`: the head is not complete yet (and still within `max_head` bytes).
pub fn parse_upgrade(
    buf: &[u8],
    max_head: usize,
    fwd: Forwarding,
) -> Result<Option<Upgrade>, Reject> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() >= max_head {
                return Err(reject(
                    Status::HeaderFieldsTooLarge,
                    "request head is larger than the limit",
                ));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(reject(
                Status::HeaderFieldsTooLarge,
                "too many header fields",
            ))
        }
        Err(httparse::Error::Version) => {
            return Err(reject(Status::BadRequest, "malformed HTTP version"))
        }
        Err(_) => return Err(reject(Status::BadRequest, "malformed request head")),
    };
    if head_len > max_head {
        return Err(reject(
            Status::HeaderFieldsTooLarge,
            "request head is larger than the limit",
        ));
    }
    let method = req.method.unwrap_or("");
    let path = req.path.unwrap_or("");
    if method != "GET" {
        return Err(reject(
            Status::MethodNotAllowed,
            "a WebSocket upgrade must use GET",
        ));
    }
    if req.version != Some(1) {
        return Err(reject(
            Status::UpgradeRequired,
            "a WebSocket upgrade needs HTTP/1.1",
        ));
    }
    if !path.starts_with('/') {
        return Err(reject(
            Status::BadRequest,
            "request target must be an absolute path",
        ));
    }

    let mut host = None;
    let mut key = None;
    let mut version_ok = false;
    let mut version_seen = false;
    let mut upgrade_ok = false;
    let mut connection_upgrade = false;
    let mut connection_named: Vec<&[u8]> = Vec::new();
    for h in req.headers.iter() {
        let n = h.name;
        if n.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Err(reject(Status::BadRequest, "more than one Host header"));
            }
            host =
                Some(host_of(h.value).ok_or(reject(Status::BadRequest, "malformed Host header"))?);
        } else if n.eq_ignore_ascii_case("upgrade") {
            upgrade_ok |= has_token(h.value, "websocket");
        } else if n.eq_ignore_ascii_case("connection") {
            connection_upgrade |= has_token(h.value, "upgrade");
            connection_named.extend(h.value.split(|b| *b == b',').map(|t| t.trim_ascii()));
        } else if n.eq_ignore_ascii_case("sec-websocket-version") {
            version_seen = true;
            version_ok = h.value.trim_ascii() == b"13";
        } else if n.eq_ignore_ascii_case("sec-websocket-key") {
            if key.is_some() {
                return Err(reject(
                    Status::BadRequest,
                    "more than one Sec-WebSocket-Key header",
                ));
            }
            key = Some(h.value.trim_ascii());
        } else if n.eq_ignore_ascii_case("transfer-encoding") {
            return Err(reject(
                Status::BadRequest,
                "a WebSocket upgrade has no request body (Transfer-Encoding)",
            ));
        } else if n.eq_ignore_ascii_case("content-length") && h.value.trim_ascii() != b"0" {
            return Err(reject(
                Status::BadRequest,
                "a WebSocket upgrade has no request body (Content-Length)",
            ));
        }
    }
    let host = host.ok_or(reject(Status::BadRequest, "missing Host header"))?;
    if !upgrade_ok {
        return Err(reject(
            Status::UpgradeRequired,
            "not a WebSocket upgrade (no Upgrade: websocket)",
        ));
    }
    if !connection_upgrade {
        return Err(reject(
            Status::UpgradeRequired,
            "not a WebSocket upgrade (no Connection: upgrade)",
        ));
    }
    if !version_seen || !version_ok {
        return Err(reject(
            Status::UpgradeRequired,
            "unsupported Sec-WebSocket-Version (relay speaks 13)",
        ));
    }
    let key = key.ok_or(reject(Status::BadRequest, "missing Sec-WebSocket-Key"))?;
    match B64.decode(key) {
        Ok(k) if k.len() == 16 => {}
        _ => {
            return Err(reject(
                Status::BadRequest,
                "Sec-WebSocket-Key is not 16 bytes in base64",
            ))
        }
    }
    let accept = accept_key(key);

    // The head for the origin.
    let mut out = Vec::with_capacity(head_len + 192 + (buf.len() - head_len));
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut xff: Option<&[u8]> = None;
    let mut forwarded: Option<&[u8]> = None;
    for h in req.headers.iter() {
        let n = h.name;
        if is_hop_by_hop(n)
            || connection_named
                .iter()
                .any(|c| c.eq_ignore_ascii_case(n.as_bytes()))
            || n.eq_ignore_ascii_case("x-forwarded-proto")
        {
            continue;
        }
        if n.eq_ignore_ascii_case("x-forwarded-for") {
            xff = Some(h.value);
            continue;
        }
        if n.eq_ignore_ascii_case("forwarded") {
            forwarded = Some(h.value);
            continue;
        }
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    let ip = fwd.peer.ip();
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    let mut tail = String::with_capacity(192);
    tail.push_str("Connection: Upgrade\r\nUpgrade: websocket\r\nX-Forwarded-For: ");
    if let Some(prev) = xff {
        tail.push_str(&String::from_utf8_lossy(prev));
        tail.push_str(", ");
    }
    let _ = write!(
        tail,
        "{ip}\r\nX-Forwarded-Proto: {}\r\nForwarded: ",
        fwd.proto
    );
    if let Some(prev) = forwarded {
        tail.push_str(&String::from_utf8_lossy(prev));
        tail.push_str(", ");
    }
    let for_value = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    let host_header = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("host"))
        .map(|h| String::from_utf8_lossy(h.value.trim_ascii()).into_owned())
        .unwrap_or_default();
    let _ = write!(
        tail,
        "for={for_value};proto={};host={}\r\n\r\n",
        fwd.proto,
        quote_if_needed(&host_header)
    );
    out.extend_from_slice(tail.as_bytes());
    out.extend_from_slice(&buf[head_len..]);

    Ok(Some(Upgrade {
        host,
        path: path.to_string(),
        accept,
        origin_head: out,
        early: buf.len() - head_len,
    }))
}

/// A complete plain `GET` (no upgrade): its lower-case host (no port) and path, for pages
/// relay serves itself. `None` for anything else.
pub fn plain_get(buf: &[u8]) -> Option<(String, String)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return None,
    }
    if req.method != Some("GET") {
        return None;
    }
    let path = req.path.filter(|p| p.starts_with('/'))?.to_string();
    let mut hosts = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    let host = host_of(hosts.next()?.value)?;
    if hosts.next().is_some() {
        return None;
    }
    Some((host, path))
}

/// A `200 OK` page relay serves itself, closed after the body.
pub fn page_response(content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nServer: relay\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// The `101` relay answers itself for an edge app.
pub fn switching_response(accept: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

/// What the origin answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A valid `101 Switching Protocols` for this key.
    Switching,
    /// Any other final status: passed to the client as it came, body included.
    Other {
        status: u16,
        /// Body length when the answer says (`Content-Length`); `None` = until the origin closes.
        body_len: Option<u64>,
    },
}

/// The origin's answer head: what it is and how many bytes the head spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerHead {
    pub answer: Answer,
    pub head_len: usize,
}

/// Parses the origin's answer from `buf`, checking a `101` against `accept`.
pub fn parse_answer(
    buf: &[u8],
    max_head: usize,
    accept: &str,
) -> Result<Option<AnswerHead>, Reject> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    let head_len = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() >= max_head {
                return Err(reject(
                    Status::BadGateway,
                    "origin answer head is larger than the limit",
                ));
            }
            return Ok(None);
        }
        Err(_) => return Err(reject(Status::BadGateway, "origin sent a malformed answer")),
    };
    if head_len > max_head {
        return Err(reject(
            Status::BadGateway,
            "origin answer head is larger than the limit",
        ));
    }
    let code = res.code.unwrap_or(0);
    if code == 101 {
        let mut upgrade = false;
        let mut connection = false;
        let mut accept_ok = false;
        for h in res.headers.iter() {
            if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade |= has_token(h.value, "websocket");
            } else if h.name.eq_ignore_ascii_case("connection") {
                connection |= has_token(h.value, "upgrade");
            } else if h.name.eq_ignore_ascii_case("sec-websocket-accept") {
                accept_ok = h.value.trim_ascii() == accept.as_bytes();
            }
        }
        if !upgrade || !connection {
            return Err(reject(
                Status::BadGateway,
                "origin answered 101 without Upgrade: websocket",
            ));
        }
        if !accept_ok {
            return Err(reject(
                Status::BadGateway,
                "origin answered 101 with a wrong Sec-WebSocket-Accept",
            ));
        }
        return Ok(Some(AnswerHead {
            answer: Answer::Switching,
            head_len,
        }));
    }
    if code < 200 {
        return Err(reject(
            Status::BadGateway,
            "origin sent an unexpected interim answer",
        ));
    }
    let mut body_len = None;
    let mut chunked = false;
    for h in res.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok());
            match (v, body_len) {
                (Some(n), None) => body_len = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => {
                    return Err(reject(
                        Status::BadGateway,
                        "origin sent an invalid Content-Length",
                    ))
                }
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = true;
        }
    }
    if chunked || code == 204 || code == 304 {
        body_len = if chunked { None } else { Some(0) };
    }
    Ok(Some(AnswerHead {
        answer: Answer::Other {
            status: code,
            body_len,
        },
        head_len,
    }))
}

#[cfg(test)]
mod tests;
