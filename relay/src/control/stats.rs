//! Per-worker counters.
//!
//! A worker counts into plain integers ([`Counters`]) on its data path and copies them into
//! its own [`WorkerStats`] once per loop turn with relaxed stores. Each `WorkerStats` has one
//! writer (its worker) and is read only at scrape time, so no cache line bounces between
//! cores while connections move bytes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use hdrhistogram::Histogram;

use crate::proto::Status;

/// Why a connection ended, for counters and (later) access records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseCause {
    ClientClosed,
    OriginClosed,
    ClientReset,
    OriginReset,
    IdleTimeout,
    Refused,
    Drain,
}

impl CloseCause {
    pub const ALL: [CloseCause; 7] = [
        CloseCause::ClientClosed,
        CloseCause::OriginClosed,
        CloseCause::ClientReset,
        CloseCause::OriginReset,
        CloseCause::IdleTimeout,
        CloseCause::Refused,
        CloseCause::Drain,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CloseCause::ClientClosed => "client_close",
            CloseCause::OriginClosed => "origin_close",
            CloseCause::ClientReset => "client_error",
            CloseCause::OriginReset => "origin_error",
            CloseCause::IdleTimeout => "timeout",
            CloseCause::Refused => "refused",
            CloseCause::Drain => "drain",
        }
    }

    pub fn index(self) -> usize {
        CloseCause::ALL.iter().position(|c| *c == self).unwrap_or(0)
    }
}

/// Counters of one route on one worker (plain integers, owned by the worker).
#[derive(Default, Clone, Debug, PartialEq, Eq)]
pub struct RouteCounters {
    pub opened: u64,
    pub active: u64,
    pub refused: [u64; Status::ALL.len()],
    pub closed: [u64; CloseCause::ALL.len()],
    pub bytes_client_to_origin: u64,
    pub bytes_origin_to_client: u64,
    /// Lifetime of closed upgraded connections, summed, in milliseconds.
    pub connection_ms: u64,
}

impl RouteCounters {
    pub fn add(&mut self, o: &RouteCounters) {
        self.opened += o.opened;
        self.active += o.active;
        for (a, b) in self.refused.iter_mut().zip(o.refused.iter()) {
            *a += b;
        }
        for (a, b) in self.closed.iter_mut().zip(o.closed.iter()) {
            *a += b;
        }
        self.bytes_client_to_origin += o.bytes_client_to_origin;
        self.bytes_origin_to_client += o.bytes_origin_to_client;
        self.connection_ms += o.connection_ms;
    }
}

/// Latency histograms in microseconds (1 µs .. 100 s, 2 significant digits: 1% precision
/// in about 20 KiB each; values past 100 s are clamped).
#[derive(Clone, Debug)]
pub struct Latencies {
    /// Accept → the origin's 101 forwarded to the client.
    pub handshake: Histogram<u64>,
    /// Origin connect submitted → connected.
    pub origin_connect: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        let h = || Histogram::new_with_bounds(1, 100_000_000, 2).expect("valid histogram bounds");
        Latencies {
            handshake: h(),
            origin_connect: h(),
        }
    }
}

impl Latencies {
    pub fn add(&mut self, o: &Latencies) {
        let _ = self.handshake.add(&o.handshake);
        let _ = self.origin_connect.add(&o.origin_connect);
    }
}

/// Plain counters owned by one worker thread.
#[derive(Default, Clone, Debug)]
pub struct Counters {
    pub accepted: u64,
    pub active: u64,
    pub upgraded: u64,
    pub refused: [u64; Status::ALL.len()],
    pub closed: [u64; CloseCause::ALL.len()],
    pub bytes_client_to_origin: u64,
    pub bytes_origin_to_client: u64,
    /// Sum over closed relayed connections of their lifetime, in milliseconds.
    pub connection_ms: u64,
    pub origin_connect_failures: u64,
    pub accept_errors: u64,
    pub enobufs: u64,
    pub submitted: u64,
    pub completed: u64,
    pub cq_overflows: u64,
    /// Waits answered while spinning (`workers.busy_poll`): no sleep, no wake-up.
    pub busy_poll_hits: u64,
    /// Spins that ended without a completion, followed by a sleep: CPU spent on nothing.
    pub busy_poll_misses: u64,
    /// Enters that waited for completions; completions per wait is a wake-up's batch.
    pub waits: u64,
    /// Of those, waits that coalesced their wake-up (`workers.coalesce`).
    pub coalesced_waits: u64,
    pub bufs_provided: u64,
    pub bufs_checked_out: u64,
    pub splices: u64,
    /// Sockets parked in the worker's epoll set now (idle: no armed receive), and parks so
    /// far.
    pub parked: u64,
    pub parks: u64,
    /// Edge apps: messages received from clients, and frames sent to them.
    pub app_messages_in: u64,
    pub app_frames_out: u64,
    /// Clients closed for breaking the protocol, by the close code relay sent.
    pub ws_close_1002: u64,
    pub ws_close_1007: u64,
    pub ws_close_1009: u64,
    /// Room messages dropped for a slow member, and slow members closed with 1008.
    pub room_dropped: u64,
    pub room_slow_closed: u64,
    pub pings_sent: u64,
    pub pong_timeouts: u64,
    /// TLS handshakes with clients completed, full and resumed.
    pub tls_full: u64,
    pub tls_resumed: u64,
    /// TLS connections that ended before the handshake completed, by reason.
    pub tls_fail_plain_http: u64,
    pub tls_fail_timeout: u64,
    pub tls_fail_protocol: u64,
    pub tls_fail_closed: u64,
    /// TLS handshakes with origins that failed (verification, protocol).
    pub origin_tls_failures: u64,
}

macro_rules! atomic_mirror {
    ($($f:ident),* ; $($arr:ident: $n:expr),*) => {
        /// The published copy of a worker's [`Counters`].
        #[derive(Default, Debug)]
        pub struct WorkerStats {
            pub ready: AtomicBool,
            /// Per-route counters and latency histograms: the worker replaces these copies
            /// once per tick (a lock its owner takes ten times a second, never per message).
            pub routes: Mutex<Vec<RouteCounters>>,
            pub latencies: Mutex<Latencies>,
            $(pub $f: AtomicU64,)*
            $(pub $arr: [AtomicU64; $n],)*
        }

        impl WorkerStats {
            pub fn publish(&self, c: &Counters) {
                $(self.$f.store(c.$f, Relaxed);)*
                $(for (a, v) in self.$arr.iter().zip(c.$arr.iter()) { a.store(*v, Relaxed); })*
            }

            pub fn snapshot(&self) -> Counters {
                Counters {
                    $($f: self.$f.load(Relaxed),)*
                    $($arr: std::array::from_fn(|i| self.$arr[i].load(Relaxed)),)*
                }
            }
        }
    };
}

atomic_mirror!(
    accepted, active, upgraded, bytes_client_to_origin, bytes_origin_to_client, connection_ms,
    origin_connect_failures, accept_errors, enobufs, submitted, completed, cq_overflows,
    busy_poll_hits, busy_poll_misses, waits, coalesced_waits, bufs_provided, bufs_checked_out, splices, parked, parks, app_messages_in, app_frames_out, ws_close_1002,
    ws_close_1007, ws_close_1009, room_dropped, room_slow_closed, pings_sent, pong_timeouts,
    tls_full, tls_resumed, tls_fail_plain_http, tls_fail_timeout, tls_fail_protocol,
    tls_fail_closed, origin_tls_failures;
    refused: Status::ALL.len(), closed: CloseCause::ALL.len()
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_round_trips() {
        let s = WorkerStats::default();
        let c = Counters {
            accepted: 3,
            active: 2,
            refused: [1, 0, 0, 0, 0, 0, 0, 0, 9],
            bytes_client_to_origin: 1 << 40,
            ..Counters::default()
        };
        s.publish(&c);
        let d = s.snapshot();
        assert_eq!(d.accepted, 3);
        assert_eq!(d.refused[8], 9);
        assert_eq!(d.bytes_client_to_origin, 1 << 40);
    }
}
