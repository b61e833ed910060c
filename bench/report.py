#!/usr/bin/env python3
"""The report of bench/compare.sh: reads its results dir (hyperfine JSON per scenario and
tool, plain build logs of scenario 3, meta.env) and writes OUT.md and OUT.json.

    python3 bench/report.py RESULTS_DIR OUT   # OUT without extension
"""

import json
import re
import statistics
import sys
from pathlib import Path

results, out = Path(sys.argv[1]), Path(sys.argv[2])
meta = dict(
    line.split("=", 1)
    for line in (results / "meta.env").read_text().splitlines()
    if "=" in line
)
unavailable = meta["buildkit"] if meta["buildkit"].startswith("unavailable") else None


def times(name):
    """Wall times in ms of one hyperfine export, or None."""
    path = results / f"{name}.json"
    if not path.exists():
        return None
    return [t * 1000 for t in json.loads(path.read_text())["results"][0]["times"]]


def stats(ts, name=None):
    """Median, min, max of ts; for a scenario the runner marked failed, {"failed": why}."""
    if name and (results / f"{name}.failed").exists():
        return {"failed": (results / f"{name}.failed").read_text().strip()}
    if not ts:
        return None
    return {
        "median_ms": statistics.median(ts),
        "min_ms": min(ts),
        "max_ms": max(ts),
        "runs": len(ts),
        "times_ms": ts,
    }


STEP = re.compile(r"^#(\d+) \[(?:[^\]]* )?\d+/\d+\] (?:RUN|COPY|ADD)\b")
DONE = re.compile(r"^#(\d+) DONE ([0-9.]+)s")


def step_times(log_name, runs):
    """Per timed run, {step title: seconds} of the Dockerfile steps that ran (not CACHED),
    from a plain progress log with one '#### run' marker per run (the warm-up's first)."""
    path = results / log_name
    if not path.exists():
        return None
    segments = path.read_text(errors="replace").split("#### run")[1:]
    per_run = []
    for seg in segments[-runs:]:
        titles, done = {}, {}
        for line in seg.splitlines():
            line = line.strip()
            if m := STEP.match(line):
                titles[m.group(1)] = line.split(" ", 1)[1][:60]
            elif (m := DONE.match(line)) and m.group(1) in titles:
                done[titles[m.group(1)]] = float(m.group(2)) * 1000
        per_run.append(done)
    return per_run


def rerun_steps_ms(log_name, runs):
    per_run = step_times(log_name, runs)
    return None if per_run is None else [sum(d.values()) for d in per_run]


def slowest_steps(log_name, runs, n=2):
    """The n steps with the largest median time, as 'title m.m s' strings."""
    per_run = step_times(log_name, runs)
    if not per_run:
        return []
    titles = {t for d in per_run for t in d}
    medians = {t: statistics.median(d.get(t, 0.0) for d in per_run) for t in titles}
    top = sorted(medians.items(), key=lambda kv: -kv[1])[:n]
    return [f"`{t}` {ms / 1000:.1f} s" for t, ms in top]


def med(s):
    return s.get("median_ms") if s else None


def fmt(s):
    if s is None:
        return "—"
    if "failed" in s:
        return f"failed: {s['failed']}"
    return f"{s['median_ms']:.1f} ms ({s['min_ms']:.1f}–{s['max_ms']:.1f})"


scenarios = []


def add(sid, name, mb, bk, target=None, met=None, note="", peer="BuildKit"):
    ratio = med(mb) / med(bk) if med(mb) and med(bk) else None
    scenarios.append(
        {
            "id": sid,
            "scenario": name,
            "memobuild": mb,
            "peer": peer,
            "peer_result": bk,
            "ratio_memobuild_over_peer": ratio,
            "target": target,
            "met": met,
            "note": note,
        }
    )


def st(name):
    return stats(times(name), name)


def peer(name):
    return None if unavailable else st(name)


runs = int(meta["runs"])
mb1, bk1 = st("s1-memobuild"), peer("s1-buildkit")
r1 = med(mb1) / med(bk1) if med(mb1) and med(bk1) else None
notes1 = [f"{tool} slowest steps: " + ", ".join(top)
          for tool in ("MemoBuild", "BuildKit")
          if (top := slowest_steps(f"s1-{tool.lower()}.log", runs))]
add(1, f"cold multi-stage build, --no-cache ({meta['cold_files']} files, ~{meta['cold_mb']} MB)",
    mb1, bk1, "≤ 0.5× BuildKit", None if r1 is None else r1 <= 0.5, "; ".join(notes1))

mb2, bk2 = st("s2-memobuild"), peer("s2-buildkit")
met2 = None if not med(mb2) else med(mb2) <= 15 and (not med(bk2) or med(bk2) / med(mb2) >= 100)
add(2, f"no-op rebuild ({meta['big_files']} files, ~{meta['big_mb']} MB)", mb2, bk2,
    "≤ 15 ms and ≥ 100× faster", met2,
    f"BuildKit/MemoBuild = {med(bk2) / med(mb2):.0f}×" if med(bk2) and med(mb2) else "")

mb3, bk3 = st("s3-memobuild"), peer("s3-buildkit")
over = None
notes3 = []
for tool, s in (("MemoBuild", mb3), ("BuildKit", bk3)):
    steps = rerun_steps_ms(f"s3-{tool.lower()}.log", runs) if s else None
    if med(s) and steps and len(steps) == len(s["times_ms"]):
        o = statistics.median(w - st for w, st in zip(s["times_ms"], steps))
        top = ", ".join(slowest_steps(f"s3-{tool.lower()}.log", runs))
        notes3.append(f"{tool}: rerun steps {statistics.median(steps):.0f} ms ({top}), "
                      f"overhead {o:.0f} ms")
        if tool == "MemoBuild":
            over = o
add(3, "one source file edited (COPY src/ + build step rerun)", mb3, bk3,
    "≤ 1 s overhead beyond the rerun steps", None if over is None else over <= 1000,
    "; ".join(notes3))

add(4, "edit to a .dockerignore'd file", st("s4-memobuild"), peer("s4-buildkit"))
add(5, "CMD-only change", st("s5-memobuild"), peer("s5-buildkit"))

mb6, b3 = st("s6-memobuild"), st("s6-b3sum")
add(6, f"cold context fingerprint vs b3sum ({meta['big_files']} files)", mb6, b3,
    "≤ 1.25× b3sum", med(mb6) / med(b3) <= 1.25 if med(mb6) and med(b3) else None, peer="b3sum")

rss = float(meta["memobuild_rss_mb"]) if meta.get("memobuild_rss_mb", "null") != "null" else None
dockerd = meta.get("dockerd_rss_mb")
note7 = f"dockerd {dockerd} MB" if dockerd else (unavailable or "")
if meta.get("containerd_rss_mb"):
    note7 += f" + its containerd {meta['containerd_rss_mb']} MB"
scenarios.append({
    "id": 7, "scenario": f"daemon RSS, {meta['big_files']}-file workspace watched",
    "memobuild_rss_mb": rss, "dockerd_rss_mb": float(dockerd) if dockerd else None,
    "containerd_rss_mb": float(meta["containerd_rss_mb"]) if meta.get("containerd_rss_mb") else None,
    "target": "≤ 60 MB", "met": None if rss is None else rss <= 60, "note": note7,
})

add(8, "all steps cached, daemon restarted (cache from L2)",
    st("s8-memobuild"), peer("s8-buildkit"),
    note="timed after the daemon (dockerd) is up again")

machine = {k: meta[k] for k in ("cores", "cpu", "memory_gb", "kernel")}
versions = {k: meta[k] for k in ("memobuild", "buildkit", "b3sum", "hyperfine")}
report = {"mode": meta["mode"], "runs": runs, "machine": machine, "versions": versions,
          "scenarios": scenarios}
out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")

yes = {True: "met", False: "**missed**", None: "—"}
lines = [
    f"MemoBuild vs BuildKit, `bench/compare.sh{' --quick' if meta['mode'] == 'quick' else ''}`: "
    f"median of {runs} runs after a warm-up (min–max).",
    "",
    f"Machine: {machine['cores']} cores ({machine['cpu']}), {machine['memory_gb']} GB, "
    f"{machine['kernel']}.  ",
    f"MemoBuild {versions['memobuild']}; {versions['buildkit']}; {versions['b3sum']}; "
    f"{versions['hyperfine']}.",
    "",
    "| # | scenario | MemoBuild | peer | MemoBuild/peer | target | |",
    "|---|---|---|---|---|---|---|",
]
for s in scenarios:
    if s["id"] == 7:
        mb = f"{s['memobuild_rss_mb']} MB"
        pr = f"dockerd {s['dockerd_rss_mb']} MB" if s["dockerd_rss_mb"] else (unavailable or "—")
        ratio = "—"
    else:
        mb = fmt(s["memobuild"])
        pr = (unavailable if unavailable and s["peer"] == "BuildKit" else
              f"{s['peer']}: {fmt(s['peer_result'])}")
        r = s["ratio_memobuild_over_peer"]
        ratio = "—" if r is None else f"{r:.3f}" if r < 0.1 else f"{r:.2f}"
    lines.append(f"| {s['id']} | {s['scenario']} | {mb} | {pr} | {ratio} | "
                 f"{s['target'] or '—'} | {yes[s['met']]} |")
notes = [f"- {s['id']}: {s['note']}" for s in scenarios if s.get("note")]
if notes:
    lines += ["", "Notes:"] + notes
out.with_suffix(".md").write_text("\n".join(lines) + "\n")
