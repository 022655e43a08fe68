#!/usr/bin/env bash
# Creates or refreshes the Python environment for tests/python: <repo>/.venv with the
# pinned packages of tests/python/requirements.txt (websockets, pytest, pytest-timeout,
# prometheus_client; trustme and cryptography for the TLS tests). Idempotent: when the venv
# exists and already holds exactly those pins, it checks and returns without touching the
# network.
#
#   scripts/setup-python.sh            create / update as needed
#   scripts/setup-python.sh --force    reinstall the pins even if they look current
#   PYTHON=python3.12 scripts/setup-python.sh   pick the interpreter for a new venv
#
# Then: .venv/bin/pytest tests/python   (see tests/python/README.md)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
req="$root/tests/python/requirements.txt"
stamp="$venv/.relay-requirements.sha256"
python="${PYTHON:-python3}"
force=0

for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "setup-python: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

say() { echo "setup-python: $*"; }

[[ -f "$req" ]] || { echo "setup-python: missing $req" >&2; exit 1; }
want="$(sha256sum "$req" | cut -d' ' -f1)"

# A venv is usable if its interpreter runs (a venv whose base Python moved or was removed
# is not) and it has pip.
if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c 'import pip' >/dev/null 2>&1; then
    say "using existing venv $venv ($("$venv/bin/python" --version 2>&1))"
else
    if [[ -e "$venv" ]]; then
        say "venv at $venv is broken; recreating it"
        "$python" -m venv --clear "$venv"
    else
        say "creating venv $venv with $("$python" --version 2>&1)"
        "$python" -m venv "$venv"
    fi
    rm -f "$stamp"
fi
# Keep the venv out of git even where the repo's .gitignore does not list it.
[[ -f "$venv/.gitignore" ]] || echo '*' >"$venv/.gitignore"

if [[ $force -eq 0 && -f "$stamp" && "$(cat "$stamp")" == "$want" ]] \
    && "$venv/bin/python" -c 'import websockets, pytest, pytest_timeout, prometheus_client, trustme, cryptography' 2>/dev/null; then
    say "requirements already installed ($(basename "$req") unchanged); nothing to do"
else
    say "installing pinned requirements from ${req#"$root"/}"
    "$venv/bin/python" -m pip install --disable-pip-version-check --quiet -r "$req"
    echo "$want" >"$stamp"
    say "installed"
fi

"$venv/bin/python" - <<'EOF'
import importlib.metadata as md
for name in ("websockets", "pytest", "pytest-timeout", "prometheus_client", "trustme",
             "cryptography"):
    print(f"setup-python:   {name}=={md.version(name)}")
EOF
say "run the suite with: .venv/bin/pytest tests/python"
