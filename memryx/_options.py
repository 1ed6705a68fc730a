"""The vendor SDK's constructor options, and how they map onto memryx.

``AsyncAccl(dfp, device_ids=[0], use_model_shape=(True, True), local_mode=False,
scheduler_options=SchedulerOptions(), client_options=ClientOptions(),
manager_addr=..., manager_port=..., ignore_manager=False)`` (SDK 2.x) and
``AsyncAccl(dfp, group_id=0, **kwargs)`` (SDK 1.x) both work;
:func:`resolve` turns either into what the engine needs: a device spec, its
options, a chip group and the facade's own settings.

Mapping (see ``docs/migrating.md``):

* ``device_ids``: in simulation each id is a simulated device of its own, on a
  device server the id is the chip group the server opens. Several ids: one
  accelerator over several devices (:mod:`memryx.device.multi`), each batch to
  the least busy one, outputs in order.
* ``local_mode`` / ``ignore_manager``: the process owns its device: the
  in-process simulated MX3 (never a device server, whatever ``$MEMRYX_DEVICE``
  says).
* ``manager_addr`` / ``manager_port``, when given: the shared device server
  (``memryx serve``): a Unix socket path (a directory means its ``memryx.sock``),
  or a host name with ``manager_port`` for TCP (``tcp://host:port``).
* ``scheduler_options``: validated always; in simulation the ifmap queue size
  sets the device's input buffer. On a device server, when given, they travel
  to the server, which schedules this client's turns by them (capped by its own
  limits; what applies is in ``statistics()["device"]["scheduler"]``); when not
  given, the server's own options apply (``memryx serve --frame-limit ...``).
* ``client_options``: ``fps_target`` paces input callbacks, ``smoothing`` evens
  out output delivery (both in the facade, :mod:`memryx._compat`).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._exceptions import UsageError

__all__ = ["ClientOptions", "Resolved", "SchedulerOptions", "resolve"]


def device_options() -> frozenset[str]:
    """The keyword options of our own devices, passed through to them: read from their
    constructors, so that an option a device gains is never warned about as unknown."""
    import inspect

    from .device.fd import FdDevice
    from .device.simulated import SimulatedDevice

    names: set[str] = set()
    for cls in (SimulatedDevice, FdDevice):
        for param in inspect.signature(cls.__init__).parameters.values():
            if param.kind is inspect.Parameter.KEYWORD_ONLY:
                names.add(param.name)
    return frozenset(names)

#: The most devices one accelerator may run on (``device_ids``).
MAX_DEVICES = 64

#: The SDK's manager address default (2.x); given explicitly, it selects the server.
SDK_MANAGER_ADDR = "/run/mxa_manager/"


def _int(value: Any, name: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return value


@dataclass(frozen=True)
class SchedulerOptions:
    """How a shared device schedules this client's model (the SDK's 2.1 defaults).

    frame_limit: frames a model runs per turn on the chip.
    time_limit: longest turn, in milliseconds.
    stop_on_empty: end a turn when the client has no frame waiting.
    ifmap_queue_size: input frames buffered for the model.
    ofmap_queue_size: outputs buffered for the model.
    """

    frame_limit: int = 20
    time_limit: int | float = 250
    stop_on_empty: bool = False
    ifmap_queue_size: int = 16
    ofmap_queue_size: int = 21

    def __post_init__(self) -> None:
        _int(self.frame_limit, "SchedulerOptions.frame_limit", 1)
        _int(self.ifmap_queue_size, "SchedulerOptions.ifmap_queue_size", 1)
        _int(self.ofmap_queue_size, "SchedulerOptions.ofmap_queue_size", 1)
        if isinstance(self.time_limit, bool) or not isinstance(self.time_limit, (int, float)):
            raise TypeError(f"SchedulerOptions.time_limit must be a number of milliseconds, "
                            f"got {type(self.time_limit).__name__}")
        if not 0 <= self.time_limit < math.inf:  # (math.isfinite of a huge int overflows)
            raise ValueError(f"SchedulerOptions.time_limit must be >= 0 ms, got "
                             f"{self.time_limit!r}")
        if not isinstance(self.stop_on_empty, bool):
            raise TypeError(f"SchedulerOptions.stop_on_empty must be a bool, got "
                            f"{type(self.stop_on_empty).__name__}")


@dataclass(frozen=True)
class ClientOptions:
    """How this client feeds and drains the accelerator.

    smoothing: deliver outputs at an even pace (the recent average interval)
        instead of in the bursts the device computes them in.
    fps_target: when > 0, call each input callback at most this many times a
        second (frames per second per stream).
    """

    smoothing: bool = False
    fps_target: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.smoothing, bool):
            raise TypeError(f"ClientOptions.smoothing must be a bool, got "
                            f"{type(self.smoothing).__name__}")
        if isinstance(self.fps_target, bool) or not isinstance(self.fps_target, (int, float)):
            raise TypeError(f"ClientOptions.fps_target must be a number, got "
                            f"{type(self.fps_target).__name__}")
        if not 0 <= self.fps_target <= 1.7976931348623157e308:  # (a huge int is refused too)
            raise ValueError(f"ClientOptions.fps_target must be >= 0 (0: no pacing), got "
                             f"{self.fps_target!r}")


@dataclass
class Resolved:
    """What the facade builds its engine from."""

    device: Any
    device_options: dict[str, Any]
    group_id: int
    device_ids: list[int]
    stream_workers: int | None
    use_model_shape: tuple[bool, bool]
    scheduler_options: SchedulerOptions
    client_options: ClientOptions
    local: bool
    ignored: list[str] = field(default_factory=list)

    def options_for(self, device_id: int) -> dict[str, Any]:
        """The device options of one of several devices (a simulated one has chip groups
        up to its id)."""
        options = dict(self.device_options)
        if "groups" in options:
            options["groups"] = device_id + 1
        return options


def _device_ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        raise TypeError("device_ids must be an int or a list of ints, got bool")
    if isinstance(value, int):
        ids = [value]
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        ids = list(value)
        if not ids:
            raise ValueError("device_ids must name at least one device, got []")
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"device_ids must hold ints, got {type(i).__name__} ({i!r})")
    else:
        raise TypeError(f"device_ids must be an int or a list of ints, got "
                        f"{type(value).__name__}")
    for i in ids:
        if i < 0:
            raise ValueError(f"device ids must be >= 0, got {i}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"device_ids repeats a device: {ids}")
    if len(ids) > MAX_DEVICES:
        raise ValueError(f"device_ids names {len(ids)} devices, at most {MAX_DEVICES}")
    return ids


def _model_shape(value: Any) -> tuple[bool, bool]:
    if isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and \
            all(isinstance(v, bool) for v in value):
        return (value[0], value[1])
    raise TypeError(f"use_model_shape must be a bool or a pair of bools (inputs, outputs), "
                    f"got {value!r}")


def _server_spec(addr: Any, port: Any) -> str:
    if not isinstance(addr, (str, os.PathLike)):
        raise TypeError(f"manager_addr must be a path or a host name, got {type(addr).__name__}")
    text = os.fspath(addr)
    if text.startswith(("unix:", "tcp://", "tcps://")):
        return text
    if text.startswith("/") or text.startswith("."):
        path = Path(text)
        if text.endswith("/") or path.is_dir():
            path = path / "memryx.sock"
        return f"unix:{path}"
    if port is None:
        port = 10000
    _int(port, "manager_port", 1)
    if port > 65535:
        raise ValueError(f"manager_port must be <= 65535, got {port}")
    return f"tcp://{text}:{port}"


def resolve(cls_name: str, *, device_ids: Any, use_model_shape: Any, local_mode: Any,
            scheduler_options: Any, client_options: Any, manager_addr: Any, manager_port: Any,
            ignore_manager: Any, group_id: Any, device: Any, stream_workers: Any,
            kwargs: dict[str, Any]) -> Resolved:
    """Validate the constructor's arguments (both SDK generations) and map them."""
    for name, value in (("local_mode", local_mode), ("ignore_manager", ignore_manager)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    scheduler_given = scheduler_options is not None
    if scheduler_options is None:
        scheduler_options = SchedulerOptions()
    elif not isinstance(scheduler_options, SchedulerOptions):
        raise TypeError(f"scheduler_options must be a memryx.SchedulerOptions, got "
                        f"{type(scheduler_options).__name__}")
    if client_options is None:
        client_options = ClientOptions()
    elif not isinstance(client_options, ClientOptions):
        raise TypeError(f"client_options must be a memryx.ClientOptions, got "
                        f"{type(client_options).__name__}")
    shape = _model_shape(use_model_shape)

    ids: list[int] = []
    if device_ids is not None:
        ids = _device_ids(device_ids)
        if group_id is not None and group_id != ids[0]:
            raise UsageError(f"device_ids={device_ids!r} and group_id={group_id!r} disagree; "
                             "give one of them")
    if group_id is None:
        group_id = ids[0] if ids else 0
    if isinstance(group_id, bool) or not isinstance(group_id, int):
        raise TypeError(f"group_id must be an int, got {type(group_id).__name__}")
    if not ids:
        ids = [group_id] if group_id >= 0 else []

    if stream_workers is not None:
        if isinstance(stream_workers, bool) or not isinstance(stream_workers, int) or \
                not (stream_workers >= 1 or stream_workers == -1):
            raise ValueError(f"stream_workers must be a positive int or None, got "
                             f"{stream_workers!r} (-1: pick automatically)")
        if stream_workers == -1:
            stream_workers = None

    options: dict[str, Any] = {}
    ignored: list[str] = []
    known = device_options() if kwargs else frozenset()
    for key, value in kwargs.items():
        if key in known:
            options[key] = value
        else:
            ignored.append(key)
    if ignored:
        warnings.warn(f"{cls_name}: ignoring unknown keyword argument(s) "
                      f"{', '.join(repr(k) for k in ignored)}", UserWarning, stacklevel=4)

    local = local_mode or ignore_manager
    if local:
        if manager_addr is not None or manager_port is not None:
            raise UsageError("local_mode / ignore_manager owns the device in this process; "
                             "manager_addr / manager_port select a shared device server: "
                             "give one or the other")
        if device is None:
            spec = os.environ.get("MEMRYX_DEVICE", "sim")
            device = spec if spec.partition(":")[0] in ("sim", "simulated") else "sim"
        elif isinstance(device, str) and device.partition(":")[0] not in ("sim", "simulated"):
            raise UsageError(f"local_mode=True owns the device in this process, but device="
                             f"{device!r} is a device server")
    elif manager_addr is not None or manager_port is not None:
        if device is not None:
            raise UsageError("give device= or manager_addr/manager_port, not both")
        device = _server_spec(manager_addr if manager_addr is not None else "localhost",
                              manager_port)

    spec = device if device is not None else os.environ.get("MEMRYX_DEVICE", "sim")
    if len(ids) > 1 and not isinstance(spec, str):
        raise UsageError(f"device_ids={ids} runs one device per id, made from a device spec "
                         "('sim', 'unix:PATH', 'tcp://HOST:PORT'); a Device object is one "
                         "device: give device= a spec string or a single device id")
    if isinstance(spec, str) and spec.partition(":")[0] in ("sim", "simulated"):
        if device_ids is not None and group_id >= 0:
            # in simulation each device id is a simulated device of its own
            options.setdefault("groups", group_id + 1)
        if scheduler_options != SchedulerOptions():
            options.setdefault("queue_depth", scheduler_options.ifmap_queue_size)
    elif isinstance(spec, str) and scheduler_given:
        # a device server: the options travel in the HELLO and the server applies them
        options.setdefault("scheduler", asdict(scheduler_options))
    return Resolved(device=device, device_options=options, group_id=group_id, device_ids=ids,
                    stream_workers=stream_workers, use_model_shape=shape,
                    scheduler_options=scheduler_options, client_options=client_options,
                    local=local, ignored=ignored)
