# shellcheck shell=bash
# Helpers for scripts/bench-compare.sh: processes, /proc sampling, ports. Sourced, not run.
#
# Every long-lived process is started as `timeout -k 5 LIFETIME taskset -c CPU CMD`, so it
# ends by itself even if this script is killed; it is stopped through that timeout's PID
# (timeout forwards the signal to its process group). Only PIDs recorded here are ever
# signalled.

CLK_TCK=$(getconf CLK_TCK)
STARTED_TPIDS=()          # timeout PIDs of everything still running that we started
declare -A USED_PORTS=()

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
warn() { printf '[%(%H:%M:%S)T] warning: %s\n' -1 "$*" >&2; }
die() { printf 'bench-compare: %s\n' "$*" >&2; exit 2; }

# A free TCP port on 127.0.0.1 below the ephemeral range, never handed out twice in a run.
# Sets PORT_OUT (call it directly, not in $(...), so the record of used ports survives).
alloc_port() {
    local p lo=20000 hi
    hi=$(awk '{print $1 - 1}' /proc/sys/net/ipv4/ip_local_port_range)
    [ "$hi" -gt 30000 ] && hi=30000
    for _ in $(seq 500); do
        p=$((lo + RANDOM % (hi - lo)))
        [ -n "${USED_PORTS[$p]:-}" ] && continue
        if [ -z "$(ss -Htan "( sport = :$p )" 2>/dev/null | head -1)" ]; then
            USED_PORTS[$p]=1
            PORT_OUT=$p
            return 0
        fi
    done
    die "no free port found"
}

# spawn CPU LIFETIME_S LOGBASE CMD... : start CMD pinned to CPU at nice $BENCH_NICE; sets
# SPAWNED (timeout PID). nice and taskset exec, so timeout's child is CMD itself.
spawn() {
    local cpu=$1 life=$2 logbase=$3
    shift 3
    timeout -k 5 "$life" nice -n "${BENCH_NICE:-0}" taskset -c "$cpu" "$@" >"$logbase.out" 2>"$logbase.err" &
    SPAWNED=$!
    STARTED_TPIDS+=("$SPAWNED")
}

# The process timeout started (taskset execs the command, so it is timeout's only child).
child_of() {
    local c
    for _ in $(seq 100); do
        c=$(pgrep -P "$1" | head -1)
        [ -n "$c" ] && { echo "$c"; return 0; }
        kill -0 "$1" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

# A PID and all its descendants.
pid_tree() {
    local p c
    for p in "$@"; do
        echo "$p"
        for c in $(pgrep -P "$p"); do pid_tree "$c"; done
    done
}

forget_tpid() {
    local t keep=()
    for t in "${STARTED_TPIDS[@]}"; do
        [ "$t" = "$1" ] || keep+=("$t")
    done
    STARTED_TPIDS=("${keep[@]}")
}

# stop TPID...: TERM (relay drains on the first, closes all on the second), then KILL.
stop_tpids() {
    local t alive i
    [ $# -eq 0 ] && return 0
    for t in "$@"; do kill -TERM "$t" 2>/dev/null || true; done
    for i in $(seq 100); do
        alive=0
        for t in "$@"; do kill -0 "$t" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        if [ "$i" = 30 ]; then
            for t in "$@"; do kill -TERM "$t" 2>/dev/null || true; done
        fi
        sleep 0.1
    done
    for t in "$@"; do
        if kill -0 "$t" 2>/dev/null; then
            local k
            for k in $(pid_tree "$t" | tac); do kill -KILL "$k" 2>/dev/null || true; done
        fi
        wait "$t" 2>/dev/null || true
        forget_tpid "$t"
    done
}

stop_all_started() {
    [ ${#STARTED_TPIDS[@]} -gt 0 ] && stop_tpids "${STARTED_TPIDS[@]}"
    return 0
}

# Sum of utime+stime (clock ticks) over PIDs, threads included (fields 14, 15 of stat,
# counted after the ")" that ends the command name). Dead PIDs count 0.
proc_ticks() {
    local p s total=0 f
    for p in "$@"; do
        s=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        read -r -a f <<<"${s##*) }"
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

# Sum over PIDs and their threads of the time spent runnable but waiting for a CPU (ns,
# second field of /proc/PID/task/TID/schedstat).
proc_runq_wait_ns() {
    local p
    for p in "$@"; do cat /proc/"$p"/task/*/schedstat 2>/dev/null; done | awk '{ s += $2 } END { printf "%.0f\n", s }'
}

proc_rss_kib() {
    local p total=0 v
    for p in "$@"; do
        v=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null)
        total=$((total + ${v:-0}))
    done
    echo "$total"
}

sockstat_tcp_mem_pages() { awk '$1 == "TCP:" { for (i = 2; i < NF; i++) if ($i == "mem") print $(i + 1) }' /proc/net/sockstat; }
sockstat_tcp_inuse() { awk '$1 == "TCP:" { for (i = 2; i < NF; i++) if ($i == "inuse") print $(i + 1) }' /proc/net/sockstat; }
sockstat_tw() { awk '$1 == "TCP:" { for (i = 2; i < NF; i++) if ($i == "tw") print $(i + 1) }' /proc/net/sockstat; }
meminfo_kib() { awk -v k="$1:" '$1 == k {print $2}' /proc/meminfo; }

# Per-cache "name active_objs objsize" lines. Allocated objects x size, unlike /proc/meminfo
# Slab, does not count free objects in partly used slabs (left over from earlier cells).
slab_snapshot() { awk 'NR > 2 { print $1, $2, $4 }' /proc/slabinfo; }

# slab_delta BEFORE AFTER: "raw_bytes proc_artifact_bytes" between two slab_snapshot files.
# proc_artifact: the /proc inodes (and one dentry each) that something enumerating
# /proc/PID/fd creates for every open descriptor (on our machines the sandbox's agent does,
# within seconds); they are not a cost of the connections, so they are reported apart.
slab_delta() {
    awk 'NR == FNR { n0[$1] = $2; next }
         { d = ($2 - n0[$1]) * $3; raw += d; if ($1 == "dentry") dsz = $3
           if ($1 == "proc_inode_cache") { pobj = $2 - n0[$1]; pb = d } }
         END { printf "%.0f %.0f\n", raw, pb + pobj * dsz }' "$1" "$2"
}

# The 8 caches that grew most: "name bytes" lines.
slab_top() {
    awk 'NR == FNR { n0[$1] = $2; next } { d = ($2 - n0[$1]) * $3; if (d > 0) printf "%s %.0f\n", $1, d }' "$1" "$2" |
        sort -k2,2nr | head -8
}

# Busy and total jiffies of one CPU ("cpu0") or all ("cpu") from /proc/stat.
cpu_jiffies() {
    awk -v c="$1" '$1 == c { busy = $2 + $3 + $4 + $7 + $8 + $9; tot = busy + $5 + $6; print busy, tot }' /proc/stat
}

# Steal jiffies of one CPU ("cpu0") or all ("cpu"): time the hypervisor gave to others
# while this guest's CPU had work (counted as busy by cpu_jiffies).
cpu_steal() {
    awk -v c="$1" '$1 == c { print $9 }' /proc/stat
}

listeners_on() { ss -Hltn "( sport = :$1 )" 2>/dev/null | wc -l; }
listeners_at_least() { [ "$(listeners_on "$1")" -ge "$2" ]; }
has_children() { [ -n "$(pgrep -P "$1")" ]; }

# Established TCP sockets whose local port is one of the given ports.
established_on() {
    local flt="" p
    for p in "$@"; do flt="${flt:+$flt or }sport = :$p"; done
    ss -Htn state established "( $flt )" 2>/dev/null | wc -l
}

# wait_for TIMEOUT_S CMD...: poll CMD every 0.1 s until it succeeds.
wait_for() {
    local t=$1 i
    shift
    for i in $(seq $((t * 10))); do
        "$@" && return 0
        sleep 0.1
    done
    "$@"
}

# http_get PORT PATH: body of GET http://127.0.0.1:PORT/PATH (curl, or bash's /dev/tcp).
http_get() {
    if command -v curl >/dev/null; then
        curl -s -m 5 "http://127.0.0.1:$1$2"
    else
        (
            exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
            printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$2" >&3
            timeout 5 cat <&3 | sed '1,/^\r\{0,1\}$/d'
        )
    fi
}

# ceil(a / b)
ceil_div() { echo $((($1 + $2 - 1) / $2)); }

# jq-friendly number or null.
num_or_null() { if [[ $1 =~ ^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$ ]]; then echo "$1"; else echo null; fi; }

# ---------------------------------------------------------------- where loopback's receive path runs
# On loopback the kernel runs a packet's whole receive path (TCP input, the receiving socket's
# wake-up callback: epoll's, io_uring's) on the CPU of the process that *sent* it, so a
# proxy's own receive costs land on the load generator's CPU and are missing from the
# proxy's CPU figures. With RFS on lo (rps_cpus = every CPU, a flow table) each packet's
# receive path runs on the CPU where its receiving socket was last read, as on a host whose
# NIC queues are steered to the application's CPU (tuning/README.md). Modes:
#   sender    the kernel's default (RPS off on lo)
#   receiver  RFS on lo
# rx_steer_save first (remembers the machine's values), rx_steer MODE, rx_steer_restore at exit.
RX_Q=/sys/class/net/lo/queues/rx-0
RX_SAVED=
rx_steer_save() {
    RX_SAVED="$(cat "$RX_Q/rps_cpus") $(cat "$RX_Q/rps_flow_cnt") $(cat /proc/sys/net/core/rps_sock_flow_entries)"
}
# rx_steer_check: fails, saying why, where the receiver mode cannot be set up.
rx_steer_check() {
    local f
    for f in "$RX_Q/rps_cpus" "$RX_Q/rps_flow_cnt" /proc/sys/net/core/rps_sock_flow_entries; do
        [ -w "$f" ] || { echo "cannot write $f (needs root and a kernel with RPS)"; return 1; }
    done
}
rx_steer() {
    case $1 in
        sender)
            echo 0 >"$RX_Q/rps_cpus" && echo 0 >"$RX_Q/rps_flow_cnt" &&
                echo 0 >/proc/sys/net/core/rps_sock_flow_entries
            ;;
        receiver)
            echo 32768 >/proc/sys/net/core/rps_sock_flow_entries && echo 32768 >"$RX_Q/rps_flow_cnt" &&
                printf '%x\n' $(((1 << $(nproc --all)) - 1)) >"$RX_Q/rps_cpus"
            ;;
        *) return 1 ;;
    esac
}
# rx_steer_now: the mode the machine is in (receiver once lo has RPS CPUs and a flow table).
rx_steer_now() {
    if [ "$(tr -d '0,\n' <"$RX_Q/rps_cpus")" != "" ] && [ "$(cat "$RX_Q/rps_flow_cnt")" -gt 0 ] &&
        [ "$(cat /proc/sys/net/core/rps_sock_flow_entries)" -gt 0 ]; then
        echo receiver
    else
        echo sender
    fi
}
rx_steer_restore() {
    [ -n "$RX_SAVED" ] || return 0
    local cpus cnt entries
    read -r cpus cnt entries <<<"$RX_SAVED"
    echo "$entries" >/proc/sys/net/core/rps_sock_flow_entries
    echo "$cnt" >"$RX_Q/rps_flow_cnt"
    echo "$cpus" >"$RX_Q/rps_cpus"
    RX_SAVED=
}
