#!/usr/bin/env bash
# `memobuild status` latency while another workspace is being rescanned, end to end (client
# process included). Target: p99 <= 20 ms.
#
#   bash bench/status-under-rescan.sh              # 50,000 files / ~1 GB, 1000 status calls
#   bash bench/status-under-rescan.sh 5000 100     # a quick run
#
# One daemon watches a generated workspace (tests/src/workload.rs, fixed seed); a loop keeps
# asking it to rescan that workspace (`memobuild notify` of its root: a full rescan through the
# stat cache) while hyperfine times `memobuild status`, first with the daemon idle, then during
# the rescans. Results: bench/results/status-under-rescan.{md,json}
set -euo pipefail
cd "$(dirname "$0")/.."
files=${1:-50000}
total_mb=${2:-1000}
runs=${RUNS:-1000}
command -v hyperfine >/dev/null || bash .ci/install-deps

cargo build --release --workspace --bins --quiet
helper=target/release/memobuild-bench-helper
ctx=${TMPDIR:-/tmp}/memobuild-bench-$files
[ -d "$ctx" ] || "$helper" context "$ctx" "$files" "$total_mb" >/dev/null
printf 'FROM scratch\nCOPY . /ctx/\n' > "$ctx/Dockerfile"

tmp=$(mktemp -d /tmp/mb-rescan.XXXXXX)
client=(target/release/memobuild --socket "$tmp/memobuildd.sock" --root "$tmp/root")
rescanning=
cleanup() {
  [ -n "$rescanning" ] && kill "$rescanning" 2>/dev/null
  "${client[@]}" daemon stop >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT

"${client[@]}" daemon start
"${client[@]}" watch "$ctx" >/dev/null
mkdir -p bench/results

hyperfine --shell=none --warmup 50 --runs "$runs" --export-json "$tmp/idle.json" \
  "${client[*]} status" >/dev/null

# Rescans back to back for as long as the measurement runs.
( while true; do "${client[@]}" notify "$ctx" >/dev/null; done ) &
rescanning=$!
sleep 1
hyperfine --shell=none --warmup 20 --runs "$runs" --export-json "$tmp/busy.json" \
  "${client[*]} status" >/dev/null
kill "$rescanning"
rescanning=

python3 - "$tmp/idle.json" "$tmp/busy.json" "$files" <<'EOF' | tee bench/results/status-under-rescan.md
import json, sys
def stats(path):
    times = sorted(t * 1000 for t in json.load(open(path))["results"][0]["times"])
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]
    return {"runs": len(times), "p50_ms": pick(0.50), "p99_ms": pick(0.99), "max_ms": times[-1]}
idle, busy = stats(sys.argv[1]), stats(sys.argv[2])
json.dump({"files": int(sys.argv[3]), "idle": idle, "during_rescans": busy},
          open("bench/results/status-under-rescan.json", "w"), indent=2)
print(f"| `memobuild status` ({sys.argv[3]} files watched) | runs | p50 | p99 | max |")
print("|---|---|---|---|---|")
for name, s in (("daemon idle", idle), ("during back-to-back rescans", busy)):
    print(f"| {name} | {s['runs']} | {s['p50_ms']:.1f} ms | {s['p99_ms']:.1f} ms | {s['max_ms']:.1f} ms |")
EOF
