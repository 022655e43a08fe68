//! Arbitrary bytes from a client, in arbitrary chunkings: the decoder never panics, and what
//! it reports does not depend on the chunking. The first 3 bytes pick the message-size limit
//! and the chunking; the rest is the stream.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (knobs, stream) = data.split_at(3);
    relay_fuzz::check_stream(stream, [knobs[0], knobs[1], knobs[2]]);
});
