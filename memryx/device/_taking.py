"""How the simulated device takes a frame, on the thread that produced it.

The core copies every frame it accepts, so that an app may reuse its array as soon as
its callback returns (a capture into one buffer): a device that reads a frame later
reads it as it was. A copy is the most memory a frame costs the host: at a fast
model's rate (a 64x64x3 float32 frame, 49 KB, 18,000 times a second) the copies, and
the cache misses of allocating and freeing them on other threads, made the host CPU
per frame of mode ``"shapes"`` 56 µs against 22 µs without them (2-core host,
2026-12-01): every thread touching the frames got slower, not only the copying one.
In the modes that compute little, most frames are
never read again, so the device takes them itself (:meth:`SimulatedDevice.frame_taker
<memryx.device.simulated.SimulatedDevice.frame_taker>`), on the producing thread, right
after the core's checks:

* ``"shapes"``: nothing reads a frame: it is kept as the app's own arrays
  (:class:`Borrowed`), never copied;
* ``"reuse"``: the frame is hashed here (not on the loop); a frame whose outputs are
  cached is answered here too (:class:`Answered`: copies of the cached outputs, the
  frame itself never read again); only a frame to be computed is copied
  (:class:`Keyed`, with its hash);
* ``"sampled"``: a frame is :class:`Borrowed` only when every computation slot is busy
  and its stream has a computed output already (:meth:`Sampler.borrow
  <._compute.Sampler.borrow>`): such a frame is never computed, and the sampler keeps
  an output that answers it, and its stream, until it is answered. Every other frame
  is copied (it may be computed).

The modes that compute every frame (``"timed"``, ``"fast"``) take none: the core copies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from numpy.typing import NDArray

if TYPE_CHECKING:
    from ._compute import ReuseCache, Sampler

__all__ = ["Answered", "Borrowed", "Keyed", "Taker", "private", "reuse_taker",
           "sampled_taker", "shapes_taker"]

Array = NDArray[Any]
Frame = list[Array]
#: ``taker(frame, stream)``: what the device keeps of a checked frame (``stream``: the
#: frame's callback stream, None when the core does not know it yet).
Taker = Callable[[Frame, "int | None"], Frame]


class Borrowed(list[Array]):
    """The app's own arrays of a frame that the device will not read."""

    __slots__ = ()


class Answered(list[Array]):
    """A frame answered when it was taken (mode ``"reuse"``): ``outputs`` are the
    receiver's; the frame's own arrays (the app's) are not read again."""

    __slots__ = ("outputs",)

    def __init__(self, frame: Frame, outputs: Frame) -> None:
        super().__init__(frame)
        self.outputs = outputs


class Keyed(list[Array]):
    """A private copy of a frame, with its hash (mode ``"reuse"``)."""

    __slots__ = ("key",)

    def __init__(self, frame: Frame, key: bytes) -> None:
        super().__init__(frame)
        self.key = key


def private(frame: Frame) -> Frame:
    """The frame's arrays as private C-contiguous copies."""
    return [a.copy() for a in frame]


def shapes_taker(frame: Frame, stream: int | None) -> Frame:
    return Borrowed(frame)


def reuse_taker(cache: ReuseCache) -> Taker:
    from ._compute import frame_key

    lookup = cache.lookup

    def take(frame: Frame, stream: int | None) -> Frame:
        key = frame_key(frame)
        outputs = lookup(key)
        if outputs is not None:
            return Answered(frame, outputs)
        return Keyed(private(frame), key)
    return take


def sampled_taker(sampler: Sampler) -> Taker:
    borrow = sampler.borrow

    def take(frame: Frame, stream: int | None) -> Frame:
        if stream is not None and borrow(stream):
            return Borrowed(frame)
        return private(frame)
    return take
