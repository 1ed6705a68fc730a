"""The memryx command: compile, info, bench."""

from __future__ import annotations

import json

import onnx

from memryx import testing
from memryx.cli import main


def test_compile_info_bench(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(testing.mobilenet_like(preprocessing=True), str(model))
    dfp = tmp_path / "m.dfp"
    assert main(["compile", str(model), "-o", str(dfp), "--autocrop"]) == 0
    assert (tmp_path / "model_0_m_pre.onnx").exists()
    assert (tmp_path / "model_0_m_post.onnx").exists()
    out = capsys.readouterr().out
    assert "wrote" in out and "'image'" in out and "modeled MX3" in out

    assert main(["info", str(dfp)]) == 0
    out = capsys.readouterr().out
    assert "model 0: mobilenet_like (+ pre-processing model) (+ post-processing model)" in out
    assert "(1, 3, 64, 64)" in out and "fps" in out

    assert main(["bench", str(dfp), "--frames", "60", "--streams", "3"]) == 0
    captured = capsys.readouterr()
    assert "stream 2" in captured.out and "latency" in captured.out
    assert "60/60 frames" in captured.err  # the live progress line

    assert main(["bench", str(dfp), "--frames", "40", "--streams", "2", "--mode", "fast",
                 "--json", "-q"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["frames"] == 40 and result["mode"] == "fast"
    assert set(result["per_stream_fps"]) == {"0", "1"}
    assert result["latency_ms"]["p99"] >= result["latency_ms"]["p50"] > 0


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.dfp")]) == 1
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.dfp"
    bad.write_bytes(b"not a dfp at all, really")
    assert main(["bench", str(bad)]) == 1
    assert "not a memryx DFP" in capsys.readouterr().err
    assert main(["compile", str(tmp_path / "none.onnx"), "-o", str(tmp_path / "x.dfp")]) == 1
    assert "no ONNX file" in capsys.readouterr().err
