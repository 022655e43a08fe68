//! A worker asleep on its ring is idle, not waiting for I/O: with `IORING_ENTER_NO_IOWAIT`
//! (Linux 6.15+) the CPUs of an idle relay with open WebSocket connections show as `idle`
//! in `/proc/stat`, as they do for an epoll proxy. Without the flag the kernel counts every
//! sleep with a receive armed as iowait, and top shows a quiet relay core as ~100 % `wa`.

mod common;

use std::time::Duration;

use common::*;

/// (idle, iowait) ticks summed over every CPU.
fn idle_iowait() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let cpu = stat.lines().next().unwrap();
    let f: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    (f[3], f[4])
}

fn kernel_has_no_iowait() -> bool {
    // IORING_FEAT_NO_IOWAIT came with 6.15.
    let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut it = rel.trim().split(|c: char| !c.is_ascii_digit());
    let major: u32 = it.next().unwrap().parse().unwrap();
    let minor: u32 = it.next().unwrap().parse().unwrap();
    (major, minor) >= (6, 15)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_workers_with_open_connections_count_as_idle_not_iowait() {
    if !kernel_has_no_iowait() {
        eprintln!("kernel before 6.15: no IORING_ENTER_NO_IOWAIT, nothing to check");
        return;
    }
    let origin = ws_origin(OriginMode::Echo);
    let cfg = format!(
        r#"
[workers]
pin = true
[[listener]]
address = "{{LISTEN}}"
[[pool]]
name = "o"
origins = ["{}"]
[[route]]
name = "all"
pool = "o"
"#,
        origin.addr
    );
    let relay = Relay::with_config(&cfg, &[]);
    let mut conns = Vec::new();
    for _ in 0..8 {
        let (ws, _) = tokio_tungstenite::connect_async(relay.url("/idle"))
            .await
            .unwrap();
        conns.push(ws);
    }
    // Every worker now sleeps with receives armed on both legs of its connections. Sample
    // one-second windows until one has enough idle time to judge (other work on a shared
    // machine can fill a window).
    for _ in 0..10 {
        let (i0, w0) = idle_iowait();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (i1, w1) = idle_iowait();
        let (idle, iowait) = (i1 - i0, w1 - w0);
        if idle + iowait < 50 {
            continue;
        }
        assert!(
            iowait * 4 < idle + iowait,
            "{iowait} of {} quiet ticks were counted as iowait",
            idle + iowait
        );
        drop(conns);
        return;
    }
    panic!("no quiet second in 10 to measure in");
}
