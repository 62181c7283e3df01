#!/usr/bin/env bash
# Spool daemon benchmark: frames per second and per-frame latency of `memaflow run --once`
# on the shared face models at two board budgets, then the idle daemon's RSS and CPU.
#
#   bash docs/bench-spool.sh            # needs ../shared (models, frames) and python3
#
# Environment: COPIES (copies of each shared frame per run, default 5), IDLE_SECS (default
# 10). Work files go to target/bench-spool/. Prints one line per board and the idle line.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=target/release/memaflow
SHARED=${SHARED:-../shared}
COPIES=${COPIES:-5}
IDLE_SECS=${IDLE_SECS:-10}
W=target/bench-spool
[[ -x $BIN ]] || cargo build --release --bin memaflow
rm -rf "$W" && mkdir -p "$W/models"
for m in face_detection_short_range face_landmark_f32; do
    "$BIN" import "$SHARED/models/$m.tflite" --out "$W/models/$m" >/dev/null
done

config() { # config SPOOL_DIR -> writes $W/memaflow.toml
    cat >"$W/memaflow.toml" <<TOML
[spool]
root = "$1"
rescan_secs = 60
[models]
dir = "models"
TOML
}

for board in pi4-2g pi-zero-2w; do
    spool=$W/spool-$board
    mkdir -p "$spool/incoming"
    for f in "$SHARED"/frames/*; do
        for c in $(seq 1 "$COPIES"); do
            name=$(basename "$f")
            cp "$f" "$spool/incoming/${name%.*}-$c.${name##*.}"
        done
    done
    n=$(ls "$spool/incoming" | wc -l)
    config "spool-$board"
    t0=$(date +%s.%N)
    RUST_LOG=warn "$BIN" run --config "$W/memaflow.toml" --board "$board" --once
    t1=$(date +%s.%N)
    python3 - "$spool" "$board" "$n" "$t0" "$t1" <<'PY'
import json, pathlib, statistics, sys
spool, board, n, t0, t1 = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
rs = [json.loads(p.read_text()) for p in pathlib.Path(spool, "out").glob("*.json")]
assert len(rs) == n, f"{len(rs)} results for {n} frames"
lat = sorted(r["time_ms"]["total"] for r in rs)
peak = max(r["memory"]["peak_rss_bytes"] for r in rs)
budget = rs[0]["memory"]["budget_bytes"]
print(f"{board:<11} budget {budget / 2**20:.0f} MiB: {n} frames in {t1 - t0:.2f} s = "
      f"{n / (t1 - t0):.2f} frames/s (with start-up); latency median {statistics.median(lat):.0f} ms, "
      f"p90 {lat[int(0.9 * (n - 1))]:.0f} ms, max {lat[-1]:.0f} ms; peak RSS {peak / 2**20:.1f} MiB")
PY
done

# Idle: an empty spool, the daemon waiting on inotify.
spool=$W/spool-idle
mkdir -p "$spool/incoming"
config "spool-idle"
RUST_LOG=warn "$BIN" run --config "$W/memaflow.toml" --board pi-zero-2w &
pid=$!
sleep 2
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
a=$(ticks)
sleep "$IDLE_SECS"
b=$(ticks)
rss=$(awk '/^VmRSS:/{print $2}' "/proc/$pid/status")
hz=$(getconf CLK_TCK)
kill -TERM "$pid"
wait "$pid"
python3 -c "print(f'idle: RSS {$rss / 1024:.1f} MiB, CPU {($b - $a) / $hz / $IDLE_SECS * 100:.2f}% over ${IDLE_SECS} s ({$b - $a} ticks)')"
