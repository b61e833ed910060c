#!/usr/bin/env bash
# `memobuildd serve-cache` vs BuildGrid under the same load, on loopback.
#   bash bench/cache-load.sh                 # 50 clients, 20 s per run
#   bash bench/cache-load.sh --quick         # 50 clients, 6 s per run
#   bash bench/cache-load.sh --clients 100 --duration 30
# Needs BuildGrid in .venv (bash .ci/install-deps) and python3. Builds release binaries.
#
# The load generator (tests/src/bin/memobuild-cache-load.rs) gives each client its own gRPC
# connection and runs a fixed mix for a bounded time over a working set it uploads first:
# FindMissingBlobs of 17 digests, BatchReadBlobs of 4 small blobs, BatchUpdateBlobs of 2 new
# 4 KiB blobs, ByteStream Read of a 1 MiB blob, ByteStream Write of a new 256 KiB blob.
# Runs: serve-cache with that gRPC mix; BuildGrid (`bgd server start`, disk storage and an
# LRU action cache) with the same mix; serve-cache with HTTP GET/PUT on /cas/ added
# (BuildGrid has no HTTP cache); then both servers with small requests only (no ByteStream),
# which is where the p99 target applies. Every run must end with 0 errors.
#
# Results: bench/results/cache-load-<UTC time>.{md,json}: operations per second, p50/p99
# (all requests and small ones), per-kind figures, ratios serve-cache/BuildGrid.
# Everything started lives under one temp dir and is stopped at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

clients=50
duration=20
while (($#)); do
  case $1 in
    --quick) duration=6 ;;
    --clients) clients=$2; shift ;;
    --duration) duration=$2; shift ;;
    -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

bgd=${MEMOBUILD_VENV:-$repo/.venv}/bin/bgd
[[ -x $bgd ]] || { echo "BuildGrid's bgd is missing: run bash .ci/install-deps" >&2; exit 1; }

cargo build --release -q -p memobuildd --bin memobuildd -p memobuild-tests --bin memobuild-cache-load
server=$repo/target/release/memobuildd
load=$repo/target/release/memobuild-cache-load

work=$(mktemp -d /tmp/mbcacheload.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() { # port seconds
  local deadline=$((SECONDS + $2))
  until python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),1)" 2>/dev/null; do
    ((SECONDS < deadline)) || { echo "nothing listens on port $1 after $2 s" >&2; return 1; }
    sleep 0.2
  done
}

run_load() { # label port [--http]
  local label=$1 port=$2
  shift 2
  echo "== $label: $clients clients, ${duration}s" >&2
  "$load" --target "http://127.0.0.1:$port" --clients "$clients" --duration "$duration" \
    --label "$label" "$@" >"$work/$label.json"
  python3 - "$work/$label.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"   {r['ops']} ops, {r['errors']} errors, {r['throughput_ops_s']:.0f} ops/s, "
      f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, small p99 {r['small_p99_ms']:.1f} ms",
      file=sys.stderr)
for e in r["first_errors"]:
    print("   error:", e, file=sys.stderr)
PY
}

# serve-cache
port=$(free_port)
"$server" serve-cache --listen "127.0.0.1:$port" --dir "$work/serve-cache" --max-size 20G \
  --log warn 2>"$work/serve-cache.log" &
pids+=($!)
wait_port "$port" 30
run_load serve-cache-grpc "$port"
run_load serve-cache-mixed "$port" --http
run_load serve-cache-small "$port" --small-only
kill "${pids[-1]}"; wait "${pids[-1]}" || true

# BuildGrid, same machine, same mix
bport=$(free_port)
mkdir -p "$work/buildgrid/cas"
cat >"$work/buildgrid.yml" <<YML
server:
  - !channel
    address: "127.0.0.1:$bport"
    insecure-mode: true
storages:
  - !disk-storage &main-storage
    path: $work/buildgrid/cas
caches:
  - !lru-action-cache &main-action
    storage: *main-storage
    max-cached-refs: 100000
    allow-updates: true
    cache-failed-actions: true
instances:
  - name: ""
    services:
      - !action-cache
        cache: *main-action
      - !cas
        storage: *main-storage
      - !bytestream
        storage: *main-storage
thread-pool-size: 100
YML
"$bgd" server start "$work/buildgrid.yml" >"$work/buildgrid.log" 2>&1 &
pids+=($!)
wait_port "$bport" 60
run_load buildgrid-grpc "$bport"
run_load buildgrid-small "$bport" --small-only

mkdir -p bench/results
stamp=$(date -u +%Y%m%dT%H%M%SZ)
out=bench/results/cache-load-$stamp
python3 - "$work" "$out" "$clients" "$duration" <<'PY'
import json, os, platform, subprocess, sys
work, out, clients, duration = sys.argv[1:]
names = ("serve-cache-grpc", "buildgrid-grpc", "serve-cache-mixed", "serve-cache-small", "buildgrid-small")
runs = {n: json.load(open(f"{work}/{n}.json")) for n in names}
ours, bg = runs["serve-cache-grpc"], runs["buildgrid-grpc"]
small, bg_small = runs["serve-cache-small"], runs["buildgrid-small"]
def ratio(a, b):
    return a / b if b else float("inf")
summary = {
    "clients": int(clients), "duration_s": float(duration),
    "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
    "throughput_ratio": ratio(ours["throughput_ops_s"], bg["throughput_ops_s"]),
    "p99_ratio": ratio(ours["p99_ms"], bg["p99_ms"]),
    "small_throughput_ratio": ratio(small["throughput_ops_s"], bg_small["throughput_ops_s"]),
    "runs": runs,
}
json.dump(summary, open(out + ".json", "w"), indent=2)
lines = [
    f"# serve-cache vs BuildGrid: {clients} clients, {duration} s per run, loopback",
    "",
    "| run | ops | errors | ops/s | p50 ms | p99 ms | small p50 ms | small p99 ms |",
    "|---|---|---|---|---|---|---|---|",
]
for name, r in runs.items():
    lines.append(f"| {name} | {r['ops']} | {r['errors']} | {r['throughput_ops_s']:.0f} | {r['p50_ms']:.1f} | "
                 f"{r['p99_ms']:.1f} | {r['small_p50_ms']:.1f} | {r['small_p99_ms']:.1f} |")
lines += ["", f"serve-cache / BuildGrid throughput: **{summary['throughput_ratio']:.1f}x**; "
          f"p99 ratio {summary['p99_ratio']:.3f}; small requests only: "
          f"**{summary['small_throughput_ratio']:.1f}x**, p99 {small['p99_ms']:.1f} ms vs {bg_small['p99_ms']:.1f} ms", "", "Per kind (p50 / p99 ms):", "",
          "| kind | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
kinds = sorted({k for r in runs.values() for k in r["by_kind"]})
for k in kinds:
    cells = []
    for r in runs.values():
        s = r["by_kind"].get(k)
        cells.append(f"{s['count']} ops, {s['p50_ms']:.1f} / {s['p99_ms']:.1f}" + (f", {s['errors']} errors" if s["errors"] else "") if s else "—")
    lines.append(f"| {k} | " + " | ".join(cells) + " |")
open(out + ".md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
errors = sum(r["errors"] for r in runs.values())
sys.exit(1 if errors else 0)
PY
echo "results: $out.{md,json}" >&2
