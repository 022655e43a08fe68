#!/usr/bin/env bash
# scripts/bench-ab.sh: alternate several relay settings (and HAProxy, nginx) on the same
# throughput cells, round by round, to tell a setting's effect from this machine's drift.
#
#   scripts/bench-ab.sh --rounds 3 --duration 5 --cells 16x32,1x4096 \
#       'relay' 'relay --busy-poll auto' 'relay --busy-poll 20us' haproxy
#
# Each variant is a peer name (relay, haproxy, nginx), for relay followed by its extra
# flags. In every round, every cell runs every variant once, back to back, in the order
# given; a fresh proxy process per run. Layout as in bench-compare.sh: the proxy on CPU 0,
# one relay-bench echo-origin and the load generator on CPU 1, 50 connections (--connections).
#
# A cell is INFLIGHTxSIZE (closed loop: every connection keeps INFLIGHT messages of SIZE
# bytes in flight) or oRATE[xSIZE] (open loop: RATE messages per second in all, spread over
# the connections, each sending one message every connections/RATE seconds at its own phase
# and timing the echo; the load at which a real edge runs, where the closed loop's cells
# say nothing about latency). Open-loop cells are measured inside the hold (from the load
# generator's "load: holding" line, for --duration seconds): the upgrades and closes stay out.
#
# Per run it prints msgs/s, RTT p50 and p99, the proxy's CPU-us per message (utime+stime over the
# measured window), the proxy's context switches per message (all its threads), how busy
# each CPU was (/proc/stat; the hypervisor's steal is shown when a CPU had any: the run was
# disturbed, its CPU figures include time the guest did not get), and for relay its
# busy-poll hits and misses and the completions each wait returned
# (relay_ring_completions_total / relay_ring_waits_total). At the end: the median of each
# cell and variant over the rounds. JSON lines in --out.
#
# --rx-cpu receiver runs them with RFS on lo (each process pays for its own sockets' receive
# path; see scripts/bench-compare.sh); the machine's settings are restored at exit.
#
# Loopback only; every process it starts is bounded by timeout(1) and stopped by PID.
set -uo pipefail

PROG=bench-ab
REPO=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib/bench-compare-lib.sh
. "$REPO/scripts/lib/bench-compare-lib.sh"
# shellcheck source=lib/bench-tls-lib.sh
. "$REPO/scripts/lib/bench-tls-lib.sh"
export PATH="$PATH:/usr/sbin:/sbin"

ROUNDS=3
DURATION=5
CELLS=16x32,1x4096
CONNS=50
BUILD=1
OUT=
RX_CPU=
usage() {
    cat <<'EOF'
usage: scripts/bench-ab.sh [options] VARIANT...
  VARIANT             relay [FLAGS...] | haproxy | nginx   (quote a relay variant with flags)
  --rounds R          rounds; each runs every cell and variant once (default 3)
  --duration S        measured seconds per run, after a 1 s warm-up (default 5)
  --cells LIST        INFLIGHTxSIZE (closed loop) or oRATE[xSIZE] (open loop, RATE msgs/s
                      over all connections, 32 B unless given), comma-separated
                      (default 16x32,1x4096)
  --connections N     connections per run (default 50)
  --out FILE          JSON lines (default bench-results/ab-DATE.jsonl)
  --no-build          use the already built release binaries
  --rx-cpu MODE       sender | receiver: where loopback runs the receive path (default: as
                      the machine is; receiver needs root)
Env: CARGO_TARGET_DIR (default ./target)
EOF
}
VARIANTS=()
while [ $# -gt 0 ]; do
    case $1 in
        --rounds) ROUNDS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --cells) CELLS=$2; shift 2 ;;
        --connections) CONNS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --rx-cpu) RX_CPU=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        -*) usage >&2; die "unknown option $1" ;;
        *) VARIANTS+=("$1"); shift ;;
    esac
done
[ ${#VARIANTS[@]} -gt 0 ] || { usage >&2; die "name at least one variant"; }
for v in "${VARIANTS[@]}"; do
    case ${v%% *} in
        relay) ;;
        haproxy | nginx)
            [ "$v" = "${v%% *}" ] || die "variant '$v': only relay takes flags here"
            command -v "$v" >/dev/null || die "variant '$v': $v is not installed (scripts/bench-compare.sh installs it)"
            ;;
        *) die "variant '$v': not relay, haproxy or nginx" ;;
    esac
done
for n in "$ROUNDS" "$DURATION" "$CONNS"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || die "--rounds, --duration and --connections take positive integers, not '$n'"
done
IFS=, read -r -a CELL_LIST <<<"$CELLS"
for c in "${CELL_LIST[@]}"; do
    [[ $c =~ ^[1-9][0-9]*x[1-9][0-9]*$ || $c =~ ^o[1-9][0-9]*(x[1-9][0-9]*)?$ ]] ||
        die "--cells: '$c' is neither INFLIGHTxSIZE (e.g. 16x32) nor oRATE[xSIZE] (e.g. o20000)"
    if [[ $c == o* ]]; then
        rate=${c#o}
        rate=${rate%%x*}
        [ "$rate" -le $((CONNS * 1000)) ] ||
            die "--cells $c: $rate msgs/s over $CONNS connections is more than 1000 per connection; raise --connections"
    fi
done
[ "$(nproc)" -ge 2 ] || die "needs 2 CPUs (proxy on CPU 0, load and origin on CPU 1)"

TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
if [ "$BUILD" = 1 ]; then
    (cd "$REPO" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -p relay -p relay-bench >&2) ||
        die "cargo build failed"
fi
RELAY=$TARGET_DIR/release/relay
BENCH=$TARGET_DIR/release/relay-bench
[ -x "$RELAY" ] && [ -x "$BENCH" ] || die "no release binaries in $TARGET_DIR/release (drop --no-build)"

BENCH_NICE=0
[ "$(id -u)" = 0 ] && BENCH_NICE=-20
STAMP=$(date -u +%Y%m%d-%H%M%S)
OUT=${OUT:-$REPO/bench-results/ab-$STAMP.jsonl}
mkdir -p "$(dirname "$OUT")"
: >"$OUT"
WORK=$(mktemp -d /tmp/relay-bench-ab.XXXXXX)
trap 'stop_all_started; rx_steer_restore; rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM

case $RX_CPU in
    '') RX_CPU=$(rx_steer_now) ;;
    sender | receiver)
        if [ "$(rx_steer_now)" != "$RX_CPU" ]; then
            why=$(rx_steer_check) || die "--rx-cpu $RX_CPU: $why"
            rx_steer_save
            rx_steer "$RX_CPU" || die "--rx-cpu $RX_CPU: could not configure lo's receive steering"
        fi
        ;;
    *) die "--rx-cpu: sender or receiver, not '$RX_CPU'" ;;
esac

NOFILE=$(ulimit -Hn)
[ "$NOFILE" = unlimited ] && NOFILE=1048576
LIFE=$((DURATION + 60))

alloc_port
OPORT=$PORT_OUT
spawn 1 $((ROUNDS * ${#CELL_LIST[@]} * ${#VARIANTS[@]} * (LIFE + 5) + 60)) "$WORK/origin" \
    "$BENCH" echo-origin --listen "127.0.0.1:$OPORT"
wait_for 10 listeners_at_least "$OPORT" 1 || die "echo-origin did not listen: $(tail -2 "$WORK/origin.err")"

ctxsw() { # context switches of PID's threads
    cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ { s += $2 } END { print s + 0 }'
}

# ring_counts ADMIN_PORT: relay's busy-poll hits and misses, waits, coalesced waits and
# completions so far, as JSON (summed over workers).
ring_counts() {
    http_get "$1" /metrics | awk '/^relay_(busy_poll_hits|busy_poll_misses|ring_waits|ring_coalesced_waits|ring_completions)_total/ {
        n = $1; sub(/^relay_(busy_poll|ring)_/, "", n); sub(/_total.*/, "", n); s[n] += $2 }
        END { printf "{\"hits\": %d, \"misses\": %d, \"waits\": %d, \"coalesced\": %d, \"completions\": %d}",
            s["hits"], s["misses"], s["waits"], s["coalesced_waits"], s["completions"] }'
}

# load_args CELL [SECONDS]: the load generator's mode flags for CELL (see --cells).
load_args() {
    local c=$1 secs=${2:-$DURATION} rate size=32
    if [[ $c == o* ]]; then
        rate=${c#o}
        [[ $rate == *x* ]] && size=${rate#*x}
        rate=${rate%%x*}
        echo "--mode hold --rate 0 --hold $secs --size $size --trickle $(awk -v n="$CONNS" -v r="$rate" 'BEGIN { printf "%.6f", n / r }')"
    else
        echo "--mode throughput --inflight ${c%x*} --size ${c#*x} --duration $secs"
    fi
}

# sample_begin / sample_end: the proxy's CPU ticks and context switches, both CPUs' busy
# jiffies, relay's ring counts and the wall clock, at the start and end of the measured
# window (they set run's locals).
sample_begin() {
    [ "${v%% *}" = relay ] && bp0=$(ring_counts "$admin")
    t0=$(proc_ticks "${pids[@]}")
    x0=0; for p in "${pids[@]}"; do x0=$((x0 + $(ctxsw "$p"))); done
    read -r c00 c01 <<<"$(cpu_jiffies cpu0)"
    read -r c10 c11 <<<"$(cpu_jiffies cpu1)"
    s00=$(cpu_steal cpu0) s10=$(cpu_steal cpu1)
    w0=$(date +%s%N)
}
sample_end() {
    w1=$(date +%s%N)
    t1=$(proc_ticks "${pids[@]}")
    x1=0; for p in "${pids[@]}"; do x1=$((x1 + $(ctxsw "$p"))); done
    read -r b0 n0 <<<"$(cpu_jiffies cpu0)"
    read -r b1 n1 <<<"$(cpu_jiffies cpu1)"
    s01=$(cpu_steal cpu0) s11=$(cpu_steal cpu1)
    if [ "${v%% *}" = relay ]; then
        bp=$(jq -nc --argjson a "$bp0" --argjson b "$(ring_counts "$admin")" \
            '{hits: ($b.hits - $a.hits), misses: ($b.misses - $a.misses),
              completions: ($b.completions - $a.completions), waits: ($b.waits - $a.waits),
              coalesced_waits: ($b.coalesced - $a.coalesced),
              completions_per_wait: (($b.completions - $a.completions) / ([$b.waits - $a.waits, 1] | max))}')
    fi
}

# measured_load SECONDS: the measured load run of run's cell against run's port.
measured_load() {
    local args=()
    read -r -a args <<<"$(load_args "$cell" "$1")"
    timeout $((DURATION + 60)) nice -n "$BENCH_NICE" taskset -c 1 "$BENCH" load --target "127.0.0.1:$port" \
        --connections "$CONNS" "${args[@]}" --max-seconds $((DURATION + 30)) --json "$WORK/load.json" \
        >/dev/null 2>"$WORK/load.err"
}

# run VARIANT CELL: one measured run; writes its JSON object to $WORK/run.json.
run() {
    local v=$1 cell=$2 la=() tp p lp port admin extra=() pids=() t0 t1 x0 x1 c00 c01 c10 c11 b0 n0 b1 n1 w0 w1 bp0 bp=null
    alloc_port
    port=$PORT_OUT
    case ${v%% *} in
        relay)
            read -r -a extra <<<"${v#relay}"
            alloc_port
            admin=$PORT_OUT
            spawn 0 "$LIFE" "$WORK/proxy" "$RELAY" --listen "127.0.0.1:$port" --origin "127.0.0.1:$OPORT" \
                --workers 1 --no-pin --admin "127.0.0.1:$admin" "${extra[@]}"
            ;;
        haproxy)
            fill_template "$REPO/bench/peers/haproxy.cfg.in" "$WORK/haproxy.cfg" PORT="$port" \
                ORIGIN_PORT="$OPORT" MAXCONN=$(((NOFILE - 200) / 2))
            spawn 0 "$LIFE" "$WORK/proxy" haproxy -db -f "$WORK/haproxy.cfg"
            ;;
        nginx)
            mkdir -p "$WORK/nginx" && chmod 755 "$WORK/nginx"
            fill_template "$REPO/bench/peers/nginx.conf.in" "$WORK/nginx/nginx.conf" PORT="$port" \
                ORIGIN_PORT="$OPORT" DIR="$WORK/nginx" WORKER_CONNECTIONS=$(((NOFILE - 200) / 2))
            spawn 0 "$LIFE" "$WORK/proxy" nginx -p "$WORK/nginx/" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log"
            ;;
    esac
    tp=$SPAWNED
    if ! wait_for 20 listeners_at_least "$port" 1; then
        warn "$v did not listen: $(tail -2 "$WORK/proxy.err" | tr '\n' ' ')"
        stop_tpids "$tp"
        return 1
    fi
    [ "${v%% *}" = relay ] && wait_for 10 grep -qs 'relay ready' "$WORK/proxy.err"
    mapfile -t pids < <(pid_tree "$(child_of "$tp")")
    read -r -a la <<<"$(load_args "$cell" 1)"
    timeout 60 nice -n "$BENCH_NICE" taskset -c 1 "$BENCH" load --target "127.0.0.1:$port" --connections "$CONNS" \
        "${la[@]}" --max-seconds 30 >/dev/null 2>&1
    if [[ $cell == o* ]]; then
        # Open loop: measure inside the hold, from the load generator's "holding" line, for
        # DURATION s (the hold lasts one more), so the upgrades and closes stay outside.
        measured_load $((DURATION + 1)) &
        lp=$!
        if ! wait_for 30 grep -qs '^load: holding' "$WORK/load.err"; then
            warn "$v $cell: the load generator did not reach its hold: $(tail -2 "$WORK/load.err" | tr '\n' ' ')"
            pkill -P "$lp" 2>/dev/null # the load's timeout(1), started by the subshell $lp
            wait "$lp"
            stop_tpids "$tp"
            return 1
        fi
        sample_begin
        sleep "$DURATION"
        sample_end
        wait "$lp"
    else
        sample_begin
        measured_load "$DURATION"
        sample_end
    fi
    stop_tpids "$tp"
    if ! jq -e '.messages > 0' "$WORK/load.json" >/dev/null 2>&1; then
        warn "$v $cell: the load generator failed: $(tail -2 "$WORK/load.err" | tr '\n' ' ')"
        return 1
    fi
    jq -c --arg v "$v" --arg rx "$RX_CPU" --arg cell "$cell" --argjson ticks $((t1 - t0)) --argjson hz "$CLK_TCK" \
        --argjson cs $((x1 - x0)) --argjson busy0 "$(((b0 - c00) * 100 / (n0 - c01 > 0 ? n0 - c01 : 1)))" \
        --argjson busy1 "$(((b1 - c10) * 100 / (n1 - c11 > 0 ? n1 - c11 : 1)))" --argjson bp "$bp" \
        --argjson steal0 "$(((s01 - s00) * 100 / (n0 - c01 > 0 ? n0 - c01 : 1)))" \
        --argjson steal1 "$(((s11 - s10) * 100 / (n1 - c11 > 0 ? n1 - c11 : 1)))" \
        --argjson wall "$(awk -v a="$w0" -v b="$w1" 'BEGIN { printf "%.6f", (b - a) / 1e9 }')" \
        '(if .hold_msgs_per_s then .hold_msgs_per_s else .msgs_per_s end) as $rate
        | (if .hold_msgs_per_s then [$rate * $wall, 1] | max else .messages end) as $n
        | {cell: $cell, rx_cpu: $rx, variant: $v, msgs_per_s: $rate, p50_us: .rtt_us.p50, p99_us: .rtt_us.p99, errors: (.errors + .verify_failures + .connect_failures + .handshake_failures),
          cpu_us_per_msg: ($ticks * 1e6 / $hz / $n), ctxsw_per_msg: ($cs / $n),
          cpu0_busy_pct: $busy0, cpu1_busy_pct: $busy1, cpu0_steal_pct: $steal0, cpu1_steal_pct: $steal1,
          busy_poll: $bp}' "$WORK/load.json" >"$WORK/run.json"
}

log "$ROUNDS rounds x ${#CELL_LIST[@]} cells x ${#VARIANTS[@]} variants, $DURATION s each, receive path on the $RX_CPU CPU; JSON lines in $OUT"
for ((r = 1; r <= ROUNDS; r++)); do
    for c in "${CELL_LIST[@]}"; do
        for v in "${VARIANTS[@]}"; do
            run "$v" "$c" || continue
            j=$(cat "$WORK/run.json")
            jq -c --argjson r "$r" '. + {round: $r}' <<<"$j" >>"$OUT"
            jq -r --argjson r "$r" '"round \($r)  \(.cell)  \(.variant | .[0:28] | . + " " * (28 - length))  \(.msgs_per_s / 1000 | . * 10 | round / 10) k msgs/s  p50 \(.p50_us | round) p99 \(.p99_us | round) us  \(.cpu_us_per_msg * 1000 | round / 1000) CPU-us/msg  \(.ctxsw_per_msg * 10000 | round / 10000) ctxsw/msg  CPU0 \(.cpu0_busy_pct) %  CPU1 \(.cpu1_busy_pct) %\(if .busy_poll then "  spins hit/missed \(.busy_poll.hits)/\(.busy_poll.misses)  \(.busy_poll.completions_per_wait * 10 | round / 10) cqes/wait  \(.busy_poll.coalesced_waits * 100 / ([.busy_poll.waits, 1] | max) | round) % held" else "" end)\(if (.cpu0_steal_pct // 0) + (.cpu1_steal_pct // 0) > 0 then "  steal \(.cpu0_steal_pct)/\(.cpu1_steal_pct) %" else "" end)\(if .errors > 0 then "  ERRORS \(.errors)" else "" end)"' <<<"$j"
        done
    done
done
echo
echo "Medians over $ROUNDS rounds ($(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -r), git $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null), receive path on the $RX_CPU CPU):"
echo
echo "| cell | variant | msgs/s | p50 µs | p99 µs | CPU-µs/msg | ctxsw/msg | CPU 0 busy | CPU 1 busy |"
echo "|---|---|--:|--:|--:|--:|--:|--:|--:|"
jq -rs 'def med: sort | .[length / 2 | floor];
    group_by(.cell, .variant) | sort_by(.[0].cell, (.[0].variant)) | .[] |
    "| \(.[0].cell) | \(.[0].variant) | \(map(.msgs_per_s) | med / 1000 | . * 10 | round / 10) k | \(map(.p50_us // 0) | med | round) | \(map(.p99_us) | med | round) | \(map(.cpu_us_per_msg) | med * 1000 | round / 1000) | \(map(.ctxsw_per_msg) | med * 10000 | round / 10000) | \(map(.cpu0_busy_pct) | med) % | \(map(.cpu1_busy_pct) | med) % |"' "$OUT"
