#!/usr/bin/env bash
# Prebuild on save: the time from a save to a usable image, with prebuild on and off, for a
# Dockerfile whose RUN takes 2 s (`COPY src.txt` then `RUN sleep 2 && cat ...`).
#   bash bench/prebuild.sh                 # 5 runs per scenario, release binaries
#   bash bench/prebuild.sh --runs 9
#   MEMOBUILD_BENCH_PROFILE=debug bash bench/prebuild.sh   # the debug binaries (no release build)
# Needs root (RUN steps in runc). Everything it starts lives under one temp dir, torn down at
# exit. Scenarios, each run starting with a save (a new src.txt):
#   off, build at once      save, then `memobuild build` at once: save -> build done
#   on,  build at once      the same with prebuild on (the build and the prebuild share steps)
#   on,  image by itself    save, nobody builds: save -> `status` says the prebuild is ready
#   off/on, build after 3 s the user comes back 3 s after the save: the build command's time
# Results: bench/results/prebuild-<UTC time>.md (median, min, max in ms).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

runs=5
while (($#)); do
  case $1 in
    --runs) runs=$2; shift ;;
    -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
[[ $(id -u) == 0 ]] || { echo "bench/prebuild.sh needs root (runc, overlayfs)" >&2; exit 1; }

profile=${MEMOBUILD_BENCH_PROFILE:-release}
target=${CARGO_TARGET_DIR:-$repo/target}
if [[ $profile == release ]]; then
  cargo build --release --workspace --bins --quiet
else
  cargo build --workspace --bins --quiet
fi
bin=$target/$profile

tmp=$(mktemp -d /tmp/mb-prebuild.XXXXXX)
mb=("$bin/memobuild" --socket "$tmp/mb.sock" --root "$tmp/root")
reg_pid=
cleanup() {
  set +e
  "${mb[@]}" daemon stop >/dev/null 2>&1
  if [[ -n $reg_pid ]]; then # EOF on its stdin stops the registry helper
    exec {reg_in}>&- {reg_out}<&- 2>/dev/null
    for _ in $(seq 50); do kill -0 "$reg_pid" 2>/dev/null || break; sleep 0.1; done
    kill "$reg_pid" 2>/dev/null
    wait "$reg_pid" 2>/dev/null
  fi
  awk -v t="$tmp" 'index($2, t) == 1 { print $2 }' /proc/mounts | sort -r |
    while read -r m; do umount -l "$m"; done
  rm -rf "$tmp"
}
trap cleanup EXIT

# The base image: a registry on 127.0.0.1 seeded with busybox (tests/src/registry.rs).
coproc REG { exec "$bin/memobuild-bench-helper" registry; }
reg_pid=$REG_PID
exec {reg_in}>&"${REG[1]}" {reg_out}<&"${REG[0]}"
eval "exec ${REG[1]}>&- ${REG[0]}<&-"
read -r -t 60 -u "$reg_out" registry
[[ -n $registry ]] || { echo "the test registry did not start" >&2; exit 1; }

ctx=$tmp/ctx
mkdir -p "$ctx"
printf 'FROM %s/busybox\nCOPY src.txt /src.txt\nRUN sleep 2 && cat /src.txt > /out.txt\n' \
  "$registry" >"$ctx/Dockerfile"
echo 0 >"$ctx/src.txt"
build() { "${mb[@]}" build --progress quiet -t bench:dev "$ctx" >/dev/null 2>&1; }
build

now_ms() { echo $(($(date +%s%N) / 1000000)); }
save=0
edit() { save=$((save + 1)); echo "$save" >"$ctx/src.txt"; }
# The prebuild's state in `status --json`: Idle, Waiting, Running, Ready, Failed, Off.
prebuild_state() {
  "${mb[@]}" status --json | python3 -c '
import json, sys
ws = json.load(sys.stdin)["workspaces"][0]["prebuild"]
print(ws if isinstance(ws, str) else next(iter(ws)))'
}
wait_ready() {
  for _ in $(seq 3000); do
    [[ $(prebuild_state) == Ready ]] && return 0
    sleep 0.02
  done
  echo "the prebuild never got ready" >&2
  exit 1
}
# Waits until nothing runs, so a run starts from a clean state.
settle() {
  for _ in $(seq 1500); do
    case $(prebuild_state) in Waiting | Running) sleep 0.02 ;; *) return 0 ;; esac
  done
}

declare -A times
record() { times[$1]+="$2 "; }

for _ in $(seq "$runs"); do
  # Prebuild off.
  "${mb[@]}" watch --no-prebuild "$ctx" >/dev/null
  edit; t0=$(now_ms); build; record "off, build at once: save -> image" $(($(now_ms) - t0))
  edit; sleep 3; t0=$(now_ms); build; record "off, build 3 s after the save: build command" $(($(now_ms) - t0))

  # Prebuild on.
  "${mb[@]}" watch --prebuild "$ctx" >/dev/null
  edit; t0=$(now_ms); build; record "on, build at once: save -> image" $(($(now_ms) - t0))
  settle
  edit; t0=$(now_ms); wait_ready; record "on, nobody builds: save -> prebuilt image ready" $(($(now_ms) - t0))
  edit; sleep 3; wait_ready; t0=$(now_ms); build; record "on, build 3 s after the save: build command" $(($(now_ms) - t0))
done

mkdir -p "$repo/bench/results"
out=$repo/bench/results/prebuild-$(date -u +%Y%m%dT%H%M%SZ).md
{
  echo "# Prebuild on save: save -> usable image (ms; $runs runs, $profile binaries)"
  echo
  echo "Dockerfile: \`COPY src.txt\`, then \`RUN sleep 2 && cat /src.txt > /out.txt\`; debounce 300 ms."
  echo "Machine: $(nproc) cores, $(uname -r); $(date -u +%F)."
  echo
  echo "| scenario | median | min | max |"
  echo "|---|---|---|---|"
  for name in "off, build at once: save -> image" "on, build at once: save -> image" \
    "on, nobody builds: save -> prebuilt image ready" \
    "off, build 3 s after the save: build command" "on, build 3 s after the save: build command"; do
    read -r -a values <<<"${times[$name]}"
    sorted=$(printf '%s\n' "${values[@]}" | sort -n)
    count=${#values[@]}
    median=$(sed -n "$(((count + 1) / 2))p" <<<"$sorted")
    echo "| $name | $median | $(head -1 <<<"$sorted") | $(tail -1 <<<"$sorted") |"
  done
} | tee "$out"
