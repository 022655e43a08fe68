//! Like `ws_decoder`, but the input describes frames that are masked and length-encoded the
//! way a client would send them, so the fuzzer spends its time on message semantics
//! (fragmentation, interleaved control frames, UTF-8 across fragments, close codes, limits)
//! rather than on finding the MASK bit.
//!
//! Input: 3 knob bytes (as in `ws_decoder`), then frames, each as
//! `b0, form, len, key[4], payload[len]`: `b0` is the first header byte as sent (any value:
//! reserved bits and opcodes included); `form` bits 0–1 pick the length encoding (minimal,
//! 16-bit, 64-bit, 64-bit with the top bit set), bit 2 multiplies `len` by 64, bit 3 leaves
//! the frame unmasked; the payload is masked with `key`. A short input ends mid-frame.
#![no_main]

use libfuzzer_sys::fuzz_target;

fn build(mut spec: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while spec.len() >= 7 {
        let (b0, form, len) = (spec[0], spec[1], spec[2] as u64);
        let key = [spec[3], spec[4], spec[5], spec[6]];
        spec = &spec[7..];
        let len = if form & 4 != 0 { len * 64 } else { len };
        let masked = form & 8 == 0;
        out.push(b0);
        let mask_bit = if masked { 0x80 } else { 0 };
        match form & 3 {
            0 if len < 126 => out.push(mask_bit | len as u8),
            0 | 1 if len <= 0xFFFF => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            2 | 0 | 1 => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&len.to_be_bytes());
            }
            _ => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&(len | 1 << 63).to_be_bytes());
            }
        }
        if masked {
            out.extend_from_slice(&key);
        }
        let n = (len as usize).min(spec.len());
        out.extend(
            spec[..n]
                .iter()
                .enumerate()
                .map(|(i, b)| if masked { b ^ key[i % 4] } else { *b }),
        );
        spec = &spec[n..];
    }
    out.extend_from_slice(spec);
    out
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (knobs, spec) = data.split_at(3);
    relay_fuzz::check_stream(&build(spec), [knobs[0], knobs[1], knobs[2]]);
});
