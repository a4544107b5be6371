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
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from onnxslim.errors import OnnxSlimError

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

_PRESERVING_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.silu, F.gelu, F.hardswish, F.mish, torch.tanh,
    F.dropout, F.dropout2d, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate, torch.relu_, torch.clone,
    operator.neg, torch.neg,
}
_ZERO_BREAKING_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus, torch.exp, torch.cos}
_PRESERVING_METHODS = {"relu", "relu_", "contiguous", "clone", "float", "to", "tanh", "neg", "detach"}
_ZERO_BREAKING_METHODS = {"sigmoid", "exp"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
_ADD_METHODS = {"add", "add_", "sub", "sub_"}
_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
_MUL_METHODS = {"mul", "mul_"}
_FLATTEN_FUNCTIONS = {torch.flatten, torch.reshape}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_MEAN_FUNCTIONS = {torch.mean, torch.amax, torch.sum}
_MEAN_METHODS = {"mean", "amax", "sum"}


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


class _Tracer(fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        from onnxslim.training.masks import ChannelMask

        if isinstance(module, ChannelMask):
            return True
        return super().is_leaf_module(module, qualified_name)


def trace(model: nn.Module, example_input: torch.Tensor) -> fx.GraphModule:
    """``torch.fx`` trace of ``model`` with tensor shapes from one eval-mode run on ``example_input``."""
    was_training = model.training
    model.eval()  # masked sites trace as explicit mask multiplications in eval mode
    try:
        try:
            graph = _Tracer().trace(model)
        except Exception as exc:  # fx raises many exception types for untraceable code
            raise OnnxSlimError(f"cannot trace {type(model).__name__} with torch.fx to find coupled channels: "
                                f"{exc}") from None
        module = fx.GraphModule(model, graph)
        module.eval()
        with torch.no_grad():
            ShapeProp(module).propagate(example_input)
    finally:
        model.train(was_training)
    return module


def analyze_coupling(model: nn.Module, example_input: torch.Tensor) -> CouplingAnalysis:
    """Find coupled channel groups and mask sites of ``model`` (see the module docstring for the rules)."""
    from onnxslim.training.masks import ChannelMask

    module = trace(model, example_input)
    uf = _UnionFind()
    layouts: dict[fx.Node, Layout | None] = {}
    producer_block: dict[str, int] = {}
    producers: dict[str, dict] = {}
    layer_calls: list[tuple[str, nn.Module, int, Layout, tuple[int, ...]]] = []
    mask_blocks: dict[str, int] = {}
    modules = dict(model.named_modules(remove_duplicate=False))

    def shape(node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        if meta is None or not hasattr(meta, "shape"):
            return None
        return tuple(int(d) for d in meta.shape)

    def channels(layout: Layout) -> int:
        return sum(uf.size[e] * r for e, r in layout)

    def block_all(layout: Layout | None, reason: str) -> None:
        for element, _ in layout or []:
            uf.block(element, reason)

    def fresh(node, reason: str | None) -> Layout | None:
        s = shape(node)
        if s is None or len(s) < 2:
            return None
        element = uf.new(s[1])
        if reason:
            uf.block(element, reason)
        return [(element, 1)]

    def tensor_inputs(node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if shape(n) is not None else None)
        return found

    def unknown(node, what: str) -> Layout | None:
        for arg in tensor_inputs(node):
            block_all(layouts.get(arg), f"used by {what}")
        return fresh(node, f"produced by {what}")

    def union_layouts(a: Layout, b: Layout, what: str) -> bool:
        # position by position; block boundaries must agree
        if len(a) != len(b) or any(uf.size[x] * rx != uf.size[y] * ry or rx != ry for (x, rx), (y, ry) in zip(a, b)):
            block_all(a, f"misaligned channels at {what}")
            block_all(b, f"misaligned channels at {what}")
            return False
        for (x, _), (y, _) in zip(a, b):
            uf.union(x, y)
        return True

    for node in module.graph.nodes:
        out_shape = shape(node)
        if node.op == "placeholder":
            layouts[node] = fresh(node, "reaches the network input")
        elif node.op == "get_attr":
            layouts[node] = None
        elif node.op == "output":
            for arg in tensor_inputs(node):
                block_all(layouts.get(arg), "reaches the network output")
        elif node.op == "call_module":
            sub = modules[node.target]
            source = node.args[0] if node.args else None
            source_layout = layouts.get(source) if isinstance(source, fx.Node) else None
            if isinstance(sub, ChannelMask):
                layouts[node] = source_layout
                if source_layout and len(source_layout) == 1:
                    mask_blocks.setdefault(node.target, source_layout[0][0])
            elif isinstance(sub, _CONV_MODULES + _CONV_TRANSPOSE_MODULES):
                transposed = isinstance(sub, _CONV_TRANSPOSE_MODULES)
                if sub.groups == 1:
                    kind = "conv_transpose" if transposed else "conv"
                    if node.target not in producer_block:
                        producer_block[node.target] = uf.new(sub.out_channels)
                    layouts[node] = [(producer_block[node.target], 1)]
                elif (not transposed and sub.groups == sub.in_channels == sub.out_channels and source_layout
                      and len(source_layout) == 1 and source_layout[0][1] == 1):
                    kind = "depthwise"
                    layouts[node] = source_layout
                    element = source_layout[0][0]
                    if node.target in producer_block:
                        uf.union(producer_block[node.target], element)
                    else:
                        producer_block[node.target] = element
                else:
                    kind = "grouped"
                    block_all(source_layout, f"feeds grouped conv {node.target}")
                    layouts[node] = fresh(node, f"output of grouped conv {node.target}")
                    producer_block.setdefault(node.target, layouts[node][0][0])
                producers[node.target] = {"kind": kind, "out_channels": sub.out_channels}
                layer_calls.append((node.target, sub, producer_block[node.target], list(source_layout or []),
                                    out_shape or ()))
            elif isinstance(sub, nn.Linear):
                if out_shape is not None and len(out_shape) == 2:
                    if node.target not in producer_block:
                        producer_block[node.target] = uf.new(sub.out_features)
                    layouts[node] = [(producer_block[node.target], 1)]
                    producers[node.target] = {"kind": "linear", "out_channels": sub.out_features}
                    layer_calls.append((node.target, sub, producer_block[node.target], list(source_layout or []),
                                        out_shape))
                else:
                    layouts[node] = unknown(node, f"Linear {node.target} on a tensor that is not 2-D")
            elif isinstance(sub, _NORM_MODULES):
                layouts[node] = source_layout
                if not _is_site_norm(source, node, producers, modules):
                    block_all(source_layout, f"BN {node.target} does not directly follow its conv (maps 0 to its shift)")
            elif isinstance(sub, _PRESERVING_MODULES):
                layouts[node] = source_layout
            elif isinstance(sub, _ZERO_BREAKING_MODULES):
                layouts[node] = source_layout
                block_all(source_layout, f"{type(sub).__name__} maps 0 to non-zero")
            elif isinstance(sub, nn.Flatten):
                layouts[node] = _flatten_layout(source, node, source_layout, shape)
                if layouts[node] is None:
                    layouts[node] = unknown(node, f"Flatten {node.target}")
            else:
                layouts[node] = unknown(node, f"{type(sub).__name__} {node.target}")
        elif node.op in ("call_function", "call_method"):
            if out_shape is None:  # sizes, shapes, tuples of tensors
                if node.target is torch.Tensor.size or node.target in ("size", "dim") or node.target is getattr:
                    layouts[node] = None
                else:
                    for arg in tensor_inputs(node):
                        block_all(layouts.get(arg), f"used by {_name(node)}")
                    layouts[node] = None
                continue
            target = node.target
            is_fn = node.op == "call_function"
            first = node.args[0] if node.args else None
            first_layout = layouts.get(first) if isinstance(first, fx.Node) else None
            if (is_fn and target in _ADD_FUNCTIONS) or (not is_fn and target in _ADD_METHODS):
                layouts[node] = _combine(node, uf, layouts, shape, union_layouts, block_all, fresh, additive=True)
            elif (is_fn and target in _MUL_FUNCTIONS) or (not is_fn and target in _MUL_METHODS):
                layouts[node] = _combine(node, uf, layouts, shape, union_layouts, block_all, fresh, additive=False)
            elif is_fn and target is torch.cat:
                layouts[node] = _cat_layout(node, layouts, shape, union_layouts, unknown)
            elif (is_fn and target in _PRESERVING_FUNCTIONS) or (not is_fn and target in _PRESERVING_METHODS):
                layouts[node] = first_layout
            elif (is_fn and target in _ZERO_BREAKING_FUNCTIONS) or (not is_fn and target in _ZERO_BREAKING_METHODS):
                layouts[node] = first_layout
                block_all(first_layout, f"{_name(node)} maps 0 to non-zero")
            elif (is_fn and target in _FLATTEN_FUNCTIONS) or (not is_fn and target in _FLATTEN_METHODS):
                layouts[node] = _flatten_layout(first, node, first_layout, shape)
                if layouts[node] is None:
                    layouts[node] = unknown(node, _name(node))
            elif (is_fn and target in _MEAN_FUNCTIONS) or (not is_fn and target in _MEAN_METHODS):
                in_shape = shape(first)
                if in_shape and out_shape and len(out_shape) >= 2 and out_shape[1] == in_shape[1] \
                        and not _reduces_channels(node, len(in_shape)):
                    layouts[node] = first_layout
                else:
                    layouts[node] = unknown(node, _name(node))
            elif is_fn and target is operator.getitem and _is_spatial_slice(node):
                layouts[node] = first_layout
            else:
                layouts[node] = unknown(node, _name(node))

    return _finish(uf, producer_block, producers, layer_calls, mask_blocks, modules, module)


def _name(node: fx.Node) -> str:
    target = node.target
    return getattr(target, "__name__", str(target))


def _is_site_norm(source, norm_node: fx.Node, producers: dict, modules: dict) -> bool:
    """A BN is a mask site when it directly consumes a producer call that has no other consumer."""
    if not isinstance(source, fx.Node) or source.op != "call_module" or source.target not in producers:
        return False
    return len(source.users) == 1 and norm_node.args[0] is source


def _flatten_layout(source, node: fx.Node, layout: Layout | None, shape) -> Layout | None:
    in_shape, out_shape = shape(source), shape(node)
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


def _reduces_channels(node: fx.Node, ndim: int) -> bool:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        return True
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    return any(int(d) % ndim == 1 for d in dims)


def _is_spatial_slice(node: fx.Node) -> bool:
    index = node.args[1]
    if not isinstance(index, tuple) or len(index) < 2:
        return False
    full = slice(None, None, None)
    return index[0] == full and index[1] == full and all(isinstance(i, slice) for i in index[2:])


def _combine(node, uf, layouts, shape, union_layouts, block_all, fresh, additive: bool) -> Layout | None:
    out_shape = shape(node)
    operands = [a for a in node.args[:2]]
    tensors = [a for a in operands if isinstance(a, fx.Node) and shape(a) is not None]
    what = _name(node)
    if len(tensors) == 1:
        other = next((a for a in operands if a is not tensors[0]), None)
        layout = layouts.get(tensors[0])
        if isinstance(other, fx.Node):  # a non-tensor node (e.g. a size): keep conservative
            block_all(layout, f"{what} with a non-constant scalar")
            return fresh(node, f"output of {what}")
        if additive and other not in (0, 0.0):
            block_all(layout, f"{what} of a non-zero constant")
        return layout
    a, b = tensors[0], tensors[1]
    sa, sb = shape(a), shape(b)
    la, lb = layouts.get(a), layouts.get(b)
    out = tuple(out_shape)
    if not additive and (la is None) != (lb is None):
        # a constant tensor times a feature map (e.g. a learned scale): multiplying keeps zeros
        return la if la is not None else lb
    if sa == sb and la is not None and lb is not None:
        if not additive:
            # x * gate with equal shapes (a gate over a 1x1 map): the gate already passed a sigmoid-like op,
            # so its channels are blocked; the product keeps x's zeros and needs no shared mask
            a_blocked = any(uf.find(e) in uf.blocked for e, _ in la)
            b_blocked = any(uf.find(e) in uf.blocked for e, _ in lb)
            if a_blocked != b_blocked:
                return lb if a_blocked else la
        union_layouts(la, lb, what)
        return la
    if not additive and la is not None and lb is not None and len(sa) == len(sb) and (sa == out or sb == out):
        # a gate (squeeze-excitation, or a per-pixel map): the result keeps the full operand's zeros; the
        # gate's own zeros would not be zeros of the full operand, so its channels are not maskable
        full, gate = (la, lb) if sa == out else (lb, la)
        block_all(gate, f"gates a feature map in {what}")
        return full
    block_all(la, f"{what} with a broadcast operand")
    block_all(lb, f"{what} with a broadcast operand")
    return fresh(node, f"output of {what}")


def _cat_layout(node, layouts, shape, union_layouts, unknown) -> Layout | None:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out_shape = shape(node)
    if not isinstance(tensors, (list, tuple)) or out_shape is None:
        return unknown(node, "cat")
    parts = [layouts.get(t) for t in tensors]
    if any(p is None for p in parts):
        return unknown(node, "cat of a tensor without channels")
    dim = int(dim) % len(out_shape)
    if dim == 1:
        return [entry for part in parts for entry in part]
    # concatenating along another axis puts the same channel index of every operand in one channel
    for part in parts[1:]:
        union_layouts(parts[0], part, "cat")
    return parts[0]


def _finish(uf, producer_block, producers, layer_calls, mask_blocks, modules, module) -> CouplingAnalysis:
    roots: dict[int, int] = {}

    def group_index(element: int) -> int:
        return roots.setdefault(uf.find(element), len(roots))

    group_of = {name: group_index(element) for name, element in producer_block.items()}
    layers = tuple(
        LayerInfo(name, sub, group_index(element), tuple((group_index(e), r) for e, r in layout), tuple(out_shape))
        for name, sub, element, layout, out_shape in layer_calls
    )
    masks = {name: group_index(element) for name, element in mask_blocks.items()}
    members: list[list[str]] = [[] for _ in roots]
    for name, index in group_of.items():
        members[index].append(name)
    reasons = [""] * len(roots)
    sizes = [0] * len(roots)
    for root, index in roots.items():
        reasons[index] = uf.blocked.get(root, "")
        sizes[index] = uf.size[root]
    for name, info in producers.items():
        if info["kind"] == "grouped" and not reasons[group_of[name]]:
            reasons[group_of[name]] = f"output of grouped conv {name}"
    for index, names in enumerate(members):
        if not names and not reasons[index]:
            reasons[index] = "no producer"
    producer_infos: dict[str, Producer] = {}
    for node in module.graph.nodes:
        if node.op != "call_module" or node.target not in producers or node.target in producer_infos:
            continue
        users = list(node.users)
        norm = None
        if len(users) == 1 and users[0].op == "call_module" and isinstance(modules[users[0].target], _NORM_MODULES):
            norm = users[0].target
        info = producers[node.target]
        producer_infos[node.target] = Producer(node.target, info["kind"], info["out_channels"], norm or node.target,
                                               norm)
    groups = tuple(ChannelGroup(tuple(names), sizes[i], not reasons[i], reasons[i]) for i, names in enumerate(members))
    return CouplingAnalysis(groups, producer_infos, group_of, layers, masks)


def coupled_producers(model: nn.Module, example_input: torch.Tensor) -> list[Sequence[str]]:
    """Names of the producers of every maskable group with more than one producer (for inspection)."""
    analysis = analyze_coupling(model, example_input)
    return [group.producers for group in analysis.maskable_groups() if len(group.producers) > 1]
