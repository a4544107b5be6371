"""The PyTorch side: channel masks, their coupling, sparsity methods, the trainer and ONNX export.

* :mod:`~onnxslim.training.masks` — ``ChannelMask``, ``attach_masks(model, example_input)``,
  ``freeze_masks``, ``masked_summary`` (size of the model after slimming).
* :mod:`~onnxslim.training.coupling` — which channels must share one mask, from the fx-traced graph.
* :mod:`~onnxslim.training.methods` — the sparsity-method interface and registry (``get_method``):
  ``l1_mask`` (Yang et al. 2019), ``bn_slimming`` (Liu et al. 2017), ``l1_norm`` (Li et al. 2017),
  ``ssr_l21`` / ``ssr_l20`` (Lin et al. 2020), ``gal`` (Lin et al. 2019), ``joint`` (Khan et al. 2022).
* :mod:`~onnxslim.training.controller` — ``MaskController``: mask training inside your own loop
  (``docs/own-loop.md``).
* :mod:`~onnxslim.training.trainer` — ``Trainer(model, train_data, ...).fit(phases, resume=...)`` with
  dense / sparse / finetune phases and per-epoch atomic checkpoints (a loop over the controller).
* :mod:`~onnxslim.training.distributed` — torchrun / DistributedDataParallel: process group, lockstep
  collectives, ``--nproc`` launcher.
* :mod:`~onnxslim.training.batches` — training data sources and the per-rank epoch order.
* :mod:`~onnxslim.training.tasks` — loss and metric per task (classification now).
* :mod:`~onnxslim.training.export` — ``export(model, example_input, path)`` with an onnxruntime check.
"""


def __getattr__(name: str):
    if name == "MaskController":  # imported on use: ``import onnxslim.training.masks`` stays light
        from onnxslim.training.controller import MaskController

        return MaskController
    raise AttributeError(f"module 'onnxslim.training' has no attribute {name!r}")
