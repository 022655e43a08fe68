#!/usr/bin/env bash
# scripts/bench-fanout.sh: rooms fan-out benchmark (issue 6, point 4).
#
# For each room size (default 1,000, 5,000 and 18,000 members) and each mode it starts ONE
# relay process, fresh, with
#   [workers] count = "auto", pin = true   one worker per allowed CPU, worker N pinned to
#                                          the N-th CPU: how relay runs in production
#   a rooms route (/rooms/), a publish token, [apps] room_queue (--room-queue, default 4096)
#   [limits] max_connections = 9900        per worker (the "auto" budget counts two
#                                          descriptors per connection, as for proxied
#                                          ones, and would stop an app-only relay near 10k)
# and --procs (2) `relay-bench rooms` processes that hold the room together (members split
# evenly, each process from its own /24 of 127.1.0.0/16; the first one leads):
#   publish   --publishes (20) POSTs to /v1/rooms/NAME/messages, one every --interval ms:
#             time until every member had each one (p50/p99/max), per-member delivery,
#             missing/duplicate deliveries;
#   chatter   members send --rate msgs/s in all (default: --deliveries / (members - 1), so
#             every size is offered the same fan-out, 300,000 deliveries/s: a little more
#             than relay + loaders + loopback TCP carry on 2 CPUs, so deliveries/s is the
#             throughput) for --duration s; every member receives every other member's
#             messages: deliveries/s, their delay (queueing, at saturation), missing.
# The leader samples the relay's utime+stime (/proc/PID/stat) and the time its threads
# waited for a CPU (schedstat) over the measured phase, and its VmRSS before any member,
# with the whole room open, and at the end (VmHWM). relay's /metrics counters (slow-member
# closes, drops, frames sent) are read after each run.
#
# The loaders are not pinned: on a 2-CPU machine they share both CPUs with the relay, so
# latency includes waiting behind the loaders; the cost figures (relay CPU per delivery)
# do not depend on that. Every process runs at nice --nice (-10) so that other work on a
# shared machine disturbs it less.
#
# Each measured run holds `flock /tmp/relay-bench.lock` so it never overlaps another
# engineer's benchmark that takes the lock too; before it, the script waits for the machine to
# be quiet, and a run in which other work used more than --noise-pct of the CPUs is repeated
# (the least disturbed of --attempts is kept). Ports are picked below the ephemeral range.
# Output: two Markdown tables on stdout (results; cost per member), also in
# bench-results/fanout-DATE.md,
# JSON in bench-results/fanout-DATE.json, per-run logs and per-process JSON in
# bench-results/fanout-DATE/. Loopback only. Every process is bounded in time (timeout(1),
# --max-seconds) and stopped by PID.
set -uo pipefail

REPO=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="$PATH:/usr/sbin:/sbin"

usage() {
    cat >&2 <<'EOF'
usage: scripts/bench-fanout.sh [options]
  --sizes LIST        room sizes (default 1000,5000,18000)
  --procs P           loader processes per room (default 2)
  --publishes K       publish mode: publishes (default 20)
  --interval MS       publish mode: ms between publishes (default 500)
  --duration S        chatter mode: window in seconds (default 10)
  --deliveries D      chatter mode: offered deliveries/s; rate = D / (members - 1) (default 300000,
                      a little more than this 2-CPU machine carries: chatter measures throughput)
  --rate R            chatter mode: messages/s over the room, same for every size (overrides --deliveries)
  --size B            payload bytes (default 32)
  --room-queue Q      relay [apps] room_queue (default 4096)
  --modes LIST        publish,chatter (default both)
  --nice N            nice level of relay and loaders (default -10; 0 = unchanged)
  --port P            first relay listener port to try (default 11480; admin = P+10); a port
                      in use, or inside net.ipv4.ip_local_port_range, is skipped
  --lock-wait S       wait at most S s for /tmp/relay-bench.lock per run (default 3600)
  --quiet-wait S      before each run, wait up to S s for the machine to be idle (default 120)
  --attempts N        rerun a run disturbed by other work up to N times in all, keeping the
                      least disturbed (default 5)
  --noise-pct P       "disturbed": other processes used more than P % of the CPUs during the
                      measured phase (machine busy time minus relay and loaders) (default 10)
  --quick             smoke run: 1000 members, 5 publishes, 3 s chatter
  --no-build          use the binaries already in $CARGO_TARGET_DIR/release
  --out-dir DIR       default bench-results
Env: CARGO_TARGET_DIR (default ./target)
EOF
    exit 2
}

SIZES=1000,5000,18000
PROCS=2
PUBLISHES=20
INTERVAL=500
DURATION=10
DELIVERIES=300000
RATE=
SIZE=32
ROOM_QUEUE=4096
MODES=publish,chatter
NICE=-10
PORT=11480
LOCK_WAIT=3600
QUIET_WAIT=120
ATTEMPTS=5
NOISE_PCT=10
BUILD=1
OUT_DIR=$REPO/bench-results
while [ $# -gt 0 ]; do
    case "$1" in
        --sizes) SIZES=$2; shift 2 ;;
        --procs) PROCS=$2; shift 2 ;;
        --publishes) PUBLISHES=$2; shift 2 ;;
        --interval) INTERVAL=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --deliveries) DELIVERIES=$2; shift 2 ;;
        --rate) RATE=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --room-queue) ROOM_QUEUE=$2; shift 2 ;;
        --modes) MODES=$2; shift 2 ;;
        --nice) NICE=$2; shift 2 ;;
        --port) PORT=$2; shift 2 ;;
        --lock-wait) LOCK_WAIT=$2; shift 2 ;;
        --quiet-wait) QUIET_WAIT=$2; shift 2 ;;
        --attempts) ATTEMPTS=$2; shift 2 ;;
        --noise-pct) NOISE_PCT=$2; shift 2 ;;
        --quick) SIZES=1000; PUBLISHES=5; DURATION=3; shift ;;
        --no-build) BUILD=0; shift ;;
        --out-dir) OUT_DIR=$2; shift 2 ;;
        -h|--help) usage ;;
        *) echo "bench-fanout: unknown option $1" >&2; usage ;;
    esac
done
ADMIN_PORT=$((PORT + 10))
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
RELAY=$TARGET_DIR/release/relay
BENCH=$TARGET_DIR/release/relay-bench
TOKEN=fanout-$RANDOM$RANDOM
ROOM=fanout
STAMP=$(date -u +%Y%m%d-%H%M%S)
RUN_DIR=$OUT_DIR/fanout-$STAMP
OUT_JSON=$OUT_DIR/fanout-$STAMP.json
OUT_MD=$OUT_DIR/fanout-$STAMP.md
mkdir -p "$RUN_DIR"
log() { echo "bench-fanout: $*" >&2; }

if [ "$BUILD" = 1 ]; then
    log "building release binaries (CARGO_TARGET_DIR=$TARGET_DIR)"
    (cd "$REPO" && cargo build --release -p relay -p relay-bench) >&2 || { log "build failed"; exit 1; }
fi
for b in "$RELAY" "$BENCH"; do
    [ -x "$b" ] || { log "missing $b (build first or drop --no-build)"; exit 1; }
done

NICE_CMD=()
[ "$NICE" != 0 ] && NICE_CMD=(nice -n "$NICE")

# Processes this script started (timeout(1) wrappers) and the relay itself: stopped by PID.
STARTED=()
RELAY_PID=
cleanup() {
    local p
    [ -n "$RELAY_PID" ] && kill -TERM "$RELAY_PID" 2>/dev/null
    for p in "${STARTED[@]}"; do kill -TERM "$p" 2>/dev/null; done
    sleep 0.5
    [ -n "$RELAY_PID" ] && kill -KILL "$RELAY_PID" 2>/dev/null
    for p in "${STARTED[@]}"; do kill -KILL "$p" 2>/dev/null; done
    return 0
}
trap 'cleanup; exit 130' INT TERM
trap cleanup EXIT

exec 9>>/tmp/relay-bench.lock

# A port is busy if any socket (listening or not, any address) uses it as a local port.
port_busy() { ss -Htan "sport = :$1" 2>/dev/null | grep -q .; }

# Picks PORT and ADMIN_PORT = PORT+10, both free and below the ephemeral port range (other
# benchmarks' clients may hold any ephemeral port on 127.0.0.1 at any time).
find_ports() {
    local lo tries
    lo=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range)
    for ((tries = 0; tries < 500; tries++)); do
        if [ $((PORT + 10)) -ge "$lo" ]; then
            log "no free port pair below the ephemeral range ($lo); give a lower --port"
            return 1
        fi
        if ! port_busy "$PORT" && ! port_busy $((PORT + 10)); then
            ADMIN_PORT=$((PORT + 10))
            return 0
        fi
        PORT=$((PORT + 1))
    done
    log "no free port pair found"
    return 1
}

# The child of a timeout(1) wrapper (the real process), waiting for it to exist.
child_of() {
    local t=$1 c i
    for i in $(seq 1 100); do
        c=$(awk '{print $1}' "/proc/$t/task/$t/children" 2>/dev/null)
        [ -n "$c" ] && { echo "$c"; return 0; }
        sleep 0.02
    done
    return 1
}

kib() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status" 2>/dev/null; }

# Sum of a counter over relay's workers in /metrics.
metric_sum() {
    curl -s --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" |
        awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $2 } END { printf "%.0f\n", s }'
}

# Machine-wide busy and total jiffies (all CPUs) from /proc/stat.
cpu_jiffies() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat; }

# Waits (up to --quiet-wait s) until the machine is at most 25 % busy over one second.
wait_quiet() {
    local end=$((SECONDS + QUIET_WAIT)) b0 t0 b1 t1 pct
    while :; do
        read -r b0 t0 < <(cpu_jiffies)
        sleep 1
        read -r b1 t1 < <(cpu_jiffies)
        pct=$(((b1 - b0) * 100 / (t1 - t0 > 0 ? t1 - t0 : 1)))
        [ "$pct" -le 25 ] && return 0
        if [ $SECONDS -ge $end ]; then
            log "machine still ${pct}% busy after ${QUIET_WAIT}s; running anyway"
            return 0
        fi
    done
}

write_config() {
    cat >"$1" <<EOF
# bench-fanout: one relay process holding one room
[workers]
count = "auto"
pin = true

[[listener]]
address = "127.0.0.1:$PORT"
backlog = 4096

[admin]
address = "127.0.0.1:$ADMIN_PORT"

[limits]
max_connections = 9900

[apps]
publish_token = "$TOKEN"
room_queue = $ROOM_QUEUE
slow_member = "close"

[[route]]
name = "rooms"
path = "/rooms/"
app = "rooms"
EOF
}

# start_relay LOG: starts relay (bounded by timeout) on a free port pair, sets RELAY_PID
# and RELAY_TPID. A port taken between the check and relay's bind means another try.
start_relay() {
    local logf=$1 i _try
    for _try in 1 2 3 4 5; do
        find_ports || return 1
        write_config "$RUN_DIR/relay.toml"
        timeout --signal=TERM 1800 "${NICE_CMD[@]}" "$RELAY" --config "$RUN_DIR/relay.toml" >"$logf" 2>&1 &
        RELAY_TPID=$!
        STARTED+=("$RELAY_TPID")
        RELAY_PID=$(child_of "$RELAY_TPID") || { log "relay did not start"; return 1; }
        for i in $(seq 1 250); do
            grep -q "relay ready" "$logf" && return 0
            kill -0 "$RELAY_TPID" 2>/dev/null || break
            sleep 0.02
        done
        stop_relay
        if grep -q "Address already in use" "$logf"; then
            log "port $PORT or $ADMIN_PORT was taken meanwhile; trying the next ones"
            PORT=$((PORT + 1))
            continue
        fi
        log "relay not ready:"; cat "$logf" >&2
        return 1
    done
    return 1
}

stop_relay() {
    local i
    [ -n "$RELAY_PID" ] || return 0
    kill -TERM "$RELAY_PID" 2>/dev/null
    for i in $(seq 1 100); do
        kill -0 "$RELAY_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$RELAY_PID" 2>/dev/null
    wait "$RELAY_TPID" 2>/dev/null
    RELAY_PID=
}

# run_attempt MEMBERS MODE TAG: one measured run; writes $RUN_DIR/TAG.json (merged).
run_attempt() {
    local n=$1 mode=$2 tag=$3 p per first rate max_s t0 pids=() files=() extra i rc=0
    if [ "$mode" = chatter ]; then
        if [ -n "$RATE" ]; then rate=$RATE; else
            rate=$(awk -v d="$DELIVERIES" -v n="$n" 'BEGIN { r = d / (n - 1); printf "%.3f", (r < 1 ? 1 : r) }')
        fi
        max_s=$((DURATION + 120))
    else
        rate=0
        max_s=$((PUBLISHES * INTERVAL / 1000 + 120))
    fi
    log "$tag: waiting for /tmp/relay-bench.lock"
    if ! flock -w "$LOCK_WAIT" 9; then
        log "$tag: lock not obtained in $LOCK_WAIT s; skipped"
        return 1
    fi
    wait_quiet
    t0=$(date +%s)
    start_relay "$RUN_DIR/$tag-relay.log" || { flock -u 9; return 1; }
    local rss0
    rss0=$(kib "$RELAY_PID" VmRSS)
    log "$tag: relay pid $RELAY_PID ready on 127.0.0.1:$PORT (admin :$ADMIN_PORT), VmRSS $rss0 KiB; $PROCS loader processes"
    for ((p = 0; p < PROCS; p++)); do
        per=$((n / PROCS + (p < n % PROCS ? 1 : 0)))
        first=$((p * (n / PROCS) + (p < n % PROCS ? p : n % PROCS)))
        extra=(--relay-pid "$RELAY_PID")
        [ "$p" -gt 0 ] && extra=(--follower)
        local args=(rooms --target "127.0.0.1:$PORT" --admin "127.0.0.1:$ADMIN_PORT" --token "$TOKEN"
            --room "$ROOM" --mode "$mode" --members "$per" --room-members "$n" --first-member "$first"
            --sources "127.1.$p.1-127.1.$p.254" --size "$SIZE" --max-seconds "$max_s"
            --json "$RUN_DIR/$tag-p$p.json" "${extra[@]}")
        if [ "$mode" = publish ]; then
            args+=(--count "$PUBLISHES" --interval "$INTERVAL")
        else
            args+=(--duration "$DURATION" --rate "$rate" --settle 20)
        fi
        timeout --signal=TERM $((max_s + 30)) "${NICE_CMD[@]}" "$BENCH" "${args[@]}" \
            >"$RUN_DIR/$tag-p$p.log" 2>&1 &
        pids+=($!)
        STARTED+=($!)
        files+=("$RUN_DIR/$tag-p$p.json")
    done
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}"
        local r=$?
        [ $r -ne 0 ] && { log "$tag: loader $i exited with $r (log: $RUN_DIR/$tag-p$i.log)"; rc=1; }
    done
    local slow dropped frames pings timeouts
    slow=$(metric_sum relay_room_slow_members_closed_total)
    dropped=$(metric_sum relay_room_messages_dropped_total)
    frames=$(metric_sum relay_app_frames_sent_total)
    pings=$(metric_sum relay_app_pings_sent_total)
    timeouts=$(metric_sum relay_app_pong_timeouts_total)
    stop_relay
    flock -u 9
    if ! "$BENCH" rooms-merge "${files[@]}" --json "$RUN_DIR/$tag.json" 2>"$RUN_DIR/$tag-merge.txt"; then
        log "$tag: merged figures flag a problem (see $RUN_DIR/$tag-merge.txt)"
    fi
    [ -s "$RUN_DIR/$tag.json" ] || { log "$tag: no merged JSON"; return 1; }
    # Add what the script saw to the merged JSON.
    local tmp
    tmp=$(mktemp)
    jq --argjson rss0 "${rss0:-0}" --argjson slow "${slow:-0}" --argjson dropped "${dropped:-0}" \
        --argjson frames "${frames:-0}" --argjson pings "${pings:-0}" --argjson to "${timeouts:-0}" \
        --argjson secs $(($(date +%s) - t0)) --argjson loader_rc "$rc" \
        '. + {script: {relay_rss_kib_ready: $rss0, relay_slow_member_closes: $slow,
              relay_room_drops: $dropped, relay_app_frames_sent: $frames, relay_pings_sent: $pings,
              relay_pong_timeouts: $to, run_seconds: $secs, loader_exit_nonzero: ($loader_rc != 0)}}
         | del(.raw[].delay_hist_ns, .raw[].post_rtt_hist_ns)' \
        "$RUN_DIR/$tag.json" >"$tmp" && mv "$tmp" "$RUN_DIR/$tag.json"
    sed -n '1,20p' "$RUN_DIR/$tag-merge.txt" >&2
    return 0
}

# run_one MEMBERS MODE: up to --attempts runs until one is not disturbed by other work;
# the least disturbed becomes $RUN_DIR/MEMBERS-MODE.json.
run_one() {
    local n=$1 mode=$2 k tries=0 best='' best_share='' share
    for ((k = 1; k <= ATTEMPTS; k++)); do
        tries=$k
        run_attempt "$n" "$mode" "$n-$mode-a$k" || continue
        share=$(jq -r '.relay.other_cpu_share // 1' "$RUN_DIR/$n-$mode-a$k.json")
        if [ -z "$best" ] || awk -v a="$share" -v b="$best_share" 'BEGIN { exit !(a < b) }'; then
            best=$k
            best_share=$share
        fi
        if awk -v a="$share" -v p="$NOISE_PCT" 'BEGIN { exit !(a * 100 <= p) }'; then
            break
        fi
        log "$n-$mode: attempt $k disturbed (other work used $(awk -v a="$share" 'BEGIN { printf "%.0f", a * 100 }') % of the CPUs)"
    done
    [ -n "$best" ] || { log "$n-$mode: no usable run"; return 1; }
    jq --argjson k "$best" --argjson n "$tries" '. + {attempt: $k, attempts: $n}' \
        "$RUN_DIR/$n-$mode-a$best.json" >"$RUN_DIR/$n-$mode.json"
}

find_ports || exit 1
write_config "$RUN_DIR/relay.toml"
"$RELAY" check-config "$RUN_DIR/relay.toml" >/dev/null || { log "config refused"; exit 1; }
log "results in $RUN_DIR"
IFS=, read -r -a SIZE_LIST <<<"$SIZES"
IFS=, read -r -a MODE_LIST <<<"$MODES"
for n in "${SIZE_LIST[@]}"; do
    for mode in "${MODE_LIST[@]}"; do
        run_one "$n" "$mode"
    done
done

# ---- JSON and the table
MODEL=$(lscpu | awk -F: '/^Model name/ {gsub(/^ +/, "", $2); print $2; exit}')
jq -n --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" --arg model "$MODEL" --arg kernel "$(uname -r)" \
    --argjson cpus "$(nproc)" --arg sizes "$SIZES" --argjson procs "$PROCS" \
    --argjson publishes "$PUBLISHES" --argjson interval "$INTERVAL" --argjson duration "$DURATION" \
    --argjson size "$SIZE" --argjson room_queue "$ROOM_QUEUE" --argjson nice "$NICE" \
    --arg rate "${RATE:-}" --argjson deliveries "$DELIVERIES" \
    '{date: $date, machine: {cpu: $model, cpus: $cpus, kernel: $kernel},
      settings: {sizes: $sizes, procs: $procs, publishes: $publishes, interval_ms: $interval,
                 chatter_s: $duration, chatter_rate: (if $rate == "" then null else ($rate|tonumber) end),
                 chatter_deliveries: $deliveries, size: $size, room_queue: $room_queue, nice: $nice},
      runs: [inputs]}' "$RUN_DIR"/[0-9]*-publish.json "$RUN_DIR"/[0-9]*-chatter.json 2>/dev/null >"$OUT_JSON" ||
    jq -n '{runs: []}' >"$OUT_JSON"

jq -r -f /dev/stdin "$OUT_JSON" >"$OUT_MD" <<'JQ'
def r1: if . == null then "–" else (. * 10 | round / 10 | tostring) end;
def r2: if . == null then "–" else (. * 100 | round / 100 | tostring) end;
def ms: if . == null then null else . / 1000 end;
def k: if . == null then "–" elif . >= 1000000 then ((. / 100000 | round) / 10 | tostring) + " M" elif . >= 1000 then ((. / 1000 | round) | tostring) + " k" else (. | round | tostring) end;
def pubs: [.runs[] | select(.mode == "publish")] | map({key: (.members_open | tostring), value: .}) | from_entries;
def chats: [.runs[] | select(.mode == "chatter")] | map({key: (.room_members_expected | tostring), value: .}) | from_entries;
pubs as $p | chats as $c |
([.runs[].room_members_expected] | unique) as $sizes |
"| room members | publish → every member p50 / p99 / max (ms) | per member p50 / p99 (ms) | missing / dup | chatter msgs/s → deliveries/s | delivery delay p50 / p99 (ms) | relay CPU (cores) | deliveries per relay core-s | relay CPU per delivery (µs) | relay RSS peak (MiB) | slow closes / errors |",
"|---:|---|---|---|---|---|---|---:|---:|---:|---|",
($sizes[] | tostring | . as $n | ($p[$n]) as $P | ($c[$n]) as $C |
  "| \($n) " +
  "| \(if $P then "\($P.publish.all_members_us.p50 | ms | r1) / \($P.publish.all_members_us.p99 | ms | r1) / \($P.publish.all_members_us.max | ms | r1)" else "–" end) " +
  "| \(if $P then "\($P.publish.per_member_us.p50 | ms | r1) / \($P.publish.per_member_us.p99 | ms | r1)" else "–" end) " +
  "| \(if $P then "\($P.publish.missing) / \($P.publish.duplicates)" + (if $C then ", \($C.chatter.missing) / \($C.chatter.duplicates)" else "" end) else "–" end) " +
  "| \(if $C then "\($C.chatter.rate | r1) → \($C.chatter.deliveries_per_s | k)" else "–" end) " +
  "| \(if $C then "\($C.chatter.delay_us.p50 | ms | r1) / \($C.chatter.delay_us.p99 | ms | r1)" else "–" end) " +
  "| \(if $C then ($C.relay.cores_busy | r2) else "–" end) " +
  "| \(if $C then ($C.relay.deliveries_per_core_s | k) else "–" end) " +
  "| \(if $C then ($C.relay.cpu_us_per_delivery | r2) else "–" end) " +
  "| \([($P.relay.hwm_kib_end // 0), ($C.relay.hwm_kib_end // 0)] | max / 1024 | r1) " +
  "| \([($P.script.relay_slow_member_closes // 0), ($C.script.relay_slow_member_closes // 0)] | add) / \([($P.errors // 0), ($C.errors // 0), ($P.connect_failures // 0), ($C.connect_failures // 0), ($P.handshake_failures // 0), ($C.handshake_failures // 0)] | add) |"
)
,
"",
"| room members | relay CPU per delivery, publish (µs) | relay CPU per delivery, chatter (µs) | machine softirq per delivery, chatter (µs) | loaders' CPU per delivery, chatter (µs) | relay RSS per idle member (B) | relay RSS peak per member, chatter (B) | other work during the run, publish / chatter (% of CPUs) |",
"|---:|---:|---:|---:|---:|---:|---:|---|",
($sizes[] | tostring | . as $n | ($p[$n]) as $P | ($c[$n]) as $C |
  "| \($n) " +
  "| \(if $P and $P.relay.cpu_s then ($P.relay.cpu_s * 1e6 / $P.publish.deliveries | r2) else "–" end) " +
  "| \(if $C then ($C.relay.cpu_us_per_delivery | r2) else "–" end) " +
  "| \(if $C and $C.relay.machine then ($C.relay.machine.softirq_s * 1e6 / $C.chatter.deliveries_in_window | r2) else "–" end) " +
  "| \(if $C and $C.loader_cpu_s then ($C.loader_cpu_s * 1e6 / $C.chatter.deliveries_in_window | r2) else "–" end) " +
  "| \(if $P and $P.relay.rss_kib_open then (($P.relay.rss_kib_open - $P.script.relay_rss_kib_ready) * 1024 / $P.members_open | round | tostring) else "–" end) " +
  "| \(if $C and $C.relay.hwm_kib_end then (($C.relay.hwm_kib_end - $C.script.relay_rss_kib_ready) * 1024 / $C.members_open | round | tostring) else "–" end) " +
  "| \(if $P then ($P.relay.other_cpu_share * 100 | r1) else "–" end) / \(if $C then ($C.relay.other_cpu_share * 100 | r1) else "–" end) |"
)
JQ
echo
cat "$OUT_MD"
echo
log "JSON: $OUT_JSON   table: $OUT_MD   logs: $RUN_DIR/"
