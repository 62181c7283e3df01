#!/usr/bin/env bash
# Two memaflow binaries on the same spool, in alternating pairs: on a shared machine whose
# speed drifts from minute to minute, only a comparison within a pair means anything.
#
#   benches/daemon_ab.sh CONFIG OLD_BIN NEW_BIN [PAIRS] [FRAMES]
#
# CONFIG is a daemon configuration (its [spool] root is replaced by a fresh spool holding
# FRAMES copies of ../shared/frames, default 30); each binary runs `run --config C --once`
# under `perf stat`. One line per run: steady frames/s (first result to last, start-up
# left out), median latency (`time_ms.total`), layer loads, CPU time and page faults of
# the whole process. `benches/stream.py` writes such configurations into its --out
# directory (e.g. keep-furthest-ahead-1-None.toml: no budget, one thread).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 3 ]] || { sed -n '2,12p' "$0"; exit 2; }
config=$1 old=$2 new=$3 pairs=${4:-3} frames=${5:-30}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mapfile -t shared < <(ls ../shared/frames/*)
run_one() { # run_one LABEL BIN
    local spool=$work/spool-$1
    rm -rf "$spool" && mkdir -p "$spool/incoming"
    for ((k = 0; k < frames; k++)); do
        f=${shared[$((k % ${#shared[@]}))]}
        cp "$f" "$spool/incoming/$(printf %04d $k)-${f##*/}"
    done
    sed -E "s#^root = .*#root = \"$spool\"#" "$config" > "$spool.toml"
    RUST_LOG=warn perf stat -e task-clock,page-faults -x, -o "$spool.perf" \
        "$2" run --config "$spool.toml" --once
    python3 - "$spool" "$1" <<'PY'
import glob, json, statistics, sys
spool, label = sys.argv[1], sys.argv[2]
results = [json.load(open(f)) for f in sorted(glob.glob(spool + "/out/*.json"))]
done = sorted(r["processed_unix"] for r in results)
counters = {l.split(",")[2]: float(l.split(",")[0]) for l in open(spool + ".perf") if l.count(",") > 2}
steady = (len(done) - 1) / (done[-1] - done[0]) if len(done) > 2 else float("nan")
p50 = statistics.median(r["time_ms"]["total"] for r in results)
loads = sum(m.get("layers", {}).get("loaded", 0) for r in results for m in r["models"])
print(f"{label:8s} frames {len(results)} steady {steady:.2f}/s p50 {p50:.0f} ms loads {loads} "
      f"cpu {counters.get('task-clock', 0) / 1e3:.2f} s page faults {counters.get('page-faults', 0):.0f}")
PY
}
for ((i = 1; i <= pairs; i++)); do
    run_one "old$i" "$old"
    run_one "new$i" "$new"
done
