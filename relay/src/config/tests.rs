use super::*;

const GOOD: &str = r#"
data_path = "copy"
[workers]
count = 2
pin = false
[[listener]]
address = "127.0.0.1:8080"
[admin]
address = "127.0.0.1:9090"
[timeouts]
handshake = "5s"
idle = "1m"
[limits]
max_connections = 1000
max_head_bytes = "8KiB"
[[pool]]
name = "chat"
origins = ["127.0.0.1:9000", "127.0.0.1:9001"]
balance = "least-connections"
source_addresses = ["127.0.0.2", "127.0.0.3"]
[[pool]]
name = "api"
origins = ["127.0.0.1:9100"]
[[route]]
host = "*.example.com"
path = "/chat"
pool = "chat"
[[route]]
host = "api.example.com"
pool = "api"
[[route]]
pool = "api"
"#;

#[test]
fn parses_a_full_config() {
    let c = Config::from_toml(GOOD).unwrap();
    assert_eq!(c.workers.count, Some(2));
    assert_eq!(
        c.workers.busy_poll,
        BusyPoll::Off,
        "busy_poll is off unless set"
    );
    for (v, want) in [
        ("50us", BusyPoll::Always(Duration::from_micros(50))),
        ("off", BusyPoll::Off),
        ("0s", BusyPoll::Off),
        ("auto", BusyPoll::Adaptive(AUTO_BUSY_POLL)),
    ] {
        let spin = Config::from_toml(
            &GOOD.replace("pin = false", &format!("pin = false\nbusy_poll = \"{v}\"")),
        );
        assert_eq!(spin.unwrap().workers.busy_poll, want, "busy_poll = {v:?}");
    }
    assert_eq!(c.workers.coalesce(), None, "coalesce is off unless set");
    assert_eq!(c.workers.coalesce_events, 16);
    for (v, want) in [
        ("50us", Some((Duration::from_micros(50), false))),
        ("1ms", Some((Duration::from_millis(1), false))),
        ("auto", Some((AUTO_COALESCE, true))),
        ("off", None),
        ("0us", None),
    ] {
        let c = Config::from_toml(&GOOD.replace(
            "pin = false",
            &format!("pin = false\ncoalesce = \"{v}\"\ncoalesce_events = 32"),
        ))
        .unwrap();
        let want = want.map(|(delay, adaptive)| Coalesce {
            events: 32,
            delay,
            adaptive,
        });
        assert_eq!(c.workers.coalesce(), want, "coalesce = {v:?}");
        // check-config prints it back in a form that resolves to the same setting.
        assert_eq!(
            Config::from_toml(&c.to_toml()).unwrap(),
            c,
            "coalesce = {v:?}"
        );
    }
    assert_eq!(c.timeouts.handshake, Duration::from_secs(5));
    assert_eq!(c.timeouts.origin_connect, Duration::from_secs(5));
    assert_eq!(c.limits.max_head_bytes, 8192);
    assert_eq!(c.pools[0].balance, Balance::LeastConnections);
    assert_eq!(c.pools[0].source_addresses.len(), 2);
    assert_eq!(c.routes[0].target, Target::Pool(0));
    assert_eq!(c.routes[1].target, Target::Pool(1));
}

#[test]
fn routes_first_match_wins() {
    let c = Config::from_toml(GOOD).unwrap();
    assert_eq!(c.route("a.example.com", "/chat/room"), Some(0));
    assert_eq!(c.route("a.b.example.com", "/chat"), Some(0));
    // The wildcard does not match the apex.
    assert_eq!(c.route("example.com", "/chat"), Some(2));
    assert_eq!(c.route("api.example.com", "/chat"), Some(0));
    assert_eq!(c.route("api.example.com", "/v1"), Some(1));
    assert_eq!(c.route("other.org", "/"), Some(2));
}

#[test]
fn no_matching_route() {
    let c = Config::from_toml(
        r#"
[[listener]]
address = "127.0.0.1:1"
[[pool]]
name = "p"
origins = ["127.0.0.1:2"]
[[route]]
host = "a.example"
path = "/ws"
pool = "p"
"#,
    )
    .unwrap();
    assert_eq!(c.route("a.example", "/other"), None);
    assert_eq!(c.route("b.example", "/ws"), None);
}

fn err(text: &str) -> String {
    Config::from_toml(text).unwrap_err().to_string()
}

#[test]
fn errors_name_the_key() {
    let base = GOOD.replace("pool = \"chat\"\n[[route]]", "pool = \"nope\"\n[[route]]");
    let e = err(&base);
    assert!(
        e.starts_with("route[0].pool: no pool named \"nope\""),
        "{e}"
    );

    let e = err(&GOOD.replace("idle = \"1m\"", "idle = \"soon\""));
    assert!(
        e.starts_with("timeouts.idle: \"soon\" is not a duration"),
        "{e}"
    );

    let e = err(&GOOD.replace("\"127.0.0.1:8080\"", "\"localhost\""));
    assert!(e.starts_with("listener[0].address:"), "{e}");

    let e = err(&GOOD.replace("least-connections", "random"));
    assert!(e.starts_with("pool[0].balance:"), "{e}");

    let e = err(&GOOD.replace("\"127.0.0.2\"", "\"::1\""));
    assert!(e.starts_with("pool[0].source_addresses[0]:"), "{e}");

    let e = err(&GOOD.replace("count = 2", "count = 0"));
    assert!(e.starts_with("workers.count:"), "{e}");

    let e = err(&GOOD.replace("pin = false", "pin = false\nbusy_poll = \"soon\""));
    assert!(
        e.starts_with("workers.busy_poll:")
            && e.contains("neither \"auto\", \"off\" nor a duration"),
        "{e}"
    );
    let e = err(&GOOD.replace("pin = false", "pin = false\nbusy_poll = \"5ms\""));
    assert!(
        e.starts_with("workers.busy_poll:") && e.contains("longer than 1ms"),
        "{e}"
    );

    for (line, key, says) in [
        ("coalesce = \"2ms\"", "workers.coalesce:", "longer than 1ms"),
        (
            "coalesce = \"soon\"",
            "workers.coalesce:",
            "neither \"auto\", \"off\" nor a duration",
        ),
        (
            "coalesce = \"10500ns\"",
            "workers.coalesce:",
            "whole number of microseconds",
        ),
        (
            "coalesce_events = 1",
            "workers.coalesce_events:",
            "outside 2..=4096",
        ),
        (
            "coalesce_events = 5000",
            "workers.coalesce_events:",
            "outside 2..=4096",
        ),
    ] {
        let e = err(&GOOD.replace("pin = false", &format!("pin = false\n{line}")));
        assert!(e.starts_with(key) && e.contains(says), "{line}: {e}");
    }

    let e = err(&GOOD.replace("data_path = \"copy\"", "data_path = \"zero\""));
    assert!(e.starts_with("data_path:"), "{e}");

    let e = err(&GOOD.replace("host = \"api.example.com\"", "host = \"a b\""));
    assert!(e.starts_with("route[1].host:"), "{e}");
}

#[test]
fn unknown_keys_are_refused_by_name() {
    let e = err(&GOOD.replace("[timeouts]", "[timeouts]\nhandshak = \"1s\""));
    assert!(e.contains("handshak"), "{e}");
}

#[test]
fn embedded_default_is_valid() {
    let c = Config::embedded();
    assert_eq!(c.listeners[0].address, "127.0.0.1:8080".parse().unwrap());
}

#[test]
fn quick_mode() {
    let listen = ["127.0.0.1:8080".to_string()];
    let origins = ["127.0.0.1:9000".to_string()];
    let c = Config::quick(&Quick {
        listen: &listen,
        origins: &origins,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(c.pools[0].origins.len(), 1);
    assert_eq!(c.route("any", "/x"), Some(0));
    let bad = ["nowhere".to_string()];
    let e = Config::quick(&Quick {
        listen: &listen,
        origins: &bad,
        ..Default::default()
    })
    .unwrap_err();
    assert!(e.to_string().starts_with("pool[0].origins[0]:"), "{e}");
    // No origin: the embedded apps, on the given listeners (TLS ones too).
    let tls = ["127.0.0.1:8443".to_string()];
    let c = Config::quick(&Quick {
        listen: &listen,
        listen_tls: &tls,
        cert_key: Some(("c.pem", "k.pem")),
        ..Default::default()
    })
    .unwrap();
    assert!(c.pools.is_empty());
    assert_eq!(c.listeners.len(), 2);
    assert!(c.listeners[0].tls.is_none());
    let t = c.listeners[1].tls.as_ref().unwrap();
    assert_eq!(t.certificates[0].cert, std::path::PathBuf::from("c.pem"));
    assert!(t.tickets && t.session_cache > 0);
    assert_eq!(c.routes, Config::embedded().routes);
}

#[test]
fn tls_keys_are_validated() {
    let base = "[[listener]]\naddress = \"127.0.0.1:8443\"\n";
    let routes =
        "[[pool]]\nname = \"p\"\norigins = [\"127.0.0.1:9000\"]\n[[route]]\npool = \"p\"\n";
    let e = Config::from_toml(&format!("{base}[listener.tls]\n{routes}")).unwrap_err();
    assert_eq!(e.key, "listener[0].tls.certificate");
    let e = Config::from_toml(&format!(
        "{base}[listener.tls]\nmin_version = \"1.1\"\n[[listener.tls.certificate]]\ncert = \"a\"\nkey = \"b\"\n{routes}"
    ))
    .unwrap_err();
    assert_eq!(e.key, "listener[0].tls.min_version");
    let e = Config::from_toml(&format!(
        "{base}[[listener.tls.certificate]]\ncert = \"a\"\n{routes}"
    ))
    .unwrap_err();
    assert_eq!(e.key, "listener[0].tls.certificate[0].key");
    let c = Config::from_toml(&format!(
        "{base}[[listener.tls.certificate]]\ncert = \"a\"\nkey = \"b\"\nnames = [\"*.x.test\"]\n{routes}"
    ))
    .unwrap();
    assert_eq!(
        c.listeners[0].tls.as_ref().unwrap().certificates[0].names,
        ["*.x.test"]
    );
    // Pools: wss:// origins imply TLS; TLS-only keys on a plain pool are refused.
    let c = Config::from_toml(&format!(
        "{base}[[pool]]\nname = \"s\"\norigins = [\"wss://localhost:9443\"]\ntls_ca = \"ca.pem\"\n[[route]]\npool = \"s\"\n"
    ))
    .unwrap();
    let p = &c.pools[0];
    assert!(p.tls.is_some());
    assert_eq!(p.host.as_deref(), Some("localhost"));
    let e = Config::from_toml(&format!(
        "{base}[[pool]]\nname = \"s\"\norigins = [\"127.0.0.1:9000\"]\ntls_ca = \"ca.pem\"\n[[route]]\npool = \"s\"\n"
    ))
    .unwrap_err();
    assert_eq!(e.key, "pool[0].tls_ca");
    let e = Config::from_toml(&format!(
        "{base}[[pool]]\nname = \"s\"\norigins = [\"wss://127.0.0.1:9443\", \"127.0.0.1:9000\"]\n[[route]]\npool = \"s\"\n"
    ))
    .unwrap_err();
    assert_eq!(e.key, "pool[0].origins[1]");
}

#[test]
fn resolved_config_renders_and_reparses() {
    let c = Config::from_toml(GOOD).unwrap();
    let text = c.to_toml();
    assert!(text.contains("least-connections"), "{text}");
    // What check-config prints is itself a config that resolves to the same thing.
    assert_eq!(Config::from_toml(&text).unwrap(), c, "{text}");
    let e = Config::embedded();
    assert_eq!(Config::from_toml(&e.to_toml()).unwrap(), e);
    let e = Config::embedded().to_toml();
    assert!(e.contains("count = \"auto\""), "{e}");
    assert!(e.contains("max_connections = \"auto\""), "{e}");
}

#[test]
fn sizes() {
    assert_eq!(parse_size("k", "16KiB").unwrap(), 16384);
    assert_eq!(parse_size("k", "2048").unwrap(), 2048);
    assert!(parse_size("k", "12 parsecs").is_err());
}

#[test]
fn the_example_relay_toml_is_valid_and_shows_the_defaults() {
    let text = include_str!("../../../relay.toml");
    let c = Config::from_toml(text).unwrap();
    assert_eq!(c.routes.len(), 3);
    // The example states every default: resolving it must equal resolving bare sections.
    let bare = r#"
[[listener]]
address = "127.0.0.1:8080"
[admin]
address = "127.0.0.1:9090"
[[pool]]
name = "chat"
origins = ["127.0.0.1:9000", "127.0.0.1:9001"]
[[pool]]
name = "api"
origins = ["127.0.0.1:9100"]
[[route]]
name = "chat"
host = "*.example.com"
path = "/chat"
pool = "chat"
[[route]]
name = "api"
host = "api.example.com"
pool = "api"
[[route]]
name = "default"
pool = "chat"
"#;
    assert_eq!(Config::from_toml(bare).unwrap(), c);
}

#[test]
fn app_routes() {
    let c = Config::from_toml(
        r#"
[[listener]]
address = "127.0.0.1:1"
[apps]
publish_token = "s3cret"
slow_member = "drop"
[[route]]
path = "/echo"
app = "echo"
[[route]]
path = "/rooms/"
app = "rooms"
"#,
    )
    .unwrap();
    assert_eq!(c.routes[0].target, Target::App(AppKind::Echo));
    assert_eq!(c.routes[1].target, Target::App(AppKind::Rooms));
    assert_eq!(c.apps.slow_member, SlowMember::Drop);
    assert_eq!(c.apps.ping_interval, Some(Duration::from_secs(30)));
    assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
    let e = err("[[listener]]\naddress = \"127.0.0.1:1\"\n[[route]]\napp = \"chat\"\n");
    assert!(e.starts_with("route[0].app:"), "{e}");
    let e = err("[[listener]]\naddress = \"127.0.0.1:1\"\n[[route]]\npath = \"/\"\n");
    assert!(e.starts_with("route[0].pool: a route needs"), "{e}");
}
