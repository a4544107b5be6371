"""The rule interface and :class:`RuleSet`, the value that maps ops to their rules.

A rule states, for one op family,

* ``propagate(node, analysis)`` — how channel ids and channel values pass from inputs to outputs, which
  channels it couples and which it keeps (and why);
* ``rewrite(node, rewriter)`` — how to slice its weights and attributes once the plan is known;
* ``allows_empty_input`` / ``allows_empty_output`` — whether a tensor may lose every channel here;
* ``settle(node, plan)`` — restore channels until the plan is one the rewrite can apply (a grouped conv
  keeps equal groups); returns True when it restored anything;
* ``nonnegative(node, analysis)`` — every element of the op's outputs is >= 0 whatever the graph inputs
  (Relu, Sigmoid, a Mul of non-negative operands ...); a rule answers through
  :meth:`~onnxslim.graph.analysis.ChannelAnalysis.nonnegative` about its inputs. ReduceMax over channels
  asks it: on a non-negative input a zero channel cannot be the maximum of the others;
* ``positive(node, analysis)`` — every element is > 0 (``x + eps`` of an ``x >= 0``, Clip with a
  positive min ...); a Div by such a tensor keeps a zero channel zero (L2 normalisation);
* what ``prune``, rounding, ``cleanup`` and ``stats`` ask of the op, so that they name no op types:
  ``filters`` (scores for the ``l1``/``l2``/``fpgm`` criteria through ``channel_scores``),
  ``channel_gains`` (``bn``), ``reduction`` (where masks go), ``masks_go_after``, ``masks_go_before``, ``counts_macs`` /
  ``macs``, ``params``, ``multiplies`` / ``is_identity`` / ``commutes_with_positive_scale`` /
  ``fold_output_scale`` / ``scaled_input_weight`` (folding a leftover mask scale into weights),
  ``plan_notes`` (what the slim report should say about this op family under a removal plan),
  ``mask_output_channels`` (prune's mask of an op whose output zero is not the number 0, written into
  its weights).

A rule serves the ops ``op_types`` of the domain ``domain`` ("" is the default ONNX domain, also spelt
"ai.onnx"). Ops without a rule are barriers. A rule set is built from rules and passed to the analysis,
the rewrite and the cleanup; nothing is registered globally. ``@register`` marks a class of a rule module
as one of that module's default rules (:func:`module_rules`); :func:`onnxslim.graph.rules.default_rules`
collects them. Adding an op means adding one rule and one test.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Literal

import numpy as np
import onnx

from onnxslim.graph.model import Use, get_attr, set_attr
from onnxslim.graph.values import BARRIER, CONSTANT, LIVE, ChannelInfo

if TYPE_CHECKING:
    from onnxslim.graph.analysis import ChannelAnalysis
    from onnxslim.graph.model import Graph, WeightStore
    from onnxslim.graph.plan import RemovalPlan
    from onnxslim.graph.rewrite import Rewriter

DEFAULT_DOMAIN = ""
Reduction = Literal["none", "grouped", "full"]
#: criteria computed from a layer's filters (see :func:`filter_scores`)
FILTER_CRITERIA = ("l1", "l2", "fpgm")


class Rule:
    """Default behaviour: nothing passes, nothing is rewritten (see :class:`BarrierRule`)."""

    op_types: tuple[str, ...] = ()
    #: the ONNX domain of ``op_types`` ("" = the default domain "ai.onnx")
    domain: str = DEFAULT_DOMAIN
    #: the outputs carry the channels of the feature input one-to-one (activations, BN, pooling ...)
    passthrough = False
    #: the input that holds the weight of a ``counts_macs`` op (``params`` counts it when it is integer)
    weight_slot = 1

    def propagate(self, node: onnx.NodeProto, analysis: ChannelAnalysis) -> None:
        analysis.barrier(node, "no rule for this op")

    def rewrite(self, node: onnx.NodeProto, rewriter: Rewriter) -> None:
        return None

    def allows_empty_input(self, node: onnx.NodeProto, slot: int, plan: RemovalPlan) -> bool:
        # a passthrough op's output empties with its input, and the whole node goes
        return self.passthrough

    def allows_empty_output(self, node: onnx.NodeProto, position: int, plan: RemovalPlan) -> bool:
        return True

    def settle(self, node: onnx.NodeProto, plan: RemovalPlan) -> bool:
        return False

    def nonnegative(self, node: onnx.NodeProto, analysis: ChannelAnalysis) -> bool:
        """True when every element of every output of ``node`` is >= 0 for every value of the graph
        inputs (a NaN, which only an infinite or NaN operand makes, is outside the question). False
        unless the rule proves it from the ONNX operator spec; ask about an input with
        ``analysis.nonnegative(name)`` (memoised; constants: all values >= 0)."""
        return False

    def positive(self, node: onnx.NodeProto, analysis: ChannelAnalysis) -> bool:
        """True when every element of every output of ``node`` is > 0 for every value of the graph
        inputs (a division by it keeps a zero channel zero). Underflow counts: ``exp(x)``, ``sigmoid(x)``
        and a product of small numbers can round to 0, so they are not positive. Ask about an input with
        ``analysis.positive(name)``."""
        return False

    # -- facts about the op used outside the analysis: prune, rounding, cleanup, stats --------------
    #: the op reads each input channel with a weight and sums over channels (Conv, Gemm ...): ``macs``
    #: counts its multiply-accumulates
    counts_macs = False
    #: mask training puts masks after this op, which follows a layer and rescales its channels (BN)
    masks_go_after = False
    #: prune puts a zero mask meant for this op's output 0 on its input 0 instead: a zero of the output
    #: is not the number 0 (DynamicQuantizeLinear's uint8 output reads 0 as its zero point)
    masks_go_before = False

    def mask_output_channels(self, node: onnx.NodeProto, index: Graph, zero: np.ndarray) -> dict[int, np.ndarray] | None:
        """Prune's mask for a channel-creating op whose output reads a channel as zero by something other
        than the number 0 (a quantized output: its zero point): the new constants, by input slot, that make
        the output channels where ``zero`` (bool, C_out) exactly that zero. None (the default): masks are
        a per-channel ``Mul`` by 0 on float tensors."""
        return None

    def filters(self, node: onnx.NodeProto, index: Graph) -> np.ndarray | None:
        """Channel-creating ops: the weights that make each output channel, shape (C_out, n), or None."""
        return None

    def channel_scores(self, node: onnx.NodeProto, analysis: ChannelAnalysis,
                       criterion: str = "l1") -> np.ndarray | None:
        """Importance of each output channel by ``criterion`` (see :func:`filter_scores`), from
        :meth:`filters`; None for ops that create no channels."""
        filters = self.filters(node, analysis.index)
        return None if filters is None else filter_scores(filters, criterion)

    def channel_gains(self, node: onnx.NodeProto, index: Graph) -> np.ndarray | None:
        """Per-channel scale factors the op applies to its input (BN's gamma), for the ``bn`` criterion."""
        return None

    def plan_notes(self, analysis: ChannelAnalysis, plan: RemovalPlan) -> list[str]:
        """Lines for the slim report about the nodes of this rule's ops under ``plan`` (asked once per
        rule that some node of the graph uses); none by default."""
        return []

    def reduction(self, node: onnx.NodeProto, slot: int) -> Reduction:
        """How the op combines the channels of input ``slot``: "full" (a sum over all channels, e.g. a
        one-group Conv), "grouped" (sums within channel groups), "none" (channels stay apart)."""
        return "none"

    def channel_groups(self, node: onnx.NodeProto) -> int:
        """Groups a "grouped" reduction splits its input and output channels into (a grouped conv's
        ``group``); deleting channels must keep the groups equal. 1 for every other op."""
        return 1

    def params(self, node: onnx.NodeProto, index: Graph) -> int:
        """Parameters of the op: elements of the constants it reads (weights, bias, BN vectors; a
        quantized weight counts its int8 elements)."""
        return sum(int(np.prod(index.shape(name), dtype=np.int64)) for name in node.input if index.is_const(name))

    def macs(self, node: onnx.NodeProto, dims: Callable[[str], tuple | None]) -> int | None:
        """Multiply-accumulates of one sample (batch taken as 1) when ``counts_macs``; None when the
        shapes are not static. ``dims(name)`` gives a tensor's shape (None entries for unknown dims)."""
        return None

    def multiplies(self, node: onnx.NodeProto) -> bool:
        """The node is ``y = a * b`` elementwise (a per-channel scale left by a mask is one)."""
        return False

    def is_identity(self, node: onnx.NodeProto) -> bool:
        """The node's output is its input unchanged (cleanup bypasses it)."""
        return False

    def commutes_with_positive_scale(self, node: onnx.NodeProto) -> bool:
        """``f(s x) = s f(x)`` channel by channel for ``s > 0``: a positive scale moves through the op."""
        return False

    def fold_output_scale(self, node: onnx.NodeProto, index: Graph, weights: WeightStore, s: np.ndarray) -> bool:
        """Multiply output channel ``c`` by ``s[c]`` inside the op's weights; False when it cannot."""
        return False

    def scaled_input_weight(self, node: onnx.NodeProto, slot: int, index: Graph, s: np.ndarray) -> np.ndarray | None:
        """The float64 weight (input 1) that makes the op read input ``slot`` scaled by ``s`` per
        channel, or None when the op cannot absorb that scale."""
        return None


class BarrierRule(Rule):
    """Ops that are barriers on purpose (or unknown): every channel read or written is kept."""

    def __init__(self, why: str = "no rule for this op", op_types: Iterable[str] = (),
                 domain: str = DEFAULT_DOMAIN):
        self.why = why
        self.op_types = tuple(op_types)
        self.domain = domain

    def propagate(self, node: onnx.NodeProto, analysis: ChannelAnalysis) -> None:
        analysis.barrier(node, self.why)


def register(rule_class: type[Rule]) -> type[Rule]:
    """Mark ``rule_class`` as a default rule of the module that defines it (see :func:`module_rules`).

    Only the class is marked; nothing global changes.
    """
    rule_class._default_rule = True
    return rule_class


def module_rules(module: types.ModuleType) -> list[Rule]:
    """The default rules of a rule module: one instance per ``@register`` class it defines, in
    definition order, then its ``BARRIERS`` (a tuple of :class:`BarrierRule`)."""
    classes = [value for value in vars(module).values()
               if isinstance(value, type) and issubclass(value, Rule) and value.__dict__.get("_default_rule")
               and value.__module__ == module.__name__]
    return [cls() for cls in classes] + list(getattr(module, "BARRIERS", ()))


def op_key(domain: str, op_type: str) -> tuple[str, str]:
    """The key of an op in a rule set: (domain with "ai.onnx" spelt "", op_type)."""
    return (DEFAULT_DOMAIN if domain in ("", "ai.onnx") else domain, op_type)


class RuleSet:
    """An immutable map from ``(domain, op_type)`` to the :class:`Rule` of that op.

    Later rules replace earlier ones for the ops they share; ops without a rule get ``fallback`` (a
    barrier). :meth:`with_rules` returns a new set, so a caller can add a rule for a custom-domain op or
    replace a default one without changing any other set::

        rules = default_rules().with_rules(MyScaleRule())
        slim(model, rules=rules)
    """

    def __init__(self, rules: Iterable[Rule] = (), fallback: Rule | None = None):
        table: dict[tuple[str, str], Rule] = {}
        for rule in rules:
            for op_type in rule.op_types:
                table[op_key(rule.domain, op_type)] = rule
        self._table = types.MappingProxyType(table)
        self._fallback = fallback if fallback is not None else BarrierRule()

    @property
    def fallback(self) -> Rule:
        """The rule of ops no rule names (a barrier unless given)."""
        return self._fallback

    def rule_for(self, node: onnx.NodeProto) -> Rule:
        """The rule of ``node`` (by its domain and op_type), or the fallback barrier."""
        return self._table.get(op_key(node.domain, node.op_type), self.fallback)

    def with_rules(self, *rules: Rule) -> RuleSet:
        """A new set with ``rules`` added; each replaces the current rule of the ops it names."""
        return RuleSet([*self._table.values(), *rules], self.fallback)

    def known_op_types(self, domain: str = DEFAULT_DOMAIN) -> list[str]:
        """Sorted op types of ``domain`` that have a rule other than a barrier."""
        domain = op_key(domain, "")[0]
        return sorted(op for (d, op), rule in self._table.items() if d == domain and not isinstance(rule, BarrierRule))

    def __contains__(self, key: tuple[str, str]) -> bool:
        return op_key(*key) in self._table

    def __iter__(self) -> Iterator[tuple[tuple[str, str], Rule]]:
        return iter(self._table.items())

    def __len__(self) -> int:
        return len(self._table)


# -- helpers shared by rules ---------------------------------------------------------------------

def pass_through(node: onnx.NodeProto, analysis: ChannelAnalysis, info: ChannelInfo, outputs: int = 1) -> None:
    for name in node.output[:outputs]:
        analysis.set(name, info)


def feature_or_barrier(node: onnx.NodeProto, analysis: ChannelAnalysis, slot: int = 0) -> ChannelInfo | None:
    """The channel facts of ``node``'s input ``slot``; when it has none, ``node`` becomes a barrier (it
    holds what it reads) and None is returned."""
    x = analysis.feature(node.input[slot])
    if x is None:
        analysis.barrier(node, "input has no known channel axis")
    return x


def keep_extra_outputs(node: onnx.NodeProto, analysis: ChannelAnalysis, first_extra: int, why: str) -> bool:
    """Ops whose extra outputs (MaxPool indices, BN running stats, Dropout mask) we do not model: when
    one is read, the op is a barrier. Returns True when it became one."""
    if any(name and (analysis.index.uses(name) or name in analysis.index.outputs)
           for name in node.output[first_extra:]):
        analysis.barrier(node, why)
        return True
    return False


def block_reduced_channels(analysis: ChannelAnalysis, node: onnx.NodeProto, name: str, info: ChannelInfo,
                           used: np.ndarray, absorbs_constants: bool, constant_why: str = "",
                           trigger: np.ndarray | None = None) -> None:
    """The check for a reducing consumer (Conv, Gemm, MatMul ...) reading ``name``.

    Channel ``c`` may go when it is zero, when the consumer's weights ignore it (``~used[c]``), or when it
    is a constant the consumer absorbs into its bias (``absorbs_constants``). Everything else is kept —
    unconditionally, or (``trigger``: output ids) only while one of those outputs is kept.
    """
    def keep(ids, kind, text):
        if trigger is None:
            analysis.keep(ids, kind, text)
        else:
            analysis.keep_if(trigger, ids, kind, text)

    ok = info.zero | ~used
    if absorbs_constants:
        ok |= info.const
    if ok.all():
        return
    label = f"{node.op_type} '{analysis.index.node_name(node)}'"
    live = ~ok & ~info.const
    keep(info.ids[live], LIVE, f"live (non-zero) in '{name}', read by {label}")
    constant = ~ok & info.const
    if constant.any():
        keep(info.ids[constant], CONSTANT,
                      f"non-zero constant in '{name}' that {label} cannot absorb{constant_why}")


def write_int_operand(node: onnx.NodeProto, rewriter: Rewriter, attr: str, slot: int, value: np.ndarray) -> None:
    """Store a recomputed int64 operand (Split's sizes, Slice's bounds, Pad's pads) the way the node
    carries it: as attribute ``attr`` (old opsets) or as input ``slot`` (a computed input is replaced by a
    constant: its export-time formula would not know about the deleted channels)."""
    if get_attr(node, attr) is not None:
        set_attr(node, attr, [int(v) for v in value])
    elif len(node.input) > slot and node.input[slot] and rewriter.index.is_const(node.input[slot]):
        rewriter.weights.write(node, slot, np.asarray(value, np.int64), key=(attr, np.asarray(value).tobytes()))
    elif len(node.input) > slot and node.input[slot]:
        node.input[slot] = rewriter.weights.add(f"{node.output[0]}_{attr}", np.asarray(value, np.int64))
    else:
        while len(node.input) <= slot:
            node.input.append("")
        node.input[slot] = rewriter.weights.add(f"{node.output[0]}_{attr}", np.asarray(value, np.int64))


def layer_keeps(node: onnx.NodeProto, rewriter: Rewriter) -> tuple[np.ndarray, np.ndarray] | None:
    """(kept output channels, kept input channels) of a channel-creating layer, or None if unchanged."""
    keep_out, keep_in = rewriter.keep(node.output[0]), rewriter.keep(node.input[0])
    if keep_out is None or keep_in is None or (keep_out.all() and keep_in.all()):
        return None
    return keep_out, keep_in


def slice_bias(node: onnx.NodeProto, rewriter: Rewriter, keep_out: np.ndarray, slot: int = 2) -> None:
    """Keep the bias entries of the kept output channels (when the layer has a bias)."""
    if len(node.input) > slot and node.input[slot] and not keep_out.all():
        bias = rewriter.weights.read(node, slot)
        rewriter.weights.write(node, slot, np.compress(keep_out, bias, axis=bias.ndim - 1),
                               key=("take", bias.ndim - 1, keep_out.tobytes()))


def slice_channel_vectors(node: onnx.NodeProto, rewriter: Rewriter, slots: Iterable[int], keep: np.ndarray) -> None:
    """Keep the entries of the kept channels in the per-channel vectors at input ``slots`` (per-channel
    scales and zero points); a per-tensor (one-element) or absent input stays as it is."""
    if keep.all():
        return
    for slot in slots:
        value = rewriter.index.constant(node.input[slot]) if len(node.input) > slot and node.input[slot] else None
        if value is not None and value.size == len(keep) and value.size > 1:
            rewriter.weights.write(node, slot, value.reshape(-1)[keep], key=("take", 0, keep.tobytes()))


def gather_input(node: onnx.NodeProto, rewriter: Rewriter, axis: int, positions: np.ndarray) -> None:
    """Feed ``node`` a new ``Gather`` of ``positions`` of its first input along ``axis`` (ONNX Gather-1+),
    for a node that reads only some channels of an input whose other readers keep them all."""
    name = rewriter.index.fresh_name(f"{node.input[0]}_read")
    indices = rewriter.weights.add(f"{name}_channels", np.asarray(positions, np.int64))
    insert_before(node, rewriter, "Gather", name, indices, axis=int(axis))


def insert_before(node: onnx.NodeProto, rewriter: Rewriter, op_type: str, name: str, operand: str, **attrs) -> None:
    """Feed ``node`` ``op_type(its input 0, operand)`` from a new node ``name`` (also its output's name)
    inserted before it; only ``node`` reads the new output, the input's other readers are unchanged."""
    index, source = rewriter.index, node.input[0]
    new = onnx.helper.make_node(op_type, [source, operand], [name], name=name, **attrs)
    index.producer[name] = new
    index.consumers[source] = [Use(new, 0) if use.node is node and use.slot == 0 else use for use in index.uses(source)]
    index.consumers[name] = [Use(node, 0)]
    node.input[0] = name
    index.graph.node.insert(next(i for i, n in enumerate(index.graph.node) if n is node), new)


def insert_after(node: onnx.NodeProto, rewriter: Rewriter, op_type: str, hidden: str, operand: str, name: str,
                 **attrs) -> None:
    """``node`` writes ``hidden`` instead of its first output; a new node ``name``, ``op_type(hidden,
    operand)`` inserted after it, writes that output, so its readers (and a graph output) are unchanged."""
    index, original = rewriter.index, node.output[0]
    node.output[0] = hidden
    index.producer[hidden] = node
    new = onnx.helper.make_node(op_type, [hidden, operand], [original], name=name, **attrs)
    index.producer[original] = new
    index.consumers[hidden] = [Use(new, 0)]
    index.graph.node.insert(next(i for i, n in enumerate(index.graph.node) if n is node) + 1, new)


def filter_scores(filters: np.ndarray, criterion: str) -> np.ndarray:
    """One score per row of ``filters`` (C_out, n); larger means more important.

    * ``l1``: sum of absolute weights (Li et al. 2017, "Pruning Filters for Efficient ConvNets");
    * ``l2``: Euclidean norm;
    * ``fpgm``: sum of Euclidean distances to the layer's other filters — filters near the geometric
      median are replaceable by the others (He et al. 2019, "Filter Pruning via Geometric Median", eq. 6).

    Raises ValueError for another criterion.
    """
    if criterion == "l1":
        return np.abs(filters).sum(axis=1, dtype=np.float64)
    values = filters.astype(np.float64)
    if criterion == "l2":
        return np.sqrt((values**2).sum(axis=1))
    if criterion == "fpgm":
        squared = (values**2).sum(axis=1)
        distance2 = squared[:, None] + squared[None, :] - 2.0 * (values @ values.T)
        return np.sqrt(np.maximum(distance2, 0.0)).sum(axis=1)
    raise ValueError(f"unknown filter criterion {criterion!r}; choose one of {', '.join(FILTER_CRITERIA)}")


def write_scaled(weights: WeightStore, node: onnx.NodeProto, slot: int, value: np.ndarray, factor: np.ndarray) -> None:
    """Write ``value * factor`` (computed in float64) to input ``slot``, in ``value``'s dtype; readers of
    one shared initializer scaled by the same factor share one scaled copy."""
    factor = np.asarray(factor)
    scaled = (value.astype(np.float64) * factor).astype(value.dtype)
    if scaled.shape == value.shape and np.array_equal(scaled, value):
        return  # e.g. a zero bias: nothing to write (and nothing to split when it is shared)
    weights.write(node, slot, scaled, key=("scale", factor.shape, factor.tobytes()))


def scale_vector(index: Graph, weights: WeightStore, node: onnx.NodeProto, slot: int, s: np.ndarray) -> None:
    """Multiply the per-channel vector at input ``slot`` (a bias, BN's scale ...) by ``s``, when present."""
    if len(node.input) > slot and node.input[slot]:
        value = index.constant(node.input[slot])
        write_scaled(weights, node, slot, value, s.reshape(value.shape) if value.size == len(s) else s)


def saturation_note(names: list[str], what: str) -> list[str]:
    """The report line for integer layers ``names`` that lose input channels and read uint8 activations
    with int8 weights beyond 7 bits (:func:`onnxslim.graph.rules.dynquant.saturation_notes`); none when
    ``names`` is empty."""
    if not names:
        return []
    return [f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) read uint8 "
            "activations with int8 weights beyond 7 bits: onnxruntime's AVX2 kernels saturate pair sums of "
            "their products, so outputs can differ from the input model's wherever that happens (quantize "
            "with reduce_range=True, int8 activations or uint8 weights to compare bit for bit)"]


def aligned_axis(axis: int, rank: int, out_rank: int) -> int:
    """Index in a broadcast output of an input's axis (numpy-style right alignment)."""
    return axis + (out_rank - rank)


def normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def inputs_positive(node: onnx.NodeProto, analysis: ChannelAnalysis, slots: Iterable[int] = (0,)) -> bool:
    """Every input at ``slots`` is provably > 0 (see :meth:`Rule.positive`)."""
    return all(slot < len(node.input) and analysis.positive(node.input[slot]) for slot in slots)


def inputs_nonnegative(node: onnx.NodeProto, analysis: ChannelAnalysis, slots: Iterable[int] = (0,)) -> bool:
    """Every input at ``slots`` is provably >= 0 (see :meth:`Rule.nonnegative`): the answer of an op that
    moves or selects elements (Reshape, Slice, MaxPool ...) or keeps the sign of a non-negative input."""
    return all(slot < len(node.input) and analysis.nonnegative(node.input[slot]) for slot in slots)


def keep_all(analysis: ChannelAnalysis, node: onnx.NodeProto, info: ChannelInfo, why: str) -> None:
    analysis.keep(info.ids, BARRIER, f"barrier {node.op_type} '{analysis.index.node_name(node)}': {why}")
