"""The public surface: what `memryx` exports, and that it is typed."""

from __future__ import annotations

import importlib.resources
import inspect

import memryx


def test_all_is_sorted_and_complete():
    assert memryx.__all__ == sorted(memryx.__all__)
    for name in memryx.__all__:
        assert hasattr(memryx, name), name
    public = {n for n in vars(memryx) if not n.startswith("_") and
              not inspect.ismodule(getattr(memryx, n))}
    assert public <= set(memryx.__all__), public - set(memryx.__all__)


def test_exported_objects_live_in_memryx():
    for name in memryx.__all__:
        obj = getattr(memryx, name)
        if inspect.isclass(obj):
            assert obj.__module__.startswith("memryx"), (name, obj.__module__)


def test_package_is_typed_and_versioned():
    assert (importlib.resources.files("memryx") / "py.typed").is_file()
    assert memryx.__version__.count(".") == 2


def test_every_error_is_a_memryx_error_and_its_builtin():
    assert issubclass(memryx.ShapeError, ValueError)
    assert issubclass(memryx.DtypeError, TypeError)
    assert issubclass(memryx.NotConnectedError, RuntimeError)
    assert issubclass(memryx.CallbackSignatureError, RuntimeError)
    assert issubclass(memryx.ModelIndexError, IndexError)
    assert issubclass(memryx.DfpError, ValueError)
    for name in memryx.__all__:
        obj = getattr(memryx, name)
        if inspect.isclass(obj) and issubclass(obj, Exception):
            assert issubclass(obj, memryx.MemryxError), name
