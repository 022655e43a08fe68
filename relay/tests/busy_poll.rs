//! `workers.busy_poll`: a worker whose ring runs empty keeps polling it for a while before it
//! sleeps. Relayed messages still come back intact, and the spin shows in
//! `relay_busy_poll_hits_total` (waits answered without sleeping); with it off (the
//! default) that counter stays at zero. `"auto"` spins while traffic is dense and stops
//! spinning when it pauses (`relay_busy_poll_misses_total`: spins that ended in a sleep).
//! `--busy-poll` sets the same knob from the command line, with the same limits.

mod common;

use std::time::Duration;

use common::*;

/// One unpinned worker with `busy_poll`, one listener, then `routes`.
fn config_with(busy_poll: &str, routes: &str) -> String {
    format!(
        r#"
[workers]
count = 1
pin = false
busy_poll = "{busy_poll}"
[[listener]]
address = "{{LISTEN}}"
{routes}"#
    )
}

fn config(origin: std::net::SocketAddr, busy_poll: &str) -> String {
    config_with(
        busy_poll,
        &format!("[[pool]]\nname = \"o\"\norigins = [\"{origin}\"]\n[[route]]\nname = \"all\"\npool = \"o\"\n"),
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
            echo(ws, format!("round {round} conn {i}")).await;
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

/// `rounds` round trips on one connection, `gap` apart: every gap is a pause no spin bridges.
async fn sparse(relay: &Relay, rounds: usize, gap: Duration) {
    let (mut ws, _) = tokio_tungstenite::connect_async(relay.url("/sparse"))
        .await
        .unwrap();
    for round in 0..rounds {
        echo(&mut ws, format!("sparse {round}")).await;
        tokio::time::sleep(gap).await;
    }
    ws.close(None).await.unwrap();
}

/// relay's own echo app, no origin: a round trip has one pause, the gap before the next.
fn echo_config(busy_poll: &str) -> String {
    config_with(busy_poll, "[[route]]\napp = \"echo\"\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_stops_spinning_when_traffic_pauses() {
    // Spinning on every pause: each 15 ms gap (and each timer wake-up in it) ends in a
    // miss, a whole spin spent on nothing.
    let always = Relay::with_config(&echo_config("20us"), &[]);
    sparse(&always, 40, Duration::from_millis(15)).await;
    let always_misses = always.metric_sum("relay_busy_poll_misses_total", &[]);
    assert!(
        always_misses >= 40.0,
        "busy_poll = \"20us\": {always_misses} misses over 40 pauses of 15 ms"
    );

    // "auto" never opens its gate on such traffic: only one pause in 16 probes with a spin.
    let auto = Relay::with_config(&echo_config("auto"), &[]);
    sparse(&auto, 40, Duration::from_millis(15)).await;
    let auto_misses = auto.metric_sum("relay_busy_poll_misses_total", &[]);
    assert!(
        auto_misses * 4.0 < always_misses,
        "busy_poll = \"auto\" missed {auto_misses} times on sparse traffic, \
         spinning on every pause missed {always_misses}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_poll_flag_overrides_the_config() {
    let origin = ws_origin(OriginMode::Echo);
    // Quick mode (no config file) with the flag: the spin is on.
    let spinning = Relay::quick(
        origin.addr,
        &["--workers", "1", "--no-pin", "--busy-poll", "500us"],
    );
    ping_pong(&spinning).await;
    assert!(
        spinning.metric_sum("relay_busy_poll_hits_total", &[]) > 0.0,
        "--busy-poll 500us: no wait was answered by the spin"
    );
    // The flag wins over the file: "off" on the command line, 500us in the config.
    let sleeping = Relay::with_config(&config(origin.addr, "500us"), &["--busy-poll", "off"]);
    ping_pong(&sleeping).await;
    assert_eq!(
        sleeping.metric_sum("relay_busy_poll_hits_total", &[]),
        0.0,
        "--busy-poll off did not override workers.busy_poll"
    );
}

#[test]
fn bad_busy_poll_flag_stops_start_up_naming_the_flag() {
    for (value, expect) in [
        ("2ms", "--busy-poll: \"2ms\" is longer than 1ms"),
        (
            "soon",
            "--busy-poll: \"soon\" is neither \"auto\", \"off\" nor a duration",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_relay"))
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--admin", "off", "--busy-poll", value])
            .output()
            .unwrap();
        assert!(!out.status.success(), "--busy-poll {value} started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "--busy-poll {value}: {err}");
    }
}
