//! Idle sockets park (`timeouts.park_idle`, 1 s in the embedded default): a relayed or
//! edge-app connection that goes quiet gives up its armed receives and waits in the worker's
//! epoll set. Bytes, closes and vanishing peers must wake it from either side, with nothing
//! lost, reordered or leaked on the way.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const N: usize = 20;

fn parked(r: &Relay) -> f64 {
    r.metric_sum("relay_parked_sockets", &[])
}

async fn next_msg<S>(ws: &mut S) -> Message
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("an answer within 5 s")
        .expect("the connection is still open")
        .expect("a message")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_relayed_connections_park_and_wake_from_either_side() {
    let origin = ws_origin(OriginMode::EchoOrDie);
    // Parking is a copy-path feature: spliced flows never park.
    let relay = Relay::quick(origin.addr, &["--workers", "2", "--data-path", "copy"]);
    let fds = relay.open_fds();
    let mut conns = Vec::new();
    for i in 0..N {
        let (mut ws, _) = tokio_tungstenite::connect_async(relay.url("/park"))
            .await
            .unwrap();
        ws.send(Message::Text(format!("hello {i}"))).await.unwrap();
        assert_eq!(next_msg(&mut ws).await, Message::Text(format!("hello {i}")));
        conns.push(ws);
    }

    // Both sockets of a connection start parked after the 101 (2N parks), the first message
    // woke them, and silence parks them again (2N more).
    relay.wait_for("every socket parked", Duration::from_secs(10), |r| {
        parked(r) == (2 * N) as f64
    });
    assert_eq!(relay.metric_sum("relay_parks_total", &[]), (4 * N) as f64);

    // The client side wakes first; the origin's answer then wakes the origin side. Several
    // messages of different sizes come back intact and in order.
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    for (i, ws) in conns.iter_mut().enumerate() {
        ws.send(Message::Text(format!("again {i}"))).await.unwrap();
        ws.send(Message::Binary(big.clone())).await.unwrap();
        ws.send(Message::Text(format!("last {i}"))).await.unwrap();
    }
    for (i, ws) in conns.iter_mut().enumerate() {
        assert_eq!(next_msg(ws).await, Message::Text(format!("again {i}")));
        match next_msg(ws).await {
            Message::Binary(b) => assert!(b == big, "200 kB message altered after a park"),
            m => panic!("expected the binary echo, got {m:?}"),
        }
        assert_eq!(next_msg(ws).await, Message::Text(format!("last {i}")));
    }

    // They park again once quiet.
    relay.wait_for("every socket parked again", Duration::from_secs(10), |r| {
        parked(r) == (2 * N) as f64
    });
    assert_eq!(relay.metric_sum("relay_parks_total", &[]), (6 * N) as f64);

    // An origin that vanishes while its socket is parked: the FIN wakes the parked origin
    // socket and the client learns of it (its connection ends).
    let mut gone = conns.pop().unwrap();
    relay.wait_for("the last one parked again", Duration::from_secs(10), |r| {
        parked(r) == (2 * N) as f64
    });
    gone.send(Message::Text("die".into())).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), gone.next())
        .await
        .expect("the client hears of the origin's end within 5 s");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_)))),
        "unexpected {end:?}"
    );

    // Clients that drop their TCP connections while parked: the origins see them end.
    let ended_before = origin.ended.load(Ordering::SeqCst);
    let n_left = conns.len();
    drop(conns);
    drop(gone);
    relay.wait_for(
        "origins to see the clients go",
        Duration::from_secs(10),
        |_| origin.ended.load(Ordering::SeqCst) >= ended_before + n_left,
    );
    relay.assert_no_leak(fds);
    assert_eq!(parked(&relay), 0.0, "the parked gauge counts freed sockets");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parking_off_keeps_receives_armed() {
    let origin = ws_origin(OriginMode::Echo);
    let config = format!(
        r#"
[workers]
count = 1
[[listener]]
address = "{{LISTEN}}"
[timeouts]
park_idle = "off"
[[pool]]
name = "p"
origins = ["{}"]
[[route]]
pool = "p"
"#,
        origin.addr
    );
    let relay = Relay::with_config(&config, &[]);
    let (mut ws, _) = tokio_tungstenite::connect_async(relay.url("/"))
        .await
        .unwrap();
    ws.send(Message::Text("one".into())).await.unwrap();
    assert_eq!(next_msg(&mut ws).await, Message::Text("one".into()));
    // Well past the default park_idle (1 s); relay's timer ticks every 100 ms.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(relay.metric_sum("relay_parks_total", &[]), 0.0);
    ws.send(Message::Text("two".into())).await.unwrap();
    assert_eq!(next_msg(&mut ws).await, Message::Text("two".into()));
}

const APPS: &str = r#"
[workers]
count = 1
[[listener]]
address = "{LISTEN}"
[timeouts]
park_idle = "200ms"
[[route]]
path = "/echo"
app = "echo"
[[route]]
path = "/rooms/"
app = "rooms"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_app_clients_park_and_still_get_messages() {
    let relay = Relay::with_config(APPS, &[]);
    let fds = relay.open_fds();
    let (mut echo, _) = tokio_tungstenite::connect_async(relay.url("/echo"))
        .await
        .unwrap();
    let (mut a, _) = tokio_tungstenite::connect_async(relay.url("/rooms/quiet"))
        .await
        .unwrap();
    let (mut b, _) = tokio_tungstenite::connect_async(relay.url("/rooms/quiet"))
        .await
        .unwrap();
    relay.wait_for("three app sockets parked", Duration::from_secs(10), |r| {
        parked(r) == 3.0
    });

    // A parked echo client wakes on its own message.
    echo.send(Message::Text("still there?".into()))
        .await
        .unwrap();
    assert_eq!(
        next_msg(&mut echo).await,
        Message::Text("still there?".into())
    );

    // A parked room member still receives what others send (sends need no receive), and
    // wakes when it speaks itself.
    a.send(Message::Text("from a".into())).await.unwrap();
    assert_eq!(next_msg(&mut b).await, Message::Text("from a".into()));
    b.send(Message::Binary(vec![7; 3000])).await.unwrap();
    assert_eq!(next_msg(&mut a).await, Message::Binary(vec![7; 3000]));

    // A close handshake from a parked client completes.
    relay.wait_for("all parked again", Duration::from_secs(10), |r| {
        parked(r) == 3.0
    });
    echo.close(None).await.unwrap();
    match next_msg(&mut echo).await {
        Message::Close(_) => {}
        m => panic!("expected the close answer, got {m:?}"),
    }
    drop((a, b));
    relay.assert_no_leak(fds);
    assert_eq!(parked(&relay), 0.0);
}
