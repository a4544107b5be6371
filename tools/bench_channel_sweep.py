"""How does onnxruntime's CPU convolution latency depend on the channel count? (the rule behind ``--round-to auto``)

Builds one small graph per channel count ``c``: ``x[1, B, S, S] -> Conv 3x3 (B -> c) -> Relu -> Conv 3x3
(c -> B) -> Relu`` (so ``c`` is the output count of one convolution and the input count of the next,
as for a pruned layer), plus a depthwise variant with ``--depthwise`` (``B -> c`` 1x1, depthwise 3x3 on
``c``, 1x1 ``c -> B``). All variants are timed together with :func:`onnxslim.validate.bench.benchmark`
(random order per round, one thread by default); per ``c`` it prints the median latency, the latency
per MAC relative to the best, and whether onnxruntime ran the convolutions in its blocked NCHWc layout
(seen in its profiler: nodes it renamed ``*_nchwc``) and the NCHWc block size of this CPU
(:func:`onnxslim.graph.rounding.detect_target`).

    python tools/bench_channel_sweep.py --channels 24:72 --rounds 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def conv_pair(base: int, channels: int, size: int, depthwise: bool, seed: int = 0) -> tuple[onnx.ModelProto, int]:
    """The swept graph and its MACs."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def conv(name, source, cin, cout, kernel, group=1):
        weight = rng.standard_normal((cout, cin // group, kernel, kernel)).astype(np.float32) * 0.1
        inits.append(numpy_helper.from_array(weight, f"{name}_w"))
        inits.append(numpy_helper.from_array(np.zeros(cout, np.float32), f"{name}_b"))
        pad = kernel // 2
        nodes.append(helper.make_node("Conv", [source, f"{name}_w", f"{name}_b"], [f"{name}_c"], name=name,
                                      pads=[pad] * 4, group=group))
        nodes.append(helper.make_node("Relu", [f"{name}_c"], [f"{name}_r"], name=f"{name}_relu"))
        return f"{name}_r", size * size * cout * (cin // group) * kernel * kernel

    if depthwise:
        a, m1 = conv("expand", "x", base, channels, 1)
        b, m2 = conv("dw", a, channels, channels, 3, group=channels)
        out, m3 = conv("project", b, channels, base, 1)
        macs = m1 + m2 + m3
    else:
        a, m1 = conv("conv1", "x", base, channels, 3)
        out, m2 = conv("conv2", a, channels, base, 3)
        macs = m1 + m2
    graph = helper.make_graph(nodes, f"c{channels}",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, base, size, size])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, base, size, size])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, macs


def nchwc_convs(model: onnx.ModelProto, threads: int) -> int:
    """How many convolutions onnxruntime ran in its NCHWc layout (profiler node names ``*_nchwc``)."""
    from onnxslim.validate.profile import profile_layers
    from onnxslim.validate.runtime import SessionOptions

    profile = profile_layers(model, SessionOptions(threads=threads), runs=1, warmup=0)
    return sum(1 for layer in profile.layers if layer.op_type == "Conv" and layer.node.endswith("_nchwc"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", default="24:72", help="LOW:HIGH (inclusive) or a comma-separated list")
    parser.add_argument("--base", type=int, default=64, help="channels of the input and output")
    parser.add_argument("--size", type=int, default=28, help="spatial size")
    parser.add_argument("--depthwise", action="store_true", help="expand 1x1 -> depthwise 3x3 -> project 1x1")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from onnxslim.errors import parse_numbers
    from onnxslim.graph.rounding import detect_target
    from onnxslim.io import write_json_atomic
    from onnxslim.validate.bench import BenchOptions, benchmark

    if ":" in args.channels:
        low, high = parse_numbers("--channels", args.channels, int, ":", 2)
        counts = list(range(low, high + 1))
    else:
        counts = parse_numbers("--channels", args.channels, int)
    built = [conv_pair(args.base, c, args.size, args.depthwise) for c in counts]
    report = benchmark([m for m, _ in built], BenchOptions(threads=(args.threads,), warmup=args.warmup,
                                                           repeat=args.rounds, session_repeats=2,
                                                           measure_memory=False),
                       names=[f"c={c}" for c in counts])
    target = detect_target()
    per_mac = [t.median_ms / macs for t, (_, macs) in zip(report.models, built)]
    best = min(per_mac)
    rows = []
    print(f"{'c':>4} {'median ms':>10} {'min ms':>8} {'MACs M':>8} {'ms/MAC vs best':>15} {'NCHWc convs':>12}")
    for c, timing, (model, macs), cost in zip(counts, report.models, built, per_mac):
        blocked = nchwc_convs(model, args.threads)
        total = 3 if args.depthwise else 2
        print(f"{c:>4} {timing.median_ms:>10.3f} {timing.min_ms:>8.3f} {macs / 1e6:>8.1f} {cost / best:>15.2f} {blocked:>9}/{total}"
              f"{'  <- multiple of ' + str(target.block) if c % target.block == 0 else ''}")
        rows.append({"channels": c, "median_ms": timing.median_ms, "min_ms": timing.min_ms, "macs": macs, "cost_per_mac_vs_best": cost / best,
                     "nchwc_convs": blocked})
    print(f"\n{target.name}: {target.reason}; {args.threads} thread(s), {args.rounds} rounds, "
          f"{report.environment['processor']}, onnxruntime {report.environment['onnxruntime']}")
    if args.json:
        write_json_atomic(args.json, {"target": target.name, "block": target.block, "depthwise": args.depthwise,
                                      "base": args.base, "size": args.size, "threads": args.threads,
                                      "rounds": args.rounds, "rows": rows, "environment": report.environment})
    return 0


if __name__ == "__main__":
    from onnxslim.errors import run_main

    run_main(main)
