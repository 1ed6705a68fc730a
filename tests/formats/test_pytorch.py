"""PyTorch models exported to ONNX (docs/models.md), weights in a separate .onnx.data file.

The committed files in data/ were written by data/export_torch.py with torch 2.13.0 (CPU);
CI compiles those without torch. Where torch and onnxscript are installed, the export is
re-run for real, the dynamic-shape export is refused, and the results compared again.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np
import pytest

import memryx as mx

pytestmark = pytest.mark.timeout(240)

DATA = Path(__file__).parent / "data"


#: Where the YOLO-style detector's accelerated part ends: its two head convolutions (the
#: names torch's exporter gave them); the box decoding after them runs on the host.
YOLO_HEADS = ["conv2d_4", "conv2d_5"]


def check(folder: Path, name: str, outputs: list[str] | None = None) -> mx.NeuralCompiler:
    io = np.load(folder / f"{name}_io.npz")
    nc = mx.NeuralCompiler(models=folder / f"{name}.onnx", outputs=outputs,
                           dfp_fname=folder / name)
    dfp = nc.run()
    assert dfp.input_ports[0].shape == io["x"].shape
    with mx.SyncAccl(dfp) as accl:
        for part in nc.cropped_files:
            if part.name.endswith("_post.onnx"):
                accl.set_postprocessing_model(part)
            if part.name.endswith("_pre.onnx"):
                accl.set_preprocessing_model(part)
        got = np.asarray(accl.run(io["x"]))
    np.testing.assert_allclose(got, io["y"], rtol=1e-4, atol=1e-4)
    return nc


@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_yolo"])
def test_committed_exports_compile_and_match_torch(name: str, tmp_path: Path) -> None:
    for suffix in (".onnx", ".onnx.data", "_io.npz"):
        shutil.copy(DATA / f"{name}{suffix}", tmp_path)
    nc = check(tmp_path, name, outputs=YOLO_HEADS if name == "tiny_yolo" else None)
    if name == "tiny_yolo":  # the decoding is a host-side post-processing model
        assert [p.name for p in nc.cropped_files] == ["model_0_tiny_yolo_post.onnx"]


def test_real_export_and_dynamic_shapes_refused(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    import importlib.util
    import warnings

    with contextlib.suppress(ImportError):  # the exporter's progress bars: no monitor thread
        import tqdm

        tqdm.tqdm.monitor_interval = 0
    spec = importlib.util.spec_from_file_location("export_torch", DATA / "export_torch.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    assert (tmp_path / "tiny_resnet.onnx.data").is_file()  # the exporter's separate weights
    check(tmp_path, "tiny_resnet")
    check(tmp_path, "tiny_yolo", outputs=YOLO_HEADS)

    model = module.TinyResNet().eval()
    dims = {"x": {0: torch.export.Dim("batch"), 2: torch.export.Dim("h", min=32, max=256),
                  3: torch.export.Dim("w", min=32, max=256)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(1, 3, 64, 64),), str(tmp_path / "dyn.onnx"),
                          input_names=["images"], opset_version=18, dynamic_shapes=dims)
    with pytest.raises(mx.CompilerError) as info:
        mx.NeuralCompiler(models=tmp_path / "dyn.onnx").run()
    msg = str(info.value)
    assert "dynamic dimension 'h' at axis 2" in msg and "fixed" in msg
