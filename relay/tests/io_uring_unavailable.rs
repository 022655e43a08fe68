//! When io_uring is disabled, relay exits at start and says what to change.
//!
//! Needs root (it flips `kernel.io_uring_disabled` for the duration of one start-up and puts
//! the old value back). It is the only test in this binary, and cargo runs test binaries one
//! after another, so no other relay under test is starting while the sysctl is set.

use std::process::Command;

const SYSCTL: &str = "/proc/sys/kernel/io_uring_disabled";

struct Restore(String);

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = std::fs::write(SYSCTL, &self.0);
    }
}

#[test]
fn disabled_io_uring_is_reported_with_the_sysctl_to_change() {
    let Ok(old) = std::fs::read_to_string(SYSCTL) else {
        eprintln!("skipped: this kernel has no {SYSCTL}");
        return;
    };
    if std::fs::write(SYSCTL, "2").is_err() {
        eprintln!("skipped: {SYSCTL} is not writable (needs root)");
        return;
    }
    let restore = Restore(old.trim().to_string());
    let out = Command::new(env!("CARGO_BIN_EXE_relay"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--origin",
            "127.0.0.1:9",
            "--admin",
            "off",
        ])
        .output()
        .unwrap();
    drop(restore);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("io_uring is not permitted"), "{stderr}");
    assert!(
        stderr.contains("sysctl -w kernel.io_uring_disabled=0"),
        "{stderr}"
    );
    assert!(stderr.contains("seccomp"), "{stderr}");
}
