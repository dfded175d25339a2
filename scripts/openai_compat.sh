#!/usr/bin/env bash
# CI: the official `openai` Python package against a real `tandem serve`. Installs `openai` from PyPI into ./.venv
# when it is missing there, builds the binary when needed (target/debug/tandem, or TANDEM_BIN), starts the server on
# a free loopback port with a fresh data dir, waits for GET /ready, runs scripts/openai_compat.py, stops the server
# with SIGINT and exits with the script's status. The last line reads `openai compat: N passed, M failed`.
set -euo pipefail
cd "$(dirname "$0")/.."

READY_TIMEOUT_S=${READY_TIMEOUT_S:-120}

# Python with the openai package: ./.venv as a venv, or (no venv module) a plain --target folder on PYTHONPATH.
if [ -x .venv/bin/python ] && .venv/bin/python -c 'import openai' 2>/dev/null; then
  PYTHON=.venv/bin/python
elif [ ! -x .venv/bin/python ] && [ -d .venv/openai ] && PYTHONPATH="$PWD/.venv" python3 -c 'import openai' 2>/dev/null; then
  PYTHON=python3
  export PYTHONPATH="$PWD/.venv${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "openai_compat.sh: installing the openai package from PyPI into .venv" >&2
  if [ -x .venv/bin/python ] || python3 -m venv .venv 2>/dev/null; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check openai
    PYTHON=.venv/bin/python
  else
    # No venv module (Debian without python3-venv): a plain target folder works too.
    python3 -m pip install --quiet --disable-pip-version-check --target .venv openai
    PYTHON=python3
    export PYTHONPATH="$PWD/.venv${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PYTHON" -c 'import openai' || { echo "openai_compat.sh: could not install the openai package" >&2; exit 1; }
fi
echo "openai_compat.sh: using $PYTHON with openai $("$PYTHON" -c 'import openai; print(openai.__version__)')" >&2

if [ -n "${TANDEM_BIN:-}" ]; then
  [ -x "$TANDEM_BIN" ] || { echo "openai_compat.sh: TANDEM_BIN=$TANDEM_BIN is not an executable" >&2; exit 1; }
else
  TANDEM_BIN=target/debug/tandem
  # cargo does nothing when the binary is up to date (CI has built it with the tests).
  cargo build --quiet -p tandem
fi

PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
DATA_DIR=$(mktemp -d)
LOG="$DATA_DIR/server.log"
SERVER_PID=
SERVER_READY=0
wait_gone() { # $1: tenths of a second
  for _ in $(seq 1 "$1"); do
    kill -0 "$SERVER_PID" 2>/dev/null || return 0
    sleep 0.1
  done
  ! kill -0 "$SERVER_PID" 2>/dev/null
}
stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    # SIGINT is ignored in a background job of a script until tandem installs its handler: before it is ready,
    # SIGTERM (not ignored) stops it instead. A clean shutdown takes moments.
    if [ "$SERVER_READY" = 1 ]; then kill -INT "$SERVER_PID" 2>/dev/null || true; else kill -TERM "$SERVER_PID" 2>/dev/null || true; fi
    if ! wait_gone 200; then
      echo "openai_compat.sh: the server did not stop within 20 s; sending SIGTERM" >&2
      kill -TERM "$SERVER_PID" 2>/dev/null || true
      if ! wait_gone 100; then
        echo "openai_compat.sh: the server did not stop on SIGTERM within 10 s; killing it" >&2
        kill -KILL "$SERVER_PID" 2>/dev/null || true
      fi
    fi
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=
}
cleanup() {
  stop_server
  rm -rf "$DATA_DIR"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "openai_compat.sh: starting $TANDEM_BIN serve on 127.0.0.1:$PORT (log: $LOG)" >&2
NO_COLOR=1 "$TANDEM_BIN" serve --host 127.0.0.1 --port "$PORT" --data-dir "$DATA_DIR/data" >"$LOG" 2>&1 &
SERVER_PID=$!

ready=0
deadline=$((SECONDS + READY_TIMEOUT_S))
while [ "$SECONDS" -lt "$deadline" ]; do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "openai_compat.sh: the server exited before it was ready; its log ends:" >&2
    tail -n 40 "$LOG" >&2
    echo "openai compat: 0 passed, 1 failed"
    exit 1
  fi
  if "$PYTHON" -c 'import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200 else 1)
except Exception:
    sys.exit(1)' "http://127.0.0.1:$PORT/ready"; then
    ready=1
    SERVER_READY=1
    break
  fi
  sleep 0.5
done
if [ "$ready" != 1 ]; then
  echo "openai_compat.sh: GET /ready was not 200 within ${READY_TIMEOUT_S} s; the server's log ends:" >&2
  tail -n 40 "$LOG" >&2
  echo "openai compat: 0 passed, 1 failed"
  exit 1
fi

status=0
# pipefail: the status is the script's (tee succeeds).
"$PYTHON" scripts/openai_compat.py "http://127.0.0.1:$PORT/v1" | tee "$DATA_DIR/checks.log" || status=$?
stop_server
if [ "$status" != 0 ]; then
  echo "openai_compat.sh: the server's log ends:" >&2
  tail -n 40 "$LOG" >&2
fi
summary=$(sed -n 's/^openai_compat\.py: \([0-9]* passed, [0-9]* failed\)$/openai compat: \1/p' "$DATA_DIR/checks.log" | tail -n 1)
if [ -z "$summary" ]; then
  # The script died before its summary: count what it printed, plus one failure for the crash.
  summary="openai compat: $(grep -c '^PASS: ' "$DATA_DIR/checks.log" || true) passed, $(($(grep -c '^FAIL: ' "$DATA_DIR/checks.log" || true) + 1)) failed"
  [ "$status" != 0 ] || status=1
fi
echo "$summary"
exit "$status"
