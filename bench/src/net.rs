//! Address handling shared by the subcommands: the loopback-only rule, source-address
//! ranges, socket set-up, and process figures read from /proc.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};

use anyhow::{anyhow, bail, Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

/// True for 127.0.0.0/8, ::1 and IPv4-mapped 127.0.0.0/8.
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Parses `HOST:PORT` and refuses anything that is not a loopback address: this tool
/// only ever sends load to the machine it runs on. HOST is an IP literal (`[::1]` for
/// IPv6) or `localhost`; other names are refused without being looked up.
pub fn loopback_target(target: &str) -> Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = if let Ok(a) = target.parse::<SocketAddr>() {
        vec![a]
    } else {
        let (host, _port) = target
            .rsplit_once(':')
            .ok_or_else(|| anyhow!("--target {target:?}: expected HOST:PORT"))?;
        if !host.eq_ignore_ascii_case("localhost") {
            bail!(
                "refusing --target {target:?}: give a loopback IP (127.0.0.0/8 or [::1]) or \
                 localhost; relay-bench only sends load to this machine"
            );
        }
        target
            .to_socket_addrs()
            .with_context(|| format!("--target {target:?}: expected HOST:PORT"))?
            .collect()
    };
    let Some(first) = addrs.first().copied() else {
        bail!("--target {target:?} resolved to no address");
    };
    if let Some(bad) = addrs.iter().find(|a| !is_loopback(a.ip())) {
        bail!(
            "refusing --target {target:?}: {} is not a loopback address; \
             relay-bench only sends load to 127.0.0.0/8 or ::1",
            bad.ip()
        );
    }
    Ok(first)
}

/// Where outgoing connections bind before connecting.
#[derive(Debug, Clone)]
pub enum Sources {
    /// Let the kernel choose (limited to one source address: ~28k connections per target).
    Any,
    /// An inclusive IPv4 range, used round-robin.
    Range { start: u32, count: u32 },
    /// An explicit list, used round-robin.
    List(Vec<IpAddr>),
}

impl Sources {
    pub fn parse(range: Option<&str>, list: Option<&str>, target: SocketAddr) -> Result<Sources> {
        let s = match (range, list) {
            (Some(_), Some(_)) => bail!("give either --source-range or --sources, not both"),
            (None, None) => return Ok(Sources::Any),
            (Some(r), None) => {
                let (a, b) = r.split_once('-').ok_or_else(|| {
                    anyhow!("--source-range {r:?}: expected A-B, e.g. 127.0.0.2-127.0.255.254")
                })?;
                let a: Ipv4Addr = a
                    .trim()
                    .parse()
                    .with_context(|| format!("--source-range start {a:?}"))?;
                let b: Ipv4Addr = b
                    .trim()
                    .parse()
                    .with_context(|| format!("--source-range end {b:?}"))?;
                let (a, b) = (u32::from(a), u32::from(b));
                if b < a {
                    bail!("--source-range {r:?}: end is before start");
                }
                for ip in [a, b] {
                    if !Ipv4Addr::from(ip).is_loopback() {
                        bail!(
                            "--source-range {r:?}: {} is not in 127.0.0.0/8",
                            Ipv4Addr::from(ip)
                        );
                    }
                }
                Sources::Range {
                    start: a,
                    count: b - a + 1,
                }
            }
            (None, Some(l)) => {
                let mut v = Vec::new();
                for part in l.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    let ip: IpAddr = part
                        .parse()
                        .with_context(|| format!("--sources entry {part:?}"))?;
                    if !is_loopback(ip) {
                        bail!("--sources: {ip} is not a loopback address");
                    }
                    v.push(ip);
                }
                if v.is_empty() {
                    bail!("--sources is empty");
                }
                Sources::List(v)
            }
        };
        let fam_ok = match &s {
            Sources::Any => true,
            Sources::Range { .. } => target.is_ipv4(),
            Sources::List(v) => v.iter().all(|ip| ip.is_ipv4() == target.is_ipv4()),
        };
        if !fam_ok {
            bail!("source addresses and --target {target} are of different address families");
        }
        Ok(s)
    }

    /// Number of distinct source addresses (None for `Any`).
    pub fn count(&self) -> Option<u64> {
        match self {
            Sources::Any => None,
            Sources::Range { count, .. } => Some(*count as u64),
            Sources::List(v) => Some(v.len() as u64),
        }
    }

    /// Source address for connection number `n` (round-robin).
    pub fn pick(&self, n: u64) -> Option<IpAddr> {
        match self {
            Sources::Any => None,
            Sources::Range { start, count } => Some(IpAddr::V4(Ipv4Addr::from(
                start + (n % *count as u64) as u32,
            ))),
            Sources::List(v) => Some(v[(n % v.len() as u64) as usize]),
        }
    }
}

/// A non-blocking TCP socket that has started connecting to `target`, bound first to
/// `source` (port chosen at connect time via IP_BIND_ADDRESS_NO_PORT, so one source
/// address is not limited to the ephemeral range once over all targets).
pub fn start_connect(
    target: SocketAddr,
    source: Option<IpAddr>,
) -> io::Result<std::net::TcpStream> {
    let domain = if target.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let sock = Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    sock.set_tcp_nodelay(true)?;
    if let Some(src) = source {
        sock.set_reuse_address(true)?;
        if src.is_ipv4() {
            // Best effort: without it bind(port 0) reserves an ephemeral port per socket,
            // which still gives ~28k connections per source address.
            let _ = nix::sys::socket::setsockopt(
                &sock,
                nix::sys::socket::sockopt::IpBindAddressNoPort,
                &true,
            );
        }
        sock.bind(&SocketAddr::new(src, 0).into())?;
    }
    match sock.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    Ok(sock.into())
}

/// A non-blocking listener with SO_REUSEPORT (and SO_REUSEADDR) so several threads or
/// processes can each own a listener on the same address.
pub fn reuseport_listener(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let sock = Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.bind(&addr.into())?;
    sock.listen(backlog)?;
    Ok(sock.into())
}

/// The soft RLIMIT_NOFILE (file descriptors a process may hold).
pub fn nofile_limit() -> Option<u64> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _hard)| soft)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (best effort); returns the soft limit
/// in force afterwards.
pub fn raise_nofile() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    nofile_limit()
}

/// A field (in kB) of /proc/<pid>/status, e.g. "VmRSS".
pub fn proc_status_kib(pid: &str, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// This process's resident set size in KiB.
pub fn self_rss_kib() -> Option<u64> {
    proc_status_kib("self", "VmRSS")
}

/// Whether an accept/socket error means "out of descriptors or memory" (back off and retry).
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EMFILE)
            | Some(nix::libc::ENFILE)
            | Some(nix::libc::ENOBUFS)
            | Some(nix::libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_rule() {
        assert!(loopback_target("127.0.0.1:9000").is_ok());
        assert!(loopback_target("127.1.2.3:80").is_ok());
        assert!(loopback_target("[::1]:9000").is_ok());
        assert!(loopback_target("[::ffff:127.0.0.1]:9000").is_ok());
        for bad in [
            "10.0.0.1:80",
            "192.168.1.1:80",
            "8.8.8.8:53",
            "[::2]:80",
            "0.0.0.0:80",
        ] {
            let e = loopback_target(bad).unwrap_err().to_string();
            assert!(e.contains("not a loopback"), "{bad}: {e}");
        }
        assert!(loopback_target("nonsense").is_err());
        assert!(loopback_target("localhost:9000")
            .unwrap()
            .ip()
            .is_loopback());
        let e = loopback_target("example.com:80").unwrap_err().to_string();
        assert!(e.contains("refusing"), "{e}");
    }

    #[test]
    fn sources() {
        let t: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let s = Sources::parse(Some("127.0.0.2-127.0.0.4"), None, t).unwrap();
        assert_eq!(s.count(), Some(3));
        let picks: Vec<_> = (0..4).map(|n| s.pick(n).unwrap().to_string()).collect();
        assert_eq!(picks, ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.2"]);
        let s = Sources::parse(Some("127.0.0.2-127.0.255.254"), None, t).unwrap();
        assert_eq!(s.count(), Some(65533));
        let s = Sources::parse(None, Some("127.0.0.2, 127.0.0.3"), t).unwrap();
        assert_eq!(s.pick(1).unwrap().to_string(), "127.0.0.3");
        assert!(Sources::parse(Some("127.0.0.5-127.0.0.2"), None, t).is_err());
        assert!(Sources::parse(Some("10.0.0.1-10.0.0.2"), None, t).is_err());
        assert!(Sources::parse(None, Some("192.168.0.1"), t).is_err());
        assert!(Sources::parse(Some("127.0.0.2-127.0.0.3"), Some("127.0.0.2"), t).is_err());
        let t6: SocketAddr = "[::1]:9000".parse().unwrap();
        assert!(Sources::parse(Some("127.0.0.2-127.0.0.3"), None, t6).is_err());
        assert!(matches!(
            Sources::parse(None, None, t).unwrap(),
            Sources::Any
        ));
    }

    #[test]
    fn proc_status_reads_rss() {
        assert!(self_rss_kib().unwrap() > 0);
    }
}
