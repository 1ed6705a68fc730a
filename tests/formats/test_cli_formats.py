"""`memryx compile` with an ONNX file whose weights sit in a separate file, and a TFLite file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from memryx import testing

pytestmark = pytest.mark.timeout(180)


def compile_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memryx", "compile", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=170, stdin=subprocess.DEVNULL)


def test_compile_onnx_with_external_weights(tmp_path: Path) -> None:
    onnx.save_model(testing.mobilenet_like(preprocessing=True), str(tmp_path / "net.onnx"),
                    save_as_external_data=True, location="net.onnx.data", size_threshold=0)
    proc = compile_cli("net.onnx", "-o", "net", "--autocrop", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "wrote net.dfp" in proc.stdout and "'image'" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model_0_net_post.onnx", "model_0_net_pre.onnx", "net.dfp", "net.onnx", "net.onnx.data"]
    (tmp_path / "net.onnx.data").unlink()
    proc = compile_cli("net.onnx", "-o", "net.dfp", cwd=tmp_path)
    assert proc.returncode == 1
    assert "net.onnx.data" in proc.stderr and "separate file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_compile_tflite_file(tf: object, cnn_tflite: bytes, tmp_path: Path) -> None:
    (tmp_path / "cnn.tflite").write_bytes(cnn_tflite)
    proc = compile_cli("cnn.tflite", "-o", "cnn.dfp", "--autocrop", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cnn.dfp").is_file()
    assert (tmp_path / "model_0_cnn_post.tflite").is_file()
    assert "(1, 32, 32, 3)" in proc.stdout
