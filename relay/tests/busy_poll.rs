//! `workers.busy_poll`: a worker whose ring runs empty keeps polling it for a while before it
//! sleeps. Relayed messages still come back intact, and the spin shows in
//! `relay_busy_poll_hits_total` (waits answered without sleeping); with it off (the
//! default) that counter stays at zero.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

fn config(origin: std::net::SocketAddr, busy_poll: &str) -> String {
    format!(
        r#"
[workers]
count = 1
pin = false
busy_poll = "{busy_poll}"
[[listener]]
address = "{{LISTEN}}"
[[pool]]
name = "o"
origins = ["{origin}"]
[[route]]
name = "all"
pool = "o"
"#
    )
}

/// One message in flight on each of 4 connections, 100 round trips each.
async fn ping_pong(relay: &Relay) {
    let mut conns = Vec::new();
    for _ in 0..4 {
        let (ws, _) = tokio_tungstenite::connect_async(relay.url("/bp"))
            .await
            .unwrap();
        conns.push(ws);
    }
    for round in 0..100 {
        for (i, ws) in conns.iter_mut().enumerate() {
            let m = format!("round {round} conn {i}");
            ws.send(Message::Text(m.clone())).await.unwrap();
            let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .expect("an echo within 5 s")
                .expect("open")
                .expect("a message");
            assert_eq!(got, Message::Text(m));
        }
    }
    for mut ws in conns {
        ws.close(None).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_poll_answers_waits_without_sleeping_and_off_never_spins() {
    let origin = ws_origin(OriginMode::Echo);

    let spinning = Relay::with_config(&config(origin.addr, "500us"), &[]);
    ping_pong(&spinning).await;
    let hits = spinning.metric_sum("relay_busy_poll_hits_total", &[]);
    // 400 round trips, each waiting on the origin's echo: with a 500 µs spin most of those
    // waits end while spinning on a loopback origin.
    assert!(hits > 0.0, "no wait was answered by the spin");

    let sleeping = Relay::with_config(&config(origin.addr, "off"), &[]);
    ping_pong(&sleeping).await;
    assert_eq!(
        sleeping.metric_sum("relay_busy_poll_hits_total", &[]),
        0.0,
        "busy_poll = \"off\" spun"
    );
}
