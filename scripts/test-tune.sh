#!/usr/bin/env bash
# scripts/test-tune.sh: end-to-end test of scripts/tune.sh against the running kernel.
#
#   sudo scripts/test-tune.sh
#
# Snapshots every key of tuning/edge-1m.conf, runs `tune.sh check/apply/revert edge-1m`,
# verifies the applied values equal the profile and the reverted values equal the snapshot
# byte for byte; then round-trips a path profile with tab-separated values and absent keys,
# and checks that a failing apply rolls itself back. Output is TAP-like; the last line is
# "N passed, M failed"; the exit status is non-zero if anything failed.
#
# Safe for CI as root: state goes to a private temp dir (RELAY_TUNE_STATE_DIR), and an EXIT
# trap reverts any applied profile and then writes back every snapshotted value that still
# differs, also when the test fails or is interrupted. While it runs (a few seconds) the
# box really has the edge-1m values, so do not run it next to a benchmark.
# Without root only the read-only part runs (check, and apply being refused).
set -euo pipefail

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd -- "$HERE/.." && pwd)
TUNE=$HERE/tune.sh
PROFILE=edge-1m
CONF=$ROOT/tuning/$PROFILE.conf
SYSCTL_ROOT=/proc/sys

WORK=$(mktemp -d "${TMPDIR:-/tmp}/relay-test-tune.XXXXXX")
export RELAY_TUNE_STATE_DIR=$WORK/state
unset RELAY_TUNE_PROFILE_DIR

N=0
PASSED=0
FAILED=0
SKIPPED=0
SUMMARY_DONE=0

ok() { N=$((N + 1)); PASSED=$((PASSED + 1)); printf 'ok %d - %s\n' "$N" "$*"; }
not_ok() { N=$((N + 1)); FAILED=$((FAILED + 1)); printf 'not ok %d - %s\n' "$N" "$*"; }
skip() { N=$((N + 1)); PASSED=$((PASSED + 1)); SKIPPED=$((SKIPPED + 1)); printf 'ok %d - %s # SKIP %s\n' "$N" "$1" "$2"; }
expect() { # expect DESCRIPTION COMMAND...: passes when the command succeeds
    local desc=$1
    shift
    if "$@"; then ok "$desc"; else not_ok "$desc"; fi
}
diag() { sed 's/^/#   /' "$@"; }

norm() {
    local -a f=()
    read -r -d '' -a f <<<"$1" || true
    local IFS=' '
    printf '%s' "${f[*]}"
}
key_path() {
    if [[ $1 == */* ]]; then printf '%s/%s' "$SYSCTL_ROOT" "${1#/}"; else printf '%s/%s' "$SYSCTL_ROOT" "${1//./\/}"; fi
}
read_raw() { cat -- "$(key_path "$1")"; }

# Parse a profile independently of tune.sh: fills K_KEYS, K_VALS (normalised), K_OPT.
K_KEYS=()
K_VALS=()
K_OPT=()
parse_profile() {
    local line key val
    K_KEYS=()
    K_VALS=()
    K_OPT=()
    while IFS= read -r line || [[ -n $line ]]; do
        line=$(norm "$line")
        [[ -z $line || $line == \#* || $line == \;* ]] && continue
        key=$(norm "${line%%=*}")
        val=$(norm "${line#*=}")
        if [[ $key == -* ]]; then
            K_OPT+=(1)
            key=$(norm "${key#-}")
        else
            K_OPT+=(0)
        fi
        K_KEYS+=("$key")
        K_VALS+=("$val")
    done <"$1"
}

# Snapshot of raw values, taken before anything is applied.
declare -A SNAP=()
snapshot_keys() {
    local k
    for k in "$@"; do
        [[ -n ${SNAP[$k]+x} ]] && continue
        if [[ -f $(key_path "$k") ]]; then SNAP[$k]=$(read_raw "$k"); fi
    done
}

# Revert anything still applied, then force every snapshotted key back. Prints how many
# keys needed a direct write (0 = tune.sh restored everything by itself).
safety_restore() {
    local f name k cur fixed=0
    for f in "$RELAY_TUNE_STATE_DIR"/*.saved; do
        [[ -f $f ]] || continue
        name=${f##*/}
        name=${name%.saved}
        echo "# cleanup: state file $f left behind; running tune.sh revert"
        if [[ -f $ROOT/tuning/$name.conf ]]; then
            "$TUNE" revert "$name" 2>&1 | diag || true
        elif [[ -f $WORK/$name.conf ]]; then
            "$TUNE" revert "$WORK/$name.conf" 2>&1 | diag || true
        fi
    done
    if ((EUID == 0)); then
        for k in "${!SNAP[@]}"; do
            cur=$(read_raw "$k" 2>/dev/null) || continue
            if [[ $cur != "${SNAP[$k]}" ]]; then
                echo "# cleanup: $k is '$(norm "$cur")', writing back '$(norm "${SNAP[$k]}")'"
                printf '%s\n' "${SNAP[$k]}" >"$(key_path "$k")" || echo "# cleanup: FAILED to restore $k"
                fixed=$((fixed + 1))
            fi
        done
    fi
    SAFETY_FIXED=$fixed
}
SAFETY_FIXED=0

summary() {
    ((SKIPPED == 0)) || echo "# $SKIPPED of the passed tests were skipped"
    printf '1..%d\n' "$N"
    printf '%d passed, %d failed\n' "$PASSED" "$FAILED"
    SUMMARY_DONE=1
}

# shellcheck disable=SC2317 # reached through the EXIT trap
on_exit() {
    local rc=$?
    trap - EXIT
    if ((SUMMARY_DONE == 0)); then
        echo "# test aborted (exit status $rc); restoring"
        safety_restore
        not_ok "test ran to completion (aborted; $SAFETY_FIXED key(s) restored directly)"
        summary
        rc=1
    fi
    rm -rf -- "$WORK"
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT TERM HUP

# ---------------------------------------------------------------------------------------
echo "# tune.sh end-to-end test on $(uname -sr), profile $CONF"
parse_profile "$CONF"
EDGE_KEYS=("${K_KEYS[@]}")
EDGE_VALS=("${K_VALS[@]}")
EDGE_OPT=("${K_OPT[@]}")
snapshot_keys "${EDGE_KEYS[@]}"
echo "# ${#EDGE_KEYS[@]} keys in $PROFILE, ${#SNAP[@]} present on this kernel; snapshot taken"

# 1. check
rc=0
"$TUNE" check "$PROFILE" >"$WORK/check1.out" 2>&1 || rc=$?
if ((rc == 0)); then ok "check $PROFILE exits 0"; else not_ok "check $PROFILE exits 0 (got $rc)"; diag "$WORK/check1.out"; fi

# check reports every key, with the status /proc/sys implies
bad=0
for i in "${!EDGE_KEYS[@]}"; do
    k=${EDGE_KEYS[i]}
    line=$(grep -E "^[A-Za-z]+ +${k//./\\.} " "$WORK/check1.out" || true)
    if [[ -z ${SNAP[$k]+x} ]]; then
        want_status=absent
    elif [[ $(norm "${SNAP[$k]}") == "${EDGE_VALS[i]}" ]]; then
        want_status=ok
    else
        want_status=DIFF
    fi
    if [[ ${line%% *} != "$want_status" ]]; then
        echo "# check line for $k: '${line}' (expected status $want_status)"
        bad=$((bad + 1))
    fi
done
expect "check lists all ${#EDGE_KEYS[@]} keys with the right ok/DIFF/absent status" test "$bad" -eq 0

# 2. apply is refused without root, and changes nothing
# shellcheck disable=SC2317 # called through expect
unchanged_since_snapshot() {
    local k
    for k in "${!SNAP[@]}"; do
        [[ $(read_raw "$k") == "${SNAP[$k]}" ]] || { echo "# $k changed: $(norm "$(read_raw "$k")")"; return 1; }
    done
}
if ((EUID == 0)); then
    if command -v setpriv >/dev/null && getent passwd nobody >/dev/null; then
        rc=0
        setpriv --reuid=nobody --regid="$(id -g nobody)" --clear-groups \
            env RELAY_TUNE_STATE_DIR="$WORK/state-nobody" "$TUNE" apply "$PROFILE" >"$WORK/nonroot.out" 2>&1 || rc=$?
        if ((rc != 0)) && grep -q 'must run as root' "$WORK/nonroot.out"; then
            ok "apply as non-root (nobody) is refused with a clear message (exit $rc)"
        else
            not_ok "apply as non-root (nobody) is refused with a clear message (exit $rc)"
            diag "$WORK/nonroot.out"
        fi
        expect "refused apply changed nothing" unchanged_since_snapshot
    else
        skip "apply as non-root is refused" "setpriv or user nobody missing"
    fi
else
    rc=0
    "$TUNE" apply "$PROFILE" >"$WORK/nonroot.out" 2>&1 || rc=$?
    if ((rc != 0)) && grep -q 'must run as root' "$WORK/nonroot.out"; then
        ok "apply as non-root is refused with a clear message (exit $rc)"
    else
        not_ok "apply as non-root is refused with a clear message (exit $rc)"
        diag "$WORK/nonroot.out"
    fi
    expect "refused apply changed nothing" unchanged_since_snapshot
    skip "apply/revert round trip" "needs root"
    summary
    exit $((FAILED > 0))
fi

# 3. apply
SF=$RELAY_TUNE_STATE_DIR/$PROFILE.saved
rc=0
"$TUNE" apply "$PROFILE" >"$WORK/apply.out" 2>&1 || rc=$?
diag "$WORK/apply.out"
expect "apply $PROFILE exits 0 (got $rc)" test "$rc" -eq 0
expect "apply wrote the state file $SF" test -s "$SF"

for i in "${!EDGE_KEYS[@]}"; do
    k=${EDGE_KEYS[i]}
    want=${EDGE_VALS[i]}
    if [[ -z ${SNAP[$k]+x} ]]; then
        skip "after apply: $k" "not on this kernel"
        continue
    fi
    cur=$(norm "$(read_raw "$k")")
    if [[ $cur == "$want" ]]; then
        ok "after apply: $k = $want"
    elif ((EDGE_OPT[i] == 1)) && [[ $cur == "$(norm "${SNAP[$k]}")" ]]; then
        skip "after apply: $k = $want" "optional key, kernel refused it (still $cur)"
    else
        not_ok "after apply: $k = $want (is $cur)"
    fi
done

rc=0
"$TUNE" check "$PROFILE" >"$WORK/check2.out" 2>&1 || rc=$?
ndiff=$(grep -E '^DIFF ' "$WORK/check2.out" | grep -vc 'optional' || true)
if ((rc == 0 && ndiff == 0)); then
    ok "check after apply: exit 0, no mandatory key differs"
else
    not_ok "check after apply: exit 0, no mandatory key differs (exit $rc, $ndiff differ)"
    diag "$WORK/check2.out"
fi

cp -- "$SF" "$WORK/saved.copy"
rc=0
"$TUNE" apply "$PROFILE" >"$WORK/apply2.out" 2>&1 || rc=$?
if ((rc != 0)) && grep -q 'already applied' "$WORK/apply2.out" && cmp -s "$SF" "$WORK/saved.copy"; then
    ok "second apply is refused and keeps the saved values"
else
    not_ok "second apply is refused and keeps the saved values (exit $rc)"
    diag "$WORK/apply2.out"
fi

# 4. revert
rc=0
"$TUNE" revert "$PROFILE" >"$WORK/revert.out" 2>&1 || rc=$?
diag "$WORK/revert.out"
expect "revert $PROFILE exits 0 (got $rc)" test "$rc" -eq 0
expect "revert removed the state file" test ! -e "$SF"
for k in "${EDGE_KEYS[@]}"; do
    [[ -n ${SNAP[$k]+x} ]] || continue
    cur=$(read_raw "$k")
    if [[ $cur == "${SNAP[$k]}" ]]; then
        ok "after revert: $k exactly as before ($(norm "$cur"))"
    else
        not_ok "after revert: $k exactly as before (was '$(norm "${SNAP[$k]}")', is '$(norm "$cur")')"
    fi
done
rc=0
"$TUNE" revert "$PROFILE" >"$WORK/revert2.out" 2>&1 || rc=$?
if ((rc != 0)) && grep -q 'nothing to revert' "$WORK/revert2.out"; then
    ok "revert without a state file fails with a clear message"
else
    not_ok "revert without a state file fails with a clear message (exit $rc)"
    diag "$WORK/revert2.out"
fi

# 5. a path profile: tabs and odd spacing in values, '/' keys, absent keys (plain and '-')
RT=$WORK/roundtrip.conf
{
    echo '# round-trip test profile'
    printf 'net.ipv4.tcp_rmem =\t4096\t65536\t8388608\t\n'
    printf '   net.ipv4.ip_local_port_range   =   20000  \t  60001   \n'
    printf 'net/core/somaxconn = 8192\n'
    printf '; another comment style\n'
    printf -- '-net.netfilter.relay_tune_test_no_such_key = 1\n'
    printf 'net.ipv4.relay_tune_test_no_such_key = 1\n'
} >"$RT"
snapshot_keys net.ipv4.tcp_rmem net.ipv4.ip_local_port_range net.core.somaxconn
rc=0
"$TUNE" apply "$RT" >"$WORK/rt-apply.out" 2>&1 || rc=$?
diag "$WORK/rt-apply.out"
expect "apply PATH with tab-separated values and absent keys exits 0 (got $rc)" test "$rc" -eq 0
expect "absent keys were reported as skipped" test "$(grep -c 'relay_tune_test_no_such_key.*not on this kernel' "$WORK/rt-apply.out")" -eq 2
expect "tcp_rmem applied from a tab-separated value" test "$(norm "$(read_raw net.ipv4.tcp_rmem)")" = "4096 65536 8388608"
expect "ip_local_port_range applied from a padded value" test "$(norm "$(read_raw net.ipv4.ip_local_port_range)")" = "20000 60001"
expect "slash-form key net/core/somaxconn applied" test "$(read_raw net.core.somaxconn)" = 8192
rc=0
"$TUNE" revert "$RT" >"$WORK/rt-revert.out" 2>&1 || rc=$?
expect "revert PATH exits 0 (got $rc)" test "$rc" -eq 0
for k in net.ipv4.tcp_rmem net.ipv4.ip_local_port_range net.core.somaxconn; do
    expect "after path revert: $k exactly as before" test "$(read_raw "$k")" = "${SNAP[$k]}"
done

# 6. a failing apply rolls back what it had already changed
RB=$WORK/rollback.conf
printf 'net.ipv4.tcp_fin_timeout = 17\nnet.core.somaxconn = not-a-number\n' >"$RB"
snapshot_keys net.ipv4.tcp_fin_timeout
rc=0
"$TUNE" apply "$RB" >"$WORK/rb.out" 2>&1 || rc=$?
diag "$WORK/rb.out"
expect "apply with a value the kernel rejects fails (exit $rc)" test "$rc" -ne 0
expect "failed apply rolled back tcp_fin_timeout" test "$(read_raw net.ipv4.tcp_fin_timeout)" = "${SNAP[net.ipv4.tcp_fin_timeout]}"
expect "failed apply left no state file" test ! -e "$RELAY_TUNE_STATE_DIR/rollback.saved"

# 7. nothing needed the safety net
safety_restore
expect "every snapshotted key is back to its original value without help" test "$SAFETY_FIXED" -eq 0

summary
exit $((FAILED > 0))
