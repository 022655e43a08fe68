//! The `relay` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use relay::config::Config;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A thread-per-core io_uring WebSocket relay.
///
/// With no arguments relay runs its embedded default configuration (listen on
/// 127.0.0.1:8080, origin 127.0.0.1:9000, admin on 127.0.0.1:9090).
#[derive(Parser, Debug)]
#[command(name = "relay", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Configuration file (TOML). See relay.toml in the repository for every key.
    #[arg(short, long, value_name = "FILE", conflicts_with_all = ["listen", "listen_tls", "origin"])]
    config: Option<PathBuf>,

    /// Quick mode: address to accept WebSocket upgrades on (repeatable). Without --origin,
    /// relay serves the embedded default's edge apps (/echo, /rooms/{name}, the demo page).
    #[arg(long, value_name = "ADDR")]
    listen: Vec<String>,

    /// Quick mode: address to accept TLS (wss://, https://) on (repeatable); needs --cert
    /// and --key.
    #[arg(long, value_name = "ADDR", requires_all = ["cert", "key"])]
    listen_tls: Vec<String>,

    /// Quick mode: PEM certificate chain (leaf first) for --listen-tls.
    #[arg(long, value_name = "FILE", requires = "listen_tls")]
    cert: Option<String>,

    /// Quick mode: PEM private key for --listen-tls.
    #[arg(long, value_name = "FILE", requires = "listen_tls")]
    key: Option<String>,

    /// Quick mode: origin to relay every upgrade to (repeatable: one pool, round-robin);
    /// IP:PORT, or wss://HOST:PORT for a TLS origin.
    #[arg(long, value_name = "HOST:PORT")]
    origin: Vec<String>,

    /// Admin listener (metrics, health) address, or "off"; overrides the config.
    #[arg(long, value_name = "ADDR")]
    admin: Option<String>,

    /// Worker threads ("auto" = one per allowed CPU); overrides the config.
    #[arg(long, value_name = "N|auto")]
    workers: Option<String>,

    /// How relayed bytes move: copy, splice or auto; overrides the config.
    #[arg(long, value_name = "MODE")]
    data_path: Option<String>,

    /// Per-worker connection limit; overrides the config.
    #[arg(long, value_name = "N")]
    max_connections: Option<u32>,

    /// Do not pin workers to CPUs.
    #[arg(long)]
    no_pin: bool,

    /// Before sleeping on an empty ring, a worker polls it: "off", "auto" (up to 20us
    /// while recent spins were answered) or a duration spun on every pause (e.g. "20us",
    /// at most 1ms); overrides the config's workers.busy_poll.
    #[arg(long, value_name = "auto|off|DURATION")]
    busy_poll: Option<String>,

    /// Hold a sleeping worker's wake-up until --coalesce-events completions are ready or
    /// a delay has passed: "off", "auto" (50us while the completion rate says more will
    /// come meanwhile) or a duration held on every sleep, up to 1ms (e.g. "50us");
    /// overrides the config's workers.coalesce.
    #[arg(long, value_name = "auto|off|DURATION")]
    coalesce: Option<String>,

    /// Completions that end a coalesced wait at once (2 to 4096); overrides the config's
    /// workers.coalesce_events.
    #[arg(long, value_name = "N")]
    coalesce_events: Option<u32>,

    /// Log filter (tracing EnvFilter syntax), e.g. "info" or "relay=debug". Defaults to
    /// $RELAY_LOG, then "info".
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a configuration file and print it fully resolved (defaults filled in).
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Live terminal view of a running relay: per-worker connections, accepts/s, bytes/s
    /// each way, and per-route totals, polled from the admin listener's /v1/stats.
    Top {
        /// Admin listener of the relay to watch.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9090")]
        admin: String,
        /// Seconds between polls (fractions allowed).
        #[arg(long, value_name = "SECONDS", default_value = "1",
              value_parser = relay::control::top::parse_interval)]
        interval: std::time::Duration,
        /// Print one frame (rates over one interval) without escape codes, then exit.
        #[arg(long)]
        once: bool,
    },
}

fn load(cli: &Cli) -> Result<Config, String> {
    let mut cfg = if let Some(path) = &cli.config {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Config::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))?
    } else if !cli.listen.is_empty() || !cli.listen_tls.is_empty() {
        let q = relay::config::Quick {
            listen: &cli.listen,
            listen_tls: &cli.listen_tls,
            cert_key: cli.cert.as_deref().zip(cli.key.as_deref()),
            origins: &cli.origin,
            admin: cli.admin.as_deref(),
        };
        Config::quick(&q).map_err(|e| e.to_string())?
    } else if !cli.origin.is_empty() {
        return Err("--origin needs --listen ADDR or --listen-tls ADDR".into());
    } else {
        Config::embedded()
    };
    if let Some(a) = &cli.admin {
        cfg.admin = match a.as_str() {
            "off" => None,
            a => Some(
                a.parse()
                    .map_err(|_| format!("--admin: {a:?} is not an address with a port"))?,
            ),
        };
    }
    if let Some(w) = &cli.workers {
        cfg.workers.count = match w.as_str() {
            "auto" => None,
            n => match n.parse::<usize>() {
                Ok(n) if (1..=1024).contains(&n) => Some(n),
                _ => {
                    return Err(format!(
                        "--workers: {n:?} is not \"auto\" or a number from 1 to 1024"
                    ))
                }
            },
        };
    }
    if let Some(d) = &cli.data_path {
        cfg.data_path = match d.as_str() {
            "copy" => relay::config::DataPath::Copy,
            "splice" => relay::config::DataPath::Splice,
            "auto" => relay::config::DataPath::Auto,
            other => {
                return Err(format!(
                    "--data-path: {other:?} is not copy, splice or auto"
                ))
            }
        };
    }
    if let Some(m) = cli.max_connections {
        if m == 0 {
            return Err("--max-connections: must be at least 1".into());
        }
        cfg.limits.max_connections = Some(m);
    }
    if cli.no_pin {
        cfg.workers.pin = false;
    }
    if let Some(b) = &cli.busy_poll {
        cfg.workers.busy_poll =
            relay::config::parse_busy_poll("--busy-poll", b).map_err(|e| e.to_string())?;
    }
    if let Some(c) = &cli.coalesce {
        cfg.workers.coalesce =
            relay::config::parse_coalesce("--coalesce", c).map_err(|e| e.to_string())?;
    }
    if let Some(n) = cli.coalesce_events {
        cfg.workers.coalesce_events = relay::config::check_coalesce_events("--coalesce-events", n)
            .map_err(|e| e.to_string())?;
    }
    Ok(cfg)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = cli
        .log
        .clone()
        .or_else(|| std::env::var("RELAY_LOG").ok())
        .unwrap_or_else(|| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();

    if let Some(Command::Top {
        admin,
        interval,
        once,
    }) = &cli.command
    {
        let opts = relay::control::top::Options {
            admin: admin.clone(),
            interval: *interval,
            once: *once,
        };
        return match relay::control::top::run(&opts) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("relay top: {e}");
                ExitCode::from(1)
            }
        };
    }

    if let Some(Command::CheckConfig { file }) = &cli.command {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("relay: cannot read {}: {e}", file.display());
                return ExitCode::from(2);
            }
        };
        let checked = Config::from_toml(&text)
            .map_err(|e| e.to_string())
            .and_then(|c| relay::control::load_tls(&c).map(|_| c));
        return match checked {
            Ok(c) => {
                println!(
                    "# {}: valid; resolved configuration follows",
                    file.display()
                );
                print!("{}", c.to_toml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("relay: {}: {e}", file.display());
                ExitCode::from(2)
            }
        };
    }

    let cfg = match load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("relay: {e}");
            return ExitCode::from(2);
        }
    };
    match relay::control::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay: {e}");
            ExitCode::from(1)
        }
    }
}
