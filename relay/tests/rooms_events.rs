//! The rooms' opt-in event protocol: a member that connects with `?events=1` gets JSON
//! text messages `{"type":"join"|"leave","room":…,"members":N}`; raw fan-out is unchanged.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const CONFIG: &str = r#"
[workers]
count = 1
[[listener]]
address = "{LISTEN}"
[[route]]
path = "/rooms/"
app = "rooms"
"#;

async fn next_text<S>(ws: &mut S) -> String
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(5), ws.next())
            .await
            .expect("a message within 5 s")
            .unwrap()
            .unwrap()
        {
            Message::Text(t) => return t,
            Message::Ping(_) | Message::Pong(_) => {}
            m => panic!("unexpected {m:?}"),
        }
    }
}

fn event(t: &str) -> (String, u64) {
    let v: serde_json::Value = serde_json::from_str(t).unwrap();
    assert_eq!(v["room"], "lobby", "{t}");
    (
        v["type"].as_str().unwrap().to_string(),
        v["members"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_that_ask_get_join_and_leave_events() {
    let relay = Relay::with_config(CONFIG, &[]);
    let (mut a, _) = tokio_tungstenite::connect_async(relay.url("/rooms/lobby?events=1"))
        .await
        .unwrap();
    assert_eq!(event(&next_text(&mut a).await), ("join".into(), 1));
    let (mut b, _) = tokio_tungstenite::connect_async(relay.url("/rooms/lobby"))
        .await
        .unwrap();
    assert_eq!(event(&next_text(&mut a).await), ("join".into(), 2));
    // Raw fan-out is unchanged, and b (who did not ask) gets no events.
    b.send(Message::Text("hello".into())).await.unwrap();
    assert_eq!(next_text(&mut a).await, "hello");
    a.send(Message::Text("hi b".into())).await.unwrap();
    assert_eq!(next_text(&mut b).await, "hi b");
    b.close(None).await.unwrap();
    while b.next().await.is_some() {}
    drop(b);
    assert_eq!(event(&next_text(&mut a).await), ("leave".into(), 1));
}
