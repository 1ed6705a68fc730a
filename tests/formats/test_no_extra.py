"""Without the tf extra: a one-line error that names it (runs with or without TensorFlow)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

# Make TensorFlow, tf2onnx and LiteRT unimportable, as on a base install.
_BLOCK = textwrap.dedent("""
    import sys
    for name in ("tensorflow", "tf2onnx", "ai_edge_litert", "keras", "tf_keras"):
        sys.modules[name] = None
""")

_SCRIPT = _BLOCK + textwrap.dedent("""
    import memryx as mx
    from memryx import testing

    def message(fn):
        try:
            fn()
        except mx.CompilerError as exc:
            return str(exc)
        raise SystemExit("no CompilerError")

    tfl, h5, sm = sys.argv[1:4]
    print(message(lambda: mx.NeuralCompiler(models=tfl).run()))
    print(message(lambda: mx.NeuralCompiler(models=open(tfl, "rb").read()).run()))
    print(message(lambda: mx.NeuralCompiler(models=h5).run()))
    print(message(lambda: mx.NeuralCompiler(models=sm).run()))
    dfp = mx.NeuralCompiler(models=testing.identity_model((1, 4))).run()
    with mx.SyncAccl(dfp) as accl:
        print(message(lambda: accl.set_postprocessing_model(tfl)))
        print(message(lambda: accl.set_preprocessing_model(h5)))
""")


def test_missing_extra_is_named_in_one_line(tmp_path: Path) -> None:
    tfl = tmp_path / "m.tflite"
    tfl.write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(64))
    h5 = tmp_path / "m.h5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    sm = tmp_path / "sm"
    sm.mkdir()
    (sm / "saved_model.pb").write_bytes(b"")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(tfl), str(h5), str(sm)],
                          capture_output=True, text=True, timeout=100, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 6, proc.stdout  # one line each
    for line in lines:
        assert "pip install 'memryx[tf]'" in line, line
        assert "not installed" in line
    assert "TFLite" in lines[0] and "Keras" in lines[2] and "SavedModel" in lines[3]
