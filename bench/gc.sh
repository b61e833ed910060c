#!/usr/bin/env bash
# Times one GC pass over 10,000 action entries (each with its own layer blob and unpacked
# layer directory, all unreferenced) in a fresh store on the disk under $TMPDIR.
# Target: <= 1 s for the pass; unlinking what it removed goes on in the store's trash thread.
#   bash bench/gc.sh                        # 10,000 actions, 3 runs, median printed
#   MEMOBUILD_GC_BENCH_ACTIONS=2000 bash bench/gc.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
cargo bench -p memobuildd --bench gc | tee bench/results/gc.txt
