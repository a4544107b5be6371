"""``slim``: delete every provably-zero channel from an ONNX model; the output is equivalent.

Pipeline (each step in its own module):

1. :mod:`normalize` — constants become initializers (Constant nodes, Identity of weights ...);
2. :mod:`shapes` — static shapes on a weight-free skeleton (value_info from the exporter is ignored);
   :mod:`permutations` — Reshape / Transpose chains that permute channels become one Gather;
3. :mod:`channels` + :mod:`rules` — the channel dataflow analysis and the removal plan;
4. :mod:`rewrite` — every rule slices its weights and attributes;
5. :mod:`cleanup` — mask scales folded into weights, dead code dropped, shapes re-inferred;
6. ``onnx.checker`` (full check) on the result; opset and IR version are those of the input. Without
   ``check`` the structural check still runs: no model that fails to load is written.

An input that fails ``onnx.checker`` (full check) is refused as invalid input before anything else.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import onnx

from onnxslim.errors import OnnxSlimError
from onnxslim.graph import quantized
from onnxslim.graph.analysis import ChannelAnalysis
from onnxslim.graph.cleanup import (
    fold_channel_scales,
    refresh_shapes,
    remove_dead_code,
    remove_identities,
    share_equal_constants,
    sync_initializer_inputs,
)
from onnxslim.graph.model import Graph, attach_weights, detach_weights, opset_version, serialized_size
from onnxslim.graph.names import module_path
from onnxslim.graph.normalize import (
    alias_constant_identities,
    constants_to_initializers,
    fold_static_dims,
    inline_functions,
)
from onnxslim.graph.permutations import gather_channel_permutations
from onnxslim.graph.plan import RemovalPlan
from onnxslim.graph.report import KeptChannels, LayerChange, SlimReport
from onnxslim.graph.rewrite import Rewriter
from onnxslim.graph.rounding import resolve_round_to
from onnxslim.graph.rules import RuleSet, default_rules
from onnxslim.graph.shapes import infer_model, shapes_of, skeleton, symbols_of
from onnxslim.graph.stats import count_params, model_stats
from onnxslim.io import load_onnx, save_model_atomic

# above this size the checker runs on the weight-free skeleton (plus our own tensor-size check),
# so that checking never holds a second serialised copy of a large model
_FULL_CHECK_LIMIT = 16 << 20
_OLDEST_OPSET = 7  # onnxruntime's oldest; numpy-style broadcasting from here on
_PASSES = 3  # slim passes at most: a second finds what folded masks uncovered, a third is a safety margin
_STATIC_DIM_ROUNDS = 64  # fold_static_dims rounds: a legacy ShuffleNet block, or a TF "same" pad, needs one per layer


def load_model(model: onnx.ModelProto | str | os.PathLike, copy: bool = True) -> tuple[onnx.ModelProto, int]:
    """The model (a private copy of a caller's object unless ``copy`` is False: then it must only be
    read) and its size in bytes. Files are never modified."""
    if isinstance(model, onnx.ModelProto):
        if not copy:
            return model, serialized_size(model)
        duplicate = onnx.ModelProto()
        duplicate.CopyFrom(model)
        return duplicate, serialized_size(model)
    loaded, size = load_onnx(model)  # external data and initializer byte counts checked there
    if not loaded.graph.node:
        raise OnnxSlimError(f"{model}: not an ONNX model with a graph (no nodes)")
    return loaded, size


def analyse(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None,
            sources: dict[str, onnx.TensorProto] | None = None, rules: RuleSet | None = None) -> ChannelAnalysis:
    """Normalise ``model`` in place and run the channel analysis on it with ``rules``
    (default: :func:`onnxslim.graph.rules.default_rules`).

    ``sources`` holds the data of placeholder initializers (see ``detach_weights``).
    """
    check_input(model)
    rules = rules if rules is not None else default_rules()
    inline_functions(model, keep=[(domain, op) for (domain, op), _ in rules])
    alias_constant_identities(model)
    constants_to_initializers(model, sources)
    for _ in range(_STATIC_DIM_ROUNDS):  # each round's constants can make the shapes below static
        if not fold_static_dims(model):
            break
        # fold the arithmetic on the new constants (TF "same" pads computed from a size): the Pad's
        # amounts become constants, and shape inference then reaches the layers after it
        constants_to_initializers(model, sources)
    remove_dead_code(model)  # a node nothing reads would hold the channels it reads for this pass only
    check_folded(model, input_shapes)
    inferred = infer_model(model, input_shapes)
    shapes = shapes_of(inferred)
    gather_channel_permutations(model, shapes)
    index = Graph(model, shapes, sources, symbols_of(inferred))
    return ChannelAnalysis(index, rules).run()


def check_folded(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> None:
    """Strict shape inference of the normalised ``model`` (its computed pads and shapes now constants).

    A model can pass ``onnx.checker`` while amounts it computes at run time make it inconsistent (a
    quantizer that rounded TF "same" pad arithmetic: two branches of 11 and 12 rows concatenated), so
    onnxruntime fails on it too. Raises OnnxSlimError("invalid input model: ...") for that, instead of
    an internal error on the result.
    """
    skel = skeleton(model, input_shapes)
    for output in skel.graph.output:  # declared output dims (-1, a fixed batch) are not what is checked here
        output.type.tensor_type.ClearField("shape")
    try:
        onnx.shape_inference.infer_shapes(skel, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        if "TypeInferenceError" in str(exc):  # a type onnx cannot infer (not a conflict): left to the result's check
            return
        raise OnnxSlimError("invalid input model: once its computed constants are folded, shape inference "
                            f"finds it inconsistent (onnxruntime would fail too): {_first_line(exc)}") from None


def slim(model: onnx.ModelProto | str | os.PathLike, output_path: str | os.PathLike | None = None, *,
         input_shapes: dict[str, list[int]] | None = None, fold_masks: bool = True, round_to: int | str = 1,
         check: bool = True, rules: RuleSet | None = None, target_device: str | None = None,
         ) -> tuple[onnx.ModelProto, SlimReport]:
    """Delete every provably-zero channel; returns the slimmed model and a report.

    ``input_shapes`` fixes dynamic input dims (needed for Flatten -> Gemm of dynamic maps and for MACs);
    ``fold_masks`` folds per-channel mask scales into neighbouring weights; ``round_to`` keeps extra
    channels so each layer's count is a multiple of it (default 1: off, where the CLI's is ``"auto"``;
    ``"auto"``: the onnxruntime NCHWc block of this machine or of ``target_device``, see
    :mod:`onnxslim.graph.rounding`); ``check`` runs ``onnx.checker``
    with full shape inference (without it, the structural check only); ``rules`` is the rule set (default
    :func:`onnxslim.graph.rules.default_rules`; extend it with ``default_rules().with_rules(MyRule())``
    for ops of other domains).
    The output is written atomically when ``output_path`` is given.

    Passes repeat (at most :data:`_PASSES`) while a pass folded a mask scale into the readers of a tensor
    that others read too and the next pass deletes more: such a fold changes the graph the rules see (a
    depthwise conv that read a masked copy of a tensor now reads the tensor a Concat reads: a Ghost
    conv), or a layer died whose reduction held its inputs (its folded mask zeroes the placeholder
    filter it keeps), and the next pass deletes more, so slimming the output again finds nothing. The
    report is merged (:meth:`SlimReport.followed_by`).
    """
    rounding = resolve_round_to(round_to, target_device)
    slimmed, report, uncovered, _ = _slim_pass(model, input_shapes, fold_masks, rounding, check, rules)
    for _ in range(_PASSES - 1):
        if not uncovered:
            break
        again, more, uncovered, masks = _slim_pass(slimmed, input_shapes, fold_masks, rounding, check, rules)
        if not more.deleted_any:
            break
        slimmed, report = again, report.followed_by(more, masks)
    if output_path is not None:
        report.size_after = save_model_atomic(slimmed, output_path)
    return slimmed, report


def _slim_pass(model, input_shapes, fold_masks: bool, rounding, check: bool, rules):
    """One analysis, rewrite and clean-up of ``model`` (never modified), as :func:`slim` describes:
    (slimmed model, report, whether another pass may delete more: a mask folded into readers of a shared
    tensor, or a layer died; the masks it saw, tensor -> (mask node, zero channels))."""
    source, size_before = load_model(model, copy=False)
    model, sources = detach_weights(source)
    ir_version, opset_imports = model.ir_version, [(o.domain, o.version) for o in model.opset_import]
    original_inputs = [i.name for i in model.graph.input]
    described = {value.name for value in model.graph.value_info}  # only these get one back (never larger)

    original = {t.name for t in model.graph.initializer}
    params_before = count_params(model, rules)  # as the input stores them (normalisation may copy some)
    analysis = analyse(model, input_shapes, sources, rules)
    index = analysis.index
    before = model_stats(model, shapes=index.shapes, rules=analysis.rules)
    plan = analysis.plan(round_to=rounding.multiple)
    layers_before = {name: (index.node_name(node), node.op_type, analysis.info[name].size, module_path(node))
                     for name, node in analysis.creators.items()}
    mask_summary = _mask_summary(analysis, plan)
    notes = _plan_notes(analysis, plan)

    died = _layers_died(analysis, plan)
    removed_nodes = Rewriter(analysis, plan).run()
    folded, kept_masks, joined = fold_channel_scales(index, plan) if fold_masks else (0, [], 0)
    removed_nodes += remove_identities(index, analysis.rules)
    index.flush_updates()
    removed_nodes += remove_dead_code(model)
    attach_weights(model, index.sources)
    share_equal_constants(model, original)
    del source, sources
    unlisted = sync_initializer_inputs(model, original_inputs)
    try:
        refresh_shapes(model)
    except OnnxSlimError as exc:
        raise OnnxSlimError(f"internal error: the slimmed model fails {exc}") from None
    kept_info = [value for value in model.graph.value_info if value.name in described]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept_info)
    check_model(model, full=check)
    assert model.ir_version == ir_version and [(o.domain, o.version) for o in model.opset_import] == opset_imports

    after = model_stats(model, input_shapes, rules=analysis.rules)
    layers = []
    for name, (node_name, op_type, channels, module) in layers_before.items():
        keep = plan.keep(name)
        layers.append(LayerChange(node_name, op_type, channels, int(keep.sum()), module))
    report = SlimReport(
        layers=layers,
        params_before=params_before, params_after=after.params,
        macs_before=before.macs, macs_after=after.macs,
        size_before=size_before, size_after=serialized_size(model),
        masked_channels=mask_summary[0], deleted_masked_channels=mask_summary[1], kept=mask_summary[2],
        folded_masks=folded, remaining_masks=[m for m in kept_masks if m in mask_summary[3]],
        input_shapes={k: list(v) for k, v in (input_shapes or {}).items()},
        removed_nodes=removed_nodes,
        rounding=rounding.to_dict(),
        macs_complete=before.macs_complete and after.macs_complete,
    )
    report.notes.extend(_no_layer_notes(analysis) + notes)
    if unlisted:
        report.notes.append(f"{unlisted} weight(s) were also declared as graph inputs (an exporter's "
                            "keep_initializers_as_inputs): no longer, so onnxruntime treats them as constants "
                            "(constant folding, Conv+BatchNormalization fusion); part of a speedup over the "
                            "input can come from that alone (docs/latency.md)")
    return model, report, joined > 0 or died, mask_summary[4]


def _layers_died(analysis: ChannelAnalysis, plan: RemovalPlan) -> bool:
    """Whether a layer that keeps no channel, or only the placeholder of a tensor that must not be empty,
    reads a channel kept: its reduction held its inputs in this pass, its folded mask zeroes the filter of
    the placeholder, and the next pass frees them (a Gemm whose outputs a mask all zeroes, in front of a
    head that needs one channel: the conv before it went 5 -> 1 in a second slim)."""
    for name, node in analysis.creators.items():
        keep = plan.keep(name)
        if keep.any() and not plan.only_fillers(analysis.info[name].ids[keep]):
            continue
        if any(read is not None and read.any() for read in (plan.keep(tensor) for tensor in node.input if tensor)):
            return True
    return False


# int8 ops of onnxruntime's QOperator format that no rule reads (rules/qoperator.py reads QLinearConv,
# QLinearMatMul, QGemm, QLinearAdd / Mul / Concat / pools / LeakyRelu / Sigmoid): they hold what they touch
_QOPERATOR_OPS = frozenset({"QLinearSoftmax", "QLinearReduceMean", "QLinearWhere", "QAttention", "QEmbedLayerNormalization"})


def _plan_notes(analysis: ChannelAnalysis, plan: RemovalPlan) -> list[str]:
    """What the rules the graph uses say about the plan (:meth:`Rule.plan_notes`), each rule asked once."""
    rules = {id(rule): rule for rule in (analysis.rule_for(node) for node in analysis.index.nodes)}
    return [note for rule in rules.values() for note in rule.plan_notes(analysis, plan)]


def _no_layer_notes(analysis: ChannelAnalysis) -> list[str]:
    """Why nothing could be removed when the analysis found no layer at all: the ops without a rule."""
    if analysis.creators:
        return []
    unknown = Counter(node.op_type for node in analysis.index.model.graph.node
                      if (node.domain or "", node.op_type) not in analysis.rules)
    if not unknown:
        return []
    note = "no layer that the rules know was found; ops without a rule: " + ", ".join(
        f"{op} x{count}" for op, count in unknown.most_common(6)) + (", ..." if len(unknown) > 6 else "")
    if unknown.keys() & _QOPERATOR_OPS:
        note += (" (QOperator int8 ops that slim does not read: quantize with quant_format=QuantFormat.QDQ, whose "
                 "QuantizeLinear/DequantizeLinear pairs slim reads, or slim/prune the float model and quantize after)")
    return [note]


def _mask_summary(analysis: ChannelAnalysis, plan: RemovalPlan):
    """(masked channels, deleted ones, KeptChannels list, names of the mask nodes: per-channel constant
    ``Mul`` nodes with a zero entry, and per masked tensor (mask node, its zero channels))."""
    total = deleted = 0
    kept: list[KeptChannels] = []
    names, masks = set(), {}
    for site in analysis.masks:
        if not len(site.zero_channels):
            continue  # a per-channel scale that zeroes nothing (an unfused BN's gamma) is no mask
        names.add(analysis.index.node_name(site.node))
        masks[site.tensor] = (analysis.index.node_name(site.node), tuple(int(c) for c in site.zero_channels))
        ids = analysis.info[site.tensor].ids[site.zero_channels]
        removed = plan.removed[ids]
        total += len(ids)
        deleted += int(removed.sum())
        reasons = plan.reason[ids[~removed]]
        channels = site.zero_channels[~removed]
        for rid in np.unique(reasons):
            reason = analysis.reasons[rid]
            kept.append(KeptChannels(site.tensor, tuple(int(c) for c in channels[reasons == rid]), reason.text,
                                     reason.kind, module_path(site.node)))
    return total, deleted, kept, names, masks


def check_input(model: onnx.ModelProto) -> None:
    """Refuse an input that onnx itself rejects (``onnx.checker`` with full shape inference, run on the
    weight-free skeleton), or what the checker lets through: a default-domain opset before 7 (elementwise
    ops broadcast by the legacy ``broadcast``/``axis`` attributes, which the rules do not read;
    onnxruntime runs opset 7 and later) or newer than the installed onnx defines, a negative dim in a
    declared shape other than -1 (Paddle2ONNX's spelling of a dynamic dim), an IR 3 initializer not listed as
    a graph input (the skeleton lists them), two nodes with one name (onnxruntime refuses the model),
    constant quantization parameters that do not fit their data
    (:func:`quantized.check_parameters`): it is the user's invalid model, not a failure of slim.

    Raises OnnxSlimError("invalid input model: ...").
    """
    try:
        _checker(skeleton(model), full=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise OnnxSlimError(f"invalid input model: it fails onnx.checker: {_first_line(exc)}") from None
    problem = _opset_problem(model) or _unlisted_initializer(model) or _duplicate_node_name(model.graph) \
        or _negative_dim(model.graph) or quantized.check_parameters(model.graph)
    if problem is not None:
        raise OnnxSlimError(f"invalid input model: {problem}")


def _opset_problem(model: onnx.ModelProto) -> str | None:
    version = opset_version(model)
    newest = onnx.defs.onnx_opset_version()
    if version < _OLDEST_OPSET:
        return (f"default-domain opset {version} is older than {_OLDEST_OPSET} (before it, elementwise ops broadcast "
                f"by their 'broadcast'/'axis' attributes); convert it with onnx.version_converter")
    if version > newest:
        return f"default-domain opset {version} is newer than this onnx package defines ({newest})"
    return None


def _unlisted_initializer(model: onnx.ModelProto) -> str | None:
    """IR 3 requires every initializer to be a graph input too; onnx.checker says so, but it runs on the
    skeleton, which lists them itself."""
    if model.ir_version >= 4:
        return None
    listed = {value.name for value in model.graph.input}
    missing = [t.name for t in model.graph.initializer if t.name not in listed]
    if not missing:
        return None
    return (f"IR version {model.ir_version} requires every initializer to be a graph input, and {len(missing)} "
            f"are not ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); list them, or set ir_version "
            f"to 4 or later")


def _duplicate_node_name(graph: onnx.GraphProto) -> str | None:
    """Two nodes of the main graph with one non-empty name: onnxruntime refuses to load the model, and so
    would it the result (which keeps the names)."""
    seen: set[str] = set()
    for node in graph.node:
        if node.name and node.name in seen:
            return f"two nodes are named {node.name!r} (onnxruntime refuses to load the model); give them unique names"
        seen.add(node.name)
    return None


def _negative_dim(graph: onnx.GraphProto) -> str | None:
    for value in (*graph.input, *graph.output, *graph.value_info):
        dims = value.type.tensor_type.shape.dim
        # -1 is how Paddle2ONNX declares a dynamic dim (read as unknown); other negatives are errors
        if any(d.HasField("dim_value") and d.dim_value < -1 for d in dims):
            shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
            return f"{value.name!r} is declared with a negative dim {shape}"
    return None


def _checker(model: onnx.ModelProto, full: bool) -> None:
    """``onnx.checker.check_model``, except that an op version which a *later* opset deprecated
    (GroupNormalization-18, deprecated by opset 21) is not an error: the model's own opset defines it and
    onnxruntime runs it. The checker stops at that node, so such a model is checked by strict shape
    inference instead (types, shapes and every node's schema)."""
    try:
        onnx.checker.check_model(model, full_check=full)
    except onnx.checker.ValidationError as exc:
        if "is deprecated in domain_version" not in str(exc):
            raise
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def check_model(model: onnx.ModelProto, full: bool = True, what: str = "the slimmed model") -> None:
    """``onnx.checker`` on the result; ``full`` adds strict shape inference. Large models are checked
    through their skeleton (structure, types and shapes, without serialising the weights again) plus a
    tensor size check. Even without ``full`` the structure (topological order, defined inputs, types)
    is checked, so that no model that fails to load is ever written."""
    try:
        if full and serialized_size(model) <= _FULL_CHECK_LIMIT:
            _checker(model, full=True)
        else:
            _checker(skeleton(model), full=full)
            _check_tensor_sizes(model)
    except onnx.checker.ValidationError as exc:
        raise OnnxSlimError(f"internal error: {what} fails onnx.checker: {_first_line(exc)}") from None
    except onnx.shape_inference.InferenceError as exc:
        raise OnnxSlimError(f"internal error: {what} fails shape inference: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _check_tensor_sizes(model: onnx.ModelProto) -> None:
    for tensor in model.graph.initializer:
        if tensor.HasField("raw_data"):
            expected = int(np.prod(tensor.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            if len(tensor.raw_data) != expected:
                raise onnx.checker.ValidationError(f"initializer {tensor.name} holds the wrong number of bytes")
