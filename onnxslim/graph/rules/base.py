"""The rule interface and the registry of op rules.

A rule states, for one op family,

* ``propagate(node, analysis)`` — how channel ids and channel values pass from inputs to outputs, which
  channels it couples and which it keeps (and why);
* ``rewrite(node, rewriter)`` — how to slice its weights and attributes once the plan is known;
* ``allows_empty_input`` / ``allows_empty_output`` — whether a tensor may lose every channel here;
* ``settle(node, plan)`` — restore channels until the plan is one the rewrite can apply (a grouped conv
  keeps equal groups); returns True when it restored anything;
* ``channel_scores`` — for channel-creating ops, an importance per output channel (L1 of the filter),
  used by ``prune`` and by rounding.

Ops without a rule are barriers. Adding an op means adding one rule here (``@register``) and one test.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxslim.graph.channels import BARRIER, CONSTANT, LIVE, ChannelAnalysis, ChannelInfo, RemovalPlan

if TYPE_CHECKING:
    from onnxslim.graph.rewrite import Rewriter

_RULES: dict[str, Rule] = {}


class Rule:
    """Default behaviour: nothing passes, nothing is rewritten (see :class:`BarrierRule`)."""

    op_types: tuple[str, ...] = ()
    #: the outputs carry the channels of the feature input one-to-one (activations, BN, pooling ...)
    passthrough = False

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

    def channel_scores(self, node: onnx.NodeProto, analysis: ChannelAnalysis) -> np.ndarray | None:
        return None


class BarrierRule(Rule):
    """Unknown ops: every channel read or written is kept."""

    def __init__(self, why: str = "no rule for this op"):
        self.why = why

    def propagate(self, node: onnx.NodeProto, analysis: ChannelAnalysis) -> None:
        analysis.barrier(node, self.why)


_UNKNOWN = BarrierRule()


def register(rule_class: type[Rule]) -> type[Rule]:
    instance = rule_class()
    for op_type in rule_class.op_types:
        _RULES[op_type] = instance
    return rule_class


def register_barrier(op_type: str, why: str) -> None:
    _RULES[op_type] = BarrierRule(why)


def rule_for(node: onnx.NodeProto) -> Rule:
    if node.domain not in ("", "ai.onnx"):
        return _UNKNOWN
    return _RULES.get(node.op_type, _UNKNOWN)


def known_op_types() -> list[str]:
    return sorted(op for op, rule in _RULES.items() if not isinstance(rule, BarrierRule))


# -- helpers shared by rules ---------------------------------------------------------------------

def pass_through(node: onnx.NodeProto, analysis: ChannelAnalysis, info: ChannelInfo, outputs: int = 1) -> None:
    for name in node.output[:outputs]:
        analysis.set(name, info)


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


def aligned_axis(axis: int, rank: int, out_rank: int) -> int:
    """Index in a broadcast output of an input's axis (numpy-style right alignment)."""
    return axis + (out_rank - rank)


def normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def keep_all(analysis: ChannelAnalysis, node: onnx.NodeProto, info: ChannelInfo, why: str) -> None:
    analysis.keep(info.ids, BARRIER, f"barrier {node.op_type} '{analysis.index.node_name(node)}': {why}")
