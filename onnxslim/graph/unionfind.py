"""Element ids and the union-find that couples them.

Every channel of every feature tensor is an **element id** (an int64). Ops that tie channels of
different tensors (a residual ``Add``, SE gating, the groups of a grouped conv, layers sharing a weight)
unite their ids; a class of united ids is one channel everywhere it appears and is deleted as a whole.

Union by smaller root (the lower id becomes the parent), vectorised over id arrays; ``find`` follows
parents until the roots are stable (no path compression: classes are shallow in practice).
"""

from __future__ import annotations

import numpy as np


class UnionFind:
    """Union-find over element ids ``0 .. size-1``, grown in blocks; find/union are vectorised."""

    def __init__(self) -> None:
        self.parent = np.zeros(0, np.int64)

    @property
    def size(self) -> int:
        """Number of element ids handed out so far."""
        return len(self.parent)

    def new(self, count: int) -> np.ndarray:
        """``count`` fresh ids, each its own class; returns them as an int64 array."""
        start = len(self.parent)
        ids = np.arange(start, start + count, dtype=np.int64)
        self.parent = np.concatenate([self.parent, ids])
        return ids

    def find(self, ids: np.ndarray) -> np.ndarray:
        """The root (smallest id) of each id's class, elementwise."""
        roots = self.parent[ids]
        while True:
            up = self.parent[roots]
            if np.array_equal(up, roots):
                return roots
            roots = up

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Unite the class of ``a[i]`` with that of ``b[i]`` for every ``i`` (arrays of equal length)."""
        while True:
            ra, rb = self.find(a), self.find(b)
            differ = ra != rb
            if not differ.any():
                return
            low = np.minimum(ra[differ], rb[differ])
            high = np.maximum(ra[differ], rb[differ])
            self.parent[high] = low  # a repeated 'high' keeps one of its targets; the loop unites the rest

    def roots(self) -> np.ndarray:
        """Root of every id, indexed by id."""
        return self.find(np.arange(self.size, dtype=np.int64))
