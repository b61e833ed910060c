#!/usr/bin/env bash
# Times a 1 GB `-o type=tar` output of a cached build, end to end (client process
# included): the daemon streams it over the socket and the client writes it. With
# OLD_BIN=DIR (a directory holding the `memobuildd` and `memobuild` of an earlier build, e.g.
# main before outputs travelled to the client), the same is timed with those binaries, whose
# daemon wrote the file itself, and the ratio is printed.
# Target: streamed >= 80% of the direct write's speed (time <= 1.25x).
#   bash bench/output.sh                        # 1 GB, 5 runs each
#   OLD_BIN=/tmp/bench-main SIZE_MB=256 RUNS=3 bash bench/output.sh
# Results: bench/results/output.{json,md}
set -euo pipefail
cd "$(dirname "$0")/.."
command -v hyperfine >/dev/null || bash .ci/install-deps

size_mb=${SIZE_MB:-1024}
runs=${RUNS:-5}
cargo build --release -p memobuildd -p memobuild-client --quiet
tmp=$(mktemp -d "${TMPDIR:-/tmp}/mb-output-bench.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

# 1 GB of incompressible data in 16 files, one COPY.
mkdir -p "$tmp/ctx"
printf 'FROM scratch\nCOPY data/ /data/\n' > "$tmp/ctx/Dockerfile"
mkdir -p "$tmp/ctx/data"
for i in $(seq 1 16); do
  head -c $((size_mb * 1024 * 1024 / 16)) /dev/urandom > "$tmp/ctx/data/part$i"
done

# Starts a daemon of the binaries in $1 under $tmp/$2, builds the context once, and prints
# the client command line.
start() {
  local bin=$1 name=$2
  mkdir -p "$tmp/$name"
  "$bin/memobuildd" --root "$tmp/$name/root" --socket "$tmp/$name/sock" \
    >"$tmp/$name/log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do [ -S "$tmp/$name/sock" ] && break; sleep 0.1; done
  "$bin/memobuild" --socket "$tmp/$name/sock" build "$tmp/ctx" --progress quiet
}

start target/release new
commands=(-n streamed --prepare "rm -f $tmp/out.tar"
  "target/release/memobuild --socket $tmp/new/sock build $tmp/ctx --progress quiet -o type=tar,dest=$tmp/out.tar")
if [ -n "${OLD_BIN:-}" ]; then
  start "$OLD_BIN" old
  commands+=(-n direct --prepare "rm -f $tmp/out.tar"
    "$OLD_BIN/memobuild --socket $tmp/old/sock build $tmp/ctx --progress quiet -o type=tar,dest=$tmp/out.tar")
fi

mkdir -p bench/results
hyperfine --shell=none --warmup 1 --runs "$runs" \
  --export-json bench/results/output.json --export-markdown bench/results/output.md \
  "${commands[@]}"
python3 - bench/results/output.json "$size_mb" <<'PY'
import json, sys
results = {r["command"]: r for r in json.load(open(sys.argv[1]))["results"]}
size = int(sys.argv[2])
for name, r in results.items():
    print(f"{name}: median {r['median']:.2f} s, {size / r['median']:.0f} MB/s")
if "direct" in results:
    ratio = results["direct"]["median"] / results["streamed"]["median"]
    print(f"streamed speed = {ratio:.0%} of direct (target >= 80%)")
PY
