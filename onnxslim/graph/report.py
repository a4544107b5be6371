"""What a slim run did: per-layer channel counts, totals, and the masked channels it had to keep."""

from __future__ import annotations

import dataclasses
from typing import Any

from onnxslim.graph.names import layer_label


@dataclasses.dataclass(frozen=True)
class LayerChange:
    """Output channels of one channel-producing node (Conv, ConvTranspose, Gemm, MatMul) before and after."""

    node: str
    op_type: str
    channels_before: int
    channels_after: int
    module: str = ""  # PyTorch module path (onnxslim.graph.names), "" for graphs from elsewhere

    @property
    def label(self) -> str:
        return layer_label(self.node, self.module)


@dataclasses.dataclass(frozen=True)
class KeptChannels:
    """Masked (provably zero) channels of ``tensor`` that could not be deleted, and why."""

    tensor: str
    channels: tuple[int, ...]
    reason: str
    kind: str = "live"  # barrier | live | constant | structural (see onnxslim.graph.channels)
    module: str = ""  # the mask's PyTorch module path (onnxslim export), "" for graphs from elsewhere


@dataclasses.dataclass
class SlimReport:
    layers: list[LayerChange]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    size_before: int
    size_after: int
    masked_channels: int
    deleted_masked_channels: int
    kept: list[KeptChannels]
    folded_masks: int
    remaining_masks: list[str]
    input_shapes: dict[str, list[int]]
    removed_nodes: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)  # what limited the result (prune's budgets ...)
    rounding: dict[str, Any] | None = None  # what round_to resolved to and why (onnxslim.graph.rounding)
    target: dict[str, Any] | None = None  # prune --target-macs/--target-latency (onnxslim.graph.allocate)
    macs_complete: bool = True  # False when some layer's shapes were not static: its MACs are not counted

    @property
    def masked_behind_barriers(self) -> int:
        return sum(len(k.channels) for k in self.kept if k.kind == "barrier")

    @property
    def deletion_rate(self) -> float:
        """Deleted masked channels over the masked channels not held by a barrier (1.0 when none)."""
        reachable = self.masked_channels - self.masked_behind_barriers
        return self.deleted_masked_channels / reachable if reachable else 1.0

    @property
    def deleted_any(self) -> bool:
        """Whether the run deleted a channel or a parameter."""
        return self.params_after < self.params_before or any(
            layer.channels_after < layer.channels_before for layer in self.layers)

    def followed_by(self, later: SlimReport, masks: dict[str, tuple[str, tuple[int, ...]]] | None = None) -> SlimReport:
        """This report with a later pass over its output: the totals after it, each layer's channels after it
        (matched by node name), and a note of what it deleted. ``masks`` (tensor -> (mask node, zero channels
        in the later pass's numbering)) are the masks the later pass saw: those this pass kept unfolded.
        Their channels that it deleted count as deleted, its kept lines replace this pass's for them (in
        this pass's numbering), and its folds count too; masks it did not see (folded here) stay as this
        pass said."""
        kept, deleted, remaining = self._kept_after(later, masks or {})
        after = {layer.node: layer.channels_after for layer in later.layers}
        changed = [layer for layer in later.layers if layer.channels_after < layer.channels_before]
        extra = sum(layer.channels_before - layer.channels_after for layer in changed)
        shown = ", ".join(f"{layer.label} {layer.channels_before} -> {layer.channels_after}" for layer in changed[:4])
        merged = dataclasses.replace(
            self, layers=[dataclasses.replace(layer, channels_after=after.get(layer.node, layer.channels_after))
                          for layer in self.layers],
            params_after=later.params_after, macs_after=later.macs_after, size_after=later.size_after,
            removed_nodes=self.removed_nodes + later.removed_nodes, macs_complete=later.macs_complete,
            kept=kept, deleted_masked_channels=self.deleted_masked_channels + deleted, remaining_masks=remaining,
            folded_masks=self.folded_masks + later.folded_masks,
            notes=[*self.notes, *(note for note in later.notes if note not in self.notes)])
        if extra:
            merged.notes.append(f"a second slim pass, after the masks folded into weights, deleted {extra} more "
                                f"channel(s) that they had hidden ({shown}{', ...' if len(changed) > 4 else ''}; "
                                "slimming the output again finds nothing)")
        return merged

    def _kept_after(self, later: SlimReport, masks: dict[str, tuple[str, tuple[int, ...]]]):
        """(kept lines, masked channels the later pass deleted, mask nodes still in its output) where
        ``masks`` (see :meth:`followed_by`) are the later pass's. A tensor's zeros there are the channels
        kept here, in order (this pass sliced the others out of its mask); where the counts differ, this
        pass's lines stay."""
        ours: dict[str, list[int]] = {}
        for entry in self.kept:
            ours.setdefault(entry.tensor, []).extend(entry.channels)
        mapped = {tensor: dict(zip(zeros, sorted(ours[tensor]))) for tensor, (_, zeros) in masks.items()
                  if tensor in ours and len(zeros) == len(ours[tensor])}
        theirs = [dataclasses.replace(entry, channels=tuple(mapped[entry.tensor][c] for c in entry.channels))
                  for entry in later.kept if entry.tensor in mapped]
        kept = [entry for entry in self.kept if entry.tensor not in mapped] + theirs
        deleted = sum(len(ours[tensor]) for tensor in mapped) - sum(len(entry.channels) for entry in theirs)
        seen = {node for node, _ in masks.values()}
        remaining = [m for m in self.remaining_masks if m not in seen or m in later.remaining_masks]
        return kept, deleted, remaining

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format_table(self, max_rows: int | None = None) -> str:
        """A plain-text table of the layers whose channels changed, then the totals."""
        changed = [layer for layer in self.layers if layer.channels_after != layer.channels_before]
        rows = [(layer.label, layer.op_type, f"{layer.channels_before} -> {layer.channels_after}") for layer in changed]
        if max_rows is not None and len(rows) > max_rows:
            hidden = len(rows) - max_rows
            rows = rows[:max_rows] + [(f"... {hidden} more layers", "", "")]
        lines = []
        if rows:
            width = [max(len(str(r[i])) for r in rows + [("layer", "op", "channels")]) for i in range(3)]
            header = ("layer", "op", "channels")
            lines.append("  ".join(h.ljust(w) for h, w in zip(header, width)))
            lines.append("  ".join("-" * w for w in width))
            lines.extend("  ".join(str(c).ljust(w) for c, w in zip(r, width)) for r in rows)
        else:
            lines.append("no channels were removed")
        lines.append("")
        lines.append(_total_line("params", self.params_before, self.params_after))
        if self.macs_complete:
            lines.append(_total_line("MACs", self.macs_before, self.macs_after))
        elif not self.macs_before:
            lines.append("MACs: unknown (the layers' shapes are not static: give --input-shape)")
        else:  # a partial sum printed as the total would be a wrong figure
            lines.append(f"MACs: at least {self.macs_before:,} -> at least {self.macs_after:,} (some layers' shapes "
                         "are not static: give --input-shape for a full count)")
        lines.append(_total_line("file size (bytes)", self.size_before, self.size_after))
        if self.masked_channels:
            lines.append(f"masked channels deleted: {self.deleted_masked_channels} / {self.masked_channels}")
        if self.folded_masks or self.remaining_masks:
            lines.append(f"mask Mul nodes folded into weights: {self.folded_masks}; kept: {len(self.remaining_masks)}")
        for kept in self.kept:
            shown = ",".join(str(c) for c in kept.channels[:8]) + (",..." if len(kept.channels) > 8 else "")
            of = f"{kept.module} ({kept.tensor})" if kept.module else kept.tensor
            lines.append(f"kept {len(kept.channels)} masked channel(s) [{shown}] of {of}: {kept.reason}")
        lines.extend(f"note: {note}" for note in self.notes)
        if self.rounding and self.rounding["multiple"] > 1:
            lines.append(f"note: {self.rounding['description']}")
        return "\n".join(lines)


def _total_line(label: str, before: int, after: int) -> str:
    ratio = f"{100.0 * (before - after) / before:.1f}% removed" if before else "n/a"
    return f"{label}: {before:,} -> {after:,} ({ratio})"
