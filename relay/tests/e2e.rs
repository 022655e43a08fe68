//! End-to-end: the real relay binary between real WebSocket clients and origins.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream as StdStream;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;

fn big_config() -> WebSocketConfig {
    WebSocketConfig {
        max_message_size: None,
        max_frame_size: None,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_binary_large_and_ping_round_trip() {
    let origin = ws_origin(OriginMode::Echo);
    let relay = Relay::quick(origin.addr, &[]);
    let fds = relay.open_fds();
    let (mut ws, resp) =
        tokio_tungstenite::connect_async_with_config(relay.url("/chat"), Some(big_config()), false)
            .await
            .unwrap();
    assert_eq!(resp.status(), 101);

    ws.send(Message::Text("hello relay".into())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Text("hello relay".into())
    );

    let bin: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    ws.send(Message::Binary(bin.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Binary(bin));

    // 16 MiB, patterned so a reordered or dropped buffer would show.
    let big: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
    ws.send(Message::Binary(big.clone())).await.unwrap();
    match ws.next().await.unwrap().unwrap() {
        Message::Binary(b) => assert!(b == big, "16 MiB message came back altered"),
        m => panic!("unexpected {m:?}"),
    }

    ws.send(Message::Ping(b"are you there".to_vec()))
        .await
        .unwrap();
    match ws.next().await.unwrap().unwrap() {
        Message::Pong(p) => assert_eq!(p, b"are you there"),
        m => panic!("expected pong, got {m:?}"),
    }
    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}
    drop(ws);

    // The origin saw the forwarding headers.
    let h = origin.headers.lock().unwrap()[0].clone();
    assert!(h.contains("x-forwarded-for: 127.0.0.1"), "{h}");
    assert!(h.contains("x-forwarded-proto: http"), "{h}");
    assert!(h.contains("forwarded: for=127.0.0.1;proto=http"), "{h}");

    let sent = relay.metric_sum("relay_bytes_total", &["client_to_origin"]);
    assert!(sent > (16 << 20) as f64, "bytes counter {sent}");
    relay.assert_no_leak(fds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_codes_and_reasons_pass_both_ways() {
    let origin = ws_origin(OriginMode::Echo);
    let relay = Relay::quick(origin.addr, &[]);
    let fds = relay.open_fds();

    // Client closes with 4001.
    let (mut ws, _) = tokio_tungstenite::connect_async(relay.url("/"))
        .await
        .unwrap();
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4001),
        reason: "client says bye".into(),
    }))
    .await
    .unwrap();
    while ws.next().await.is_some() {}
    drop(ws);
    let start = Instant::now();
    while origin.closes.lock().unwrap().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        origin.closes.lock().unwrap()[0],
        (4001, "client says bye".to_string())
    );

    // Origin closes with 4002.
    let (mut ws, _) = tokio_tungstenite::connect_async(relay.url("/"))
        .await
        .unwrap();
    ws.send(Message::Text("close-me:4002".into()))
        .await
        .unwrap();
    let mut got = None;
    while let Some(m) = ws.next().await {
        if let Ok(Message::Close(Some(f))) = m {
            got = Some((u16::from(f.code), f.reason.to_string()));
        }
    }
    drop(ws);
    assert_eq!(got, Some((4002, "origin says bye".to_string())));
    relay.assert_no_leak(fds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_connections_use_every_worker() {
    let origin = ws_origin(OriginMode::Echo);
    let relay = Relay::quick(origin.addr, &["--workers", "2"]);
    let fds = relay.open_fds();
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let url = relay.url("/many");
        tasks.push(tokio::spawn(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            let msg = format!("message {i}");
            ws.send(Message::Text(msg.clone())).await.unwrap();
            assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text(msg));
            ws
        }));
    }
    let mut conns = Vec::new();
    for t in tasks {
        conns.push(t.await.unwrap());
    }
    assert_eq!(relay.active(), 1000.0);
    let w0 = relay.metric_sum("relay_connections_upgraded_total", &["worker=\"0\""]);
    let w1 = relay.metric_sum("relay_connections_upgraded_total", &["worker=\"1\""]);
    assert_eq!(w0 + w1, 1000.0);
    assert!(w0 > 0.0 && w1 > 0.0, "all on one worker: {w0} / {w1}");
    for mut ws in conns {
        ws.close(None).await.unwrap();
        while ws.next().await.is_some() {}
    }
    relay.assert_no_leak(fds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_frame_in_the_same_write_as_the_head_is_relayed() {
    let relay = Relay::quick(raw_echo_origin(), &[]);
    let mut s = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let mut bytes = upgrade_request("test.local", "/early").into_bytes();
    bytes.extend(client_frame(1, b"early bird"));
    s.write_all(&bytes).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(
        header(&head, "sec-websocket-accept").unwrap(),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
    assert_eq!(read_server_frame(&mut s).await, (1, b"early bird".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_frame_right_behind_the_101_is_relayed() {
    // A text frame "hi" glued to the 101.
    let origin = raw_101_origin(b"\x81\x02hi");
    let relay = Relay::quick(origin, &[]);
    let mut s = raw_upgrade(relay.addr, "/").await;
    assert_eq!(read_server_frame(&mut s).await, (1, b"hi".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_dying_mid_stream_closes_the_client() {
    let origin = ws_origin(OriginMode::EchoOrDie);
    let relay = Relay::quick(origin.addr, &[]);
    let fds = relay.open_fds();
    let (mut ws, _) = tokio_tungstenite::connect_async(relay.url("/"))
        .await
        .unwrap();
    ws.send(Message::Text("still here".into())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Text("still here".into())
    );
    ws.send(Message::Text("die".into())).await.unwrap();
    // The client sees its connection end (no close frame: the origin vanished).
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "client was not closed after the origin died");
    drop(ws);
    relay.assert_no_leak(fds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_closes_the_origin_connection() {
    let origin = ws_origin(OriginMode::Echo);
    let relay = Relay::quick(origin.addr, &[]);
    let fds = relay.open_fds();
    let s = raw_upgrade(relay.addr, "/").await;
    let std = s.into_std().unwrap();
    let sock = socket2::SockRef::from(&std);
    sock.set_linger(Some(Duration::ZERO)).unwrap();
    drop(std); // RST
    let start = Instant::now();
    while origin.ended.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "origin connection still open"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    relay.assert_no_leak(fds);
    assert_eq!(
        relay.metric_sum("relay_connections_closed_total", &["client_error"]),
        1.0
    );
}

#[test]
fn non_101_answer_reaches_the_client_as_it_came() {
    let origin = raw_origin(b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nX-Why: token\r\nContent-Length: 10\r\n\r\nno access\n");
    let relay = Relay::quick(origin, &[]);
    let fds = relay.open_fds();
    let a = raw_exchange(relay.addr, upgrade_request("x", "/").as_bytes());
    assert!(a.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{a}");
    assert!(a.contains("X-Why: token\r\n"));
    assert!(a.ends_with("\r\n\r\nno access\n"), "{a:?}");
    relay.assert_no_leak(fds);
}

fn refused(relay: &Relay, req: &str) -> (u16, String) {
    let a = raw_exchange(relay.addr, req.as_bytes());
    if !a.contains("Connection: close\r\n") {
        std::thread::sleep(Duration::from_millis(300));
        panic!("no answer: {a}\n{}", relay.log());
    }
    (status_of(&a), a)
}

#[test]
fn every_error_status_from_the_request_that_causes_it() {
    let origin = ws_origin(OriginMode::Echo);
    let cfg = format!(
        r#"
[workers]
count = 1
[[listener]]
address = "{{LISTEN}}"
[timeouts]
handshake = "1s"
origin_connect = "1s"
origin_handshake = "1s"
[limits]
max_head_bytes = 4096
[[pool]]
name = "echo"
origins = ["{}"]
[[pool]]
name = "refusing"
origins = ["127.0.0.1:{}"]
[[pool]]
name = "silent"
origins = ["{}"]
[[pool]]
name = "bad-accept"
origins = ["{}"]
[[pool]]
name = "black-hole"
origins = ["{}"]
[[route]]
host = "refused.test"
pool = "refusing"
[[route]]
host = "silent.test"
pool = "silent"
[[route]]
host = "bad.test"
pool = "bad-accept"
[[route]]
host = "hole.test"
pool = "black-hole"
[[route]]
host = "*.echo.test"
pool = "echo"
"#,
        origin.addr,
        free_port(),
        raw_origin(b""),
        raw_origin(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: d3Jvbmc=\r\n\r\n"),
        black_hole(),
    );
    let relay = Relay::with_config(&cfg, &[]);
    let fds = relay.open_fds();

    let (s, a) = refused(&relay, "GARBAGE\r\n\r\n");
    assert_eq!(s, 400, "{a}");
    assert!(a.contains("malformed"), "{a}");
    let (s, a) = refused(
        &relay,
        &upgrade_request("a.echo.test", "/")
            .replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
    );
    assert_eq!(s, 400, "{a}");
    assert!(a.contains("Sec-WebSocket-Key"), "{a}");

    let (s, a) = refused(&relay, &upgrade_request("nowhere.test", "/"));
    assert_eq!(s, 404, "{a}");
    assert!(a.contains("no route"), "{a}");

    let (s, a) = refused(&relay, "GET / HTTP/1.1\r\nHost: a.echo.test\r\n\r\n");
    assert_eq!(s, 426, "{a}");
    assert!(a.contains("Upgrade: websocket\r\n"), "{a}");
    let (s, a) = refused(
        &relay,
        &upgrade_request("a.echo.test", "/").replace("Version: 13", "Version: 8"),
    );
    assert_eq!(s, 426, "{a}");
    assert!(a.contains("Sec-WebSocket-Version: 13\r\n"), "{a}");

    let big = upgrade_request("a.echo.test", "/").replace(
        "\r\n\r\n",
        &format!("\r\nX-Big: {}\r\n\r\n", "b".repeat(5000)),
    );
    let (s, _) = refused(&relay, &big);
    assert_eq!(s, 431);

    let (s, a) = refused(&relay, &upgrade_request("refused.test", "/"));
    assert_eq!(s, 502, "{a}");
    assert!(a.contains("refused"), "{a}");
    // The refusing origin is now marked down on this (only) worker: no healthy origin.
    let (s, a) = refused(&relay, &upgrade_request("refused.test", "/"));
    assert_eq!(s, 503, "{a}");
    assert!(a.contains("no healthy origin"), "{a}");

    let (s, a) = refused(&relay, &upgrade_request("bad.test", "/"));
    assert_eq!(s, 502, "{a}");
    assert!(a.contains("Sec-WebSocket-Accept"), "{a}");

    let (s, a) = refused(&relay, &upgrade_request("silent.test", "/"));
    assert_eq!(s, 504, "{a}");
    let (s, a) = refused(&relay, &upgrade_request("hole.test", "/"));
    assert_eq!(s, 504, "{a}");
    assert!(a.contains("did not accept the connection"), "{a}");

    // 408: a head that never completes.
    let mut c = StdStream::connect(relay.addr).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: a.echo.test\r\n")
        .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut a = String::new();
    let _ = c.read_to_string(&mut a);
    assert_eq!(status_of(&a), 408, "{a}");

    let m = relay.metrics();
    for (code, n) in [
        ("400", 2.0),
        ("404", 1.0),
        ("426", 2.0),
        ("431", 1.0),
        ("502", 2.0),
        ("503", 1.0),
        ("504", 2.0),
        ("408", 1.0),
    ] {
        let got = m
            .get(&format!(
                "relay_requests_refused_total{{worker=\"0\",status=\"{code}\"}}"
            ))
            .copied();
        assert_eq!(got, Some(n), "status {code}");
    }
    relay.assert_no_leak(fds);
}

/// A listener whose accept queue is full, so connects to it hang (SYNs are dropped).
fn black_hole() -> std::net::SocketAddr {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    s.listen(0).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    // Fill the queue (backlog 0 still admits one), then keep the listener alive, never accepting.
    let mut fillers = Vec::new();
    for _ in 0..2 {
        let f = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        f.set_nonblocking(true).unwrap();
        let _ = f.connect(&addr.into());
        fillers.push(f);
    }
    std::thread::sleep(Duration::from_millis(100));
    Box::leak(Box::new((s, fillers)));
    addr
}

#[test]
fn connection_limit_answers_503() {
    let origin = ws_origin(OriginMode::Echo);
    let relay = Relay::quick(origin.addr, &["--workers", "1", "--max-connections", "2"]);
    let fds = relay.open_fds();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = StdStream::connect(relay.addr).unwrap();
        s.write_all(upgrade_request("x", "/").as_bytes()).unwrap();
        let h = read_head(&mut s);
        assert!(h.starts_with("HTTP/1.1 101"), "{h}");
        held.push(s);
    }
    let (s, a) = refused(&relay, &upgrade_request("x", "/"));
    assert_eq!(s, 503, "{a}");
    assert!(a.contains("connection limit"), "{a}");
    drop(held);
    relay.assert_no_leak(fds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_drip_gets_408_and_does_not_hold_the_worker() {
    let origin = ws_origin(OriginMode::Echo);
    let cfg = format!(
        "[workers]\ncount = 1\n[[listener]]\naddress = \"{{LISTEN}}\"\n[timeouts]\nhandshake = \"2s\"\n[[pool]]\nname = \"o\"\norigins = [\"{}\"]\n[[route]]\npool = \"o\"\n",
        origin.addr
    );
    let relay = Relay::with_config(&cfg, &[]);
    let addr = relay.addr;
    let drip = tokio::spawn(async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = upgrade_request("x", "/");
        let start = Instant::now();
        for b in req.bytes() {
            if s.write_all(&[b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            // Stop dripping once the relay has answered.
            let mut probe = [0u8; 1];
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(1), s.peek(&mut probe)).await
            {
                if n > 0 {
                    break;
                }
            }
        }
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        (String::from_utf8_lossy(&out).into_owned(), start.elapsed())
    });
    // While the drip goes on, the single worker keeps serving others.
    for i in 0..5 {
        let (mut ws, _) = tokio_tungstenite::connect_async(relay.url("/"))
            .await
            .unwrap();
        ws.send(Message::Text(format!("meanwhile {i}")))
            .await
            .unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Text(format!("meanwhile {i}"))
        );
    }
    let (answer, took) = drip.await.unwrap();
    assert_eq!(status_of(&answer), 408, "{answer}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[test]
fn two_relay_processes_share_the_port() {
    let origin = ws_origin(OriginMode::Echo);
    let a = Relay::quick(origin.addr, &["--workers", "1"]);
    let b = Relay::quick_on(a.addr, origin.addr, &["--workers", "1"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut conns = Vec::new();
        for i in 0..200 {
            let (mut ws, _) = tokio_tungstenite::connect_async(a.url("/")).await.unwrap();
            ws.send(Message::Text(format!("{i}"))).await.unwrap();
            assert_eq!(
                ws.next().await.unwrap().unwrap(),
                Message::Text(format!("{i}"))
            );
            conns.push(ws);
        }
    });
    let na = a.metric_sum("relay_connections_upgraded_total", &[]);
    let nb = b.metric_sum("relay_connections_upgraded_total", &[]);
    assert_eq!(na + nb, 200.0);
    assert!(
        na > 0.0 && nb > 0.0,
        "one process took everything: {na} / {nb}"
    );
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let origin = ws_origin(OriginMode::Echo);
    let mut relay = Relay::quick(origin.addr, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut ws, _) = rt
        .block_on(tokio_tungstenite::connect_async(relay.url("/")))
        .unwrap();
    let pid = relay.pid().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    // Draining: the live connection still works, new ones are refused.
    relay.wait_for("listeners to close", Duration::from_secs(5), |r| {
        StdStream::connect(r.addr).is_err()
    });
    rt.block_on(async {
        ws.send(Message::Text("during drain".into())).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Text("during drain".into())
        );
        ws.close(None).await.unwrap();
        while ws.next().await.is_some() {}
    });
    let st = relay.terminate();
    assert!(st.success(), "{st:?}\n{}", relay.log());
    assert!(relay.log().contains("relay stopped"));
}
