"""Numerical equivalence of two models' outputs, Polygraphy-style.

For every output, with ``b`` the reference's value and ``a`` the candidate's, per element:

* absolute difference ``|a - b|``; relative difference ``|a - b| / |b|`` (0 where both are 0, infinite
  where only ``b`` is 0); a NaN on one side only counts as an infinite difference, NaN on both as 0,
  equal infinities as 0. A NaN or infinite ``b`` allows no relative slack.
* an element *mismatches* only when it exceeds BOTH tolerances: ``|a - b| > atol`` AND
  ``|a - b| > rtol * |b|``. So ``atol`` alone (``rtol = 0``) is a plain absolute bound, ``rtol`` alone
  (``atol = 0``) a plain relative bound, and both together allow whichever is looser.

The error statistic decides what is compared with the tolerances:

* ``elemwise`` (default): the output fails if any element mismatches;
* ``max`` / ``mean`` / ``median``: the output fails if that statistic of the absolute differences
  exceeds ``atol`` AND the same statistic of the relative differences exceeds ``rtol``.

Without tolerances from the user, :data:`DEFAULT_ATOL` and :data:`DEFAULT_RTOL` apply (Polygraphy's
default is 1e-5 for both; fp32 slimming folds mask scales into weights, which moves outputs by a few
ulps of their magnitude, so onnxslim allows 1e-4 of either kind); float16 / bfloat16 outputs get
:data:`HALF_ULPS` ulps of their type (:func:`default_tolerances`).

The median needs every difference in memory; the other statistics are accumulated batch by batch.
Outputs are matched by name when both models have the same output names, by position otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx

from onnxslim.data import ArrayDataset
from onnxslim.errors import OnnxSlimError
from onnxslim.validate.runtime import (
    ModelSource,
    SessionOptions,
    TensorSpec,
    create_session,
    input_specs,
    model_name,
    output_specs,
    random_feeds,
    resolve_shapes,
)

# the equivalence tolerance when the user gives none
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4
#: ulps of an output's float type (at 1) that the default tolerance allows at least: float16 (2**-10)
#: gives 0.0156, bfloat16 (2**-7) 0.125; float32 and float64 stay at the defaults above
HALF_ULPS = 16
_EPSILON = {"tensor(float16)": 2.0**-10, "tensor(bfloat16)": 2.0**-7}

ERROR_STATS = ("elemwise", "max", "mean", "median")


@dataclasses.dataclass(frozen=True)
class OutputDiff:
    """Differences of one output over all compared samples."""

    name: str
    candidate_name: str
    shape: tuple[int, ...]  # of the first compared batch
    elements: int
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    median_abs: float | None
    median_rel: float | None
    mismatches: int
    passed: bool
    #: the discrete op the output depends on ("TopK 'name'"), when it does (see :func:`with_discrete_notes`)
    discrete: str = ""
    #: how far the reference moves between onnxruntime's optimisation levels on the same inputs, for a
    #: failed output (see :func:`with_noise_floor`); None when not measured
    noise_floor: float | None = None

    def describe(self, atol: float, rtol: float) -> str:
        text = (f"output {self.name!r}: {self.mismatches} of {self.elements} elements exceed both atol={atol:g} "
                f"and rtol={rtol:g} (max abs diff {self.max_abs:.3g}, max rel diff {self.max_rel:.3g})")
        if self.discrete:
            text += (f" [it depends on {self.discrete}, a discrete choice that float-level differences before it "
                     "can flip: compare the tensors before it, e.g. cut with onnx.utils.extract_model]")
        if self.noise_floor is not None and self.noise_floor > atol:
            text += (f" [the reference alone moves by up to {self.noise_floor:.3g} on these inputs between onnxruntime's "
                     "graph optimisation levels (all / none): the model amplifies rounding here (a division by a "
                     "near-zero difference, an exp of a large value, an int8 value one quantization step away ...), "
                     "so differences of that order are rounding, not the slimming; compare on realistic inputs "
                     "(--data) or the tensors before that op]")
        return text


@dataclasses.dataclass(frozen=True)
class EquivalenceResult:
    outputs: tuple[OutputDiff, ...]
    atol: float
    rtol: float
    error_stat: str
    samples: int
    inputs: str

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "passed": self.passed, "max_abs": self.max_abs, "max_rel": self.max_rel}


def differences(candidate: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Element-wise (absolute, relative) differences as float64; see the module docstring for NaN/zero."""
    a = np.asarray(candidate, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise OnnxSlimError(f"outputs have different shapes: candidate {list(a.shape)}, reference {list(b.shape)}")
    with np.errstate(invalid="ignore", over="ignore"):
        absolute = np.abs(a - b)
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    absolute = np.where(nan_a & nan_b, 0.0, np.where(nan_a | nan_b, np.inf, absolute))
    # infinities of the same sign are equal
    absolute = np.where(np.isinf(a) & np.isinf(b) & (np.sign(a) == np.sign(b)), 0.0, absolute)
    magnitude = _magnitude(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(magnitude > 0, absolute / magnitude, np.where(absolute > 0, np.inf, 0.0))
    return absolute, relative


def _magnitude(reference: np.ndarray) -> np.ndarray:
    # |b| for the relative tolerance; NaN and infinite references give no relative slack
    return np.where(np.isfinite(reference), np.abs(reference), 0.0)


def mismatch_mask(candidate: np.ndarray, reference: np.ndarray, atol: float, rtol: float) -> np.ndarray:
    """True where an element exceeds BOTH tolerances: ``|a-b| > atol`` and ``|a-b| > rtol * |b|``."""
    absolute, _ = differences(candidate, reference)
    magnitude = _magnitude(np.asarray(reference, dtype=np.float64))
    return (absolute > atol) & (absolute > rtol * magnitude)


class DiffMeter:
    """Accumulates the statistics of one output over batches."""

    def __init__(self, name: str, candidate_name: str, atol: float, rtol: float, error_stat: str):
        if error_stat not in ERROR_STATS:
            raise OnnxSlimError(f"unknown error statistic {error_stat!r}; use one of {', '.join(ERROR_STATS)}")
        if atol < 0 or rtol < 0:
            raise OnnxSlimError(f"tolerances must be >= 0, got atol={atol}, rtol={rtol}")
        self.name, self.candidate_name = name, candidate_name
        self.atol, self.rtol, self.error_stat = atol, rtol, error_stat
        self.elements = self.mismatches = 0
        self.sum_abs = self.sum_rel = self.max_abs = self.max_rel = 0.0
        self.shape: tuple[int, ...] = ()
        self._kept_abs: list[np.ndarray] = []
        self._kept_rel: list[np.ndarray] = []

    def update(self, candidate: np.ndarray, reference: np.ndarray) -> None:
        absolute, relative = differences(candidate, reference)
        magnitude = _magnitude(np.asarray(reference, dtype=np.float64))
        if not self.shape:
            self.shape = tuple(int(d) for d in absolute.shape)
        self.elements += absolute.size
        self.mismatches += int(np.count_nonzero((absolute > self.atol) & (absolute > self.rtol * magnitude)))
        if absolute.size:
            self.sum_abs += float(absolute.sum())
            self.sum_rel += float(relative.sum())
            self.max_abs = max(self.max_abs, float(absolute.max()))
            self.max_rel = max(self.max_rel, float(relative.max()))
        if self.error_stat == "median":
            self._kept_abs.append(absolute.reshape(-1).astype(np.float32))
            self._kept_rel.append(relative.reshape(-1).astype(np.float32))

    def result(self) -> OutputDiff:
        count = max(self.elements, 1)
        mean_abs, mean_rel = self.sum_abs / count, self.sum_rel / count
        median_abs = median_rel = None
        if self.error_stat == "median" and self._kept_abs:
            median_abs = float(np.median(np.concatenate(self._kept_abs)))
            median_rel = float(np.median(np.concatenate(self._kept_rel)))
        if self.error_stat == "elemwise":
            passed = self.mismatches == 0
        else:
            stat_abs, stat_rel = {"max": (self.max_abs, self.max_rel), "mean": (mean_abs, mean_rel),
                                  "median": (median_abs or 0.0, median_rel or 0.0)}[self.error_stat]
            passed = not (stat_abs > self.atol and stat_rel > self.rtol)
        return OutputDiff(self.name, self.candidate_name, self.shape, self.elements, self.max_abs, mean_abs,
                          self.max_rel, mean_rel, median_abs, median_rel, self.mismatches, passed)


def check_compatible(reference_session, candidate_session, reference_label: str = "reference",
                     candidate_label: str = "candidate") -> list[tuple[int, int]]:
    """Raise OnnxSlimError unless the models take the same inputs and give as many outputs.

    Returns ``(reference_output_index, candidate_output_index)`` pairs: matched by name when the two
    models' output names agree, by position otherwise.
    """
    ref_inputs = {s.name: s for s in input_specs(reference_session)}
    cand_inputs = {s.name: s for s in input_specs(candidate_session)}
    if set(ref_inputs) != set(cand_inputs):
        raise OnnxSlimError(f"incompatible inputs: {reference_label} takes {sorted(ref_inputs)}, "
                            f"{candidate_label} takes {sorted(cand_inputs)}")
    for name, ref in ref_inputs.items():
        cand = cand_inputs[name]
        if ref.dtype != cand.dtype or len(ref.shape) != len(cand.shape) or any(
                isinstance(r, int) and isinstance(c, int) and r > 0 and c > 0 and r != c
                for r, c in zip(ref.shape, cand.shape)):
            raise OnnxSlimError(f"incompatible input {name!r}: {reference_label} {ref.dtype} {list(ref.shape)}, "
                                f"{candidate_label} {cand.dtype} {list(cand.shape)}")
    ref_outputs, cand_outputs = output_specs(reference_session), output_specs(candidate_session)
    if len(ref_outputs) != len(cand_outputs):
        raise OnnxSlimError(f"incompatible outputs: {reference_label} has {len(ref_outputs)} "
                            f"({', '.join(o.name for o in ref_outputs)}), {candidate_label} has {len(cand_outputs)} "
                            f"({', '.join(o.name for o in cand_outputs)})")
    ref_names, cand_names = [o.name for o in ref_outputs], [o.name for o in cand_outputs]
    if set(ref_names) == set(cand_names):
        pairs = [(i, cand_names.index(name)) for i, name in enumerate(ref_names)]
    else:
        pairs = [(i, i) for i in range(len(ref_names))]
    for i, j in pairs:
        ref, cand = ref_outputs[i], cand_outputs[j]
        if len(ref.shape) != len(cand.shape) and ref.shape and cand.shape:
            raise OnnxSlimError(f"incompatible output {ref.name!r}: {reference_label} {list(ref.shape)}, "
                                f"{candidate_label} {list(cand.shape)}")
    return pairs


#: ops whose outputs jump when their inputs move by a rounding error (comparisons, arg-max, top-k
#: indices, rounding, non-maximum suppression)
_DISCRETE_OPS = frozenset({"TopK", "ArgMax", "ArgMin", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual",
                           "NonMaxSuppression", "NonZero", "Round", "Floor", "Ceil", "Sign"})


def discrete_sources(model: onnx.ModelProto) -> dict[str, str]:
    """Graph outputs of ``model`` computed from a discrete op (``_DISCRETE_OPS``; M-LSD decodes its
    lines with ``Equal(heat, MaxPool(heat))`` and TopK in the graph): output name -> "Op 'node'" of the
    first such op on the way."""
    source: dict[str, str] = {}
    for position, node in enumerate(model.graph.node):  # nodes are in topological order (ONNX IR)
        found = next((source[name] for name in node.input if name in source), None)
        if node.op_type in _DISCRETE_OPS and found is None:
            found = f"{node.op_type} '{node.name or node.output[0] or position}'"
        if found is not None:
            source.update((name, found) for name in node.output if name)
    return {output.name: source[output.name] for output in model.graph.output if output.name in source}


def with_discrete_notes(results: Sequence[OutputDiff], reference: ModelSource) -> tuple[OutputDiff, ...]:
    """``results`` with each failed output that depends on a discrete op of ``reference`` saying so."""
    if all(result.passed for result in results):
        return tuple(results)
    model = reference if isinstance(reference, onnx.ModelProto) else onnx.load(reference, load_external_data=False)
    sources = discrete_sources(model)
    return tuple(dataclasses.replace(r, discrete=sources.get(r.name, "")) if not r.passed else r for r in results)


def with_noise_floor(results: Sequence[OutputDiff], reference: ModelSource, reference_session,
                     feeds: Iterable[Mapping[str, np.ndarray]], pairs: Sequence[tuple[int, int]],
                     options: SessionOptions) -> tuple[OutputDiff, ...]:
    """``results`` with each failed output's ``noise_floor``: the largest absolute difference of the
    reference from itself, run by ``reference_session`` and by a session without graph optimisations (with
    all of them when ``options`` disables them) on ``feeds``. Fusions (Conv + BatchNormalization, ...) round
    differently; a model that divides by a difference of two nearly equal maps (a low-light enhancer's
    ``x / (x - f(x))``) turns that rounding into large output differences, which ``check`` would otherwise
    blame on the candidate. Costs one more session and run of the reference, only when an output failed."""
    failed = [k for k, result in enumerate(results) if not result.passed]
    if not failed:
        return tuple(results)
    other = dataclasses.replace(options, opt_level="all" if options.opt_level == "disable" else "disable")
    plain = create_session(reference, other)
    floor = dict.fromkeys(failed, 0.0)
    for feed in feeds:
        optimised, unoptimised = reference_session.run(None, dict(feed)), plain.run(None, dict(feed))
        for k in failed:
            a, b = (np.asarray(out[pairs[k][0]], np.float64) for out in (optimised, unoptimised))
            both = np.isfinite(a) & np.isfinite(b)
            if both.any():
                floor[k] = max(floor[k], float(np.abs(a - b)[both].max()))
    return tuple(dataclasses.replace(r, noise_floor=floor[k]) if k in floor else r for k, r in enumerate(results))


def default_tolerances(reference_session, pairs: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """(atol, rtol) when the user gives none: :data:`DEFAULT_ATOL` / :data:`DEFAULT_RTOL`, raised to
    :data:`HALF_ULPS` ulps of the coarsest float type among the compared outputs of the reference. A
    float16 model (YOLOv5 exported with ``--half``) moves by more than 1e-4 whenever onnxruntime sums in
    another order: its own float16 kernels move YOLOv5n's outputs by up to 0.5 of 652 (0.5% relative)
    between optimisation levels (measured)."""
    outputs = output_specs(reference_session)
    epsilon = max((_EPSILON.get(outputs[i].dtype, 0.0) for i, _ in pairs), default=0.0)
    return max(DEFAULT_ATOL, HALF_ULPS * epsilon), max(DEFAULT_RTOL, HALF_ULPS * epsilon)


def make_meters(reference_session, candidate_session, pairs: Sequence[tuple[int, int]], atol: float, rtol: float,
                error_stat: str) -> list[DiffMeter]:
    ref_outputs, cand_outputs = output_specs(reference_session), output_specs(candidate_session)
    return [DiffMeter(ref_outputs[i].name, cand_outputs[j].name, atol, rtol, error_stat) for i, j in pairs]


def random_inputs(specs: Sequence[TensorSpec], samples: int, seed: int = 0,
                  input_shapes: Mapping[str, Sequence[int]] | None = None,
                  label: str = "model") -> Iterable[dict[str, np.ndarray]]:
    """``samples`` independent seeded random feeds of the model's input shapes (dynamic batch -> 1)."""
    shapes = resolve_shapes(specs, input_shapes, None, label=label)
    for stream in range(samples):
        yield random_feeds(specs, shapes, seed=seed, stream=stream)


def compare_models(reference: ModelSource, candidate: ModelSource, dataset: ArrayDataset | None = None,
                   atol: float = 0.0, rtol: float = 0.0, error_stat: str = "elemwise", samples: int = 8,
                   seed: int = 0, input_shapes: Mapping[str, Sequence[int]] | None = None, batch_size: int = 64,
                   threads: int = 1, progress: bool = True) -> EquivalenceResult:
    """Run both models on the same inputs and compare every output (see the module docstring).

    With ``dataset`` the inputs are its images (single-input models); otherwise ``samples`` seeded
    random inputs of the models' input shapes.
    """
    from tqdm import tqdm

    from onnxslim.validate.accuracy import run_batches

    options = SessionOptions(threads=threads)
    ref_label, cand_label = model_name(reference, 0), model_name(candidate, 1)
    ref_session, cand_session = create_session(reference, options), create_session(candidate, options)
    pairs = check_compatible(ref_session, cand_session, ref_label, cand_label)
    meters = make_meters(ref_session, cand_session, pairs, atol, rtol, error_stat)
    if dataset is not None:
        total, description = len(dataset), f"dataset {dataset.name} ({len(dataset)} samples)"
        batches = zip(run_batches(ref_session, dataset, batch_size, ref_label),
                      run_batches(cand_session, dataset, batch_size, cand_label))
        pairs_iter = ((ref_out, cand_out, len(labels)) for (ref_out, labels), (cand_out, _) in batches)
    else:
        total, description = samples, f"{samples} random inputs (seed {seed})"
        feeds = list(random_inputs(input_specs(ref_session), samples, seed, input_shapes, ref_label))
        pairs_iter = ((ref_session.run(None, f), cand_session.run(None, f), 1) for f in feeds)
    with tqdm(total=total, desc="equivalence", disable=not progress, leave=False) as bar:
        for ref_out, cand_out, count in pairs_iter:
            for meter, (i, j) in zip(meters, pairs):
                meter.update(cand_out[j], ref_out[i])
            bar.update(count)
    results = with_discrete_notes([m.result() for m in meters], reference)
    if dataset is None:
        results = with_noise_floor(results, reference, ref_session, feeds, pairs, options)
    return EquivalenceResult(results, atol, rtol, error_stat, total, description)
