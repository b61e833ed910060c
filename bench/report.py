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


def stats(ts):
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


def rerun_steps_ms(log_name, runs):
    """Per timed run of scenario 3: the summed DONE times of the Dockerfile steps that ran
    (not CACHED), from the plain progress log (one '#### run' marker per run, warm-up first)."""
    path = results / log_name
    if not path.exists():
        return None
    segments = path.read_text().split("#### run")[1:]
    sums = []
    for seg in segments[-runs:]:
        steps, total = set(), 0.0
        for line in seg.splitlines():
            line = line.strip()
            if m := STEP.match(line):
                steps.add(m.group(1))
            elif (m := DONE.match(line)) and m.group(1) in steps:
                total += float(m.group(2)) * 1000
        sums.append(total)
    return sums


def fmt(s):
    if s is None:
        return "—"
    return f"{s['median_ms']:.1f} ms ({s['min_ms']:.1f}–{s['max_ms']:.1f})"


scenarios = []


def add(sid, name, mb, bk, target=None, met=None, note="", peer="BuildKit"):
    ratio = mb["median_ms"] / bk["median_ms"] if mb and bk else None
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


def peer(name):
    return None if unavailable else stats(times(name))


mb1, bk1 = stats(times("s1-memobuild")), peer("s1-buildkit")
r1 = mb1["median_ms"] / bk1["median_ms"] if mb1 and bk1 else None
add(1, f"cold multi-stage build, --no-cache ({meta['cold_files']} files, ~{meta['cold_mb']} MB)",
    mb1, bk1, "≤ 0.5× BuildKit", None if r1 is None else r1 <= 0.5)

mb2, bk2 = stats(times("s2-memobuild")), peer("s2-buildkit")
met2 = mb2["median_ms"] <= 15 and (bk2 is None or bk2["median_ms"] / mb2["median_ms"] >= 100)
add(2, f"no-op rebuild ({meta['big_files']} files, ~{meta['big_mb']} MB)", mb2, bk2,
    "≤ 15 ms and ≥ 100× faster", met2,
    f"BuildKit/MemoBuild = {bk2['median_ms'] / mb2['median_ms']:.0f}×" if bk2 else "")

mb3, bk3 = stats(times("s3-memobuild")), peer("s3-buildkit")
runs = int(meta["runs"])
over = None
notes3 = []
for tool, s in (("MemoBuild", mb3), ("BuildKit", bk3)):
    steps = rerun_steps_ms(f"s3-{tool.lower()}.log", runs) if s else None
    if s and steps and len(steps) == len(s["times_ms"]):
        o = statistics.median(w - st for w, st in zip(s["times_ms"], steps))
        notes3.append(f"{tool}: rerun steps {statistics.median(steps):.0f} ms, overhead {o:.0f} ms")
        if tool == "MemoBuild":
            over = o
add(3, "one source file edited (COPY src/ + build step rerun)", mb3, bk3,
    "≤ 1 s overhead beyond the rerun steps", None if over is None else over <= 1000,
    "; ".join(notes3))

add(4, "edit to a .dockerignore'd file", stats(times("s4-memobuild")), peer("s4-buildkit"))
add(5, "CMD-only change", stats(times("s5-memobuild")), peer("s5-buildkit"))

mb6, b3 = stats(times("s6-memobuild")), stats(times("s6-b3sum"))
add(6, f"cold context fingerprint vs b3sum ({meta['big_files']} files)", mb6, b3,
    "≤ 1.25× b3sum", mb6["median_ms"] / b3["median_ms"] <= 1.25, peer="b3sum")

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
    stats(times("s8-memobuild")), peer("s8-buildkit"),
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
