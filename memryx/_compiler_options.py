"""Validation of the NeuralCompiler's keywords, the vendor SDK's among them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final

from ._exceptions import CompilerError
from .dfp import MAX_CHIPS

__all__ = ["EFFORTS", "IGNORED_KEYWORDS", "PORT_FORMATS", "chip_gen_value", "choice",
           "dfp_path", "num_chips_value"]

#: ``effort`` values of the vendor's compiler (how hard its mapper searches).
EFFORTS: Final = ("lazy", "normal", "hard")
#: ``input_format`` / ``output_format`` values: how the real chip's ports carry data.
PORT_FORMATS: Final = ("FP32", "FP16", "BF16", "GBF80", "UINT8", "INT8")
#: Keywords of the vendor's ``NeuralCompiler`` accepted and ignored here (see docs/models.md).
IGNORED_KEYWORDS: Final = frozenset({"target", "hpoc", "hpoc_file", "extensions",
                                      "show_optimization", "exp_auto_dp", "model_in_out",
                                      "sim_dfp", "dfp_version"})


def num_chips_value(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CHIPS:
        raise CompilerError(f"num_chips must be an integer in 1..{MAX_CHIPS} (or such a "
                            f"string), got {value!r}")
    return value


def chip_gen_value(value: Any) -> str:
    text = str(value).strip().lower() if isinstance(value, (str, int, float)) and \
        not isinstance(value, bool) else None
    if text not in ("mx3", "3", "3.0", "3.1"):
        raise CompilerError(f"chip_gen: this compiler targets the MX3 only (chip_gen='mx3'), "
                            f"got {value!r}")
    return "mx3"


def choice(value: Any, allowed: tuple[str, ...], what: str) -> str:
    if not isinstance(value, str) or value.strip().lower() not in [a.lower() for a in allowed]:
        raise CompilerError(f"{what} must be one of {', '.join(map(repr, allowed))}, "
                            f"got {value!r}")
    return next(a for a in allowed if a.lower() == value.strip().lower())


def dfp_path(value: Any) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise CompilerError(f"dfp_fname must be a path, got {value!r}")
    path = Path(value)
    return path if path.suffix.lower() == ".dfp" else path.with_name(path.name + ".dfp")
