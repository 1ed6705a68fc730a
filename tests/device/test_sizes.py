"""DFPs and frames of any size: chunks on the wire, limits as clear errors (real server)."""

from __future__ import annotations

import numpy as np
import pytest

import memryx as mx
from memryx import testing
from memryx.pytest_plugin import ServerProcess
from tests.conftest import reference

pytestmark = pytest.mark.timeout(180)


def test_a_dfp_and_frames_over_64_mib_pass(tmp_path):
    """72 MiB of weights (a DFP the old 64 MiB limit refused) and 68 MiB frames both ways."""
    srv = ServerProcess(tmp_path, "--mode", "fast")
    try:
        model = testing.mlp_model(in_features=4096, hidden=4500, out_features=10)
        dfp = mx.NeuralCompiler(models=model).run()
        assert len(dfp.to_bytes()) > 64 * 2**20
        x = np.random.default_rng(0).standard_normal((1, 4096)).astype(np.float32)
        with mx.SyncAccl(dfp, device=srv.address, timeout=60) as accl:
            np.testing.assert_allclose(accl.run(x), reference(model, x)[0], rtol=1e-4, atol=1e-4)
        big = mx.NeuralCompiler(models=testing.identity_model((1, 17_000_000))).run()
        frame = np.arange(17_000_000, dtype=np.float32).reshape(1, -1)  # 68 MB
        with mx.SyncAccl(big, device=srv.address, timeout=60) as accl:
            for out in accl.run([frame, frame[:, ::-1].copy()]):
                assert out.shape == frame.shape
            np.testing.assert_array_equal(accl.run(frame), frame)
    finally:
        srv.stop()


def test_a_frame_above_the_servers_limit_is_a_clear_error(tmp_path):
    srv = ServerProcess(tmp_path, "--mode", "fast", "--max-message-mb", "1")
    try:
        dfp = mx.NeuralCompiler(models=testing.identity_model((1, 300_000))).run()  # 1.2 MB
        with mx.SyncAccl(dfp, device=srv.address, timeout=20) as accl:
            with pytest.raises(mx.DeviceError, match=r"exceeds the limit .*--max-message-mb"):
                accl.run(np.zeros((1, 300_000), np.float32))
    finally:
        srv.stop()


def test_a_dfp_above_the_servers_limit_is_a_clear_error(tmp_path):
    srv = ServerProcess(tmp_path, "--max-message-mb", "0.01")
    try:
        dfp = mx.NeuralCompiler(models=testing.mlp_model(in_features=64, hidden=64)).run()
        assert len(dfp.to_bytes()) > 0.01 * 2**20
        with pytest.raises(mx.DeviceError, match=r"DFP.*exceeds the limit .*--max-message-mb"):
            mx.SyncAccl(dfp, device=srv.address, timeout=20)
    finally:
        srv.stop()
