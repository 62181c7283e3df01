#!/usr/bin/env python3
"""Benchmark of `memaflow publish` against a local mosquitto (docs/publish.md).

    cargo build --release && python3 docs/bench-publish.py [--runs 3]

1. Throughput: N results already in out/ (a backlog after the broker was away), the
   publisher started: results per second until the subscriber has every message, for a
   topic without {model} (one message per result) and with it (one per model).
2. Delay: the publisher running, results written at a steady rate; the delay from the
   rename into out/ to the message at the subscriber (mosquitto_sub's receive time),
   p50 and p99.

Needs mosquitto and mosquitto-clients (Debian packages). Everything runs on 127.0.0.1.
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(REPO, "target", "release", "memaflow")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def result(i, written):
    """A result of the shape the daemon writes: two models, outputs summarised."""
    summary = {"name": "conv2d_20", "shape": [1, 1, 1, 1404], "min": -24.747452,
               "max": 146.32565, "mean": 59.197533, "argmax": 457,
               "top5": [{"index": 457 + k, "value": 146.32565 - k} for k in range(5)]}
    models = [{"name": name, "report": "summary", "outputs": [summary, summary],
               "time_ms": {"start": 0.274, "end": 80.018, "load": 216.07, "exec": 13.754},
               "memory": {"ledger_high_water_bytes": 15863856}}
              for name in ("face_detection_short_range", "face_landmark_f32")]
    return {"frame": f"cam-{i:06}.jpg", "id": i, "written_unix": written, "bytes": 791555,
            "width": 512, "height": 512, "processed_unix": written, "models": models,
            "time_ms": {"decode": 2.461, "inference": 192.145, "total": 206.133}}


def write_result(out, i):
    tmp = os.path.join(out, f".{i}.tmp")
    with open(tmp, "w") as f:
        # The written time is taken last, just before the rename that publishes it.
        body = result(i, 0.0)
        body["written_unix"] = time.time()
        f.write(json.dumps(body))
    os.rename(tmp, os.path.join(out, f"cam-{i:06}.jpg.json"))


class Setup:
    def __init__(self, topic):
        self.dir = tempfile.mkdtemp(prefix="memaflow-bench-publish-")
        self.port = free_port()
        conf = os.path.join(self.dir, "mosquitto.conf")
        with open(conf, "w") as f:
            f.write(f"user root\nlistener {self.port} 127.0.0.1\nallow_anonymous true\n"
                    "max_queued_messages 0\n")
        self.broker = subprocess.Popen(["mosquitto", "-c", conf], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        wait(lambda: connectable(self.port), "mosquitto")
        self.received = os.path.join(self.dir, "received.txt")
        self.sub = subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(self.port), "-q", "1",
             "-t", "memaflow/#", "-F", "%U %p"],
            stdout=open(self.received, "w"), stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        self.out = os.path.join(self.dir, "spool", "out")
        os.makedirs(self.out)
        self.config = os.path.join(self.dir, "memaflow.toml")
        with open(self.config, "w") as f:
            f.write('[spool]\nroot = "spool"\n[[model]]\npath = "unused"\n'
                    f'[publish]\nhost = "127.0.0.1"\nport = {self.port}\ndevice = "bench"\n'
                    f'topic = "{topic}"\n')
        self.publisher = None
        self.seen = 0
        self.reader = open(self.received)

    def start_publisher(self):
        self.publisher = subprocess.Popen([BIN, "publish", "--config", self.config],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          env={**os.environ, "RUST_LOG": "warn"})

    def count(self):
        """Messages received so far (reads only what was appended since the last call)."""
        self.seen += self.reader.read().count("\n")
        return self.seen

    def lines(self):
        with open(self.received) as f:
            return [l for l in f.read().split("\n") if l]

    def close(self):
        self.reader.close()
        for p in (self.publisher, self.sub, self.broker):
            if p:
                p.terminate()
                p.wait()
        shutil.rmtree(self.dir)


def connectable(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def wait(done, what, limit=120):
    start = time.time()
    while not done():
        if time.time() - start > limit:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)


def throughput(n, topic, per_result):
    s = Setup(topic)
    try:
        for i in range(n):
            write_result(s.out, i)
        start = time.time()
        s.start_publisher()
        wait(lambda: s.count() >= n * per_result, "every message")
        return n / (time.time() - start)
    finally:
        s.close()


def delay(n, rate):
    s = Setup("memaflow/{device}")
    try:
        s.start_publisher()
        time.sleep(1.0)
        for i in range(n):
            write_result(s.out, i)
            time.sleep(1.0 / rate)
        wait(lambda: s.count() >= n, "every message")
        delays = []
        for line in s.lines():
            at, payload = line.split(" ", 1)
            delays.append((float(at) - json.loads(payload)["written_unix"]) * 1000)
        delays.sort()
        return delays[len(delays) // 2], delays[int(len(delays) * 0.99)]
    finally:
        s.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--backlog", type=int, default=5000)
    ap.add_argument("--steady", type=int, default=1000, help="results in the delay run")
    ap.add_argument("--rate", type=float, default=50.0, help="results per second written")
    args = ap.parse_args()
    whole, per_model, p50s, p99s = [], [], [], []
    for run in range(args.runs):
        whole.append(throughput(args.backlog, "memaflow/{device}", 1))
        per_model.append(throughput(args.backlog, "memaflow/{device}/{model}", 2))
        p50, p99 = delay(args.steady, args.rate)
        p50s.append(p50)
        p99s.append(p99)
        print(f"run {run + 1}: {whole[-1]:.0f} results/s (one message each), "
              f"{per_model[-1]:.0f} results/s (a message per model), "
              f"delay p50 {p50:.2f} ms, p99 {p99:.2f} ms", flush=True)
    med = statistics.median
    print(f"median of {args.runs}: backlog of {args.backlog}: {med(whole):.0f} results/s "
          f"(one message each), {med(per_model):.0f} results/s (two models, a message each); "
          f"{args.steady} results at {args.rate:g}/s: delay p50 {med(p50s):.2f} ms, "
          f"p99 {med(p99s):.2f} ms")


if __name__ == "__main__":
    main()
