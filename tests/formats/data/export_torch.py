"""Export the two PyTorch models of docs/models.md to ONNX, as a user would.

    pip install torch==2.13.0 onnxscript
    python tests/formats/data/export_torch.py tests/formats/data

Writes ``tiny_resnet.onnx`` (a torchvision-style classifier) and ``tiny_yolo.onnx``
(a YOLO-style detector whose head decodes boxes in the graph), each with its weights
in a ``.onnx.data`` file beside it as the exporter writes them, plus the PyTorch
outputs for a fixed input (``*_io.npz``) so the compiled DFPs can be checked without
torch. The committed files in this folder came from this script (torch 2.13.0+cpu,
onnxscript 0.7.2); tests/formats/test_pytorch.py re-runs it when torch is installed.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn


class Block(nn.Module):
    """A ResNet basic block."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    """torchvision's ResNet layout at toy size: stem, blocks, global pool, fc."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.layer1 = Block(16)
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32),
                                  nn.ReLU())
        self.layer2 = Block(32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.down(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.SiLU())


class TinyYolo(nn.Module):
    """A YOLO-style anchor-free detector: two scales, boxes decoded in the graph.

    Output ``(1, 4 + classes, N)``: ``cx, cy, w, h`` in pixels and class scores per
    grid cell, as YOLOv8-style exports give it; NMS stays on the host.
    """

    def __init__(self, classes: int = 3, size: int = 64) -> None:
        super().__init__()
        self.classes = classes
        self.b1 = nn.Sequential(conv(3, 16, 2), conv(16, 32, 2), conv(32, 32, 2))  # /8
        self.b2 = conv(32, 64, 2)  # /16
        self.heads = nn.ModuleList([nn.Conv2d(32, 4 + classes, 1), nn.Conv2d(64, 4 + classes, 1)])
        grids, strides = [], []
        for stride in (8, 16):
            n = size // stride
            ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
            grids.append(torch.stack([xs, ys]).reshape(2, -1).float() + 0.5)
            strides.append(torch.full((1, n * n), float(stride)))
        self.register_buffer("grid", torch.cat(grids, 1))
        self.register_buffer("stride", torch.cat(strides, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f1 = self.b1(x)
        f2 = self.b2(f1)
        raw = torch.cat([h(f).flatten(2) for h, f in zip(self.heads, (f1, f2), strict=True)], 2)
        xy = (raw[:, :2].tanh() + self.grid) * self.stride
        wh = torch.exp(raw[:, 2:4].clamp(-4, 4)) * self.stride
        return torch.cat([xy, wh, raw[:, 4:].sigmoid()], 1)


def export(model: nn.Module, name: str, folder: Path, size: int) -> None:
    torch.manual_seed(0)
    model.eval()
    for m in model.modules():  # non-trivial batch-norm statistics, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.rand(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(folder / f"{name}.onnx"), input_names=["images"],
                          output_names=["output0"], opset_version=18, external_data=True)
    with torch.no_grad():
        y = model(x).numpy()
    np.savez(folder / f"{name}_io.npz", x=x.numpy(), y=y)


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    export(TinyResNet(), "tiny_resnet", folder, 64)
    torch.manual_seed(1)
    export(TinyYolo(), "tiny_yolo", folder, 64)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
