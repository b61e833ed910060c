#!/usr/bin/env bash
# MemoBuild vs Docker BuildKit, side by side, on workloads generated here (fixed seed).
#   bash bench/compare.sh            # 50,000-file / ~1 GB workspace, 5 runs per scenario
#   bash bench/compare.sh --quick    # 5,000 files / ~100 MB: under 5 minutes
#   bash bench/compare.sh --runs 9   # more runs (each after one warm-up)
# Needs root (RUN steps in runc, dockerd). Installs docker.io, hyperfine, b3sum, skopeo,
# docker-registry, busybox-static and python3 from Debian if missing.
#
# The peer runs for real: Debian's dockerd (BuildKit built in) on a temp data root and socket,
# `--iptables=false --bridge=none`, builds with DOCKER_BUILDKIT=1 --network=host. Both tools
# get the same busybox base: seeded into a `docker-registry` on 127.0.0.1 (MemoBuild pulls it
# from there) and `docker load`ed into that dockerd under the same name.
# Everything this script starts or creates lives under one temp dir and is torn down at exit.
#
# Results: bench/results/compare-<UTC time>[-quick].{md,json} (medians, min, max, ratios
# MemoBuild/BuildKit, machine, versions). Set MEMOBUILD_BENCH_NO_BUILDKIT=<reason> to skip
# the peer; the report then says "unavailable: <reason>".
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

quick=0
runs=5
while (($#)); do
  case $1 in
    --quick) quick=1 ;;
    --runs) runs=$2; shift ;;
    -h | --help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
if ((quick)); then
  big_files=5000 big_mb=100 cold_files=500 cold_mb=20 mode=quick
else
  big_files=50000 big_mb=1000 cold_files=2000 cold_mb=100 mode=full
fi

[[ $(id -u) == 0 ]] || { echo "bench/compare.sh needs root (runc, overlayfs, dockerd)" >&2; exit 1; }

# --- packages (a fresh machine after the README set-up has everything but these) ---
missing=()
for pair in dockerd:docker.io hyperfine:hyperfine b3sum:b3sum skopeo:skopeo \
  docker-registry:docker-registry python3:python3 runc:runc; do
  command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
[[ -x /bin/busybox ]] || missing+=(busybox-static)
if ((${#missing[@]})); then
  echo "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's CLI matches Debian's daemon and builds with its built-in BuildKit (no buildx).
docker_cli=/usr/bin/docker
[[ -x $docker_cli ]] || docker_cli=$(command -v docker)

target=${CARGO_TARGET_DIR:-$repo/target}
cargo build --release --workspace --bins --quiet
bin=$target/release

# --- one temp dir for everything; torn down on any exit ---
tmp=$(mktemp -d /tmp/mb-compare.XXXXXX)
export TMPDIR=$tmp/tmp
mkdir -p "$TMPDIR" "$tmp/mb" "$tmp/docker" "$tmp/results" "$tmp/w"
mb=("$bin/memobuild" --socket "$tmp/mb/mb.sock" --root "$tmp/mb/root")
dockerd_pid=
reg_pid=

stop_dockerd() {
  [[ -n $dockerd_pid ]] || return 0
  kill "$dockerd_pid" 2>/dev/null || true
  # Until it is a zombie (our child: it stays one until the wait below).
  for _ in $(seq 150); do
    [[ $(awk '{ print $3 }' "/proc/$dockerd_pid/stat" 2>/dev/null) == [!Z] ]] || break
    sleep 0.2
  done
  kill -9 "$dockerd_pid" 2>/dev/null || true
  wait "$dockerd_pid" 2>/dev/null || true
  dockerd_pid=
}

cleanup() {
  local status=$?
  set +e
  if ((status != 0)) && [[ -d $tmp/results ]]; then # keep what was measured
    mkdir -p "$repo/bench/results"
    cp -r "$tmp/results" "$repo/bench/results/compare-$(date -u +%Y%m%dT%H%M%SZ)-incomplete"
    echo "incomplete run: raw results kept in bench/results/" >&2
  fi
  "${mb[@]}" daemon stop >/dev/null 2>&1
  stop_dockerd
  if [[ -n $reg_pid ]]; then # EOF on its stdin stops the registry helper
    exec {reg_in}>&- {reg_out}<&- 2>/dev/null
    for _ in $(seq 50); do kill -0 "$reg_pid" 2>/dev/null || break; sleep 0.1; done
    kill "$reg_pid" 2>/dev/null
    wait "$reg_pid" 2>/dev/null
  fi
  # Anything still running from our tree (a memobuildd that ignored stop, containerd, runc).
  for pid in $(grep -l -- "$tmp" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3); do
    [[ $pid == "$$" ]] || kill -9 "$pid" 2>/dev/null
  done
  awk -v t="$tmp" 'index($2, t) == 1 { print $2 }' /proc/mounts | sort -r |
    while read -r m; do umount -l "$m"; done
  rm -rf "$tmp"
}
trap cleanup EXIT
set -E
trap 'echo "bench/compare.sh: line $LINENO: \"$BASH_COMMAND\" failed (exit $?)" >&2' ERR
trap 'exit 130' INT TERM

export DOCKER_HOST=unix://$tmp/docker/docker.sock DOCKER_CONFIG=$tmp/docker/config DOCKER_BUILDKIT=1
docker() { timeout 1800 "$docker_cli" "$@"; }

start_dockerd() {
  dockerd --data-root "$tmp/docker/data" --exec-root "$tmp/docker/exec" \
    --pidfile "$tmp/docker/dockerd.pid" --host "$DOCKER_HOST" \
    --iptables=false --bridge=none >>"$tmp/docker/dockerd.log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 300); do
    timeout 10 "$docker_cli" version >/dev/null 2>&1 && return 0
    kill -0 "$dockerd_pid" 2>/dev/null || break
    sleep 0.2
  done
  return 1
}

buildkit=${MEMOBUILD_BENCH_NO_BUILDKIT:+unavailable: $MEMOBUILD_BENCH_NO_BUILDKIT}
if [[ -z $buildkit ]] && ! start_dockerd; then
  buildkit="unavailable: dockerd did not start: $(grep -i 'level=fatal\|failed' "$tmp/docker/dockerd.log" | tail -1 | cut -c1-200)"
  stop_dockerd
fi
[[ -n $buildkit ]] && echo "BuildKit side $buildkit" >&2

# --- the base image: a registry on 127.0.0.1 seeded with busybox (tests/src/registry.rs) ---
coproc REG { exec "$bin/memobuild-bench-helper" registry; }
reg_pid=$REG_PID
# Our own copies of its pipes: bash drops the REG array's fds when the coproc ends.
exec {reg_in}>&"${REG[1]}" {reg_out}<&"${REG[0]}"
eval "exec ${REG[1]}>&- ${REG[0]}<&-"
read -r -t 60 -u "$reg_out" registry
[[ -n $registry ]] || { echo "the test registry did not start" >&2; exit 1; }
base=$registry/busybox:latest
if [[ -z $buildkit ]]; then
  skopeo copy -q --src-tls-verify=false "docker://$base" "docker-archive:$tmp/busybox.tar:$base" >/dev/null
  docker load -q -i "$tmp/busybox.tar" >/dev/null
fi

# --- workloads (deterministic: tests/src/workload.rs) ---
echo "generating workloads ($mode)" >&2
helper=$bin/memobuild-bench-helper
cold=$tmp/w/cold big=$tmp/w/big
for w in "$cold" "$big"; do
  mkdir -p "$w"
  seq 1 400 | sed 's/^/dependency-/; s/$/ = "1.0"/' >"$w/manifest.txt"
  printf 'src.list\nsrc.generated\ndocs/\n' >"$w/.dockerignore"
done
"$helper" context "$cold/src" "$cold_files" "$cold_mb" >/dev/null
big_list=$("$helper" context "$big/src" "$big_files" "$big_mb")
mkdir -p "$big/docs" && echo "notes, ignored by .dockerignore" >"$big/docs/notes.md"

# Scenario 1: deps stage, build stage, slim final stage.
cat >"$cold/Dockerfile" <<EOF
FROM $base AS deps
WORKDIR /deps
COPY manifest.txt ./
RUN busybox seq 1 200 | while read i; do busybox sha256sum manifest.txt > lib\$i.so; done
FROM $base AS build
WORKDIR /app
COPY --from=deps /deps /app/deps
COPY src/ ./src/
RUN mkdir out && busybox find src -type f | busybox sort | busybox xargs cat | busybox gzip -1 > out/app.gz
FROM $base
COPY --from=build /app/out/ /opt/app/
CMD ["/bin/sh"]
EOF
# Scenarios 2-5, 7, 8: manifest first, a deps step, then src/ and a cheap build step.
edited=src/d07/s001/f57.dat
write_big_dockerfile() {
  cat >"$big/Dockerfile" <<EOF
FROM $base
WORKDIR /app
COPY manifest.txt ./
RUN busybox seq 1 200 | while read i; do busybox sha256sum manifest.txt > dep\$i; done
COPY src/ ./src/
RUN busybox wc -c $edited src/d07/s002/*.dat > build.txt
CMD ["/bin/sh", "-c", "echo $1"]
EOF
}
write_big_dockerfile v0

mb_build() { # CONTEXT [ARGS...]
  local ctx=$1; shift
  timeout 1800 "${mb[@]}" build "$ctx" -f "$ctx/Dockerfile" -t "bench-$(basename "$ctx")" --network host "$@"
}
bk_build() { # CONTEXT [ARGS...]
  local ctx=$1; shift
  docker build --network=host -f "$ctx/Dockerfile" -t "bench-$(basename "$ctx")" "$@" "$ctx"
}
# Edits for --prepare: each one new content, so no run finds an earlier one in a cache.
cat >"$tmp/edit.sh" <<'EOF'
#!/bin/sh
# edit.sh FILE: append a unique line.  edit.sh --cmd DOCKERFILE: a new CMD.
if [ "$1" = --cmd ]; then
  sed -i "s/^CMD .*/CMD [\"\/bin\/sh\", \"-c\", \"echo $(date +%s%N)\"]/" "$2"
else
  echo "edit $(date +%s%N)" >>"$1"
fi
EOF
chmod +x "$tmp/edit.sh"

results=$tmp/results
hf() { # NAME [hyperfine args...]
  local name=$1; shift
  echo "== $name" >&2
  timeout 3600 hyperfine --style basic --warmup 1 --runs "$runs" --export-json "$results/$name.json" "$@" >&2 ||
    failed "$name" "hyperfine: a run failed or timed out"
}
failed() { # NAME REASON: the report shows the scenario as failed, the runner goes on
  echo "$1 FAILED: $2" >&2
  rm -f "$results/$1.json"
  echo "$2" | tr '\n' ' ' | cut -c1-300 >"$results/$1.failed"
}
have_bk() { [[ -z $buildkit ]]; }

# 1. Cold multi-stage build, no cache on either side. Plain progress goes to a log, so the
#    report can name the slowest steps.
for tool in memobuild buildkit; do
  [[ $tool == buildkit ]] && ! have_bk && continue
  log=$results/s1-$tool.log
  if [[ $tool == memobuild ]]; then
    cmd="${mb[*]} build $cold -f $cold/Dockerfile -t bench-cold --network host --progress plain --no-cache >>$log 2>&1"
  else
    cmd="$docker_cli build --progress plain --network=host --no-cache -f $cold/Dockerfile -t bench-cold $cold >>$log 2>&1"
  fi
  hf "s1-$tool" -n "$tool" --prepare "echo '#### run' >>$log" "$cmd"
done

# 2. No-op rebuild of the big workspace (primed by hyperfine's warm-up).
hf s2-memobuild --shell=none -n memobuild "${mb[*]} build $big -f $big/Dockerfile -t bench-big --network host --progress quiet"
have_bk && hf s2-buildkit --shell=none -n buildkit "$docker_cli build -q --network=host -f $big/Dockerfile -t bench-big $big"

# 3. One source file edited: COPY src/ and the build step rerun. Plain progress goes to a log
#    so the report can subtract the time of the steps that had to rerun.
for tool in memobuild buildkit; do
  [[ $tool == buildkit ]] && ! have_bk && continue
  log=$results/s3-$tool.log
  if [[ $tool == memobuild ]]; then
    cmd="${mb[*]} build $big -f $big/Dockerfile -t bench-big --network host --progress plain >>$log 2>&1"
  else
    cmd="$docker_cli build --progress plain --network=host -f $big/Dockerfile -t bench-big $big >>$log 2>&1"
  fi
  hf "s3-$tool" -n "$tool" --prepare "$tmp/edit.sh $big/$edited; echo '#### run' >>$log" "$cmd"
done

# 4. Edit to a .dockerignore'd file. (--shell=none runs the --prepare command directly too.)
hf s4-memobuild --shell=none -n memobuild --prepare "$tmp/edit.sh $big/docs/notes.md" \
  "${mb[*]} build $big -f $big/Dockerfile -t bench-big --network host --progress quiet"
have_bk && hf s4-buildkit --shell=none -n buildkit --prepare "$tmp/edit.sh $big/docs/notes.md" \
  "$docker_cli build -q --network=host -f $big/Dockerfile -t bench-big $big"

# 5. CMD-only change.
hf s5-memobuild --shell=none -n memobuild --prepare "$tmp/edit.sh --cmd $big/Dockerfile" \
  "${mb[*]} build $big -f $big/Dockerfile -t bench-big --network host --progress quiet"
have_bk && hf s5-buildkit --shell=none -n buildkit --prepare "$tmp/edit.sh --cmd $big/Dockerfile" \
  "$docker_cli build -q --network=host -f $big/Dockerfile -t bench-big $big"

# 7. Resident memory with the big workspace watched (it is, since its first build), and
#    dockerd's (plus its containerd's) for reference.
rss_mb() { awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status" 2>/dev/null || echo null; }
mb_pid=$("${mb[@]}" daemon status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')
"${mb[@]}" status >"$results/s7-status.txt" 2>&1 || true
echo "memobuild_rss_mb=$(rss_mb "$mb_pid")" >>"$results/meta.env"
if have_bk; then
  echo "dockerd_rss_mb=$(rss_mb "$dockerd_pid")" >>"$results/meta.env"
  ctd=$(pgrep -P "$dockerd_pid" containerd | head -1 || true)
  [[ -n $ctd ]] && echo "containerd_rss_mb=$(rss_mb "$ctd")" >>"$results/meta.env"
fi

# 6. Cold fingerprint (empty stat cache) vs b3sum over the same files.
hf s6-memobuild --shell=none -n memobuild "$helper fingerprint $big/src"
hf s6-b3sum --shell=none -n b3sum "xargs -0 -n 5000 -a $big_list b3sum --no-names"

# 8. Everything cached, daemon restarted: the build reloads its cache from L2 (disk). The
#    daemon is up (and BuildKit's dockerd ready) before the clock starts.
timed_runs() { # NAME CMD... ; restarts before each of 1 + runs, times only the build
  local name=$1; shift
  local times=() log=$results/$name.log
  echo "== $name" >&2
  for i in $(seq 0 "$runs"); do
    if [[ $name == *memobuild ]]; then
      "${mb[@]}" daemon stop >/dev/null 2>&1 || true
      "${mb[@]}" daemon start >/dev/null
    else
      stop_dockerd
      start_dockerd || { failed "$name" "dockerd did not come back: $(tail -1 "$tmp/docker/dockerd.log")"; return 0; }
    fi
    local t0 t1
    t0=$(date +%s%N)
    if ! "$@" >"$log" 2>&1; then
      failed "$name" "run $i: $(tail -3 "$log")"
      return 0
    fi
    t1=$(date +%s%N)
    ((i == 0)) || times+=("$(((t1 - t0) / 1000))")
  done
  python3 -c 'import json,sys; t=[int(x)/1e6 for x in sys.argv[2:]]; json.dump({"results":[{"command":sys.argv[1],"times":t}]}, open(sys.argv[1],"w"))' \
    "$results/$name.json" "${times[@]}"
}
timed_runs s8-memobuild "${mb[@]}" build "$big" -f "$big/Dockerfile" -t bench-big --network host --progress quiet
have_bk && timed_runs s8-buildkit "$docker_cli" build -q --network=host -f "$big/Dockerfile" -t bench-big "$big"

# --- machine, versions, report ---
{
  echo "mode=$mode"
  echo "runs=$runs"
  echo "big_files=$big_files"
  echo "big_mb=$big_mb"
  echo "cold_files=$cold_files"
  echo "cold_mb=$cold_mb"
  echo "cores=$(nproc)"
  echo "cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "memory_gb=$(awk '/^MemTotal:/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo)"
  echo "kernel=$(uname -sr)"
  echo "memobuild=$("${mb[@]}" version | sed -n 1p | cut -d' ' -f2-) at $(git rev-parse --short HEAD)"
  if have_bk; then
    echo "buildkit=Docker $(docker version --format '{{.Server.Version}}') (dockerd with built-in BuildKit, $(docker info --format '{{.Driver}}') storage)"
  else
    echo "buildkit=$buildkit"
  fi
  echo "b3sum=$(b3sum --version)"
  echo "hyperfine=$(hyperfine --version)"
} >>"$results/meta.env"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p bench/results
out=bench/results/compare-$stamp$([[ $mode == quick ]] && echo -quick || true)
python3 bench/report.py "$results" "$out"
cat "$out.md"
