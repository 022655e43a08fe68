#!/usr/bin/env bash
# The whole test suite, exactly what CI runs (.ci/run calls this).
# Sets up what the tests need on a fresh machine (Python venv with websockets/pytest),
# then: format and lint checks, Rust unit + end-to-end tests, Python end-to-end tests, the
# Autobahn TestSuite against the echo app, browser tests, the tuning round-trip test (needs
# root; skipped with a note otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "format (cargo fmt --check)"
cargo fmt --all -- --check

step "lint (cargo clippy -D warnings)"
cargo clippy --workspace --all-targets -- -D warnings

step "build"
cargo build --workspace --all-targets

step "Rust tests (unit + end-to-end over loopback)"
cargo test --workspace -- --test-threads="${RELAY_TEST_THREADS:-4}"

step "Rust end-to-end tests again on the splice and auto data paths"
RELAY_TEST_DATA_PATH=splice cargo test -p relay --test e2e -- --test-threads="${RELAY_TEST_THREADS:-4}"
RELAY_TEST_DATA_PATH=auto cargo test -p relay --test e2e -- --test-threads="${RELAY_TEST_THREADS:-4}"

if [ -d tests/python ]; then
    step "Python environment"
    scripts/setup-python.sh
    step "Python end-to-end tests (websockets client)"
    RELAY_BIN="$PWD/target/debug/relay" RELAY_BENCH_BIN="$PWD/target/debug/relay-bench" \
        .venv/bin/python -m pytest tests/python -q
fi

step "Autobahn TestSuite against relay's echo app (all groups; fails on a FAILED case in 1-10)"
RELAY_BIN="$PWD/target/debug/relay" scripts/test-autobahn.sh

if [ -d tests/browser ]; then
    step "Browser tests (headless Chromium: the admin dashboard)"
    scripts/setup-browser.sh
    RELAY_BIN="$PWD/target/debug/relay" RELAY_BENCH_BIN="$PWD/target/debug/relay-bench" \
        .venv/bin/python -m pytest tests/browser -q
fi

step "tuning profile round trip"
if [ "$(id -u)" = 0 ]; then
    scripts/test-tune.sh
else
    echo "skipped: scripts/test-tune.sh applies sysctls and needs root"
fi
