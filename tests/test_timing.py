"""The MX3 timing model: calibration, overrides, what the compiler stores."""

from __future__ import annotations

import pytest

import memryx as mx
from memryx import testing, timing

# MemryX's published 4-chip figures (shared/seed/README.md) and the error we accept.
PUBLISHED = [
    ("mobilenet_v1", lambda: testing.mobilenet_v1(), 1583.0),
    ("resnet50", lambda: testing.resnet50(), 992.0),
    ("yolov7_tiny_416", lambda: testing.yolov7_tiny(416), 404.0),
]


@pytest.mark.parametrize(("name", "build", "fps"), PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_calibration_within_ten_percent_of_published(name, build, fps):
    est = timing.estimate(build(), num_chips=4)
    assert est.fps == pytest.approx(fps, rel=0.10), (name, est)
    assert est.bound in ("compute", "streaming", "io")


def test_mobilenet_latency_matches_the_reference_table():
    assert timing.estimate(testing.mobilenet_v1()).latency_ms == pytest.approx(1.8, rel=0.05)


def test_more_chips_more_compute_bound_throughput():
    model = testing.resnet50()
    two, four = timing.estimate(model, 2), timing.estimate(model, 4)
    assert four.fps == pytest.approx(2 * two.fps, rel=1e-6)
    assert four.pipeline_depth >= 1


def test_layer_costs_count_conv_macs_exactly():
    costs = timing.layer_costs(testing.mlp_model(in_features=16, hidden=32, out_features=10))
    gemms = [c for c in costs if c.op == "Gemm"]
    assert [c.macs for c in gemms] == [16 * 32, 32 * 10]
    assert [c.weights for c in gemms] == [16 * 32 + 32, 32 * 10 + 10]


def test_compiler_stores_the_estimate_and_honours_overrides():
    dfp = mx.NeuralCompiler(models=testing.mobilenet_like()).run()
    perf = dfp.models[0].perf
    assert perf is not None
    assert perf["fps"] > 0 and perf["latency_ms"] > 0 and perf["bound"] != "override"
    dfp = mx.NeuralCompiler(models=testing.mobilenet_like(), fps=250, latency_ms=7.5).run()
    assert dfp.models[0].perf["fps"] == 250
    assert dfp.models[0].perf["latency_ms"] == 7.5
    assert dfp.models[0].perf["bound"] == "override"
    assert mx.Dfp(dfp.to_bytes()).models[0].perf == dfp.models[0].perf


def test_models_of_one_dfp_share_the_chips():
    # ResNet50 at 64x64 on 4 chips is compute-bound; two of them on 8 chips get 4 each
    alone = mx.NeuralCompiler(models=testing.resnet50(input_size=64), num_chips=4).run()
    shared = mx.NeuralCompiler(models=[testing.resnet50(input_size=64),
                                       testing.resnet50(input_size=64, seed=1)],
                               num_chips=8).run()
    assert alone.models[0].perf["bound"] == "compute"
    for m in shared.models:
        assert m.perf["num_chips"] == pytest.approx(4.0)
        assert m.perf["fps"] == pytest.approx(alone.models[0].perf["fps"])


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "fast", True])
def test_bad_overrides_are_refused(bad):
    with pytest.raises(mx.CompilerError, match="fps: expected a positive finite number"):
        mx.NeuralCompiler(models=testing.identity_model(), fps=bad)


def test_per_model_overrides_must_match_the_model_count():
    with pytest.raises(mx.CompilerError, match="one value per model"):
        mx.NeuralCompiler(models=[testing.identity_model()] * 2, latency_ms=[1.0])
    dfp = mx.NeuralCompiler(models=[testing.identity_model()] * 2, fps=[100, None]).run()
    assert dfp.models[0].perf["fps"] == 100
    assert dfp.models[1].perf["bound"] != "override"
