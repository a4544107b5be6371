"""``prune``: choose channels to remove from any ONNX model by a criterion, then slim.

1. The channel analysis of the unmasked model gives the coupled classes and the barriers. Classes held
   by a barrier (graph inputs/outputs, unknown ops) are never chosen.
2. Every channel-creating layer (Conv, ConvTranspose, Gemm, MatMul) scores its output channels with
   its rule's ``channel_scores`` — ``l1``: L1 norm of the filter, ``l2``: its L2 norm, ``fpgm``: its
   distance to the layer's other filters (geometric median), ``bn``: |gamma| of the op that follows when
   its rule has ``channel_gains`` (BatchNormalization; L1 when there is none), ``random`` (seeded). A
   class's score is the sum over the layers that create it, so a residual group is judged by all its
   convolutions.
3. :mod:`onnxslim.graph.selection` chooses: ``scope="layer"``: each layer loses at most ``ratio`` of its
   channels (rounded to its coupled units), counting classes chosen for other layers; ``scope="global"``:
   the classes with the lowest importance per unit of cost (MACs or params) up to ``ratio`` of the cost.
4. The choice becomes **masks**: a per-channel ``Mul`` with zeros is inserted where a reducing layer
   reads a chosen channel (``placement="consumers"``), or right after each creating layer and its
   BatchNormalization (``placement="after_bn"``, where mask training puts them); an integer tensor (a
   QOperator model's) is masked in the weights of its layers instead (``Rule.mask_output_channels``:
   a channel at its zero point). That masked model is the exact meaning of the pruning;
   :func:`onnxslim.graph.slim.slim` then deletes the channels.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxslim.errors import OnnxSlimError
from onnxslim.graph.analysis import ChannelAnalysis
from onnxslim.graph.cleanup import remove_dead_code
from onnxslim.graph.model import Use
from onnxslim.graph.report import SlimReport
from onnxslim.graph.rounding import Rounding, resolve_round_to, round_choice, rounding_note
from onnxslim.graph.rules import RuleSet
from onnxslim.graph.selection import Cost, Selection, choose
from onnxslim.graph.shapes import infer_model
from onnxslim.graph.slim import analyse, check_model, load_model, slim
from onnxslim.graph.stats import count_params
from onnxslim.graph.values import BARRIER
from onnxslim.io import save_model_atomic

CRITERIA = ("l1", "l2", "fpgm", "bn", "random")


def channel_scores(analysis: ChannelAnalysis, criterion: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Per creating layer (keyed by its output tensor): one score per output channel."""
    if criterion not in CRITERIA:
        raise OnnxSlimError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    rng = np.random.default_rng(seed)
    scores = {}
    for name, node in analysis.creators.items():
        size = analysis.info[name].size
        if criterion == "random":
            scores[name] = rng.random(size)
            continue
        if criterion == "bn":
            gamma = _following_gains(analysis, name, size)
            if gamma is not None:
                scores[name] = np.abs(gamma)
                continue
        base = analysis.rule_for(node).channel_scores(node, analysis, "l1" if criterion == "bn" else criterion)
        if base is not None:
            scores[name] = base
    return scores


def _following_gains(analysis: ChannelAnalysis, name: str, size: int) -> np.ndarray | None:
    """The per-channel gains (BN's gamma) of the single reader of ``name``, when its rule has them."""
    uses = analysis.index.uses(name)
    if len(uses) == 1:
        gains = analysis.rule_for(uses[0].node).channel_gains(uses[0].node, analysis.index)
        if gains is not None and gains.size == size:
            return gains
    return None


def choose_classes(analysis: ChannelAnalysis, ratio: float, criterion: str = "l1", scope: str = "layer",
                   min_channels: int = 1, seed: int = 0, cost: Cost = "macs", multiple: int = 1) -> Selection:
    """The classes to remove and notes for the user (see :mod:`onnxslim.graph.selection`); ``multiple``:
    the kept-count rounding :func:`prune_selection` applies next (``scope="global"`` sizes its choice for it).

    Raises OnnxSlimError for a bad ratio or scope, and for ``criterion="bn"`` on a model without any
    BatchNormalization after its layers (exporters fold BN into the convs in eval mode).
    """
    if not 0.0 <= ratio < 1.0:
        raise OnnxSlimError(f"ratio must be in [0, 1), got {ratio}")
    if scope not in ("layer", "global"):
        raise OnnxSlimError(f"scope must be 'layer' or 'global', got {scope!r}")
    if cost not in ("macs", "params"):
        raise OnnxSlimError(f"cost must be 'macs' or 'params', got {cost!r}")
    notes = _criterion_notes(analysis, criterion)
    selection = choose(analysis, channel_scores(analysis, criterion, seed), ratio, scope, min_channels, cost,
                       multiple)
    selection.notes[:0] = notes
    return selection


def _criterion_notes(analysis: ChannelAnalysis, criterion: str) -> list[str]:
    if criterion != "bn":
        return []
    sizes = {name: analysis.info[name].size for name in analysis.creators}
    without = [name for name, size in sizes.items() if _following_gains(analysis, name, size) is None]
    if sizes and len(without) == len(sizes):
        raise OnnxSlimError("--criterion bn needs BatchNormalization after the layers, and this model has none "
                            "(exporters fold BN into the convs in eval mode); use l1, l2 or fpgm")
    if without:
        return [f"--criterion bn: {len(without)} of {len(sizes)} layers have no BatchNormalization after them; "
                "they are ranked by the L1 norm of their filters"]
    return []


def insert_masks(model: onnx.ModelProto, analysis: ChannelAnalysis, chosen_roots: np.ndarray,
                 placement: str = "consumers") -> int:
    """Insert per-channel zero masks for the chosen classes into ``model`` (in place); returns the count."""
    if placement not in ("consumers", "after_bn"):
        raise OnnxSlimError(f"placement must be 'consumers' or 'after_bn', got {placement!r}")
    index = analysis.index
    roots = analysis.uf.roots()
    chosen = np.zeros(analysis.uf.size, bool)
    chosen[chosen_roots] = True
    targets: list[tuple[str, list]] = []  # (masked tensor, the uses that read the mask's output)
    if placement == "consumers":
        for name, info in analysis.info.items():
            if not chosen[roots[info.ids]].any():
                continue
            readers = [u for u in index.uses(name) if analysis.rule_for(u.node).reduction(u.node, u.slot) != "none"]
            producer = index.producer.get(name)
            if readers and producer is not None and analysis.rule_for(producer).masks_go_before \
                    and name == producer.output[0] and producer.input[0] in analysis.info:
                targets.append((producer.input[0], [Use(producer, 0)]))
            elif readers:
                targets.append((name, readers))
    else:
        for name in analysis.creators:
            info = analysis.info[name]
            if chosen[roots[info.ids]].any():
                uses = index.uses(name)
                if len(uses) == 1 and analysis.rule_for(uses[0].node).masks_go_after and name not in index.outputs:
                    name = uses[0].node.output[0]
                targets.append((name, list(index.uses(name))))
    graph = model.graph
    mask_dtype = _float_types(model) if targets else None
    # every output of every node (the second output of a Split ...); graph inputs go first (-1)
    positions = {name: position for position, node in enumerate(graph.node) for name in node.output if name}
    inserted, added = [], []
    in_weights = _mask_in_weights(model, analysis, chosen[roots], added)
    for name, readers in targets:
        info = analysis.info[name]
        if mask_dtype(name).kind != "f":
            continue  # an integer tensor (QOperator models): its layers' weights hold the mask
        values = np.where(chosen[roots[info.ids]], 0.0, 1.0).astype(mask_dtype(name))
        shape = [1] * info.rank
        shape[info.axis] = info.size
        mask_name = index.fresh_name(f"{name}_prune_mask")
        graph.initializer.append(numpy_helper.from_array(values.reshape(shape), mask_name))
        added.append(graph.initializer[-1])
        masked = index.fresh_name(f"{name}_pruned")
        mul = helper.make_node("Mul", [name, mask_name], [masked], name=masked)
        for use in readers:
            use.node.input[use.slot] = masked
        inserted.append((positions.get(name, -1), mul))
        index.producer[masked] = mul  # reserve the names
        index.initializers[mask_name] = graph.initializer[-1]
    for position, mul in sorted(inserted, key=lambda item: -item[0]):
        graph.node.insert(position + 1, mul)
    if model.ir_version < 4:  # IR 3 lists every initializer as an input
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in added)
    return len(inserted) + in_weights


def _mask_in_weights(model: onnx.ModelProto, analysis: ChannelAnalysis, chosen: np.ndarray, added: list) -> int:
    """Masks written into the weights of the layers whose rule can (``Rule.mask_output_channels``: quantized
    layers, whose integer output reads a channel as zero at its zero point): each chosen output channel
    (``chosen``: bool per element id) gets new constants that make it that zero. The new initializers are
    appended to ``added``; returns how many layers were masked so."""
    index, graph, count = analysis.index, model.graph, 0
    for name, node in analysis.creators.items():
        zero = chosen[analysis.info[name].ids]
        masks = analysis.rule_for(node).mask_output_channels(node, index, zero) if zero.any() else None
        for slot, value in (masks or {}).items():
            masked = index.fresh_name(f"{node.input[slot]}_prune_mask")
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), masked))
            added.append(graph.initializer[-1])
            index.initializers[masked] = graph.initializer[-1]
            node.input[slot] = masked
        count += bool(masks)
    return count


def _float_types(model: onnx.ModelProto):
    """A function giving the numpy dtype of a tensor of ``model`` (by shape inference): a mask multiplies a
    float16 model's tensors (YOLOv5 exported with ``--half``) in float16. A tensor onnx cannot type (after a
    com.microsoft op it has no shape for, such as a channels-last QLinearAveragePool) has the type of the
    nearest typed tensor up the chain of first inputs (a Transpose of that pool's int8 output is int8, and
    gets no float mask); float32 when none is typed."""
    inferred = infer_model(model)
    types = {t.name: t.data_type for t in model.graph.initializer}
    types.update({value.name: value.type.tensor_type.elem_type
                  for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]})
    producers = {name: node for node in model.graph.node for name in node.output if name}

    def dtype(name: str) -> np.dtype:
        seen = set()
        while not types.get(name) and name in producers and name not in seen and producers[name].input:
            seen.add(name)
            name = producers[name].input[0]
        return helper.tensor_dtype_to_np_dtype(types.get(name) or onnx.TensorProto.FLOAT)
    return dtype


def _drop_dead_code(model: onnx.ModelProto) -> None:
    """Constants that normalisation folded (a DequantizeLinear of a weight ...) leave their sources unread:
    drop them from the masked reference (and from the graph inputs of IR 3 models, which list them)."""
    before = {t.name for t in model.graph.initializer}
    remove_dead_code(model)
    gone = before - {t.name for t in model.graph.initializer}
    if gone:
        survivors = [value for value in model.graph.input if value.name not in gone]
        del model.graph.input[:]
        model.graph.input.extend(survivors)


def prune(model: onnx.ModelProto | str | os.PathLike, output_path: str | os.PathLike | None = None, *,
          ratio: float = 0.5, criterion: str = "l1", scope: str = "layer", min_channels: int = 1,
          input_shapes: dict[str, list[int]] | None = None, round_to: int | str = 1, seed: int = 0,
          placement: str = "consumers", masked_path: str | os.PathLike | None = None,
          rules: RuleSet | None = None, cost: Cost = "macs", target_device: str | None = None,
          ) -> tuple[onnx.ModelProto, SlimReport, onnx.ModelProto]:
    """Prune ``ratio`` of the prunable channels; returns (slimmed model, report, masked model).

    The masked model is the unslimmed reference that the slimmed model reproduces exactly. ``rules``
    is the rule set of the analysis and the slim (default :func:`onnxslim.graph.rules.default_rules`);
    ``cost`` is what ``scope="global"`` ranks importance against (MACs per sample, or params). Both
    files are written only when everything succeeded; the report's ``notes`` say what limited the choice.
    ``round_to`` (an int or ``"auto"``, :mod:`onnxslim.graph.rounding`) rounds every pruned layer's
    *kept* count to the nearest multiple, as Torch-Pruning does.
    """
    rounding = resolve_round_to(round_to, target_device)
    masked, before = load_input(model, rules)
    analysis = analyse(masked, input_shapes, rules=rules)
    selection = choose_classes(analysis, ratio, criterion, scope, min_channels, seed, cost, rounding.multiple)
    slimmed, report = prune_selection(masked, analysis, selection, channel_scores(analysis, criterion, seed),
                                      rounding, placement=placement, input_shapes=input_shapes, rules=rules,
                                      **before)
    # written only once everything succeeded: a failed command leaves no output file
    if masked_path is not None:
        save_model_atomic(masked, masked_path)
    if output_path is not None:
        report.size_after = save_model_atomic(slimmed, output_path)
    return slimmed, report, masked


def load_input(model: onnx.ModelProto | str | os.PathLike, rules: RuleSet | None = None,
               ) -> tuple[onnx.ModelProto, dict[str, int]]:
    """A private copy of ``model`` (to mask) and what the report says of the input, as stored:
    ``size_before`` (bytes) and ``params_before`` (:func:`count_params` before normalisation copies
    constants), the keyword arguments of :func:`prune_selection`."""
    masked, size_before = load_model(model)
    return masked, {"size_before": size_before, "params_before": count_params(masked, rules)}


def prune_selection(masked: onnx.ModelProto, analysis: ChannelAnalysis, selection: Selection,
                    scores: dict[str, np.ndarray], rounding: Rounding, *, placement: str = "consumers",
                    input_shapes: dict[str, list[int]] | None = None, rules: RuleSet | None = None,
                    size_before: int | None = None, params_before: int | None = None,
                    ) -> tuple[onnx.ModelProto, SlimReport]:
    """Steps 4-5 of ``prune`` for classes already chosen: round the kept counts (``scores`` rank the
    channels :func:`round_choice` adds or gives back), insert the masks into ``masked`` (in place; it is
    the model ``analysis`` was run on), check it and slim it. Returns (slimmed model, report), whose
    ``size_before`` and ``params_before`` are the input's (bytes, :func:`count_params` before
    normalisation) when given, else the masked model's (which adds the masks)."""
    roots = round_choice(analysis, selection.roots, scores, rounding.multiple, analysis.kept_by(BARRIER))
    rounded = rounding_note(analysis, selection.roots, roots, scores, rounding.multiple)
    insert_masks(masked, analysis, roots, placement)
    _drop_dead_code(masked)
    check_model(masked, what="the masked model")
    slimmed, report = slim(masked, input_shapes=input_shapes, round_to=rounding.multiple, rules=rules)
    report.rounding = rounding.to_dict(kept_counts=True)
    report.notes = selection.notes + rounded + report.notes
    if size_before is not None:  # the input's size, not the masked reference's (which adds the masks)
        report.size_before = size_before
    if params_before is not None:
        report.params_before = params_before
    return slimmed, report
