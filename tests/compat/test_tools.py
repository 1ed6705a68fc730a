"""mx_nc, mx_bench and memryx.Benchmark, as the SDK's users call them."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import onnx
import pytest

import memryx as mx
from memryx import testing
from memryx._tools import mx_bench, mx_nc

ROOT = Path(__file__).resolve().parents[2]


def test_console_scripts_declared() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["mx_nc"] == "memryx._tools:mx_nc_main"
    assert scripts["mx_bench"] == "memryx._tools:mx_bench_main"


def test_mx_nc_sdk_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    onnx.save(testing.mobilenet_like(preprocessing=True), "net.onnx")
    assert mx_nc(["-m", "net.onnx", "-c", "2", "--dfp_fname", "out", "--autocrop", "-v"]) == 0
    assert "wrote out.dfp" in capsys.readouterr().out
    dfp = mx.Dfp("out.dfp")
    assert dfp.num_chips == 2
    assert list(tmp_path.glob("*pre*.onnx")) and list(tmp_path.glob("*post*.onnx"))
    # the default name follows the model; explicit crop points
    assert mx_nc(["-m", "net.onnx", "--inputs", "image", "--outputs", "logits"]) == 0
    assert mx.Dfp("net.dfp").input_ports[0].layer == "image"


def test_mx_nc_multi_model_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    onnx.save(testing.mobilenet_like(preprocessing=True), "a.onnx")
    onnx.save(testing.mlp_model(), "b.onnx")
    assert mx_nc(["-m", "a.onnx", "b.onnx", "--inputs", "image|", "--dfp_fname",
                  "two.dfp"]) == 0
    dfp = mx.Dfp("two.dfp")
    assert dfp.num_models == 2 and dfp.model(0).inputs[0].layer == "image"


@pytest.mark.parametrize(("argv", "message"), [
    (["-m", "x.onnx", "-c", "four"], "-c/--num_chips must be a whole number, got 'four'"),
    (["-m", "missing.onnx"], "missing.onnx"),
    (["-m", "a.onnx", "--inputs", "x|y"], "one model, but names for 2 models"),
])
def test_mx_nc_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                      monkeypatch: pytest.MonkeyPatch, argv: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    onnx.save(testing.mlp_model(), "a.onnx")
    assert mx_nc(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("mx_nc: error:") and message in err


def test_mx_bench(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.dfp"
    mx.NeuralCompiler(models=testing.mlp_model(), dfp_fname=str(path), fps=2000,
                      latency_ms=1.0).run()
    assert mx_bench(["-d", str(path), "-f", "200"]) == 0
    out = capsys.readouterr().out
    assert "Frames: 200" in out and "Latency:" in out and "FPS:" in out
    assert mx_bench(["--hello"]) == 0
    assert "answers correctly" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        mx_bench([])  # neither -d nor --hello
    assert mx_bench(["-d", str(tmp_path / "none.dfp")]) == 1
    assert "mx_bench: error:" in capsys.readouterr().err


def test_mx_bench_as_a_command() -> None:
    res = subprocess.run([sys.executable, "-c", "from memryx._tools import mx_bench_main; "
                          "mx_bench_main()", "--hello"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "hello from memryx" in res.stdout, res.stderr


@pytest.fixture(scope="module")
def paced_dfp() -> mx.Dfp:
    """A model the host computes far faster than its modeled 150 fps: timed mode paces it."""
    return mx.NeuralCompiler(models=testing.mlp_model(), fps=150, latency_ms=2.5).run()


def test_benchmark_stable_across_runs(paced_dfp: mx.Dfp) -> None:
    with mx.Benchmark(dfp=paced_dfp) as b:
        runs = [b.run(frames=150) for _ in range(3)]
    for outputs, latency_ms, fps in runs:
        assert isinstance(outputs, list) and outputs[0].shape == paced_dfp.output_shapes[0]
        assert 2.0 <= latency_ms < 50.0
        assert 75 <= fps <= 165, fps  # the modeled 150 fps, not the host's speed
    fps_values = [r[2] for r in runs]
    assert max(fps_values) / min(fps_values) < 1.5, fps_values
    assert len(b.history) == 3


def test_benchmark_modes_and_misuse(paced_dfp: mx.Dfp) -> None:
    with mx.Benchmark(paced_dfp, frames=40, fps=100) as b:
        _, _, fps = b.run()
        assert fps <= 110  # fed at 100 fps
        _, _, fps = b.run(frames=40, threading=False)
        assert fps > 0
    with pytest.raises(RuntimeError, match="context manager"):
        mx.Benchmark(paced_dfp).run()
    with pytest.raises(ValueError, match="frames must be >= 1"):
        mx.Benchmark(paced_dfp, frames=0)
    with pytest.raises(ValueError, match="fps must be a number >= 0"):
        mx.Benchmark(paced_dfp, fps=-1)
