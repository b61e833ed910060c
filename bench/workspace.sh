#!/usr/bin/env bash
# Workspace fingerprints and the hot watcher, in one run (see tests/benches/workspace.rs):
# cold fingerprint vs b3sum, warm status, edit -> dirty mark latency, daemon RSS.
#   bash bench/workspace.sh              # 50,000 files, ~1 GB
#   bash bench/workspace.sh 5000 100     # a quick run
# The workload is generated once (fixed seed) under $TMPDIR/memobuild-bench-<files>/.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v b3sum >/dev/null || bash .ci/install-deps
cargo build --release --workspace --bins --quiet
cargo bench --quiet -p memobuild-tests --bench workspace -- "$@"
