"""Regression: small stand-ins of architecture families that users export, slimmed exactly.

GhostNet (Concat of a conv and its cheap depthwise, then ``[:, :oup]``; masks on cheap channels alone), Res2Net (chunk, hierarchical
adds, Concat), HRNet fusion (strided convs, nearest and bilinear Resize, Add), YOLOv5 (Focus slices on
H/W, C3, SPPF, the Detect reshape), DeepLabV3 ASPP (dilated convs, a global-pool branch resized back),
RegNet (group convs of group width 4), RepVGG (3x3 + 1x1 + identity BN added), MobileViT (unfold /
fold by Reshape and Transpose around attention), a non-local block (theta^T phi sums two convs' channels), ShuffleNetV2 (chunk, branch, concat,
channel shuffle: a permutation), CIFAR ResNet's option-A shortcut (zero channels padded on), PyramidNet (zero channels concatenated),
ResNeSt split attention (rSoftMax: Reshape / Transpose / Softmax / Reshape to an (N, C, 1, 1) gate),
ReXNet's partial residual (ScatterND), channels picked by a tensor index, flipped or strided, coordinate attention
(pools concatenated on a spatial axis), SKNet's selective kernel (softmax over the branch axis), ECA-Net's Conv1d
and triplet attention's 7x7 convs along the channel axis, SA-Net's shuffle attention (groups of
channels moved into the batch and back). ``masks``: hand-placed masks whose zeros are all
deletable (shared where channels are coupled): every one is deleted. ``prune``: ``prune(ratio=0.5)``
on the mask-free model: every channel it masks is deleted. Both: onnxruntime matches the reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from graphs import assert_equivalent
from test_torch_exports import ConvBN, Mask, export
from torch import nn

from onnxslim.graph.prune import prune
from onnxslim.graph.slim import slim


def _mask(channels, zeros):
    return Mask(channels, list(zeros))


class Ghost(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvBN(3, 8)
        self.primary, self.cheap = ConvBN(8, 6, 1), ConvBN(6, 6, 3, groups=6)
        self.dw = ConvBN(11, 11, 3, 2, groups=11, act=None)
        self.primary2, self.cheap2 = ConvBN(11, 4, 1, act=None), ConvBN(4, 4, 3, groups=4, act=None)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        a = self.primary(self.stem(x))
        y = self.dw(torch.cat([a, self.cheap(a)], 1)[:, :11])
        b = self.primary2(y)
        return self.fc(torch.cat([b, self.cheap2(b)], 1).mean((2, 3)))


class GhostCheapMasks(Ghost):
    """A Ghost module whose cheap (depthwise) channels 1 and 4 are masked after their BN while their
    primary channels stay live: the depthwise conv reads a Gather of the primary channels it keeps."""

    def __init__(self):
        super().__init__()
        self.cheap = ConvBN(6, 6, 3, groups=6, mask=_mask(6, [1, 4]))


class Res2Net(nn.Module):
    def __init__(self, width=4, scale=4):
        super().__init__()
        self.scale = scale
        self.stem, self.conv1 = ConvBN(3, 16), ConvBN(16, width * scale, 1)
        self.convs = nn.ModuleList([ConvBN(width, width) for _ in range(scale - 1)])
        self.conv3, self.fc = ConvBN(width * scale, 16, 1, act=None), nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        parts, out, y = torch.chunk(self.conv1(x), self.scale, 1), [], None
        for i, conv in enumerate(self.convs):
            y = conv(parts[i] if i == 0 else y + parts[i])
            out.append(y)
        return self.fc(torch.relu(self.conv3(torch.cat([*out, parts[-1]], 1)) + x).mean((2, 3)))


class HRNetFuse(nn.Module):
    def __init__(self):
        super().__init__()
        high, low = _mask(8, [1, 6]), _mask(16, [0, 3, 4, 12])
        self.h, self.low = ConvBN(3, 8, mask=high), ConvBN(3, 16, 3, 2, mask=low)
        self.l2h, self.h2l = ConvBN(16, 8, 1, mask=high, act=None), ConvBN(8, 16, 3, 2, mask=low, act=None)
        self.head = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        h, low = self.h(x), self.low(x)
        h2 = torch.relu(h + F.interpolate(self.l2h(low), scale_factor=2, mode="nearest"))
        low2 = torch.relu(low + self.h2l(h))
        return self.head(torch.cat([h2, F.interpolate(low2, size=h.shape[-2:], mode="bilinear")], 1))


class YoloV5(nn.Module):
    def __init__(self):
        super().__init__()
        self.focus = ConvBN(12, 16, mask=_mask(16, [2, 9]), act=nn.SiLU)
        cv1 = _mask(8, [0, 5])
        self.cv1, self.cv2 = ConvBN(16, 8, 1, mask=cv1, act=nn.SiLU), ConvBN(16, 8, 1, mask=_mask(8, [7]), act=nn.SiLU)
        self.m1, self.m2 = ConvBN(8, 8, 1, mask=_mask(8, [3]), act=nn.SiLU), ConvBN(8, 8, mask=cv1, act=nn.SiLU)
        self.cv3 = ConvBN(16, 16, 1, mask=_mask(16, [1, 14]), act=nn.SiLU)
        self.spp1, self.spp2 = ConvBN(16, 8, 1, mask=_mask(8, [4]), act=nn.SiLU), ConvBN(32, 16, 1, act=nn.SiLU)
        self.detect = nn.Conv2d(16, 3 * 7, 1)

    def forward(self, x):
        x = self.focus(torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1))
        a = self.cv1(x)
        x = self.spp1(self.cv3(torch.cat([a + self.m2(self.m1(a)), self.cv2(x)], 1)))
        y1 = F.max_pool2d(x, 5, 1, 2)
        y2 = F.max_pool2d(y1, 5, 1, 2)
        p = self.detect(self.spp2(torch.cat([x, y1, y2, F.max_pool2d(y2, 5, 1, 2)], 1)))
        return p.view(p.shape[0], 3, 7, p.shape[2], p.shape[3]).permute(0, 1, 3, 4, 2)


class ASPP(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvBN(3, 8, mask=_mask(8, [3]))
        self.branches = nn.ModuleList([ConvBN(8, 6, k, mask=_mask(6, zeros)) for k, zeros in
                                       ((1, [0]), (3, [2, 5]), (3, [1]))])
        for dilation, branch in zip((2, 3), self.branches[1:]):
            branch[0].dilation, branch[0].padding = (dilation, dilation), (dilation, dilation)
        self.pool = ConvBN(8, 6, 1, mask=_mask(6, [4]))
        self.project, self.head = ConvBN(24, 8, 1, mask=_mask(8, [6])), nn.Conv2d(8, 3, 1)

    def forward(self, x):
        x = self.stem(x)
        pooled = F.interpolate(self.pool(x.mean((2, 3), keepdim=True)), size=x.shape[-2:], mode="bilinear")
        return self.head(self.project(torch.cat([b(x) for b in self.branches] + [pooled], 1)))


class RegNet(nn.Module):
    def __init__(self):
        super().__init__()
        shared = _mask(16, [2, 9])
        self.stem = ConvBN(3, 16, mask=shared)
        self.a = ConvBN(16, 16, 1, mask=_mask(16, [4, 5, 6, 7]))  # one whole group of width 4
        self.b = ConvBN(16, 16, 3, groups=4, mask=_mask(16, [1, 5, 9, 13]))  # one per group
        self.c, self.fc = ConvBN(16, 16, 1, mask=shared, act=None), nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        return self.fc(torch.relu(x + self.c(self.b(self.a(x)))).mean((2, 3)))


class RepVGG(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvBN(3, 8)
        self.blocks = nn.ModuleList(nn.ModuleList([ConvBN(8, 8, 3, act=None), ConvBN(8, 8, 1, act=None), nn.BatchNorm2d(8)])
                                    for _ in range(2))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        for conv3, conv1, identity in self.blocks:
            x = torch.relu(conv3(x) + conv1(x) + identity(x))
        return self.fc(x.mean((2, 3)))


class MobileViT(nn.Module):
    def __init__(self, c=8, d=12, patch=2):
        super().__init__()
        self.patch = patch
        self.local = ConvBN(3, c, mask=_mask(c, [1, 6]), act=nn.SiLU)
        self.to_d, self.norm, self.attn = nn.Conv2d(c, d, 1, bias=False), nn.LayerNorm(d), nn.MultiheadAttention(d, 2, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.proj, self.fuse = ConvBN(d, c, 1, mask=_mask(c, [0]), act=nn.SiLU), ConvBN(2 * c, c, mask=_mask(c, [3]))
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        x = self.local(x)
        y = self.to_d(x)
        n, d, h, w = y.shape
        p = self.patch
        y = y.reshape(n * d * (h // p), p, w // p, p).transpose(1, 2).reshape(n, d, -1, p * p)
        y = y.transpose(1, 3).reshape(n * p * p, -1, d)
        z = self.norm(y)
        y = y + self.attn(z, z, z, need_weights=False)[0]
        y = y + self.fc2(F.silu(self.fc1(y)))
        y = y.reshape(n, p * p, -1, d).transpose(1, 3).reshape(n * d * (h // p), w // p, p, p)
        y = y.transpose(1, 2).reshape(n, d, h, w)
        return self.fc(self.fuse(torch.cat([x, self.proj(y)], 1)).mean((2, 3)))


class NonLocal(nn.Module):
    """Non-local block (Wang et al. 2018): ``softmax(theta^T phi) g`` over the H*W positions, the channels of
    theta and phi summed by the first MatMul. theta's mask alone makes a term ``theta_k * phi_k`` zero:
    channel k goes from both convs."""

    def __init__(self):
        super().__init__()
        shared = _mask(8, [1, 6])
        self.stem, self.head = ConvBN(3, 8, mask=shared), nn.Conv2d(8, 3, 1)
        self.theta, self.phi, self.g = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)
        self.mask_theta, self.mask_g = _mask(4, [1]), _mask(4, [2])
        self.w = nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8), shared)

    def forward(self, x):
        x = self.stem(x)
        n, _, h, w = x.shape
        theta = self.mask_theta(self.theta(x)).view(n, 4, -1).permute(0, 2, 1)
        g = self.mask_g(self.g(x)).view(n, 4, -1).permute(0, 2, 1)
        attention = torch.softmax(torch.matmul(theta, self.phi(x).view(n, 4, -1)), -1)
        y = torch.matmul(attention, g).permute(0, 2, 1).reshape(n, 4, h, w)
        return self.head(x + self.w(y))


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 unit (Ma et al. 2018, fig. 3c) with a mask after every BN, as BN-slimming leaves them:
    each half's zero channels are their own after the shuffle (a channel permutation)."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBN(3, 16, mask=_mask(16, [1, 4, 9, 14]))
        self.branch = nn.Sequential(ConvBN(8, 8, 1, mask=_mask(8, [2, 5])), ConvBN(8, 8, 3, groups=8, act=None),
                                    ConvBN(8, 8, 1, mask=_mask(8, [0, 7])))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        a, b = self.stem(x).chunk(2, dim=1)
        y = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = y.shape
        return self.fc(y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w).mean((2, 3)))


class CifarResNetOptionA(nn.Module):
    """CIFAR ResNet's parameter-free "option A" shortcut (He et al. 2016, sec. 4.2): subsample, then pad
    the channel axis with zeros, ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))``; the zero channels added
    (0, 1, 6, 7) are coupled with the block's output by the residual Add."""

    def __init__(self):
        super().__init__()
        self.stem, self.c1 = ConvBN(3, 4, mask=_mask(4, [1])), ConvBN(4, 8, 3, 2, mask=_mask(8, [3]))
        self.c2 = ConvBN(8, 8, 3, mask=_mask(8, [0, 3, 7]), act=None)  # 0 and 7: padded; 3: the stem's 1
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2), "constant", 0)
        return self.fc(torch.relu(self.c2(self.c1(x)) + shortcut).mean((2, 3)))


class PyramidNet(nn.Module):
    """PyramidNet's zero-padded shortcut (Han et al. 2017, sec. 3.2): ``cat([x, zeros], 1)`` with the
    zeros a constant of the export; its channels (4..7) are zero, coupled with the block's output."""

    def __init__(self):
        super().__init__()
        self.stem, self.c1 = ConvBN(3, 4, mask=_mask(4, [1])), ConvBN(4, 8, 3, mask=_mask(8, [3]))
        self.c2 = ConvBN(8, 8, 3, mask=_mask(8, [1, 5, 6]), act=None)  # 5, 6: padded; 1: the stem's 1
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        n, c, h, w = x.shape
        return self.fc((self.c2(self.c1(x)) + torch.cat([x, torch.zeros(n, 8 - c, h, w)], 1)).mean((2, 3)))


class ResNeSt(nn.Module):
    """ResNeSt split attention (Zhang et al. 2022) with radix 2 and cardinality 2: the gate's rSoftMax
    ``view(b, card, radix, -1).transpose(1, 2)``, softmax over the radix, ``reshape(b, -1).view(b, -1, 1,
    1)`` (one Reshape in the dynamo export, two in the legacy one), split and weighted sum."""

    def __init__(self, c=8):
        super().__init__()
        self.stem, self.conv = ConvBN(3, c), ConvBN(c, 2 * c, 3, groups=4)
        self.fc1, self.fc2, self.head = ConvBN(c, 4, 1), nn.Conv2d(4, 2 * c, 1, groups=2), nn.Conv2d(c, 3, 1)

    def forward(self, x):
        y = self.conv(self.stem(x))
        b, c2 = y.shape[:2]
        splits = torch.split(y, c2 // 2, dim=1)
        attention = self.fc2(self.fc1((splits[0] + splits[1]).mean((2, 3), keepdim=True)))
        attention = F.softmax(attention.view(b, 2, 2, -1).transpose(1, 2), dim=1).reshape(b, -1).view(b, -1, 1, 1)
        gates = torch.split(attention, c2 // 2, dim=1)
        return self.head(gates[0] * splits[0] + gates[1] * splits[1])


class ReXNet(nn.Module):
    """ReXNet's partial residual (Han et al. 2021, the authors' code): ``out[:, 0:c_in] += x``, a
    ScatterND in both exports; channel c < c_in of the output is the block's channel c plus the input's."""

    def __init__(self):
        super().__init__()
        self.stem, self.block = ConvBN(3, 6, mask=_mask(6, [1, 4])), ConvBN(6, 9, 3, mask=_mask(9, [1, 4, 8]), act=None)
        self.fc = nn.Linear(9, 3)

    def forward(self, x):
        x = self.stem(x)
        out = self.block(x)
        out[:, 0:6] += x
        return self.fc(out.mean((2, 3)))


class ChannelIndexing(nn.Module):
    """Channels picked by a tensor index ``x[:, idx]`` (dynamo: Transpose, GatherND, Transpose; legacy:
    Gather), reversed ``x.flip(1)`` (a Slice of step -1) and strided ``x[:, 1::2]``."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBN(3, 8, mask=_mask(8, [1, 4, 6]))
        self.picked, self.flipped, self.odd = nn.Conv2d(3, 4, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 4, 1)
        self.register_buffer("idx", torch.tensor([0, 4, 5]))

    def forward(self, x):
        x = self.stem(x)
        return self.picked(x[:, self.idx]) + self.flipped(x.flip(1)) + self.odd(x[:, 1::2])


class CoordAtt(nn.Module):
    """Coordinate attention (Hou et al. CVPR 2021): pools along H and along W, concatenates the two on a
    spatial axis, one shared 1x1 conv, splits them back: the channel axis passes every step."""

    def __init__(self, c: int = 16, mid: int = 8):
        super().__init__()
        self.stem, self.mask = ConvBN(3, c), _mask(c, [0, 3, 7])
        self.conv1, self.bn1, self.mask1 = nn.Conv2d(c, mid, 1), nn.BatchNorm2d(mid), _mask(mid, [2])
        self.conv_h, self.conv_w, self.head = nn.Conv2d(mid, c, 1), nn.Conv2d(mid, c, 1), nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = self.mask(F.relu(self.stem(x)))
        h, w = x.shape[2], x.shape[3]
        pooled = torch.cat([F.adaptive_avg_pool2d(x, (h, 1)), F.adaptive_avg_pool2d(x, (1, w)).permute(0, 1, 3, 2)], dim=2)
        y = self.mask1(F.hardswish(self.bn1(self.conv1(pooled))))
        y_h, y_w = torch.split(y, [h, w], dim=2)
        return self.head(x * torch.sigmoid(self.conv_w(y_w.permute(0, 1, 3, 2))) * torch.sigmoid(self.conv_h(y_h)))


class SelectiveKernel(nn.Module):
    """SKNet's selective kernel (Li et al. CVPR 2019): two branches (3x3, dilated 3x3) summed, pooled, a
    bottleneck to 2C logits viewed as (N, 2, C, 1, 1) with a softmax over the branch axis; one mask shared
    by both branches (their channels are added)."""

    def __init__(self, c: int = 16, d: int = 8):
        super().__init__()
        self.stem, self.b1 = ConvBN(3, c), ConvBN(c, c)
        self.b2 = nn.Sequential(nn.Conv2d(c, c, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(c))
        self.mask, self.fc, self.fcs, self.head = _mask(c, [2, 6]), nn.Conv2d(c, d, 1), nn.Conv2d(d, 2 * c, 1), nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        u1, u2 = self.mask(F.relu(self.b1(x))), self.mask(F.relu(self.b2(x)))
        a = self.fcs(F.relu(self.fc((u1 + u2).mean((2, 3), keepdim=True)))).view(x.shape[0], 2, -1, 1, 1).softmax(dim=1)
        return self.head(u1 * a[:, 0] + u2 * a[:, 1])


class _TripletGate(nn.Module):
    """Z-pool (max and mean over axis 1), a 7x7 conv to one map, a sigmoid gate."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 1, 7, padding=3, bias=False), nn.BatchNorm2d(1)

    def forward(self, x):
        pooled = torch.cat([x.max(1, keepdim=True)[0], x.mean(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.bn(self.conv(pooled)))


class TripletAttention(nn.Module):
    """Triplet attention (Misra et al. WACV 2021): two branches rotate the channels onto H or W, Z-pool over
    the axis that took their place and gate with a 7x7 conv that slides along the channels; a third gates
    H x W. Before: the rotated branches' convs were barriers holding every channel."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.stem, self.mask, self.head = ConvBN(3, c), _mask(c, [1, 6, 11]), nn.Conv2d(c, 4, 1)
        self.cw, self.hc, self.hw = _TripletGate(), _TripletGate(), _TripletGate()

    def forward(self, x):
        x = self.mask(F.relu(self.stem(x)))
        a = self.cw(x.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
        b = self.hc(x.permute(0, 3, 2, 1)).permute(0, 3, 2, 1)
        return self.head((a + b + self.hw(x)) / 3)


class ShuffleAttention(nn.Module):
    """SA-Net's shuffle attention (Zhang & Yang ICASSP 2021): ``view(b * G, -1, h, w)`` puts G groups of
    channels into the batch, each group halves into a channel gate and a GroupNorm gate with parameters
    shared by the groups, then ``view(b, -1, h, w)`` and a channel shuffle. Channel j of every group goes
    together (the mask zeroes 2 and 2 + C/G). Before: the TorchScript export's way back, ``(G, C/G, H, W)
    -> (1, C, H, W)``, was a barrier (0 channels of 13 prune masked deleted; the dynamo export: 12)."""

    def __init__(self, c: int = 16, groups: int = 2, masked: bool = True):
        super().__init__()
        self.groups, per_half = groups, c // (2 * groups)
        zeros = [2, 2 + c // groups] if masked else []
        self.stem, self.mask, self.head = ConvBN(3, c), _mask(c, zeros), nn.Conv2d(c, 4, 1)
        self.gn = nn.GroupNorm(per_half, per_half)
        self.gates = nn.Parameter(torch.rand(4, 1, per_half, 1, 1))  # channel weight, bias; spatial weight, bias

    def forward(self, x):
        x = self.mask(F.relu(self.stem(x)))
        b, c, h, w = x.shape
        x_0, x_1 = x.view(b * self.groups, -1, h, w).chunk(2, dim=1)
        channel = x_0 * torch.sigmoid(self.gates[0] * x_0.mean((2, 3), keepdim=True) + self.gates[1])
        spatial = x_1 * torch.sigmoid(self.gates[2] * self.gn(x_1) + self.gates[3])
        out = torch.cat([channel, spatial], dim=1).view(b, -1, h, w)
        return self.head(out.reshape(b, 2, -1, h, w).permute(0, 2, 1, 3, 4).reshape(b, -1, h, w))


# name -> (module, input size, how it is checked, exporters)
FAMILIES = {
    "ghostnet": (Ghost, 8, "prune", ["dynamo", "legacy"]),
    "ghostnet_cheap_masks": (GhostCheapMasks, 8, "masks", ["dynamo", "legacy"]),
    "res2net": (Res2Net, 8, "prune", ["dynamo", "legacy"]),
    "hrnet_fuse": (HRNetFuse, 8, "masks", ["dynamo", "legacy"]),
    "yolov5_focus_c3_sppf": (YoloV5, 8, "masks", ["dynamo", "legacy"]),
    "deeplab_aspp": (ASPP, 8, "masks", ["dynamo", "legacy"]),
    "regnet": (RegNet, 8, "masks", ["dynamo", "legacy"]),
    "repvgg": (RepVGG, 8, "prune", ["dynamo", "legacy"]),
    "mobilevit": (MobileViT, 8, "masks", ["dynamo", "legacy"]),
    "nonlocal": (NonLocal, 8, "masks", ["dynamo", "legacy"]),
    "shufflenetv2": (ShuffleNetV2, 8, "masks", ["dynamo", "legacy"]),
    "resnet_cifar_option_a": (CifarResNetOptionA, 8, "masks", ["dynamo", "legacy"]),
    "pyramidnet_zero_channels": (PyramidNet, 8, "masks", ["dynamo", "legacy"]),
    "resnest": (ResNeSt, 8, "prune", ["dynamo", "legacy"]),
    "rexnet_partial_residual": (ReXNet, 8, "masks", ["dynamo", "legacy"]),
    "channel_indexing": (ChannelIndexing, 8, "masks", ["dynamo", "legacy"]),
    "coordinate_attention": (CoordAtt, 8, "masks", ["dynamo", "legacy"]),
    "coordinate_attention_prune": (CoordAtt, 8, "prune", ["dynamo", "legacy"]),
    "selective_kernel": (SelectiveKernel, 8, "masks", ["dynamo", "legacy"]),
    "triplet_attention": (TripletAttention, 8, "masks", ["dynamo", "legacy"]),
    "triplet_attention_prune": (TripletAttention, 8, "prune", ["dynamo", "legacy"]),
    "shuffle_attention": (ShuffleAttention, 8, "masks", ["dynamo", "legacy"]),
    "shuffle_attention_prune": (lambda: ShuffleAttention(masked=False), 8, "prune", ["dynamo", "legacy"]),
    # more groups than channels per group, as SA-Net's own G = 64 (the groups went onto the batch axis: 0 deleted)
    "shuffle_attention_g8_prune": (lambda: ShuffleAttention(c=32, groups=8, masked=False), 8, "prune",
                                   ["dynamo", "legacy"]),
}


def _randomized(module: nn.Module) -> nn.Module:
    """BN statistics and affine parameters away from their defaults (a zero channel becomes a constant)."""
    generator = torch.Generator().manual_seed(0)
    for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5, generator=generator)
        bn.running_var.uniform_(0.5, 1.5, generator=generator)
        bn.weight.data.uniform_(0.5, 1.5, generator=generator)
        bn.bias.data.uniform_(-0.5, 0.5, generator=generator)
    return module


def _zeros_per_use(module: nn.Module, size: int) -> int:
    """Zero mask entries summed over every call of every Mask in a forward pass (a shared mask is one
    Mul node per use in the export)."""
    zeros = []
    hooks = [m.register_forward_hook(lambda m, args, out: zeros.append(int((m.weight == 0).sum())))
             for m in module.modules() if isinstance(m, Mask)]
    with torch.no_grad():
        module(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return sum(zeros)


@pytest.mark.parametrize(("name", "exporter"), [(name, exporter) for name, spec in FAMILIES.items() for exporter in spec[3]])
def test_family_slims_exactly(name, exporter):
    factory, size, check, _ = FAMILIES[name]
    torch.manual_seed(0)
    module = _randomized(factory())
    model = export(module, size, dynamo=exporter == "dynamo")
    feeds = {model.graph.input[0].name: np.random.default_rng(1).standard_normal((1, 3, size, size)).astype(np.float32)}
    if check == "prune":
        slimmed, report, reference = prune(model, ratio=0.5)
    else:
        (slimmed, report), reference = slim(model), model
        assert report.masked_channels == _zeros_per_use(module, size)  # every mask Mul was found
    assert_equivalent(reference, slimmed, feeds=feeds)
    assert report.masked_channels > 0
    assert report.deleted_masked_channels == report.masked_channels, report.format_table()


def test_resnest_gate_reshape_to_n_c_1_1_maps_channels_in_both_exports():
    """The dynamo export reshapes the rSoftMax output (N, 2, 2, 4) straight to (N, 16, 1, 1): the trailing
    1s are not where the channels go (before: they were, the gate's Mul saw the channels on axis 3 and
    was a barrier, and prune deleted 6 channels of the dynamo export against 18 of the legacy one)."""
    deleted = []
    for dynamo in (True, False):
        torch.manual_seed(0)
        model = export(_randomized(ResNeSt()), 8, dynamo=dynamo)
        _, report, _ = prune(model, ratio=0.5)
        assert not [k for k in report.kept if k.kind == "barrier"], report.format_table()
        deleted.append(report.deleted_masked_channels)
    assert deleted[0] == deleted[1] > 0


class LPRNetStage(nn.Module):
    """LPRNet (Zherzdev & Gruzdev 2018) keeps every other channel with a pooling window of one channel,
    ``MaxPool3d((1, 3, 3), (2, 1, 2))`` on a 4-D map (dynamo: Unsqueeze -> 5-D MaxPool; TorchScript 2.x
    writes an invalid 4-D MaxPool with a 3-D kernel, TorchScript 1.x wrote Transpose -> MaxPool((1, 1),
    strides (1, 2)) -> Transpose: ``transposed`` spells that with max_pool2d / permute). ``context``: a
    global-context branch reads every stem channel (LPRNet's keep_features)."""

    def __init__(self, spelling: str, context: bool):
        super().__init__()
        self.spelling, self.context = spelling, context
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), Mask(16, [1, 2, 4, 7]), nn.ReLU())
        self.conv = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), Mask(6, [0, 3]), nn.ReLU())
        self.fc = nn.Linear(22 if context else 6, 5)

    def forward(self, x):
        y = self.stem(x)
        if self.spelling == "pool3d":
            pooled = F.max_pool3d(y, (1, 3, 3), (2, 1, 2))
        else:
            pooled = F.max_pool2d(F.max_pool2d(y, 3, (1, 2)).permute(0, 2, 3, 1), 1, (1, 2)).permute(0, 3, 1, 2)
        z = self.conv(pooled).mean((2, 3))
        return self.fc(torch.cat([y.mean((2, 3)), z], 1) if self.context else z)


@pytest.mark.parametrize("context", [False, True], ids=["stage", "with-context"])
@pytest.mark.parametrize(("spelling", "exporter"), [("pool3d", "dynamo"), ("transposed", "dynamo"),
                                                    ("transposed", "legacy")])
def test_lprnet_channel_subsampling_pool_keeps_only_the_channels_it_reads(spelling, exporter, context):
    """The stem's odd channels are never read without the context branch (16 -> 6: 8 dead, 2 masked even
    ones); with it they are, and the pool reads the kept channels through a Gather (16 -> 12). Before: a
    barrier ("channel axis is not axis 1") held the stem's 16 channels."""
    torch.manual_seed(0)
    module = _randomized(LPRNetStage(spelling, context))
    model = export(module, 12, dynamo=exporter == "dynamo")
    slimmed, report = slim(model)
    assert_equivalent(model, slimmed)
    assert report.masked_channels == report.deleted_masked_channels == 6, report.format_table()
    assert [(layer.channels_before, layer.channels_after) for layer in report.layers][:2] == \
        [(16, 12 if context else 6), (6, 4)]


class ECA(nn.Module):
    """ECA-Net's gate (Wang et al. CVPR 2020): the pooled channels (N, 1, C) go through a Conv1d (k = 3)
    along the channel axis; a block conv before it has a mask of its own."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.stem, self.inner, self.inner_mask = ConvBN(3, 8), ConvBN(8, c), _mask(c, [4])
        self.conv, self.mask = ConvBN(c, c), _mask(c, [1, 5, 9])
        self.conv1d, self.head = nn.Conv1d(1, 1, 3, padding=1, bias=False), nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = self.mask(F.relu(self.conv(self.inner_mask(F.relu(self.inner(F.relu(self.stem(x))))))))
        return self.head(x * torch.sigmoid(_eca_gate(self.conv1d, x)))


def _eca_gate(conv1d: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """ECA's gate logits (N, C, 1, 1): global average pool, then ``conv1d`` along the channels."""
    return conv1d(x.mean((2, 3), keepdim=True).squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)


class ECAConstantChannels(nn.Module):
    """A masked channel that its BN turns into a constant ``beta``: a 1x1 head absorbs it into its bias, and
    an ECA Conv1d (k = 5) reads its pooled value among its neighbours' (the gate feeds a head of its own)."""

    def __init__(self, c: int = 12):
        super().__init__()
        self.conv, self.mask = nn.Conv2d(3, c, 3, padding=1, bias=False), _mask(c, [2, 7])
        self.bn, self.head = nn.BatchNorm2d(c), nn.Conv2d(c, 4, 1)
        self.conv1d, self.gate_head = nn.Conv1d(1, 1, 5, padding=2), nn.Conv2d(c, 2, 1)

    def forward(self, x):
        x = self.bn(self.mask(self.conv(x)))
        return self.head(x), self.gate_head(torch.sigmoid(_eca_gate(self.conv1d, x)))


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
@pytest.mark.parametrize("check", ["masks", "prune"])
def test_eca_conv_along_the_channel_axis_lets_channels_go(exporter, check):
    """The ECA Conv1d slides along the channel axis, so deleting a channel would shift its neighbours into
    the window: the slimmed model puts the deleted (zero) channels back before it (Gather, Mul by 1/0) and
    gathers the kept positions after it; every mask, and every channel prune masks, goes, exactly."""
    torch.manual_seed(0)
    module = _randomized(ECA())
    model = export(module, 8, dynamo=exporter == "dynamo")
    if check == "prune":
        slimmed, report, reference = prune(model, ratio=0.5)
    else:
        (slimmed, report), reference = slim(model), model
        assert report.masked_channels == 4
    assert_equivalent(reference, slimmed, feeds={model.graph.input[0].name: np.ones((1, 3, 8, 8), np.float32)})
    assert report.deleted_masked_channels == report.masked_channels > 0, report.format_table()
    gathers = [n for n in slimmed.graph.node if n.op_type == "Gather"]
    assert len(gathers) == 2  # one restores the conv's input positions, one takes the kept outputs
    assert slim(slimmed)[0].SerializeToString() == slimmed.SerializeToString()


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_eca_conv_gets_a_deleted_constant_channel_back_with_its_value(exporter):
    torch.manual_seed(0)
    module = _randomized(ECAConstantChannels())
    model = export(module, 8, dynamo=exporter == "dynamo")
    slimmed, report = slim(model)
    feeds = {model.graph.input[0].name: np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    assert_equivalent(model, slimmed, feeds=feeds)
    assert (report.masked_channels, report.deleted_masked_channels) == (2, 2), report.format_table()
    assert "Add" in [n.op_type for n in slimmed.graph.node]  # the constants' values, back at their positions
