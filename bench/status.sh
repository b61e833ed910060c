#!/usr/bin/env bash
# Times `memobuild status` end to end against a running daemon: client process start,
# connect, handshake, request, render. Target: <= 10 ms per call.
#   bash bench/status.sh            # 500 runs
# Results: bench/results/status.{json,md}
set -euo pipefail
cd "$(dirname "$0")/.."
command -v hyperfine >/dev/null || bash .ci/install-deps

cargo build --release --workspace --bins --quiet
tmp=$(mktemp -d /tmp/mb-bench.XXXXXX)
client=(target/release/memobuild --socket "$tmp/memobuildd.sock" --root "$tmp/root")
cleanup() {
  "${client[@]}" daemon stop >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT

"${client[@]}" daemon start
mkdir -p bench/results
hyperfine --shell=none --warmup 50 --runs "${RUNS:-500}" \
  --export-json bench/results/status.json --export-markdown bench/results/status.md \
  "${client[*]} status"
