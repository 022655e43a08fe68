#!/usr/bin/env bash
# The Autobahn TestSuite against relay's own echo app, as scripts/test.sh runs it in CI.
#
#   scripts/test-autobahn.sh [autobahn.sh options...]
#
# Starts relay (the binary $RELAY_BIN, default <repo>/target/debug/relay) with a config that
# serves `app = "echo"` at /echo on a free loopback port, with [apps] max_message_size =
# "16MiB" (group 9 sends messages up to 16 MiB) and the admin listener off; waits for its
# `relay ready` line; runs scripts/autobahn.sh ws://127.0.0.1:PORT/echo with every case
# (groups 1-13, group 9 included) unless options say otherwise (e.g. -x '9.*'); then stops
# relay by its PID (SIGTERM) and requires exit status 0.
#
# Exit status: autobahn.sh's (1 when a case of groups 1-10 FAILED, 2 when the run could not
# happen), or 1 when relay did not start or did not exit cleanly. The report is written to
# $AUTOBAHN_OUT (default <repo>/test-artifacts/autobahn), relay's log next to it.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
relay_bin="${RELAY_BIN:-$root/target/debug/relay}"
out="${AUTOBAHN_OUT:-$root/test-artifacts/autobahn}"
python="${PYTHON:-python3}"
ready_timeout=15  # seconds for relay to print `relay ready`
stop_timeout=10   # seconds for relay to exit after SIGTERM

say() { echo "test-autobahn: $*"; }
[[ -x "$relay_bin" ]] || { say "no relay binary at $relay_bin (cargo build -p relay, or set RELAY_BIN)" >&2; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/relay-autobahn.XXXXXX")"
mkdir -p "$out"
log="$out/relay.log"
pid=""

relay_code=0
stop_relay() {
    # Stops the relay this script started, by its PID; its exit status goes to $relay_code.
    local p="$pid" waited=0
    pid=""
    relay_code=0
    [[ -n "$p" ]] || return 0
    if kill -0 "$p" 2>/dev/null; then
        kill -TERM "$p" 2>/dev/null || true
        while kill -0 "$p" 2>/dev/null && ((waited < stop_timeout * 10)); do
            sleep 0.1
            waited=$((waited + 1))
        done
        if kill -0 "$p" 2>/dev/null; then
            say "relay (pid $p) ignored SIGTERM for ${stop_timeout}s; killing it" >&2
            kill -KILL "$p" 2>/dev/null || true
        fi
    fi
    wait "$p" 2>/dev/null || relay_code=$?
}
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
    [[ -z "$pid" ]] || stop_relay
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free loopback port: the kernel picks one, we release it, relay binds it. Another
# process can take it in between; then relay fails to bind and we try another.
free_port() {
    "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

port=""
for attempt in 1 2 3; do
    port="$(free_port)"
    cat >"$work/relay.toml" <<EOF
[workers]
count = 2
pin = false

[[listener]]
address = "127.0.0.1:$port"

[admin]
address = "off"

[apps]
max_message_size = "16MiB"

[[route]]
name = "echo"
path = "/echo"
app = "echo"
EOF
    RELAY_LOG=info "$relay_bin" --config "$work/relay.toml" >"$log" 2>&1 &
    pid=$!
    started=0
    for ((i = 0; i < ready_timeout * 20; i++)); do
        if grep -q "relay ready" "$log"; then
            started=1
            break
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    if ((started)); then
        break
    fi
    stop_relay
    say "relay did not become ready on port $port (attempt $attempt, exit $relay_code):" >&2
    tail -n 20 "$log" >&2
    port=""
done
[[ -n "$port" ]] || { say "giving up: relay never started" >&2; exit 1; }
say "relay (pid $pid) serves echo on ws://127.0.0.1:$port/echo; log in $log"

status=0
"$root/scripts/autobahn.sh" "ws://127.0.0.1:$port/echo" -o "$out" "$@" || status=$?

stop_relay
if [[ "$relay_code" != 0 ]]; then
    say "relay exited with status $relay_code after SIGTERM (want 0); its log:" >&2
    tail -n 40 "$log" >&2
    ((status != 0)) || status=1
else
    say "relay stopped (exit 0)"
fi
exit "$status"
