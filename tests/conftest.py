"""Shared test settings: one intra-op thread per xdist worker (CI has 2 cores and runs 2 workers)."""

import os

import pytest

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



@pytest.fixture(autouse=True, scope="session")
def _latency_cache_in_a_temporary_folder(tmp_path_factory):
    """Latency tables (onnxslim.validate.latency_table) go to a temporary folder, never to ~/.cache."""
    previous = os.environ.get("ONNXSLIM_CACHE_DIR")
    os.environ["ONNXSLIM_CACHE_DIR"] = str(tmp_path_factory.mktemp("onnxslim-cache"))
    yield
    if previous is None:
        os.environ.pop("ONNXSLIM_CACHE_DIR", None)
    else:
        os.environ["ONNXSLIM_CACHE_DIR"] = previous
