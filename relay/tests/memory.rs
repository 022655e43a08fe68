//! What idle relayed connections cost the relay process.
//!
//! Memory: 9,000 upgraded connections held open through the real relay binary (the process
//! cap here is 20,000 descriptors; each relayed connection costs the relay two). The relay's
//! RSS must grow by less than 512 bytes per connection (the benchmark issue's aim; a session
//! is ~300 B of it).
//!
//! CPU: a relay holding idle connections must not wake up at all (no polling main thread, no
//! ticking worker without a due timer), and must still answer SIGTERM at once.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const N: usize = 9_000;

/// Origin that answers every upgrade with a correct 101 and then holds the socket.
async fn hold_origin(l: TcpListener) {
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let mut n = 0;
            while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf[n..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => n += k,
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]).into_owned();
            let key = header(&head, "sec-websocket-key").unwrap_or_default();
            let accept = relay::proto::http::accept_key(key.as_bytes());
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            drop(buf);
            if s.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
            let mut b = [0u8; 1];
            let _ = s.read(&mut b).await;
        });
    }
}

async fn open(relay: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(relay).await.unwrap();
    s.write_all(upgrade_request("mem.test", "/").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::with_capacity(256);
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    s
}

/// A tokio runtime for the clients, and a holding origin on it.
fn runtime_and_origin() -> (tokio::runtime::Runtime, std::net::SocketAddr) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let origin = listener.local_addr().unwrap();
    rt.spawn(hold_origin(listener));
    (rt, origin)
}

#[test]
fn idle_relayed_connection_costs_under_512_bytes_of_relay_rss() {
    let (rt, origin) = runtime_and_origin();

    let relay = Relay::quick(origin, &["--workers", "2"]);
    let addr = relay.addr;

    // Warm up: buffers, slab and allocator reach their steady state.
    rt.block_on(async {
        let mut warm = Vec::new();
        for _ in 0..200 {
            warm.push(open(addr).await);
        }
    });
    relay.wait_for(
        "warm-up connections to close",
        Duration::from_secs(40),
        |r| r.active() == 0.0,
    );
    let before = relay.rss_bytes();

    let conns = rt.block_on(async {
        let mut tasks = Vec::new();
        for chunk in 0..(N / 500) {
            tasks.push(tokio::spawn(async move {
                let mut v = Vec::with_capacity(500);
                for _ in 0..500 {
                    v.push(open(addr).await);
                }
                let _ = chunk;
                v
            }));
        }
        let mut all = Vec::with_capacity(N);
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    assert_eq!(conns.len(), N);
    relay.wait_for("all connections relayed", Duration::from_secs(30), |r| {
        r.active() == N as f64
    });
    let after = relay.rss_bytes();
    let per_conn = (after.saturating_sub(before)) as f64 / N as f64;
    println!(
        "relay RSS {} KiB -> {} KiB for {N} idle relayed connections: {per_conn:.0} bytes per connection",
        before / 1024,
        after / 1024
    );
    assert!(per_conn < 512.0, "{per_conn:.0} bytes per idle connection");
    drop(conns);
    relay.wait_for("connections to close", Duration::from_secs(40), |r| {
        r.active() == 0.0
    });
}

/// Context switches (voluntary and involuntary) of each thread of process `pid`, by name.
fn context_switches(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let mut by_thread = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
        let name = status
            .lines()
            .next()
            .unwrap_or("")
            .trim_start_matches("Name:")
            .trim();
        let name = format!("{name}/{}", task.file_name().unwrap().to_string_lossy());
        for line in status.lines() {
            if line.contains("ctxt_switches:") {
                let n: u64 = line.rsplit('\t').next().unwrap().trim().parse().unwrap();
                *by_thread.entry(name.clone()).or_insert(0) += n;
            }
        }
    }
    by_thread
}

#[test]
fn idle_relay_sleeps_until_something_happens_and_still_drains_at_once() {
    let (rt, origin) = runtime_and_origin();

    // Short handshake deadlines: their wheel entries stay armed after the upgrade (entries are
    // never removed early) and wake the worker once when they fall due, ignored. With 1 s
    // they are all behind us when the measured window starts.
    let config = format!(
        r#"
[workers]
count = 2
[[listener]]
address = "{{LISTEN}}"
[timeouts]
handshake = "1s"
origin_connect = "1s"
origin_handshake = "1s"
idle = "10m"
[[pool]]
name = "p"
origins = ["{origin}"]
[[route]]
pool = "p"
"#
    );
    let mut relay = Relay::with_config(&config, &[]);
    let addr = relay.addr;
    let conns = rt.block_on(async {
        let mut v = Vec::with_capacity(500);
        for _ in 0..500 {
            v.push(open(addr).await);
        }
        v
    });
    relay.wait_for("all connections relayed", Duration::from_secs(30), |r| {
        r.active() == 500.0
    });
    // Parking (1 s), the handshake deadlines' stale entries (1 s) and the once-a-second memory
    // trim after the ramp are the last duties; after them nothing is due (idle timeout
    // 10 min) and no byte moves, so for three seconds no thread should run.
    std::thread::sleep(Duration::from_millis(2500));
    let before = context_switches(relay.pid());
    std::thread::sleep(Duration::from_secs(3));
    let after = context_switches(relay.pid());
    let per_thread: Vec<String> = after
        .iter()
        .map(|(t, n)| format!("{t}: {}", n - before.get(t).copied().unwrap_or(0)))
        .collect();
    let woke: u64 = after.values().sum::<u64>() - before.values().sum::<u64>();
    println!("relay threads switched {woke} times in 3 s holding 500 idle relayed connections ({per_thread:?})");
    // The old design woke 50 times a second in the main thread and 10 in each worker (180+).
    assert!(
        woke <= 2,
        "an idle relay woke {woke} times in 3 s: {per_thread:?}"
    );

    // Still alive: a new connection is upgraded through the origin (`open` checks the 101)
    // and counted. (No data on it: the holding origin ends a connection at its first byte.)
    let extra = rt.block_on(open(addr));
    relay.wait_for("the new connection", Duration::from_secs(5), |r| {
        r.active() == 501.0
    });

    drop(conns);
    drop(extra);
    relay.wait_for("connections to close", Duration::from_secs(40), |r| {
        r.active() == 0.0
    });
    std::thread::sleep(Duration::from_millis(1500));
    let start = Instant::now();
    let status = relay.terminate();
    let took = start.elapsed();
    assert!(status.success(), "relay exited with {status}");
    assert!(
        took < Duration::from_millis(500),
        "a quiet relay took {took:?} to drain and exit after SIGTERM"
    );
}
