"""Four filters whose L1 and L2 rankings differ (shared by the per-rule criterion tests).

As rows (one filter each): L1 = (4, 3, 2, 2.5), L2 = (2, 3, 1, 2.5). Pruning half by L1 removes
filters 2 and 3; by L2 it removes filters 2 and 0.
"""

from __future__ import annotations

import numpy as np

FILTERS = np.array([[1.0, 1.0, 1.0, 1.0], [3.0, 0, 0, 0], [0.5, 0.5, 0.5, 0.5], [2.5, 0, 0, 0]], np.float32)
KEPT = {"l1": [0, 1], "l2": [1, 3]}
