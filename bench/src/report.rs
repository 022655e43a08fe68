//! The result record printed by `load` and `check`: a human summary on stderr and,
//! optionally, one JSON object.

use std::io::Write;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

/// RTT histogram: values in nanoseconds, 1 ns .. 1 hour, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

/// Round-trip-time percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Rtt {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Rtt {
    pub fn from_ns(h: &Histogram<u64>) -> Rtt {
        if h.is_empty() {
            return Rtt::default();
        }
        let us = |v: u64| (v as f64 / 1000.0 * 10.0).round() / 10.0;
        Rtt {
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        }
    }
}

/// One run's figures. The first block of fields is the stable contract shared by `load`
/// and `check`; the rest describe the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub mode: String,
    pub connections_requested: u64,
    pub connections_open_peak: u64,
    pub connect_failures: u64,
    pub handshake_failures: u64,
    /// Echoed messages received back (and checked).
    pub messages: u64,
    /// Payload bytes of those echoed messages (one direction).
    pub bytes: u64,
    /// Connections lost after the upgrade, unexpected frames, protocol errors.
    pub errors: u64,
    /// Echoes whose length, content or order did not match what was sent.
    pub verify_failures: u64,
    pub duration_s: f64,
    pub msgs_per_s: f64,
    pub rtt_us: Rtt,
    pub connect_rate_per_s: f64,
    pub ramp_seconds: f64,
    // ---- description of the run
    pub client: String,
    pub target: String,
    pub threads: u64,
    pub size: u64,
    pub inflight: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trickle_s: Option<f64>,
    /// Hold mode with a trickle: echoes received between the lines "load: holding" and
    /// "load: hold over" on stderr (all connections open, none closing yet), and their rate,
    /// the open-loop rate without the ramp.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_messages: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_msgs_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loader_rss_kib_start: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loader_rss_kib_open: Option<u64>,
    /// (RSS with all connections open − RSS before connecting) / connections open.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loader_rss_bytes_per_conn: Option<f64>,
    pub stopped_by_max_seconds: bool,
    /// SIGUSR1 ended the run (a script ending many load processes' holds at once).
    pub stopped_by_signal: bool,
    /// wss runs only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFigures>,
}

/// What the TLS side of a wss run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TlsFigures {
    pub sni: String,
    pub verify: String,
    pub resume: bool,
    /// Version, cipher suite, key exchange group and kind of the first handshake, e.g.
    /// "TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519 Full".
    pub negotiated: Option<String>,
    /// Connections upgraded after a full resp. a resumed handshake.
    pub handshakes_full: u64,
    pub handshakes_resumed: u64,
}

impl Report {
    /// Human summary for stderr.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "== {} {} -> {} ({} thread(s))\n",
            self.client, self.mode, self.target, self.threads
        ));
        s.push_str(&format!(
            "connections: requested {}  open peak {}  connect failures {}  handshake failures {}\n",
            self.connections_requested,
            self.connections_open_peak,
            self.connect_failures,
            self.handshake_failures
        ));
        s.push_str(&format!(
            "ramp: {:.2} s  ({:.0} conn/s)\n",
            self.ramp_seconds, self.connect_rate_per_s
        ));
        if self.mode == "throughput" {
            s.push_str(&format!(
                "load: {} B x {} in flight per connection for {:.2} s\n",
                self.size, self.inflight, self.duration_s
            ));
        } else if let Some(h) = self.hold_s {
            s.push_str(&format!("hold: {h:.0} s"));
            if let Some(t) = self.trickle_s {
                s.push_str(&format!(
                    ", trickle: one {} B message every {t} s",
                    self.size
                ));
            }
            s.push_str(&format!("  (run {:.2} s)\n", self.duration_s));
            if let (Some(m), Some(r)) = (self.hold_messages, self.hold_msgs_per_s) {
                s.push_str(&format!("during the hold: {m} messages, {r:.0} msg/s\n"));
            }
        }
        s.push_str(&format!(
            "messages: {}  bytes: {}  rate: {:.0} msg/s  ({:.2} MiB/s each way)\n",
            self.messages,
            self.bytes,
            self.msgs_per_s,
            if self.duration_s > 0.0 {
                self.bytes as f64 / self.duration_s / (1024.0 * 1024.0)
            } else {
                0.0
            }
        ));
        if self.messages > 0 {
            let r = &self.rtt_us;
            s.push_str(&format!(
                "rtt us: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}\n",
                r.p50, r.p90, r.p99, r.p999, r.max
            ));
        }
        if let (Some(a), Some(b)) = (self.loader_rss_kib_start, self.loader_rss_kib_open) {
            s.push_str(&format!(
                "loader RSS: {a} KiB before connecting, {b} KiB with connections open"
            ));
            if let Some(per) = self.loader_rss_bytes_per_conn {
                s.push_str(&format!(" ({per:.0} B per connection)"));
            }
            s.push('\n');
        }
        if let Some(t) = &self.tls {
            s.push_str(&format!(
                "tls: {}  full {}  resumed {}  (sni {}, verify {})\n",
                t.negotiated.as_deref().unwrap_or("no handshake finished"),
                t.handshakes_full,
                t.handshakes_resumed,
                t.sni,
                t.verify
            ));
        }
        s.push_str(&format!(
            "errors: {}  verify failures: {}{}\n",
            self.errors,
            self.verify_failures,
            if self.stopped_by_max_seconds {
                "  (stopped by --max-seconds)"
            } else if self.stopped_by_signal {
                "  (ended by SIGUSR1)"
            } else {
                ""
            }
        ));
        s
    }

    /// Prints the summary to stderr and writes JSON to `json` ("-" = stdout) if given.
    pub fn emit(&self, json: Option<&str>) -> Result<()> {
        eprint!("{}", self.summary());
        if let Some(path) = json {
            let text = serde_json::to_string_pretty(self)? + "\n";
            if path == "-" {
                let mut out = std::io::stdout().lock();
                out.write_all(text.as_bytes())?;
                out.flush()?;
            } else {
                std::fs::write(path, text).with_context(|| format!("writing --json {path}"))?;
            }
        }
        Ok(())
    }
}

/// Process exit code for a finished run: 1 if any echo failed verification, 3 if no
/// connection could be opened at all (nothing was measured), else 0.
pub fn exit_code(r: &Report) -> i32 {
    if r.verify_failures > 0 {
        1
    } else if r.connections_requested > 0 && r.connections_open_peak == 0 {
        3
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_contract_fields() {
        let mut h = new_histogram();
        for v in [10_000u64, 20_000, 30_000] {
            h.record(v).unwrap();
        }
        let r = Report {
            mode: "throughput".into(),
            rtt_us: Rtt::from_ns(&h),
            ..Default::default()
        };
        assert!(
            r.rtt_us.p50 >= 19.9 && r.rtt_us.p50 <= 20.1,
            "{:?}",
            r.rtt_us
        );
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        for k in [
            "mode",
            "connections_requested",
            "connections_open_peak",
            "connect_failures",
            "handshake_failures",
            "messages",
            "bytes",
            "errors",
            "verify_failures",
            "duration_s",
            "msgs_per_s",
            "rtt_us",
            "connect_rate_per_s",
            "ramp_seconds",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        for k in ["p50", "p90", "p99", "p999", "max"] {
            assert!(v["rtt_us"].get(k).is_some(), "missing rtt_us.{k}");
        }
        assert!(!r.summary().is_empty());
    }
}
