#!/usr/bin/env bash
# What metering costs: the same relay source built with and without the `metering` feature
# (per-message byte counters per worker, route and connection), A/B in one run on this
# machine. relay is pinned to CPU 0 with one worker; echo origin and load generator share
# CPU 1. Rounds alternate the two builds so drift on the machine hits both alike.
#
# Usage: scripts/bench-metering.sh [--rounds N] [--duration SECS] [--size BYTES]
# Prints a table and writes bench-results/metering-<date>.json. Loopback only; every process
# it starts is stopped by PID; each load run stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=5 DURATION=10 SIZE=32 CONNS=50 INFLIGHT=16
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        *) echo "unknown flag $1" >&2; exit 2 ;;
    esac
done

cargo build --release -q -p relay -p relay-bench
cargo build --release -q -p relay --no-default-features --target-dir target/nometer
WITH=target/release/relay
WITHOUT=target/nometer/release/relay
BENCH=target/release/relay-bench

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
OPORT=$(port)
taskset -c 1 "$BENCH" echo-origin --listen "127.0.0.1:$OPORT" > /tmp/bench-metering-origin.$$ &
pids+=($!)
until grep -q ready /tmp/bench-metering-origin.$$ 2>/dev/null; do sleep 0.05; done

mkdir -p bench-results
out=bench-results/metering-$(date -u +%Y%m%dT%H%M%SZ).json
echo "[" > "$out"
first=1
run() { # build-name binary round
    local name=$1 bin=$2 round=$3 rport log
    rport=$(port)
    log=$(mktemp)
    taskset -c 0 "$bin" --listen "127.0.0.1:$rport" --origin "127.0.0.1:$OPORT" --workers 1 --admin off --log info 2> "$log" &
    local rpid=$!
    pids+=($rpid)
    until grep -q "relay ready" "$log"; do
        kill -0 "$rpid" 2>/dev/null || { cat "$log" >&2; exit 1; }
        sleep 0.05
    done
    local t0 t1 json
    t0=$(awk '{print $14+$15}' /proc/$rpid/stat)
    json=$(taskset -c 1 "$BENCH" load --target "127.0.0.1:$rport" --connections $CONNS --inflight $INFLIGHT \
        --size "$SIZE" --duration "$DURATION" --json - 2>/dev/null)
    t1=$(awk '{print $14+$15}' /proc/$rpid/stat)
    kill "$rpid"; wait "$rpid" 2>/dev/null || true
    rm -f "$log"
    local row
    row=$(python3 - "$name" "$round" "$t0" "$t1" "$json" <<'PY'
import json, os, sys
name, rnd, t0, t1, j = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
hz = os.sysconf("SC_CLK_TCK")
cpu_us = (t1 - t0) * 1e6 / hz
print(json.dumps({"build": name, "round": rnd, "msgs_per_s": j["msgs_per_s"], "messages": j["messages"],
                  "cpu_us_per_msg": cpu_us / max(j["messages"], 1), "rtt_p99_us": j["rtt_us"]["p99"],
                  "verify_failures": j["verify_failures"]}))
PY
)
    [ $first = 1 ] || echo "," >> "$out"
    first=0
    echo "$row" >> "$out"
    echo "$row"
}
for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then run metering "$WITH" "$r"; run no-metering "$WITHOUT" "$r"
    else run no-metering "$WITHOUT" "$r"; run metering "$WITH" "$r"; fi
done
echo "]" >> "$out"
python3 - "$out" <<'PY'
import json, statistics, sys
rows = json.load(open(sys.argv[1]))
def agg(b, k): return statistics.median(r[k] for r in rows if r["build"] == b)
m, n = agg("metering", "msgs_per_s"), agg("no-metering", "msgs_per_s")
cm, cn = agg("metering", "cpu_us_per_msg"), agg("no-metering", "cpu_us_per_msg")
print(f"\n| build | msgs/s (median) | CPU-us/msg (median) |\n|---|---|---|")
print(f"| metering | {m:,.0f} | {cm:.3f} |\n| no metering | {n:,.0f} | {cn:.3f} |")
print(f"\nmetering costs {100*(n-m)/n:+.2f}% msgs/s and {100*(cm-cn)/cn:+.2f}% CPU per message ({len(rows)//2} rounds each)")
print(f"results: {sys.argv[1]}")
PY
