"""``inspect``: what slim would do to a model, and why — without rewriting it.

Per channel-creating layer: its channels, which are provably zero, which slim would delete, the
coupled group it belongs to, MACs and params. A **coupled group** is a set of layers whose output
channels are tied together (a residual stage, the producers of an SE-gated map, a depthwise chain):
their channels are deleted together or not at all. Per barrier: the op, why it is one, and the groups
whose channels it holds.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import onnx

from onnxslim.graph.analysis import ChannelAnalysis
from onnxslim.graph.names import layer_label, module_path
from onnxslim.graph.rules import RuleSet
from onnxslim.graph.slim import analyse, load_model
from onnxslim.graph.stats import count_macs, count_params
from onnxslim.graph.values import LIVE


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    node: str
    op_type: str
    tensor: str
    channels: int
    zero_channels: tuple[int, ...]
    deletable_channels: tuple[int, ...]
    group: int
    macs: int | None
    params: int
    module: str = ""  # PyTorch module path (onnxslim.graph.names), "" for graphs from elsewhere


@dataclasses.dataclass(frozen=True)
class GroupInfo:
    group: int
    layers: tuple[str, ...]
    channels: int  # distinct channel classes
    deletable: int
    held_by: tuple[str, ...]  # why channels are kept, besides being live (barriers, constants ...)


@dataclasses.dataclass(frozen=True)
class BarrierInfo:
    node: str
    op_type: str
    why: str
    groups: tuple[int, ...]


@dataclasses.dataclass
class InspectReport:
    layers: list[LayerInfo]
    groups: list[GroupInfo]
    barriers: list[BarrierInfo]
    params: int
    macs: int
    masks: int
    masked_channels: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format_text(self, max_rows: int | None = None) -> str:
        # layers whose shapes are not static ("?") are not in the sum: say so rather than print a wrong total
        macs = f"{self.macs:,}" if all(layer.macs is not None for layer in self.layers) else \
            f"at least {self.macs:,} (? = shapes not static: give --input-shape)"
        lines = [f"params: {self.params:,}   MACs: {macs}   mask nodes: {self.masks}   "
                 f"masked channels: {self.masked_channels}", ""]
        rows = [("layer", "op", "channels", "zero", "deletable", "group", "MACs", "params")]  # zero: masked or dead
        for layer in self.layers[: max_rows or len(self.layers)]:
            rows.append((layer_label(layer.node, layer.module), layer.op_type, str(layer.channels), str(len(layer.zero_channels)),
                         str(len(layer.deletable_channels)), str(layer.group),
                         "?" if layer.macs is None else f"{layer.macs:,}", f"{layer.params:,}"))
        lines.extend(_table(rows))
        if max_rows is not None and len(self.layers) > max_rows:
            lines.append(f"... {len(self.layers) - max_rows} more layers (use --all)")
        coupled = [g for g in self.groups if len(g.layers) > 1 or g.held_by]
        if coupled:
            lines += ["", "coupled groups (deleted together) and what holds them:"]
            modules = {layer.node: layer.module for layer in self.layers if layer.module}  # named as in the table
            for group in coupled:
                names = [modules.get(node, node) for node in group.layers[:6]]
                layers = ", ".join(names) + (f", ... ({len(group.layers)} layers)" if len(group.layers) > 6 else "")
                lines.append(f"  group {group.group}: {group.channels} channels, {group.deletable} deletable; layers: {layers}")
                for why in group.held_by[:4]:
                    lines.append(f"      held: {why}")
        if self.barriers:
            lines += ["", "barriers (channels reaching them are kept):"]
            for barrier in self.barriers:
                groups = ", ".join(str(g) for g in barrier.groups) or "-"
                lines.append(f"  {barrier.op_type} '{barrier.node}': {barrier.why}; holds groups {groups}")
        return "\n".join(lines)


def inspect_model(model: onnx.ModelProto | str | os.PathLike,
                  input_shapes: dict[str, list[int]] | None = None, rules: RuleSet | None = None) -> InspectReport:
    """The channel analysis of ``model`` without rewriting it: layers, coupled groups, barriers.

    ``rules`` is the rule set (default :func:`onnxslim.graph.rules.default_rules`).
    """
    model, _ = load_model(model)
    analysis = analyse(model, input_shapes, rules=rules)
    plan = analysis.plan()
    index = analysis.index
    roots = analysis.uf.roots()
    group_of_root = _layer_groups(analysis, roots)
    _, _, layer_macs = count_macs(model, index.shapes, analysis.rules)
    zero_class = np.zeros(analysis.uf.size, bool)  # zero in at least one tensor (e.g. after its mask)
    for name, info in analysis.info.items():
        zero = info.const & (info.value == analysis.zero_points.get(name, 0.0))
        zero_class[roots[info.ids[zero]]] = True

    layers = []
    for name, node in analysis.creators.items():
        info = analysis.info[name]
        node_name = index.node_name(node)
        params = analysis.rule_for(node).params(node, index)
        layers.append(LayerInfo(
            node=node_name, op_type=node.op_type, tensor=name, channels=info.size,
            zero_channels=tuple(np.flatnonzero(zero_class[roots[info.ids]]).tolist()),
            deletable_channels=tuple(np.flatnonzero(plan.removed[info.ids]).tolist()),
            group=group_of_root[int(roots[info.ids[0]])],
            macs=layer_macs.get(node.name or node.output[0]), params=params, module=module_path(node),
        ))

    roots_of_group: dict[int, list[int]] = {}
    for root, group_id in group_of_root.items():
        roots_of_group.setdefault(group_id, []).append(root)
    groups = []
    for group_id, root_set in sorted(roots_of_group.items()):
        members = [layer for layer in layers if layer.group == group_id]
        held = []
        for root in root_set:
            rid = plan.reason[root]
            # live channels are the normal case; list what holds channels beyond that
            if rid >= 0 and analysis.reasons[rid].kind != LIVE and analysis.reasons[rid].text not in held:
                held.append(analysis.reasons[rid].text)
        groups.append(GroupInfo(group_id, tuple(m.node for m in members), len(root_set),
                                int(sum(plan.removed[r] for r in root_set)), tuple(sorted(held))))

    barriers = []
    for node, why in analysis.barriers:
        held_groups = set()
        for name in node.input:
            info = analysis.feature(name)
            if info is not None:
                held_groups.update(group_of_root.get(int(r), -1) for r in roots[info.ids])
        held_groups.discard(-1)
        barriers.append(BarrierInfo(index.node_name(node), node.op_type, why, tuple(sorted(held_groups))))

    masked = sum(len(site.zero_channels) for site in analysis.masks)
    return InspectReport(layers, groups, barriers, count_params(model, analysis.rules), sum(layer_macs.values()),
                         len(analysis.masks), masked)


def _layer_groups(analysis: ChannelAnalysis, roots: np.ndarray) -> dict[int, int]:
    """Group number of every channel class: layers that share a class are in one group."""
    parent = {name: name for name in analysis.creators}

    def find(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    layer_roots = {name: [int(r) for r in dict.fromkeys(roots[analysis.info[name].ids].tolist())]
                   for name in analysis.creators}
    owner: dict[int, str] = {}
    for name, class_roots in layer_roots.items():
        for root in class_roots:
            if root in owner:
                parent[find(owner[root])] = find(name)
            else:
                owner[root] = name
    numbering: dict[str, int] = {}
    for name in analysis.creators:
        numbering.setdefault(find(name), len(numbering))
    return {root: numbering[find(name)] for root, name in owner.items()}


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out
