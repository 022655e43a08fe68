//! relay's server-side TLS driver (`tls::TlsConn` over rustls's unbuffered API) against
//! hostile clients: raw bytes in arbitrary chunkings, or a real rustls client that completes
//! a handshake and then has input bytes slipped into (or corrupting) its record stream while
//! both sides send, close and update keys. No call may panic, before or after an error; the
//! carried ciphertext stays bounded; data round-trips exactly while nothing failed. The
//! harness and the input format are in `relay_fuzz::tls`.
//!
//! `RELAY_FUZZ_TLS_SEEDS=DIR` writes the seed corpus (real rustls ClientHellos, TLS 1.2 and
//! 1.3, and session scripts) into DIR before fuzzing starts.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        if let Some(dir) = std::env::var_os("RELAY_FUZZ_TLS_SEEDS") {
            relay_fuzz::tls::write_seeds(std::path::Path::new(&dir));
        }
    },
    |data: &[u8]| relay_fuzz::tls::check_tls(data)
);
