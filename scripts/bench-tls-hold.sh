#!/usr/bin/env bash
# scripts/bench-tls-hold.sh: hold many idle wss connections (default 100,000 for 60 s) through
# several relay processes terminating TLS on one port (SO_REUSEPORT), and state what an idle
# TLS connection costs relay in user space, and the kernel.
#
# A process may hold RLIMIT_NOFILE (20,000 here) descriptors, so relay runs as several
# processes (`--workers 1 --no-pin`, pinned to CPU 0 with taskset) sharing the TLS port, each
# with `limits.max_connections` set; they serve relay's embedded echo app (`/echo`, no
# origin), so a connection is one descriptor in relay. The clients are several
# `relay-bench load --tls --mode hold` processes on CPU 1, each with its own /24 of loopback
# source addresses. Certificate: ECDSA P-256 made with the openssl CLI in a temp dir; TLS 1.3,
# tickets on (bench/peers/relay-tls-echo.toml.in).
#
# Measured: relay's VmRSS summed over its processes before the load (after a warm-up) and
# once every connection is open, and again at the end of the hold: (open - before) / held =
# user-space bytes per idle TLS connection; kernel memory from /proc/slabinfo (allocated
# objects x size, machine-wide, /proc inode artefacts removed) and /proc/net/sockstat TCP mem
# pages; failures (connect, TLS/upgrade, lost connections) from the loaders and relay's own
# TLS handshake counters (/metrics).
#
# Refuses (with the arithmetic) when MemAvailable is too small. Output: a summary on stdout,
# JSON in bench-results/tls-hold-DATE.json (logs in bench-results/tls-hold-DATE/), and the
# section of docs/benchmarks.md between the bench-tls-hold markers (unless --no-docs).
#
# Loopback only. Takes /tmp/relay-bench.lock (flock). Stops only the processes it started, by
# PID; everything is bounded by timeout(1) and --max-seconds.
set -uo pipefail

PROG=bench-tls-hold
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
usage: scripts/bench-tls-hold.sh [options]
  --connections N       idle wss connections to hold (default 100000)
  --hold S              seconds to hold them once all are open (default 60)
  --processes P         relay processes (default: as RLIMIT_NOFILE requires, 1 fd per connection)
  --rate R              new connections per second per load process (default 0 = as fast as
                        --max-pending allows)
  --quick               10,000 connections held 10 s, no docs update
  --nice N              nice level of everything started (default -20)
  --max-seconds S       hard cap on the whole run (default 1200)
  --out FILE            JSON output (default bench-results/tls-hold-DATE.json)
  --docs / --no-docs    write the section of docs/benchmarks.md (default: yes unless --quick)
  --no-build            use the binaries already in $CARGO_TARGET_DIR/release
  --report FILE         run nothing: print the summary of an earlier run (with --docs: write it)
Env: CARGO_TARGET_DIR (default ./target), RELAY_EXTRA_ARGS (extra relay flags, word-split)
EOF
    exit 2
}

N=100000
HOLD=60
PROCS=
RATE=0
NICE=-20
MAX_SECONDS=1200
OUT=
DOCS=
BUILD=1
QUICK=0
REPORT=
while [ $# -gt 0 ]; do
    case $1 in
        --connections) N=${2:?}; shift ;;
        --hold) HOLD=${2:?}; shift ;;
        --processes) PROCS=${2:?}; shift ;;
        --rate) RATE=${2:?}; shift ;;
        --quick) QUICK=1; N=10000; HOLD=10 ;;
        --nice) NICE=${2:?}; shift ;;
        --max-seconds) MAX_SECONDS=${2:?}; shift ;;
        --out) OUT=${2:?}; shift ;;
        --docs) DOCS=1 ;;
        --no-docs) DOCS=0 ;;
        --no-build) BUILD=0 ;;
        --report) REPORT=${2:?}; shift ;;
        -h | --help) usage ;;
        *) echo "$PROG: unknown option $1" >&2; usage ;;
    esac
    shift
done

summary() {
    jq -r '
      def r(n): if . == null then null else (. * pow(10; n) | round) / pow(10; n) end;
      .meta as $m | .result as $x |
      "| figure | value |",
      "|--------|------:|",
      "| connections asked / established at the sample (relay side) | \($m.connections) / \($x.held) |",
      "| relay processes (`--workers 1`, max_connections \($m.max_connections_per_process) each) / load processes | \($x.processes.relay) / \($x.processes.load) |",
      "| open descriptors per relay process (connections + a few of its own) | \($x.per_process_connections | map(tostring) | join(", ")) |",
      "| ramp: seconds / connections per second | \($x.ramp_seconds | r(1)) / \($x.connect_rate_per_s) |",
      "| relay VmRSS before → all open → end of hold (sum, KiB) | \($x.relay_rss_kib.before) → \($x.relay_rss_kib.open) → \($x.relay_rss_kib.end) |",
      "| **relay user-space bytes per idle TLS connection** (open − before) / held | **\($x.relay_user_bytes_per_conn)** |",
      "| same at the end of the hold | \($x.relay_user_bytes_per_conn_end) |",
      "| kernel slab bytes per connection (client + relay socket, machine-wide) | \($x.kernel_slab_bytes_per_conn) |",
      "| kernel TCP buffer pages per connection (sockstat mem × 4096) | \($x.kernel_tcp_mem_bytes_per_conn) |",
      "| loader (client) VmRSS bytes per connection | \($x.loader_rss_bytes_per_conn) |",
      "| relay CPU-µs per connection during the ramp (handshake + upgrade) | \($x.relay_cpu_us_per_conn_ramp) |",
      "| relay CPU during the hold (% of one CPU) | \($x.relay_cpu_pct_hold) |",
      "| failures: connect / handshake+upgrade / lost during the hold | \($x.connect_failures) / \($x.handshake_failures) / \($x.errors) |",
      "| relay TLS handshakes full / resumed / failed (its /metrics) | \($x.relay_tls.full) / \($x.relay_tls.resumed) / \($x.relay_tls.failures) |",
      "| negotiated | \($x.negotiated) |",
      (if $x.error then "", "Problems: \($x.error)" else empty end)' "$OUT"
}

write_docs() {
    local tmp section
    tmp=$(mktemp -d /tmp/bench-tls-hold-doc.XXXXXX)
    section=$tmp/section.md
    {
        echo "<!-- bench-tls-hold:begin (generated by scripts/bench-tls-hold.sh; edits here are overwritten) -->"
        echo "### Idle TLS connections at scale (\`scripts/bench-tls-hold.sh\`)"
        echo
        cat <<'EOF'
Idle wss connections held through several relay processes sharing one TLS port
(SO_REUSEPORT; `--workers 1` each, all pinned to CPU 0, `limits.max_connections` set) that
answer with the embedded echo app (no origin: one descriptor per connection in relay), from
several `relay-bench load --tls --mode hold` processes on CPU 1. TLS 1.3, ECDSA P-256,
tickets on (`bench/peers/relay-tls-echo.toml.in`). User-space bytes per connection = relay's
VmRSS summed over its processes once every connection is open, minus the same sum before
the load (after a warm-up), ÷ connections established. Kernel figures are machine-wide
(client and relay sockets both). relay's echo app pings idle connections every 30 s; the
loaders answer.
EOF
        echo
        jq -r '.meta | "- Command: `\(.command)`\n- Date: \(.date)\n- Machine: \(.cpu_model), \(.cpus) CPUs\(if .hypervisor then " (" + .hypervisor + " guest)" else "" end), \(.mem_total_kib / 1048576 | . * 10 | round / 10) GiB RAM, RLIMIT_NOFILE \(.rlimit_nofile)\n- Kernel: \(.kernel)\n- Source: git \(.git); \(.relay_version)\n- Held \(.hold_s) s"' "$OUT"
        echo "- JSON: \`bench-results/$(basename "$OUT")\` (not committed)"
        echo
        summary
        echo "<!-- bench-tls-hold:end -->"
    } >"$section"
    replace_doc_section "$REPO/docs/benchmarks.md" "<!-- bench-tls-hold:begin" "<!-- bench-tls-hold:end" "$section"
    rm -rf "$tmp"
    log "updated docs/benchmarks.md (bench-tls-hold section)"
}

if [ -n "$REPORT" ]; then
    OUT=$REPORT
    summary
    [ "${DOCS:-0}" = 1 ] && write_docs
    exit 0
fi
[ -z "$DOCS" ] && { [ $QUICK = 1 ] && DOCS=0 || DOCS=1; }
for v in N HOLD MAX_SECONDS; do
    [[ ${!v} =~ ^[0-9]+$ ]] && [ "${!v}" -ge 1 ] || die "${v}: a whole number >= 1"
done
[[ $RATE =~ ^[0-9]+$ ]] || die "--rate: a whole number"
[[ $NICE =~ ^-?[0-9]+$ ]] || die "--nice: a number from -20 to 19"
export BENCH_NICE=$NICE
[ "$(nproc --all)" -ge 2 ] || die "needs 2 CPUs"
command -v jq >/dev/null || die "needs jq"
command -v openssl >/dev/null || die "needs openssl"

NOFILE_HARD=$(ulimit -Hn)
[ "$NOFILE_HARD" = unlimited ] && NOFILE_HARD=1048576
ulimit -n "$NOFILE_HARD" 2>/dev/null || true
# One descriptor per connection in relay (echo app) and in each loader; margins for the
# uneven SO_REUSEPORT spread (hashing: about +-3 sqrt(n) around n / P) and own descriptors.
RELAY_MAXCONN=$((NOFILE_HARD - 500))
PER_RELAY=$(((NOFILE_HARD - 500) * 85 / 100))
[ -z "$PROCS" ] && PROCS=$(ceil_div "$N" "$PER_RELAY")
[[ $PROCS =~ ^[0-9]+$ ]] && [ "$PROCS" -ge 1 ] || die "--processes: a whole number >= 1"
[ $((N / PROCS)) -le "$PER_RELAY" ] || die "$N connections over $PROCS relay processes is $((N / PROCS)) each; at most $PER_RELAY fit under RLIMIT_NOFILE $NOFILE_HARD (give more --processes)"
PER_LOAD=$(((NOFILE_HARD - 500) * 85 / 100))
L=$(ceil_div "$N" "$PER_LOAD")
[ "$L" -le 200 ] || die "too many load processes ($L)"

# Memory: per connection the loader keeps ~10 KiB (rustls state, measured 9.3 KB), relay an
# estimated <= 16 KiB, the kernel two sockets of ~5 KiB plus buffers: 40 KiB per connection
# with margin, plus 1 GiB for everything else.
AVAIL=$(meminfo_kib MemAvailable)
NEED=$((N * 40 + 1048576))
if [ "$AVAIL" -lt "$NEED" ]; then
    die "refusing: $N connections x 40 KiB (client ~10 KiB + relay <= 16 KiB + kernel ~12 KiB, with margin) + 1 GiB = $NEED KiB, but MemAvailable is $AVAIL KiB; try --connections $(((AVAIL - 1048576) / 40 > 0 ? (AVAIL - 1048576) / 40 : 0))"
fi

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

TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
if [ $BUILD = 1 ]; then
    log "cargo build --release -p relay -p relay-bench (target dir $TARGET_DIR)"
    (cd "$REPO" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -p relay -p relay-bench >&2) || die "build failed"
fi
RELAY=$TARGET_DIR/release/relay
BENCH=$TARGET_DIR/release/relay-bench
[ -x "$RELAY" ] || die "no $RELAY"
[ -x "$BENCH" ] || die "no $BENCH"

STAMP=$(date -u +%Y%m%d-%H%M%S)
[ -z "$OUT" ] && OUT=$REPO/bench-results/tls-hold-$STAMP.json
RUN_DIR=${OUT%.json}
mkdir -p "$RUN_DIR" || die "cannot create $RUN_DIR"
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
log "$N connections, $PROCS relay processes (max_connections $RELAY_MAXCONN each), $L load processes, hold ${HOLD}s; MemAvailable $AVAIL KiB >= $NEED KiB; results in $RUN_DIR"

# Let earlier runs' TIME_WAIT sockets expire so their slab objects are not freed mid-measurement.
waited=0
while tw=$(sockstat_tw) && [ "$tw" -gt 5000 ] && [ $waited -lt 75 ]; do
    [ $waited = 0 ] && log "waiting for $tw TIME_WAIT sockets to expire"
    sleep 1
    waited=$((waited + 1))
done

life=$((HOLD + MAX_SECONDS))
# shellcheck disable=SC2034  # read by start_tls_peer (none: the echo app answers)
ORIGIN_PORTS=()
alloc_port
PORT=$PORT_OUT
start_tls_peer relay "$PROCS" "$PORT" "$life" "$RUN_DIR" "$RELAY_MAXCONN" relay-tls-echo.toml.in || die "$PEER_ERR"
RELAY_PIDS=("${PEER_PIDS[@]}")
# Warm-up: first-use allocations in every process are not per-connection costs.
nice -n "$NICE" taskset -c 1 "$BENCH" load --target "127.0.0.1:$PORT" --path /echo --host relay.test --tls \
    --insecure --sni relay.test --connections $((16 * PROCS)) --inflight 4 --size 4096 --duration 1 \
    --max-seconds 60 >/dev/null 2>"$RUN_DIR/warmup.err" || true
sleep 2
RSS0=$(proc_rss_kib "${RELAY_PIDS[@]}")
MEM0=$(sockstat_tcp_mem_pages)
INUSE0=$(sockstat_tcp_inuse)
slab_snapshot >"$RUN_DIR/slab0.txt"
TK0=$(proc_ticks "${RELAY_PIDS[@]}")

LOAD_TPIDS=()
lo=0
for ((j = 0; j < L; j++)); do
    share=$(((N * (j + 1)) / L - lo))
    lo=$((lo + share))
    spawn 1 $((HOLD + MAX_SECONDS)) "$RUN_DIR/load-$j" "$BENCH" load --mode hold --target "127.0.0.1:$PORT" \
        --path /echo --host relay.test --tls --insecure --sni relay.test --connections "$share" --rate "$RATE" \
        --max-pending 256 --connect-timeout 30 --source-range "127.2.$((j + 1)).1-127.2.$((j + 1)).254" \
        --hold "$HOLD" --threads 1 --max-seconds $((MAX_SECONDS - 30)) --json "$RUN_DIR/load-$j.json"
    LOAD_TPIDS+=("$SPAWNED")
done
log "ramping"
for t in $(seq $((MAX_SECONDS * 10))); do
    all_held=1
    for ((j = 0; j < L; j++)); do
        grep -q '\] hold ' "$RUN_DIR/load-$j.err" 2>/dev/null || { kill -0 "${LOAD_TPIDS[$j]}" 2>/dev/null && all_held=0; }
    done
    [ $all_held = 1 ] && break
    if [ $((t % 50)) = 0 ]; then
        log "  established on :$PORT: $(established_on "$PORT")"
    fi
    sleep 0.1
done
sleep 2
TK1=$(proc_ticks "${RELAY_PIDS[@]}")
RSS1=$(proc_rss_kib "${RELAY_PIDS[@]}")
MEM1=$(sockstat_tcp_mem_pages)
INUSE1=$(sockstat_tcp_inuse)
slab_snapshot >"$RUN_DIR/slab1.txt"
HELD=$(established_on "$PORT")
PER_PROC=$(for p in "${RELAY_PIDS[@]}"; do ls "/proc/$p/fd" 2>/dev/null | wc -l; done | jq -sc '.')
log "all open: $HELD established; relay VmRSS $RSS0 -> $RSS1 KiB; holding"
W0=$(date +%s.%N)
# Sample again near the end of the hold (the loads end by themselves after --hold).
sleep $((HOLD > 6 ? HOLD - 5 : 1))
W1=$(date +%s.%N)
TK2=$(proc_ticks "${RELAY_PIDS[@]}")
RSS2=$(proc_rss_kib "${RELAY_PIDS[@]}")
HELD2=$(established_on "$PORT")
TLS_COUNTS=$(relay_tls_counters)
ALIVE=1
for p in "${RELAY_PIDS[@]}"; do kill -0 "$p" 2>/dev/null || ALIVE=0; done
for t in "${LOAD_TPIDS[@]}"; do
    wait "$t" 2>/dev/null
    forget_tpid "$t"
done
stop_tpids "${PEER_TPIDS[@]}"
read -r SLAB_RAW SLAB_PROC < <(slab_delta "$RUN_DIR/slab0.txt" "$RUN_DIR/slab1.txt")
TOP=$(slab_top "$RUN_DIR/slab0.txt" "$RUN_DIR/slab1.txt" |
    jq -Rsc 'split("\n") | map(select(length > 0) | split(" ") | {cache: .[0], bytes: (.[1] | tonumber)})')
ERRS=""
[ $ALIVE = 0 ] && ERRS+="a relay process died; "
for ((j = 0; j < L; j++)); do
    [ -s "$RUN_DIR/load-$j.json" ] || ERRS+="load $j wrote no JSON: $(grep -v '^\[' "$RUN_DIR/load-$j.err" | tail -2 | tr '\n' ' '); "
done

RESULT=$(cat "$RUN_DIR"/load-*.json 2>/dev/null | jq -sc --arg errs "$ERRS" --argjson n "$N" --argjson P "$PROCS" --argjson L "$L" \
    --argjson held "$HELD" --argjson held2 "$HELD2" --argjson rss0 "$RSS0" --argjson rss1 "$RSS1" --argjson rss2 "$RSS2" \
    --argjson mem0 "$MEM0" --argjson mem1 "$MEM1" --argjson inuse $((INUSE1 - INUSE0)) \
    --argjson slab_raw "$SLAB_RAW" --argjson slab_proc "$SLAB_PROC" --argjson top "$TOP" \
    --argjson tk01 $((TK1 - TK0)) --argjson tk12 $((TK2 - TK1)) --argjson hz "$CLK_TCK" \
    --argjson wall "$(awk -v a="$W0" -v b="$W1" 'BEGIN { printf "%.3f", b - a }')" \
    --argjson per_proc "$PER_PROC" --argjson tls "$TLS_COUNTS" '
    def r(n): if . == null then null else (. * pow(10; n) | round) / pow(10; n) end;
    def per(x): if $held > 0 then (x / $held | r(0)) else null end;
    ([.[] | .connections_open_peak] | add // 0) as $opened
    | ([.[] | .ramp_seconds] | max // 0) as $ramp
    | ([.[] | .connect_failures] | add // 0) as $cf
    | ([.[] | .handshake_failures] | add // 0) as $hf
    | ([.[] | .errors] | add // 0) as $er
    | {
        ok: ($errs == "" and $held >= $n and $cf == 0 and $hf == 0 and $er == 0),
        error: ([ (if $errs != "" then $errs else empty end),
                  (if $held < $n then "\($held) of \($n) connections established at the sample" else empty end),
                  (if $cf + $hf + $er > 0 then "connect failures \($cf), handshake failures \($hf), errors \($er)" else empty end)
                ] | if length == 0 then null else join("; ") end),
        processes: {relay: $P, load: $L},
        held: $held, held_at_end: $held2, opened: $opened,
        per_process_connections: $per_proc,
        ramp_seconds: $ramp,
        connect_rate_per_s: (if $ramp > 0 then ($opened / $ramp | r(0)) else null end),
        relay_rss_kib: {before: $rss0, open: $rss1, end: $rss2},
        relay_user_bytes_per_conn: per(($rss1 - $rss0) * 1024),
        relay_user_bytes_per_conn_end: per(($rss2 - $rss0) * 1024),
        kernel_slab_bytes_per_conn: per($slab_raw - $slab_proc),
        kernel_slab_raw_bytes_per_conn: per($slab_raw),
        kernel_tcp_mem_bytes_per_conn: per(($mem1 - $mem0) * 4096),
        tcp_sockets_per_conn: (if $held > 0 then ($inuse / $held | r(3)) else null end),
        slab_top_deltas: $top,
        loader_rss_bytes_per_conn: ([.[] | .loader_rss_bytes_per_conn // empty] | if length > 0 then (add / length | r(0)) else null end),
        relay_cpu_us_per_conn_ramp: (if $held > 0 then ($tk01 * 1e6 / $hz / $held | r(1)) else null end),
        relay_cpu_pct_hold: ($tk12 / $hz / $wall * 100 | r(1)),
        connect_failures: $cf, handshake_failures: $hf, errors: $er,
        relay_tls: $tls,
        negotiated: ([.[] | .tls.negotiated // empty] | first // null)
      }')
[ -z "$RESULT" ] && RESULT=$(jq -nc --arg e "${ERRS:-no load results}" '{ok: false, error: $e}')
CMD="scripts/bench-tls-hold.sh${ORIG_ARGS[*]:+ ${ORIG_ARGS[*]}}"
[ -n "${CARGO_TARGET_DIR:-}" ] && CMD="CARGO_TARGET_DIR=$CARGO_TARGET_DIR $CMD"
jq -n --argjson m "$(machine_meta)" --arg cmd "$CMD" --argjson res "$RESULT" --argjson n "$N" --argjson hold "$HOLD" \
    --argjson procs "$PROCS" --argjson maxc "$RELAY_MAXCONN" --argjson nofile "$NOFILE_HARD" \
    --arg rv "$("$RELAY" --version 2>/dev/null | head -1)" \
    '{meta: ($m + {command: $cmd, connections: $n, hold_s: $hold, relay_processes: $procs,
               max_connections_per_process: $maxc, rlimit_nofile: $nofile, relay_version: $rv,
               layout: "relay processes on CPU 0 (taskset -c 0); relay-bench load processes on CPU 1"}),
      result: $res}' >"$OUT" || die "cannot write $OUT"
summary
log "JSON: $OUT"
[ "$DOCS" = 1 ] && write_docs
jq -e '.result.ok' "$OUT" >/dev/null || exit 1
exit 0
