//! Arbitrary request and answer heads: `parse_upgrade` and `parse_answer` answer or refuse,
//! never panic, and what they report stays within the input. The first byte picks the head
//! limit and where the input is cut (a head still arriving).
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::proto::http::{parse_answer, parse_upgrade, Forwarding};

const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

fuzz_target!(|data: &[u8]| {
    let Some((&knob, head)) = data.split_first() else {
        return;
    };
    let max_head = [64, 1024, 16384][knob as usize % 3];
    let cut = head.len() * (knob as usize >> 2) / 63;
    let fwd = Forwarding {
        peer: if knob & 2 == 0 {
            "192.0.2.7:5555".parse().unwrap()
        } else {
            "[2001:db8::1]:443".parse().unwrap()
        },
        proto: if knob & 1 == 0 { "http" } else { "https" },
    };
    for input in [head, &head[..cut.min(head.len())]] {
        if let Ok(Some(u)) = parse_upgrade(input, max_head, fwd) {
            assert_eq!(u.accept.len(), 28, "a base64 SHA-1");
            assert!(u.origin_head.windows(4).any(|w| w == b"\r\n\r\n"));
        }
        if let Ok(Some(a)) = parse_answer(input, max_head, ACCEPT) {
            assert!(a.head_len <= input.len());
        }
    }
});
