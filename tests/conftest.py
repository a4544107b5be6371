"""Shared test settings: one intra-op thread per xdist worker (CI has 2 cores and runs 2 workers)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

try:  # torch is optional for the ONNX-only tests' speed, but installed in the dev environment
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass
