#!/usr/bin/env python3
"""Helpers for scripts/bench-million.sh (standard library only).

  million.py sample   --dir RUN --interval S --max-seconds S --mem-floor-kib K
      Every S seconds append one JSON line to RUN/samples.jsonl: relays' summed
      relay_connections_active (admin /metrics), relay / origin / load RSS, relay CPU,
      /proc/net/sockstat (TCP inuse, orphan, tw, mem pages), /proc/meminfo, the TCP slab, the
      load processes' progress (open, failures), and print a progress line to stderr. Stops
      when RUN/stop exists, after --max-seconds, or on SIGTERM. Writes RUN/abort (and keeps
      sampling) when MemAvailable falls below --mem-floor-kib, so the script can stop the load.
  million.py snapshot --dir RUN --name NAME
      RUN/snap-NAME.json: slabinfo (per cache: objects, object size, slab bytes), meminfo,
      sockstat, conntrack count, RSS (VmRSS, RssAnon) per process group.
  million.py combine  OUT.svg RUN1/million.svg RUN2/million.svg ...
      Stacks plots into one SVG (docs/million.svg holds the relayed and the echo-app run).
  million.py report   --dir RUN [--docs FILE] [--svg-copy PATH]
      RUN/result.json, RUN/million.svg and RUN/summary.md from plan.json, samples.jsonl,
      events.txt, the two snapshots and the load processes' JSON; prints the summary.
      --docs replaces (or appends) this mode's generated block in FILE.

RUN/procs.txt lists the processes: "GROUP PID [ADMIN_PORT]" per line (GROUP = relay,
origin, load). RUN/events.txt has "EPOCH_SECONDS EVENT" lines written by the script.
"""

import argparse
import concurrent.futures
import glob
import html
import http.client
import json
import math
import os
import re
import signal
import sys
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

PROGRESS_RE = re.compile(
    r"open (\d+)/(\d+)\s+\+(\d+)/s\s+attempted (\d+)\s+connect_fail (\d+)\s+hs_fail (\d+)"
    r"\s+errors (\d+)\s+msgs (\d+) \((\d+)/s\)\s+verify_fail (\d+)"
)


# ----------------------------------------------------------------------------- /proc readers
def read(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def meminfo():
    out = {}
    for line in read("/proc/meminfo").splitlines():
        k, _, v = line.partition(":")
        parts = v.split()
        if parts:
            out[k] = int(parts[0])  # kB
    return out


def sockstat():
    out = {}
    for line in read("/proc/net/sockstat").splitlines():
        if line.startswith("TCP:"):
            f = line.split()[1:]
            for k, v in zip(f[0::2], f[1::2]):
                out[k] = int(v)
        elif line.startswith("sockets:"):
            out["sockets_used"] = int(line.split()[2])
    return out


# TCP counters that tell why connections fail on a saturated box: queues that overflowed,
# packets dropped before TCP saw them, retransmissions and timeouts.
TCP_COUNTERS = {
    "TcpExt": ["ListenOverflows", "ListenDrops", "TCPReqQFullDrop", "TCPReqQFullDoCookies",
               "SyncookiesSent", "TCPBacklogDrop", "TCPSynRetrans", "TCPTimeouts",
               "TCPAbortOnTimeout", "TCPAbortOnMemory", "TCPMemoryPressures", "TCPRcvQDrop",
               "PruneCalled", "TCPOFODrop"],
    "Tcp": ["RetransSegs", "AttemptFails", "InErrs", "OutRsts"],
}


def tcp_counters():
    """Selected /proc/net/netstat and /proc/net/snmp counters, plus softnet backlog drops."""
    out = {}
    for path in ("/proc/net/netstat", "/proc/net/snmp"):
        lines = read(path).splitlines()
        for names, values in zip(lines[0::2], lines[1::2]):
            proto, _, names = names.partition(":")
            want = TCP_COUNTERS.get(proto)
            if not want:
                continue
            for k, v in zip(names.split(), values.partition(":")[2].split()):
                if k in want:
                    out[f"{proto}.{k}"] = int(v)
    # /proc/net/softnet_stat: one line per CPU, hex; column 2 = packets dropped because the
    # CPU's input backlog (netdev_max_backlog; all loopback traffic passes it) was full.
    out["softnet.dropped"] = sum(int(l.split()[1], 16) for l in read("/proc/net/softnet_stat").splitlines() if l.strip())
    return out


def slabinfo():
    """{cache: {"active": n, "num": n, "objsize": b, "bytes": slab bytes}}"""
    out = {}
    for line in read("/proc/slabinfo").splitlines()[2:]:
        f = line.split()
        if len(f) < 16:
            continue
        name = f[0]
        active, num, objsize, _, pages_per_slab = (int(x) for x in f[1:6])
        num_slabs = int(f[14])
        out[name] = {
            "reclaim": read(f"/sys/kernel/slab/{name}/reclaim_account").strip() == "1",
            "active": active,
            "num": num,
            "objsize": objsize,
            "bytes": num_slabs * pages_per_slab * PAGE,
        }
    return out


def cpu_times():
    """(busy jiffies, softirq jiffies, total jiffies) over all CPUs from /proc/stat."""
    for line in read("/proc/stat").splitlines():
        if line.startswith("cpu "):
            v = [int(x) for x in line.split()[1:]]
            idle = v[3] + (v[4] if len(v) > 4 else 0)
            total = sum(v[:8])
            return total - idle, v[6] if len(v) > 6 else 0, total
    return 0, 0, 0


def conntrack():
    v = read("/proc/sys/net/netfilter/nf_conntrack_count").strip()
    return int(v) if v.isdigit() else None


def proc_status(pid):
    """(VmRSS kB, RssAnon kB) or None if the process is gone."""
    s = read(f"/proc/{pid}/status")
    if not s:
        return None
    rss = anon = 0
    for line in s.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("RssAnon:"):
            anon = int(line.split()[1])
    return rss, anon


def proc_ticks(pid):
    s = read(f"/proc/{pid}/stat")
    if not s:
        return None
    f = s[s.rfind(")") + 2:].split()
    return int(f[11]) + int(f[12])  # utime + stime (fields 14, 15)


def other_cpu_ticks(ours):
    """CPU ticks (utime+stime) of every process not started by the benchmark, summed by name:
    kernel threads (kswapd0, kcompactd0, ksoftirqd/N) and the VM's own agents compete with the
    benchmark for the same two CPUs."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in ours:
            continue
        s = read(f"/proc/{d}/stat")
        if not s:
            continue
        name = s[s.find("(") + 1:s.rfind(")")]
        t = proc_ticks(d) or 0
        if t:
            out[name] = out.get(name, 0) + t
    return out


def load_procs(run):
    procs = []
    for line in read(os.path.join(run, "procs.txt")).splitlines():
        f = line.split()
        if len(f) >= 2:
            procs.append((f[0], int(f[1]), int(f[2]) if len(f) > 2 else None))
    return procs


def group_rss(procs):
    out = {}
    for g, pid, _ in procs:
        st = proc_status(pid)
        o = out.setdefault(g, {"rss_kib": 0, "anon_kib": 0, "alive": 0, "count": 0})
        o["count"] += 1
        if st:
            o["rss_kib"] += st[0]
            o["anon_kib"] += st[1]
            o["alive"] += 1
    return out


def relay_metrics(port, timeout=2.0):
    """Sums of a few relay metrics over workers, or None if the admin did not answer."""
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        c.request("GET", "/metrics")
        r = c.getresponse()
        body = r.read().decode("utf-8", "replace")
        c.close()
    except (OSError, http.client.HTTPException):
        return None
    sums = {"active": 0, "accepted": 0, "upgraded": 0, "refused": 0, "refused_by_status": {}}
    names = {
        "relay_connections_active": "active",
        "relay_connections_accepted_total": "accepted",
        "relay_connections_upgraded_total": "upgraded",
        "relay_requests_refused_total": "refused",
    }
    for line in body.splitlines():
        if not line or line[0] == "#":
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        k = names.get(name)
        if k == "refused":
            m = re.search(r'status="([^"]*)"', line)
            if m:
                try:
                    n = int(float(line.rsplit(" ", 1)[1]))
                except ValueError:
                    n = 0
                if n:
                    st = sums["refused_by_status"]
                    st[m.group(1)] = st.get(m.group(1), 0) + n
        if k:
            try:
                sums[k] += int(float(line.rsplit(" ", 1)[1]))
            except ValueError:
                pass
    return sums


def load_progress(run):
    """Sum of the load processes' latest progress lines."""
    tot = dict(open=0, target=0, attempted=0, connect_fail=0, hs_fail=0, errors=0, msgs=0,
               verify_fail=0, reporting=0)
    for path in glob.glob(os.path.join(run, "load-*.err")):
        try:
            with open(path, "rb") as f:
                f.seek(0, 2)
                size = f.tell()
                f.seek(max(0, size - 2048))
                tail = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        m = None
        for m in PROGRESS_RE.finditer(tail):
            pass
        if not m:
            continue
        v = [int(x) for x in m.groups()]
        tot["reporting"] += 1
        tot["open"] += v[0]
        tot["target"] += v[1]
        tot["attempted"] += v[3]
        tot["connect_fail"] += v[4]
        tot["hs_fail"] += v[5]
        tot["errors"] += v[6]
        tot["msgs"] += v[7]
        tot["verify_fail"] += v[9]
    return tot


# ----------------------------------------------------------------------------- sample
def cmd_sample(a):
    run = a.dir
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("now", True))
    signal.signal(signal.SIGINT, lambda *_: stop.__setitem__("now", True))
    t0 = float(read(os.path.join(run, "t0")).strip() or time.time())
    plan = json.loads(read(os.path.join(run, "plan.json"), "{}") or "{}")
    target = plan.get("connections", 0)
    started = time.time()
    last_ticks = {}
    last_t = None
    prev_active = None
    out = open(os.path.join(run, "samples.jsonl"), "a", buffering=1)
    aborted = False
    last_metrics = {}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=32)
    while not stop["now"] and time.time() - started < a.max_seconds:
        if os.path.exists(os.path.join(run, "stop")):
            break
        tick = time.time()
        procs = load_procs(run)
        relays = [(pid, port) for g, pid, port in procs if g == "relay"]
        # Ask every relay at once: one that does not answer within 2 s keeps its last value
        # (counted in relays_stale) instead of stalling the sample.
        ports = [port for _, port in relays if port]
        answers = list(pool.map(relay_metrics, ports)) if ports else []
        reporting = 0
        for port, m in zip(ports, answers):
            if m:
                reporting += 1
                last_metrics[port] = m
        active = sum(last_metrics.get(p, {}).get("active", 0) for p in ports)
        accepted = sum(last_metrics.get(p, {}).get("accepted", 0) for p in ports)
        upgraded = sum(last_metrics.get(p, {}).get("upgraded", 0) for p in ports)
        refused = sum(last_metrics.get(p, {}).get("refused", 0) for p in ports)
        now = time.time()
        ticks = {"relay": 0, "origin": 0, "load": 0}
        for g, pid, _ in procs:
            t = proc_ticks(pid)
            if t is not None:
                last_ticks[pid] = t
            if g in ticks:
                ticks[g] += last_ticks.get(pid, 0)
        machine = cpu_times()
        cpu_pct = other_pct = machine_pct = softirq_pct = None
        if last_t is not None and now > last_t[0]:
            dt = now - last_t[0]
            cpu_pct = round((ticks["relay"] - last_t[1]["relay"]) / CLK_TCK / dt * 100, 1)
            other_pct = round((ticks["origin"] + ticks["load"] - last_t[1]["origin"] - last_t[1]["load"])
                              / CLK_TCK / dt * 100, 1)
            dtot = machine[2] - last_t[2][2]
            if dtot > 0:
                ncpu = os.cpu_count() or 1
                machine_pct = round((machine[0] - last_t[2][0]) / dtot * 100 * ncpu, 1)
                softirq_pct = round((machine[1] - last_t[2][1]) / dtot * 100 * ncpu, 1)
        last_t = (now, ticks, machine)
        mi = meminfo()
        ss = sockstat()
        slab = slabinfo()
        rss = group_rss(procs)
        lp = load_progress(run)
        phase = read(os.path.join(run, "phase")).strip() or "start"
        s = {
            "t": round(now - t0, 2),
            "phase": phase,
            "relay_active": active,
            "relays_reporting": reporting,
            "relays_stale": len(ports) - reporting,
            "relays": len(relays),
            "relay_accepted": accepted,
            "relay_upgraded": upgraded,
            "relay_refused": refused,
            "relay_rss_kib": rss.get("relay", {}).get("rss_kib", 0),
            "relay_anon_kib": rss.get("relay", {}).get("anon_kib", 0),
            "relays_alive": rss.get("relay", {}).get("alive", 0),
            "relay_cpu_pct": cpu_pct,
            "origin_load_cpu_pct": other_pct,
            "machine_cpu_pct": machine_pct,
            "softirq_cpu_pct": softirq_pct,
            "origin_rss_kib": rss.get("origin", {}).get("rss_kib", 0),
            "load_rss_kib": rss.get("load", {}).get("rss_kib", 0),
            "load": lp,
            "failures": lp["connect_fail"] + lp["hs_fail"] + lp["errors"] + lp["verify_fail"],
            "tcp_inuse": ss.get("inuse", 0),
            "tcp_orphan": ss.get("orphan", 0),
            "tcp_tw": ss.get("tw", 0),
            "tcp_mem_bytes": ss.get("mem", 0) * 4096,
            "sockets_used": ss.get("sockets_used", 0),
            "slab_tcp_bytes": slab.get("TCP", {}).get("bytes", 0),
            "slab_kib": mi.get("Slab", 0),
            "mem_available_kib": mi.get("MemAvailable", 0),
            "mem_total_kib": mi.get("MemTotal", 0),
            "conntrack": conntrack(),
        }
        out.write(json.dumps(s) + "\n")
        rate = ""
        stale = f" ({len(ports) - reporting} stale)" if reporting < len(ports) else ""
        if prev_active is not None:
            rate = f"(+{(active - prev_active[1]) / max(0.001, now - prev_active[0]):,.0f}/s)"
        prev_active = (now, active)
        cpu = f"{cpu_pct:.0f}%" if cpu_pct is not None else "-"
        if machine_pct is not None:
            cpu += f" (box {machine_pct:.0f}%)"
        print(
            f"[{s['t']:7.0f}s] {phase:<8} relays {active:,}/{target:,}{stale} {rate:<11} "
            f"load open {lp['open']:,}  fail {s['failures']}  refused {refused}  "
            f"relay RSS {s['relay_rss_kib'] / 1024:,.0f} MiB cpu {cpu}  "
            f"TCP inuse {s['tcp_inuse']:,} tw {s['tcp_tw']:,} mem {s['tcp_mem_bytes'] / 2**20:,.0f} MiB  "
            f"slab {s['slab_kib'] / 2**20:,.2f} GiB  avail {s['mem_available_kib'] / 2**20:,.2f} GiB",
            file=sys.stderr,
            flush=True,
        )
        if not aborted and s["mem_available_kib"] < a.mem_floor_kib:
            aborted = True
            with open(os.path.join(run, "abort"), "w") as f:
                f.write(f"MemAvailable {s['mem_available_kib']} KiB < floor {a.mem_floor_kib} KiB\n")
            print(f"{os.path.basename(sys.argv[0])}: MemAvailable below the floor, asking the script to stop",
                  file=sys.stderr, flush=True)
        # Sleep to the next interval boundary (sampling itself takes time).
        while not stop["now"] and time.time() < tick + a.interval:
            if os.path.exists(os.path.join(run, "stop")):
                break
            time.sleep(min(0.25, max(0.0, tick + a.interval - time.time())))
    out.close()
    pool.shutdown(wait=False)


# ----------------------------------------------------------------------------- snapshot
def cmd_snapshot(a):
    procs = load_procs(a.dir)
    snap = {
        "time": time.time(),
        "meminfo": meminfo(),
        "sockstat": sockstat(),
        "slab": slabinfo(),
        "conntrack": conntrack(),
        "rss": group_rss(procs),
        "tcp": tcp_counters(),
        "other_cpu_ticks": other_cpu_ticks({pid for _, pid, _ in procs} | {os.getpid(), os.getppid()}),
    }
    relays = [port for g, _, port in procs if g == "relay" and port]
    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(relay_metrics, relays))
    snap["relay_active"] = sum(m["active"] for m in answers if m)
    by_status = {}
    for m in answers:
        for k, v in (m or {}).get("refused_by_status", {}).items():
            by_status[k] = by_status.get(k, 0) + v
    snap["relay_refused_by_status"] = by_status
    snap["relays_reporting"] = sum(1 for m in answers if m)
    snap["relays"] = len(relays)
    snap["load"] = load_progress(a.dir)
    with open(os.path.join(a.dir, f"snap-{a.name}.json"), "w") as f:
        json.dump(snap, f)


# ----------------------------------------------------------------------------- report
def mean(xs):
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 1) if xs else None


def fmt_int(n):
    return f"{n:,.0f}" if n is not None else "n/a"


def events(run):
    ev = {}
    for line in read(os.path.join(run, "events.txt")).splitlines():
        f = line.split(None, 1)
        if len(f) == 2:
            ev.setdefault(f[1].strip(), float(f[0]))
    return ev


def nice_ticks(lo, hi, n=5):
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    first = math.floor(lo / step + 1e-9)
    last = math.ceil(hi / step - 1e-9)
    return [k * step for k in range(first, last + 1)], step


def svg_plot(samples, ev, t0, plan, base):
    """Two panels sharing the time axis: connections, and memory (GiB)."""
    W, H = 960, 640
    L, R = 90, 200
    panels = [(50, 300), (340, 590)]  # y ranges (top, bottom) of each panel
    ts = [s["t"] for s in samples]
    tmax = max(ts) if ts else 1
    xt, _ = nice_ticks(0, tmax)
    xmax = max(tmax, xt[-1])

    def X(t):
        return L + (W - L - R) * t / xmax

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
    ]
    title = (f"bench-million: {plan['mode']} {plan['connections']:,} connections, "
             f"{plan['processes']['relay']} relay / {plan['processes']['origin']} origin / "
             f"{plan['processes']['load']} load processes")
    out.append(f'<text x="{L}" y="24" font-size="15" font-weight="bold">{html.escape(title)}</text>')
    hs, he = ev.get("hold_start"), ev.get("hold_end")
    mem0 = base["meminfo"]
    used0 = mem0.get("MemTotal", 0) - mem0.get("MemAvailable", 0)
    slab0 = mem0.get("Slab", 0)
    series_sets = [
        (
            "connections",
            1,
            [
                ("relay_connections_active (sum)", "#1f77b4", lambda s: s["relay_active"]),
                ("load: connections open", "#ff7f0e", lambda s: s["load"]["open"]),
                ("TCP sockets in use / 4" if plan["mode"] == "relayed" else "TCP sockets in use / 2",
                 "#7f7f7f", lambda s: s["tcp_inuse"] / (4 if plan["mode"] == "relayed" else 2)),
            ],
        ),
        (
            "memory (GiB)",
            2**30,
            [
                ("machine: used − at start (MemTotal − MemAvailable)", "#d62728",
                 lambda s: (s["mem_total_kib"] - s["mem_available_kib"] - used0) * 1024),
                ("kernel slab − at start", "#9467bd", lambda s: (s["slab_kib"] - slab0) * 1024),
                ("TCP buffers (sockstat mem)", "#8c564b", lambda s: s["tcp_mem_bytes"]),
                ("relay RSS (sum)", "#1f77b4", lambda s: s["relay_rss_kib"] * 1024),
                ("origin + load RSS (sum)", "#2ca02c",
                 lambda s: (s["origin_rss_kib"] + s["load_rss_kib"]) * 1024),
            ],
        ),
    ]
    for (top, bottom), (label, unit, series) in zip(panels, series_sets):
        vals = [f(s) / unit for s in samples for _, _, f in series]
        vmax = max(vals + [1e-9])
        vmin = min(vals + [0])
        yt, step = nice_ticks(min(0, vmin), vmax)
        ylo, yhi = yt[0], yt[-1]

        def Y(v, top=top, bottom=bottom, ylo=ylo, yhi=yhi):
            return bottom - (bottom - top) * (v - ylo) / (yhi - ylo if yhi > ylo else 1)

        if hs is not None:
            x1 = X(hs - t0)
            x2 = X((he if he else hs) - t0)
            out.append(f'<rect x="{x1:.1f}" y="{top}" width="{max(0.0, x2 - x1):.1f}" '
                       f'height="{bottom - top}" fill="#e8f4e8"/>')
        out.append(f'<rect x="{L}" y="{top}" width="{W - L - R}" height="{bottom - top}" '
                   f'fill="none" stroke="#333"/>')
        for v in yt:
            y = Y(v)
            out.append(f'<line x1="{L}" x2="{W - R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
            dec = next(d for d in (0, 1, 2, 3) if abs(step * 10 ** d - round(step * 10 ** d)) < 1e-9 or d == 3)
            txt = f"{v:,.{dec}f}"
            out.append(f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">{txt}</text>')
        for t in xt:
            x = X(t)
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{bottom}" stroke="#eee"/>')
            out.append(f'<text x="{x:.1f}" y="{bottom + 15}" text-anchor="middle">{t:,.0f}</text>')
        out.append(f'<text x="18" y="{(top + bottom) / 2:.0f}" transform="rotate(-90 18 '
                   f'{(top + bottom) / 2:.0f})" text-anchor="middle">{html.escape(label)}</text>')
        for i, (name, color, f) in enumerate(series):
            # The relays' sum only from samples in which every relay answered.
            use = [s for s in samples
                   if not (name.startswith("relay_connections")
                           and s.get("relays_stale", s["relays"] - s["relays_reporting"]) > 0)]
            pts = " ".join(f"{X(s['t']):.1f},{Y(f(s) / unit):.1f}" for s in use)
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"/>')
            ly = top + 14 + 30 * i
            out.append(f'<line x1="{W - R + 10}" x2="{W - R + 28}" y1="{ly - 4}" y2="{ly - 4}" '
                       f'stroke="{color}" stroke-width="3"/>')
            words = name.split(" ")
            line1, line2 = "", ""
            for w in words:
                if len(line1) + len(w) < 26 and not line2:
                    line1 += (" " if line1 else "") + w
                else:
                    line2 += (" " if line2 else "") + w
            out.append(f'<text x="{W - R + 32}" y="{ly}" font-size="11">{html.escape(line1)}</text>')
            if line2:
                out.append(f'<text x="{W - R + 32}" y="{ly + 13}" font-size="11">{html.escape(line2)}</text>')
    out.append(f'<text x="{(L + W - R) / 2:.0f}" y="{H - 18}" text-anchor="middle">seconds since the load '
               f'started (green: the hold window)</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def cmd_report(a):
    run = a.dir
    plan = json.loads(read(os.path.join(run, "plan.json")))
    samples = [json.loads(l) for l in read(os.path.join(run, "samples.jsonl")).splitlines() if l.strip()]
    ev = events(run)
    t0 = float(read(os.path.join(run, "t0")).strip())
    base = json.loads(read(os.path.join(run, "snap-base.json"), "{}") or "{}")
    hold = json.loads(read(os.path.join(run, "snap-hold.json"), "{}") or "{}")
    n = plan["connections"]
    mode = plan["mode"]
    per_conn_sockets = 4 if mode == "relayed" else 2

    loads = []
    for p in sorted(glob.glob(os.path.join(run, "load-*.json"))):
        try:
            loads.append(json.loads(read(p)))
        except ValueError:
            pass
    L = plan["processes"]["load"]
    lsum = lambda k: sum(int(x.get(k) or 0) for x in loads)
    failures = {
        "connect": lsum("connect_failures"),
        "handshake": lsum("handshake_failures"),
        "errors": lsum("errors"),
        "verify": lsum("verify_failures"),
        "load_processes_without_json": L - len(loads),
    }
    # Samples taken while the load processes were still running also count failures.
    last_progress_fail = max((s["failures"] for s in samples), default=0)
    failures["seen_in_progress_lines"] = last_progress_fail
    fail_total = (failures["connect"] + failures["handshake"] + failures["errors"] + failures["verify"])
    fail_total = max(fail_total, last_progress_fail)

    hs, he = ev.get("hold_start"), ev.get("hold_end")
    in_hold = [s for s in samples if hs is not None and he is not None and hs - t0 <= s["t"] <= he - t0]
    # Relays' own count, from samples in which every relay answered its admin request.
    fresh = [s for s in in_hold if s.get("relays_stale", 0) == 0 and s["relays_reporting"] == s["relays"]]
    held_min = min((s["relay_active"] for s in fresh), default=0)
    load_open_min = min((s["load"]["open"] for s in in_hold), default=0)
    peak = max((s["relay_active"] for s in samples), default=0)
    open_peak_sum = lsum("connections_open_peak")
    ramp_s = (hs - ev["load_start"]) if hs is not None and "load_start" in ev else None
    hold_s = (he - hs) if hs is not None and he is not None else None
    relay_cpu = [s["relay_cpu_pct"] for s in in_hold if s["relay_cpu_pct"] is not None]
    ramp_cpu = [s["relay_cpu_pct"] for s in samples
                if s["relay_cpu_pct"] is not None and s["phase"] == "ramp"]

    res = {
        "plan": plan,
        "held_min_during_hold": held_min,
        "hold_samples_all_relays_answered": len(fresh),
        "load_open_peak_sum": open_peak_sum,
        "load_open_min_during_hold": load_open_min,
        "relay_active_peak": peak,
        "hold_window_s": round(hold_s, 1) if hold_s else None,
        "hold_samples": len(in_hold),
        "ramp_s": round(ramp_s, 1) if ramp_s else None,
        "ramp_rate_per_s": round(n / ramp_s, 1) if ramp_s else None,
        "load_connect_rate_per_s_sum": round(sum(float(x.get("connect_rate_per_s") or 0) for x in loads), 1),
        "failures": failures,
        "failures_total": fail_total,
        "trickle_messages": lsum("messages"),
        "trickle_verify_failures": failures["verify"],
        "trickle_rtt_us_p50_median": None,
        "trickle_rtt_us_p99_max": None,
        "relay_cpu_pct_hold_mean": round(sum(relay_cpu) / len(relay_cpu), 1) if relay_cpu else None,
        "relay_cpu_pct_ramp_mean": round(sum(ramp_cpu) / len(ramp_cpu), 1) if ramp_cpu else None,
        "machine_cpu_pct_hold_mean": mean([s.get("machine_cpu_pct") for s in in_hold]),
        "machine_cpu_pct_ramp_mean": mean([s.get("machine_cpu_pct") for s in samples if s["phase"] == "ramp"]),
        "ok": False,
    }
    rtts = [x.get("rtt_us") or {} for x in loads if x.get("messages")]
    if rtts:
        p50 = sorted(r.get("p50", 0) for r in rtts)
        res["trickle_rtt_us_p50_median"] = p50[len(p50) // 2]
        res["trickle_rtt_us_p99_max"] = max(r.get("p99", 0) for r in rtts)
        res["trickle_rtt_us_max"] = max(r.get("max", 0) for r in rtts)

    mem = {}
    if base and hold:
        # The relays' own count, if every relay answered the snapshot's admin request; else
        # the load processes' count of open connections.
        if hold.get("relays_reporting") == hold.get("relays"):
            held = hold.get("relay_active") or held_min
        else:
            held = (hold.get("load") or {}).get("open") or held_min
    if base and hold and not held:
        mem["note"] = ("no per-connection figures: at the hold snapshot not every relay answered "
                       "and no load process reported open connections")
    if base and hold and held:
        mem["connections_counted_by"] = ("relays" if hold.get("relays_reporting") == hold.get("relays")
                                         else "load processes (not every relay answered)")
        sockets = hold["sockstat"].get("inuse", 0) - base["sockstat"].get("inuse", 0)
        exp_sockets = per_conn_sockets * held
        mem["connections_at_snapshot"] = held
        mem["tcp_sockets_delta"] = sockets
        mem["tcp_sockets_expected"] = exp_sockets
        div_s = exp_sockets if exp_sockets else 1
        caches = []
        tot_slab = 0
        for name, h in hold["slab"].items():
            b = base["slab"].get(name, {"bytes": 0, "active": 0})
            d = h["bytes"] - b["bytes"]
            tot_slab += d
            if abs(d) >= 0.002 * per_conn_sockets * max(held, 1) * 1024 or d / div_s >= 8:
                caches.append({
                    "cache": name,
                    "reclaimable_flag": h.get("reclaim", False),
                    "objsize": h["objsize"],
                    "objects_delta": h["active"] - b["active"],
                    "objects_per_socket": round((h["active"] - b["active"]) / div_s, 3),
                    "bytes_delta": d,
                    "bytes_per_socket": round(d / div_s, 1),
                })
        caches.sort(key=lambda c: -c["bytes_delta"])
        named = sum(c["bytes_delta"] for c in caches)
        tcpmem = (hold["sockstat"].get("mem", 0) - base["sockstat"].get("mem", 0)) * 4096
        kernel = tot_slab + max(0, tcpmem)
        mem["slab_caches"] = caches
        # Caches that exist only because something on this machine reads /proc/PID/fd of every
        # process (the VM's init agent lists socket descriptors every few seconds): one procfs
        # inode, its dentry and its LSM blob per open descriptor. Reclaimable, but recreated.
        proc_part = 0
        for c in caches:
            if c["cache"] == "proc_inode_cache":
                proc_part += c["bytes_delta"]
                per = c["objects_per_socket"]
                for d in caches:
                    if d["cache"] == "dentry" and d["objects_per_socket"] > 1.5 and per > 0.5:
                        proc_part += d["bytes_delta"] / d["objects_per_socket"] * min(per, d["objects_per_socket"] - 1)
        mem["proc_fd_caches_bytes_per_socket"] = round(proc_part / div_s, 1)
        mem["slab_other_bytes_per_socket"] = round((tot_slab - named) / div_s, 1)
        mem["slab_total_bytes_per_socket"] = round(tot_slab / div_s, 1)
        mem["tcp_buffer_bytes_per_socket"] = round(tcpmem / div_s, 1)
        mem["kernel_bytes_per_socket"] = round(kernel / div_s, 1)
        mem["kernel_bytes_total"] = kernel
        mem["kernel_bytes_per_socket_without_proc_fd_caches"] = round((kernel - proc_part) / div_s, 1)
        mem["conntrack_delta"] = (hold.get("conntrack") or 0) - (base.get("conntrack") or 0)

        def grp(g, k="rss_kib"):
            return (hold["rss"].get(g, {}).get(k, 0) - base["rss"].get(g, {}).get(k, 0)) * 1024

        div_c = held if held else 1
        mem["relay_rss_bytes_per_conn"] = round(grp("relay") / div_c, 1)
        mem["relay_anon_bytes_per_conn"] = round(grp("relay", "anon_kib") / div_c, 1)
        mem["relay_rss_total_kib_hold"] = hold["rss"].get("relay", {}).get("rss_kib", 0)
        mem["relay_rss_total_kib_base"] = base["rss"].get("relay", {}).get("rss_kib", 0)
        mem["relay_anon_total_kib_base"] = base["rss"].get("relay", {}).get("anon_kib", 0)
        if mode == "relayed":
            mem["origin_rss_bytes_per_conn"] = round(grp("origin") / div_c, 1)
        # load processes started after the base snapshot: their growth from their own start.
        lstart = sum(int(x.get("loader_rss_kib_start") or 0) for x in loads)
        lhold = hold["rss"].get("load", {}).get("rss_kib", 0)
        if loads and len(loads) == L:
            mem["load_rss_bytes_per_conn"] = round((lhold - lstart) * 1024 / div_c, 1)
        user = grp("relay") + grp("origin") + ((lhold - lstart) * 1024 if loads else 0)
        used_delta = ((hold["meminfo"]["MemTotal"] - hold["meminfo"]["MemAvailable"])
                      - (base["meminfo"]["MemTotal"] - base["meminfo"]["MemAvailable"])) * 1024
        mem["machine_used_delta_bytes"] = used_delta
        mem["machine_used_per_socket_minus_user"] = round((used_delta - user) / div_s, 1)
        mem["mem_available_kib_base"] = base["meminfo"]["MemAvailable"]
        mem["mem_available_kib_hold"] = hold["meminfo"]["MemAvailable"]
        mem["slab_kib_base"] = base["meminfo"].get("Slab")
        mem["slab_kib_hold"] = hold["meminfo"].get("Slab")
    res["memory"] = mem
    # Why connections failed: the load processes' own lines, the relays' refusals by status,
    # and the kernel's TCP counters from the base snapshot to the hold snapshot (the ramp).
    reasons = {}
    for path in glob.glob(os.path.join(run, "load-*.err")):
        for line in read(path).splitlines():
            m = re.search(r"(handshake|connect) failure: (.*)", line)
            if m:
                key = f"{m.group(1)}: {m.group(2).strip()}"
                reasons[key] = reasons.get(key, 0) + 1
    res["failure_reasons"] = dict(sorted(reasons.items(), key=lambda kv: -kv[1]))
    res["relay_refused_by_status"] = hold.get("relay_refused_by_status", {})
    # CPU that processes outside the benchmark took from the base to the hold snapshot.
    if base.get("other_cpu_ticks") and hold.get("other_cpu_ticks") and hold["time"] > base["time"]:
        span = hold["time"] - base["time"]
        deltas = {k: v - base["other_cpu_ticks"].get(k, 0) for k, v in hold["other_cpu_ticks"].items()}
        top = sorted(((k, d) for k, d in deltas.items() if d > 0), key=lambda kv: -kv[1])
        res["other_processes_cpu_pct_ramp"] = {
            "total": round(sum(d for _, d in top) / CLK_TCK / span * 100, 1),
            "top": {k: round(d / CLK_TCK / span * 100, 1) for k, d in top[:6]},
        }
    if base.get("tcp") and hold.get("tcp"):
        res["tcp_counters_ramp"] = {k: hold["tcp"][k] - base["tcp"].get(k, 0)
                                    for k in hold["tcp"] if hold["tcp"][k] != base["tcp"].get(k, 0)}
    # Held: every load process opened its share and lost none (a lost open connection counts
    # in "errors"), the hold window ran to its end, and the relays counted all N (in every
    # sample in which all of them answered) and the load processes too.
    res["ok"] = (fail_total == 0 and len(loads) == L and open_peak_sum == n and bool(in_hold)
                 and held_min >= n and load_open_min >= n and ev.get("hold_complete") is not None
                 and not os.path.exists(os.path.join(run, "abort")))
    if os.path.exists(os.path.join(run, "abort")):
        res["aborted"] = read(os.path.join(run, "abort")).strip()

    with open(os.path.join(run, "result.json"), "w") as f:
        json.dump(res, f, indent=2)
    svg = svg_plot(samples, ev, t0, plan, base or {"meminfo": {}}) if samples else ""
    if svg:
        with open(os.path.join(run, "million.svg"), "w") as f:
            f.write(svg)
        if a.svg_copy:
            with open(a.svg_copy, "w") as f:
                f.write(svg)

    md = summary_md(res, plan, run, a.svg_copy)
    with open(os.path.join(run, "summary.md"), "w") as f:
        f.write(md)
    print(md)
    if a.docs:
        update_docs(a.docs, mode, md)
    return 0 if res["ok"] else 1


def summary_md(res, plan, run, svg_copy):
    m = res["memory"]
    n = plan["connections"]
    mode = plan["mode"]
    p = plan["processes"]
    lines = []
    verdict = "held" if res["ok"] else "NOT held"
    if res["hold_window_s"] is None:
        lines.append(f"**{mode}, {n:,} connections: NOT held** — the ramp did not complete "
                     f"(peak {res['relay_active_peak']:,} open at the relays; {res['failures_total']} failures"
                     + (f"; {res['aborted']}" if res.get("aborted") else "") + ").")
    else:
      lines.append(f"**{mode}, {n:,} connections: {verdict}** — minimum during the {res['hold_window_s']} s hold "
                   f"window: {res['held_min_during_hold']:,} open at the relays "
                   f"({res['hold_samples_all_relays_answered']} of {res['hold_samples']} samples with every relay "
                   f"answering), {res['load_open_min_during_hold']:,} at the load processes; "
                   f"{res['failures_total']} failures.")
    lines.append("")
    lines.append(f"- Command: `{plan['command']}`")
    lines.append(f"- Machine: {plan['machine']['cpus']} CPUs, MemTotal {plan['machine']['mem_total_kib'] / 2**20:.1f} GiB, "
                 f"kernel {plan['machine']['kernel']}, RLIMIT_NOFILE hard {plan['fd']['hard']:,}; {plan['date']}")
    lines.append(f"- Processes: {p['relay']} relay (workers {plan['relay_workers']}, ≤ {plan['relay_cap_per_process']:,} "
                 f"connections each), {p['origin']} echo-origin, {p['load']} load; "
                 f"{plan['sockets']:,} sockets planned; estimate {plan['estimate']['need_gib']:.2f} GiB of "
                 f"{plan['estimate']['available_gib']:.2f} GiB MemAvailable (margin {plan['estimate']['margin_gib']:.2f} GiB)")
    rr = res.get("ramp_rate_per_s")
    lines.append(f"- Ramp: {res['ramp_s']} s at {rr:,.0f} connections/s (asked {plan['rate']:,}/s); "
                 f"relay CPU {res['relay_cpu_pct_ramp_mean']} % during the ramp, "
                 f"{res['relay_cpu_pct_hold_mean']} % during the hold (100 % = one core; whole box "
                 f"{res['machine_cpu_pct_ramp_mean']} % / {res['machine_cpu_pct_hold_mean']} % of 200 %)" if rr else
                 f"- Ramp: incomplete")
    if res.get("trickle_messages"):
        lines.append(f"- Trickle: one {plan['trickle_size']} B message per connection every {plan['trickle_s']} s: "
                     f"{res['trickle_messages']:,} echoes verified, RTT p50 {res['trickle_rtt_us_p50_median']:,.0f} µs "
                     f"(median over load processes), p99 ≤ {res['trickle_rtt_us_p99_max']:,.0f} µs")
    f = res["failures"]
    lines.append(f"- Failures: connect {f['connect']}, handshake {f['handshake']}, errors {f['errors']}, "
                 f"verify {f['verify']}, load processes without a report {f['load_processes_without_json']}")
    if res.get("failure_reasons"):
        lines.append("- Failure reasons (load processes): " + "; ".join(
            f"{v} × {k}" for k, v in res["failure_reasons"].items()))
    if res.get("relay_refused_by_status"):
        lines.append("- Relay refusals by status (at the hold snapshot): " + ", ".join(
            f"{k}: {v}" for k, v in sorted(res["relay_refused_by_status"].items())))
    if res.get("other_processes_cpu_pct_ramp"):
        o = res["other_processes_cpu_pct_ramp"]
        lines.append(f"- CPU taken by processes outside the benchmark from the base to the hold snapshot: "
                     f"{o['total']} % (100 % = one core): "
                     + ", ".join(f"{k} {v} %" for k, v in o["top"].items()))
    if "tcp_counters_ramp" in res:
        tc = res["tcp_counters_ramp"]
        lines.append("- TCP counters that moved from the base to the hold snapshot: "
                     + (", ".join(f"{k} {v:,}" for k, v in sorted(tc.items())) if tc else "none"))
    if m.get("note"):
        lines.append(f"- Memory: {m['note']}")
    if "relay_rss_bytes_per_conn" in m:
        lines.append("")
        lines.append("| per connection / per socket | bytes |")
        lines.append("|---|---:|")
        lines.append(f"| relay user memory (VmRSS delta / connection) | {m['relay_rss_bytes_per_conn']:,.0f} |")
        if "origin_rss_bytes_per_conn" in m:
            lines.append(f"| echo-origin user memory / connection | {m['origin_rss_bytes_per_conn']:,.0f} |")
        if "load_rss_bytes_per_conn" in m:
            lines.append(f"| load user memory / connection | {m['load_rss_bytes_per_conn']:,.0f} |")
        lines.append(f"| **kernel / socket** (slab delta + TCP buffer pages, over {m['tcp_sockets_expected']:,} sockets) | "
                     f"**{m['kernel_bytes_per_socket']:,.0f}** |")
        for c in m["slab_caches"]:
            lines.append(f"| &nbsp;&nbsp;slab `{c['cache']}` ({c['objsize']} B objects, "
                         f"{c['objects_per_socket']:.2f} per socket) | {c['bytes_per_socket']:,.0f} |")
        if m.get("proc_fd_caches_bytes_per_socket"):
            lines.append(f"| &nbsp;&nbsp;of these, /proc/PID/fd caches (procfs inode + dentry made by a process "
                         f"that lists every descriptor; not the socket's own cost) | "
                         f"{m['proc_fd_caches_bytes_per_socket']:,.0f} |")
            lines.append(f"| kernel / socket without the /proc/PID/fd caches | "
                         f"{m['kernel_bytes_per_socket_without_proc_fd_caches']:,.0f} |")
        lines.append(f"| &nbsp;&nbsp;other slab caches | {m['slab_other_bytes_per_socket']:,.0f} |")
        lines.append(f"| &nbsp;&nbsp;TCP buffer pages (sockstat mem) | {round(m['tcp_buffer_bytes_per_socket']):,} |")
        lines.append(f"| machine-wide check: (used delta − user delta) / socket | "
                     f"{m['machine_used_per_socket_minus_user']:,.0f} |")
        lines.append("")
        lines.append(f"TCP sockets in use grew by {m['tcp_sockets_delta']:,} (expected {m['tcp_sockets_expected']:,}); "
                     f"relay RSS {m['relay_rss_total_kib_base'] / 1024:,.0f} → {m['relay_rss_total_kib_hold'] / 1024:,.0f} MiB "
                     f"over {p['relay']} processes; kernel total {m['kernel_bytes_total'] / 2**30:.2f} GiB; "
                     f"MemAvailable {m['mem_available_kib_base'] / 2**20:.2f} → {m['mem_available_kib_hold'] / 2**20:.2f} GiB.")
    lines.append("")
    lines.append(f"Raw data: `{os.path.relpath(run, plan['repo'])}/` (samples.jsonl, result.json, million.svg)"
                 + (f"; plot: `{os.path.relpath(svg_copy, plan['repo'])}`" if svg_copy else ""))
    return "\n".join(lines) + "\n"


def update_docs(path, mode, md):
    begin = f"<!-- bench-million:{mode}:begin -->"
    end = f"<!-- bench-million:{mode}:end -->"
    block = f"{begin}\n{md}{end}\n"
    text = read(path)
    if begin in text and end in text:
        pre = text[: text.index(begin)]
        post = text[text.index(end) + len(end):].lstrip("\n")
        text = pre + block + ("\n" + post if post else "")
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + block
    tmp = path + ".tmp-million"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def cmd_combine(a):
    """Stack several million.svg plots into one SVG (e.g. docs/million.svg)."""
    parts, y, width = [], 0, 0
    for path in a.svgs:
        text = read(path)
        m = re.search(r'<svg[^>]*width="(\d+)" height="(\d+)"[^>]*>', text)
        if not m:
            sys.exit(f"{path}: not a million.py plot")
        w, h = int(m.group(1)), int(m.group(2))
        inner = text[m.end():text.rindex("</svg>")]
        parts.append(f'<svg x="0" y="{y}" width="{w}" height="{h}" viewBox="0 0 {w} {h}">{inner}</svg>')
        y += h
        width = max(width, w)
    with open(a.out, "w") as f:
        f.write(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y}" '
                f'viewBox="0 0 {width} {y}" font-family="sans-serif" font-size="12">\n')
        f.write("\n".join(parts) + "\n</svg>\n")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample")
    s.add_argument("--dir", required=True)
    s.add_argument("--interval", type=float, default=5)
    s.add_argument("--max-seconds", type=float, default=3600)
    s.add_argument("--mem-floor-kib", type=int, default=1 << 20)
    s = sub.add_parser("snapshot")
    s.add_argument("--dir", required=True)
    s.add_argument("--name", required=True)
    s = sub.add_parser("report")
    s.add_argument("--dir", required=True)
    s.add_argument("--docs")
    s.add_argument("--svg-copy")
    s = sub.add_parser("combine")
    s.add_argument("out")
    s.add_argument("svgs", nargs="+")
    a = ap.parse_args()
    if a.cmd == "combine":
        cmd_combine(a)
        return
    if a.cmd == "sample":
        cmd_sample(a)
    elif a.cmd == "snapshot":
        cmd_snapshot(a)
    else:
        sys.exit(cmd_report(a))


if __name__ == "__main__":
    main()
