#!/usr/bin/env bash
# Runs each cargo-fuzz target in fuzz/ for a bounded time (default 60 s each) and prints how many inputs it tried.
#
#   scripts/fuzz.sh [seconds-per-target]
#
# Needs the nightly toolchain and cargo-fuzz (`rustup toolchain install nightly`, `cargo install cargo-fuzz`).
# Builds once (release, debug assertions and overflow checks on, AddressSanitizer) into $FUZZ_TARGET_DIR
# (default fuzz/target). Each target starts from its committed seeds (fuzz/seeds/<target>) plus what earlier runs
# found (fuzz/corpus/<target>, not committed). An input that panics, leaks past -rss_limit_mb, asks for more than
# -malloc_limit_mb in one allocation or runs past -timeout is a crash: it is saved under fuzz/artifacts/<target>/,
# the script goes on with the other targets and exits 1. Commit a crash as a regression test in the normal suite.
set -euo pipefail

seconds="${1:-60}"
root="$(cd "$(dirname "$0")/.." && pwd)"
target_dir="${FUZZ_TARGET_DIR:-$root/fuzz/target}"
targets=(event_decode kv_transfer_header chat_prompt)
flags=(-O -a --target-dir "$target_dir")

cd "$root/fuzz"
cargo +nightly fuzz build "${flags[@]}"

failed=()
summary=()
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "artifacts/$target"
    artifacts_before="$(find "artifacts/$target" -type f | wc -l)"
    log="$(mktemp)"
    echo "== $target: ${seconds} s"
    status=0
    cargo +nightly fuzz run "${flags[@]}" "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=512 -timeout=10 \
        -print_final_stats=1 >"$log" 2>&1 || status=$?
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    corpus_size="$(find "corpus/$target" -type f | wc -l)"
    if [[ $status -ne 0 ]]; then
        tail -n 40 "$log"
        failed+=("$target")
        if [[ "$(find "artifacts/$target" -type f | wc -l)" -gt $artifacts_before ]]; then
            summary+=("$(printf '%-20s %12s executions  CRASH (see fuzz/artifacts/%s/)' "$target" "${runs:-?}" "$target")")
        else
            summary+=("$(printf '%-20s %12s executions  FAILED to run (exit %s, log above)' "$target" "${runs:-?}" "$status")")
        fi
    else
        summary+=("$(printf '%-20s %12s executions  %6s corpus inputs  no crash' "$target" "${runs:-?}" "$corpus_size")")
    fi
    rm -f "$log"
done

echo
echo "fuzzing, ${seconds} s per target:"
printf '  %s\n' "${summary[@]}"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "crashed or failed: ${failed[*]}" >&2
    exit 1
fi
