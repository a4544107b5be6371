"""Channel permutations spelt as Reshape / Transpose chains become one ``Gather`` on the channel axis.

Rule: a chain of Reshape and Transpose nodes, each result read only by the next node, that keeps the
batch axis first (every Transpose has ``perm[0] = 0``; every tensor's dims after the first are static
and hold as many elements as the input's, so the first dim stays the batch) and ends in a tensor of its
input's shape ``(N, C, *S)`` is a per-sample index map. When that map moves the block of elements of
every input channel intact to one output channel — ShuffleNet's channel shuffle ``[N, C, H, W] ->
[N, g, C/g, H, W] -> Transpose(0, 2, 1, 3, 4) -> [N, C, H, W]`` (Zhang et al. 2018, ShuffleNet, sec.
3.1; Ma et al. 2018, ShuffleNetV2, fig. 3) — the chain equals ``Gather(x, p, axis=1)`` with ``p[k]``
the input channel of output channel ``k`` (ONNX Gather-13 on axis 1), exactly, element for element.

Why: the analysis reads one node at a time, and a lone Reshape ``C -> (g, C/g)`` can only couple
channel ``j`` of every group (:mod:`onnxslim.graph.rules.regroup`); the Transpose that makes it a
permutation is the next node. As a Gather every channel is its own unit (the Gather rule rewrites the
indices), so a zero channel of one branch of a ShuffleNetV2 unit goes although the channel of the other
branch that lands beside it does not. ORT copies the same H*W blocks either way.

The chain is kept when the map is the identity, is not a channel permutation (a DepthToSpace spelt by
hand mixes space into channels) or covers more than ``_MAX_ELEMENTS`` elements per sample.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxslim.graph.model import get_attr

_MAX_ELEMENTS = 1 << 22  # elements per sample whose index map is computed
_MOVES = ("Reshape", "Transpose")


def _per_sample(shape) -> list[int] | None:
    """The dims after the first when all are static."""
    if shape is None or len(shape) < 2 or any(not isinstance(d, int) for d in shape[1:]):
        return None
    return [int(d) for d in shape[1:]]


def _step(elements: np.ndarray, node: onnx.NodeProto, shapes: dict) -> np.ndarray | None:
    """The per-sample element indices after ``node`` (a Reshape or a Transpose keeping the batch first)."""
    if node.op_type == "Transpose":
        perm = get_attr(node, "perm")
        if perm is None or len(perm) != elements.ndim + 1 or perm[0] != 0:
            return None
        return elements.transpose([p - 1 for p in perm[1:]])
    dims = _per_sample(shapes.get(node.output[0]))
    if dims is None or int(np.prod(dims, dtype=np.int64)) != elements.size:
        return None
    return elements.reshape(dims)


def channel_order(chain: list[onnx.NodeProto], shapes: dict) -> np.ndarray | None:
    """``p`` (int64, C) with output channel ``k`` = input channel ``p[k]``, when ``chain`` (whose first
    input is (N, C, *S)) moves each channel's elements intact to one channel of a tensor of the same
    shape; None otherwise."""
    dims = _per_sample(shapes.get(chain[0].input[0]))
    if dims is None or int(np.prod(dims, dtype=np.int64)) > _MAX_ELEMENTS or 0 in dims:
        return None
    elements = np.arange(int(np.prod(dims, dtype=np.int64)), dtype=np.int64).reshape(dims)
    for node in chain:
        elements = _step(elements, node, shapes)
        if elements is None:
            return None
    if list(elements.shape) != dims:
        return None
    rows = elements.reshape(dims[0], -1)
    block = rows.shape[1]
    if not np.array_equal(rows - rows[:, :1], np.broadcast_to(np.arange(block), rows.shape)) or (rows[:, 0] % block).any():
        return None
    return rows[:, 0] // block


def _chain_from(node: onnx.NodeProto, uses: Counter, readers: dict, shapes: dict, outputs: set) -> list | None:
    """The shortest chain of moves from ``node`` back to the shape of ``node``'s input, or None."""
    start = shapes.get(node.input[0])
    chain = [node]
    while True:
        out = chain[-1].output[0]
        if len(chain) > 1 and shapes.get(out) == start:
            return chain
        following = readers.get(out)
        if uses[out] != 1 or out in outputs or following is None or following.op_type not in _MOVES \
                or following.domain not in ("", "ai.onnx") or following.input[0] != out:
            return None
        chain.append(following)


def gather_channel_permutations(model: onnx.ModelProto, shapes: dict) -> int:
    """Replace each channel-permuting chain of ``model`` (see the module doc) by one Gather, in place;
    ``shapes`` (tensor -> dims, None where unknown) is that of :func:`onnxslim.graph.shapes.shapes_of`,
    still true afterwards (the Gather's output keeps the chain's last name). Returns the count."""
    graph = model.graph
    uses, readers = Counter(), {}
    for node in graph.node:
        for name in node.input:
            uses[name] += 1
            readers[name] = node
    outputs = {value.name for value in graph.output}
    initializers = {tensor.name for tensor in graph.initializer}
    taken = {name for node in graph.node for name in node.output} | initializers
    replaced: dict[int, onnx.NodeProto] = {}  # id(last node of a chain) -> its Gather
    dropped: set[int] = set()
    for node in graph.node:
        if node.op_type not in _MOVES or node.domain not in ("", "ai.onnx") or id(node) in dropped \
                or node.input[0] in initializers:
            continue
        chain = _chain_from(node, uses, readers, shapes, outputs)
        order = None if chain is None else channel_order(chain, shapes)
        if order is None or np.array_equal(order, np.arange(len(order))):
            continue
        name = _fresh(f"{chain[-1].output[0]}_channel_order", taken)
        graph.initializer.append(numpy_helper.from_array(order, name))
        if model.ir_version < 4:  # IR 3 lists every initializer as an input
            graph.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.INT64, [len(order)]))
        replaced[id(chain[-1])] = helper.make_node("Gather", [node.input[0], name], [chain[-1].output[0]],
                                                   name=_fresh(f"{chain[-1].name or name}_gather", taken), axis=1)
        dropped.update(id(n) for n in chain)
    if not replaced:
        return 0
    nodes = [replaced.get(id(node), node) for node in graph.node if id(node) not in dropped or id(node) in replaced]
    del graph.node[:]
    graph.node.extend(nodes)
    return len(replaced)


def _fresh(base: str, taken: set[str]) -> str:
    name, count = base, 0
    while name in taken:
        count += 1
        name = f"{base}_{count}"
    taken.add(name)
    return name
