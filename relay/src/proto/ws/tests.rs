use super::*;

/// The masking key of RFC 6455 §5.7's examples.
const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A client frame: first header byte `b0`, minimal length, masked with `KEY`.
fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    let n = payload.len() as u64;
    let len = if n < 126 {
        vec![n as u8]
    } else if n <= 0xFFFF {
        let mut v = vec![126];
        v.extend_from_slice(&(n as u16).to_be_bytes());
        v
    } else {
        let mut v = vec![127];
        v.extend_from_slice(&n.to_be_bytes());
        v
    };
    frame_with_len(b0, &len, payload)
}

/// A client frame with the length field given as is (`len[0]` without the MASK bit).
fn frame_with_len(b0: u8, len: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut v = vec![b0, 0x80 | len[0]];
    v.extend_from_slice(&len[1..]);
    v.extend_from_slice(&KEY);
    v.extend(payload.iter().enumerate().map(|(i, b)| b ^ KEY[i % 4]));
    v
}

fn text(s: &str) -> Vec<u8> {
    frame(0x81, s.as_bytes())
}

fn binary(b: &[u8]) -> Vec<u8> {
    frame(0x82, b)
}

fn ping(b: &[u8]) -> Vec<u8> {
    frame(0x89, b)
}

fn pong(b: &[u8]) -> Vec<u8> {
    frame(0x8A, b)
}

fn close(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    frame(0x88, &p)
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

/// An owned event, to compare.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Ev {
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
            DataKind::Text => Ev::Text(m.text().expect("validated text").to_owned()),
            DataKind::Binary => Ev::Binary(m.take()),
        },
        Event::Fragment(f) => Ev::Piece(f.kind, f.payload.to_vec(), f.fin),
        Event::Ping(p) => Ev::Ping(p.as_bytes().to_vec()),
        Event::Pong(p) => Ev::Pong(p.as_bytes().to_vec()),
        Event::Close(c) => Ev::Close(c.code().map(CloseCode::as_u16), c.reason().to_owned()),
    }
}

fn config(max: u64, delivery: Delivery) -> DecoderConfig {
    DecoderConfig {
        max_message_size: max,
        delivery,
    }
}

/// Feeds `chunks` in order; the events, and the error if one ended the stream.
fn run_chunks(cfg: DecoderConfig, chunks: &[&[u8]]) -> (Vec<Ev>, Option<ProtocolError>) {
    let mut dec = Decoder::new(cfg);
    let mut out = Vec::new();
    for c in chunks {
        if let Err(e) = dec.feed(c, |e| out.push(own(e))) {
            return (out, Some(e));
        }
    }
    (out, None)
}

fn run(bytes: &[u8]) -> (Vec<Ev>, Option<ProtocolError>) {
    run_chunks(DecoderConfig::default(), &[bytes])
}

fn events(bytes: &[u8]) -> Vec<Ev> {
    let (ev, err) = run(bytes);
    assert_eq!(err, None, "events so far: {ev:?}");
    ev
}

fn error(bytes: &[u8]) -> ProtocolError {
    run(bytes).1.expect("a protocol error")
}

fn t(s: &str) -> Ev {
    Ev::Text(s.to_owned())
}

/// Fragments merged back into messages, as a streaming caller would see them; a message cut
/// short by an error is dropped.
fn merged(events: &[Ev]) -> Vec<Ev> {
    let mut out = Vec::new();
    let mut open: Option<(DataKind, Vec<u8>)> = None;
    for e in events {
        match e {
            Ev::Piece(kind, data, fin) => {
                let (k, buf) = open.get_or_insert_with(|| (*kind, Vec::new()));
                assert_eq!(k, kind, "kind changed inside a message");
                buf.extend_from_slice(data);
                if *fin {
                    let (k, buf) = open.take().unwrap();
                    out.push(match k {
                        DataKind::Text => Ev::Text(String::from_utf8(buf).unwrap()),
                        DataKind::Binary => Ev::Binary(buf),
                    });
                }
            }
            other => out.push(other.clone()),
        }
    }
    out
}

/// A stream that touches every path: fragmentation with interleaved control frames, text
/// split inside code points across fragments, empty frames, all three length forms.
fn rich_stream() -> Vec<u8> {
    let long: Vec<u8> = (0..70_000u32).map(|i| (i * 7) as u8).collect();
    let medium = "é".repeat(100); // 200 bytes: 16-bit length
    let euro = "€".as_bytes(); // e2 82 ac
    let smile = "😀".as_bytes(); // f0 9f 98 80
    cat(&[
        text("Hello"),
        binary(&[]),
        ping(b"are you there"),
        text(""),
        // "a€b" split inside the euro sign, with a ping and a pong between the fragments.
        frame(0x01, &[b'a', euro[0]]),
        ping(b""),
        frame(0x00, &euro[1..2]),
        pong(b"p"),
        frame(0x00, &[]),
        frame(0x80, &[euro[2], b'b']),
        binary(&long),
        text(&medium),
        // A 4-byte code point in four frames.
        frame(0x01, &smile[..1]),
        frame(0x00, &smile[1..2]),
        frame(0x00, &smile[2..3]),
        frame(0x80, &smile[3..]),
        frame(0x02, b"bin"),
        frame(0x80, b"ary"),
        ping(&[0xAB; 125]),
        close(1000, "bye ✓".as_bytes()),
        // Ignored: after the close.
        text("after close"),
    ])
}

fn rich_events() -> Vec<Ev> {
    let long: Vec<u8> = (0..70_000u32).map(|i| (i * 7) as u8).collect();
    vec![
        t("Hello"),
        Ev::Binary(vec![]),
        Ev::Ping(b"are you there".to_vec()),
        t(""),
        Ev::Ping(vec![]),
        Ev::Pong(b"p".to_vec()),
        t("a€b"),
        Ev::Binary(long),
        t(&"é".repeat(100)),
        t("😀"),
        Ev::Binary(b"binary".to_vec()),
        Ev::Ping(vec![0xAB; 125]),
        Ev::Close(Some(1000), "bye ✓".to_owned()),
    ]
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// `bytes` cut into chunks of random sizes (1 to `max`).
fn random_chunks<'a>(rng: &mut XorShift, bytes: &'a [u8], max: usize) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = 1 + rng.below(max.min(rest.len()));
        out.push(&rest[..n]);
        rest = &rest[n..];
    }
    out
}

// ---------------------------------------------------------------------------------------
// RFC 6455 §5.7 examples

#[test]
fn rfc_masked_hello() {
    let bytes = [
        0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];
    assert_eq!(events(&bytes), vec![t("Hello")]);
    assert_eq!(bytes.to_vec(), text("Hello"));
}

#[test]
fn rfc_server_frames() {
    let mut out = Vec::new();
    write_message(&mut out, DataKind::Text, b"Hello");
    assert_eq!(out, [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
    assert_eq!(
        ControlFrame::ping(b"Hello").unwrap().as_bytes(),
        [0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]
    );
    assert_eq!(
        ControlFrame::pong(b"Hello").unwrap().as_bytes(),
        [0x8a, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]
    );
    assert_eq!(
        FrameHeader::message(DataKind::Binary, 256).as_bytes(),
        [0x82, 0x7E, 0x01, 0x00]
    );
    assert_eq!(
        FrameHeader::message(DataKind::Binary, 65536).as_bytes(),
        [0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0]
    );
    // The unmasked fragmented example: "Hel" then "lo".
    assert_eq!(
        FrameHeader::first_fragment(DataKind::Text, 3).as_bytes(),
        [0x01, 0x03]
    );
    assert_eq!(FrameHeader::continuation(true, 2).as_bytes(), [0x80, 0x02]);
}

// ---------------------------------------------------------------------------------------
// Data messages

#[test]
fn messages_of_every_length_form() {
    for n in [0usize, 1, 125, 126, 127, 65535, 65536, 100_000] {
        let payload: Vec<u8> = (0..n).map(|i| i as u8).collect();
        assert_eq!(
            events(&binary(&payload)),
            vec![Ev::Binary(payload.clone())],
            "{n}"
        );
    }
}

#[test]
fn non_minimal_lengths_are_accepted() {
    let p = b"hello";
    assert_eq!(
        events(&frame_with_len(0x81, &[126, 0, 5], p)),
        vec![t("hello")]
    );
    assert_eq!(
        events(&frame_with_len(0x81, &[127, 0, 0, 0, 0, 0, 0, 0, 5], p)),
        vec![t("hello")]
    );
    // A ping's length may be non-minimal too, while it stays within 125.
    assert_eq!(
        events(&frame_with_len(0x89, &[126, 0, 3], b"abc")),
        vec![Ev::Ping(b"abc".to_vec())]
    );
}

#[test]
fn fragmented_message_with_interleaved_control_frames() {
    let bytes = cat(&[
        frame(0x01, b"frag"),
        ping(b"1"),
        frame(0x00, b"men"),
        pong(b"2"),
        ping(b""),
        frame(0x80, b"ted"),
        frame(0x02, &[1, 2]),
        frame(0x80, &[3]),
    ]);
    assert_eq!(
        events(&bytes),
        vec![
            Ev::Ping(b"1".to_vec()),
            Ev::Pong(b"2".to_vec()),
            Ev::Ping(vec![]),
            t("fragmented"),
            Ev::Binary(vec![1, 2, 3]),
        ]
    );
}

#[test]
fn empty_fragments_make_one_message() {
    let bytes = cat(&[frame(0x01, b""), frame(0x00, b""), frame(0x80, b"")]);
    assert_eq!(events(&bytes), vec![t("")]);
}

#[test]
fn fragment_delivery_streams_pieces_as_they_arrive() {
    let cfg = config(DEFAULT_MAX_MESSAGE_SIZE, Delivery::Fragments);
    let first = frame(0x01, b"abcdef");
    let bytes = cat(&[first.clone(), ping(b"x"), frame(0x80, b"gh")]);
    // Cut inside the first frame's payload: its two halves come as two pieces.
    let (ev, err) = run_chunks(cfg, &[&bytes[..8], &bytes[8..]]);
    assert_eq!(err, None);
    assert_eq!(
        ev,
        vec![
            Ev::Piece(DataKind::Text, b"ab".to_vec(), false),
            Ev::Piece(DataKind::Text, b"cdef".to_vec(), false),
            Ev::Ping(b"x".to_vec()),
            Ev::Piece(DataKind::Text, b"gh".to_vec(), true),
        ]
    );
    // An empty final frame still ends the message; empty non-final frames say nothing.
    let bytes = cat(&[
        frame(0x02, b"xy"),
        frame(0x00, b""),
        frame(0x80, b""),
        binary(b""),
    ]);
    let (ev, err) = run_chunks(cfg, &[&bytes]);
    assert_eq!(err, None);
    assert_eq!(
        ev,
        vec![
            Ev::Piece(DataKind::Binary, b"xy".to_vec(), false),
            Ev::Piece(DataKind::Binary, vec![], true),
            Ev::Piece(DataKind::Binary, vec![], true),
        ]
    );
}

#[test]
fn decode_reports_consumed_bytes_per_event() {
    let a = text("one");
    let b = ping(b"two");
    let bytes = cat(&[a.clone(), b.clone(), a[..4].to_vec()]);
    let mut dec = Decoder::default();
    let d = dec.decode(&bytes).unwrap();
    assert_eq!(d.consumed, a.len());
    assert!(matches!(d.event, Some(Event::Message(_))));
    let d = dec.decode(&bytes[a.len()..]).unwrap();
    assert_eq!(d.consumed, b.len());
    assert!(matches!(d.event, Some(Event::Ping(_))));
    // A partial frame is taken whole; no event until the rest arrives.
    let d = dec.decode(&bytes[a.len() + b.len()..]).unwrap();
    assert_eq!(d.consumed, 4);
    assert!(d.event.is_none());
    let d = dec.decode(&a[4..]).unwrap();
    assert_eq!(d.consumed, a.len() - 4);
    match d.event {
        Some(Event::Message(m)) => assert_eq!(m.text(), Some("one")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn taken_messages_and_idle_decoders_hold_no_buffer() {
    let mut dec = Decoder::default();
    let bytes = cat(&[binary(&[7; 3000]), text("x")]);
    let mut taken = Vec::new();
    dec.feed(&bytes, |e| {
        if let Event::Message(m) = e {
            taken.push(m.take());
        }
    })
    .unwrap();
    assert_eq!(taken, vec![vec![7; 3000], b"x".to_vec()]);
    assert_eq!(dec.buffered_capacity(), 0);

    // Not taken: dropped by the call that ends the loop.
    dec.feed(&binary(&[1; 5000]), |_| {}).unwrap();
    assert_eq!(dec.buffered_capacity(), 0);

    // A message still arriving is held; the buffer goes once it is delivered.
    let f = binary(&[2; 5000]);
    dec.feed(&f[..3000], |_| panic!("no event yet")).unwrap();
    assert!(dec.in_message());
    assert!(dec.buffered_capacity() >= 2000);
    dec.feed(&f[3000..], |_| {}).unwrap();
    assert!(!dec.in_message());
    assert_eq!(dec.buffered_capacity(), 0);

    // A control frame split across chunks is held only until it ends.
    let p = ping(b"split");
    dec.feed(&p[..8], |_| panic!("no event yet")).unwrap();
    assert_eq!(dec.buffered_capacity(), 5);
    let mut got = Vec::new();
    dec.feed(&p[8..], |e| got.push(own(e))).unwrap();
    assert_eq!(got, vec![Ev::Ping(b"split".to_vec())]);
    assert_eq!(dec.buffered_capacity(), 0);
    // Pieces of any size: no more than the payload's length is held.
    let p94 = pong(&[3; 94]);
    dec.feed(&p94[..50], |_| panic!("no event yet")).unwrap();
    dec.feed(&p94[50..51], |_| panic!("no event yet")).unwrap();
    assert_eq!(dec.buffered_capacity(), 94);
    dec.feed(&p94[51..], |_| {}).unwrap();
    assert_eq!(dec.buffered_capacity(), 0);
}

#[test]
fn control_frame_split_inside_an_assembling_message() {
    let bytes = cat(&[
        frame(0x02, &[1; 300]),
        ping(b"0123456789"),
        frame(0x80, &[2; 10]),
    ]);
    // Cut inside the ping's payload, while 300 message bytes are buffered.
    let cut = frame(0x02, &[1; 300]).len() + 9;
    let (ev, err) = run_chunks(DecoderConfig::default(), &[&bytes[..cut], &bytes[cut..]]);
    assert_eq!(err, None);
    let mut want = vec![1; 300];
    want.extend_from_slice(&[2; 10]);
    assert_eq!(ev, vec![Ev::Ping(b"0123456789".to_vec()), Ev::Binary(want)]);
}

// ---------------------------------------------------------------------------------------
// Chunking

#[test]
fn one_byte_at_a_time_gives_the_same_events() {
    let bytes = rich_stream();
    let want = rich_events();
    assert_eq!(events(&bytes), want);
    let ones: Vec<&[u8]> = bytes.chunks(1).collect();
    assert_eq!(
        run_chunks(DecoderConfig::default(), &ones),
        (want.clone(), None)
    );
    let (ev, err) = run_chunks(config(DEFAULT_MAX_MESSAGE_SIZE, Delivery::Fragments), &ones);
    assert_eq!(err, None);
    assert_eq!(merged(&ev), want);
}

#[test]
fn every_two_way_split_gives_the_same_events() {
    // Without the 70,000-byte message, to keep this quadratic-free.
    let bytes = cat(&[
        text("Hello"),
        frame(0x01, &"a€".as_bytes()[..2]),
        ping(b"mid"),
        frame(0x80, &"a€".as_bytes()[2..]),
        binary(&[9; 300]),
        close(4000, b"done"),
    ]);
    let (want, err) = run(&bytes);
    assert_eq!(err, None);
    assert_eq!(want.len(), 5);
    for cut in 0..=bytes.len() {
        let (a, b) = bytes.split_at(cut);
        assert_eq!(
            run_chunks(DecoderConfig::default(), &[a, b]),
            (want.clone(), None),
            "cut at {cut}"
        );
        let (ev, err) = run_chunks(config(1 << 20, Delivery::Fragments), &[a, b]);
        assert_eq!(err, None, "cut at {cut}");
        assert_eq!(merged(&ev), want, "cut at {cut}");
    }
}

#[test]
fn random_chunkings_give_the_same_events() {
    let bytes = rich_stream();
    let want = rich_events();
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    for round in 0..300 {
        let max = [2, 7, 64, 1000, 16384][round % 5];
        let chunks = random_chunks(&mut rng, &bytes, max);
        assert_eq!(
            run_chunks(DecoderConfig::default(), &chunks),
            (want.clone(), None),
            "round {round}"
        );
        let (ev, err) = run_chunks(config(1 << 20, Delivery::Fragments), &chunks);
        assert_eq!(err, None, "round {round}");
        assert_eq!(merged(&ev), want, "round {round}");
    }
}

#[test]
fn sixteen_kib_buffers_holding_many_frames_and_parts_of_frames() {
    // What the relay sees: fixed 16 KiB receive buffers cut across frames.
    let mut parts = Vec::new();
    let mut want = Vec::new();
    for i in 0..500usize {
        let body = "x".repeat(i * 37 % 900);
        parts.push(text(&body));
        want.push(t(&body));
        if i % 50 == 0 {
            let big = vec![i as u8; 40_000];
            parts.push(binary(&big));
            want.push(Ev::Binary(big));
        }
    }
    let bytes = cat(&parts);
    let chunks: Vec<&[u8]> = bytes.chunks(16384).collect();
    assert!(chunks.len() > 30);
    assert_eq!(run_chunks(DecoderConfig::default(), &chunks), (want, None));
}

// ---------------------------------------------------------------------------------------
// Protocol errors: 1002

#[test]
fn unmasked_client_frame_is_a_protocol_error() {
    let e = error(&[0x81, 0x05, b'H', b'e', b'l', b'l', b'o']);
    assert_eq!(e, ProtocolError::UnmaskedFrame);
    assert_eq!(e.close_code(), CloseCode::PROTOCOL_ERROR);
    // Found at the second byte, before any payload arrives.
    let mut dec = Decoder::default();
    assert_eq!(
        dec.decode(&[0x89, 0x00]).unwrap_err(),
        ProtocolError::UnmaskedFrame
    );
}

#[test]
fn reserved_bits_are_a_protocol_error() {
    for rsv in [0x40, 0x20, 0x10, 0x70] {
        assert_eq!(
            error(&frame(0x81 | rsv, b"x")),
            ProtocolError::ReservedBits,
            "{rsv:#x}"
        );
        assert_eq!(error(&frame(0x89 | rsv, b"")), ProtocolError::ReservedBits);
    }
    // Inside a fragmented message too, after earlier messages went through.
    let (ev, err) = run(&cat(&[text("ok"), frame(0x01, b"a"), frame(0xC0, b"b")]));
    assert_eq!(ev, vec![t("ok")]);
    assert_eq!(err, Some(ProtocolError::ReservedBits));
}

#[test]
fn reserved_opcodes_are_a_protocol_error() {
    for op in (3..=7).chain(0xB..=0xF) {
        let e = error(&frame(0x80 | op, b""));
        assert_eq!(e, ProtocolError::ReservedOpcode(op));
        assert_eq!(e.close_code().as_u16(), 1002);
    }
}

#[test]
fn control_frames_over_125_bytes_are_a_protocol_error() {
    assert_eq!(events(&ping(&[1; 125])), vec![Ev::Ping(vec![1; 125])]);
    for op in [0x88, 0x89, 0x8A] {
        assert_eq!(
            error(&frame(op, &[1; 126])),
            ProtocolError::ControlFrameTooLong
        );
    }
    // Refused once the length is read: nothing after it is needed.
    let mut dec = Decoder::default();
    assert_eq!(
        dec.decode(&[0x89, 0xFE, 0x00, 0x7E]).unwrap_err(),
        ProtocolError::ControlFrameTooLong
    );
    let mut dec = Decoder::default();
    assert_eq!(
        dec.decode(&[0x8A, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0x7E])
            .unwrap_err(),
        ProtocolError::ControlFrameTooLong
    );
}

#[test]
fn fragmented_control_frames_are_a_protocol_error() {
    for op in [0x08, 0x09, 0x0A] {
        assert_eq!(
            error(&frame(op, b"")),
            ProtocolError::FragmentedControlFrame
        );
    }
}

#[test]
fn continuation_rules() {
    assert_eq!(
        error(&frame(0x80, b"x")),
        ProtocolError::UnexpectedContinuation
    );
    assert_eq!(
        error(&frame(0x00, b"x")),
        ProtocolError::UnexpectedContinuation
    );
    // After a finished fragmented message, a continuation is unexpected again.
    assert_eq!(
        error(&cat(&[
            frame(0x01, b"a"),
            frame(0x80, b"b"),
            frame(0x80, b"c")
        ])),
        ProtocolError::UnexpectedContinuation
    );
    assert_eq!(
        error(&cat(&[frame(0x01, b"a"), text("b")])),
        ProtocolError::ExpectedContinuation
    );
    assert_eq!(
        error(&cat(&[frame(0x02, b"a"), frame(0x01, b"b")])),
        ProtocolError::ExpectedContinuation
    );
}

#[test]
fn length_with_most_significant_bit_is_a_protocol_error() {
    let mut bytes = vec![0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 1];
    bytes.extend_from_slice(&KEY);
    let e = run_chunks(config(u64::MAX, Delivery::Messages), &[&bytes])
        .1
        .unwrap();
    assert_eq!(e, ProtocolError::LengthOverflow);
    assert_eq!(e.close_code().as_u16(), 1002);
    // 2^63 - 1 is a length, if a big one.
    let mut bytes = vec![0x82, 0xFF, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF];
    bytes.extend_from_slice(&KEY);
    bytes.extend_from_slice(&[0; 100]);
    assert_eq!(
        run_chunks(config(u64::MAX, Delivery::Fragments), &[&bytes]).1,
        None
    );
}

// ---------------------------------------------------------------------------------------
// Close frames

#[test]
fn close_codes_on_the_wire() {
    let valid = [
        1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000,
        4999,
    ];
    for code in valid {
        assert_eq!(
            events(&close(code, b"")),
            vec![Ev::Close(Some(code), String::new())],
            "{code}"
        );
    }
    let invalid = [
        0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ];
    for code in invalid {
        let e = error(&close(code, b""));
        assert_eq!(e, ProtocolError::InvalidCloseCode(code), "{code}");
        assert_eq!(e.close_code().as_u16(), 1002);
    }
}

#[test]
fn close_code_validity_over_all_u16() {
    for raw in 0..=u16::MAX {
        let valid = matches!(raw, 1000..=1003 | 1007..=1014 | 3000..=4999);
        assert_eq!(CloseCode::new(raw).is_valid_on_wire(), valid, "{raw}");
        assert_eq!(CloseCode::from_wire(raw).is_some(), valid, "{raw}");
    }
    assert_eq!(CloseCode::GOING_AWAY.to_string(), "1001 (going away)");
    assert_eq!(CloseCode::new(4321).to_string(), "4321");
    assert_eq!(u16::from(CloseCode::MESSAGE_TOO_BIG), 1009);
}

#[test]
fn close_payload_rules() {
    assert_eq!(
        events(&frame(0x88, b"")),
        vec![Ev::Close(None, String::new())]
    );
    let e = error(&frame(0x88, &[0x03]));
    assert_eq!(e, ProtocolError::TruncatedClosePayload);
    assert_eq!(e.close_code().as_u16(), 1002);
    assert_eq!(
        events(&close(1001, "gone ✓".as_bytes())),
        vec![Ev::Close(Some(1001), "gone ✓".to_owned())]
    );
    let reason = "x".repeat(123);
    assert_eq!(
        events(&close(1000, reason.as_bytes())),
        vec![Ev::Close(Some(1000), reason)]
    );
    let e = error(&close(
        1000,
        b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80",
    ));
    assert_eq!(e, ProtocolError::InvalidCloseReason);
    assert_eq!(e.close_code().as_u16(), 1007);
}

#[test]
fn everything_after_a_close_is_ignored() {
    let mut dec = Decoder::default();
    let mut got = Vec::new();
    dec.feed(
        &cat(&[text("a"), close(1000, b""), text("b"), vec![0xFF; 10]]),
        |e| got.push(own(e)),
    )
    .unwrap();
    assert_eq!(got, vec![t("a"), Ev::Close(Some(1000), String::new())]);
    assert!(dec.is_closed());
    let d = dec.decode(&[0x00, 0x11]).unwrap();
    assert_eq!((d.consumed, d.event.is_none()), (2, true));
    // A close in the middle of a fragmented message ends it too.
    assert_eq!(
        events(&cat(&[
            frame(0x01, b"part"),
            close(1001, b""),
            frame(0x80, b"x")
        ])),
        vec![Ev::Close(Some(1001), String::new())]
    );
}

#[test]
fn close_replies() {
    let (ev, _) = run(&close(4001, b"custom"));
    assert_eq!(ev, vec![Ev::Close(Some(4001), "custom".to_owned())]);
    let mut dec = Decoder::default();
    let mut reply = None;
    dec.feed(&close(4001, b"custom"), |e| {
        if let Event::Close(c) = e {
            reply = Some(c.reply());
        }
    })
    .unwrap();
    assert_eq!(reply.unwrap().as_bytes(), [0x88, 0x02, 0x0F, 0xA1]);
    dec = Decoder::default();
    dec.feed(&frame(0x88, b""), |e| {
        if let Event::Close(c) = e {
            assert_eq!(c.code(), None);
            reply = Some(c.reply());
        }
    })
    .unwrap();
    assert_eq!(reply.unwrap().as_bytes(), [0x88, 0x00]);
}

// ---------------------------------------------------------------------------------------
// UTF-8: 1007

#[test]
fn invalid_utf8_text_is_1007() {
    for bad in [
        &b"\xff"[..],
        b"\xc0\x80",         // overlong
        b"\xed\xa0\x80",     // surrogate
        b"\xf4\x90\x80\x80", // above U+10FFFF
        b"Hello-\xc2\xb5@\xc3\x9f\xc3\xb6\xc3\xa4\xc3\xbc\xc3\xa0\xc3\xa1-UTF-8!!\xe2",
    ] {
        let e = error(&frame(0x81, bad));
        assert_eq!(e, ProtocolError::InvalidUtf8, "{bad:x?}");
        assert_eq!(e.close_code().as_u16(), 1007);
    }
    // Binary messages are not text.
    assert_eq!(
        events(&binary(b"\xff\xfe")),
        vec![Ev::Binary(b"\xff\xfe".to_vec())]
    );
}

#[test]
fn utf8_split_across_fragments_and_chunks() {
    let s = "κόσμε € 😀 ascii";
    let b = s.as_bytes();
    // Every way to cut the text into two fragments, each frame also cut at every byte.
    for cut in 0..=b.len() {
        let bytes = cat(&[frame(0x01, &b[..cut]), frame(0x80, &b[cut..])]);
        for split in [0, 1, 3, 6, 7, 8, 9, bytes.len() / 2, bytes.len()] {
            let split = split.min(bytes.len());
            assert_eq!(
                run_chunks(
                    DecoderConfig::default(),
                    &[&bytes[..split], &bytes[split..]]
                ),
                (vec![t(s)], None),
                "cut {cut} split {split}"
            );
        }
    }
    // One byte per fragment.
    let mut parts = vec![frame(0x01, &b[..1])];
    for byte in &b[1..b.len() - 1] {
        parts.push(frame(0x00, &[*byte]));
    }
    parts.push(frame(0x80, &b[b.len() - 1..]));
    assert_eq!(events(&cat(&parts)), vec![t(s)]);
}

#[test]
fn invalid_utf8_is_found_before_the_message_ends() {
    // Autobahn 6.4.x: the invalid byte arrives in the first fragment; the rest never does.
    let first = frame(
        0x01,
        b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4\x90\x80\x80",
    );
    let mut dec = Decoder::default();
    assert_eq!(
        dec.feed(&first, |_| panic!("no event")),
        Err(ProtocolError::InvalidUtf8)
    );
    // Within one frame, before its end: the bad byte is the 3rd of 100.
    let whole = frame(0x81, &[b"ab\xff".as_slice(), &[b'c'; 97]].concat());
    let mut dec = Decoder::default();
    assert_eq!(
        dec.decode(&whole[..9]).unwrap_err(),
        ProtocolError::InvalidUtf8
    );
    // A code point cut by a chunk is checked as soon as it cannot be valid any more.
    let bad = frame(0x81, b"x\xe0\x80yz");
    let mut dec = Decoder::default();
    assert!(dec.decode(&bad[..8]).is_ok()); // "x\xe0": still a valid prefix
    assert_eq!(
        dec.decode(&bad[8..9]).unwrap_err(),
        ProtocolError::InvalidUtf8
    );
}

#[test]
fn text_ending_inside_a_code_point_is_1007() {
    let e = error(&frame(0x81, &"€".as_bytes()[..2]));
    assert_eq!(e, ProtocolError::InvalidUtf8);
    let e = error(&cat(&[
        frame(0x01, b"ok"),
        frame(0x80, &"😀".as_bytes()[..3]),
    ]));
    assert_eq!(e, ProtocolError::InvalidUtf8);
    // The incomplete code point is not carried into the next message.
    let e = error(&cat(&[frame(0x81, b"ok\xe2"), text("\u{82}")]));
    assert_eq!(e, ProtocolError::InvalidUtf8);
}

// ---------------------------------------------------------------------------------------
// Message size: 1009

#[test]
fn messages_over_the_limit_are_1009() {
    let cfg = config(10, Delivery::Messages);
    assert_eq!(
        run_chunks(cfg, &[&binary(&[0; 10])]),
        (vec![Ev::Binary(vec![0; 10])], None)
    );
    let (_, e) = run_chunks(cfg, &[&binary(&[0; 11])]);
    assert_eq!(e, Some(ProtocolError::MessageTooBig));
    assert_eq!(ProtocolError::MessageTooBig.close_code().as_u16(), 1009);
    // Summed over fragments, refused at the header of the frame that goes over.
    let bytes = cat(&[frame(0x01, b"12345"), ping(b"p"), frame(0x80, b"123456")]);
    let over = bytes.len() - 6 - KEY.len();
    let mut dec = Decoder::new(cfg);
    let mut got = Vec::new();
    assert_eq!(
        dec.feed(&bytes[..over], |e| got.push(own(e))),
        Err(ProtocolError::MessageTooBig)
    );
    assert_eq!(got, vec![Ev::Ping(b"p".to_vec())]);
    // Control frames do not count; a new message starts from zero.
    let bytes = cat(&[binary(&[1; 10]), ping(&[0; 125]), text("0123456789")]);
    assert_eq!(run_chunks(cfg, &[&bytes]).1, None);
    // The same limit applies when streaming.
    let (_, e) = run_chunks(config(10, Delivery::Fragments), &[&binary(&[0; 11])]);
    assert_eq!(e, Some(ProtocolError::MessageTooBig));
}

#[test]
fn a_huge_announced_length_is_refused_from_the_header_alone() {
    let mut dec = Decoder::default();
    // 1 TiB announced: refused before any payload, nothing allocated.
    let header = [0x82, 0xFF, 0, 0, 1, 0, 0, 0, 0, 0];
    assert_eq!(
        dec.decode(&header).unwrap_err(),
        ProtocolError::MessageTooBig
    );
    assert_eq!(dec.buffered_capacity(), 0);
}

// ---------------------------------------------------------------------------------------
// Errors are final

#[test]
fn errors_are_sticky_and_give_the_close_frame() {
    let mut dec = Decoder::default();
    assert_eq!(
        dec.decode(&frame(0x83, b"")).unwrap_err(),
        ProtocolError::ReservedOpcode(3)
    );
    assert_eq!(dec.error(), Some(ProtocolError::ReservedOpcode(3)));
    assert_eq!(
        dec.decode(&text("fine")).unwrap_err(),
        ProtocolError::ReservedOpcode(3)
    );
    let f = ProtocolError::InvalidUtf8.close_frame();
    let mut want = vec![0x88, 2 + 17, 0x03, 0xEF];
    want.extend_from_slice(b"text is not UTF-8");
    assert_eq!(f.as_bytes(), want);
    assert_eq!(
        ProtocolError::ReservedOpcode(0xB).to_string(),
        "reserved opcode 0xb (close 1002)"
    );
    for (i, e) in ProtocolError::ALL.iter().enumerate() {
        assert_eq!(e.index(), i);
        assert!(e.reason().len() <= 123);
    }
}

#[test]
fn decoder_state_fits_in_64_bytes() {
    let size = std::mem::size_of::<Decoder>();
    println!("size_of::<Decoder>() = {size}");
    assert!(size <= 64, "{size}");
    // Events borrow nothing but the decoder's buffer; control payloads ride on the stack.
    assert!(std::mem::size_of::<Event<'_>>() <= 136);
}

// ---------------------------------------------------------------------------------------
// Encoder

/// A server frame turned into the client frame a peer would send: MASK bit and key added.
fn as_client_frame(server: &[u8]) -> Vec<u8> {
    let len_bytes = match server[1] & 0x7F {
        126 => 3,
        127 => 9,
        _ => 1,
    };
    let header = 1 + len_bytes;
    frame_with_len(server[0], &server[1..header], &server[header..])
}

#[test]
fn encoder_round_trips_through_the_decoder() {
    for n in [0usize, 5, 125, 126, 65535, 65536, 70_000] {
        let payload: Vec<u8> = (0..n).map(|i| (i % 90) as u8 + b' ').collect();
        let mut out = Vec::new();
        let written = write_message(&mut out, DataKind::Text, &payload);
        assert_eq!(written, out.len());
        let header = FrameHeader::message(DataKind::Text, n as u64);
        assert_eq!(&out[..header.as_bytes().len()], header.as_bytes());
        assert_eq!(
            events(&as_client_frame(&out)),
            vec![t(std::str::from_utf8(&payload).unwrap())]
        );
    }
    let mut out = Vec::new();
    out.extend_from_slice(FrameHeader::first_fragment(DataKind::Binary, 2).as_bytes());
    out.extend_from_slice(b"ab");
    out.extend_from_slice(FrameHeader::continuation(false, 1).as_bytes());
    out.extend_from_slice(b"c");
    out.extend_from_slice(FrameHeader::continuation(true, 0).as_bytes());
    let client: Vec<u8> = [&out[..4], &out[4..7], &out[7..]]
        .iter()
        .flat_map(|f| as_client_frame(f))
        .collect();
    assert_eq!(events(&client), vec![Ev::Binary(b"abc".to_vec())]);
}

#[test]
fn control_frames_from_the_encoder() {
    assert!(ControlFrame::ping(&[0; 125]).is_some());
    assert!(ControlFrame::ping(&[0; 126]).is_none());
    assert!(ControlFrame::pong(&[0; 126]).is_none());
    let c = ControlFrame::close(CloseCode::GOING_AWAY, "going away");
    assert_eq!(&c.as_bytes()[..4], [0x88, 12, 0x03, 0xE9]);
    assert_eq!(&c.as_bytes()[4..], b"going away");
    // A code that may not be sent gives an empty close.
    for code in [
        CloseCode::NO_STATUS,
        CloseCode::ABNORMAL,
        CloseCode::new(999),
    ] {
        assert_eq!(ControlFrame::close(code, "x").as_bytes(), [0x88, 0x00]);
    }
    // A long reason is cut at a character boundary to fit 125 bytes.
    let long = "€".repeat(60); // 180 bytes
    let c = ControlFrame::close(CloseCode::NORMAL, &long);
    assert_eq!(c.as_bytes().len(), 2 + 2 + 123);
    assert_eq!(c.as_bytes()[1], 125);
    assert_eq!(
        events(&as_client_frame(c.as_bytes())),
        vec![Ev::Close(Some(1000), "€".repeat(41))]
    );
    // A ping's pong carries the same payload.
    let mut dec = Decoder::default();
    let mut pong = None;
    dec.feed(&ping(b"stamp-42"), |e| {
        if let Event::Ping(p) = e {
            pong = Some(p.pong());
        }
    })
    .unwrap();
    let mut want = vec![0x8A, 8];
    want.extend_from_slice(b"stamp-42");
    assert_eq!(pong.unwrap().as_bytes(), want);
}

// ---------------------------------------------------------------------------------------
// Arbitrary input

/// Random bytes and mutated valid streams: the decoder never panics, and the events (and
/// error) do not depend on how the input is cut.
#[test]
fn random_input_never_panics_and_is_chunking_invariant() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let seed = cat(&[
        text("héllo"),
        frame(0x01, b"a\xe2"),
        ping(b"x"),
        frame(0x80, b"\x82\xac"),
        binary(&[5; 200]),
        close(1000, b"ok"),
    ]);
    for round in 0..3000 {
        let mut v = if round % 3 == 0 {
            (0..rng.below(64)).map(|_| rng.next() as u8).collect()
        } else {
            seed.clone()
        };
        for _ in 0..rng.below(6) {
            if v.is_empty() {
                break;
            }
            let pos = rng.below(v.len());
            match rng.below(3) {
                0 => v[pos] = rng.next() as u8,
                1 => v[pos] ^= 1 << rng.below(8),
                _ => {
                    v.remove(pos);
                }
            }
        }
        let max = [16, 1 << 20][round % 2];
        let whole = run_chunks(config(max, Delivery::Messages), &[&v]);
        let ones: Vec<&[u8]> = v.chunks(1).collect();
        assert_eq!(
            run_chunks(config(max, Delivery::Messages), &ones),
            whole,
            "{v:02x?}"
        );
        let chunks = random_chunks(&mut rng, &v, 9);
        assert_eq!(run_chunks(config(max, Delivery::Messages), &chunks), whole);
        let (ev, err) = run_chunks(config(max, Delivery::Fragments), &chunks);
        assert_eq!((merged(&ev), err), whole, "{v:02x?}");
    }
}
