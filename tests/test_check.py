"""`onnxslim check`: exit 0 when every threshold holds, 1 naming the failed one, 2 on bad input."""

import json

import numpy as np
import onnx
import pytest
from _validate_models import conv_net, fitted_linear_weights, linear_classifier
from click.testing import CliRunner

from onnxslim.cli import main
from onnxslim.data import mnist_split
from onnxslim.validate.equivalence import compare_models
from onnxslim.validate.gate import CheckOptions, GateThresholds, run_check


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("check")
    train, _ = mnist_split()
    weight, bias = fitted_linear_weights(train.images[:2000], train.labels[:2000])
    perturbed = weight.copy()
    perturbed[:, 3] += 1e-3  # tiny output change, accuracy essentially unchanged
    broken = weight.copy()
    broken[:, :5] = 0.0  # classes 0-4 mostly lose their score: accuracy collapses
    paths = {}
    for name, w in (("reference", weight), ("same", weight), ("perturbed", perturbed), ("broken", broken)):
        paths[name] = folder / f"{name}.onnx"
        onnx.save(linear_classifier(w, bias), paths[name])
    paths["other_input"] = folder / "other_input.onnx"
    onnx.save(conv_net(8, size=32), paths["other_input"])
    paths["text"] = folder / "notes.onnx"
    paths["text"].write_text("this is not a model\n")
    return paths


def invoke(*args, env=None):
    return CliRunner().invoke(main, ["check", *map(str, args), "--no-progress"], env=env)


def test_passes_with_every_threshold(models, tmp_path):
    summary = tmp_path / "summary.md"
    summary.write_text("# earlier step\n")
    out, report_dir = tmp_path / "check.json", tmp_path / "report"
    result = invoke(models["reference"], models["same"], "--data", "mnist", "--limit", "300",
                    "--max-accuracy-drop", "0", "--max-abs-diff", "0", "--max-size-ratio", "1.0",
                    "--min-speedup", "0.01", "--rounds", "5", "--warmup", "1",
                    "--json", out, "--report-dir", report_dir, env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert result.exit_code == 0, result.output
    assert "## onnxslim check: PASS" in result.stdout
    data = json.loads(out.read_text())
    assert data["passed"] and [c["name"] for c in data["checks"]] == [
        "accuracy drop", "output difference", "speedup", "size ratio"]
    assert data["accuracy"]["prediction_agreement"] == 1.0
    assert data["equivalence"]["max_abs"] == 0.0
    text = summary.read_text()
    assert text.startswith("# earlier step\n") and "## onnxslim check: PASS" in text  # appended, not replaced
    assert (report_dir / "check.md").read_text().startswith("## onnxslim check: PASS")
    assert json.loads((report_dir / "check.json").read_text())["passed"]


def test_random_inputs_without_data(models):
    result = invoke(models["reference"], models["perturbed"], "--samples", "3", "--max-abs-diff", "0.1")
    assert result.exit_code == 0, result.output
    assert "3 seeded random inputs" in result.stdout


@pytest.mark.parametrize("args, name", [
    (["--data", "mnist", "--limit", "300", "--max-accuracy-drop", "1"], "accuracy drop"),
    (["--max-abs-diff", "1e-6"], "output difference"),
    (["--rtol", "1e-9"], "output difference"),
    (["--max-size-ratio", "0.5"], "size ratio"),
    (["--min-speedup", "1000", "--rounds", "3", "--warmup", "0"], "speedup"),
])
def test_each_failing_threshold_exits_1_and_names_it(models, args, name):
    candidate = models["broken"] if "--max-accuracy-drop" in args else models["perturbed"]
    result = invoke(models["reference"], candidate, *args)
    assert result.exit_code == 1, result.output
    assert f"FAILED: {name}" in result.stderr
    assert "## onnxslim check: FAIL" in result.stdout and "**FAIL**" in result.stdout


def test_failure_message_carries_the_figure(models):
    result = run_check(models["reference"], models["broken"], GateThresholds(max_accuracy_drop=1.0),
                       CheckOptions(data="mnist", limit=300, progress=False))
    (failed,) = result.failures()
    drop = 100 * (result.reference_accuracy.value - result.candidate_accuracy.value)
    assert failed.value == pytest.approx(drop) and drop > 1.0
    assert f"{drop:.2f} pt" in failed.message()


@pytest.mark.parametrize("case, message", [
    ("missing", "model not found"),
    ("text", "not a loadable ONNX model"),
    ("other_input", "incompatible"),
    ("bad_option", "Invalid value"),
    ("bad_data", "dataset not found"),
    ("drop_without_data", "needs labelled data"),
    ("data_shape", "expects"),
    ("nan_images", "images hold NaN or infinite values"),
    ("negative_labels", "labels must be class indices (integers >= 0), got int64 values from -1 to 4"),
    ("fractional_labels", "labels must be class indices (integers >= 0), got float64"),
    ("labels_beyond_outputs", "labels run from 1 to 10, but the model gives 10 classes"),
])
def test_bad_input_exits_2(models, tmp_path, case, message):
    ref, same = models["reference"], models["same"]
    args = {
        "missing": [ref, tmp_path / "missing.onnx"],
        "text": [ref, models["text"]],
        "other_input": [ref, models["other_input"]],
        "bad_option": [ref, same, "--max-abs-diff", "-1"],
        "bad_data": [ref, same, "--data", tmp_path / "nothing-here"],
        "drop_without_data": [ref, same, "--max-accuracy-drop", "1"],
        "data_shape": [ref, same, "--data", "mnist:32", "--limit", "10"],
    }.get(case) or [ref, same, "--data", _bad_npz(tmp_path, case), "--max-accuracy-drop", "1"]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def _bad_npz(folder, case: str):
    """An .npz of 5 MNIST-shaped images whose images or labels are wrong in the way ``case`` says (before:
    NaN images passed the gate at "100 %" top-1, negative or fractional labels were counted as classes)."""
    images, labels = np.zeros((5, 1, 28, 28), np.float32), np.arange(5)
    if case == "nan_images":
        images[2, 0, 3, 3] = np.nan
    elif case == "negative_labels":
        labels[0] = -1
    elif case == "labels_beyond_outputs":  # 1-based labels for a 10-class model
        labels = np.array([1, 2, 3, 10, 5])
    else:
        labels = labels + 0.5
    path = folder / f"{case}.npz"
    np.savez(path, images=images, labels=labels)
    return path


def test_segmentation_gate_uses_miou(tmp_path):
    from _validate_models import segmenter

    rng = np.random.default_rng(0)
    data = tmp_path / "seg.npz"
    np.savez(data, images=rng.random((5, 8, 8)).astype(np.float32), labels=rng.integers(0, 3, (5, 8, 8)))
    model = tmp_path / "seg.onnx"
    onnx.save(segmenter(3), model)
    result = run_check(model, model, GateThresholds(max_accuracy_drop=0.0),
                       CheckOptions(data=str(data), progress=False))
    assert result.passed and result.reference_accuracy.metric == "miou"
    assert result.reference_accuracy.dice is not None


def test_a_failed_output_behind_a_discrete_op_says_so(tmp_path):
    """M-LSD decodes in the graph (``Equal(heat, MaxPool(heat))``, TopK): slimming moves the heat map by
    1e-5 and a near-tie flips. A candidate whose first filter moved by 0.02: the ArgMax output fails
    naming ArgMax; the continuous logits fail without that note."""
    from graphs import GraphBuilder
    from onnx import numpy_helper

    g = GraphBuilder(seed=5)
    logits = g.conv(g.input([1, 3, 16, 16]), 3, 6)
    g.output(logits, g.op("Cast", [g.op("ArgMax", [logits], axis=1, keepdims=0)], to=onnx.TensorProto.FLOAT))
    reference = g.model()
    candidate = onnx.ModelProto()
    candidate.CopyFrom(reference)
    weight = candidate.graph.initializer[0]
    moved = numpy_helper.to_array(weight).copy()
    moved[0] += np.float32(0.02)  # class 0 gains a little: pixels near a tie change their arg-max
    weight.CopyFrom(numpy_helper.from_array(moved, weight.name))
    onnx.save(reference, tmp_path / "reference.onnx")
    onnx.save(candidate, tmp_path / "candidate.onnx")
    report = run_check(tmp_path / "reference.onnx", tmp_path / "candidate.onnx",
                       options=CheckOptions(progress=False, random_samples=4))
    failed = {o.name: o for o in report.equivalence.outputs if not o.passed}
    argmax, = (name for name in failed if name != logits)
    assert logits in failed and not failed[logits].discrete
    assert failed[argmax].discrete.startswith("ArgMax") and "discrete choice" in report.to_markdown()


def test_per_pixel_labels_may_be_negative_as_ignored_pixels(tmp_path):
    """Segmentation labels outside [0, K) are ignored by the confusion matrix (an ignore index such as
    -1), so an .npz of (N, H, W) labels with -1 loads; classification labels may not be negative."""
    from onnxslim.data import load_npz

    labels = np.zeros((2, 4, 4), np.int64)
    labels[0, 0, 0] = -1
    np.savez(tmp_path / "seg.npz", images=np.zeros((2, 4, 4), np.float32), labels=labels)
    assert load_npz(tmp_path / "seg.npz").labels.min() == -1


def _amplifier(fused_by_us: bool) -> onnx.ModelProto:
    """``y = eps / (a - b + eps)`` with ``b`` a conv with BatchNormalization folded into it (float64, then
    float32) and ``a`` the same conv with the BN as a node (the reference: onnxruntime fuses it at full
    optimisation, and rounds like ``b``) or as Mul + Add (the candidate: another rounding). ``a - b`` is
    rounding noise that the division blows up, like a low-light enhancer's ``x / (x - f(x))``."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w, bias = rng.standard_normal((8, 3, 3, 3)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    scale, beta = rng.uniform(0.5, 1.5, 8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    mean, var = rng.standard_normal(8).astype(np.float32), rng.uniform(0.5, 1.5, 8).astype(np.float32)
    s = scale / np.sqrt(var + np.float32(1e-5))
    arrays = {"w": w, "bias": bias, "scale": scale, "beta": beta, "mean": mean, "var": var, "eps": np.float32(1e-6),
              "wf": (w.astype(np.float64) * s[:, None, None, None]).astype(np.float32),
              "bf": ((bias - mean) * s + beta).astype(np.float32),
              "s": s.reshape(8, 1, 1), "t": (beta - mean * s).reshape(8, 1, 1).astype(np.float32)}
    conv = dict(pads=[1, 1, 1, 1])
    nodes = [helper.make_node("Conv", ["x", "wf", "bf"], ["b"], **conv), helper.make_node("Conv", ["x", "w", "bias"], ["c"], **conv)]
    nodes += [helper.make_node("Mul", ["c", "s"], ["cs"]), helper.make_node("Add", ["cs", "t"], ["a"])] if fused_by_us else \
        [helper.make_node("BatchNormalization", ["c", "scale", "beta", "mean", "var"], ["a"])]
    nodes += [helper.make_node("Sub", ["a", "b"], ["d"]), helper.make_node("Add", ["d", "eps"], ["e"]),
              helper.make_node("Div", ["eps", "e"], ["y"])]
    graph = helper.make_graph(nodes, "amplifier", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8, 8, 8])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_failure_in_a_model_that_amplifies_rounding_gives_the_reference_own_noise(tmp_path):
    """A real low-light net (AGLLNet) failed ``check`` by 130 after an exact slim: it divides by a
    near-zero difference. The failed output now carries how far the reference moves between onnxruntime's
    optimisation levels on the same inputs, and the message says what that means; a plain failure (a moved
    weight, no amplification) gets no such note."""
    onnx.save(_amplifier(False), tmp_path / "reference.onnx")
    onnx.save(_amplifier(True), tmp_path / "candidate.onnx")
    report = run_check(tmp_path / "reference.onnx", tmp_path / "candidate.onnx",
                       options=CheckOptions(progress=False, random_samples=2))
    output, = report.equivalence.outputs
    assert not output.passed and output.noise_floor > output.max_abs / 100 > 1e-3, output
    assert "moves by up to" in report.to_markdown() and "rounding, not the slimming" in report.to_markdown()
    same = compare_models(tmp_path / "reference.onnx", tmp_path / "reference.onnx", samples=1, progress=False)
    assert same.passed and same.outputs[0].noise_floor is None  # measured only for a failed output
