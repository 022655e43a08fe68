//! Memory per idle relayed connection: 9,000 upgraded connections held open through the
//! real relay binary (the process cap here is 20,000 descriptors; each relayed connection
//! costs the relay two). The relay's RSS must grow by less than 512 bytes per connection (the
//! benchmark issue's aim; a session is ~300 B of it).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const N: usize = 9_000;

/// Origin that answers every upgrade with a correct 101 and then holds the socket.
async fn hold_origin(l: TcpListener, held: Arc<AtomicUsize>) {
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            continue;
        };
        let held = held.clone();
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
            held.fetch_add(1, Ordering::SeqCst);
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

#[test]
fn idle_relayed_connection_costs_under_512_bytes_of_relay_rss() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let held = Arc::new(AtomicUsize::new(0));
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let origin = listener.local_addr().unwrap();
    rt.spawn(hold_origin(listener, held.clone()));

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
