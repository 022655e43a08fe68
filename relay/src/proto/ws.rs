//! RFC 6455 WebSocket frames, server side, sans-IO: no sockets, no clock.
//!
//! This module owns the frame codec of the edge apps and of any frame-aware session:
//!
//! - [`Decoder`] reads *client* frames from whatever chunks the socket delivered (a frame may
//!   span several receive buffers, and one buffer may hold many frames) and yields [`Event`]s:
//!   whole messages or streamed fragments (see [`Delivery`]), pings, pongs and the close frame.
//!   Every rule a client can break ends in one [`ProtocolError`] that names the close code to
//!   answer with (1002, 1007 or 1009).
//! - [`FrameHeader`], [`ControlFrame`] and [`write_message`] write *server* frames (never
//!   masked): a data header on the stack so a payload can be sent as a second iovec without a
//!   copy, or a whole frame into a `Vec`.
//! - [`CloseCode`] names the close codes and knows which ones may appear on the wire (§7.4).
//!
//! What always holds:
//!
//! - The decoder never panics and never reads past the slice it is given, whatever the bytes.
//! - Decoding is chunking-invariant: for a given byte stream the [`Delivery::Messages`] events
//!   (and the error, if any) are the same whatever the split into chunks; with
//!   [`Delivery::Fragments`] the concatenated payload of each message is. The fuzz targets in
//!   `relay/fuzz/` check both.
//! - The decoder holds no payload bytes between calls unless a message (or a control frame) is
//!   still incomplete: a delivered message is dropped at the next call unless the caller took
//!   it ([`Message::take`]). Its own state is at most 64 bytes (a unit test checks).
//! - After a [`ProtocolError`] the decoder is spent: every later call returns the same error.
//!   After a close frame it ignores whatever else the client sends (§5.5.1).
//! - Payload bytes handed out are unmasked; text payload handed out is valid UTF-8 so far
//!   (a code point split across fragments or chunks is carried, up to 3 bytes, until it ends).
//!
//! No extension is ever negotiated, so any RSV bit set is a protocol error.

use std::fmt;

/// Largest payload of a control frame (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Longest header of a server frame: 2 bytes + an 8-byte length, no mask.
pub const MAX_SERVER_HEADER: usize = 10;

/// Default message-size limit: 16 MiB, the largest message of the Autobahn TestSuite (9.x).
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 16 << 20;

// ---------------------------------------------------------------------------------------
// Close codes

/// A close status code (RFC 6455 §7.4).
///
/// Any `u16` can be held (a local reason such as [`CloseCode::ABNORMAL`] included); only the
/// codes for which [`CloseCode::is_valid_on_wire`] holds may travel in a close frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CloseCode(u16);

impl CloseCode {
    /// 1000: the purpose of the connection is fulfilled.
    pub const NORMAL: CloseCode = CloseCode(1000);
    /// 1001: the endpoint is going away (server shutdown, page navigated away).
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    /// 1002: the peer broke the protocol.
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    /// 1003: a data type the endpoint cannot accept (e.g. binary to a text-only app).
    pub const UNSUPPORTED_DATA: CloseCode = CloseCode(1003);
    /// 1005: no status code was present. Local only, never sent.
    pub const NO_STATUS: CloseCode = CloseCode(1005);
    /// 1006: the connection ended without a close frame. Local only, never sent.
    pub const ABNORMAL: CloseCode = CloseCode(1006);
    /// 1007: message data inconsistent with its type (text that is not UTF-8).
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    /// 1008: the message violates the endpoint's policy (e.g. a room member too slow).
    pub const POLICY_VIOLATION: CloseCode = CloseCode(1008);
    /// 1009: a message too big to process.
    pub const MESSAGE_TOO_BIG: CloseCode = CloseCode(1009);
    /// 1010: the client expected an extension the server did not negotiate.
    pub const MANDATORY_EXTENSION: CloseCode = CloseCode(1010);
    /// 1011: the server met an unexpected condition.
    pub const INTERNAL_ERROR: CloseCode = CloseCode(1011);
    /// 1012: the service is restarting (IANA registry).
    pub const SERVICE_RESTART: CloseCode = CloseCode(1012);
    /// 1013: try again later (IANA registry).
    pub const TRY_AGAIN_LATER: CloseCode = CloseCode(1013);
    /// 1014: the gateway got a bad answer upstream (IANA registry).
    pub const BAD_GATEWAY: CloseCode = CloseCode(1014);
    /// 1015: the TLS handshake failed. Local only, never sent.
    pub const TLS_HANDSHAKE: CloseCode = CloseCode(1015);

    /// Any code, for local use (e.g. reporting 1006 for a dropped connection).
    pub const fn new(code: u16) -> CloseCode {
        CloseCode(code)
    }

    /// The code read from a close frame, if that code may appear on the wire.
    pub const fn from_wire(code: u16) -> Option<CloseCode> {
        let c = CloseCode(code);
        if c.is_valid_on_wire() {
            Some(c)
        } else {
            None
        }
    }

    pub const fn as_u16(self) -> u16 {
        self.0
    }

    /// Whether a close frame may carry this code (§7.4.1, §7.4.2): 1000–1003, 1007–1014 and
    /// 3000–4999. 1004 is reserved, 1005/1006/1015 are local-only, 1016–2999 are reserved for
    /// future protocol use, and anything below 1000 or from 5000 up is not a code at all.
    /// 1012–1014 were registered with IANA after RFC 6455 and are accepted as most peers do.
    pub const fn is_valid_on_wire(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }

    /// The registry name of a code defined by RFC 6455 or IANA.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            1000 => "normal closure",
            1001 => "going away",
            1002 => "protocol error",
            1003 => "unsupported data",
            1005 => "no status received",
            1006 => "abnormal closure",
            1007 => "invalid frame payload data",
            1008 => "policy violation",
            1009 => "message too big",
            1010 => "mandatory extension",
            1011 => "internal error",
            1012 => "service restart",
            1013 => "try again later",
            1014 => "bad gateway",
            1015 => "TLS handshake",
            _ => return None,
        })
    }
}

impl From<CloseCode> for u16 {
    fn from(c: CloseCode) -> u16 {
        c.0
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{} ({name})", self.0),
            None => write!(f, "{}", self.0),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Opcodes and errors

/// The opcodes RFC 6455 defines (§5.2); the others are reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum OpCode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl OpCode {
    /// The opcode of a defined frame type, `None` for a reserved one.
    pub const fn from_u8(op: u8) -> Option<OpCode> {
        Some(match op {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    pub const fn is_control(self) -> bool {
        self as u8 & 0x8 != 0
    }
}

/// What a data message carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataKind {
    Text,
    Binary,
}

impl DataKind {
    pub const fn opcode(self) -> OpCode {
        match self {
            DataKind::Text => OpCode::Text,
            DataKind::Binary => OpCode::Binary,
        }
    }
}

/// A rule the client broke. The connection is over: answer with
/// [`ProtocolError::close_frame`] (its [`close_code`](ProtocolError::close_code) and a short
/// reason), then close the socket.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    /// The client sent a frame without a masking key (§5.1): 1002.
    UnmaskedFrame,
    /// The client set RSV1, RSV2 or RSV3 although no extension was negotiated (§5.2): 1002.
    ReservedBits,
    /// The client used a reserved opcode, 0x3–0x7 or 0xB–0xF (§5.2): 1002.
    ReservedOpcode(u8),
    /// The client sent a control frame with a payload over 125 bytes (§5.5): 1002.
    ControlFrameTooLong,
    /// The client sent a control frame without FIN (§5.5): 1002.
    FragmentedControlFrame,
    /// The client sent a continuation frame with no fragmented message open (§5.4): 1002.
    UnexpectedContinuation,
    /// The client began a new text or binary message before finishing the open one (§5.4): 1002.
    ExpectedContinuation,
    /// The client sent a 64-bit payload length with its most significant bit set (§5.2): 1002.
    LengthOverflow,
    /// The client sent a close frame whose payload is a single byte (§5.5.1): 1002.
    TruncatedClosePayload,
    /// The client sent a close code that may not appear on the wire (§7.4): 1002.
    InvalidCloseCode(u16),
    /// The client sent a text message that is not valid UTF-8 (§8.1): 1007.
    InvalidUtf8,
    /// The client sent a close reason that is not valid UTF-8 (§5.5.1): 1007.
    InvalidCloseReason,
    /// The client sent (or announced, in a frame header) a message over the configured
    /// maximum size: 1009.
    MessageTooBig,
}

impl ProtocolError {
    /// Every kind of error, one value each, for counters.
    pub const ALL: [ProtocolError; 13] = [
        ProtocolError::UnmaskedFrame,
        ProtocolError::ReservedBits,
        ProtocolError::ReservedOpcode(0),
        ProtocolError::ControlFrameTooLong,
        ProtocolError::FragmentedControlFrame,
        ProtocolError::UnexpectedContinuation,
        ProtocolError::ExpectedContinuation,
        ProtocolError::LengthOverflow,
        ProtocolError::TruncatedClosePayload,
        ProtocolError::InvalidCloseCode(0),
        ProtocolError::InvalidUtf8,
        ProtocolError::InvalidCloseReason,
        ProtocolError::MessageTooBig,
    ];

    /// The close code to answer with.
    pub const fn close_code(self) -> CloseCode {
        match self {
            ProtocolError::InvalidUtf8 | ProtocolError::InvalidCloseReason => {
                CloseCode::INVALID_PAYLOAD
            }
            ProtocolError::MessageTooBig => CloseCode::MESSAGE_TOO_BIG,
            _ => CloseCode::PROTOCOL_ERROR,
        }
    }

    /// A short reason, fit for a close frame and a metrics label.
    pub const fn reason(self) -> &'static str {
        match self {
            ProtocolError::UnmaskedFrame => "unmasked client frame",
            ProtocolError::ReservedBits => "reserved bits set",
            ProtocolError::ReservedOpcode(_) => "reserved opcode",
            ProtocolError::ControlFrameTooLong => "control frame over 125 bytes",
            ProtocolError::FragmentedControlFrame => "fragmented control frame",
            ProtocolError::UnexpectedContinuation => "continuation without a message",
            ProtocolError::ExpectedContinuation => "new message inside a fragmented one",
            ProtocolError::LengthOverflow => "payload length over 2^63",
            ProtocolError::TruncatedClosePayload => "close payload of one byte",
            ProtocolError::InvalidCloseCode(_) => "invalid close code",
            ProtocolError::InvalidUtf8 => "text is not UTF-8",
            ProtocolError::InvalidCloseReason => "close reason is not UTF-8",
            ProtocolError::MessageTooBig => "message too big",
        }
    }

    /// Position in [`ProtocolError::ALL`], for per-reason counters.
    pub const fn index(self) -> usize {
        match self {
            ProtocolError::UnmaskedFrame => 0,
            ProtocolError::ReservedBits => 1,
            ProtocolError::ReservedOpcode(_) => 2,
            ProtocolError::ControlFrameTooLong => 3,
            ProtocolError::FragmentedControlFrame => 4,
            ProtocolError::UnexpectedContinuation => 5,
            ProtocolError::ExpectedContinuation => 6,
            ProtocolError::LengthOverflow => 7,
            ProtocolError::TruncatedClosePayload => 8,
            ProtocolError::InvalidCloseCode(_) => 9,
            ProtocolError::InvalidUtf8 => 10,
            ProtocolError::InvalidCloseReason => 11,
            ProtocolError::MessageTooBig => 12,
        }
    }

    /// The close frame to send the client before closing the socket.
    pub fn close_frame(self) -> ControlFrame {
        ControlFrame::close(self.close_code(), self.reason())
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::ReservedOpcode(op) => write!(f, "reserved opcode {op:#x}")?,
            ProtocolError::InvalidCloseCode(c) => write!(f, "invalid close code {c}")?,
            e => f.write_str(e.reason())?,
        }
        write!(f, " (close {})", self.close_code().as_u16())
    }
}

impl std::error::Error for ProtocolError {}

// ---------------------------------------------------------------------------------------
// Events

/// How the decoder hands out data messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Whole messages, assembled across frames and chunks in a buffer the decoder owns
    /// (bounded by the maximum message size): [`Event::Message`]. What apps want.
    Messages,
    /// Payload as it arrives, one [`Event::Fragment`] per frame piece found in a chunk; no
    /// payload is kept between calls. For streaming large messages through.
    Fragments,
}

/// Decoder settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecoderConfig {
    /// Largest message accepted, in payload bytes summed over its fragments; a frame whose
    /// header would go over it is refused at once with [`ProtocolError::MessageTooBig`].
    pub max_message_size: u64,
    pub delivery: Delivery,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        DecoderConfig {
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            delivery: Delivery::Messages,
        }
    }
}

/// The unmasked payload of a ping or pong (at most 125 bytes), held by value so that it
/// borrows nothing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ControlPayload {
    len: u8,
    bytes: [u8; MAX_CONTROL_PAYLOAD],
}

impl ControlPayload {
    fn from_slice(s: &[u8]) -> ControlPayload {
        let len = s.len().min(MAX_CONTROL_PAYLOAD);
        let mut bytes = [0; MAX_CONTROL_PAYLOAD];
        bytes[..len].copy_from_slice(&s[..len]);
        ControlPayload {
            len: len as u8,
            bytes,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// The pong that answers a ping with this payload (§5.5.3).
    pub fn pong(&self) -> ControlFrame {
        ControlFrame::control(OpCode::Pong, self.as_bytes())
    }
}

impl fmt::Debug for ControlPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_bytes())
    }
}

/// A validated close frame from the client: a code allowed on the wire (or none) and a UTF-8
/// reason.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CloseFrame {
    code: Option<CloseCode>,
    payload: ControlPayload,
}

impl CloseFrame {
    /// The code, `None` for an empty close frame (which means [`CloseCode::NO_STATUS`]).
    pub fn code(&self) -> Option<CloseCode> {
        self.code
    }

    pub fn reason(&self) -> &str {
        let b = self.payload.as_bytes();
        // Validated when the frame was read; never falls back.
        simdutf8::basic::from_utf8(b.get(2..).unwrap_or_default()).unwrap_or_default()
    }

    /// The close frame that answers this one (§5.5.1): the same code, no reason; an empty
    /// close for an empty one.
    pub fn reply(&self) -> ControlFrame {
        match self.code {
            Some(code) => ControlFrame::close(code, ""),
            None => ControlFrame::close_empty(),
        }
    }
}

impl fmt::Debug for CloseFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloseFrame")
            .field("code", &self.code.map(CloseCode::as_u16))
            .field("reason", &self.reason())
            .finish()
    }
}

/// A whole data message, unmasked, in the decoder's buffer. Dropped at the next
/// [`Decoder::decode`] call unless [`taken`](Message::take).
#[derive(Debug)]
pub struct Message<'d> {
    kind: DataKind,
    payload: &'d mut Vec<u8>,
}

impl<'d> Message<'d> {
    pub fn kind(&self) -> DataKind {
        self.kind
    }

    pub fn payload(&self) -> &[u8] {
        self.payload
    }

    /// The text of a text message (validated UTF-8); `None` for a binary one.
    pub fn text(&self) -> Option<&str> {
        match self.kind {
            DataKind::Text => simdutf8::basic::from_utf8(self.payload).ok(),
            DataKind::Binary => None,
        }
    }

    /// Takes the payload without copying, e.g. to send it back as the second iovec.
    pub fn take(self) -> Vec<u8> {
        std::mem::take(self.payload)
    }
}

/// A piece of a data message's payload, unmasked, as it arrived ([`Delivery::Fragments`]).
/// Pieces do not follow frame boundaries: a frame split across chunks comes in several pieces.
/// A text piece may end inside a code point; the bytes so far are valid UTF-8 up to there.
#[derive(Debug)]
pub struct Fragment<'d> {
    pub kind: DataKind,
    pub payload: &'d [u8],
    /// This piece ends the message.
    pub fin: bool,
}

/// What the client sent.
#[derive(Debug)]
pub enum Event<'d> {
    /// A whole text or binary message ([`Delivery::Messages`]).
    Message(Message<'d>),
    /// A piece of a text or binary message ([`Delivery::Fragments`]).
    Fragment(Fragment<'d>),
    /// Answer with [`ControlPayload::pong`].
    Ping(ControlPayload),
    Pong(ControlPayload),
    /// The client closes: answer with [`CloseFrame::reply`] (unless a close was already
    /// sent), then close the socket. The decoder ignores whatever follows.
    Close(CloseFrame),
}

/// One step of [`Decoder::decode`]: how many bytes of the input it used, and the event they
/// completed. `event` is `None` only when the whole input was used.
#[derive(Debug)]
pub struct Decoded<'d> {
    pub consumed: usize,
    pub event: Option<Event<'d>>,
}

// ---------------------------------------------------------------------------------------
// Decoder

/// Where the decoder is in the byte stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Next byte: FIN, RSV, opcode.
    Head,
    /// Next byte: MASK bit and 7-bit length.
    Len,
    /// Next byte is one of the extended length's; this many remain.
    ExtLen(u8),
    /// Next byte is masking-key byte number `.0`.
    Mask(u8),
    /// `remaining` payload bytes of the current frame follow.
    Payload,
    /// A close frame was read; everything after it is ignored.
    Closed,
    /// A rule was broken; the decoder is spent.
    Failed(ProtocolError),
}

/// A message-in-progress's UTF-8 state: up to 3 bytes of a code point whose end has not
/// arrived yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Utf8Carry {
    bytes: [u8; 3],
    len: u8,
}

impl Utf8Carry {
    /// Validates the next bytes of a text message. `false`: not UTF-8.
    fn feed(&mut self, mut bytes: &[u8]) -> bool {
        if self.len > 0 {
            // Finish (or extend) the code point carried over, then go on after it.
            let have = self.len as usize;
            let mut cp = [0u8; 4];
            cp[..have].copy_from_slice(&self.bytes[..have]);
            let need: usize = match cp[0] {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                _ => 4,
            };
            let take = need.saturating_sub(have).min(bytes.len());
            cp[have..have + take].copy_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            match simdutf8::compat::from_utf8(&cp[..have + take]) {
                Ok(_) => self.len = 0,
                Err(e) if e.error_len().is_none() => {
                    // Still incomplete: every byte of the chunk went into it.
                    self.bytes[..have + take].copy_from_slice(&cp[..have + take]);
                    self.len = (have + take) as u8;
                    return true;
                }
                Err(_) => return false,
            }
        }
        match simdutf8::compat::from_utf8(bytes) {
            Ok(_) => true,
            Err(e) => match e.error_len() {
                Some(_) => false,
                None => {
                    let rest = &bytes[e.valid_up_to()..];
                    // An incomplete sequence is at most 3 bytes long.
                    let n = rest.len().min(3);
                    self.bytes[..n].copy_from_slice(&rest[..n]);
                    self.len = n as u8;
                    true
                }
            },
        }
    }

    /// Whether the text so far ends on a code-point boundary.
    fn is_complete(&self) -> bool {
        self.len == 0
    }
}

const FIN: u8 = 0x80;
/// `flags`: data is delivered as whole messages.
const ASSEMBLE: u8 = 1;
/// `flags`: `buf` holds a delivered message or piece, to drop at the next call.
const STALE: u8 = 2;

/// What a step produced, before it is turned into an [`Event`] that borrows the decoder.
enum Ready {
    Message(DataKind),
    Fragment(DataKind, bool),
    Ping(ControlPayload),
    Pong(ControlPayload),
    Close(CloseFrame),
}

/// Server-side decoder of client frames. See the module documentation for what it
/// guarantees; [`Decoder::decode`] for how to drive it.
#[derive(Debug)]
pub struct Decoder {
    /// The message being assembled ([`Delivery::Messages`]) or the piece just delivered
    /// ([`Delivery::Fragments`]), followed by the first `control_len` bytes of a control
    /// frame split across chunks. Empty with no allocation otherwise.
    buf: Vec<u8>,
    /// Payload bytes of the current frame not yet read; during `ExtLen`, the length so far.
    remaining: u64,
    /// Payload bytes of the current data message so far, all frames included.
    message_len: u64,
    max_message: u64,
    /// Masking key, rotated so that `mask[0]` applies to the next payload byte.
    mask: [u8; 4],
    utf8: Utf8Carry,
    step: Step,
    /// First header byte of the current frame: FIN and opcode (RSV bits are never set).
    frame: u8,
    /// The kind of the data message in progress, if one is open.
    message: Option<DataKind>,
    /// Bytes at the end of `buf` that belong to a control frame split across chunks.
    control_len: u8,
    flags: u8,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(DecoderConfig::default())
    }
}

impl Decoder {
    pub fn new(config: DecoderConfig) -> Decoder {
        Decoder {
            buf: Vec::new(),
            remaining: 0,
            message_len: 0,
            max_message: config.max_message_size,
            mask: [0; 4],
            utf8: Utf8Carry::default(),
            step: Step::Head,
            frame: 0,
            message: None,
            control_len: 0,
            flags: match config.delivery {
                Delivery::Messages => ASSEMBLE,
                Delivery::Fragments => 0,
            },
        }
    }

    /// Reads frames from `input`, the next bytes the client sent, up to the first event.
    ///
    /// Call it again with the rest (`&input[consumed..]`) until it returns no event: that
    /// happens only once the whole input is used, and that last call also drops the buffer of
    /// a message the caller did not take. Bytes of an incomplete frame are kept as needed
    /// (headers are parsed byte by byte, so nothing has to be re-sent). [`Decoder::feed`]
    /// runs this loop with a callback.
    ///
    /// On `Err` the connection is over: send [`ProtocolError::close_frame`] and close.
    pub fn decode<'d>(&'d mut self, input: &[u8]) -> Result<Decoded<'d>, ProtocolError> {
        if self.flags & STALE != 0 {
            self.flags &= !STALE;
            // Give the memory back: an idle connection holds no buffer.
            self.buf = Vec::new();
        }
        let mut pos = 0;
        let ready = loop {
            match self.step {
                Step::Failed(e) => return Err(e),
                Step::Closed => {
                    return Ok(Decoded {
                        consumed: input.len(),
                        event: None,
                    })
                }
                Step::Payload => {
                    let avail = &input[pos..];
                    let n = self.remaining.min(avail.len() as u64) as usize;
                    let chunk = &avail[..n];
                    pos += n;
                    let done = if self.frame & 0x08 != 0 {
                        self.control_payload(chunk)
                    } else {
                        self.data_payload(chunk)
                    };
                    match done {
                        Err(e) => return Err(self.fail(e)),
                        Ok(Some(ready)) => break ready,
                        Ok(None) if self.remaining > 0 => {
                            // Every byte was used; the frame goes on in the next chunk.
                            return Ok(Decoded {
                                consumed: pos,
                                event: None,
                            });
                        }
                        Ok(None) => {}
                    }
                }
                _ => {
                    let Some(&b) = input.get(pos) else {
                        return Ok(Decoded {
                            consumed: pos,
                            event: None,
                        });
                    };
                    pos += 1;
                    if let Err(e) = self.header_byte(b) {
                        return Err(self.fail(e));
                    }
                }
            }
        };
        let event = match ready {
            Ready::Message(kind) => Event::Message(Message {
                kind,
                payload: &mut self.buf,
            }),
            Ready::Fragment(kind, fin) => Event::Fragment(Fragment {
                kind,
                payload: &self.buf,
                fin,
            }),
            Ready::Ping(p) => Event::Ping(p),
            Ready::Pong(p) => Event::Pong(p),
            Ready::Close(c) => Event::Close(c),
        };
        Ok(Decoded {
            consumed: pos,
            event: Some(event),
        })
    }

    /// Reads all of `input`, calling `on_event` for each event in order.
    pub fn feed(
        &mut self,
        mut input: &[u8],
        mut on_event: impl FnMut(Event<'_>),
    ) -> Result<(), ProtocolError> {
        loop {
            let d = self.decode(input)?;
            input = &input[d.consumed..];
            match d.event {
                Some(event) => on_event(event),
                None => return Ok(()),
            }
        }
    }

    /// Whether a data message is open (some of its frames or bytes have arrived, not its end).
    pub fn in_message(&self) -> bool {
        self.message.is_some()
    }

    /// Whether the client's close frame was read.
    pub fn is_closed(&self) -> bool {
        self.step == Step::Closed
    }

    /// The error the decoder stopped at, if any.
    pub fn error(&self) -> Option<ProtocolError> {
        match self.step {
            Step::Failed(e) => Some(e),
            _ => None,
        }
    }

    /// Bytes of payload the decoder holds on the heap (capacity of its buffer).
    pub fn buffered_capacity(&self) -> usize {
        self.buf.capacity()
    }

    fn fail(&mut self, e: ProtocolError) -> ProtocolError {
        self.step = Step::Failed(e);
        self.buf = Vec::new();
        self.control_len = 0;
        e
    }

    fn is_control(&self) -> bool {
        self.frame & 0x08 != 0
    }

    fn header_byte(&mut self, b: u8) -> Result<(), ProtocolError> {
        match self.step {
            Step::Head => {
                if b & 0x70 != 0 {
                    return Err(ProtocolError::ReservedBits);
                }
                let op = b & 0x0F;
                match OpCode::from_u8(op) {
                    None => return Err(ProtocolError::ReservedOpcode(op)),
                    Some(OpCode::Continuation) if self.message.is_none() => {
                        return Err(ProtocolError::UnexpectedContinuation)
                    }
                    Some(OpCode::Text | OpCode::Binary) if self.message.is_some() => {
                        return Err(ProtocolError::ExpectedContinuation)
                    }
                    Some(op) if op.is_control() && b & FIN == 0 => {
                        return Err(ProtocolError::FragmentedControlFrame)
                    }
                    Some(OpCode::Text) => self.open_message(DataKind::Text),
                    Some(OpCode::Binary) => self.open_message(DataKind::Binary),
                    Some(_) => {}
                }
                self.frame = b;
                self.step = Step::Len;
            }
            Step::Len => {
                if b & 0x80 == 0 {
                    return Err(ProtocolError::UnmaskedFrame);
                }
                match b & 0x7F {
                    126 => {
                        self.remaining = 0;
                        self.step = Step::ExtLen(2);
                    }
                    127 => {
                        self.remaining = 0;
                        self.step = Step::ExtLen(8);
                    }
                    n => {
                        self.remaining = n as u64;
                        self.length_known()?;
                    }
                }
            }
            Step::ExtLen(left) => {
                if left == 8 && b & 0x80 != 0 {
                    return Err(ProtocolError::LengthOverflow);
                }
                self.remaining = (self.remaining << 8) | b as u64;
                if left > 1 {
                    self.step = Step::ExtLen(left - 1);
                } else {
                    // Non-minimal encodings (e.g. 5 in 16 bits) are allowed by §5.2's
                    // wording ("can be used") and accepted.
                    self.length_known()?;
                }
            }
            Step::Mask(i) => {
                self.mask[i as usize & 3] = b;
                self.step = if i >= 3 {
                    Step::Payload
                } else {
                    Step::Mask(i + 1)
                };
            }
            Step::Payload | Step::Closed | Step::Failed(_) => {}
        }
        Ok(())
    }

    fn open_message(&mut self, kind: DataKind) {
        self.message = Some(kind);
        self.message_len = 0;
        self.utf8 = Utf8Carry::default();
    }

    /// The frame's payload length is known: refuse an oversized control frame or message
    /// before its payload arrives. (A control frame's length may use the 16- or 64-bit form,
    /// like any frame's; what §5.5 bounds is the length itself.)
    fn length_known(&mut self) -> Result<(), ProtocolError> {
        if self.is_control() {
            if self.remaining > MAX_CONTROL_PAYLOAD as u64 {
                return Err(ProtocolError::ControlFrameTooLong);
            }
        } else if self.message_len.saturating_add(self.remaining) > self.max_message {
            return Err(ProtocolError::MessageTooBig);
        }
        self.step = Step::Mask(0);
        Ok(())
    }

    /// Consumes `chunk`, the next payload bytes of a data frame (possibly none).
    fn data_payload(&mut self, chunk: &[u8]) -> Result<Option<Ready>, ProtocolError> {
        let Some(kind) = self.message else {
            // Unreachable: a data frame's header opened a message or found one open.
            return Err(ProtocolError::UnexpectedContinuation);
        };
        let n = chunk.len();
        if n > 0 {
            let start = self.buf.len();
            self.buf.extend_from_slice(chunk);
            unmask(&mut self.buf[start..], self.mask);
            self.mask.rotate_left(n % 4);
            if kind == DataKind::Text && !self.utf8.feed(&self.buf[start..]) {
                return Err(ProtocolError::InvalidUtf8);
            }
            self.message_len += n as u64;
            self.remaining -= n as u64;
        }
        if self.remaining > 0 {
            return Ok(if self.flags & ASSEMBLE == 0 && n > 0 {
                self.flags |= STALE;
                Some(Ready::Fragment(kind, false))
            } else {
                None
            });
        }
        self.step = Step::Head;
        let fin = self.frame & FIN != 0;
        if fin {
            if !self.utf8.is_complete() {
                return Err(ProtocolError::InvalidUtf8);
            }
            self.message = None;
        }
        Ok(if self.flags & ASSEMBLE != 0 {
            if fin {
                self.flags |= STALE;
                Some(Ready::Message(kind))
            } else {
                None
            }
        } else if fin || n > 0 {
            self.flags |= STALE;
            Some(Ready::Fragment(kind, fin))
        } else {
            None
        })
    }

    /// Consumes `chunk`, the next payload bytes of a control frame (possibly none).
    fn control_payload(&mut self, chunk: &[u8]) -> Result<Option<Ready>, ProtocolError> {
        let n = chunk.len();
        let payload = if self.control_len == 0 && n as u64 == self.remaining {
            // The whole payload is in this chunk: unmask it straight onto the stack.
            let mut p = ControlPayload::from_slice(chunk);
            unmask(&mut p.bytes[..n], self.mask);
            p
        } else {
            if self.control_len == 0 {
                // At most 125 bytes: reserve them once rather than let the Vec double.
                self.buf.reserve_exact(self.remaining as usize);
            }
            let start = self.buf.len();
            self.buf.extend_from_slice(chunk);
            unmask(&mut self.buf[start..], self.mask);
            self.mask.rotate_left(n % 4);
            self.control_len += n as u8;
            if self.remaining > n as u64 {
                self.remaining -= n as u64;
                return Ok(None);
            }
            let tail = self.buf.len() - self.control_len as usize;
            let p = ControlPayload::from_slice(&self.buf[tail..]);
            self.buf.truncate(tail);
            if self.buf.is_empty() {
                self.buf = Vec::new();
            }
            self.control_len = 0;
            p
        };
        self.remaining = 0;
        self.step = Step::Head;
        Ok(Some(match self.frame & 0x0F {
            0x9 => Ready::Ping(payload),
            0xA => Ready::Pong(payload),
            _ => {
                let close = read_close(payload)?;
                self.step = Step::Closed;
                self.message = None;
                self.buf = Vec::new();
                Ready::Close(close)
            }
        }))
    }
}

/// Validates a close frame's payload (§5.5.1, §7.4).
fn read_close(payload: ControlPayload) -> Result<CloseFrame, ProtocolError> {
    let b = payload.as_bytes();
    let code = match b {
        [] => None,
        [_] => return Err(ProtocolError::TruncatedClosePayload),
        [hi, lo, reason @ ..] => {
            let raw = u16::from_be_bytes([*hi, *lo]);
            let code = CloseCode::from_wire(raw).ok_or(ProtocolError::InvalidCloseCode(raw))?;
            if simdutf8::basic::from_utf8(reason).is_err() {
                return Err(ProtocolError::InvalidCloseReason);
            }
            Some(code)
        }
    };
    Ok(CloseFrame { code, payload })
}

/// XORs `buf` with the masking key, `mask[0]` applying to `buf[0]` (§5.3).
fn unmask(buf: &mut [u8], mask: [u8; 4]) {
    let [a, b, c, d] = mask;
    let wide = u64::from_ne_bytes([a, b, c, d, a, b, c, d]);
    let mut words = buf.chunks_exact_mut(8);
    for w in &mut words {
        let mut v = [0u8; 8];
        v.copy_from_slice(w);
        w.copy_from_slice(&(u64::from_ne_bytes(v) ^ wide).to_ne_bytes());
    }
    for (i, byte) in words.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

// ---------------------------------------------------------------------------------------
// Encoder: server frames

/// The header of a server data frame (never masked), built on the stack: send
/// [`as_bytes`](FrameHeader::as_bytes) and then the payload, e.g. as two iovecs, with no
/// copy of the payload.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    bytes: [u8; MAX_SERVER_HEADER],
    len: u8,
}

impl FrameHeader {
    fn new(b0: u8, payload_len: u64) -> FrameHeader {
        let mut bytes = [0u8; MAX_SERVER_HEADER];
        bytes[0] = b0;
        let len = if payload_len < 126 {
            bytes[1] = payload_len as u8;
            2
        } else if payload_len <= u16::MAX as u64 {
            bytes[1] = 126;
            bytes[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
            4
        } else {
            bytes[1] = 127;
            // A Rust slice is never longer than 2^63 bytes, so the MSB stays clear.
            bytes[2..10].copy_from_slice(&(payload_len & (u64::MAX >> 1)).to_be_bytes());
            10
        };
        FrameHeader { bytes, len }
    }

    /// The header of a whole message in one frame.
    pub fn message(kind: DataKind, payload_len: u64) -> FrameHeader {
        FrameHeader::new(FIN | kind.opcode() as u8, payload_len)
    }

    /// The header of the first frame of a fragmented message (FIN clear).
    pub fn first_fragment(kind: DataKind, payload_len: u64) -> FrameHeader {
        FrameHeader::new(kind.opcode() as u8, payload_len)
    }

    /// The header of a continuation frame; `fin` on the last one.
    pub fn continuation(fin: bool, payload_len: u64) -> FrameHeader {
        FrameHeader::new(if fin { FIN } else { 0 }, payload_len)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl fmt::Debug for FrameHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FrameHeader({:02x?})", self.as_bytes())
    }
}

/// Appends a whole message in one server frame to `out`; returns the bytes written.
pub fn write_message(out: &mut Vec<u8>, kind: DataKind, payload: &[u8]) -> usize {
    let h = FrameHeader::message(kind, payload.len() as u64);
    out.reserve(h.len as usize + payload.len());
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(payload);
    h.len as usize + payload.len()
}

/// A whole server control frame (ping, pong or close) on the stack: at most 127 bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ControlFrame {
    bytes: [u8; 2 + MAX_CONTROL_PAYLOAD],
    len: u8,
}

impl ControlFrame {
    /// `payload` is at most 125 bytes (callers check).
    fn control(op: OpCode, payload: &[u8]) -> ControlFrame {
        let n = payload.len().min(MAX_CONTROL_PAYLOAD);
        let mut bytes = [0u8; 2 + MAX_CONTROL_PAYLOAD];
        bytes[0] = FIN | op as u8;
        bytes[1] = n as u8;
        bytes[2..2 + n].copy_from_slice(&payload[..n]);
        ControlFrame {
            bytes,
            len: 2 + n as u8,
        }
    }

    /// A ping; `None` if `payload` is over 125 bytes.
    pub fn ping(payload: &[u8]) -> Option<ControlFrame> {
        (payload.len() <= MAX_CONTROL_PAYLOAD).then(|| ControlFrame::control(OpCode::Ping, payload))
    }

    /// An unsolicited pong (a heartbeat); `None` if `payload` is over 125 bytes. To answer a
    /// ping use [`ControlPayload::pong`].
    pub fn pong(payload: &[u8]) -> Option<ControlFrame> {
        (payload.len() <= MAX_CONTROL_PAYLOAD).then(|| ControlFrame::control(OpCode::Pong, payload))
    }

    /// A close frame with `code` and `reason`. The reason is cut at a character boundary to
    /// the 123 bytes that fit. A code that may not be sent (1005, 1006, 1015, …) gives an empty
    /// close frame, which is what "no status" means on the wire.
    pub fn close(code: CloseCode, reason: &str) -> ControlFrame {
        if !code.is_valid_on_wire() {
            return ControlFrame::close_empty();
        }
        let mut cut = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
        payload[..2].copy_from_slice(&code.as_u16().to_be_bytes());
        payload[2..2 + cut].copy_from_slice(&reason.as_bytes()[..cut]);
        ControlFrame::control(OpCode::Close, &payload[..2 + cut])
    }

    /// A close frame with no code.
    pub fn close_empty() -> ControlFrame {
        ControlFrame::control(OpCode::Close, &[])
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl fmt::Debug for ControlFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ControlFrame({:02x?})", self.as_bytes())
    }
}

#[cfg(test)]
mod tests;
