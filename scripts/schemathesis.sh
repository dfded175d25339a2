#!/usr/bin/env bash
# schemathesis (PyPI) against a real `tandem serve` and the gateway's own OpenAPI document (GET /openapi.json), for a
# bounded time. Installs schemathesis into $SCHEMATHESIS_VENV (default ~/.cache/tandem/schemathesis; never the repo)
# when it is missing there, builds the binary when needed (target/debug/tandem, or TANDEM_BIN), starts the server
# on a free loopback port with an API key and a fresh data dir, waits for GET /ready, runs every operation in the
# document with generated valid and invalid inputs, stops the server and exits with schemathesis' status.
#
# Checks: no 5xx, every status, content type, header and body as documented, and invalid inputs refused.
# Bounds: ST_MAX_EXAMPLES inputs per operation and phase (default 100), ST_MAX_TIME_S for the whole run (default
# 300), ST_MAX_MODEL_LEN (default 128: the server's --max-model-len, so that a request without max_tokens, which
# generates to the end of the window, finishes in moments with the built-in model), ST_REQUEST_TIMEOUT_S per request
# on the server (default 60). ST_SEED fixes the inputs. The last lines are schemathesis' summary, with how many test
# cases it generated.
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
SCHEMATHESIS_VENV=${SCHEMATHESIS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem/schemathesis}
ST_MAX_EXAMPLES=${ST_MAX_EXAMPLES:-100}
ST_MAX_TIME_S=${ST_MAX_TIME_S:-300}
ST_REQUEST_TIMEOUT_S=${ST_REQUEST_TIMEOUT_S:-60}
ST_MAX_MODEL_LEN=${ST_MAX_MODEL_LEN:-128}
ST_SEED=${ST_SEED:-12}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-120}
API_KEY="sk-schemathesis-$RANDOM$RANDOM"

if ! "$SCHEMATHESIS_VENV/bin/st" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  echo "schemathesis.sh: installing schemathesis $SCHEMATHESIS_VERSION from PyPI into $SCHEMATHESIS_VENV" >&2
  python3 -m venv "$SCHEMATHESIS_VENV"
  "$SCHEMATHESIS_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
ST="$SCHEMATHESIS_VENV/bin/st"

if [ -n "${TANDEM_BIN:-}" ]; then
  [ -x "$TANDEM_BIN" ] || { echo "schemathesis.sh: TANDEM_BIN=$TANDEM_BIN is not an executable" >&2; exit 1; }
else
  TANDEM_BIN=${CARGO_TARGET_DIR:-target}/debug/tandem
  cargo build --quiet -p tandem
fi

PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
WORK_DIR=$(mktemp -d)
LOG="$WORK_DIR/server.log"
SERVER_PID=
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK_DIR"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "schemathesis.sh: starting $TANDEM_BIN serve on 127.0.0.1:$PORT (log: $LOG)" >&2
NO_COLOR=1 TANDEM_API_KEYS="$API_KEY" "$TANDEM_BIN" serve --host 127.0.0.1 --port "$PORT" \
  --data-dir "$WORK_DIR/data" --request-timeout-s "$ST_REQUEST_TIMEOUT_S" --max-model-len "$ST_MAX_MODEL_LEN" >"$LOG" 2>&1 &
SERVER_PID=$!

ready=0
for _ in $(seq 1 $((READY_TIMEOUT_S * 2))); do
  kill -0 "$SERVER_PID" 2>/dev/null || break
  if python3 -c 'import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200 else 1)
except Exception:
    sys.exit(1)' "http://127.0.0.1:$PORT/ready"; then
    ready=1
    break
  fi
  sleep 0.5
done
if [ "$ready" != 1 ]; then
  echo "schemathesis.sh: the server was not ready within ${READY_TIMEOUT_S} s; its log ends:" >&2
  tail -n 40 "$LOG" >&2
  exit 1
fi

status=0
# schemathesis keeps state in ./.schemathesis: run it from the scratch dir, not the repository.
(cd "$WORK_DIR" && "$ST" run "http://127.0.0.1:$PORT/openapi.json" \
  --header "Authorization: Bearer $API_KEY" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,negative_data_rejection \
  --max-examples "$ST_MAX_EXAMPLES" --max-time "$ST_MAX_TIME_S" --seed "$ST_SEED" \
  --request-timeout $((ST_REQUEST_TIMEOUT_S + 10)) --workers 2 \
  --generation-database none --no-color) || status=$?
if [ "$status" != 0 ]; then
  echo "schemathesis.sh: the server's log ends:" >&2
  tail -n 40 "$LOG" >&2
fi
exit "$status"
