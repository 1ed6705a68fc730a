"""`memryx bench` says which side bounds a run: the chip, the host's processing, the
host computing the model (and which mode keeps chip timing), the sources, or no pacing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import memryx as mx
from memryx import testing
from memryx._bench import verdict
from memryx.cli import main


def run(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["bench", *args, "--json", "-q"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def chip_dfp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model the host computes in microseconds, modeled at 100 frames/s: slow enough
    for a loaded 2-core host to keep chip timing."""
    path = tmp_path_factory.mktemp("bench") / "id.dfp"
    mx.NeuralCompiler(models=testing.identity_model((1, 4)), fps=100, latency_ms=2).run() \
        .save(str(path))
    return path


@pytest.fixture(scope="module")
def heavy_dfp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ResNet50 at 64x64 (milliseconds per frame on the host) modeled at 2,000 frames/s."""
    path = tmp_path_factory.mktemp("bench") / "r50.dfp"
    mx.NeuralCompiler(models=testing.resnet50(input_size=64), fps=2000, latency_ms=2).run() \
        .save(str(path))
    return path


def test_a_cheap_model_is_chip_bound_in_text_and_json(chip_dfp, capsys):
    r = run(capsys, str(chip_dfp), "--frames", "200")
    assert r["verdict"]["bound"] == "chip", r["verdict"]
    assert r["verdict"]["text"].startswith("chip-bound")
    assert r["steady_fps"] == pytest.approx(100, rel=0.1)
    assert r["host_cpu_ms_per_frame"] > 0 and r["paced"] is True
    assert main(["bench", str(chip_dfp), "--frames", "100", "-q"]) == 0
    text = capsys.readouterr().out
    assert "verdict    chip-bound" in text and "modeled" in text and "this host" in text


def test_a_model_the_host_cannot_compute_at_chip_rate_names_the_mode_to_use(heavy_dfp, capsys):
    r = run(capsys, str(heavy_dfp), "--frames", "250")
    assert r["verdict"]["bound"] == "host-simulation", r["verdict"]
    assert r["verdict"]["suggested_mode"] == "reuse"
    assert "host-bound: simulation compute — use mode reuse" in r["verdict"]["text"]
    assert r["late_frames"] > 0 and r["host_slower"]


def test_sampled_mode_reports_staleness_and_reuse_reports_hits(heavy_dfp, capsys):
    r = run(capsys, str(heavy_dfp), "--frames", "300", "--mode", "sampled")
    sampled = r["sampled"]
    assert sampled["fresh"] + sampled["stale"] == 300 and sampled["staleness_max"] >= 1
    r = run(capsys, str(heavy_dfp), "--frames", "100", "--mode", "reuse", "--cache-size", "4")
    assert r["reuse"]["size"] == 4 and r["reuse"]["hits"] + r["reuse"]["misses"] == 100
    assert main(["bench", str(heavy_dfp), "--frames", "50", "--mode", "sampled", "-q"]) == 0
    assert "staleness mean" in capsys.readouterr().out


def test_unpaced_and_source_bound_runs(chip_dfp, capsys):
    r = run(capsys, str(chip_dfp), "--frames", "100", "--mode", "shapes-unpaced")
    assert r["verdict"]["bound"] == "unpaced" and r["paced"] is False
    r = run(capsys, str(chip_dfp), "--frames", "40", "--streams", "2", "--rate", "20")
    assert r["verdict"]["bound"] == "source", r["verdict"]


def test_verdict_branches():
    base = {"mode": "timed", "paced": True, "modeled_fps": 1000.0, "rate": None,
            "streams": 1, "frames": 1000, "late_frames": 0, "host_slower": False,
            "suggested_mode": None, "fps": 990.0, "steady_fps": 995.0}
    assert verdict(base)["bound"] == "chip"
    slow = verdict({**base, "steady_fps": 30.0, "host_slower": True, "late_frames": 900,
                    "suggested_mode": "reuse"})
    assert slow["bound"] == "host-simulation" and "use mode reuse" in slow["text"]
    shapes = verdict({**base, "mode": "shapes", "steady_fps": 30.0, "host_slower": True})
    assert shapes["suggested_mode"] is None and "even without computing" in shapes["text"]
    proc = verdict({**base, "steady_fps": 500.0})
    assert proc["bound"] == "host-processing"
    assert proc["text"].startswith("host-bound: your pre/post-processing")
    assert verdict({**base, "paced": False})["bound"] == "unpaced"
    assert verdict({**base, "rate": 100.0, "streams": 2, "steady_fps": 199.0})["bound"] == \
        "source"


def test_bad_bench_options_are_refused(chip_dfp, capsys):
    for args, words in ((["--mode", "turbo"], "invalid choice: 'turbo'"),
                        (["--cache-size", "0"], "--cache-size"),
                        (["--backend", "tpu"], "invalid choice: 'tpu'")):
        with pytest.raises(SystemExit) as exc:
            main(["bench", str(chip_dfp), *args])
        assert exc.value.code == 2 and words in capsys.readouterr().err
    assert main(["bench", str(chip_dfp), "--mode", "timed", "--cache-size", "8", "-q"]) == 1
    assert "cache_size is an option of mode 'reuse'" in capsys.readouterr().err
