"""DFP files for the user scripts of the compatibility suite (compiled once)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import memryx as mx
from memryx import testing


@pytest.fixture(scope="session")
def compat_dir(tmp_path_factory: Any) -> Path:
    return Path(tmp_path_factory.mktemp("compat"))


@pytest.fixture(scope="session")
def light_dfp(compat_dir: Path) -> Path:
    """mobilenet_like, one (1, 3, 64, 64) input, one (1, 10) output."""
    path = compat_dir / "mobilenet.dfp"
    mx.NeuralCompiler(models=testing.mobilenet_like(), dfp_fname=str(path)).run()
    return path


@pytest.fixture(scope="session")
def heavy_dfp(compat_dir: Path) -> Path:
    """A ResNet-50 (reduced input size): each frame costs the host tens of ms."""
    path = compat_dir / "resnet50.dfp"
    mx.NeuralCompiler(models=testing.resnet50(input_size=128), dfp_fname=str(path)).run()
    return path
