"""Shared test settings: one intra-op thread per xdist worker (CI has 2 cores and runs 2 workers)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

try:  # torch is optional for the ONNX-only tests' speed, but installed in the dev environment
    import torch

    torch.set_num_threads(1)
    # oneDNN's convolution backward (mkldnn_convolution_backward_weights -> dnnl exec_ctx_impl_t destructor)
    # segfaults at random on some x86 machines with torch 2.13.0+cpu (seen on this project's AMD EPYC CI
    # machine, with code unchanged since it passed on Intel); the native kernels compute the same values.
    # ONNXSLIM_TEST_MKLDNN=1 keeps oneDNN on.
    if os.environ.get("ONNXSLIM_TEST_MKLDNN") != "1":
        torch.backends.mkldnn.enabled = False
except ImportError:  # pragma: no cover
    pass
