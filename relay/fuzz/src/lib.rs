//! What the WebSocket decoder targets check, shared by `ws_decoder` (raw bytes) and
//! `ws_frames` (frames built from the input, to reach deep message states quickly).
//!
//! For one byte stream: decoding it whole, one byte at a time, and in chunks of sizes drawn
//! from the input must give the same events and the same error ([`Delivery::Messages`]);
//! streaming it in those chunks ([`Delivery::Fragments`]) must give the same messages once
//! the pieces are joined. No call may panic, use more bytes than it was given, or return no
//! event without using all of them.
//!
//! The `tls_server` target's harness (a server `TlsConn` against raw bytes or a real rustls
//! client) is in [`tls`].

pub mod tls;

use relay::proto::ws::{
    CloseCode, DataKind, Decoder, DecoderConfig, Delivery, Event, ProtocolError,
};

/// An event with owned data, to compare runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ev {
    Text(String),
    Binary(Vec<u8>),
    Piece(DataKind, Vec<u8>, bool),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>, String),
}

fn own(e: Event<'_>) -> Ev {
    match e {
        Event::Message(m) => match m.kind() {
            DataKind::Text => Ev::Text(m.text().expect("text messages are UTF-8").to_owned()),
            DataKind::Binary => Ev::Binary(m.take()),
        },
        Event::Fragment(f) => Ev::Piece(f.kind, f.payload.to_vec(), f.fin),
        Event::Ping(p) => {
            assert!(p.as_bytes().len() <= 125);
            Ev::Ping(p.as_bytes().to_vec())
        }
        Event::Pong(p) => Ev::Pong(p.as_bytes().to_vec()),
        Event::Close(c) => {
            if let Some(code) = c.code() {
                assert!(code.is_valid_on_wire());
            }
            Ev::Close(c.code().map(CloseCode::as_u16), c.reason().to_owned())
        }
    }
}

pub type Outcome = (Vec<Ev>, Option<ProtocolError>);

/// Decodes `chunks` in order with the low-level `decode` loop, checking its contract.
pub fn run(cfg: DecoderConfig, chunks: &[&[u8]]) -> Outcome {
    let mut dec = Decoder::new(cfg);
    let mut out = Vec::new();
    for chunk in chunks {
        let mut input = *chunk;
        loop {
            match dec.decode(input) {
                Err(e) => {
                    assert_eq!(dec.error(), Some(e));
                    return (out, Some(e));
                }
                Ok(d) => {
                    assert!(d.consumed <= input.len());
                    input = &input[d.consumed..];
                    match d.event {
                        Some(e) => out.push(own(e)),
                        None => {
                            assert!(input.is_empty(), "no event before the input's end");
                            break;
                        }
                    }
                }
            }
        }
        if !dec.in_message() {
            // Between messages the decoder holds at most a split control frame.
            assert!(
                dec.buffered_capacity() <= 125,
                "{}",
                dec.buffered_capacity()
            );
        }
    }
    (out, None)
}

/// Joins streamed pieces into messages; drops a message an error cut short.
pub fn merged(events: &[Ev]) -> Vec<Ev> {
    let mut out = Vec::new();
    let mut open: Option<(DataKind, Vec<u8>)> = None;
    for e in events {
        match e {
            Ev::Piece(kind, data, fin) => {
                let (k, buf) = open.get_or_insert_with(|| (*kind, Vec::new()));
                assert_eq!(k, kind);
                buf.extend_from_slice(data);
                if *fin {
                    let (k, buf) = open.take().expect("open message");
                    out.push(match k {
                        DataKind::Text => {
                            Ev::Text(String::from_utf8(buf).expect("streamed text is UTF-8"))
                        }
                        DataKind::Binary => Ev::Binary(buf),
                    });
                }
            }
            other => out.push(other.clone()),
        }
    }
    out
}

/// Cuts `bytes` into chunks whose sizes come from `seed`.
pub fn chunks<'a>(bytes: &'a [u8], seed: u64, max: usize) -> Vec<&'a [u8]> {
    let mut x = seed | 1;
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = 1 + (x % max.min(rest.len()) as u64) as usize;
        out.push(&rest[..n]);
        rest = &rest[n..];
    }
    out
}

/// The whole check for one stream; `knobs` picks the size limit and the chunking.
pub fn check_stream(stream: &[u8], knobs: [u8; 3]) {
    let max_message = match knobs[0] % 4 {
        0 => 0,
        1 => 7,
        2 => 300,
        _ => 1 << 20,
    };
    let messages = DecoderConfig {
        max_message_size: max_message,
        delivery: Delivery::Messages,
    };
    let fragments = DecoderConfig {
        delivery: Delivery::Fragments,
        ..messages
    };
    let whole = run(messages, &[stream]);
    let ones: Vec<&[u8]> = stream.chunks(1).collect();
    assert_eq!(run(messages, &ones), whole, "one byte at a time");
    let max_chunk = [2, 5, 17, 64, 1000, 16384][knobs[1] as usize % 6];
    let cut = chunks(
        stream,
        u64::from(knobs[2]) << 8 | u64::from(knobs[1]),
        max_chunk,
    );
    assert_eq!(run(messages, &cut), whole, "random chunks");
    let (streamed, err) = run(fragments, &cut);
    assert_eq!((merged(&streamed), err), whole, "streamed");
}
