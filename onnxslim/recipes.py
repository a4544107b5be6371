"""Recipes: one TOML file describing a full train -> mask-train -> export -> slim -> validate run.

::

    name = "lenet5_mnist"                 # optional; defaults to the file name

    [model]                               # a zoo model (onnxslim.zoo) and its builder parameters
    name = "lenet5"                       # or your own factory: "my_package.nets:build"
    params = { num_classes = 10, in_channels = 1, input_size = 28 }
    # input_shape = [1, 28, 28]           # (C, H, W), for a factory without in_channels/input_size

    [data]
    dataset = "mnist"                     # spec for onnxslim.data.load_dataset ("mnist", "mnist:32", x.npz, folder)
    split_seed = 0                        # seed of the train/test split (bundled MNIST)
    train_samples = 0                     # 0 = all; otherwise the first N (for quick runs)
    test_samples = 0
    test = ""                             # optional separate test spec (npz/folder); default: the split

    [method]                              # onnxslim.training.methods; params are the method's Params fields
    name = "l1_mask"
    params = { lam = 0.015, proximal = true }

    [training]
    seed = 0
    batch_size = 64
    device = "cpu"
    [training.dense]                      # PhaseConfig fields: epochs, lr, optimizer, momentum, nesterov,
    epochs = 5                            # weight_decay, schedule
    [training.sparse]
    epochs = 20
    [training.finetune]
    epochs = 10

    [export]
    dynamo = true
    opset = 18

    [slim]
    round_to = "auto"                     # channel counts multiples of this; auto: onnxruntime's NCHWc block

    [validate]
    eval_batch_size = 256
    latency_threads = 1
    latency_batch = 1
    warmup = 20
    repeat = 200

    [targets]                             # each optional; checked and reported
    min_params_removed = 0.90             # fraction of the dense model's parameters removed
    max_accuracy_drop_pt = 0.5            # dense accuracy - slimmed accuracy, in percentage points
    max_abs_diff = 1e-4                   # PyTorch masked model vs slimmed ONNX on the test set
    min_macs_removed = 0.0

Validation names the key path in every error (``recipe.toml: [training.sparse] lr must be > 0, got
-1.0``): unknown keys anywhere (a typo never silently falls back to a default), wrong types (an int
where a string belongs, a value where a table belongs), NaN and infinities, and numbers outside their
range (counts below zero, batch sizes and learning rates not above zero, fractions outside [0, 1]).
Accuracy drops are in percentage points, as in ``onnxslim check --max-accuracy-drop``; the former key
``max_accuracy_drop`` (a fraction) is refused with the value converted.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx

from onnxslim.errors import OnnxSlimError
from onnxslim.training.export import MIN_OPSET
from onnxslim.training.methods import method_class, params_from_mapping
from onnxslim.training.trainer import PhaseConfig
from onnxslim.zoo import ModelSpec, model_parameters

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclasses.dataclass(frozen=True)
class DataSpec:
    dataset: str = "mnist"
    split_seed: int = 0
    train_samples: int = 0
    test_samples: int = 0
    test: str = ""


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str = "l1_mask"
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TrainingSpec:
    seed: int = 0
    batch_size: int = 64
    device: str = "cpu"
    dense: PhaseConfig = PhaseConfig("dense", 5)
    sparse: PhaseConfig = PhaseConfig("sparse", 10)
    finetune: PhaseConfig = PhaseConfig("finetune", 5)

    @property
    def total_mask_epochs(self) -> int:
        return self.sparse.epochs + self.finetune.epochs


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    dynamo: bool = True
    opset: int = 18


@dataclasses.dataclass(frozen=True)
class SlimSpec:
    round_to: int | str = "auto"  # see onnxslim.graph.rounding
    target_device: str | None = None

    def __post_init__(self) -> None:
        from onnxslim.graph.rounding import TARGETS, parse_round_to

        try:
            parse_round_to(self.round_to)
        except OnnxSlimError as exc:
            raise OnnxSlimError(f"[slim] {exc}") from None
        if self.target_device is not None and self.target_device not in TARGETS:
            raise OnnxSlimError(f"[slim] target_device must be one of {', '.join(TARGETS)}, got {self.target_device!r}")


@dataclasses.dataclass(frozen=True)
class ValidateSpec:
    eval_batch_size: int = 256
    latency_threads: int = 1
    latency_batch: int = 1
    warmup: int = 20
    repeat: int = 200


@dataclasses.dataclass(frozen=True)
class Targets:
    min_params_removed: float | None = None
    max_accuracy_drop_pt: float | None = None  # percentage points
    max_abs_diff: float | None = None
    min_macs_removed: float | None = None


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    model: ModelSpec
    data: DataSpec
    method: MethodSpec
    training: TrainingSpec
    export: ExportSpec
    validate: ValidateSpec
    targets: Targets
    source: str = ""
    slim: SlimSpec = SlimSpec()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model.to_dict(),
            "data": dataclasses.asdict(self.data),
            "method": {"name": self.method.name, "params": dict(self.method.params)},
            "training": {"seed": self.training.seed, "batch_size": self.training.batch_size,
                         "device": self.training.device,
                         **{k: dataclasses.asdict(getattr(self.training, k)) for k in ("dense", "sparse", "finetune")}},
            "export": dataclasses.asdict(self.export),
            "slim": dataclasses.asdict(self.slim),
            "validate": dataclasses.asdict(self.validate),
            "targets": dataclasses.asdict(self.targets),
        }


_SECTIONS = {"name", "description", "model", "data", "method", "training", "export", "slim", "validate", "targets"}


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe TOML file (see the module docstring)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise OnnxSlimError(f"recipe not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise OnnxSlimError(f"{path}: not valid TOML ({exc})") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8; tomllib does not wrap the decoding error
        raise OnnxSlimError(f"{path}: not valid TOML (not UTF-8 text: byte {exc.start})") from None
    return recipe_from_dict(raw, source=str(path), default_name=path.stem)


def recipe_from_dict(raw: Mapping[str, Any], source: str = "<dict>", default_name: str = "recipe") -> Recipe:
    _check_keys(raw, _SECTIONS, source, "")
    model_raw = _table(raw, "model", source)
    _check_keys(model_raw, {"name", "params", "input_shape"}, source, "model")
    if "name" not in model_raw:
        raise OnnxSlimError(f"{source}: [model] needs a name")
    shape = model_raw.get("input_shape")
    if shape is not None and (not isinstance(shape, list) or not shape or
                              any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape)):
        raise OnnxSlimError(f"{source}: [model] input_shape must be a list of positive integers [C, H, W]")
    model = ModelSpec(_string(model_raw["name"], source, "model", "name"),
                      _params(model_raw, source, "model"), tuple(shape) if shape else None)
    model_parameters(model.name, model.params)  # validates the names now, not after training
    data = _dataclass(DataSpec, _table(raw, "data", source), source, "data")
    method_raw = _table(raw, "method", source)
    _check_keys(method_raw, {"name", "params"}, source, "method")
    method = MethodSpec(_string(method_raw.get("name", "l1_mask"), source, "method", "name"),
                        _params(method_raw, source, "method"))
    params_from_mapping(method_class(method.name).Params, method.params, f"{source}: [method.params]")
    training = _training(_table(raw, "training", source), source)
    export = _dataclass(ExportSpec, _table(raw, "export", source), source, "export")
    slim = _dataclass(SlimSpec, _table(raw, "slim", source), source, "slim")
    validate = _dataclass(ValidateSpec, _table(raw, "validate", source), source, "validate")
    targets_raw = _table(raw, "targets", source)
    if "max_accuracy_drop" in targets_raw:
        old = targets_raw["max_accuracy_drop"]
        hint = f" = {100 * old:g}" if isinstance(old, (int, float)) and not isinstance(old, bool) else ""
        raise OnnxSlimError(f"{source}: [targets] max_accuracy_drop (a fraction) is now max_accuracy_drop_pt in "
                            f"percentage points: write max_accuracy_drop_pt{hint}")
    targets = _dataclass(Targets, targets_raw, source, "targets")
    name = _string(raw.get("name", default_name), source, "", "name")
    return Recipe(name, model, data, method, training, export, validate, targets, source, slim)


def _training(raw: Mapping[str, Any], source: str) -> TrainingSpec:
    phases = {"dense", "sparse", "finetune"}
    _check_keys(raw, {"seed", "batch_size", "device"} | phases, source, "training")
    scalars = {k: v for k, v in raw.items() if k not in phases}
    spec = _dataclass(TrainingSpec, scalars, source, "training")
    updates = {}
    for kind in sorted(phases):
        if kind not in raw:
            continue
        table = raw[kind]
        if not isinstance(table, Mapping):
            raise OnnxSlimError(f"{source}: [training.{kind}] must be a table")
        if "kind" in table:
            raise OnnxSlimError(f"{source}: [training.{kind}] must not set 'kind'")
        updates[kind] = _dataclass(PhaseConfig, {"kind": kind, **table}, source, f"training.{kind}")
    return dataclasses.replace(spec, **updates)


def _table(raw: Mapping[str, Any], key: str, source: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise OnnxSlimError(f"{source}: [{key}] must be a table")
    return value


def _params(raw: Mapping[str, Any], source: str, section: str) -> dict[str, Any]:
    """A ``params`` table: a table, with finite numbers only (their names and types are checked by the
    model or method they belong to)."""
    params = raw.get("params", {})
    if not isinstance(params, Mapping):
        raise OnnxSlimError(f"{source}: [{section}] params must be a table, got {params!r}")
    for key, value in params.items():
        _finite(value, f"{source}: [{section}.params] {key}")
    return dict(params)


def _finite(value: Any, what: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise OnnxSlimError(f"{what} must be a finite number, got {value}")
    if isinstance(value, Mapping):
        for key, item in value.items():
            _finite(item, f"{what}.{key}")
    elif isinstance(value, list):
        for item in value:
            _finite(item, what)


def _string(value: Any, source: str, section: str, key: str) -> str:
    if not isinstance(value, str):
        raise OnnxSlimError(f"{source}: {_path(section, key)} must be a string, got {value!r}")
    return value


def _path(section: str, key: str) -> str:
    return f"[{section}] {key}" if section else key


def _check_keys(raw: Mapping[str, Any], allowed: set[str], source: str, section: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        where = f"{source}: [{section}]" if section else source
        raise OnnxSlimError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _dataclass(cls: type, values: Mapping[str, Any], source: str, section: str) -> Any:
    fields = {f.name for f in dataclasses.fields(cls)}
    _check_keys(values, fields, source, section)
    hints = typing.get_type_hints(cls)
    converted = {}
    for key, value in values.items():
        what = f"{source}: {_path(section, key)}"
        converted[key] = _in_range(key, _typed(value, hints.get(key), what), what)
    try:
        return cls(**converted)
    except TypeError as exc:
        raise OnnxSlimError(f"{source}: [{section}] {exc}") from None


# lower bounds (value, inclusive) and upper bounds of numeric keys; a key not listed takes any finite value
_LOWER = {
    **dict.fromkeys(("seed", "split_seed", "train_samples", "test_samples", "epochs", "warmup", "latency_threads",
                     "momentum", "weight_decay", "max_abs_diff", "min_params_removed", "min_macs_removed"),
                    (0, True)),
    **dict.fromkeys(("batch_size", "eval_batch_size", "latency_batch", "repeat", "lr"), (0, False)),
    "round_to": (1, True),
    "opset": (MIN_OPSET, True),
}
_UPPER = {"momentum": 1.0, "min_params_removed": 1.0, "min_macs_removed": 1.0, "opset": onnx.defs.onnx_opset_version()}


def _in_range(key: str, value: Any, what: str) -> Any:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return value
    low = _LOWER.get(key)
    if low is not None and (value < low[0] or (value == low[0] and not low[1])):
        raise OnnxSlimError(f"{what} must be {'>=' if low[1] else '>'} {low[0]}, got {value}")
    if key in _UPPER and value > _UPPER[key]:
        raise OnnxSlimError(f"{what} must be <= {_UPPER[key]:g}, got {value}")
    return value


def _typed(value: Any, hint: Any, what: str) -> Any:
    """Check a TOML value against a field's type (bool, int, float, str, optional float)."""
    allowed = set(typing.get_args(hint)) if typing.get_origin(hint) in (typing.Union, types.UnionType) else {hint}
    if value is None and type(None) in allowed:
        return value
    if bool in allowed:
        if isinstance(value, bool):
            return value
        raise OnnxSlimError(f"{what} must be true or false, got {value!r}")
    if isinstance(value, bool):
        raise OnnxSlimError(f"{what} must not be a boolean")
    if int in allowed and isinstance(value, int):
        return value
    if float in allowed and isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise OnnxSlimError(f"{what} must be a finite number, got {value}")
        return float(value)
    if str in allowed and isinstance(value, str):
        return value
    if allowed & {int, float, str}:
        names = " or ".join(t.__name__ for t in (int, float, str) if t in allowed)
        raise OnnxSlimError(f"{what} must be {names}, got {value!r}")
    return value
