#!/usr/bin/env bash
# scripts/bench-million.sh: hold N (default 1,000,000) concurrent WebSocket connections
# through relay on one box, and measure what they cost.
#
#   sudo scripts/bench-million.sh [--connections N] [--hold SECS] [--mode relayed|echo-app]
#                                 [--rate R] [options]
#
# relayed   load --(client leg)--> relay --(origin leg)--> echo-origin: 4 sockets per
#           connection (2 descriptors in relay).
# echo-app  load --> relay answering itself (route app = "echo"): 2 sockets per connection
#           (1 descriptor in relay). The issue's fallback when 4 sockets per connection do
#           not fit in the box's memory.
#
# What it does, in order:
#   1. Refuses unless root (it changes sysctls). --plan prints the plan and the memory
#      estimate without root and without changing anything.
#   2. Plans the processes. If the hard RLIMIT_NOFILE (or the limit root could raise to,
#      fs.nr_open of the edge-1m profile) holds everything, one relay process with one worker
#      per CPU. Otherwise, as on the 20,000-descriptor machines: relay processes with
#      [workers] count = 1 (2 fds per relayed connection, 1 per echo-app connection), each
#      planned to ~90% of its limit because SO_REUSEPORT spreads connections by a hash, not
#      evenly; echo-origin processes at ~85%; load processes at the limit minus 1,000. All
#      relays share one listening port, all origins another (SO_REUSEPORT). Load process j
#      binds its sources round-robin over 127.(10+j/256).(j%256).1-254; relay process i
#      connects to the origins from its own 32 (or more) source addresses from 127.100.0.1 on
#      (source_addresses in its pool), so no (source address, destination) pair carries
#      more than a few hundred connections (Linux's connect() port search slows down badly
#      once half of a pair's ephemeral range is taken).
#   3. Estimates memory: kernel bytes per socket x sockets + user bytes per connection x N +
#      per-process baseline x processes, from measured figures (constants below, env
#      overridable), and refuses, showing the arithmetic and the largest N that fits, when
#      that exceeds MemAvailable minus a safety margin (10% of MemTotal, at least 1 GiB).
#   4. Applies tuning/edge-1m.conf with scripts/tune.sh (which saves the old values); a trap
#      reverts it on every exit path, after every process it started has been stopped.
#   5. Starts the origins and relays, snapshots the machine (base), starts the sampler
#      (scripts/lib/million.py: every --interval s relays' summed relay_connections_active,
#      relay RSS and CPU, /proc/net/sockstat, slab, MemAvailable, load failures; progress
#      line on stderr), then the load processes: --rate R split over them, each connection
#      sending one --size B message every --trickle s and verifying the echo.
#   6. Once every load process has finished its ramp: hold window of --hold s (snapshot in the
#      middle), then ends every load process's hold at once with SIGUSR1 (their own --hold is
#      only a backstop: their ramps end at different times, up to tens of seconds apart on a
#      busy box) and waits for their reports, stops relays and origins by PID, stops the
#      sampler, reverts the sysctls.
#   7. Writes bench-results/million-MODE-DATE/{plan,result}.json, samples.jsonl, million.svg
#      (connections and memory against time) and summary.md; --docs also replaces this mode's
#      block between <!-- bench-million:MODE:begin/end --> markers in docs/benchmarks.md
#      (appended at the end if missing); --svg PATH copies the plot there.
#
# Loopback only (127.0.0.0/8). Every process it starts runs under timeout(1) and relay-bench's
# --max-seconds; it stops only processes it started, by PID. If MemAvailable falls below
# 512 MiB during the run the load is stopped early (the run then reports failure).
# Exit: 0 when N connections were held through the hold window with zero failures; 1 if not;
# 2 usage or refused (not root, memory, ports busy, profile already applied).
set -uo pipefail

PROG=bench-million
REPO=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
LIB=$REPO/scripts/lib/million.py
TUNE=$REPO/scripts/tune.sh
PROFILE=edge-1m
CMDLINE="scripts/bench-million.sh $*"

# ---- measured figures (this 2-core, 24 GiB VM, Linux 6.18; see docs/benchmarks.md) ------
# Kernel memory per idle TCP socket, all slab growth over a run divided by its sockets. Since
# relay parks idle sockets in epoll (timeouts.park_idle) instead of holding armed io_uring
# receives (io_kiocb + kmalloc-512 per relay socket), the 1,000,000-connection relayed run of
# 2026-12-02 measured 4,651 B per socket over 4,000,000 sockets: ~4,200 B is the socket itself
# (TCP 2,521, sockfs inode 862, dentry, filp, epoll item, small kmallocs) and ~450 B procfs
# inodes and dentries for /proc/PID/fd/N, which this VM's init agent creates by listing every
# process's descriptors every few seconds: reclaimable, but present during the run, so
# counted. Before parking it was 5,388 B (200,000 connections). The default keeps a margin
# over the measured figure (MILLION_KERNEL_SOCKET_B=4300 on a box without such a scanner).
KERNEL_SOCKET_B=${MILLION_KERNEL_SOCKET_B:-5000}
# User memory per connection (VmRSS growth / connection), measured at 50,000 and 200,000.
RELAY_CONN_B=${MILLION_RELAY_CONN_B:-450}      # relay, relayed connection (both legs): 418-451
RELAY_APP_CONN_B=${MILLION_RELAY_APP_CONN_B:-700} # relay, echo-app connection: 658
ORIGIN_CONN_B=${MILLION_ORIGIN_CONN_B:-90}     # relay-bench echo-origin: 78-79
LOAD_CONN_B=${MILLION_LOAD_CONN_B:-220}        # relay-bench load --mode hold --trickle: 203
# Per process, user (RssAnon ~1 MiB; the binary's file pages are shared) + kernel (thread
# stacks, page tables, io_uring rings ~0.5 MiB), KiB.
RELAY_PROC_KIB=${MILLION_RELAY_PROC_KIB:-2048}
ORIGIN_PROC_KIB=${MILLION_ORIGIN_PROC_KIB:-1024}
LOAD_PROC_KIB=${MILLION_LOAD_PROC_KIB:-2048}
MEM_FLOOR_KIB=$((512 * 1024))

# ---- options --------------------------------------------------------------------------
N=1000000
HOLD=60
MODE=relayed
RATE=4000
TRICKLE=auto
SIZE=32
INTERVAL=5
PORT_BASE=14000
MAX_RAMP=
OUT=
DOCS=0
SVG_COPY=
PLAN_ONLY=0
BUILD=1

usage() {
    cat >&2 <<'EOF'
usage: sudo scripts/bench-million.sh [options]
  --connections N    connections to hold (default 1000000); "fit" = the largest N that the
                     memory estimate allows right now (rounded down to 10,000)
  --hold S           seconds to hold all N once the ramp is done (default 60)
  --mode M           relayed (load -> relay -> echo-origin, 4 sockets per connection) or
                     echo-app (load -> relay's echo app, 2 sockets) (default relayed)
  --rate R           new connections per second during the ramp, all load processes together
                     (default 4000)
  --trickle S        each connection sends one message every S s (from the moment it is open),
                     0 = none (default auto: 30 s, or N / 4,000 s when that is longer, so the
                     whole box carries at most ~4,000 messages/s; see below)
  --size B           trickle message size (default 32)
  --interval S       sampling interval (default 5)
  --max-ramp S       give up if the ramp has not finished after S s (default 3 x N / rate + 60)
  --port-base P      relay listens on P, origins on P+1, relay admins on P+100.. (default 14000)
  --out DIR          results directory (default bench-results/million-MODE-DATE)
  --docs             replace this mode's generated block in docs/benchmarks.md
  --svg PATH         also copy the plot to PATH (e.g. docs/million.svg)
  --plan             print the plan and the memory estimate, change nothing (no root needed)
  --no-build         do not run cargo build (binaries from $CARGO_TARGET_DIR or target/)
Environment: CARGO_TARGET_DIR (binaries in $CARGO_TARGET_DIR/release); MILLION_* override
the measured per-socket / per-connection / per-process figures (see the top of the script).
EOF
    exit 2
}

die() { printf '%s: %s\n' "$PROG" "$*" >&2; exit 2; }
log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

while [ $# -gt 0 ]; do
    case $1 in
        --connections) N=${2:-}; shift 2 ;;
        --hold) HOLD=${2:-}; shift 2 ;;
        --mode) MODE=${2:-}; shift 2 ;;
        --rate) RATE=${2:-}; shift 2 ;;
        --trickle) TRICKLE=${2:-}; shift 2 ;;
        --size) SIZE=${2:-}; shift 2 ;;
        --interval) INTERVAL=${2:-}; shift 2 ;;
        --max-ramp) MAX_RAMP=${2:-}; shift 2 ;;
        --port-base) PORT_BASE=${2:-}; shift 2 ;;
        --out) OUT=${2:-}; shift 2 ;;
        --docs) DOCS=1; shift ;;
        --svg) SVG_COPY=${2:-}; shift 2 ;;
        --plan) PLAN_ONLY=1; shift ;;
        --no-build) BUILD=0; shift ;;
        -h | --help) usage ;;
        *) log "unknown option: $1"; usage ;;
    esac
done
# Trickle: every message crosses relay twice (client->origin, origin->client) and wakes up
# four processes. On the 2-core VM with ~200 processes, relay alone spent ~60 us of CPU per
# echoed message, so one message per connection per 30 s at 640,000 connections (21,000/s)
# plus the ramp saturated both cores and the run collapsed. auto caps the total at ~4,000/s.
for v in N HOLD RATE TRICKLE SIZE INTERVAL PORT_BASE; do
    [ "$v" = N ] && [ "$N" = fit ] && continue
    [ "$v" = TRICKLE ] && [ "$TRICKLE" = auto ] && continue
    is_uint "${!v}" || die "--${v,,} needs a non-negative integer, got '${!v}'"
done
[ "$N" = fit ] || [ "$N" -ge 1 ] || die "--connections must be at least 1"
[ "$RATE" -ge 1 ] || die "--rate must be at least 1"
[ "$INTERVAL" -ge 1 ] || die "--interval must be at least 1"
case $MODE in relayed | echo-app) ;; *) die "--mode must be relayed or echo-app" ;; esac
[ -z "$MAX_RAMP" ] || is_uint "$MAX_RAMP" || die "--max-ramp needs an integer"

if [ "$PLAN_ONLY" = 0 ] && [ "$(id -u)" != 0 ]; then
    die "must run as root: it applies the $PROFILE sysctl profile (scripts/tune.sh apply $PROFILE; the old values are restored at exit) to hold this many sockets. Run: sudo $CMDLINE   (or --plan to see the plan and memory estimate without changing anything)"
fi
for c in python3 timeout curl; do
    command -v "$c" >/dev/null || die "needs $c"
done

ceil_div() { echo $((($1 + $2 - 1) / $2)); }
meminfo_kib() { awk -v k="$1:" '$1 == k { print $2 }' /proc/meminfo; }
gib() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1073741824 }'; }
commas() { printf '%d' "$1" | sed -e ':a' -e 's/\([0-9]\)\([0-9]\{3\}\)\($\|,\)/\1,\2\3/' -e 'ta'; }

# ---- descriptors: one process, or how many -----------------------------------------------
NCPU=$(nproc)
FD_HARD=$(ulimit -Hn)
[ "$FD_HARD" = unlimited ] && FD_HARD=1048576
PROFILE_NR_OPEN=$(awk -F= '/^[[:space:]]*fs\.nr_open[[:space:]]*=/ { gsub(/[[:space:]]/, "", $2); print $2 }' \
    "$REPO/tuning/$PROFILE.conf")
FPC=2
[ "$MODE" = echo-app ] && FPC=1
FD_CAP=$FD_HARD
FD_HOW="hard RLIMIT_NOFILE $FD_HARD (cannot be raised here)"
# make_plan: process counts, addresses and the memory estimate for $N connections.
make_plan() {
    NEED_ONE=$((FPC * N + 200))
    if [ "$FD_HARD" -lt "$NEED_ONE" ] && [ "$(id -u)" = 0 ] && (ulimit -Hn $((FD_HARD + 1))) 2>/dev/null; then
        # Root with CAP_SYS_RESOURCE: after the profile raises fs.nr_open, one process can hold it.
        FD_CAP=$PROFILE_NR_OPEN
        FD_HOW="hard RLIMIT_NOFILE $FD_HARD, raised to fs.nr_open $PROFILE_NR_OPEN after applying $PROFILE"
    elif [ "$FD_HARD" -ge "$NEED_ONE" ]; then
        FD_HOW="hard RLIMIT_NOFILE $FD_HARD is enough for one process"
    fi
    RAISE_TO=
    [ "$FD_CAP" != "$FD_HARD" ] && RAISE_TO=$FD_CAP

    if [ "$NEED_ONE" -le "$FD_CAP" ]; then
        # A production-style box: one relay process, one worker per CPU.
        RELAYS=1
        RELAY_WORKERS=$NCPU
        RELAY_PIN=true
        RELAY_MAXC=$(((FD_CAP - 200) / (FPC * NCPU)))
        RELAY_CAP=$((RELAY_MAXC * NCPU))
    else
        RELAY_WORKERS=1
        RELAY_PIN=false
        RELAY_MAXC=$(((FD_CAP - 100) / FPC))
        RELAY_CAP=$RELAY_MAXC
        RELAYS=$(ceil_div "$N" $((RELAY_CAP * 9 / 10)))
    fi
    ORIGINS=0
    if [ "$MODE" = relayed ]; then
        OCAP=$((FD_CAP - 100))
        ORIGINS=$(ceil_div "$N" $((OCAP * 85 / 100)))
    fi
    ORIGIN_THREADS=1
    [ "$ORIGINS" = 1 ] && ORIGIN_THREADS=$NCPU
    LCAP=$((FD_CAP - 1000))
    [ "$LCAP" -gt 1000000 ] && LCAP=1000000
    LOADS=$(ceil_div "$N" "$LCAP")
    # Source addresses for the relays' origin legs: >= 32 per relay, ~1,000 connections each.
    SRC_PER_RELAY=$(ceil_div $((N / RELAYS + 1)) 1000)
    [ "$SRC_PER_RELAY" -lt 32 ] && SRC_PER_RELAY=32
    [ "$LOADS" -gt $((90 * 256)) ] && die "too many load processes ($LOADS)"
    PROCS=$((RELAYS + ORIGINS + LOADS))
    SOCKETS=$((2 * FPC * N))

    RPORT=$PORT_BASE
    OPORT=$((PORT_BASE + 1))
    ADMIN_BASE=$((PORT_BASE + 100))

    # ---- memory estimate ------------------------------------------------------------------------
    MEM_TOTAL=$(meminfo_kib MemTotal)
    MEM_AVAIL=$(meminfo_kib MemAvailable)
    RCONN_B=$RELAY_CONN_B
    [ "$MODE" = echo-app ] && RCONN_B=$RELAY_APP_CONN_B
    OCONN_B=$ORIGIN_CONN_B
    [ "$MODE" = echo-app ] && OCONN_B=0
    LCONN_B=$LOAD_CONN_B
    PER_CONN_B=$((2 * FPC * KERNEL_SOCKET_B + RCONN_B + OCONN_B + LCONN_B))
    K_B=$((SOCKETS * KERNEL_SOCKET_B))
    U_B=$((N * (RCONN_B + OCONN_B + LCONN_B)))
    P_B=$(((RELAYS * RELAY_PROC_KIB + ORIGINS * ORIGIN_PROC_KIB + LOADS * LOAD_PROC_KIB) * 1024))
    NEED_B=$((K_B + U_B + P_B))
    MARGIN_KIB=$((MEM_TOTAL / 10))
    [ "$MARGIN_KIB" -lt 1048576 ] && MARGIN_KIB=1048576
    AVAIL_B=$(((MEM_AVAIL - MARGIN_KIB) * 1024))
    # Largest N that fits (processes scale with N too; solve with the per-connection share).
    PROC_PER_CONN_B=$((P_B / N))
    FIT_N=$((AVAIL_B > 0 ? AVAIL_B / (PER_CONN_B + PROC_PER_CONN_B + 1) : 0))
    FIT_N=$((FIT_N / 10000 * 10000))
}
if [ "$N" = fit ]; then
    # The largest N the estimate allows: plan for 1M, solve, re-plan, step down until it fits.
    N=1000000
    make_plan
    N=$FIT_N
    [ "$N" -ge 10000 ] || die "not even 10,000 $MODE connections fit in MemAvailable"
    make_plan
    while [ "$NEED_B" -gt "$AVAIL_B" ] && [ "$N" -gt 10000 ]; do
        N=$((N - 10000))
        make_plan
    done
    CMDLINE="$CMDLINE  (fit: N = $N)"
else
    make_plan
fi
if [ "$TRICKLE" = auto ]; then
    TRICKLE=$(((N + 3999) / 4000))
    [ "$TRICKLE" -lt 30 ] && TRICKLE=30
fi

print_plan() {
    cat >&2 <<EOF
$PROG: plan for $(commas "$N") $MODE connections
  descriptors: $FD_HOW
  relay:       $RELAYS process(es) x $RELAY_WORKERS worker(s), limits.max_connections $(commas "$RELAY_MAXC") per worker ($FPC fd per connection), ~$(commas $((N / RELAYS))) each
  echo-origin: $ORIGINS process(es)$([ "$ORIGINS" -gt 0 ] && echo ", ~$(commas $((N / ORIGINS))) each (SO_REUSEPORT on 127.0.0.1:$OPORT)")
  load:        $LOADS process(es), <= $(commas "$LCAP") each, rate $(commas "$RATE")/s in all, trickle $TRICKLE s
  addresses:   relay 127.0.0.1:$RPORT (SO_REUSEPORT), admins 127.0.0.1:$ADMIN_BASE-$((ADMIN_BASE + RELAYS - 1)); load sources 127.10.0.1 on (254 per process); relay origin-leg sources 127.100.0.1 on ($SRC_PER_RELAY per relay)
  sockets:     $(commas "$SOCKETS") ($((2 * FPC)) per connection)
memory estimate (measured per-socket/per-connection figures; MILLION_* to override):
  kernel   $(commas "$SOCKETS") sockets x $(commas "$KERNEL_SOCKET_B") B                  = $(gib "$K_B") GiB
  user     $(commas "$N") connections x ($RCONN_B relay + $OCONN_B origin + $LCONN_B load) B = $(gib "$U_B") GiB
  procs    $RELAYS relay x $RELAY_PROC_KIB KiB + $ORIGINS origin x $ORIGIN_PROC_KIB KiB + $LOADS load x $LOAD_PROC_KIB KiB = $(gib "$P_B") GiB
  need                                                         = $(gib "$NEED_B") GiB
  MemAvailable $(gib $((MEM_AVAIL * 1024))) GiB - margin $(gib $((MARGIN_KIB * 1024))) GiB (10% of MemTotal, >= 1 GiB) = $(gib "$AVAIL_B") GiB
  largest N that fits in $MODE mode: ~$(commas "$FIT_N")
EOF
}
[ -z "$MAX_RAMP" ] && MAX_RAMP=$((3 * N / RATE + 60))
print_plan
FITS=1
[ "$NEED_B" -gt "$AVAIL_B" ] && FITS=0
if [ "$PLAN_ONLY" = 1 ]; then
    [ $FITS = 1 ] && { log "fits"; exit 0; }
    log "does NOT fit"
    exit 1
fi
if [ $FITS = 0 ]; then
    alt=""
    [ "$MODE" = relayed ] && alt=", or --mode echo-app (2 sockets per connection instead of 4)"
    die "refusing: $(commas "$N") $MODE connections need about $(gib "$NEED_B") GiB but only $(gib "$AVAIL_B") GiB may be used (MemAvailable minus the margin); see the arithmetic above. Try --connections $FIT_N$alt."
fi

# ---- binaries -------------------------------------------------------------------------------
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
if [ "$BUILD" = 1 ]; then
    log "building release binaries (cargo build --release -p relay -p relay-bench, target $TARGET_DIR)"
    (cd "$REPO" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -q -p relay -p relay-bench) ||
        die "cargo build failed"
fi
RELAY_BIN=$TARGET_DIR/release/relay
BENCH_BIN=$TARGET_DIR/release/relay-bench
[ -x "$RELAY_BIN" ] && [ -x "$BENCH_BIN" ] || die "missing $RELAY_BIN or $BENCH_BIN (build them or drop --no-build)"

# ---- ports free? -----------------------------------------------------------------------------
busy=$(ss -Htan exclude time-wait 2>/dev/null | awk '{ n = split($4, a, ":"); print a[n] }' | sort -un)
for p in "$RPORT" "$OPORT" $(seq "$ADMIN_BASE" $((ADMIN_BASE + RELAYS - 1))); do
    grep -qx "$p" <<<"$busy" && die "port $p is in use; pick another --port-base"
done
STATE_FILE=${RELAY_TUNE_STATE_DIR:-/var/lib/relay-tune}/$PROFILE.saved
[ -e "$STATE_FILE" ] && die "the $PROFILE profile is already applied by someone else ($STATE_FILE exists); wait for them or run scripts/tune.sh revert $PROFILE"

# ---- run directory, cleanup trap -------------------------------------------------------------
STAMP=$(date -u +%Y%m%d-%H%M%S)
FINAL=${OUT:-$REPO/bench-results/million-$MODE-$STAMP}
mkdir -p "$FINAL" || die "cannot create $FINAL"
FINAL=$(cd "$FINAL" && pwd)
# Live files (process logs the load processes write every second, samples) go to tmpfs: a
# busy disk must not stall a load process in write(2). Copied to $FINAL at the end.
RUN=$(mktemp -d /dev/shm/bench-million.XXXXXX 2>/dev/null || mktemp -d)
: >"$RUN/procs.txt"
: >"$RUN/events.txt"
echo start >"$RUN/phase"
ev() { echo "$(date +%s.%N) $1" >>"$RUN/events.txt"; }

TPIDS=()   # timeout(1) wrappers we started
CPIDS=()   # their children (the real processes)
SAMPLER=
APPLIED=0
CLEANED=0

stop_pids() { # stop_pids GRACE PID...: TERM, wait up to GRACE s, then KILL what is left
    local grace=$1 p left i
    shift
    [ $# -gt 0 ] || return 0
    for p in "$@"; do kill -TERM "$p" 2>/dev/null; done
    for ((i = 0; i < grace * 10; i++)); do
        left=0
        for p in "$@"; do kill -0 "$p" 2>/dev/null && left=1; done
        [ $left = 0 ] && break
        sleep 0.1
    done
    for p in "$@"; do kill -KILL "$p" 2>/dev/null; done
    { for p in "$@"; do wait "$p"; done; } 2>/dev/null
    return 0
}

save_run() {
    [ -d "$RUN" ] || return 0
    cp -a "$RUN/." "$FINAL/" && rm -rf "$RUN"
}

cleanup() {
    [ $CLEANED = 1 ] && return
    CLEANED=1
    trap - INT TERM HUP
    if [ ${#CPIDS[@]} -gt 0 ] || [ ${#TPIDS[@]} -gt 0 ]; then
        log "stopping the $((${#TPIDS[@]})) processes this run started"
        stop_pids 15 "${CPIDS[@]}" "${TPIDS[@]}"
    fi
    if [ -n "$SAMPLER" ]; then
        touch "$RUN/stop"
        stop_pids 10 "$SAMPLER"
        SAMPLER=
    fi
    if [ $APPLIED = 1 ]; then
        log "restoring the sysctl values from before the run (scripts/tune.sh revert $PROFILE)"
        if "$TUNE" revert "$PROFILE" >"$RUN/tune-revert.log" 2>&1; then
            APPLIED=0
        else
            log "WARNING: tune.sh revert failed, see $RUN/tune-revert.log; run: scripts/tune.sh revert $PROFILE"
            cat "$RUN/tune-revert.log" >&2
        fi
    fi
    save_run
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM HUP

# ---- quiet start ------------------------------------------------------------------------------
# TIME_WAIT sockets of an earlier run free their slab objects when they expire (60 s); if that
# happened between the two snapshots it would be subtracted from this run's kernel figures.
tw_limit=$((N / 50 > 5000 ? N / 50 : 5000))
for ((w = 0; w < 75; w++)); do
    tw=$(awk '/^TCP:/ { for (i = 2; i < NF; i++) if ($i == "tw") print $(i + 1) }' /proc/net/sockstat)
    [ "${tw:-0}" -le "$tw_limit" ] && break
    [ $w = 0 ] && log "waiting up to 75 s for $tw TIME_WAIT sockets (earlier runs) to expire"
    sleep 1
done

# ---- tune ------------------------------------------------------------------------------------
log "applying sysctl profile $PROFILE (old values saved by scripts/tune.sh)"
"$TUNE" apply "$PROFILE" >"$RUN/tune-apply.log" 2>&1 || {
    cat "$RUN/tune-apply.log" >&2
    die "scripts/tune.sh apply $PROFILE failed"
}
APPLIED=1
if [ -n "$RAISE_TO" ]; then
    ulimit -Hn "$RAISE_TO" && ulimit -Sn "$RAISE_TO" || die "could not raise RLIMIT_NOFILE to $RAISE_TO"
fi

TOTAL_S=$((MAX_RAMP + HOLD + 600))
# The load processes hold until this script ends the window with SIGUSR1; their --hold only
# backstops a script that died (a process whose ramp ended first still outlasts the window).
LOAD_HOLD=$((MAX_RAMP + HOLD + 60))

spawn() { # spawn GROUP ADMINPORT LOGBASE CMD...: run under timeout(1), record the PIDs
    local group=$1 port=$2 logb=$3 child i
    shift 3
    timeout -k 5 "$TOTAL_S" "$@" >"$logb.out" 2>"$logb.err" &
    local tp=$!
    TPIDS+=("$tp")
    for ((i = 0; i < 50; i++)); do
        child=$(pgrep -P "$tp" | head -1)
        [ -n "$child" ] && break
        sleep 0.02
    done
    [ -n "$child" ] || child=$tp
    CPIDS+=("$child")
    echo "$group $child $port" >>"$RUN/procs.txt"
    SPAWNED=$tp
}

addr_of() { # addr_of BASE_SECOND_OCTET INDEX -> 127.x.y.z, z in 1..254
    local b=$1 i=$2
    echo "127.$((b + i / (256 * 254))).$(((i / 254) % 256)).$((i % 254 + 1))"
}

write_relay_config() { # write_relay_config I FILE
    local i=$1 f=$2 k first=1 srcs=""
    for ((k = i * SRC_PER_RELAY; k < (i + 1) * SRC_PER_RELAY; k++)); do
        [ $first = 1 ] || srcs+=", "
        srcs+="\"$(addr_of 100 "$k")\""
        first=0
    done
    {
        echo "# bench-million relay $i of $RELAYS ($MODE)"
        echo "data_path = \"copy\""
        echo "[workers]"
        echo "count = $RELAY_WORKERS"
        echo "pin = $RELAY_PIN"
        echo "[[listener]]"
        echo "address = \"127.0.0.1:$RPORT\""
        echo "backlog = 65535"
        echo "[admin]"
        echo "address = \"127.0.0.1:$((ADMIN_BASE + i))\""
        echo "[timeouts]"
        echo "handshake = \"30s\""
        echo "origin_connect = \"10s\""
        echo "origin_handshake = \"20s\""
        echo "idle = \"1h\""
        echo "drain = \"1s\""
        echo "[limits]"
        echo "max_connections = $RELAY_MAXC"
        echo "[buffers]"
        echo "size = \"1KiB\""
        echo "count = 64"
        echo "[access_log]"
        echo "path = \"off\""
        if [ "$MODE" = relayed ]; then
            echo "[[pool]]"
            echo "name = \"origins\""
            echo "origins = [\"127.0.0.1:$OPORT\"]"
            echo "source_addresses = [$srcs]"
            echo "[[route]]"
            echo "name = \"all\""
            echo "pool = \"origins\""
        else
            echo "[[route]]"
            echo "name = \"echo\""
            echo "app = \"echo\""
        fi
    } >"$f"
}

wait_for() { # wait_for SECONDS FILE PATTERN
    local i
    for ((i = 0; i < $1 * 10; i++)); do
        grep -q "$3" "$2" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# ---- plan.json -------------------------------------------------------------------------------
python3 - "$RUN/plan.json" <<EOF
import json, sys
json.dump({
  "command": """$CMDLINE""", "repo": "$REPO", "mode": "$MODE", "connections": $N, "hold_s": $HOLD,
  "rate": $RATE, "trickle_s": $TRICKLE, "trickle_size": $SIZE, "interval_s": $INTERVAL,
  "date": "$(date -u '+%Y-%m-%d %H:%M UTC')",
  "machine": {"cpus": $NCPU, "mem_total_kib": $MEM_TOTAL, "kernel": "$(uname -r)",
              "mem_available_kib_at_start": $MEM_AVAIL},
  "fd": {"hard": $FD_HARD, "cap": $FD_CAP, "how": "$FD_HOW"},
  "processes": {"relay": $RELAYS, "origin": $ORIGINS, "load": $LOADS},
  "relay_workers": $RELAY_WORKERS, "relay_cap_per_process": $RELAY_CAP,
  "relay_max_connections_per_worker": $RELAY_MAXC,
  "load_hold_s": $LOAD_HOLD, "sockets": $SOCKETS,
  "relay_env": "MIMALLOC_ARENA_EAGER_COMMIT=0",
  "estimate": {"kernel_socket_b": $KERNEL_SOCKET_B, "relay_conn_b": $RCONN_B, "origin_conn_b": $OCONN_B,
               "load_conn_b": $LCONN_B, "relay_proc_kib": $RELAY_PROC_KIB, "origin_proc_kib": $ORIGIN_PROC_KIB,
               "load_proc_kib": $LOAD_PROC_KIB, "need_gib": $NEED_B / 2**30,
               "available_gib": $AVAIL_B / 2**30, "margin_gib": $MARGIN_KIB / 2**20,
               "mem_available_gib": $MEM_AVAIL / 2**20, "largest_n_fits": $FIT_N},
}, open(sys.argv[1], "w"), indent=2)
EOF
print_plan 2>"$RUN/plan.txt"

# ---- start origins and relays ----------------------------------------------------------------
echo starting >"$RUN/phase"
if [ "$ORIGINS" -gt 0 ]; then
    log "starting $ORIGINS echo-origin process(es) on 127.0.0.1:$OPORT"
    for ((k = 0; k < ORIGINS; k++)); do
        spawn origin "" "$RUN/origin-$k" "$BENCH_BIN" echo-origin --listen "127.0.0.1:$OPORT" \
            --threads "$ORIGIN_THREADS" --backlog 65535 --max-seconds "$TOTAL_S"
    done
    for ((k = 0; k < ORIGINS; k++)); do
        wait_for 30 "$RUN/origin-$k.out" '^ready' || die "echo-origin $k did not start: $(tail -3 "$RUN/origin-$k.err")"
    done
fi
# mimalloc: with eager arena commit each process's first arena is backed by 8 MiB of
# transparent huge pages at start (RssAnon 8.5 MiB instead of ~1 MiB). Irrelevant for one
# relay process, but with 100+ processes it is ~1 GiB, so this run turns it off.
log "starting $RELAYS relay process(es) on 127.0.0.1:$RPORT"
for ((i = 0; i < RELAYS; i++)); do
    write_relay_config "$i" "$RUN/relay-$i.toml"
    spawn relay $((ADMIN_BASE + i)) "$RUN/relay-$i" env MIMALLOC_ARENA_EAGER_COMMIT=0 RELAY_LOG=warn,relay=info \
        "$RELAY_BIN" --config "$RUN/relay-$i.toml"
done
# env(1) execs the relay, so the recorded child PID is the relay itself.
for ((i = 0; i < RELAYS; i++)); do
    wait_for 60 "$RUN/relay-$i.err" 'relay ready' || die "relay $i did not start: $(tail -3 "$RUN/relay-$i.err")"
done
sleep 2
python3 "$LIB" snapshot --dir "$RUN" --name base

# ---- sampler, load ---------------------------------------------------------------------------
date +%s.%N >"$RUN/t0"
python3 "$LIB" sample --dir "$RUN" --interval "$INTERVAL" --max-seconds "$TOTAL_S" \
    --mem-floor-kib "$MEM_FLOOR_KIB" 2> >(tee -a "$RUN/progress.log" >&2) &
SAMPLER=$!

echo ramp >"$RUN/phase"
ev load_start
log "starting $LOADS load process(es): $(commas "$N") connections at $(commas "$RATE")/s, each holds until the hold window ends"
PER_RATE=$(awk -v r="$RATE" -v l="$LOADS" 'BEGIN { printf "%.3f", r / l }')
PENDING=$((4096 / LOADS))
[ "$PENDING" -lt 32 ] && PENDING=32
LOAD_TPIDS=()
lo=0
for ((j = 0; j < LOADS; j++)); do
    share=$(((N * (j + 1)) / LOADS - lo))
    lo=$((lo + share))
    b=$((10 + j / 256))
    c=$((j % 256))
    targs=()
    [ "$TRICKLE" -gt 0 ] && targs=(--trickle "$TRICKLE" --size "$SIZE")
    spawn load "" "$RUN/load-$j" "$BENCH_BIN" load --mode hold --target "127.0.0.1:$RPORT" \
        --connections "$share" --rate "$PER_RATE" --max-pending "$PENDING" --connect-timeout 30 \
        --source-range "127.$b.$c.1-127.$b.$c.254" --hold "$LOAD_HOLD" "${targs[@]}" --threads 1 \
        --max-seconds $((MAX_RAMP + HOLD + 180)) --json "$RUN/load-$j.json"
    LOAD_TPIDS+=("$SPAWNED")
done

# ---- ramp: wait until every load process says "hold" --------------------------------------------
RESULT=ramp
declare -A HELD=()
start=$SECONDS
while :; do
    for ((j = 0; j < LOADS; j++)); do
        [ -n "${HELD[$j]:-}" ] && continue
        if grep -q '\] hold ' "$RUN/load-$j.err" 2>/dev/null; then
            HELD[$j]=1
        elif ! kill -0 "${LOAD_TPIDS[$j]}" 2>/dev/null; then
            log "load process $j ended during the ramp: $(grep -v '^\[' "$RUN/load-$j.err" | tail -2 | tr '\n' ' ')"
            RESULT=load-died
            break 2
        fi
    done
    [ ${#HELD[@]} = "$LOADS" ] && { RESULT=held; break; }
    [ -e "$RUN/abort" ] && { RESULT=aborted; break; }
    if [ $((SECONDS - start)) -ge "$MAX_RAMP" ]; then
        RESULT=ramp-timeout
        break
    fi
    sleep 1
done

if [ "$RESULT" = held ]; then
    ev hold_start
    echo hold >"$RUN/phase"
    log "all $LOADS load processes hold their connections; holding for $HOLD s"
    hs=$SECONDS
    snapped=0
    while [ $((SECONDS - hs)) -lt "$HOLD" ]; do
        if [ $snapped = 0 ] && [ $((SECONDS - hs)) -ge $((HOLD / 2)) ]; then
            python3 "$LIB" snapshot --dir "$RUN" --name hold
            snapped=1
        fi
        [ -e "$RUN/abort" ] && { RESULT=aborted; break; }
        alive=0
        for t in "${LOAD_TPIDS[@]}"; do kill -0 "$t" 2>/dev/null && alive=$((alive + 1)); done
        [ "$alive" = "$LOADS" ] || { log "a load process ended during the hold window"; RESULT=load-ended; break; }
        sleep 1
    done
    [ $snapped = 0 ] && python3 "$LIB" snapshot --dir "$RUN" --name hold
    ev hold_end
    [ "$RESULT" = held ] && ev hold_complete
fi
log "ramp/hold result: $RESULT"

# ---- teardown -----------------------------------------------------------------------------------
echo teardown >"$RUN/phase"
if [ "$RESULT" = held ]; then
    # SIGUSR1 ends each load process's hold now; it closes its connections and writes its JSON.
    log "ending the load processes' holds (SIGUSR1) and waiting for their reports"
    for ((j = 0; j < LOADS; j++)); do kill -USR1 "${CPIDS[$((ORIGINS + RELAYS + j))]}" 2>/dev/null || true; done
    end=$((SECONDS + 120))
    for t in "${LOAD_TPIDS[@]}"; do
        while kill -0 "$t" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 1; done
    done
fi
lp=()
for ((j = 0; j < LOADS; j++)); do lp+=("${CPIDS[$((ORIGINS + RELAYS + j))]}" "${LOAD_TPIDS[$j]}"); done
stop_pids 10 "${lp[@]}"
ev load_end
# Let relays see the clients' FINs and close their origin legs before stopping them.
for ((w = 0; w < 60; w++)); do
    act=0
    for ((i = 0; i < RELAYS; i++)); do
        a=$(curl -s -m 2 "http://127.0.0.1:$((ADMIN_BASE + i))/metrics" 2>/dev/null |
            awk '/^relay_connections_active[{ ]/ { s += $NF } END { print s + 0 }')
        act=$((act + ${a:-0}))
    done
    [ "$act" = 0 ] && break
    sleep 2
done
sleep "$INTERVAL"
echo stopping >"$RUN/phase"
ev stop
cleanup
trap - EXIT

# ---- report -------------------------------------------------------------------------------------
rargs=(--dir "$FINAL")
[ "$DOCS" = 1 ] && rargs+=(--docs "$REPO/docs/benchmarks.md")
[ -n "$SVG_COPY" ] && rargs+=(--svg-copy "$SVG_COPY")
python3 "$LIB" report "${rargs[@]}"
rc=$?
[ $APPLIED = 0 ] || rc=1
log "results in $FINAL"
exit $rc
