"""The API document's three examples (examples/seed/) run as written, in subprocesses,
and their outputs match Keras' own ``model(x)`` on the same frames."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import tf_or_skip

pytestmark = pytest.mark.timeout(400)

SEED = Path(__file__).resolve().parents[2] / "examples" / "seed"

# Runs the example as __main__, then checks what it computed against Keras. The example
# leaves its accelerator open, as the API document does; the driver closes it after the
# checks so this test does not depend on how exit-time cleanup is done.
#
# MobileNet(weights=None) has all-zero batch-norm offsets and no conv biases, so on the
# examples' near-constant frames every activation is 0 and every output is 1/1000: a
# comparison with Keras would prove nothing. The driver therefore gives the model random
# weights of a trained network's scale (the example's code is untouched).
_DRIVER = r"""
import runpy, sys
import numpy as np
import tensorflow as tf

path, name = sys.argv[1], sys.argv[2]
_mobilenet = tf.keras.applications.MobileNet

def mobilenet_with_weights(*args, **kwargs):
    model = _mobilenet(*args, **kwargs)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        values = []
        for var, value in zip(layer.weights, layer.get_weights()):
            tag = getattr(var, "path", var.name)
            if "gamma" in tag or "moving_variance" in tag:
                values.append(rng.uniform(0.5, 1.5, value.shape))
            elif "beta" in tag or "moving_mean" in tag or "bias" in tag:
                values.append(rng.normal(0.0, 0.2, value.shape))
            else:
                fan_in = np.prod(value.shape[:2] if "depthwise" in tag else value.shape[:-1])
                values.append(rng.normal(0.0, np.sqrt(2.0 / fan_in), value.shape))
        if values:
            layer.set_weights([v.astype(np.float32) for v in values])
    return model

tf.keras.applications.MobileNet = mobilenet_with_weights
g = runpy.run_path(path, run_name="__main__")
model = g["model"]
if name == "sync_accl":
    pairs = [(g["data"], np.asarray(g["outputs"]))]
elif name == "async_accl":
    assert len(g["frames"]) == len(g["results"]) == 10, (len(g["frames"]), len(g["results"]))
    pairs = [(x, r[0][None]) for x, r in zip(g["frames"], g["results"])]
else:
    app = g["app"]
    assert [len(o) for o in app.outputs] == [10, 10], [len(o) for o in app.outputs]
    pairs = [(x, out[0][None]) for s in range(2)
             for x, out in zip(app.streams[s], app.outputs[s])]
worst, spread = 0.0, 0.0
for x, got in pairs:
    want = np.asarray(model(x[None], training=False))
    assert got.shape == want.shape == (1, 1000), (got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6)
    assert np.argmax(got) == np.argmax(want)
    worst = max(worst, float(np.abs(got - want).max()))
    spread = max(spread, float(want.max() - want.min()))
assert spread > 1e-3, f"the reference is ~constant ({spread}): the comparison proves nothing"
print(f"{name}: {len(pairs)} frames, max |memryx - keras| = {worst:.3g}, spread {spread:.3g}")
g["accl"].close()
"""


@pytest.mark.parametrize("name", ["sync_accl", "async_accl", "multistream_accl"])
def test_seed_example_matches_keras(name: str, tmp_path: Path) -> None:
    tf_or_skip()
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(SEED / f"{name}.py"), name],
        capture_output=True, text=True, timeout=380, cwd=tmp_path, stdin=subprocess.DEVNULL,
        env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"{name}: " in proc.stdout, proc.stdout
