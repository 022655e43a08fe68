#!/usr/bin/env bash
# scripts/bench-tls.sh: relay vs HAProxy terminating TLS, same certificate, same load, same
# machine, same run.
#
# Both proxies terminate TLS 1.3 with one ECDSA P-256 certificate (made here with the
# openssl CLI, in a temp dir), session tickets on, and relay plaintext WebSocket to
# relay-bench echo-origin. The proxy runs on CPU 0 (taskset -c 0), the load generator and
# the echo origin on CPU 1. The client is relay-bench (rustls 0.23, aws-lc-rs; X25519 key
# share, the --insecure benchmark verifier so that the client's certificate checks cost
# nothing; see bench/README.md). Cells, each for both peers:
#
#   hs-full     `relay-bench handshakes --full`: per connection TCP connect + full TLS
#               handshake + upgrade + one 32 B echo + close handshake; connections/s, the
#               proxy's CPU-us per connection (utime+stime from /proc over the measured window
#               / connections completed in it), TLS handshake latency p50/p99 (client view).
#   hs-resume   the same with session resumption (each slot offers the ticket of its previous
#               connection; the client counts handshake_kind() == Resumed).
#   hs-c1       full handshakes with one connection at a time: latency without queueing.
#   tput-32, tput-4096
#               `relay-bench load --tls` closed loop, --connections (50) x --inflight (16) x
#               32 B / 4 KiB: messages/s, the proxy's CPU-us per message, RTT p50/p99.
#   idle        --idle (10000) wss connections opened and held: the proxies' VmRSS delta per
#               connection (summed over their processes; 2 descriptors per connection, so
#               several processes share the port with SO_REUSEPORT), the proxy's CPU-us per
#               connection during the ramp, kernel slab bytes per connection (machine-wide).
#
# HAProxy comes from the distribution (apt-get install haproxy) when missing; it runs in the
# foreground from a config written to the temp dir (template bench/peers/haproxy-tls.cfg.in),
# never as the system service. relay runs from bench/peers/relay-tls.toml.in. relay and
# relay-bench are built in release mode first (CARGO_TARGET_DIR respected).
#
# Output: a Markdown table on stdout, JSON in bench-results/tls-DATE.json (logs in
# bench-results/tls-DATE/), and the section of docs/benchmarks.md between the bench-tls
# markers (unless --no-docs; --quick writes no docs unless --docs).
#
# Loopback only. Takes /tmp/relay-bench.lock (flock) so it never overlaps another benchmark
# run. Stops only the processes it started, by PID; every process it starts is bounded by
# timeout(1) and relay-bench's --max-seconds, and the whole run by --max-seconds.
set -uo pipefail

PROG=bench-tls
ORIG_ARGS=("$@")
REPO=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${RELAY_BENCH_LOCKED:-}" ] && [ "${1:-}" != --report ] && command -v flock >/dev/null; then
    echo "[$PROG] waiting for /tmp/relay-bench.lock" >&2
    RELAY_BENCH_LOCKED=1 exec flock -o /tmp/relay-bench.lock "$0" "$@"
fi
# shellcheck source=lib/bench-compare-lib.sh
. "$REPO/scripts/lib/bench-compare-lib.sh"
# shellcheck source=lib/bench-tls-lib.sh
. "$REPO/scripts/lib/bench-tls-lib.sh"
die() { printf '%s: %s\n' "$PROG" "$*" >&2; exit 2; }
export PATH="$PATH:/usr/sbin:/sbin"

usage() {
    cat >&2 <<'EOF'
usage: scripts/bench-tls.sh [options]
  --quick               smoke run: 3 s windows, idle 2,000, 1 attempt, no docs update
  --peers LIST          relay,haproxy (default both)
  --cells LIST          idle,hs-full,hs-resume,hs-c1,tput-32,tput-4096 (default all, in this
                        order: idle first, before the handshake cells leave TIME_WAIT sockets)
  --duration S          measurement window of the handshake and throughput cells (default 10)
  --concurrency N       handshake cells: connections in progress at once (default 50)
  --connections N       throughput cells: connections (default 50)
  --inflight K          throughput cells: messages in flight per connection (default 16)
  --idle N              idle cell: connections held (default 10000)
  --hold S              idle cell: seconds held after the ramp (default 15)
  --attempts N          retry a cell in which other work used more than --noise-pct of CPU 0
                        (the proxy's CPU), keeping the least disturbed attempt (default 3)
  --noise-pct P         (default 5)
  --nice N              nice level of everything started (default -20; 0 = unchanged)
  --max-seconds S       hard cap on the whole run (default 1800)
  --out FILE            JSON output (default bench-results/tls-DATE.json)
  --docs / --no-docs    write the section of docs/benchmarks.md (default: yes unless --quick)
  --no-build            use the binaries already in $CARGO_TARGET_DIR/release
  --no-install          do not apt-get install HAProxy if it is missing (it is skipped)
  --report FILE         run nothing: print the table of an earlier run (with --docs: write it)
Env: CARGO_TARGET_DIR (default ./target), RELAY_EXTRA_ARGS (extra relay flags, word-split)
EOF
    exit 2
}

PEERS=relay,haproxy
CELLS=idle,hs-full,hs-resume,hs-c1,tput-32,tput-4096
DURATION=10
CONC=50
CONNS=50
INFLIGHT=16
IDLE=10000
HOLD=15
ATTEMPTS=3
NOISE_PCT=5
NICE=-20
MAX_SECONDS=1800
OUT=
DOCS=
BUILD=1
INSTALL=1
QUICK=0
REPORT=
while [ $# -gt 0 ]; do
    case $1 in
        --quick) QUICK=1; DURATION=3; IDLE=2000; HOLD=5; ATTEMPTS=1 ;;
        --peers) PEERS=${2:?}; shift ;;
        --cells) CELLS=${2:?}; shift ;;
        --duration) DURATION=${2:?}; shift ;;
        --concurrency) CONC=${2:?}; shift ;;
        --connections) CONNS=${2:?}; shift ;;
        --inflight) INFLIGHT=${2:?}; shift ;;
        --idle) IDLE=${2:?}; shift ;;
        --hold) HOLD=${2:?}; shift ;;
        --attempts) ATTEMPTS=${2:?}; shift ;;
        --noise-pct) NOISE_PCT=${2:?}; shift ;;
        --nice) NICE=${2:?}; shift ;;
        --max-seconds) MAX_SECONDS=${2:?}; shift ;;
        --out) OUT=${2:?}; shift ;;
        --docs) DOCS=1 ;;
        --no-docs) DOCS=0 ;;
        --no-build) BUILD=0 ;;
        --no-install) INSTALL=0 ;;
        --report) REPORT=${2:?}; shift ;;
        -h | --help) usage ;;
        *) echo "$PROG: unknown option $1" >&2; usage ;;
    esac
    shift
done

# ---------------------------------------------------------------- report
write_report() {
    local table section tmp
    table=$(jq -r -f "$REPO/scripts/lib/bench-tls-report.jq" "$OUT") || die "cannot read $OUT"
    echo "$table"
    log "JSON: $OUT"
    [ "$DOCS" = 1 ] || return 0
    tmp=$(mktemp -d /tmp/bench-tls-doc.XXXXXX)
    section=$tmp/section.md
    {
        echo "<!-- bench-tls:begin (generated by scripts/bench-tls.sh; edits here are overwritten) -->"
        echo "## TLS termination: relay vs HAProxy (\`scripts/bench-tls.sh\`)"
        echo
        cat <<'EOF'
Both proxies terminate TLS 1.3 for the same ECDSA P-256 certificate (made by the script with
the openssl CLI), with stateless session tickets on, and relay plaintext WebSocket to
`relay-bench echo-origin`; relay from `bench/peers/relay-tls.toml.in` (rustls 0.23, aws-lc-rs,
`--workers 1`), HAProxy from `bench/peers/haproxy-tls.cfg.in` (the distribution's package,
OpenSSL, `nbthread 1`). Each proxy is pinned to CPU 0; the client (`relay-bench`, rustls with
aws-lc-rs, one X25519 key share, the benchmark-only `--insecure` verifier so that checking the
certificate costs the client nothing) and the echo origin share CPU 1. Peers run one after
the other, cell by cell, in the same invocation.

- **hs-full / hs-resume**: `relay-bench handshakes`: each of `concurrency` slots loops over TCP
  connect, TLS handshake, WebSocket upgrade, one 32-byte echo (verified), close handshake,
  TLS close_notify, close. *Resumed*: every slot offers the ticket its previous connection
  received, and the client counts `handshake_kind() == Resumed` (the table shows the
  resumed share). CPU-µs per connection = the proxy's utime+stime (`/proc/PID/stat`) over
  the measured window ÷ connections completed in it, so it covers the whole short-lived
  connection (accept, handshake, origin connect, upgrade, one echo each way, both closes),
  not the TLS handshake alone. Latency = TCP connected → client has the server's
  Finished (client view).
- **hs-c1**: full handshakes, one connection at a time: the handshake latency without
  queueing (in hs-full and hs-resume the latency includes waiting behind the other slots).
- **tput**: `relay-bench load --tls`, closed loop: each connection keeps `inflight` messages
  in flight; CPU-µs per message = proxy utime+stime over the load process's life ÷ messages.
- **idle**: `relay-bench load --tls --mode hold`; user-space bytes per connection = the
  proxies' VmRSS once every connection is open minus before, summed over the proxy
  processes (2 descriptors per relayed connection, so several processes share the port),
  ÷ connections established. Kernel = machine-wide slab growth (allocated objects × size,
  `/proc/slabinfo`, minus /proc inode artefacts) ÷ connections, all sockets on the path
  (client, proxy both sides, origin).
- Ratio = relay ÷ HAProxy (for rates higher is better for relay, for CPU, latency and
  memory lower is).
EOF
        echo
        echo "### Results"
        echo
        jq -r '.meta | "- Command: `\(.command)`\n- Date: \(.date)\n- Machine: \(.cpu_model), \(.cpus) CPUs\(if .hypervisor then " (" + .hypervisor + " guest)" else "" end), \(.mem_total_kib / 1048576 | . * 10 | round / 10) GiB RAM\n- Kernel: \(.kernel)\n- Source: git \(.git)\n- Peers: \(.versions.relay); \(.versions.haproxy | sub(" - https://haproxy.org/"; "")) with \(.openssl)\n- Negotiated: relay \(.negotiated.relay // "-"); HAProxy \(.negotiated.haproxy // "-")\n- Windows: \(.duration_s) s (handshakes after a 1 s warm-up), \(.concurrency) handshake slots, throughput \(.connections) connections x \(.inflight) in flight, idle \(.idle) connections held \(.hold_s) s"' "$OUT"
        echo "- JSON: \`bench-results/$(basename "$OUT")\` (not committed)"
        echo
        echo "$table"
        # A hand-written reading of the run, between the bench-tls-notes markers inside this
        # section, is kept as it is.
        awk '/^<!-- bench-tls-notes:begin/ { keep = 1 } keep { print } /^<!-- bench-tls-notes:end/ { keep = 0 }' \
            "$REPO/docs/benchmarks.md" 2>/dev/null | sed '1s/^/\n/'
        echo "<!-- bench-tls:end -->"
    } >"$section"
    replace_doc_section "$REPO/docs/benchmarks.md" "<!-- bench-tls:begin" "<!-- bench-tls:end" "$section"
    rm -rf "$tmp"
    log "updated docs/benchmarks.md (bench-tls section)"
}

if [ -n "$REPORT" ]; then
    command -v jq >/dev/null || die "needs jq"
    OUT=$REPORT
    DOCS=${DOCS:-0}
    write_report
    exit 0
fi
[ -z "$DOCS" ] && { [ $QUICK = 1 ] && DOCS=0 || DOCS=1; }
for v in DURATION CONC CONNS INFLIGHT IDLE HOLD ATTEMPTS MAX_SECONDS; do
    [[ ${!v} =~ ^[0-9]+$ ]] && [ "${!v}" -ge 1 ] || die "--$(tr '[:upper:]_' '[:lower:]-' <<<"$v"): a whole number >= 1"
done
[[ $NICE =~ ^-?[0-9]+$ ]] || die "--nice: a number from -20 to 19"
[[ $NOISE_PCT =~ ^[0-9]+$ ]] || die "--noise-pct: a whole number"
export BENCH_NICE=$NICE
IFS=, read -r -a PEER_LIST <<<"$PEERS"
for p in "${PEER_LIST[@]}"; do
    case $p in relay | haproxy) ;; *) die "--peers: unknown peer $p" ;; esac
done
IFS=, read -r -a CELL_LIST <<<"$CELLS"
for c in "${CELL_LIST[@]}"; do
    case $c in hs-full | hs-resume | hs-c1 | tput-32 | tput-4096 | idle) ;; *) die "--cells: unknown cell $c" ;; esac
done
[ "$(nproc --all)" -ge 2 ] || die "needs 2 CPUs (proxy on CPU 0, load and origin on CPU 1)"

# The whole run is bounded: a watchdog (our own child, stopped at exit) ends it.
# (Its own output goes nowhere, so it never holds a pipe of the caller open; on TERM it
# stops its sleep and exits.)
(
    exec >/dev/null 2>&1
    sleep "$MAX_SECONDS" &
    sp=$!
    trap 'kill "$sp"; exit 0' TERM
    wait "$sp" && kill -TERM $$
) &
WATCHDOG=$!

# ---------------------------------------------------------------- setup
need_pkgs=()
command -v jq >/dev/null || need_pkgs+=(jq)
command -v ss >/dev/null || need_pkgs+=(iproute2)
command -v openssl >/dev/null || need_pkgs+=(openssl)
APT_UPDATED=0
apt_install() {
    [ $INSTALL = 1 ] || return 1
    command -v apt-get >/dev/null || return 1
    local made_policy=0 rc
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
    fi
    if [ $APT_UPDATED = 0 ]; then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 && APT_UPDATED=1
    fi
    log "apt-get install -y $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
    rc=$?
    [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
    return $rc
}
[ ${#need_pkgs[@]} -gt 0 ] && { apt_install "${need_pkgs[@]}" || die "needs ${need_pkgs[*]}"; }

declare -A PEER_OK=() PEER_SKIP=() PEER_VERSION=() NEGOTIATED=()
for p in "${PEER_LIST[@]}"; do PEER_OK[$p]=1; done
if [ -n "${PEER_OK[haproxy]:-}" ] && ! command -v haproxy >/dev/null; then
    apt_install haproxy || true
fi
if [ -n "${PEER_OK[haproxy]:-}" ] && ! command -v haproxy >/dev/null; then
    warn "haproxy is not installed and could not be installed: skipped"
    PEER_SKIP[haproxy]="not installed"
    unset "PEER_OK[haproxy]"
fi

TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
if [ $BUILD = 1 ]; then
    log "cargo build --release -p relay -p relay-bench (target dir $TARGET_DIR)"
    (cd "$REPO" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -p relay -p relay-bench >&2) ||
        die "build failed"
fi
RELAY=$TARGET_DIR/release/relay
BENCH=$TARGET_DIR/release/relay-bench
[ -x "$BENCH" ] || die "no $BENCH"
if [ -n "${PEER_OK[relay]:-}" ] && [ ! -x "$RELAY" ]; then
    PEER_SKIP[relay]="not built"
    unset "PEER_OK[relay]"
fi
"$BENCH" handshakes --help >/dev/null 2>&1 || die "$BENCH has no 'handshakes' subcommand (rebuild)"
PEER_VERSION[relay]=$("$RELAY" --version 2>/dev/null | head -1)
PEER_VERSION[haproxy]=$(haproxy -v 2>/dev/null | head -1)

NOFILE_HARD=$(ulimit -Hn)
[ "$NOFILE_HARD" = unlimited ] && NOFILE_HARD=1048576
ulimit -n "$NOFILE_HARD" 2>/dev/null || true
[ "$NOFILE_HARD" -ge 2000 ] || die "RLIMIT_NOFILE hard limit $NOFILE_HARD is too low"
# Idle cell: relayed connections per proxy process (2 descriptors each, margin for the
# uneven SO_REUSEPORT spread), and the per-process cap given to both proxies.
PROXY_PER_PROC=$(((NOFILE_HARD - 200) * 43 / 100))
MAXCONN=$(((NOFILE_HARD - 200) / 2))

STAMP=$(date -u +%Y%m%d-%H%M%S)
[ -z "$OUT" ] && OUT=$REPO/bench-results/tls-$STAMP.json
RUN_DIR=${OUT%.json}
mkdir -p "$RUN_DIR" || die "cannot create $RUN_DIR"
RESULTS=$RUN_DIR/results.jsonl
: >"$RESULTS"
CERT_DIR=$(mktemp -d /tmp/bench-tls-certs.XXXXXX)
make_certs "$CERT_DIR" || die "openssl could not make the certificates: $(tail -3 "$CERT_DIR/openssl.log")"
AUTOGROUP_OLD=

cleanup() {
    stop_all_started
    kill "$WATCHDOG" 2>/dev/null
    [ -n "$AUTOGROUP_OLD" ] && echo "$AUTOGROUP_OLD" >"/proc/$$/autogroup" 2>/dev/null
    rm -rf "$CERT_DIR"
    return 0
}
trap cleanup EXIT
trap 'log "interrupted (or --max-seconds reached)"; exit 130' INT TERM
if [ "$NICE" != 0 ] && [ "$(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null)" = 1 ] &&
    [ -w "/proc/$$/autogroup" ]; then
    AUTOGROUP_OLD=$(awk '{print $NF}' "/proc/$$/autogroup")
    echo "$NICE" >"/proc/$$/autogroup" 2>/dev/null || AUTOGROUP_OLD=
fi
log "peers: ${!PEER_OK[*]}; cells: $CELLS; results in $RUN_DIR"

record() { echo "$1" >>"$RESULTS"; }
KSOFTIRQD0=$(pgrep -x ksoftirqd/0 | head -1)
SRC_NET=0
# next_sources: a fresh /24 of loopback source addresses for the next client, so that
# TIME_WAIT sockets of earlier cells never limit a later one's ports.
next_sources() {
    SRC_NET=$((SRC_NET % 200 + 1))
    SOURCES_OUT="127.1.$SRC_NET.1-127.1.$SRC_NET.254"
}

# ---------------------------------------------------------------- handshake cells
# run_hs PEER full|resume DIR [CONCURRENCY]: prints one JSON object.
run_hs() {
    local peer=$1 kind=$2 dir=$3 conc=${4:-$CONC} port life rc
    mkdir -p "$dir"
    life=$((DURATION + 120))
    start_origins 1 "$life" "$dir" || { stop_tpids "${ORIGIN_TPIDS[@]}"; jq -nc --arg e "$PEER_ERR" '{ok: false, error: $e}'; return; }
    alloc_port
    port=$PORT_OUT
    if ! start_tls_peer "$peer" 1 "$port" "$life" "$dir" "$MAXCONN"; then
        stop_tpids "${PEER_TPIDS[@]}" "${ORIGIN_TPIDS[@]}"
        jq -nc --arg e "$PEER_ERR" '{ok: false, error: $e}'
        return
    fi
    next_sources
    local pids tk0 tk1 b0 t0 b1 t1 k0 k1
    pids=$(IFS=,; echo "${PEER_PIDS[*]}")
    tk0=$(proc_ticks "${PEER_PIDS[@]}")
    read -r b0 t0 < <(cpu_jiffies cpu0)
    k0=$(proc_ticks "$KSOFTIRQD0")
    spawn 1 $((DURATION + 60)) "$dir/hs" "$BENCH" handshakes --target "127.0.0.1:$port" --host relay.test \
        --tls --insecure --sni relay.test --"$kind" --concurrency "$conc" --duration "$DURATION" --warmup 1 \
        --sources "$SOURCES_OUT" --server-pid "$pids" --max-seconds $((DURATION + 40)) --json "$dir/hs.json"
    local tp=$SPAWNED
    wait "$tp"
    rc=$?
    forget_tpid "$tp"
    tk1=$(proc_ticks "${PEER_PIDS[@]}")
    read -r b1 t1 < <(cpu_jiffies cpu0)
    k1=$(proc_ticks "$KSOFTIRQD0")
    local alive=1 p counters
    for p in "${PEER_PIDS[@]}"; do kill -0 "$p" 2>/dev/null || alive=0; done
    counters=$(relay_tls_counters)
    [ "$peer" = relay ] || counters=null
    stop_tpids "${PEER_TPIDS[@]}" "${ORIGIN_TPIDS[@]}"
    if [ ! -s "$dir/hs.json" ]; then
        jq -nc --arg e "handshakes wrote no JSON (exit $rc): $(grep -v '^\[' "$dir/hs.err" | tail -3 | tr '\n' ' ')" '{ok: false, error: $e}'
        return
    fi
    jq -c --argjson rc "$rc" --argjson alive "$alive" --argjson server_counts "$counters" \
        --argjson other0 "$(other_cpu_pct $((b1 - b0)) $((t1 - t0)) $((tk1 - tk0 + k1 - k0)))" \
        --argjson ksoft0 "$(other_cpu_pct $((k1 - k0)) $((t1 - t0)) 0)" '
        {
          ok: ($rc == 0 and $alive == 1 and .failures_total == 0),
          error: ([ (if $rc != 0 then "handshakes exit status \($rc)" else empty end),
                    (if $alive == 0 then "proxy died" else empty end),
                    (if .failures_total > 0 then "\(.failures_total) failed connections \(.failures)" else empty end)
                  ] | if length == 0 then null else join("; ") end),
          conns_per_s, completed, handshakes_full, handshakes_resumed, resumed_share,
          failures_total, unclean_closes, negotiated,
          tls_handshake_us: .latency_us.tls_handshake_us,
          connect_to_echo_us: .latency_us.connect_to_echo_us,
          proxy_cpu_us_per_conn: .server.cpu_us_per_conn,
          proxy_cpu_pct: .server.cpu_pct, proxy_runq_wait_pct: .server.runq_wait_pct,
          other_cpu0_pct: $other0, ksoftirqd0_pct: $ksoft0,
          loader_cpu_s, server_tls_counters: $server_counts
        }' "$dir/hs.json"
}

# ---------------------------------------------------------------- throughput cells
# run_tput PEER SIZE DIR: prints one JSON object.
run_tput() {
    local peer=$1 size=$2 dir=$3 port life rc lj tk0 tk1 q0 q1 w0 w1 b0 t0 b1 t1 k0 k1
    mkdir -p "$dir"
    life=$((DURATION * 2 + 120))
    start_origins 1 "$life" "$dir" || { stop_tpids "${ORIGIN_TPIDS[@]}"; jq -nc --arg e "$PEER_ERR" '{ok: false, error: $e}'; return; }
    alloc_port
    port=$PORT_OUT
    if ! start_tls_peer "$peer" 1 "$port" "$life" "$dir" "$MAXCONN"; then
        stop_tpids "${PEER_TPIDS[@]}" "${ORIGIN_TPIDS[@]}"
        jq -nc --arg e "$PEER_ERR" '{ok: false, error: $e}'
        return
    fi
    # Warm-up (first-use allocations, page faults), not measured.
    nice -n "$NICE" taskset -c 1 "$BENCH" load --target "127.0.0.1:$port" --host relay.test --tls --insecure \
        --sni relay.test --connections "$CONNS" --inflight "$INFLIGHT" --size "$size" --duration 1 \
        --max-seconds 60 >/dev/null 2>"$dir/warmup.err" || true
    lj=$dir/load.json
    tk0=$(proc_ticks "${PEER_PIDS[@]}")
    q0=$(proc_runq_wait_ns "${PEER_PIDS[@]}")
    read -r b0 t0 < <(cpu_jiffies cpu0)
    k0=$(proc_ticks "$KSOFTIRQD0")
    w0=$(date +%s.%N)
    spawn 1 $((DURATION + 90)) "$dir/load" "$BENCH" load --target "127.0.0.1:$port" --host relay.test \
        --tls --insecure --sni relay.test --mode throughput --connections "$CONNS" --inflight "$INFLIGHT" \
        --size "$size" --duration "$DURATION" --threads 1 --max-seconds $((DURATION + 60)) --json "$lj"
    local tp=$SPAWNED
    wait "$tp"
    rc=$?
    forget_tpid "$tp"
    w1=$(date +%s.%N)
    tk1=$(proc_ticks "${PEER_PIDS[@]}")
    q1=$(proc_runq_wait_ns "${PEER_PIDS[@]}")
    read -r b1 t1 < <(cpu_jiffies cpu0)
    k1=$(proc_ticks "$KSOFTIRQD0")
    local alive=1 p
    for p in "${PEER_PIDS[@]}"; do kill -0 "$p" 2>/dev/null || alive=0; done
    stop_tpids "${PEER_TPIDS[@]}" "${ORIGIN_TPIDS[@]}"
    if [ ! -s "$lj" ]; then
        jq -nc --arg e "load wrote no JSON (exit $rc): $(grep -v '^\[' "$dir/load.err" | tail -3 | tr '\n' ' ')" '{ok: false, error: $e}'
        return
    fi
    jq -c --argjson rc "$rc" --argjson alive "$alive" --argjson dt $((tk1 - tk0)) --argjson hz "$CLK_TCK" \
        --argjson qwait $((q1 - q0)) --argjson wall "$(awk -v a="$w0" -v b="$w1" 'BEGIN { printf "%.3f", b - a }')" \
        --argjson other0 "$(other_cpu_pct $((b1 - b0)) $((t1 - t0)) $((tk1 - tk0 + k1 - k0)))" \
        --argjson ksoft0 "$(other_cpu_pct $((k1 - k0)) $((t1 - t0)) 0)" '
        def r(n): if . == null then null else (. * pow(10; n) | round) / pow(10; n) end;
        (.messages) as $m
        | {
            ok: ($rc == 0 and $alive == 1 and .messages > 0 and .verify_failures == 0 and .errors == 0
                 and .connections_open_peak == .connections_requested),
            error: ([ (if $rc != 0 then "load exit status \($rc)" else empty end),
                      (if $alive == 0 then "proxy died" else empty end),
                      (if .errors + .verify_failures + .handshake_failures > 0
                       then "errors \(.errors), verify failures \(.verify_failures), handshake failures \(.handshake_failures)" else empty end)
                    ] | if length == 0 then null else join("; ") end),
            msgs_per_s, messages, rtt_us,
            proxy_cpu_us_per_msg: (if $m > 0 then ($dt * 1e6 / $hz / $m | r(3)) else null end),
            proxy_cpu_pct: ($dt / $hz / $wall * 100 | r(1)),
            proxy_runq_wait_pct: ($qwait / 1e9 / $wall * 100 | r(1)),
            other_cpu0_pct: $other0, ksoftirqd0_pct: $ksoft0,
            negotiated: .tls.negotiated, connections_open: .connections_open_peak
          }' "$lj"
}

# ---------------------------------------------------------------- idle cell
# run_idle PEER N DIR: prints one JSON object.
run_idle() {
    local peer=$1 n=$2 dir=$3 P L life port j share lo avail need
    mkdir -p "$dir"
    P=$(ceil_div "$n" "$PROXY_PER_PROC")
    L=$(ceil_div "$n" 15000)
    # Memory: the client keeps ~10 KiB per TLS connection, the proxy some KiB, the kernel
    # ~4 sockets x ~5 KiB: 64 KiB per connection with margin, and 1 GiB left over.
    avail=$(meminfo_kib MemAvailable)
    need=$((n * 64 + 1048576))
    if [ "$avail" -lt "$need" ]; then
        jq -nc --arg e "skipped: MemAvailable ${avail} KiB < ${need} KiB needed ($n x 64 KiB + 1 GiB)" '{ok: false, error: $e}'
        return
    fi
    local limit=$((n / 20 > 5000 ? n / 20 : 5000)) waited=0 tw
    while tw=$(sockstat_tw) && [ "$tw" -gt "$limit" ] && [ $waited -lt 75 ]; do
        [ $waited = 0 ] && log "    waiting for $tw TIME_WAIT sockets to expire"
        sleep 1
        waited=$((waited + 1))
    done
    life=$((HOLD + 600))
    start_origins "$P" "$life" "$dir" || { stop_tpids "${ORIGIN_TPIDS[@]}"; jq -nc --arg e "$PEER_ERR" '{ok: false, error: $e}'; return; }
    alloc_port
    port=$PORT_OUT
    if ! start_tls_peer "$peer" "$P" "$port" "$life" "$dir" "$MAXCONN"; then
        stop_tpids "${PEER_TPIDS[@]}" "${ORIGIN_TPIDS[@]}"
        jq -nc --arg e "$PEER_ERR" '{ok: false, error: $e}'
        return
    fi
    nice -n "$NICE" taskset -c 1 "$BENCH" load --target "127.0.0.1:$port" --host relay.test --tls --insecure \
        --sni relay.test --connections $((8 * P)) --inflight 4 --size 4096 --duration 1 --max-seconds 60 \
        >/dev/null 2>"$dir/warmup.err" || true
    sleep 2
    local rss0 rss1 tk0 tk1 inuse0 inuse1
    rss0=$(proc_rss_kib "${PEER_PIDS[@]}")
    inuse0=$(sockstat_tcp_inuse)
    slab_snapshot >"$dir/slab0.txt"
    tk0=$(proc_ticks "${PEER_PIDS[@]}")
    local LOAD_TPIDS=()
    lo=0
    for ((j = 0; j < L; j++)); do
        share=$(((n * (j + 1)) / L - lo))
        lo=$((lo + share))
        next_sources
        spawn 1 $((HOLD + 400)) "$dir/load-$j" "$BENCH" load --mode hold --target "127.0.0.1:$port" \
            --host relay.test --tls --insecure --sni relay.test --connections "$share" --rate 0 --max-pending 256 \
            --source-range "$SOURCES_OUT" --hold "$HOLD" --threads 1 --max-seconds $((HOLD + 300)) \
            --json "$dir/load-$j.json"
        LOAD_TPIDS+=("$SPAWNED")
    done
    local all_held t
    for t in $(seq 3000); do
        all_held=1
        for ((j = 0; j < L; j++)); do
            grep -q '\] hold ' "$dir/load-$j.err" 2>/dev/null || { kill -0 "${LOAD_TPIDS[$j]}" 2>/dev/null && all_held=0; }
        done
        [ $all_held = 1 ] && break
        sleep 0.1
    done
    sleep 2
    tk1=$(proc_ticks "${PEER_PIDS[@]}")
    rss1=$(proc_rss_kib "${PEER_PIDS[@]}")
    inuse1=$(sockstat_tcp_inuse)
    slab_snapshot >"$dir/slab1.txt"
    local held loads_alive=0 peer_alive=1 counters
    held=$(established_on "$port")
    for t in "${LOAD_TPIDS[@]}"; do kill -0 "$t" 2>/dev/null && loads_alive=$((loads_alive + 1)); done
    for p in "${PEER_PIDS[@]}"; do kill -0 "$p" 2>/dev/null || peer_alive=0; done
    counters=$(relay_tls_counters)
    [ "$peer" = relay ] || counters=null
    for t in "${LOAD_TPIDS[@]}"; do
        wait "$t" 2>/dev/null
        forget_tpid "$t"
    done
    stop_tpids "${PEER_TPIDS[@]}" "${ORIGIN_TPIDS[@]}"
    local slab_raw slab_proc errs=""
    read -r slab_raw slab_proc < <(slab_delta "$dir/slab0.txt" "$dir/slab1.txt")
    [ $peer_alive = 0 ] && errs+="a proxy process died; "
    [ $loads_alive -lt "$L" ] && errs+="$((L - loads_alive)) load process(es) ended before the sample; "
    cat "$dir"/load-*.json 2>/dev/null | jq -sc --arg errs "$errs" --argjson n "$n" --argjson P "$P" --argjson L "$L" \
        --argjson held "$held" --argjson rss0 "$rss0" --argjson rss1 "$rss1" --argjson dt $((tk1 - tk0)) \
        --argjson hz "$CLK_TCK" --argjson slab_raw "$slab_raw" --argjson slab_proc "$slab_proc" \
        --argjson inuse $((inuse1 - inuse0)) --argjson server_counts "$counters" '
        def r(n): if . == null then null else (. * pow(10; n) | round) / pow(10; n) end;
        def per(x): if $held > 0 then (x / $held | r(0)) else null end;
        ([.[] | .connections_open_peak] | add // 0) as $opened
        | ([.[] | .ramp_seconds] | max // 0) as $ramp
        | ([.[] | .connect_failures + .handshake_failures + .errors] | add // 0) as $fails
        | {
            ok: ($errs == "" and $held >= $n and $fails == 0),
            error: ([ (if $errs != "" then $errs else empty end),
                      (if $held < $n then "\($held) of \($n) established at the sample" else empty end),
                      (if $fails > 0 then "\($fails) connect/handshake failures or errors" else empty end)
                    ] | if length == 0 then null else join("; ") end),
            processes: {proxy: $P, origin: $P, load: $L},
            held: $held, opened: $opened, ramp_seconds: $ramp,
            connect_rate_per_s: (if $ramp > 0 then ($opened / $ramp | r(0)) else null end),
            proxy_cpu_us_per_conn: (if $held > 0 then ($dt * 1e6 / $hz / $held | r(1)) else null end),
            proxy_rss_kib_before: $rss0, proxy_rss_kib_open: $rss1,
            proxy_user_bytes_per_conn: per(($rss1 - $rss0) * 1024),
            kernel_slab_bytes_per_conn: per($slab_raw - $slab_proc),
            tcp_sockets_per_conn: (if $held > 0 then ($inuse / $held | r(3)) else null end),
            loader_rss_bytes_per_conn: ([.[] | .loader_rss_bytes_per_conn // empty] | if length > 0 then (add / length | r(0)) else null end),
            negotiated: ([.[] | .tls.negotiated // empty] | first // null),
            server_tls_counters: $server_counts
          }'
}

# ---------------------------------------------------------------- run the cells
# Disturbance of a run: the share of CPU 0 that something other than the proxy and
# ksoftirqd/0 (network softirq work deferred from the proxy's own sends) used. Neither
# measure is clean on a shared machine: other tasks fill the CPU time an unsaturated proxy
# leaves idle (so this one favours a saturated proxy), and a proxy that sleeps and wakes
# often waits behind them after each wake-up (its run-queue wait, also reported).
noise_of() { jq -r '.other_cpu0_pct // .proxy_runq_wait_pct // 0 | round' <<<"$1"; }
# other_cpu_pct BUSY_JIFFIES TOTAL_JIFFIES PROXY_TICKS: % of the CPU's time not the proxy's.
other_cpu_pct() {
    awk -v b="$1" -v t="$2" -v p="$3" 'BEGIN { v = (t > 0) ? 100 * (b - p) / t : 0; if (v < 0) v = 0; printf "%.1f\n", v }'
}
for cell in "${CELL_LIST[@]}"; do
    for peer in "${PEER_LIST[@]}"; do
        if [ -z "${PEER_OK[$peer]:-}" ]; then
            record "$(jq -nc --arg cell "$cell" --arg peer "$peer" --arg e "skipped: ${PEER_SKIP[$peer]:-unavailable}" \
                '{cell: $cell, peer: $peer, ok: false, error: $e}')"
            continue
        fi
        best=
        tries=$ATTEMPTS
        [ "$cell" = idle ] && tries=1
        for ((a = 1; a <= tries; a++)); do
            d=$RUN_DIR/$cell-$peer-$a
            log "$cell  $peer  (attempt $a)"
            case $cell in
                hs-full) obj=$(run_hs "$peer" full "$d") ;;
                hs-resume) obj=$(run_hs "$peer" resume "$d") ;;
                hs-c1) obj=$(run_hs "$peer" full "$d" 1) ;;
                tput-32) obj=$(run_tput "$peer" 32 "$d") ;;
                tput-4096) obj=$(run_tput "$peer" 4096 "$d") ;;
                idle) obj=$(run_idle "$peer" "$IDLE" "$d") ;;
            esac
            [ -z "$obj" ] && obj='{"ok": false, "error": "no result (see logs)"}'
            obj=$(jq -c --argjson a "$a" '. + {attempt: $a}' <<<"$obj")
            jq -r '"    " + (if .ok then "" else "FAILED: \(.error)  " end)
                + ([ (if .conns_per_s then "\(.conns_per_s) conn/s  cpu/conn \(.proxy_cpu_us_per_conn) us  hs p50 \(.tls_handshake_us.p50) p99 \(.tls_handshake_us.p99) us  resumed \(.resumed_share)" else empty end),
                     (if .msgs_per_s then "\(.msgs_per_s) msg/s  cpu/msg \(.proxy_cpu_us_per_msg) us  p50 \(.rtt_us.p50) p99 \(.rtt_us.p99) us" else empty end),
                     (if .held then "held \(.held)  proxy user \(.proxy_user_bytes_per_conn) B/conn  kernel \(.kernel_slab_bytes_per_conn) B/conn  ramp cpu/conn \(.proxy_cpu_us_per_conn) us" else empty end),
                     (if .proxy_cpu_pct then "proxy cpu \(.proxy_cpu_pct)% (waited \(.proxy_runq_wait_pct)%)  ksoftirqd/0 \(.ksoftirqd0_pct)%  other cpu0 \(.other_cpu0_pct)%" else empty end)
                   ] | join("  "))' <<<"$obj" >&2
            if [ -z "$best" ] || { jq -e '.ok' <<<"$obj" >/dev/null && { ! jq -e '.ok' <<<"$best" >/dev/null || [ "$(noise_of "$obj")" -lt "$(noise_of "$best")" ]; }; }; then
                best=$obj
            fi
            jq -e '.ok' <<<"$obj" >/dev/null && [ "$(noise_of "$obj")" -le "$NOISE_PCT" ] && break
            [ "$a" -lt "$tries" ] && log "    disturbed or failed, again"
        done
        n=$(jq -r '.negotiated // empty' <<<"$best")
        [ -n "$n" ] && [ -z "${NEGOTIATED[$peer]:-}" ] && [[ $cell != hs-resume ]] && NEGOTIATED[$peer]=$n
        record "$(jq -c --arg cell "$cell" --arg peer "$peer" '. + {cell: $cell, peer: $peer}' <<<"$best")"
    done
done

# ---------------------------------------------------------------- JSON + report
CMD="scripts/bench-tls.sh${ORIG_ARGS[*]:+ ${ORIG_ARGS[*]}}"
[ -n "${CARGO_TARGET_DIR:-}" ] && CMD="CARGO_TARGET_DIR=$CARGO_TARGET_DIR $CMD"
negotiated=$(for p in relay haproxy; do printf '%s\t%s\n' "$p" "${NEGOTIATED[$p]:-}"; done |
    jq -Rsc 'split("\n") | map(select(length > 0) | split("\t") | {(.[0]): (if .[1] == "" then null else .[1] end)}) | add')
versions=$(jq -nc --arg r "${PEER_VERSION[relay]:-}" --arg h "${PEER_VERSION[haproxy]:-}" '{relay: $r, haproxy: $h}')
jq -s --arg cmd "$CMD" --argjson m "$(machine_meta)" --argjson versions "$versions" --argjson negotiated "$negotiated" \
    --argjson dur "$DURATION" --argjson conc "$CONC" --argjson conns "$CONNS" --argjson inflight "$INFLIGHT" \
    --argjson idle "$IDLE" --argjson hold "$HOLD" --argjson nice "$NICE" '
    {
      meta: ($m + {command: $cmd, versions: $versions, negotiated: $negotiated, duration_s: $dur,
             concurrency: $conc, connections: $conns, inflight: $inflight, idle: $idle, hold_s: $hold,
             nice: $nice, client: "relay-bench (rustls 0.23, aws-lc-rs), --insecure verifier, X25519 only",
             layout: "proxy on CPU 0 (taskset -c 0); relay-bench and echo-origin on CPU 1"}),
      results: .
    }' "$RESULTS" >"$OUT" || die "cannot write $OUT"
write_report
exit 0
