"""Example model for the CI-gate workflow: a small CNN with channel masks, trained briefly and exported.

It stands in for your own ``onnxslim export`` step: masks are explicit per-channel ``Mul`` nodes with
some entries zero, which is what ``onnxslim slim`` removes. Trains for a few hundred steps on the
bundled MNIST-10k (seconds on one CPU thread), deterministic with a seed.

    python docs/ci/export_example.py --out build/gate/masked.onnx
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from torch import nn

from onnxslim.data import mnist_split
from onnxslim.io import write_with_atomic


class MaskedCNN(nn.Module):
    """conv(1->8) relu mask pool conv(8->16) relu mask pool flatten linear(16*7*7->10)."""

    def __init__(self, keep1: int = 5, keep2: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 7 * 7, 10)
        self.register_buffer("mask1", (torch.arange(8) < keep1).float().view(1, 8, 1, 1))
        self.register_buffer("mask2", (torch.arange(16) < keep2).float().view(1, 16, 1, 1))

    def forward(self, x):
        x = torch.relu(self.conv1(x)) * self.mask1
        x = nn.functional.max_pool2d(x, 2)
        x = torch.relu(self.conv2(x)) * self.mask2
        x = nn.functional.max_pool2d(x, 2)
        return self.fc(torch.flatten(x, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    train, _ = mnist_split(seed=args.seed)
    images, labels = torch.from_numpy(train.images), torch.from_numpy(train.labels)
    model = MaskedCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(args.steps):
        batch = torch.randint(0, len(images), (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    example = torch.zeros(1, 1, 28, 28)

    def export(tmp: Path) -> None:
        # the TorchScript exporter gives the plainest graph (Flatten -> Gemm); torch warns that it is legacy
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (example,), str(tmp), input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                              dynamo=False)

    write_with_atomic(args.out, export)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
