"""How fast is the slim engine, and how much memory does it take, on ResNet-50-size graphs and deeper?

For depth multipliers d (default 1, 2, 4) a ResNet-50 with d times as many bottleneck blocks per stage
(d = 1: ~25.6 M params, ~100 MB) is built with per-channel masks zeroing a random half of the channels
(the masked form of ``bench_resnet50_speedup.py``). Each depth runs in a fresh child process that
loads the model and calls ``slim(model)`` ``--repeat`` times (in memory; that includes normalising,
shape inference, the analysis, the rewrite, mask folding, dead-code removal, re-inference, the full
``onnx.checker`` check and the MAC counts). Printed per depth: nodes, params, weights (MB), the median /
min / max slim time, time per node relative to d = 1 (linear scaling keeps it near 1.0), and peak memory:

* ``peak/weights``: in a separate fresh process that loads the model and slims it once, the peak RSS
  (VmHWM) minus the RSS after imports, over the weight bytes — loading the input included (protobuf
  parsing alone holds the file bytes and the parsed model at once: 2x);
* ``slim peak/weights``: the RSS that ``slim`` adds on top of the loaded model at its peak, sampled
  every 0.5 ms by a thread (the kernel's high-water mark cannot be reset on every system).

Memory is measured on one run in its own process because the C allocator keeps freed memory for reuse:
repeated runs in one process would count earlier runs' freed (but still resident) memory.

Targets: under 1 s for ResNet-50 size, time linear in nodes, peak memory under 3x the weights.

    python tools/bench_slim.py --repeat 5
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_resnet50_speedup import STAGES, ResNetBuilder, random_kept, resnet50_weights  # noqa: E402


def build(depth: int, path: Path) -> None:
    stages = tuple((width, blocks * depth, stride) for width, blocks, stride in STAGES)
    weights, full = resnet50_weights(seed=0, stages=stages)
    kept = random_kept(full, keep=0.5, seed=0)
    model = ResNetBuilder("masked", weights, kept, full, size=224, stages=stages).build()
    path.write_bytes(model.SerializeToString())


def measure_time(path: str, repeat: int) -> dict:
    """Child process: load once, slim ``repeat`` times."""
    import onnx

    from onnxslim.graph.slim import slim

    start = time.perf_counter()
    model = onnx.load(path)
    load_s = time.perf_counter() - start
    times, report = [], None
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        report = slim(model)[1]
        times.append(time.perf_counter() - start)
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    return {"nodes": len(model.graph.node), "params": report.params_before, "params_after": report.params_after,
            "weights_mb": weights / 2**20, "load_s": load_s, "times_s": times}


class RssSampler:
    """Highest VmRSS seen by a background thread polling every 0.5 ms."""

    def __init__(self, read_kib):
        self.read_kib, self.peak, self.running = read_kib, 0, True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.read_kib("VmRSS") * 1024)
            time.sleep(0.0005)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return self.peak


def measure_memory(path: str) -> dict:
    """Child process: peak RSS of loading the model and slimming it once."""
    import onnx

    from onnxslim.graph.slim import slim
    from onnxslim.validate.memprobe import proc_status_kib

    gc.collect()
    baseline = proc_status_kib("VmRSS") * 1024
    model = onnx.load(path)
    loaded = proc_status_kib("VmRSS") * 1024
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    sampler = RssSampler(proc_status_kib)
    slim(model)
    slim_peak = max(sampler.stop(), proc_status_kib("VmRSS") * 1024)
    peak = proc_status_kib("VmHWM") * 1024
    return {"peak_over_weights": (peak - baseline) / weights, "slim_peak_over_weights": (slim_peak - loaded) / weights}


def child(mode: str, path: Path, repeat: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(path), str(repeat)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="1,2,4", help="depth multipliers (1,2,4)")
    parser.add_argument("--repeat", type=int, default=5, help="slim runs per depth; the median is reported (5)")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "MODEL", "REPEAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        depths = [int(d) for d in args.depths.split(",")]
    except ValueError:
        parser.error(f"--depths takes comma-separated integers, got {args.depths!r}")
    if args.repeat < 1 or min(depths) < 1:
        parser.error(f"--repeat and every --depths value must be >= 1, got {args.repeat} and {args.depths}")
    if args.child:
        mode, path, repeat = args.child
        print(json.dumps(measure_time(path, int(repeat)) if mode == "time" else measure_memory(path)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for depth in depths:
            path = Path(tmp) / f"resnet50_x{depth}.onnx"
            build(depth, path)
            result = child("time", path, args.repeat) | child("memory", path, 1)
            result["depth"] = depth
            rows.append(result)
            path.unlink()
    base = statistics.median(rows[0]["times_s"]) / rows[0]["nodes"]
    header = (f"{'depth':>5} {'nodes':>6} {'params':>12} {'weights MB':>10} {'median s':>9} {'min s':>7} {'max s':>7} "
              f"{'s/node vs x1':>12} {'peak/weights':>12} {'slim peak/weights':>17}")
    print(header)
    print("-" * len(header))
    for row in rows:
        median = statistics.median(row["times_s"])
        print(f"{row['depth']:>5} {row['nodes']:>6} {row['params']:>12,} {row['weights_mb']:>10.1f} {median:>9.3f} "
              f"{min(row['times_s']):>7.3f} {max(row['times_s']):>7.3f} {median / row['nodes'] / base:>12.2f} "
              f"{row['peak_over_weights']:>12.2f} {row['slim_peak_over_weights']:>17.2f}")
    print(f"(load time of the x1 model: {rows[0]['load_s']:.3f} s; params after slimming x1: {rows[0]['params_after']:,})")
    return 0


if __name__ == "__main__":
    from onnxslim.errors import run_main

    run_main(main)
