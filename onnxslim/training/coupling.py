"""Which output channels must share one mask: a union-find over the traced graph.

The model is traced with ``torch.fx`` (masks and the wrappers of :mod:`onnxslim.training.masks` stay
opaque) and run once on an example input to learn every tensor's shape. Each tensor with a channel
dimension (dim 1) gets a *layout*: a list of ``(block, repeat)`` pairs, where a block is a union-find
element standing for the output channels of one producer and ``repeat`` counts how many consecutive
features each channel occupies (``H*W`` after a flatten). The rules:

* a producer (``Conv``/``ConvTranspose`` with ``groups == 1``, ``Linear`` on 2-D input) makes a new block;
  the same module called twice makes the same block (shared filters);
* channel-preserving ops copy the layout: BN, activations, dropout, pooling, resampling, spatial slicing,
  means over spatial axes, flatten when H*W is 1, the masks themselves;
* a **depthwise** conv (``groups == in == out``) maps channel c to channel c: its output keeps its input's
  layout, so the mask after a depthwise conv's BN is the *same* mask as the one on its input. A zero
  channel entering it becomes BN's shift, and the shared mask sets it back to zero;
* ``add``/``sub`` and full-size ``mul`` **union** the blocks of their operands position by position —
  a zero can only be deleted if it is zero in every summand;
* ``cat`` along channels concatenates layouts and couples nothing;
* a broadcast ``mul`` by a (N,C,1,1)-or-smaller gate (squeeze-excitation) keeps the full operand's layout.

A block is *not maskable* when deleting its channels would change the result: it reaches the network
input or output (so the output layer is never masked), it passes through an op that maps 0 to non-zero
(sigmoid, hard-sigmoid, a BN that does not directly follow its producer, adding a non-zero constant),
it meets an op the rules do not know, a grouped (non-depthwise) conv, or layouts that do not line up.
Every producer of a maskable group gets a mask after its *site*: the BN that is the producer's only
consumer, or the producer itself.

**Handlers.** Each rule above is one small handler ``handler(state, node, target) -> Layout | None``
in a :class:`CouplingHandlers` table keyed by the traced target: a module type (looked up along the
module's class hierarchy), a function (``torch.cat``, ``operator.add``) or a method name (``"view"``).
:func:`default_handlers` builds the table; ``analyze_coupling(model, x, handlers=...)`` takes another
one, e.g. ``default_handlers().with_modules({MyGate: handler})`` for a custom module, which is then
traced as one call. A target without a handler blocks what it reads (:meth:`TraceState.unknown`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import operator
import sys
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from onnxslim.errors import OnnxSlimError
from onnxslim.training.channel_mask import ChannelMask

Layout = list[tuple[int, int]]  # (union-find element, features per channel)

_PRESERVING_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish, nn.Tanh, nn.PReLU,
    nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)
# map 0 to a non-zero value: channels passing through them cannot stay provably zero
_ZERO_BREAKING_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
_NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

_PRESERVING_FUNCTIONS = (
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.silu, F.gelu, F.hardswish, F.mish, torch.tanh,
    F.dropout, F.dropout2d, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate, torch.relu_, torch.clone,
    operator.neg, torch.neg,
)
_ZERO_BREAKING_FUNCTIONS = (torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus, torch.exp, torch.cos)
_PRESERVING_METHODS = ("relu", "relu_", "contiguous", "clone", "float", "to", "tanh", "neg", "detach")
_ZERO_BREAKING_METHODS = ("sigmoid", "exp")
_ADD_FUNCTIONS = (operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub)
_ADD_METHODS = ("add", "add_", "sub", "sub_")
_MUL_FUNCTIONS = (operator.mul, operator.imul, torch.mul)
_MUL_METHODS = ("mul", "mul_")
_FLATTEN_FUNCTIONS = (torch.flatten, torch.reshape)
_FLATTEN_METHODS = ("flatten", "view", "reshape")
_MEAN_FUNCTIONS = (torch.mean, torch.amax, torch.sum)
_MEAN_METHODS = ("mean", "amax", "sum")


@dataclasses.dataclass(frozen=True)
class Producer:
    """A channel-producing module: ``name`` (qualified), ``kind`` and where its mask goes (``site``)."""

    name: str
    kind: str  # "conv", "depthwise", "grouped", "conv_transpose", "linear"
    out_channels: int
    site: str  # qualified name of the module after which the mask is applied
    norm: str | None  # the BN that is the site, if any


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Producers whose output channels are coupled (index c of each is the same channel)."""

    producers: tuple[str, ...]
    channels: int
    maskable: bool
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One producer call with its input layout, for per-layer size estimates."""

    producer: str
    module: nn.Module
    group: int  # index into CouplingAnalysis.groups
    input_layout: tuple[tuple[int, int], ...]  # (group index, features per channel)
    output_shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class CouplingAnalysis:
    groups: tuple[ChannelGroup, ...]
    producers: dict[str, Producer]
    group_of: dict[str, int]  # producer name -> group index
    layers: tuple[LayerInfo, ...]
    mask_groups: dict[str, int]  # name of a ChannelMask module already in the model -> group index

    def maskable_groups(self) -> list[ChannelGroup]:
        return [group for group in self.groups if group.maskable]


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.blocked: dict[int, str] = {}

    def new(self, channels: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(channels)
        return len(self.parent) - 1

    def find(self, element: int) -> int:
        while self.parent[element] != element:
            self.parent[element] = self.parent[self.parent[element]]
            element = self.parent[element]
        return element

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self.parent[rb] = ra
        reason = self.blocked.pop(rb, None)
        if reason and ra not in self.blocked:
            self.blocked[ra] = reason

    def block(self, element: int, reason: str) -> None:
        self.blocked.setdefault(self.find(element), reason)


def _shape(node: Any) -> tuple[int, ...] | None:
    """The traced shape of ``node`` (None for non-tensors and non-nodes)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if meta is None or not hasattr(meta, "shape"):
        return None
    return tuple(int(d) for d in meta.shape)


class TraceState:
    """What the walk over one traced graph has found so far; handlers read and extend it.

    ``layouts`` maps each visited node to its layout (None: no channel dimension); ``uf`` is the
    union-find over blocks; producers and their calls are recorded with :meth:`add_producer`.
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.uf = _UnionFind()
        self.modules = modules
        self.layouts: dict[fx.Node, Layout | None] = {}
        self.producer_block: dict[str, int] = {}
        self.producers: dict[str, tuple[str, int]] = {}  # name -> (kind, out_channels)
        self.layer_calls: list[tuple[str, nn.Module, int, Layout, tuple[int, ...]]] = []
        self.mask_blocks: dict[str, int] = {}

    shape = staticmethod(_shape)

    def layout(self, node: Any) -> Layout | None:
        return self.layouts.get(node) if isinstance(node, fx.Node) else None

    def first_layout(self, node: fx.Node) -> Layout | None:
        """The layout of the node's first argument (the tensor a module or an activation reads)."""
        return self.layout(node.args[0] if node.args else None)

    def block_all(self, layout: Layout | None, reason: str) -> None:
        for element, _ in layout or []:
            self.uf.block(element, reason)

    def fresh(self, node: fx.Node, reason: str | None) -> Layout | None:
        """A new block for ``node``'s channels, blocked with ``reason`` when given."""
        s = _shape(node)
        if s is None or len(s) < 2:
            return None
        element = self.uf.new(s[1])
        if reason:
            self.uf.block(element, reason)
        return [(element, 1)]

    def tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if _shape(n) is not None else None)
        return found

    def unknown(self, node: fx.Node, what: str) -> Layout | None:
        """A barrier: every channel ``node`` reads and writes is blocked."""
        for arg in self.tensor_inputs(node):
            self.block_all(self.layouts.get(arg), f"used by {what}")
        return self.fresh(node, f"produced by {what}")

    def union_layouts(self, a: Layout, b: Layout, what: str) -> bool:
        """Couple ``a`` and ``b`` position by position; block boundaries must agree (else both are blocked)."""
        size = self.uf.size
        if len(a) != len(b) or any(size[x] * rx != size[y] * ry or rx != ry for (x, rx), (y, ry) in zip(a, b)):
            self.block_all(a, f"misaligned channels at {what}")
            self.block_all(b, f"misaligned channels at {what}")
            return False
        for (x, _), (y, _) in zip(a, b):
            self.uf.union(x, y)
        return True

    def is_blocked(self, layout: Layout) -> bool:
        return any(self.uf.find(e) in self.uf.blocked for e, _ in layout)

    def add_producer(self, node: fx.Node, module: nn.Module, kind: str, out_channels: int) -> None:
        """Record a call of producer ``node.target`` (its block must be in ``producer_block`` already)."""
        self.producers[node.target] = (kind, out_channels)
        self.layer_calls.append((node.target, module, self.producer_block[node.target],
                                 list(self.first_layout(node) or []), _shape(node) or ()))


Handler = Callable[[TraceState, fx.Node, Any], "Layout | None"]


@dataclasses.dataclass(frozen=True)
class CouplingHandlers:
    """The handler table: ``handler(state, node, target) -> layout`` keyed by the traced target.

    ``modules`` is keyed by module type (a subclass uses its nearest registered base class),
    ``functions`` by the called function, ``methods`` by the tensor method's name. Module types in the
    table are traced as one call (``torch.fx`` leaves).
    """

    modules: Mapping[type, Handler]
    functions: Mapping[Any, Handler]
    methods: Mapping[str, Handler]

    def for_module(self, module: nn.Module) -> Handler | None:
        return next((self.modules[cls] for cls in type(module).__mro__ if cls in self.modules), None)

    def for_call(self, node: fx.Node) -> Handler | None:
        table = self.functions if node.op == "call_function" else self.methods
        try:
            return table.get(node.target)
        except TypeError:  # an unhashable target
            return None

    def with_modules(self, extra: Mapping[type, Handler]) -> CouplingHandlers:
        """A copy with handlers for more (or replaced) module types."""
        return dataclasses.replace(self, modules=MappingProxyType({**self.modules, **extra}))

    def with_functions(self, extra: Mapping[Any, Handler]) -> CouplingHandlers:
        return dataclasses.replace(self, functions=MappingProxyType({**self.functions, **extra}))

    def with_methods(self, extra: Mapping[str, Handler]) -> CouplingHandlers:
        return dataclasses.replace(self, methods=MappingProxyType({**self.methods, **extra}))


class _Tracer(fx.Tracer):
    def __init__(self, handlers: CouplingHandlers) -> None:
        super().__init__()
        self.handlers = handlers

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return type(module) in self.handlers.modules or super().is_leaf_module(module, qualified_name)


def trace(model: nn.Module, example_input: torch.Tensor, handlers: CouplingHandlers | None = None) -> fx.GraphModule:
    """``torch.fx`` trace of ``model`` with tensor shapes from one eval-mode run on ``example_input``.

    Module types with a handler (``ChannelMask`` by default) stay single calls. Raises
    :class:`OnnxSlimError` when ``torch.fx`` cannot trace the model.
    """
    handlers = handlers or default_handlers()
    was_training = model.training
    model.eval()  # masked sites trace as explicit mask multiplications in eval mode
    try:
        try:
            graph = _Tracer(handlers).trace(model)
        except Exception as exc:  # fx raises many exception types for untraceable code
            raise OnnxSlimError(f"cannot trace {type(model).__name__} with torch.fx to find coupled channels: "
                                f"{exc}") from None
        module = fx.GraphModule(model, graph)
        module.eval()
        _propagate_shapes(module, model, example_input)
    finally:
        model.train(was_training)
    return module


def _propagate_shapes(module: fx.GraphModule, model: nn.Module, example_input: torch.Tensor) -> None:
    """ShapeProp on ``example_input``; a model that fails on it raises one OnnxSlimError line (the model's own
    error) instead of ShapeProp's printed traceback and page of fx node metadata."""
    printed = io.StringIO()  # ShapeProp prints the traceback of a failing node itself: shown on success only
    error = None
    with torch.no_grad(), contextlib.redirect_stderr(printed):
        try:
            ShapeProp(module).propagate(example_input)
        except Exception as exc:  # the model's own error, wrapped by ShapeProp
            error = exc
    if error is not None:
        root = str(error.__cause__ or error).strip().splitlines() or [type(error).__name__]
        shape = tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else type(example_input).__name__
        raise OnnxSlimError(f"example_input {shape} does not run through {type(model).__name__}: {root[0]}")
    sys.stderr.write(printed.getvalue())


def analyze_coupling(model: nn.Module, example_input: torch.Tensor,
                     handlers: CouplingHandlers | None = None) -> CouplingAnalysis:
    """Find coupled channel groups and mask sites of ``model`` (see the module docstring for the rules).

    ``example_input``: one batch (N, C, H, W) the model accepts. ``handlers``: the rule table
    (default :func:`default_handlers`). Raises :class:`OnnxSlimError` when the model cannot be traced.
    """
    handlers = handlers or default_handlers()
    module = trace(model, example_input, handlers)
    state = TraceState(dict(model.named_modules(remove_duplicate=False)))
    for node in module.graph.nodes:
        state.layouts[node] = _visit(state, node, handlers)
    return _finish(state, module)


def _visit(state: TraceState, node: fx.Node, handlers: CouplingHandlers) -> Layout | None:
    """The layout of one node: graph inputs/outputs here, everything else through its handler."""
    if node.op == "placeholder":
        return state.fresh(node, "reaches the network input")
    if node.op == "get_attr":
        return None
    if node.op == "output":
        for arg in state.tensor_inputs(node):
            state.block_all(state.layouts.get(arg), "reaches the network output")
        return None
    if node.op == "call_module":
        sub = state.modules[node.target]
        handler = handlers.for_module(sub)
        return handler(state, node, sub) if handler else state.unknown(node, f"{type(sub).__name__} {node.target}")
    if _shape(node) is None:  # sizes, shapes, tuples of tensors
        if not (node.target is torch.Tensor.size or node.target in ("size", "dim") or node.target is getattr):
            for arg in state.tensor_inputs(node):
                state.block_all(state.layouts.get(arg), f"used by {_name(node)}")
        return None
    handler = handlers.for_call(node)
    return handler(state, node, node.target) if handler else state.unknown(node, _name(node))


def _name(node: fx.Node) -> str:
    target = node.target
    return getattr(target, "__name__", str(target))


def _label(node: fx.Node, target: Any) -> str:
    """How a message names the op: the module's type, or the function/method name."""
    return type(target).__name__ if node.op == "call_module" else _name(node)


# -- handlers: modules --------------------------------------------------------------------------------

def _mask(state: TraceState, node: fx.Node, module: nn.Module) -> Layout | None:
    """A mask keeps its input's layout; the group of its single block is the mask's group."""
    layout = state.first_layout(node)
    if layout and len(layout) == 1:
        state.mask_blocks.setdefault(node.target, layout[0][0])
    return layout


def _conv(state: TraceState, node: fx.Node, conv: nn.Module) -> Layout | None:
    """Conv/ConvTranspose: a producer (groups 1), a channel-to-channel map (depthwise) or a barrier (grouped)."""
    transposed = isinstance(conv, _CONV_TRANSPOSE_MODULES)
    source = state.first_layout(node)
    blocks = state.producer_block
    if conv.groups == 1:
        kind = "conv_transpose" if transposed else "conv"
        blocks.setdefault(node.target, state.uf.new(conv.out_channels))
        layout = [(blocks[node.target], 1)]
    elif (not transposed and conv.groups == conv.in_channels == conv.out_channels and source
          and len(source) == 1 and source[0][1] == 1):
        kind, layout = "depthwise", source
        if node.target in blocks:
            state.uf.union(blocks[node.target], source[0][0])
        else:
            blocks[node.target] = source[0][0]
    else:
        kind = "grouped"
        state.block_all(source, f"feeds grouped conv {node.target}")
        layout = state.fresh(node, f"output of grouped conv {node.target}")
        blocks.setdefault(node.target, layout[0][0])
    state.add_producer(node, conv, kind, conv.out_channels)
    return layout


def _linear(state: TraceState, node: fx.Node, linear: nn.Linear) -> Layout | None:
    """Linear on (N, C) input is a producer; on anything else a barrier."""
    out_shape = _shape(node)
    if out_shape is None or len(out_shape) != 2:
        return state.unknown(node, f"Linear {node.target} on a tensor that is not 2-D")
    state.producer_block.setdefault(node.target, state.uf.new(linear.out_features))
    state.add_producer(node, linear, "linear", linear.out_features)
    return [(state.producer_block[node.target], 1)]


def _norm(state: TraceState, node: fx.Node, norm: nn.Module) -> Layout | None:
    """BN keeps channels; unless it directly follows its producer it maps 0 to its shift (blocked)."""
    layout = state.first_layout(node)
    source = node.args[0] if node.args else None
    if not _is_site_norm(source, node, state.producers):
        state.block_all(layout, f"BN {node.target} does not directly follow its conv (maps 0 to its shift)")
    return layout


def _is_site_norm(source: Any, norm_node: fx.Node, producers: Mapping[str, Any]) -> bool:
    """A BN is a mask site when it directly consumes a producer call that has no other consumer."""
    if not isinstance(source, fx.Node) or source.op != "call_module" or source.target not in producers:
        return False
    return len(source.users) == 1 and norm_node.args[0] is source


# -- handlers: modules and calls ----------------------------------------------------------------------

def _keep(state: TraceState, node: fx.Node, target: Any) -> Layout | None:
    """Channel-preserving ops (activations with f(0) = 0, pooling, resampling, dropout): same layout."""
    return state.first_layout(node)


def _zero_breaking(state: TraceState, node: fx.Node, target: Any) -> Layout | None:
    """Ops with f(0) != 0 (sigmoid, exp ...): same layout, every channel blocked."""
    layout = state.first_layout(node)
    state.block_all(layout, f"{_label(node, target)} maps 0 to non-zero")
    return layout


def _flatten(state: TraceState, node: fx.Node, target: Any) -> Layout | None:
    """Flatten/view/reshape to (N, C*H*W): each channel becomes a run of H*W features."""
    source = node.args[0] if node.args else None
    layout = _flatten_layout(source, node, state.layout(source))
    if layout is None:
        what = f"Flatten {node.target}" if node.op == "call_module" else _name(node)
        return state.unknown(node, what)
    return layout


def _flatten_layout(source: Any, node: fx.Node, layout: Layout | None) -> Layout | None:
    in_shape, out_shape = _shape(source), _shape(node)
    if layout is None or in_shape is None or out_shape is None or len(out_shape) < 2:
        return None
    if in_shape[0] != out_shape[0]:
        return None
    per_channel = 1
    for d in in_shape[2:]:
        per_channel *= d
    if out_shape[1] == in_shape[1] and len(out_shape) <= len(in_shape) and all(d == 1 for d in in_shape[2:]):
        return layout
    if len(out_shape) == 2 and out_shape[1] == in_shape[1] * per_channel:
        return [(element, repeat * per_channel) for element, repeat in layout]
    return None


# -- handlers: calls ----------------------------------------------------------------------------------

def _mean(state: TraceState, node: fx.Node, target: Any) -> Layout | None:
    """A reduction over spatial axes keeps the channels; over channels it is a barrier."""
    first = node.args[0] if node.args else None
    in_shape, out_shape = _shape(first), _shape(node)
    if in_shape and out_shape and len(out_shape) >= 2 and out_shape[1] == in_shape[1] \
            and not _reduces_channels(node, len(in_shape)):
        return state.layout(first)
    return state.unknown(node, _name(node))


def _reduces_channels(node: fx.Node, ndim: int) -> bool:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        return True
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    return any(int(d) % ndim == 1 for d in dims)


def _getitem(state: TraceState, node: fx.Node, target: Any) -> Layout | None:
    """``x[:, :, a:b, c:d]`` (a spatial slice) keeps the channels; any other indexing is a barrier."""
    index = node.args[1]
    full = slice(None, None, None)
    if isinstance(index, tuple) and len(index) >= 2 and index[0] == full and index[1] == full \
            and all(isinstance(i, slice) for i in index[2:]):
        return state.first_layout(node)
    return state.unknown(node, _name(node))


def _add(state: TraceState, node: fx.Node, target: Any) -> Layout | None:
    return _combine(state, node, additive=True)


def _mul(state: TraceState, node: fx.Node, target: Any) -> Layout | None:
    return _combine(state, node, additive=False)


def _combine(state: TraceState, node: fx.Node, additive: bool) -> Layout | None:
    """add/sub union the operands' blocks; mul by a constant or a gate keeps the feature map's layout."""
    operands = list(node.args[:2])
    tensors = [a for a in operands if isinstance(a, fx.Node) and _shape(a) is not None]
    what = _name(node)
    if len(tensors) == 1:
        other = next((a for a in operands if a is not tensors[0]), None)
        layout = state.layouts.get(tensors[0])
        if isinstance(other, fx.Node):  # a non-tensor node (e.g. a size): keep conservative
            state.block_all(layout, f"{what} with a non-constant scalar")
            return state.fresh(node, f"output of {what}")
        if additive and other not in (0, 0.0):
            state.block_all(layout, f"{what} of a non-zero constant")
        return layout
    a, b = tensors[0], tensors[1]
    sa, sb, out = _shape(a), _shape(b), _shape(node)
    la, lb = state.layouts.get(a), state.layouts.get(b)
    if not additive and (la is None) != (lb is None):
        # a constant tensor times a feature map (e.g. a learned scale): multiplying keeps zeros
        return la if la is not None else lb
    if sa == sb and la is not None and lb is not None:
        if not additive:
            # x * gate with equal shapes (a gate over a 1x1 map): the gate already passed a sigmoid-like op,
            # so its channels are blocked; the product keeps x's zeros and needs no shared mask
            a_blocked, b_blocked = state.is_blocked(la), state.is_blocked(lb)
            if a_blocked != b_blocked:
                return lb if a_blocked else la
        state.union_layouts(la, lb, what)
        return la
    if not additive and la is not None and lb is not None and len(sa) == len(sb) and (sa == out or sb == out):
        # a gate (squeeze-excitation, or a per-pixel map): the result keeps the full operand's zeros; the
        # gate's own zeros would not be zeros of the full operand, so its channels are not maskable
        full, gate = (la, lb) if sa == out else (lb, la)
        state.block_all(gate, f"gates a feature map in {what}")
        return full
    state.block_all(la, f"{what} with a broadcast operand")
    state.block_all(lb, f"{what} with a broadcast operand")
    return state.fresh(node, f"output of {what}")


def _cat(state: TraceState, node: fx.Node, target: Any) -> Layout | None:
    """``cat`` along channels concatenates layouts; along another axis it couples the operands."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out_shape = _shape(node)
    if not isinstance(tensors, (list, tuple)) or out_shape is None:
        return state.unknown(node, "cat")
    parts = [state.layouts.get(t) for t in tensors]
    if any(p is None for p in parts):
        return state.unknown(node, "cat of a tensor without channels")
    if int(dim) % len(out_shape) == 1:
        return [entry for part in parts for entry in part]
    # concatenating along another axis puts the same channel index of every operand in one channel
    for part in parts[1:]:
        state.union_layouts(parts[0], part, "cat")
    return parts[0]


def default_handlers() -> CouplingHandlers:
    """The rule table of the module docstring (a new value on every call; extend it with ``with_*``)."""
    modules: dict[type, Handler] = {
        ChannelMask: _mask, nn.Linear: _linear, nn.Flatten: _flatten,
        **dict.fromkeys(_CONV_MODULES + _CONV_TRANSPOSE_MODULES, _conv),
        **dict.fromkeys(_NORM_MODULES, _norm),
        **dict.fromkeys(_PRESERVING_MODULES, _keep),
        **dict.fromkeys(_ZERO_BREAKING_MODULES, _zero_breaking),
    }
    functions: dict[Any, Handler] = {
        torch.cat: _cat, operator.getitem: _getitem,
        **dict.fromkeys(_ADD_FUNCTIONS, _add), **dict.fromkeys(_MUL_FUNCTIONS, _mul),
        **dict.fromkeys(_PRESERVING_FUNCTIONS, _keep), **dict.fromkeys(_ZERO_BREAKING_FUNCTIONS, _zero_breaking),
        **dict.fromkeys(_FLATTEN_FUNCTIONS, _flatten), **dict.fromkeys(_MEAN_FUNCTIONS, _mean),
    }
    methods: dict[str, Handler] = {
        **dict.fromkeys(_ADD_METHODS, _add), **dict.fromkeys(_MUL_METHODS, _mul),
        **dict.fromkeys(_PRESERVING_METHODS, _keep), **dict.fromkeys(_ZERO_BREAKING_METHODS, _zero_breaking),
        **dict.fromkeys(_FLATTEN_METHODS, _flatten), **dict.fromkeys(_MEAN_METHODS, _mean),
    }
    return CouplingHandlers(MappingProxyType(modules), MappingProxyType(functions), MappingProxyType(methods))


# -- result -------------------------------------------------------------------------------------------

def _finish(state: TraceState, module: fx.GraphModule) -> CouplingAnalysis:
    uf = state.uf
    roots: dict[int, int] = {}

    def group_index(element: int) -> int:
        return roots.setdefault(uf.find(element), len(roots))

    group_of = {name: group_index(element) for name, element in state.producer_block.items()}
    layers = tuple(
        LayerInfo(name, sub, group_index(element), tuple((group_index(e), r) for e, r in layout), tuple(out_shape))
        for name, sub, element, layout, out_shape in state.layer_calls
    )
    masks = {name: group_index(element) for name, element in state.mask_blocks.items()}
    members: list[list[str]] = [[] for _ in roots]
    for name, index in group_of.items():
        members[index].append(name)
    reasons, sizes = [""] * len(roots), [0] * len(roots)
    for root, index in roots.items():
        reasons[index] = uf.blocked.get(root, "")
        sizes[index] = uf.size[root]
    for name, (kind, _) in state.producers.items():
        if kind == "grouped" and not reasons[group_of[name]]:
            reasons[group_of[name]] = f"output of grouped conv {name}"
    for index, names in enumerate(members):
        if not names and not reasons[index]:
            reasons[index] = "no producer"
    groups = tuple(ChannelGroup(tuple(names), sizes[i], not reasons[i], reasons[i]) for i, names in enumerate(members))
    return CouplingAnalysis(groups, _producer_infos(state, module), group_of, layers, masks)


def _producer_infos(state: TraceState, module: fx.GraphModule) -> dict[str, Producer]:
    """Each producer with its mask site: the BN that is its only consumer, or the producer itself."""
    infos: dict[str, Producer] = {}
    for node in module.graph.nodes:
        if node.op != "call_module" or node.target not in state.producers or node.target in infos:
            continue
        users = list(node.users)
        norm = None
        if len(users) == 1 and users[0].op == "call_module" and \
                isinstance(state.modules[users[0].target], _NORM_MODULES):
            norm = users[0].target
        kind, out_channels = state.producers[node.target]
        infos[node.target] = Producer(node.target, kind, out_channels, norm or node.target, norm)
    return infos


def coupled_producers(model: nn.Module, example_input: torch.Tensor) -> list[Sequence[str]]:
    """Names of the producers of every maskable group with more than one producer (for inspection)."""
    analysis = analyze_coupling(model, example_input)
    return [group.producers for group in analysis.maskable_groups() if len(group.producers) > 1]
