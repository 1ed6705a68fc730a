"""memryx.ray: accelerators on many hosts, as a pool of Ray actors.

Needs the ``ray`` extra: ``pip install 'memryx[ray]'``. See docs/scale-out.md.

::

    import ray
    from memryx.ray import AcceleratorPool

    ray.init(address="auto")               # or ray.init(resources={"MX3": 2}) locally
    with AcceleratorPool(dfp, replicas=4) as pool:
        outputs = pool.run(frame)
        for outputs in pool.imap(frames):
            ...
"""

from __future__ import annotations

try:
    import ray as _ray  # noqa: F401  (absolute: the Ray package, not this module)
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "memryx.ray needs Ray, an optional extra: pip install 'memryx[ray]'",
        name="ray") from exc

from ._pool import AcceleratorPool as AcceleratorPool

__all__ = ["AcceleratorPool"]
