"""Apply a removal plan: every node's rule slices its own weights and attributes.

Nodes all of whose outputs lose every channel are deleted outright (a branch whose channels all go);
the rules of their consumers already dropped them (Concat) or were deleted with them (passthrough ops).
Rules read the *original* channel facts of the analysis, so the order of rewriting does not matter.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxslim.graph.analysis import ChannelAnalysis
from onnxslim.graph.model import WeightStore
from onnxslim.graph.plan import RemovalPlan
from onnxslim.graph.values import ChannelInfo


class Rewriter:
    """Applies ``plan`` to the graph of ``analysis`` through the rules of the analysis' rule set."""

    def __init__(self, analysis: ChannelAnalysis, plan: RemovalPlan):
        self.analysis = analysis
        self.plan = plan
        self.index = analysis.index
        self.weights = WeightStore(self.index)
        self.removed_nodes: list[onnx.NodeProto] = []

    def keep(self, name: str) -> np.ndarray | None:
        return self.plan.keep(name)

    def info(self, name: str) -> ChannelInfo | None:
        return self.analysis.info.get(name)

    def set_bias(self, node: onnx.NodeProto, slot: int, value: np.ndarray) -> None:
        """Give ``node`` the bias ``value`` at input ``slot``, adding the input when it had none."""
        if len(node.input) > slot and node.input[slot]:
            self.weights.write(node, slot, value)
            return
        while len(node.input) <= slot:
            node.input.append("")
        node.input[slot] = self.weights.add(f"{self.index.node_name(node)}_bias", value)

    def run(self) -> int:
        """Rewrite every node; returns the number of nodes deleted."""
        graph = self.index.graph
        doomed = []
        for node in self.index.nodes:
            if self.plan.deletes(node):
                doomed.append(node)
                continue
            self.analysis.rule_for(node).rewrite(node, self)
        if doomed:
            doomed_ids = {id(n) for n in doomed}
            kept_nodes = [n for n in graph.node if id(n) not in doomed_ids]
            del graph.node[:]
            graph.node.extend(kept_nodes)
        self.removed_nodes = doomed
        self.index.reindex()
        return len(doomed)
