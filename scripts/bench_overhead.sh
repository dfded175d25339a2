#!/usr/bin/env bash
# The control-plane overhead of tandem, one workload through each setup in turn, on this machine:
#   direct                  the decode worker's engine loop in-process (no HTTP, no log, no scheduler)
#   aggregated-embedded     tandem serve, embedded log
#   aggregated-jetstream    tandem serve --nats (a local nats-server with JetStream)
#   disaggregated-embedded  tandem serve --prefill-workers 1, every prompt prefilled there (KV moved in memory)
# Each run writes bench/results/<stamp>-<setup>-r<rate>.json; the TTFT of a setup minus direct's is what HTTP, the
# gateway, the log and the scheduler add. Usage: RATE=100 N=1000 scripts/bench_overhead.sh [setup ...]
# (RATE=inf MAX_CONCURRENCY=16 measures the most each setup can take.)
set -euo pipefail
cd "$(dirname "$0")/.."

TANDEM=${TANDEM:-${CARGO_TARGET_DIR:-target}/release/tandem}
RATE=${RATE:-100}
N=${N:-1000}
INPUT_LEN=${INPUT_LEN:-32}
OUTPUT_LEN=${OUTPUT_LEN:-4}
OUT_DIR=${OUT_DIR:-bench/results}
STAMP=${STAMP:-$(date -u +%Y%m%d-%H%M)}
SETUPS=("$@")
[ ${#SETUPS[@]} -gt 0 ] || SETUPS=(direct aggregated-embedded aggregated-jetstream disaggregated-embedded)
[ -x "$TANDEM" ] || { echo "no tandem binary at $TANDEM: cargo build --release (or set TANDEM)" >&2; exit 1; }

WORK=$(mktemp -d)
SERVER_PID=""
NATS_PID=""
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
  [ -n "$NATS_PID" ] && kill "$NATS_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_ready() { # port
  for _ in $(seq 1 600); do
    curl -fs "http://127.0.0.1:$1/ready" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "tandem serve on port $1 never became ready; its log:" >&2
  cat "$WORK/serve.log" >&2
  return 1
}

bench() { # setup extra-args...
  local setup=$1
  shift
  "$TANDEM" bench serve --num-requests "$N" --request-rate "$RATE" --input-len "$INPUT_LEN" \
    --output-len "$OUTPUT_LEN" --warmup-requests 20 --label "$setup" \
    ${MAX_CONCURRENCY:+--max-concurrency "$MAX_CONCURRENCY"} \
    --json "$OUT_DIR/$STAMP-$setup-r$RATE${MAX_CONCURRENCY:+-c$MAX_CONCURRENCY}.json" "$@"
}

serve_and_bench() { # setup serve-args...
  local setup=$1
  shift
  local port
  port=$(free_port)
  rm -rf "$WORK/data"
  "$TANDEM" serve --host 127.0.0.1 --port "$port" --data-dir "$WORK/data" "$@" 2>"$WORK/serve.log" &
  SERVER_PID=$!
  wait_ready "$port"
  bench "$setup" --base-url "http://127.0.0.1:$port"
  kill -INT "$SERVER_PID"
  wait "$SERVER_PID" || true
  SERVER_PID=""
}

for setup in "${SETUPS[@]}"; do
  case $setup in
    direct) bench direct --direct ;;
    aggregated-embedded) serve_and_bench "$setup" ;;
    aggregated-jetstream)
      command -v nats-server >/dev/null || {
        echo "aggregated-jetstream needs nats-server >= 2.11 on PATH (scripts/test.sh leaves one in ./.venv/bin)" >&2
        exit 1
      }
      nats_port=$(free_port)
      nats-server -js -a 127.0.0.1 -p "$nats_port" -sd "$WORK/nats" >"$WORK/nats.log" 2>&1 &
      NATS_PID=$!
      for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$nats_port") 2>/dev/null && break
        sleep 0.1
      done
      serve_and_bench "$setup" --nats "nats://127.0.0.1:$nats_port"
      kill "$NATS_PID"
      wait "$NATS_PID" 2>/dev/null || true
      NATS_PID=""
      ;;
    disaggregated-embedded)
      serve_and_bench "$setup" --prefill-workers 1 --max-local-prefill-tokens 0 --max-prefill-queue-depth 1000000
      ;;
    *) echo "unknown setup $setup" >&2; exit 2 ;;
  esac
done
