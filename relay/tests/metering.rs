//! Metering: per-route counters and billing records agree with what clients sent and
//! received, to the byte; refusals are counted under their status; a SIGTERM during load
//! leaves exactly one record per connection.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(origin: std::net::SocketAddr, log: &std::path::Path, drain: &str) -> String {
    format!(
        r#"
[workers]
count = 2
[[listener]]
address = "{{LISTEN}}"
[timeouts]
drain = "{drain}"
[access_log]
path = "{}"
[[pool]]
name = "echo"
origins = ["{origin}"]
[[route]]
name = "alpha"
host = "a.test"
pool = "echo"
[[route]]
name = "beta"
host = "b.test"
pool = "echo"
"#,
        log.display()
    )
}

fn temp_log(tag: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("relay-{tag}-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// One connection through relay to the raw echo origin: sends `sizes` as masked frames and
/// reads each echo. Returns (client→origin wire bytes, origin→client wire bytes).
async fn session(relay: std::net::SocketAddr, host: &str, sizes: &[usize]) -> (u64, u64) {
    let mut s = tokio::net::TcpStream::connect(relay).await.unwrap();
    s.write_all(upgrade_request(host, "/meter").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    let (mut up, mut down) = (0u64, 0u64);
    for (i, &n) in sizes.iter().enumerate() {
        let payload: Vec<u8> = (0..n).map(|k| (k + i) as u8).collect();
        let f = client_frame(2, &payload);
        up += f.len() as u64;
        s.write_all(&f).await.unwrap();
        let (op, p) = read_server_frame(&mut s).await;
        assert_eq!((op, &p), (2, &payload));
        down += 2 + if n < 126 { 0 } else { 2 } + n as u64;
    }
    (up, down)
}

fn records(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn counters_and_billing_records_match_the_clients_to_the_byte() {
    let log = temp_log("meter");
    let relay = Relay::with_config(&config(raw_echo_origin(), &log, "30s"), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let plan: Vec<(&str, Vec<usize>)> = vec![
        ("a.test", vec![1, 10, 125]),
        ("a.test", vec![126, 1000]),
        ("a.test", vec![65_535]),
        ("b.test", vec![7]),
        ("b.test", vec![300, 3, 3]),
    ];
    let mut want: HashMap<&str, (u64, u64)> = HashMap::new();
    rt.block_on(async {
        for (host, sizes) in &plan {
            let (u, d) = session(relay.addr, host, sizes).await;
            let e = want
                .entry(if *host == "a.test" { "alpha" } else { "beta" })
                .or_default();
            e.0 += u;
            e.1 += d;
        }
    });
    // Two refusals: one before routing (426), one with no route (404).
    assert_eq!(
        status_of(&raw_exchange(
            relay.addr,
            b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
        )),
        426
    );
    assert_eq!(
        status_of(&raw_exchange(
            relay.addr,
            upgrade_request("c.test", "/").as_bytes()
        )),
        404
    );

    relay.wait_for("routes to be idle", Duration::from_secs(10), |r| {
        r.metric_sum("relay_route_connections_active", &[]) == 0.0
            && r.metric_sum("relay_route_connections_opened_total", &[]) == 5.0
    });
    for (route, (up, down)) in &want {
        let r = format!("route=\"{route}\"");
        assert_eq!(
            relay.metric_sum("relay_route_bytes_total", &[&r, "client_to_origin"]),
            *up as f64,
            "{route} up"
        );
        assert_eq!(
            relay.metric_sum("relay_route_bytes_total", &[&r, "origin_to_client"]),
            *down as f64,
            "{route} down"
        );
    }
    assert_eq!(
        relay.metric_sum("relay_requests_refused_total", &["status=\"426\""]),
        1.0
    );
    assert_eq!(
        relay.metric_sum("relay_requests_refused_total", &["status=\"404\""]),
        1.0
    );
    let (_, stats) = relay.admin_get("/v1/stats");
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["routes"][0]["name"], "alpha");
    assert_eq!(
        stats["routes"][0]["bytes_client_to_origin"],
        want["alpha"].0
    );
    assert!(stats["latency"]["handshake"]["count"].as_u64().unwrap() >= 5);

    // Billing records: written off the data path; wait until all 7 are on disk.
    let start = std::time::Instant::now();
    while records(&log).len() < 7 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "records: {:?}",
            records(&log)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let recs = records(&log);
    assert_eq!(recs.len(), 7);
    for (route, (up, down)) in &want {
        let mine: Vec<_> = recs.iter().filter(|r| r["route"] == *route).collect();
        let u: u64 = mine
            .iter()
            .map(|r| r["bytes_client_to_origin"].as_u64().unwrap())
            .sum();
        let d: u64 = mine
            .iter()
            .map(|r| r["bytes_origin_to_client"].as_u64().unwrap())
            .sum();
        assert_eq!((u, d), (*up, *down), "records of {route}");
        for r in mine {
            assert_eq!(r["status"], 101);
            assert_eq!(r["cause"], "client_close");
            assert_eq!(r["path"], "/meter");
            assert!(r["origin"].as_str().unwrap().starts_with("127.0.0.1:"));
        }
    }
    let refused: Vec<_> = recs.iter().filter(|r| r["cause"] == "refused").collect();
    let mut codes: Vec<u64> = refused
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    codes.sort();
    assert_eq!(codes, vec![404, 426]);
    let _ = std::fs::remove_file(&log);
}

#[test]
fn sigterm_during_load_leaves_exactly_one_record_per_connection() {
    let log = temp_log("drain");
    let mut relay = Relay::with_config(&config(raw_echo_origin(), &log, "1s"), &[]);
    let addr = relay.addr;
    let rt = tokio::runtime::Runtime::new().unwrap();
    const N: usize = 300;
    // Open N connections that keep echoing until relay closes them.
    let (ports, tasks) = rt.block_on(async {
        let mut ports = Vec::new();
        let mut tasks = Vec::new();
        for i in 0..N {
            let mut s = raw_upgrade_host(addr, "b.test", "/load").await;
            ports.push(s.local_addr().unwrap().port());
            tasks.push(tokio::spawn(async move {
                let mut sent = 0u64;
                loop {
                    let f = client_frame(2, &[i as u8; 64]);
                    if s.write_all(&f).await.is_err() {
                        return sent;
                    }
                    let mut h = [0u8; 66];
                    if s.read_exact(&mut h).await.is_err() {
                        return sent;
                    }
                    sent += 1;
                }
            }));
        }
        (ports, tasks)
    });
    relay.wait_for("all connections active", Duration::from_secs(10), |r| {
        r.active() == N as f64
    });
    let st = relay.terminate();
    assert!(st.success(), "{st:?}");
    let moved: u64 = rt.block_on(async {
        let mut n = 0;
        for t in tasks {
            n += t.await.unwrap();
        }
        n
    });
    assert!(moved > 0);
    let recs = records(&log);
    let mut by_port: HashMap<u16, usize> = HashMap::new();
    for r in &recs {
        let port: u16 = r["client"]
            .as_str()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        *by_port.entry(port).or_default() += 1;
    }
    for p in &ports {
        assert_eq!(
            by_port.get(p),
            Some(&1),
            "connection from port {p} has {:?} records",
            by_port.get(p)
        );
    }
    assert_eq!(recs.len(), N, "one record per connection, none extra");
    assert!(
        recs.iter().all(|r| r["cause"] == "drain"),
        "causes: {:?}",
        recs.iter().map(|r| &r["cause"]).collect::<Vec<_>>()
    );
    let total: u64 = recs
        .iter()
        .map(|r| r["bytes_client_to_origin"].as_u64().unwrap())
        .sum();
    assert!(
        total >= moved * 70,
        "records count at least the echoed frames"
    );
    let _ = std::fs::remove_file(&log);
}
