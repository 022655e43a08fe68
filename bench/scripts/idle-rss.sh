#!/usr/bin/env bash
# Bytes of user memory per idle WebSocket connection, for echo-origin and `load`.
#
# Starts its own echo-origin on 127.0.0.1:$PORT, opens N idle connections with
# `load --mode hold`, and samples VmRSS (/proc/PID/status) of both processes before and
# while the connections are held. Kernel socket memory is not in VmRSS; the machine-wide
# /proc/meminfo Slab delta is printed alongside for that (noisy if anything else runs). Stops only the processes it started, by PID.
#
# Usage: bench/scripts/idle-rss.sh [CONNECTIONS=10000] [HOLD_SECS=15]
# Env:   RELAY_BENCH=path/to/relay-bench  PORT=9100  RATE=5000
#        SOURCES=127.0.0.2-127.0.0.250  ORIGIN_THREADS=1  LOAD_THREADS=1  OUT=dir
set -euo pipefail

N=${1:-10000}
HOLD=${2:-15}
PORT=${PORT:-9100}
RATE=${RATE:-5000}
SOURCES=${SOURCES:-127.0.0.2-127.0.0.250}
BIN=${RELAY_BENCH:-target/release/relay-bench}
OUT=${OUT:-$(mktemp -d /tmp/idle-rss.XXXXXX)}
mkdir -p "$OUT"

[ -x "$BIN" ] || { echo "no $BIN: cargo build --release -p relay-bench (or set RELAY_BENCH)" >&2; exit 2; }

rss() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
slab_kib() { awk '/^Slab:/ {print $2}' /proc/meminfo; }

OPID=
LPID=
cleanup() {
    [ -n "$LPID" ] && kill "$LPID" 2>/dev/null || true
    [ -n "$OPID" ] && kill "$OPID" 2>/dev/null || true
}
trap cleanup EXIT

"$BIN" echo-origin --listen "127.0.0.1:$PORT" --threads "${ORIGIN_THREADS:-1}" \
    --max-seconds $((HOLD + 300)) >"$OUT/origin.out" 2>"$OUT/origin.err" &
OPID=$!
for _ in $(seq 100); do
    grep -q '^ready ' "$OUT/origin.out" 2>/dev/null && break
    sleep 0.1
done
grep -q '^ready ' "$OUT/origin.out" || { echo "echo-origin did not start:" >&2; cat "$OUT/origin.err" >&2; exit 1; }

# Warm the origin's per-thread buffers so the baseline includes them.
"$BIN" load --target "127.0.0.1:$PORT" --connections 2 --inflight 4 --size 1024 --duration 1 \
    --max-seconds 30 2>/dev/null >/dev/null
sleep 0.5
O_BEFORE=$(rss "$OPID")
MEM_BEFORE=$(slab_kib)

"$BIN" load --mode hold --target "127.0.0.1:$PORT" --connections "$N" --rate "$RATE" \
    --source-range "$SOURCES" --hold "$HOLD" --threads "${LOAD_THREADS:-1}" \
    --max-seconds $((HOLD + 200)) --json "$OUT/hold.json" 2>"$OUT/load.err" &
LPID=$!

# Wait for the hold phase, then give it a second to settle.
for _ in $(seq $((HOLD * 10 + 1500))); do
    grep -q '] hold ' "$OUT/load.err" 2>/dev/null && break
    kill -0 "$LPID" 2>/dev/null || break
    sleep 0.1
done
sleep 1
O_HOLD=$(rss "$OPID")
L_HOLD=$(rss "$LPID" || echo 0)
MEM_HOLD=$(slab_kib)
OPEN=$(ss -Htn state established "( sport = :$PORT )" | wc -l)
wait "$LPID" || true
LPID=

L_START=$(sed -n 's/.*"loader_rss_kib_start": \([0-9]*\).*/\1/p' "$OUT/hold.json")
L_OPEN=$(sed -n 's/.*"loader_rss_kib_open": \([0-9]*\).*/\1/p' "$OUT/hold.json")
PEAK=$(sed -n 's/.*"connections_open_peak": \([0-9]*\).*/\1/p' "$OUT/hold.json")

echo "connections held: $PEAK (origin saw $OPEN established)"
awk -v b="$O_BEFORE" -v h="$O_HOLD" -v n="$PEAK" 'BEGIN {
    printf "echo-origin VmRSS: %d KiB -> %d KiB  = %.0f B per idle connection\n", b, h, (h - b) * 1024 / n }'
awk -v b="$L_START" -v h="$L_OPEN" -v x="$L_HOLD" -v n="$PEAK" 'BEGIN {
    printf "load VmRSS:        %d KiB -> %d KiB  = %.0f B per idle connection (VmRSS during hold: %d KiB)\n", b, h, (h - b) * 1024 / n, x }'
awk -v b="$MEM_BEFORE" -v h="$MEM_HOLD" -v n="$PEAK" 'BEGIN {
    printf "kernel slab (/proc/meminfo Slab, both ends + epoll, machine-wide): %d -> %d KiB = %.0f B per connection pair\n", b, h, (h - b) * 1024 / n }'
echo "files in $OUT"
