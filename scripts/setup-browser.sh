#!/usr/bin/env bash
# Installs what tests/browser needs: Debian's headless-capable Chromium. Idempotent: when a
# working chromium is already on PATH (or $CHROMIUM points at one) it prints its version and
# returns without touching the network.
#
#   scripts/setup-browser.sh           install chromium if missing (needs root and apt)
#   CHROMIUM=/path/to/chrome scripts/setup-browser.sh   check that binary instead
#
# Then: .venv/bin/python -m pytest tests/browser   (see tests/browser/README.md)
set -euo pipefail

say() { echo "setup-browser: $*"; }

find_chromium() {
    if [[ -n "${CHROMIUM:-}" ]]; then
        [[ -x "$CHROMIUM" ]] && { echo "$CHROMIUM"; return 0; }
        return 1
    fi
    local c
    for c in chromium chromium-browser; do
        if command -v "$c" >/dev/null 2>&1; then
            command -v "$c"
            return 0
        fi
    done
    return 1
}

for arg in "$@"; do
    case "$arg" in
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "setup-browser: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

if bin="$(find_chromium)" && "$bin" --version >/dev/null 2>&1; then
    say "using $bin ($("$bin" --version 2>/dev/null))"
    exit 0
fi
if [[ -n "${CHROMIUM:-}" ]]; then
    echo "setup-browser: CHROMIUM=$CHROMIUM is not a working executable" >&2
    exit 1
fi

command -v apt-get >/dev/null 2>&1 || {
    echo "setup-browser: chromium is missing and apt-get is not available; install Chromium" \
        "and set CHROMIUM=/path/to/it" >&2
    exit 1
}
sudo=""
if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null 2>&1 || {
        echo "setup-browser: chromium is missing; run as root (or with sudo) to install it" >&2
        exit 1
    }
    sudo="sudo"
fi

say "installing Debian package chromium"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null

bin="$(find_chromium)" || { echo "setup-browser: chromium still not on PATH after install" >&2; exit 1; }
say "installed $bin ($("$bin" --version 2>/dev/null))"
