"""Every error the runtime raises on purpose, in one tree.

::

    MemryxError                       base of everything raised on purpose
    ├── UsageError                    the caller did something wrong
    │   ├── ShapeError (ValueError)   a frame's shape does not match its port
    │   ├── DtypeError (TypeError)    a frame's dtype does not match its port
    │   ├── InputCountError (ValueError)  wrong number of arrays for a model's ports
    │   ├── StreamCountError (ValueError) more streams than one model may have
    │   ├── ModelIndexError (IndexError)  model_idx / group_id / stream index out of range
    │   ├── CallbackSignatureError (RuntimeError)  a callback takes the wrong parameters
    │   ├── NotConnectedError (RuntimeError)       wait() with an unconnected input/output
    │   ├── ClosedError (RuntimeError)             use after close / stop
    │   └── LoopBlockingError (RuntimeError)       a blocking call made on a running loop
    ├── DfpError (ValueError)         a DFP file is truncated, corrupted, foreign or too new
    ├── CompilerError                 the NeuralCompiler cannot compile the model
    ├── DeviceError                   the device failed (fault, lost connection)
    └── ProtocolError                 a peer broke the device wire protocol

Each user-mistake class also derives from the builtin exception the API
document promises (``ValueError`` for a wrong shape, ``TypeError`` for a wrong
dtype, ``RuntimeError`` for an unconnected port, ...), so ``except ValueError``
keeps working. Timeouts raise the builtin ``TimeoutError``.
"""

from __future__ import annotations

__all__ = [
    "CallbackSignatureError",
    "ClosedError",
    "CompilerError",
    "DeviceError",
    "DfpError",
    "DtypeError",
    "InputCountError",
    "LoopBlockingError",
    "MemryxError",
    "ModelIndexError",
    "NotConnectedError",
    "ProtocolError",
    "ShapeError",
    "StreamCountError",
    "UsageError",
]


class MemryxError(Exception):
    """Base class of every error the runtime raises on purpose."""


class UsageError(MemryxError):
    """The caller used the API in a way it does not allow."""


class ShapeError(UsageError, ValueError):
    """A frame's shape does not match the shape of the port it was sent to."""


class DtypeError(UsageError, TypeError):
    """A frame's dtype does not match the port's dtype (the runtime never casts silently)."""


class InputCountError(UsageError, ValueError):
    """The number of arrays given does not match the number of the model's input ports."""


class StreamCountError(UsageError, ValueError):
    """``connect_streams`` would give a model more streams than it may have
    (``MultiStreamAsyncAccl.MAX_STREAMS``)."""


class ModelIndexError(UsageError, IndexError):
    """A ``model_idx``, ``group_id`` or stream index is out of range."""


class CallbackSignatureError(UsageError, RuntimeError):
    """A callback's signature does not fit the role it is connected to."""


class NotConnectedError(UsageError, RuntimeError):
    """``wait()`` was called while a model's input or output is not connected."""


class ClosedError(UsageError, RuntimeError):
    """The accelerator was used after it was stopped or closed."""


class LoopBlockingError(UsageError, RuntimeError):
    """A blocking call was made from a thread that runs an event loop."""


class DfpError(MemryxError, ValueError):
    """A DFP file or buffer cannot be read: truncated, corrupted, foreign or too new."""


class CompilerError(MemryxError):
    """The NeuralCompiler cannot compile the given model(s)."""


class DeviceError(MemryxError):
    """The device failed: an execution fault or a lost connection.

    ``lost_frames`` counts the frames that were sent and never came back.
    """

    def __init__(self, message: str, *, lost_frames: int = 0) -> None:
        super().__init__(message)
        self.lost_frames = lost_frames


class ProtocolError(MemryxError):
    """A peer broke the wire protocol, or a message cannot be sent in the current state."""
