//! `relay-bench load --mode hold` ends its hold on SIGUSR1 (what bench-million.sh sends to
//! every load process when its hold window ends), closes cleanly and writes its report.
//! Runs the real binary: echo-origin and load as child processes over loopback.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_relay-bench");

/// Kills the child if the test fails before it is reaped.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_exit(c: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            return st;
        }
        assert!(t0.elapsed() < limit, "no exit within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn sigusr1_ends_the_hold_and_the_report_says_so() {
    let mut origin = Reap(
        Command::new(BIN)
            .args(["echo-origin", "--listen", "127.0.0.1:0", "--threads", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(origin.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .strip_prefix("ready ")
        .unwrap_or_else(|| panic!("origin said {line:?}"))
        .trim()
        .to_string();

    let dir = std::env::temp_dir().join(format!("relay-bench-usr1-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("load.json");
    let mut load = Reap(
        Command::new(BIN)
            .args(["load", "--mode", "hold", "--target", &addr])
            .args(["--connections", "40", "--hold", "600"])
            .args(["--max-seconds", "900"])
            .arg("--json")
            .arg(&json)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The progress line says "hold" once every connection is open.
    let mut err = BufReader::new(load.0.stderr.take().unwrap());
    let mut seen = Vec::new();
    loop {
        let mut l = String::new();
        assert!(
            err.read_line(&mut l).unwrap() > 0,
            "load ended before holding: {seen:?}"
        );
        if l.contains("] hold ") {
            assert!(l.contains("open 40/40"), "{l}");
            break;
        }
        seen.push(l);
    }
    let t0 = Instant::now();
    let st = Command::new("kill")
        .args(["-USR1", &load.0.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    // Drain stderr so the child never blocks on a full pipe.
    let drain = std::thread::spawn(move || {
        let mut rest = String::new();
        while err.read_line(&mut rest).unwrap_or(0) > 0 {}
        rest
    });
    let st = wait_exit(&mut load.0, Duration::from_secs(20));
    let waited = t0.elapsed();
    let rest = drain.join().unwrap();
    assert!(st.success(), "load exit {st:?}: {rest}");
    assert!(rest.contains("SIGUSR1, ending the hold now"), "{rest}");
    assert!(waited < Duration::from_secs(5), "took {waited:?} to end");

    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(r["stopped_by_signal"], true, "{r}");
    assert_eq!(r["stopped_by_max_seconds"], false, "{r}");
    assert_eq!(r["connections_open_peak"], 40, "{r}");
    for k in ["connect_failures", "handshake_failures", "errors"] {
        assert_eq!(r[k], 0, "{k}: {r}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
