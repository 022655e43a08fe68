//! The control plane: process start-up and shutdown, signals, the admin listener.
//!
//! [`run`] starts one worker thread per configured CPU, waits until each has its ring and
//! listeners, then serves signals: SIGTERM or SIGINT starts a drain (workers stop accepting
//! and let live connections finish up to `timeouts.drain`); a second one stops at once.
//! Workers never block on the control plane: they read its flags after each wake-up, and the
//! main thread signals their inbox eventfds when it raises one.

pub mod access_log;
pub mod admin;
pub mod dashboard;
pub mod stats;
pub mod top;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;

use crate::config::Config;
use crate::reactor::sys;
use crate::session::{run_worker, WorkerHandle, WorkerInit};
use crate::tls::setup::ListenerTls;
use crate::tls::ClientTls;
use stats::WorkerStats;

/// What wakes the main thread.
enum Event {
    Signal(i32),
    /// Worker `id`'s thread is ending (normally or by a panic).
    WorkerExited(usize),
}

/// Tells the main thread when a worker thread ends: dropped as the thread returns or unwinds.
struct ExitNotice(usize, crossbeam_channel::Sender<Event>);

impl Drop for ExitNotice {
    fn drop(&mut self) {
        let _ = self.1.send(Event::WorkerExited(self.0));
    }
}

/// Flags the main thread raises for the workers.
#[derive(Debug, Default)]
pub struct Control {
    /// Stop accepting; finish live connections up to the drain timeout.
    pub drain: AtomicBool,
    /// Close everything now.
    pub stop: AtomicBool,
}

/// Descriptors kept aside per process (admin listener, log, epoll of the signal thread...).
const FD_RESERVE: u64 = 64;

/// How many connections each worker may hold: the configured limit, or what the descriptor
/// limit allows (two descriptors per relayed connection).
pub fn connection_budget(cfg: &Config, workers: usize, nofile: u64) -> (usize, Option<String>) {
    let per_conn = 2u64;
    let listeners = (cfg.listeners.len() * workers) as u64;
    let usable = nofile.saturating_sub(FD_RESERVE + listeners);
    let auto = (usable / per_conn / workers as u64).max(1) as usize;
    match cfg.limits.max_connections {
        None => (auto, None),
        Some(m) => {
            let need = m as u64 * per_conn * workers as u64 + FD_RESERVE + listeners;
            let warn = (need > nofile).then(|| {
                format!(
                    "RLIMIT_NOFILE is {nofile}, but {workers} workers x limits.max_connections {m} x 2 \
                     descriptors needs {need}: connections past about {auto} per worker will fail \
                     with EMFILE. Raise LimitNOFILE (systemd) / nofile (limits.conf), or lower \
                     limits.max_connections"
                )
            });
            (m as usize, warn)
        }
    }
}

/// Loads every TLS listener's certificates and every TLS pool's trust settings; errors name
/// the config key (`listener[0].tls.certificate[1].key: ...`).
#[allow(clippy::type_complexity)]
pub fn load_tls(
    cfg: &Config,
) -> Result<(Vec<Option<ListenerTls>>, Vec<Option<ClientTls>>), String> {
    let mut listeners = Vec::new();
    for (i, l) in cfg.listeners.iter().enumerate() {
        listeners.push(match &l.tls {
            Some(t) => {
                let lt = ListenerTls::new(t, &format!("listener[{i}].tls"))?;
                let set = lt.store.current();
                tracing::info!(
                    listener = %l.address,
                    certificates = t.certificates.len(),
                    expires = set.not_after,
                    "TLS listener ready"
                );
                Some(lt)
            }
            None => None,
        });
    }
    let mut pools = Vec::new();
    for (i, p) in cfg.pools.iter().enumerate() {
        pools.push(match &p.tls {
            Some(t) => {
                let host = p
                    .host
                    .clone()
                    .unwrap_or_else(|| p.origins[0].ip().to_string());
                Some(ClientTls::new(t, &host, &format!("pool[{i}]"))?)
            }
            None => None,
        });
    }
    Ok((listeners, pools))
}

/// SIGHUP: re-reads certificate and key files. Handshakes from now on use the new ones;
/// live connections keep theirs. A listener whose files fail keeps its old certificates.
fn reload_certificates(listeners: &[Option<ListenerTls>]) {
    let mut any = false;
    for (i, l) in listeners.iter().enumerate() {
        let Some(l) = l else {
            continue;
        };
        any = true;
        match l.reload() {
            Ok(()) => tracing::info!(listener = i, "SIGHUP: certificates reloaded"),
            Err(e) => tracing::error!(
                listener = i,
                "SIGHUP: certificates not reloaded, the previous ones stay in use: {e}"
            ),
        }
    }
    if !any {
        tracing::info!(
            "SIGHUP: no TLS listener to reload; other configuration changes need a restart \
             (a second process can share the ports, see docs/operations.md)"
        );
    }
}

/// Runs relay until it has drained after SIGTERM/SIGINT.
pub fn run(cfg: Config) -> Result<(), String> {
    sys::ignore_sigpipe();
    let thp_off = sys::disable_thp();
    let (nofile, hard) = sys::raise_nofile();
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let workers = cfg.workers.count.unwrap_or(cores.len()).max(1);
    let (max_conns, warn) = connection_budget(&cfg, workers, nofile);
    if let Some(w) = warn {
        tracing::warn!("{w}");
    }
    tracing::info!(
        workers,
        nofile,
        nofile_hard = hard,
        max_connections_per_worker = max_conns,
        data_path = ?cfg.data_path,
        transparent_huge_pages = if thp_off { "off" } else { "system default" },
        "starting relay"
    );

    let (listener_tls, pool_tls) = load_tls(&cfg)?;
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let access_log = match &cfg.access_log {
        Some(a) => Some(
            access_log::AccessLog::start(&a.path, a.max_size)
                .map_err(|e| format!("access_log.path: cannot open {}: {e}", a.path.display()))?,
        ),
        None => None,
    };
    let cfg = Arc::new(cfg);
    let control = Arc::new(Control::default());
    let stats: Vec<Arc<WorkerStats>> = (0..workers).map(|_| Arc::default()).collect();
    let (hub, inboxes) =
        crate::apps::RoomHub::new(workers).map_err(|e| format!("cannot create room hub: {e}"))?;
    let mut inboxes = inboxes.into_iter();
    let (tx, rx) = crossbeam_channel::unbounded();
    let (events_tx, events) = crossbeam_channel::unbounded();
    let mut handles = Vec::new();
    for id in 0..workers {
        let init = WorkerInit {
            id,
            cpu: if cfg.workers.pin && !cores.is_empty() {
                Some(cores[id % cores.len()])
            } else {
                None
            },
            config: cfg.clone(),
            stats: stats[id].clone(),
            control: control.clone(),
            max_connections: max_conns,
            access_log: access_log.as_ref().map(|a| a.sender.clone()),
            hub: hub.clone(),
            inbox: inboxes.next().expect("one inbox per worker"),
            listener_tls: listener_tls
                .iter()
                .map(|l| l.as_ref().map(|l| l.for_worker()).transpose())
                .collect::<Result<_, _>>()?,
            pool_tls: pool_tls.clone(),
        };
        let tx = tx.clone();
        let notice = ExitNotice(id, events_tx.clone());
        let thread = std::thread::Builder::new()
            .name(format!("relay-w{id}"))
            .spawn(move || {
                let _notice = notice;
                run_worker(init, tx)
            })
            .map_err(|e| format!("cannot start worker thread: {e}"))?;
        handles.push(WorkerHandle { id, thread });
    }
    drop(tx);
    let mut failure = None;
    for _ in 0..workers {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(desc)) => tracing::info!("{desc}"),
            Ok(Err(e)) => {
                failure.get_or_insert(e);
            }
            Err(_) => {
                failure.get_or_insert("a worker did not start within 10 s".into());
            }
        }
    }
    let admin = match (&failure, cfg.admin) {
        (None, Some(addr)) => match admin::start(addr, stats.clone(), cfg.clone(), hub.clone()) {
            Ok(a) => Some(a),
            Err(e) => {
                failure = Some(format!("cannot listen on admin.address {addr}: {e}"));
                None
            }
        },
        _ => None,
    };
    if let Some(e) = failure {
        control.drain.store(true, Ordering::Release);
        control.stop.store(true, Ordering::Release);
        for h in handles {
            let _ = h.thread.join();
        }
        if let Some(a) = access_log {
            a.finish();
        }
        return Err(e);
    }
    tracing::info!(
        workers,
        admin = cfg
            .admin
            .map(|a| a.to_string())
            .unwrap_or_else(|| "off".into()),
        "relay ready"
    );

    // The main thread sleeps until something happens: a signal (forwarded by a small thread
    // blocked in signal-hook's self-pipe) or a worker thread ending. No polling, so an idle
    // relay process costs no wake-ups here (bench-million runs a hundred of them).
    let signal_handle = signals.handle();
    let forward = events_tx.clone();
    std::thread::Builder::new()
        .name("relay-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if forward.send(Event::Signal(sig)).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    drop(events_tx);
    let mut draining_since: Option<Instant> = None;
    let mut exited = 0;
    while exited < handles.len() {
        let Ok(event) = events.recv() else { break };
        match event {
            Event::Signal(SIGUSR1) => {
                if let Some(a) = &access_log {
                    a.reopen.store(true, Ordering::Release);
                    tracing::info!("SIGUSR1: reopening the access log");
                }
            }
            Event::Signal(SIGHUP) => reload_certificates(&listener_tls),
            Event::Signal(_) if draining_since.is_some() => {
                tracing::warn!("second stop signal: closing every connection now");
                control.stop.store(true, Ordering::Release);
                hub.wake_all();
            }
            Event::Signal(_) => {
                tracing::info!(
                    drain = ?cfg.timeouts.drain,
                    "stop signal: draining (stop accepting, let connections finish)"
                );
                draining_since = Some(Instant::now());
                control.drain.store(true, Ordering::Release);
                hub.wake_all();
            }
            Event::WorkerExited(_) if draining_since.is_some() => exited += 1,
            Event::WorkerExited(id) => {
                // A worker ended without being asked to: it panicked. Its connections are
                // gone; stop the others and exit non-zero so the supervisor (systemd
                // Restart=on-failure) starts a fresh process.
                tracing::error!(
                    worker = id,
                    "a worker thread ended unexpectedly; stopping relay"
                );
                control.drain.store(true, Ordering::Release);
                control.stop.store(true, Ordering::Release);
                hub.wake_all();
                signal_handle.close();
                finish(handles, admin, access_log);
                return Err(
                    "a worker thread panicked (see the log above); exiting with failure".into(),
                );
            }
        }
    }
    signal_handle.close();
    finish(handles, admin, access_log);
    tracing::info!("relay stopped");
    Ok(())
}

/// Joins the worker threads, then stops the admin listener and flushes the access log.
fn finish(
    handles: Vec<WorkerHandle>,
    admin: Option<admin::Admin>,
    access_log: Option<access_log::AccessLog>,
) {
    for h in handles {
        if h.thread.join().is_err() {
            tracing::error!(worker = h.id, "worker thread panicked");
        }
    }
    if let Some(a) = admin {
        a.stop();
    }
    // Workers have handed over their last records; wait until they are on disk.
    if let Some(a) = access_log {
        a.finish();
    }
}
