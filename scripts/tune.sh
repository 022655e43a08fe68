#!/usr/bin/env bash
# scripts/tune.sh: check, apply and revert the relay's sysctl profiles (tuning/*.conf).
#
#   scripts/tune.sh check  PROFILE   current vs profile value of every key; always exits 0
#   scripts/tune.sh apply  PROFILE   (root) save the old value of every key it changes, apply
#   scripts/tune.sh revert PROFILE   (root) restore exactly the saved values, drop the state
#
# PROFILE is a name (edge-1m -> tuning/edge-1m.conf) or a path to a sysctl.d-style file.
# State: $RELAY_TUNE_STATE_DIR/NAME.saved (default /var/lib/relay-tune), NAME = the profile's
# file name without .conf. apply refuses while that file exists, so the saved values are
# always the ones from before the first apply. Profiles can be layered (apply A, apply B);
# revert them in the reverse order.
#
# Profile format (sysctl.d(5)): "key = value" lines; '#' or ';' starts a comment line;
# a leading '-' means "failure to set this key is not an error". A key may use '.' or '/'
# as separator. Keys absent from this kernel (e.g. conntrack without the module) are
# reported and skipped. Globs (net.ipv4.conf.*.x) are not supported.
# Values are compared with whitespace normalised ("4096 16384" == "4096<TAB>16384"); the
# state file stores the raw kernel value, so revert writes back exactly what was read.
# This changes the running kernel only; for persistence install the profile in /etc/sysctl.d.
set -euo pipefail

PROG=${0##*/}
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
PROFILE_DIR=${RELAY_TUNE_PROFILE_DIR:-$(cd -- "$SCRIPT_DIR/.." && pwd)/tuning}
STATE_DIR=${RELAY_TUNE_STATE_DIR:-/var/lib/relay-tune}
SYSCTL_ROOT=/proc/sys

die() { printf '%s: %s\n' "$PROG" "$*" >&2; exit 1; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }

usage() {
    cat >&2 <<EOF
usage: $PROG check|apply|revert PROFILE
  PROFILE: a name from $PROFILE_DIR (e.g. edge-1m) or a path to a .conf file
  state:   \$RELAY_TUNE_STATE_DIR (now: $STATE_DIR)
EOF
    exit 2
}

# Collapse runs of blanks (spaces, tabs, newlines) to one space and trim both ends.
norm() {
    local -a f=()
    read -r -d '' -a f <<<"$1" || true
    local IFS=' '
    printf '%s' "${f[*]}"
}

# Escape a raw value for the one-line-per-key state file; unesc reverses it.
esc() {
    local s=${1//\\/\\\\}
    s=${s//$'\t'/\\t}
    s=${s//$'\n'/\\n}
    printf '%s' "$s"
}
unesc() {
    local s=$1 out='' c i
    for ((i = 0; i < ${#s}; i++)); do
        c=${s:i:1}
        if [[ $c == "\\" && $((i + 1)) -lt ${#s} ]]; then
            i=$((i + 1))
            case ${s:i:1} in
                t) out+=$'\t' ;;
                n) out+=$'\n' ;;
                *) out+=${s:i:1} ;;
            esac
        else
            out+=$c
        fi
    done
    printf '%s' "$out"
}

key_path() {
    local k=$1
    if [[ $k == */* ]]; then
        printf '%s/%s' "$SYSCTL_ROOT" "${k#/}"
    else
        printf '%s/%s' "$SYSCTL_ROOT" "${k//./\/}"
    fi
}

key_exists() { [[ -f $(key_path "$1") ]]; }

# Read a key's raw value into the variable named by $2; fails if unreadable.
read_key() {
    local _p _v
    _p=$(key_path "$1")
    _v=$(cat -- "$_p" 2>/dev/null) || return 1
    printf -v "$2" '%s' "$_v"
}

# Write a value; on failure leave the kernel's error message in WRITE_ERR.
WRITE_ERR=''
write_key() {
    local p
    p=$(key_path "$1")
    if ! WRITE_ERR=$({ printf '%s\n' "$2" >"$p"; } 2>&1); then
        WRITE_ERR=${WRITE_ERR##*: }
        [[ -n $WRITE_ERR ]] || WRITE_ERR='write failed'
        return 1
    fi
    WRITE_ERR=''
}

# ---------------------------------------------------------------------------------------
# Profile parsing -> P_KEYS[i], P_VALS[i], P_OPT[i] (1 = '-' prefixed). Later duplicates win.
P_KEYS=()
P_VALS=()
P_OPT=()
PROFILE_FILE=''
PROFILE_NAME=''

resolve_profile() {
    local arg=$1
    if [[ $arg == */* || $arg == *.conf ]]; then
        PROFILE_FILE=$arg
    else
        PROFILE_FILE=$PROFILE_DIR/$arg.conf
    fi
    [[ -f $PROFILE_FILE ]] || die "no such profile: $arg (looked for $PROFILE_FILE)"
    PROFILE_NAME=${PROFILE_FILE##*/}
    PROFILE_NAME=${PROFILE_NAME%.conf}
    [[ $PROFILE_NAME =~ ^[A-Za-z0-9._-]+$ ]] || die "unusable profile name: $PROFILE_NAME"
}

parse_profile() {
    local line n=0 key val opt i found
    while IFS= read -r line || [[ -n $line ]]; do
        n=$((n + 1))
        line=${line%$'\r'}
        # trim leading/trailing blanks
        line=${line#"${line%%[![:space:]]*}"}
        line=${line%"${line##*[![:space:]]}"}
        [[ -z $line || $line == \#* || $line == \;* ]] && continue
        [[ $line == *=* ]] || die "$PROFILE_FILE:$n: expected 'key = value': $line"
        key=${line%%=*}
        val=${line#*=}
        key=${key%"${key##*[![:space:]]}"}
        val=${val#"${val%%[![:space:]]*}"}
        opt=0
        if [[ $key == -* ]]; then
            opt=1
            key=${key#-}
            key=${key#"${key%%[![:space:]]*}"}
        fi
        [[ $key != *'*'* ]] || die "$PROFILE_FILE:$n: glob keys are not supported: $key"
        [[ $key =~ ^[A-Za-z0-9_./:@+-]+$ ]] || die "$PROFILE_FILE:$n: bad key: '$key'"
        [[ $key != *..* ]] || die "$PROFILE_FILE:$n: bad key: '$key'"
        found=0
        for i in "${!P_KEYS[@]}"; do
            if [[ ${P_KEYS[i]} == "$key" ]]; then
                P_VALS[i]=$val
                P_OPT[i]=$opt
                found=1
            fi
        done
        if ((found == 0)); then
            P_KEYS+=("$key")
            P_VALS+=("$val")
            P_OPT+=("$opt")
        fi
    done <"$PROFILE_FILE"
    ((${#P_KEYS[@]} > 0)) || die "$PROFILE_FILE: no keys"
}

state_file() { printf '%s/%s.saved' "$STATE_DIR" "$PROFILE_NAME"; }

need_root() {
    if [[ $(id -u) -ne 0 ]]; then
        die "'$1' changes kernel settings in $SYSCTL_ROOT and must run as root; nothing was changed (try: sudo $0 $1 $PROFILE_NAME)"
    fi
}

LOCK_FD=''
take_lock() {
    # Only a directory we create gets mode 0700; an existing one is left as it is.
    if [[ ! -d $STATE_DIR ]]; then
        mkdir -p -- "$(dirname -- "$STATE_DIR")"
        mkdir -m 0700 -- "$STATE_DIR" || die "cannot create state directory $STATE_DIR"
    fi
    exec {LOCK_FD}>"$STATE_DIR/.lock"
    if command -v flock >/dev/null 2>&1; then
        flock -n "$LOCK_FD" || die "another $PROG is running (lock $STATE_DIR/.lock)"
    fi
}

# ---------------------------------------------------------------------------------------
cmd_check() {
    local i key want cur status n_ok=0 n_diff=0 n_absent=0 n_unread=0 sf
    printf 'profile %s (%s), %d keys\n' "$PROFILE_NAME" "$PROFILE_FILE" "${#P_KEYS[@]}"
    sf=$(state_file)
    if [[ -f $sf ]]; then
        printf 'state: applied, old values saved in %s\n' "$sf"
    else
        printf 'state: not applied via %s (no %s)\n' "$PROG" "$sf"
    fi
    printf '%-6s %-40s %-28s %s\n' STATUS KEY CURRENT PROFILE
    for i in "${!P_KEYS[@]}"; do
        key=${P_KEYS[i]}
        want=$(norm "${P_VALS[i]}")
        if ! key_exists "$key"; then
            printf '%-6s %-40s %-28s %s\n' absent "$key" '-' "$want  (key not on this kernel: skipped)"
            n_absent=$((n_absent + 1))
            continue
        fi
        if ! read_key "$key" cur; then
            printf '%-6s %-40s %-28s %s\n' unread "$key" '?' "$want  (cannot read: skipped)"
            n_unread=$((n_unread + 1))
            continue
        fi
        cur=$(norm "$cur")
        if [[ $cur == "$want" ]]; then
            status=ok
            n_ok=$((n_ok + 1))
        else
            status=DIFF
            n_diff=$((n_diff + 1))
            ((P_OPT[i] == 0)) || want+='  (optional: "-" key)'
        fi
        printf '%-6s %-40s %-28s %s\n' "$status" "$key" "$cur" "$want"
    done
    printf 'summary: %d keys: %d match, %d differ, %d absent, %d unreadable\n' \
        "${#P_KEYS[@]}" "$n_ok" "$n_diff" "$n_absent" "$n_unread"
}

# Planned changes, in profile order.
C_KEYS=()
C_OLD=()
C_NEW=()
C_OPT=()
APPLY_DONE=0
APPLY_WRITTEN=0
APPLY_SF=''

write_state() {
    local sf=$1 tmp i
    tmp=$sf.tmp.$$
    {
        printf '# relay-tune state: profile=%s file=%s applied=%s\n' \
            "$PROFILE_NAME" "$PROFILE_FILE" "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        printf '# one line per changed key: key<TAB>old raw value<TAB>applied value (\\t \\n \\\\ escaped)\n'
        for i in "${!C_KEYS[@]}"; do
            printf '%s\t%s\t%s\n' "${C_KEYS[i]}" "$(esc "${C_OLD[i]}")" "$(esc "${C_NEW[i]}")"
        done
    } >"$tmp"
    mv -f -- "$tmp" "$sf"
}

# Undo the first APPLY_WRITTEN changes (newest first) after a failed or interrupted apply.
rollback_apply() {
    local i
    for ((i = APPLY_WRITTEN - 1; i >= 0; i--)); do
        if write_key "${C_KEYS[i]}" "${C_OLD[i]}"; then
            printf 'rolled back %s\n' "${C_KEYS[i]}" >&2
        else
            warn "could not roll back ${C_KEYS[i]}: $WRITE_ERR (saved value kept in $APPLY_SF)"
            return 1
        fi
    done
    rm -f -- "$APPLY_SF"
}

on_apply_exit() {
    local rc=$?
    if ((APPLY_DONE == 0)) && [[ -n $APPLY_SF ]]; then
        warn "apply did not complete; rolling back"
        rollback_apply || true
        ((rc != 0)) || rc=1
    fi
    exit "$rc"
}

cmd_apply() {
    need_root apply
    local sf i key want cur n_skip=0 n_same=0 n_fail_opt=0
    sf=$(state_file)
    take_lock
    [[ ! -e $sf ]] || die "profile $PROFILE_NAME is already applied: $sf holds the values from before; run '$PROG revert $PROFILE_NAME' first (or delete that file if the box has rebooted since)"

    for i in "${!P_KEYS[@]}"; do
        key=${P_KEYS[i]}
        want=$(norm "${P_VALS[i]}")
        if ! key_exists "$key"; then
            printf 'skip   %-40s key not on this kernel\n' "$key"
            n_skip=$((n_skip + 1))
            continue
        fi
        if ! read_key "$key" cur; then
            ((P_OPT[i] == 1)) || die "cannot read $key; nothing was changed"
            printf 'skip   %-40s cannot read it\n' "$key"
            n_skip=$((n_skip + 1))
            continue
        fi
        if [[ $(norm "$cur") == "$want" ]]; then
            n_same=$((n_same + 1))
            continue
        fi
        C_KEYS+=("$key")
        C_OLD+=("$cur")
        C_NEW+=("$want")
        C_OPT+=("${P_OPT[i]}")
    done

    # Save before touching anything: if we are killed half-way, revert still works.
    APPLY_SF=$sf
    trap on_apply_exit EXIT
    trap 'exit 130' INT TERM HUP
    write_state "$sf"

    local -a dropped=()
    for i in "${!C_KEYS[@]}"; do
        key=${C_KEYS[i]}
        if ! write_key "$key" "${C_NEW[i]}"; then
            if ((C_OPT[i] == 1)); then
                printf 'skip   %-40s kernel refused %s (%s); optional key\n' "$key" "${C_NEW[i]}" "$WRITE_ERR"
                dropped+=("$i")
                n_fail_opt=$((n_fail_opt + 1))
                APPLY_WRITTEN=$((i + 1))
                continue
            fi
            warn "setting $key = ${C_NEW[i]} failed: $WRITE_ERR"
            APPLY_WRITTEN=$i
            exit 1
        fi
        APPLY_WRITTEN=$((i + 1))
        if read_key "$key" cur && [[ $(norm "$cur") != "${C_NEW[i]}" ]]; then
            warn "$key: wrote '${C_NEW[i]}' but the kernel reports '$(norm "$cur")'"
        fi
        printf 'set    %-40s %s -> %s\n' "$key" "$(norm "${C_OLD[i]}")" "${C_NEW[i]}"
    done

    # Drop optional keys the kernel refused: they were not changed, nothing to restore.
    if ((${#dropped[@]} > 0)); then
        local -a k=() o=() nv=() p=()
        local d keep
        for i in "${!C_KEYS[@]}"; do
            keep=1
            for d in "${dropped[@]}"; do
                if [[ $d == "$i" ]]; then keep=0; fi
            done
            if ((keep)); then
                k+=("${C_KEYS[i]}"); o+=("${C_OLD[i]}"); nv+=("${C_NEW[i]}"); p+=("${C_OPT[i]}")
            fi
        done
        C_KEYS=("${k[@]+"${k[@]}"}"); C_OLD=("${o[@]+"${o[@]}"}")
        C_NEW=("${nv[@]+"${nv[@]}"}"); C_OPT=("${p[@]+"${p[@]}"}")
        write_state "$sf"
    fi
    APPLY_DONE=1
    trap - EXIT INT TERM HUP
    printf 'applied %s: %d changed, %d already set, %d skipped (absent), %d optional refused; old values in %s\n' \
        "$PROFILE_NAME" "${#C_KEYS[@]}" "$n_same" "$n_skip" "$n_fail_opt" "$sf"
}

cmd_revert() {
    need_root revert
    local sf line key old new rest cur n=0 failed=0 i
    local -a keys=() olds=() news=()
    sf=$(state_file)
    take_lock
    [[ -f $sf ]] || die "nothing to revert for $PROFILE_NAME: no state file $sf (was it applied with $PROG, or already reverted?)"
    while IFS= read -r line || [[ -n $line ]]; do
        [[ -z $line || $line == \#* ]] && continue
        [[ $line == *$'\t'*$'\t'* ]] || die "$sf: malformed line: $line"
        key=${line%%$'\t'*}
        rest=${line#*$'\t'}
        old=${rest%%$'\t'*}
        new=${rest#*$'\t'}
        keys+=("$key")
        olds+=("$(unesc "$old")")
        news+=("$(unesc "$new")")
    done <"$sf"

    # Newest first, mirroring apply.
    for ((i = ${#keys[@]} - 1; i >= 0; i--)); do
        key=${keys[i]}
        if ! key_exists "$key"; then
            warn "$key no longer exists (module unloaded?); cannot restore '$(norm "${olds[i]}")'"
            failed=$((failed + 1))
            continue
        fi
        if read_key "$key" cur && [[ $(norm "$cur") != "$(norm "${news[i]}")" ]]; then
            warn "$key was changed since apply (now '$(norm "$cur")', applied '$(norm "${news[i]}")'); restoring the saved value anyway"
        fi
        if ! write_key "$key" "${olds[i]}"; then
            warn "restoring $key = '$(norm "${olds[i]}")' failed: $WRITE_ERR"
            failed=$((failed + 1))
            continue
        fi
        if ! read_key "$key" cur || [[ $(norm "$cur") != "$(norm "${olds[i]}")" ]]; then
            warn "$key: restored '$(norm "${olds[i]}")' but the kernel reports '$(norm "${cur:-?}")'"
            failed=$((failed + 1))
            continue
        fi
        printf 'restore %-40s %s\n' "$key" "$(norm "${olds[i]}")"
        n=$((n + 1))
    done
    if ((failed > 0)); then
        die "revert of $PROFILE_NAME incomplete: $failed key(s) not restored; state kept in $sf"
    fi
    rm -f -- "$sf"
    printf 'reverted %s: %d key(s) restored; removed %s\n' "$PROFILE_NAME" "$n" "$sf"
}

main() {
    (($# == 2)) || usage
    local cmd=$1
    case $cmd in
        check | apply | revert) ;;
        -h | --help | help) usage ;;
        *) usage ;;
    esac
    resolve_profile "$2"
    parse_profile
    "cmd_$cmd"
}

main "$@"
