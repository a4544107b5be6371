"""Structure masks: one learnable scalar per residual branch or concatenated branch (GAL's block masks).

A :class:`StructureMask` holds one number ``s`` (a 0-d parameter, initialised to 1) and computes
``y = s * branch(x)``. :func:`attach_structure_masks` wraps every *branch* of a model as
``MaskedStructure(branch, mask)`` in its parent, so the model's own ``forward`` is unchanged:

* a **residual branch** ``F`` of ``out = F(x) + shortcut(x)`` becomes ``s * F(x) + shortcut(x)``;
* an **Inception branch** ``B_i`` of ``torch.cat([B_1(x), ..., B_k(x)], dim=1)`` becomes ``s_i * B_i(x)``.

Exported in eval mode, ``s`` is one ``Mul`` by a constant of shape ``[]``. The slim engine reads it as a
scale of the whole tensor: ``s = 0`` makes every channel of the branch the constant 0, so a residual
``Add(x, 0)`` becomes ``x`` and the branch's nodes go as dead code, and a zero ``Concat`` input is
dropped together with its slice of every reader's weights. A non-zero ``s`` right after a conv (a BN is
folded into it on export) is folded into that conv by the engine like a per-channel mask; behind a ReLU
or pooling (an Inception branch ends in ReLU) the engine keeps the ``Mul``, so
:func:`fold_structure_scales` moves positive scales into the branch's last conv/BN in PyTorch first
(GAL does this before fine-tuning). In PyTorch ``0 * v = 0`` exactly, so a zero scalar is a real zero.

**Where the branches are** (no per-model table): the model is traced with ``torch.fx`` (as for channel
coupling, :func:`onnxslim.training.coupling.trace`). For every ``add`` of two equally shaped tensors
and every ``cat`` along the channel axis, the *branch* of an operand is the set of graph nodes that only
this operand depends on (its ancestors minus those of the other operands). A branch must contain a
convolution or linear layer, so an identity or pooling-only shortcut is never one; for an add whose two
operands both have one (a projection shortcut next to the residual branch), the branch with more
conv/linear layers is the residual one, and a tie is skipped as ambiguous. The mask wraps the outermost
submodule that lies inside the branch, is called once, and whose only output is the operand, read by the
add/cat alone: the zoo's ``residual`` Sequential, an Inception ``branchN``, or just the last BN of a
torchvision-style block whose layers are direct children of the block. When the model cannot be traced,
the zoo's named hook points are used instead: every submodule named ``residual`` (ResNet blocks) and
``branch1``, ``branch2``, ... (Inception modules).
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Iterator

import torch
from torch import fx, nn

from onnxslim.errors import OnnxSlimError

_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_NAMED_BRANCH = re.compile(r"^(residual|branch\d+)$")


class StructureMask(nn.Module):
    """One learnable scale for a whole branch: ``x * weight`` with ``weight`` a 0-d parameter (init 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))

    @property
    def value(self) -> float:
        return float(self.weight.detach())

    @property
    def live(self) -> bool:
        """False when the scale is exactly zero (the branch will be removed)."""
        return self.value != 0.0

    @property
    def frozen(self) -> bool:
        return not self.weight.requires_grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    def extra_repr(self) -> str:
        return f"value={self.value:.4g}"


class MaskedStructure(nn.Module):
    """``mask(branch(x))``: replaces a branch in its parent module."""

    def __init__(self, branch: nn.Module, mask: StructureMask):
        super().__init__()
        self.branch = branch
        self.mask = mask

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.mask(self.branch(*args))


@dataclasses.dataclass(frozen=True)
class StructureSite:
    """A branch found by :func:`find_structures`: the qualified module name and how it is merged."""

    name: str
    kind: str  # "residual" (an operand of an add) or "concat" (an input of a channel cat)
    producers: int  # conv/linear layers inside the branch


def iter_structure_masks(model: nn.Module) -> Iterator[tuple[str, StructureMask]]:
    """Every structure mask of ``model`` with the qualified name of the branch it scales."""
    for name, module in model.named_modules():
        if isinstance(module, MaskedStructure):
            yield name, module.mask


def structure_masks(model: nn.Module) -> list[StructureMask]:
    return [mask for _, mask in iter_structure_masks(model)]


def has_structure_masks(model: nn.Module) -> bool:
    return any(True for _ in iter_structure_masks(model))


def freeze_structure_masks(model: nn.Module, frozen: bool = True) -> None:
    """Fix (or release) every structure scale: frozen scales get no gradient, so zeros stay zero."""
    for mask in structure_masks(model):
        mask.weight.requires_grad_(not frozen)


def structure_values(model: nn.Module) -> dict[str, float]:
    """Branch name -> current scale (0 means the branch will be removed by slim)."""
    return {name: mask.value for name, mask in iter_structure_masks(model)}


def find_structures(model: nn.Module, example_input: torch.Tensor | None = None) -> list[StructureSite]:
    """The branches :func:`attach_structure_masks` would mask (module docstring), in forward order.

    ``example_input`` (one batch the model accepts) gives tensor shapes; without it, or when tracing
    fails, the zoo's named hook points are returned.
    """
    if example_input is not None:
        found = _traced_structures(model, example_input)
        if found is not None:
            return found
    return _named_structures(model)


def attach_structure_masks(model: nn.Module, example_input: torch.Tensor | None = None) -> list[StructureMask]:
    """Wrap every branch of ``model`` (see :func:`find_structures`) with a structure mask, in place.

    Channel masks (:func:`onnxslim.training.masks.attach_masks`) may be attached before or after.
    Raises :class:`OnnxSlimError` when the model already has structure masks.
    """
    if has_structure_masks(model):
        raise OnnxSlimError("the model already has structure masks")
    sites = find_structures(model, example_input)
    masks = {site.name: StructureMask() for site in sites}
    # deepest first, so that wrapping an outer branch does not rename an inner one before it is wrapped
    for site in sorted(sites, key=lambda s: s.name.count("."), reverse=True):
        parent_name, _, child = site.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MaskedStructure(getattr(parent, child), masks[site.name]))
    return [masks[site.name] for site in sites]


def restore_structure_masks(model: nn.Module, state_dict: dict, example_input: torch.Tensor | None = None) -> bool:
    """Attach structure masks when ``state_dict`` was saved from a model that had them; returns whether.

    For rebuilding a checkpointed model: build it, attach channel masks, call this, then load the state.
    """
    if has_structure_masks(model) or not any(_is_structure_key(key, state_dict) for key in state_dict):
        return False
    attach_structure_masks(model, example_input)
    return True


def _is_structure_key(key: str, state_dict: dict) -> bool:
    """``<branch>.mask.weight`` holding a 0-d tensor next to ``<branch>.branch.*`` entries."""
    if not key.endswith("mask.weight") or getattr(state_dict[key], "dim", lambda: -1)() != 0:
        return False
    prefix = key[: -len("mask.weight")]
    return any(other.startswith(prefix + "branch.") for other in state_dict)


# ----------------------------------------------------------------------------------------------------
# discovery


def _named_structures(model: nn.Module) -> list[StructureSite]:
    sites = []
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if name and _NAMED_BRANCH.match(leaf) and not isinstance(module, MaskedStructure):
            kind = "residual" if leaf == "residual" else "concat"
            sites.append(StructureSite(name, kind, _count_producers(module)))
    return sites


def _count_producers(module: nn.Module) -> int:
    return sum(1 for m in module.modules() if isinstance(m, _PRODUCERS))


def _traced_structures(model: nn.Module, example_input: torch.Tensor) -> list[StructureSite] | None:
    from onnxslim.training.coupling import trace

    try:
        graph_module = trace(model, example_input)
    except OnnxSlimError:
        return None
    nodes = list(graph_module.graph.nodes)
    position = {node: index for index, node in enumerate(nodes)}
    stacks = {node: list(node.meta.get("nn_module_stack", {}).keys()) for node in nodes}
    # scopes entered more than once (a module called twice) are not single branches
    repeated = {key.split("@")[0] for stack in stacks.values() for key in stack if "@" in key}
    scope_nodes: dict[str, list[fx.Node]] = {}
    for node in nodes:
        for key in stacks[node]:
            scope_nodes.setdefault(key, []).append(node)
    modules = dict(model.named_modules())

    def shape(node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(int(d) for d in meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def ancestors(node: fx.Node) -> set[fx.Node]:
        seen: set[fx.Node] = set()
        pending = [node]
        while pending:
            for parent in pending.pop().all_input_nodes:
                if parent not in seen:
                    seen.add(parent)
                    pending.append(parent)
        return seen

    def own_nodes(operands: list[fx.Node]) -> list[set[fx.Node]]:
        """Per operand, the nodes only it depends on (itself included): its branch."""
        cones = [ancestors(o) | {o} for o in operands]
        return [cone.difference(*(c for j, c in enumerate(cones) if j != i)) for i, cone in enumerate(cones)]

    def producers(branch: set[fx.Node]) -> int:
        return sum(1 for n in branch if n.op == "call_module" and isinstance(modules.get(n.target), _PRODUCERS))

    def wrapper_of(operand: fx.Node, merge: fx.Node, branch: set[fx.Node]) -> str | None:
        """The outermost submodule, called once inside the merging module, whose only output is
        ``operand`` (read by ``merge`` alone) and whose nodes all belong to the branch."""
        if set(operand.users) != {merge}:
            return None
        outer = set(stacks[merge])
        for scope in stacks[operand]:  # outermost first
            if scope in outer or "@" in scope or scope in repeated or scope not in modules:
                continue
            members = set(scope_nodes[scope])
            if not members <= branch:
                continue
            if [n for n in members if any(user not in members for user in n.users)] == [operand]:
                return scope
        return None

    sites: dict[str, StructureSite] = {}
    for node in nodes:
        found = _merge_branches(node, shape, own_nodes, producers)
        if found is None:
            continue
        candidates, branches = found
        for (operand, count, kind), branch in zip(candidates, branches):
            name = wrapper_of(operand, node, branch) if count > 0 else None
            if name is not None:
                sites.setdefault(name, StructureSite(name, kind, count))
    return sorted(sites.values(), key=lambda site: min(position[n] for n in scope_nodes[site.name]))


def _merge_branches(node: fx.Node, shape, own_nodes, producers):
    """For a residual ``add`` or a channel ``cat``: ([(operand, producers, kind)], [its branch nodes]), else None.

    A residual addition has one branch with more producers than the other (the shortcut); equal counts
    (two identities, two equal branches) give no way to tell the residual one."""
    if node.op not in ("call_function", "call_method"):
        return None
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or \
             (node.op == "call_method" and node.target in _ADD_METHODS)
    out = shape(node)
    if is_add:
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if len(operands) != 2 or out is None or any(shape(a) != out for a in operands) or "alpha" in node.kwargs:
            return None
        counts = [producers(branch) for branch in own_nodes(operands)]
        if counts[0] == counts[1]:
            return None
        chosen = 0 if counts[0] > counts[1] else 1
        return [(operands[chosen], counts[chosen], "residual")], [own_nodes(operands)[chosen]]
    if node.op == "call_function" and node.target is torch.cat:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or out is None or len(out) < 2 or int(dim) % len(out) != 1 \
                or not all(isinstance(t, fx.Node) for t in tensors):
            return None
        branches = own_nodes(list(tensors))
        return [(t, producers(b), "concat") for t, b in zip(tensors, branches)], branches
    return None


# ----------------------------------------------------------------------------------------------------
# folding a non-zero scale into the branch

_AFFINE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
           nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# f(s * x) = s * f(x) for s > 0: a positive scale moves through these unchanged
_POSITIVELY_HOMOGENEOUS = (
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout2d, nn.Flatten,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d,
)


def fold_structure_scales(model: nn.Module) -> int:
    """Fold every positive, non-unit structure scale ``s`` into the last conv / linear / BN of its branch
    and set ``s`` to 1; returns how many were folded.

    The last layer is found by walking the branch backwards (an ``nn.Sequential`` runs its children in
    order) through layers with ``f(s x) = s f(x)`` for ``s > 0`` (ReLU, LeakyReLU, pooling, dropout,
    channel masks). Exact up to float rounding; a branch whose end is not such a chain keeps its scale
    (the slim engine still folds it when it directly follows a conv). Zero scales stay 0.
    """
    folded = 0
    with torch.no_grad():
        for _, mask in iter_structure_masks(model):
            scale = mask.value
            if scale <= 0.0 or scale == 1.0:
                continue
            owner = next(m for m in model.modules() if isinstance(m, MaskedStructure) and m.mask is mask)
            target = _last_affine(owner.branch)
            if target is None:
                continue
            target.weight.mul_(scale)
            if getattr(target, "bias", None) is not None:
                target.bias.mul_(scale)
            mask.weight.fill_(1.0)
            folded += 1
    return folded


def _last_affine(module: nn.Module) -> nn.Module | None:
    from onnxslim.training.masks import ChannelMask, MaskedSite

    if isinstance(module, _AFFINE):
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and not module.affine:
            return None
        return module
    if isinstance(module, MaskedSite):
        return _last_affine(module.module)
    if isinstance(module, MaskedStructure):
        return _last_affine(module.branch)
    if isinstance(module, nn.Sequential):
        for child in reversed(list(module.children())):
            if isinstance(child, _POSITIVELY_HOMOGENEOUS + (ChannelMask,)):
                continue
            return _last_affine(child)
    return None
