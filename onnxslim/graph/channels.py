"""The channel dataflow analysis: which channels are provably zero, which are coupled, what blocks them.

This module states the model and re-exports its parts, one job per module:

* :mod:`onnxslim.graph.unionfind` — element ids and the union-find that couples them;
* :mod:`onnxslim.graph.values` — value states (:class:`ChannelInfo`) and keep reasons;
* :mod:`onnxslim.graph.analysis` — :class:`ChannelAnalysis`, which runs the rules of a rule set;
* :mod:`onnxslim.graph.plan` — :class:`RemovalPlan`, which decides what goes.

Model
-----
Every feature tensor (a tensor with a channel axis) carries, per channel:

* an **element id**. Ops that only move channels around (activations, BN, pooling, Concat, Split,
  Flatten ...) pass ids through; ops that create channels (Conv, Gemm, MatMul, graph inputs) make fresh
  ones. Ops that tie channels of different tensors (a residual ``Add``, SE gating ``Mul``, a depthwise conv's
  input and output) **couple** their ids with a union-find. A coupled class is one channel in every tensor
  that carries it and is deleted all-or-nothing.
* a **value state**: channel ``c`` is a known constant ``v`` everywhere (``const[c]``, ``value[c]``),
  or unknown. Zero is the constant 0. States flow forward: ``f(v)`` through elementwise ops (so zero stays
  zero exactly when ``f(0) = 0``), ``gamma (v - mean)/sigma + beta`` through BN, ``0 * anything = 0`` ...

Deciding
--------
A class can be deleted unless something **keeps** it:

* a *barrier*: a graph input or output, an op without a rule, a control-flow body reading it;
* a *reducing consumer* (Conv with one group, Gemm, MatMul, ConvTranspose) reading a tensor of the class
  in which the channel is neither zero, nor ignored by the consumer's weights, nor a constant that the
  consumer can absorb into its bias exactly (only without spatial padding);
* a *conditional* keep (:meth:`ChannelAnalysis.keep_if`): a grouped conv reads a live input channel only
  for the outputs of its group, so it holds that input only while one of those outputs is kept.

The plan then *settles* (:meth:`RemovalPlan.settle`): conditional keeps, tensors that must not become
empty, and rules whose rewrite needs a shape constraint (a grouped conv's groups keep equal sizes) each
restore channels until nothing changes. Restoring only ever keeps more, so the loop ends.

Channelwise consumers never keep a class: their output carries the same ids, so the channel vanishes in
lockstep. Deleting is always safe to undo: keeping a channel never changes the model's output, which is
how tensors that would become empty (and layer sizes rounded to a multiple) are handled.
"""

from onnxslim.graph.analysis import ChannelAnalysis, RuleLookup
from onnxslim.graph.plan import RemovalPlan, plan_removal
from onnxslim.graph.unionfind import UnionFind
from onnxslim.graph.values import BARRIER, CONSTANT, LIVE, STRUCTURAL, ChannelInfo, MaskSite, Reason

__all__ = [
    "BARRIER", "CONSTANT", "LIVE", "STRUCTURAL", "ChannelAnalysis", "ChannelInfo", "MaskSite", "Reason",
    "RemovalPlan", "RuleLookup", "UnionFind", "plan_removal",
]
