#!/usr/bin/env bash
# Runs the Autobahn TestSuite case files against a WebSocket server, as the fuzzing client,
# with the PyPI package kosoku (a runner of the Autobahn case files; installed into <repo>/.venv
# on first use), writes the Autobahn-format report, prints a per-group summary and fails on
# any FAILED case in groups 1-10.
#
#   scripts/autobahn.sh URL [options]
#
#   URL                 the server under test, e.g. ws://127.0.0.1:8080/echo (it must echo
#                       every message back, text as text and binary as binary)
#   -o, --out DIR       report directory (default: test-artifacts/autobahn); open
#                       DIR/index.html, or read DIR/index.json
#   -i, --include CASE  case id or glob to run, e.g. 1.1.1 or '6.*' (repeatable; default all)
#   -x, --exclude CASE  case id or glob to leave out (repeatable)
#   -p, --parallel N    cases run at once (default 4)
#
# The summary counts each case's behaviour per group: OK, NON-STRICT, INFORMATIONAL,
# UNIMPLEMENTED, FAILED (ERROR, a case that could not run, is counted as FAILED), and in
# CLOSE-FAILED the cases whose closing handshake failed (close behaviour FAILED or UNCLEAN).
#
# Exit status: 0 when no case of groups 1-10 is FAILED or CLOSE-FAILED; 1 otherwise (the
# failing case ids are listed); 2 on a usage error or when the run itself could not happen.
# Groups 12-13 (permessage-deflate) are reported but never fail the run: a server that does
# not negotiate the extension gets UNIMPLEMENTED there, which is allowed.
#
# Environment: PYTHON (interpreter for a new venv, default python3), KOSOKU_VERSION (default
# 0.1.0), VENV (default <repo>/.venv).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
python="${PYTHON:-python3}"
kosoku_version="${KOSOKU_VERSION:-0.1.0}"

usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "autobahn: $*" >&2; exit 2; }

url=""
out="$root/test-artifacts/autobahn"
parallel=4
includes=()
excludes=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        -o|--out) [[ $# -ge 2 ]] || die "$1 needs a directory"; out="$2"; shift 2 ;;
        -i|--include) [[ $# -ge 2 ]] || die "$1 needs a case"; includes+=("$2"); shift 2 ;;
        -x|--exclude) [[ $# -ge 2 ]] || die "$1 needs a case"; excludes+=("$2"); shift 2 ;;
        -p|--parallel) [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 needs a positive number"
            parallel="$2"; shift 2 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [[ -z "$url" ]] || die "one URL only (got '$url' and '$1')"; url="$1"; shift ;;
    esac
done
[[ -n "$url" ]] || { usage >&2; exit 2; }
[[ "$url" =~ ^wss?:// ]] || die "URL must start with ws:// or wss:// (got '$url')"

# The venv is shared with scripts/setup-python.sh: only add kosoku to it.
if ! [[ -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import pip' >/dev/null 2>&1; then
    echo "autobahn: creating venv $venv"
    "$python" -m venv --clear "$venv"
fi
[[ -f "$venv/.gitignore" ]] || echo '*' >"$venv/.gitignore"
have="$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("kosoku"))' 2>/dev/null || true)"
if [[ "$have" != "$kosoku_version" ]]; then
    echo "autobahn: installing kosoku==$kosoku_version into $venv"
    "$venv/bin/python" -m pip install --disable-pip-version-check --quiet "kosoku==$kosoku_version" \
        || die "could not install kosoku==$kosoku_version"
fi

mkdir -p "$out"
export AUTOBAHN_URL="$url" AUTOBAHN_OUT="$out" AUTOBAHN_PARALLEL="$parallel"
export AUTOBAHN_INCLUDE="${includes[*]-}" AUTOBAHN_EXCLUDE="${excludes[*]-}"
exec "$venv/bin/python" - <<'EOF'
import asyncio
import os
import socket
import sys
import textwrap
import time
from collections import Counter, defaultdict
from urllib.parse import urlsplit

from kosoku import FailureError, run_fuzzingclient
from kosoku._report import write_reports

url = os.environ["AUTOBAHN_URL"]
out = os.environ["AUTOBAHN_OUT"]
parallel = int(os.environ["AUTOBAHN_PARALLEL"])
include = os.environ["AUTOBAHN_INCLUDE"].split() or None
exclude = os.environ["AUTOBAHN_EXCLUDE"].split() or None

GROUPS = {
    1: "Framing", 2: "Pings/Pongs", 3: "Reserved Bits", 4: "Opcodes",
    5: "Fragmentation", 6: "UTF-8 Handling", 7: "Close Handling", 8: "Misc",
    9: "Limits/Performance", 10: "Misc", 11: "-", 12: "Compression (payloads)",
    13: "Compression (parameters)",
}
COLUMNS = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED", "CLOSE-FAILED"]
STRICT_GROUPS = range(1, 11)

# Fail fast, and say so, when nothing listens there: otherwise every case ends in ERROR.
target = urlsplit(url)
try:
    port = target.port or (443 if target.scheme == "wss" else 80)
    socket.create_connection((target.hostname, port), timeout=5).close()
except (OSError, ValueError) as e:
    print(f"autobahn: cannot connect to {url}: {e}", file=sys.stderr)
    sys.exit(2)

print(f"autobahn: running the Autobahn cases against {url} ({parallel} at a time)", flush=True)
started = time.monotonic()
try:
    results = asyncio.run(run_fuzzingclient(url, include, exclude, concurrency=parallel))
except FailureError as failure:
    results = failure.results
except Exception as e:  # a connection refused, a bad URL: no verdict at all
    print(f"autobahn: the run could not happen: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(2)
elapsed = time.monotonic() - started
if not results:
    print("autobahn: no case ran (check --include/--exclude)", file=sys.stderr)
    sys.exit(2)
write_reports(results, out)

counts = defaultdict(Counter)
failed = []
for r in results:
    group = int(r.case_id.split(".")[0])
    behavior = r.behavior.value
    if behavior == "ERROR":
        behavior = "FAILED"
    counts[group][behavior] += 1
    close_failed = r.behavior_close.value in ("FAILED", "UNCLEAN")
    if close_failed:
        counts[group]["CLOSE-FAILED"] += 1
    if group in STRICT_GROUPS and (behavior == "FAILED" or close_failed):
        failed.append(r)

def row(label, c):
    return f"{label:<30}" + "".join(f"{c[k]:>{len(k) + 2}}" for k in COLUMNS)

head = f"{'group':<30}" + "".join(f"{k:>{len(k) + 2}}" for k in COLUMNS)
print(head)
print("-" * len(head))
total = Counter()
for group in sorted(counts):
    c = counts[group]
    total.update(c)
    print(row(f"{group:>2} {GROUPS.get(group, '')}", c))
print("-" * len(head))
print(row(f"all ({len(results)} cases)", total))
print(f"autobahn: report in {out}/index.html ({elapsed:.0f} s)")

if failed:
    print(f"autobahn: {len(failed)} case(s) of groups 1-10 failed:")
    by_group = defaultdict(list)
    for r in failed:
        by_group[int(r.case_id.split(".")[0])].append(r.case_id)
    for group, ids in sorted(by_group.items()):
        print(textwrap.fill(" ".join(ids), width=96, initial_indent=f"  group {group} ({len(ids)}): ",
                            subsequent_indent="      "))
    print("  first ones (behaviour/close behaviour: why):")
    for r in failed[:12]:
        why = r.result if r.behavior.value in ("FAILED", "ERROR") else r.result_close
        print(f"  {r.case_id:<8} {r.behavior.value}/{r.behavior_close.value}: {why}")
    sys.exit(1)
print("autobahn: no FAILED case in groups 1-10")
EOF
