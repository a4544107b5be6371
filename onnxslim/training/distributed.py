"""Data-parallel training on PyTorch's own engine: ``torch.distributed`` + ``DistributedDataParallel`` (DDP).

Start any training command under ``torchrun`` (``torchrun --nproc-per-node N -m onnxslim train ...``, or
``onnxslim train ... --nproc N``, which launches exactly that): :func:`init_from_env` reads torchrun's
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and joins the
process group — ``nccl`` when training on CUDA (one GPU per process, ``cuda:LOCAL_RANK``), ``gloo`` on the
CPU. Several machines: run the same ``torchrun`` on every node with ``--nnodes M --node-rank K
--rdzv-backend c10d --rdzv-endpoint HOST:PORT`` (or ``--master-addr/--master-port``); nothing else changes.

:class:`DistContext` is the handle the trainer, the controller and the methods use; with one process
(``DistContext()``) every collective is a no-op, so single-process code paths are the same code.

How lockstep is kept (what each method's docstring refers to):

* **gradients** are averaged over ranks by DDP during ``backward`` (the model is wrapped per phase, after
  masks are frozen or released, since DDP only reduces parameters that require grad when it is built);
  the optimizer then makes the same update on every rank, so weights and masks stay bit-identical;
* **non-gradient state** of a method is either computed from those identical values, or all-reduced
  (:meth:`DistContext.all_reduce_mean_`) or broadcast from rank 0 (:meth:`DistContext.broadcast_`);
* **BatchNorm running statistics** differ per rank (each normalises its own shard); they are averaged over
  ranks (:meth:`DistContext.sync_norm_statistics`) before anything reads them: at the end of every epoch,
  before ``finalize_masks``, before evaluation and before a method probes the model in eval mode.

Only rank 0 writes checkpoints, exports and reports (:attr:`DistContext.is_main`); checkpoints hold the
plain model and the global batch size, so a run may be resumed with another number of processes.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from onnxslim.errors import OnnxSlimError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class DistContext:
    """Rank and world size of this process; ``DistContext()`` is a single process (collectives are no-ops)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def current(cls) -> DistContext:
        """The default process group's ranks when ``torch.distributed`` is initialised, else a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        return cls()

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives -----------------------------------------------------------------------------------
    def _comm_device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _flat(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        # float64 holds float32 values, bools and counts below 2**53 exactly: one collective for all
        return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors]).to(self._comm_device())

    @staticmethod
    def _unflat(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
        offset = 0
        with torch.no_grad():
            for t in tensors:
                n = t.numel()
                t.copy_(flat[offset:offset + n].reshape(t.shape).to(device=t.device, dtype=t.dtype))
                offset += n

    def broadcast_(self, tensors: Iterable[torch.Tensor], src: int = 0) -> None:
        """In place: every tensor (any dtype, any device) takes rank ``src``'s value."""
        tensors = [t for t in tensors if t is not None and t.numel()]
        if not self.enabled or not tensors:
            return
        flat = self._flat(tensors)
        dist.broadcast(flat, src)
        self._unflat(flat, tensors)

    def all_reduce_mean_(self, tensors: Iterable[torch.Tensor]) -> None:
        """In place: every tensor becomes the mean over ranks (computed in float64, cast back)."""
        tensors = [t for t in tensors if t is not None and t.numel()]
        if not self.enabled or not tensors:
            return
        flat = self._flat(tensors)
        dist.all_reduce(flat)
        self._unflat(flat / self.world_size, tensors)

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """The sums over ranks of a few Python numbers (e.g. loss sums and batch counts)."""
        if not self.enabled:
            return list(values)
        flat = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(flat)
        return flat.cpu().tolist()

    def broadcast_object(self, value: T, src: int = 0) -> T:
        """Rank ``src``'s Python object on every rank (pickled by torch.distributed; our own data only)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src, device=self._comm_device())
        return box[0]

    def on_main(self, compute: Callable[[], T]) -> T:
        """Run ``compute`` on rank 0 only and hand its result to every rank (an error raised there is
        raised on every rank)."""
        result, error = None, None
        if self.is_main:
            try:
                result = compute()
            except OnnxSlimError as exc:
                error = str(exc)
        result, error = self.broadcast_object((result, error))
        if error is not None:
            raise OnnxSlimError(error)
        return result

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    # -- models ----------------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` in DDP (rank 0's parameters and buffers are broadcast now); the model itself with one
        process or when nothing requires grad."""
        if not self.enabled or not any(p.requires_grad for p in model.parameters()):
            return model
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        # a conv with one input channel gets weight grads whose size-1 dim has another stride than DDP's
        # bucket view: the same memory layout, so the "may impair performance" warning is noise to a user
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides", category=UserWarning)
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def sync_norm_statistics(self, model: nn.Module) -> None:
        """Average BatchNorm running means and variances over ranks (counters from rank 0)."""
        if not self.enabled:
            return
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
                 and m.running_mean is not None]
        self.all_reduce_mean_([t for m in norms for t in (m.running_mean, m.running_var)])
        self.broadcast_([m.num_batches_tracked for m in norms if m.num_batches_tracked is not None])


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def init_from_env(device: str = "cpu") -> DistContext:
    """Join the process group torchrun describes in the environment (nothing to do without ``WORLD_SIZE``).

    Backend ``nccl`` for a CUDA ``device`` (this process uses ``cuda:LOCAL_RANK``), else ``gloo``. Returns
    the context; a single process when not launched by torchrun. Raises OnnxSlimError when CUDA is
    requested but fewer GPUs than local processes exist.
    """
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return DistContext.current()
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            if local_rank >= torch.cuda.device_count():
                raise OnnxSlimError(f"local rank {local_rank} needs a GPU but only {torch.cuda.device_count()} exist")
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return DistContext.current()


def shutdown() -> None:
    """Leave the process group (when one was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The ``torchrun`` command that runs ``python -m onnxslim ARGV`` in ``nproc`` local processes
    (single node, rendezvous on a free local port: ``--standalone``); ``--nproc N`` is removed from argv."""
    if nproc < 1:
        raise OnnxSlimError(f"--nproc must be >= 1, got {nproc}")
    args, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            args.append(item)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "onnxslim", *args]


def launch(nproc: int, argv: Sequence[str], env: dict[str, Any] | None = None) -> int:
    """Run :func:`launch_command` and return its exit code (that of the first failing process)."""
    return subprocess.call(launch_command(nproc, argv), env=env)


__all__ = ["DistContext", "init_from_env", "launch", "launch_command", "shutdown", "unwrap"]
