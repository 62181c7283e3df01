#!/usr/bin/env python3
"""Fused tiling on yolov2_16: predicted vs measured peak and latency per configuration,
the searched configuration vs a measured sweep, and runs under a memory cgroup.

Every measurement is one fresh `memaflow infer` process (peak = VmHWM delta over the run,
`run_peak_delta_bytes`; latency = `time_ms.total`, load + exec). Configurations are run
in interleaved rounds so that load from other processes spreads over all of them; the
tables give medians. Usage (from the repository, after `cargo build --release`):

    python3 benches/tiling.py predictor            # predicted vs measured, fixed configs
    python3 benches/tiling.py calibrate            # fits the latency constants
    python3 benches/tiling.py sweep --budget 28M   # search's choice vs the measured sweep
    python3 benches/tiling.py cgroup --limit 36M   # untiled vs tiled under memory.limit
"""

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(REPO, "target/release/memaflow")
MIB = 1 << 20

PREDICTOR_CONFIGS = [
    "off",
    "0-0:1x1",
    "0-0:2x2",
    "0-0:4x4",
    "0-1:2x2",
    "0-1:4x4",
    "0-2:3x3",
    "0-4:4x4",
    "0-4:8x8",
    "0-1:4x4,2-4:2x2",
    "0-11:1x1",
    "0-11:4x4",
]


def sh(args, **kw):
    out = subprocess.run(args, capture_output=True, text=True, **kw)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


def setup(work):
    """The yolov2_16 package and one fixed input tensor in `work`."""
    pkg = os.path.join(work, "yolov2_16")
    if not os.path.exists(pkg):
        sh([BIN, "zoo", "--out", work, "--only", "yolov2_16"])
    npy = os.path.join(work, "input.npy")
    if not os.path.exists(npy):
        frame = os.path.join(REPO, "../shared/frames/astronaut.png")
        sh([BIN, "infer", "--model", pkg, frame, "--save-input", npy])
    return pkg, npy


def measure(pkg, npy, config, prefix=()):
    """(peak delta bytes, wall ms of the run, CPU ms of the whole process)."""
    args = list(prefix) + [BIN, "infer", "--model", pkg, "--input-npy", npy, "--tiling", config]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    d = json.loads(sh(args))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1e3
    return d["run_peak_delta_bytes"], d["time_ms"]["total"], cpu


def rounds(pkg, npy, configs, runs):
    """Per config, medians of (peak, wall ms, CPU ms), then the largest peak."""
    got = {c: ([], [], []) for c in configs}
    for r in range(runs):
        for c in configs:
            for into, v in zip(got[c], measure(pkg, npy, c)):
                into.append(v)
        print(f"round {r + 1}/{runs} done", file=sys.stderr)
    return {c: tuple(statistics.median(v) for v in got[c]) + (max(got[c][0]),) for c in configs}


def predict(pkg, configs):
    out = {}
    for line in sh([BIN, "tile", "predict", pkg] + list(configs)).splitlines():
        d = json.loads(line)
        out[d["config"]] = d["estimate"]
    return out


def cmd_predictor(a, pkg, npy):
    configs = a.configs or PREDICTOR_CONFIGS
    pred = predict(pkg, configs)
    meas = rounds(pkg, npy, configs, a.runs)
    base_peak, base_ms = meas["off"][:2] if "off" in meas else (None, None)
    print("| config | predicted peak | measured peak | error | largest measured | error | predicted ms | wall ms | CPU ms | peak / untiled | wall / untiled |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    within = 0
    worst = 0.0
    for c in configs:
        p, m = pred[c], meas[c]
        err = p["peak_bytes"] / m[0] - 1
        within += abs(err) <= 0.10
        worst = min(worst, p["peak_bytes"] / m[3] - 1)
        rel = (f"{m[0] / base_peak:.2f}", f"{m[1] / base_ms:.2f}") if base_peak else ("", "")
        print(f"| `{c}` | {p['peak_bytes'] / MIB:.1f} MiB | {m[0] / MIB:.1f} MiB | {err:+.1%} "
              f"| {m[3] / MIB:.1f} MiB | {p['peak_bytes'] / m[3] - 1:+.1%} "
              f"| {p['secs'] * 1e3:.0f} | {m[1]:.0f} | {m[2]:.0f} | {rel[0]} | {rel[1]} |")
    print(f"\n{within} of {len(configs)} predictions within 10% of the measured peak "
          f"(medians of {a.runs} runs); worst under-prediction of a run's peak {worst:+.1%}")


CALIBRATION_CONFIGS = [
    "off", "0-0:1x1", "0-0:2x2", "0-0:4x4", "0-0:8x8", "0-1:2x2", "0-1:8x8", "0-2:6x6",
    "0-4:2x2", "0-4:4x4", "0-4:8x8", "0-11:1x1", "0-11:2x2", "0-11:4x4",
]


def cmd_calibrate(a, pkg, npy):
    """Least-squares latency constants: secs = flops·a + tiles·b + plans·c + planned weight
    bytes·d + a constant, fitted to the process's CPU time (user + sys): on a shared machine it
    varies far less than wall-clock time, and tract runs on one thread. The constant is
    the process's own start-up and input reading, outside the run the predictor models."""
    configs = a.configs or CALIBRATION_CONFIGS
    pred = predict(pkg, configs)
    meas = rounds(pkg, npy, configs, a.runs)
    rows = [[pred[c]["flops"], pred[c]["tiles"], pred[c]["plans"], pred[c]["plan_weight_bytes"], 1]
            for c in configs]
    ys = [meas[c][2] / 1e3 for c in configs]
    # Non-negative least squares by elimination: a feature whose fitted cost comes out
    # negative (noise on a shared machine) is dropped and the rest refitted.
    active = list(range(len(rows[0])))
    while True:
        coef = dict(zip(active, solve([[r[i] for i in active] for r in rows], ys)))
        negative = [i for i in active if coef[i] < 0]
        if not negative:
            break
        active.remove(negative[0])
    coef = [coef.get(i, 0.0) for i in range(len(rows[0]))]
    names = ["secs_per_flop", "secs_per_tile", "secs_per_plan", "plan_secs_per_weight_byte",
             "(process start-up, s)"]
    print("| config | CPU ms | fitted ms |\n|---|---:|---:|")
    for c, r, y in zip(configs, rows, ys):
        print(f"| `{c}` | {y * 1e3:.0f} | {sum(k * x for k, x in zip(coef, r)) * 1e3:.0f} |")
    print()
    for k, v in zip(names, coef):
        print(f"    {k}: {v:.3e},")
    print(f"\n(medians of {a.runs} runs, peaks measured too: "
          + ", ".join(f"{c} {meas[c][0] / MIB:.1f} MiB" for c in configs) + ")")


def solve(rows, ys):
    """Least squares via the normal equations (scaled), Gaussian elimination."""
    n = len(rows[0])
    m = [[sum(r[i] * r[j] for r in rows) for j in range(n)] + [sum(r[i] * y for r, y in zip(rows, ys))]
         for i in range(n)]
    scale = [m[i][i] ** 0.5 or 1 for i in range(n)]
    m = [[m[i][j] / (scale[i] * scale[j]) for j in range(n)] + [m[i][n] / scale[i]] for i in range(n)]
    for i in range(n):
        p = max(range(i, n), key=lambda r: abs(m[r][i]))
        m[i], m[p] = m[p], m[i]
        for r in range(n):
            if r != i:
                f = m[r][i] / m[i][i]
                m[r] = [x - f * y for x, y in zip(m[r], m[i])]
    return [m[i][n] / m[i][i] / scale[i] for i in range(n)]


def sweep_configs(max_end, grids):
    """One group of layers 0..e, or two groups 0..a and a+1..e, square and 2:1 grids."""
    out = []
    for e in range(max_end):
        for g in grids:
            out.append(f"0-{e}:{g}")
    for a in range(max_end - 1):
        for e in range(a + 1, max_end):
            for g in grids[:3]:
                out.append(f"0-{a}:{g},{a + 1}-{e}:2x2")
    return out


def cmd_sweep(a, pkg, npy):
    plan = sh([BIN, "tile", "plan", pkg, "--budget", a.budget])
    print(plan)
    chosen = plan.split("--tiling ")[1].split()[0]
    candidates = sweep_configs(a.max_end, a.grids.split(","))
    if chosen not in candidates:
        candidates.append(chosen)
    pred = predict(pkg, candidates)
    budget = parse_size(a.budget)
    fitting = [c for c in candidates if pred[c]["peak_bytes"] <= budget]
    print(f"{len(candidates)} configurations in the sweep, {len(fitting)} predicted to fit {a.budget}",
          file=sys.stderr)
    meas = rounds(pkg, npy, fitting, a.runs)
    really = {c: m for c, m in meas.items() if m[0] <= budget}
    print("| config | predicted peak | measured peak | predicted ms | wall ms | CPU ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for c in sorted(meas, key=lambda c: meas[c][2]):
        mark = " (search)" if c == chosen else ""
        print(f"| `{c}`{mark} | {pred[c]['peak_bytes'] / MIB:.1f} MiB | {meas[c][0] / MIB:.1f} MiB "
              f"| {pred[c]['secs'] * 1e3:.0f} | {meas[c][1]:.0f} | {meas[c][2]:.0f} |")
    for k, what in ((1, "wall"), (2, "CPU")):
        best = min(really, key=lambda c: really[c][k])
        print(f"\n{what}: search chose `{chosen}` {meas[chosen][k]:.0f} ms (peak {meas[chosen][0] / MIB:.1f} MiB); "
              f"best measured within the budget `{best}` {really[best][k]:.0f} ms; "
              f"ratio {meas[chosen][k] / really[best][k]:.3f} (medians of {a.runs} runs)")


def cmd_cgroup(a, pkg, npy):
    """Each run in a fresh memory cgroup (v1) with `memory.limit_in_bytes` = --limit; no swap
    on the machine, so a run that needs more is killed by the cgroup's OOM killer. The
    cgroup charges the process's anonymous memory and the file pages it faults in first;
    the binary's pages already cached elsewhere are not charged, so the charged peak is
    below the RSS peak."""
    root = "/sys/fs/cgroup/memory"
    print(f"| config | runs completed under {a.limit} | ms (median) | charged peak (max) | failcnt (max) |")
    print("|---|---|---:|---:|---:|")
    for c in a.configs:
        done, times, charged, fails = 0, [], [], []
        for _ in range(a.runs):
            cg = os.path.join(root, f"memaflow-tiling-{os.getpid()}")
            os.mkdir(cg)
            try:
                with open(os.path.join(cg, "memory.limit_in_bytes"), "w") as f:
                    f.write(str(parse_size(a.limit)))
                enter = ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh"]
                try:
                    _, ms, _ = measure(pkg, npy, c, prefix=enter)
                    done += 1
                    times.append(ms)
                except RuntimeError:
                    pass
                for name, into in (("memory.max_usage_in_bytes", charged), ("memory.failcnt", fails)):
                    with open(os.path.join(cg, name)) as f:
                        into.append(int(f.read()))
            finally:
                os.rmdir(cg)
        ms = f"{statistics.median(times):.0f}" if times else "killed"
        print(f"| `{c}` | {done}/{a.runs} | {ms} | {max(charged) / MIB:.1f} MiB | {max(fails)} |")


def parse_size(s):
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMG]?)(I?B)?\s*", s.upper())
    if not m:
        raise ValueError(f"'{s}' is not a size (try 28M)")
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "memaflow-tiling-bench"))
    p.add_argument("--runs", type=int, default=5)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("predictor")
    s.add_argument("configs", nargs="*")
    s = sub.add_parser("calibrate")
    s.add_argument("configs", nargs="*")
    s = sub.add_parser("sweep")
    s.add_argument("--budget", required=True)
    s.add_argument("--max-end", type=int, default=5, help="groups end at most at layer N-1")
    s.add_argument("--grids", default="2x2,3x3,4x4,2x1,6x6,8x8")
    s = sub.add_parser("cgroup")
    s.add_argument("--limit", required=True)
    s.add_argument("configs", nargs="+")
    a = p.parse_args()
    os.makedirs(a.work, exist_ok=True)
    pkg, npy = setup(a.work)
    {"predictor": cmd_predictor, "calibrate": cmd_calibrate, "sweep": cmd_sweep,
     "cgroup": cmd_cgroup}[a.cmd](a, pkg, npy)


if __name__ == "__main__":
    main()
