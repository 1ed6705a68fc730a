"""The SDK's command-line tools: ``mx_nc`` (compile) and ``mx_bench`` (benchmark).

``mx_nc -m model.onnx [-v] [-c NUM_CHIPS] [--autocrop] [--dfp_fname NAME]
[--inputs NAMES] [--outputs NAMES] [-e EFFORT]`` calls :class:`NeuralCompiler`
with the SDK's keyword names; ``mx_bench -d model.dfp [-f FRAMES] [--hello]``
runs :class:`memryx.Benchmark`. Names in ``--inputs``/``--outputs`` are
separated by ``,``; with several models, the models' lists by ``|``.

These are command-line front ends: they write to stdout/stderr.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._exceptions import MemryxError
from ._version import __version__

__all__ = ["mx_bench", "mx_nc"]


def _names(text: str | None, n_models: int) -> Any:
    if not text:
        return None
    groups = [[n for n in part.split(",") if n] or None for part in text.split("|")]
    if n_models == 1:
        if len(groups) != 1:
            raise ValueError(f"one model, but names for {len(groups)} models: {text!r}")
        return groups[0]
    if len(groups) != n_models:
        raise ValueError(f"{n_models} models, but names for {len(groups)} ('|' separates "
                         f"the models' lists): {text!r}")
    return groups


def _nc_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mx_nc", description="Compile models into a DFP "
                                "(the MemryX SDK's mx_nc flags, memryx's NeuralCompiler).")
    p.add_argument("-m", "--models", nargs="+", required=True, metavar="MODEL",
                   help="model file(s); several make a multi-model DFP")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-c", "--num_chips", default="4", help="MX3 chips to target (default 4)")
    p.add_argument("-g", "--chip_gen", default=None, help="chip generation (MX3 only)")
    p.add_argument("--autocrop", action="store_true", help="crop host-side pre/post parts")
    p.add_argument("--dfp_fname", default=None, help="the DFP to write (default: named after "
                                                     "the first model; .dfp is appended)")
    p.add_argument("--inputs", default=None, help="names where the accelerated part begins")
    p.add_argument("--outputs", default=None, help="names where it ends")
    p.add_argument("-e", "--effort", default="normal", help="compiler effort (lazy, normal, "
                                                            "hard)")
    p.add_argument("--no_sim_dfp", action="store_true", help="accepted for compatibility")
    p.add_argument("--version", action="version", version=f"memryx {__version__}")
    return p


def _compiler_kwargs(args: argparse.Namespace, accepted: set[str], err: Any) -> dict[str, Any]:
    """The SDK's keywords; ones this NeuralCompiler does not take yet are left out, said so."""
    wanted: dict[str, Any] = {"effort": args.effort, "chip_gen": args.chip_gen,
                              "no_sim_dfp": args.no_sim_dfp}
    defaults = {"effort": "normal", "chip_gen": None, "no_sim_dfp": False}
    out = {}
    for key, value in wanted.items():
        if key in accepted:
            if value != defaults[key]:
                out[key] = value
        elif value != defaults[key]:
            err.write(f"mx_nc: note: --{key} is not supported by this memryx; ignored\n")
    return out


def mx_nc(argv: Sequence[str] | None = None) -> int:
    """``mx_nc``: compile with the SDK's flags."""
    from .compiler import NeuralCompiler

    args = _nc_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        try:
            num_chips = int(args.num_chips)
        except ValueError:
            raise ValueError(f"-c/--num_chips must be a whole number, got "
                             f"{args.num_chips!r}") from None
        models: Any = args.models if len(args.models) > 1 else args.models[0]
        dfp_fname = args.dfp_fname or f"{Path(args.models[0]).stem}.dfp"
        if not dfp_fname.endswith(".dfp"):
            dfp_fname += ".dfp"
        accepted = set(inspect.signature(NeuralCompiler.__init__).parameters)
        kwargs = _compiler_kwargs(args, accepted, sys.stderr)
        nc = NeuralCompiler(models=models, dfp_fname=dfp_fname, num_chips=num_chips,
                            verbose=args.verbose, autocrop=args.autocrop,
                            inputs=_names(args.inputs, len(args.models)),
                            outputs=_names(args.outputs, len(args.models)), **kwargs)
        dfp = nc.run()
    except (MemryxError, OSError, ValueError, TypeError) as exc:
        sys.stderr.write(f"mx_nc: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("\nmx_nc: interrupted\n")
        return 130
    sys.stdout.write(f"wrote {dfp_fname}: {dfp.num_models} model(s), {dfp.num_chips} chip(s)\n")
    return 0


def _bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mx_bench", description="Benchmark a DFP (the MemryX "
                                "SDK's mx_bench flags; runs on memryx's device).")
    p.add_argument("-d", "--dfp", help="the DFP to benchmark")
    p.add_argument("-f", "--frames", type=int, default=1000, help="frames to run (default 1000)")
    p.add_argument("--hello", action="store_true", help="check that the device answers, "
                                                        "print what it is, and exit")
    p.add_argument("-g", "--group", type=int, default=0, help="device id / chip group")
    p.add_argument("--version", action="version", version=f"memryx {__version__}")
    return p


def _hello(out: Any) -> int:
    import numpy as np

    from .accl import SyncAccl
    from .compiler import NeuralCompiler
    from .testing import identity_model

    dfp = NeuralCompiler(models=identity_model((1, 4))).run()
    with SyncAccl(dfp) as accl:
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        ok = bool(np.array_equal(accl.run(x), x))
        dev = accl.statistics()["device"]
    name = dev.get("device", "?")
    mode = f", {dev['mode']} mode" if "mode" in dev else ""
    out.write(f"hello from memryx {__version__}: device {name}{mode}, chip gen 3.1 (MX3), "
              f"{'answers correctly' if ok else 'WRONG ANSWER'}\n")
    return 0 if ok else 1


def mx_bench(argv: Sequence[str] | None = None) -> int:
    """``mx_bench``: the SDK's benchmark command."""
    parser = _bench_parser()
    args = parser.parse_args(argv)
    if args.frames < 1:
        parser.error("-f/--frames must be at least 1")
    try:
        if args.hello:
            return _hello(sys.stdout)
        if not args.dfp:
            parser.error("-d/--dfp is required (or --hello)")
        from .benchmark import Benchmark

        with Benchmark(dfp=args.dfp, group=args.group) as b:
            _, latency_ms, fps = b.run(frames=args.frames)
    except (MemryxError, OSError, ValueError, TypeError) as exc:
        sys.stderr.write(f"mx_bench: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("\nmx_bench: interrupted\n")
        return 130
    sys.stdout.write(f"Frames: {args.frames}\nLatency: {latency_ms:.2f} ms\n"
                     f"FPS: {fps:.1f}\n")
    return 0


def mx_nc_main() -> None:  # console script
    sys.exit(mx_nc())


def mx_bench_main() -> None:  # console script
    sys.exit(mx_bench())
