"""conform's fast path (one port, an exact ndarray) keeps every guarantee of the slow one."""

from __future__ import annotations

import numpy as np
import pytest

from memryx._core.processing import PortSpec, conform
from memryx._exceptions import DtypeError, ShapeError

SPEC = (PortSpec(0, 0, "in", (1, 4, 3), np.dtype(np.float32)),)


def test_a_private_c_contiguous_copy_even_of_a_strided_frame():
    base = np.arange(24, dtype=np.float32).reshape(1, 3, 8)
    frame = np.ascontiguousarray(base.transpose(0, 2, 1))[:, ::2, :]  # (1, 4, 3), strided
    assert not frame.flags.c_contiguous
    (out,) = conform(frame, SPEC)
    assert out.flags.c_contiguous and out.flags.owndata
    np.testing.assert_array_equal(out, frame)
    frame[...] = -1  # the caller reuses its buffer: the copy is not affected
    assert (out != -1).all()


def test_copy_false_returns_the_checked_array_itself():
    frame = np.zeros((1, 4, 3), np.float32)
    assert conform(frame, SPEC, copy=False)[0] is frame


def test_wrong_dtype_shape_and_subclasses_still_take_the_checked_path():
    with pytest.raises(DtypeError, match="expected dtype float32, got float64"):
        conform(np.zeros((1, 4, 3)), SPEC)
    with pytest.raises(ShapeError, match=r"expected shape \(1, 4, 3\)"):
        conform(np.zeros((1, 3, 4), np.float32), SPEC)
    (out,) = conform(np.zeros((4, 3), np.float32), SPEC)  # the batch dimension left out
    assert out.shape == (1, 4, 3)
    masked = np.ma.zeros((1, 4, 3), np.float32)
    (out,) = conform(masked, SPEC)
    assert out.shape == (1, 4, 3) and out.flags.c_contiguous
