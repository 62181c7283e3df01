#!/usr/bin/env python3
"""The default face pipeline at board budgets: frames/s and per-frame latency of
`memaflow run --once --board BOARD` with `models/pipeline.toml` (face detection → face
landmarks on each face's crop) over the default model set's packages (`models/build`),
on a photo with one face and on one with six.

Photos: `astronaut.png` from ../shared/frames (one face), and a 3×2 mosaic made here of
six 192×192 crops of that same photo (as is, mirrored, shifted; 576×384): six detections,
so six landmark inferences a frame. The other shared portrait, `camera.png`, is a profile
that the short-range detector finds only now and then in such a mosaic (scores near its
0.5 threshold), so it is left out: every frame of a run has the same work.

Each run is a fresh process over --frames copies of one photo, with only the pipeline in
the configuration, so the board's [run] defaults apply (`board/*.toml`: budget, reserve,
threads, parallel, frames in flight). Runs go in interleaved rounds (board × photo per
round); the table gives medians over --rounds. frames/s counts the whole `run --once`,
start-up (package checks) included; latency is a result's `time_ms.total` (read, decode,
preprocess, both models, report) with frames in flight sharing the workers; peak RSS is
the largest `memory.peak_rss_bytes` of a run's results (the process's high-water mark).
The figures are this host's: the board's memory budget and thread count, not its CPU.

Usage (from the repository, after `bash tests/fetch-fixtures` and `cargo build --release`):

    python3 benches/face_pipeline.py --frames 20 --rounds 3
"""

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stream  # noqa: E402  (run_spool: one daemon run over a spool, timed)

REPO = stream.REPO
BOARDS = ["pi-zero-2w", "pi4-2g"]
VENV_PYTHON = os.path.join(REPO, "target/fixtures/mediapipe-py/bin/python")
ASTRONAUT = os.path.join(stream.SHARED_FRAMES, "astronaut.png")
MIB = 1 << 20

# The six crops of the mosaic: centre (x, y) in astronaut.png and whether mirrored. The
# face's box there is about (177, 81)–(272, 175).
TILE = 192
CROPS = [(225, 128, False), (225, 128, True), (200, 110, False),
         (250, 145, True), (215, 140, False), (235, 118, True)]
MOSAIC_CODE = """
import sys, cv2, numpy as np
src, dst, tile, crops = sys.argv[1], sys.argv[2], int(sys.argv[3]), eval(sys.argv[4])
photo = cv2.imread(src, cv2.IMREAD_COLOR)
tiles = []
for cx, cy, mirrored in crops:
    x0 = min(max(cx - tile // 2, 0), photo.shape[1] - tile)
    y0 = min(max(cy - tile // 2, 0), photo.shape[0] - tile)
    t = photo[y0:y0 + tile, x0:x0 + tile]
    tiles.append(t[:, ::-1] if mirrored else t)
rows = [np.concatenate(tiles[k:k + 3], axis=1) for k in (0, 3)]
if not cv2.imwrite(dst, np.concatenate(rows, axis=0)):
    sys.exit("cannot write " + dst)
"""


def mosaic(out):
    """The six-face mosaic, written with OpenCV from tests/fetch-fixtures' venv."""
    path = os.path.join(out, "six-faces.png")
    stream.sh([VENV_PYTHON, "-c", MOSAIC_CODE, ASTRONAUT, path, str(TILE), repr(CROPS)])
    return path


def build_models(out):
    """The default model set's packages, as the image has them."""
    dest = os.path.join(out, "models")
    stream.sh([sys.executable, os.path.join(REPO, "models/build"), "--memaflow", stream.BIN,
               "--out", dest])
    return dest


def faces_and_meshes(results):
    """Per result: (faces detected, face crops whose mesh is present)."""
    counts = []
    for r in results:
        by_name = {m["name"]: m for m in r["models"]}
        detections = by_name["face_detection_short_range"]["outputs"]["detections"]
        meshes = sum(1 for d in detections for c in d["crops"] if c.get("present"))
        counts.append((len(detections), meshes))
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=20, help="copies of the photo per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(REPO, "target/bench-face-pipeline"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    models = build_models(a.out)
    with open(os.path.join(REPO, "models/pipeline.toml")) as f:
        pipeline = f'[models]\ndir = "{models}"\n' + f.read()
    photos = {"1 face (astronaut.png)": (ASTRONAUT, 1), "6 faces (3×2 mosaic)": (mosaic(a.out), 6)}
    rows = {}
    for r in range(a.rounds):
        for board in BOARDS:
            for label, (photo, faces) in photos.items():
                tag = f"{board}-{faces}"
                res = stream.run_spool(a.out, tag, [photo] * a.frames, "", pipeline, board=board)
                results = res.pop("results")
                counts = faces_and_meshes(results)
                budget = results[0]["memory"]["budget_bytes"] if results else None
                res.update(budget=budget, counts=sorted(set(counts)))
                if res["exit"] != 0 or res["frames"] != a.frames or res["model_errors"]:
                    sys.exit(f"{tag}: exit {res['exit']}, {res['frames']} of {a.frames} results, "
                             f"{res['model_errors']} model errors: {res['stderr']}")
                if counts != [(faces, faces)] * a.frames:
                    sys.exit(f"{tag}: (faces, meshes) per frame {sorted(set(counts))}, "
                             f"expected ({faces}, {faces}) on every frame")
                rows.setdefault((board, label), []).append(res)
                print(f"round {r} {board} {label}: {res['fps']:.2f} frames/s, median "
                      f"{res['median_ms']:.0f} ms, p90 {res['p90_ms']:.0f} ms, peak RSS "
                      f"{res['peak_rss'] / MIB:.1f} MiB, load {res['load'][0]:.2f} → "
                      f"{res['load'][1]:.2f}", flush=True)
    with open(os.path.join(a.out, "face_pipeline.json"), "w") as f:
        json.dump({f"{b}|{l}": rs for (b, l), rs in rows.items()}, f, indent=1)
    print(table({f"{b}|{l}": rs for (b, l), rs in rows.items()}, a.frames))


def table(rows, frames):
    """The Markdown table of `rows` ("BOARD|PHOTO" → runs), medians over the runs."""
    loads = [x for rs in rows.values() for res in rs for x in res["load"]]
    rounds = min(len(rs) for rs in rows.values())
    lines = [f"\n{frames} frames a run, {rounds} rounds (medians over rounds); 1-minute load "
             f"average {min(loads):.2f}–{max(loads):.2f} (median {statistics.median(loads):.2f})\n",
             "| board (budget) | photo | frames/s | latency median ms | p90 ms | peak RSS MiB "
             "| ledger high water MiB | layer loads |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    med = lambda rs, k: statistics.median(x[k] for x in rs)
    for key, rs in rows.items():
        board, label = key.split("|")
        budget = rs[0]["budget"]
        name = f"{board} ({budget / MIB:.0f} MiB)" if budget else board
        lines.append(f"| {name} | {label} | {med(rs, 'fps'):.2f} | {med(rs, 'median_ms'):.0f} | "
                     f"{med(rs, 'p90_ms'):.0f} | {med(rs, 'peak_rss') / MIB:.1f} | "
                     f"{med(rs, 'ledger_high_water') / MIB:.1f} | {med(rs, 'loaded'):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
