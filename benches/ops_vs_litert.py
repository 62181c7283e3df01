#!/usr/bin/env python3
"""Where tract loses to ai-edge-litert with XNNPACK, per op type: every layer file of the
four stream models run warm in tract (`cargo bench --bench layer_times`: planned once,
median of 21 runs on the model's own activations) and in ai-edge-litert (the same layer
file, XNNPACK and reference kernels, one thread, median of 21 invokes on inputs of the
layer's shapes). A layer is one weighted op and the weightless ops after it; layers are
grouped by their weighted op (the first), with the number of layers and the summed
medians. Usage, after `bash tests/fetch-fixtures` and `cargo build --release`:

    python3 benches/ops_vs_litert.py
"""

import collections
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benches"))
from stream import BIN, packages, sh  # noqa: E402

RUNS = 21


def litert_ms(path, resolver):
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=path, num_threads=1,
                     experimental_op_resolver_type=getattr(OpResolverType, resolver))
    it.allocate_tensors()
    rng = np.random.default_rng(0)
    for d in it.get_input_details():
        it.set_tensor(d["index"], rng.uniform(-1, 1, d["shape"]).astype(np.float32))
    it.invoke()
    times = []
    for _ in range(RUNS):
        t = time.perf_counter()
        it.invoke()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    work = os.path.join(REPO, "target/bench-stream")
    os.makedirs(work, exist_ok=True)
    pkgs = packages(work)
    out = sh(["cargo", "bench", "-q", "--bench", "layer_times", "--"] + pkgs, cwd=REPO)
    rows = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    groups = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    for r in rows:
        xnn = litert_ms(r["file"], "BUILTIN")
        ref = litert_ms(r["file"], "BUILTIN_REF")
        g = groups[r["ops"][0]]
        g[0] += 1
        g[1] += r["tract_ms"]
        g[2] += xnn
        g[3] += ref
    total = [sum(g[i] for g in groups.values()) for i in range(4)]
    print(f"{len(rows)} layers of {len(pkgs)} models, per frame (one pass of each model)\n")
    print("| weighted op | layers | tract ms | litert XNNPACK ms | litert reference ms | tract / XNNPACK |")
    print("|---|---:|---:|---:|---:|---:|")
    for op, (n, t, x, f) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        print(f"| {op} | {n} | {t:.2f} | {x:.2f} | {f:.2f} | {t / x:.1f}× |")
    print(f"| all | {total[0]} | {total[1]:.2f} | {total[2]:.2f} | {total[3]:.2f} | {total[1] / total[2]:.1f}× |")


if __name__ == "__main__":
    main()
