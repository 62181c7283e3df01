#!/usr/bin/env python3
"""Throughput on a stream of frames: the spool daemon over N frames with four real
MediaPipe models (face detection short range, face landmarks, palm detection full, hand
landmarks full), against the ceiling and the status quo, at several memory levels.

Rows (each a fresh process; levels in interleaved rounds, medians over --rounds):
- daemon: `memaflow run --once` on a spool of N frames, layer cache kept (`cache = keep`,
  under a budget once with each `eviction` rule: furthest-ahead and cost-per-byte)
  or not (`cache = off`: every frame loads every layer, as before the cache), with
  `threads` workers, as many frames in flight and inferences in parallel. Levels: no
  budget, or `[run] budget` at 50 % / 25 % of the working set (the ledger's high-water
  mark with every layer resident, read from an unlimited run's status.json), each in a
  memory cgroup (v1 or v2, needs root) at the budget + `--cgroup-slack` (default 40 MiB,
  issue 15's bound on peak RSS at 50 %) for the process's own baseline (binary, tract,
  allocator: about 10 MiB idle), the frame being decoded and the allocator's free blocks.
- ceiling: `cargo bench --bench stream_ceiling`, every layer planned once and kept, one
  frame after another in one process and thread (no spool, no scheduler); run in each
  round right after the unbudgeted 1-thread daemon, so the two meet at one machine speed.
- baseline (with `--baseline BIN`): an older build's daemon at each level and thread
  count, e.g. the issue day's (`git worktree add ../day 3871976`, built there), its
  configuration without the keys it predates.
- status quo: `memaflow batch --status-quo`, each model whole in tract, loaded per
  inference.
- litert ref / xnnpack: ai-edge-litert, each model loaded once, inputs prepared up front,
  `invoke()` per model per frame (no decoding); reference kernels and XNNPACK.

The end prints issue 15's ratios within each round (the machine's speed drifts between
rounds; medians over rounds would compare different speeds), then the medians table.

frames/s counts the whole run (start-up included for the daemon); steady frames/s, from
the daemon's first result to its last, leaves out start-up and the first frame's loads,
as the ceiling's and LiteRT's loops do (theirs load before the clock starts); latency is a result's
`time_ms.total` (read, decode, preprocess, inference). Usage (from the repository, after
`bash tests/fetch-fixtures` and `cargo build --release`):

    sudo python3 benches/stream.py --frames 30 --rounds 3
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(REPO, "target/release/memaflow")
FIXTURES = os.path.join(REPO, "target/fixtures/mediapipe")
SHARED_FRAMES = os.path.join(REPO, "../shared/frames")
MODELS = [
    "face_detection/face_detection_short_range",
    "face_landmark/face_landmark",
    "palm_detection/palm_detection_full",
    "hand_landmark/hand_landmark_full",
]
MIB = 1 << 20
CGROUP_SLACK = 40 * MIB


def sh(args, **kw):
    out = subprocess.run(args, capture_output=True, text=True, **kw)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return out.stdout


def packages(work, binary=BIN, folder="models"):
    """The models imported by `binary` (an older build reads only packages it made)."""
    pkgs = []
    for m in MODELS:
        dest = os.path.join(work, folder, os.path.basename(m))
        if not os.path.exists(dest):
            sh([binary, "import", os.path.join(FIXTURES, m + ".tflite"), "--out", dest])
        pkgs.append(dest)
    return pkgs


def frame_list(n):
    frames = sorted(os.path.join(SHARED_FRAMES, f) for f in os.listdir(SHARED_FRAMES))
    return [frames[k % len(frames)] for k in range(n)]


class Cgroup:
    """A memory cgroup of our own (v1 or v2), or None where there is none to make."""

    def __init__(self, name, limit):
        v1 = "/sys/fs/cgroup/memory"
        self.v2 = not os.path.exists(os.path.join(v1, "memory.limit_in_bytes"))
        root = "/sys/fs/cgroup" if self.v2 else v1
        if self.v2:
            with open(os.path.join(root, "cgroup.subtree_control"), "w") as f:
                f.write("+memory")
        self.dir = os.path.join(root, f"memaflow-stream-{name}-{os.getpid()}")
        os.mkdir(self.dir)
        with open(os.path.join(self.dir, "memory.max" if self.v2 else "memory.limit_in_bytes"), "w") as f:
            f.write(str(limit))

    def wrap(self, argv):
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', os.path.join(self.dir, "cgroup.procs")] + argv

    def oom_kills(self):
        name = "memory.events" if self.v2 else "memory.oom_control"
        with open(os.path.join(self.dir, name)) as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
        return 0

    def peak(self):
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        try:
            with open(os.path.join(self.dir, name)) as f:
                return int(f.read())
        except OSError:
            return None

    def remove(self):
        for _ in range(50):
            try:
                os.rmdir(self.dir)
                return
            except OSError:
                time.sleep(0.05)


def run_daemon(work, pkgs, frames, threads, cache, budget, limit, tag, eviction="cost-per-byte", binary=BIN):
    """One `memaflow run --once` over `frames`, each model summarised; returns its figures.
    `binary` other than the checkout's is an older build (`--baseline`): its configuration
    has no layer cache, eviction rule or frames in flight, which it would not know."""
    models = "\n".join(f'[[model]]\npath = "{p}"' for p in pkgs)
    run = f'threads = {threads}\nparallel = {threads}\nreserve = "4M"\n'
    if binary == BIN:
        run += f'frames_in_flight = {threads}\ncache = "{cache}"\neviction = "{eviction}"\n'
    if budget:
        run += f"budget = {budget}\n"
    res = run_spool(work, tag, frames, run, models, limit=limit, binary=binary)
    del res["results"]
    return res


def run_spool(work, tag, frames, run, models, board=None, limit=None, binary=BIN):
    """One `memaflow run --once [--board BOARD]` over copies of `frames`, with `run` as the
    configuration's [run] section and `models` (its [models] and [[model]] entries) after
    it, in a memory cgroup at `limit` bytes when given; returns its figures: frames/s of the
    whole run (start-up included) and steady (from the first result written to the last:
    what a daemon that runs for days delivers, comparable with the ceiling's loop), latency (`time_ms.total`) median, p90 and p99 (`p50_ms`
    is the upper median), the largest `peak_rss_bytes` of a result, the 1-minute load
    average before and after, and the results themselves."""
    root = os.path.join(work, "spool-" + tag)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(os.path.join(root, "incoming"))
    for k, f in enumerate(frames):
        shutil.copy(f, os.path.join(root, "incoming", f"{k:04d}-{os.path.basename(f)}"))
    config = os.path.join(work, f"{tag}.toml")
    with open(config, "w") as f:
        f.write(f'[spool]\nroot = "{root}"\nrescan_secs = 60\n[run]\n{run}{models}\n')
    argv = [binary, "run", "--config", config, "--once"] + (["--board", board] if board else [])
    cg = Cgroup(tag, limit) if limit else None
    env = dict(os.environ, RUST_LOG="warn")
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    proc = subprocess.run(cg.wrap(argv) if cg else argv, capture_output=True, text=True, env=env)
    secs = time.monotonic() - t0
    load_after = os.getloadavg()[0]
    oom = cg.oom_kills() if cg else 0
    peak = cg.peak() if cg else None
    if cg:
        cg.remove()
    out = os.path.join(root, "out")
    results = [json.load(open(os.path.join(out, n))) for n in os.listdir(out)] if os.path.isdir(out) else []
    lat = sorted(r["time_ms"]["total"] for r in results)
    status = json.load(open(os.path.join(root, "status.json")))
    failed_models = sum(1 for r in results for m in r["models"] if "error" in m)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None
    done = sorted(r["processed_unix"] for r in results)
    return {
        "exit": proc.returncode,
        "oom_kills": oom,
        "frames": len(results),
        "secs": secs,
        "fps": len(results) / secs,
        # A stream's rate once running: start-up and the first frame's loads left out.
        "steady_fps": (len(done) - 1) / (done[-1] - done[0]) if len(done) > 2 and done[-1] > done[0] else None,
        "p50_ms": lat[len(lat) // 2] if lat else None,
        "median_ms": statistics.median(lat) if lat else None,
        "p90_ms": pct(0.9),
        "p99_ms": pct(0.99),
        "peak_rss": max((r["memory"]["peak_rss_bytes"] for r in results), default=None),
        "cgroup_peak": peak,
        "ledger_high_water": status.get("cache", {}).get("ledger_high_water_bytes"),
        "loaded": sum(m.get("layers", {}).get("loaded", 0) for r in results for m in r["models"]),
        "model_errors": failed_models,
        "load": (load_before, load_after),
        "results": results,
        "stderr": proc.stderr.strip().splitlines()[-1:] if proc.returncode else [],
    }


def run_ceiling(pkgs, frames):
    out = sh(["cargo", "bench", "-q", "--bench", "stream_ceiling", "--", "--frames", str(len(frames))]
             + pkgs + ["--"] + sorted(set(frames)), cwd=REPO)
    res = json.loads(out.strip().splitlines()[-1])
    res["steady_fps"] = res["fps"]  # its layers are loaded before its clock starts
    return res


def run_status_quo(pkgs, frames):
    t0 = time.monotonic()
    sh([BIN, "batch", "--status-quo", "--models", ",".join(pkgs), "--images"] + frames)
    secs = time.monotonic() - t0
    return {"frames": len(frames), "secs": secs, "fps": len(frames) / secs}


def run_litert(frames_count, resolver):
    """Each original model loaded once; `invoke` per model per frame on prepared inputs."""
    code = f"""
import json, time, numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType
models = {[os.path.join(FIXTURES, m + '.tflite') for m in MODELS]!r}
kind = OpResolverType.{resolver}
its = []
for m in models:
    it = Interpreter(model_path=m, experimental_op_resolver_type=kind, num_threads=1)
    it.allocate_tensors()
    d = it.get_input_details()[0]
    it.set_tensor(d["index"], np.random.default_rng(0).uniform(-1, 1, d["shape"]).astype(np.float32))
    its.append(it)
for it in its:
    it.invoke()
t0 = time.perf_counter()
for _ in range({frames_count}):
    for it in its:
        it.invoke()
secs = time.perf_counter() - t0
print(json.dumps({{"frames": {frames_count}, "secs": secs, "fps": {frames_count} / secs, "steady_fps": {frames_count} / secs}}))
"""
    return json.loads(sh([sys.executable, "-c", code]).strip().splitlines()[-1])


CEILING = "ceiling (in-process, every layer kept)"


def record(rows, r, name, res):
    rows.setdefault(name, []).append(res)
    steady = res["steady_fps"] or 0.0
    print(f"round {r} {name}: {res['fps']:.2f} frames/s ({steady:.2f} steady), p50 {res['p50_ms']} ms, "
          f"exit {res['exit']}, OOM {res['oom_kills']}, loaded {res['loaded']}, "
          f"model errors {res['model_errors']}", flush=True)


def print_ratios(rows):
    """Issue 15's ratios, each within a round (steady frames/s; the machine's speed drifts
    between rounds, so a ratio of medians over rounds would compare different speeds)."""
    pairs = [
        ("daemon keep cost-per-byte t1 50%", "baseline t1 50%"),
        ("daemon keep cost-per-byte t1 50%", "daemon off t1 50%"),
        ("daemon keep t1 none", CEILING),
        ("daemon keep t2 none", "daemon keep t1 none"),
    ]
    print("\nratios within each round (steady frames/s):")
    for num, den in pairs:
        if num not in rows or den not in rows:
            continue
        ratios = [n.get("steady_fps") / d["steady_fps"] if n.get("steady_fps") and d.get("steady_fps") else None
                  for n, d in zip(rows[num], rows[den])]
        text = ", ".join("–" if x is None else f"{x:.2f}x" for x in ratios)
        print(f"  {num} / {den}: {text}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--evictions", default="furthest-ahead,cost-per-byte",
                    help="eviction rules compared under a budget (cache kept)")
    ap.add_argument("--levels", default="none,0.5,0.25", help="fractions of the working set, or none")
    ap.add_argument("--out", default=os.path.join(REPO, "target/bench-stream"))
    ap.add_argument("--cgroup-slack", type=float, default=CGROUP_SLACK / MIB,
                    help="MiB above the budget for the cgroup limit of a budgeted run (default: issue "
                    "15's bound on peak RSS, budget + 40 MiB)")
    ap.add_argument("--baseline", help="an older memaflow binary (e.g. the issue day's, built with "
                    "`git worktree add`), run as a `baseline` row beside each level's rows")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    pkgs = packages(a.out)
    baseline = os.path.abspath(a.baseline) if a.baseline else None
    baseline_pkgs = packages(a.out, baseline, "models-baseline") if baseline else None
    frames = frame_list(a.frames)
    # The working set: the ledger's high-water mark of an unlimited run that keeps every layer.
    ws = run_daemon(a.out, pkgs, frames[:4], 1, "keep", None, None, "ws")["ledger_high_water"]
    print(f"working set (ledger high water, every layer resident): {ws / MIB:.1f} MiB", flush=True)
    threads = [int(t) for t in a.threads.split(",")]
    levels = [None if l == "none" else float(l) for l in a.levels.split(",")]
    rows = {}
    for r in range(a.rounds):
        for t in threads:
            for level in levels:
                budget = int(level * ws) if level else None
                limit = budget + int(a.cgroup_slack * MIB) if budget else None
                where = f"t{t} {'none' if level is None else f'{level:.0%}'}"
                # Eviction only matters under a budget: both rules there, on the cache kept.
                evictions = a.evictions.split(",") if level else ["furthest-ahead"]
                variants = [("keep", e) for e in evictions] + [("off", "furthest-ahead")]
                for cache, eviction in variants:
                    rule = f" {eviction}" if cache == "keep" and level else ""
                    name = f"daemon {cache}{rule} {where}"
                    res = run_daemon(a.out, pkgs, frames, t, cache, budget, limit,
                                     f"{cache}-{eviction}-{t}-{level}", eviction)
                    res.update(budget=budget, limit=limit)
                    record(rows, r, name, res)
                    if t == 1 and level is None and cache == "keep":
                        # Right after the daemon's row, so that the two are compared at the
                        # same machine speed (it drifts over a round's minutes).
                        rows.setdefault(CEILING, []).append(run_ceiling(pkgs, frames))
                        print(f"round {r} {CEILING}: {rows[CEILING][-1]['fps']:.2f} frames/s", flush=True)
                if a.baseline:
                    res = run_daemon(a.out, baseline_pkgs, frames, t, "off", budget, limit,
                                     f"baseline-{t}-{level}", binary=baseline)
                    record(rows, r, f"baseline {where}", res)
        rows.setdefault("status quo (batch --status-quo)", []).append(run_status_quo(pkgs, frames))
        for resolver, label in (("BUILTIN_REF", "litert reference kernels"), ("BUILTIN", "litert XNNPACK")):
            try:
                rows.setdefault(label, []).append(run_litert(a.frames, resolver))
            except RuntimeError as e:
                print(f"{label}: {e}", file=sys.stderr)
    print_ratios(rows)
    with open(os.path.join(a.out, "stream.json"), "w") as f:
        json.dump({"working_set": ws, "rows": rows}, f, indent=1)
    print(f"\n{a.frames} frames, {a.rounds} rounds (medians); working set {ws / MIB:.1f} MiB\n")
    print("| run | frames/s | steady frames/s | p50 ms | p99 ms | peak RSS MiB | cgroup peak MiB | layer loads | OOM kills |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    med = lambda rs, k: statistics.median(x[k] for x in rs) if all(x.get(k) is not None for x in rs) else None
    fmt = lambda v, d=1: "–" if v is None else f"{v:.{d}f}"
    for name, rs in rows.items():
        mib = lambda k: (med(rs, k) / MIB) if med(rs, k) is not None else None
        print(f"| {name} | {fmt(med(rs, 'fps'), 2)} | {fmt(med(rs, 'steady_fps'), 2)} | {fmt(med(rs, 'p50_ms'), 0)} | {fmt(med(rs, 'p99_ms'), 0)} | "
              f"{fmt(mib('peak_rss'))} | {fmt(mib('cgroup_peak'))} | {fmt(med(rs, 'loaded'), 0)} | "
              f"{sum(x.get('oom_kills', 0) for x in rs)} |")


if __name__ == "__main__":
    main()
