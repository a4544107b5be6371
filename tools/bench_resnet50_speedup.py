"""ResNet-50 acceptance measurement: does slimming ~50 % of the channels buy a proportional speedup?

Builds a ResNet-50 (bottleneck blocks 3-4-6-3, BN folded into conv weights and biases) at 224x224
directly with onnx.helper, in three forms sharing the same weights:

* ``dense``  — no masks (what you would deploy without slimming);
* ``masked`` — per-channel ``Mul`` masks with a random half of the channels zero: after the two
  internal ReLUs of every bottleneck, after the stem, and on each stage's residual stream (one mask
  per coupled group, applied after every block's post-add ReLU);
* ``hand``   — the masked model with the zero channels sliced out of the weights by this script
  (an independent reference for the engine's result).

``masked`` is slimmed by the engine (``onnxslim.graph.slim.slim``), the outputs of masked, engine and
hand models are compared with onnxruntime, and latency is measured with
``onnxslim.validate.bench.benchmark`` (interleaved rounds, one thread by default). Printed:

* speedup = median over rounds of ``t_before / t_slim`` (95 % CI), against the dense model and the
  masked model;
* MACs ratio = ``macs_before / macs_after`` (Conv + Gemm multiply-accumulates per image, counted by
  this script; the engine's own count is printed next to it when available);
* efficiency = speedup / MACs ratio, target >= 0.95 (against the dense model, the stricter baseline:
  the masked model pays for its Mul nodes).

    python tools/bench_resnet50_speedup.py --rounds 20
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, first stride)
EXPANSION = 4


class ResNetBuilder:
    """Emits one of the three forms; ``kept[key]`` are the surviving channel indices of a mask point."""

    def __init__(self, mode: str, weights: dict[str, np.ndarray], kept: dict[str, np.ndarray],
                 full: dict[str, int], size: int, stages: tuple = STAGES):
        self.mode, self.weights, self.kept, self.full, self.size = mode, weights, kept, full, size
        self.stages = stages
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.macs = 0
        self._count = 0

    def _name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def _index(self, key: str | None, full_count: int) -> np.ndarray:
        if key is None or self.mode != "hand":
            return np.arange(full_count)
        return self.kept[key]

    def conv(self, x: str, name: str, in_key: str | None, out_key: str | None, stride: int, hw: int) -> tuple[str, int]:
        w, b = self.weights[name + ".w"], self.weights[name + ".b"]
        out_idx, in_idx = self._index(out_key, w.shape[0]), self._index(in_key, w.shape[1])
        w, b = w[out_idx][:, in_idx], b[out_idx]
        k = w.shape[2]
        self.initializers += [numpy_helper.from_array(np.ascontiguousarray(w), name + ".w"),
                              numpy_helper.from_array(np.ascontiguousarray(b), name + ".b")]
        out = self._name(name)
        pad = k // 2
        self.nodes.append(helper.make_node("Conv", [x, name + ".w", name + ".b"], [out], kernel_shape=[k, k],
                                           strides=[stride, stride], pads=[pad] * 4))
        out_hw = (hw + 2 * pad - k) // stride + 1
        self.macs += w.shape[0] * w.shape[1] * k * k * out_hw * out_hw
        return out, out_hw

    def relu(self, x: str) -> str:
        out = self._name("relu")
        self.nodes.append(helper.make_node("Relu", [x], [out]))
        return out

    def mask(self, x: str, key: str) -> str:
        if self.mode != "masked":
            return x
        vector = np.zeros(self.full[key], np.float32)
        vector[self.kept[key]] = 1.0
        name = f"mask.{key}"
        if not any(t.name == name for t in self.initializers):
            self.initializers.append(numpy_helper.from_array(vector.reshape(1, -1, 1, 1), name))
        out = self._name("masked")
        self.nodes.append(helper.make_node("Mul", [x, name], [out]))
        return out

    def add(self, a: str, b: str) -> str:
        out = self._name("add")
        self.nodes.append(helper.make_node("Add", [a, b], [out]))
        return out

    def build(self) -> onnx.ModelProto:
        x, hw = self.conv("input", "stem", None, "stem", 2, self.size)
        x = self.relu(x)
        out = self._name("pool")
        self.nodes.append(helper.make_node("MaxPool", [x], [out], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
        hw = (hw + 2 - 3) // 2 + 1
        x = self.mask(out, "stem")
        stream_key = "stem"
        for s, (_, blocks, first_stride) in enumerate(self.stages):
            stage_key = f"stage{s}"
            for blk in range(blocks):
                stride = first_stride if blk == 0 else 1
                prefix = f"s{s}b{blk}"
                y, y_hw = self.conv(x, prefix + ".conv1", stream_key, prefix + ".a", 1, hw)
                y = self.mask(self.relu(y), prefix + ".a")
                y, y_hw = self.conv(y, prefix + ".conv2", prefix + ".a", prefix + ".b", stride, y_hw)
                y = self.mask(self.relu(y), prefix + ".b")
                y, y_hw = self.conv(y, prefix + ".conv3", prefix + ".b", stage_key, 1, y_hw)
                if blk == 0:
                    skip, _ = self.conv(x, prefix + ".proj", stream_key, stage_key, stride, hw)
                else:
                    skip = x
                x = self.mask(self.relu(self.add(y, skip)), stage_key)
                hw, stream_key = y_hw, stage_key
        pooled = self._name("gap")
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], [pooled]))
        flat = self._name("flat")
        self.nodes.append(helper.make_node("Flatten", [pooled], [flat], axis=1))
        fc_w = self.weights["fc.w"][:, self._index(stream_key, self.weights["fc.w"].shape[1])]
        self.initializers += [numpy_helper.from_array(np.ascontiguousarray(fc_w.T), "fc.w"),
                              numpy_helper.from_array(self.weights["fc.b"], "fc.b")]
        self.nodes.append(helper.make_node("Gemm", [flat, "fc.w", "fc.b"], ["logits"]))
        self.macs += fc_w.shape[0] * fc_w.shape[1]
        graph = helper.make_graph(
            self.nodes, f"resnet50_{self.mode}",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, self.size, self.size])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1000])], self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench_resnet50")
        model.ir_version = 8
        return model


def resnet50_weights(seed: int, stages: tuple = STAGES) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """He-initialised conv weights (BN folded: a weight and a bias per conv); widths of every mask point."""
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    full = {"stem": 64}

    def conv(name: str, c_out: int, c_in: int, k: int, scale: float = 1.0) -> None:
        std = scale * np.sqrt(2.0 / (c_in * k * k))
        weights[name + ".w"] = (rng.standard_normal((c_out, c_in, k, k)) * std).astype(np.float32)
        weights[name + ".b"] = (rng.standard_normal(c_out) * 0.01).astype(np.float32)

    conv("stem", 64, 3, 7)
    c_in = 64
    for s, (width, blocks, _) in enumerate(stages):
        full[f"stage{s}"] = width * EXPANSION
        for blk in range(blocks):
            prefix = f"s{s}b{blk}"
            full[prefix + ".a"] = full[prefix + ".b"] = width
            conv(prefix + ".conv1", width, c_in, 1)
            conv(prefix + ".conv2", width, width, 3)
            conv(prefix + ".conv3", width * EXPANSION, width, 1, scale=0.2)  # keeps the residual sum bounded
            if blk == 0:
                conv(prefix + ".proj", width * EXPANSION, c_in, 1)
            c_in = width * EXPANSION
    weights["fc.w"] = (rng.standard_normal((1000, c_in)) * np.sqrt(1.0 / c_in)).astype(np.float32)
    weights["fc.b"] = np.zeros(1000, np.float32)
    return weights, full


def random_kept(full: dict[str, int], keep: float, seed: int) -> dict[str, np.ndarray]:
    """For every mask point, a random sorted set of round(keep * C) surviving channels."""
    rng = np.random.default_rng(seed + 1)
    return {key: np.sort(rng.choice(count, size=max(1, int(round(keep * count))), replace=False))
            for key, count in full.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of channels kept per mask (0.5)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hand-only", action="store_true", help="skip the engine; time the hand-slimmed model")
    parser.add_argument("--save-dir", type=Path, default=None, help="also write the ONNX models here")
    parser.add_argument("--json", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args()

    import onnxruntime as ort

    from onnxslim.io import save_model_atomic, write_json_atomic
    from onnxslim.validate.bench import BenchOptions, benchmark

    weights, full = resnet50_weights(args.seed)
    kept = random_kept(full, args.keep, args.seed)
    built = {}
    for mode in ("dense", "masked", "hand"):
        builder = ResNetBuilder(mode, weights, kept, full, args.size)
        built[mode] = (builder.build(), builder.macs)
    macs_before, macs_hand = built["dense"][1], built["hand"][1]
    print(f"ResNet-50 {args.size}x{args.size}: {sum(full.values())} maskable channels in {len(full)} mask points, "
          f"{args.keep:.0%} kept; MACs dense {macs_before / 1e9:.3f} G, hand-slimmed {macs_hand / 1e9:.3f} G")

    candidates = {"hand": built["hand"][0]}
    engine_note = "engine not used (--hand-only)"
    if not args.hand_only:
        try:
            from onnxslim.graph.slim import slim
        except ImportError:
            engine_note = "engine not available in this checkout (onnxslim.graph.slim missing): timing the hand-slimmed model"
        else:
            start = time.perf_counter()
            slimmed, report = slim(built["masked"][0])
            engine_note = (f"engine slim took {time.perf_counter() - start:.1f} s; its MACs "
                           f"{report.macs_before / 1e9:.3f} G -> {report.macs_after / 1e9:.3f} G, "
                           f"masked channels deleted {report.deleted_masked_channels} / {report.masked_channels}")
            candidates["engine"] = slimmed
    print(engine_note)

    feed = {"input": np.random.default_rng(args.seed).standard_normal((1, 3, args.size, args.size)).astype(np.float32)}
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    reference = ort.InferenceSession(built["masked"][0].SerializeToString(), so,
                                     providers=["CPUExecutionProvider"]).run(None, feed)[0]
    differences = {}
    for name, model in candidates.items():
        out = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)[0]
        differences[name] = float(np.max(np.abs(out - reference)))
        print(f"max |masked - {name}| = {differences[name]:.3g} (logits scale {float(np.max(np.abs(reference))):.3g})")

    slim_name = "engine" if "engine" in candidates else "hand"
    if args.save_dir:
        for name, model in (("dense", built["dense"][0]), ("masked", built["masked"][0]), *candidates.items()):
            save_model_atomic(model, args.save_dir / f"resnet50_{name}.onnx")
    models = [built["dense"][0], built["masked"][0], candidates[slim_name]]
    names = ["dense", "masked", f"slim({slim_name})"]
    report = benchmark(models, BenchOptions(threads=(args.threads,), warmup=args.warmup, repeat=args.rounds,
                                            session_repeats=1, measure_memory=False), names=names)
    print(report.format_table())
    timings = {t.name: t for t in report.models}
    # rounds are paired across all three models, so any two of them form an A/B comparison
    vs_dense = paired_speedup(timings["dense"], timings[names[2]])
    vs_masked = paired_speedup(timings["masked"], timings[names[2]])
    macs_ratio = macs_before / macs_hand
    efficiency = vs_dense.speedup / macs_ratio
    print()
    print(f"MACs ratio (before/after)        : {macs_ratio:.3f}")
    print(f"speedup vs dense  (median, 95% CI): {vs_dense.speedup:.3f}x [{vs_dense.ci_low:.3f}, {vs_dense.ci_high:.3f}]")
    print(f"speedup vs masked (median, 95% CI): {vs_masked.speedup:.3f}x [{vs_masked.ci_low:.3f}, {vs_masked.ci_high:.3f}]")
    print(f"speedup / MACs ratio (vs dense)   : {efficiency:.3f}  (target >= 0.95: "
          f"{'met' if efficiency >= 0.95 else 'NOT met'})")
    print(f"speedup / MACs ratio (vs masked)  : {vs_masked.speedup / macs_ratio:.3f}")
    if args.json:
        write_json_atomic(args.json, {
            "size": args.size, "keep": args.keep, "threads": args.threads, "rounds": args.rounds,
            "macs_before": macs_before, "macs_after": macs_hand, "macs_ratio": macs_ratio,
            "slimmed_by": slim_name, "engine": engine_note, "max_abs_difference": differences,
            "speedup_vs_dense": vs_dense.speedup, "speedup_vs_dense_ci": [vs_dense.ci_low, vs_dense.ci_high],
            "speedup_vs_masked": vs_masked.speedup, "efficiency_vs_dense": efficiency,
            "median_ms": {name: t.median_ms for name, t in timings.items()},
            "onnxruntime": report.environment["onnxruntime"], "processor": report.environment["processor"],
        })
    return 0


@dataclasses.dataclass(frozen=True)
class Speedup:
    speedup: float
    ci_low: float
    ci_high: float


def paired_speedup(before, after) -> Speedup:
    """Median over rounds of t_before / t_after with its distribution-free 95 % CI."""
    from onnxslim.validate.bench import median_ci

    ratios = np.asarray(before.samples_ms) / np.asarray(after.samples_ms)
    low, high, _ = median_ci(ratios.tolist(), 0.95)
    return Speedup(float(np.median(ratios)), float(low), float(high))


if __name__ == "__main__":
    from onnxslim.errors import run_main

    run_main(main)
