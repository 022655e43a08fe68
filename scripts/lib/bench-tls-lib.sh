# shellcheck shell=bash
# Helpers shared by scripts/bench-tls.sh and scripts/bench-tls-hold.sh (TLS peers,
# certificates, the docs section). Sourced after scripts/lib/bench-compare-lib.sh, whose
# process, port and /proc helpers they use. Sourced, not run.

# make_certs DIR: a throwaway CA and an ECDSA P-256 leaf for relay.test and 127.0.0.1,
# made with the openssl CLI. Writes DIR/ca.pem, DIR/leaf.pem, DIR/leaf.key (PKCS#8) and
# DIR/haproxy.pem (leaf + key, what HAProxy's `crt` wants).
make_certs() {
    local d=$1
    (
        set -e
        cd "$d"
        openssl ecparam -name prime256v1 -genkey -noout -out ca.key
        openssl req -x509 -new -key ca.key -sha256 -days 2 -subj "/CN=bench-tls CA" \
            -addext basicConstraints=critical,CA:true -addext keyUsage=critical,keyCertSign,cRLSign -out ca.pem
        openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out leaf.key
        openssl req -new -key leaf.key -subj "/CN=relay.test" -out leaf.csr
        printf 'subjectAltName=DNS:relay.test,IP:127.0.0.1\nbasicConstraints=critical,CA:false\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' >ext.cnf
        openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -sha256 \
            -extfile ext.cnf -out leaf.pem
        cat leaf.pem leaf.key >haproxy.pem
        chmod 600 ca.key leaf.key haproxy.pem
    ) >"$d/openssl.log" 2>&1
}

fill_template() { # fill_template SRC DST KEY=VALUE...
    local src=$1 dst=$2 kv args=()
    shift 2
    for kv in "$@"; do args+=(-e "s|@${kv%%=*}@|${kv#*=}|g"); done
    sed "${args[@]}" "$src" >"$dst"
}

# start_origins K LIFE DIR: K echo-origin processes on CPU 1, each on its own port.
# Sets ORIGIN_TPIDS, ORIGIN_PORTS, ORIGIN_PIDS, PEER_ERR.
start_origins() {
    local k=$1 life=$2 dir=$3 i
    ORIGIN_TPIDS=()
    ORIGIN_PORTS=()
    ORIGIN_PIDS=()
    for ((i = 0; i < k; i++)); do
        alloc_port
        spawn 1 "$life" "$dir/origin-$i" "$BENCH" echo-origin --listen "127.0.0.1:$PORT_OUT" \
            --threads 1 --backlog 4096 --max-seconds "$life"
        ORIGIN_TPIDS+=("$SPAWNED")
        ORIGIN_PORTS+=("$PORT_OUT")
    done
    for ((i = 0; i < k; i++)); do
        if ! wait_for 10 grep -qs '^ready ' "$dir/origin-$i.out"; then
            PEER_ERR="echo-origin $i did not start: $(tail -2 "$dir/origin-$i.err" | tr '\n' ' ')"
            return 1
        fi
        ORIGIN_PIDS+=("$(child_of "${ORIGIN_TPIDS[$i]}")")
    done
}

# start_tls_peer PEER NPROC PORT LIFE DIR MAXCONN [TEMPLATE]: NPROC copies of relay or
# haproxy on CPU 0 terminating TLS on PORT with the certificate in $CERT_DIR; copy i
# relays to ORIGIN_PORTS[i % K] (relay: TEMPLATE, default relay-tls.toml.in). Sets
# PEER_TPIDS, PEER_PIDS, RELAY_ADMIN_PORTS, PEER_ERR.
start_tls_peer() {
    local peer=$1 n=$2 port=$3 life=$4 dir=$5 maxconn=$6 tpl=${7:-relay-tls.toml.in} i op c k=${#ORIGIN_PORTS[@]}
    PEER_TPIDS=()
    PEER_PIDS=()
    PEER_ERR=
    RELAY_ADMIN_PORTS=()
    for ((i = 0; i < n; i++)); do
        op=${ORIGIN_PORTS[$((i % (k > 0 ? k : 1)))]:-0}
        case $peer in
            relay)
                alloc_port
                fill_template "$REPO/bench/peers/$tpl" "$dir/relay-$i.toml" \
                    PORT="$port" CERT="$CERT_DIR/leaf.pem" KEY="$CERT_DIR/leaf.key" \
                    ADMIN_PORT="$PORT_OUT" MAXCONN="$maxconn" ORIGIN_PORT="$op"
                # shellcheck disable=SC2086
                spawn 0 "$life" "$dir/relay-$i" "$RELAY" --config "$dir/relay-$i.toml" \
                    --workers 1 --no-pin ${RELAY_EXTRA_ARGS:-}
                RELAY_ADMIN_PORTS+=("$PORT_OUT")
                ;;
            haproxy)
                fill_template "$REPO/bench/peers/haproxy-tls.cfg.in" "$dir/haproxy-$i.cfg" \
                    PORT="$port" ORIGIN_PORT="$op" MAXCONN="$maxconn" CERT_PEM="$CERT_DIR/haproxy.pem" \
                    SSL_CACHE=20000 TICKETS=""
                spawn 0 "$life" "$dir/haproxy-$i" haproxy -db -f "$dir/haproxy-$i.cfg"
                ;;
            *) PEER_ERR="unknown peer $peer"; return 1 ;;
        esac
        PEER_TPIDS+=("$SPAWNED")
    done
    if ! wait_for 20 listeners_at_least "$port" "$n"; then
        PEER_ERR="$peer: $(listeners_on "$port")/$n listeners on :$port after 20 s"
        for ((i = 0; i < n; i++)); do
            PEER_ERR+=" | $(tail -3 "$dir/$peer-$i.err" 2>/dev/null | tr '\n' ' ')"
        done
        return 1
    fi
    for i in "${PEER_TPIDS[@]}"; do
        c=$(child_of "$i") || { PEER_ERR="$peer exited at start: $(tail -3 "$dir/$peer-0.err" | tr '\n' ' ')"; return 1; }
        # shellcheck disable=SC2207
        PEER_PIDS+=($(pid_tree "$c"))
    done
    return 0
}

# relay_tls_counters: relay's own handshake counters summed over RELAY_ADMIN_PORTS, as JSON
# {"full": N, "resumed": N, "failures": N} (null when relay is not running).
relay_tls_counters() {
    local p
    [ ${#RELAY_ADMIN_PORTS[@]} -gt 0 ] || { echo null; return; }
    for p in "${RELAY_ADMIN_PORTS[@]}"; do http_get "$p" /metrics 2>/dev/null; done |
        awk '/^relay_tls_handshakes_total\{.*kind="full"/ { f += $NF }
             /^relay_tls_handshakes_total\{.*kind="resumed"/ { r += $NF }
             /^relay_tls_handshake_failures_total/ { x += $NF }
             END { printf "{\"full\": %d, \"resumed\": %d, \"failures\": %d}\n", f, r, x }'
}

# replace_doc_section DOC BEGIN_MARKER_PREFIX END_MARKER SECTION_FILE: replace the lines from
# the begin marker to the end marker (inclusive) with SECTION_FILE, or append it.
replace_doc_section() {
    local doc=$1 begin=$2 end=$3 section=$4 tmp
    [ -f "$doc" ] || printf '# Benchmarks\n' >"$doc"
    tmp=$(mktemp /tmp/bench-tls-doc.XXXXXX)
    if grep -q "^$begin" "$doc"; then
        awk -v f="$section" -v b="^$begin" -v e="^$end" '
            $0 ~ b { while ((getline l < f) > 0) print l; skip = 1; next }
            skip && $0 ~ e { skip = 0; next }
            !skip' "$doc" >"$tmp" && cat "$tmp" >"$doc"
    else
        { echo; cat "$section"; } >>"$doc"
    fi
    rm -f "$tmp"
}

# machine_meta: one JSON object describing the machine and the source tree.
machine_meta() {
    local model hv
    model=$(lscpu 2>/dev/null | awk -F: '/^Model name/ { sub(/^[ \t]+/, "", $2); print $2; exit }')
    hv=$(lscpu 2>/dev/null | awk -F: '/^Hypervisor vendor/ { sub(/^[ \t]+/, "", $2); print $2; exit }')
    jq -nc --arg model "${model:-unknown}" --arg hv "${hv:-}" --arg cpus "$(nproc --all)" \
        --arg mem "$(meminfo_kib MemTotal)" --arg kernel "$(uname -r)" \
        --arg rev "$(cd "$REPO" && git describe --always --dirty 2>/dev/null || echo unknown)" \
        --arg date "$(date -u '+%Y-%m-%d %H:%M UTC')" \
        --arg openssl "$(openssl version 2>/dev/null)" \
        '{date: $date, cpu_model: $model, cpus: ($cpus | tonumber),
          hypervisor: (if $hv == "" then null else $hv end), mem_total_kib: ($mem | tonumber),
          kernel: $kernel, git: $rev, openssl: $openssl}'
}
